"""A local registry for the pull suite: Debian's ``docker-registry`` on 127.0.0.1.

The same approach as ``tests/engine/conftest.py`` (a config YAML with
filesystem storage, a free port, poll ``GET /v2/`` until it answers), copied
here because the test module depends on pytest. No authentication. The process
runs in its own session, gets SIGTERM if the harness dies (PR_SET_PDEATHSIG),
and is stopped by PID (SIGTERM, then SIGKILL) by :meth:`Registry.stop`.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import http.client
import json
import os
import secrets
import signal
import socket
import subprocess
import time
from dataclasses import dataclass
from pathlib import Path

from .runner import SkipBenchmark

REGISTRY_BIN = os.environ.get("LAYERFS_BENCH_REGISTRY_BIN", "/usr/bin/docker-registry")
START_TIMEOUT = 15.0
PR_SET_PDEATHSIG = 1


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _q(value) -> str:
    return json.dumps(str(value))  # a JSON string is a valid YAML scalar


def _config_yaml(root: Path, port: int) -> str:
    return f"""version: 0.1
log:
  level: warn
  formatter: text
storage:
  filesystem:
    rootdirectory: {_q(root)}
  delete:
    enabled: true
  maintenance:
    uploadpurging:
      enabled: false
http:
  addr: {_q(f"127.0.0.1:{port}")}
  secret: {_q(secrets.token_hex(16))}
"""


def _answers(port: int) -> bool:
    try:
        conn = http.client.HTTPConnection("127.0.0.1", port, timeout=1)
        conn.request("GET", "/v2/")
        status = conn.getresponse().status
        conn.close()
        return status in (200, 401)
    except OSError:
        return False


def _die_with_parent() -> None:  # runs in the child between fork and exec
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or None, use_errno=True)
        libc.prctl(PR_SET_PDEATHSIG, signal.SIGTERM, 0, 0, 0)
    except Exception:  # noqa: BLE001 - best effort only
        pass


@dataclass
class Registry:
    host: str          # "127.0.0.1:PORT"
    port: int
    root: Path         # storage directory
    log: Path
    proc: subprocess.Popen
    version: str | None = None

    @property
    def pid(self) -> int:
        return self.proc.pid

    def blob_files(self) -> list[Path]:
        """The registry's blob data files (to keep them warm in page cache)."""
        return sorted((self.root / "docker" / "registry" / "v2" / "blobs").glob("sha256/*/*/data"))

    def stop(self) -> None:
        if self.proc.poll() is not None:
            return
        try:
            os.kill(self.proc.pid, signal.SIGTERM)
        except ProcessLookupError:
            return
        try:
            self.proc.wait(timeout=5)
        except subprocess.TimeoutExpired:
            os.kill(self.proc.pid, signal.SIGKILL)
            self.proc.wait(timeout=5)

    def log_tail(self, n: int = 20) -> str:
        try:
            return "\n".join(self.log.read_text(errors="replace").splitlines()[-n:])
        except OSError:
            return ""


def _version(binary: str) -> str | None:
    try:
        out = subprocess.run([binary, "--version"], capture_output=True, text=True, timeout=10)
    except (OSError, subprocess.TimeoutExpired):
        return None
    text = (out.stdout or out.stderr).strip()
    return text.splitlines()[0] if text else None


def start(workdir: Path) -> Registry:
    """Start docker-registry with its storage under *workdir* (SkipBenchmark when not installed)."""
    binary = REGISTRY_BIN
    if not (os.path.isfile(binary) and os.access(binary, os.X_OK)):
        raise SkipBenchmark(f"{binary} not installed (apt-get install docker-registry; scripts/setup.sh does)")
    workdir.mkdir(parents=True, exist_ok=True)
    root = workdir / "storage"
    root.mkdir(exist_ok=True)
    last = ""
    for attempt in range(3):  # the free port can be taken between probe and bind
        port = free_port()
        config = workdir / "config.yml"
        config.write_text(_config_yaml(root, port))
        log = workdir / f"registry-{attempt}.log"
        with open(log, "wb") as logf:
            proc = subprocess.Popen([binary, "serve", str(config)], stdin=subprocess.DEVNULL, stdout=logf,
                                    stderr=subprocess.STDOUT, start_new_session=True,
                                    preexec_fn=_die_with_parent)
        reg = Registry(f"127.0.0.1:{port}", port, root, log, proc)
        deadline = time.monotonic() + START_TIMEOUT
        while time.monotonic() < deadline:
            if proc.poll() is not None:
                break
            if _answers(port):
                reg.version = _version(binary)
                return reg
            time.sleep(0.02)
        reg.stop()
        last = reg.log_tail()
        if "address already in use" not in last:
            break
    raise RuntimeError(f"docker-registry did not start; its log ends:\n{last}")

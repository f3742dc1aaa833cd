"""Private dockerd / containerd for the benchmarks: own socket, own data dir, no network listener.

``with Dockerd(dir) as d: subprocess.run(d.docker + ["load", ...])`` -- the daemon
runs in its own session (PR_SET_PDEATHSIG: it gets SIGTERM if the harness dies),
listens only on ``DIR/*.sock``; dockerd gets its own bridge (``lfsb<pid>``, created
here and deleted at stop: never ``--bridge none``, which deletes docker0, and no
iptables changes). ``stop()`` sends SIGTERM to the PID it started, waits, SIGKILLs
the session (only processes of that session, by id) if needed, then detaches every
mount left under the data dir and deletes the bridge.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import itertools
import os
import signal
import subprocess
import time
from pathlib import Path

from .. import mounts
from . import missing, which

PR_SET_PDEATHSIG = 1
_bridges = itertools.count()
START_TIMEOUT = 40.0


def _pdeathsig():
    libc = ctypes.CDLL(ctypes.util.find_library("c") or None, use_errno=True)
    libc.prctl(PR_SET_PDEATHSIG, signal.SIGTERM, 0, 0, 0)


class DaemonFailed(Exception):
    pass


class _Daemon:
    name = "daemon"

    def __init__(self, base: Path):
        self.base = Path(base)
        self.base.mkdir(parents=True, exist_ok=True)
        self.proc: subprocess.Popen | None = None
        self.log = self.base / f"{self.name}.log"

    def command(self) -> list[str]:
        raise NotImplementedError

    def ready(self) -> bool:
        raise NotImplementedError

    def _prepare(self) -> None:
        pass

    def _after_stop(self) -> None:
        pass

    def start(self) -> "_Daemon":
        self._prepare()
        with open(self.log, "ab") as log:
            self.proc = subprocess.Popen(self.command(), stdout=log, stderr=subprocess.STDOUT,
                                         stdin=subprocess.DEVNULL, start_new_session=True,
                                         preexec_fn=_pdeathsig)
        deadline = time.monotonic() + START_TIMEOUT
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                tail = self.tail()
                self.stop()
                raise DaemonFailed(f"{self.name} exited {self.proc.returncode} at start: {tail}")
            try:
                if self.ready():
                    return self
            except subprocess.TimeoutExpired:
                pass  # the socket is there, the daemon not answering yet (a busy machine): ask again
            time.sleep(0.2)
        tail = self.tail()
        self.stop()
        raise DaemonFailed(f"{self.name} did not answer within {START_TIMEOUT:.0f} s: {tail}")

    def tail(self, n: int = 400) -> str:
        try:
            return " ".join(self.log.read_text(errors="replace")[-n:].split())
        except OSError:
            return ""

    @property
    def pid(self) -> int | None:
        return self.proc.pid if self.proc else None

    def stop(self) -> None:
        p = self.proc
        if p is not None and p.poll() is None:
            p.send_signal(signal.SIGTERM)
            try:
                p.wait(timeout=20)
            except subprocess.TimeoutExpired:
                p.kill()
                p.wait(timeout=10)
        if p is not None:
            # children of the daemon (shims, a managed containerd) are in its session
            try:
                os.killpg(p.pid, signal.SIGKILL)
            except (ProcessLookupError, PermissionError):
                pass
        mounts.sweep(self.base)
        self._after_stop()
        self.proc = None

    def __enter__(self):
        return self.start()

    def __exit__(self, *exc):
        self.stop()


class Containerd(_Daemon):
    """containerd with the overlayfs snapshotter; CRI plugin disabled; ``self.ctr`` is the client prefix."""
    name = "containerd"

    @property
    def sock(self) -> Path:
        return self.base / "containerd.sock"

    @property
    def ctr(self) -> list[str]:
        return [which("ctr"), "--address", str(self.sock), "--namespace", "bench"]

    def _prepare(self) -> None:
        why = missing("containerd")
        if why:
            raise DaemonFailed(why)
        cfg = self.base / "config.toml"
        cfg.write_text(
            "version = 2\n"
            f'root = "{self.base / "root"}"\n'
            f'state = "{self.base / "state"}"\n'
            'disabled_plugins = ["io.containerd.grpc.v1.cri"]\n'
            "[grpc]\n"
            f'  address = "{self.sock}"\n'
            "[ttrpc]\n"
            f'  address = "{self.base / "containerd-ttrpc.sock"}"\n'
            "[debug]\n"
            '  address = ""\n'
            "[metrics]\n"
            '  address = ""\n')

    def command(self) -> list[str]:
        return [which("containerd"), "--config", str(self.base / "config.toml")]

    def ready(self) -> bool:
        if not self.sock.exists():
            return False
        r = subprocess.run(self.ctr + ["version"], capture_output=True, text=True, timeout=10)
        return r.returncode == 0


class Dockerd(_Daemon):
    """dockerd with a storage driver (overlay2 or fuse-overlayfs); ``self.docker`` is the client prefix."""
    name = "dockerd"

    def __init__(self, base: Path, storage_driver: str = "overlay2"):
        super().__init__(base)
        self.storage_driver = storage_driver
        n = next(_bridges) % 50
        self.bridge = f"lfsb{os.getpid() % 100000}x{n}"
        self.subnet = f"172.31.{200 + n}.1/24"
        self._bridge_made = False

    @property
    def sock(self) -> Path:
        return self.base / "docker.sock"

    @property
    def docker(self) -> list[str]:
        return [which("docker"), "-H", f"unix://{self.sock}"]

    def _prepare(self) -> None:
        why = missing("docker")
        if why:
            raise DaemonFailed(why)
        if self.storage_driver == "fuse-overlayfs" and missing("fuse-overlayfs"):
            raise DaemonFailed(missing("fuse-overlayfs"))
        r = subprocess.run(["ip", "link", "add", self.bridge, "type", "bridge"], capture_output=True, text=True)
        if r.returncode != 0:
            raise DaemonFailed(f"cannot create bridge {self.bridge}: {r.stderr.strip()}")
        self._bridge_made = True
        subprocess.run(["ip", "addr", "add", self.subnet, "dev", self.bridge], capture_output=True)
        subprocess.run(["ip", "link", "set", self.bridge, "up"], capture_output=True)

    def command(self) -> list[str]:
        return [which("dockerd"), "-H", f"unix://{self.sock}",
                "--data-root", str(self.base / "root"), "--exec-root", str(self.base / "exec"),
                "--pidfile", str(self.base / "docker.pid"),
                "--storage-driver", self.storage_driver,
                "--bridge", self.bridge, "--iptables=false", "--ip6tables=false", "--ip-forward=false",
                "--ip-masq=false", "--userland-proxy=false",
                "--log-level", "warn", "--config-file", str(self._config())]

    def _config(self) -> Path:
        p = self.base / "daemon.json"
        p.write_text("{}\n")
        return p

    def ready(self) -> bool:
        if not self.sock.exists():
            return False
        r = subprocess.run(self.docker + ["version", "--format", "{{.Server.Version}}"],
                           capture_output=True, text=True, timeout=10)
        return r.returncode == 0 and bool(r.stdout.strip())

    def _after_stop(self) -> None:
        if self._bridge_made:
            subprocess.run(["ip", "link", "del", self.bridge], capture_output=True)
            self._bridge_made = False

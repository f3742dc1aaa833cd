"""What the figures were measured on: machine, kernel, tools, library version, filesystem."""

from __future__ import annotations

import datetime
import os
import platform
import shutil
import subprocess
import sys
from pathlib import Path

from . import mounts


def _first_line(cmd: list[str]) -> str | None:
    if not shutil.which(cmd[0]):
        return None
    try:
        out = subprocess.run(cmd, capture_output=True, text=True, timeout=10)
    except (OSError, subprocess.TimeoutExpired):
        return None
    lines = (out.stdout or out.stderr).strip().splitlines()
    return lines[0].strip(" *") if lines else None


def _cpu_model() -> str | None:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or None


def _mem_total() -> int | None:
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemTotal:"):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    return None


def _os_release() -> str | None:
    try:
        for line in Path("/etc/os-release").read_text().splitlines():
            if line.startswith("PRETTY_NAME="):
                return line.split("=", 1)[1].strip('"')
    except OSError:
        pass
    return None


def filesystem_of(path: Path) -> dict:
    """The mount that holds ``path``: fstype, source, options."""
    real = os.path.realpath(path)
    best = None
    for m in mounts.mount_table():
        mp = m.mountpoint
        if real == mp or real.startswith(mp.rstrip("/") + "/"):
            if best is None or len(mp) >= len(best.mountpoint):
                best = m
    if best is None:
        return {}
    return {"mountpoint": best.mountpoint, "fstype": best.fstype, "source": best.source,
            "options": best.super_options}


def _git(repo: Path, *args: str) -> str | None:
    try:
        out = subprocess.run(["git", "-C", str(repo), *args], capture_output=True, text=True, timeout=10)
    except (OSError, subprocess.TimeoutExpired):
        return None
    return out.stdout.strip() if out.returncode == 0 else None


def _layerfs_version() -> dict:
    info: dict = {}
    try:
        import layerfs
        info["version"] = getattr(layerfs, "__version__", None)
        info["path"] = str(Path(layerfs.__file__).parent)
        repo = Path(layerfs.__file__).parent.parent
        info["git_commit"] = _git(repo, "rev-parse", "HEAD")
        dirty = _git(repo, "status", "--porcelain", "--", "layerfs")
        info["git_dirty"] = bool(dirty) if dirty is not None else None
    except Exception as e:  # noqa: BLE001
        info["error"] = f"{type(e).__name__}: {e}"
    return info


def loadavg() -> list[float] | None:
    try:
        return [float(x) for x in Path("/proc/loadavg").read_text().split()[:3]]
    except OSError:
        return None


def collect(work_dir: Path) -> dict:
    uname = platform.uname()
    try:
        import zstandard
        zstd_py = zstandard.__version__
    except Exception:  # noqa: BLE001
        zstd_py = None
    return {
        "date_utc": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "os": _os_release(),
        "kernel": uname.release,
        "kernel_version": uname.version,
        "arch": uname.machine,
        "cpu_model": _cpu_model(),
        "cpu_count": os.cpu_count(),
        "cpus_usable": len(os.sched_getaffinity(0)),
        "mem_total_bytes": _mem_total(),
        "python": sys.version.split()[0],
        "python_implementation": platform.python_implementation(),
        "python_executable": sys.executable,
        "tar": _first_line(["tar", "--version"]),
        "gzip": _first_line(["gzip", "--version"]),
        "zstd": _first_line(["zstd", "-V"]),
        "python_zstandard": zstd_py,
        "layerfs": _layerfs_version(),
        "work_filesystem": filesystem_of(work_dir),
        "loadavg_start": loadavg(),
    }

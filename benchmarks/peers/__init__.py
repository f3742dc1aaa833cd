"""Real peers for the benchmarks: install them from apt, find them, run their daemons privately.

``python -m benchmarks.peers install [docker|containerd|podman|fuse-overlayfs|all]``
installs from Debian's apt (idempotent: installed packages are left alone; no
service is started by the install -- a temporary ``policy-rc.d`` refuses it).
``python -m benchmarks.peers status`` says what is there and which versions.

:mod:`benchmarks.peers.daemons` starts ``dockerd`` / ``containerd`` on a private
unix socket and data dir (nothing listens on the network), stops them by PID and
detaches every mount left under their data dir. :mod:`benchmarks.peers.podman`
gives daemonless podman a private --root/--runroot/storage.conf/containers.conf
per flavour (overlay, vfs, overlay + fuse-overlayfs).
"""

from __future__ import annotations

import os
import shutil
import subprocess
from pathlib import Path

# peer -> (apt packages, binaries that must exist afterwards)
PEERS: dict[str, tuple[list[str], list[str]]] = {
    "fuse-overlayfs": (["fuse-overlayfs", "fuse3"], ["fuse-overlayfs"]),
    "containerd": (["containerd", "runc"], ["containerd", "ctr"]),
    "docker": (["docker.io", "containerd", "runc"], ["dockerd"]),
    "podman": (["podman", "fuse-overlayfs"], ["podman"]),
}
POLICY_RC = Path("/usr/sbin/policy-rc.d")


def which(binary: str) -> str | None:
    """A binary's path; ``docker`` prefers the packaged client next to dockerd when there is one."""
    if binary == "docker" and Path("/usr/bin/docker").exists():
        return "/usr/bin/docker"
    return shutil.which(binary)


def _first_line(cmd: list[str], contains: str = "") -> str | None:
    if not which(cmd[0]):
        return None
    try:
        r = subprocess.run([which(cmd[0])] + cmd[1:], capture_output=True, text=True, timeout=20)
    except (OSError, subprocess.TimeoutExpired):
        return None
    lines = [l.strip() for l in (r.stdout + "\n" + r.stderr).strip().splitlines() if contains in l]
    return lines[0] if lines else None


def missing(peer: str) -> str | None:
    """None when the peer's binaries are all there; otherwise why not (a skip reason)."""
    pkgs, bins = PEERS[peer]
    absent = [b for b in bins if not which(b)]
    if absent:
        return (f"{peer} not installed ({', '.join(absent)} not found); "
                f"run `python -m benchmarks.peers install {peer}` (apt: {' '.join(pkgs)})")
    return None


def version(peer: str) -> str | None:
    cmd = {"fuse-overlayfs": ["fuse-overlayfs", "--version"],
           "containerd": ["containerd", "--version"],
           "docker": ["dockerd", "--version"],
           "podman": ["podman", "--version"]}[peer]
    return _first_line(cmd, "fuse-overlayfs: version" if peer == "fuse-overlayfs" else "")


def apt_version(package: str) -> str | None:
    r = subprocess.run(["dpkg-query", "-W", "-f=${Status} ${Version}", package], capture_output=True, text=True)
    if r.returncode != 0 or "install ok installed" not in r.stdout:
        return None
    return r.stdout.split()[-1]


def versions() -> dict[str, dict]:
    out = {}
    for peer, (pkgs, _) in PEERS.items():
        out[peer] = {"available": missing(peer) is None, "version": version(peer),
                     "packages": {p: apt_version(p) for p in pkgs}}
    out["docker"]["client"] = _first_line(["docker", "--version"])
    out["docker"]["client_path"] = which("docker")
    out["containerd"]["ctr"] = _first_line(["ctr", "--version"])
    out["runc"] = {"version": _first_line(["runc", "--version"])}
    return out


def install(peers: list[str], log=print) -> int:
    """apt-get install the peers' packages that are not installed yet; returns an exit status."""
    if os.geteuid() != 0:
        log("installing peers needs root (apt-get)")
        return 1
    wanted: list[str] = []
    for p in peers:
        for pkg in PEERS[p][0]:
            if pkg not in wanted and apt_version(pkg) is None:
                wanted.append(pkg)
    if not wanted:
        log(f"already installed: {', '.join(peers)}")
        return 0
    log(f"apt-get install {' '.join(wanted)}")
    env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
    # Packages like docker.io start their service from postinst; refuse that (we run daemons ourselves).
    own_policy = not POLICY_RC.exists()
    if own_policy:
        POLICY_RC.write_text("#!/bin/sh\n# benchmarks.peers: no service starts during install\nexit 101\n")
        POLICY_RC.chmod(0o755)
    try:
        r = subprocess.run(["apt-get", "install", "-y", "--no-install-recommends", *wanted], env=env)
        if r.returncode != 0:
            subprocess.run(["apt-get", "update"], env=env)
            r = subprocess.run(["apt-get", "install", "-y", "--no-install-recommends", *wanted], env=env)
    finally:
        if own_policy:
            POLICY_RC.unlink(missing_ok=True)
    if r.returncode != 0:
        log(f"apt-get install failed (exit {r.returncode})")
        return r.returncode
    bad = [p for p in peers if missing(p)]
    for p in bad:
        log(missing(p))
    return 1 if bad else 0

"""Private podman stores for the benchmarks: own --root, --runroot, storage.conf and containers.conf.

podman is daemonless, so there is nothing to start: :class:`Podman` writes a
``storage.conf`` and a ``containers.conf`` under its base directory (in the
run's work dir) and every command runs with ``CONTAINERS_STORAGE_CONF`` /
``CONTAINERS_CONF`` pointing at them plus ``--root``/``--runroot``, so the host's
``/var/lib/containers`` is never read or written. Three flavours, as in issue 6:

``overlay``         containers/storage's overlay driver (kernel overlayfs)
``vfs``             full copies per layer and per container (no union at all)
``fuse-overlayfs``  the overlay driver with ``mount_program = fuse-overlayfs``

containers.conf sets ``default_ulimits`` (podman's default rlimits cannot be set
here without CAP_SYS_RESOURCE; see ENVIRONMENT.md). We never *run* a container
(crun refuses the hybrid cgroups of these machines), only load / pull / create /
mount / diff / rm, which do not need an OCI runtime.

containers/storage refuses a runroot longer than 50 characters when a mount_program is
set; a longer one is reached through a short symlink ``/tmp/lfspmPID-N`` (the data stays
under the work dir; the link is removed by ``cleanup()``).

``cleanup()`` unmounts and removes every container and image (``podman rm -af``,
``rmi -af``), then detaches whatever is still mounted under the base dir (a
fuse-overlayfs daemon exits when its mount goes). No process outlives a command.
"""

from __future__ import annotations

import itertools
import os
import subprocess
from pathlib import Path

from .. import mounts
from . import apt_version, missing, version, which

FLAVOURS = ("overlay", "vfs", "fuse-overlayfs")
RUNROOT_MAX = 50   # containers/storage refuses a longer runroot with a mount_program
_links = itertools.count()
ULIMITS = '["nofile=20000:20000", "nproc=32768:32768"]'


class PodmanFailed(Exception):
    pass


class Podman:
    def __init__(self, base: Path, flavour: str = "overlay"):
        if flavour not in FLAVOURS:
            raise ValueError(f"podman flavour {flavour!r}; choose from {', '.join(FLAVOURS)}")
        self.base, self.flavour = Path(base), flavour
        self.root, self.runroot = self.base / "root", self.base / "run"
        self.label = "podman " + flavour
        self._link: Path | None = None

    # -------------------------------------------------------------- set-up

    @staticmethod
    def unavailable(flavour: str) -> str | None:
        why = missing("podman")
        if why is None and flavour == "fuse-overlayfs":
            why = missing("fuse-overlayfs")
        return why

    def setup(self) -> "Podman":
        why = self.unavailable(self.flavour)
        if why:
            raise PodmanFailed(why)
        for d in (self.root, self.runroot, self.base / "tmp", self.base / "volumes", self.base / "libpod"):
            d.mkdir(parents=True, exist_ok=True)
        if len(str(self.runroot)) > RUNROOT_MAX:
            # a short name for it (the data stays under the work dir); removed by cleanup()
            self._link = Path(f"/tmp/lfspm{os.getpid()}-{next(_links)}")
            self._link.unlink(missing_ok=True)
            self._link.symlink_to(self.runroot)
            self.runroot = self._link
        driver = "vfs" if self.flavour == "vfs" else "overlay"
        conf = (f'[storage]\ndriver = "{driver}"\ngraphroot = "{self.root}"\nrunroot = "{self.runroot}"\n')
        if self.flavour == "fuse-overlayfs":
            conf += f'[storage.options.overlay]\nmount_program = "{which("fuse-overlayfs")}"\n'
        elif self.flavour == "overlay":
            conf += '[storage.options.overlay]\nmountopt = "nodev"\n'
        (self.base / "storage.conf").write_text(conf)
        (self.base / "containers.conf").write_text(
            "[containers]\n"
            f"default_ulimits = {ULIMITS}\n"
            "[engine]\n"
            f'static_dir = "{self.base / "libpod"}"\n'
            f'volume_path = "{self.base / "volumes"}"\n'
            f'tmp_dir = "{self.base / "tmp"}"\n'
            'events_logger = "none"\n')
        r = self.run("info", "--format", "{{.Store.GraphDriverName}} {{.Store.GraphRoot}}", check=False)
        if r.returncode != 0:
            raise PodmanFailed(f"podman info failed here: {r.stderr.strip()[-300:]}")
        got = r.stdout.split()
        if not got or got[0] != driver or got[1] != str(self.root):
            raise PodmanFailed(f"podman did not take the private store config: `podman info` says {r.stdout.strip()}")
        return self

    @property
    def env(self) -> dict[str, str]:
        return {**os.environ, "CONTAINERS_STORAGE_CONF": str(self.base / "storage.conf"),
                "CONTAINERS_CONF": str(self.base / "containers.conf"), "TMPDIR": str(self.base / "tmp")}

    @property
    def cmd(self) -> list[str]:
        return [which("podman"), "--root", str(self.root), "--runroot", str(self.runroot),
                "--storage-driver", "vfs" if self.flavour == "vfs" else "overlay"]

    def run(self, *args: str, check: bool = True, timeout: float = 600) -> subprocess.CompletedProcess:
        r = subprocess.run(self.cmd + list(args), env=self.env, capture_output=True, text=True, timeout=timeout)
        if check and r.returncode != 0:
            raise PodmanFailed(f"podman {' '.join(args)} exited {r.returncode}: {r.stderr.strip()[-300:]}")
        return r

    def info(self) -> dict:
        return {"podman": version("podman"), "package": apt_version("podman"), "flavour": self.flavour,
                "storage_driver": "vfs" if self.flavour == "vfs" else "overlay",
                "mount_program": which("fuse-overlayfs") if self.flavour == "fuse-overlayfs" else None,
                "fuse-overlayfs": version("fuse-overlayfs") if self.flavour == "fuse-overlayfs" else None,
                "root": str(self.root), "config": "private storage.conf / containers.conf under the run's work dir"}

    # -------------------------------------------------------------- operations

    def load(self, archive: Path) -> None:
        self.run("load", "-q", "-i", str(archive))

    def pull(self, ref: str) -> None:
        self.run("pull", "-q", "--tls-verify=false", ref)

    def create(self, image: str, name: str) -> None:
        self.run("create", "--name", name, "--pull", "never", "--net", "none", image, "/bin/sh")

    def mount(self, name: str) -> Path:
        return Path(self.run("mount", name).stdout.strip())

    def umount(self, name: str) -> None:
        self.run("umount", name)

    def rm(self, *names: str) -> None:
        self.run("rm", "-f", *names)

    def rmi_all(self) -> None:
        self.run("rmi", "-af", check=False)

    def cleanup(self) -> None:
        """Remove every container and image; detach anything still mounted under the base dir."""
        try:
            self.run("umount", "-a", check=False, timeout=120)
            self.run("rm", "-af", check=False, timeout=600)
            self.run("rmi", "-af", check=False, timeout=600)
        except (OSError, subprocess.TimeoutExpired):
            pass
        mounts.sweep(self.base)
        if self._link is not None:
            self._link.unlink(missing_ok=True)

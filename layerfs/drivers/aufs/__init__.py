"""aufs: layers as plain directories in aufs/OCI format, a rootfs as a union served over FUSE.

The fallback where kernel overlayfs cannot be used (nested overlay,
unsupported backing filesystems, old kernels).  On disk, under ``<root>/aufs``::

    <id>/diff       the layer's files (the branch); whiteouts kept as OCI/aufs
                    entries: ``.wh.<name>`` and ``.wh..wh..opq``
    <id>/merged     where the layer's view is mounted
    <id>/parent     parent chain ids, nearest first (absent for a base layer)
    <id>/writable   present for a container's writable layer
    run/<id>.log    the mount daemon's log (kept after the mount for post-mortems)
    run/<id>.pid    the mount daemon's pid while mounted
    trash/          directories being deleted (finished by cleanup after a crash)

Applying a layer is a plain untar into ``diff`` (whiteouts stay as they
are); a container's changes and its export are read from its ``diff``
directly (the native diff).  A mount is served by its own daemon process,
``python -m layerfs.drivers.aufs`` (see ``__main__``), detached from the
caller so that a mount outlives the process that made it; ``get`` returns
once the mount answers, ``put`` unmounts and waits for the daemon to exit.
A daemon that died leaves a dead mount (ENOTCONN); ``get``/``is_mounted``
notice it, detach it and (``get``) mount again.

Union semantics and their limits (see ``union.py`` and ``fs.py``):

- lookup top down; ``.wh.<name>`` hides lower entries; an opaque marker hides
  a directory's lower content; ``.wh.*`` names are never listed or looked up
  and creating one fails with EPERM; read-only views fail writes with EROFS.
- copy-up (content with holes, mode, owner, times, xattrs; parents first) on
  every change to a lower entry.  A lower file with hardlinks is copied up
  with every visible name of it, so the names stay one file.
- deleting a lower entry writes a whiteout; a directory deleted and made again
  gets an opaque marker.
- renaming a directory that has lower content fails with EXDEV, as overlayfs
  without redirect_dir does (``mv`` then copies and deletes); directories
  created in the container rename normally.
- names of 252-255 bytes that exist in a lower layer cannot be deleted (their
  whiteout name would not fit): ENAMETOOLONG.
- RENAME_EXCHANGE is not supported (EINVAL).

A container size limit (``size=``) is an xfs project quota on its ``diff``
(the backing filesystem must be xfs mounted with ``pquota``), as overlay2's.
"""

from __future__ import annotations

import errno
import importlib.util
import os
import secrets
import signal
import stat
import subprocess
import sys
import time
from pathlib import Path
from typing import BinaryIO

from ... import _mountapi, archive, whiteout
from ...changes import Change, stat_differs, with_ancestors
from ...errors import DriverUnavailable, InvalidOption
from .. import DirectoryLayers, Driver, remove_tree
from .._quota import ProjectQuota
from .union import OPQ, WH, Union

_RESERVED = {"run", "trash"}
MOUNT_TIMEOUT = 30.0
UNMOUNT_WAIT = 10.0
_LOG_MAX = 1 << 20


class AufsDriver(DirectoryLayers, Driver):
    reserved_names = frozenset(_RESERVED)
    name = "aufs"
    priority = 20
    whiteout_format = archive.WhiteoutFormat.AUFS
    parallel_apply = True
    options: dict[str, str] = {}

    def __init__(self, home: Path, options):
        super().__init__(home, options)
        self.probe(self.home)
        for fixed in _RESERVED:
            (self.home / fixed).mkdir(exist_ok=True)

    @classmethod
    def probe(cls, home: Path) -> None:
        if os.geteuid() != 0:
            raise DriverUnavailable("aufs needs root (to mount with allow_other and keep owners and device nodes); run as root")
        if importlib.util.find_spec("pyfuse3") is None:
            raise DriverUnavailable(
                "aufs needs the pyfuse3 module; install it (pip install pyfuse3, which builds against "
                "libfuse3-dev and pkg-config: apt-get install libfuse3-dev pkg-config fuse3)"
            )
        try:
            fd = os.open("/dev/fuse", os.O_RDWR | os.O_CLOEXEC)
        except OSError as exc:
            raise DriverUnavailable(
                f"aufs needs FUSE: /dev/fuse cannot be opened ({exc.strerror}); load the fuse module "
                "or give the container the device (--device /dev/fuse)"
            ) from None
        os.close(fd)
        Path(home).mkdir(parents=True, exist_ok=True)

    # -- layout ----------------------------------------------------------------
    def _run(self, id: str, suffix: str) -> Path:
        return self.home / "run" / f"{id}.{suffix}"

    def _chain(self, id: str) -> list[str]:
        try:
            text = (self._dir(id) / "parent").read_text()
        except FileNotFoundError:
            return []
        return [line for line in text.split("\n") if line]

    def layer_dirs(self, id: str) -> list[str]:
        """diff dirs of *id*'s parent chain, nearest first."""
        return [str(self.home / lid / "diff") for lid in self._chain(id)]

    # -- layers ----------------------------------------------------------------
    def create(self, id: str, parent: str | None, *, writable: bool = False, size: int | None = None) -> None:
        if size is not None:
            if not writable:
                raise InvalidOption("a size limit applies to containers, not to image layers")
            quota = ProjectQuota(self.home)
            usable, why = quota.supported()
            if not usable:
                raise InvalidOption(f"aufs container size: {why}")
        d = self._dir(id)
        d.mkdir(mode=0o700)
        (d / "diff").mkdir(mode=0o755)
        os.chmod(d / "diff", 0o755)
        (d / "merged").mkdir(mode=0o700)
        if parent is not None:
            chain = [parent] + self._chain(parent)
            (d / "parent").write_text("\n".join(chain) + "\n")
        if writable:
            (d / "writable").touch()
        if size is not None:
            # The daemon writes the container's files into diff: an xfs project
            # quota on it limits the container (writes fail with EDQUOT).
            quota.set_limit(d / "diff", size)

    def remove(self, id: str) -> None:
        self.put(id)
        d = self._dir(id)
        try:
            target = self.home / "trash" / f"{id}-{secrets.token_hex(3)}"
            os.rename(d, target)
        except FileNotFoundError:
            target = None
        if target is not None:
            remove_tree(str(target))
        for suffix in ("log", "pid"):
            self._run(id, suffix).unlink(missing_ok=True)

    # -- mounts ----------------------------------------------------------------
    def _state(self, id: str) -> str:
        """"none", "alive" or "dead" (a FUSE mount whose daemon is gone: ENOTCONN)."""
        merged = self._dir(id) / "merged"
        try:
            st = os.lstat(merged)
            parent = os.lstat(merged.parent)
        except FileNotFoundError:
            return "none"
        except OSError as exc:
            if exc.errno == errno.ENOTCONN:
                return "dead"
            raise
        if st.st_dev == parent.st_dev:
            return "none"
        try:
            os.statvfs(merged)  # never cached by the kernel: the daemon answers or the mount is dead
        except OSError as exc:
            if exc.errno == errno.ENOTCONN:
                return "dead"
            raise
        return "alive"

    def is_mounted(self, id: str) -> bool:
        state = self._state(id)
        if state == "dead":
            self._clear_dead(id)
            return False
        return state == "alive"

    def get(self, id: str, *, readonly: bool = False) -> Path:
        d = self._dir(id)
        merged = d / "merged"
        state = self._state(id)
        if state == "alive":
            return merged
        if state == "dead":
            self._clear_dead(id)
        if not (d / "diff").is_dir():
            raise FileNotFoundError(errno.ENOENT, f"aufs layer {id} has no directory", str(d))
        ro = readonly or not (d / "writable").exists()
        self._spawn(id, [str(d / "diff")] + self.layer_dirs(id), merged, ro)
        return merged

    def _spawn(self, id: str, branches: list[str], merged: Path, readonly: bool) -> None:
        log_path = self._run(id, "log")
        pid_path = self._run(id, "pid")
        pid_path.unlink(missing_ok=True)
        try:
            if log_path.stat().st_size > _LOG_MAX:
                log_path.unlink()
        except FileNotFoundError:
            pass
        cmd = [sys.executable, "-m", "layerfs.drivers.aufs", "--detach", str(pid_path),
               "--fsname", f"layerfs-aufs:{id[:16]}", "--mountpoint", str(merged)]
        if readonly:
            cmd.append("--readonly")
        cmd += ["--branches", *branches]
        env = dict(os.environ)
        pkg_root = str(Path(__file__).resolve().parents[3])
        env["PYTHONPATH"] = pkg_root + (os.pathsep + env["PYTHONPATH"] if env.get("PYTHONPATH") else "")
        started = time.monotonic()
        with open(log_path, "ab") as logf:
            # The launcher forks the daemon and exits at once: the daemon is
            # nobody's child here, so a mount outlives the process that made it.
            launcher = subprocess.Popen(cmd, stdin=subprocess.DEVNULL, stdout=logf, stderr=logf,
                                        start_new_session=True, close_fds=True, cwd="/", env=env)
        rc = launcher.wait()
        if rc != 0:
            raise self._failed(id, f"the aufs mount daemon did not start (exit status {rc})")
        try:
            pid = int(pid_path.read_text())
        except (FileNotFoundError, ValueError):
            raise self._failed(id, "the aufs mount daemon did not record its pid") from None
        deadline = started + MOUNT_TIMEOUT
        delay = 0.002
        while True:
            state = self._state(id)
            if state == "alive":
                try:
                    os.statvfs(merged)
                    return
                except OSError as exc:
                    if exc.errno != errno.ENOTCONN:
                        raise
                    state = "dead"
            if not _alive(pid):
                if state != "none":
                    self._clear_dead(id)
                raise self._failed(id, "the aufs mount daemon exited before the mount was ready")
            if time.monotonic() > deadline:
                _kill(pid, signal.SIGKILL)
                if state != "none":
                    self._clear_dead(id)
                raise self._failed(id, f"the aufs mount was not ready after {MOUNT_TIMEOUT:.0f} s")
            time.sleep(delay)
            delay = min(delay * 2, 0.05)

    def _failed(self, id: str, what: str) -> DriverUnavailable:
        log_path = self._run(id, "log")
        try:
            tail = log_path.read_bytes()[-2000:].decode("utf-8", "replace").strip()
        except FileNotFoundError:
            tail = ""
        tail = " | ".join(tail.splitlines()[-8:])
        return DriverUnavailable(f"mounting aufs layer {id}: {what}; log {log_path}: {tail or '(empty)'}")

    def _daemon_pid(self, id: str) -> int | None:
        try:
            pid = int(self._run(id, "pid").read_text())
        except (FileNotFoundError, ValueError):
            return None
        # Only a process that is this mount's daemon (pids get reused).
        try:
            cmdline = Path(f"/proc/{pid}/cmdline").read_bytes()
        except OSError:
            return None
        merged = os.fsencode(str(self._dir(id) / "merged"))
        if b"layerfs.drivers.aufs" not in cmdline or merged not in cmdline.split(b"\0"):
            return None
        return pid

    def _clear_dead(self, id: str) -> None:
        """Detach a dead mount and make sure its daemon is gone."""
        merged = str(self._dir(id) / "merged")
        pid = self._daemon_pid(id)
        if pid is not None:
            _kill(pid, signal.SIGKILL)
        try:
            _mountapi.umount(merged, _mountapi.MNT_DETACH)
        except OSError as exc:
            if exc.errno not in (errno.EINVAL, errno.ENOENT):
                raise
        if pid is not None:
            _wait_gone(pid, 2.0)
        self._run(id, "pid").unlink(missing_ok=True)

    def put(self, id: str) -> None:
        state = self._state(id)
        if state == "none":
            return
        if state == "dead":
            self._clear_dead(id)
            return
        merged = str(self._dir(id) / "merged")
        pid = self._daemon_pid(id)
        detached = False
        for attempt in range(20):
            try:
                _mountapi.umount(merged)
                break
            except OSError as exc:
                if exc.errno == errno.EINVAL:
                    break
                if exc.errno != errno.EBUSY:
                    raise
                if attempt >= 4:
                    # Still busy: detach it now; the daemon serves the open files
                    # and exits when the kernel lets the mount go.
                    _mountapi.umount(merged, _mountapi.MNT_DETACH)
                    detached = True
                    break
                time.sleep(0.01 * (attempt + 1))
        if pid is not None and not detached:
            if not _wait_gone(pid, UNMOUNT_WAIT):
                _kill(pid, signal.SIGKILL)
                _wait_gone(pid, 2.0)
        if not detached:
            self._run(id, "pid").unlink(missing_ok=True)

    def status(self) -> dict:
        mounted, dead = [], []
        for point in _mountapi.mounts_under(str(self.home)):
            p = Path(point)
            if p.name != "merged" or p.parent.parent != self.home:
                continue
            if self._state(p.parent.name) == "dead":
                dead.append(p.parent.name)
            else:
                mounted.append(p.parent.name)
        try:
            from importlib.metadata import version

            fuse = f"pyfuse3 {version('pyfuse3')}"
        except Exception:  # noqa: BLE001 - informational only
            fuse = "pyfuse3"
        return {"fuse": fuse, "mounts": len(mounted), "dead_mounts": sorted(dead)}

    def cleanup(self, repair: bool = True, deep: bool = False) -> list[str]:
        found = []
        trash = self.home / "trash"
        for name in os.listdir(trash) if trash.is_dir() else []:
            found.append(f"aufs trash holds an unfinished deletion ({name})")
            if repair:
                remove_tree(str(trash / name))
        if deep:
            for point in _mountapi.mounts_under(str(self.home)):
                p = Path(point)
                if p.name == "merged" and p.parent.parent == self.home and self._state(p.parent.name) == "dead":
                    found.append(f"aufs mount of {p.parent.name} is dead (its daemon exited)")
                    if repair:
                        self._clear_dead(p.parent.name)
            run = self.home / "run"
            for name in os.listdir(run) if run.is_dir() else []:
                id, _, suffix = name.rpartition(".")
                if suffix == "pid" and self._state(id) == "none" and repair:
                    (run / name).unlink(missing_ok=True)  # a daemon that exited on its own
                elif suffix == "log" and not self._dir(id).exists() and repair:
                    (run / name).unlink(missing_ok=True)
        return found

    # -- native diff (apply: DirectoryLayers) -------------------------------------
    def changes(self, id: str, parent: str | None) -> list[Change]:
        return aufs_changes(str(self._dir(id) / "diff"), Union(self.layer_dirs(id)))

    def export(self, id: str, parent: str | None, out: BinaryIO) -> str:
        exporter = archive.TarExporter(out)
        export_branch(exporter, str(self._dir(id) / "diff"), Union(self.layer_dirs(id)))
        return exporter.close()


# -- native diff over an aufs branch ---------------------------------------------


def _read_branch_dir(path: str) -> tuple[list[str], set[str], bool]:
    """(entry names, whiteout targets, opaque) of one directory of a branch."""
    names, hides, opaque = [], set(), False
    for name in os.listdir(path or "/"):
        if name == OPQ:
            opaque = True
            continue
        if name.startswith(WH):
            if not name.startswith(whiteout.AUFS_META_PREFIX) and len(name) > len(WH):
                hides.add(name[len(WH):])
            continue
        names.append(name)
    return names, hides, opaque


def aufs_changes(upper: str, lowers: Union) -> list[Change]:
    """What the branch *upper* changes over *lowers* (the same answer as changes.tree_changes)."""
    raw: dict[str, str] = {}

    def added(rel: str) -> None:
        names, _, _ = _read_branch_dir(upper + rel)
        for name in names:
            child = rel + "/" + name
            raw[child] = "A"
            if stat.S_ISDIR(os.lstat(upper + child).st_mode):
                added(child)

    def walk(rel: str, hidden_below: bool) -> None:
        names, hides, opaque = _read_branch_dir(upper + rel)
        present = set(names)
        for target in hides - present:
            if lowers.lstat(rel + "/" + target) is not None:
                raw[rel + "/" + target] = "D"
        if opaque or hidden_below:
            # everything the lower layers had here and the upper lacks is gone
            for name in lowers.listdir(rel) - present:
                raw[rel + "/" + name] = "D"
        for name in names:
            child = rel + "/" + name
            st = os.lstat(upper + child)
            below = lowers.lstat(child)
            is_dir = stat.S_ISDIR(st.st_mode)
            if below is None:
                raw[child] = "A"
                if is_dir:
                    added(child)
                continue
            if not is_dir or not stat.S_ISDIR(below.st_mode) or stat_differs(below, st):
                raw[child] = "C"  # copied up: modified content or metadata, or a new type
            if is_dir:
                if stat.S_ISDIR(below.st_mode):
                    walk(child, opaque or hidden_below or name in hides)
                else:
                    added(child)

    walk("", False)
    return with_ancestors(raw)


def export_branch(exporter: archive.TarExporter, upper: str, lowers: Union) -> None:
    """Write the branch *upper* as an OCI layer: its entries, whiteouts (of names the lowers hold), opaque dirs."""

    def walk(rel: str) -> None:
        names, hides, _ = _read_branch_dir(upper + rel)
        present = set(names)
        items = [(n, False) for n in names]
        items += [(t, True) for t in hides - present if lowers.lstat(rel + "/" + t) is not None]
        for name, is_whiteout in sorted(items):
            child = rel + "/" + name
            if is_whiteout:
                exporter.whiteout(child[1:])
                continue
            path = upper + child
            st = os.lstat(path)
            exporter.add(child[1:], path, st)
            if stat.S_ISDIR(st.st_mode):
                if name in hides or os.path.lexists(path + "/" + OPQ):
                    exporter.opaque(child[1:])
                walk(child)

    if os.path.lexists(upper + "/" + OPQ):
        exporter.opaque("")
    walk("")


# -- processes ---------------------------------------------------------------------


def _alive(pid: int) -> bool:
    """True while *pid* runs (a zombie has exited)."""
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            data = f.read()
    except OSError:
        return False
    state = data[data.rfind(b")") + 2 : data.rfind(b")") + 3]
    return state not in (b"Z", b"X")


def _kill(pid: int, sig: int) -> None:
    try:
        os.kill(pid, sig)
    except ProcessLookupError:
        pass


def _wait_gone(pid: int, timeout: float) -> bool:
    deadline = time.monotonic() + timeout
    delay = 0.001
    while _alive(pid):
        if time.monotonic() > deadline:
            return False
        time.sleep(delay)
        delay = min(delay * 2, 0.05)
    return True

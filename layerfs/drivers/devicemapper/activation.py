"""Activating thin devices (create + load ``thin`` table + resume, all ioctls), mounting them,
the base device, growing and discarding.

A mixin of :class:`DevicemapperDriver`.  No udev may be running (the test
VM, containers), so /dev/mapper nodes are made here from the dev_t.
"""

from __future__ import annotations

import errno
import fcntl
import logging
import os
import shutil
import stat
import struct
import subprocess
import time
from contextlib import contextmanager
from pathlib import Path

from ... import _mountapi
from . import dmioctl
from .dmioctl import DMError, Target
from .config import BASE
from .pool import PoolError

log = logging.getLogger("layerfs.devicemapper")

BLKDISCARD = 0x1277  # _IO(0x12, 119), linux/fs.h


class Activation:
    """Device-mapper devices of the store's thin devices, their mounts, and the base device."""

    # -- activation -----------------------------------------------------------
    @contextmanager
    def _suspended(self, key: str | None):
        """Suspend (and freeze) *key*'s device while a snapshot of it is taken, when it is active."""
        name = self._dm_name(key) if key else None
        info = self.ctl.info(name) if name else None
        if info is None or not info.active or info.suspended:
            yield
            return
        self.ctl.suspend(name)
        try:
            yield
        finally:
            self.ctl.resume(name)

    def _activate(self, key: str, rec: dict) -> str:
        name = self._dm_name(key)
        sectors = rec["size"] // dmioctl.SECTOR
        info = None
        try:  # the usual case first: no device yet (one ioctl fewer than asking before)
            dev = self.ctl.create(name)
        except DMError as exc:
            if exc.errno != errno.EBUSY:
                raise
            info = self.ctl.info(name)
            dev = info.dev if info is not None else self.ctl.create(name)
        if info is not None and info.active:
            if info.deferred_remove:
                self.ctl.message(name, dmioctl.MSG_CANCEL_DEFERRED_REMOVE)
            table = self.ctl.table(name)
            if table and table[0].length != sectors:
                self._load_thin(name, rec, sectors)  # grown since it was activated
        else:
            try:
                self._load_thin(name, rec, sectors)
            except BaseException:
                self.ctl.remove(name)
                raise
        return make_node(name, dev)

    def _load_thin(self, name: str, rec: dict, sectors: int) -> None:
        params = dmioctl.thin_params(self.pool.dev_string, rec["device_id"])
        self.ctl.load(name, [Target(0, sectors, "thin", params)])
        self.ctl.resume(name)

    def _deactivate(self, key: str) -> bool:
        """Remove *key*'s device-mapper device; False when it is busy (deferred or left active)."""
        name = self._dm_name(key)
        for attempt in range(5):
            if self.ctl.info(name) is None:
                remove_node(name)
                return True
            try:
                self.ctl.remove(name)
                remove_node(name)
                return True
            except DMError as exc:
                if exc.errno == errno.ENXIO:
                    continue
                if exc.errno != errno.EBUSY:
                    raise
            time.sleep(0.02 * (attempt + 1))
        if self.cfg.deferred_removal:
            try:
                gone = self.ctl.remove(name, deferred=True)
            except DMError as exc:
                if exc.errno != errno.ENXIO:
                    raise
                gone = True
            remove_node(name)
            return gone
        return False

    def _mount(self, key: str, dev_path: str, target: Path, readonly: bool) -> None:
        opts = [o for o in self.cfg.mountopt.split(",") if o]
        if self.fs == "xfs" and "nouuid" not in opts:
            opts.append("nouuid")
        _mountapi.mount(dev_path, str(target), self.fs, _mountapi.MS_RDONLY if readonly else 0, ",".join(opts) or None)

    def _umount(self, target: Path) -> None:
        _mountapi.unmount_retrying(str(target))

    # -- a layer's view: <home>/mnt/<id>/rootfs, a mount point of its own ----------
    # The device's rootfs directory (not its root: ext4's lost+found, and the one
    # xfs_repair makes, stay out of sight) is bind-mounted on mnt/<id>/rootfs, a
    # directory of the store's filesystem, so the path handed out is a real mount
    # point and one umount releases the device.  To make the bind, the device is
    # mounted for a moment on mnt/<id> itself, covering rootfs, which is reached
    # through a descriptor opened before: no staging directory to create per view.
    def _mount_view(self, id: str, dev_path: str, readonly: bool) -> Path:
        mnt = self._mnt(id)
        view = mnt / "rootfs"
        for d in (mnt, view):
            d.mkdir(exist_ok=True)
        view_fd = os.open(view, os.O_PATH | os.O_DIRECTORY | os.O_CLOEXEC | os.O_NOFOLLOW)
        try:
            self._mount(id, dev_path, mnt, readonly)
            try:
                _mountapi.bind_onto(str(view), view_fd)  # the path resolves on the device now
            finally:
                self._umount_fresh(mnt)
        finally:
            os.close(view_fd)
        return view

    def _umount_fresh(self, target: Path) -> None:
        """Unmount a mount this call just made (no need to ask whether it is one)."""
        try:
            _mountapi.umount(str(target))
        except OSError as exc:
            if exc.errno != errno.EBUSY:
                raise
            self._umount(target)

    def _umount_view(self, id: str) -> None:
        mnt = self._mnt(id)
        # mnt: the device, left by a crash while making the view (it covers rootfs,
        # so it goes first); dev: the staging directory of older layerfs versions.
        for target in (mnt / "dev", mnt, mnt / "rootfs"):
            self._umount(target)

    def _remove_mnt_dir(self, id: str) -> None:
        mnt = self._mnt(id)
        (mnt / "view-pid").unlink(missing_ok=True)
        for d in (mnt / "rootfs", mnt / "dev", mnt):
            try:
                d.rmdir()
            except OSError:
                pass

    # -- the base device --------------------------------------------------------
    def _make_base(self, meta: dict) -> None:
        old = meta.get("base")
        if old is not None:  # a crash while formatting it: start again
            self._deactivate(BASE)
            self._delete_device(meta, BASE, old)
        rec = {"device_id": 0, "size": self.cfg.basesize, "fs": self.cfg.fs, "ready": False}
        self._create_device(meta, BASE, rec, None, None)
        dev = self._activate(BASE, rec)
        mnt = self.home / "mnt" / BASE
        try:
            if self.cfg.fs == "xfs":
                cmd = ["mkfs.xfs", "-f", "-q", "-K", *self.cfg.mkfsarg, dev]
            else:
                cmd = ["mkfs.ext4", "-q", "-F", "-E", "nodiscard,lazy_itable_init=0,lazy_journal_init=0", *self.cfg.mkfsarg, dev]
            run(cmd, f"formatting the base device with {self.cfg.fs}")
            mnt.mkdir(exist_ok=True)
            self._mount(BASE, dev, mnt, readonly=False)
            try:
                os.mkdir(mnt / "rootfs", 0o755)
                os.chmod(mnt / "rootfs", 0o755)
            finally:
                self._umount(mnt)
        finally:
            self._deactivate(BASE)
            try:
                mnt.rmdir()
            except OSError:
                pass
        rec["ready"] = True
        meta["base"] = rec
        self._save(meta)

    def _grow(self, id: str, rec: dict) -> None:
        """Grow a new device's filesystem to the device's (larger) size."""
        dev = self._activate(id, rec)
        mnt = self._mnt(id)  # no view yet: the device may cover the directory for a moment
        mnt.mkdir(parents=True, exist_ok=True)
        try:
            self._mount(id, dev, mnt, readonly=False)
            try:
                if self.fs == "xfs":
                    run(["xfs_growfs", str(mnt)], "growing the container's xfs filesystem")
                else:
                    run(["resize2fs", dev], "growing the container's ext4 filesystem")
            finally:
                self._umount(mnt)
        finally:
            self._deactivate(id)

    def _discard(self, id: str, rec: dict) -> None:
        """Give a device's blocks back to the loop file (punching holes) before deleting it."""
        name = self._dm_name(id)
        info = self.ctl.info(name)
        if info is not None and info.open_count:
            return  # busy: leave it to the deletion
        path = self._activate(id, rec)
        try:
            fd = os.open(path, os.O_WRONLY | os.O_CLOEXEC)
        except OSError:
            return
        try:
            fcntl.ioctl(fd, BLKDISCARD, struct.pack("=QQ", 0, rec["size"]))
        except OSError as exc:
            log.debug("BLKDISCARD on %s: %s", name, exc)
        finally:
            os.close(fd)


def which(tool: str) -> str | None:
    return shutil.which(tool, path=os.environ.get("PATH", "") + ":/usr/sbin:/sbin")


def run(cmd: list[str], what: str) -> None:
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True)
    except FileNotFoundError:
        raise PoolError(f"devicemapper: {cmd[0]} is not installed ({what})") from None
    if proc.returncode != 0:
        detail = (proc.stderr.strip() or proc.stdout.strip() or f"exit {proc.returncode}").splitlines()
        raise PoolError(f"devicemapper: {what} failed: `{' '.join(cmd)}`: {detail[-1] if detail else ''}")


def make_node(name: str, dev: int) -> str:
    """/dev/mapper/<name> as a block node for *dev* (no udev may be running to make it)."""
    path = os.path.join(dmioctl.MAPPER_DIR, name)
    try:
        st = os.stat(path)
        if stat.S_ISBLK(st.st_mode) and st.st_rdev == dev:
            return path
        os.unlink(path)
    except FileNotFoundError:
        pass
    try:
        os.mknod(path, 0o600 | stat.S_IFBLK, dev)
    except FileExistsError:  # udev made it meanwhile
        pass
    return path


def remove_node(name: str) -> None:
    path = os.path.join(dmioctl.MAPPER_DIR, name)
    try:
        if not os.path.islink(path):
            os.unlink(path)
    except FileNotFoundError:
        pass

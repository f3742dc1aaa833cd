"""XFS project quotas for per-container size limits (overlay2.size).

A container's upper directory gets its own project id (inherited by
everything created below it) and a hard block limit on that project, as
Docker's overlay2 does.  Needs the backing filesystem to be XFS mounted with
``pquota`` (or ``prjquota``).
"""

from __future__ import annotations

import ctypes
import errno
import fcntl
import os
import stat
import struct
from pathlib import Path

_libc = ctypes.CDLL(None, use_errno=True)
_libc.quotactl.argtypes = [ctypes.c_int, ctypes.c_char_p, ctypes.c_int, ctypes.c_void_p]

FS_IOC_FSGETXATTR = 0x801C581F
FS_IOC_FSSETXATTR = 0x401C5820
FS_XFLAG_PROJINHERIT = 0x00000200
_FSXATTR = struct.Struct("=IIIII8x")  # xflags, extsize, nextents, projid, cowextsize, pad

PRJQUOTA = 2
Q_XGETQUOTA = (ord("X") << 8) + 3
Q_XSETQLIM = (ord("X") << 8) + 4
FS_DQUOT_VERSION = 1
FS_PROJ_QUOTA = 2
FS_DQ_BSOFT = 1 << 2
FS_DQ_BHARD = 1 << 3


class _FsDiskQuota(ctypes.Structure):
    _fields_ = [
        ("d_version", ctypes.c_int8),
        ("d_flags", ctypes.c_int8),
        ("d_fieldmask", ctypes.c_uint16),
        ("d_id", ctypes.c_uint32),
        ("d_blk_hardlimit", ctypes.c_uint64),
        ("d_blk_softlimit", ctypes.c_uint64),
        ("d_ino_hardlimit", ctypes.c_uint64),
        ("d_ino_softlimit", ctypes.c_uint64),
        ("d_bcount", ctypes.c_uint64),
        ("d_icount", ctypes.c_uint64),
        ("d_itimer", ctypes.c_int32),
        ("d_btimer", ctypes.c_int32),
        ("d_iwarns", ctypes.c_uint16),
        ("d_bwarns", ctypes.c_uint16),
        ("d_itimer_hi", ctypes.c_int8),
        ("d_btimer_hi", ctypes.c_int8),
        ("d_rtbtimer_hi", ctypes.c_int8),
        ("d_padding2", ctypes.c_int8),
        ("d_rtb_hardlimit", ctypes.c_uint64),
        ("d_rtb_softlimit", ctypes.c_uint64),
        ("d_rtbcount", ctypes.c_uint64),
        ("d_rtbtimer", ctypes.c_int32),
        ("d_rtbwarns", ctypes.c_uint16),
        ("d_padding3", ctypes.c_int16),
        ("d_padding4", ctypes.c_char * 8),
    ]


def _qcmd(cmd: int, qtype: int) -> int:
    return (cmd << 8) | (qtype & 0xFF)


class ProjectQuota:
    """Sets project quotas on directories of one XFS filesystem."""

    def __init__(self, home: Path):
        self.home = Path(home)
        self.device = self.home / "backingFsBlockDev"
        self._counter = self.home / "quota-projid"

    def _ensure_device(self) -> bytes:
        # Why: quotactl wants a block device path; the mount source may be a
        # loop device, LVM name or missing from this namespace, so make our
        # own node for the filesystem's st_dev (as moby does).
        dev = os.stat(self.home).st_dev
        try:
            st = os.stat(self.device)
            if stat.S_ISBLK(st.st_mode) and st.st_rdev == dev:
                return os.fsencode(self.device)
            os.unlink(self.device)
        except FileNotFoundError:
            pass
        os.mknod(self.device, stat.S_IFBLK | 0o600, dev)
        return os.fsencode(self.device)

    def supported(self) -> tuple[bool, str]:
        """(usable, reason) — usable when the filesystem enforces project quotas."""
        try:
            device = self._ensure_device()
        except OSError as exc:
            return False, f"cannot make a device node for quotactl: {exc.strerror}"
        q = _FsDiskQuota()
        res = _libc.quotactl(_qcmd(Q_XGETQUOTA, PRJQUOTA), device, 0, ctypes.byref(q))
        if res == 0:
            return True, "xfs project quotas"
        err = ctypes.get_errno()
        if err == errno.ENOENT:
            return True, "xfs project quotas"
        if err == errno.ESRCH:
            return False, "project quotas are not enabled: mount the xfs backing filesystem with -o pquota"
        return False, f"the backing filesystem has no xfs project quotas ({os.strerror(err)}); use xfs mounted with -o pquota"

    def _next_projid(self) -> int:
        fd = os.open(self._counter, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX)
            data = os.pread(fd, 32, 0).strip()
            projid = int(data) if data else 1000
            os.pwrite(fd, str(projid + 1).encode().ljust(16), 0)
            return projid
        finally:
            os.close(fd)

    def set_limit(self, directory: Path, size: int) -> int:
        """Give *directory* a new project id limited to *size* bytes; returns the id."""
        projid = self._next_projid()
        fd = os.open(directory, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
        try:
            buf = bytearray(fcntl.ioctl(fd, FS_IOC_FSGETXATTR, bytes(_FSXATTR.size)))
            xflags, extsize, nextents, _, cowextsize = _FSXATTR.unpack(bytes(buf))
            fcntl.ioctl(
                fd, FS_IOC_FSSETXATTR, _FSXATTR.pack(xflags | FS_XFLAG_PROJINHERIT, extsize, nextents, projid, cowextsize)
            )
        finally:
            os.close(fd)
        q = _FsDiskQuota()
        q.d_version = FS_DQUOT_VERSION
        q.d_flags = FS_PROJ_QUOTA
        q.d_id = projid
        q.d_fieldmask = FS_DQ_BHARD | FS_DQ_BSOFT
        q.d_blk_hardlimit = q.d_blk_softlimit = (size + 511) // 512  # in 512-byte basic blocks
        res = _libc.quotactl(_qcmd(Q_XSETQLIM, PRJQUOTA), self._ensure_device(), projid, ctypes.byref(q))
        if res != 0:
            err = ctypes.get_errno()
            raise OSError(err, f"quotactl(Q_XSETQLIM) for {directory}: {os.strerror(err)}")
        return projid

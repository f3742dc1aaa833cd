"""Thin ctypes wrappers over the Linux mount syscalls layerfs needs.

The new mount API (fsopen/fsconfig/fsmount/move_mount, Linux >= 5.2) lets
overlayfs take one ``lowerdir+`` parameter per layer (Linux >= 6.8), so a
mount is no longer limited by the size of one page of mount options: that is
what lifts Docker's 128-layer ceiling.  Everything here is a pure syscall
wrapper; callers decide policy.
"""

from __future__ import annotations

import ctypes
import errno
import os
import platform
import re
import time

_libc = ctypes.CDLL(None, use_errno=True)
_libc.syscall.restype = ctypes.c_long
_libc.mount.argtypes = [ctypes.c_char_p, ctypes.c_char_p, ctypes.c_char_p, ctypes.c_ulong, ctypes.c_char_p]
_libc.umount2.argtypes = [ctypes.c_char_p, ctypes.c_int]

# Syscall numbers are shared by x86_64 and the generic (aarch64) table for
# the mount API, which was added after the tables were unified.
_SYS_OPEN_TREE = 428
_SYS_MOVE_MOUNT = 429
_SYS_FSOPEN = 430
_SYS_FSCONFIG = 431
_SYS_FSMOUNT = 432

FSOPEN_CLOEXEC = 0x1
FSCONFIG_SET_FLAG = 0
FSCONFIG_SET_STRING = 1
FSCONFIG_CMD_CREATE = 6
FSMOUNT_CLOEXEC = 0x1
MOUNT_ATTR_RDONLY = 0x1
MOVE_MOUNT_F_EMPTY_PATH = 0x4
MOVE_MOUNT_T_EMPTY_PATH = 0x40
OPEN_TREE_CLONE = 0x1
AT_SYMLINK_NOFOLLOW = 0x100
AT_FDCWD = -100

MS_RDONLY = 0x1
MS_BIND = 0x1000
MNT_DETACH = 0x2

if platform.machine() not in ("x86_64", "aarch64"):  # pragma: no cover - other arches
    raise ImportError(f"layerfs mount syscalls are not mapped for {platform.machine()}")


def _check(result: int, what: str) -> int:
    if result < 0:
        err = ctypes.get_errno()
        raise OSError(err, f"{what}: {os.strerror(err)}")
    return result


class FsContext:
    """A filesystem configuration context (``fsopen``), closed on exit."""

    def __init__(self, fstype: str):
        self.fd = _check(_libc.syscall(_SYS_FSOPEN, fstype.encode(), FSOPEN_CLOEXEC), f"fsopen({fstype})")

    def set_string(self, key: str, value: str) -> None:
        _check(
            _libc.syscall(_SYS_FSCONFIG, self.fd, FSCONFIG_SET_STRING, key.encode(), os.fsencode(value), 0),
            f"fsconfig({key}={value})",
        )

    def set_flag(self, key: str) -> None:
        _check(_libc.syscall(_SYS_FSCONFIG, self.fd, FSCONFIG_SET_FLAG, key.encode(), None, 0), f"fsconfig({key})")

    def create(self) -> None:
        _check(_libc.syscall(_SYS_FSCONFIG, self.fd, FSCONFIG_CMD_CREATE, None, None, 0), "fsconfig(create)")

    def mount_at(self, target: str, readonly: bool = False) -> None:
        attrs = MOUNT_ATTR_RDONLY if readonly else 0
        mnt_fd = _check(_libc.syscall(_SYS_FSMOUNT, self.fd, FSMOUNT_CLOEXEC, attrs), "fsmount")
        try:
            _check(
                _libc.syscall(_SYS_MOVE_MOUNT, mnt_fd, b"", AT_FDCWD, os.fsencode(target), MOVE_MOUNT_F_EMPTY_PATH),
                f"move_mount({target})",
            )
        finally:
            os.close(mnt_fd)

    def close(self) -> None:
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1

    def __enter__(self) -> "FsContext":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def mount(source: str, target: str, fstype: str, flags: int = 0, data: str | None = None) -> None:
    """Classic mount(2)."""
    res = _libc.mount(
        os.fsencode(source), os.fsencode(target), fstype.encode(), flags, None if data is None else data.encode()
    )
    _check(res, f"mount({target})")


def bind_onto(source: str, target_fd: int) -> None:
    """Bind-mount the directory *source* onto the directory open as *target_fd* (``O_PATH``).

    Why by descriptor: the target may be covered by another mount at that
    moment (its parent directory being a mount point), where no path reaches it.
    A *source* that is a symlink is refused rather than followed.
    """
    flags = OPEN_TREE_CLONE | os.O_CLOEXEC | AT_SYMLINK_NOFOLLOW
    tree = _check(_libc.syscall(_SYS_OPEN_TREE, AT_FDCWD, os.fsencode(source), flags),
                  f"open_tree({source})")
    try:
        _check(_libc.syscall(_SYS_MOVE_MOUNT, tree, b"", target_fd, b"", MOVE_MOUNT_F_EMPTY_PATH | MOVE_MOUNT_T_EMPTY_PATH),
               f"move_mount({source})")
    finally:
        os.close(tree)


def umount(target: str, flags: int = 0) -> None:
    _check(_libc.umount2(os.fsencode(target), flags), f"umount({target})")


def unmount_retrying(path: str) -> None:
    """Unmount *path* if mounted; on EBUSY retry briefly, then detach lazily.

    Why lazy at the end: a shell sitting in the directory must not make
    removal fail; the kernel frees the mount when its last user goes.
    """
    for attempt in range(5):
        if not is_mountpoint(path):
            return
        try:
            umount(path)
        except OSError as exc:
            if exc.errno == errno.EINVAL:
                return
            if exc.errno != errno.EBUSY:
                raise
            if attempt == 4:
                umount(path, MNT_DETACH)
                return
            time.sleep(0.01 * (attempt + 1))


def is_mountpoint(path: str) -> bool:
    """True when *path* is the root of a mount (a different st_dev from its parent, or the same inode)."""
    try:
        st = os.lstat(path)
        parent = os.lstat(os.path.join(path, ".."))
    except FileNotFoundError:
        return False
    except OSError as exc:
        # A dead FUSE mount answers ENOTCONN: it is still a mount point.
        if exc.errno == errno.ENOTCONN:
            return True
        raise
    return st.st_dev != parent.st_dev or st.st_ino == parent.st_ino


def _unescape_mountinfo(field: bytes) -> bytes:
    # mountinfo escapes space, tab, newline and backslash as \ooo octal.
    return re.sub(rb"\\([0-7]{3})", lambda m: bytes([int(m.group(1), 8)]), field)


def mounts_under(prefix: str) -> list[str]:
    """Mount points at or below *prefix*, deepest first (from /proc/self/mountinfo)."""
    prefix = prefix.rstrip("/")
    found = []
    with open("/proc/self/mountinfo", "rb") as f:
        for line in f:
            point = os.fsdecode(_unescape_mountinfo(line.split(b" ", 5)[4]))
            if point == prefix or point.startswith(prefix + "/"):
                found.append(point)
    found.sort(key=len, reverse=True)
    return found

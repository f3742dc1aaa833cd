"""Mount bookkeeping for the harness: find, make and always remove our mounts.

Everything the harness (or layerfs on its behalf) mounts lives under the run's
work directory, so cleanup is a sweep of /proc/self/mountinfo for mount points
under that directory (or overlay mounts whose layer options name it), deepest
first, detached lazily so a busy mount never blocks the cleanup. Mounts made by
anyone else on the machine are never touched.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import os
import subprocess
from dataclasses import dataclass
from pathlib import Path

MNT_DETACH = 2

_libc = ctypes.CDLL(ctypes.util.find_library("c") or None, use_errno=True)
_libc.mount.argtypes = [ctypes.c_char_p, ctypes.c_char_p, ctypes.c_char_p,
                        ctypes.c_ulong, ctypes.c_char_p]
_libc.umount2.argtypes = [ctypes.c_char_p, ctypes.c_int]


@dataclass(frozen=True)
class MountEntry:
    mount_id: int
    mountpoint: str
    fstype: str
    source: str
    super_options: str


def _unescape(field: str) -> str:
    # mountinfo escapes space, tab, newline and backslash as \ooo octal.
    out, i = [], 0
    while i < len(field):
        if field[i] == "\\" and i + 4 <= len(field) and field[i + 1:i + 4].isdigit():
            out.append(chr(int(field[i + 1:i + 4], 8)))
            i += 4
        else:
            out.append(field[i])
            i += 1
    return "".join(out)


def mount_table() -> list[MountEntry]:
    entries = []
    with open("/proc/self/mountinfo", encoding="utf-8", errors="surrogateescape") as f:
        for line in f:
            left, _, right = line.rstrip("\n").partition(" - ")
            lf, rf = left.split(" "), right.split(" ")
            entries.append(MountEntry(
                mount_id=int(lf[0]),
                mountpoint=_unescape(lf[4]),
                fstype=rf[0] if rf else "",
                source=_unescape(rf[1]) if len(rf) > 1 else "",
                super_options=_unescape(rf[2]) if len(rf) > 2 else "",
            ))
    return entries


def _under(path: str, root: str) -> bool:
    return path == root or path.startswith(root.rstrip("/") + "/")


def mounts_under(root: Path) -> list[MountEntry]:
    """Mounts whose mount point is under ``root``, or whose options name a path under it."""
    r = os.path.realpath(root)
    found = []
    for m in mount_table():
        if _under(m.mountpoint, r) and m.mountpoint != r:
            found.append(m)
        elif m.fstype == "overlay" and (r.rstrip("/") + "/") in m.super_options:
            found.append(m)
    return found


def umount(target: str | os.PathLike, detach: bool = False) -> None:
    flags = MNT_DETACH if detach else 0
    if _libc.umount2(os.fsencode(target), flags) != 0:
        err = ctypes.get_errno()
        raise OSError(err, f"umount {target}: {os.strerror(err)}")


def mount(source: str, target: str | os.PathLike, fstype: str, data: str = "", flags: int = 0) -> None:
    if _libc.mount(source.encode(), os.fsencode(target), fstype.encode(), flags,
                   data.encode() if data else None) != 0:
        err = ctypes.get_errno()
        raise OSError(err, f"mount -t {fstype} {target}: {os.strerror(err)}")


def sweep(root: Path) -> list[str]:
    """Detach every mount under ``root`` (deepest first). Returns what was unmounted."""
    done: list[str] = []
    for _ in range(5):  # stacked mounts on one point need several passes
        found = mounts_under(root)
        if not found:
            break
        for m in sorted(found, key=lambda m: (m.mountpoint.count("/"), m.mount_id), reverse=True):
            try:
                umount(m.mountpoint, detach=True)
                done.append(m.mountpoint)
            except OSError:
                pass
    return done


def safe_rmtree(path: Path) -> None:
    """Remove a scratch tree, never through a mount: sweep first, then rm on one filesystem."""
    path = Path(path)
    if not path.exists() and not path.is_symlink():
        return
    sweep(path)
    left = mounts_under(path)
    if left:
        raise RuntimeError(f"refusing to remove {path}: still mounted: "
                           + ", ".join(m.mountpoint for m in left))
    subprocess.run(["rm", "-rf", "--one-file-system", "--", str(path)], check=True)


# ------------------------------------------------------------------ the new mount API (overlay lowerdir+)

_SYS_MOVE_MOUNT, _SYS_FSOPEN, _SYS_FSCONFIG, _SYS_FSMOUNT = 429, 430, 431, 432   # x86_64 and most 64-bit arches
_FSCONFIG_SET_STRING, _FSCONFIG_CMD_CREATE = 1, 6
_FSOPEN_CLOEXEC, _FSMOUNT_CLOEXEC, _MOVE_MOUNT_F_EMPTY_PATH = 1, 1, 4
_AT_FDCWD = -100
_libc.syscall.restype = ctypes.c_long


def _sys(nr: int, *args) -> int:
    r = _libc.syscall(nr, *args)
    if r < 0:
        err = ctypes.get_errno()
        raise OSError(err, os.strerror(err))
    return r


def mount_overlay_api(target: str | os.PathLike, lowers_top_first: list[str], upper: str, work: str,
                      options: dict[str, str] | None = None) -> None:
    """Kernel overlay through fsopen/fsconfig(``lowerdir+``)/fsmount/move_mount (kernel >= 6.8).

    No page-size limit on the option string, so any depth the kernel allows (500 layers).
    Written here, independently of layerfs, so that the kernel-overlay floor does not share
    layerfs's code.
    """
    fs = _sys(_SYS_FSOPEN, b"overlay", _FSOPEN_CLOEXEC)
    try:
        def setstr(key: str, value: str) -> None:
            try:
                _sys(_SYS_FSCONFIG, fs, _FSCONFIG_SET_STRING, key.encode(), os.fsencode(value), 0)
            except OSError as e:
                raise OSError(e.errno, f"fsconfig {key}={value}: {e.strerror}") from None
        for lower in lowers_top_first:
            setstr("lowerdir+", lower)
        setstr("upperdir", upper)
        setstr("workdir", work)
        for k, v in (options or {}).items():
            setstr(k, v)
        _sys(_SYS_FSCONFIG, fs, _FSCONFIG_CMD_CREATE, None, None, 0)
        mfd = _sys(_SYS_FSMOUNT, fs, _FSMOUNT_CLOEXEC, 0)
        try:
            _sys(_SYS_MOVE_MOUNT, mfd, b"", _AT_FDCWD, os.fsencode(target), _MOVE_MOUNT_F_EMPTY_PATH)
        finally:
            os.close(mfd)
    finally:
        os.close(fs)

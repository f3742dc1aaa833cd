"""Let the kernel cache directory listings (FOPEN_CACHE_DIR), which pyfuse3 cannot ask for.

libfuse's ``struct fuse_file_info`` has a ``cache_readdir`` bit: set in the
reply to opendir, the kernel keeps the listing in the directory's page cache
and serves later ``getdents`` from it without asking the daemon (with
``keep_cache`` it also survives the next opendir).  The kernel drops it by
itself when the directory changes through the mount (create, unlink, rename
... bump its version) or its mtime changes; every change to a union goes
through its daemon, so the cache stays right.  fuse-overlayfs does the same.

pyfuse3 (3.5) only lets ``opendir`` return a handle number and always replies
with those bits clear.  Its extension module calls libfuse's
``fuse_reply_open`` through its PLT, so :func:`install` points that one GOT
slot at a small wrapper which sets the two bits when the handle being
returned is a directory handle, then calls the real function.  Anything
unexpected (another pyfuse3 build, no ELF relocation for the symbol, a libc
without ``mprotect``) leaves pyfuse3 untouched: directory listings then come
from the daemon's per-handle cache instead, slower but the same.
"""

from __future__ import annotations

import ctypes
import logging
import mmap
import os
import struct
from typing import Callable

log = logging.getLogger("layerfs.aufs")

_KEEP_CACHE = 1 << 2  # bit positions in the word after `flags` (libfuse 3.x fuse_common.h)
_CACHE_READDIR = 1 << 6
_SHT_RELA = 4
_R_X86_64_JUMP_SLOT = 7
_R_AARCH64_JUMP_SLOT = 1026


class _FileInfo(ctypes.Structure):
    _fields_ = [
        ("flags", ctypes.c_int),
        ("bits", ctypes.c_uint),
        ("padding2", ctypes.c_uint),
        ("fh", ctypes.c_uint64),
        ("lock_owner", ctypes.c_uint64),
        ("poll_events", ctypes.c_uint32),
    ]


_REPLY_OPEN = ctypes.CFUNCTYPE(ctypes.c_int, ctypes.c_void_p, ctypes.POINTER(_FileInfo))
_keep: list = []  # the wrapper must outlive the mount


def _got_offset(path: str, symbol: bytes) -> int | None:
    """The link-time address of *path*'s GOT slot for *symbol* (its PLT relocation), or None."""
    with open(path, "rb") as f:
        data = f.read()
    if data[:4] != b"\x7fELF" or data[4] != 2 or data[5] != 1:
        return None  # only 64-bit little-endian
    shoff, = struct.unpack_from("<Q", data, 0x28)
    shentsize, shnum = struct.unpack_from("<HH", data, 0x3A)
    sections = [struct.unpack_from("<IIQQQQIIQQ", data, shoff + i * shentsize) for i in range(shnum)]
    for sh in sections:
        if sh[1] != _SHT_RELA:
            continue
        symtab = sections[sh[6]]
        strtab = sections[symtab[6]]
        off, size, entsize = sh[4], sh[5], sh[9] or 24
        for pos in range(off, off + size, entsize):
            r_offset, r_info, _ = struct.unpack_from("<QQq", data, pos)
            if r_info & 0xFFFFFFFF not in (_R_X86_64_JUMP_SLOT, _R_AARCH64_JUMP_SLOT):
                continue
            st_name, = struct.unpack_from("<I", data, symtab[4] + (r_info >> 32) * (symtab[9] or 24))
            start = strtab[4] + st_name
            if data[start:data.index(b"\0", start)] == symbol:
                return r_offset
    return None


def install(is_dir_handle: Callable[[int], bool]) -> bool:
    """Make opendir replies for handles where *is_dir_handle(fh)* ask the kernel to cache the listing."""
    try:
        import pyfuse3

        path = os.path.realpath(pyfuse3.__file__)
        got = _got_offset(path, b"fuse_reply_open")
        if got is None:
            log.info("directory cache: no fuse_reply_open relocation in %s", path)
            return False
        base = ctypes.c_void_p.from_address(ctypes.CDLL(path)._handle).value or 0  # link_map.l_addr
        libfuse = ctypes.CDLL("libfuse3.so.3")
        real = ctypes.cast(libfuse.fuse_reply_open, ctypes.c_void_p).value
        real_fn = _REPLY_OPEN(real)
        bits = _KEEP_CACHE | _CACHE_READDIR

        def reply_open(req, fi):
            try:
                if is_dir_handle(fi.contents.fh):
                    fi.contents.bits |= bits
            except BaseException:  # noqa: BLE001 - never fail a reply
                pass
            return real_fn(req, fi)

        wrapper = _REPLY_OPEN(reply_open)
        slot = base + got
        page = slot & ~(mmap.PAGESIZE - 1)
        libc = ctypes.CDLL(None, use_errno=True)
        libc.mprotect.argtypes = (ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int)
        if libc.mprotect(page, mmap.PAGESIZE, mmap.PROT_READ | mmap.PROT_WRITE) != 0:
            log.info("directory cache: mprotect failed (%s)", os.strerror(ctypes.get_errno()))
            return False
        _keep.extend((real_fn, wrapper, reply_open))
        ctypes.c_void_p.from_address(slot).value = ctypes.cast(wrapper, ctypes.c_void_p).value
        return True
    except Exception:  # noqa: BLE001 - an optimisation only
        log.exception("directory cache: not installed")
        return False

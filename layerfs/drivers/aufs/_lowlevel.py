"""Adjustments to pyfuse3 that it offers no option for: its libfuse operations table, its trio lock.

pyfuse3 (3.5) registers one C handler per FUSE operation in a
``struct fuse_lowlevel_ops`` that it hands to libfuse's ``fuse_session_new``.
Its extension module calls that function through its PLT, so
:func:`install` points that one GOT slot at a wrapper which copies the
table, changes three entries and calls the real function (libfuse keeps
its own copy of the table; the wrapper runs once, at mount).

1. **Directories are opened by the kernel alone.**  pyfuse3's ``readdir``
   and ``fsyncdir`` only see the file handle, never the inode; the wrapped
   handlers put the inode number into the handle field before pyfuse3
   reads it.  The daemon can then answer the first OPENDIR with ENOSYS:
   the kernel stops sending OPENDIR and RELEASEDIR for the life of the mount
   and opens every directory itself with FOPEN_KEEP_CACHE | FOPEN_CACHE_DIR
   (fs/fuse/file.c, "default for no-open"), i.e. it keeps each directory's
   listing in its page cache until the directory changes through the mount
   (create, unlink, rename ... bump its version) -- fuse-overlayfs asks for
   the same caching.  A warm ``find`` then costs the daemon no request at all
   (before: an OPENDIR and a RELEASEDIR round trip per directory).

2. **Writes skip one copy.**  pyfuse3 copies every WRITE's payload from
   libfuse's receive buffer into a new ``bytes`` object before its handler
   runs.  The wrapped ``write_buf`` handler gives the daemon's *write_direct*
   callback a zero-copy memoryview of that buffer instead, and replies
   itself; when the callback returns None (not an open regular handle) the
   request goes to pyfuse3 as before.

3. **One scheduler pass less per request**: :func:`lighten_trio`.

Anything unexpected (another pyfuse3 build, a libfuse whose table has another
size, no ELF relocation for the symbol, no ``mprotect``) leaves pyfuse3
untouched and the hook :func:`install` returns stays inactive: the daemon
then serves OPENDIR itself (the inode number as handle, listings read by the
daemon) and writes take pyfuse3's path -- slower, the same results.
"""

from __future__ import annotations

import ctypes
import errno
import logging
import mmap
import os
import struct
from collections.abc import Callable

log = logging.getLogger("layerfs.aufs")

_SHT_RELA = 4
_R_X86_64_JUMP_SLOT = 7
_R_AARCH64_JUMP_SLOT = 1026

# struct fuse_lowlevel_ops of libfuse 3.x (fuse_lowlevel.h): 44 function pointers
_OPS_SLOTS = 44
_WRITE_BUF = 36
_FSYNCDIR = 23
_READDIRPLUS = 41
_FUSE_BUF_IS_FD = 1 << 1


class _FileInfo(ctypes.Structure):
    _fields_ = [
        ("flags", ctypes.c_int),
        ("bits", ctypes.c_uint),
        ("padding2", ctypes.c_uint),
        ("fh", ctypes.c_uint64),
        ("lock_owner", ctypes.c_uint64),
        ("poll_events", ctypes.c_uint32),
    ]


class _Buf(ctypes.Structure):  # struct fuse_buf
    _fields_ = [
        ("size", ctypes.c_size_t),
        ("flags", ctypes.c_int),
        ("mem", ctypes.c_void_p),
        ("fd", ctypes.c_int),
        ("pos", ctypes.c_int64),
    ]


class _BufVec(ctypes.Structure):  # struct fuse_bufvec with one buffer
    _fields_ = [
        ("count", ctypes.c_size_t),
        ("idx", ctypes.c_size_t),
        ("off", ctypes.c_size_t),
        ("buf", _Buf * 1),
    ]


_FI = ctypes.POINTER(_FileInfo)
_SESSION_NEW = ctypes.CFUNCTYPE(ctypes.c_void_p, ctypes.c_void_p, ctypes.c_void_p, ctypes.c_size_t, ctypes.c_void_p)
_READDIRPLUS_FN = ctypes.CFUNCTYPE(None, ctypes.c_void_p, ctypes.c_uint64, ctypes.c_size_t, ctypes.c_int64, _FI)
_FSYNCDIR_FN = ctypes.CFUNCTYPE(None, ctypes.c_void_p, ctypes.c_uint64, ctypes.c_int, _FI)
_WRITE_BUF_FN = ctypes.CFUNCTYPE(None, ctypes.c_void_p, ctypes.c_uint64, ctypes.POINTER(_BufVec), ctypes.c_int64, _FI)
# pyfuse3's own handlers run Python code: they are called with the GIL held
_READDIRPLUS_PY = ctypes.PYFUNCTYPE(None, ctypes.c_void_p, ctypes.c_uint64, ctypes.c_size_t, ctypes.c_int64, _FI)
_FSYNCDIR_PY = ctypes.PYFUNCTYPE(None, ctypes.c_void_p, ctypes.c_uint64, ctypes.c_int, _FI)
_WRITE_BUF_PY = ctypes.PYFUNCTYPE(None, ctypes.c_void_p, ctypes.c_uint64, ctypes.POINTER(_BufVec), ctypes.c_int64, _FI)
_keep: list = []  # the wrappers must outlive the mount


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


class Hook:
    """What :func:`install` did: *active* turns True once libfuse got the wrapped table."""

    def __init__(self) -> None:
        self.active = False


def install(write_direct: Callable[[int, int, memoryview], int | None] | None = None) -> Hook:
    """Wrap pyfuse3's operations table when it is handed to libfuse (call before ``pyfuse3.init``).

    When the returned hook is *active* after ``pyfuse3.init``,
    ``readdir(fh, ...)`` and ``fsyncdir(fh, ...)`` receive the directory's
    inode number as *fh*, so ``opendir`` may decline with ENOSYS, and
    *write_direct(fh, offset, data)* is tried first for every WRITE: it
    returns the number of bytes written, or None to let pyfuse3 handle the
    request (an OSError it raises is replied with its errno).
    """
    hook = Hook()
    try:
        import pyfuse3

        path = os.path.realpath(pyfuse3.__file__)
        got = _got_offset(path, b"fuse_session_new")
        if got is None:
            log.info("lowlevel: no fuse_session_new relocation in %s", path)
            return hook
        base = ctypes.c_void_p.from_address(ctypes.CDLL(path)._handle).value or 0  # link_map.l_addr
        libfuse = ctypes.CDLL("libfuse3.so.3")
        real_new = _SESSION_NEW(ctypes.cast(libfuse.fuse_session_new, ctypes.c_void_p).value)
        reply_err = libfuse.fuse_reply_err
        reply_err.argtypes = (ctypes.c_void_p, ctypes.c_int)
        reply_write = libfuse.fuse_reply_write
        reply_write.argtypes = (ctypes.c_void_p, ctypes.c_size_t)

        def _set_fh(req, fi, ino) -> bool:
            try:
                fi.contents.fh = ino
                return True
            except BaseException:  # an exception here would leave the request unanswered
                log.exception("lowlevel: no file info")
                reply_err(req, errno.EIO)
                return False

        def session_new(args, ops, op_size, userdata):
            if op_size != _OPS_SLOTS * 8 or not ops:
                log.info("lowlevel: unexpected operations table (%d bytes); left as it is", op_size)
                return real_new(args, ops, op_size, userdata)
            table = (ctypes.c_void_p * _OPS_SLOTS).from_buffer_copy(ctypes.string_at(ops, op_size))
            orig_rdp, orig_fsd, orig_wb = table[_READDIRPLUS], table[_FSYNCDIR], table[_WRITE_BUF]
            if not orig_rdp or not orig_fsd:
                return real_new(args, ops, op_size, userdata)
            rdp, fsd = _READDIRPLUS_PY(orig_rdp), _FSYNCDIR_PY(orig_fsd)

            def readdirplus(req, ino, size, off, fi):
                if _set_fh(req, fi, ino):
                    rdp(req, ino, size, off, fi)

            def fsyncdir(req, ino, datasync, fi):
                if _set_fh(req, fi, ino):
                    fsd(req, ino, datasync, fi)

            wrappers = [_READDIRPLUS_FN(readdirplus), _FSYNCDIR_FN(fsyncdir)]
            table[_READDIRPLUS] = ctypes.cast(wrappers[0], ctypes.c_void_p).value
            table[_FSYNCDIR] = ctypes.cast(wrappers[1], ctypes.c_void_p).value
            if write_direct is not None and orig_wb:
                wb = _WRITE_BUF_PY(orig_wb)

                def write_buf(req, ino, bufv, off, fi):
                    try:
                        v = bufv.contents
                        b = v.buf[0]
                        if v.count == 1 and not b.flags & _FUSE_BUF_IS_FD and b.mem:
                            n = b.size - v.off
                            data = memoryview((ctypes.c_char * n).from_address(b.mem + v.off)).cast("B")
                            done = write_direct(fi.contents.fh, off, data)
                            if done is not None:
                                reply_write(req, done)
                                return
                    except OSError as exc:
                        reply_err(req, exc.errno or errno.EIO)
                        return
                    except BaseException:  # never lose a request
                        log.exception("lowlevel: write failed")
                        reply_err(req, errno.EIO)
                        return
                    wb(req, ino, bufv, off, fi)

                wrappers.append(_WRITE_BUF_FN(write_buf))
                table[_WRITE_BUF] = ctypes.cast(wrappers[-1], ctypes.c_void_p).value
            _keep.extend((table, rdp, fsd, *wrappers))
            hook.active = True
            return real_new(args, ctypes.addressof(table), op_size, userdata)

        wrapper = _SESSION_NEW(session_new)
        slot = base + got
        page = slot & ~(mmap.PAGESIZE - 1)
        libc = ctypes.CDLL(None, use_errno=True)
        libc.mprotect.argtypes = (ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int)
        if libc.mprotect(page, mmap.PAGESIZE, mmap.PROT_READ | mmap.PROT_WRITE) != 0:
            log.info("lowlevel: mprotect failed (%s)", os.strerror(ctypes.get_errno()))
            return hook
        _keep.extend((real_new, wrapper, session_new))
        ctypes.c_void_p.from_address(slot).value = ctypes.cast(wrapper, ctypes.c_void_p).value
    except Exception:  # an optimisation only
        log.exception("lowlevel: not installed")
    return hook


class _QuickLock:
    """trio.Lock without the scheduler round trip when nobody holds it (see :func:`lighten_trio`)."""

    def __init__(self, trio):
        self._trio = trio
        self._lock = trio.Lock()

    async def __aenter__(self):
        try:
            self._lock.acquire_nowait()
        except self._trio.WouldBlock:
            await self._lock.acquire()

    async def __aexit__(self, *exc):
        self._lock.release()


class _TrioForPyfuse3:
    """The trio module as pyfuse3 sees it: the same, but for :class:`_QuickLock`."""

    def __init__(self, trio):
        self._trio = trio

    def Lock(self):  # trio's name
        return _QuickLock(self._trio)

    def __getattr__(self, name):
        return getattr(self._trio, name)


def lighten_trio() -> None:
    """Save one trio scheduler pass per FUSE request (call before ``pyfuse3.main``).

    pyfuse3's worker takes a ``trio.Lock`` around every wait for the next
    request; acquiring a trio lock always yields to the scheduler once (a
    checkpoint) even when the lock is free, which costs as much as the rest
    of a small request's dispatch.  pyfuse3 reaches trio through its module
    global ``trio`` (the hook its own asyncio mode uses); this gives it one
    whose ``Lock`` takes a free lock without yielding.  The worker still
    yields at every wait for the device, so the daemon's other tasks
    (signals) run as before.
    """
    import pyfuse3
    import trio

    if isinstance(getattr(pyfuse3, "trio", None), type(trio)):
        pyfuse3.trio = _TrioForPyfuse3(trio)

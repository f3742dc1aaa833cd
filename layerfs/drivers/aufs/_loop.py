"""Serve the FUSE session in a plain blocking loop instead of ``pyfuse3.main`` under trio.

Every handler of :class:`~.fs.UnionOps` runs to completion without awaiting
(see fs.py), so the trio scheduler has nothing to interleave: per request it
only adds work -- an epoll registration and ``epoll_wait`` before the read of
``/dev/fuse``, a task switch and the run loop's bookkeeping -- which is about
as much daemon CPU as a small request's own handling.  This loop does what
pyfuse3's worker does (``fuse_session_receive_buf``, ``fuse_session_process_buf``,
then finish the coroutine the handler left in pyfuse3's ``py_retval``) with a
blocking read and no event loop:

- a handler's coroutine is run by ``coro.send(None)``; it must finish without
  suspending (a handler that awaited real I/O would stop the daemon with an
  error rather than leave its request unanswered forever);
- SIGTERM/SIGINT interrupt the blocking read; their handler marks the session
  exited and, for a signal that lands just before the read starts, re-arms a
  short interval timer so the read is interrupted again.

pyfuse3 keeps ``py_retval``, ``save_retval`` and ``session`` as module-private
C statics; :func:`prepare` finds them in the extension's ELF symbol table (the
pyfuse3 build here is not stripped).  When anything is missing it returns None
and the daemon uses ``pyfuse3.main`` under trio as before.
"""

from __future__ import annotations

import ctypes
import errno
import logging
import os
import signal
import struct

from ._lowlevel import _Buf  # struct fuse_buf

log = logging.getLogger("layerfs.aufs")

_SHT_SYMTAB = 2


def _local_symbols(path: str, names: set[bytes]) -> dict[bytes, int]:
    """Link-time addresses of the (possibly file-local) *names* in *path*'s .symtab."""
    with open(path, "rb") as f:
        data = f.read()
    if data[:4] != b"\x7fELF" or data[4] != 2 or data[5] != 1:
        return {}
    shoff, = struct.unpack_from("<Q", data, 0x28)
    shentsize, shnum = struct.unpack_from("<HH", data, 0x3A)
    sections = [struct.unpack_from("<IIQQQQIIQQ", data, shoff + i * shentsize) for i in range(shnum)]
    found: dict[bytes, int] = {}
    for sh in sections:
        if sh[1] != _SHT_SYMTAB:
            continue
        strtab = sections[sh[6]]
        off, size, entsize = sh[4], sh[5], sh[9] or 24
        for pos in range(off, off + size, entsize):
            st_name, _info, _other, _shndx, st_value, _size = struct.unpack_from("<IBBHQQ", data, pos)
            if not st_name or not st_value:
                continue
            start = strtab[4] + st_name
            name = data[start:data.index(b"\0", start)]
            if name in names:
                found[name] = st_value
    return found


class Loop:
    """A blocking request loop over pyfuse3's session (see the module docstring)."""

    def __init__(self, libfuse, process, save_retval, retval_addr: int, session_addr: int):
        self._libfuse = libfuse
        self._process = process
        self._save_retval = save_retval
        self._retval = ctypes.py_object.from_address(retval_addr)
        self._session_addr = session_addr
        self.stopped = False

    def _session(self) -> int:
        se = ctypes.c_void_p.from_address(self._session_addr).value
        if not se:
            raise RuntimeError("pyfuse3 has no session (call pyfuse3.init first)")
        return se

    def _on_signal(self, signum, frame) -> None:
        self.stopped = True
        self._libfuse.fuse_session_exit(ctypes.c_void_p(self._session()))
        # A signal that arrived after the last check but before the read
        # began would leave the read blocked: interrupt it again shortly.
        signal.setitimer(signal.ITIMER_REAL, 0.05, 0.05)

    def run(self) -> bool:
        """Serve until the session ends; True when it ended by SIGTERM/SIGINT (False: unmounted)."""
        se = ctypes.c_void_p(self._session())
        receive = self._libfuse.fuse_session_receive_buf
        process = self._process
        save_retval = self._save_retval
        retval = self._retval
        buf = _Buf()
        pbuf = ctypes.byref(buf)
        old = {s: signal.signal(s, self._on_signal) for s in (signal.SIGTERM, signal.SIGINT)}
        old[signal.SIGALRM] = signal.signal(signal.SIGALRM, lambda *_: None)
        try:
            while not self.stopped:
                res = receive(se, pbuf)
                if res <= 0:
                    if res == -errno.EINTR:
                        continue
                    if res < 0:
                        raise OSError(-res, "fuse_session_receive_buf: " + os.strerror(-res))
                    break  # unmounted, or the session was told to exit
                save_retval(None)
                process(se, pbuf)
                coro = retval.value
                if coro is None:
                    continue
                try:
                    coro.send(None)
                except StopIteration:
                    continue
                coro.close()
                raise RuntimeError(f"a request handler suspended ({coro!r}); this loop cannot resume it")
        finally:
            signal.setitimer(signal.ITIMER_REAL, 0, 0)
            for s, h in old.items():
                signal.signal(s, h)
            save_retval(None)
            if buf.mem:
                ctypes.CDLL(None).free(ctypes.c_void_p(buf.mem))
        return self.stopped


def prepare() -> Loop | None:
    """A :class:`Loop` for the pyfuse3 build in use, or None (serve with ``pyfuse3.main``)."""
    try:
        import pyfuse3

        path = os.path.realpath(pyfuse3.__file__)
        names = {b"__pyx_v_7pyfuse3_py_retval", b"__pyx_f_7pyfuse3_save_retval", b"__pyx_v_7pyfuse3_session"}
        syms = _local_symbols(path, names)
        if set(syms) != names:
            log.info("loop: pyfuse3's private symbols not found in %s; serving under trio", path)
            return None
        base = ctypes.c_void_p.from_address(ctypes.CDLL(path)._handle).value or 0  # link_map.l_addr
        libfuse = ctypes.CDLL("libfuse3.so.3")
        libfuse.fuse_session_receive_buf.argtypes = (ctypes.c_void_p, ctypes.POINTER(_Buf))
        libfuse.fuse_session_receive_buf.restype = ctypes.c_int
        libfuse.fuse_session_exit.argtypes = (ctypes.c_void_p,)
        libfuse.fuse_session_exit.restype = None
        # called with the GIL held (PyDLL): it runs pyfuse3's handlers
        process = ctypes.PyDLL("libfuse3.so.3").fuse_session_process_buf
        process.argtypes = (ctypes.c_void_p, ctypes.POINTER(_Buf))
        process.restype = None
        save_retval = ctypes.PYFUNCTYPE(None, ctypes.py_object)(base + syms[b"__pyx_f_7pyfuse3_save_retval"])
        return Loop(libfuse, process, save_retval, base + syms[b"__pyx_v_7pyfuse3_py_retval"],
                    base + syms[b"__pyx_v_7pyfuse3_session"])
    except Exception:  # an optimisation only
        log.exception("loop: not available; serving under trio")
        return None

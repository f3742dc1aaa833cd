"""Build OCI layer tars in memory for tests.

Layer fixtures are made here from Python's :mod:`tarfile`, never committed as
blobs.  A :class:`LayerTar` collects entries in the order they are added and
:meth:`LayerTar.bytes` returns the uncompressed tar stream::

    data = (LayerTar()
            .dir("etc")
            .file("etc/passwd", b"root:x:0:0::/root:/bin/sh\\n", mode=0o644)
            .symlink("bin/sh", "busybox")
            .whiteout("etc/shadow")
            .bytes())

Every entry gets a fixed mtime unless one is given, so the same builder calls
always give the same bytes (and so the same diff_id).  Names are written
exactly as given (no leading ``./`` is added), which lets the hostile-input
tests write names such as ``../escape`` or ``/etc/x``.
"""

from __future__ import annotations

import gzip
import hashlib
import io
import os
import tarfile
from typing import Iterable

import zstandard

#: mtime given to entries that do not name one (2023-11-14T22:13:20Z)
DEFAULT_MTIME = 1_700_000_000

WHITEOUT_PREFIX = ".wh."
OPAQUE_MARKER = ".wh..wh..opq"


def sha256_digest(data: bytes) -> str:
    """``sha256:<hex>`` of *data*."""
    return "sha256:" + hashlib.sha256(data).hexdigest()


def chain_id(parent_chain_id: str | None, diff_id: str) -> str:
    """The OCI image-spec ChainID of a layer with *diff_id* on *parent_chain_id*."""
    if parent_chain_id is None:
        return diff_id
    return sha256_digest(f"{parent_chain_id} {diff_id}".encode())


def chain_ids(diff_ids: Iterable[str]) -> list[str]:
    """ChainIDs of a whole stack of diff ids, base first."""
    out: list[str] = []
    parent = None
    for d in diff_ids:
        parent = chain_id(parent, d)
        out.append(parent)
    return out


def gzip_bytes(data: bytes) -> bytes:
    return gzip.compress(data, compresslevel=6, mtime=0)


def zstd_bytes(data: bytes) -> bytes:
    return zstandard.ZstdCompressor(level=3).compress(data)


def zstd_stream_bytes(data: bytes) -> bytes:
    """zstd frame written by the streaming API (no content size in the header)."""
    out = io.BytesIO()
    with zstandard.ZstdCompressor(level=3).stream_writer(out, closefd=False) as w:
        w.write(data)
    return out.getvalue()


def _xattr_value(value: bytes | str) -> str:
    # tarfile keeps pax values as str; undecodable bytes survive as surrogates
    # and are written back byte for byte (with hdrcharset=BINARY).
    if isinstance(value, str):
        return value
    return value.decode("utf-8", "surrogateescape")


class LayerTar:
    """An OCI layer tar under construction (see the module docstring)."""

    def __init__(self, *, format: int = tarfile.PAX_FORMAT, mtime: int = DEFAULT_MTIME):
        self._format = format
        self._mtime = mtime
        self._entries: list[tuple[tarfile.TarInfo, bytes | None]] = []

    # -- entries -----------------------------------------------------------
    def _info(self, name, type_, mode, uid, gid, mtime, xattrs, uname="", gname=""):
        ti = tarfile.TarInfo(name)
        ti.type = type_
        ti.mode = mode
        ti.uid = uid
        ti.gid = gid
        ti.uname = uname
        ti.gname = gname
        ti.mtime = self._mtime if mtime is None else mtime
        if xattrs:
            ti.pax_headers = {
                "SCHILY.xattr." + k: _xattr_value(v) for k, v in xattrs.items()
            }
        return ti

    def add(self, info: tarfile.TarInfo, data: bytes | None = None) -> "LayerTar":
        """Add a raw entry (for entries the helpers below cannot express)."""
        if data is not None:
            info.size = len(data)
        self._entries.append((info, data))
        return self

    def file(self, name, content: bytes = b"", *, mode=0o644, uid=0, gid=0,
             mtime=None, xattrs=None) -> "LayerTar":
        ti = self._info(name, tarfile.REGTYPE, mode, uid, gid, mtime, xattrs)
        return self.add(ti, bytes(content))

    def dir(self, name, *, mode=0o755, uid=0, gid=0, mtime=None, xattrs=None) -> "LayerTar":
        ti = self._info(name, tarfile.DIRTYPE, mode, uid, gid, mtime, xattrs)
        return self.add(ti)

    def dirs(self, *names, mode=0o755) -> "LayerTar":
        for n in names:
            self.dir(n, mode=mode)
        return self

    def symlink(self, name, target, *, uid=0, gid=0, mtime=None, xattrs=None) -> "LayerTar":
        ti = self._info(name, tarfile.SYMTYPE, 0o777, uid, gid, mtime, xattrs)
        ti.linkname = target
        return self.add(ti)

    def hardlink(self, name, target, *, mode=0o644, uid=0, gid=0, mtime=None) -> "LayerTar":
        """Hardlink entry *name* -> *target* (a path inside the layer)."""
        ti = self._info(name, tarfile.LNKTYPE, mode, uid, gid, mtime, None)
        ti.linkname = target
        return self.add(ti)

    def chardev(self, name, major, minor, *, mode=0o666, uid=0, gid=0, mtime=None) -> "LayerTar":
        ti = self._info(name, tarfile.CHRTYPE, mode, uid, gid, mtime, None)
        ti.devmajor, ti.devminor = major, minor
        return self.add(ti)

    def blockdev(self, name, major, minor, *, mode=0o660, uid=0, gid=0, mtime=None) -> "LayerTar":
        ti = self._info(name, tarfile.BLKTYPE, mode, uid, gid, mtime, None)
        ti.devmajor, ti.devminor = major, minor
        return self.add(ti)

    def fifo(self, name, *, mode=0o644, uid=0, gid=0, mtime=None) -> "LayerTar":
        ti = self._info(name, tarfile.FIFOTYPE, mode, uid, gid, mtime, None)
        return self.add(ti)

    def whiteout(self, path) -> "LayerTar":
        """Delete *path* (from lower layers): entry ``<dir>/.wh.<base>``."""
        d, base = os.path.split(path.rstrip("/"))
        name = os.path.join(d, WHITEOUT_PREFIX + base) if d else WHITEOUT_PREFIX + base
        return self.file(name, b"", mode=0o644)

    def opaque(self, dirpath) -> "LayerTar":
        """Hide everything lower layers have in *dirpath*: ``<dir>/.wh..wh..opq``."""
        dirpath = dirpath.rstrip("/")
        name = f"{dirpath}/{OPAQUE_MARKER}" if dirpath else OPAQUE_MARKER
        return self.file(name, b"", mode=0o644)

    # -- output ------------------------------------------------------------
    def bytes(self) -> bytes:
        buf = io.BytesIO()
        with tarfile.open(fileobj=buf, mode="w", format=self._format) as tf:
            for info, data in self._entries:
                tf.addfile(info, io.BytesIO(data) if data is not None else None)
        return buf.getvalue()

    def gzip(self) -> bytes:
        return gzip_bytes(self.bytes())

    def zstd(self) -> bytes:
        return zstd_bytes(self.bytes())

    def diff_id(self) -> str:
        return sha256_digest(self.bytes())

    def __len__(self) -> int:
        return len(self._entries)


def empty_layer() -> bytes:
    """A layer tar without entries (just the end-of-archive blocks)."""
    return LayerTar().bytes()


def read_entries(data: bytes) -> list[tarfile.TarInfo]:
    """The members of an (uncompressed) tar, in stream order."""
    with tarfile.open(fileobj=io.BytesIO(data), mode="r:") as tf:
        return tf.getmembers()


def normalize_name(name: str) -> str:
    """Entry name without leading ``./`` or ``/`` and without a trailing ``/``."""
    while name.startswith("./"):
        name = name[2:]
    return name.strip("/")


def entry_names(data: bytes) -> list[str]:
    return [normalize_name(ti.name) for ti in read_entries(data)]


def simple_layer(files: dict[str, bytes], whiteouts: Iterable[str] = ()) -> bytes:
    """A layer tar of regular files (parent directories implied) and whiteouts of paths."""
    layer = LayerTar()
    for name, data in sorted(files.items()):
        layer.file(name, data)
    for path in whiteouts:
        layer.whiteout(path)
    return layer.bytes()

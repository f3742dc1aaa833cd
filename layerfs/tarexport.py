"""Exporting a tree as a layer tar: a deterministic PAX stream, hashed as it is written.

The other half of :mod:`layerfs.archive` (which applies layer tars and
re-exports these names).
"""

from __future__ import annotations

import errno
import hashlib
import io
import os
import stat
import tarfile
from typing import BinaryIO, Iterable

from . import whiteout


class _HashingWriter(io.RawIOBase):
    def __init__(self, inner: BinaryIO):
        self._inner = inner
        self.sha = hashlib.sha256()
        self.count = 0

    def writable(self) -> bool:
        return True

    def tell(self) -> int:
        return self.count

    def write(self, data) -> int:
        self.sha.update(data)
        self._inner.write(data)
        self.count += len(data)
        return len(data)


class TarExporter:
    """Writes a deterministic PAX layer tar while hashing it.

    Times are truncated to whole seconds and user/group names left out (as
    Docker does) so the same tree always gives the same diff id.
    """

    def __init__(self, out: BinaryIO):
        self._writer = _HashingWriter(out)
        self._tar = tarfile.TarFile(fileobj=self._writer, mode="w", format=tarfile.PAX_FORMAT)
        self._links: dict[tuple[int, int], str] = {}

    def add(self, rel: str, path: str, st: os.stat_result | None = None) -> None:
        """Add the file at *path* under the archive name *rel* (no leading slash)."""
        if st is None:
            st = os.lstat(path)
        ti = tarfile.TarInfo(rel)
        ti.mode = stat.S_IMODE(st.st_mode)
        ti.uid, ti.gid = st.st_uid, st.st_gid
        ti.uname = ti.gname = ""
        ti.mtime = st.st_mtime_ns // 1_000_000_000
        mode = st.st_mode
        data = None
        if stat.S_ISREG(mode):
            key = (st.st_dev, st.st_ino)
            if st.st_nlink > 1 and key in self._links:
                ti.type = tarfile.LNKTYPE
                ti.linkname = self._links[key]
            else:
                if st.st_nlink > 1:
                    self._links[key] = rel
                ti.type = tarfile.REGTYPE
                ti.size = st.st_size
                data = True
        elif stat.S_ISDIR(mode):
            ti.type = tarfile.DIRTYPE
        elif stat.S_ISLNK(mode):
            ti.type = tarfile.SYMTYPE
            ti.linkname = os.readlink(path)
        elif stat.S_ISCHR(mode) or stat.S_ISBLK(mode):
            ti.type = tarfile.CHRTYPE if stat.S_ISCHR(mode) else tarfile.BLKTYPE
            ti.devmajor, ti.devminor = os.major(st.st_rdev), os.minor(st.st_rdev)
        elif stat.S_ISFIFO(mode):
            ti.type = tarfile.FIFOTYPE
        else:
            return  # sockets have no tar form; Docker leaves them out too
        xattrs = read_xattrs(path)
        if xattrs:
            ti.pax_headers = {"SCHILY.xattr." + k: v.decode("utf-8", "surrogateescape") for k, v in xattrs}
        if data:
            with open(path, "rb") as f:
                self._tar.addfile(ti, f)
        else:
            self._tar.addfile(ti)

    def whiteout(self, rel: str) -> None:
        parent, _, base = rel.rpartition("/")
        name = whiteout.whiteout_name(base)
        self._marker(parent + "/" + name if parent else name)

    def opaque(self, dir_rel: str) -> None:
        self._marker(dir_rel + "/" + whiteout.OPAQUE_MARKER if dir_rel else whiteout.OPAQUE_MARKER)

    def _marker(self, name: str) -> None:
        ti = tarfile.TarInfo(name)
        ti.type = tarfile.REGTYPE
        ti.mode = 0o600
        ti.uname = ti.gname = ""
        self._tar.addfile(ti)

    def close(self) -> str:
        """Finish the archive and return its diff id."""
        self._tar.close()
        return "sha256:" + self._writer.sha.hexdigest()


def read_xattrs(path: str) -> list[tuple[str, bytes]]:
    """Content xattrs of *path* (not following symlinks), sorted, storage markers left out."""
    try:
        names = os.listxattr(path, follow_symlinks=False)
    except OSError as exc:
        if exc.errno in (errno.ENOTSUP, errno.EPERM):
            return []
        raise
    out = []
    for name in sorted(names):
        if whiteout.is_private_xattr(name):
            continue
        try:
            out.append((name, os.getxattr(path, name, follow_symlinks=False)))
        except OSError as exc:
            if exc.errno not in (errno.ENODATA, errno.ENOTSUP):
                raise
    return out


def export_tree_entries(exporter: TarExporter, root: str, rels: Iterable[tuple[str, str]]) -> None:
    """Export (kind, rel) pairs in order: kind "D" writes a whiteout, else the entry at root/rel."""
    for kind, rel in rels:
        if kind == "D":
            exporter.whiteout(rel)
        else:
            exporter.add(rel, root + "/" + rel)

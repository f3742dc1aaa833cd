"""Layer tar streams: sniff and decompress, apply into a directory (export: :mod:`.tarexport`).

A layer is an uncompressed tar (possibly gzip or zstd compressed in transit)
whose sha256 is its diff id.  Applying streams it: nothing is held in memory
but one chunk, and the digest is computed while the bytes go by.

Hostile input must not escape the directory it is applied into: names are
cleaned (no absolute paths, no ``..``), no entry is written through a symlink
the same tar created, and hardlinks must point at an earlier entry of the same
tar.  Any violation raises :class:`~layerfs.errors.InvalidLayer` naming the
entry; the caller removes what was applied so far.
"""

from __future__ import annotations

import enum
import errno
import gzip
import hashlib
import io
import os
import re
import shutil
import stat
import zlib
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO, Callable

import zstandard
from zlib_ng import gzip_ng_threaded, zlib_ng

from . import whiteout
from .errors import InvalidLayer
from .tarstream import Member, TarFormatError, TarReader
from ._io import ReadStream
from .tarexport import TarExporter, export_tree_entries, read_xattrs  # noqa: F401  (part of this module's API)

CHUNK = 1 << 20
_HOLE_GRAIN = 64 << 10
_ZEROS = bytes(_HOLE_GRAIN)

GZIP_MAGIC = b"\x1f\x8b"
ZSTD_MAGIC = b"\x28\xb5\x2f\xfd"
_OTHER_MAGIC = {b"\xfd7zXZ\x00": "xz", b"BZh": "bzip2"}


class WhiteoutFormat(enum.Enum):
    """How an applied layer keeps OCI whiteouts."""

    OVERLAY = "overlay"  # char 0:0 devices and trusted.overlay.opaque (overlay2)
    AUFS = "aufs"  # .wh.<name> files kept as they are (aufs)
    DELETE = "delete"  # applied onto a copy of the parent: delete what they name (snapshot drivers)


@dataclass(frozen=True)
class ApplyResult:
    diff_id: str  # sha256 of the uncompressed tar
    size: int  # bytes of regular-file content
    compression: str  # "none", "gzip" or "zstd"
    whiteouts: tuple[str, ...] = ()  # overlay-format whiteouts made (relative paths)


class _HashingReader(ReadStream):
    """Passes reads through while hashing them."""

    def __init__(self, inner):
        self._inner = inner
        self.sha = hashlib.sha256()
        self.count = 0

    def read(self, size: int = -1) -> bytes:
        data = self._inner.read(size)
        if data:
            self.sha.update(data)
            self.count += len(data)
        return data


class _PrefixedReader(ReadStream):
    """Gives back bytes already read for sniffing, then the rest of the stream."""

    def __init__(self, prefix: bytes, inner):
        self._prefix = prefix
        self._inner = inner

    def read(self, size: int = -1) -> bytes:
        if self._prefix:
            if size is None or size < 0:
                data, self._prefix = self._prefix + self._inner.read(), b""
                return data
            data, self._prefix = self._prefix[:size], self._prefix[size:]
            return data
        return self._inner.read(size)


class _ZstdReader(ReadStream):
    """Streaming zstd decompression that notices truncation.

    Why not ZstdDecompressor.stream_reader: it ends quietly on a cut-off
    frame, and a truncated layer must be refused, not half-applied.
    """

    def __init__(self, raw):
        self._raw = raw
        self._dctx = zstandard.ZstdDecompressor()
        self._obj = self._dctx.decompressobj()
        self._buf = bytearray()
        self._eof = False

    def _fill(self) -> None:
        chunk = self._raw.read(CHUNK)
        if not chunk:
            if not self._obj.eof:
                raise zstandard.ZstdError("zstd stream is truncated (the last frame never ends)")
            self._eof = True
            return
        while chunk:
            if self._obj.eof:
                self._obj = self._dctx.decompressobj()  # the next frame
            self._buf += self._obj.decompress(chunk)
            chunk = self._obj.unused_data if self._obj.eof else b""

    def read(self, size: int = -1) -> bytes:
        while (size is None or size < 0 or len(self._buf) < size) and not self._eof:
            self._fill()
        if size is None or size < 0 or size >= len(self._buf):
            data = bytes(self._buf)
            self._buf.clear()
            return data
        data = bytes(self._buf[:size])
        del self._buf[:size]
        return data


def sniff_compression(head: bytes) -> str:
    """Name the compression of a stream from its first bytes (pure).

    A ustar/pax/gnu header (magic at offset 257) wins, so a tar whose first
    name starts with "BZh" is not taken for bzip2.
    """
    if len(head) >= 262 and head[257:262] == b"ustar":
        return "none"
    if head.startswith(GZIP_MAGIC):
        return "gzip"
    if head.startswith(ZSTD_MAGIC):
        return "zstd"
    for magic, name in _OTHER_MAGIC.items():
        if head.startswith(magic):
            return name
    return "none"


def _read_exactly(f, n: int) -> bytes:
    out = b""
    while len(out) < n:
        data = f.read(n - len(out))
        if not data:
            break
        out += data
    return out


def decompressed(raw: BinaryIO) -> tuple[BinaryIO, str]:
    """Wrap a raw layer stream so that reads give the uncompressed tar."""
    head = _read_exactly(raw, 512)
    kind = sniff_compression(head)
    stream = _PrefixedReader(head, raw)
    if kind == "gzip":
        # Why zlib-ng: it inflates in about half the CPU time of zlib, and the
        # threaded reader inflates on its own thread (outside the GIL) while
        # this one parses the tar.
        # 256 KiB blocks: it reads 8 blocks of compressed input at a time.
        return gzip_ng_threaded.open(stream, "rb", threads=1, block_size=256 << 10), kind
    if kind == "zstd":
        return _ZstdReader(stream), kind
    if kind != "none":
        raise InvalidLayer(f"layer is compressed with {kind}; layerfs accepts uncompressed, gzip or zstd tars")
    return stream, kind


# -- names -----------------------------------------------------------------


class UnsafePath(ValueError):
    pass


def clean_member_name(name: str) -> str:
    """Normalise a tar member name to a relative path ("" is the root).

    Raises UnsafePath for absolute names and ``..`` components (pure).
    """
    if name.startswith("/"):
        raise UnsafePath("absolute path")
    if "\0" in name:
        raise UnsafePath("NUL byte in name")
    parts = [p for p in name.split("/") if p not in ("", ".")]
    if ".." in parts:
        raise UnsafePath("'..' component")
    return "/".join(parts)


def _split(rel: str) -> tuple[str, str]:
    parent, _, base = rel.rpartition("/")
    return parent, base


# -- apply -------------------------------------------------------------------

SMALL_FILE = 1 << 20  # files up to this size are written by worker threads
_BATCH_FILES = 64
_BATCH_BYTES = 4 << 20
_INFLIGHT_BYTES = 64 << 20


def _process_umask() -> int:
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("Umask:"):
                    return int(line.split()[1], 8)
    except OSError:
        pass
    return 0o022


def _write_data(fd: int, data) -> bool:
    """Write *data* at the current offset, turning all-zero blocks into holes; True if it made holes."""
    view = memoryview(data)
    holes = False
    for off in range(0, len(view), _HOLE_GRAIN):
        piece = view[off : off + _HOLE_GRAIN]
        # Why: all-zero blocks become holes so sparse images stay sparse.
        if len(piece) == _HOLE_GRAIN and piece == _ZEROS:
            os.lseek(fd, _HOLE_GRAIN, os.SEEK_CUR)
            holes = True
            continue
        while piece:
            written = os.write(fd, piece)
            piece = piece[written:]
    return holes


class _ParallelWriter:
    """Writes small files on worker threads while the main thread parses the tar.

    Why: unpacking is dominated by per-file syscalls (open, write, chown,
    utime, close), which release the GIL; two or more threads overlap them
    where GNU tar does them one after another.  Files and symlinks go in
    batches (fewer futures) with a cap on bytes in flight.  Anything that
    could race with a pending job (reusing its name, going through it as a
    directory, linking to it, deleting or listing a directory above it)
    calls barrier() first.
    """

    def __init__(self, workers: int):
        from concurrent.futures import ThreadPoolExecutor

        self.pool = ThreadPoolExecutor(workers, thread_name_prefix="layerfs-apply")
        self.batch: list[Callable[[], None]] = []
        self.batch_bytes = 0
        self.inflight: list[tuple[object, int]] = []
        self.inflight_bytes = 0
        self.pending: set[str] = set()

    def add(self, rel: str, job: Callable[[], None], nbytes: int) -> None:
        self.batch.append(job)
        self.pending.add(rel)
        self.batch_bytes += nbytes
        if len(self.batch) >= _BATCH_FILES or self.batch_bytes >= _BATCH_BYTES:
            self.flush()

    def flush(self) -> None:
        if self.batch:
            jobs, self.batch = self.batch, []
            self.inflight.append((self.pool.submit(_run_jobs, jobs), self.batch_bytes))
            self.inflight_bytes += self.batch_bytes
            self.batch_bytes = 0
        while self.inflight and (self.inflight_bytes > _INFLIGHT_BYTES or self.inflight[0][0].done()):
            future, nbytes = self.inflight.pop(0)
            self.inflight_bytes -= nbytes
            future.result()  # surfaces a worker's error early

    def barrier(self) -> None:
        self.flush()
        while self.inflight:
            future, nbytes = self.inflight.pop(0)
            self.inflight_bytes -= nbytes
            future.result()
        self.pending.clear()

    def close(self) -> None:
        self.batch.clear()
        self.pool.shutdown(wait=True, cancel_futures=True)


def _run_jobs(jobs: list[Callable[[], None]]) -> None:
    for job in jobs:
        job()



class _Applier:
    def __init__(self, dest: str, fmt: WhiteoutFormat):
        self.dest = dest.rstrip("/")
        self.fmt = fmt
        self.safe_dirs: set[str] = {""}  # relpaths verified to be real directories
        self.created: set[str] = set()  # relpaths this tar created
        self.overlay_whiteouts: set[str] = set()
        self.dir_times: dict[str, tuple[int, int]] = {}  # rel -> (atime, mtime), set at the end
        self.size = 0
        self.chown = os.geteuid() == 0
        # OVERLAY and AUFS layers are applied into an empty directory, so what
        # exists is exactly what this tar made: no lstat before each create.
        self.fresh = fmt is not WhiteoutFormat.DELETE
        self.setgid_dirs: set[str] = set()
        self.umask = _process_umask()
        self.writer = _ParallelWriter(max(2, min(4, os.cpu_count() or 2)))

    def path(self, rel: str) -> str:
        return self.dest + "/" + rel if rel else self.dest

    # Why: a tar can create "a -> /etc" and then "a/passwd"; every parent of
    # an entry must be a real directory of this layer, never a symlink.
    def ensure_dir(self, rel: str, entry: str) -> None:
        if rel in self.safe_dirs:
            return
        parent, _ = _split(rel)
        self.ensure_dir(parent, entry)
        if rel in self.writer.pending:
            self.writer.barrier()  # a file or symlink of that name may still be on its way
        path = self.path(rel)
        try:
            st = os.lstat(path)
        except FileNotFoundError:
            os.mkdir(path, 0o755)
            self.created.add(rel)
            self.safe_dirs.add(rel)
            return
        if stat.S_ISDIR(st.st_mode):
            self.safe_dirs.add(rel)
            return
        if stat.S_ISLNK(st.st_mode):
            raise InvalidLayer(f"layer entry {entry!r} goes through the symlink {rel!r}; refusing to write outside the layer")
        if rel in self.overlay_whiteouts:
            # The layer deleted a lower entry and now puts a directory there.
            os.unlink(path)
            self.overlay_whiteouts.discard(rel)
            os.mkdir(path, 0o755)
            os.setxattr(path, whiteout.OVERLAY_OPAQUE_XATTR, whiteout.OVERLAY_OPAQUE_VALUE)
            self.created.add(rel)
            self.safe_dirs.add(rel)
            return
        raise InvalidLayer(f"layer entry {entry!r}: {rel!r} is not a directory")

    def forget_dirs_under(self, rel: str) -> None:
        prefix = rel + "/"
        self.safe_dirs = {d for d in self.safe_dirs if d != rel and not d.startswith(prefix)}
        self.dir_times = {d: t for d, t in self.dir_times.items() if d != rel and not d.startswith(prefix)}

    def may_exist(self, rel: str) -> bool:
        return not self.fresh or rel in self.created or rel in self.overlay_whiteouts

    def clear(self, rel: str, keep_dir: bool) -> bool:
        """Make room for a new entry at rel; True when an existing directory is kept."""
        if not self.may_exist(rel):
            return False
        if rel in self.writer.pending:
            self.writer.barrier()  # the same name earlier in this tar: let its job finish first
        path = self.path(rel)
        try:
            st = os.lstat(path)
        except FileNotFoundError:
            return False
        if stat.S_ISDIR(st.st_mode):
            if keep_dir:
                return True
            self.writer.barrier()  # jobs may still be writing below it
            shutil.rmtree(path)
            self.forget_dirs_under(rel)
        else:
            os.unlink(path)
        self.safe_dirs.discard(rel)
        return False

    def apply_member(self, tf: TarReader, m: Member) -> None:
        try:
            rel = clean_member_name(m.name)
        except UnsafePath as exc:
            raise InvalidLayer(f"layer entry {m.name!r} is unsafe ({exc}); refusing the layer") from None
        if rel == "":
            return  # the layer root keeps the driver's own owner and mode
        parent, base = _split(rel)
        if whiteout.AUFS_META_PREFIX in parent and any(
            part.startswith(whiteout.AUFS_META_PREFIX) for part in parent.split("/")
        ):
            return  # inside aufs bookkeeping (.wh..wh.plnk/...): never content
        try:
            kind, target = whiteout.classify_name(base)
        except whiteout.BadWhiteout:
            raise InvalidLayer(f"layer entry {m.name!r} is a whiteout that names no valid file") from None
        self.ensure_dir(parent, m.name)
        if kind is whiteout.Kind.AUFS_META:
            return
        if self.fmt is not WhiteoutFormat.AUFS:
            if kind is whiteout.Kind.WHITEOUT:
                self.apply_whiteout(parent + "/" + target if parent else target)
                return
            if kind is whiteout.Kind.OPAQUE:
                self.apply_opaque(parent)
                return
        self.apply_entry(tf, m, rel)

    def apply_whiteout(self, rel: str) -> None:
        path = self.path(rel)
        if rel in self.created:
            # The same tar also adds this name: its own entry wins, but must
            # still hide what lower layers have under a directory.
            if os.path.isdir(path) and not os.path.islink(path):
                self.apply_opaque(rel)
            return
        self.clear(rel, keep_dir=False)
        if self.fmt is WhiteoutFormat.OVERLAY:
            os.mknod(path, stat.S_IFCHR | 0o000, 0)
            self.overlay_whiteouts.add(rel)

    def apply_opaque(self, rel: str) -> None:
        self.ensure_dir(rel, rel + "/" + whiteout.OPAQUE_MARKER)
        path = self.path(rel)
        if self.fmt is WhiteoutFormat.OVERLAY:
            os.setxattr(path, whiteout.OVERLAY_OPAQUE_XATTR, whiteout.OVERLAY_OPAQUE_VALUE)
            return
        self._clear_lower(rel)

    def _clear_lower(self, rel: str) -> None:
        """Delete what lower layers left under rel, keeping what this tar wrote."""
        prefix = rel + "/" if rel else ""
        self.writer.barrier()
        for name in os.listdir(self.path(rel)):
            child = prefix + name
            if child not in self.created:
                self.clear(child, keep_dir=False)
            elif child in self.safe_dirs:
                self._clear_lower(child)

    def apply_entry(self, tf: TarReader, m: Member, rel: str) -> None:
        path = self.path(rel)
        replaced_whiteout = rel in self.overlay_whiteouts
        if m.isdir():
            kept = self.clear(rel, keep_dir=True)
            if not kept:
                os.mkdir(path, 0o700)
                if replaced_whiteout:
                    os.setxattr(path, whiteout.OVERLAY_OPAQUE_XATTR, whiteout.OVERLAY_OPAQUE_VALUE)
            self.safe_dirs.add(rel)
            self.created.add(rel)
            self._set_owner_mode(path, m, symlink=False)
            if m.mode & stat.S_ISGID:
                self.setgid_dirs.add(rel)
            else:
                self.setgid_dirs.discard(rel)
            self._set_xattrs(path, m)
            self.dir_times.pop(rel, None)  # a later entry for the same directory wins
            self.dir_times[rel] = _times_ns(m)
            self.overlay_whiteouts.discard(rel)
            return
        if m.islnk():
            self.apply_hardlink(m, rel)
            return
        self.clear(rel, keep_dir=False)
        self.overlay_whiteouts.discard(rel)
        if m.isreg():
            self._write_file(tf, m, rel, path)
        elif m.issym():
            # Why on the writer threads: creating an inode is the costly part
            # (see _ParallelWriter); nothing below a symlink is ever written.
            self.writer.add(rel, lambda: self._create_symlink(path, m), 0)
        elif m.ischr() or m.isblk():
            kind = stat.S_IFCHR if m.ischr() else stat.S_IFBLK
            os.mknod(path, kind | 0o600, os.makedev(m.devmajor, m.devminor))
            self._finish_special(path, m)
        elif m.isfifo():
            os.mkfifo(path, 0o600)
            self._finish_special(path, m)
        else:
            raise InvalidLayer(f"layer entry {m.name!r} has unsupported tar type {m.type!r}")
        self.created.add(rel)

    def apply_hardlink(self, m: Member, rel: str) -> None:
        try:
            target = clean_member_name(m.linkname)
        except UnsafePath as exc:
            raise InvalidLayer(f"layer entry {m.name!r} is a hardlink to an unsafe target ({exc})") from None
        if target == rel:
            return
        tparent, _ = _split(target)
        if target not in self.created or tparent not in self.safe_dirs:
            self.ensure_dir(tparent, m.name)
            raise InvalidLayer(
                f"layer entry {m.name!r} is a hardlink to {m.linkname!r}, which is not an earlier file of this layer"
            )
        tpath = self.path(target)
        if target in self.writer.pending:
            self.writer.barrier()
        if stat.S_ISDIR(os.lstat(tpath).st_mode):
            raise InvalidLayer(f"layer entry {m.name!r} is a hardlink to the directory {m.linkname!r}")
        self.clear(rel, keep_dir=False)
        self.overlay_whiteouts.discard(rel)
        os.link(tpath, self.path(rel), follow_symlinks=False)
        self.created.add(rel)

    def _write_file(self, tf: TarReader, m: Member, rel: str, path: str) -> None:
        if rel in self.writer.pending:
            self.writer.barrier()  # the same name twice in one tar: the later one wins
        parent, _ = _split(rel)
        # Root-owned files need no chown unless a setgid parent (or, applying
        # onto existing content, any parent) would hand them another group.
        chown = self.chown and (m.uid or m.gid or not self.fresh or parent in self.setgid_dirs)
        mode = m.mode & 0o7777
        chmod = bool(mode & 0o7000) or (mode & self.umask) != 0
        times = _times_ns(m)
        self.size += m.file_size
        if m.sparse is None and m.size <= SMALL_FILE:
            data = tf.read_data(m.size) if m.size else b""
            self.writer.add(rel, lambda: self._create_file(path, m, data, chown, mode, chmod, times), m.size)
            return
        self._create_file(path, m, tf, chown, mode, chmod, times)

    def _create_file(self, path, m: Member, data, chown: bool, mode: int, chmod: bool, times) -> None:
        """Create one regular file from bytes or the tar stream (runs on worker threads too)."""
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC, mode & 0o777)
        try:
            if isinstance(data, bytes):
                if _write_data(fd, data):
                    os.ftruncate(fd, m.size)
            elif m.sparse is not None:
                # Write only the data segments: the holes stay holes.
                for offset, length in m.sparse:
                    os.lseek(fd, offset, os.SEEK_SET)
                    while length:
                        chunk = data.read_data(min(length, CHUNK))
                        _write_data(fd, chunk)
                        length -= len(chunk)
                os.ftruncate(fd, m.realsize)
            else:
                holes = False
                while True:
                    chunk = data.read_data(CHUNK)
                    if not chunk:
                        break
                    holes = _write_data(fd, chunk) or holes
                if holes:
                    os.ftruncate(fd, m.size)
            if chown:
                os.fchown(fd, m.uid, m.gid)
            if chmod or chown:
                os.fchmod(fd, mode)  # after chown: chown clears setuid/setgid bits
            self._set_xattrs(path, m)
            os.utime(fd, ns=times)
        finally:
            os.close(fd)

    def _create_symlink(self, path: str, m: Member) -> None:
        """Create one symlink with its owner, xattrs and times (runs on worker threads)."""
        os.symlink(m.linkname, path)
        self._set_owner_mode(path, m, symlink=True)
        self._set_xattrs(path, m)
        self._set_times(path, m, symlink=True)

    def _finish_special(self, path: str, m: Member) -> None:
        self._set_owner_mode(path, m, symlink=False)
        self._set_xattrs(path, m)
        self._set_times(path, m, symlink=False)

    def _set_owner_mode(self, path: str, m: Member, symlink: bool) -> None:
        if self.chown:
            os.lchown(path, m.uid, m.gid)
        if not symlink:
            # After chown: chown clears setuid/setgid bits.
            os.chmod(path, m.mode & 0o7777)

    def _set_times(self, path: str, m: Member, symlink: bool) -> None:
        os.utime(path, ns=_times_ns(m), follow_symlinks=not symlink)

    def _set_xattrs(self, path: str, m: Member) -> None:
        if not m.pax_headers:
            return
        for key, value in m.pax_headers.items():
            if not key.startswith("SCHILY.xattr."):
                continue
            name = key[len("SCHILY.xattr.") :]
            if whiteout.is_private_xattr(name):
                continue  # a layer may not forge the storage format's own markers
            try:
                os.setxattr(path, name, value.encode("utf-8", "surrogateescape"), follow_symlinks=False)
            except OSError as exc:
                # user.* xattrs cannot be set on symlinks and special files; a
                # filesystem without xattrs drops them (as Docker does).
                if exc.errno not in (errno.EPERM, errno.ENOTSUP):
                    raise InvalidLayer(f"layer entry {m.name!r}: cannot set xattr {name!r}: {exc.strerror}") from None

    def finish(self) -> None:
        self.writer.barrier()
        for rel, times in self.dir_times.items():
            os.utime(self.path(rel), ns=times, follow_symlinks=False)


def parse_pax_time(value: str) -> int | None:
    """A pax time record ("1700000000.123456789", "-5.5") in exact nanoseconds (pure)."""
    whole, _, frac = value.partition(".")
    if whole.isascii() and whole.isdigit() and frac.isascii() and (frac.isdigit() or not frac):
        # The common record, without the regular expression (two per entry).
        return int(whole) * 1_000_000_000 + int(frac[:9].ljust(9, "0"))
    m = _PAX_TIME_RE.match(value.strip())
    if m is None:
        return None
    sign, whole_number, frac = m.group(1), int(m.group(2)), (m.group(3) or "")[:9].ljust(9, "0")
    ns = whole_number * 1_000_000_000 + int(frac)
    return -ns if sign == "-" else ns


_PAX_TIME_RE = re.compile(r"^([-+]?)(\d+)(?:\.(\d*))?$")


def _times_ns(m: Member) -> tuple[int, int]:
    """The entry's (atime, mtime) in ns; pax records are read exactly (tarfile turns them into
    floats); no atime means the mtime."""
    pax = m.pax_headers
    mtime = parse_pax_time(pax["mtime"]) if pax and "mtime" in pax else None
    if mtime is None:
        mtime = int(m.mtime) * 1_000_000_000 if float(m.mtime).is_integer() else int(round(m.mtime * 1e9))
    atime = parse_pax_time(pax["atime"]) if pax and "atime" in pax else None
    return (mtime if atime is None else atime), mtime


STREAM_ERRORS = (
    TarFormatError, EOFError, zlib.error, zlib_ng.error, zstandard.ZstdError, gzip.BadGzipFile, UnicodeError
)


def apply_tar(
    src: BinaryIO, dest: str | Path, fmt: WhiteoutFormat, *, isolate: bool = False
) -> ApplyResult:
    """Apply a (possibly compressed) layer tar read from *src* into *dest*.

    *dest* must exist.  On error the directory is left partly written; the caller owns it and
    removes it.  With *isolate*, the entries are written by a worker process
    while this one reads, decompresses and hashes (see
    :mod:`layerfs._applyproc`): layers applied side by side then use every
    core instead of sharing one interpreter lock.
    """
    stream, compression = decompressed(src)
    try:
        if isolate:
            from . import _applyproc

            worker = _applyproc.spawn(os.fspath(dest), fmt)
            if worker is not None:
                return _applyproc.apply_in_worker(worker, stream, os.fspath(dest), compression)
        reader = _HashingReader(stream)
        applied = apply_entries(reader, os.fspath(dest), fmt)
        return ApplyResult("sha256:" + reader.sha.hexdigest(), applied.size, compression, applied.whiteouts)
    finally:
        if stream is not src:
            stream.close()  # stops a decompressor thread; the caller still owns src


def apply_entries(reader: BinaryIO, dest: str, fmt: WhiteoutFormat) -> ApplyResult:
    """Write the tar entries read from *reader* (uncompressed) into *dest*, reading to its end.

    The result's diff_id is empty: whoever reads the stream hashes it.
    """
    applier = _Applier(dest, fmt)
    try:
        tf = TarReader(io.BufferedReader(reader, CHUNK))
        for member in tf:
            applier.apply_member(tf, member)
        while reader.read(CHUNK):
            pass  # the digest covers what follows the end-of-archive blocks too
        applier.finish()
    except STREAM_ERRORS as exc:
        raise InvalidLayer(f"layer tar is truncated or malformed ({type(exc).__name__}: {exc})") from None
    except OSError as exc:
        if exc.errno == errno.ENOSPC:
            raise
        raise InvalidLayer(f"layer cannot be applied: {exc}") from None
    finally:
        applier.writer.close()
    return ApplyResult("", applier.size, "none", tuple(sorted(applier.overlay_whiteouts)))

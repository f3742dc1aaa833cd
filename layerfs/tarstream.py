"""A fast, strict, streaming tar reader for layer tars.

Why not tarfile: in stream mode it spends ~50 µs of Python per member
(header decoding through generic helpers, a stream buffer that is copied
on every read); unpacking 20,000 small files is then bound by parsing, not
by the disk.  This reader decodes a ustar/pax/GNU header with one slice
per field and hands file data straight from a buffered stream.

Supported: ustar and GNU headers, base-256 numbers, pax extended headers
(path, linkpath, size, uid, gid, mtime, atime, uname, gname, SCHILY.xattr.*),
GNU long names and long links (L/K), and sparse files (old GNU 'S', pax
0.0, 0.1 and 1.0).  Global pax headers are honoured as defaults.
Anything malformed raises :class:`TarFormatError`.
"""

from __future__ import annotations

import tarfile
from dataclasses import dataclass, field
from typing import BinaryIO, Iterator

BLOCK = 512
_ZERO = bytes(BLOCK)

REGTYPE, AREGTYPE, LNKTYPE, SYMTYPE = b"0", b"\0", b"1", b"2"
CHRTYPE, BLKTYPE, DIRTYPE, FIFOTYPE, CONTTYPE = b"3", b"4", b"5", b"6", b"7"
_REGULAR = (REGTYPE, AREGTYPE, CONTTYPE, b"S")


class TarFormatError(ValueError):
    pass


def parse_number(field: bytes) -> int:
    """A numeric header field: octal ASCII (NUL/space padded) or GNU base-256 (pure)."""
    if field and field[0] & 0x80:
        value = int.from_bytes(field[1:], "big") | ((field[0] & 0x3F) << (8 * (len(field) - 1)))
        if field[0] & 0x40:  # negative
            value -= 1 << (8 * len(field) - 2)
        return value
    text = field.split(b"\0", 1)[0].strip()
    if not text:
        return 0
    try:
        return int(text, 8)
    except ValueError:
        raise TarFormatError(f"bad numeric field {field!r}") from None


def _string(field: bytes) -> str:
    return field.split(b"\0", 1)[0].decode("utf-8", "surrogateescape")


def checksum_ok(block: bytes) -> bool:
    """The header checksum counts the checksum field as spaces; unsigned or signed sums (pure)."""
    try:
        stored = parse_number(block[148:156])
    except TarFormatError:
        return False
    unsigned = sum(block) - sum(block[148:156]) + 8 * 32
    if stored == unsigned:
        return True
    signed = unsigned - 256 * sum(1 for b in block if b > 127) + 256 * sum(1 for b in block[148:156] if b > 127)
    return stored == signed


def parse_pax(data: bytes) -> dict[str, str]:
    """pax extended header records "LEN KEY=VALUE\\n" (pure)."""
    out: dict[str, str] = {}
    pos = 0
    sparse_pairs: list[str] = []
    while pos < len(data):
        if data[pos] == 0:
            break
        space = data.find(b" ", pos)
        if space < 0:
            raise TarFormatError("malformed pax record (no length)")
        try:
            length = int(data[pos:space])
        except ValueError:
            raise TarFormatError("malformed pax record length") from None
        record = data[space + 1 : pos + length]
        if length <= 0 or pos + length > len(data) or not record.endswith(b"\n") or b"=" not in record:
            raise TarFormatError("malformed pax record")
        key, _, value = record[:-1].partition(b"=")
        k = key.decode("utf-8", "surrogateescape")
        try:
            v = value.decode("utf-8")
        except UnicodeDecodeError:
            v = value.decode("utf-8", "surrogateescape")
        if k in ("GNU.sparse.offset", "GNU.sparse.numbytes"):
            sparse_pairs.append(v)  # pax sparse 0.0 repeats these keys
        out[k] = v
        pos += length
    if sparse_pairs:
        out["GNU.sparse.map"] = ",".join(sparse_pairs)
    return out


@dataclass(slots=True)
class Member:
    """One archive entry, with the attribute names of tarfile.TarInfo that layerfs uses."""

    name: str
    type: bytes
    mode: int
    uid: int
    gid: int
    size: int
    mtime: float
    linkname: str = ""
    devmajor: int = 0
    devminor: int = 0
    pax_headers: dict = field(default_factory=dict)
    sparse: list | None = None  # [(offset, length)] data segments of a sparse file
    realsize: int = 0  # the file's size when sparse
    offset: int = 0  # where the header starts in the stream

    def isreg(self) -> bool:
        return self.type in _REGULAR

    def isdir(self) -> bool:
        return self.type == DIRTYPE

    def issym(self) -> bool:
        return self.type == SYMTYPE

    def islnk(self) -> bool:
        return self.type == LNKTYPE

    def ischr(self) -> bool:
        return self.type == CHRTYPE

    def isblk(self) -> bool:
        return self.type == BLKTYPE

    def isfifo(self) -> bool:
        return self.type == FIFOTYPE

    @property
    def file_size(self) -> int:
        """Size of the file on disk (the expanded size for a sparse file)."""
        return self.realsize if self.sparse is not None else self.size


class TarReader:
    """Iterate members of a tar read from a binary stream; read each member's data before the next."""

    def __init__(self, stream: BinaryIO):
        self._f = stream
        self.offset = 0  # bytes consumed
        self._left = 0  # data bytes of the current member not read yet
        self._pad = 0
        self._globals: dict[str, str] = {}
        self.ended_cleanly = False

    def _read(self, n: int) -> bytes:
        data = self._f.read(n)
        while len(data) < n:
            more = self._f.read(n - len(data))
            if not more:
                break
            data += more
        self.offset += len(data)
        return data

    def _read_exact(self, n: int, what: str) -> bytes:
        data = self._read(n)
        if len(data) != n:
            raise TarFormatError(f"archive ends inside {what}")
        return data

    def read_data(self, n: int = -1) -> bytes:
        """Read up to n bytes of the current member's data."""
        if self._left <= 0:
            return b""
        n = self._left if n < 0 else min(n, self._left)
        data = self._read(n)
        if len(data) != n:
            raise TarFormatError("archive ends inside a file's data")
        self._left -= n
        return data

    def _skip_rest(self) -> None:
        while self._left > 0:
            self.read_data(min(self._left, 1 << 20))
        if self._pad:
            self._read_exact(self._pad, "padding")
            self._pad = 0

    def _start_data(self, size: int) -> None:
        self._left = size
        self._pad = -size % BLOCK

    def _read_blob(self, size: int, what: str) -> bytes:
        if size > 64 << 20:
            raise TarFormatError(f"{what} of {size} bytes is implausibly large")
        padded = size + (-size % BLOCK)
        data = self._read(padded)  # one read with its padding: a pax header per entry is common
        if len(data) < size:
            raise TarFormatError(f"archive ends inside {what}")
        if len(data) < padded:
            raise TarFormatError("archive ends inside padding")
        return data[:size]

    def __iter__(self) -> Iterator[Member]:
        pax: dict[str, str] = {}
        long_name = long_link = None
        while True:
            self._skip_rest()
            start = self.offset
            block = self._read(BLOCK)
            if not block:
                self.ended_cleanly = True  # the stream ends on a member boundary (Go's reader accepts it)
                return
            if len(block) < BLOCK:
                raise TarFormatError("archive ends inside a header")
            if block == _ZERO:
                self.ended_cleanly = True
                return
            if not checksum_ok(block):
                raise TarFormatError(f"bad header checksum at byte {start}")
            typeflag = block[156:157]
            size = parse_number(block[124:136])
            if typeflag in (b"x", b"X"):
                pax.update(parse_pax(self._read_blob(size, "a pax header")))
                continue
            if typeflag == b"g":
                self._globals.update(parse_pax(self._read_blob(size, "a global pax header")))
                continue
            if typeflag == b"L":
                long_name = _string(self._read_blob(size, "a GNU long name"))
                continue
            if typeflag == b"K":
                long_link = _string(self._read_blob(size, "a GNU long link"))
                continue
            member = self._member(block, typeflag, size, {**self._globals, **pax} if self._globals else pax, long_name, long_link)
            member.offset = start
            pax, long_name, long_link = {}, None, None
            yield member

    def _member(self, block: bytes, typeflag: bytes, size: int, pax: dict, long_name, long_link) -> Member:
        name = _string(block[0:100])
        if block[257:262] == b"ustar" and block[263:265] != b" \0":  # POSIX ustar: prefix field
            prefix = _string(block[345:500])
            if prefix:
                name = prefix + "/" + name
        name = long_name if long_name is not None else name
        linkname = long_link if long_link is not None else _string(block[157:257])
        m = Member(
            name=pax.get("path", name),
            type=typeflag,
            mode=parse_number(block[100:108]) & 0o7777,
            uid=int(pax["uid"]) if "uid" in pax else parse_number(block[108:116]),
            gid=int(pax["gid"]) if "gid" in pax else parse_number(block[116:124]),
            size=int(pax["size"]) if "size" in pax else size,
            mtime=float(pax["mtime"]) if "mtime" in pax else parse_number(block[136:148]),
            linkname=pax.get("linkpath", linkname),
            devmajor=parse_number(block[329:337]) if typeflag in (CHRTYPE, BLKTYPE) else 0,
            devminor=parse_number(block[337:345]) if typeflag in (CHRTYPE, BLKTYPE) else 0,
            pax_headers=pax,
        )
        if m.type == AREGTYPE and m.name.endswith("/"):
            m.type = DIRTYPE  # old tars mark directories only by the slash
        if m.type == DIRTYPE:
            m.name = m.name.rstrip("/")
        # Like tarfile: only regular files (and unknown types) carry data.
        known = (LNKTYPE, SYMTYPE, DIRTYPE, CHRTYPE, BLKTYPE, FIFOTYPE)
        data_size = 0 if m.type in known else m.size
        if typeflag == b"S":
            self._old_gnu_sparse(m, block)
        elif "GNU.sparse.major" in pax or "GNU.sparse.map" in pax:
            self._pax_sparse(m, pax)
        if m.size < 0:
            raise TarFormatError(f"entry {m.name!r} has a negative size")
        self._start_data(data_size)
        if m.sparse is not None and "GNU.sparse.major" in pax and pax.get("GNU.sparse.major") == "1":
            m.sparse = self._sparse_map_in_data()
        return m

    def _old_gnu_sparse(self, m: Member, block: bytes) -> None:
        segments = []
        ext = block
        entries, flag_at = range(386, 482, 24), 482
        while True:
            for off in entries:
                offset, length = parse_number(ext[off : off + 12]), parse_number(ext[off + 12 : off + 24])
                if offset or length:
                    segments.append((offset, length))
            if not ext[flag_at]:
                break
            ext = self._read_exact(BLOCK, "a sparse header")
            entries, flag_at = range(0, 504, 24), 504
        m.sparse = segments
        m.realsize = parse_number(block[483:495])
        m.type = REGTYPE

    def _pax_sparse(self, m: Member, pax: dict) -> None:
        m.name = pax.get("GNU.sparse.name", m.name)
        m.realsize = int(pax.get("GNU.sparse.realsize", pax.get("GNU.sparse.size", m.size)))
        if pax.get("GNU.sparse.major") == "1":
            m.sparse = []  # the map is at the start of the data; read after _start_data
            return
        numbers = [int(x) for x in pax.get("GNU.sparse.map", "").split(",") if x]
        if len(numbers) % 2:
            raise TarFormatError(f"entry {m.name!r} has a malformed sparse map")
        m.sparse = list(zip(numbers[0::2], numbers[1::2]))

    def _sparse_map_in_data(self) -> list[tuple[int, int]]:
        # pax sparse 1.0: decimal lines "count\n" then "offset\nlength\n" pairs, padded to a block.
        text = b""

        def number() -> int:
            nonlocal text
            while b"\n" not in text:
                chunk = self.read_data(BLOCK)
                if not chunk:
                    raise TarFormatError("truncated sparse map")
                text += chunk
            line, _, text = text.partition(b"\n")
            return int(line)

        count = number()
        segments = [(number(), number()) for _ in range(count)]
        return segments


def to_tarinfo(m: Member) -> tarfile.TarInfo:  # pragma: no cover - debugging aid
    ti = tarfile.TarInfo(m.name)
    ti.type, ti.mode, ti.uid, ti.gid, ti.size, ti.mtime, ti.linkname = m.type, m.mode, m.uid, m.gid, m.size, m.mtime, m.linkname
    return ti

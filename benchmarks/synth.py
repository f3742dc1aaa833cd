"""Deterministic synthetic layer tars, generated once and cached.

A :class:`TreeSpec` fixes everything (file count, total bytes, seed, depth, link
counts); the same spec always yields byte-identical tars, so the cache is keyed
by the spec and the generator version. File sizes follow a log-normal spread
(many small files, a few of several MB, some empty), directories nest up to
``max_depth`` under the usual top-level names, content is a mix of compressible
text and incompressible bytes (so gzip/zstd variants are realistic), and a few
files have other modes and owners.
"""

from __future__ import annotations

import gzip
import hashlib
import io
import json
import os
import random
import tarfile
from dataclasses import asdict, dataclass
from pathlib import Path

GENERATOR_VERSION = 1
MTIME = 1_700_000_000
TOP_DIRS = ("bin", "etc", "lib", "opt", "srv", "usr", "var")
_SYLL = ("ba", "co", "de", "fi", "gu", "ha", "ji", "ko", "lu", "ma", "ne", "po", "qu",
         "ra", "si", "tu", "ve", "wo", "xy", "ze", "lib", "pkg", "net", "sys", "conf")
_EXT = ("", ".so", ".py", ".txt", ".conf", ".h", ".json", ".gz", ".mo", ".html")
POOL = 4 << 20


@dataclass(frozen=True)
class TreeSpec:
    files: int
    total_bytes: int
    seed: int = 1
    max_depth: int = 6
    files_per_dir: int = 12
    symlinks: int = 0
    hardlinks: int = 0
    size_sigma: float = 2.0
    empty_fraction: float = 0.02
    tag: str = ""                  # goes into generated names: distinct tags never collide

    def key(self) -> str:
        raw = json.dumps([GENERATOR_VERSION, asdict(self)], sort_keys=True).encode()
        b = self.total_bytes
        size = f"{b / 1e6:.0f}MB" if b >= 1e6 else f"{b / 1e3:.0f}kB"
        return f"synth-{self.files}f-{size}-s{self.seed}{self.tag}-{hashlib.sha256(raw).hexdigest()[:10]}"


@dataclass
class Entry:
    path: str
    kind: str           # "dir" | "file" | "symlink" | "hardlink"
    size: int = 0
    mode: int = 0o644
    uid: int = 0
    gid: int = 0
    pool: int = 0       # 0 text, 1 random
    offset: int = 0
    link: str = ""


def _pools(seed: int) -> tuple[bytes, bytes]:
    rng = random.Random(f"pools-{seed}")
    vocab = ["".join(rng.choice(_SYLL) for _ in range(rng.randint(1, 4))) for _ in range(3000)]
    words = rng.choices(vocab, k=POOL // 4)
    text = (" ".join(words) + "\n").encode()
    while len(text) < POOL:
        text += text
    return text[:POOL], rng.randbytes(POOL)


def plan(spec: TreeSpec) -> list[Entry]:
    """The entries of the layer, parents before children, links last."""
    rng = random.Random(f"tree-{spec.seed}-{spec.tag}")
    ndirs = max(len(TOP_DIRS), spec.files // max(1, spec.files_per_dir))
    dirs: list[tuple[str, int]] = [(d, 1) for d in TOP_DIRS]
    counter = 0

    def name(ext: str = "") -> str:
        nonlocal counter
        counter += 1
        stem = "".join(rng.choice(_SYLL) for _ in range(rng.randint(1, 3)))
        return f"{stem}{spec.tag}{counter}{ext}"

    while len(dirs) < ndirs:
        parent, depth = rng.choice(dirs)
        if depth >= spec.max_depth:
            continue
        dirs.append((f"{parent}/{name()}", depth + 1))

    # Skewed directory sizes: a few big directories, many small ones.
    weights = [rng.lognormvariate(0, 1.0) for _ in dirs]
    file_dirs = rng.choices([d for d, _ in dirs], weights=weights, k=spec.files)
    raw = [0.0 if rng.random() < spec.empty_fraction else rng.lognormvariate(0, spec.size_sigma)
           for _ in range(spec.files)]
    total_raw = sum(raw) or 1.0
    sizes = [int(w / total_raw * spec.total_bytes) for w in raw]
    sizes[max(range(spec.files), key=lambda i: raw[i])] += spec.total_bytes - sum(sizes)

    entries = [Entry(d, "dir", mode=0o755) for d, _ in dirs]
    files = []
    for d, size in zip(file_dirs, sizes):
        mode = rng.choices((0o644, 0o755, 0o600, 0o4755), weights=(85, 12, 2.5, 0.5))[0]
        owner = 1000 if rng.random() < 0.01 else 0
        files.append(Entry(f"{d}/{name(rng.choice(_EXT))}", "file", size=size, mode=mode,
                           uid=owner, gid=owner, pool=0 if rng.random() < 0.6 else 1,
                           offset=rng.randrange(POOL)))
    entries += files
    entries.sort(key=lambda e: e.path)
    links = []
    for _ in range(spec.hardlinks):
        target = rng.choice(files)
        links.append(Entry(f"{rng.choice(dirs)[0]}/{name('.hl')}", "hardlink", link=target.path,
                           size=target.size, mode=target.mode, uid=target.uid, gid=target.gid))
    for _ in range(spec.symlinks):
        target = rng.choice(files)
        src_dir = rng.choice(dirs)[0]
        rel = os.path.relpath(target.path, src_dir)
        links.append(Entry(f"{src_dir}/{name('.ln')}", "symlink", link=rel, mode=0o777))
    return entries + links


def _content(e: Entry, pools: tuple[bytes, bytes]) -> bytes:
    pool = pools[e.pool]
    if e.offset + e.size <= POOL:
        return pool[e.offset:e.offset + e.size]
    parts, need, off = [], e.size, e.offset
    while need:
        chunk = pool[off:off + need]
        parts.append(chunk)
        need -= len(chunk)
        off = 0
    return b"".join(parts)


@dataclass(frozen=True)
class BigFile:
    """A large file appended to a layer after the tree (content streamed, never held in memory)."""
    path: str
    size: int
    mode: int = 0o644


class _PoolStream(io.RawIOBase):
    """``size`` bytes of the incompressible pool, repeated from ``offset``."""

    def __init__(self, pool: bytes, size: int, offset: int):
        self.pool, self.left, self.off = memoryview(pool), size, offset % len(pool)

    def readable(self):
        return True

    def readinto(self, b):
        n = min(len(b), self.left, len(self.pool) - self.off)
        b[:n] = self.pool[self.off:self.off + n]
        self.left -= n
        self.off = (self.off + n) % len(self.pool)
        return n


def write_tar(spec: TreeSpec, fileobj, extra: tuple[BigFile, ...] = ()) -> dict:
    """Write the layer tar for ``spec`` (plus ``extra`` big files) to ``fileobj``; return its manifest."""
    pools = _pools(spec.seed)
    counts = {"dir": 0, "file": 0, "symlink": 0, "hardlink": 0}
    nbytes = 0
    with tarfile.open(fileobj=fileobj, mode="w|", format=tarfile.PAX_FORMAT) as tf:
        for e in plan(spec):
            ti = tarfile.TarInfo(e.path)
            ti.mtime, ti.mode, ti.uid, ti.gid = MTIME, e.mode, e.uid, e.gid
            ti.uname = ti.gname = ""
            counts[e.kind] += 1
            if e.kind == "dir":
                ti.type = tarfile.DIRTYPE
                tf.addfile(ti)
            elif e.kind == "file":
                ti.size = e.size
                nbytes += e.size
                tf.addfile(ti, io.BytesIO(_content(e, pools)))
            elif e.kind == "symlink":
                ti.type, ti.linkname = tarfile.SYMTYPE, e.link
                tf.addfile(ti)
            else:
                ti.type, ti.linkname = tarfile.LNKTYPE, e.link
                tf.addfile(ti)
        made = set()
        for i, big in enumerate(extra):
            parts = big.path.split("/")[:-1]
            for k in range(1, len(parts) + 1):
                d = "/".join(parts[:k])
                if d not in made:
                    made.add(d)
                    ti = tarfile.TarInfo(d)
                    ti.mtime, ti.mode, ti.type, ti.uname, ti.gname = MTIME, 0o755, tarfile.DIRTYPE, "", ""
                    tf.addfile(ti)
                    counts["dir"] += 1
            ti = tarfile.TarInfo(big.path)
            ti.mtime, ti.mode, ti.size, ti.uname, ti.gname = MTIME, big.mode, big.size, "", ""
            tf.addfile(ti, io.BufferedReader(_PoolStream(pools[1], big.size, i * 65_537), 1 << 20))
            counts["file"] += 1
            nbytes += big.size
    out = {"spec": asdict(spec), "generator_version": GENERATOR_VERSION,
           "entries": counts, "file_bytes": nbytes}
    if extra:
        out["extra"] = [asdict(b) for b in extra]
    return out


class _HashingWriter(io.RawIOBase):
    def __init__(self, f):
        self.f, self.h, self.n = f, hashlib.sha256(), 0

    def writable(self):
        return True

    def write(self, b):
        self.h.update(b)
        self.f.write(b)
        self.n += len(b)
        return len(b)


def cached_tar(spec: TreeSpec, cache_dir: Path, extra: tuple[BigFile, ...] = ()) -> tuple[Path, dict]:
    """The uncompressed tar for ``spec`` (plus ``extra``) under ``cache_dir`` (built once) and its manifest.

    The manifest includes ``diff_id`` (sha256 of the tar) and ``tar_bytes``.
    """
    cache_dir.mkdir(parents=True, exist_ok=True)
    key = spec.key()
    if extra:
        raw = json.dumps([asdict(b) for b in extra], sort_keys=True).encode()
        key += f"-x{hashlib.sha256(raw).hexdigest()[:8]}"
    path = cache_dir / f"{key}.tar"
    meta = path.with_suffix(".json")
    if path.exists() and meta.exists():
        return path, json.loads(meta.read_text())
    tmp = path.with_suffix(f".tmp{os.getpid()}")
    try:
        with open(tmp, "wb") as f:
            w = _HashingWriter(f)
            manifest = write_tar(spec, w, extra)
        manifest.update(diff_id="sha256:" + w.h.hexdigest(), tar_bytes=w.n)
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
    meta.write_text(json.dumps(manifest, indent=1))
    return path, manifest


def compressed(tar: Path, kind: str) -> Path:
    """``tar`` compressed as ``gz`` (level 6, no name/mtime) or ``zst`` (level 3), cached beside it."""
    out = tar.with_name(tar.name + "." + kind)
    if out.exists():
        return out
    tmp = out.with_name(out.name + f".tmp{os.getpid()}")
    try:
        with open(tar, "rb") as src, open(tmp, "wb") as dst:
            if kind == "gz":
                with gzip.GzipFile(filename="", mode="wb", fileobj=dst, compresslevel=6, mtime=0) as z:
                    while chunk := src.read(1 << 20):
                        z.write(chunk)
            elif kind == "zst":
                import zstandard
                zstandard.ZstdCompressor(level=3).copy_stream(src, dst)
            else:
                raise ValueError(kind)
        os.replace(tmp, out)
    finally:
        tmp.unlink(missing_ok=True)
    return out


def tar_bytes(spec: TreeSpec) -> bytes:
    """A small layer tar in memory (for many tiny layers)."""
    buf = io.BytesIO()
    write_tar(spec, buf)
    return buf.getvalue()


def read_through(path: Path) -> int:
    """Read a file fully (puts it in page cache); returns its size."""
    n = 0
    with open(path, "rb", buffering=0) as f:
        while chunk := f.read(8 << 20):
            n += len(chunk)
    return n


def lognormal_note(spec: TreeSpec) -> str:
    mean = spec.total_bytes / max(1, spec.files)
    return (f"{spec.files:,} files, {spec.total_bytes / 1e6:.0f} MB, mean {mean / 1024:.1f} KiB, "
            f"log-normal sizes (sigma {spec.size_sigma}), depth <= {spec.max_depth}, "
            f"{spec.symlinks} symlinks, {spec.hardlinks} hardlinks")


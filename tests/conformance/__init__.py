"""Conformance suite for layerfs drivers, plus the helpers its tests share.

Every test module here uses the ``store`` fixture from ``tests/conftest.py``
(one fresh store per test, parametrized over every driver).  The helpers below
are the Python counterparts of moby's graphtest utilities and containerd's
``fstest`` appliers: small filesystem operations applied both to a mounted
container and to a plain "flat" reference directory, and a tree snapshot used
to compare the two.
"""

from __future__ import annotations

import contextlib
import errno
import hashlib
import io
import os
import shutil
import stat
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterable

# xattrs that belong to the backing filesystem or to overlayfs itself, never to
# the content of a layer.
_IGNORED_XATTR_PREFIXES = ("trusted.overlay.", "user.overlay.", "security.selinux")


# ---------------------------------------------------------------------------
# store helpers


def register_bytes(store, data: bytes, parent=None, **kw):
    """Register an in-memory layer tar (any compression)."""
    return store.register(io.BytesIO(data), parent=parent, **kw)


def register_chain(store, tars: Iterable[bytes], parent=None):
    """Register layer tars bottom-up; returns the Layer objects."""
    layers = []
    for data in tars:
        layer = register_bytes(store, data, parent=parent)
        layers.append(layer)
        parent = layer.chain_id
    return layers


@contextlib.contextmanager
def mounted(store, ref):
    """Mount a container name or chain id for the duration of a with-block."""
    path = Path(store.mount(ref))
    try:
        yield path
    finally:
        store.unmount(ref)


def chain_ids_of(layers) -> set[str]:
    return {layer.chain_id for layer in layers}


def container_names(store) -> set[str]:
    return {c.name for c in store.containers()}


def changes_of(store, name) -> list[tuple[str, str]]:
    """store.changes(name) as (path, kind) pairs, in the order returned."""
    return [(c.path, c.kind) for c in store.changes(name)]


def data_extents(fd: int):
    """(start, end) of each data extent of the open file *fd* (SEEK_DATA / SEEK_HOLE); holes are skipped."""
    size = os.fstat(fd).st_size
    off = 0
    while off < size:
        try:
            off = os.lseek(fd, off, os.SEEK_DATA)
        except OSError as e:
            if e.errno == errno.ENXIO:
                return  # only a hole is left
            raise
        end = os.lseek(fd, off, os.SEEK_HOLE)
        yield off, end
        off = end


def _count_in_file(path, marker: bytes) -> int:
    """How often *marker* occurs in a file, reading only its data extents (holes read as zeros)."""
    n = 0
    with open(path, "rb") as f:
        for off, end in data_extents(f.fileno()):
            tail = b""
            while off < end:
                buf = os.pread(f.fileno(), min(4 << 20, end - off), off)
                if not buf:
                    break
                n += (tail + buf).count(marker)
                tail = buf[-(len(marker) - 1):] if len(marker) > 1 else b""
                off += len(buf)
    return n


def marker_counts(root, marker: bytes) -> dict[str, int]:
    """{path: occurrences of *marker*} for the regular files under *root* (not crossing mounts) that hold it.

    Files over 256 MiB of allocated space are not searched.  Sparse files are
    read only where they hold data (SEEK_DATA): that covers the loop files a
    devicemapper store keeps its thin pool in, where all the layers' contents live.
    """
    found = {}
    root_dev = os.lstat(root).st_dev
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames[:] = [d for d in dirnames
                       if os.lstat(os.path.join(dirpath, d)).st_dev == root_dev]
        for fn in filenames:
            p = os.path.join(dirpath, fn)
            try:
                st = os.lstat(p)
                if not stat.S_ISREG(st.st_mode) or st.st_blocks * 512 > (256 << 20):
                    continue
                n = _count_in_file(p, marker)
            except OSError:
                continue
            if n:
                found[p] = n
    return found


def files_containing(root, marker: bytes) -> list[str]:
    """Regular files under *root* (not crossing mounts) whose content contains *marker*."""
    return sorted(marker_counts(root, marker))


def copies_of(root, marker: bytes) -> int:
    """How many copies of *marker* the files under *root* hold (a devicemapper pool is one file)."""
    return sum(marker_counts(root, marker).values())


def listing(root, ignore_suffixes=("-wal", "-shm", "-journal")) -> set[str]:
    """Recursive listing of *root* (relative paths), SQLite side files left out."""
    out = set()
    for dirpath, dirnames, filenames in os.walk(root):
        for n in dirnames + filenames:
            if n.endswith(ignore_suffixes):
                continue
            out.add(os.path.relpath(os.path.join(dirpath, n), root))
    return out


# ---------------------------------------------------------------------------
# tree snapshots


@dataclass(frozen=True)
class Node:
    kind: str            # "file", "dir", "symlink", "char", "block", "fifo", "socket"
    mode: int            # permission bits incl. setuid/setgid/sticky
    uid: int
    gid: int
    size: int | None     # regular files only
    digest: str | None   # regular files only
    target: str | None   # symlinks only
    rdev: tuple[int, int] | None  # devices only
    xattrs: tuple = ()
    mtime: int | None = None

    def __str__(self):
        parts = [self.kind, oct(self.mode), f"{self.uid}:{self.gid}"]
        if self.size is not None:
            parts.append(f"size={self.size}")
        if self.target is not None:
            parts.append(f"-> {self.target}")
        if self.rdev is not None:
            parts.append(f"rdev={self.rdev[0]}:{self.rdev[1]}")
        if self.xattrs:
            parts.append(f"xattrs={dict(self.xattrs)}")
        if self.mtime is not None:
            parts.append(f"mtime={self.mtime}")
        return " ".join(parts)


def _kind(mode: int) -> str:
    for test, name in ((stat.S_ISREG, "file"), (stat.S_ISDIR, "dir"), (stat.S_ISLNK, "symlink"),
                       (stat.S_ISCHR, "char"), (stat.S_ISBLK, "block"), (stat.S_ISFIFO, "fifo"),
                       (stat.S_ISSOCK, "socket")):
        if test(mode):
            return name
    return "unknown"


def _xattrs(path) -> tuple:
    try:
        names = os.listxattr(path, follow_symlinks=False)
    except OSError as e:
        if e.errno in (errno.ENOTSUP, errno.EPERM):
            return ()
        raise
    out = []
    for n in sorted(names):
        if n.startswith(_IGNORED_XATTR_PREFIXES):
            continue
        out.append((n, os.getxattr(path, n, follow_symlinks=False)))
    return tuple(out)


def _digest(path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def node(path, *, mtimes=False) -> Node:
    st = os.lstat(path)
    kind = _kind(st.st_mode)
    return Node(
        kind=kind,
        mode=stat.S_IMODE(st.st_mode),
        uid=st.st_uid,
        gid=st.st_gid,
        size=st.st_size if kind == "file" else None,
        digest=_digest(path) if kind == "file" else None,
        target=os.readlink(path) if kind == "symlink" else None,
        rdev=(os.major(st.st_rdev), os.minor(st.st_rdev)) if kind in ("char", "block") else None,
        xattrs=_xattrs(path),
        mtime=int(st.st_mtime) if (mtimes and kind == "file") else None,
    )


def snapshot(root, *, mtimes=False, include_root=False,
             ignore=("lost+found",)) -> dict[str, Node]:
    """Map "/rel/path" -> Node for everything below *root* (not following symlinks)."""
    root = os.fspath(root)
    out = {}
    if include_root:
        out["/"] = node(root, mtimes=mtimes)
    for dirpath, dirnames, filenames in os.walk(root):
        rel_dir = os.path.relpath(dirpath, root)
        if rel_dir == ".":
            dirnames[:] = [d for d in dirnames if d not in ignore]
            filenames = [f for f in filenames if f not in ignore]
        for n in dirnames + filenames:
            p = os.path.join(dirpath, n)
            rel = "/" + os.path.normpath(os.path.join(rel_dir, n))
            out[rel] = node(p, mtimes=mtimes)
        # os.walk lists symlinks to dirs among dirnames but does not descend them
    return out


def diff_trees(expected: dict, actual: dict) -> list[str]:
    problems = []
    for p in sorted(set(expected) | set(actual)):
        e, a = expected.get(p), actual.get(p)
        if e is None:
            problems.append(f"unexpected {p}: {a}")
        elif a is None:
            problems.append(f"missing {p}: {e}")
        elif e != a:
            problems.append(f"differs {p}: expected [{e}] got [{a}]")
    return problems


def assert_same_tree(expected_root, actual_root, what="", *, mtimes=False):
    """Assert the trees below two directories are the same (content + metadata)."""
    exp = snapshot(expected_root, mtimes=mtimes)
    act = snapshot(actual_root, mtimes=mtimes)
    problems = diff_trees(exp, act)
    assert not problems, (f"{what}: trees differ ({len(problems)} differences):\n  "
                          + "\n  ".join(problems[:40]))


# ---------------------------------------------------------------------------
# filesystem operations ("appliers"), applied the same way to a mount and to a
# flat reference directory


@dataclass(frozen=True)
class Op:
    desc: str
    fn: Callable[[Path], None]

    def __call__(self, root: Path) -> None:
        self.fn(Path(root))

    def __repr__(self):
        return self.desc


def _p(root: Path, path: str) -> Path:
    return root / path.lstrip("/")


def create_file(path, content: bytes, mode=0o644) -> Op:
    def fn(root):
        p = _p(root, path)
        with open(p, "wb") as f:
            f.write(content)
        os.chmod(p, mode)
    return Op(f"create_file({path!r}, {mode:o})", fn)


def append_file(path, content: bytes) -> Op:
    def fn(root):
        with open(_p(root, path), "ab") as f:
            f.write(content)
    return Op(f"append_file({path!r})", fn)


def create_dir(path, mode=0o755) -> Op:
    def fn(root):
        p = _p(root, path)
        os.makedirs(p, exist_ok=True)
        os.chmod(p, mode)
    return Op(f"create_dir({path!r}, {mode:o})", fn)


def remove_all(path) -> Op:
    def fn(root):
        p = _p(root, path)
        if p.is_symlink() or (p.exists() and not p.is_dir()):
            p.unlink()
        elif p.exists():
            shutil.rmtree(p)
    return Op(f"remove_all({path!r})", fn)


def chown(path, uid, gid) -> Op:
    return Op(f"chown({path!r}, {uid}, {gid})",
              lambda root: os.lchown(_p(root, path), uid, gid))


def chmod(path, mode) -> Op:
    return Op(f"chmod({path!r}, {mode:o})", lambda root: os.chmod(_p(root, path), mode))


def link(old, new) -> Op:
    return Op(f"link({old!r}, {new!r})", lambda root: os.link(_p(root, old), _p(root, new)))


def symlink(target, new) -> Op:
    return Op(f"symlink({target!r}, {new!r})", lambda root: os.symlink(target, _p(root, new)))


def rename(old, new) -> Op:
    return Op(f"rename({old!r}, {new!r})", lambda root: os.rename(_p(root, old), _p(root, new)))


def mknod(path, mode, major=0, minor=0) -> Op:
    def fn(root):
        p = _p(root, path)
        os.mknod(p, mode, os.makedev(major, minor))
        os.chmod(p, stat.S_IMODE(mode))
    return Op(f"mknod({path!r}, {mode:o}, {major}:{minor})", fn)


def set_xattr(path, name, value: bytes) -> Op:
    return Op(f"setxattr({path!r}, {name!r})",
              lambda root: os.setxattr(_p(root, path), name, value, follow_symlinks=False))


def apply_ops(root, ops: Iterable[Op]) -> None:
    for op in ops:
        op(Path(root))


def check_snapshots(store, work: Path, *appliers, prefix="snap"):
    """containerd's checkSnapshots: each applier becomes one committed layer.

    For every list of operations: create a container on the previous layer,
    check it shows what the flat reference shows, apply the operations to
    both, compare again, commit, and compare a read-only view of the new
    layer with the flat reference.  Returns (layers, flat_dir).
    """
    flat = Path(work) / f"{prefix}-flat"
    flat.mkdir()
    parent = None
    layers = []
    for i, ops in enumerate(appliers):
        name = f"{prefix}-{i}"
        ctr = store.create_container(name, parent)
        assert ctr.name == name and ctr.parent == parent
        with mounted(store, name) as mp:
            assert_same_tree(flat, mp, f"layer {i}: container before applying {ops}")
            apply_ops(flat, ops)
            apply_ops(mp, ops)
            assert_same_tree(flat, mp, f"layer {i}: container after applying {ops}")
        layer = store.commit(name)
        assert layer.parent == parent, f"layer {i}: committed layer has the wrong parent"
        with mounted(store, layer.chain_id) as view:
            assert_same_tree(flat, view, f"layer {i}: read-only view of the committed layer")
        layers.append(layer)
        parent = layer.chain_id
    return layers, flat

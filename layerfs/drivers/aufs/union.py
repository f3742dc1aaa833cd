"""The union of branch directories in aufs/OCI format: lookups, listings, whiteouts, copy-up.

Branches are plain directories, top first.  In a writable union branch 0 is
the container's own directory (the *upper*); every other branch is read-only.

Rules (the OCI image-spec's, which aufs follows):

- A name is looked up from the top branch down; the first branch holding it wins.
- ``.wh.<name>`` in a branch hides ``<name>`` in every branch *below* it (an
  entry of the same branch as the whiteout still shows, and if it is a
  directory it hides the lower directories of that name, as if opaque).
- ``.wh..wh..opq`` in a directory hides everything lower branches hold in it.
- A directory merges with the same-named directories below it until an opaque
  marker, a whiteout, or a non-directory stops the stack.
- ``.wh.*`` names (whiteouts, the opaque marker, aufs's ``.wh..wh.*``
  bookkeeping, our copy-up temporaries) are never listed and never looked up.

Relative paths are ``""`` for the root and ``"/a/b"`` below it (as in
:mod:`layerfs.changes`).  Nothing here knows about FUSE: the same class answers
the native diff's "what does the parent view hold" and serves the daemon.
"""

from __future__ import annotations

import errno
import os
import secrets
import shutil
import stat
from typing import Iterator

from ... import whiteout

WH = whiteout.WHITEOUT_PREFIX
OPQ = whiteout.OPAQUE_MARKER
#: prefix of copy-up temporaries in the upper branch: aufs bookkeeping names, never shown
COPYUP_PREFIX = whiteout.AUFS_META_PREFIX + "copyup."
_CHUNK = 1 << 20


def _lstat(path: str) -> os.stat_result | None:
    try:
        return os.lstat(path)
    except (FileNotFoundError, NotADirectoryError):
        return None
    except OSError as exc:
        if exc.errno == errno.ENAMETOOLONG:
            return None  # e.g. the whiteout of a 252-255 byte name: it cannot exist
        raise


def _lexists(path: str) -> bool:
    return _lstat(path) is not None


class Union:
    """Read-only union lookups over aufs-format branch directories (top first)."""

    def __init__(self, branches: list[str]):
        self.branches = [os.fspath(b).rstrip("/") or "/" for b in branches]
        # rel dir -> indexes of branches in which it is a visible (merged) directory
        self._stacks: dict[str, list[int]] = {}

    # -- stacks ------------------------------------------------------------
    def dir_stack(self, rel: str) -> list[int]:
        """Branches whose directory *rel* is part of the union's directory (top first); [] if none."""
        cached = self._stacks.get(rel)
        if cached is not None:
            return cached
        stack: list[int] = []
        if rel == "":
            for i, b in enumerate(self.branches):
                stack.append(i)
                if _lexists(b + "/" + OPQ):
                    break
        else:
            parent, _, name = rel.rpartition("/")
            if not whiteout.is_reserved_name(name):
                for i in self.dir_stack(parent):
                    base = self.branches[i] + parent + "/"
                    st = _lstat(base + name)
                    if st is None:
                        if _lexists(base + WH + name):
                            break
                        continue
                    if not stat.S_ISDIR(st.st_mode):
                        break  # a non-directory hides everything below it
                    stack.append(i)
                    if _lexists(base + name + "/" + OPQ) or _lexists(base + WH + name):
                        break
        self._stacks[rel] = stack
        return stack

    def forget(self, rel: str) -> None:
        """Drop cached stacks of *rel* and everything below it (after the upper branch changed)."""
        if rel == "":
            self._stacks.clear()
            return
        prefix = rel + "/"
        for key in [k for k in self._stacks if k == rel or k.startswith(prefix)]:
            del self._stacks[key]

    def set_stack(self, rel: str, stack: list[int]) -> None:
        self._stacks[rel] = stack

    # -- lookups -----------------------------------------------------------
    def lookup(self, parent: str, name: str, *, below: int = -1) -> tuple[int, os.stat_result] | None:
        """(branch index, lstat) of the visible entry *name* in directory *parent*, or None.

        With *below* = k only branches with an index greater than k are looked
        at (ignoring whiteouts in branches <= k): "what would show without
        the top k+1 branches".
        """
        if whiteout.is_reserved_name(name) or name in ("", ".", ".."):
            return None
        for i in self.dir_stack(parent):
            if i <= below:
                continue
            base = self.branches[i] + parent + "/"
            st = _lstat(base + name)
            if st is not None:
                return i, st
            if _lexists(base + WH + name):
                return None
        return None

    def probe_new(self, parent: str, name: str) -> tuple[bool, bool]:
        """(visible, whited out in the top branch) of parent/name: what creating it must know."""
        if whiteout.is_reserved_name(name) or name in ("", ".", ".."):
            return False, False
        for i in self.dir_stack(parent):
            base = self.branches[i] + parent + "/"
            if _lexists(base + name):
                return True, False
            if _lexists(base + WH + name):
                return False, i == 0
        return False, False

    def lstat(self, rel: str) -> os.stat_result | None:
        """The visible entry at *rel* ("/a/b"), or None."""
        if rel == "":
            stack = self.dir_stack("")
            return os.lstat(self.branches[stack[0]] or "/")
        parent, _, name = rel.rpartition("/")
        found = self.lookup(parent, name)
        return None if found is None else found[1]

    def real_path(self, rel: str) -> str | None:
        if rel == "":
            return self.branches[self.dir_stack("")[0]]
        parent, _, name = rel.rpartition("/")
        found = self.lookup(parent, name)
        return None if found is None else self.branches[found[0]] + rel

    def entries(self, rel: str) -> dict[str, int]:
        """Visible names of directory *rel* -> the branch index holding each."""
        out: dict[str, int] = {}
        hidden: set[str] = set()
        for i in self.dir_stack(rel):
            try:
                names = os.listdir(self.branches[i] + rel or "/")
            except (FileNotFoundError, NotADirectoryError):
                continue
            hides = []
            for name in names:
                if name.startswith(WH):
                    if not name.startswith(whiteout.AUFS_META_PREFIX) and len(name) > len(WH):
                        hides.append(name[len(WH):])
                    continue
                if name not in out and name not in hidden:
                    out[name] = i
            hidden.update(hides)  # a whiteout hides lower branches only
        return out

    def listdir(self, rel: str) -> set[str]:
        return set(self.entries(rel))

    def is_merged(self, rel: str) -> bool:
        return len(self.dir_stack(rel)) > 1


# -- metadata copying ----------------------------------------------------------


def copy_xattrs(src: str, dst: str) -> None:
    """Copy every xattr but the storage formats' own (trusted.overlay.*)."""
    try:
        names = os.listxattr(src, follow_symlinks=False)
    except OSError as exc:
        if exc.errno in (errno.ENOTSUP, errno.EPERM):
            return
        raise
    for name in names:
        if whiteout.is_private_xattr(name):
            continue
        try:
            value = os.getxattr(src, name, follow_symlinks=False)
            os.setxattr(dst, name, value, follow_symlinks=False)
        except OSError as exc:
            # user.* xattrs cannot live on symlinks and special files on every fs
            if exc.errno not in (errno.ENOTSUP, errno.EPERM, errno.ENODATA):
                raise


def copy_data(src_fd: int, dst_fd: int, size: int) -> None:
    """Copy a file's data region by region: holes stay holes."""
    off = 0
    while off < size:
        try:
            data_start = os.lseek(src_fd, off, os.SEEK_DATA)
        except OSError as exc:
            if exc.errno == errno.ENXIO:
                break  # only a hole remains
            raise
        hole = os.lseek(src_fd, data_start, os.SEEK_HOLE)
        pos = data_start
        while pos < hole:
            n = min(_CHUNK, hole - pos)
            try:
                done = os.copy_file_range(src_fd, dst_fd, n, pos, pos)
            except OSError as exc:
                if exc.errno not in (errno.EXDEV, errno.EINVAL, errno.ENOSYS, errno.EOPNOTSUPP):
                    raise
                buf = os.pread(src_fd, n, pos)
                done = os.pwrite(dst_fd, buf, pos)
            if done <= 0:
                break
            pos += done
        off = hole
    os.ftruncate(dst_fd, size)


def copy_metadata(src: str, dst: str, st: os.stat_result) -> None:
    """Owner, mode, xattrs and times of *src* (lstat *st*) onto *dst*, in the order that keeps them all."""
    os.lchown(dst, st.st_uid, st.st_gid)
    if not stat.S_ISLNK(st.st_mode):
        os.chmod(dst, stat.S_IMODE(st.st_mode))  # after chown: chown clears setuid bits
    copy_xattrs(src, dst)  # after chown: chown drops security.capability
    os.utime(dst, ns=(st.st_atime_ns, st.st_mtime_ns), follow_symlinks=False)


class WritableUnion(Union):
    """A union whose branch 0 is written: copy-up, whiteouts, opaque directories.

    Every change keeps the union right at each step, so a crash (the daemon
    killed) between two steps never shows a wrong tree: copies are made under
    a ``.wh..wh.copyup.*`` name and renamed into place, a new entry is made
    before the whiteout it replaces is removed, an opaque marker is written
    before the whiteout of a recreated directory goes.
    """

    def __init__(self, branches: list[str]):
        super().__init__(branches)
        self._links: dict[int, dict[int, list[str]]] = {}

    @property
    def upper(self) -> str:
        return self.branches[0]

    def lower_lookup(self, parent: str, name: str) -> tuple[int, os.stat_result] | None:
        """What the read-only branches hold at parent/name (whatever the upper hides)."""
        return self.lookup(parent, name, below=0)

    def in_upper(self, rel: str) -> bool:
        return _lexists(self.upper + rel)

    # -- directories ---------------------------------------------------------
    def copy_up_dir(self, rel: str) -> None:
        """Make directory *rel* exist in the upper branch (its parents first), keeping its metadata."""
        stack = self.dir_stack(rel)
        if not stack:
            raise FileNotFoundError(errno.ENOENT, "no such directory in the union", rel)
        if stack[0] == 0:
            return
        parent = rel.rpartition("/")[0]
        self.copy_up_dir(parent)
        src = self.branches[stack[0]] + rel
        st = os.lstat(src)
        with self.keep_times(parent):
            tmp = self._tmp_name(parent)
            os.mkdir(tmp, 0o700)
            try:
                copy_metadata(src, tmp, st)
                os.rename(tmp, self.upper + rel)
            except BaseException:
                os.rmdir(tmp)
                raise
        self._stacks[rel] = [0] + stack

    def keep_times(self, rel: str):
        """Context manager: restore the upper directory *rel*'s times afterwards (copy-up changes none)."""
        union = self

        class _Keep:
            def __enter__(self):
                self.st = os.lstat(union.upper + rel or "/")

            def __exit__(self, *exc):
                os.utime(union.upper + rel or "/", ns=(self.st.st_atime_ns, self.st.st_mtime_ns))

        return _Keep()

    def _tmp_name(self, parent: str) -> str:
        return self.upper + parent + "/" + COPYUP_PREFIX + secrets.token_hex(6)

    # -- non-directories -------------------------------------------------------
    def copy_up_file(self, rel: str, branch: int) -> os.stat_result:
        """Copy the non-directory *rel* from *branch* into the upper branch; returns the new lstat."""
        parent = rel.rpartition("/")[0]
        self.copy_up_dir(parent)
        src = self.branches[branch] + rel
        st = os.lstat(src)
        tmp = self._tmp_name(parent)
        with self.keep_times(parent):
            try:
                self._copy_node(src, tmp, st)
                os.rename(tmp, self.upper + rel)
            except BaseException:
                try:
                    os.unlink(tmp)
                except FileNotFoundError:
                    pass
                raise
        return os.lstat(self.upper + rel)

    @staticmethod
    def _copy_node(src: str, dst: str, st: os.stat_result) -> None:
        mode = st.st_mode
        if stat.S_ISREG(mode):
            sfd = os.open(src, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC)
            try:
                dfd = os.open(dst, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o600)
                try:
                    copy_data(sfd, dfd, st.st_size)
                finally:
                    os.close(dfd)
            finally:
                os.close(sfd)
        elif stat.S_ISLNK(mode):
            os.symlink(os.readlink(src), dst)
        elif stat.S_ISCHR(mode) or stat.S_ISBLK(mode) or stat.S_ISFIFO(mode) or stat.S_ISSOCK(mode):
            os.mknod(dst, stat.S_IFMT(mode) | 0o600, st.st_rdev)
        else:
            raise OSError(errno.EINVAL, "cannot copy up this kind of file", src)
        copy_metadata(src, dst, st)

    def hardlink_names(self, branch: int, ino: int) -> list[str]:
        """Every path (rel) of read-only *branch* that is a hardlink of inode *ino*.

        One walk of the branch the first time a hardlinked file of it is
        copied up; read-only branches never change, so the index is kept.
        """
        index = self._links.get(branch)
        if index is None:
            index = {}
            for rel, st in _walk(self.branches[branch]):
                if not stat.S_ISDIR(st.st_mode) and st.st_nlink > 1:
                    index.setdefault(st.st_ino, []).append(rel)
            self._links[branch] = index
        return list(index.get(ino, ()))

    # -- whiteouts ---------------------------------------------------------------
    def whiteout(self, parent: str, name: str) -> None:
        """Hide the lower parent/name."""
        self.copy_up_dir(parent)
        path = self.upper + parent + "/" + WH + name
        try:
            fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_CLOEXEC, 0o600)
        except OSError as exc:
            if exc.errno == errno.ENAMETOOLONG:
                # ".wh." + a 252-255 byte name does not fit in a directory entry
                raise OSError(errno.ENAMETOOLONG, f"cannot hide a lower name this long ({len(name)} bytes)") from None
            raise
        os.close(fd)

    def drop_whiteout(self, parent: str, name: str) -> bool:
        try:
            os.unlink(self.upper + parent + "/" + WH + name)
            return True
        except (FileNotFoundError, NotADirectoryError):
            return False
        except OSError as exc:
            if exc.errno == errno.ENAMETOOLONG:
                return False
            raise

    def make_opaque(self, rel: str) -> None:
        fd = os.open(self.upper + rel + "/" + OPQ, os.O_WRONLY | os.O_CREAT | os.O_CLOEXEC, 0o600)
        os.close(fd)

    def clear_reserved(self, rel: str) -> None:
        """Remove whiteouts, the opaque marker and temporaries from the upper directory *rel*."""
        path = self.upper + rel
        for name in os.listdir(path):
            if name.startswith(WH):
                p = path + "/" + name
                if os.path.isdir(p) and not os.path.islink(p):
                    shutil.rmtree(p)
                else:
                    os.unlink(p)


def _walk(root: str, rel: str = "") -> Iterator[tuple[str, os.stat_result]]:
    try:
        it = os.scandir(root + rel or "/")
    except (FileNotFoundError, NotADirectoryError, PermissionError):
        return
    with it:
        entries = list(it)
    for entry in entries:
        child = rel + "/" + entry.name
        st = entry.stat(follow_symlinks=False)
        yield child, st
        if stat.S_ISDIR(st.st_mode):
            yield from _walk(root, child)

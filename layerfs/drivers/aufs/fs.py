"""The union served over FUSE: pyfuse3 operations on a :class:`~.union.Union`.

Inode numbers, attributes and copy-up live in :mod:`.nodes` (a mixin of
:class:`UnionOps`); this module holds the request handlers.

Every handler runs to completion without awaiting and requests are served one
at a time (_loop; or trio, one worker), so the table, the union's caches and
the upper branch are never seen half-changed by another request.

Caching.  Everything that changes the union goes through this daemon and so
through the kernel, which keeps its dentry/attribute caches right; entries
and attributes are given long timeouts (longest on read-only views), open
files keep their page cache unless the file is open for writing somewhere,
and the kernel keeps directory listings in its page cache (with _lowlevel
active it opens directories itself, see there; otherwise opendir returns the
inode number as handle).  The daemon keeps a listing only while it is being
read in pieces, until the union next changes.
"""

from __future__ import annotations

import bisect
import errno
import functools
import logging
import os
import stat
from typing import Callable

import pyfuse3
from pyfuse3 import ROOT_INODE, EntryAttributes, FileInfo, FUSEError

from .nodes import Handle, Node, NodeTable
from .union import OPQ, Union, WritableUnion

log = logging.getLogger("layerfs.aufs")

TTL_WRITABLE = 60.0
TTL_READONLY = 3600.0
_PASS_FLAGS = os.O_SYNC | os.O_DSYNC | os.O_TRUNC
_OFF_MASK = (1 << 62) - 1  # directory offsets: 3 + a 62-bit hash of the name


def _errors(fn: Callable) -> Callable:
    """OSError -> FUSEError with its errno; anything else is logged and becomes EIO."""

    @functools.wraps(fn)
    async def wrapper(*args, **kwargs):
        try:
            return await fn(*args, **kwargs)
        except FUSEError:
            raise
        except OSError as exc:
            raise FUSEError(exc.errno or errno.EIO) from None
        except Exception:
            log.exception("%s failed", fn.__name__)
            raise FUSEError(errno.EIO) from None

    return wrapper


class UnionOps(NodeTable, pyfuse3.Operations):
    supports_dot_lookup = True
    enable_writeback_cache = False

    def __init__(self, branches: list[str], writable: bool):
        super().__init__()
        self.writable = writable
        self.u: Union = WritableUnion(branches) if writable else Union(branches)
        self.ttl = TTL_WRITABLE if writable else TTL_READONLY
        root = Node(ROOT_INODE, True, self.u.dir_stack("")[0])
        root.lookups = 1 << 40
        self.nodes: dict[int, Node] = {ROOT_INODE: root}
        self.by_key: dict[tuple[int, int], int] = {}
        self.next_ino = ROOT_INODE + 1
        self.handles: dict[int, Handle] = {}
        # directory ino -> (gen, offsets, entries): listings being read (see _listing)
        self.listings: dict[int, tuple[int, list[int], list[tuple[str, int]]]] = {}
        self.gen = 0  # bumped by every request that may change the union
        self.decline_opendir = False  # set by the daemon when _lowlevel is active
        self.next_fh = 1
        self.euid, self.egid = os.geteuid(), os.getegid()

    # -- lookups and attributes ---------------------------------------------------------
    @_errors
    async def lookup(self, parent_inode, name, ctx=None):
        parent = self._node(parent_inode)
        if name in (b".", b".."):
            node = parent
            if name == b".." and parent.ino != ROOT_INODE:
                node = self._node(next(iter(parent.links))[0])
            st, merged = self._stat(node)
            node.lookups += 1
            return self._attr(node, st, merged)
        n = os.fsdecode(name)
        prel = self._path(parent)
        found = self.u.lookup(prel, n)
        if found is None:
            neg = EntryAttributes()
            neg.st_ino = 0
            neg.entry_timeout = self.ttl
            return neg
        branch, st = found
        node = self._node_for(parent, n, branch, st)
        node.lookups += 1
        merged = node.is_dir and self.u.is_merged(prel + "/" + n)
        return self._attr(node, st, merged)

    async def forget(self, inode_list):
        for ino, count in inode_list:
            node = self.nodes.get(ino)
            if node is None:
                continue
            node.lookups -= count
            if node.lookups <= 0:
                node.lookups = 0
                self._maybe_drop(node)

    @_errors
    async def getattr(self, inode, ctx=None):
        node = self._node(inode)
        st, merged = self._stat(node)
        return self._attr(node, st, merged)

    @_errors
    async def setattr(self, inode, attr, fields, fh, ctx):
        self._check_writable()
        node = self._node(inode)
        if node.links or node.is_dir or node.ino == ROOT_INODE:
            rel = self._copy_up(node)
            target: str | int = self.u.branches[0] + rel or "/"
        else:  # unlinked but still open: its upper file through the descriptor
            fd = self._open_fd(node)
            if fd is None:
                raise FUSEError(errno.ENOENT)
            target = fd
        is_fd = isinstance(target, int)
        if fields.update_size:
            if is_fd:
                os.ftruncate(target, attr.st_size)
            else:
                os.truncate(target, attr.st_size)
        if fields.update_uid or fields.update_gid:
            uid = attr.st_uid if fields.update_uid else -1
            gid = attr.st_gid if fields.update_gid else -1
            if is_fd:
                os.fchown(target, uid, gid)
            else:
                os.lchown(target, uid, gid)
        if fields.update_mode:
            cur = os.fstat(target) if is_fd else os.lstat(target)
            if not stat.S_ISLNK(cur.st_mode):
                os.chmod(target, stat.S_IMODE(attr.st_mode))
        if fields.update_atime or fields.update_mtime:
            cur = os.fstat(target) if is_fd else os.lstat(target)
            atime = attr.st_atime_ns if fields.update_atime else cur.st_atime_ns
            mtime = attr.st_mtime_ns if fields.update_mtime else cur.st_mtime_ns
            if is_fd:
                os.utime(target, ns=(atime, mtime))
            else:
                os.utime(target, ns=(atime, mtime), follow_symlinks=False)
        st, merged = self._stat(node)
        return self._attr(node, st, merged)

    @_errors
    async def readlink(self, inode, ctx):
        node = self._node(inode)
        return os.readlink(os.fsencode(self._real(node)))

    @_errors
    async def statfs(self, ctx):
        s = os.statvfs(self.u.branches[0])
        out = pyfuse3.StatvfsData()
        for attr in ("f_bsize", "f_frsize", "f_blocks", "f_bfree", "f_bavail", "f_files", "f_ffree", "f_favail"):
            setattr(out, attr, getattr(s, attr))
        out.f_namemax = s.f_namemax
        return out

    # -- creating ------------------------------------------------------------------------
    def _prepare_create(self, parent_inode, name) -> tuple[Node, str, str, str]:
        parent, n, prel, whited = self._prepare_new(parent_inode, name)
        return parent, n, prel, prel + "/" + n

    def _prepare_new(self, parent_inode, name) -> tuple[Node, str, str, bool]:
        """(parent node, name, parent rel, a whiteout of the name is in the upper branch) for a new entry."""
        self._check_writable()
        n = self._new_name(name)
        parent = self._node(parent_inode)
        prel = self._path(parent)
        visible, whited = self.u.probe_new(prel, n)
        if visible:
            raise FUSEError(errno.EEXIST)
        self.u.copy_up_dir(prel)  # type: ignore[attr-defined]
        return parent, n, prel, whited

    @_errors
    async def create(self, parent_inode, name, mode, flags, ctx):
        parent, n, prel, whited = self._prepare_new(parent_inode, name)
        fd = os.open(self.u.branches[0] + prel + "/" + n,
                     os.O_CREAT | os.O_EXCL | os.O_RDWR | os.O_CLOEXEC | (flags & (os.O_SYNC | os.O_DSYNC)),
                     stat.S_IMODE(mode))
        try:
            self._own(fd, prel, ctx, mode)
            if whited:
                self.u.drop_whiteout(prel, n)  # type: ignore[attr-defined]
            st = os.fstat(fd)
        except BaseException:
            os.close(fd)
            raise
        attr = self._new_entry(parent, n, st)
        node = self.nodes[attr.st_ino]
        fh = self._add_handle(fd, node, write=True)
        return FileInfo(fh=fh), attr

    @_errors
    async def mknod(self, parent_inode, name, mode, rdev, ctx):
        parent, n, prel, rel = self._prepare_create(parent_inode, name)
        path = self.u.branches[0] + rel
        os.mknod(path, mode, rdev)
        self._own(path, prel, ctx, mode)
        self.u.drop_whiteout(prel, n)  # type: ignore[attr-defined]
        return self._new_entry(parent, n, os.lstat(path))

    @_errors
    async def mkdir(self, parent_inode, name, mode, ctx):
        parent, n, prel, rel = self._prepare_create(parent_inode, name)
        u: WritableUnion = self.u  # type: ignore[assignment]
        path = u.upper + rel
        below = u.lower_lookup(prel, n)
        os.mkdir(path, stat.S_IMODE(mode))
        if below is not None:
            u.make_opaque(rel)  # rmdir + mkdir of a lower directory: its old content stays hidden
        self._own(path, prel, ctx, None)
        u.drop_whiteout(prel, n)
        u.forget(rel)
        u.set_stack(rel, [0])
        return self._new_entry(parent, n, os.lstat(path))

    @_errors
    async def symlink(self, parent_inode, name, target, ctx):
        parent, n, prel, rel = self._prepare_create(parent_inode, name)
        path = self.u.branches[0] + rel
        os.symlink(target, os.fsencode(path))
        self._own(path, prel, ctx, None)
        self.u.drop_whiteout(prel, n)  # type: ignore[attr-defined]
        return self._new_entry(parent, n, os.lstat(path))

    @_errors
    async def link(self, inode, new_parent_inode, new_name, ctx):
        node = self._node(inode)
        if node.is_dir:
            raise FUSEError(errno.EPERM)
        new_parent, n, nprel, nrel = self._prepare_create(new_parent_inode, new_name)
        u: WritableUnion = self.u  # type: ignore[assignment]
        rel = self._copy_up(node)
        os.link(u.upper + rel, u.upper + nrel, follow_symlinks=False)
        u.drop_whiteout(nprel, n)
        st = os.lstat(u.upper + nrel)
        node.links.add((new_parent.ino, n))
        new_parent.children[n] = node.ino
        node.branch = 0
        self._set_key(node, st)
        node.lookups += 1
        return self._attr(node, st)

    # -- removing and renaming --------------------------------------------------------------
    @_errors
    async def unlink(self, parent_inode, name, ctx):
        self._check_writable()
        u: WritableUnion = self.u  # type: ignore[assignment]
        parent = self._node(parent_inode)
        n = os.fsdecode(name)
        prel = self._path(parent)
        found = u.lookup(prel, n)
        if found is None:
            raise FUSEError(errno.ENOENT)
        branch, st = found
        if stat.S_ISDIR(st.st_mode):
            raise FUSEError(errno.EISDIR)
        rel = prel + "/" + n
        if u.lower_lookup(prel, n) is not None:
            u.whiteout(prel, n)  # first: a crash leaves the entry, never the lower one
        if branch == 0:
            os.unlink(u.upper + rel)
        node = self._unlink_node(parent, n)
        if node is not None and branch != 0:
            node.hidden += 1

    @_errors
    async def rmdir(self, parent_inode, name, ctx):
        self._check_writable()
        u: WritableUnion = self.u  # type: ignore[assignment]
        parent = self._node(parent_inode)
        n = os.fsdecode(name)
        prel = self._path(parent)
        found = u.lookup(prel, n)
        if found is None:
            raise FUSEError(errno.ENOENT)
        if not stat.S_ISDIR(found[1].st_mode):
            raise FUSEError(errno.ENOTDIR)
        rel = prel + "/" + n
        if u.entries(rel):
            raise FUSEError(errno.ENOTEMPTY)
        stack = u.dir_stack(rel)
        if u.lower_lookup(prel, n) is not None:
            u.whiteout(prel, n)
        if stack and stack[0] == 0:
            u.clear_reserved(rel)
            os.rmdir(u.upper + rel)
        u.forget(rel)
        self._unlink_node(parent, n)

    @_errors
    async def rename(self, parent_inode_old, name_old, parent_inode_new, name_new, flags, ctx):
        self._check_writable()
        u: WritableUnion = self.u  # type: ignore[assignment]
        if flags & pyfuse3.RENAME_EXCHANGE:
            raise FUSEError(errno.EINVAL)  # not supported by this union
        on = os.fsdecode(name_old)
        nn = self._new_name(name_new)
        oparent = self._node(parent_inode_old)
        nparent = self._node(parent_inode_new)
        oprel, nprel = self._path(oparent), self._path(nparent)
        orel, nrel = oprel + "/" + on, nprel + "/" + nn
        src = u.lookup(oprel, on)
        if src is None:
            raise FUSEError(errno.ENOENT)
        sbranch, sst = src
        is_dir = stat.S_ISDIR(sst.st_mode)
        dst = u.lookup(nprel, nn)
        if dst is not None:
            if flags & pyfuse3.RENAME_NOREPLACE:
                raise FUSEError(errno.EEXIST)
            dbranch, dst_st = dst
            if dbranch == sbranch and dst_st.st_ino == sst.st_ino and dst_st.st_dev == sst.st_dev:
                return  # two names of one file: nothing to do (POSIX)
            if is_dir and not stat.S_ISDIR(dst_st.st_mode):
                raise FUSEError(errno.ENOTDIR)
            if not is_dir and stat.S_ISDIR(dst_st.st_mode):
                raise FUSEError(errno.EISDIR)
            if stat.S_ISDIR(dst_st.st_mode) and u.entries(nrel):
                raise FUSEError(errno.ENOTEMPTY)
        if is_dir and any(i != 0 for i in u.dir_stack(orel)):
            # A directory with lower content: as overlayfs without redirect_dir,
            # the caller (mv) falls back to copying and deleting.
            raise FUSEError(errno.EXDEV)
        snode = self._node_for(oparent, on, sbranch, sst)
        if not is_dir:
            self._copy_up(snode)
        u.copy_up_dir(nprel)
        below_dst = u.lower_lookup(nprel, nn)
        if dst is not None and dst[0] == 0 and stat.S_ISDIR(dst[1].st_mode):
            u.clear_reserved(nrel)
        if is_dir and below_dst is not None and stat.S_ISDIR(below_dst[1].st_mode):
            if not os.path.lexists(u.upper + orel + "/" + OPQ):
                u.make_opaque(orel)  # the moved directory must not merge with the lower one
        if u.lower_lookup(oprel, on) is not None:
            u.whiteout(oprel, on)
        os.rename(u.upper + orel, u.upper + nrel)
        u.drop_whiteout(nprel, nn)
        if is_dir:
            u.forget(orel)
            u.forget(nrel)
            u.set_stack(nrel, [0])
        if dst is not None:
            dnode = self._unlink_node(nparent, nn)
            if dnode is not None and dst[0] != 0:
                dnode.hidden += 1
        snode.links.discard((oparent.ino, on))
        oparent.children.pop(on, None)
        snode.links.add((nparent.ino, nn))
        nparent.children[nn] = snode.ino
        snode.branch = 0

    # -- files ------------------------------------------------------------------------------
    def _add_handle(self, fd: int, node: Node, write: bool) -> int:
        fh = self.next_fh
        self.next_fh += 1
        self.handles[fh] = Handle(fd, node, node.branch, write)
        node.opens += 1
        if write:
            node.writers += 1
        return fh

    @_errors
    async def open(self, inode, flags, ctx):
        node = self._node(inode)
        write = (flags & os.O_ACCMODE) != os.O_RDONLY or bool(flags & os.O_TRUNC)
        if write:
            self._check_writable()
            self._copy_up(node)
        real = self._real(node)
        oflags = (os.O_RDWR if write else os.O_RDONLY) | os.O_CLOEXEC | os.O_NOFOLLOW
        oflags |= flags & _PASS_FLAGS
        fd = os.open(real, oflags)
        keep = not write and node.writers == 0
        fh = self._add_handle(fd, node, write)
        return FileInfo(fh=fh, keep_cache=keep)

    @_errors
    async def read(self, fh, off, size):
        h = self.handles[fh]
        if h.branch != h.node.branch and h.node.links:
            # copied up since it was opened: read the copy, which may have changed
            fd = os.open(self._real(h.node), os.O_RDONLY | os.O_CLOEXEC | os.O_NOFOLLOW)
            os.close(h.fd)
            h.fd, h.branch = fd, h.node.branch
        return os.pread(h.fd, size, off)

    def write_direct(self, fh: int, off: int, data) -> int | None:
        """WRITE straight from libfuse's buffer (_lowlevel); None: not a handle of ours."""
        h = self.handles.get(fh)
        if h is None:
            return None
        n = len(data)
        total = os.pwrite(h.fd, data, off)
        while total < n:
            total += os.pwrite(h.fd, data[total:], off + total)
        return total

    @_errors
    async def write(self, fh, off, buf):
        h = self.handles[fh]
        view = memoryview(buf)
        total = 0
        while total < len(view):
            total += os.pwrite(h.fd, view[total:], off + total)
        return total

    async def flush(self, fh):
        # Nothing to do at close (writes reach the branch before they are
        # acknowledged; locks are the kernel's): "not implemented" makes the
        # kernel stop sending FLUSH, one round trip less per close.
        raise FUSEError(errno.ENOSYS)

    @_errors
    async def fsync(self, fh, datasync):
        h = self.handles[fh]
        if datasync:
            os.fdatasync(h.fd)
        else:
            os.fsync(h.fd)

    @_errors
    async def release(self, fh):
        h = self.handles.pop(fh)
        os.close(h.fd)
        h.node.opens -= 1
        if h.write:
            h.node.writers -= 1
        self._maybe_drop(h.node)

    # -- directories ------------------------------------------------------------------------
    @_errors
    async def opendir(self, inode, ctx):
        node = self._node(inode)
        if not node.is_dir:
            raise FUSEError(errno.ENOTDIR)
        if self.decline_opendir:
            # "Not implemented": from now on the kernel opens directories
            # itself and caches their listings (see _lowlevel).
            raise FUSEError(errno.ENOSYS)
        return inode  # readdir and fsyncdir get the inode either way

    def _listing(self, node: Node) -> tuple[list[int], list[tuple[str, int]]]:
        """(offsets, sorted [(name, branch)]) of directory *node*, cached until the union next changes.

        An entry's offset is a hash of its name (as a directory's position in
        ext4's htree): a reader that continues from an offset after entries
        were added or removed neither repeats nor skips the entries that stayed.
        """
        cached = self.listings.get(node.ino)
        if cached is not None and cached[0] == self.gen:
            return cached[1], cached[2]
        entries = sorted(self.u.entries(self._path(node)).items(), key=lambda e: (hash(e[0]) & _OFF_MASK, e[0]))
        offsets = [(hash(name) & _OFF_MASK) + 3 for name, _ in entries]
        if len(self.listings) >= 16:
            del self.listings[next(iter(self.listings))]
        self.listings[node.ino] = (self.gen, offsets, entries)
        return offsets, entries

    @_errors
    async def readdir(self, fh, start_id, token):
        node = self._node(fh)  # fh is the directory's inode number (opendir, _lowlevel)
        pos = start_id
        if pos == 0:
            st, merged = self._stat(node)
            if not pyfuse3.readdir_reply(token, b".", self._attr(node, st, merged), 1):
                return
            pos = 1
        if pos == 1:
            pnode = node if node.ino == ROOT_INODE else self._node(next(iter(node.links))[0])
            st, merged = self._stat(pnode)
            if not pyfuse3.readdir_reply(token, b"..", self._attr(pnode, st, merged), 2):
                return
            pos = 2
        offsets, entries = self._listing(node)
        first = bisect.bisect_right(offsets, pos) if pos > 2 else 0
        if first >= len(entries):
            self.listings.pop(node.ino, None)  # the reader is done with it
            return
        rel = self._path(node)
        for i in range(first, len(entries)):
            name, branch = entries[i]
            child = rel + "/" + name
            try:
                st = os.lstat(self.u.branches[branch] + child)
            except FileNotFoundError:
                continue  # removed behind the union's back
            cnode = self._node_for(node, name, branch, st)
            merged = cnode.is_dir and self.u.is_merged(child)
            if not pyfuse3.readdir_reply(token, os.fsencode(name), self._attr(cnode, st, merged), offsets[i]):
                return
            cnode.lookups += 1

    async def releasedir(self, fh):
        return None

    @_errors
    async def fsyncdir(self, fh, datasync):
        if not self.writable:
            return
        rel = self._path(self._node(fh))
        path = self.u.branches[0] + rel or "/"
        if os.path.isdir(path):
            fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
            try:
                os.fsync(fd)
            finally:
                os.close(fd)

    # -- xattrs -----------------------------------------------------------------------------
    @_errors
    async def getxattr(self, inode, name, ctx):
        # Asked before every write (security.capability): try the branch the
        # node is known in before resolving it again.
        node = self._node(inode)
        try:
            if not node.is_dir and node.links:
                try:
                    return os.getxattr(self.u.branches[node.branch] + self._path(node), name, follow_symlinks=False)
                except FileNotFoundError:
                    pass
            return os.getxattr(self._real(node), name, follow_symlinks=False)
        except OSError as exc:
            if exc.errno == errno.ENODATA:
                raise FUSEError(pyfuse3.ENOATTR) from None
            raise

    @_errors
    async def listxattr(self, inode, ctx):
        try:
            names = os.listxattr(self._real(self._node(inode)), follow_symlinks=False)
        except OSError as exc:
            if exc.errno in (errno.ENOTSUP, errno.EPERM):
                return []
            raise
        return [os.fsencode(n) for n in names]

    @_errors
    async def setxattr(self, inode, name, value, ctx):
        self._check_writable()
        node = self._node(inode)
        rel = self._copy_up(node)
        os.setxattr(self.u.branches[0] + rel or "/", name, value, follow_symlinks=False)

    @_errors
    async def removexattr(self, inode, name, ctx):
        self._check_writable()
        node = self._node(inode)
        # not present: fail before copying anything up
        try:
            os.getxattr(self._real(node), name, follow_symlinks=False)
        except OSError as exc:
            if exc.errno == errno.ENODATA:
                raise FUSEError(pyfuse3.ENOATTR) from None
            raise
        rel = self._copy_up(node)
        os.removexattr(self.u.branches[0] + rel or "/", name, follow_symlinks=False)

"""The node table and the helpers every FUSE handler of :mod:`.fs` shares.

Inodes.  Each visible entry gets a FUSE inode number from a table kept for
the life of the mount: a node per (directory node, name) once looked up, so
a path keeps its number across copy-up, and names that are hardlinks of one
file in one branch (same branch, same backing inode) share a node.  Nodes
are forgotten only when they have no name left and the kernel no longer
knows them.  Paths are computed from a node's (parent, name) link, so
renaming a directory moves its whole subtree at once.

:class:`NodeTable` is a mixin of :class:`.fs.UnionOps`, which sets up the
state it works on (``u``, ``nodes``, ``by_key``, ``next_ino``, ``ttl``,
``writable``, ``euid``/``egid``) in its ``__init__``.
"""

from __future__ import annotations

import errno
import os
import stat

from pyfuse3 import ROOT_INODE, EntryAttributes, FUSEError

from ... import whiteout
from .union import Union, WritableUnion


class Node:
    __slots__ = ("ino", "is_dir", "links", "children", "lookups", "branch", "key", "hidden", "opens", "writers")

    def __init__(self, ino: int, is_dir: bool, branch: int):
        self.ino = ino
        self.is_dir = is_dir
        self.links: set[tuple[int, str]] = set()  # (parent ino, name); one for a directory
        self.children: dict[str, int] | None = {} if is_dir else None
        self.lookups = 0
        self.branch = branch  # the branch holding the entry (non-directories)
        self.key: tuple[int, int] | None = None  # (branch, backing ino) of a hardlinked file
        self.hidden = 0  # names of a lower hardlinked file this mount has deleted
        self.opens = 0
        self.writers = 0


class Handle:
    __slots__ = ("fd", "node", "branch", "write")

    def __init__(self, fd: int, node: Node, branch: int, write: bool):
        self.fd, self.node, self.branch, self.write = fd, node, branch, write


class NodeTable:
    """Inode numbers for the union's entries, their attributes, and copy-up (see the module docstring)."""

    u: Union
    nodes: dict[int, Node]
    by_key: dict[tuple[int, int], int]

    # -- the node table ----------------------------------------------------------
    def _node(self, ino: int) -> Node:
        node = self.nodes.get(ino)
        if node is None:
            raise FUSEError(errno.ESTALE)
        return node

    def _path(self, node: Node) -> str:
        parts = []
        while node.ino != ROOT_INODE:
            if not node.links:
                raise FUSEError(errno.ENOENT)
            pino, name = next(iter(node.links))
            parts.append(name)
            node = self.nodes[pino]
        if not parts:
            return ""
        parts.reverse()
        return "/" + "/".join(parts)

    def _node_for(self, parent: Node, name: str, branch: int, st: os.stat_result) -> Node:
        """The node of parent/name, made if new (hardlinks of one branch share one)."""
        is_dir = stat.S_ISDIR(st.st_mode)
        ino = parent.children.get(name)
        if ino is not None:
            node = self.nodes.get(ino)
            if node is not None and node.is_dir == is_dir:
                node.branch = branch
                return node
            parent.children.pop(name, None)
            if node is not None:
                node.links.discard((parent.ino, name))
        key = None
        if not is_dir and st.st_nlink > 1:
            key = (branch, st.st_ino)
            other = self.nodes.get(self.by_key.get(key, 0))
            if other is not None and other.key == key:
                other.links.add((parent.ino, name))
                parent.children[name] = other.ino
                other.branch = branch
                return other
        node = Node(self.next_ino, is_dir, branch)
        self.next_ino += 1
        self.nodes[node.ino] = node
        node.links.add((parent.ino, name))
        parent.children[name] = node.ino
        if key is not None:
            node.key = key
            self.by_key[key] = node.ino
        return node

    def _set_key(self, node: Node, st: os.stat_result) -> None:
        if node.key is not None and self.by_key.get(node.key) == node.ino:
            del self.by_key[node.key]
        node.key = None
        if not node.is_dir and st.st_nlink > 1:
            node.key = (node.branch, st.st_ino)
            self.by_key[node.key] = node.ino

    def _unlink_node(self, parent: Node, name: str) -> Node | None:
        ino = parent.children.pop(name, None)
        node = self.nodes.get(ino) if ino is not None else None
        if node is None:
            return None
        node.links.discard((parent.ino, name))
        self._maybe_drop(node)
        return node

    def _maybe_drop(self, node: Node) -> None:
        if node.ino == ROOT_INODE or node.links or node.lookups > 0 or node.opens > 0:
            return
        if node.hidden and node.key is not None:
            return  # the other names of a lower hardlinked file still count the deleted ones
        del self.nodes[node.ino]
        if node.key is not None and self.by_key.get(node.key) == node.ino:
            del self.by_key[node.key]

    # -- attributes ----------------------------------------------------------------
    def _attr(self, node: Node, st: os.stat_result, merged: bool = False) -> EntryAttributes:
        a = EntryAttributes()
        a.st_ino = node.ino
        a.generation = 0
        a.entry_timeout = self.ttl
        a.attr_timeout = self.ttl
        a.st_mode = st.st_mode
        if node.is_dir:
            # as overlayfs: a merged directory's link count is unknown (1)
            a.st_nlink = 1 if merged else st.st_nlink
        else:
            a.st_nlink = max(1, st.st_nlink - node.hidden)
        a.st_uid = st.st_uid
        a.st_gid = st.st_gid
        a.st_rdev = st.st_rdev
        a.st_size = st.st_size
        a.st_blksize = st.st_blksize
        a.st_blocks = st.st_blocks
        a.st_atime_ns = st.st_atime_ns
        a.st_mtime_ns = st.st_mtime_ns
        a.st_ctime_ns = st.st_ctime_ns
        return a

    def _open_fd(self, node: Node) -> int | None:
        for h in self.handles.values():
            if h.node is node:
                return h.fd
        return None

    def _stat(self, node: Node) -> tuple[os.stat_result, bool]:
        if node.is_dir:
            rel = self._path(node)
            stack = self.u.dir_stack(rel)
            if not stack:
                raise FUSEError(errno.ENOENT)
            return os.lstat(self.u.branches[stack[0]] + rel or "/"), len(stack) > 1
        if not node.links:
            fd = self._open_fd(node)
            if fd is None:
                raise FUSEError(errno.ENOENT)
            return os.fstat(fd), False
        rel = self._path(node)
        try:
            return os.lstat(self.u.branches[node.branch] + rel), False
        except FileNotFoundError:
            parent, _, name = rel.rpartition("/")
            found = self.u.lookup(parent, name)
            if found is None:
                raise FUSEError(errno.ENOENT) from None
            node.branch = found[0]
            return found[1], False

    def _real(self, node: Node) -> str:
        if node.is_dir:
            rel = self._path(node)
            stack = self.u.dir_stack(rel)
            if not stack:
                raise FUSEError(errno.ENOENT)
            return self.u.branches[stack[0]] + rel or "/"
        self._stat(node)  # re-resolves the branch if needed
        return self.u.branches[node.branch] + self._path(node)

    # -- writing helpers -----------------------------------------------------------
    def _check_writable(self) -> None:
        """Called first by every request that may change the union's names or branches."""
        if not self.writable:
            raise FUSEError(errno.EROFS)
        self.gen += 1  # cached listings are stale from here on

    @staticmethod
    def _new_name(name: bytes) -> str:
        n = os.fsdecode(name)
        if whiteout.is_reserved_name(n):
            raise FUSEError(errno.EPERM)  # .wh.* names are the union's own
        return n

    def _copy_up(self, node: Node) -> str:
        """Bring *node* into the upper branch (a directory, or a file with all its visible hardlinks)."""
        u: WritableUnion = self.u  # type: ignore[assignment]
        rel = self._path(node)
        if node.is_dir:
            u.copy_up_dir(rel)
            return rel
        self._stat(node)
        if node.branch == 0:
            return rel
        old = node.branch
        old_st = os.lstat(u.branches[old] + rel)
        new_st = u.copy_up_file(rel, old)
        if old_st.st_nlink > 1:
            for other in u.hardlink_names(old, old_st.st_ino):
                if other == rel:
                    continue
                oparent, _, oname = other.rpartition("/")
                found = u.lookup(oparent, oname)
                if found is None or found[0] != old or found[1].st_ino != old_st.st_ino:
                    continue  # that name is hidden or replaced in the union
                u.copy_up_dir(oparent)
                with u.keep_times(oparent):
                    os.link(u.upper + rel, u.upper + other)
            new_st = os.lstat(u.upper + rel)
        node.branch = 0
        node.hidden = 0
        self._set_key(node, new_st)
        return rel

    def _own(self, path: str | int, parent_rel: str, ctx, mode: int | None) -> None:
        """New entries belong to the caller (the group of a setgid directory).

        *path* is the new entry (or an open descriptor of it).  The daemon
        makes it with its own ids, which the kernel already gives the setgid
        directory's group: when the caller has the daemon's ids nothing is left to do.
        """
        if ctx.uid == self.euid and ctx.gid == self.egid:
            return
        pst = os.lstat(self.u.branches[0] + parent_rel or "/")
        gid = pst.st_gid if pst.st_mode & stat.S_ISGID else ctx.gid
        if isinstance(path, int):
            os.fchown(path, ctx.uid, gid)
        else:
            os.lchown(path, ctx.uid, gid)
        if mode is not None and mode & (stat.S_ISUID | stat.S_ISGID):
            os.chmod(path, stat.S_IMODE(mode))  # chown cleared them

    def _new_entry(self, parent: Node, name: str, st: os.stat_result) -> EntryAttributes:
        node = self._node_for(parent, name, 0, st)
        node.lookups += 1
        self._set_key(node, st)
        return self._attr(node, st)

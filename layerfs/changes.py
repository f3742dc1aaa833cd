"""What a container changed, as ``docker diff`` reports it.

Two ways to compute the same answer:

- :func:`tree_changes` compares two whole trees (the container's view and its
  parent's view).  It works for any driver that can mount (the naive diff).
- :func:`overlay_changes` reads only an overlay upper directory and looks up
  the few names it holds in the lower layer directories (the native diff).

Rules shared by both: a path only in the container is ``A`` (every entry
under an added directory too); a path only in the parent is ``D`` (only the
top of a deleted tree); a path in both whose type, mode, owner, device,
size, mtime or symlink target differs is ``C``; and every directory above a
change that exists in the parent is ``C``.
"""

from __future__ import annotations

import os
import stat
from dataclasses import dataclass
from typing import Callable, Iterator

from . import whiteout


@dataclass(frozen=True, order=True)
class Change:
    path: str  # absolute inside the container: "/etc/passwd"
    kind: str  # "A", "C" or "D"

    def __str__(self) -> str:
        return f"{self.kind} {self.path}"


def stat_differs(old: os.stat_result, new: os.stat_result) -> bool:
    if (
        old.st_mode != new.st_mode
        or old.st_uid != new.st_uid
        or old.st_gid != new.st_gid
        or old.st_rdev != new.st_rdev
        or old.st_mtime_ns != new.st_mtime_ns
    ):
        return True
    return not stat.S_ISDIR(new.st_mode) and old.st_size != new.st_size


def with_ancestors(raw: dict[str, str]) -> list[Change]:
    """Add a ``C`` for every ancestor directory of a change not already listed; sort by path."""
    out = dict(raw)
    for path in raw:
        parent = path.rpartition("/")[0]
        while parent and parent not in out:
            out[parent] = "C"
            parent = parent.rpartition("/")[0]
    return sorted(Change(p, k) for p, k in out.items())


def scan_dir(path: str) -> dict[str, os.DirEntry]:
    with os.scandir(path) as it:
        return {e.name: e for e in it}


def add_tree(raw: dict[str, str], root: str, rel: str) -> None:
    """Mark everything below root+rel as added ("A")."""
    for entry in scan_dir(root + rel).values():
        child = rel + "/" + entry.name
        raw[child] = "A"
        if entry.is_dir(follow_symlinks=False):
            add_tree(raw, root, child)


def entry_changed(new: os.DirEntry, old: os.DirEntry, new_st: os.stat_result, old_st: os.stat_result) -> bool:
    """The naive diff's test: metadata, size, mtime or symlink target differ."""
    return stat_differs(old_st, new_st) or (
        stat.S_ISLNK(new_st.st_mode) and os.readlink(new.path) != os.readlink(old.path)
    )


def tree_changes(
    new_root: str, old_root: str | None, changed: Callable[..., bool] = entry_changed
) -> list[Change]:
    """Compare the tree at *new_root* against *old_root* (None: an empty tree).

    *changed(new_entry, old_entry, new_stat, old_stat)* decides whether an
    entry present in both trees is reported "C" (a snapshot driver can do
    better than comparing metadata).
    """
    raw: dict[str, str] = {}
    if old_root is None:
        add_tree(raw, new_root, "")
        return with_ancestors(raw)

    def walk(rel: str) -> None:
        new = scan_dir(new_root + rel)
        old = scan_dir(old_root + rel)
        for name, entry in new.items():
            child = rel + "/" + name
            other = old.get(name)
            new_st = entry.stat(follow_symlinks=False)
            if other is None:
                raw[child] = "A"
                if stat.S_ISDIR(new_st.st_mode):
                    add_tree(raw, new_root, child)
                continue
            old_st = other.stat(follow_symlinks=False)
            if changed(entry, other, new_st, old_st):
                raw[child] = "C"
                if stat.S_ISDIR(old_st.st_mode) != stat.S_ISDIR(new_st.st_mode):
                    if stat.S_ISDIR(new_st.st_mode):
                        add_tree(raw, new_root, child)
                    continue
            if stat.S_ISDIR(new_st.st_mode) and stat.S_ISDIR(old_st.st_mode):
                walk(child)
        for name in old.keys() - new.keys():
            raw[rel + "/" + name] = "D"

    walk("")
    return with_ancestors(raw)


class OverlayLowers:
    """Read-only union lookups over overlay-format layer directories (top first).

    Answers "what does the parent view hold at this path" without mounting,
    honouring char 0:0 whiteouts and opaque directories.
    """

    def __init__(self, layer_dirs: list[str]):
        self.layer_dirs = layer_dirs
        # rel dir -> indexes of layers in which it is a visible directory
        self._stacks: dict[str, list[int]] = {"": list(range(len(layer_dirs)))}

    def _stack(self, rel: str) -> list[int]:
        cached = self._stacks.get(rel)
        if cached is not None:
            return cached
        parent, _, name = rel.rpartition("/")
        found = self._resolve(parent, name)
        stack = found[1] if found is not None and found[1] is not None else []
        self._stacks[rel] = stack
        return stack

    def _resolve(self, parent: str, name: str) -> tuple[os.stat_result, list[int] | None] | None:
        top: os.stat_result | None = None
        dir_layers: list[int] = []
        for i in self._stack(parent):
            path = self.layer_dirs[i] + parent + "/" + name
            try:
                st = os.lstat(path)
            except (FileNotFoundError, NotADirectoryError):
                continue
            if whiteout.is_overlay_whiteout(st.st_mode, st.st_rdev):
                break
            if top is None:
                top = st
            if not stat.S_ISDIR(st.st_mode):
                break  # a non-directory hides everything below it
            if not stat.S_ISDIR(top.st_mode):
                break
            dir_layers.append(i)
            if _is_opaque(path):
                break
        if top is None:
            return None
        return top, dir_layers if stat.S_ISDIR(top.st_mode) else None

    def lstat(self, rel: str) -> os.stat_result | None:
        """The visible entry at rel ("/a/b") or None."""
        parent, _, name = rel.rpartition("/")
        found = self._resolve(parent, name)
        return None if found is None else found[0]

    def listdir(self, rel: str) -> set[str]:
        names: set[str] = set()
        hidden: set[str] = set()
        for i in self._stack(rel):
            try:
                entries = scan_dir(self.layer_dirs[i] + rel)
            except (FileNotFoundError, NotADirectoryError):
                continue
            for name, entry in entries.items():
                if name in names or name in hidden:
                    continue
                st = entry.stat(follow_symlinks=False)
                if whiteout.is_overlay_whiteout(st.st_mode, st.st_rdev):
                    hidden.add(name)
                else:
                    names.add(name)
        return names


def _is_opaque(path: str) -> bool:
    try:
        return whiteout.is_overlay_opaque(os.getxattr(path, whiteout.OVERLAY_OPAQUE_XATTR, follow_symlinks=False))
    except OSError:
        return False


def walk_upper(upper: str) -> Iterator[tuple[str, os.DirEntry, os.stat_result]]:
    """Every entry of an upper dir, parents before children, siblings sorted by name."""

    def walk(rel: str) -> Iterator[tuple[str, os.DirEntry, os.stat_result]]:
        entries = scan_dir(upper + rel)
        for name in sorted(entries):
            entry = entries[name]
            st = entry.stat(follow_symlinks=False)
            child = rel + "/" + name
            yield child, entry, st
            if stat.S_ISDIR(st.st_mode):
                yield from walk(child)

    return walk("")


def overlay_changes(upper: str, lowers: OverlayLowers) -> list[Change]:
    """Native diff of an overlay container: read the upper dir, look names up below."""
    raw: dict[str, str] = {}
    added_dirs: list[str] = []  # directories new in the container: all below is "A"
    opaque_dirs: list[str] = []  # directories that replace their lower contents
    for rel, entry, st in walk_upper(upper):
        while added_dirs and not rel.startswith(added_dirs[-1] + "/"):
            added_dirs.pop()
        while opaque_dirs and not rel.startswith(opaque_dirs[-1] + "/"):
            opaque_dirs.pop()
        is_dir = stat.S_ISDIR(st.st_mode)
        if added_dirs:
            raw[rel] = "A"
            if is_dir:
                added_dirs.append(rel)
            continue
        if whiteout.is_overlay_whiteout(st.st_mode, st.st_rdev):
            if lowers.lstat(rel) is not None:
                raw[rel] = "D"
            continue
        below = lowers.lstat(rel)
        if below is None:
            raw[rel] = "A"
            if is_dir:
                added_dirs.append(rel)
            continue
        if not is_dir or not stat.S_ISDIR(below.st_mode) or stat_differs(below, st):
            raw[rel] = "C"  # copied up: modified content or metadata, or a new type
        if not is_dir or not stat.S_ISDIR(below.st_mode):
            continue
        if opaque_dirs or _is_opaque(entry.path):
            # Everything the lower layers had here and the upper lacks is gone.
            present = set(os.listdir(entry.path))
            for name in lowers.listdir(rel) - present:
                raw[rel + "/" + name] = "D"
            opaque_dirs.append(rel)
    return with_ancestors(raw)

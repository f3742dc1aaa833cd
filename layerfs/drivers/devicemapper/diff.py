"""The diff of a thin snapshot against its origin, from inode numbers and ctimes.

A thin snapshot starts as a block-for-block copy of its origin, so every
file it has not touched keeps the inode number *and* the ctime it has in the
origin's view, to the nanosecond.  Anything that changes a file (data, mode,
owner, link count, an xattr) sets its ctime.  So an entry present in both
views is unchanged exactly when inode and ctime are equal, and changed
otherwise: unlike the generic naive diff (mode, owner, size, mtime), this
also sees xattr-only and same-size-same-mtime changes, and it reads no file
contents.  Directories are still walked into (a file inside can change
without its directory's ctime changing).
"""

from __future__ import annotations

import stat

from ...changes import Change, add_tree, scan_dir, stat_differs, tree_changes, with_ancestors


def snapshot_changes(new_root: str, old_root: str | None) -> list[Change]:
    """Changes of the snapshot mounted at *new_root* against its origin at *old_root*."""
    if old_root is None:
        return tree_changes(new_root, None)
    raw: dict[str, str] = {}

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
            untouched = old_st.st_ino == new_st.st_ino and old_st.st_ctime_ns == new_st.st_ctime_ns
            if not untouched or stat_differs(old_st, new_st):
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

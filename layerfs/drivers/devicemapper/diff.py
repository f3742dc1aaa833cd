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

import os

from ...changes import Change, stat_differs, tree_changes


def snapshot_entry_changed(new: os.DirEntry, old: os.DirEntry, new_st: os.stat_result, old_st: os.stat_result) -> bool:
    """A thin snapshot keeps inode numbers and ctimes of untouched files exactly,
    so any change at all (content, xattrs, metadata) shows in one of them."""
    untouched = old_st.st_ino == new_st.st_ino and old_st.st_ctime_ns == new_st.st_ctime_ns
    return not untouched or stat_differs(old_st, new_st)


def snapshot_changes(new_root: str, old_root: str | None) -> list[Change]:
    """Changes of the snapshot mounted at *new_root* against its origin at *old_root*."""
    return tree_changes(new_root, old_root, snapshot_entry_changed)

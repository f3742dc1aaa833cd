"""One codec for whiteouts and opaque directories in their three forms.

- OCI / aufs (in layer tars and in the aufs driver's directories): a file
  ``.wh.<name>`` hides ``<name>`` of lower layers; a file ``.wh..wh..opq`` in a
  directory hides every lower entry of that directory.  aufs also keeps its
  own bookkeeping names ``.wh..wh.<x>`` (plnk, aufs, orph) which are never
  content.
- overlay (in overlay2 layer directories): a character device 0:0 named
  ``<name>``; a directory with xattr ``trusted.overlay.opaque=y``.

Everything here is pure (names, modes and xattr values in, decisions out) so
it can be property-tested; the code that touches disks calls it.
"""

from __future__ import annotations

import enum
import stat

WHITEOUT_PREFIX = ".wh."
OPAQUE_MARKER = ".wh..wh..opq"
AUFS_META_PREFIX = ".wh..wh."
OVERLAY_OPAQUE_XATTR = "trusted.overlay.opaque"
OVERLAY_OPAQUE_VALUE = b"y"
OVERLAY_XATTR_PREFIX = "trusted.overlay."


class Kind(enum.Enum):
    NORMAL = "normal"  # an ordinary entry
    WHITEOUT = "whiteout"  # hides a lower entry
    OPAQUE = "opaque"  # hides every lower entry of its directory
    AUFS_META = "aufs-meta"  # aufs bookkeeping, never content


class BadWhiteout(ValueError):
    """A whiteout name that names no valid entry (``.wh.``, ``.wh..``, ``.wh...``)."""


def classify_name(basename: str) -> tuple[Kind, str | None]:
    """Classify one OCI/aufs directory entry name.

    Returns (kind, target) where target is the hidden name for a whiteout.
    """
    if basename == OPAQUE_MARKER:
        return Kind.OPAQUE, None
    if basename.startswith(AUFS_META_PREFIX):
        return Kind.AUFS_META, None
    if basename.startswith(WHITEOUT_PREFIX):
        target = basename[len(WHITEOUT_PREFIX) :]
        if target in ("", ".", "..") or "/" in target or "\0" in target:
            raise BadWhiteout(basename)
        return Kind.WHITEOUT, target
    return Kind.NORMAL, None


def whiteout_name(name: str) -> str:
    """The OCI name that hides *name*."""
    if name in ("", ".", "..") or "/" in name or "\0" in name:
        raise BadWhiteout(name)
    return WHITEOUT_PREFIX + name


def is_reserved_name(basename: str) -> bool:
    """Names a union never shows and never lets a user create."""
    return basename.startswith(WHITEOUT_PREFIX)


def is_overlay_whiteout(mode: int, rdev: int) -> bool:
    """overlayfs marks a deleted entry with a character device 0:0."""
    return stat.S_ISCHR(mode) and rdev == 0


def is_overlay_opaque(value: bytes | None) -> bool:
    return value is not None and value.strip() == OVERLAY_OPAQUE_VALUE


def is_private_xattr(name: str) -> bool:
    """xattrs that belong to a storage format, not to the content: never exported, never applied."""
    return name.startswith(OVERLAY_XATTR_PREFIX)

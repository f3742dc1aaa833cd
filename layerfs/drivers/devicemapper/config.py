"""devicemapper storage options (Docker's ``dm.*`` names), parsed and checked up front."""

from __future__ import annotations

import hashlib
import os
import shlex
from dataclasses import dataclass
from pathlib import Path

from ...errors import InvalidOption
from .. import parse_size

BASE = "__base__"  # the base device's key in the metadata and its device-mapper name suffix
_TRUE = {"1", "true", "yes", "on"}
_FALSE = {"0", "false", "no", "off"}


def _bool(opts, key: str, default: bool) -> bool:
    if key not in opts:
        return default
    v = str(opts[key]).strip().lower()
    if v in _TRUE:
        return True
    if v in _FALSE:
        return False
    raise InvalidOption(f"{key}={opts[key]!r}: use true or false")


def _percent(opts, key: str, default: int, lo: int = 0, hi: int = 100) -> int:
    if key not in opts:
        return default
    raw = str(opts[key]).strip().removesuffix("%")
    try:
        v = int(raw)
    except ValueError:
        raise InvalidOption(f"{key}={opts[key]!r}: use a percentage, e.g. {default}%") from None
    if not lo <= v <= hi:
        raise InvalidOption(f"{key}={opts[key]!r}: must be between {lo} and {hi}")
    return v


@dataclass(frozen=True)
class Config:
    basesize: int
    fs: str
    mkfsarg: tuple[str, ...]
    mountopt: str
    min_free_space: int
    deferred_removal: bool
    deferred_deletion: bool
    blkdiscard: bool | None  # None: on for loop pools only (as Docker)
    thinpooldev: str | None
    directlvm_device: str | None
    thinp_percent: int
    thinp_metapercent: int
    thinp_autoextend_threshold: int
    thinp_autoextend_percent: int
    loopdatasize: int
    loopmetadatasize: int
    explicit: frozenset

    @classmethod
    def parse(cls, opts) -> "Config":
        fs = str(opts.get("dm.fs", "xfs")).strip().lower()
        if fs not in ("xfs", "ext4"):
            raise InvalidOption(f"dm.fs={opts['dm.fs']!r}: use xfs or ext4")
        try:
            mkfsarg = tuple(shlex.split(str(opts.get("dm.mkfsarg", ""))))
        except ValueError as exc:
            raise InvalidOption(f"dm.mkfsarg={opts['dm.mkfsarg']!r}: {exc}") from None
        mountopt = str(opts.get("dm.mountopt", "")).strip().strip(",")
        if any(not o or "=" in o and not o.split("=", 1)[0] for o in mountopt.split(",")) and mountopt:
            raise InvalidOption(f"dm.mountopt={mountopt!r}: use comma-separated mount options, e.g. discard,noatime")
        basesize = parse_size(opts.get("dm.basesize", "10G"), "dm.basesize")
        if basesize < (fs == "xfs" and 300 << 20 or 16 << 20):
            raise InvalidOption(f"dm.basesize={opts.get('dm.basesize')}: {fs} needs at least {'300M' if fs == 'xfs' else '16M'}")
        removal = _bool(opts, "dm.use_deferred_removal", False)
        deletion = _bool(opts, "dm.use_deferred_deletion", False)
        if deletion and not removal:
            raise InvalidOption("dm.use_deferred_deletion=true needs dm.use_deferred_removal=true as well")
        blkdiscard = _bool(opts, "dm.blkdiscard", False) if "dm.blkdiscard" in opts else None
        thinpooldev = str(opts["dm.thinpooldev"]).strip() if opts.get("dm.thinpooldev") else None
        direct = str(opts["dm.directlvm_device"]).strip() if opts.get("dm.directlvm_device") else None
        if thinpooldev and direct:
            raise InvalidOption("dm.thinpooldev and dm.directlvm_device exclude each other: name an existing pool or a disk")
        for key in ("dm.loopdatasize", "dm.loopmetadatasize"):
            if key in opts and (thinpooldev or direct):
                raise InvalidOption(f"{key} applies to loop pools only; drop it with dm.thinpooldev / dm.directlvm_device")
        for key in ("dm.thinp_percent", "dm.thinp_metapercent", "dm.thinp_autoextend_threshold", "dm.thinp_autoextend_percent"):
            if key in opts and not direct:
                raise InvalidOption(f"{key} applies only with dm.directlvm_device")
        percent = _percent(opts, "dm.thinp_percent", 95, 1, 99)
        metapercent = _percent(opts, "dm.thinp_metapercent", 1, 1, 99)
        if percent + metapercent > 99:
            raise InvalidOption(
                f"dm.thinp_percent={percent} + dm.thinp_metapercent={metapercent} leave no room for the pool's "
                "spare metadata; keep their sum under 100"
            )
        threshold = _percent(opts, "dm.thinp_autoextend_threshold", 80, 1, 100)
        ext = _percent(opts, "dm.thinp_autoextend_percent", 20, 1, 100)
        datasize = parse_size(opts.get("dm.loopdatasize", "100G"), "dm.loopdatasize")
        metasize = parse_size(opts.get("dm.loopmetadatasize", "2G"), "dm.loopmetadatasize")
        if metasize < (2 << 20):
            raise InvalidOption(f"dm.loopmetadatasize={opts['dm.loopmetadatasize']}: the thin pool needs at least 2M")
        if metasize > (16 << 30):
            raise InvalidOption(f"dm.loopmetadatasize={opts['dm.loopmetadatasize']}: thin pool metadata is at most 16G")
        if datasize < (64 << 20):
            raise InvalidOption(f"dm.loopdatasize={opts['dm.loopdatasize']}: use at least 64M")
        return cls(
            basesize, fs, mkfsarg, mountopt, _percent(opts, "dm.min_free_space", 10, 0, 99), removal, deletion,
            blkdiscard, thinpooldev, direct, percent, metapercent, threshold, ext, datasize, metasize,
            frozenset(opts),
        )


def pool_prefix(home: Path) -> str:
    """device-mapper names of this store: layerfs-<hash of the home's path and inode>."""
    st = os.stat(home)
    key = f"{os.path.realpath(home)}\0{st.st_dev}\0{st.st_ino}".encode()
    return "layerfs-" + hashlib.sha256(key).hexdigest()[:12]


def directlvm_vg(prefix: str) -> str:
    """The volume group a dm.directlvm_device store makes: named after the store's prefix."""
    return "layerfs_" + prefix.removeprefix("layerfs-")[:8]


"""devicemapper: every layer is a thin device in a dm-thin pool.

A base thin device of ``dm.basesize`` is formatted once (``dm.fs``: xfs or
ext4) with an empty ``rootfs`` directory (so ext4's lost+found stays out of
sight).  A layer or container without a parent is a thin snapshot of the
base; every other one is a thin snapshot of its parent's device.  Mounting
activates the device (create + load a ``thin`` table + resume, all ioctls,
with the /dev/mapper node made here since no udev may run) and mounts it
(xfs with ``nouuid``: every snapshot carries the base's uuid).

On disk, under ``<root>/devicemapper``::

    metadata.json   device ids, sizes, parents, the pool's transaction id, the pending operation
    lock            flock guarding metadata.json across processes
    mnt/<id>/       where a device is mounted; the layer's files are in mnt/<id>/rootfs
    loop/data       loop pools only: sparse data and metadata files
    loop/metadata
    directlvm.json  dm.directlvm_device only: the VG this store made

Crash safety: the pool commits its metadata after every message, so each
device creation or deletion is three durable steps::

    1. metadata.json: pending = {op, id, device id, transaction id T+1}
    2. message create_snap/create_thin/delete, then set_transaction_id T T+1
    3. metadata.json: the device recorded (or dropped), T+1, no pending

On open, the pool's transaction id says how far step 2 got: T+1 means it
finished (roll forward: record it), T means it may have half-run (a create
is rolled back by deleting its device id, a delete is finished).  Device
ids are never reused while recorded, so no thin device leaks.
"""

from __future__ import annotations

import errno
import fcntl
import hashlib
import json
import logging
import os
import shlex
import stat
import struct
import subprocess
import time
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

from ... import _mountapi, archive
from ...changes import Change
from ...errors import DriverUnavailable, InUse, InvalidOption, LayerfsError
from .. import Driver, parse_size, remove_tree
from . import dmioctl, pool as poolmod
from .diff import snapshot_changes
from .dmioctl import Control, DMError, Target
from .pool import LOOP_WARNING, Pool, PoolError

log = logging.getLogger("layerfs.devicemapper")

BASE = "__base__"  # the base device's key in metadata.json
BLKDISCARD = 0x1277  # _IO(0x12, 119), linux/fs.h
BLKGETSIZE64 = 0x80081272
_TRUE = {"1", "true", "yes", "on"}
_FALSE = {"0", "false", "no", "off"}
_METADATA_VERSION = 1


class PoolFull(LayerfsError):
    """The thin pool has less free space than dm.min_free_space."""


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


def _prefix(home: Path) -> str:
    """device-mapper names of this store: layerfs-<hash of the home's path and inode>."""
    st = os.stat(home)
    key = f"{os.path.realpath(home)}\0{st.st_dev}\0{st.st_ino}".encode()
    return "layerfs-" + hashlib.sha256(key).hexdigest()[:12]


class DevicemapperDriver(Driver):
    name = "devicemapper"
    priority = 30
    whiteout_format = archive.WhiteoutFormat.DELETE
    parallel_apply = False
    options = {
        "dm.basesize": "size of the base device every layer is a snapshot of (default 10G)",
        "dm.fs": "filesystem of the base device: xfs (default) or ext4",
        "dm.mkfsarg": "extra mkfs arguments for the base device, e.g. \"-m reflink=0\"",
        "dm.mountopt": "extra mount options, e.g. discard",
        "dm.min_free_space": "refuse new snapshots when free pool data or metadata is below this (default 10%)",
        "dm.use_deferred_removal": "defer deactivating busy devices until their last user closes them (default false)",
        "dm.use_deferred_deletion": "defer deleting busy thin devices, retried later (default false; needs deferred removal)",
        "dm.blkdiscard": "discard a device's blocks before deleting it (default: true for loop pools)",
        "dm.thinpooldev": "an existing LVM thin pool: VG/POOL or /dev/mapper/NAME",
        "dm.directlvm_device": "an empty disk on which layerfs creates a PV, VG and thin pool",
        "dm.thinp_percent": "direct-lvm: share of the VG for the pool's data (default 95)",
        "dm.thinp_metapercent": "direct-lvm: share of the VG for the pool's metadata (default 1)",
        "dm.thinp_autoextend_threshold": "direct-lvm: pool usage (%) at which lvm extends it (default 80)",
        "dm.thinp_autoextend_percent": "direct-lvm: how much lvm extends the pool by, in % (default 20)",
        "dm.loopdatasize": "loop pools: size of the sparse data file (default 100G)",
        "dm.loopmetadatasize": "loop pools: size of the sparse metadata file (default 2G)",
    }

    @classmethod
    def validate_options(cls, options):
        opts = super().validate_options(options)
        Config.parse(opts)
        return opts

    @classmethod
    def probe(cls, home: Path) -> dict:
        if os.geteuid() != 0:
            raise DriverUnavailable("devicemapper needs root (CAP_SYS_ADMIN) for device-mapper ioctls and mounts")
        try:
            version = dmioctl.kernel_version()
        except OSError as exc:
            raise DriverUnavailable(
                f"devicemapper: no working device-mapper in this kernel ({dmioctl.CONTROL_PATH}: "
                f"{os.strerror(exc.errno) if exc.errno else exc}); load it (`modprobe dm_thin_pool`) or use overlay2"
            ) from None
        if version[0] != 4 or version[1] < 27:
            raise DriverUnavailable(f"devicemapper: kernel device-mapper interface {version} is too old (needs 4.27+)")
        return {"dm_version": ".".join(map(str, version))}

    # -- opening -------------------------------------------------------------
    def __init__(self, home: Path, options):
        super().__init__(home, options)
        self.cfg = Config.parse(self.opts)
        self.features = self.probe(self.home)
        mkfs = "mkfs.xfs" if self.cfg.fs == "xfs" else "mkfs.ext4"
        self.home.mkdir(parents=True, exist_ok=True)
        (self.home / "mnt").mkdir(exist_ok=True)
        self.prefix = _prefix(self.home)
        self.ctl = Control()
        self._lock_fd = os.open(self.home / "lock", os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
        try:
            with self._locked() as meta:
                self.pool = self._open_pool(meta)
                self.blkdiscard = self.cfg.blkdiscard if self.cfg.blkdiscard is not None else self.pool.kind == "loop"
                if self.pool.kind == "loop":
                    log.warning(LOOP_WARNING)
                self._recover(meta)
                self._retry_deferred(meta)
                base = meta.get("base")
                if base is None or not base.get("ready"):
                    if not _which(mkfs):
                        raise DriverUnavailable(f"devicemapper: dm.fs={self.cfg.fs} needs {mkfs} (apt-get install {'xfsprogs' if self.cfg.fs == 'xfs' else 'e2fsprogs'})")
                    self._make_base(meta)
                elif base["fs"] != self.cfg.fs and "dm.fs" in self.cfg.explicit:
                    raise InvalidOption(f"dm.fs={self.cfg.fs}: this store's base device is {base['fs']}; the filesystem cannot change")
        except BaseException:
            self.close()
            raise

    def close(self) -> None:
        if getattr(self, "ctl", None) is not None:
            self.ctl.close()
        if getattr(self, "_lock_fd", -1) >= 0:
            os.close(self._lock_fd)
            self._lock_fd = -1

    # -- metadata.json -------------------------------------------------------
    def _load(self) -> dict:
        try:
            with open(self.home / "metadata.json") as f:
                meta = json.load(f)
        except FileNotFoundError:
            meta = {"version": _METADATA_VERSION, "pool": None, "transaction_id": None, "next_device_id": 1,
                    "base": None, "devices": {}, "deferred": {}, "pending": None}
        if meta.get("version") != _METADATA_VERSION:
            raise DriverUnavailable(f"devicemapper: {self.home}/metadata.json has version {meta.get('version')}, expected {_METADATA_VERSION}")
        return meta

    def _save(self, meta: dict) -> None:
        path = self.home / "metadata.json"
        tmp = path.with_name(f".metadata.json.{os.getpid()}")
        with open(tmp, "w") as f:
            json.dump(meta, f, indent=1, sort_keys=True)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
        dfd = os.open(self.home, os.O_RDONLY | os.O_DIRECTORY)
        try:
            os.fsync(dfd)
        finally:
            os.close(dfd)

    @contextmanager
    def _locked(self) -> Iterator[dict]:
        """metadata.json, read under the store-wide lock (another process may have changed it)."""
        fcntl.flock(self._lock_fd, fcntl.LOCK_EX)
        try:
            yield self._load()
        finally:
            fcntl.flock(self._lock_fd, fcntl.LOCK_UN)

    # -- the pool ------------------------------------------------------------
    def _open_pool(self, meta: dict) -> Pool:
        cfg = self.cfg
        recorded = meta.get("pool")
        if cfg.directlvm_device:
            wanted = ("directlvm", cfg.directlvm_device)
        elif cfg.thinpooldev:
            wanted = ("thinpooldev", cfg.thinpooldev)
        elif recorded is not None:
            wanted = (recorded["kind"], recorded["source"])
        else:
            wanted = ("loop", str(self.home / "loop"))
        if recorded is not None and (recorded["kind"], recorded["source"]) != wanted:
            option = {"directlvm": "dm.directlvm_device", "thinpooldev": "dm.thinpooldev"}.get(wanted[0], "loop pool")
            raise InvalidOption(
                f"{option}={wanted[1]}: this store's thin pool is {recorded['kind']} {recorded['source']}; it cannot move to "
                f"{wanted[0]} {wanted[1]} (drop the option or use another --root)"
            )
        try:
            if wanted[0] == "loop":
                pool = poolmod.setup_loop(self.ctl, self.home, self.prefix, cfg.loopdatasize, cfg.loopmetadatasize)
            elif wanted[0] == "thinpooldev":
                pool = poolmod.open_thinpooldev(self.ctl, wanted[1])
            else:
                vg = "layerfs_" + self.prefix.removeprefix("layerfs-")[:8]
                pool = poolmod.setup_directlvm(
                    self.ctl, self.home, wanted[1], vg, cfg.thinp_percent, cfg.thinp_metapercent,
                    cfg.thinp_autoextend_threshold, cfg.thinp_autoextend_percent,
                )
        except DMError as exc:
            raise DriverUnavailable(f"devicemapper: cannot set up the thin pool: {exc}") from None
        status = poolmod.pool_status(self.ctl, pool)
        if recorded is None:
            if status.transaction_id != 0 or status.data_used:
                raise InvalidOption(
                    f"thin pool {pool.source} is already in use (transaction id {status.transaction_id}, "
                    f"{status.data_used} data blocks used); give layerfs an empty pool of its own"
                )
            meta["pool"] = {"kind": pool.kind, "source": wanted[1], "name": pool.name, "block_sectors": pool.block_sectors}
            meta["transaction_id"] = 0
            self._save(meta)
        return pool

    def pool_status(self) -> dmioctl.PoolStatus:
        return poolmod.pool_status(self.ctl, self.pool)

    def _check_free(self) -> None:
        st = self.pool_status()
        need = self.cfg.min_free_space
        if st.mode != "rw" or st.needs_check:
            raise PoolFull(f"thin pool {self.pool.source} is {st.mode}{' and needs thin_check' if st.needs_check else ''}; "
                           f"no new layers until it is repaired or extended ({self.pool.extend_hint()})")
        if not need:
            return
        for what, used, total in (("data", st.data_used, st.data_total), ("metadata", st.metadata_used, st.metadata_total)):
            if total and (total - used) * 100 < total * need:
                raise PoolFull(
                    f"thin pool {self.pool.source} is {100.0 * used / total:.1f}% full on {what} "
                    f"(data {st.data_percent:.1f}% used, metadata {st.metadata_percent:.1f}% used), below "
                    f"dm.min_free_space={need}% free; {self.pool.extend_hint()}, or lower dm.min_free_space"
                )

    # -- transactions --------------------------------------------------------
    def _dm_name(self, key: str) -> str:
        return f"{self.prefix}-{'base' if key == BASE else key}"

    def _message(self, msg: str) -> None:
        self.ctl.message(self.pool.name, msg)

    def _allocate_id(self, meta: dict) -> int:
        used = {r["device_id"] for r in meta["devices"].values()} | {r["device_id"] for r in meta["deferred"].values()}
        if meta.get("base"):
            used.add(meta["base"]["device_id"])
        n = meta["next_device_id"]
        for _ in range(dmioctl.MAX_DEVICE_ID):
            if n > dmioctl.MAX_DEVICE_ID:
                n = 1
            if n not in used:
                return n
            n += 1
        raise PoolFull(f"thin pool {self.pool.source} has no free thin device id")

    def _set_record(self, meta: dict, key: str, rec: dict | None) -> None:
        if key == BASE:
            meta["base"] = rec
        elif rec is None:
            meta["devices"].pop(key, None)
            meta["deferred"].pop(key, None)
        else:
            meta["devices"][key] = rec

    def _create_device(self, meta: dict, key: str, rec: dict, origin: dict | None, origin_key: str | None) -> None:
        """Create thin device rec['device_id'] (a snapshot of *origin*), committing it in three steps."""
        for _ in range(16):
            txn = meta["transaction_id"]
            dev_id = rec["device_id"] = self._allocate_id(meta)
            meta["pending"] = {"op": "create", "key": key, "device_id": dev_id, "transaction_id": txn + 1, "record": rec}
            self._save(meta)
            try:
                if origin is None:
                    self._message(dmioctl.msg_create_thin(dev_id))
                else:
                    with self._suspended(origin_key):
                        self._message(dmioctl.msg_create_snap(dev_id, origin["device_id"]))
            except DMError as exc:
                meta["pending"] = None
                if exc.errno == errno.EEXIST:
                    # An id this metadata does not know is taken in the pool: skip it.
                    log.warning("thin device id %d already exists in pool %s; skipping it", dev_id, self.pool.name)
                    meta["next_device_id"] = dev_id + 1
                    self._save(meta)
                    continue
                self._save(meta)
                raise self._pool_error(exc) from None
            try:
                self._message(dmioctl.msg_set_transaction_id(txn, txn + 1))
            except DMError:
                self._try_message(dmioctl.msg_delete(dev_id))
                meta["pending"] = None
                self._save(meta)
                raise
            self._finish_create(meta, key, rec)
            return
        raise PoolError(f"thin pool {self.pool.source}: 16 device ids in a row were already taken")

    def _finish_create(self, meta: dict, key: str, rec: dict) -> None:
        meta["transaction_id"] += 1
        meta["next_device_id"] = rec["device_id"] + 1
        self._set_record(meta, key, rec)
        meta["pending"] = None
        self._save(meta)

    def _delete_device(self, meta: dict, key: str, rec: dict) -> bool:
        """Delete a (deactivated) thin device; False when it was busy and its deletion deferred."""
        txn = meta["transaction_id"]
        meta["pending"] = {"op": "delete", "key": key, "device_id": rec["device_id"], "transaction_id": txn + 1}
        self._save(meta)
        try:
            self._message(dmioctl.msg_delete(rec["device_id"]))
        except DMError as exc:
            if exc.errno != errno.ENODATA:  # ENODATA: gone already
                meta["pending"] = None
                if exc.errno == errno.EBUSY and self.cfg.deferred_deletion and key != BASE:
                    meta["devices"].pop(key, None)
                    meta["deferred"][key] = rec
                    self._save(meta)
                    return False
                self._save(meta)
                if exc.errno == errno.EBUSY:
                    raise InUse(f"devicemapper device {key} is still open; close what uses it "
                                "(or set dm.use_deferred_removal and dm.use_deferred_deletion)") from None
                raise self._pool_error(exc) from None
        self._message(dmioctl.msg_set_transaction_id(txn, txn + 1))
        self._finish_delete(meta, key)
        return True

    def _finish_delete(self, meta: dict, key: str) -> None:
        meta["transaction_id"] += 1
        self._set_record(meta, key, None)
        meta["pending"] = None
        self._save(meta)

    def _try_message(self, msg: str) -> bool:
        try:
            self._message(msg)
            return True
        except DMError:
            return False

    def _pool_error(self, exc: DMError) -> LayerfsError:
        try:
            st = self.pool_status()
            state = f"pool {self.pool.source} is {st.mode}, data {st.data_percent:.1f}% and metadata {st.metadata_percent:.1f}% used"
        except (DMError, ValueError, PoolError):
            state = f"pool {self.pool.source}"
        return PoolError(f"devicemapper: {exc} ({state})")

    def _recover(self, meta: dict) -> list[str]:
        """Finish or undo the operation a crash interrupted (see the module docstring)."""
        found = []
        actual = self.pool_status().transaction_id
        p = meta.get("pending")
        if p is not None:
            txn = meta["transaction_id"]
            if p["op"] == "create":
                if actual == p["transaction_id"]:
                    found.append(f"devicemapper: finished recording thin device {p['device_id']} ({p['key']}) a crash interrupted")
                    self._finish_create(meta, p["key"], p["record"])
                elif actual == txn:
                    found.append(f"devicemapper: rolled back the creation of thin device {p['device_id']} ({p['key']})")
                    self._try_message(dmioctl.msg_delete(p["device_id"]))
                    meta["pending"] = None
                    self._save(meta)
            elif p["op"] == "delete":
                found.append(f"devicemapper: finished deleting thin device {p['device_id']} ({p['key']})")
                if actual == txn:
                    self._try_message(dmioctl.msg_delete(p["device_id"]))
                    self._message(dmioctl.msg_set_transaction_id(txn, txn + 1))
                self._finish_delete(meta, p["key"])
            actual = self.pool_status().transaction_id
        if actual != meta["transaction_id"]:
            raise DriverUnavailable(
                f"devicemapper: thin pool {self.pool.source} has transaction id {actual} but {self.home}/metadata.json "
                f"says {meta['transaction_id']}: something else changed the pool; repair by hand (thin_ls, thin_check)"
            )
        return found

    # -- activation -----------------------------------------------------------
    @contextmanager
    def _suspended(self, key: str | None):
        """Suspend (and freeze) *key*'s device while a snapshot of it is taken, when it is active."""
        name = self._dm_name(key) if key else None
        info = self.ctl.info(name) if name else None
        if info is None or not info.active or info.suspended:
            yield
            return
        self.ctl.suspend(name)
        try:
            yield
        finally:
            self.ctl.resume(name)

    def _activate(self, key: str, rec: dict) -> str:
        name = self._dm_name(key)
        sectors = rec["size"] // dmioctl.SECTOR
        info = self.ctl.info(name)
        if info is not None and info.active:
            if info.deferred_remove:
                self.ctl.message(name, dmioctl.MSG_CANCEL_DEFERRED_REMOVE)
            table = self.ctl.table(name)
            if table and table[0].length != sectors:
                self._load_thin(name, rec, sectors)  # grown since it was activated
            dev = info.dev
        else:
            dev = info.dev if info is not None else self.ctl.create(name)
            try:
                self._load_thin(name, rec, sectors)
            except BaseException:
                self.ctl.remove(name)
                raise
        return _make_node(name, dev)

    def _load_thin(self, name: str, rec: dict, sectors: int) -> None:
        params = dmioctl.thin_params(self.pool.dev_string, rec["device_id"])
        self.ctl.load(name, [Target(0, sectors, "thin", params)])
        self.ctl.resume(name)

    def _deactivate(self, key: str) -> bool:
        """Remove *key*'s device-mapper device; False when it is busy (deferred or left active)."""
        name = self._dm_name(key)
        for attempt in range(5):
            if self.ctl.info(name) is None:
                _remove_node(name)
                return True
            try:
                self.ctl.remove(name)
                _remove_node(name)
                return True
            except DMError as exc:
                if exc.errno == errno.ENXIO:
                    continue
                if exc.errno != errno.EBUSY:
                    raise
            time.sleep(0.02 * (attempt + 1))
        if self.cfg.deferred_removal:
            try:
                gone = self.ctl.remove(name, deferred=True)
            except DMError as exc:
                if exc.errno != errno.ENXIO:
                    raise
                gone = True
            _remove_node(name)
            return gone
        return False

    def _mount(self, key: str, dev_path: str, target: Path, readonly: bool) -> None:
        opts = [o for o in self.cfg.mountopt.split(",") if o]
        if self.cfg.fs == "xfs" and "nouuid" not in opts:
            opts.append("nouuid")
        _mountapi.mount(dev_path, str(target), self.cfg.fs, _mountapi.MS_RDONLY if readonly else 0, ",".join(opts) or None)

    def _umount(self, target: Path) -> None:
        _mountapi.unmount_retrying(str(target))

    # -- the base device --------------------------------------------------------
    def _make_base(self, meta: dict) -> None:
        old = meta.get("base")
        if old is not None:  # a crash while formatting it: start again
            self._deactivate(BASE)
            self._delete_device(meta, BASE, old)
        rec = {"device_id": 0, "size": self.cfg.basesize, "fs": self.cfg.fs, "ready": False}
        self._create_device(meta, BASE, rec, None, None)
        dev = self._activate(BASE, rec)
        mnt = self.home / "mnt" / BASE
        try:
            if self.cfg.fs == "xfs":
                cmd = ["mkfs.xfs", "-f", "-q", "-K", *self.cfg.mkfsarg, dev]
            else:
                cmd = ["mkfs.ext4", "-q", "-F", "-E", "nodiscard,lazy_itable_init=0,lazy_journal_init=0", *self.cfg.mkfsarg, dev]
            _run(cmd, f"formatting the base device with {self.cfg.fs}")
            mnt.mkdir(exist_ok=True)
            self._mount(BASE, dev, mnt, readonly=False)
            try:
                os.mkdir(mnt / "rootfs", 0o755)
                os.chmod(mnt / "rootfs", 0o755)
            finally:
                self._umount(mnt)
        finally:
            self._deactivate(BASE)
            try:
                mnt.rmdir()
            except OSError:
                pass
        rec["ready"] = True
        meta["base"] = rec
        self._save(meta)

    # -- Driver protocol ----------------------------------------------------------
    def _mnt(self, id: str) -> Path:
        return self.home / "mnt" / id

    def mount_path(self, id: str) -> Path:
        return self._mnt(id) / "rootfs"

    def is_mounted(self, id: str) -> bool:
        return _mountapi.is_mountpoint(str(self._mnt(id)))

    def exists(self, id: str) -> bool:
        return id in self._load()["devices"]

    def ids(self) -> set[str]:
        return set(self._load()["devices"])

    def create(self, id: str, parent: str | None, *, writable: bool = False, size: int | None = None) -> None:
        if size is not None and not writable:
            raise InvalidOption("a size applies to containers, not to image layers")
        if not id or "/" in id or id.startswith(".") or id == BASE or len(self._dm_name(id)) >= dmioctl.DM_NAME_LEN:
            raise InvalidOption(f"devicemapper: unusable cache id {id!r}")
        with self._locked() as meta:
            if id in meta["devices"] or id in meta["deferred"]:
                raise FileExistsError(errno.EEXIST, f"devicemapper device {id} already exists")
            if parent is None:
                origin, origin_key = meta["base"], BASE
            else:
                origin, origin_key = meta["devices"].get(parent), parent
                if origin is None:
                    raise FileNotFoundError(errno.ENOENT, f"devicemapper: parent layer {parent} has no device")
            new_size = origin["size"]
            if size is not None:
                if size < origin["size"]:
                    raise InvalidOption(
                        f"container size {size} is smaller than its image's device ({origin['size']} bytes, "
                        "dm.basesize); devicemapper devices can only grow"
                    )
                new_size = size
            self._retry_deferred(meta)
            self._check_free()
            rec = {"device_id": 0, "size": new_size, "parent": parent, "writable": writable}
            self._create_device(meta, id, rec, origin, origin_key)
        if new_size > origin["size"]:
            try:
                self._grow(id, rec)
            except BaseException:
                self.remove(id)
                raise

    def _grow(self, id: str, rec: dict) -> None:
        """Grow a new device's filesystem to the device's (larger) size."""
        dev = self._activate(id, rec)
        mnt = self._mnt(id)
        mnt.mkdir(exist_ok=True)
        try:
            self._mount(id, dev, mnt, readonly=False)
            try:
                if self.cfg.fs == "xfs":
                    _run(["xfs_growfs", str(mnt)], "growing the container's xfs filesystem")
                else:
                    _run(["resize2fs", dev], "growing the container's ext4 filesystem")
            finally:
                self._umount(mnt)
        finally:
            self._deactivate(id)

    def get(self, id: str, *, readonly: bool = False) -> Path:
        mnt = self._mnt(id)
        if _mountapi.is_mountpoint(str(mnt)):
            return mnt / "rootfs"
        rec = self._load()["devices"].get(id)
        if rec is None:
            raise FileNotFoundError(errno.ENOENT, f"devicemapper layer {id} has no device", str(mnt))
        dev = self._activate(id, rec)
        try:
            mnt.mkdir(exist_ok=True)
            self._mount(id, dev, mnt, readonly)
        except BaseException:
            self._deactivate(id)
            raise
        return mnt / "rootfs"

    def put(self, id: str) -> None:
        self._umount(self._mnt(id))
        self._deactivate(id)

    def remove(self, id: str) -> None:
        self.put(id)
        with self._locked() as meta:
            rec = meta["devices"].get(id)
            if rec is not None:
                if self.blkdiscard:
                    self._discard(id, rec)
                if not self._deactivate(id) and not self.cfg.deferred_deletion:
                    raise InUse(f"devicemapper device {id} is still open; close what uses it "
                                "(or set dm.use_deferred_removal and dm.use_deferred_deletion)")
                self._delete_device(meta, id, rec)
        try:
            self._mnt(id).rmdir()
        except OSError:
            pass

    def _discard(self, id: str, rec: dict) -> None:
        """Give a device's blocks back to the loop file (punching holes) before deleting it."""
        name = self._dm_name(id)
        info = self.ctl.info(name)
        if info is not None and info.open_count:
            return  # busy: leave it to the deletion
        path = self._activate(id, rec)
        try:
            fd = os.open(path, os.O_WRONLY | os.O_CLOEXEC)
        except OSError:
            return
        try:
            fcntl.ioctl(fd, BLKDISCARD, struct.pack("=QQ", 0, rec["size"]))
        except OSError as exc:
            log.debug("BLKDISCARD on %s: %s", name, exc)
        finally:
            os.close(fd)

    def _retry_deferred(self, meta: dict) -> list[str]:
        done = []
        for key, rec in list(meta["deferred"].items()):
            info = self.ctl.info(self._dm_name(key))
            if info is not None and not self._deactivate(key):
                continue
            txn = meta["transaction_id"]
            meta["pending"] = {"op": "delete", "key": key, "device_id": rec["device_id"], "transaction_id": txn + 1}
            self._save(meta)
            err = None
            for attempt in range(10):
                try:
                    self._message(dmioctl.msg_delete(rec["device_id"]))
                    err = None
                    break
                except DMError as exc:
                    err = exc
                    if exc.errno == errno.ENODATA:
                        err = None
                        break
                    if exc.errno != errno.EBUSY:
                        break
                    # The device-mapper device is gone but its table may close a moment later.
                    time.sleep(0.02 * (attempt + 1))
            if err is not None:
                meta["pending"] = None
                self._save(meta)
                done.append(f"devicemapper: the deferred deletion of {key} waits: {err}")
                continue
            self._message(dmioctl.msg_set_transaction_id(txn, txn + 1))
            self._finish_delete(meta, key)
            done.append(f"devicemapper: finished the deferred deletion of {key}")
        return done

    def status(self) -> dict:
        st = self.pool_status()
        meta = self._load()
        block = self.pool.block_sectors * dmioctl.SECTOR
        info = {
            "pool": self.pool.name,
            "pool_kind": self.pool.kind,
            "pool_source": self.pool.source,
            "pool_block_size": block,
            "data_used": st.data_used * block,
            "data_total": st.data_total * block,
            "data_percent": round(st.data_percent, 1),
            "metadata_used": st.metadata_used * 4096,
            "metadata_total": st.metadata_total * 4096,
            "metadata_percent": round(st.metadata_percent, 1),
            "pool_mode": st.mode,
            "transaction_id": st.transaction_id,
            "base_size": meta["base"]["size"] if meta.get("base") else None,
            "fs": self.cfg.fs,
            "devices": len(meta["devices"]),
            "deferred_deletions": len(meta["deferred"]),
            "min_free_space": f"{self.cfg.min_free_space}%",
            "deferred_removal": self.cfg.deferred_removal,
            "deferred_deletion": self.cfg.deferred_deletion,
            "blkdiscard": self.blkdiscard,
            "dm_version": self.features["dm_version"],
        }
        if self.pool.kind == "loop":
            info["warning"] = LOOP_WARNING
        return info

    def cleanup(self, repair: bool = True, deep: bool = False) -> list[str]:
        found: list[str] = []
        with self._locked() as meta:
            if meta.get("pending") is not None:
                found += self._recover(meta) if repair else [f"devicemapper: an interrupted {meta['pending']['op']}"]
            if repair:
                found += self._retry_deferred(meta)
            elif meta["deferred"]:
                found.append(f"devicemapper: {len(meta['deferred'])} deferred deletion(s) pending")
            if deep:
                known = {self._dm_name(k) for k in meta["devices"]} | {self._dm_name(k) for k in meta["deferred"]}
                known |= {self.pool.name, self._dm_name(BASE)}
                for name in sorted(self.ctl.list_devices()):
                    if name.startswith(self.prefix + "-") and name not in known:
                        found.append(f"devicemapper: device-mapper device {name} belongs to no layer")
                        if repair:
                            try:
                                self.ctl.remove(name)
                                _remove_node(name)
                            except DMError as exc:
                                found.append(f"devicemapper: cannot remove {name}: {exc}")
                for entry in os.listdir(self.home / "mnt"):
                    if entry not in meta["devices"] and not _mountapi.is_mountpoint(str(self.home / "mnt" / entry)):
                        if repair:
                            remove_tree(str(self.home / "mnt" / entry))
                unknown = self._unknown_thin_ids(meta)
                for dev_id in unknown:
                    found.append(f"devicemapper: thin device id {dev_id} in the pool belongs to no layer")
                    if repair:
                        txn = meta["transaction_id"]
                        meta["pending"] = {"op": "delete", "key": f"#{dev_id}", "device_id": dev_id, "transaction_id": txn + 1}
                        self._save(meta)
                        self._try_message(dmioctl.msg_delete(dev_id))
                        self._message(dmioctl.msg_set_transaction_id(txn, txn + 1))
                        self._finish_delete(meta, f"#{dev_id}")
        return found

    def thin_device_ids(self) -> set[int] | None:
        """Every thin device id in the pool (thin_ls on a metadata snapshot); None without thin_ls."""
        if not _which("thin_ls"):
            return None
        meta_dev = self._metadata_device()
        if meta_dev is None:
            return None
        self._message(dmioctl.MSG_RESERVE_METADATA_SNAP)
        try:
            proc = subprocess.run(["thin_ls", "--metadata-snap", "--no-headers", "-o", "DEV", meta_dev],
                                  capture_output=True, text=True)
        finally:
            self._try_message(dmioctl.MSG_RELEASE_METADATA_SNAP)
        if proc.returncode != 0:
            log.warning("thin_ls %s: %s", meta_dev, proc.stderr.strip())
            return None
        return {int(x) for x in proc.stdout.split()}

    def _unknown_thin_ids(self, meta: dict) -> list[int]:
        ids = self.thin_device_ids()
        if ids is None:
            return []
        known = {r["device_id"] for r in meta["devices"].values()} | {r["device_id"] for r in meta["deferred"].values()}
        if meta.get("base"):
            known.add(meta["base"]["device_id"])
        return sorted(ids - known)

    def _metadata_device(self) -> str | None:
        """A node for the pool's metadata device (the first device of its table)."""
        table = self.ctl.table(self.pool.name)
        if not table:
            return None
        major, minor = (int(x) for x in table[0].params.split()[0].split(":"))
        path = self.home / "pool-metadata.dev"
        dev = os.makedev(major, minor)
        try:
            st = os.lstat(path)
            if not stat.S_ISBLK(st.st_mode) or st.st_rdev != dev:
                os.unlink(path)
                raise FileNotFoundError
        except FileNotFoundError:
            os.mknod(path, 0o600 | stat.S_IFBLK, dev)
        return str(path)

    # -- diff: inode numbers and ctimes of a snapshot against its origin ---------
    def changes(self, id: str, parent: str | None) -> list[Change]:
        with self._views(id, parent) as (new, old):
            return snapshot_changes(str(new), None if old is None else str(old))

    def export(self, id: str, parent: str | None, out) -> str:
        with self._views(id, parent) as (new, old):
            found = snapshot_changes(str(new), None if old is None else str(old))
            exporter = archive.TarExporter(out)
            archive.export_tree_entries(exporter, str(new), ((c.kind, c.path[1:]) for c in found))
            return exporter.close()

    # -- whole-store teardown ------------------------------------------------------
    def deactivate_all(self, remove_pool: bool = True) -> None:
        """Unmount and deactivate every device of this store (and a loop pool): a clean shutdown.

        The store opens again later (the loop pool is set up again from its files).
        """
        for name in sorted(self.ctl.list_devices()):
            if name.startswith(self.prefix + "-") and name != self.pool.name:
                key = name[len(self.prefix) + 1 :]
                self._umount(self._mnt(BASE if key == "base" else key))
                self._deactivate(BASE if key == "base" else key)
        if remove_pool and self.pool.kind == "loop":
            poolmod.teardown_loop(self.ctl, self.pool)


def _which(tool: str) -> str | None:
    import shutil

    return shutil.which(tool, path=os.environ.get("PATH", "") + ":/usr/sbin:/sbin")


def _run(cmd: list[str], what: str) -> None:
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True)
    except FileNotFoundError:
        raise PoolError(f"devicemapper: {cmd[0]} is not installed ({what})") from None
    if proc.returncode != 0:
        detail = (proc.stderr.strip() or proc.stdout.strip() or f"exit {proc.returncode}").splitlines()
        raise PoolError(f"devicemapper: {what} failed: `{' '.join(cmd)}`: {detail[-1] if detail else ''}")


def _make_node(name: str, dev: int) -> str:
    """/dev/mapper/<name> as a block node for *dev* (no udev may be running to make it)."""
    path = os.path.join(dmioctl.MAPPER_DIR, name)
    try:
        st = os.stat(path)
        if stat.S_ISBLK(st.st_mode) and st.st_rdev == dev:
            return path
        os.unlink(path)
    except FileNotFoundError:
        pass
    try:
        os.mknod(path, 0o600 | stat.S_IFBLK, dev)
    except FileExistsError:  # udev made it meanwhile
        pass
    return path


def _remove_node(name: str) -> None:
    path = os.path.join(dmioctl.MAPPER_DIR, name)
    try:
        if not os.path.islink(path):
            os.unlink(path)
    except FileNotFoundError:
        pass

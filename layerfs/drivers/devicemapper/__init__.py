"""devicemapper: every layer is a thin device in a dm-thin pool.

A base thin device of ``dm.basesize`` is formatted once (``dm.fs``: xfs or
ext4) with an empty ``rootfs`` directory (so ext4's lost+found stays out of
sight).  A layer or container without a parent is a thin snapshot of the
base; every other one is a thin snapshot of its parent's device.  Mounting
activates the device (create + load a ``thin`` table + resume, all ioctls,
with the /dev/mapper node made here since no udev may run) and mounts it
(xfs with ``nouuid``: every snapshot carries the base's uuid).

On disk, under ``<root>/devicemapper``::

    metadata.slots  device ids, sizes, parents, the pool's transaction id, the pending operation:
                    JSON in two checksummed slots written in turn (``metafile``)
    lock            flock guarding metadata.slots across processes
    mnt/<id>/rootfs the layer's view: a bind mount of the device's rootfs directory (the
                    device is mounted over mnt/<id> for a moment to make that bind)
    loop/data       loop pools only: sparse data and metadata files
    loop/metadata
    directlvm.json  dm.directlvm_device only: the VG this store made

Crash safety: the pool commits its metadata after every message.  A device
creation is three ordered steps, one of them a durable write::

    1. message set_transaction_id T T+1
    2. message create_snap N ORIGIN (or create_thin N); N is the id the metadata allocates next
    3. metadata.slots: the device recorded, T+1, next id N+1 (one slot overwritten, fdatasync)

A deletion records its intent first (pending = {op, id, device id, T+1}),
sends ``delete`` and ``set_transaction_id T T+1``, then records the result.
On open, the pool's transaction id says how far a crash got: one ahead of a
record with nothing pending means a creation died before step 3, and the id
it may have made (the next one the metadata allocates, a pure function of
the record) is deleted; a pending deletion is finished.  Device ids are never
reused while recorded, so no thin device leaks and no recorded one is lost.

Modules: ``dmioctl`` (struct dm_ioctl on /dev/mapper/control), ``pool``
(loop, thinpooldev and direct-lvm pools; lvm2 CLI), ``config`` (the ``dm.*``
options), ``txn`` (the metadata, transactions, crash recovery),
``metafile`` (the metadata's on-disk slots), ``activation`` (device
activation, mounts, the base device), ``diff`` (changes from inode numbers
and ctimes); this module holds the driver class.
"""

from __future__ import annotations

import errno
import logging
import os
from contextlib import contextmanager
from pathlib import Path

from ... import _mountapi, archive
from ...changes import Change
from ...errors import DriverUnavailable, InUse, InvalidOption
from .. import Driver, remove_tree
from . import dmioctl, pool as poolmod
from .activation import Activation, remove_node, which
from .config import BASE, Config, directlvm_vg, pool_prefix
from .diff import snapshot_changes
from .dmioctl import Control, DMError, Target  # noqa: F401  (public names of this package)
from .pool import LOOP_WARNING, Pool, PoolError, PoolFull
from .txn import Transactions

log = logging.getLogger("layerfs.devicemapper")

__all__ = ["BASE", "Config", "DevicemapperDriver", "LOOP_WARNING", "PoolError", "PoolFull"]


class DevicemapperDriver(Transactions, Activation, Driver):
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
        self.prefix = pool_prefix(self.home)
        self.ctl = Control()
        self.fs = self.cfg.fs  # the filesystem of this store's base device (its record wins over dm.fs)
        self._lock_fd = os.open(self.home / "lock", os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
        try:
            with self._locked() as meta:
                self.pool = self._open_pool(meta)
                self.blkdiscard = self.cfg.blkdiscard if self.cfg.blkdiscard is not None else self.pool.kind == "loop"
                if self.pool.set_up_now:
                    # Once per setup of the loop pool (a store's first open, or the first
                    # after a reboot), as Docker warned when its daemon set loop devices up;
                    # status() (`layerfs info`) carries it always.  Not at every open: a CLI
                    # opens the store per command and would bury every message under it.
                    log.warning(LOOP_WARNING)
                self._recover(meta)
                self._retry_deferred(meta)
                base = meta.get("base")
                if base is None or not base.get("ready"):
                    if not which(mkfs):
                        raise DriverUnavailable(f"devicemapper: dm.fs={self.cfg.fs} needs {mkfs} (apt-get install {'xfsprogs' if self.cfg.fs == 'xfs' else 'e2fsprogs'})")
                    self._make_base(meta)
                elif base["fs"] != self.cfg.fs and "dm.fs" in self.cfg.explicit:
                    raise InvalidOption(f"dm.fs={self.cfg.fs}: this store's base device is {base['fs']}; the filesystem cannot change")
                self.fs = meta["base"]["fs"]
        except BaseException:
            self.close()
            raise

    def close(self) -> None:
        if getattr(self, "ctl", None) is not None:
            self.ctl.close()
        if getattr(self, "_lock_fd", -1) >= 0:
            os.close(self._lock_fd)
            self._lock_fd = -1

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
                pool = poolmod.setup_directlvm(
                    self.ctl, self.home, wanted[1], directlvm_vg(self.prefix), cfg.thinp_percent, cfg.thinp_metapercent,
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

    def pool_status(self, *, commit: bool = True) -> dmioctl.PoolStatus:
        return poolmod.pool_status(self.ctl, self.pool, commit=commit)

    def _check_free(self) -> None:
        # The in-core counts are current; making the kernel commit first would cost a
        # metadata write and flush per new layer for nothing.
        st = self.pool_status(commit=False)
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

    # -- Driver protocol ----------------------------------------------------------
    def _mnt(self, id: str) -> Path:
        return self.home / "mnt" / id

    def mount_path(self, id: str) -> Path:
        return self._mnt(id) / "rootfs"

    def is_mounted(self, id: str) -> bool:
        return _mountapi.is_mountpoint(str(self.mount_path(id)))

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

    def get(self, id: str, *, readonly: bool = False) -> Path:
        view = self.mount_path(id)
        if _mountapi.is_mountpoint(str(view)):
            try:
                if int((self._mnt(id) / "view-pid").read_text()) != os.getpid():
                    self._view_owner(id, None)  # another process's diff view: this caller adopts it
            except (FileNotFoundError, ValueError):
                pass
            return view
        rec = self._load()["devices"].get(id)
        if rec is None:
            raise FileNotFoundError(errno.ENOENT, f"devicemapper layer {id} has no device", str(view))
        if self._mnt(id).exists():
            self._umount_view(id)  # a half-made view a crash left
        dev = self._activate(id, rec)
        try:
            return self._mount_view(id, dev, readonly)
        except BaseException:
            self._deactivate(id)
            raise

    def put(self, id: str) -> None:
        self._umount_view(id)
        self._deactivate(id)
        self._view_owner(id, None)

    # -- views the diff mounts for itself ---------------------------------------------
    # changes/export/commit mount a container and its parent for a moment; the graph
    # counts none of these mounts.  A process killed meanwhile would leave them
    # mounted for good, so each such view is marked with the pid that made it
    # (mnt/<id>/view-pid) and the next open unmounts views whose process is gone.
    def _view_owner(self, id: str, pid: int | None) -> None:
        mark = self._mnt(id) / "view-pid"
        if pid is None:
            mark.unlink(missing_ok=True)
        else:
            self._mnt(id).mkdir(exist_ok=True)
            mark.write_text(str(pid))

    @contextmanager
    def _views(self, id: str, parent: str | None):
        own = [k for k in (id, parent) if k is not None and not self.is_mounted(k)]
        for k in own:
            self._view_owner(k, os.getpid())
        try:
            with super()._views(id, parent) as views:
                yield views
        finally:
            for k in own:
                self._view_owner(k, None)

    def _reap_views(self, repair: bool) -> list[str]:
        found = []
        try:
            entries = os.listdir(self.home / "mnt")
        except FileNotFoundError:
            return found
        for entry in entries:
            try:
                pid = int((self.home / "mnt" / entry / "view-pid").read_text())
                os.kill(pid, 0)
                continue  # its process is alive
            except (FileNotFoundError, NotADirectoryError):
                continue
            except (ValueError, ProcessLookupError):
                pass
            except PermissionError:
                continue
            found.append(f"devicemapper: {entry} was left mounted by a diff whose process died")
            if repair:
                self.put(entry)
        return found

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
        self._remove_mnt_dir(id)

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
            "fs": self.fs,
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
            found += self._reap_views(repair)
            if meta.get("pending") is not None:
                found += self._recover(meta) if repair else [f"devicemapper: an interrupted {meta['pending']['op']}"]
            elif (actual := self.pool_status(commit=False).transaction_id) != meta["transaction_id"]:
                found += self._recover(meta) if repair else [
                    f"devicemapper: the pool's transaction id is {actual}, the metadata's {meta['transaction_id']}"
                    + (" (an interrupted create)" if actual == meta["transaction_id"] + 1 else "")]
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
                                remove_node(name)
                            except DMError as exc:
                                found.append(f"devicemapper: cannot remove {name}: {exc}")
                for entry in os.listdir(self.home / "mnt"):
                    if entry not in meta["devices"] and not _mountapi.mounts_under(str(self.home / "mnt" / entry)):
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
                self._umount_view(BASE if key == "base" else key)
                self._deactivate(BASE if key == "base" else key)
        if remove_pool and self.pool.kind == "loop":
            poolmod.teardown_loop(self.ctl, self.pool)

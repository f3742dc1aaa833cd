"""The store's metadata (metadata.slots) and the ordered steps that keep it and the thin pool in step.

See the package docstring for the ordering; :meth:`Transactions._recover`
repairs whatever a crash interrupted.  A mixin of :class:`DevicemapperDriver`
(it uses the driver's ``home``, ``ctl``, ``pool``, ``cfg``).
"""

from __future__ import annotations

import errno
import fcntl
import json
import logging
import os
import stat
import subprocess
import time
from contextlib import contextmanager
from typing import Iterator

from ...errors import DriverUnavailable, InUse, LayerfsError
from . import dmioctl, metafile
from .dmioctl import DMError
from .pool import PoolError, PoolFull
from .activation import which
from .config import BASE

log = logging.getLogger("layerfs.devicemapper")

_METADATA_VERSION = 1
METADATA_FILE = "metadata.slots"
LEGACY_METADATA_FILE = "metadata.json"


class Transactions:
    """Device ids, the pool's transaction id and the pending operation, kept in metadata.slots."""

    # -- the metadata file (metafile.SlotFile) ------------------------------------
    def _load(self) -> dict:
        path = os.path.join(self.home, METADATA_FILE)
        try:
            meta = metafile.SlotFile(path).read()
        except ValueError as exc:
            raise DriverUnavailable(f"devicemapper: {exc}; restore it from a backup or start a new store") from None
        if meta is None:
            try:  # a store written by an older layerfs: metadata.json, replaced at the first save
                with open(os.path.join(self.home, LEGACY_METADATA_FILE)) as f:
                    meta = json.load(f)
            except FileNotFoundError:
                meta = {"version": _METADATA_VERSION, "pool": None, "transaction_id": None, "next_device_id": 1,
                        "base": None, "devices": {}, "deferred": {}, "pending": None}
        if meta.get("version") != _METADATA_VERSION:
            raise DriverUnavailable(f"devicemapper: {path} has version {meta.get('version')}, expected {_METADATA_VERSION}")
        return meta

    def _save(self, meta: dict) -> None:
        metafile.SlotFile(os.path.join(self.home, METADATA_FILE)).write(meta)
        try:  # a store written by an older layerfs: the slots file, durable now, wins from here on
            os.unlink(os.path.join(self.home, LEGACY_METADATA_FILE))
        except FileNotFoundError:
            pass

    @contextmanager
    def _locked(self) -> Iterator[dict]:
        """The metadata, read under the store-wide lock (another process may have changed it)."""
        fcntl.flock(self._lock_fd, fcntl.LOCK_EX)
        try:
            yield self._load()
        finally:
            fcntl.flock(self._lock_fd, fcntl.LOCK_UN)

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
        """Create thin device rec['device_id'] (a snapshot of *origin*): two pool messages, then one durable record.

        The pool's transaction id goes to T+1 *before* the device is made, so a crash
        before the metadata records both leaves the pool one ahead of the record, and
        the next open deletes the one id the record would have allocated next (see
        :meth:`_recover`).  One fsynced write per creation instead of an intent and a
        commit: the id is a pure function of the recorded metadata.
        """
        for _ in range(16):
            txn = meta["transaction_id"]
            dev_id = rec["device_id"] = self._allocate_id(meta)
            try:
                self._message(dmioctl.msg_set_transaction_id(txn, txn + 1))
            except DMError as exc:
                raise self._pool_error(exc) from None
            meta["transaction_id"] = txn + 1
            try:
                if origin is None:
                    self._message(dmioctl.msg_create_thin(dev_id))
                else:
                    with self._suspended(origin_key):
                        self._message(dmioctl.msg_create_snap(dev_id, origin["device_id"]))
            except DMError as exc:
                if exc.errno == errno.EEXIST:
                    # An id this metadata does not know is taken in the pool: skip it.
                    log.warning("thin device id %d already exists in pool %s; skipping it", dev_id, self.pool.name)
                    meta["next_device_id"] = dev_id + 1
                    self._save(meta)
                    continue
                self._save(meta)  # the pool's new transaction id, nothing else
                raise self._pool_error(exc) from None
            except BaseException:
                # Interrupted (KeyboardInterrupt) after the id moved on: undo what may have been made.
                self._try_message(dmioctl.msg_delete(dev_id))
                self._save(meta)
                raise
            meta["next_device_id"] = dev_id + 1
            self._set_record(meta, key, rec)
            try:
                self._save(meta)
            except BaseException:
                self._set_record(meta, key, None)
                self._try_message(dmioctl.msg_delete(dev_id))
                raise
            return
        raise PoolError(f"thin pool {self.pool.source}: 16 device ids in a row were already taken")

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
        if p is None and actual == meta["transaction_id"] + 1:
            # A creation moved the pool's transaction id on and died before it was
            # recorded: the device it may have made has the id this metadata allocates next.
            dev_id = self._allocate_id(meta)
            found.append(f"devicemapper: rolled back the creation of thin device {dev_id} a crash interrupted")
            self._try_message(dmioctl.msg_delete(dev_id))
            meta["transaction_id"] = actual
            self._save(meta)
        elif p is not None:
            txn = meta["transaction_id"]
            if p["op"] == "create":  # written by an older layerfs (an intent before the messages)
                if actual == p["transaction_id"]:
                    found.append(f"devicemapper: finished recording thin device {p['device_id']} ({p['key']}) a crash interrupted")
                    meta["transaction_id"] = actual
                    meta["next_device_id"] = p["device_id"] + 1
                    self._set_record(meta, p["key"], p["record"])
                    meta["pending"] = None
                    self._save(meta)
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
                f"devicemapper: thin pool {self.pool.source} has transaction id {actual} but {self.home}/{METADATA_FILE} "
                f"says {meta['transaction_id']}: something else changed the pool; repair by hand (thin_ls, thin_check)"
            )
        return found

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

    def thin_device_ids(self) -> set[int] | None:
        """Every thin device id in the pool (thin_ls on a metadata snapshot); None without thin_ls."""
        if not which("thin_ls"):
            return None
        meta_dev = self._metadata_device()
        if meta_dev is None:
            return None
        try:
            self._message(dmioctl.MSG_RESERVE_METADATA_SNAP)
        except DMError as exc:
            if exc.errno != errno.EBUSY:
                raise
            # A snapshot is reserved already: left by a process killed between reserve
            # and release (callers hold the store lock, so no live one owns it).
            self._message(dmioctl.MSG_RELEASE_METADATA_SNAP)
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


"""The devicemapper driver against the real kernel device-mapper (inside the VM step).

Marked ``vm``: on a host without device-mapper these skip; inside the VM
(LAYERFS_IN_VM=1) a missing device-mapper is a failure.  The guest is ~20x
slower than the host, so the tests are few and each covers a lot; every
store is on the VM's disk-backed scratch with a small loop pool (or on a
spare virtio disk for direct-lvm) and is torn down (devices, pool, loop
devices) at the end.

The whole conformance suite runs on devicemapper as well (tests/conftest.py
parametrises it; tests/dmstore.py makes its stores cheap).
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest

import layerfs
from layerfs import errors

from conformance import mounted, register_bytes
from conftest import detach_mounts_under
from dmstore import SMALL, missing, require_dm, scratch, teardown_home
from tarbuild import LayerTar

REPO = Path(__file__).resolve().parent.parent

pytestmark = pytest.mark.vm


@pytest.fixture
def dm_home(tmp_path):
    require_dm()
    home = scratch(tmp_path) / "devicemapper"
    home.mkdir(parents=True)
    yield home
    teardown_home(home)
    shutil.rmtree(home.parent, ignore_errors=True)


def _driver(home: Path, **extra):
    from layerfs.drivers.devicemapper import DevicemapperDriver

    return DevicemapperDriver(home, {**SMALL, **extra})


def _thin_ids(drv) -> set[int]:
    ids = drv.thin_device_ids()
    assert ids is not None, "thin_ls (thin-provisioning-tools) is needed to list the pool's thin devices"
    return ids


def _known_ids(drv) -> set[int]:
    meta = drv._load()
    return {meta["base"]["device_id"]} | {r["device_id"] for r in meta["devices"].values()} | {
        r["device_id"] for r in meta["deferred"].values()}


# ---------------------------------------------------------------- driver level
def test_lifecycle_copy_on_write_grow_and_status(dm_home, caplog):
    from layerfs.drivers.devicemapper import LOOP_WARNING

    caplog.set_level(logging.WARNING, logger="layerfs.devicemapper")
    drv = _driver(dm_home)
    try:
        # loud once, when the loop pool is set up (not at every open: a CLI opens per command)
        assert [r.getMessage() for r in caplog.records].count(LOOP_WARNING) == 1
        caplog.clear()
        _driver(dm_home).close()
        assert LOOP_WARNING not in [r.getMessage() for r in caplog.records]
        st = drv.status()
        assert st["pool_kind"] == "loop" and "loop devices" in st["warning"]
        # the pool's metadata loop device bypasses the page cache (the pool caches it), the data one does not
        dio = {}
        for loop in Path("/sys/block").glob("loop*"):
            try:
                dio[(loop / "loop" / "backing_file").read_text().strip()] = (loop / "loop" / "dio").read_text().strip()
            except FileNotFoundError:
                continue  # not attached
        loops = os.path.realpath(dm_home / "loop")
        assert dio[os.path.join(loops, "metadata")] == "1" and dio[os.path.join(loops, "data")] == "0"
        assert st["data_total"] == 2 << 30 and 0 < st["data_used"] < st["data_total"]
        assert st["base_size"] == 512 << 20 and st["fs"] == "xfs"
        drv.create("l1", None)
        p = drv.get("l1")
        assert os.listdir(p) == []
        (p / "shared").write_bytes(b"from l1")
        (p / "gone").write_bytes(b"x")
        drv.put("l1")
        assert not drv.is_mounted("l1")
        drv.create("c1", "l1", writable=True)
        drv.create("c2", "l1", writable=True)
        p1, p2 = drv.get("c1"), drv.get("c2")
        assert drv.get("c1") == p1  # idempotent
        (p1 / "shared").write_bytes(b"changed in c1")
        os.unlink(p1 / "gone")
        assert (p2 / "shared").read_bytes() == b"from l1" and (p2 / "gone").exists()
        view = drv.get("l1", readonly=True)
        assert (view / "shared").read_bytes() == b"from l1" and (view / "gone").exists()
        with pytest.raises(OSError):
            (view / "new").write_bytes(b"ro")
        assert {c.path: c.kind for c in drv.changes("c1", "l1")} == {"/shared": "C", "/gone": "D"}
        os.setxattr(p2 / "gone", "user.note", b"v")  # xattr only: same size, mode and mtime
        assert {c.path: c.kind for c in drv.changes("c2", "l1")} == {"/gone": "C"}
        for i in ("l1", "c1", "c2"):
            drv.put(i)
        # a container larger than the base: device and filesystem grow
        drv.create("big", "l1", writable=True, size=1 << 30)
        p = drv.get("big")
        vfs = os.statvfs(p)
        assert vfs.f_blocks * vfs.f_frsize > 900 << 20
        assert (p / "shared").read_bytes() == b"from l1"
        with open(p / "blob", "wb") as f:
            f.write(os.urandom(16 << 20))
            os.fsync(f.fileno())
        drv.put("big")
        data_file = dm_home / "loop" / "data"
        allocated = os.stat(data_file).st_blocks * 512
        with pytest.raises(errors.InvalidOption, match="smaller"):
            drv.create("small", "l1", writable=True, size=100 << 20)
        assert drv.ids() == {"l1", "c1", "c2", "big"}
        assert _thin_ids(drv) == _known_ids(drv)
        used = drv.status()["data_used"]
        for i in ("big", "c2", "c1", "l1"):
            drv.remove(i)
        drv.remove("l1")  # a missing id is not an error
        assert drv.ids() == set()
        assert _thin_ids(drv) == _known_ids(drv) == {drv._load()["base"]["device_id"]}
        assert drv.status()["data_used"] <= used
        # dm.blkdiscard (on for loop pools) punched the removed devices' blocks out of the loop file
        assert os.stat(data_file).st_blocks * 512 < allocated - (12 << 20)
        assert drv.cleanup(repair=False, deep=True) == []
        prefix = drv.prefix
        drv.deactivate_all()
    finally:
        drv.close()
    from layerfs.drivers.devicemapper import dmioctl

    with dmioctl.Control() as ctl:
        assert [n for n in ctl.list_devices() if n.startswith(prefix)] == []
    assert not [n for n in os.listdir("/dev/mapper") if n.startswith(prefix)]
    # reopening sets the loop pool up again from its files (and warns again); the transaction id is unchanged
    caplog.clear()
    drv = _driver(dm_home)
    try:
        assert LOOP_WARNING in [r.getMessage() for r in caplog.records]
        assert drv.status()["devices"] == 0 and drv.status()["transaction_id"] == drv._load()["transaction_id"]
    finally:
        drv.close()


def test_graph_apply_whiteouts_and_pool_full_refusal(tmp_path):
    require_dm()
    root = scratch(tmp_path) / "root"
    # 1 GiB of data: the formatted base takes ~7%; 88% free required
    opts = {**SMALL, "dm.loopdatasize": "1G", "dm.min_free_space": "88%"}
    try:
        with layerfs.open_store(root, driver="devicemapper", options=opts) as s:
            lower = register_bytes(s, LayerTar().dir("etc").file("etc/a", b"a").file("etc/b", b"b").dir("d")
                                   .file("d/x", b"x").bytes())
            upper = register_bytes(s, LayerTar().whiteout("etc/a").opaque("d").file("d/y", b"y").bytes(),
                                   parent=lower.chain_id)
            with mounted(s, upper.chain_id) as mp:
                assert sorted(os.listdir(mp / "etc")) == ["b"]
                assert sorted(os.listdir(mp / "d")) == ["y"]
            s.create_container("c", upper.chain_id)
            with mounted(s, "c") as mp:
                with open(mp / "fill", "wb") as f:
                    for _ in range(96):  # ~9.4% of the pool: ~15.7% used, 84% free
                        f.write(os.urandom(1 << 20))
                    os.fsync(f.fileno())
            with pytest.raises(errors.LayerfsError) as info:
                s.create_container("refused", upper.chain_id)
            msg = str(info.value)
            assert "% full" in msg and "dm.min_free_space=88%" in msg and "dm.loopdatasize" in msg, msg
            assert [c.name for c in s.containers()] == ["c"]
            st = s.status()["probes"]
            assert st["data_percent"] > 12
            s.remove_container("c")
            s.create_container("fits-again", upper.chain_id)
    finally:
        teardown_home(root / "devicemapper")
        shutil.rmtree(root.parent, ignore_errors=True)


_KILLER = textwrap.dedent("""
    import os, signal, sys
    sys.path.insert(0, {repo!r})
    import layerfs
    from layerfs.drivers.devicemapper import dmioctl
    root, point, action = sys.argv[1:4]
    real = dmioctl.Control.message
    def message(self, name, msg, sector=0):
        out = real(self, name, msg, sector)
        if msg.startswith(point):
            os.kill(os.getpid(), signal.SIGKILL)
        return out
    dmioctl.Control.message = message
    s = layerfs.open_store(root, driver="devicemapper")
    if action == "create":
        s.create_container("victim", s.layers()[0].chain_id)
    else:
        s.remove_container("victim")
    print("not killed")
""")


def test_crash_between_pool_message_and_metadata_record(tmp_path):
    """kill -9 after each pool message of create and remove; reopening leaks no thin device, loses no layer."""
    require_dm()
    root = scratch(tmp_path) / "root"
    script = tmp_path / "killer.py"
    script.write_text(_KILLER.format(repo=str(REPO)))

    def kill_at(point: str, action: str) -> None:
        proc = subprocess.run([sys.executable, str(script), str(root), point, action], capture_output=True, text=True)
        assert proc.returncode == -9, (point, action, proc.returncode, proc.stdout, proc.stderr[-2000:])

    def check(container_expected: bool) -> None:
        with layerfs.open_store(root, driver="devicemapper") as s:
            drv = s.driver
            assert drv._load()["pending"] is None
            assert _thin_ids(drv) == _known_ids(drv), "a thin device leaked"
            assert [c.name for c in s.containers()] == (["victim"] if container_expected else [])
            assert s.check() == []
            with mounted(s, layer.chain_id) as mp:  # the layer is intact
                assert (mp / "keep").read_bytes() == b"kept"
            if container_expected:
                with mounted(s, "victim") as mp:
                    assert (mp / "keep").read_bytes() == b"kept"

    try:
        with layerfs.open_store(root, driver="devicemapper", options=SMALL) as s:
            layer = register_bytes(s, LayerTar().file("keep", b"kept").bytes())
        # create: killed after set_transaction_id (no device made yet), then after create_snap
        # (the device made, nothing recorded): the pool is one transaction ahead and the
        # driver deletes the id it would have recorded; the graph's intent drops the container
        for point in ("set_transaction_id", "create_snap"):
            kill_at(point, "create")
            check(container_expected=False)
        with layerfs.open_store(root, driver="devicemapper") as s:
            s.create_container("victim", layer.chain_id)
        # remove: killed after the delete message, before anything was recorded: finished on open
        kill_at("delete", "remove")
        check(container_expected=False)
    finally:
        teardown_home(root / "devicemapper")
        shutil.rmtree(root.parent, ignore_errors=True)


def _assert_pool_matches_record(drv) -> None:
    """The pool's transaction id and thin devices are exactly what the metadata records."""
    assert drv.pool_status().transaction_id == drv._load()["transaction_id"]
    assert _thin_ids(drv) == _known_ids(drv)


def test_get_mends_a_view_a_crash_left_half_made(dm_home):
    """A crash while a view was being made leaves the device mounted over mnt/<id> (and maybe the
    bind under it), or in an older layerfs's layout on mnt/<id>/dev: get makes a clean view of
    either, and put leaves nothing of the layer mounted."""
    from layerfs import _mountapi

    drv = _driver(dm_home)
    try:
        for id in ("new", "old"):
            drv.create(id, None)
            (drv.get(id) / "f").write_bytes(id.encode())
            drv.put(id)
        # the current layout, stopped between the bind and the device's umount
        mnt = drv._mnt("new")
        fd = os.open(mnt / "rootfs", os.O_PATH)
        drv._mount("new", drv._activate("new", drv._load()["devices"]["new"]), mnt, False)
        _mountapi.bind_onto(str(mnt / "rootfs"), fd)
        os.close(fd)
        # an older layerfs's layout: the device on mnt/<id>/dev, never unmounted
        mnt = drv._mnt("old")
        (mnt / "dev").mkdir()
        drv._mount("old", drv._activate("old", drv._load()["devices"]["old"]), mnt / "dev", False)
        _mountapi.mount(str(mnt / "dev" / "rootfs"), str(mnt / "rootfs"), "none", _mountapi.MS_BIND)
        for id in ("new", "old"):
            assert len(_mountapi.mounts_under(str(drv._mnt(id)))) == 2
            p = drv.get(id)
            assert p == drv._mnt(id) / "rootfs" and os.path.ismount(p) and (p / "f").read_bytes() == id.encode()
            # the older layout's view is whole and kept as it is; its staging mount goes with put
            assert str(p) in _mountapi.mounts_under(str(drv._mnt(id)))
            if id == "new":
                assert _mountapi.mounts_under(str(drv._mnt(id))) == [str(p)]
            drv.put(id)
            assert _mountapi.mounts_under(str(drv._mnt(id))) == [] and not drv.is_mounted(id)
    finally:
        drv.close()


def test_create_whose_record_cannot_be_written_leaves_nothing(dm_home, monkeypatch):
    """The metadata cannot be written after both messages: the device goes, and reopening finds nothing."""
    drv = _driver(dm_home)
    try:
        drv.create("a", None)
        before = _thin_ids(drv)

        def full(meta):
            raise OSError(28, "No space left on device")

        monkeypatch.setattr(drv, "_save", full)
        with pytest.raises(OSError, match="No space"):
            drv.create("b", "a")
        monkeypatch.undo()
        drv.close()
        drv = _driver(dm_home)  # the pool is one transaction ahead of the record: repaired on open
        assert drv.ids() == {"a"}
        assert _thin_ids(drv) == before
        _assert_pool_matches_record(drv)
        assert drv.cleanup(repair=False) == []
        drv.create("b", "a")
        assert drv.ids() == {"a", "b"}
    finally:
        drv.close()


def test_open_finishes_a_create_recorded_as_an_intent_by_an_older_layerfs(dm_home):
    """Older stores wrote a pending create before the messages: one that reached the pool is recorded on open."""
    drv = _driver(dm_home)
    try:
        drv.create("a", None)
        meta = drv._load()
        rec = meta["devices"].pop("a")
        meta["pending"] = {"op": "create", "key": "a", "device_id": rec["device_id"],
                           "transaction_id": meta["transaction_id"], "record": rec}
        meta["transaction_id"] -= 1
        meta["next_device_id"] = rec["device_id"]
        # ... in the older layout: metadata.json, written whole
        (dm_home / "metadata.slots").unlink()
        (dm_home / "metadata.json").write_text(json.dumps(meta))
        assert drv.cleanup(repair=False) == ["devicemapper: an interrupted create"]
        drv.close()
        drv = _driver(dm_home)
        assert drv.ids() == {"a"} and drv._load()["pending"] is None
        assert not (dm_home / "metadata.json").exists() and (dm_home / "metadata.slots").exists()
        _assert_pool_matches_record(drv)
    finally:
        drv.close()


def test_deferred_removal_and_deletion_of_a_busy_device(dm_home):
    drv = _driver(dm_home)
    try:
        drv.create("busy", None)
        drv.get("busy")
        drv.put("busy")
        drv._activate("busy", drv._load()["devices"]["busy"])
        name = drv._dm_name("busy")
        fd = os.open(f"/dev/mapper/{name}", os.O_RDONLY)
        try:
            # without deferral: the busy device cannot go, and nothing changes
            with pytest.raises(errors.InUse, match="still open"):
                drv.remove("busy")
            assert drv.ids() == {"busy"}
        finally:
            os.close(fd)
        drv.close()

        drv = _driver(dm_home, **{"dm.use_deferred_removal": "true", "dm.use_deferred_deletion": "true"})
        p = drv.get("busy")
        fd = os.open(f"/dev/mapper/{name}", os.O_RDONLY)
        try:
            drv.put("busy")  # unmounted; deactivation deferred
            assert not drv.is_mounted("busy")
            info = drv.ctl.info(name)
            assert info is not None and info.deferred_remove
            p = drv.get("busy")  # a deferred removal is cancelled by the next use
            assert not drv.ctl.info(name).deferred_remove
            (p / "f").write_bytes(b"still usable")
            drv.remove("busy")  # deletion deferred: gone for the caller
            assert drv.ids() == set() and drv.status()["deferred_deletions"] == 1
            assert drv.ctl.info(name).deferred_remove
        finally:
            os.close(fd)
        for _ in range(100):  # the kernel removes it from a workqueue after the last close
            if drv.ctl.info(name) is None:
                break
            time.sleep(0.05)
        assert drv.ctl.info(name) is None
        assert any("finished the deferred deletion of busy" in line for line in drv.cleanup())
        assert drv.status()["deferred_deletions"] == 0
        assert _thin_ids(drv) == _known_ids(drv)
    finally:
        drv.close()


def test_direct_lvm_on_a_spare_disk(tmp_path):
    """dm.directlvm_device: layerfs makes the PV, VG, thin pool and autoextend profile; reactivation works."""
    require_dm()
    disks = os.environ.get("LAYERFS_VM_SPARE_DISKS", "").split()
    if not disks:
        missing("no spare disk for direct-lvm (LAYERFS_VM_SPARE_DISKS)")
    from layerfs.drivers.devicemapper import DevicemapperDriver, pool as poolmod

    disk = disks[0]
    home = scratch(tmp_path) / "devicemapper"
    home.mkdir(parents=True)
    opts = {"dm.basesize": "512M", "dm.directlvm_device": disk, "dm.thinp_percent": "80", "dm.thinp_metapercent": "2",
            "dm.thinp_autoextend_threshold": "70", "dm.thinp_autoextend_percent": "25"}
    # a first setup that stopped halfway (this store's VG with a plain LV where the thin pool goes): started over
    from layerfs.drivers.devicemapper.config import directlvm_vg, pool_prefix

    half_vg = directlvm_vg(pool_prefix(home))
    poolmod.lvm("pvcreate", "-y", disk)
    poolmod.lvm("vgcreate", half_vg, disk)
    poolmod.lvm("lvcreate", "-y", "-n", "thinpool", "-l", "10%VG", half_vg)
    drv = DevicemapperDriver(home, opts)
    try:
        st = drv.status()
        assert st["pool_kind"] == "directlvm" and "warning" not in st
        vg_lv = drv.pool.lv
        row = poolmod.lvs(vg_lv)
        assert row["lv_attr"].startswith("t") and row["lv_profile"] == f"{vg_lv.split('/')[0]}-thinpool"
        assert 0.78 * (2 << 30) < int(row["lv_size"]) <= 0.8 * (2 << 30)
        profile = (poolmod.profile_dir() / f"{row['lv_profile']}.profile").read_text()
        assert "thin_pool_autoextend_threshold=70" in profile and "thin_pool_autoextend_percent=25" in profile
        drv.create("l", None)
        (drv.get("l") / "f").write_bytes(b"on lvm")
        drv.put("l")
        drv.create("c", "l", writable=True)
        assert (drv.get("c") / "f").read_bytes() == b"on lvm"
        drv.deactivate_all()
        drv.close()
        # the pool deactivated by lvm and opened again (lvm must accept our transaction id)
        poolmod.lvm("lvchange", "-an", vg_lv)
        drv = DevicemapperDriver(home, {"dm.directlvm_device": disk})
        assert (drv.get("c") / "f").read_bytes() == b"on lvm"
        assert _thin_ids(drv) == _known_ids(drv)
        # the same pool named as dm.thinpooldev by another store: refused, it is in use
        other = home.parent / "other"
        other.mkdir()
        with pytest.raises(errors.InvalidOption, match="already in use"):
            DevicemapperDriver(other, {"dm.basesize": "512M", "dm.thinpooldev": vg_lv})
        with pytest.raises(errors.InvalidOption, match="dm.directlvm_device"):
            DevicemapperDriver(home, {"dm.directlvm_device": disks[-1] if len(disks) > 1 else "/dev/null"})
        if len(disks) > 1:
            # a new store whose VG name is taken by an earlier store's VG on another disk: refused, named
            vg = vg_lv.split("/")[0]
            fresh = home.parent / "fresh"
            fresh.mkdir()
            with pytest.raises(errors.InvalidOption, match=f"volume group {vg}, left by an earlier store .* is on {disk}"):
                poolmod.setup_directlvm(drv.ctl, fresh, disks[-1], vg, 80, 2, 70, 25)
            assert poolmod.disk_signature(disks[-1]) is None, "the other disk was touched"
            assert not (fresh / "directlvm.json").exists()
        drv.deactivate_all()
    finally:
        vg_lv = drv.pool.lv if getattr(drv, "pool", None) else None
        drv.close()
        detach_mounts_under(home)
        _wipe_disk(disk, vg_lv.split("/")[0] if vg_lv else None)


_LVM_CONF = """\
config {{ profile_dir = "{profile_dir}" }}
activation {{ udev_sync = 0 udev_rules = 0 monitoring = 1 }}
devices {{ obtain_device_list_from_udev = 0 use_devicesfile = 0 }}
global {{ use_lvmpolld = 0 }}
"""


class _Dmeventd:
    """lvm's event daemon, started for one test with its own lvm configuration (LVM_SYSTEM_DIR).

    Its thin plugin watches the monitored pools (a status check at least every
    10 s) and runs ``lvm lvextend --use-policies`` in-process when a pool is past
    50% and the pool's profile says so.  The host's /etc/lvm is never used.
    """

    def __init__(self, system_dir: Path):
        self.env = {**os.environ, "LVM_SYSTEM_DIR": str(system_dir), "DM_DISABLE_UDEV": "1"}
        exe = shutil.which("dmeventd", path=os.environ.get("PATH", "") + ":/usr/sbin:/sbin")
        if exe is None:
            missing("dmeventd is not installed (apt-get install dmeventd)")
        if _alive_pid(Path("/run/dmeventd.pid")):
            missing("a dmeventd already runs here; this test starts its own, with its own lvm configuration")
        Path("/run/lvm").mkdir(exist_ok=True)
        self.log_path = system_dir / "dmeventd.log"
        with open(self.log_path, "wb") as log:
            self.proc = subprocess.Popen([exe, "-f", "-l"], stdout=log, stderr=subprocess.STDOUT, env=self.env)
        deadline = time.monotonic() + 60
        while not Path("/run/dmeventd-server").exists():
            assert self.proc.poll() is None, f"dmeventd exited {self.proc.returncode}: {self.log()}"
            assert time.monotonic() < deadline, f"dmeventd made no /run/dmeventd-server in 60 s: {self.log()}"
            time.sleep(0.2)

    def lvm(self, *args: str) -> str:
        """lvm with this daemon's configuration (monitoring on), not the driver's no-udev --config."""
        r = subprocess.run(["lvm", *args], check=False, capture_output=True, text=True, env=self.env)
        assert r.returncode == 0, f"lvm {' '.join(args)}: {r.stderr.strip()}"
        return r.stdout

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")[-2000:]

    def stop(self, lv: str | None) -> None:
        if lv:
            try:
                self.lvm("lvchange", "--monitor", "n", lv)   # dmeventd refuses to exit while it monitors
            except AssertionError as exc:
                sys.stderr.write(f"{exc}\n")
        self.proc.terminate()
        try:
            self.proc.wait(30)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()


def _alive_pid(pidfile: Path) -> bool:
    try:
        os.kill(int(pidfile.read_text().split()[0]), 0)
        return True
    except (OSError, ValueError, IndexError):
        return False


def test_direct_lvm_ext4_and_autoextend_by_dmeventd(tmp_path, monkeypatch):
    """dm.fs=ext4 through the whole store on a direct-lvm pool, and the autoextend profile applied by dmeventd.

    layerfs writes the pool's lvm profile (dm.thinp_autoextend_threshold /
    dm.thinp_autoextend_percent) and attaches it.  Here lvm's own dmeventd runs
    (started by the test, with an lvm configuration of its own: no udev,
    monitoring on) and the pool is monitored (``lvchange --monitor y``: the
    driver's own lvm calls turn monitoring off when no udev runs).  The pool is
    filled past the threshold through a container and nothing else is done:
    dmeventd must grow the pool's data LV by the profile's percentage, and the
    pool device the driver uses must show the new size.
    """
    require_dm()
    disks = os.environ.get("LAYERFS_VM_SPARE_DISKS", "").split()
    if len(disks) < 2:
        missing("no second spare disk for direct-lvm (LAYERFS_VM_SPARE_DISKS)")
    from layerfs.drivers.devicemapper import pool as poolmod

    disk = disks[1]
    root = scratch(tmp_path) / "root"
    lvm_dir = scratch(tmp_path) / "lvm"
    (lvm_dir / "profile").mkdir(parents=True)
    (lvm_dir / "lvm.conf").write_text(_LVM_CONF.format(profile_dir=lvm_dir / "profile"))
    monkeypatch.setenv("LVM_SYSTEM_DIR", str(lvm_dir))   # the driver's lvm calls: the profile goes there
    assert poolmod.profile_dir() == lvm_dir / "profile"
    # a small pool (20% of the 2 GiB disk) so that ~200 MB fills it past lvm's minimum threshold of 50%
    opts = {"dm.directlvm_device": disk, "dm.fs": "ext4", "dm.basesize": "256M", "dm.thinp_percent": "20",
            "dm.thinp_metapercent": "1", "dm.thinp_autoextend_threshold": "50",
            "dm.thinp_autoextend_percent": "20", "dm.min_free_space": "5%"}
    vg = vg_lv = daemon = None
    try:
        daemon = _Dmeventd(lvm_dir)
        with layerfs.open_store(root, driver="devicemapper", options=opts) as s:
            vg_lv = s.driver.pool.lv
            vg = vg_lv.split("/")[0]
            st = s.status()["probes"]
            assert st["fs"] == "ext4" and st["pool_kind"] == "directlvm"
            row = poolmod.lvs(vg_lv)
            assert row["lv_profile"] == f"{vg}-thinpool"
            profile = (lvm_dir / "profile" / f"{row['lv_profile']}.profile").read_text()
            assert "thin_pool_autoextend_threshold=50" in profile and "thin_pool_autoextend_percent=20" in profile
            daemon.lvm("lvchange", "--monitor", "y", vg_lv)
            assert daemon.lvm("lvs", "--noheadings", "-o", "seg_monitor", vg_lv).strip() == "monitored"
            size0, dm0 = int(row["lv_size"]), s.driver.pool_status().data_total

            lower = register_bytes(s, LayerTar().dir("etc").file("etc/a", b"a").file("etc/b", b"b").bytes())
            upper = register_bytes(s, LayerTar().whiteout("etc/a").file("etc/c", b"c").bytes(), parent=lower.chain_id)
            s.create_container("c", upper.chain_id, size=512 << 20)  # larger than the base: resize2fs
            peak = 0.0
            with mounted(s, "c") as mp:
                assert sorted(os.listdir(mp / "etc")) == ["b", "c"]
                with open("/proc/self/mounts") as f:
                    assert any(line.split()[1] == str(mp) and line.split()[2] == "ext4" for line in f)
                vfs = os.statvfs(mp)
                assert vfs.f_blocks * vfs.f_frsize > 400 << 20
                # fill the pool past the autoextend threshold (stop early if dmeventd already grew it)
                with open(mp / "fill", "wb") as f:
                    for _ in range(40):
                        f.write(os.urandom(8 << 20))
                        f.flush()
                        os.fsync(f.fileno())
                        ps = s.driver.pool_status()
                        peak = max(peak, ps.data_percent)
                        if ps.data_percent > 56 or ps.data_total > dm0:
                            break
            assert peak > 50 or s.driver.pool_status().data_total > dm0, \
                f"the pool was only {peak}% full; the policy would not extend it"
            # nothing but dmeventd extends the pool now; wait for it (its thin plugin checks every 10 s)
            deadline = time.monotonic() + 240
            while int(poolmod.lvs(vg_lv)["lv_size"]) < size0 * 1.19:
                assert daemon.proc.poll() is None, f"dmeventd exited {daemon.proc.returncode}: {daemon.log()}"
                assert time.monotonic() < deadline, (
                    f"dmeventd did not extend {vg_lv} within 240 s (size {size0}): {daemon.log()}")
                time.sleep(2)
            after_lv, after_dm = int(poolmod.lvs(vg_lv)["lv_size"]), s.driver.pool_status().data_total
            assert after_lv >= size0 * 1.19, (size0, after_lv)
            assert after_dm >= dm0 * 1.19, "the pool device the driver uses did not grow"
            s.create_container("after-extend", upper.chain_id)
        # reopened without dm.fs: the store's base filesystem (ext4) is used, not the xfs default
        with layerfs.open_store(root, driver="devicemapper", options={"dm.directlvm_device": disk}) as s:
            assert s.status()["probes"]["fs"] == "ext4"
            with mounted(s, "c") as mp:
                assert (mp / "etc/c").read_bytes() == b"c" and (mp / "fill").stat().st_size >= 8 << 20
            assert s.check() == []
            s.driver.deactivate_all()
    finally:
        if daemon is not None:
            daemon.stop(vg_lv)
        try:
            teardown_home(root / "devicemapper")
        except Exception as exc:  # noqa: BLE001 - the disk is wiped below anyway
            sys.stderr.write(f"teardown of {root}: {exc}\n")
        if vg is None:
            try:
                vg = str(poolmod.lvm("pvs", "--noheadings", "-o", "vg_name", disk)).strip() or None
            except poolmod.PoolError:
                vg = None
        _wipe_disk(disk, vg)
        shutil.rmtree(root.parent, ignore_errors=True)


def _wipe_disk(disk: str, vg: str | None) -> None:
    """Leave the spare disk blank, as the VM's other tests expect to find it."""
    from layerfs.drivers.devicemapper import pool as poolmod

    if vg:
        for args in (("vgremove", "-ff", "-y", vg), ("pvremove", "-ff", "-y", disk)):
            try:
                poolmod.lvm(*args)
            except poolmod.PoolError:
                pass
        (poolmod.profile_dir() / f"{vg}-thinpool.profile").unlink(missing_ok=True)
    with open(disk, "r+b") as f:
        f.write(bytes(1 << 20))
        os.fsync(f.fileno())

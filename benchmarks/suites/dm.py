"""dm: devicemapper per-layer steps (ioctls vs dmsetup vs the lvm CLI, each + mount) and a 200 MB apply vs overlay2.

Runs only where the kernel has device-mapper: on these machines, inside the
test VM (QEMU TCG, ~20x slower than the host, so only ratios mean anything):
``.venv/bin/python tests/vm/bench_dm.py`` boots the VM, runs this suite there
and copies results.json / results.md back (see that script).

Rows (subject: layerfs; reference after "vs"):

* ``dm.layer_cycle``: ``DevicemapperDriver.create(id, origin)`` + ``get(id)``:
  the pool status read (``dm.min_free_space``), the ``set_transaction_id`` and
  ``create_snap`` target messages, the metadata write (one slot, fdatasync), create + load ``thin`` table + resume
  and the /dev/mapper node, all ioctls, then mount(2) -- vs the same steps with
  the CLI on the same pool and origin: ``dmsetup status --noflush POOL`` (the
  driver's free-space read), ``dmsetup message POOL 0 "set_transaction_id T
  T+1"``, ``dmsetup message ... "create_snap N ORIGIN"``, ``dmsetup create
  NAME --table "0 S thin POOL N"`` (which makes the node: DM_DISABLE_UDEV=1),
  ``mount -t xfs -o nouuid`` -- and the same without the status read (the
  reference of earlier runs) -- and vs the steps an lvm
  user takes: ``lvcreate -s -n NAME VG/origin`` (a thin snapshot of the parent
  LV in the same thin pool), ``lvchange -ay -K VG/NAME``, ``mount``.  The lvm
  user's pool is lvm's own (a VG on a loop device of a sparse file on the same
  work filesystem, 64 KiB chunks, no zeroing, like the driver's loop pool), its
  parent LV formatted like the driver's base and holding the same files.  The
  four contenders run once per round in one run, their order varied from round
  to round (benchmarks.runner.round_orders).
* ``dm.snapshot_activate``: the same without the mount on every side.
* ``dm.layer_cycle_ext4``: ``dm.layer_cycle`` with ``dm.fs=ext4`` (and ext4 on
  the CLI paths' origins).
* ``dm.layer_cycle_directlvm``: ``dm.layer_cycle`` (xfs) on the production
  setup: a pool layerfs makes on a virtio disk of its own
  (``dm.directlvm_device``, the first of LAYERFS_VM_SPARE_DISKS, or
  LAYERFS_BENCH_DM_DISKS elsewhere), the lvm user's pool on the second disk.
  The disks must be empty: the driver refuses one with a signature, and the
  lvm contender is left out then.  Left out when there is no spare disk; run
  last, since a disk the driver refuses ends the suite.
* ``dm.mount``: mount(2) alone of a freshly activated snapshot, xfs
  (``nouuid``) vs ext4: what the filesystem's mount costs by itself.
* ``dm.apply_200MB``: ``store.register`` of a 200 MB layer tar on a
  devicemapper store (loop pool) vs the same tar on an overlay2 store on the
  same filesystem.

Each round makes a fresh snapshot (or layer); unmounting, deactivating and
deleting it afterwards is untimed, and every timed round starts after a
``sync`` (untimed), so no round pays for the writeback of an earlier one.
The CLI path's device ids are far above the driver's, and its transaction id
is set back after each round, so the driver's bookkeeping stays right.  lvm's
CLI calls get the configuration the driver's own lvm calls get where no udev
runs (``pool.NO_UDEV_CONFIG``), and otherwise lvm's defaults (VG metadata
archive and backup on).
``LAYERFS_BENCH_DM_APPLY=0`` leaves the apply row out.  The apply tar is copied to the work
directory once (untimed) and read through before every round.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

from .. import synth
from ..runner import Benchmark, Contender, SkipBenchmark, Target, stopwatch

ORIGIN_FILES = 200
CLI_ID_BASE = 1_000_000          # thin device ids of the CLI path: never the driver's
APPLY_SPEC = synth.TreeSpec(files=2_000, total_bytes=200_000_000, seed=5, tag="dm")
APPLY_SPEC_QUICK = synth.TreeSpec(files=500, total_bytes=50_000_000, seed=5, tag="dm")
#: A devicemapper store big enough for the 200 MB layer (sparse loop files).
APPLY_OPTS = {"dm.basesize": "1G", "dm.loopdatasize": "4G", "dm.loopmetadatasize": "64M"}
CYCLE_OPTS = {"dm.basesize": "512M", "dm.loopdatasize": "2G", "dm.loopmetadatasize": "16M"}
#: The per-layer row on a direct-lvm pool (the first spare disk; lvm's own pool on the second).
DIRECTLVM_OPTS = {"dm.basesize": "512M"}


def _log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


def _dm_unavailable() -> str | None:
    from layerfs.drivers.devicemapper import dmioctl

    if os.geteuid() != 0:
        return "needs root"
    try:
        dmioctl.kernel_version()
    except OSError as e:
        return (f"no working device-mapper here ({dmioctl.CONTROL_PATH}: {os.strerror(e.errno)}); "
                "run it in the VM: .venv/bin/python tests/vm/bench_dm.py")
    for tool in ("dmsetup", "mount"):
        if not shutil.which(tool, path=os.environ.get("PATH", "") + ":/usr/sbin:/sbin"):
            raise SkipBenchmark(f"{tool} is not installed")
    return None


def _mount(fs: str, device: str, mnt) -> None:
    """Mount a thin snapshot as the CLI contenders do (xfs needs nouuid: snapshots share the origin's UUID)."""
    _run("mount", "-t", fs, "-o", "nouuid" if fs == "xfs" else "defaults", device, str(mnt))


def _quiet() -> None:
    """Before every timed round (untimed): write back what earlier rounds left dirty.

    Why: the contenders alternate, and each round's untimed teardown (umount,
    discard, lvremove, device removal) leaves dirty pages of the loop files and
    journal commits that the kernel would otherwise write back during the next
    contender's timed round, charging one contender for another's cleanup.
    """
    os.sync()


def _run(*cmd: str) -> None:
    r = subprocess.run(cmd, capture_output=True, text=True, env={**os.environ, "DM_DISABLE_UDEV": "1"})
    if r.returncode != 0:
        raise RuntimeError(f"`{' '.join(cmd)}` exited {r.returncode}: {r.stderr.strip()[-300:]}")


class IoctlCycle:
    """The driver's own path: one snapshot made, activated and (with *mount*) mounted per round."""

    def __init__(self, drv, mount: bool = True):
        self.drv, self.mount, self.n = drv, mount, 0

    def once(self) -> float:
        self.n += 1
        key = f"io{self.n}"
        drv = self.drv
        try:
            _quiet()
            with stopwatch() as t:
                drv.create(key, "origin")
                if self.mount:
                    drv.get(key)
                else:
                    drv._activate(key, drv._load()["devices"][key])
        finally:
            drv.put(key)
            drv.remove(key)
        return t.elapsed


class CliCycle:
    """The same steps with dmsetup and mount(8), on the driver's pool and origin.

    With *check_free*, first ``dmsetup status --noflush POOL``: the read of the pool's
    free space that the driver makes before every snapshot (``dm.min_free_space``),
    the same ioctl (DM_TABLE_STATUS with DM_NOFLUSH_FLAG) as the driver's.
    """

    def __init__(self, drv, scratch: Path, mount: bool = True, check_free: bool = True):
        self.drv, self.scratch, self.mount, self.check_free, self.n = drv, scratch, mount, check_free, 0
        rec = drv._load()["devices"]["origin"]
        self.origin_id, self.sectors = rec["device_id"], rec["size"] // 512

    def once(self) -> float:
        from layerfs.drivers.devicemapper import dmioctl

        self.n += 1
        drv = self.drv
        pool = drv.pool.name
        dev_id = CLI_ID_BASE + self.n
        name = f"{drv.prefix}-cli{self.n}"
        mnt = self.scratch / f"cli{self.n}"
        mnt.mkdir()
        txn = drv.pool_status().transaction_id
        state = []
        try:
            _quiet()
            with stopwatch() as t:
                if self.check_free:
                    _run("dmsetup", "status", "--noflush", pool)
                _run("dmsetup", "message", pool, "0", f"set_transaction_id {txn} {txn + 1}")
                state.append("txn")
                _run("dmsetup", "message", pool, "0", f"create_snap {dev_id} {self.origin_id}")
                state.append("snap")
                _run("dmsetup", "create", name, "--table",
                     f"0 {self.sectors} thin {drv.pool.dev_string} {dev_id}")
                state.append("dev")
                if self.mount:
                    _mount(drv.fs, f"/dev/mapper/{name}", mnt)
                    state.append("mnt")
        finally:
            if "mnt" in state:
                _run("umount", str(mnt))
            if "dev" in state:
                drv.ctl.remove(name)
                Path(dmioctl.MAPPER_DIR, name).unlink(missing_ok=True)
            if "snap" in state:
                drv.ctl.message(pool, dmioctl.msg_delete(dev_id))
            if "txn" in state:
                drv.ctl.message(pool, dmioctl.msg_set_transaction_id(txn + 1, txn))
            mnt.rmdir()
        return t.elapsed


class LvmUser:
    """An lvm user's thin pool and parent LVs: a VG on *disk*, or on a loop device of a sparse file in *scratch*."""

    def __init__(self, scratch: Path, disk: str | None = None):
        from layerfs.drivers.devicemapper import pool as poolmod

        self.lvm = poolmod.lvm
        self.scratch, self.img = scratch, None
        if disk is not None:
            self.loop = disk
        else:
            self.img = scratch / "lvm-pv.img"
            with open(self.img, "wb") as f:
                f.truncate(2 << 30)
            r = subprocess.run(["losetup", "--find", "--show", str(self.img)], check=False, capture_output=True, text=True)
            if r.returncode != 0:
                raise RuntimeError(f"losetup {self.img}: {r.stderr.strip()}")
            self.loop = r.stdout.strip()
        self.vg = f"lfsbench{os.getpid()}{'d' if disk else ''}"
        self.origins: dict[str, str] = {}
        self.lvm("pvcreate", "-y", self.loop)
        self.lvm("vgcreate", self.vg, self.loop)
        # like the driver's loop pool: 64 KiB blocks, no block zeroing, 16 MiB metadata
        self.lvm("lvcreate", "-y", "--type", "thin-pool", "-L", "1800M", "--poolmetadatasize", "16M",
                 "-c", "64k", "--zero", "n", "-n", "pool", self.vg)

    def make_origin(self, fs: str, size_bytes: int, files: int) -> str:
        """A parent LV formatted as the driver formats its base, holding *files* files in rootfs/; left inactive."""
        lv = f"origin{fs}"
        self.lvm("lvcreate", "-y", "-T", f"{self.vg}/pool", "-V", f"{size_bytes // 1024}k", "-n", lv)
        dev = f"/dev/mapper/{self.vg}-{lv}"
        if fs == "xfs":
            _run("mkfs.xfs", "-f", "-q", "-K", dev)
        else:
            _run("mkfs.ext4", "-q", "-F", "-E", "nodiscard,lazy_itable_init=0,lazy_journal_init=0", dev)
        mnt = self.scratch / f"mnt-{lv}"
        mnt.mkdir()
        _run("mount", "-t", fs, dev, str(mnt))
        try:
            (mnt / "rootfs").mkdir(mode=0o755)
            for i in range(files):
                (mnt / "rootfs" / f"f{i}").write_bytes(b"origin %d\n" % i)
        finally:
            _run("umount", str(mnt))
            mnt.rmdir()
        self.lvm("lvchange", "-an", f"{self.vg}/{lv}")
        self.origins[fs] = lv
        return lv

    def close(self) -> None:
        for args in (("vgremove", "-ff", "-y", self.vg), ("pvremove", "-ff", "-y", self.loop)):
            try:
                self.lvm(*args)
            except Exception as e:  # noqa: BLE001 - cleanup must not hide results
                _log(f"[dm] lvm {args[0]}: {e}")
        if self.img is not None:
            subprocess.run(["losetup", "-d", self.loop], check=False, capture_output=True)
            self.img.unlink(missing_ok=True)


class LvmCycle:
    """The same per-layer steps as an lvm user takes them: lvcreate -s, lvchange -ay -K, mount."""

    def __init__(self, user: LvmUser, fs: str, scratch: Path, mount: bool = True):
        self.user, self.fs, self.scratch, self.mount, self.n = user, fs, scratch, mount, 0
        self.origin = user.origins[fs]

    def once(self) -> float:
        self.n += 1
        vg, lvm = self.user.vg, self.user.lvm
        name = f"s{self.fs}{self.n}" + ("m" if self.mount else "")
        mnt = self.scratch / f"lvm-{name}"
        mnt.mkdir()
        state = []
        try:
            _quiet()
            with stopwatch() as t:
                lvm("lvcreate", "-s", "-n", name, f"{vg}/{self.origin}")
                state.append("lv")
                lvm("lvchange", "-ay", "-K", f"{vg}/{name}")
                if self.mount:
                    _mount(self.fs, f"/dev/mapper/{vg}-{name}", mnt)
                    state.append("mnt")
        finally:
            if "mnt" in state:
                _run("umount", str(mnt))
            if "lv" in state:
                lvm("lvremove", "-y", f"{vg}/{name}")
            mnt.rmdir()
        return t.elapsed


class MountOnly:
    """mount(2) alone of a freshly made and activated snapshot (the view's bind mount not included)."""

    def __init__(self, drv, scratch: Path, options: str | None):
        self.drv, self.scratch, self.options, self.n = drv, scratch, options, 0

    def once(self) -> float:
        from layerfs import _mountapi

        self.n += 1
        drv, key = self.drv, f"mo{self.n}"
        mnt = self.scratch / f"{drv.fs}-{key}"
        mnt.mkdir()
        drv.create(key, "origin")
        mounted = False
        try:
            dev = drv._activate(key, drv._load()["devices"][key])
            _quiet()
            with stopwatch() as t:
                _mountapi.mount(dev, str(mnt), drv.fs, 0, self.options)
            mounted = True
        finally:
            if mounted:
                _mountapi.umount(str(mnt))
            drv._deactivate(key)
            drv.remove(key)
            mnt.rmdir()
        return t.elapsed


def _origin(drv) -> None:
    drv.create("origin", None)
    root = drv.get("origin")
    for i in range(ORIGIN_FILES):
        (root / f"f{i}").write_bytes(b"origin %d\n" % i)
    drv.put("origin")


def _cycle_row(name, drv, lvm_user, scratch, mount: bool, fs_note: str = "", opts: dict = CYCLE_OPTS):
    fs = drv.fs
    plus = " + mount" if mount else ""
    cli, bare, lvm_name = f"dmsetup{plus}", f"dmsetup, no free-space read{plus}", f"lvm CLI{plus}"
    if mount:
        desc = f"one thin snapshot of a layer: create + activate + mount{fs_note} (ioctls vs dmsetup vs lvm CLI, + mount)"
        target = Target.ratio(0.2, "≥ 5× faster (≤ 0.2× dmsetup + mount)")
        notes = ["untimed per round: unmount, deactivate, delete the snapshot (and, for the dmsetup path, "
                 "set the pool's transaction id back; for the lvm path, lvremove)",
                 "the ioctl path mounts the device over the view's directory, binds its rootfs/ onto the covered view "
                 "and unmounts the device (3 mount calls); the CLI paths mount once",
                 "the ioctl path also writes its metadata once (pwrite + fdatasync of one slot) for crash safety; "
                 "the dmsetup paths keep no record; lvm writes its VG metadata (and archive/backup copies)"]
    else:
        desc = "one thin snapshot of a layer: create + activate, no mount (ioctls vs dmsetup vs lvm CLI)"
        target = Target.ratio(0.2, "≥ 5× faster (≤ 0.2× dmsetup)")
        notes = ["the same steps as dm.layer_cycle without the mount: the process spawns against the ioctls"]
    notes.append(f"{cli!r} takes the driver's steps: the pool's free space (dmsetup status --noflush, the "
                 "driver's dm.min_free_space check), set_transaction_id, create_snap, create; "
                 f"{bare!r} leaves out the status read (the reference of earlier runs)")
    contenders = [Contender("layerfs ioctl", IoctlCycle(drv, mount=mount).once,
                            info={"path": "DevicemapperDriver.create + " + ("get" if mount else "_activate")}),
                  Contender(cli, CliCycle(drv, scratch, mount=mount).once, role="reference",
                            info={"commands": "dmsetup status --noflush, dmsetup message x2, dmsetup create" + (", mount" if mount else "")}),
                  Contender(bare, CliCycle(drv, scratch, mount=mount, check_free=False).once, role="reference",
                            info={"commands": "dmsetup message x2, dmsetup create" + (", mount" if mount else "")})]
    if lvm_user is not None:
        contenders.append(Contender(lvm_name, LvmCycle(lvm_user, fs, scratch, mount=mount).once, role="reference",
                                    info={"commands": "lvcreate -s, lvchange -ay -K" + (", mount" if mount else ""),
                                          "pool": f"lvm thin pool on {'a loop device' if lvm_user.img else lvm_user.loop} "
                                                  "(64 KiB chunks, --zero n)"}))
        notes.append("lvm CLI: the pool is lvm's own, " + (
            "on a loop device of a sparse file on the same work filesystem" if lvm_user.img else
            f"on a second virtio disk ({lvm_user.loop}) like the driver's ({drv.pool.source})")
            + "; lvm gets the driver's no-udev --config and otherwise its defaults")
    else:
        notes.append("lvm CLI: not measured here (lvm2 or losetup missing)")
    return Benchmark(
        name=name, description=desc, contenders=contenders,
        subject="layerfs ioctl", reference=cli, target=target,
        runs=9, quick_runs=3, warmup=1,
        workload={"pool": drv.pool.kind, "fs": fs, "origin_files": ORIGIN_FILES, "basesize": opts["dm.basesize"]},
        notes=notes,
    )


def _layer_cycle(ctx):
    from layerfs.drivers.devicemapper import DevicemapperDriver, pool as poolmod

    drivers = {}
    lvm_user = lvm_disk_user = None
    try:
        for fs in ("xfs", "ext4"):
            home = ctx.scratch(f"dm-cycle-{fs}") / "devicemapper"
            home.mkdir()
            drivers[fs] = DevicemapperDriver(home, {**CYCLE_OPTS, "dm.fs": fs})
            _origin(drivers[fs])
        if all(shutil.which(t, path=os.environ.get("PATH", "") + ":/usr/sbin:/sbin") for t in ("lvm", "losetup")):
            lvm_user = LvmUser(ctx.scratch("dm-lvm-user"))
            for fs in drivers:
                lvm_user.make_origin(fs, drivers[fs]._load()["devices"]["origin"]["size"], ORIGIN_FILES)
        scratch = ctx.scratch("dm-cli-mnt")
        yield _cycle_row("dm.snapshot_activate", drivers["xfs"], lvm_user, scratch, mount=False)
        yield _cycle_row("dm.layer_cycle", drivers["xfs"], lvm_user, scratch, mount=True)
        yield _cycle_row("dm.layer_cycle_ext4", drivers["ext4"], lvm_user, scratch, mount=True, fs_note=" (ext4)")
        yield Benchmark(
            name="dm.mount",
            description="mount(2) alone of a freshly activated thin snapshot: xfs (nouuid) vs ext4",
            contenders=[Contender("xfs", MountOnly(drivers["xfs"], scratch, "nouuid").once,
                                  info={"options": "nouuid"}),
                        Contender("ext4", MountOnly(drivers["ext4"], scratch, None).once, role="reference",
                                  info={"options": "(none)"})],
            subject="xfs", reference="ext4",
            runs=9, quick_runs=3, warmup=1,
            workload={"pool": "loop", "origin_files": ORIGIN_FILES, "basesize": CYCLE_OPTS["dm.basesize"]},
            notes=["untimed per round: create + activate before, unmount + deactivate + delete after",
                   "both formatted by the driver (mkfs.xfs -K; mkfs.ext4 -E nodiscard,lazy_itable_init=0,"
                   "lazy_journal_init=0)"],
        )
        # The production setup, last (a disk it cannot use ends the suite): a pool layerfs
        # makes on a disk of its own (dm.directlvm_device).
        disks = os.environ.get("LAYERFS_VM_SPARE_DISKS", os.environ.get("LAYERFS_BENCH_DM_DISKS", "")).split()
        if disks:
            home = ctx.scratch("dm-cycle-directlvm") / "devicemapper"
            home.mkdir()
            drivers["directlvm"] = DevicemapperDriver(home, {**DIRECTLVM_OPTS, "dm.directlvm_device": disks[0]})
            _origin(drivers["directlvm"])
            sig = poolmod.disk_signature(disks[1]) if lvm_user is not None and len(disks) > 1 else "no disk"
            if sig is None:  # never let the lvm user's `pvcreate -y` wipe a disk that holds something
                lvm_disk_user = LvmUser(ctx.scratch("dm-lvm-user-disk"), disk=disks[1])
                lvm_disk_user.make_origin("xfs", drivers["directlvm"]._load()["devices"]["origin"]["size"], ORIGIN_FILES)
            else:
                _log(f"[dm] dm.layer_cycle_directlvm: no lvm contender (second disk: {sig})")
            yield _cycle_row("dm.layer_cycle_directlvm", drivers["directlvm"], lvm_disk_user, scratch, mount=True,
                             fs_note=" (direct-lvm pool on a virtio disk)", opts=DIRECTLVM_OPTS)
        else:
            _log("[dm] dm.layer_cycle_directlvm: no spare disk (LAYERFS_VM_SPARE_DISKS / LAYERFS_BENCH_DM_DISKS); left out")
    finally:
        for user in (lvm_user, lvm_disk_user):
            if user is not None:
                user.close()
        for drv in drivers.values():
            drv.deactivate_all()
            drv.close()


def _apply(ctx):
    layerfs = ctx.layerfs()
    spec = ctx.pick(APPLY_SPEC, APPLY_SPEC_QUICK)
    given = os.environ.get("LAYERFS_BENCH_DM_TAR")
    src = Path(given) if given and ctx.pick(True, False) else synth.cached_tar(spec, ctx.cache_dir)[0]
    tar = ctx.scratch("dm-apply-input") / "layer.tar"
    shutil.copyfile(src, tar)   # on the work filesystem, like the stores
    stores = {}
    try:
        for d, opts in (("devicemapper", APPLY_OPTS), ("overlay2", None)):
            stores[d] = layerfs.open_store(str(ctx.scratch(f"dm-apply-{d}")), driver=d, options=opts)

        def once(d):
            def run() -> float:
                s = stores[d]
                _quiet()
                with stopwatch() as t:
                    layer = s.register(str(tar))
                s.release(layer.chain_id)
                s.gc()
                return t.elapsed
            return run

        yield Benchmark(
            name="dm.apply_200MB" if not ctx.quick else "dm.apply_50MB",
            description=f"register a {tar.stat().st_size / 1e6:.0f} MB layer tar: devicemapper vs overlay2",
            contenders=[Contender("devicemapper", once("devicemapper"), info={"options": APPLY_OPTS}),
                        Contender("overlay2", once("overlay2"), role="reference")],
            subject="devicemapper", reference="overlay2",
            runs=5, quick_runs=2, warmup=1,
            workload={"layer": synth.lognormal_note(spec) if not given or ctx.quick else str(src),
                      "tar_bytes": tar.stat().st_size},
            between_rounds=lambda: synth.read_through(tar),
            notes=["untimed per round: release + gc of the layer (devicemapper: blkdiscard + delete of its "
                   "thin device)", "both stores and the tar are on the same filesystem (the work dir)"],
        )
    finally:
        for s in stores.values():
            drv = s.driver
            s.close()
            if hasattr(drv, "deactivate_all"):
                try:
                    from layerfs.drivers.devicemapper import DevicemapperDriver
                    again = DevicemapperDriver(drv.home, {})
                    again.deactivate_all()
                    again.close()
                except Exception as e:  # noqa: BLE001 - cleanup must not hide results
                    _log(f"[dm] cleanup of {drv.home}: {e}")


def suite(ctx):
    ctx.layerfs()
    why = _dm_unavailable()
    if why:
        raise SkipBenchmark(why)
    yield from _layer_cycle(ctx)
    if os.environ.get("LAYERFS_BENCH_DM_APPLY", "1") != "0":
        yield from _apply(ctx)

"""dm: devicemapper per-layer steps (ioctls vs dmsetup + mount) and a 200 MB apply vs overlay2.

Runs only where the kernel has device-mapper: on these machines, inside the
test VM (QEMU TCG, ~20x slower than the host, so only ratios mean anything):
``.venv/bin/python tests/vm/bench_dm.py`` boots the VM, runs this suite there
and copies results.json / results.md back (see that script).

Rows (subject: layerfs; reference after "vs"):

* ``dm.layer_cycle``: ``DevicemapperDriver.create(id, origin)`` + ``get(id)``:
  the ``create_snap`` and ``set_transaction_id`` target messages, the
  metadata.json steps (fsynced writes), create + load ``thin`` table + resume
  and the /dev/mapper node, all ioctls, then mount(2) -- vs the same steps with
  the CLI on the same pool and origin: ``dmsetup message POOL 0 "create_snap N
  ORIGIN"``, ``dmsetup message ... "set_transaction_id T T+1"``, ``dmsetup
  create NAME --table "0 S thin POOL N"`` (which makes the node:
  DM_DISABLE_UDEV=1), ``mount -t xfs -o nouuid``.
* ``dm.snapshot_activate``: the same without the mount on either side.
* ``dm.apply_200MB``: ``store.register`` of a 200 MB layer tar on a
  devicemapper store (loop pool) vs the same tar on an overlay2 store on the
  same filesystem.

Each round makes a fresh snapshot (or layer); unmounting, deactivating and
deleting it afterwards is untimed.  The CLI path's device ids are far above
the driver's, and its transaction id is set back after each round, so the
driver's bookkeeping stays right.  The apply tar is copied to the work
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
    """The same steps with dmsetup and mount(8), on the driver's pool and origin."""

    def __init__(self, drv, scratch: Path, mount: bool = True):
        self.drv, self.scratch, self.mount, self.n = drv, scratch, mount, 0
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
            with stopwatch() as t:
                _run("dmsetup", "message", pool, "0", f"create_snap {dev_id} {self.origin_id}")
                state.append("snap")
                _run("dmsetup", "message", pool, "0", f"set_transaction_id {txn} {txn + 1}")
                state.append("txn")
                _run("dmsetup", "create", name, "--table",
                     f"0 {self.sectors} thin {drv.pool.dev_string} {dev_id}")
                state.append("dev")
                if self.mount:
                    _run("mount", "-t", drv.fs, "-o", "nouuid" if drv.fs == "xfs" else "defaults",
                         f"/dev/mapper/{name}", str(mnt))
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


def _layer_cycle(ctx):
    from layerfs.drivers.devicemapper import DevicemapperDriver

    home = ctx.scratch("dm-cycle") / "devicemapper"
    home.mkdir()
    drv = DevicemapperDriver(home, CYCLE_OPTS)
    try:
        drv.create("origin", None)
        root = drv.get("origin")
        for i in range(ORIGIN_FILES):
            (root / f"f{i}").write_bytes(b"origin %d\n" % i)
        drv.put("origin")
        scratch = ctx.scratch("dm-cli-mnt")
        yield Benchmark(
            name="dm.snapshot_activate",
            description="one thin snapshot of a layer: create + activate, no mount (ioctls vs dmsetup)",
            contenders=[Contender("layerfs ioctl", IoctlCycle(drv, mount=False).once,
                                  info={"path": "DevicemapperDriver.create + _activate"}),
                        Contender("dmsetup", CliCycle(drv, scratch, mount=False).once, role="reference",
                                  info={"commands": "dmsetup message x2, dmsetup create"})],
            subject="layerfs ioctl", reference="dmsetup",
            target=Target.ratio(0.2, "≥ 5× faster (≤ 0.2× dmsetup)"),
            runs=9, quick_runs=3, warmup=1,
            workload={"pool": "loop", "fs": drv.fs, "origin_files": ORIGIN_FILES},
            notes=["the same steps as dm.layer_cycle without the mount: the process spawns against the ioctls"],
        )
        yield Benchmark(
            name="dm.layer_cycle",
            description="one thin snapshot of a layer: create + activate + mount (ioctls vs dmsetup + mount)",
            contenders=[Contender("layerfs ioctl", IoctlCycle(drv).once,
                                  info={"path": "DevicemapperDriver.create + get"}),
                        Contender("dmsetup + mount", CliCycle(drv, scratch).once, role="reference",
                                  info={"commands": "dmsetup message x2, dmsetup create, mount"})],
            subject="layerfs ioctl", reference="dmsetup + mount",
            target=Target.ratio(0.2, "≥ 5× faster (≤ 0.2× dmsetup + mount)"),
            runs=9, quick_runs=3, warmup=1,
            workload={"pool": "loop", "fs": drv.fs, "origin_files": ORIGIN_FILES, "basesize": CYCLE_OPTS["dm.basesize"]},
            notes=["untimed per round: unmount, deactivate, delete the snapshot (and, for the CLI path, "
                   "set the pool's transaction id back)",
                   "the ioctl path also writes metadata.json three times (fsync) for crash safety; "
                   "the CLI path keeps no record at all"],
        )
    finally:
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
    yield from _apply(ctx)

"""snapshot: containerd's snapshot lifecycle vs layerfs containers, step by step.

Input: the pull suite's 3-layer image (:mod:`benchmarks.image`). layerfs: its three
layer tars registered into one store per driver. containerd: a private
containerd (overlayfs snapshotter, :mod:`benchmarks.peers.daemons`) into which
the image's docker-archive is imported (``ctr image import``, unpacked), once,
untimed. Every round runs the whole cycle on a fresh container / snapshot and
times one step of it:

============  ==========================================  ===============================================
row           layerfs (per driver)                        ctr (overlayfs snapshotter)
============  ==========================================  ===============================================
prepare       ``create_container`` + ``mount``            ``ctr snapshots prepare`` + ``ctr snapshots
                                                          mounts`` + mount(2) of what it prints
commit        ``unmount`` + ``commit`` (export + apply)   umount(2) + ``ctr snapshots commit``
remove        ``remove_container`` + ``release``          ``ctr snapshots rm``
============  ==========================================  ===============================================

podman (overlay, vfs, overlay + fuse-overlayfs; :mod:`benchmarks.peers.podman`)
runs the same cycle with ``podman create``+``mount`` / ``umount``+``commit`` /
``rm``+``rmi``; unlike ``ctr``, ``podman commit`` computes and stores the diff.

Between prepare and commit, 100 small files are written into the mount (untimed).
The work is not identical, and the table says so: ``ctr snapshots commit`` only
marks the upper directory read-only in containerd's metadata (the diff is
computed later, by ``ctr``'s differ, when an image is built), while
``store.commit`` exports the container's diff as a tar and registers it as a new
layer (content-addressed, diff id verified). Every ``ctr`` step pays a Go client
start and a gRPC connection (~10-30 ms), as a user of ``ctr`` does.
"""

from __future__ import annotations

import os
import shlex
import subprocess
import sys
from pathlib import Path

from .. import image as bench_image
from .. import mounts
from .. import peers as bench_peers
from ..context import discard_store
from ..peers.daemons import Containerd, DaemonFailed
from ..runner import Benchmark, Contender, SkipBenchmark, stopwatch

NFILES = 100


def _log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


def _write_files(root: Path) -> None:
    d = root / "bench-snapshot"
    d.mkdir()
    for i in range(NFILES):
        (d / f"f{i}").write_bytes(b"snapshot %d\n" % i)


class LayerfsCycle:
    def __init__(self, driver: str, store, top: str):
        self.driver, self.store, self.top = driver, store, top
        self.n = 0

    def run(self, step: str) -> float:
        self.n += 1
        name = f"snap-{self.n}"
        s = self.store
        times = {}
        layer = None
        try:
            with stopwatch() as t:
                s.create_container(name, self.top)
                m = Path(s.mount(name))
            times["prepare"] = t.elapsed
            _write_files(m)
            with stopwatch() as t:
                s.unmount(name)
                layer = s.commit(name)
            times["commit"] = t.elapsed
            with stopwatch() as t:
                s.remove_container(name)
                s.release(layer.chain_id)
            times["remove"] = t.elapsed
            layer = None
        finally:
            if name in {c.name for c in s.containers()}:
                s.remove_container(name, force=True)
            if layer is not None:
                s.release(layer.chain_id)
        return times[step]


class CtrCycle:
    def __init__(self, daemon: Containerd, parent: str, scratch: Path):
        self.d, self.parent, self.scratch = daemon, parent, scratch
        self.n = 0

    def ctr(self, *args: str) -> str:
        r = subprocess.run(self.d.ctr + list(args), capture_output=True, text=True)
        if r.returncode != 0:
            raise RuntimeError(f"ctr {' '.join(args)} exited {r.returncode}: {r.stderr.strip()[-300:]}")
        return r.stdout

    def _mount(self, key: str, target: Path) -> None:
        cmd = shlex.split(self.ctr("snapshots", "mounts", str(target), key).strip())
        # "mount -t overlay overlay -o lowerdir=...,upperdir=...,workdir=... TARGET"
        fstype = cmd[cmd.index("-t") + 1]
        opts = cmd[cmd.index("-o") + 1]
        mounts.mount(fstype, target, fstype, opts)

    def run(self, step: str) -> float:
        self.n += 1
        key, name = f"active-{self.n}", f"committed-{self.n}"
        target = self.scratch / f"m{self.n}"
        target.mkdir()
        times = {}
        state = None
        try:
            with stopwatch() as t:
                self.ctr("snapshots", "prepare", key, self.parent)
                state = "active"
                self._mount(key, target)
            times["prepare"] = t.elapsed
            state = "mounted"
            _write_files(target)
            with stopwatch() as t:
                mounts.umount(target)
                state = "active"
                self.ctr("snapshots", "commit", name, key)
                state = "committed"
            times["commit"] = t.elapsed
            with stopwatch() as t:
                self.ctr("snapshots", "rm", name)
                state = None
            times["remove"] = t.elapsed
        finally:
            if state == "mounted":
                mounts.umount(target, detach=True)
                state = "active"
            if state == "active":
                subprocess.run(self.d.ctr + ["snapshots", "rm", key], capture_output=True)
            elif state == "committed":
                subprocess.run(self.d.ctr + ["snapshots", "rm", name], capture_output=True)
            os.rmdir(target)
        return times[step]


class PodmanCycle:
    """podman create + mount / umount + commit / rm + rmi, each a podman command (daemonless)."""

    def __init__(self, pm, image: str):
        self.pm, self.image = pm, image
        self.n = 0

    def run(self, step: str) -> float:
        self.n += 1
        name, committed = f"snap-{self.n}", f"localhost/snap-commit:{self.n}"
        pm = self.pm
        times = {}
        state = None
        try:
            with stopwatch() as t:
                pm.create(self.image, name)
                state = "created"
                m = pm.mount(name)
                state = "mounted"
            times["prepare"] = t.elapsed
            _write_files(m)
            with stopwatch() as t:
                pm.umount(name)
                state = "created"
                pm.run("commit", "-q", name, committed)
                state = "committed"
            times["commit"] = t.elapsed
            with stopwatch() as t:
                pm.rm(name)
                pm.run("rmi", committed)
                state = None
            times["remove"] = t.elapsed
        finally:
            if state is not None:
                pm.run("rm", "-f", name, check=False)
                pm.run("rmi", "-f", committed, check=False)
        return times[step]


def _top_snapshot(d: Containerd) -> str:
    """The committed snapshot nobody is the parent of: the image's rootfs."""
    r = subprocess.run(d.ctr + ["snapshots", "ls"], capture_output=True, text=True, check=True)
    rows = [l.split() for l in r.stdout.strip().splitlines()[1:] if l.strip()]
    keys = {row[0] for row in rows if len(row) >= 3 and row[-1] == "Committed"}
    parents = {row[1] for row in rows if len(row) >= 3}
    tops = sorted(keys - parents)
    if len(tops) != 1:
        raise RuntimeError(f"expected one top snapshot after import, found {tops} in {rows}")
    return tops[0]


def suite(ctx):
    layerfs = ctx.layerfs()
    if not ctx.drivers:
        raise SkipBenchmark("no layerfs driver opens here")
    built = bench_image.for_run(ctx, log=_log)
    stores = {}
    daemon = None
    notes = [f"image: {built.meta['description']}",
             "each round: a fresh container/snapshot on the image, the whole cycle, one step timed; "
             f"{NFILES} files of ~12 bytes written between prepare and commit (untimed); stores, snapshots "
             "and inputs are on the same filesystem (the run's work dir); no sync in timed regions",
             "not the same work: `ctr snapshots commit` is a metadata change (no diff is computed), "
             "store.commit exports the diff as a tar and registers it as a layer",
             "every ctr step includes a Go client start and a gRPC round trip, as for a user of ctr"]
    ctr_skip = None
    if not ctx.peer_wanted("containerd"):
        ctr_skip = "not selected (--peers)"
    else:
        ctr_skip = bench_peers.missing("containerd")
    podmans = []
    try:
        cycles = []
        for d in ctx.drivers:
            root = ctx.scratch(f"snap-store-{d}")
            store = layerfs.open_store(str(root), driver=d, options=ctx.options)
            stores[d] = (store, root)
            parent = None
            for tar in built.layer_tars:
                parent = store.register(str(tar), parent=parent).chain_id
            cycles.append((f"layerfs {d}", "layerfs", LayerfsCycle(d, store, parent), {"driver": d}))
        if ctr_skip is None:
            try:
                daemon = Containerd(ctx.scratch("containerd")).start()
                subprocess.run(daemon.ctr + ["images", "import", str(built.docker_archive)], check=True,
                               capture_output=True, text=True)
                top = _top_snapshot(daemon)
                cycles.append(("ctr snapshots (overlayfs)", "reference",
                               CtrCycle(daemon, top, ctx.scratch("ctr-mnt")),
                               {"containerd": bench_peers.version("containerd"), "pid": daemon.pid,
                                "snapshotter": "overlayfs"}))
            except (DaemonFailed, subprocess.CalledProcessError, RuntimeError) as e:
                err = getattr(e, "stderr", None) or ""
                ctr_skip = f"containerd failed here: {e} {err.strip()[-300:]}"
        if ctr_skip:
            notes.append(f"ctr left out: {ctr_skip}")
        from ..peers.podman import FLAVOURS, Podman, PodmanFailed
        for fl in FLAVOURS:
            why = "not selected (--peers)" if not ctx.peer_wanted("podman") else Podman.unavailable(fl)
            if why is None:
                try:
                    pm = Podman(ctx.scratch(f"podman-{fl}"), fl).setup()
                    podmans.append(pm)
                    pm.load(built.docker_archive)
                    cycles.append((pm.label, "reference", PodmanCycle(pm, bench_image.REPO_TAG), pm.info()))
                except PodmanFailed as e:
                    why = str(e)
            if why:
                notes.append(f"{'podman ' + fl} left out: {why}")
        if podmans:
            notes.append("podman: daemonless, private --root/--runroot/storage.conf under the run's work dir; "
                         "image loaded once (`podman load`, untimed); prepare = `podman create` + `podman mount`, "
                         "commit = `podman umount` + `podman commit` (computes the diff and stores a new image "
                         "layer: the same work as store.commit), remove = `podman rm` + `podman rmi`; every step "
                         "pays a podman process start (~30-80 ms) as a podman user does")
        subject = f"layerfs {ctx.drivers[0]}"  # the default driver (overlay2 here): the same kernel overlay as the snapshotter
        reference = "ctr snapshots (overlayfs)" if ctr_skip is None else None
        what = {"prepare": "create+mount vs prepare+mounts+mount(2)",
                "commit": "unmount+commit vs umount(2)+commit",
                "remove": "remove_container+release vs snapshots rm"}
        for step in ("prepare", "commit", "remove"):
            yield Benchmark(
                name=f"snapshot.{step}",
                description=f"{step}: {what[step]} on the 3-layer image",
                contenders=[Contender(label, (lambda c=c, s=step: c.run(s)), role=role, info=info)
                            for label, role, c, info in cycles],
                subject=subject, reference=reference, runs=9, quick_runs=2, warmup=1,
                workload={"image": built.meta["description"], "files_written": NFILES},
                notes=notes if step == "prepare" else ["see snapshot.prepare"],
            )
    finally:
        if daemon is not None:
            daemon.stop()
        for pm in podmans:
            pm.cleanup()
        for store, root in stores.values():
            discard_store(store)
            ctx.remove(root)

"""scaling: how costs grow with chain depth, file count, container count and concurrent pulls.

Every point of every curve is one benchmark named ``scaling.CURVE@X`` (workload
``curve``, ``x``, ``x_label``), with every usable layerfs driver and the peers
that do the same work alternated round by round. :mod:`benchmarks.plots` draws
each curve as log-log lines (median per point, min–max band) in
``plot-scaling.png``. Points (``--quick`` in brackets):

``depth.mount``          chain depth 1, 10, 50, 100, 200, 400 [1, 4]: mount a fresh container
                         on a chain of that many tiny layers and stat a file that only the
                         bottom layer has (the first lookup misses in every other layer).
                         Peers on the overlay2 store's layer directories: ``kernel overlay``
                         (fsopen/fsconfig ``lowerdir+``, written independently of layerfs:
                         mount(2)'s one-page option string cannot name 400 layers) and
                         ``fuse-overlayfs``. The container is created before and removed
                         after the timed region; the layers are warm in page cache.
``files.apply``          one layer of 1k, 10k, 50k, 200k files [1k, 3k] (~400 B each):
                         ``store.register`` into a fresh store vs ``tar -xf`` into a fresh dir
                         (as the register suite: input warm, untimed sync after each round).
``files.find``           ``find MERGED`` (warm, long-lived mount) over that layer: layerfs
                         drivers vs kernel overlay and fuse-overlayfs on the same directory.
``files.changes``        ``store.changes()`` of a container on that layer after 100 files were
                         modified/added/deleted through the mount (the diff of a naive-diff
                         driver grows with the image; a native one with the upper dir).
                         No peer: the peers' diffs (``docker diff``, ``podman diff``) add a
                         daemon or process start that would dominate small points.
``containers.create``    1, 10, 100, 500 [1, 10] existing containers (created, not mounted):
                         create + mount + unmount one more (removed untimed) vs ``podman create``
                         + ``podman mount`` + ``podman umount`` (overlay) in a podman store
                         holding as many containers of the same image.
``containers.open``      ``open_store`` + ``close`` of the store holding that many containers
                         (in process; no peer: podman has no in-process open).
``pull.parallel``        1, 2, 4, 8 [1, 2] distinct 3-layer images (~30 MB each [~2 MB]) pulled
                         concurrently from the local registry, one client process per image,
                         into one fresh store: ``layerfs pull`` (CLI) per driver vs ``docker
                         pull`` (private dockerd, overlay2) and ``podman pull`` (overlay), the
                         peers' images removed untimed after each round. Wall time until the
                         last client exits.
"""

from __future__ import annotations

import os
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from .. import image as bench_image
from .. import mounts, synth
from .. import peers as bench_peers
from .. import registry as bench_registry
from ..runner import Benchmark, Contender, SkipBenchmark, stopwatch
from .pull import _seed_registry
from .register import _register_contender, _tar_contender

OVERLAY_OPTS = {"index": "off", "redirect_dir": "off", "metacopy": "off"}
POINTS = {
    "depth": ([1, 10, 50, 100, 200, 400], [1, 4]),
    "files": ([1_000, 10_000, 50_000, 200_000], [1_000, 3_000]),
    "containers": ([1, 10, 100, 500], [1, 10]),
    "parallel": ([1, 2, 4, 8], [1, 2]),
}
CHANGED = 100   # files touched for files.changes (40 modified, 40 added, 20 deleted)
CACHE_NOTE = ("inputs warm in page cache for everyone; fresh container / store / directory per round where the "
              "row says so (set-up and teardown untimed); untimed `sync` after rounds that wrote")


def _log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


def _bench(curve: str, x: int, x_label: str, desc: str, contenders: list[Contender], reference: str | None,
           ctx, notes, runs: int = 5, quick_runs: int = 2, warmup: int = 1, **wl) -> Benchmark:
    names = [c.name for c in contenders]
    return Benchmark(
        name=f"scaling.{curve}@{x}", description=desc, contenders=contenders,
        subject=names[0], reference=reference if reference in names else None,
        runs=runs, quick_runs=quick_runs, warmup=warmup,
        workload={"curve": curve, "x": x, "x_label": x_label, **wl}, notes=list(notes))


def _stores(ctx, stem: str) -> dict:
    layerfs = ctx.layerfs()
    out = {}
    for d in ctx.drivers:
        root = ctx.scratch(f"{stem}-{d}")
        out[d] = (layerfs.open_store(str(root), driver=d, options=ctx.options), root)
    return out


def _close_stores(ctx, stores: dict) -> None:
    for store, root in stores.values():
        try:
            for c in store.containers():
                try:
                    store.unmount(c.name)
                except Exception:  # noqa: BLE001
                    pass
                store.remove_container(c.name, force=True)
        except Exception as e:  # noqa: BLE001
            _log(f"[scaling] cleanup: {e}")
        store.close()
        ctx.remove(root)
    stores.clear()


def _layer_dirs(store, chain: list[str]) -> list[Path] | None:
    """The plain diff dirs of a directory-based store's chain (base first), else None."""
    dirs = [Path(store.driver.home) / store.layer(c).cache_id / "diff" for c in chain]
    return dirs if all(p.is_dir() for p in dirs) else None


class _PlainMount:
    """kernel overlay (new mount API) or fuse-overlayfs over given lower dirs, fresh upper each time."""

    def __init__(self, kind: str, scratch: Path):
        self.kind, self.scratch = kind, scratch
        self.name = "kernel overlay" if kind == "overlay" else "fuse-overlayfs"
        self.seq = 0

    def info(self) -> dict:
        if self.kind == "overlay":
            return {"what": "fsopen(overlay) + fsconfig lowerdir+ per layer, upperdir, workdir, "
                            "index/redirect_dir/metacopy=off + fsmount + move_mount (benchmarks/mounts.py)"}
        return {"what": "fuse-overlayfs -o lowerdir=...,upperdir=...,workdir=... MERGED",
                "version": bench_peers.version("fuse-overlayfs")}

    def mount(self, lowers_base_first: list[Path]) -> Path:
        self.seq += 1
        base = self.scratch / f"{self.kind}-{self.seq}"
        for d in ("upper", "work", "merged"):
            (base / d).mkdir(parents=True)
        merged = base / "merged"
        top_first = [str(p) for p in reversed(lowers_base_first)]
        if self.kind == "overlay":
            mounts.mount_overlay_api(merged, top_first, str(base / "upper"), str(base / "work"), OVERLAY_OPTS)
        else:
            opts = f"lowerdir={':'.join(top_first)},upperdir={base / 'upper'},workdir={base / 'work'}"
            r = subprocess.run(["fuse-overlayfs", "-o", opts, str(merged)], capture_output=True, text=True)
            if r.returncode != 0:
                raise RuntimeError(f"fuse-overlayfs exited {r.returncode}: {r.stderr.strip()[-300:]}")
        return merged

    def drop(self, merged: Path) -> None:
        if os.path.ismount(merged):
            if self.kind == "overlay":
                mounts.umount(merged)
            else:
                if subprocess.run(["fusermount3", "-u", str(merged)], capture_output=True).returncode != 0:
                    mounts.umount(merged, detach=True)
                for _ in range(200):
                    if not os.path.ismount(merged):
                        break
                    time.sleep(0.005)
        mounts.safe_rmtree(merged.parent)


def _plain_peers(ctx, scratch: Path, notes: list[str]) -> list[_PlainMount]:
    out = []
    if ctx.peer_wanted("kernel-overlay"):
        out.append(_PlainMount("overlay", scratch))
    else:
        notes.append("kernel overlay left out: not selected (--peers)")
    why = "not selected (--peers)" if not ctx.peer_wanted("fuse-overlayfs") else bench_peers.missing("fuse-overlayfs")
    if why:
        notes.append(f"fuse-overlayfs left out: {why}")
    else:
        out.append(_PlainMount("fuse", scratch))
    return out


# ------------------------------------------------------------------ depth


def _depth_layer(i: int) -> bytes:
    """Layer i of the deep chain: one directory and one small file of its own; layer 0 also has bottom/."""
    import io
    import tarfile
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=tarfile.PAX_FORMAT) as tf:
        entries = [(f"l{i}", None), (f"l{i}/f", f"layer {i}\n".encode())]
        if i == 0:
            entries += [("bottom", None), ("bottom/target.txt", b"bottom layer\n")]
        for name, data in entries:
            ti = tarfile.TarInfo(name)
            ti.mtime = synth.MTIME
            if data is None:
                ti.type, ti.mode = tarfile.DIRTYPE, 0o755
                tf.addfile(ti)
            else:
                ti.size, ti.mode = len(data), 0o644
                tf.addfile(ti, io.BytesIO(data))
    return buf.getvalue()


def _first_lookup(merged: Path) -> None:
    os.stat(merged / "bottom" / "target.txt")


def depth_curve(ctx):
    import io
    points = ctx.pick(*POINTS["depth"])
    stores = _stores(ctx, "depth")
    scratch = ctx.scratch("depth-peers")
    notes = [CACHE_NOTE]
    try:
        chains = {d: [] for d in stores}
        peers = _plain_peers(ctx, scratch, notes)
        src = "overlay2" if "overlay2" in stores else next(iter(stores))
        for x in points:
            t0 = time.monotonic()
            for d, (store, _) in stores.items():
                ch = chains[d]
                while len(ch) < x:
                    ch.append(store.register(io.BytesIO(_depth_layer(len(ch))), parent=ch[-1] if ch else None).chain_id)
            _log(f"[scaling] depth {x}: chains built in {time.monotonic() - t0:.1f} s")
            lowers = _layer_dirs(stores[src][0], chains[src][:x])
            conts = []
            for d, (store, _) in stores.items():
                top = chains[d][x - 1]
                seq = iter(range(1_000_000))

                def once(store=store, top=top, seq=seq) -> float:
                    name = f"depth-{next(seq)}"
                    store.create_container(name, top)
                    try:
                        with stopwatch() as t:
                            m = Path(store.mount(name))
                            _first_lookup(m)
                    finally:
                        store.remove_container(name, force=True)   # force: unmounts first
                    return t.elapsed
                conts.append(Contender(f"layerfs {d}", once, role="layerfs", info={"driver": d}))
            pnotes = list(notes)
            if lowers is None:
                pnotes.append(f"peers left out: the {src} store's layers are not plain directories")
            else:
                for p in peers:
                    def once(p=p) -> float:
                        with stopwatch() as t:
                            m = p.mount(lowers)
                            _first_lookup(m)
                        p.drop(m)
                        return t.elapsed
                    conts.append(Contender(p.name, once, role="reference", info=p.info()))
            yield _bench("depth.mount", x, "chain depth (layers)",
                         f"mount a fresh container on a {x}-layer chain + stat a file of the bottom layer",
                         conts, "kernel overlay", ctx, pnotes + [f"peers mount the {src} store's layer directories"],
                         runs=7, quick_runs=2, depth=x)
    finally:
        _close_stores(ctx, stores)
        ctx.remove(scratch)


# ------------------------------------------------------------------ files


def _files_spec(n: int) -> synth.TreeSpec:
    return synth.TreeSpec(files=n, total_bytes=n * 400, seed=700 + n % 997, tag=f"s{n}", size_sigma=1.0,
                          files_per_dir=50)


def _mutate(merged: Path, files: list[str]) -> None:
    import random
    rng = random.Random(11)
    picked = rng.sample(files, 60)
    for p in picked[:40]:
        with open(merged / p, "ab") as f:
            f.write(b"changed\n")
    for p in picked[40:]:
        (merged / p).unlink()
    (merged / "scaling-added").mkdir()
    for i in range(40):
        (merged / "scaling-added" / f"f{i}").write_bytes(b"added\n")


def files_curve(ctx):
    points = ctx.pick(*POINTS["files"])
    scratch = ctx.scratch("files-peers")
    for x in points:
        spec = _files_spec(x)
        t0 = time.monotonic()
        tar, manifest = synth.cached_tar(spec, ctx.cache_dir)
        _log(f"[scaling] files {x}: input {tar.name} ready in {time.monotonic() - t0:.1f} s")
        synth.read_through(tar)
        desc = synth.lognormal_note(spec)

        # -- apply
        conts = []
        for d in ctx.drivers:
            c = _register_contender(ctx.for_driver(d), tar, manifest["diff_id"])
            c.name = f"layerfs {d}"
            conts.append(c)
        if ctx.peer_wanted("tar"):
            conts.append(_tar_contender(ctx, tar, "tar"))
        yield _with_between(
            _bench("files.apply", x, "files in the layer",
                   f"register a {x:,}-file layer into a fresh store (vs tar -xf into a fresh dir)",
                   conts, "tar -xf", ctx, [CACHE_NOTE, f"input: {desc}"], runs=5, quick_runs=2,
                   files=x, tar_bytes=manifest["tar_bytes"]),
            lambda: synth.read_through(tar))

        # -- find and changes: one store per driver holding the layer, one long-lived container
        stores = _stores(ctx, f"files{x}")
        live: list[tuple] = []
        try:
            files = [e.path for e in synth.plan(spec) if e.kind == "file"]
            mounted = {}
            for d, (store, _) in stores.items():
                chain = store.register(str(tar)).chain_id
                store.create_container("find", chain)
                mounted[d] = Path(store.mount("find"))
                store.create_container("diff", chain)
                _mutate(Path(store.mount("diff")), files)
            notes = [CACHE_NOTE]
            peers = _plain_peers(ctx, scratch, notes)
            src = "overlay2" if "overlay2" in stores else next(iter(stores), None)
            lowers = _layer_dirs(stores[src][0], [stores[src][0].layers()[0].chain_id]) if src else None
            conts = []
            for d, m in mounted.items():
                def once(m=m) -> float:
                    with stopwatch() as t:
                        subprocess.run(["find", str(m)], check=True, stdout=subprocess.DEVNULL)
                    return t.elapsed
                conts.append(Contender(f"layerfs {d}", once, role="layerfs", info={"driver": d}))
            if lowers is None:
                notes.append("peers left out: no directory-based layerfs store to share layer dirs with")
            else:
                for p in peers:
                    pm = p.mount(lowers)
                    live.append((p, pm))

                    def once(pm=pm) -> float:
                        with stopwatch() as t:
                            subprocess.run(["find", str(pm)], check=True, stdout=subprocess.DEVNULL)
                        return t.elapsed
                    conts.append(Contender(p.name, once, role="reference", info=p.info()))
            yield _bench("files.find", x, "files in the layer", f"find over a mounted {x:,}-file layer (warm)",
                         conts, "kernel overlay", ctx,
                         notes + [f"one long-lived mount per system; peers mount the {src} store's layer directory"],
                         runs=7, quick_runs=2, warmup=2, files=x)
            conts = []
            for d, (store, _) in stores.items():
                def once(store=store) -> float:
                    with stopwatch() as t:
                        got = store.changes("diff")
                    if len(got) < CHANGED:
                        raise AssertionError(f"changes() reported {len(got)} entries, expected >= {CHANGED}")
                    return t.elapsed
                conts.append(Contender(f"layerfs {d}", once, role="layerfs", info={"driver": d}))
            yield _bench("files.changes", x, "files in the image",
                         f"changes() of a container that touched {CHANGED} files of a {x:,}-file image (mounted)",
                         conts, None, ctx,
                         ["40 modified, 20 deleted, 40 added in a new directory; container mounted; warm caches",
                          "no peer: `docker diff`/`podman diff` add a daemon round trip or a process start "
                          "that would dominate the small points"], runs=7, quick_runs=2, files=x)
        finally:
            for p, pm in live:
                p.drop(pm)
            _close_stores(ctx, stores)
    ctx.remove(scratch)


def _with_between(b: Benchmark, fn) -> Benchmark:
    b.between_rounds = fn
    return b


# ------------------------------------------------------------------ containers


def containers_curve(ctx):
    from ..peers.podman import Podman, PodmanFailed
    points = ctx.pick(*POINTS["containers"])
    built = bench_image.cached(bench_image.QUICK, ctx.cache_dir, log=_log)
    stores = _stores(ctx, "ctrs")
    pm = None
    notes = [CACHE_NOTE, f"image: {built.meta['description']}",
             "existing containers are created, not mounted (a FUSE driver would run one daemon per mounted "
             "container); the timed container is removed untimed after each round"]
    try:
        tops = {}
        for d, (store, _) in stores.items():
            parent = None
            for tar in built.layer_tars:
                parent = store.register(str(tar), parent=parent).chain_id
            tops[d] = parent
        why = "not selected (--peers)" if not ctx.peer_wanted("podman") else Podman.unavailable("overlay")
        if why is None:
            try:
                pm = Podman(ctx.scratch("ctrs-podman"), "overlay").setup()
                pm.load(built.docker_archive)
            except PodmanFailed as e:
                why = str(e)
        if why:
            notes.append(f"podman overlay left out: {why}")
            pm = None
        else:
            notes.append("podman overlay: private --root/--runroot/storage.conf; `podman create` also writes "
                         "libpod's container config and pays a process start: a user-level comparison")
        have = 0
        for x in points:
            t0 = time.monotonic()
            for d, (store, _) in stores.items():
                for i in range(have, x):
                    store.create_container(f"c{i}", tops[d])
            if pm is not None:
                for i in range(have, x):
                    pm.create(bench_image.REPO_TAG, f"c{i}")
            have = x
            _log(f"[scaling] containers {x}: filled in {time.monotonic() - t0:.1f} s")
            conts = []
            for d, (store, _) in stores.items():
                seq = iter(range(1_000_000))

                def once(store=store, top=tops[d], seq=seq) -> float:
                    name = f"extra-{next(seq)}"
                    try:
                        with stopwatch() as t:
                            store.create_container(name, top)
                            store.mount(name)
                            store.unmount(name)
                    finally:
                        store.remove_container(name, force=True)
                    return t.elapsed
                conts.append(Contender(f"layerfs {d}", once, role="layerfs", info={"driver": d}))
            if pm is not None:
                pseq = iter(range(1_000_000))

                def pm_once() -> float:
                    name = f"extra-{next(pseq)}"
                    try:
                        with stopwatch() as t:
                            pm.create(bench_image.REPO_TAG, name)
                            pm.mount(name)
                            pm.umount(name)
                    finally:
                        pm.rm(name)
                    return t.elapsed
                conts.append(Contender("podman overlay", pm_once, role="reference", info=pm.info()))
            yield _bench("containers.create", x, "existing containers",
                         f"create + mount + unmount one more container in a store holding {x:,}",
                         conts, "podman overlay", ctx, notes, runs=7, quick_runs=2, containers=x)
            conts = []
            for d, (store, root) in stores.items():
                def once(d=d, root=root) -> float:
                    with stopwatch() as t:
                        s = ctx.layerfs().open_store(str(root), driver=d, options=ctx.options)
                        s.close()
                    return t.elapsed
                conts.append(Contender(f"layerfs {d}", once, role="layerfs", info={"driver": d}))
            yield _bench("containers.open", x, "existing containers",
                         f"open_store + close of a store holding {x:,} containers (in process)",
                         conts, None, ctx, ["no peer: podman has no in-process open; every podman command "
                                            "opens its store after a process start"], runs=9, quick_runs=2,
                         containers=x)
    finally:
        _close_stores(ctx, stores)
        if pm is not None:
            pm.cleanup()


# ------------------------------------------------------------------ parallel pulls


def _par_spec(i: int, quick: bool) -> bench_image.ImageSpec:
    n1, n2, b1, b2 = (300, 100, 1_500_000, 500_000) if quick else (2_000, 1_000, 20_000_000, 10_000_000)
    return bench_image.ImageSpec(
        base=synth.TreeSpec(files=n1, total_bytes=b1, seed=900 + 2 * i, symlinks=40, hardlinks=4, tag="b"),
        app=synth.TreeSpec(files=n2, total_bytes=b2, seed=901 + 2 * i, symlinks=10, hardlinks=2, tag="a"),
        deleted_files=10 if quick else 20, deleted_dirs=1, opaque_dirs=1, modified_files=5, seed=10 + i)


# Why the layerfs stores of the parallel curve are removed only when the curve ends.
KEEP_NOTE = ("each round's layerfs store is removed when the curve ends, not after the round: on ext4 without a "
             "journal (these machines) the inode allocator skips inodes freed in the last 60 s (300 s while their "
             "inode table block is dirty), checking each one in turn, so a round that follows the removal of ~24k "
             "files can pay that scan on every file it creates (perf, 8 images, store removed after each round: "
             "~40% of the layerfs processes' CPU in it, and more round after round; docker-untar ~7%)")


def _concurrently(cmds: list[list[str]], env=None) -> float:
    with stopwatch() as t:
        procs = [subprocess.Popen(c, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, env=env) for c in cmds]
        errs = [(p.wait(), p.stderr.read().decode(errors="replace")) for p in procs]
    for p in procs:
        p.stderr.close()
    bad = [(c, e) for c, (rc, e) in zip(cmds, errs) if rc != 0]
    if bad:
        raise RuntimeError(f"{len(bad)} of {len(cmds)} pulls failed, e.g. {' '.join(bad[0][0][-3:])}: "
                           f"{bad[0][1].strip()[-300:]}")
    return t.elapsed


def parallel_curve(ctx):
    from ..peers.daemons import DaemonFailed, Dockerd
    from ..peers.podman import Podman, PodmanFailed
    try:
        import layerfs.engine.pull  # noqa: F401
    except Exception as e:  # noqa: BLE001
        raise SkipBenchmark(f"layerfs.engine cannot be imported: {type(e).__name__}: {e}") from e
    points = ctx.pick(*POINTS["parallel"])
    n = max(points)
    with ThreadPoolExecutor(max_workers=2) as ex:
        builts = list(ex.map(lambda i: bench_image.cached(_par_spec(i, ctx.quick), ctx.cache_dir, log=_log),
                             range(n)))
    reg = docker = pm = None
    kept: list[Path] = []
    notes = [CACHE_NOTE, f"images: {n} distinct images, each {builts[0].meta['description']}",
             "one client process per image started at once; wall time until the last exits; "
             "fresh layerfs store per round; the peers' images removed (untimed) after each round", KEEP_NOTE]
    try:
        reg = bench_registry.start(ctx.scratch("par-registry"))
        refs = [f"{reg.host}/bench/par{i}:1" for i in range(n)]
        for i, b in enumerate(builts):
            _seed_registry(ctx, b, reg, f"bench/par{i}:1")
        blobs = reg.blob_files()

        def warm() -> None:
            for p in blobs:
                synth.read_through(p)
        warm()
        why = "not selected (--peers)" if not ctx.peer_wanted("docker") else bench_peers.missing("docker")
        if why is None:
            try:
                docker = Dockerd(ctx.scratch("par-dockerd"), "overlay2").start()
            except DaemonFailed as e:
                why = f"failed to start here: {e}"
        if why:
            notes.append(f"docker pull overlay2 left out: {why}")
        why = "not selected (--peers)" if not ctx.peer_wanted("podman") else Podman.unavailable("overlay")
        if why is None:
            try:
                pm = Podman(ctx.scratch("par-podman"), "overlay").setup()
            except PodmanFailed as e:
                why = str(e)
        if why:
            notes.append(f"podman pull overlay left out: {why}")
        cli = ctx.for_driver("auto").cli()
        for x in points:
            conts = []
            for d in ctx.drivers:
                def once(d=d, x=x) -> float:
                    root = ctx.scratch("par-store")
                    kept.append(root)   # removed when the curve ends (see KEEP_NOTE)
                    ctx.layerfs().open_store(str(root), driver=d, options=ctx.options).close()
                    try:
                        return _concurrently([cli + ["--root", str(root), "--driver", d, "pull", f"docker://{r}",
                                                     f"par{i}:1"] for i, r in enumerate(refs[:x])])
                    finally:
                        os.sync()
                conts.append(Contender(f"layerfs {d}", once, role="layerfs",
                                       info={"driver": d, "command": "layerfs --root R --driver D pull docker://REF NAME"}))
            if docker is not None:
                def d_once(x=x) -> float:
                    try:
                        return _concurrently([docker.docker + ["pull", "-q", r] for r in refs[:x]])
                    finally:
                        subprocess.run(docker.docker + ["rmi", "-f", *refs[:x]], capture_output=True)
                        os.sync()
                conts.append(Contender("docker pull overlay2", d_once, role="reference",
                                       info={"dockerd": bench_peers.version("docker"), "pid": docker.pid}))
            if pm is not None:
                def p_once(x=x) -> float:
                    try:
                        return _concurrently([pm.cmd + ["pull", "-q", "--tls-verify=false", r] for r in refs[:x]],
                                             env=pm.env)
                    finally:
                        pm.rmi_all()
                        os.sync()
                conts.append(Contender("podman pull overlay", p_once, role="reference", info=pm.info()))
            yield _with_between(_bench("pull.parallel", x, "images pulled concurrently",
                                       f"pull {x} distinct image(s) concurrently from the local registry",
                                       conts, "docker pull overlay2", ctx, notes, runs=5, quick_runs=2,
                                       warmup=0 if ctx.quick else 1, images=x),
                                warm)
    finally:
        if docker is not None:
            docker.stop()
        if pm is not None:
            pm.cleanup()
        if reg is not None:
            reg.stop()
        for root in kept:
            ctx.remove(root)


CURVES = {"depth": depth_curve, "files": files_curve, "containers": containers_curve, "parallel": parallel_curve}


def suite(ctx):
    ctx.layerfs()
    if not ctx.drivers:
        raise SkipBenchmark("no layerfs driver opens here: "
                            + "; ".join(f"{k}: {v}" for k, v in ctx.drivers_skipped.items()))
    for name, curve in CURVES.items():
        if ctx.curves is not None and name not in ctx.curves:
            continue
        gen = curve(ctx)
        try:
            yield from gen
        except Exception as e:  # noqa: BLE001 - one curve failing must not stop the others
            yield _failed(name, e)
        finally:
            gen.close()


def _failed(curve: str, e: Exception) -> Benchmark:
    """A row that records why a curve stopped: skipped (SkipBenchmark) or an error."""
    _log(f"[scaling] curve {curve} stopped: {type(e).__name__}: {e}")

    def once() -> float:
        if isinstance(e, SkipBenchmark):
            raise e
        raise RuntimeError(f"curve set-up failed: {type(e).__name__}: {e}")
    return Benchmark(name=f"scaling.{curve}", description=f"the {curve} curve", subject="-",
                     contenders=[Contender("-", once)], workload={"curve": curve})

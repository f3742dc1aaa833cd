"""fs: work inside a mounted container on every layerfs driver, kernel overlay and fuse-overlayfs.

Input: a deterministic 3-layer image (30,000 + 15,000 + 5,000 small files, and in
the top layer a 512 MiB and a 100 MiB file; ``--quick``: 3,000 + 1,500 + 500 files,
64 MiB and 16 MiB). It is registered into one store per layerfs driver. The peers
mount *the same layer directories* (the diff dirs of the overlay2 store, else of
the first store; the image has no whiteouts, so the on-disk whiteout format does
not matter):

- ``kernel overlay``: ``mount -t overlay`` with the options layerfs overlay2 uses
  (index=off, redirect_dir=off, metacopy=off) -- the floor;
- ``fuse-overlayfs``: Debian's fuse-overlayfs 1.10 with its default options
  (skipped with the reason when it is not installed).

Workloads (every contender alternated round by round, A, B, C, D, ...):

warm, on one long-lived mount per contender (the untimed warm-up round fills the
caches; the same for everyone):
  ``fs.find``   ``find MERGED`` (names only)
  ``fs.stat``   ``find MERGED -printf '%s\\n'`` (lstat of every entry, plus the walk)
  ``fs.read``   read the 512 MiB lower file, 1 MiB reads
  ``fs.write``  write a new 512 MiB file, 1 MiB writes, no fsync (removed + ``sync``, untimed)
on a fresh container / fresh upper dir each round (setup and teardown untimed,
then an untimed ``sync``; the lower layers stay in page cache):
  ``fs.create`` create 10,000 small files (100 bytes) in 10 new directories
  ``fs.copyup`` first write (1 byte at offset 0) to the 100 MiB lower file
  ``fs.rm``     ``rm -rf`` of a lower directory spanning all three layers
  ``fs.mount``  mount until ready (layerfs: ``store.mount``; fuse-overlayfs: until the
                command returns, i.e. the daemon has mounted and forked)
and ``fs.rss``: resident memory (VmRSS) of the FUSE daemons after a full stat walk.

Issue 4's targets for aufs (subject) vs fuse-overlayfs (reference): find ≤ 2×,
stat ≤ 2×, read and write throughput ≥ 0.8× (time ≤ 1.25×), create ≤ 1.5×,
copy-up ≤ 1.5×, mount ≤ 400 ms, RSS ≤ 80 MB. Without aufs the subject is the
first driver and rows are reported without target.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import time
from pathlib import Path

from .. import mounts, synth
from .. import peers as bench_peers
from ..context import discard_store
from ..runner import Benchmark, Contender, SkipBenchmark, Target, stopwatch

MiB = 1 << 20
FULL = {"layers": (30_000, 15_000, 5_000), "read": 512 * MiB, "write": 512 * MiB, "copyup": 100 * MiB,
        "create": 10_000}
QUICK = {"layers": (3_000, 1_500, 500), "read": 64 * MiB, "write": 64 * MiB, "copyup": 16 * MiB,
         "create": 1_000}
OVERLAY_OPTS = "index=off,redirect_dir=off,metacopy=off"
CACHE_NOTE = ("caches: lower layers warm in page cache for everyone (read through before the suite); "
              "warm rows use one long-lived mount per system after an untimed warm-up round; fresh-mount rows "
              "get a new container/upper dir each round (untimed), so that mount's own dentry cache is cold "
              "for every system alike; untimed `sync` after every round that wrote")


def image_specs(layers) -> list[synth.TreeSpec]:
    return [synth.TreeSpec(files=n, total_bytes=n * 1_000, seed=300 + i, tag=f"f{i}",
                           size_sigma=1.0, files_per_dir=25) for i, n in enumerate(layers)]


def big_files(plan: dict) -> tuple[synth.BigFile, ...]:
    return (synth.BigFile("bigdata/read.bin", plan["read"]), synth.BigFile("bigdata/copyup.bin", plan["copyup"]))


def _pick_rm_dir(specs) -> tuple[str, int]:
    """The top-level directory whose subtree (over all layers) is nearest 1/6 of the entries."""
    counts: dict[str, int] = {}
    total = 0
    for spec in specs:
        for e in synth.plan(spec):
            top = e.path.split("/", 1)[0]
            counts[top] = counts.get(top, 0) + 1
            total += 1
    best = min(counts, key=lambda d: abs(counts[d] - total / 6))
    return best, counts[best]


def _fusermount_u(path: Path) -> None:
    for cmd in (["fusermount3", "-u", str(path)], ["umount", str(path)]):
        if shutil.which(cmd[0]) and subprocess.run(cmd, capture_output=True).returncode == 0:
            return
    mounts.umount(path, detach=True)


def _pid_of_mount(merged: Path, prog: str) -> int | None:
    needle = str(merged).encode()
    for d in Path("/proc").iterdir():
        if not d.name.isdigit():
            continue
        try:
            cmd = (d / "cmdline").read_bytes()
        except OSError:
            continue
        if prog.encode() in cmd.split(b"\0")[0] and needle in cmd:
            return int(d.name)
    return None


def _rss_mb(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * 1024 / 1e6
    raise RuntimeError(f"no VmRSS for pid {pid}")


class System:
    """One way of mounting the image: ``fresh()`` gives a new writable mount, ``drop()`` removes it."""
    name: str
    role: str = "reference"
    info: dict

    def fresh(self) -> tuple[Path, object]: ...
    def drop(self, handle) -> None: ...
    def daemon_pid(self, handle) -> int | None:
        return None


class LayerfsSystem(System):
    role = "layerfs"

    def __init__(self, driver: str, store, top: str):
        self.name, self.store, self.top = f"layerfs {driver}", store, top
        self.driver = driver
        self.seq = iter(range(1_000_000))
        self.info = {"driver": driver, "what": "store.create_container + store.mount"}

    def create(self) -> str:
        name = f"fs-{next(self.seq)}"
        self.store.create_container(name, self.top)
        return name

    def mount(self, name: str) -> Path:
        return Path(self.store.mount(name))

    def fresh(self):
        name = self.create()
        return self.mount(name), name

    def drop(self, name) -> None:
        try:
            self.store.unmount(name)
        except Exception:  # noqa: BLE001
            pass
        self.store.remove_container(name, force=True)

    def daemon_pid(self, name) -> int | None:
        cache_id = self.store.container(name).cache_id
        p = Path(self.store.driver.home) / "run" / f"{cache_id}.pid"
        try:
            return int(p.read_text().split()[0])
        except (OSError, ValueError, IndexError):
            return None


class PlainSystem(System):
    """kernel overlay or fuse-overlayfs on the same layer directories, a fresh upper/work per mount."""

    def __init__(self, kind: str, lowers: list[Path], scratch: Path):
        self.kind, self.lowers, self.scratch = kind, lowers, scratch
        self.name = "kernel overlay" if kind == "overlay" else "fuse-overlayfs"
        self.seq = iter(range(1_000_000))
        lowerdir = ":".join(str(p) for p in reversed(lowers))  # topmost first
        self.lowerdir = lowerdir
        if kind == "overlay":
            self.info = {"what": f"mount -t overlay -o lowerdir=...,upperdir=...,workdir=...,{OVERLAY_OPTS}"}
        else:
            self.info = {"what": "fuse-overlayfs -o lowerdir=...,upperdir=...,workdir=... MERGED (default options)",
                         "version": bench_peers.version("fuse-overlayfs"),
                         "package": bench_peers.apt_version("fuse-overlayfs")}

    def create(self) -> Path:
        base = self.scratch / f"{self.kind}-{next(self.seq)}"
        for d in ("upper", "work", "merged"):
            (base / d).mkdir(parents=True)
        return base

    def mount(self, base: Path) -> Path:
        merged = base / "merged"
        opts = f"lowerdir={self.lowerdir},upperdir={base / 'upper'},workdir={base / 'work'}"
        if self.kind == "overlay":
            mounts.mount("overlay", merged, "overlay", f"{opts},{OVERLAY_OPTS}")
        else:
            r = subprocess.run(["fuse-overlayfs", "-o", opts, str(merged)], capture_output=True, text=True)
            if r.returncode != 0:
                raise RuntimeError(f"fuse-overlayfs exited {r.returncode}: {r.stderr.strip()[-300:]}")
        return merged

    def fresh(self):
        base = self.create()
        return self.mount(base), base

    def drop(self, base: Path) -> None:
        merged = base / "merged"
        if os.path.ismount(merged):
            if self.kind == "overlay":
                mounts.umount(merged)
            else:
                _fusermount_u(merged)
                for _ in range(100):  # let the daemon exit before its upper dir goes
                    if not os.path.ismount(merged):
                        break
                    time.sleep(0.01)
        mounts.safe_rmtree(base)

    def daemon_pid(self, base) -> int | None:
        return _pid_of_mount(base / "merged", "fuse-overlayfs") if self.kind == "fuse" else None


# ------------------------------------------------------------------ workloads


def _read(path: Path) -> int:
    buf = bytearray(MiB)
    n = 0
    with open(path, "rb", buffering=0) as f:
        while k := f.readinto(buf):
            n += k
    return n


def _write(path: Path, size: int) -> None:
    chunk = os.urandom(MiB)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
    try:
        left = size
        while left:
            left -= os.write(fd, chunk[:min(MiB, left)])
    finally:
        os.close(fd)


def _create(root: Path, n: int) -> None:
    data = b"x" * 100
    per = n // 10
    for d in range(10):
        sub = root / "bench-create" / f"d{d}"
        sub.mkdir(parents=True)
        for i in range(per):
            fd = os.open(sub / f"f{i}", os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
            os.write(fd, data)
            os.close(fd)


def _copyup(path: Path) -> None:
    fd = os.open(path, os.O_WRONLY)
    try:
        os.pwrite(fd, b"!", 0)
    finally:
        os.close(fd)


def _find(root: Path, stat_all: bool) -> None:
    cmd = ["find", str(root)] + (["-printf", "%s\n"] if stat_all else [])
    subprocess.run(cmd, check=True, stdout=subprocess.DEVNULL)


# ------------------------------------------------------------------ suite


def suite(ctx):
    layerfs = ctx.layerfs()
    plan = ctx.pick(FULL, QUICK)
    specs = image_specs(plan["layers"])
    extra = big_files(plan)
    drivers = list(ctx.drivers)
    if not drivers:
        raise SkipBenchmark("no layerfs driver opens here: " + "; ".join(f"{k}: {v}" for k, v in ctx.drivers_skipped.items()))
    tars = []
    for i, spec in enumerate(specs):
        tar, _ = synth.cached_tar(spec, ctx.cache_dir, extra if i == len(specs) - 1 else ())
        tars.append(tar)
    rm_dir, rm_entries = _pick_rm_dir(specs)
    stores: dict[str, tuple] = {}
    scratch = ctx.scratch("fs-peers")
    long_lived: list[tuple[System, object]] = []
    systems: list[System] = []
    skipped_notes: list[str] = [f"layerfs driver {d} skipped: {why}" for d, why in ctx.drivers_skipped.items()]
    try:
        for d in drivers:
            root = ctx.scratch(f"fs-store-{d}")
            store = layerfs.open_store(str(root), driver=d, options=ctx.options)
            stores[d] = (store, root)
            parent = None
            t0 = time.monotonic()
            for tar in tars:
                parent = store.register(str(tar), parent=parent).chain_id
            print(f"[fs] registered the image into {d} in {time.monotonic() - t0:.1f} s", flush=True)
            systems.append(LayerfsSystem(d, store, parent))
        # the same layer directories for the peers: the overlay2 store's, else the first store's
        src = "overlay2" if "overlay2" in stores else drivers[0]
        store = stores[src][0]
        lowers = []
        for l in store.layers():
            lowers.append(Path(store.driver.home) / l.cache_id / "diff")
        if not all(p.is_dir() for p in lowers):
            raise SkipBenchmark(f"the {src} store's layer directories are not plain diff dirs here")
        peer_names = []
        if ctx.peer_wanted("kernel-overlay"):
            systems.append(PlainSystem("overlay", lowers, scratch))
            peer_names.append("kernel overlay")
        fuse_why = bench_peers.missing("fuse-overlayfs")
        if not ctx.peer_wanted("fuse-overlayfs"):
            fuse_why = "not selected (--peers)"
        if fuse_why:
            skipped_notes.append(f"fuse-overlayfs left out: {fuse_why}")
        else:
            systems.append(PlainSystem("fuse", lowers, scratch))
        for tar in tars:
            synth.read_through(tar)

        subject = "layerfs aufs" if "aufs" in drivers else systems[0].name
        has_fuse = any(s.name == "fuse-overlayfs" for s in systems)
        reference = "fuse-overlayfs" if has_fuse else ("kernel overlay" if "kernel overlay" in [s.name for s in systems] else None)
        judged = subject == "layerfs aufs" and has_fuse

        def target(kind, value, text=None):
            if kind == "ratio":
                return Target.ratio(value, text) if judged else None
            if subject != "layerfs aufs":
                return None
            return Target.ms(value) if kind == "ms" else Target.max(value, "MB")

        workload = {"layers": list(plan["layers"]), "files": sum(plan["layers"]),
                    "big_files": {b.path: b.size for b in extra}, "layer_source": src,
                    "rm_dir": rm_dir, "rm_entries": rm_entries,
                    "description": f"{sum(plan['layers']):,} files over 3 layers "
                                   f"({' + '.join(f'{n:,}' for n in plan['layers'])}), ~1 kB each, plus "
                                   f"{plan['read'] // MiB} MiB and {plan['copyup'] // MiB} MiB files in the top layer"}
        base_notes = [CACHE_NOTE, f"peers mount the {src} store's layer directories (the same bytes)"] + skipped_notes
        if not judged:
            base_notes.append("issue 4's targets are aufs vs fuse-overlayfs: not judged here "
                              f"(subject {subject}, fuse-overlayfs {'present' if has_fuse else 'absent'})")

        # long-lived mounts for the warm rows
        for s in systems:
            long_lived.append((s, s.fresh()))
        live = {s.name: h for s, h in long_lived}

        def merged_of(s):
            return live[s.name][0]

        def bench(name, desc, make_once, tgt=None, runs=7, quick_runs=3, warmup=1, notes=(), unit="s",
                  only=None, wl=None):
            conts = [Contender(s.name, make_once(s), role=s.role, info=s.info)
                     for s in systems if only is None or only(s)]
            names = [c.name for c in conts]
            ref = reference if reference in names else None
            return Benchmark(name=name, description=desc, contenders=conts, subject=subject, reference=ref,
                             target=tgt if ref or (tgt and tgt.kind != "ratio") else None,
                             runs=runs, quick_runs=quick_runs, warmup=warmup,
                             workload={**workload, **(wl or {})}, unit=unit,
                             notes=(base_notes if name == "fs.find" else ["inputs, caches, skips: see fs.find"])
                             + list(notes))

        def warm_once(fn):
            def make(s):
                def once():
                    m = merged_of(s)
                    with stopwatch() as t:
                        fn(m)
                    return t.elapsed
                return once
            return make

        nfiles = sum(plan["layers"])
        yield bench("fs.find", f"find over a {nfiles:,}-file 3-layer rootfs (warm)", warm_once(lambda m: _find(m, False)),
                    target("ratio", 2.0), runs=9, quick_runs=3, warmup=2)
        yield bench("fs.stat", f"stat every entry of a {nfiles:,}-file rootfs: find -printf %s (warm)",
                    warm_once(lambda m: _find(m, True)), target("ratio", 2.0), runs=9, quick_runs=3, warmup=2)
        rbytes = plan["read"]
        yield bench("fs.read", f"read a {rbytes // MiB} MiB lower file, 1 MiB reads (warm)",
                    warm_once(lambda m: _read(m / "bigdata" / "read.bin")),
                    target("ratio", 1.25, "throughput ≥ 0.8× ref (time ≤ 1.25×)"), runs=7, quick_runs=3, warmup=2,
                    wl={"bytes": rbytes})

        wbytes = plan["write"]

        def write_make(s):
            def once():
                m = merged_of(s)
                p = m / "bench-write.bin"
                try:
                    with stopwatch() as t:
                        _write(p, wbytes)
                finally:
                    p.unlink(missing_ok=True)
                    os.sync()
                return t.elapsed
            return once

        yield bench("fs.write", f"write a new {wbytes // MiB} MiB file, 1 MiB writes, no fsync",
                    write_make, target("ratio", 1.25, "throughput ≥ 0.8× ref (time ≤ 1.25×)"),
                    runs=7, quick_runs=3, wl={"bytes": wbytes},
                    notes=["the file is deleted and `sync` run after each round, untimed"])

        def fresh_make(fn):
            def make(s):
                def once():
                    m, h = s.fresh()
                    try:
                        with stopwatch() as t:
                            fn(m)
                    finally:
                        s.drop(h)
                        os.sync()
                    return t.elapsed
                return once
            return make

        n_create = plan["create"]
        yield bench("fs.create", f"create {n_create:,} files of 100 bytes in 10 new directories (fresh container)",
                    fresh_make(lambda m: _create(m, n_create)), target("ratio", 1.5), runs=7, quick_runs=3)
        cbytes = plan["copyup"]
        yield bench("fs.copyup", f"first write to a {cbytes // MiB} MiB lower file: copy-up (fresh container)",
                    fresh_make(lambda m: _copyup(m / "bigdata" / "copyup.bin")), target("ratio", 1.5),
                    runs=7, quick_runs=3, wl={"bytes": cbytes},
                    notes=["kernel overlayfs (so layerfs overlay2 too) fsyncs every copied-up file unless mounted "
                           "`volatile`; the FUSE systems do not -- the likely reason the kernel rows are slower here"])
        yield bench("fs.rm", f"rm -rf /{rm_dir} ({rm_entries:,} entries from 3 lower layers; fresh container)",
                    fresh_make(lambda m: subprocess.run(["rm", "-rf", str(m / rm_dir)], check=True)),
                    runs=7, quick_runs=3, notes=["reported, no target"])

        def mount_make(s):
            def once():
                h = s.create()
                try:
                    with stopwatch() as t:
                        m = s.mount(h)
                    if not os.path.ismount(m):
                        raise AssertionError(f"{s.name}: {m} is not a mount point after mount returned")
                finally:
                    s.drop(h)
                return t.elapsed
            return once

        yield bench("fs.mount", "mount a container of the 3-layer image until ready (create untimed)",
                    mount_make, target("ms", 400), runs=11, quick_runs=3, warmup=1,
                    notes=["layerfs: store.mount (aufs starts its FUSE daemon and returns once the mount answers); "
                           "kernel overlay: mount(2); fuse-overlayfs: the command until it returns (mounted, daemon forked)"])

        def rss_make(s):
            def once():
                m, h = live[s.name]
                _find(m, True)
                pid = s.daemon_pid(h)
                if pid is None:
                    raise RuntimeError(f"{s.name}: no daemon pid found for {m}")
                return _rss_mb(pid)
            return once

        if subject != "layerfs aufs":
            return
        yield bench("fs.rss", "resident memory (VmRSS) of the FUSE daemon after a full stat walk, MB",
                    rss_make, target("max", 80), runs=5, quick_runs=2, warmup=1, unit="MB",
                    only=lambda s: s.name in ("layerfs aufs", "fuse-overlayfs"),
                    notes=["the long-lived mount of the warm rows (it has served find, stat, read and write)"])
    finally:
        for s, h in long_lived:
            try:
                s.drop(h[1])
            except Exception as e:  # noqa: BLE001
                print(f"[fs] cleanup of {s.name}: {e}", flush=True)
        for d, (store, root) in stores.items():
            discard_store(store)
            ctx.remove(root)
        ctx.remove(scratch)

#!/usr/bin/env python3
"""Where a thin snapshot's mount(2) spends its time, xfs vs ext4 (run inside the test VM).

    .venv/bin/python tests/vm/run.py --cmd '.venv/bin/python tests/vm/dm_mount_trace.py [--trace FS:FUNCTION:DEPTH]'

For each filesystem (xfs, ext4): a devicemapper store on a loop pool (the
driver's own mkfs), an origin layer holding 200 files, then ROUNDS fresh
snapshots made and activated (untimed) whose mount(2) and umount(2) alone are
timed.  With ``--trace``, one more mount of that filesystem is traced with the
kernel's function_graph tracer (tracefs) from FUNCTION down DEPTH levels, and
every call that took >= 1 ms is printed: e.g. ``xfs:path_mount:7`` (the whole
mount), ``xfs:xfs_log_mount:5`` (its log), ``ext4:path_mount:7``.  One trace
per boot: switching the graph tracer on a second time in the same guest hung
the 6.1 guest under TCG twice.  Traced durations are inflated by the tracer;
compare them with each other, not with the untimed medians.  A diagnosis aid
for docs/devicemapper.md, not a benchmark: nothing is alternated or judged.
"""

from __future__ import annotations

import argparse
import os
import re
import shutil
import statistics
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent.parent
sys.path.insert(0, str(REPO))

from layerfs import _mountapi  # noqa: E402
from layerfs.drivers.devicemapper import DevicemapperDriver  # noqa: E402

TRACING = Path("/sys/kernel/tracing")
ROUNDS = 7
OPTS = {"dm.basesize": "512M", "dm.loopdatasize": "2G", "dm.loopmetadatasize": "16M"}


def tracefs(name: str, value: str) -> None:
    (TRACING / name).write_text(value)


def traced_mount(dev: str, mnt: Path, fs: str, data: str | None, function: str, depth: int) -> list[str]:
    tracefs("tracing_on", "0")
    tracefs("current_tracer", "nop")
    tracefs("trace", "")
    tracefs("set_graph_function", function)
    tracefs("max_graph_depth", str(depth))
    tracefs("options/funcgraph-tail", "1")
    tracefs("current_tracer", "function_graph")
    tracefs("tracing_on", "1")
    try:
        _mountapi.mount(dev, str(mnt), fs, 0, data)
    finally:
        tracefs("tracing_on", "0")
    lines = (TRACING / "trace").read_text().splitlines()
    tracefs("current_tracer", "nop")
    _mountapi.umount(str(mnt))
    out = []
    for line in lines:
        m = re.search(r"(\d+\.\d+) us", line)
        if m and float(m.group(1)) >= 1000:
            out.append(line.rstrip())
    return out


def probe(fs: str, base: Path, trace: tuple[str, int] | None) -> None:
    home = base / fs / "devicemapper"
    home.mkdir(parents=True)
    drv = DevicemapperDriver(home, {**OPTS, "dm.fs": fs})
    data = "nouuid" if fs == "xfs" else None
    mnt = home.parent / "mnt"
    mnt.mkdir()
    try:
        drv.create("origin", None)
        root = drv.get("origin")
        for i in range(200):
            (root / f"f{i}").write_bytes(b"origin %d\n" % i)
        drv.put("origin")
        traces = [trace] if trace else []
        mounts, umounts = [], []
        for i in range(ROUNDS + len(traces)):
            key = f"p{i}"
            drv.create(key, "origin")
            dev = drv._activate(key, drv._load()["devices"][key])
            try:
                if i < ROUNDS:
                    t0 = time.perf_counter()
                    _mountapi.mount(dev, str(mnt), fs, 0, data)
                    t1 = time.perf_counter()
                    _mountapi.umount(str(mnt))
                    t2 = time.perf_counter()
                    mounts.append(t1 - t0)
                    umounts.append(t2 - t1)
                    if i == ROUNDS - 1:
                        print(f"== {fs} (-o {data}): mount(2) median {statistics.median(mounts) * 1e3:.0f} ms "
                              f"(min {min(mounts) * 1e3:.0f}, max {max(mounts) * 1e3:.0f}), umount(2) median "
                              f"{statistics.median(umounts) * 1e3:.0f} ms, n={ROUNDS}", flush=True)
                else:
                    function, depth = traces[i - ROUNDS]
                    print(f"-- {fs}: traced {function} (depth {depth}), calls >= 1 ms:", flush=True)
                    for line in traced_mount(dev, mnt, fs, data, function, depth):
                        print("   ", line, flush=True)
            finally:
                drv._deactivate(key)
                drv.remove(key)
    finally:
        drv.deactivate_all()
        drv.close()


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--trace", metavar="FS:FUNCTION:DEPTH", help="trace one mount of FS (xfs or ext4)")
    args = ap.parse_args()
    trace_fs, trace = None, None
    if args.trace:
        trace_fs, function, depth = args.trace.split(":")
        trace = (function, int(depth))
        if not (TRACING / "trace").exists():
            _mountapi.mount("tracefs", str(TRACING), "tracefs")
    base = Path(os.environ.get("LAYERFS_VM_DISK_SCRATCH", "/tmp")) / f"dm-mount-trace-{os.getpid()}"
    try:
        for fs in ("xfs", "ext4"):
            probe(fs, base, trace if fs == trace_fs else None)
    finally:
        shutil.rmtree(base, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())

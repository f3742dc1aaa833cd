#!/usr/bin/env python3
"""Run the ``dm`` benchmark suite inside the test VM and copy its results back.

    .venv/bin/python tests/vm/bench_dm.py [--quick] [--runs N] [--no-apply] [--out DIR]

The host has no device-mapper, so the suite (benchmarks/suites/dm.py) runs in
the QEMU TCG guest that tests/vm/run.py boots.  The 200 MB layer tar is built
on the host first (benchmarks/results/cache, once; generating it under TCG
would take minutes) and the guest reads it over the read-only 9p root.  The
guest writes results.json and results.md to the 9p share; they are copied to
``--out`` (default build/bench-dm).  The work directory (stores, loop pools)
is the VM's disk-backed scratch.  Exit status: the benchmark runner's, or
run.py's 124/125 when the VM timed out or could not run.
"""

from __future__ import annotations

import argparse
import shlex
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent.parent
GUEST = "/run/layerfs-vm"


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="smoke run (50 MB layer, 3 rounds)")
    ap.add_argument("--runs", type=int, help="measured rounds per benchmark (>= 5 unless --quick)")
    ap.add_argument("--no-apply", action="store_true", help="leave out the 200 MB apply row (the per-layer rows only)")
    ap.add_argument("--out", type=Path, default=REPO / "build" / "bench-dm", help="where results go on the host")
    ap.add_argument("--timeout", type=float, default=1800, help="seconds before the VM is killed (default 1800)")
    args = ap.parse_args()

    sys.path.insert(0, str(REPO))
    from benchmarks import synth
    from benchmarks.suites import dm

    env = []
    if args.no_apply:
        env.append("LAYERFS_BENCH_DM_APPLY=0")
    elif not args.quick:
        tar, _ = synth.cached_tar(dm.APPLY_SPEC, REPO / "benchmarks" / "results" / "cache")
        env.append(f"LAYERFS_BENCH_DM_TAR={tar}")
    bench = [str(REPO / ".venv" / "bin" / "python"), "-m", "benchmarks", "run", "--suite", "dm",
             "--drivers", "overlay2", "--peers", "none", "--out", f"{GUEST}/share/results",
             "--work-dir", f"{GUEST}/disk/bench"]
    if args.quick:
        bench.append("--quick")
    if args.runs:
        bench += ["--runs", str(args.runs)]
    cmd = f"cd {shlex.quote(str(REPO))} && env {' '.join(map(shlex.quote, env))} {shlex.join(bench)}"
    args.out.mkdir(parents=True, exist_ok=True)
    rc = subprocess.call([str(REPO / ".venv" / "bin" / "python"), str(REPO / "tests" / "vm" / "run.py"),
                          "--timeout", str(args.timeout), "--results", str(args.out), "--cmd", cmd])
    for name in ("results.md", "results.json"):
        if (args.out / name).exists():
            print(f"bench_dm: {args.out / name}")
    return rc


if __name__ == "__main__":
    sys.exit(main())

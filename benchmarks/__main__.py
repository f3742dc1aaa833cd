"""python -m benchmarks run [--suite NAME ...] [--drivers D1,D2] [--peers P1,P2] [--image synthetic|realistic] [--quick] [--out DIR] ...

Suites marked per-driver (register, mount, changes, open_store) run once per
layerfs driver, each row named ``suite.benchmark[driver]``; ``fs`` and
``snapshot`` put every driver and peer side by side in one benchmark; ``pull``
uses the first driver. A driver that cannot open here is reported as skipped
with its DriverUnavailable reason.

Exit status: 0 when every benchmark ran (targets met or not, unless
--fail-on-miss), 1 when one failed, 2 on usage errors, 3 with --fail-on-miss
when a target was missed (never with --quick, which does not judge timings).
"""

from __future__ import annotations

import argparse
import os
import signal
import sys
import time
from pathlib import Path

from . import drivers as bench_drivers
from . import peers as bench_peers
from . import machine, mounts, report
from .context import RunContext
from .runner import MIN_RUNS, _suite_failure, run_suite
from .suites import NOT_QUICK, PER_DRIVER, SUITES

DEFAULT_OUT = Path(__file__).resolve().parent / "results"


class UsageError(Exception):
    pass


def _suites(values: list[str] | None) -> list[str]:
    if not values:
        return list(SUITES)
    names = [n.strip() for v in values for n in v.split(",") if n.strip()]
    unknown = [n for n in names if n not in SUITES]
    if unknown:
        raise UsageError(f"unknown suite(s): {', '.join(unknown)}; choose from {', '.join(SUITES)}")
    return list(dict.fromkeys(names))


def _curves(values: list[str] | None) -> set[str] | None:
    if not values:
        return None
    from .suites.scaling import CURVES
    names = {n.strip() for v in values for n in v.split(",") if n.strip()}
    unknown = sorted(names - set(CURVES))
    if unknown:
        raise UsageError(f"unknown scaling curve(s): {', '.join(unknown)}; choose from {', '.join(CURVES)}")
    return names


def _storage_opts(values: list[str] | None) -> dict[str, str] | None:
    if not values:
        return None
    out = {}
    for v in values:
        k, sep, val = v.partition("=")
        if not sep:
            raise UsageError(f"--storage-opt wants KEY=VALUE, got {v!r}")
        out[k] = val
    return out


def _per_driver(suite_fn, driver: str):
    """Wrap a suite so every benchmark it yields is named ``NAME[driver]``."""
    def wrapped(ctx):
        gen = suite_fn(ctx)
        try:
            for b in gen:
                b.name = f"{b.name}[{driver}]"
                b.description = f"[{driver}] {b.description}"
                b.workload = {**b.workload, "driver": driver}
                for c in b.contenders:
                    if c.role == "layerfs":
                        c.info = {**c.info, "driver": driver}
                yield b
        finally:
            gen.close()
    return wrapped


def _reap_stale(parent: Path) -> None:
    """Remove work dirs left by harness runs that no longer exist (after a kill -9)."""
    if not parent.is_dir():
        return
    for d in parent.glob("work-*"):
        try:
            pid = int(d.name.split("-", 1)[1])
        except ValueError:
            continue
        if pid != os.getpid() and not Path(f"/proc/{pid}").exists():
            mounts.safe_rmtree(d)


def _on_signal(signum, frame):  # turn SIGTERM/SIGHUP into an exception so cleanup runs
    raise KeyboardInterrupt(f"signal {signum}")


def cmd_run(args) -> int:
    suites = _suites(args.suite)
    if args.runs is not None and args.runs < MIN_RUNS and not args.quick:
        raise UsageError(f"--runs below {MIN_RUNS} needs --quick (medians are of >= {MIN_RUNS} runs)")
    if args.runs is not None and args.runs < 1:
        raise UsageError("--runs must be at least 1")
    options = _storage_opts(args.storage_opt)
    curves = _curves(args.curves)
    out = Path(args.out).resolve()
    work_parent = Path(args.work_dir).resolve() if args.work_dir else out
    work_parent.mkdir(parents=True, exist_ok=True)
    _reap_stale(work_parent)
    work = work_parent / f"work-{os.getpid()}"
    work.mkdir()
    requested = args.drivers or (args.driver if args.driver != "auto" else None)
    try:
        usable, unusable = bench_drivers.select(requested, work)
    except ValueError as e:
        mounts.safe_rmtree(work)
        raise UsageError(str(e)) from None
    for d, why in unusable.items():
        print(f"driver {d} skipped: {why}", file=sys.stderr)
    peers = None
    if args.peers:
        peers = {p.strip() for v in args.peers for p in v.split(",") if p.strip()}
        if "none" in peers:
            peers = set()
    ctx = RunContext(out_dir=out, cache_dir=out / "cache", work_dir=work, quick=args.quick,
                     driver=usable[0] if usable else args.driver, options=options,
                     drivers=usable, drivers_skipped=unusable, peers=peers, image=args.image, curves=curves,
                     settle_s=args.settle)
    signal.signal(signal.SIGTERM, _on_signal)
    signal.signal(signal.SIGHUP, _on_signal)
    doc = {
        "machine": machine.collect(work),
        "config": {"quick": args.quick, "runs": args.runs, "suites": suites, "driver": ctx.driver,
                   "drivers": usable, "drivers_skipped": unusable,
                   "peers": sorted(peers) if peers is not None else "all installed",
                   "image": args.image, "curves": sorted(curves) if curves else "all", "settle_s": args.settle, "storage_opts": ctx.options, "out": str(out), "work_dir": str(work),
                   "argv": sys.argv},
        "peers": bench_peers.versions(),
        "results": [],
    }
    t0 = time.monotonic()
    interrupted = False
    try:
        for name in suites:
            if args.quick and not args.suite and name in NOT_QUICK:
                why = f"not in the default --quick run: {NOT_QUICK[name]}; run it with --suite {name} --quick"
                doc["results"].append(_suite_failure(name, {"skipped": why}))
                continue
            if name not in PER_DRIVER:
                try:
                    doc["results"] += run_suite(name, SUITES[name], ctx, quick=args.quick, runs=args.runs)
                finally:
                    ctx.remove_deferred()
                continue
            for d in usable:
                try:
                    doc["results"] += run_suite(f"{name}[{d}]", _per_driver(SUITES[name], d),
                                                ctx.for_driver(d), quick=args.quick, runs=args.runs)
                finally:
                    ctx.remove_deferred()  # for_driver() shares the list
            for d, why in unusable.items():
                doc["results"].append(_suite_failure(f"{name}[{d}]", {"skipped": why}))
    except KeyboardInterrupt:
        interrupted = True
        print("interrupted: cleaning up and writing partial results", file=sys.stderr)
    finally:
        left = mounts.sweep(work)
        if left:
            print(f"cleanup: detached {len(left)} leftover mount(s) under {work}", file=sys.stderr)
        mounts.safe_rmtree(work)
    doc["config"]["interrupted"] = interrupted
    doc["machine"]["loadavg_end"] = machine.loadavg()
    doc["wall_s"] = round(time.monotonic() - t0, 1)
    j, md = report.write(doc, out)
    print(md.read_text())
    print(f"wrote {j} and {md} ({doc['wall_s']} s)", file=sys.stderr)
    if interrupted:
        return 130
    if any(r["status"] == "error" or (r.get("error") or {}).get("error") for r in doc["results"]):
        return 1
    if args.fail_on_miss and not args.quick and any(r["status"] == "missed" for r in doc["results"]):
        return 3
    return 0


def cmd_list(args) -> int:
    for name, fn in SUITES.items():
        doc = (sys.modules[fn.__module__].__doc__ or "").strip().splitlines()
        print(f"{name:12} {doc[0] if doc else ''}")
    return 0


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m benchmarks", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="cmd", required=True)
    r = sub.add_parser("run", help="run suites and write results.json + results.md")
    r.add_argument("--suite", action="append", metavar="NAME",
                   help=f"suite to run (repeatable or comma-separated; default all: {', '.join(SUITES)})")
    r.add_argument("--quick", action="store_true",
                   help="smoke run: scaled-down workloads, 3 rounds, targets not judged (well under 3 min)")
    r.add_argument("--out", default=str(DEFAULT_OUT), help="results directory (default %(default)s)")
    r.add_argument("--curves", action="append", metavar="C1,C2",
                   help="scaling suite: only these curves (depth, files, containers, parallel; default all)")
    r.add_argument("--runs", type=int, help=f"measured rounds per benchmark (>= {MIN_RUNS} unless --quick)")
    r.add_argument("--drivers", metavar="D1,D2",
                   help="layerfs drivers to benchmark (default: every driver that opens here)")
    r.add_argument("--driver", default="auto", help="one layerfs driver (older spelling of --drivers)")
    r.add_argument("--peers", action="append", metavar="P1,P2",
                   help="peers to compare with: docker, containerd, podman, fuse-overlayfs, kernel-overlay, tar "
                        "(default: every one installed; 'none' for none)")
    r.add_argument("--image", choices=("synthetic", "realistic"), default="synthetic",
                   help="input image of the pull and snapshot suites: synthetic (deterministic, default) or "
                        "realistic (debootstrap minbase + python3 + a cleanup layer, built once and cached; "
                        "needs the Debian mirror)")
    r.add_argument("--storage-opt", action="append", metavar="KEY=VALUE", help="layerfs storage option")
    r.add_argument("--work-dir", help="where stores and extractions go (default: the out dir); "
                                      "its filesystem is recorded")
    r.add_argument("--settle", type=float, default=0.0, metavar="SECONDS",
                   help="in the pull suite, start no timed round until SECONDS after a peer last removed its "
                        "image (ext4 without a journal scans recently freed inodes on every create: 61 "
                        "removes that from the docker/podman/ctr rows; default 0)")
    r.add_argument("--fail-on-miss", action="store_true", help="exit 3 when a target is missed")
    r.set_defaults(fn=cmd_run)
    ls = sub.add_parser("list", help="list suites")
    ls.set_defaults(fn=cmd_list)
    args = p.parse_args(argv)
    try:
        return args.fn(args)
    except UsageError as e:
        print(f"python -m benchmarks: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())

"""python -m benchmarks run [--suite NAME ...] [--quick] [--out DIR] ...

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

from . import machine, mounts, report
from .context import RunContext
from .runner import MIN_RUNS, run_suite
from .suites import SUITES

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
    out = Path(args.out).resolve()
    work_parent = Path(args.work_dir).resolve() if args.work_dir else out
    work_parent.mkdir(parents=True, exist_ok=True)
    _reap_stale(work_parent)
    work = work_parent / f"work-{os.getpid()}"
    work.mkdir()
    ctx = RunContext(out_dir=out, cache_dir=out / "cache", work_dir=work, quick=args.quick,
                     driver=args.driver, options=options)
    signal.signal(signal.SIGTERM, _on_signal)
    signal.signal(signal.SIGHUP, _on_signal)
    doc = {
        "machine": machine.collect(work),
        "config": {"quick": args.quick, "runs": args.runs, "suites": suites, "driver": args.driver,
                   "storage_opts": ctx.options, "out": str(out), "work_dir": str(work),
                   "argv": sys.argv},
        "results": [],
    }
    t0 = time.monotonic()
    interrupted = False
    try:
        for name in suites:
            doc["results"] += run_suite(name, SUITES[name], ctx, quick=args.quick, runs=args.runs)
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
    r.add_argument("--runs", type=int, help=f"measured rounds per benchmark (>= {MIN_RUNS} unless --quick)")
    r.add_argument("--driver", default="auto", help="layerfs storage driver (default %(default)s)")
    r.add_argument("--storage-opt", action="append", metavar="KEY=VALUE", help="layerfs storage option")
    r.add_argument("--work-dir", help="where stores and extractions go (default: the out dir); "
                                      "its filesystem is recorded")
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

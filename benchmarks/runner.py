"""The generic part of the harness: contenders, benchmarks, alternation, statistics.

A *suite* is a generator function ``suite(ctx)`` that builds its fixtures, yields
:class:`Benchmark` objects one at a time, and cleans up in a ``finally`` block (the
runner closes the generator even when something fails). A benchmark names two or
more :class:`Contender` s -- layerfs itself and the things it is compared with
(``tar``, a raw kernel mount, later Docker, containerd, podman, other drivers) --
and the runner measures them round by round, each contender once per round, so
that drift on the machine hits every contender alike.  The order within a round
changes from round to round (:func:`round_orders`), so that no contender always
runs right after the same other one and pays for what it leaves behind.

A contender's ``once()`` performs one iteration and returns the seconds it timed:
per-iteration setup and teardown (a fresh store, removing what was extracted)
happen inside ``once()`` but outside its timed region. Use :func:`stopwatch`.
"""

from __future__ import annotations

import gc
import statistics
import sys
import time
import traceback
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any, Callable, Iterator

WIDE_SPREAD = 1.5     # max/min above this is flagged
MIN_RUNS = 5          # medians of at least this many runs, except with --quick


class Timer:
    elapsed: float = 0.0


@contextmanager
def stopwatch() -> Iterator[Timer]:
    """``with stopwatch() as t: work()`` then ``t.elapsed`` is the wall time in seconds."""
    t = Timer()
    start = time.perf_counter_ns()
    try:
        yield t
    finally:
        t.elapsed = (time.perf_counter_ns() - start) / 1e9


class SkipBenchmark(Exception):
    """Raised by a suite or contender when a comparison cannot be made fairly here."""


@dataclass
class Target:
    kind: str        # "ratio": subject median / reference median; "ms": subject median;
                     # "max": subject median in the benchmark's own unit (e.g. MB)
    value: float
    text: str | None = None   # how to say it, when not the default (e.g. "throughput ≥ 0.8× ref")
    unit: str = ""

    @classmethod
    def ratio(cls, value: float, text: str | None = None) -> "Target":
        return cls("ratio", value, text)

    @classmethod
    def ms(cls, value: float) -> "Target":
        return cls("ms", value)

    @classmethod
    def max(cls, value: float, unit: str) -> "Target":
        return cls("max", value, None, unit)

    def describe(self) -> str:
        if self.text:
            return self.text
        if self.kind == "ratio":
            return f"≤ {self.value:g}× ref"
        if self.kind == "max":
            return f"≤ {self.value:g} {self.unit}"
        return f"≤ {self.value:g} ms"


@dataclass
class Contender:
    name: str
    once: Callable[[], float]
    role: str = "layerfs"         # "layerfs" | "reference" (a peer or a floor)
    info: dict[str, Any] = field(default_factory=dict)   # versions, command lines, ...


@dataclass
class Benchmark:
    name: str                      # "register.tar"
    description: str
    contenders: list[Contender]    # run in round_orders' orders, indexes into this list; the subject is usually first
    subject: str                   # contender whose figures fill the row
    reference: str | None = None   # contender the ratio is taken against
    target: Target | None = None
    runs: int = 7                  # default number of measured rounds (full mode)
    quick_runs: int = 3
    warmup: int = 1                # untimed rounds before measuring
    workload: dict[str, Any] = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)
    # Called between rounds, untimed (e.g. to keep an input warm in page cache).
    between_rounds: Callable[[], None] | None = None
    # What once() returns: "s" (seconds, the default) or another unit (e.g. "MB" for memory).
    unit: str = "s"


@dataclass
class Stats:
    samples: list[float]

    @property
    def n(self) -> int:
        return len(self.samples)

    @property
    def median(self) -> float:
        return statistics.median(self.samples)

    @property
    def min(self) -> float:
        return min(self.samples)

    @property
    def max(self) -> float:
        return max(self.samples)

    @property
    def spread(self) -> float:
        return self.max / self.min if self.min > 0 else float("inf")

    @property
    def wide(self) -> bool:
        return self.spread > WIDE_SPREAD

    def as_dict(self) -> dict[str, Any]:
        if not self.samples:
            return {"n": 0, "samples_s": []}
        return {
            "n": self.n, "median_s": self.median, "min_s": self.min, "max_s": self.max,
            "mean_s": statistics.fmean(self.samples),
            "stdev_s": statistics.stdev(self.samples) if self.n > 1 else 0.0,
            "spread": self.spread, "wide_spread": self.wide,
            "samples_s": self.samples,
        }


def _log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


def fmt_s(seconds: float) -> str:
    if seconds >= 1:
        return f"{seconds:.3g} s" if seconds < 100 else f"{seconds:.0f} s"
    if seconds >= 1e-3:
        return f"{seconds * 1e3:.3g} ms"
    return f"{seconds * 1e6:.3g} µs"


def round_orders(n: int) -> list[list[int]]:
    """The contender orders of successive rounds (cycled): a Williams design.

    Each contender runs right after every other one equally often within the
    rounds of one cycle (n rounds for an even n, 2n for an odd one), and each
    runs at each position equally often.  Why: a round leaves work behind that the
    next contender pays for (writeback, deferred frees, the teardown of the
    processes a CLI contender spawned).  With one fixed order A, B, C, D, A
    always follows D and B always follows A, so A pays D's leftovers every round
    and B never does.  Measured in the dm suite: the in-process path's mount
    took 14-17 ms longer after a dozen process spawns than after its own round.
    """
    if n <= 1:
        return [list(range(n))]
    first = [0] + [(k + 1) // 2 if k % 2 else n - k // 2 for k in range(1, n)]  # 0, 1, n-1, 2, n-2, ...
    rows = [[(x + r) % n for x in first] for r in range(n)]
    if n % 2:
        rows += [row[::-1] for row in rows]
    return rows


def run_benchmark(b: Benchmark, *, quick: bool, runs: int | None, suite: str) -> dict[str, Any]:
    """Measure one benchmark, every contender once per round in round_orders' orders (the warm-up
    rounds take the last ones, the measured rounds start at the first); never raises for a contender failure."""
    n = runs if runs is not None else (min(b.quick_runs, b.runs) if quick else b.runs)
    warmup = 0 if quick else b.warmup   # a smoke run: no untimed rounds (its figures are not results)
    if not quick and n < MIN_RUNS:
        n = MIN_RUNS
    names = [c.name for c in b.contenders]
    samples: dict[str, list[float]] = {c.name: [] for c in b.contenders}
    warm: dict[str, list[float]] = {c.name: [] for c in b.contenders}
    sequence: list[list[Any]] = []   # [round, contender, seconds] in execution order
    error = None
    t0 = time.monotonic()
    _log(f"[{b.name}] {b.description}")
    orders = round_orders(len(b.contenders))
    try:
        for r in range(warmup + n):
            measuring = r >= warmup
            row = []
            for c in (b.contenders[i] for i in orders[(r - warmup) % len(orders)]):
                gc.collect()
                secs = c.once()
                (samples if measuring else warm)[c.name].append(secs)
                sequence.append([r - warmup if measuring else f"warmup{r}", c.name, secs])
                row.append(f"{c.name} {fmt_s(secs) if b.unit == 's' else f'{secs:.3g} {b.unit}'}")
            label = f"{r - warmup + 1}/{n}" if measuring else "warmup"
            _log(f"  [{b.name}] round {label}: " + " | ".join(row))
            if b.between_rounds:
                b.between_rounds()
    except SkipBenchmark as e:
        error = {"skipped": str(e)}
        _log(f"  [{b.name}] skipped: {e}")
    except Exception as e:  # noqa: BLE001 - a failing contender is recorded, not fatal
        error = {"error": f"{type(e).__name__}: {e}",
                 "traceback": traceback.format_exc(limit=8)}
        _log(f"  [{b.name}] FAILED: {type(e).__name__}: {e}")
    return summarize(b, suite=suite, names=names, samples=samples, warm=warm,
                     sequence=sequence, error=error, quick=quick,
                     wall_s=time.monotonic() - t0)


def summarize(b: Benchmark, *, suite: str, names: list[str], samples: dict[str, list[float]],
              warm: dict[str, list[float]], sequence: list, error: dict | None, quick: bool,
              wall_s: float) -> dict[str, Any]:
    stats = {k: Stats(v) for k, v in samples.items()}
    subj = stats.get(b.subject)
    ref = stats.get(b.reference) if b.reference else None
    complete = error is None and subj is not None and subj.n > 0
    ratio = paired = None
    if complete and ref is not None and ref.n > 0 and ref.median > 0:
        ratio = subj.median / ref.median
        pairs = [s / r for s, r in zip(subj.samples, ref.samples) if r > 0]
        paired = statistics.median(pairs) if pairs else None

    status, miss_by, outcome = "n/a", None, None
    if error is not None:
        status = "skipped" if "skipped" in error else "error"
    elif b.target is not None and complete:
        value = (ratio if b.target.kind == "ratio" else
                 subj.median if b.target.kind == "max" else subj.median * 1e3)
        if value is None:
            status = "error"
        else:
            met = value <= b.target.value
            miss_by = None if met else value / b.target.value - 1
            outcome = "met" if met else "missed"
            # A quick run is a smoke test: its workloads are scaled down, so it never judges.
            status = "not judged (quick)" if quick else outcome
    return {
        "name": b.name,
        "suite": suite,
        "unit": b.unit,
        "description": b.description,
        "subject": b.subject,
        "reference": b.reference,
        "target": None if b.target is None else {"kind": b.target.kind, "value": b.target.value,
                                                 "text": b.target.describe()},
        "status": status,
        "missed_by": miss_by,
        "outcome": outcome,           # met/missed against the target, also in quick runs
        "ratio": ratio,
        "paired_ratio_median": paired,
        "workload": b.workload,
        "notes": list(b.notes),
        "contenders": {
            name: {
                "role": next(c.role for c in b.contenders if c.name == name),
                "info": next(c.info for c in b.contenders if c.name == name),
                "warmup_s": warm[name],
                **stats[name].as_dict(),
            } for name in names
        },
        "order": names,
        "sequence": sequence,
        "error": error,
        "wall_s": wall_s,
    }


def run_suite(name: str, suite_fn: Callable, ctx, *, quick: bool, runs: int | None) -> list[dict]:
    """Drive one suite generator; its ``finally`` cleanup runs whatever happens."""
    results: list[dict] = []
    gen = suite_fn(ctx)
    try:
        while True:
            try:
                b = next(gen)
            except StopIteration:
                break
            except SkipBenchmark as e:
                results.append(_suite_failure(name, {"skipped": str(e)}))
                _log(f"[{name}] suite skipped: {e}")
                break
            except Exception as e:  # noqa: BLE001
                results.append(_suite_failure(name, {"error": f"{type(e).__name__}: {e}",
                                                     "traceback": traceback.format_exc(limit=8)}))
                _log(f"[{name}] suite setup FAILED: {type(e).__name__}: {e}")
                break
            results.append(run_benchmark(b, quick=quick, runs=runs, suite=name))
    finally:
        try:
            gen.close()
        except Exception as e:  # noqa: BLE001 - cleanup failure must not hide results
            _log(f"[{name}] cleanup FAILED: {type(e).__name__}: {e}")
            results.append(_suite_failure(name + ".cleanup", {"error": f"{type(e).__name__}: {e}"}))
    return results


def _suite_failure(name: str, error: dict) -> dict[str, Any]:
    return {"name": name, "suite": name.split(".")[0], "description": "suite setup",
            "subject": None, "reference": None, "target": None,
            "status": "skipped" if "skipped" in error else "error", "missed_by": None, "outcome": None,
            "ratio": None, "paired_ratio_median": None, "workload": {}, "notes": [],
            "contenders": {}, "order": [], "sequence": [], "error": error, "wall_s": 0.0}

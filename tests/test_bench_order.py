"""The benchmark runner's round orders (benchmarks.runner.round_orders): a balanced design.

Pure functions, no timings: that each contender runs right after every other
one equally often, at every position equally often, and that run_benchmark
follows those orders and records them in the sequence it reports.
"""

from __future__ import annotations

from collections import Counter

from hypothesis import given, strategies as st

from benchmarks.runner import Benchmark, Contender, round_orders, run_benchmark


@given(st.integers(min_value=1, max_value=12))
def test_each_order_is_a_permutation(n):
    rows = round_orders(n)
    assert rows and all(sorted(row) == list(range(n)) for row in rows)


@given(st.integers(min_value=2, max_value=12))
def test_every_contender_follows_every_other_equally_often(n):
    rows = round_orders(n)
    follows = Counter((row[i], row[i + 1]) for row in rows for i in range(n - 1))
    assert set(follows) == {(a, b) for a in range(n) for b in range(n) if a != b}
    assert len(set(follows.values())) == 1


@given(st.integers(min_value=1, max_value=12))
def test_every_contender_takes_every_position_equally_often(n):
    rows = round_orders(n)
    at = Counter((x, i) for row in rows for i, x in enumerate(row))
    assert len(at) == n * n and len(set(at.values())) == 1


def test_fixed_order_is_not_what_runs():
    # the design the runner replaced: A, B, C, D every round (A always after D)
    assert len({tuple(row) for row in round_orders(4)}) == 4


def test_run_benchmark_follows_the_orders_and_records_them():
    ran: list[str] = []

    def contender(name):
        def once():
            ran.append(name)
            return 0.001
        return Contender(name, once)

    names = ["a", "b", "c", "d"]
    b = Benchmark(name="t.order", description="order", contenders=[contender(x) for x in names],
                  subject="a", reference="b", runs=8, warmup=1)
    res = run_benchmark(b, quick=False, runs=8, suite="t")
    rows = round_orders(4)
    expected = [names[i] for i in rows[-1]]  # the warm-up round takes the last order
    for r in range(8):
        expected += [names[i] for i in rows[r % 4]]
    assert ran == expected
    assert [c for _, c, _ in res["sequence"]] == expected
    assert all(res["contenders"][x]["n"] == 8 for x in names)

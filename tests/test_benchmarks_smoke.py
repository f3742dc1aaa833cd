"""Smoke test of the benchmark harness: ``python -m benchmarks run --quick`` end to end.

It runs a short subset of the suites (open_store, per driver, and
the scaling suite: every curve, two small points each, with the kernel-overlay,
fuse-overlayfs, tar and podman peers; docker/containerd daemons are left to
the full run because starting dockerd alone costs seconds) into a temporary
directory, and checks what it wrote: results.json, results.md with its table,
the PNG plots (or, without matplotlib, the line saying why there are none), and
that every benchmark either ran or was skipped with a reason. It never looks
at a timing: timings belong to ``benchmarks/``, not to a pass/fail test.

``LAYERFS_BENCH_SMOKE_SUITES`` overrides the suite list (e.g. ``all`` for every suite).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
SUITES = os.environ.get("LAYERFS_BENCH_SMOKE_SUITES", "open_store,scaling")
PEERS = "kernel-overlay,fuse-overlayfs,tar,podman"

pytestmark = pytest.mark.skipif(os.geteuid() != 0, reason="the harness mounts overlays: needs root")


def _mounts_under(path: Path) -> list[str]:
    base = os.path.realpath(path)
    with open("/proc/self/mountinfo") as f:
        return [l.split()[4] for l in f if l.split()[4].startswith(base.rstrip("/") + "/")]


@pytest.fixture(scope="module")
def smoke_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("bench-smoke")
    cmd = [sys.executable, "-m", "benchmarks", "run", "--quick", "--out", str(out)]
    if SUITES != "all":
        cmd += ["--suite", SUITES, "--peers", PEERS]
    proc = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=600)
    yield out, proc
    assert not _mounts_under(out), f"the harness left mounts behind: {_mounts_under(out)}"


def test_quick_run_exits_cleanly(smoke_run):
    out, proc = smoke_run
    assert proc.returncode == 0, f"exit {proc.returncode}; stderr ends:\n{proc.stderr[-3000:]}"
    assert not list(out.glob("work-*")), "the run's work dir was not removed"


def test_results_json_and_table(smoke_run):
    out, _ = smoke_run
    doc = json.loads((out / "results.json").read_text())
    assert doc["config"]["quick"] is True
    assert doc["machine"]["loadavg_start"] is not None and "loadavg_end" in doc["machine"]
    assert "podman" in doc["peers"] and "docker" in doc["peers"]
    md = (out / "results.md").read_text()
    assert "| benchmark | median | min | max | n |" in md
    assert doc["results"], "no benchmark results at all"
    for r in doc["results"]:
        assert r["name"] in md, f"{r['name']} missing from results.md"


def test_every_benchmark_ran_or_was_skipped_with_a_reason(smoke_run):
    out, _ = smoke_run
    doc = json.loads((out / "results.json").read_text())
    bad = []
    for r in doc["results"]:
        err = r.get("error") or {}
        if r["status"] == "skipped":
            if not (err.get("skipped") or "").strip():
                bad.append(f"{r['name']}: skipped without a reason")
            continue
        if r["status"] == "error" or err.get("error"):
            bad.append(f"{r['name']}: {err.get('error')}")
            continue
        subj = r["contenders"].get(r["subject"]) or {}
        if not subj.get("n"):
            bad.append(f"{r['name']}: the subject has no measured rounds")
    assert not bad, "\n".join(bad)
    names = {r["name"] for r in doc["results"]}
    if "scaling" in SUITES.split(",") or SUITES == "all":
        for curve in ("depth.mount", "files.apply", "files.find", "files.changes", "containers.create",
                      "containers.open", "pull.parallel"):
            rows = [r for r in doc["results"] if (r.get("workload") or {}).get("curve") == curve]
            assert len(rows) >= 2 or f"scaling.{curve.split('.')[0]}" in names, \
                f"scaling curve {curve}: {len(rows)} point(s)"


def test_plots_written(smoke_run):
    out, _ = smoke_run
    doc = json.loads((out / "results.json").read_text())
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        assert doc.get("plots_error") and "Plots not drawn" in (out / "results.md").read_text()
        return
    files = {p["file"] for p in doc["plots"]}
    assert files, f"no plots written: {doc.get('plots_error')}"
    for f in files:
        data = (out / f).read_bytes()
        assert data.startswith(b"\x89PNG") and len(data) > 5_000, f"{f} is not a real PNG"
        assert f"]({f})" in (out / "results.md").read_text()
    if "scaling" in SUITES.split(",") or SUITES == "all":
        assert "plot-scaling.png" in files

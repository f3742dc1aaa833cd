"""results.json and results.md."""

from __future__ import annotations

import json
from pathlib import Path

from .runner import WIDE_SPREAD, fmt_s

SCHEMA = 1


def _unit(seconds: float) -> tuple[float, str]:
    if seconds >= 1:
        return 1.0, "s"
    if seconds >= 1e-3:
        return 1e3, "ms"
    return 1e6, "µs"


def _fmt(v: float, scale: float, unit: str) -> str:
    x = v * scale
    return f"{x:.3g} {unit}" if x < 1000 else f"{x:.0f} {unit}"


def _row(r: dict) -> list[str]:
    if not r.get("contenders") or r["subject"] not in r["contenders"] \
            or not r["contenders"][r["subject"]].get("n"):
        why = (r.get("error") or {}).get("skipped") or (r.get("error") or {}).get("error") or ""
        return [r["name"], "—", "—", "—", "0", "—", "—",
                (r.get("target") or {}).get("text", "—"), f"{r['status']}: {why}"[:160]]
    s = r["contenders"][r["subject"]]
    scale, unit = _unit(s["median_s"])
    flag = " ⚠" if s["wide_spread"] else ""
    ref = "—"
    if r.get("reference") and r["contenders"].get(r["reference"], {}).get("n"):
        rs = r["contenders"][r["reference"]]
        ref = f"{r['reference']}: {fmt_s(rs['median_s'])}" + (" ⚠" if rs["wide_spread"] else "")
    ratio = f"{r['ratio']:.2f}×" if r.get("ratio") is not None else "—"
    status = r["status"]
    if status == "missed" and r.get("missed_by") is not None:
        status = f"missed by {r['missed_by'] * 100:.0f}%"
    if status == "not judged (quick)":
        status = f"({r.get('outcome')}) not judged: quick"
    if status == "n/a" and r.get("reference") and r.get("target") is None:
        status = "reported (no target)"
    if r.get("error"):
        status += " (error)"
    return [r["name"], _fmt(s["median_s"], scale, unit) + flag, _fmt(s["min_s"], scale, unit),
            _fmt(s["max_s"], scale, unit), str(s["n"]), ref, ratio,
            (r.get("target") or {}).get("text", "—"), status]


def markdown(doc: dict) -> str:
    m = doc["machine"]
    cfg = doc["config"]
    fs = m.get("work_filesystem") or {}
    lf = m.get("layerfs") or {}
    lines = [
        "# layerfs benchmarks",
        "",
        f"{m['date_utc']} · {'QUICK smoke run: scaled-down workloads, fewer runs, targets not evaluated · ' if cfg['quick'] else ''}"
        f"driver `{cfg['driver']}` · suites: {', '.join(cfg['suites'])}",
        "",
        f"Machine: {m.get('os')}, kernel {m['kernel']}, {m['cpu_count']} CPUs ({m.get('cpu_model')}), "
        f"{(m.get('mem_total_bytes') or 0) / 2**30:.0f} GiB RAM; Python {m['python']}; {m.get('tar')}; "
        f"{m.get('gzip') or 'no gzip'}; {m.get('zstd') or 'no zstd CLI'}; "
        f"layerfs {lf.get('version')} ({(lf.get('git_commit') or '?')[:12]}{', dirty' if lf.get('git_dirty') else ''}). "
        f"Work dir on {fs.get('fstype')} ({fs.get('source')}). "
        f"Load average at start {m.get('loadavg_start')}, at end {m.get('loadavg_end')}.",
        "",
        "| benchmark | median | min | max | n | reference | ratio | target | met/missed |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for r in doc["results"]:
        lines.append("| " + " | ".join(c.replace("|", "\\|") for c in _row(r)) + " |")
    lines += [
        "",
        f"Median of n measured rounds after warm-up; contenders alternated A, B, A, B, … in the same "
        f"run. Ratio = median of the subject / median of the reference. ⚠ = wide spread "
        f"(max/min > {WIDE_SPREAD}). Absolute targets are judged on the median, ratio targets on the ratio.",
        "",
        "## Notes",
        "",
    ]
    for r in doc["results"]:
        notes = list(r.get("notes") or [])
        for name, c in (r.get("contenders") or {}).items():
            if c.get("wide_spread"):
                notes.append(f"wide spread for {name}: max/min = {c['spread']:.2f}")
        if r.get("paired_ratio_median") is not None:
            notes.append(f"median of per-round ratios: {r['paired_ratio_median']:.2f}×")
        err = r.get("error") or {}
        if err.get("error"):
            notes.append(f"ERROR: {err['error']}")
        if err.get("skipped"):
            notes.append(f"skipped: {err['skipped']}")
        wl = r.get("workload") or {}
        if wl.get("description"):
            notes.insert(0, f"input: {wl['description']}")
        if notes:
            lines.append(f"- **{r['name']}** — {r['description']}")
            lines += [f"  - {n}" for n in notes]
    lines.append("")
    return "\n".join(lines)


def write(doc: dict, out_dir: Path) -> tuple[Path, Path]:
    out_dir.mkdir(parents=True, exist_ok=True)
    j, md = out_dir / "results.json", out_dir / "results.md"
    j.write_text(json.dumps({"schema": SCHEMA, **doc}, indent=1, default=str) + "\n")
    md.write_text(markdown(doc))
    return j, md

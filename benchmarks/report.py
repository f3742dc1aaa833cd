"""results.json and results.md."""

from __future__ import annotations

import json
from pathlib import Path

from .runner import WIDE_SPREAD

SCHEMA = 1


def _unit(seconds: float) -> tuple[float, str]:
    if seconds >= 1:
        return 1.0, "s"
    if seconds >= 1e-3:
        return 1e3, "ms"
    return 1e6, "µs"


def _scale(r: dict, seconds: float) -> tuple[float, str]:
    """Scale and unit for a result's values (seconds by default; a benchmark may use another unit)."""
    unit = r.get("unit") or "s"
    return _unit(seconds) if unit == "s" else (1.0, unit)


def _fmt_v(r: dict, v: float) -> str:
    scale, unit = _scale(r, v)
    return _fmt(v, scale, unit)


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
    scale, unit = _scale(r, s["median_s"])
    flag = " ⚠" if s["wide_spread"] else ""
    ref = "—"
    if r.get("reference") and r["contenders"].get(r["reference"], {}).get("n"):
        rs = r["contenders"][r["reference"]]
        ref = f"{r['reference']}: {_fmt_v(r, rs['median_s'])}" + (" ⚠" if rs["wide_spread"] else "")
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
        f"Median of n measured rounds after warm-up; every contender runs once per round, in the same "
        f"run, in an order that changes from round to round (a Williams design: each runs right after "
        f"every other one equally often). Ratio = median of the subject / median of the reference. ⚠ = wide spread "
        f"(max/min > {WIDE_SPREAD}). Absolute targets are judged on the median, ratio targets on the ratio.",
        "",
    ]
    lines += contender_table(doc)
    if doc.get("plots_error"):
        lines += [f"Plots not drawn: {doc['plots_error']} (`pip install -e '.[bench]'`)", ""]
    if doc.get("plots"):
        lines += ["## Plots", ""]
        for p in doc["plots"]:
            lines += [f"![{p['title']}]({p['file']})", ""]
    skipped = cfg.get("drivers_skipped") or {}
    peers = doc.get("peers") or {}
    if skipped or peers:
        lines += ["## Drivers and peers", ""]
        lines += [f"- layerfs drivers measured: {', '.join(cfg.get('drivers') or []) or 'none'}"]
        lines += [f"- driver `{d}` skipped: {why}" for d, why in skipped.items()]
        for name, v in peers.items():
            if isinstance(v, dict) and "available" in v:
                pk = ", ".join(f"{k} {x}" for k, x in (v.get("packages") or {}).items() if x)
                lines.append(f"- peer `{name}`: {'installed' if v['available'] else 'not installed'}"
                             f"{' · ' + v['version'] if v.get('version') else ''}{' · apt ' + pk if pk else ''}")
        lines.append("")
    lines += ["## Notes", ""]
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


def contender_table(doc: dict) -> list[str]:
    """Every contender of every benchmark: median (min–max), n, ratio to the reference and to the best peer."""
    rows = []
    for r in doc["results"]:
        cs = {k: v for k, v in (r.get("contenders") or {}).items() if v.get("n")}
        if len(cs) < 2:
            continue
        peers = [v["median_s"] for v in cs.values() if v.get("role") == "reference" and v["median_s"] > 0]
        best = min(peers) if peers else None
        ref = cs.get(r.get("reference") or "")
        nbytes = (r.get("workload") or {}).get("bytes")
        for name, c in cs.items():
            to_ref = f"{c['median_s'] / ref['median_s']:.2f}×" if ref and ref["median_s"] > 0 else "—"
            to_best = f"{c['median_s'] / best:.2f}×" if best else "—"
            extra = ""
            if nbytes and (r.get("unit") or "s") == "s" and c["median_s"] > 0:
                extra = f"{nbytes / c['median_s'] / 1e9:.2f} GB/s"
            rows.append(f"| {r['name']} | {name}{' (subject)' if name == r.get('subject') else ''} | "
                        f"{_fmt_v(r, c['median_s'])}{' ⚠' if c.get('wide_spread') else ''} | "
                        f"{_fmt_v(r, c['min_s'])} – {_fmt_v(r, c['max_s'])} | {c['n']} | {to_ref} | {to_best} | {extra} |")
    if not rows:
        return []
    return ["## Every contender", "",
            "Ratios are of medians (lower is faster; for MB rows, lower is smaller). *best peer* = the fastest "
            "non-layerfs contender of the row.", "",
            "| benchmark | contender | median | min – max | n | ÷ reference | ÷ best peer | throughput |",
            "|---|---|---|---|---|---|---|---|"] + rows + [""]


def write(doc: dict, out_dir: Path) -> tuple[Path, Path]:
    out_dir.mkdir(parents=True, exist_ok=True)
    j, md = out_dir / "results.json", out_dir / "results.md"
    try:
        from . import plots
        doc["plots"] = plots.write(doc, out_dir)
    except Exception as e:  # noqa: BLE001 - a missing matplotlib must not lose the results
        doc["plots"] = []
        doc["plots_error"] = f"{type(e).__name__}: {e}"
    j.write_text(json.dumps({"schema": SCHEMA, **doc}, indent=1, default=str) + "\n")
    md.write_text(markdown(doc))
    return j, md

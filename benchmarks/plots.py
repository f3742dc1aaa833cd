"""PNG plots next to results.md (matplotlib, Agg backend).

One figure per suite: a panel per operation, a bar per system (layerfs drivers in
blue/green shades, peers in orange/grey), height = median, whiskers = min–max of
the measured rounds. Rows of per-driver suites (``register.tar[overlay2]``,
``register.tar[aufs]``) share the panel of their operation. A panel whose bars
differ by more than 30× uses a log scale.

Rows whose workload names a ``curve`` and an ``x`` (the scaling suite) are drawn
instead as curves, one panel per curve and one line per system: log-log axes,
the median at each point, a shaded min–max band.
"""

from __future__ import annotations

import re
from pathlib import Path

_DRIVER_RE = re.compile(r"^(.*)\[([^\]]+)\]$")
LAYERFS_COLORS = ["#1f77b4", "#2ca02c", "#17becf", "#9467bd"]
PEER_COLORS = ["#ff7f0e", "#7f7f7f", "#d62728", "#8c564b", "#bcbd22", "#e377c2"]


def _split(name: str) -> tuple[str, str | None]:
    m = _DRIVER_RE.match(name)
    return (m.group(1), m.group(2)) if m else (name, None)


def _panels(doc: dict) -> dict[str, dict[str, list]]:
    """suite -> operation -> [(label, role, median, min, max, unit)]."""
    out: dict[str, dict[str, list]] = {}
    for r in doc["results"]:
        if _is_curve(r):
            continue
        base, driver = _split(r["name"])
        suite = _split(r.get("suite") or base.split(".")[0])[0]
        cs = {k: v for k, v in (r.get("contenders") or {}).items() if v.get("n")}
        if not cs:
            continue
        bars = out.setdefault(suite, {}).setdefault(base, [])
        seen = {b[0] for b in bars}
        for name, c in cs.items():
            label = f"{name} [{driver}]" if driver and c.get("role") == "layerfs" else name
            if label in seen:
                continue
            seen.add(label)
            bars.append((label, c.get("role"), c["median_s"], c["min_s"], c["max_s"], r.get("unit") or "s"))
    return out


def _is_curve(r: dict) -> bool:
    wl = r.get("workload") or {}
    return "curve" in wl and "x" in wl


def _curves(doc: dict) -> dict[str, dict[str, dict]]:
    """suite -> curve -> {"x_label", "series": {system: (role, [(x, median, min, max)])}}."""
    out: dict[str, dict[str, dict]] = {}
    for r in doc["results"]:
        if not _is_curve(r):
            continue
        wl = r["workload"]
        suite = _split(r.get("suite") or r["name"].split(".")[0])[0]
        cv = out.setdefault(suite, {}).setdefault(wl["curve"], {"x_label": wl.get("x_label", "x"), "series": {}})
        for name, c in (r.get("contenders") or {}).items():
            if c.get("n"):
                role, pts = cv["series"].setdefault(name, (c.get("role"), []))
                pts.append((wl["x"], c["median_s"], c["min_s"], c["max_s"]))
    return out


def _write_curves(plt, suite: str, curves: dict, out_dir: Path, quick: str) -> dict | None:
    from matplotlib.ticker import NullFormatter
    curves = {k: v for k, v in curves.items() if v["series"]}
    if not curves:
        return None
    n = len(curves)
    cols = min(3, n)
    rows = (n + cols - 1) // cols
    fig, axes = plt.subplots(rows, cols, figsize=(5.4 * cols, 4.0 * rows), squeeze=False)
    for ax in axes.flat[n:]:
        ax.axis("off")
    cmap: dict[str, str] = {}
    for cv in curves.values():
        for name, (role, _) in sorted(cv["series"].items(), key=lambda kv: kv[1][0] != "layerfs"):
            if name not in cmap:
                pool = LAYERFS_COLORS if role == "layerfs" else PEER_COLORS
                k = sum(1 for v in cmap.values() if v in pool)
                cmap[name] = pool[k % len(pool)]
    for ax, (curve, cv) in zip(axes.flat, curves.items()):
        top = max(p[3] for _, pts in cv["series"].values() for p in pts)
        scale, unit = _scale([top], "s")
        for name, (role, pts) in sorted(cv["series"].items(), key=lambda kv: kv[1][0] != "layerfs"):
            pts = sorted(pts)
            xs = [p[0] for p in pts]
            ax.plot(xs, [p[1] * scale for p in pts], marker="o", markersize=3.5, color=cmap[name],
                    linestyle="-" if role == "layerfs" else "--", label=name, linewidth=1.4)
            ax.fill_between(xs, [p[2] * scale for p in pts], [p[3] * scale for p in pts],
                            color=cmap[name], alpha=0.15, linewidth=0)
        ax.set_xscale("log")
        ax.set_yscale("log")
        xs_all = sorted({p[0] for _, pts in cv["series"].values() for p in pts})
        ax.set_xticks(xs_all)
        ax.set_xticklabels([f"{x:,}" for x in xs_all], fontsize=7)
        ax.xaxis.set_minor_formatter(NullFormatter())
        ax.set_title(curve, fontsize=9)
        ax.set_xlabel(cv["x_label"], fontsize=8)
        ax.set_ylabel(f"median ({unit})", fontsize=8)
        ax.tick_params(labelsize=7)
        ax.grid(True, which="both", alpha=0.25)
        ax.legend(fontsize=6.5)
    fig.suptitle(f"{suite}: median per point (log-log), band = min–max{quick}", fontsize=10)
    fig.tight_layout()
    fname = f"plot-{suite}.png"
    fig.savefig(out_dir / fname, dpi=110)
    plt.close(fig)
    return {"suite": suite, "file": fname, "title": f"{suite}: log-scale curves"}


def _scale(values: list[float], unit: str) -> tuple[float, str]:
    if unit != "s":
        return 1.0, unit
    top = max(values) if values else 1.0
    if top >= 1:
        return 1.0, "s"
    if top >= 1e-3:
        return 1e3, "ms"
    return 1e6, "µs"


def write(doc: dict, out_dir: Path) -> list[dict]:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    written = []
    quick = " (QUICK smoke run: scaled-down inputs)" if doc.get("config", {}).get("quick") else ""
    for suite, ops in _panels(doc).items():
        # layerfs drivers first, then the peers, each group in measurement order
        ops = {k: sorted(v, key=lambda b: b[1] != "layerfs") for k, v in ops.items() if v}
        if not ops:
            continue
        n = len(ops)
        cols = min(3, n)
        rows = (n + cols - 1) // cols
        fig, axes = plt.subplots(rows, cols, figsize=(5.2 * cols, 3.9 * rows), squeeze=False)
        for ax in axes.flat[n:]:
            ax.axis("off")
        cmap: dict[str, str] = {}   # the same system has the same colour in every panel
        for bars in ops.values():
            for b in bars:
                if b[0] not in cmap:
                    pool = LAYERFS_COLORS if b[1] == "layerfs" else PEER_COLORS
                    k = sum(1 for v in cmap.values() if v in pool)
                    cmap[b[0]] = pool[k % len(pool)]
        for ax, (op, bars) in zip(axes.flat, ops.items()):
            scale, unit = _scale([b[4] for b in bars], bars[0][5])
            colors = [cmap[b[0]] for b in bars]
            med = [b[2] * scale for b in bars]
            err = [[max(0.0, (b[2] - b[3]) * scale) for b in bars], [max(0.0, (b[4] - b[2]) * scale) for b in bars]]
            x = range(len(bars))
            ax.bar(x, med, color=colors, yerr=err, capsize=3, edgecolor="black", linewidth=0.4)
            ax.set_xticks(list(x))
            ax.set_xticklabels([b[0] for b in bars], rotation=30, ha="right", fontsize=7)
            ax.set_title(op, fontsize=9)
            ax.set_ylabel(f"median ({unit})", fontsize=8)
            pos = [m for m in med if m > 0]
            if pos and max(pos) / min(pos) > 30:
                ax.set_yscale("log")
            for xi, m in zip(x, med):
                ax.annotate(f"{m:.3g}", (xi, m), ha="center", va="bottom", fontsize=6,
                            xytext=(0, 2), textcoords="offset points")
            ax.tick_params(axis="y", labelsize=7)
        fig.suptitle(f"{suite}: median, whiskers min–max{quick}", fontsize=10)
        fig.tight_layout()
        fname = f"plot-{suite}.png"
        fig.savefig(out_dir / fname, dpi=110)
        plt.close(fig)
        written.append({"suite": suite, "file": fname, "title": f"{suite}: grouped bars per operation"})
    for suite, curves in _curves(doc).items():
        w = _write_curves(plt, suite, curves, out_dir, quick)
        if w:
            written.append(w)
    return written

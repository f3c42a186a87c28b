"""The bench's outputs: a markdown report, a JSON file, and PNG plots.

Markdown for people (pasted into bench/README.md), JSON for anything that compares runs, and
plots for what tables hide: the shape of a latency distribution, and how traffic moves when a
server slows down. Plots need matplotlib (the `bench` extra); without it they are skipped with
a note, never a failure.
"""

from __future__ import annotations

import json
import math
import os
import platform
from collections.abc import Sequence
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from bench.scenarios.base import Bars, Outcome, Table, Traffic


def machine() -> dict[str, Any]:
    """What the numbers came from: they mean little without it."""
    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    try:
        load = os.getloadavg()
    except OSError:
        load = (math.nan,) * 3
    try:
        cores = len(os.sched_getaffinity(0))
    except AttributeError:
        cores = os.cpu_count() or 0
    return {"cpu": cpu, "cores": cores, "python": platform.python_version(),
            "platform": platform.platform(), "loadavg_1_5_15": [round(x, 2) for x in load]}


def markdown_table(table: Table) -> str:
    lines = [f"**{table.title}**", "", "| " + " | ".join(table.columns) + " |",
             "| " + " | ".join("---" if i == 0 else "---:" for i in range(len(table.columns))) + " |"]
    lines += ["| " + " | ".join(row) + " |" for row in table.rows]
    for note in table.notes:
        lines += ["", note]
    return "\n".join(lines)


def markdown(outcomes: Sequence[Outcome], meta: dict[str, Any]) -> str:
    m = meta["machine"]
    parts = [
        "# modelfleet bench results",
        "",
        f"Command: `{meta['command']}`  ",
        f"Started {meta['started']}, took {meta['duration_s']:.0f} s.  ",
        f"Machine: {m['cpu']}, {m['cores']} cores, Python {m['python']}, {m['platform']}; "
        f"load average at start {m['loadavg_1_5_15']}, at end {meta['loadavg_end']}.",
    ]
    if meta.get("notes"):
        parts += ["", "Notes:", ""] + [f"- {n}" for n in meta["notes"]]
    for outcome in outcomes:
        parts += ["", f"## {outcome.scenario}", "", outcome.setup]
        for table in outcome.tables:
            parts += ["", markdown_table(table)]
        for note in outcome.notes:
            parts += ["", note]
    return "\n".join(parts) + "\n"


def _clean(value: Any) -> Any:
    """JSON has no NaN: write null for 'not measured'."""
    if isinstance(value, float) and (math.isnan(value) or math.isinf(value)):
        return None
    if isinstance(value, dict):
        return {str(k): _clean(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_clean(v) for v in value]
    return value


def json_report(outcomes: Sequence[Outcome], meta: dict[str, Any]) -> str:
    doc = {**meta, "scenarios": {
        o.scenario: {"setup": o.setup, "results": o.data, "notes": o.notes,
                     "tables": [{"title": t.title, "columns": t.columns, "rows": t.rows,
                                 "notes": t.notes} for t in o.tables]}
        for o in outcomes}}
    return json.dumps(_clean(doc), indent=2, sort_keys=False) + "\n"


def write(outcomes: Sequence[Outcome], meta: dict[str, Any], out_dir: Path,
          plots: bool) -> list[Path]:
    """Write results.md, results.json and (if asked and possible) the PNGs; returns the paths."""
    out_dir.mkdir(parents=True, exist_ok=True)
    written = []
    if plots:
        written += draw(outcomes, out_dir, meta)
    md = out_dir / "results.md"
    md.write_text(markdown(outcomes, meta))
    js = out_dir / "results.json"
    js.write_text(json_report(outcomes, meta))
    return [md, js, *written]


# ---- plots ------------------------------------------------------------------------------------


def draw(outcomes: Sequence[Outcome], out_dir: Path, meta: dict[str, Any]) -> list[Path]:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        meta.setdefault("notes", []).append("plots skipped: matplotlib is not installed "
                                            "(pip install -e '.[bench]')")
        return []
    paths = []
    for outcome in outcomes:
        for name, series in outcome.cdfs.items():
            if any(series.values()):
                paths.append(_cdf(plt, name, series, out_dir / f"cdf-{name}.png"))
        for name, traffic in outcome.traffic.items():
            if any(traffic.by_contender.values()):
                paths.append(_share(plt, name, traffic, out_dir / f"share-{name}.png"))
        for name, bars in outcome.bars.items():
            if any(bars.by_contender.values()):
                paths.append(_bars(plt, bars, out_dir / f"{name}.png"))
    return paths


def _cdf(plt: Any, name: str, series: dict[str, list[float]], path: Path) -> Path:
    fig, ax = plt.subplots(figsize=(8, 5))
    for contender, values in series.items():
        if not values:
            continue
        ordered = sorted(values)
        n = len(ordered)
        style = "--" if contender.startswith("litellm") else ":" if contender == "oracle" else "-"
        ax.plot([v * 1000 for v in ordered], [(i + 1) / n for i in range(n)], style,
                label=contender, linewidth=1.5)
    ax.set_xscale("log")
    ax.set_xlabel("latency, ms (log scale)")
    ax.set_ylabel("fraction of requests")
    ax.set_title(f"latency CDF: {name}")
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=8, loc="lower right")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def _share(plt: Any, name: str, traffic: Traffic, path: Path) -> Path:
    """Share of requests sent to the highlighted server over time: one small panel per
    contender (nine lines on one chart are unreadable), the fault period shaded.

    About 15 requests per time bin: fewer makes every line a saw, more hides how fast it moved.
    """
    series = {c: p for c, p in traffic.by_contender.items() if p}
    cols = 3
    rows = -(-len(series) // cols)
    fig, axes = plt.subplots(rows, cols, figsize=(4 * cols, 2.6 * rows), sharex=True,
                             sharey=True, squeeze=False)
    end = max(t for pts in series.values() for t, _ in pts) or 1.0
    fewest = min(len(p) for p in series.values())
    bins = max(6, min(40, fewest // 15))
    width = end / bins
    fair = 100 / max(1, len(traffic.servers))
    for ax, (contender, points) in zip(axes.flat, series.items(), strict=False):
        xs, ys = [], []
        for b in range(bins):
            inside = [srv for t, srv in points if b * width <= t < (b + 1) * width]
            if inside:
                xs.append((b + 0.5) * width)
                ys.append(100 * inside.count(traffic.highlight) / len(inside))
        ax.plot(xs, ys, "-o", markersize=2.5, linewidth=1.2)
        for start, stop, _ in traffic.windows:
            ax.axvspan(start, stop, color="red", alpha=0.1)
        ax.axhline(fair, color="grey", linewidth=0.8, linestyle=":")
        ax.set_title(contender, fontsize=9)
        ax.set_ylim(0, 105)
        ax.grid(True, alpha=0.3)
    for ax in list(axes.flat)[len(series):]:
        ax.set_visible(False)
    for ax in axes[-1]:
        ax.set_xlabel("seconds into the run", fontsize=8)
    for ax in axes[:, 0]:
        ax.set_ylabel("% to that server", fontsize=8)
    shaded = "; shaded: " + ", ".join(w[2] for w in traffic.windows) if traffic.windows else ""
    fig.suptitle(f"{name}: share of requests sent to {traffic.highlight} (dotted: fair share"
                 f"{shaded})", fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path


def _bars(plt: Any, bars: Bars, path: Path) -> Path:
    """One horizontal bar per contender, cut into each server's share of its traffic: an even
    split is four equal parts, a pile-up one long part."""
    series = {c: v for c, v in bars.by_contender.items() if v}
    fig, ax = plt.subplots(figsize=(9, 0.5 * len(series) + 1.6))
    colours = plt.get_cmap("tab10").colors
    for row, (contender, shares) in enumerate(series.items()):
        left = 0.0
        for i, part in enumerate(shares):
            ax.barh(row, part * 100, left=left, color=colours[i % len(colours)],
                    edgecolor="white", height=0.7)
            if part >= 0.06:
                ax.text(left + part * 50, row, f"{part * 100:.0f}", ha="center", va="center",
                        fontsize=7, color="white")
            left += part * 100
        label = bars.labels.get(contender)
        if label:
            ax.text(101, row, label, va="center", fontsize=8)
    ax.set_yticks(range(len(series)), list(series), fontsize=8)
    ax.invert_yaxis()
    ax.set_xlim(0, 118)
    ax.set_xlabel("% of requests (each colour one server, busiest first)")
    ax.set_title(bars.title, fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path


def stamp() -> str:
    return datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M UTC")


"""Showing a `FleetReport`: an aligned table, coloured in a terminal and plain when piped,
or one JSON line for scripts. The data comes from `modelfleet.report`."""

from __future__ import annotations

import json
import sys
import time
from typing import TYPE_CHECKING, TextIO

from modelfleet.cli.terminal import paint, visible_len

if TYPE_CHECKING:
    from modelfleet.report import FleetReport, ServerRow


def _ms(seconds: float | None) -> str:
    if seconds is None:
        return "-"
    ms = seconds * 1000.0
    return f"{ms:.0f} ms" if ms >= 10 else f"{ms:.1f} ms"


def _speed(row: ServerRow) -> str:
    if row.tokens_per_s is not None:
        return f"{row.tokens_per_s:.0f} tok/s"
    if row.ms_per_input is not None:
        return f"{row.ms_per_input:.1f} ms/input"
    return "-"


def _count(value: float | None) -> str:
    return "-" if value is None else f"{value:g}"


def _hits(row: ServerRow) -> str:
    """The prefix-cache hit ratio: since the previous round under --watch, else overall."""
    ratio = row.prefix_hit_ratio_recent if row.prefix_hit_ratio_recent is not None \
        else row.prefix_hit_ratio
    return "-" if ratio is None else f"{100 * ratio:.0f}%"


WHY_WIDTH = 72  # a long error message is cut here; --json has it whole


def format_table(report: FleetReport, *, colour: bool = False) -> str:
    """The report as an aligned table, one group of rows per model, and a verdict."""
    header = ["MODEL", "  SERVER", "STATUS", "PROBE", "TTFT", "SPEED", "RUN", "WAIT", "HITS", "WHY"]
    lines: list[list[str]] = []
    for model in report.models:
        first = True
        for row in (r for r in report.servers if r.model == model.name):
            why = row.reason
            if len(why) > WHY_WIDTH:
                why = why[:WHY_WIDTH - 3] + "..."
            lines.append([
                model.name if first else "",
                (paint("*", "bold", colour) if row.picked else " ") + " " + row.server,
                paint(row.status, row.status, colour),
                _ms(row.latency_s), _ms(row.ttft_s), _speed(row),
                _count(row.running), _count(row.waiting), _hits(row),
                why,
            ])
            first = False
    widths = [max([len(h)] + [visible_len(line[i]) for line in lines])
              for i, h in enumerate(header)]
    right = {3, 4, 5, 6, 7, 8}  # numbers line up on the right

    def render(cells: list[str]) -> str:
        out = []
        for i, cell in enumerate(cells):
            pad = " " * (widths[i] - visible_len(cell))
            out.append(pad + cell if i in right else cell + pad)
        return "  ".join(out).rstrip()

    out = [paint(render(header), "dim", colour)]
    previous_model = None
    for cells, row in zip(lines, report.servers, strict=True):
        if previous_model is not None and row.model != previous_model:
            out.append("")
        previous_model = row.model
        out.append(render(cells))
    out.append("")
    found = discovery_lines(report, colour=colour)
    if found:
        out += [*found, ""]
    out.append(summary_line(report, colour=colour))
    return "\n".join(out)


def discovery_lines(report: FleetReport, *, colour: bool = False) -> list[str]:
    """Where the servers of each model with `discover:` came from, and any trouble."""
    lines = []
    for model in report.models:
        found = model.discovery
        if found is None:
            continue
        at = time.strftime("%H:%M:%S", time.localtime(found.found_at))
        draining = f", {found.draining} draining" if found.draining else ""
        line = f"{model.name}: {found.found} servers from {found.source} (looked up at {at}{draining})"
        if found.error:
            line += ": " + paint(found.error, "down", colour)
        lines.append(line)
    return lines


def summary_line(report: FleetReport, *, colour: bool = False) -> str:
    answered = sum(r.healthy for r in report.servers)
    total = len(report.servers)
    marker = f"* = where routing.policy {report.policy} would send the next request"
    took = f"probed {total} servers in {report.took_s:.2f} s"
    if report.ok:
        verdict = paint(f"ok: every model has a healthy server ({answered} of {total} answered)",
                        "up", colour)
    else:
        verdict = paint("NOT OK: no healthy server for " + ", ".join(report.unhealthy_models),
                        "down", colour)
    return f"{verdict}\n{paint(marker + '; ' + took, 'dim', colour)}"


def print_json(report: FleetReport, stream: TextIO = sys.stdout) -> None:
    stream.write(json.dumps(report.to_dict()) + "\n")
    stream.flush()

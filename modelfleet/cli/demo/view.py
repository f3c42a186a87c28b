"""What the demo shows: the live view while the traffic runs (redrawn in a terminal, plain
lines when piped) and, at the end, where the traffic went in each phase."""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import TYPE_CHECKING, TextIO

from modelfleet.cli.demo.record import Done, Record
from modelfleet.cli.terminal import paint
from modelfleet.testing import percentile

if TYPE_CHECKING:
    from modelfleet.cli.demo.fleet import DemoFleet

PLAIN_EVERY_S = 2.0  # one line this often when the output is not a terminal
WINDOW_S = 2.0  # rates, shares and percentiles of the live view cover this much recent time
BAR_WIDTH = 24
_HEALTH = ("up", "degraded", "down")


class LiveView:
    """Redrawn in place in a terminal (about twice a second); plain lines when piped."""

    def __init__(self, out: TextIO, *, tty: bool, colour: bool, fleet: DemoFleet) -> None:
        self.out = out
        self.tty = tty
        self.colour = colour
        self.fleet = fleet
        self._lines = 0
        self._last_plain = 0.0
        self._events_shown = 0
        try:
            "█░".encode(getattr(out, "encoding", None) or "ascii")
            self.full, self.empty = "█", "░"
        except (LookupError, UnicodeEncodeError):
            self.full, self.empty = "#", "."

    def update(self, record: Record, t: float, duration_s: float, *, final: bool = False) -> None:
        if self.tty:
            block = self._block(record, t, duration_s)
            up = f"\x1b[{self._lines}F" if self._lines else ""
            self.out.write(up + "\x1b[J" + "\n".join(block) + "\n")
            self._lines = len(block)
        else:
            for at, text in record.events[self._events_shown:]:
                self.out.write(f"{at:5.1f} s  >>> {text}\n")
            self._events_shown = len(record.events)
            if final or t - self._last_plain >= PLAIN_EVERY_S:
                self._last_plain = t
                self.out.write(self._line(record, t) + "\n")
        self.out.flush()

    def _line(self, record: Record, t: float) -> str:
        recent = record.recent(t, WINDOW_S)
        parts = [f"{t:5.1f} s  {len(recent) / WINDOW_S:3.0f} req/s"]
        for model in self.fleet.config.models.values():
            shares = record.shares(model.name, t - WINDOW_S, t)
            p50, p99 = self._percentiles(recent, model.name)
            spread = " ".join(f"{address.rsplit(':', 1)[1]} {share:4.0%}"
                              for address, share in shares.items())
            parts.append(f"{model.name} {spread} (p50 {p50}, p99 {p99})")
        parts.append(f"{len(record.failed)} failed")
        return "  ".join(parts)

    def _block(self, record: Record, t: float, duration_s: float) -> list[str]:
        recent = record.recent(t, WINDOW_S)
        failed = len(record.failed)
        lines = [
            f"modelfleet demo  {t:4.1f} s of {duration_s:g} s   "
            f"{len(recent) / WINDOW_S:4.0f} req/s   {len(record.done)} requests, "
            + paint(f"{failed} failed", "down" if failed else "up", self.colour),
            paint(f"each server's share of the last {WINDOW_S:g} s of requests, and its health "
                  "as the client sees it", "dim", self.colour),
        ]
        for model in self.fleet.config.models.values():
            p50, p99 = self._percentiles(recent, model.name)
            lines.append(f"{model.name}  p50 {p50}  p99 {p99}")
            shares = record.shares(model.name, t - WINDOW_S, t)
            health = record.health.get(model.name, {})
            for server in model.servers:
                share = shares.get(server.address, 0.0)
                filled = round(share * BAR_WIDTH)
                bar = self.full * filled + self.empty * (BAR_WIDTH - filled)
                state = health.get(server.address, "")
                shown = paint(state, state, self.colour) if state in _HEALTH else state
                note = record.notes.get(server.address, "")
                lines.append(f"  {server.address:<21} {bar} {share:4.0%}  {shown:<8} "
                             + paint(note, "dim", self.colour))
        for at, text in record.events[-4:]:
            lines.append(f"  {at:5.1f} s  {text}")
        return lines

    @staticmethod
    def _percentiles(recent: Sequence[Done], model: str) -> tuple[str, str]:
        latencies = [d.latency_s for d in recent if d.model == model and d.error is None]
        return _ms(percentile(latencies, 50)), _ms(percentile(latencies, 99))


def _ms(seconds: float) -> str:
    return "-" if math.isnan(seconds) else f"{seconds * 1000:.0f} ms"


def phase_table(record: Record, fleet: DemoFleet, duration_s: float) -> str:
    """Per phase of the run, each chat server's share of the requests and the latency."""
    model = fleet.chat_model
    if model is None or not record.phases:
        return ""
    addresses = [s.address for s in model.servers]
    bounds = [start for start, _ in record.phases[1:]] + [duration_s]
    rows = []
    for (start, what), end in zip(record.phases, bounds, strict=True):
        shares = record.shares(model.name, start, end)
        done = [d.latency_s for d in record.done
                if d.model == model.name and start <= d.at < end and d.error is None]
        rows.append([f"{start:4.1f}-{end:4.1f} s", what]
                    + [f"{shares.get(a, 0.0):.0%}" for a in addresses]
                    + [_ms(percentile(done, 50)), _ms(percentile(done, 99))])
    header = ["", f"{model.name}: share of requests per server"] + \
        [a.rsplit(":", 1)[1] for a in addresses] + ["p50", "p99"]
    widths = [max(len(r[i]) for r in [header, *rows]) for i in range(len(header))]

    def line(cells: list[str]) -> str:
        return "  ".join(c.ljust(w) if i < 2 else c.rjust(w)
                         for i, (c, w) in enumerate(zip(cells, widths, strict=True))).rstrip()

    return "\n".join([line(header)] + [line(r) for r in rows])

"""What happened during the demo: every request, the client's per-server counters, the
events; the live view and the summary are drawn from it."""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass, field


@dataclass(frozen=True)
class Done:
    at: float  # seconds since the traffic started
    model: str
    latency_s: float
    error: str | None


@dataclass
class Record:
    """Everything the live view and the summary are drawn from."""

    done: list[Done] = field(default_factory=list)
    # (seconds, {model: {address: successes the client counted}}), sampled by the view
    counts: deque[tuple[float, dict[str, dict[str, int]]]] = field(default_factory=deque)
    events: list[tuple[float, str]] = field(default_factory=list)
    health: dict[str, dict[str, str]] = field(default_factory=dict)  # the client's view now
    phases: list[tuple[float, str]] = field(default_factory=list)  # (start, what is going on)
    notes: dict[str, str] = field(default_factory=dict)  # what the demo did to each server

    @property
    def failed(self) -> list[Done]:
        return [d for d in self.done if d.error is not None]

    def recent(self, now: float, window: float) -> list[Done]:
        return [d for d in self.done if d.at > now - window]

    def counts_at(self, t: float) -> dict[str, dict[str, int]]:
        """The counters as last sampled at or before t (empty before the first sample)."""
        best: dict[str, dict[str, int]] = {}
        for at, counts in self.counts:
            if at > t:
                break
            best = counts
        return best

    def shares(self, model: str, start: float, end: float) -> dict[str, float]:
        before = self.counts_at(start).get(model, {})
        after = self.counts_at(end).get(model, {})
        served = {a: max(0, n - before.get(a, 0)) for a, n in after.items()}
        total = sum(served.values())
        return {a: (n / total if total else 0.0) for a, n in served.items()}

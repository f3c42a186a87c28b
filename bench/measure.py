"""One request's outcome and the statistics every scenario reads from a list of them.

Kept apart from the drivers so that scenarios, the report and the herd's child processes
(which send samples back by pickling) all agree on one small record.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Sequence
from dataclasses import dataclass

from modelfleet.testing import percentile  # noqa: F401 (the scenarios read it from here)


@dataclass(frozen=True, slots=True)
class Sample:
    """What the caller saw for one request."""

    start_s: float  # when it was sent, seconds from the start of the run
    latency_s: float  # caller-side, from the call to its return (or its failure)
    ok: bool
    server: str | None = None  # host:port that answered, where the contender can tell
    ttft_s: float | None = None  # streams: time to the first text piece
    error: str | None = None  # exception type and a short message
    items: int = 1  # embeddings: vectors returned
    worker: int = 0  # herd: which client process sent it


def share(samples: Iterable[Sample], server: str) -> float:
    """Fraction of the answered requests that `server` answered (NaN when none say who)."""
    known = [s.server for s in samples if s.ok and s.server]
    return known.count(server) / len(known) if known else math.nan


def counts_by_server(samples: Iterable[Sample]) -> dict[str, int]:
    counts: dict[str, int] = {}
    for s in samples:
        if s.ok and s.server:
            counts[s.server] = counts.get(s.server, 0) + 1
    return counts


def ratio(value: float, baseline: float) -> float:
    if not baseline or math.isnan(baseline) or math.isnan(value):
        return math.nan
    return value / baseline


def median(values: Sequence[float]) -> float:
    return percentile([v for v in values if not math.isnan(v)], 50)

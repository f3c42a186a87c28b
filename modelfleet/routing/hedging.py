"""When to hedge a request, and how many hedges the fleet may be sent ("The Tail at Scale").

A request that has had no first token after about its server's 95th-percentile time
to first token is likely stuck behind something (a preemption, a pause, a long
prefill ahead of it) that another server does not have; a copy sent elsewhere then
usually starts first. Waiting for the p95 keeps the copies to about 5 % of requests,
and `HedgeBudget` caps them whatever the p95 says, so an overloaded fleet, where every
request is slow, is never sent twice its load.

Pure logic: the client (`client/hedge.py`) runs the race and feeds the samples.
"""

from __future__ import annotations

import time
from collections import deque
from collections.abc import Callable

from modelfleet.routing.budget import RetryBudget

HEDGE_OUTCOMES = ("sent", "won", "lost", "denied_by_budget")
QUANTILE = 0.95
WINDOW = 256  # recent first-token times kept per server
MIN_SAMPLES = 20  # before that many, `auto` does not hedge on that server: nothing learnt yet
FLOOR_S = 0.02  # `auto` never hedges sooner: below it, scheduling noise, not a stuck request
RECOMPUTE_EVERY = 8  # samples between two sorts of the window
OUTLIER_RATIO = 2.0  # a p95 beyond this many p90s is outliers, not the distribution's tail
RESERVE_PER_S = 1.0  # hedges per second a quiet client may make whatever its traffic


class FirstTokenTimes:
    """One server's recent times to first token and what `auto` hedges after.

    Only first tokens that came count: a copy cancelled because the other won tells
    nothing but "later than the hedge", and counting it at the hedge delay would pin the
    percentile to the delay it was computed from."""

    __slots__ = ("_samples", "_delay", "_fresh")

    def __init__(self, size: int = WINDOW) -> None:
        self._samples: deque[float] = deque(maxlen=size)
        self._delay: float | None = None
        self._fresh = 0  # samples since the delay was computed

    def __len__(self) -> int:
        return len(self._samples)

    def observe(self, seconds: float) -> None:
        self._samples.append(seconds)
        self._fresh += 1

    def quantile(self, q: float) -> float | None:
        """The q-quantile of the window (None with fewer than MIN_SAMPLES)."""
        if len(self._samples) < MIN_SAMPLES:
            return None
        return _at(sorted(self._samples), q)

    def hedge_after(self) -> float | None:
        """About the p95 (None before MIN_SAMPLES), never under FLOOR_S, re-sorted only every
        few samples: a request asks for it, and sorting each time would cost more.

        A p95 more than OUTLIER_RATIO times the p90 is a cluster of outliers, not the body of
        the distribution: requests stuck as often as 5-10 % of the time (the very thing
        hedging is for) would otherwise make the p95 their own length and never be hedged.
        Then OUTLIER_RATIO x the p90 stands in for it."""
        if len(self._samples) < MIN_SAMPLES:
            return None
        if self._delay is None or self._fresh >= RECOMPUTE_EVERY:
            ordered = sorted(self._samples)
            p90, p95 = _at(ordered, 0.90), _at(ordered, QUANTILE)
            self._delay, self._fresh = max(FLOOR_S, min(p95, OUTLIER_RATIO * p90)), 0
        return self._delay


def hedge_delay(setting: str | float, times: FirstTokenTimes | None) -> float | None:
    """Seconds to wait for a first token before hedging (None: do not hedge this request).

    `setting` is routing.hedge_after: a number is used as it is; `auto` is the server's
    learnt `FirstTokenTimes.hedge_after()`, nothing until enough first tokens were seen."""
    if setting == "off":
        return None
    if setting == "auto":
        return times.hedge_after() if times is not None else None
    return float(setting)


class HedgeBudget(RetryBudget):
    """Hedges at most `fraction` of the requests of the last ten seconds, plus a small
    reserve (RESERVE_PER_S) so a quiet client can still hedge its rare stuck request:
    the retry budget's token bucket, with its own account (a hedge spends no retry)."""

    def __init__(self, fraction: float, *, min_per_s: float = RESERVE_PER_S,
                 clock: Callable[[], float] = time.monotonic) -> None:
        super().__init__(ratio=fraction, min_per_s=min_per_s, clock=clock)


def _at(ordered: list[float], q: float) -> float:
    """The q-quantile of sorted samples (the sample at that rank, not interpolated)."""
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))]

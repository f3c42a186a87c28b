"""The original behaviour: stay on the fastest server until it slows down.

All traffic goes to one server, chosen for its measured speed (its baseline).
When its estimate grows past ``latency_growing_rate`` x the baseline (the peak
EWMA jumps at the first slow request), the policy switches to whichever server
is fastest now and asks, through ``wants_benchmark()``, for a fresh benchmark
of every server (the client probes them all and feeds the results to the
endpoints, which this policy reads). When even the fastest server is that slow,
the whole fleet is slower than the baseline: the baseline grows by the rate (as
many times as it takes to cover that server) instead of switching on every
request. While some candidates are unmeasured, it asks for a benchmark and
uses the fastest measured one without committing to it.

Speed is compared as service time (Endpoint.service_time) of a reference
request, without in-flight terms: sending everything to one server is this
policy's point, so its own load must not chase it away.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

from modelfleet.routing.endpoint import REFERENCE_WORK, Endpoint
from modelfleet.routing.work import Work


class Fastest:
    def __init__(self, latency_growing_rate: float = 2.0) -> None:
        self._rate = latency_growing_rate
        self._current: Endpoint | None = None
        self._baseline: float | None = None  # seconds for the reference request
        self._benchmark_wanted = False

    def pick(self, endpoints: Sequence[Endpoint], work: Work) -> Endpoint:
        reference = REFERENCE_WORK.get(work.kind, REFERENCE_WORK["chat"])

        def cost(endpoint: Endpoint) -> float:
            measured = endpoint.service_time(reference)
            return math.inf if measured is None else measured

        current, baseline = self._current, self._baseline
        if current is None or current not in endpoints or baseline is None:
            # First use, or the current server is down, removed or just failed: choose anew.
            # Until every candidate is measured, choose again on each request: committing
            # to whichever answered first could keep a slow server for good.
            unmeasured = any(math.isinf(cost(e)) for e in endpoints)
            self._benchmark_wanted |= unmeasured
            self._current = min(endpoints, key=cost)
            self._baseline = None if unmeasured else cost(self._current)
            return self._current
        if cost(current) > self._rate * baseline:
            self._benchmark_wanted = True
            best = min(endpoints, key=cost)
            if cost(best) <= self._rate * baseline:
                baseline = cost(best)
            while cost(best) > self._rate * baseline:  # every server is slow
                baseline *= self._rate
            self._current, self._baseline = best, baseline
        return self._current

    def wants_benchmark(self) -> bool:
        """True once after a (re)choice that needs fresh numbers (the request is consumed)."""
        wanted, self._benchmark_wanted = self._benchmark_wanted, False
        return wanted

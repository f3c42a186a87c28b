"""The default policy: power of two choices on this request's expected latency.

Two distinct servers drawn at random, the one that should answer this request
sooner wins (Endpoint.expected_latency: measured rates x this request's size,
plus queue wait and a gentle in-flight term). Comparing two rather than all
keeps many independent clients from herding onto the one best server between
two metric scrapes, and the slowest server of three or more is never chosen,
since it loses to whichever server it is drawn with.
"""

from __future__ import annotations

import random
from collections.abc import Sequence

from modelfleet.routing.endpoint import Endpoint
from modelfleet.routing.work import Work


class PeakEwma:
    def __init__(self, seed: int | None = None) -> None:
        # Unseeded: the module's generator, which Python reseeds in a forked child,
        # so worker processes do not all make the same draws.
        self._rng = random if seed is None else random.Random(seed)

    def pick(self, endpoints: Sequence[Endpoint], work: Work) -> Endpoint:
        if len(endpoints) == 1:
            return endpoints[0]
        a, b = self._rng.sample(endpoints, 2)
        return b if b.expected_latency(work) < a.expected_latency(work) else a

"""A server drawn uniformly at random (seedable, for tests and replays)."""

from __future__ import annotations

import random
from collections.abc import Sequence

from modelfleet.routing.endpoint import Endpoint
from modelfleet.routing.work import Work


class RandomChoice:
    def __init__(self, seed: int | None = None) -> None:
        # Unseeded: the module's generator, reseeded by Python in a forked child.
        self._rng = random if seed is None else random.Random(seed)

    def pick(self, endpoints: Sequence[Endpoint], work: Work) -> Endpoint:
        return self._rng.choice(endpoints)

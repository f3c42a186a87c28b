"""Each server in turn, whatever its speed: as in replica managers."""

from __future__ import annotations

from collections.abc import Sequence

from modelfleet.routing.endpoint import Endpoint
from modelfleet.routing.work import Work


class RoundRobin:
    def __init__(self) -> None:
        self._turn = 0

    def pick(self, endpoints: Sequence[Endpoint], work: Work) -> Endpoint:
        choice = endpoints[self._turn % len(endpoints)]
        self._turn += 1
        return choice

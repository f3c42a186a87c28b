"""The server with the fewest requests: ours in flight plus its own queue.

Counts what /metrics says the server is running and holding, so requests of
other clients count too; ties go to the server expected to answer sooner.
"""

from __future__ import annotations

from collections.abc import Sequence

from modelfleet.routing.endpoint import Endpoint
from modelfleet.routing.work import Work


class LeastLoaded:
    def pick(self, endpoints: Sequence[Endpoint], work: Work) -> Endpoint:
        return min(endpoints, key=lambda e: (_load(e), e.expected_latency(work)))


def _load(endpoint: Endpoint) -> float:
    return endpoint.in_flight + (endpoint.queue_running or 0.0) + (endpoint.queue_waiting or 0.0)

"""The gateway's Prometheus registry: the library's `modelfleet_*` series (recorded by
the client core when it is given the registry) and two of the gateway's own.

Each worker has its own registry, as it has its own routing state: a scrape of the shared
port reads one worker's series (scrape each worker's own port, or run one worker, where
a whole-gateway view matters).
"""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge


class GatewaySeries:
    """What only the gateway sees: requests it holds now, and requests it turned away."""

    def __init__(self, registry: CollectorRegistry) -> None:
        self.in_flight = Gauge("modelfleet_gateway_requests_in_flight",
                               "Requests the gateway worker is answering now",
                               registry=registry)
        self.rejected = Counter("modelfleet_gateway_rejected_total",
                                "Requests the gateway refused before routing them, by reason",
                                ["reason"], registry=registry)
        for reason in ("unauthorized", "too_large", "too_many", "bad_request"):
            self.rejected.labels(reason=reason)  # every reason shows from the start, at 0

"""What a policy is, and the one place that maps config names to policies."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Protocol

from modelfleet.errors import ConfigError
from modelfleet.routing.endpoint import Endpoint
from modelfleet.routing.fastest import Fastest
from modelfleet.routing.least_loaded import LeastLoaded
from modelfleet.routing.peak_ewma import PeakEwma
from modelfleet.routing.random_choice import RandomChoice
from modelfleet.routing.round_robin import RoundRobin
from modelfleet.routing.work import Work


class Policy(Protocol):
    """Chooses one endpoint among usable ones (never called with an empty list)."""

    def pick(self, endpoints: Sequence[Endpoint], work: Work) -> Endpoint: ...


def make_policy(name: str, *, latency_growing_rate: float = 2.0, seed: int | None = None) -> Policy:
    """The policy named in config (`routing.policy`, one of config.POLICIES)."""
    makers = {
        "peak_ewma": lambda: PeakEwma(seed=seed),
        "fastest": lambda: Fastest(latency_growing_rate),
        "least_loaded": LeastLoaded,
        "round_robin": RoundRobin,
        "random": lambda: RandomChoice(seed=seed),
    }
    if name not in makers:
        raise ConfigError(
            f"routing.policy: unknown policy {name!r}; use one of {', '.join(makers)}"
        )
    return makers[name]()

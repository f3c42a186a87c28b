"""One model as the client routes it: its servers, their endpoints, its retry budget."""

from __future__ import annotations

import asyncio
from typing import TYPE_CHECKING

from modelfleet.client.discovered import Discovery
from modelfleet.client.hedge import Hedging
from modelfleet.client.retry import RetryState
from modelfleet.config import ModelSpec, RoutingSpec, ServerSpec
from modelfleet.routing import Pool, PrefixIndex, RetryBudget, make_policy

if TYPE_CHECKING:
    from modelfleet.metrics import ModelMetrics


class Route:
    """A model's servers (by address), their routing `Pool`, its `RetryBudget` and its
    `Hedging` (None while routing.hedge_after is off). A model with `discover:` has a
    `Discovery` that keeps `servers` and the pool up to date (client/discovered.py).

    The report builds the same object to ask the routing code which server it would pick.
    """

    def __init__(self, spec: ModelSpec, routing: RoutingSpec, seed: int | None = None) -> None:
        self.spec = spec
        self.routing = routing
        self.servers: dict[str, ServerSpec] = {s.address: s for s in spec.servers}
        self.pool = Pool(list(self.servers),
                         make_policy(routing.policy,
                                     latency_growing_rate=routing.latency_growing_rate,
                                     seed=seed),
                         degrade_ratio=routing.latency_growing_rate,
                         prefix=_prefix_index(spec, routing))
        self.budget = RetryBudget(ratio=routing.retry_budget_ratio,
                                  min_per_s=routing.retry_budget_min_per_s)
        self.hedging = Hedging.of(routing)
        self.first_probe: asyncio.Task[None] | None = None
        self.in_use = False  # a request asked for it: probed in the background from then on
        self.ready = False  # its first benchmark finished (or was waited for long enough)
        self.benchmarking = False
        self.first_try = RetryState.first(routing.max_retry)  # every request starts from it
        self.metrics: ModelMetrics | None = None  # its modelfleet_* series, when asked for
        self.discovery = Discovery(self) if spec.discover is not None else None

    def update(self, spec: ModelSpec, routing: RoutingSpec, seed: int | None) -> None:
        """A reloaded config: new servers join, removed ones drain (requests on them finish)."""
        if routing.policy != self.routing.policy or \
                routing.latency_growing_rate != self.routing.latency_growing_rate:
            self.pool.policy = make_policy(routing.policy,
                                           latency_growing_rate=routing.latency_growing_rate,
                                           seed=seed)
        if (routing.retry_budget_ratio, routing.retry_budget_min_per_s) != \
                (self.routing.retry_budget_ratio, self.routing.retry_budget_min_per_s):
            self.budget = RetryBudget(ratio=routing.retry_budget_ratio,
                                      min_per_s=routing.retry_budget_min_per_s)
        if _prefix_index(spec, routing) is None:
            self.pool.prefix = None
        elif self.pool.prefix is None:
            self.pool.prefix = PrefixIndex()
        servers = {s.address: s for s in spec.servers}
        if spec.discover is not None:  # its Discovery owns the servers; they stay till it changes them
            servers = self.servers
        for address in self.servers.keys() - servers.keys():
            self.pool.remove(address)
        for address in servers.keys() - self.servers.keys():
            self.pool.add(address)
        self.hedging = Hedging.of(routing, self.hedging)
        discover_changed = spec.discover != self.spec.discover
        self.spec, self.routing, self.servers = spec, routing, servers
        if discover_changed:  # a source of its own from now on (none: the listed servers)
            if self.discovery is not None:
                self.discovery.stop()
            self.discovery = Discovery(self) if spec.discover is not None else None
        self.first_try = RetryState.first(routing.max_retry)



def _prefix_index(spec: ModelSpec, routing: RoutingSpec) -> PrefixIndex | None:
    """Prefix-aware routing for a chat model whose policy weighs it (peak_ewma)."""
    if not routing.prefix_aware or spec.kind != "chat" or routing.policy != "peak_ewma":
        return None
    return PrefixIndex()

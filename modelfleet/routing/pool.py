"""The endpoints of one model, and the one question the client asks of them.

``choose`` narrows the pool to what may take a request now (usable, not
already tried for this request), lets the policy pick among those, and keeps
an affinity key on its server while that server stays usable and within
AFFINITY_SLACK of the best expected latency (an LRU of pins: a key moves
only when its server goes bad, which is what prefix caches need). With a
`PrefixIndex`, a request whose prompt has blocks goes to a prefix-aware policy
with the index, and `served` tells the index where each prompt went.

It never ejects the whole pool: when nothing is usable, it returns the
paused server that resumes first, else the server that went down earliest
(it has waited longest, so it is likeliest back); None only when every server
has been excluded.
"""

from __future__ import annotations

import time
from collections import OrderedDict
from collections.abc import Callable, Collection, Sequence

from modelfleet.routing.endpoint import Endpoint, EndpointStatus, Health
from modelfleet.routing.policy import Policy
from modelfleet.routing.prefix_index import PrefixIndex
from modelfleet.routing.work import Work

AFFINITY_SLACK = 1.5  # a pinned server may be this much slower than the best before the key moves
AFFINITY_KEYS = 10_000


class Pool:
    """Not thread-safe: driven from one event loop (or under one lock)."""

    def __init__(
        self,
        addresses: Sequence[str],
        policy: Policy,
        *,
        clock: Callable[[], float] = time.monotonic,
        decay_s: float = 5.0,
        degrade_ratio: float = 2.0,
        affinity_keys: int = AFFINITY_KEYS,
        prefix: PrefixIndex | None = None,
    ) -> None:
        self.policy = policy
        self.prefix = prefix  # what each server likely holds in its prefix cache (None: off)
        self.endpoints: dict[str, Endpoint] = {}
        self._clock = clock
        self._decay_s = decay_s
        self._degrade_ratio = degrade_ratio
        self._pins: OrderedDict[str, str] = OrderedDict()
        self._max_pins = affinity_keys
        for address in addresses:
            self.add(address)

    def choose(
        self, work: Work, *, exclude: Collection[str] = (), affinity: str | None = None
    ) -> Endpoint | None:
        open_ = [e for e in self.endpoints.values() if e.address not in exclude]
        usable = [e for e in open_ if e.usable()]
        if not usable:
            return min(open_, key=_soonest_back, default=None)
        if affinity is None:
            return self._pick(usable, work)
        return self._pinned(affinity, usable, work)

    def prefill_tokens(self, endpoint: Endpoint, work: Work) -> int:
        """The prompt tokens `endpoint` will likely compute for `work` (its uncached ones),
        for its lease: 0 where prefix-aware routing does not apply (no backlog is kept)."""
        if not work.blocks or self.prefix is None:
            return 0
        return max(work.prompt_tokens - self.prefix.cached_tokens(endpoint.address, work.blocks), 0)

    def served(self, endpoint: Endpoint, work: Work, *, ahead: int = 0) -> Work:
        """`endpoint` has taken `work` (answered, or sent its first token): its prefix
        cache now holds the prompt. Returns the work as that server saw it, to learn its
        speed from: its prompt less what it likely had cached (a cache hit must not make
        its prefill look fast), plus the `ahead` prompt tokens it found prefilling there
        (Lease.ahead: its first token waited for them; a queue must not make it look slow)."""
        if not work.blocks or self.prefix is None:
            return work
        cached = self.prefix.record(endpoint.address, work.blocks, prompt_tokens=work.prompt_tokens,
                                    output_tokens=work.output_tokens)
        if not cached and not ahead:
            return work
        return Work(work.kind, max(work.prompt_tokens - cached, 0) + ahead, work.output_tokens)

    def observe_cache(self, address: str, *, hits: float | None = None,
                      queries: float | None = None, usage: float | None = None,
                      capacity_tokens: float | None = None) -> None:
        """A /metrics scrape's prefix-cache figures for one server (PrefixIndex.observe_metrics)."""
        if self.prefix is not None and address in self.endpoints:
            self.prefix.observe_metrics(address, hits=hits, queries=queries, usage=usage,
                                        capacity_tokens=capacity_tokens)

    def reasons(self) -> dict[str, str]:
        """Why each endpoint that is not usable now is not (usable ones are left out)."""
        why = {address: e.why_unusable() for address, e in self.endpoints.items()}
        return {address: reason for address, reason in why.items() if reason is not None}

    def status(self) -> list[EndpointStatus]:
        return [e.status() for e in self.endpoints.values()]

    def add(self, address: str) -> Endpoint:
        """A new server joins (an existing one keeps what was learnt about it)."""
        if address not in self.endpoints:
            self.endpoints[address] = Endpoint(
                address,
                clock=self._clock,
                decay_s=self._decay_s,
                degrade_ratio=self._degrade_ratio,
                peers=self.endpoints.values,
            )
        return self.endpoints[address]

    def remove(self, address: str) -> None:
        """No new request goes to it; requests already on it hold their Endpoint and
        finish there (begin/end on a removed Endpoint are harmless): it drains."""
        self.endpoints.pop(address, None)
        if self.prefix is not None:
            self.prefix.forget(address)
        for key in [k for k, a in self._pins.items() if a == address]:
            del self._pins[key]

    def wants_benchmark(self) -> bool:
        """True (once) when the policy needs every server measured afresh (Fastest)."""
        wants = getattr(self.policy, "wants_benchmark", None)
        return bool(wants()) if wants is not None else False

    def _pinned(self, key: str, usable: list[Endpoint], work: Work) -> Endpoint:
        pinned = next((e for e in usable if e.address == self._pins.get(key)), None)
        if pinned is not None:
            best = min(e.expected_latency(work) for e in usable)
            if pinned.expected_latency(work) <= AFFINITY_SLACK * best:
                self._pins.move_to_end(key)
                return pinned
        choice = self._pick(usable, work)
        self._pins[key] = choice.address
        self._pins.move_to_end(key)
        if len(self._pins) > self._max_pins:
            self._pins.popitem(last=False)
        return choice

    def _pick(self, usable: list[Endpoint], work: Work) -> Endpoint:
        if work.blocks and self.prefix is not None and getattr(self.policy, "prefix_aware", False):
            return self.policy.pick(usable, work, self.prefix)  # type: ignore[call-arg]
        return self.policy.pick(usable, work)


def _soonest_back(endpoint: Endpoint) -> tuple[int, float]:
    if endpoint.health is Health.DOWN:
        return (1, endpoint.down_since or 0.0)
    return (0, endpoint.paused_until)

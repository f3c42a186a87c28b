"""Routing: which server of a model gets the next request. Pure logic: no I/O,
no asyncio, no HTTP; time comes from an injectable ``clock`` (default
``time.monotonic``), so tests run on a fake clock without sleeping.

CONTRACT (the client and the wire layer rely on these names)

    work.py      Work(kind, prompt_tokens, output_tokens=0, blocks=())  frozen; kind "chat" | "embedding"
                 Work.for_chat(messages, max_tokens=None), Work.for_prompt(prompt, max_tokens=None),
                 Work.for_embedding(inputs); estimate_tokens(text) -> int  (~len/4)
    rates.py     ServiceRates: the three peak EWMAs of one server (TTFT per prompt token,
                 per output token, per embedding input token); service_seconds(work, rates)
    ewma.py      PeakEwmaEstimate(decay_s).observe(sample, now) / .value
    endpoint.py  Health: UP | DEGRADED | DOWN
                 Failure: REFUSED | TIMEOUT | SERVER_ERROR | BACKPRESSURE | MISCONFIGURED
                 EndpointStatus (frozen snapshot)
                 Endpoint(address, *, clock, decay_s=5.0, degrade_ratio=2.0, peers=None)
                   .address .in_flight .queue_running .queue_waiting .requests .failures .rates
                   .health .reason .down_since .paused_until            (read-only properties)
                   .lease(prefill_tokens=0)          `with ep.lease():` around every request
                                                     (begin() on entry, end() on exit; observe_*
                                                     inside); .begin() / .end() underneath;
                                                     .prefilling: the tokens of leases still
                                                     prefilling (counted before a prompt);
                                                     Lease.ahead: the backlog it found
                   .observe_success(*, ttft_s, total_s, work, output_tokens=None)
                   .observe_failure(failure, reason, *, retry_after_s=None)
                   .observe_queue(running, waiting)  from /metrics (None: unknown)
                   .expected_latency(work, cached_tokens=0) -> s   what policies compare
                   .service_time(work) -> s | None   measured rates only, no load terms
                   .stall_deadline(*, floor_s, ceiling_s, work=None) -> s
                   .usable() -> bool ; .why_unusable() -> str | None ; .status()
    budget.py    RetryBudget(ratio=0.2, min_per_s=10.0, ttl_s=10.0, clock)
                   .deposit() per original request; .try_withdraw() -> bool per retry; .balance()
    prefix_index.py  PrefixIndex(max_entries=65536): per model, which prompt blocks each server
                 likely still holds; .cached_tokens(address, blocks) .record(address, blocks, *,
                 prompt_tokens, output_tokens) .observe_metrics(address, *, hits, queries, usage,
                 capacity_tokens) .counters(address); prompt_blocks(text) -> the blocks to put on Work.blocks
    policies     PeakEwma(seed) peak_ewma.py (prefix-aware: takes the PrefixIndex), Fastest(rate) fastest.py, LeastLoaded()
                 least_loaded.py, RoundRobin() round_robin.py, RandomChoice(seed) random_choice.py;
                 each has pick(endpoints, work) -> Endpoint (Fastest also wants_benchmark()).
    policy.py    Policy (Protocol); make_policy(name, *, latency_growing_rate=2.0, seed=None)
    pool.py      Pool(addresses, policy, *, clock, decay_s=5.0, degrade_ratio=2.0, prefix=None)
                   .endpoints: dict[address, Endpoint]
                   .choose(work, *, exclude=(), affinity=None) -> Endpoint | None
                   .reasons() -> {address: why not usable}   (usable ones left out)
                   .status() -> [EndpointStatus] ; .add(address) ; .remove(address)
                   .prefill_tokens(endpoint, work) -> int   its uncached prompt tokens there
                                                     (the lease's prefill_tokens)
                   .served(endpoint, work, *, ahead=0) -> Work   after a success: the index
                                                     learns where the prompt went; returns the
                                                     work less its cached prompt tokens plus the
                                                     backlog it waited behind (observe_success
                                                     with that)
                   .observe_cache(address, *, hits, queries, usage, capacity_tokens)  /metrics
                   .wants_benchmark() -> bool   (True once each time the policy asks; the
                                                 client runs one benchmark at a time)

HOW THE CLIENT USES IT, per request::

    work = Work.for_chat(messages, max_tokens)           # + blocks=prompt_blocks(rendered prompt)
    budget.deposit()
    tried = set()
    for attempt in range(max_retry):
        if attempt and not budget.try_withdraw(): break          # budget spent: stop retrying
        ep = pool.choose(work, exclude=tried, affinity=key)      # None: every server tried
        if ep is None: break
        deadline = ep.stall_deadline(floor_s=stall_timeout_s, ceiling_s=request_timeout_s, work=work)
        with (lease := ep.lease(pool.prefill_tokens(ep, work))):  # at once, before any await
            ... on success: ep.observe_success(ttft_s=..., total_s=...,
                                               work=pool.served(ep, work, ahead=lease.ahead),
                                               output_tokens=usage.completion_tokens)
            ... on failure: ep.observe_failure(Failure.X, "HTTP 500: ...", retry_after_s=...)
        tried.add(ep.address)
    if pool.wants_benchmark(): probe every server (outside the request path)

Which Failure: connection refused / reset / DNS -> REFUSED; request timeout or
silence past stall_deadline -> TIMEOUT; 429 and 503 -> BACKPRESSURE (pass
Retry-After as retry_after_s); 404 / 401 / 403 -> MISCONFIGURED; other 5xx ->
SERVER_ERROR. Any other 4xx is the request's fault, not the server's: no
observe_*, just the lease's end, and RequestRejected. The reason is shown to people
("HTTP 404: model 'x' does not exist"): never put headers or the api_key in it.

Measure total_s from when the request goes out (not while waiting for a pooled
connection); pass ttft_s whenever the first token was seen (stream internally),
since without it the prompt's share can only be guessed. A client-side cancel
(the caller left a stream) is neither success nor failure: just the lease's end.
Background probes call observe_success / observe_failure / observe_queue with
the benchmark's Work and no begin/end. None of these objects is thread-safe:
drive them from one event loop, or under one lock.
"""

from modelfleet.routing.budget import RetryBudget
from modelfleet.routing.endpoint import Endpoint, EndpointStatus, Failure, Health, Lease
from modelfleet.routing.fastest import Fastest
from modelfleet.routing.least_loaded import LeastLoaded
from modelfleet.routing.peak_ewma import PeakEwma
from modelfleet.routing.policy import Policy, make_policy
from modelfleet.routing.pool import Pool
from modelfleet.routing.prefix_index import PrefixIndex, prompt_blocks
from modelfleet.routing.random_choice import RandomChoice
from modelfleet.routing.round_robin import RoundRobin
from modelfleet.routing.work import Work, estimate_tokens

__all__ = [
    "Endpoint",
    "EndpointStatus",
    "Failure",
    "Fastest",
    "Health",
    "LeastLoaded",
    "Lease",
    "PeakEwma",
    "Policy",
    "Pool",
    "PrefixIndex",
    "RandomChoice",
    "RetryBudget",
    "RoundRobin",
    "Work",
    "estimate_tokens",
    "make_policy",
    "prompt_blocks",
]

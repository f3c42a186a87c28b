"""The retry loop: one request, tried on the model's servers until one answers.

A failure that is the server's (`EngineFailure`: refused, reset, silent past its
deadline, 429/503, 5xx, 404/401, a redirect, an answer that is not one) is observed on
that server's endpoint and the request moves on: to a server not tried yet while one is
left, else (after a short jittered pause that grows) to the best one again. Retrying stops at `routing.max_retry`
attempts or when the model's retry budget refuses one; the caller then gets
`NoServerAvailable`, written by the request's `RetryState`. A failure that is the
request's own (`RequestRejected`, a 4xx) is raised at once: another server would
refuse it too. With a metrics registry (`route.metrics`), each request's outcome,
attempts, retries and latency are recorded here (`modelfleet.metrics`), so every path
that routes through this loop is counted.
"""

from __future__ import annotations

import asyncio
import logging
import random
from collections.abc import Awaitable, Callable
from typing import TYPE_CHECKING, Any

from modelfleet._exceptions import EngineFailure
from modelfleet.client.route import Route
from modelfleet.config import ServerSpec
from modelfleet.routing import Endpoint, Work

if TYPE_CHECKING:
    from modelfleet.metrics import Tally

log = logging.getLogger("modelfleet.client")

BACKOFF_BASE_S = 0.05  # retry pause once every server was tried, doubling per attempt
BACKOFF_MAX_S = 1.0

Send = Callable[[ServerSpec, float], Awaitable[Any]]


def backoff_s(attempts: int, rng: random.Random) -> float:
    """The pause before trying a server again, after `attempts` failed attempts."""
    return min(BACKOFF_MAX_S, BACKOFF_BASE_S * 2 ** max(0, attempts - 1)) * rng.uniform(0.5, 1.0)


def send_with_retries(route: Route, work: Work, affinity: str | None, send: Send,
                      rng: random.Random, *, whole: bool = False,
                      answer: bool = True) -> Awaitable[tuple[Endpoint, Any, Work]]:
    """`send(server, deadline_s)` on servers of `route` until one succeeds; awaited, it
    returns that server's endpoint, what `send` returned, and the work as that server saw
    it (`Pool.served`: the pool's prefix index learns where the prompt went).

    The deadline is the stall deadline, or with `whole` the deadline of a whole answer.
    With `answer` (the value is a finished `Generation` or `Embeddings`), the success is
    observed here; a stream's opening (`answer=False`) leaves that to the stream's end,
    and its caller counts the request then (`route.metrics.finished`).
    Each attempt holds its endpoint's lease for exactly as long as it runs: for a
    stream, until its first token, which is as long as its prompt is being computed.
    """
    metrics = route.metrics  # None (no registry): the loop itself, not one frame more
    if metrics is None:
        return _attempts(route, work, affinity, send, rng, whole, answer, None)
    return _counted(route, work, affinity, send, rng, whole, answer, metrics.tally())


async def _counted(route: Route, work: Work, affinity: str | None, send: Send,
                   rng: random.Random, whole: bool, answer: bool,
                   tally: Tally) -> tuple[Endpoint, Any, Work]:
    """The loop, with the request's outcome, attempts and latency recorded."""
    try:
        endpoint, value, seen = await _attempts(route, work, affinity, send, rng, whole,
                                                answer, tally)
    except BaseException as exc:
        tally.failed(exc)
        raise
    tally.succeeded(value, answer)
    return endpoint, value, seen


async def _attempts(route: Route, work: Work, affinity: str | None, send: Send,
                    rng: random.Random, whole: bool, answer: bool,
                    tally: Tally | None) -> tuple[Endpoint, Any, Work]:
    routing = route.routing
    pool = route.pool
    route.budget.deposit()
    state = route.first_try
    while True:
        endpoint = pool.choose(work, exclude=state.excluded, affinity=affinity)
        if endpoint is None and state.excluded:  # every server was tried: pause, then any
            await asyncio.sleep(backoff_s(state.attempts, rng))
            endpoint = pool.choose(work, affinity=affinity)
        if endpoint is None:
            state = state.stop("no server to try")
            break
        deadline = endpoint.answer_deadline if whole else endpoint.stall_deadline
        deadline_s = deadline(floor_s=routing.stall_timeout_s,
                              ceiling_s=routing.request_timeout_s, work=work)
        if tally is not None:
            tally.attempt(endpoint.address)
        lease = endpoint.lease(pool.prefill_tokens(endpoint, work))
        with lease:
            try:
                value = await send(route.servers[endpoint.address], deadline_s)
            except EngineFailure as exc:
                endpoint.observe_failure(exc.failure, exc.reason, retry_after_s=exc.retry_after_s)
                failed = exc
            else:
                seen = pool.served(endpoint, work, ahead=lease.ahead)
                if answer:  # (a stream's opening: its caller observes it at the stream's end)
                    endpoint.observe_success(ttft_s=value.ttft_s, total_s=value.total_s,
                                             work=seen, output_tokens=value.output_tokens)
                return endpoint, value, seen
        log.debug("%s failed on %s (%s): %s", route.spec.name, endpoint.address,
                  failed.failure.value, failed.reason)
        state = state.increment(endpoint.address, failed.failure, failed.reason)
        if state.is_exhausted():
            state = state.stop(f"max_retry ({routing.max_retry}) was reached")
            break
        if not route.budget.try_withdraw():
            state = state.stop("the retry budget is spent")
            break
        if tally is not None:
            tally.retried(failed.failure)
    raise state.error(route.spec.name, route.servers, pool.reasons())

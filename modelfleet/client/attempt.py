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
that routes through this loop is counted. With `hedge=True` (the send shows its first
token) and `routing.hedge_after` on, each attempt is run by `Hedging.race` (`hedge.py`),
which may send a copy to another server; both copies' failures count as tried here.
"""

from __future__ import annotations

import asyncio
import logging
import random
from collections.abc import Awaitable
from dataclasses import replace
from typing import TYPE_CHECKING, Any

from modelfleet._exceptions import EngineFailure
from modelfleet.client.hedge import HedgeFailed
from modelfleet.client.route import Route
from modelfleet.client.send_once import Send, send_once
from modelfleet.routing import Endpoint, Work

if TYPE_CHECKING:
    from modelfleet.metrics import Tally

log = logging.getLogger("modelfleet.client")

BACKOFF_BASE_S = 0.05  # retry pause once every server was tried, doubling per attempt
BACKOFF_MAX_S = 1.0



def backoff_s(attempts: int, rng: random.Random) -> float:
    """The pause before trying a server again, after `attempts` failed attempts."""
    return min(BACKOFF_MAX_S, BACKOFF_BASE_S * 2 ** max(0, attempts - 1)) * rng.uniform(0.5, 1.0)


def send_with_retries(route: Route, work: Work, affinity: str | None, send: Send,
                      rng: random.Random, *, whole: bool = False, answer: bool = True,
                      hedge: bool = False, exclude: tuple[str, ...] = (),
                      counted: bool = True) -> Awaitable[tuple[Endpoint, Any, Work]]:
    """`send(server, deadline_s)` on servers of `route` until one succeeds; awaited, it
    returns that server's endpoint, what `send` returned, and the work as that server saw
    it (`Pool.served`: the pool's prefix index learns where the prompt went).

    The deadline is the stall deadline, or with `whole` the deadline of a whole answer.
    With `answer` (the value is a finished `Generation` or `Embeddings`), the success is
    observed here; a stream's opening (`answer=False`) leaves that to the stream's end,
    and its caller counts the request then (`route.metrics.finished`).
    Each attempt holds its endpoint's lease for exactly as long as it runs: for a
    stream, until its first token, which is as long as its prompt is being computed.
    `hedge`: `send` returns at its first token or calls `hedge.first_token_seen()`, so
    its attempts may be hedged (when the model's routing says so).
    `exclude`: servers tried first only when no other is left (a continued stream's
    broken one); `counted=False` leaves the metrics to the caller (a continuation is part
    of its stream's request, not one of its own).
    """
    metrics = route.metrics  # None (no registry): the loop itself, not one frame more
    if metrics is None or not counted:
        return _attempts(route, work, affinity, send, rng, whole, answer, None, hedge, exclude)
    return _counted(route, work, affinity, send, rng, whole, answer, metrics.tally(), hedge,
                    exclude)


def _deadline(endpoint: Endpoint, route: Route, work: Work, whole: bool) -> float:
    """The attempt's deadline on `endpoint`: of its first token, or of a whole answer."""
    deadline = endpoint.answer_deadline if whole else endpoint.stall_deadline
    return deadline(floor_s=route.routing.stall_timeout_s,
                    ceiling_s=route.routing.request_timeout_s, work=work)


async def _counted(route: Route, work: Work, affinity: str | None, send: Send,
                   rng: random.Random, whole: bool, answer: bool,
                   tally: Tally, hedge: bool,
                   exclude: tuple[str, ...]) -> tuple[Endpoint, Any, Work]:
    """The loop, with the request's outcome, attempts and latency recorded."""
    try:
        endpoint, value, seen = await _attempts(route, work, affinity, send, rng, whole,
                                                answer, tally, hedge, exclude)
    except BaseException as exc:
        tally.failed(exc)
        raise
    tally.succeeded(value, answer)
    return endpoint, value, seen


async def _attempts(route: Route, work: Work, affinity: str | None, send: Send,
                    rng: random.Random, whole: bool, answer: bool,
                    tally: Tally | None, hedge: bool = False,
                    exclude: tuple[str, ...] = ()) -> tuple[Endpoint, Any, Work]:
    routing = route.routing
    pool = route.pool
    route.budget.deposit()
    hedging = route.hedging if hedge else None
    if hedging is not None:
        hedging.budget.deposit()
    state = replace(route.first_try, excluded=exclude) if exclude else route.first_try
    while True:
        endpoint = pool.choose(work, exclude=state.excluded, affinity=affinity)
        if endpoint is None and state.excluded:  # every server was tried: pause, then any
            await asyncio.sleep(backoff_s(state.attempts, rng))
            endpoint = pool.choose(work, affinity=affinity)
        if endpoint is None:
            state = state.stop("no server to try")
            break
        if tally is not None:
            tally.attempt(endpoint.address)
        if hedging is not None:
            try:
                return await hedging.race(route, endpoint, work, state.excluded, send,
                                          lambda e: _deadline(e, route, work, whole), answer,
                                          tally)
            except HedgeFailed as every:
                for tried, failed in every.failures[:-1]:
                    state = state.increment(tried.address, failed.failure, failed.reason)
                endpoint, failed = every.failures[-1]
        else:
            try:
                value, seen = await send_once(route, endpoint, work, send,
                                              _deadline(endpoint, route, work, whole), answer)
            except EngineFailure as exc:
                failed = exc
            else:
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

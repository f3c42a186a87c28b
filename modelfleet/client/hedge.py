"""Hedged requests: an attempt with no first token by its delay gets a copy on another server.

`routing.hedge_after` (off | auto | seconds) and `routing.hedge_budget` turn it on. The
retry loop (`attempt.py`) hands each attempt of a request that can show its first
token (`send_with_retries(..., hedge=True)`) to `Hedging.race`:

1. the attempt starts on the chosen server; its first token (or its failure) within
   the delay (`routing.hedging.hedge_delay`: the server's learnt p95 time to first token
   with `auto`) ends the race there, as if there were no hedging;
2. else, if the hedge budget allows and another server is usable, a copy goes to the
   next-best other server; the first of the two to produce a first token wins and the
   other is cancelled at once (its connection closed, so its engine aborts it);
3. a copy that fails before its first token leaves the race to the other (a failed
   primary with a hedge in flight lets the hedge win); when both fail, the loop goes on
   retrying as after any failed attempt, both servers counted as tried.

Only before the first token: once one has come, the answer is the winner's. An attempt
shows its first token either by returning at it (a stream's opening) or by calling
`first_token_seen()` and reading on (a whole answer read as a stream underneath, see
`generate_hedgeable`). Whole answers are streamed underneath while hedging is on: a
non-streamed body shows nothing until it is complete, so the only hedge possible on it
would copy requests that are merely long, which is the load hedging must not add.
"""

from __future__ import annotations

import asyncio
import contextvars
import logging
import time
from collections.abc import Callable, Mapping
from typing import TYPE_CHECKING, Any

from modelfleet._exceptions import EngineFailure
from modelfleet.client.send_once import Send, send_once
from modelfleet.config import RoutingSpec, ServerSpec
from modelfleet.routing import (
    HEDGE_OUTCOMES,
    Endpoint,
    FirstTokenTimes,
    HedgeBudget,
    Work,
    hedge_delay,
)

if TYPE_CHECKING:
    from modelfleet._transports.base import AsyncBaseTransport
    from modelfleet._transports.models import Generation
    from modelfleet.client.route import Route
    from modelfleet.metrics import Tally

log = logging.getLogger("modelfleet.client")


_ATTEMPT: contextvars.ContextVar[_Attempt | None] = contextvars.ContextVar(
    "modelfleet_hedge_attempt", default=None)


def first_token_seen() -> None:
    """Called by an attempt's `send` when its first token came (a no-op outside a race)."""
    attempt = _ATTEMPT.get()
    if attempt is not None:
        attempt.opened_now(True)


async def generate_hedgeable(transport: AsyncBaseTransport, server: ServerSpec, path: str,
                             body: Mapping[str, Any], *, api_key: str | None, stall_s: float,
                             timeout_s: float) -> Generation:
    """`transport.generate` (a whole answer streamed underneath) that says when its first
    token came, so a race can be decided there and the winner read to its end."""
    stream = await transport.open_stream(server, path, body, api_key=api_key, stall_s=stall_s,
                                         timeout_s=timeout_s)
    try:
        async for _ in stream:
            break
        first_token_seen()
        await stream.read_all()
    finally:
        stream.close()  # a no-op after a clean end; else (cancelled: it lost) the engine aborts
    return stream.generation()


def hedge_counts(hedging: Hedging | None) -> dict[str, int]:
    """A model's hedges so far by outcome, for `status()` (empty while hedging is off)."""
    return dict(hedging.counts) if hedging is not None else {}


class HedgeFailed(Exception):
    """Every copy of one attempt failed before its first token: (endpoint, failure) each."""

    def __init__(self, failures: list[tuple[Endpoint, EngineFailure]]) -> None:
        super().__init__(f"{len(failures)} copies failed")
        self.failures = failures


class Hedging:
    """One model's hedging: its setting, budget, learnt first-token times and counts."""

    def __init__(self, routing: RoutingSpec) -> None:
        self.after = routing.hedge_after
        self.fraction = routing.hedge_budget
        self.budget = HedgeBudget(routing.hedge_budget)
        self.times: dict[str, FirstTokenTimes] = {}  # by server address
        self.counts = dict.fromkeys(HEDGE_OUTCOMES, 0)

    @classmethod
    def of(cls, routing: RoutingSpec, before: Hedging | None = None) -> Hedging | None:
        """The model's hedging for `routing` (None when off); a reload keeps what was learnt."""
        if routing.hedge_after == "off":
            return None
        hedging = cls(routing)
        if before is not None:
            hedging.times, hedging.counts = before.times, before.counts
            if routing.hedge_budget == before.fraction:
                hedging.budget = before.budget
        return hedging

    def delay(self, address: str) -> float | None:
        return hedge_delay(self.after, self.times.get(address))

    def learn(self, address: str, ttft_s: float) -> None:
        times = self.times.get(address)
        if times is None:
            times = self.times[address] = FirstTokenTimes()
        times.observe(ttft_s)

    def count(self, route: Route, outcome: str) -> None:
        self.counts[outcome] += 1
        if route.metrics is not None:
            route.metrics.hedged(outcome)

    async def race(self, route: Route, primary: Endpoint, work: Work, excluded: tuple[str, ...],
                   send: Send, deadline_of: Callable[[Endpoint], float], answer: bool,
                   tally: Tally | None) -> tuple[Endpoint, Any, Work]:
        """One attempt on `primary`, hedged; returns (winner, its value, the work as it saw
        it) or raises `HedgeFailed` (or the request's own error, e.g. `RequestRejected`)."""
        first = _Attempt(self, route, primary, work, send, deadline_of(primary), answer)
        copies = [first]
        try:
            delay = self.delay(primary.address)
            if delay is not None:
                await asyncio.wait({first.opened}, timeout=delay)
            if delay is None or first.opened.done():
                return await first.alone()
            other = route.pool.choose(work, exclude=(*excluded, primary.address))
            if other is None or not other.usable():
                return await first.alone()
            if not self.budget.try_withdraw():
                self.count(route, "denied_by_budget")
                return await first.alone()
            self.count(route, "sent")
            log.debug("%s: no first token from %s after %.3f s; hedging on %s",
                      route.spec.name, primary.address, delay, other.address)
            if tally is not None:
                tally.copy_sent()
            copies.append(_Attempt(self, route, other, work, send, deadline_of(other), answer))
            return await self._first_of(route, copies, tally)
        finally:
            for copy in copies:
                copy.cancel()
            await asyncio.gather(*(c.task for c in copies), return_exceptions=True)
            for copy in copies:
                copy.discard_unused()

    async def _first_of(self, route: Route, copies: list[_Attempt],
                        tally: Tally | None) -> tuple[Endpoint, Any, Work]:
        failures: list[tuple[Endpoint, EngineFailure]] = []
        pending = list(copies)
        while pending:
            await asyncio.wait({c.opened for c in pending}, return_when=asyncio.FIRST_COMPLETED)
            for copy in [c for c in pending if c.opened.done()]:
                if copy.opened.result():  # its first token: it wins, the other goes at once
                    for other in pending:
                        if other is not copy:
                            other.cancel()
                            if other is copies[0]:  # waited past its delay and then some
                                other.endpoint.observe_silent_loss(
                                    time.perf_counter() - other.started)
                    self.count(route, "won" if copy is not copies[0] else "lost")
                    if tally is not None:
                        tally.server, tally.attempt_started = copy.endpoint.address, copy.started
                    try:
                        return await copy.outcome()
                    except EngineFailure as exc:  # after its first token: a failed attempt
                        raise HedgeFailed([*failures, (copy.endpoint, exc)]) from None
                pending.remove(copy)
                try:
                    await copy.outcome()
                except EngineFailure as exc:
                    failures.append((copy.endpoint, exc))
                # (anything else, the request's own error, is raised: the other copy goes)
        raise HedgeFailed(failures)


class _Attempt:
    """One copy of an attempt, run as its own task under its endpoint's lease."""

    __slots__ = ("hedging", "endpoint", "started", "opened", "task", "_used")

    def __init__(self, hedging: Hedging, route: Route, endpoint: Endpoint, work: Work,
                 send: Send, deadline_s: float, answer: bool) -> None:
        self.hedging = hedging
        self.endpoint = endpoint
        self.started = time.perf_counter()
        self.opened: asyncio.Future[bool] = asyncio.get_running_loop().create_future()
        self._used = False
        self.task = asyncio.ensure_future(self._run(route, work, send, deadline_s, answer))
        self.task.add_done_callback(lambda _: self.opened_now(False))

    def opened_now(self, first_token: bool) -> None:
        """Its first token came (True), or it ended without one (False)."""
        if not self.opened.done():
            self.opened.set_result(first_token)
            if first_token:
                self.hedging.learn(self.endpoint.address, time.perf_counter() - self.started)

    async def _run(self, route: Route, work: Work, send: Send, deadline_s: float,
                   answer: bool) -> tuple[Any, Work]:
        _ATTEMPT.set(self)  # this task's own context: first_token_seen() finds it
        # (a stream's opening returns at its first token)
        return await send_once(route, self.endpoint, work, send, deadline_s, answer,
                               opened=lambda: self.opened_now(True))

    async def outcome(self) -> tuple[Endpoint, Any, Work]:
        value, seen = await self.task
        self._used = True
        return self.endpoint, value, seen

    async def alone(self) -> tuple[Endpoint, Any, Work]:
        """Its outcome when no copy was sent: a failure is the attempt's, as without hedging."""
        try:
            return await self.outcome()
        except EngineFailure as exc:
            raise HedgeFailed([(self.endpoint, exc)]) from None

    def cancel(self) -> None:
        if not self.task.done():
            self.task.cancel()

    def discard_unused(self) -> None:
        """A copy that opened but lost (both came at once): close what it holds."""
        if self._used or not self.task.done() or self.task.cancelled() or self.task.exception():
            return
        value = self.task.result()[0]
        target = value[0] if isinstance(value, tuple) and value else value
        close = getattr(target, "close", None)
        if callable(close):
            close()

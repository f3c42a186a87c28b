"""One attempt on one server, under its lease: what the retry loop and each copy of a hedged
attempt both do, so that a server learns the same from either."""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from typing import TYPE_CHECKING, Any

from modelfleet._exceptions import EngineFailure
from modelfleet.config import ServerSpec
from modelfleet.routing import Endpoint, Work

if TYPE_CHECKING:
    from modelfleet.client.route import Route

Send = Callable[[ServerSpec, float], Awaitable[Any]]


async def send_once(route: Route, endpoint: Endpoint, work: Work, send: Send, deadline_s: float,
                    answer: bool, opened: Callable[[], None] | None = None) -> tuple[Any, Work]:
    """`send` on `endpoint`: (what it returned, the work as that server saw it). A failure
    is observed on the endpoint and raised (`EngineFailure`). With `answer` the value is a
    finished answer and its success is observed here; a stream's opening leaves that to the
    stream's end. `opened` is called as `send` returns (a stream's first token)."""
    pool = route.pool
    lease = endpoint.lease(pool.prefill_tokens(endpoint, work))
    with lease:
        try:
            value = await send(route.servers[endpoint.address], deadline_s)
        except EngineFailure as exc:
            endpoint.observe_failure(exc.failure, exc.reason, retry_after_s=exc.retry_after_s)
            raise
        if opened is not None:
            opened()
        seen = pool.served(endpoint, work, ahead=lease.ahead)
        if answer:
            endpoint.observe_success(ttft_s=value.ttft_s, total_s=value.total_s,
                                     work=seen, output_tokens=value.output_tokens)
        return value, seen

"""Relaying a request body as it is, for the gateway: the same routing, retries and
failover as `chat()` / `embed()`, with the engine's answer handed back as bytes.

`AsyncModelServer.relay()` resolves the model, writes the server's `model` into the
body and sizes the request's `Work` (prefix blocks included); this module sends it
through `send_with_retries` and wraps what comes back. A whole answer is retried on
another server until one answers; a stream only until its first event (`RawStream.first`),
after which its bytes go to the caller as they come and a failure ends it. A stream is
hedged (routing.hedge_after) until its first event; a whole answer relayed as bytes is
not: a non-streamed body shows no first token to race for, and the gateway hands the
engine's bytes on as they are, so it cannot read them as a stream underneath.
"""

from __future__ import annotations

import random
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Mapping
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from modelfleet._exceptions import EngineFailure
from modelfleet._transports.base import AsyncBaseTransport
from modelfleet._transports.models import RawAnswer
from modelfleet._transports.raw import RawStream
from modelfleet.client.attempt import send_with_retries
from modelfleet.client.route import Route
from modelfleet.config import ServerSpec
from modelfleet.routing import Endpoint, Failure, Work

if TYPE_CHECKING:
    from modelfleet.metrics import ModelMetrics


@dataclass(frozen=True)
class RelayAnswer:
    """A whole answer as the engine sent it, and where and how it came."""

    body: bytes
    content_type: str
    usage: Mapping[str, int]
    server: str  # host:port that answered
    attempts: int  # attempts it took (1: the first server answered)
    latency_s: float


@dataclass
class RelayProgress:
    """What a relayed stream learns as it goes (filled in by its generator)."""

    server: str
    attempts: int
    raw: RawStream
    failure: str | None = None  # why it broke after its first event (None: it did not)
    done: bool = False  # read to its end (not left early by the caller)
    started: bool = False  # its chunks were asked for (else closing it must end it)
    usage: dict[str, int] = field(default_factory=dict)


class RelayStream:
    """An engine's stream as bytes (`async for chunk in ...`); `aclose()` (or leaving
    early) closes the engine connection, so the engine aborts the request.

    `failure` says, after the last chunk, whether the engine broke off (the caller tells
    its own client); `usage` and `output_tokens` fill in at the end."""

    def __init__(self, progress: RelayProgress, chunks: AsyncIterator[bytes],
                 abandon: Callable[[], None]) -> None:
        self._progress = progress
        self._chunks = chunks
        self._abandon = abandon

    @property
    def server(self) -> str:
        return self._progress.server

    @property
    def attempts(self) -> int:
        return self._progress.attempts

    @property
    def content_type(self) -> str:
        return self._progress.raw.content_type

    @property
    def failure(self) -> str | None:
        return self._progress.failure

    @property
    def usage(self) -> Mapping[str, int]:
        return self._progress.usage

    @property
    def output_tokens(self) -> int:
        return self._progress.raw.output_tokens

    @property
    def at_end(self) -> bool:
        """The engine's stream has been read to its end: what was last handed out is the
        last chunk, and the next step ends the iteration at once."""
        return self._progress.raw.at_end

    def __aiter__(self) -> RelayStream:
        return self

    def __anext__(self) -> Awaitable[bytes]:
        return self._chunks.__anext__()

    async def aclose(self) -> None:
        await self._chunks.aclose()  # type: ignore[attr-defined]
        self._abandon()  # closing a generator never started runs none of its cleanup


class _Counted:
    """Counts the attempts `send_with_retries` makes (each call of `send` is one)."""

    __slots__ = ("attempts",)

    def __init__(self) -> None:
        self.attempts = 0


async def relay_whole(route: Route, transport: AsyncBaseTransport, rng: random.Random,
                      path: str, body: Mapping[str, Any], work: Work, affinity: str | None, *,
                      bounded: bool) -> RelayAnswer:
    """A whole answer. `bounded` (a generation with max_tokens, or embeddings): due within
    the answer deadline; unbounded, only request_timeout_s can catch a hang."""
    api_key = route.spec.api_key
    timeout_s = route.routing.request_timeout_s
    counted = _Counted()
    generation = path != "/v1/embeddings"

    def send(server: ServerSpec, deadline_s: float) -> Awaitable[RawAnswer]:
        counted.attempts += 1
        return transport.relay_whole(server, path, body, api_key=api_key,
                                     deadline_s=deadline_s if bounded else timeout_s)

    endpoint, answer, _ = await send_with_retries(route, work, affinity, send, rng,
                                                  whole=generation and bounded)
    return RelayAnswer(body=answer.body, content_type=answer.content_type, usage=answer.usage,
                       server=endpoint.address, attempts=counted.attempts,
                       latency_s=answer.total_s)


async def relay_stream(route: Route, transport: AsyncBaseTransport, rng: random.Random,
                       path: str, body: Mapping[str, Any], work: Work, affinity: str | None,
                       after: Callable[[], None]) -> RelayStream:
    """A stream, retried on other servers until its first event; `after` runs at its end."""
    api_key = route.spec.api_key
    timeout_s = route.routing.request_timeout_s
    counted = _Counted()
    metrics = route.metrics
    started = time.perf_counter() if metrics is not None else 0.0

    async def first_event(server: ServerSpec, stall_s: float) -> tuple[RawStream, bytes]:
        counted.attempts += 1
        raw = await transport.open_relay_stream(server, path, body, api_key=api_key,
                                                stall_s=stall_s, timeout_s=timeout_s)
        return raw, await raw.first()  # (first() closes the stream when it fails)

    # (the work as the server saw it: the pool's prefix index learnt where the prompt went)
    endpoint, (raw, first), work = await send_with_retries(route, work, affinity, first_event,
                                                           rng, answer=False, hedge=True)
    progress = RelayProgress(server=endpoint.address, attempts=counted.attempts, raw=raw)
    ended = after if metrics is None else _counting_end(metrics, endpoint.address, started,
                                                        progress, after)

    def abandon() -> None:
        """Closed before its first chunk was asked for (the caller's own client left):
        the engine connection closes (the engine aborts), and the end is counted."""
        if not progress.started:
            progress.started = True
            raw.close()
            ended()

    return RelayStream(progress, _chunks(progress, endpoint, raw, first, work, ended), abandon)


def _counting_end(metrics: ModelMetrics, server: str, started: float, progress: RelayProgress,
                  after: Callable[[], None]) -> Callable[[], None]:
    """`after`, once the stream's end is counted (the retry loop counts only its opening):
    ok, interrupted (the engine broke off) or cancelled (the caller left first)."""
    def ended() -> None:
        if progress.failure is not None:
            metrics.count(server, "interrupted")
        elif progress.done:
            metrics.finished(server, started)
        else:
            metrics.count(server, "cancelled")
        after()
    return ended


async def _chunks(progress: RelayProgress, endpoint: Endpoint, raw: RawStream, first: bytes,
                  work: Work, after: Callable[[], None]) -> AsyncIterator[bytes]:
    # The opening was one attempt under its own lease; the rest holds another, taken with
    # no await in between (as the client's own streams do).
    progress.started = True
    with endpoint.lease():
        try:
            yield first
            try:
                async for chunk in raw:
                    yield chunk
            except EngineFailure as exc:
                endpoint.observe_failure(exc.failure, exc.reason, retry_after_s=exc.retry_after_s)
                progress.failure = exc.reason
                return
            progress.usage = raw.usage
            progress.done = True
            if raw.finished:
                endpoint.observe_success(ttft_s=raw.ttft_s, total_s=raw.total_s, work=work,
                                         output_tokens=raw.output_tokens)
            else:
                progress.failure = "the server ended the stream before it finished"
                endpoint.observe_failure(Failure.REFUSED, progress.failure)
        finally:
            raw.close()  # a no-op after a clean end; else the engine aborts the request
            after()

"""Relaying a request body as it is, for the gateway: the same routing, retries and
failover as `chat()` / `embed()`, with the engine's answer handed back as bytes.

`AsyncModelServer.relay()` resolves the model, writes the server's `model` into the
body and sizes the request's `Work` (prefix blocks included); this module sends it
through `send_with_retries` and wraps what comes back. A whole answer is retried on
another server until one answers; a stream until its first event (`RawStream.first`),
after which its bytes go to the caller as they come; a break after that is continued on
another server (`relay_continuation.py`) when the request can be, else it ends the
stream and `failure` says why. A stream is
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
from modelfleet.client.relay_continuation import UNFINISHED, complete_events, continuable, continued
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
    continuations: int = 0  # times it moved to another server after a break
    produced: int = 0  # after a continuation: the answer's tokens (one per delta with text)


class RelayStream:
    """An engine's stream as bytes (`async for chunk in ...`); `aclose()` (or leaving
    early) closes the engine connection, so the engine aborts the request.

    `failure` says, after the last chunk, whether the engine broke off and no server
    could continue (the caller tells its own client); `server`, `usage`,
    `output_tokens` and `continuations` fill in as it goes. A continued stream's `at_end`
    can turn back to False: what was held back as last is sent before the next chunk."""

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
        progress = self._progress
        if progress.continuations:  # (the text's tokens as sent, counted at a break)
            return progress.usage.get("completion_tokens") or progress.produced
        return progress.raw.output_tokens

    @property
    def continuations(self) -> int:
        return self._progress.continuations

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
                       after: Callable[[], None], *, go_on: bool = True) -> RelayStream:
    """A stream, retried on other servers until its first event, continued elsewhere
    after it (with `go_on`, when the request can be); `after` runs at its end."""
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
    ended = after if metrics is None else _counting_end(metrics, started, progress, after)
    rest = None
    if go_on and continuable(body):
        rest = _Rest(route, transport, rng, path, body)

    def abandon() -> None:
        """Closed before its first chunk was asked for (the caller's own client left):
        the engine connection closes (the engine aborts), and the end is counted."""
        if not progress.started:
            progress.started = True
            raw.close()
            ended()

    return RelayStream(progress, _chunks(progress, endpoint, raw, first, work, ended, rest,
                                         go_on, metrics), abandon)


@dataclass(frozen=True)
class _Rest:
    """What continuing a relayed stream needs, and the bytes it sent (`kept`)."""

    route: Route
    transport: AsyncBaseTransport
    rng: random.Random
    path: str
    body: Mapping[str, Any]
    kept: list[bytes] = field(default_factory=list)


def _counting_end(metrics: ModelMetrics, started: float, progress: RelayProgress,
                  after: Callable[[], None]) -> Callable[[], None]:
    """`after`, once the stream's end is counted (the retry loop counts only its opening)
    on the server that ended it: ok, interrupted (the engine broke off and no server
    continued it) or cancelled (the caller left first)."""
    def ended() -> None:
        server = progress.server
        if progress.failure is not None:
            metrics.count(server, "interrupted")
        elif progress.done:
            metrics.finished(server, started)
        else:
            metrics.count(server, "cancelled")
        after()
    return ended


async def _chunks(progress: RelayProgress, endpoint: Endpoint, raw: RawStream, first: bytes,
                  work: Work, after: Callable[[], None], rest: _Rest | None,
                  go_on: bool, metrics: ModelMetrics | None) -> AsyncIterator[bytes]:
    # The opening was one attempt under its own lease; the rest holds another, taken with
    # no await in between (as the client's own streams do).
    progress.started = True
    broke: EngineFailure | None = None
    try:
        with endpoint.lease():
            try:
                if rest is None:
                    yield first
                    try:
                        async for chunk in raw:
                            yield chunk
                    except EngineFailure as exc:
                        broke = exc
                else:  # kept, and sent up to the last whole event (a break cuts none)
                    kept = rest.kept
                    kept.append(first)
                    held = b""
                    try:
                        sent, held = complete_events(first)
                        if sent:
                            yield sent
                        async for chunk in raw:
                            kept.append(chunk)
                            if held or not chunk.endswith(b"\n\n"):
                                chunk, held = complete_events(held + chunk)
                                if not chunk:
                                    continue
                            yield chunk
                    except EngineFailure as exc:
                        broke = exc
                    else:
                        if held:
                            yield held
                if broke is not None:
                    endpoint.observe_failure(broke.failure, broke.reason,
                                             retry_after_s=broke.retry_after_s)
                elif raw.finished:
                    progress.usage = raw.usage
                    progress.done = True
                    endpoint.observe_success(ttft_s=raw.ttft_s, total_s=raw.total_s, work=work,
                                             output_tokens=raw.output_tokens)
                else:
                    broke = EngineFailure(Failure.REFUSED, UNFINISHED)
                    endpoint.observe_failure(Failure.REFUSED, UNFINISHED)
            finally:
                raw.close()  # a no-op after a clean end; else the engine aborts the request
        if broke is None:
            return
        if rest is None:
            progress.failure = broke.reason
            if metrics is not None:
                metrics.continuation("unavailable" if go_on else "off")
            return
        async for chunk in continued(rest.route, rest.transport, rest.rng, progress, rest.path,
                                     rest.body, rest.kept, broke, go_on):
            yield chunk
    finally:
        after()

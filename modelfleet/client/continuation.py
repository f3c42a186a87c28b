"""Streams that outlive their server: a stream that breaks after its first token goes on
on another server, and the caller sees one stream.

A break is what `TokenStream` raises as `EngineFailure` once tokens came: a reset, a
server killed, silence past the stall deadline, a 5xx or an error event mid-stream, an
end without a finish. The rest of the same answer is asked of another server (the broken
one only when no other is left): for a chat, the messages plus the answer so far as a
last, assistant, message, with `continue_final_message: true` and
`add_generation_prompt: false` (how vLLM and SGLang continue a message; a request that
already continued an assistant message gets the new text added to it); for a completion,
the prompt plus the text so far. `max_tokens` / `max_completion_tokens` (and vLLM's
`min_tokens`) are lowered by the tokens already produced. The caller gets every delta
the broken server sent, then the continuation's: no error, nothing twice.

Usage is the whole answer's: completion tokens summed over the servers (a broken one's
are its deltas, one token each as engines stream them, since its usage never came);
prompt tokens the original prompt's, taken as the continuation's prompt less the
answer's tokens in it (exact when the engine tokenizes the text as it produced it; a
token or two off where re-tokenizing joins or splits tokens otherwise).

A stream moves at most `routing.max_retry` times, each move withdraws from the model's
retry budget, and the continuation's own opening is retried like any request's. When
it cannot go on (continuation off, no server left, the budget or the moves spent, a
server refusing the continuation), the caller gets `StreamInterrupted` with all the
text so far. A break after every token asked for came (only the end was lost) ends the
stream as finished ("length"). `reopen()` holds these rules for the gateway's relayed
streams too (`relay_continuation.py`), which keep their bytes and count their own text.
"""

from __future__ import annotations

import random
from collections.abc import AsyncIterator, Awaitable, Callable, Mapping
from dataclasses import dataclass
from typing import Any, TypeVar

from modelfleet._exceptions import EngineFailure
from modelfleet._transports.base import AsyncBaseTransport
from modelfleet._transports.reading import TokenStream
from modelfleet.client.attempt import send_with_retries
from modelfleet.client.route import Route
from modelfleet.client.types import StreamProgress
from modelfleet.config import ServerSpec
from modelfleet.errors import NoServerAvailable, RequestRejected, StreamInterrupted
from modelfleet.routing import Endpoint, Work

T = TypeVar("T")


@dataclass(frozen=True)
class Opened:
    """A stream whose first token came: where, the stream, that token, and the work as
    that server saw it."""

    endpoint: Endpoint
    stream: TokenStream
    first: str
    work: Work


async def follow(route: Route, transport: AsyncBaseTransport, rng: random.Random,
                 progress: StreamProgress, opened: Opened, path: str,
                 body: Mapping[str, Any], *, started: float,
                 go_on: bool) -> AsyncIterator[str]:
    """The deltas of an opened stream to its end, continued elsewhere when it breaks
    (with `go_on`); the request is counted in the metrics at its end (`started`: its
    `perf_counter()` start)."""
    metrics = route.metrics
    endpoint = opened.endpoint
    try:
        while True:
            endpoint, stream = opened.endpoint, opened.stream
            broke: EngineFailure | None = None
            # The opening was one attempt under its own lease; the rest of the stream
            # holds another on the same endpoint, taken with no await in between.
            with endpoint.lease():
                finished = False
                try:
                    if opened.first:
                        yield opened.first
                    try:
                        async for piece in stream:
                            yield piece
                    except EngineFailure as exc:
                        endpoint.observe_failure(exc.failure, exc.reason,
                                                 retry_after_s=exc.retry_after_s)
                        broke = exc
                    else:
                        finished = True
                        generation = stream.generation()
                        endpoint.observe_success(ttft_s=generation.ttft_s,
                                                 total_s=generation.total_s, work=opened.work,
                                                 output_tokens=generation.output_tokens)
                finally:
                    if not finished:
                        stream.close()
            if broke is None:
                break
            for piece in stream.unread():  # read before the failure, never handed out
                yield piece
            after = await _continue(route, transport, rng, progress, path, body,
                                    endpoint.address, broke, go_on)
            if after is None:
                break
            opened = after
    except BaseException as exc:  # (GeneratorExit too: the caller left early)
        if metrics is not None:
            metrics.finished(endpoint.address, started, exc)
        raise
    if metrics is not None:
        metrics.finished(endpoint.address, started)


async def _continue(route: Route, transport: AsyncBaseTransport, rng: random.Random,
                    progress: StreamProgress, path: str, body: Mapping[str, Any], broken: str,
                    failure: EngineFailure, go_on: bool) -> Opened | None:
    """The rest of the answer opened on another server (None: nothing was left to ask);
    `StreamInterrupted` when no server can give it."""
    stream = progress.tokens
    produced = progress.earlier_tokens + (stream.output_tokens if stream is not None else 0)
    so_far = Broken(progress.text(), produced, progress.continuations, broken, failure)
    api_key = route.spec.api_key
    timeout_s = route.routing.request_timeout_s

    async def first_token(payload: Mapping[str, Any], server: ServerSpec,
                          stall_s: float) -> tuple[TokenStream, str]:
        opened = await transport.open_stream(server, path, payload, api_key=api_key,
                                             stall_s=stall_s, timeout_s=timeout_s)
        try:
            return opened, await opened.__anext__()
        except StopAsyncIteration:
            return opened, ""  # nothing more to say
        except BaseException:
            opened.close()
            raise

    reopened = await reopen(route, rng, path, body, so_far, go_on, first_token)
    if reopened is None:
        progress.finish_reason = "length"
        return None
    endpoint, (new, first), seen = reopened
    # No await from here to the first yield: the caller reads the new stream from now on.
    progress.earlier_text, progress.earlier_tokens = so_far.text, produced
    progress.continuations += 1
    progress.server, progress.tokens = endpoint.address, new
    return Opened(endpoint, new, first, seen)


@dataclass(frozen=True)
class Broken:
    """What a stream gave before it broke: its text and tokens (over every server so
    far), how many times it moved already, the server that broke and why."""

    text: str
    produced: int
    moves: int
    server: str
    failure: EngineFailure


async def reopen(route: Route, rng: random.Random, path: str, body: Mapping[str, Any],
                 broken: Broken, go_on: bool,
                 open_rest: Callable[[Mapping[str, Any], ServerSpec, float], Awaitable[T]],
                 ) -> tuple[Endpoint, T, Work] | None:
    """The rest of a broken stream opened on another server: the rules every stream
    follows, the library's token streams and the gateway's relayed bytes alike.

    `open_rest(payload, server, stall_s)` opens the continuation (`payload`) on one
    server up to its first token, as `send_with_retries` attempts it. Returns that
    server's endpoint, what `open_rest` returned and the work; None when every token
    asked for came already (nothing is left to ask). Raises `StreamInterrupted` (with
    the text so far) when it cannot go on. Each outcome is counted in the metrics."""
    failure, metrics = broken.failure, route.metrics

    def interrupted(outcome: str, why: str) -> StreamInterrupted:
        if metrics is not None:
            metrics.continuation(outcome)
        return StreamInterrupted(broken.text, broken.server, why)

    if not go_on:
        raise interrupted("off", failure.reason)
    left = tokens_left(body, broken.produced)
    if left == 0:
        return None
    payload = continuation_body(body, broken.text, broken.produced)
    if payload is None:
        raise interrupted("unavailable", f"{failure.reason} (a prompt of token ids cannot be "
                                         f"continued elsewhere)")
    if broken.moves >= route.routing.max_retry:
        raise interrupted("unavailable", f"{failure.reason} (it moved {broken.moves} "
                                         f"times already: max_retry)")
    if not route.budget.try_withdraw():
        raise interrupted("unavailable", f"{failure.reason} (the retry budget is spent)")
    messages = payload.get("messages")
    work = (Work.for_chat(messages, left) if isinstance(messages, list)
            else Work.for_prompt(payload["prompt"], left))

    def send(server: ServerSpec, stall_s: float) -> Awaitable[T]:
        return open_rest(payload, server, stall_s)

    try:
        reopened = await send_with_retries(route, work, None, send, rng, answer=False,
                                           exclude=(broken.server,), counted=False)
    except NoServerAvailable as exc:
        raise interrupted("unavailable", f"{failure.reason}; no server could continue it: "
                                         f"{exc}") from None
    except RequestRejected as exc:
        raise interrupted("rejected", f"{failure.reason}; the continuation was refused: "
                                      f"{exc}") from None
    if metrics is not None:
        metrics.continuation("continued")
    return reopened


def tokens_left(body: Mapping[str, Any], produced: int) -> int | None:
    """The tokens the request may still produce (None: it set no limit)."""
    for key in ("max_completion_tokens", "max_tokens"):  # (the first wins, as in vLLM)
        value = body.get(key)
        if isinstance(value, int) and not isinstance(value, bool):
            return max(0, value - produced)
    return None


def continuation_body(body: Mapping[str, Any], text: str,
                      produced: int) -> dict[str, Any] | None:
    """The request for the rest of an answer of which `text` (`produced` tokens) was
    given; None when it cannot be asked for (a prompt of token ids)."""
    payload = dict(body)
    for key in ("max_tokens", "max_completion_tokens", "min_tokens"):
        value = payload.get(key)
        if isinstance(value, int) and not isinstance(value, bool):
            payload[key] = max(0 if key == "min_tokens" else 1, value - produced)
    messages = payload.get("messages")
    if isinstance(messages, list):
        messages = list(messages)
        last = messages[-1] if messages else None
        if (payload.get("continue_final_message") is True and isinstance(last, Mapping)
                and last.get("role") == "assistant" and isinstance(last.get("content"), str)):
            messages[-1] = {**last, "content": last["content"] + text}
        else:
            messages.append({"role": "assistant", "content": text})
        payload.update(messages=messages, continue_final_message=True,
                       add_generation_prompt=False)
        return payload
    prompt = payload.get("prompt")
    if isinstance(prompt, list) and len(prompt) == 1 and isinstance(prompt[0], str):
        prompt = prompt[0]  # (one prompt in a list, as some clients send it)
    if isinstance(prompt, str):
        payload["prompt"] = prompt + text
        return payload
    return None

"""Relayed streams that outlive their server: the gateway's stream, broken after its first
event, goes on on another server and its client sees one OpenAI stream.

While a stream is relayed its bytes are only kept (a list append per chunk, for requests
that can be continued: `n` of 1, no `best_of`, `echo` or `logprobs`); they are parsed only
when it breaks, for the text so far (the chat deltas' `content`, the completion choices'
`text`), the tokens (one per delta with text, as the library counts a broken server's)
and the first event's `id`, `created` and `model`. The rest is asked for by
`continuation.reopen()`, under the same rules as the library's streams (retry budget,
`max_retry` moves, the broken server last, outcomes in
`modelfleet_stream_continuations_total`). Only the continuation's events are parsed and
written again: with the first server's `id` / `created` / `model`, without its role-only
opening chunk, its usage summed as the library sums it (completion tokens over the
servers, prompt tokens the original prompt's). A stream whose deltas called tools, or
that cannot be continued, ends with the gateway's error event, as before.
"""

from __future__ import annotations

import random
from collections.abc import AsyncIterator, Mapping
from typing import TYPE_CHECKING, Any

import orjson

from modelfleet._exceptions import EngineFailure
from modelfleet._transports.base import AsyncBaseTransport
from modelfleet._transports.raw import RawStream
from modelfleet.client.continuation import Broken, reopen
from modelfleet.client.route import Route
from modelfleet.config import ServerSpec
from modelfleet.errors import StreamInterrupted
from modelfleet.routing import Failure

if TYPE_CHECKING:
    from modelfleet.client.relay import RelayProgress

CHAT = "/v1/chat/completions"
DONE_EVENT = b"data: [DONE]\n\n"
UNFINISHED = "the server ended the stream before it finished"


def continuable(body: Mapping[str, Any]) -> bool:
    """Whether a relayed stream of `body` can be continued elsewhere: one choice, no
    echoed prompt and no log probabilities (whose offsets and counts a continuation
    would not carry on)."""
    if body.get("n") not in (None, 1) or body.get("best_of") not in (None, 1):
        return False
    if body.get("echo") not in (None, False):
        return False
    return all(body.get(key) in (None, False) for key in ("logprobs", "top_logprobs"))


def complete_events(data: bytes) -> tuple[bytes, bytes]:
    """`data` cut after its last complete event: (events, the partial rest)."""
    if data.endswith(b"\n\n"):
        return data, b""
    cut = data.rfind(b"\n\n") + 2
    return (data[:cut], data[cut:]) if cut >= 2 else (b"", data)


class SoFar:
    """What the client has been sent: text, tokens, whether a delta called a tool or a
    finish came; and the first server's `id`, `created`, `model`."""

    __slots__ = ("chat", "parts", "produced", "head", "tools", "finish", "base", "usage")

    def __init__(self, chat: bool) -> None:
        self.chat = chat
        self.parts: list[str] = []
        self.produced = 0
        self.head: dict[str, Any] = {}
        self.tools = False
        self.finish: str | None = None
        self.base = 0  # tokens before the server now answering (its usage gets them added)
        self.usage: dict[str, int] = {}

    def text(self) -> str:
        return "".join(self.parts)

    def read(self, events: bytes) -> None:
        """Take in events the client got as they were (the first server's)."""
        for line in events.split(b"\n"):
            payload = line[5:].strip() if line.startswith(b"data:") else b""
            if payload and payload != b"[DONE]":
                event = orjson.loads(payload)
                if type(event) is dict:
                    if not self.head:
                        self.head = {k: event[k] for k in ("id", "created", "model")
                                     if k in event}
                    self._take(event)

    def rewrite(self, events: bytes) -> bytes:
        """A continuation's events as the client gets them."""
        out: list[bytes] = []
        for line in events.split(b"\n"):
            payload = line[5:].strip() if line.startswith(b"data:") else b""
            if not payload:
                continue
            if payload == b"[DONE]":
                out.append(DONE_EVENT)
                continue
            event = orjson.loads(payload)
            if type(event) is not dict:
                continue
            if self._role_only(event):
                continue
            self._take(event)
            event.update(self.head)
            usage = event.get("usage")
            if type(usage) is dict and self.base:
                completion = int(usage.get("completion_tokens") or 0) + self.base
                prompt = max(0, int(usage.get("prompt_tokens") or 0) - self.base)
                usage.update(prompt_tokens=prompt, completion_tokens=completion,
                             total_tokens=prompt + completion)
            if type(usage) is dict:
                self.usage = {k: v for k, v in usage.items() if type(v) is int}
            out.append(b"data: " + orjson.dumps(event) + b"\n\n")
        return b"".join(out)

    def _role_only(self, event: dict[str, Any]) -> bool:
        """The opening chunk a chat continuation sends: the client had one already."""
        if not self.chat:
            return False
        choices = event.get("choices")
        if type(choices) is not list or len(choices) != 1 or type(choices[0]) is not dict:
            return False
        choice = choices[0]
        delta = choice.get("delta")
        return (type(delta) is dict and "role" in delta and not delta.get("content")
                and not delta.get("tool_calls") and choice.get("finish_reason") is None)

    def _take(self, event: dict[str, Any]) -> None:
        choices = event.get("choices")
        if type(choices) is not list or not choices or type(choices[0]) is not dict:
            return
        choice = choices[0]
        if self.chat:
            delta = choice.get("delta")
            if type(delta) is not dict:
                return
            text = delta.get("content")
            if delta.get("tool_calls") or delta.get("function_call"):
                self.tools = True
        else:
            text = choice.get("text")
        if isinstance(text, str) and text:
            self.parts.append(text)
            self.produced += 1
        if isinstance(choice.get("finish_reason"), str):
            self.finish = choice["finish_reason"]

    def length_end(self) -> bytes:
        """The end of a stream whose every token asked for came (only its end was lost)."""
        choice: dict[str, Any] = {"index": 0, "finish_reason": "length"}
        if self.chat:
            choice["delta"] = {}
            kind = "chat.completion.chunk"
        else:
            choice["text"] = ""
            kind = "text_completion"
        event = {**self.head, "object": kind, "choices": [choice]}
        event.setdefault("id", "")
        return b"data: " + orjson.dumps(event) + b"\n\n" + DONE_EVENT


async def continued(route: Route, transport: AsyncBaseTransport, rng: random.Random,
                    progress: RelayProgress, path: str, body: Mapping[str, Any],
                    kept: list[bytes], failure: EngineFailure,
                    go_on: bool) -> AsyncIterator[bytes]:
    """The rest of a relayed stream that broke with `failure` after sending `kept` (whole
    events only): its events from the servers that continue it, as they come. When it
    cannot go on, `progress.failure` says why (the caller sends its error event)."""
    so_far = SoFar(path == CHAT)
    broken = progress.server
    try:
        so_far.read(complete_events(b"".join(kept))[0])
    except ValueError:  # not JSON: the client got it as it was, and nothing can follow it
        so_far.tools = True
    api_key = route.spec.api_key
    timeout_s = route.routing.request_timeout_s

    async def first_event(payload: Mapping[str, Any], server: ServerSpec,
                          stall_s: float) -> tuple[RawStream, bytes]:
        progress.attempts += 1
        raw = await transport.open_relay_stream(server, path, payload, api_key=api_key,
                                                stall_s=stall_s, timeout_s=timeout_s)
        return raw, await raw.first()  # (first() closes the stream when it fails)

    while True:
        progress.produced = so_far.produced
        if so_far.finish is not None:  # its last chunk came; only [DONE] (or usage) did not
            yield DONE_EVENT
            progress.done = True
            return
        if so_far.tools:
            if route.metrics is not None:
                route.metrics.continuation("unavailable")
            progress.failure = failure.reason
            return
        try:
            reopened = await reopen(route, rng, path, body,
                                    Broken(so_far.text(), so_far.produced, progress.continuations,
                                           broken, failure), go_on, first_event)
        except StreamInterrupted as exc:
            progress.failure = exc.reason
            return
        if reopened is None:
            yield so_far.length_end()  # (nothing more to count: `produced` is the answer's)
            progress.done = True
            return
        endpoint, (raw, first), work = reopened
        progress.continuations += 1
        progress.server, progress.raw = endpoint.address, raw
        so_far.base = so_far.produced
        with endpoint.lease():
            try:
                try:
                    events, pending = complete_events(first)
                    out = so_far.rewrite(events)
                    if out:
                        yield out
                    async for chunk in raw:
                        events, pending = complete_events(pending + chunk)
                        out = so_far.rewrite(events)
                        if out:
                            yield out
                except EngineFailure as exc:
                    endpoint.observe_failure(exc.failure, exc.reason,
                                             retry_after_s=exc.retry_after_s)
                    failure, broken = exc, endpoint.address
                    continue
                except ValueError:  # a continuation's event not JSON: nothing can follow it
                    failure = EngineFailure(Failure.SERVER_ERROR, "the continuation sent an "
                                                               "event that is not JSON")
                    endpoint.observe_failure(failure.failure, failure.reason)
                    so_far.tools = True
                    continue
                if raw.finished:
                    endpoint.observe_success(ttft_s=raw.ttft_s, total_s=raw.total_s, work=work,
                                             output_tokens=raw.output_tokens)
                    progress.usage, progress.produced = so_far.usage, so_far.produced
                    progress.done = True
                    return
                failure = EngineFailure(Failure.REFUSED, UNFINISHED)
                endpoint.observe_failure(failure.failure, failure.reason)
                broken = endpoint.address
            finally:
                raw.close()

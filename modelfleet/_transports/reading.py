"""Reading a 2xx response's body: a token stream, a whole answer, embeddings.

Transport-agnostic: these read any `ResponseBody` (aiohttp's response, or the mock's),
map transport errors through `modelfleet._exceptions`, and give the connection slot back
(`on_end`) exactly once, however the read ends.
"""

from __future__ import annotations

import time
from collections import deque
from collections.abc import Callable
from typing import Any

from modelfleet._exceptions import TRANSPORT_ERRORS, EngineFailure, engine_failure
from modelfleet._transports.models import Embeddings, Generation, ResponseBody
from modelfleet._transports.parse import (
    DONE,
    chunk_text,
    decode_json,
    parse_answer,
    parse_embeddings,
    parse_sse,
    raise_in_band_error,
)
from modelfleet.errors import RequestRejected
from modelfleet.routing import Failure

_JSON = "application/json"


class TokenStream:
    """Text deltas of one streamed (SSE) generation, as an async iterator.

    Reads whatever bytes have arrived (not line by line) and hands out the deltas
    they hold, so a fast stream costs one read per network chunk. Closing it (or
    leaving it early) closes the connection, which is how engines learn to abort
    the request and free its batch slot. A server that ignored `stream: true` and sent
    one JSON body gives its text as one delta (and no time to first token).
    """

    __slots__ = ("response", "server", "sent_at", "stall_s", "whole_s", "text_parts", "usage",
                 "finish_reason", "model", "first_token_at", "ended_at", "_pending", "_tail",
                 "_done", "_one_body", "_on_end")

    def __init__(self, response: ResponseBody, server: str, sent_at: float,
                 stall_s: float | None = None, *, whole_s: float | None = None,
                 on_end: Callable[[], None] | None = None) -> None:
        self.response = response
        self._on_end = on_end  # gives the connection slot back, once
        self.server = server
        self.sent_at = sent_at
        self.stall_s = stall_s
        self.whole_s = whole_s  # read for a whole answer due within it: timeouts say so
        self.text_parts: list[str] = []  # every delta read so far
        self.usage: dict[str, int] = {}
        self.finish_reason: str | None = None
        self.model = ""
        self.first_token_at: float | None = None
        self.ended_at: float | None = None
        self._pending: deque[str] = deque()  # read, not yet handed out
        self._tail = b""  # an incomplete last line
        self._done = False
        # One JSON body, not SSE: decided once from the headers, not on every read.
        self._one_body = response.content_type == _JSON

    def __aiter__(self) -> TokenStream:
        return self

    async def __anext__(self) -> str:
        while not self._pending:
            if self._done:
                self._finish()
                raise StopAsyncIteration
            await self._read_more()
        return self._pending.popleft()

    def ready_delta(self) -> str | None:
        """The next delta if it was read already (no I/O, no await), else None: lets a
        caller that wraps this stream skip its own frames for deltas that are here."""
        if self._pending and self.ended_at is None:
            return self._pending.popleft()
        return None

    async def read_all(self) -> None:
        """Read to the end without handing deltas out one by one."""
        while not self._done:
            await self._read_more()
        self._pending.clear()
        self._finish()

    async def _read_more(self) -> None:
        try:
            if self._one_body:
                await self._one_json_body()
                return
            data = await self.response.content.readany()
        except TRANSPORT_ERRORS as exc:
            self.close()
            raise engine_failure(exc, stall_s=self.stall_s, whole_s=self.whole_s) from None
        if not data:
            self._done = True
            if self.finish_reason is None and not self.usage:
                self.close()
                raise EngineFailure(Failure.REFUSED, "stream ended before it finished")
            return
        now = time.perf_counter()
        complete, newline, tail = (self._tail + data).rpartition(b"\n")
        if not newline:
            self._tail = tail
            return
        self._tail = tail
        try:
            events = parse_sse(complete)
            for event in events:
                if event is DONE:
                    self._done = True
                    break
                text = self._take(event)
                if text:
                    if self.first_token_at is None:
                        self.first_token_at = now
                    self.text_parts.append(text)
                    self._pending.append(text)
        except (EngineFailure, RequestRejected):
            self.close()
            raise
        except ValueError as exc:  # a data line that is not JSON (or not UTF-8)
            self.close()
            raise EngineFailure(Failure.SERVER_ERROR, f"malformed stream: {exc}") from None

    async def _one_json_body(self) -> None:
        self._one_body = True
        try:
            event = decode_json(await self.response.read())
        except ValueError as exc:
            self.close()
            raise EngineFailure(Failure.SERVER_ERROR, f"malformed answer: {exc}") from None
        try:
            text, usage, finish, model = parse_answer(event, self.server)
        except (EngineFailure, RequestRejected):
            self.close()
            raise
        self.first_token_at = time.perf_counter()
        self._done = True
        self.usage, self.finish_reason, self.model = usage, finish, model
        if text:
            self.text_parts.append(text)
            self._pending.append(text)

    def _take(self, event: Any) -> str:
        if not isinstance(event, dict):
            return ""
        if "error" in event:
            raise_in_band_error(event, self.server)
        if not self.model:
            self.model = event.get("model") or ""
        usage = event.get("usage")
        if usage:
            self.usage = {k: v for k, v in usage.items() if isinstance(v, int)}
        text, finish = chunk_text(event)
        if finish:
            self.finish_reason = finish
        return text

    def _finish(self) -> None:
        if self.ended_at is None:
            self.ended_at = time.perf_counter()
            self.response.release()
            self._ended()

    def close(self) -> None:
        """Drop the connection (a no-op after the stream ended cleanly)."""
        if self.ended_at is None:
            self.ended_at = time.perf_counter()
            self.response.close()
            self._ended()

    def _ended(self) -> None:
        if self._on_end is not None:
            on_end, self._on_end = self._on_end, None
            on_end()

    async def aclose(self) -> None:
        self.close()

    @property
    def text(self) -> str:
        return "".join(self.text_parts)

    @property
    def output_tokens(self) -> int:
        """Tokens the server generated (its usage; else one per text chunk)."""
        return int(self.usage.get("completion_tokens") or len(self.text_parts))

    def generation(self) -> Generation:
        end = self.ended_at or time.perf_counter()
        first = self.first_token_at or end
        return Generation(text=self.text, usage=self.usage, finish_reason=self.finish_reason,
                          model=self.model, ttft_s=None if self._one_body else first - self.sent_at,
                          total_s=end - self.sent_at, output_tokens=self.output_tokens)


async def _read_body(response: ResponseBody, on_end: Callable[[], None], *,
                     stall_s: float | None, whole_s: float | None = None) -> bytes:
    """The whole body; the connection goes back to the pool (or is dropped on trouble)."""
    try:
        raw = await response.read()
    except TRANSPORT_ERRORS as exc:
        response.close()
        raise engine_failure(exc, stall_s=stall_s, whole_s=whole_s) from None
    except BaseException:
        response.close()
        raise
    finally:
        on_end()
    response.release()
    return raw


async def read_answer(response: ResponseBody, server: str, sent_at: float, *,
                      deadline_s: float, on_end: Callable[[], None]) -> Generation:
    """A whole chat or completion answer, asked for in one piece and due within
    `deadline_s` (a server that streams regardless is read as a stream)."""
    if response.content_type != _JSON:
        stream = TokenStream(response, server, sent_at, deadline_s, whole_s=deadline_s,
                             on_end=on_end)
        try:
            await stream.read_all()
        finally:
            stream.close()
        return stream.generation()
    raw = await _read_body(response, on_end, stall_s=deadline_s, whole_s=deadline_s)
    total_s = time.perf_counter() - sent_at
    try:
        payload = decode_json(raw)
    except ValueError as exc:
        raise EngineFailure(Failure.SERVER_ERROR, f"malformed answer: {exc}") from None
    text, usage, finish, model = parse_answer(payload, server)
    return Generation(text=text, usage=usage, finish_reason=finish, model=model, ttft_s=None,
                      total_s=total_s,
                      output_tokens=int(usage.get("completion_tokens") or (1 if text else 0)))


async def read_embeddings(response: ResponseBody, sent_at: float, *, stall_s: float,
                          on_end: Callable[[], None], as_numpy: bool = False) -> Embeddings:
    """The vectors of an embeddings answer, in input order."""
    raw = await _read_body(response, on_end, stall_s=stall_s)
    total_s = time.perf_counter() - sent_at
    try:
        data = decode_json(raw)
        vectors = parse_embeddings(data, as_numpy=as_numpy)
    except (ValueError, KeyError, TypeError, AttributeError) as exc:
        raise EngineFailure(Failure.SERVER_ERROR, f"malformed embeddings: {exc}") from None
    usage = {k: v for k, v in (data.get("usage") or {}).items() if isinstance(v, int)}
    return Embeddings(vectors=vectors, usage=usage, model=data.get("model") or "",
                      total_s=total_s)

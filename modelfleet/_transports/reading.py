"""Reading a 2xx response's body: a token stream, a whole answer, embeddings.

Transport-agnostic: these read any `ResponseBody` (aiohttp's response, or the mock's),
map transport errors through `modelfleet._exceptions`, and give the connection slot back
(`on_end`) exactly once, however the read ends.

Whatever the bytes are, a read ends in an answer or in `EngineFailure`: what the parsers
choke on is the server's malformed answer, never an exception of ours for the caller.
Deadlines are kept here as well as in the transport: aiohttp's sock_read restarts with
every byte, so a server that trickles bytes without an answer in them is cut when its
stall deadline (or answer deadline) passes, checked at each chunk (no timer of its own).
"""

from __future__ import annotations

import time
from collections import deque
from collections.abc import Callable
from typing import Any

from modelfleet._exceptions import TRANSPORT_ERRORS, EngineFailure, engine_failure
from modelfleet._transports.ending import Ending
from modelfleet._transports.models import Embeddings, Generation, ResponseBody
from modelfleet._transports.parse import (
    DONE,
    chunk_text,
    decode_json,
    json_kind,
    malformed,
    parse_answer,
    parse_embeddings,
    parse_sse,
    raise_in_band_error,
    usage_of,
)
from modelfleet.routing import Failure

_JSON = "application/json"


class TokenStream(Ending):
    """Text deltas of one streamed (SSE) generation, as an async iterator.

    Reads whatever bytes have arrived (not line by line) and hands out the deltas
    they hold, so a fast stream costs one read per network chunk. Closing it (or
    leaving it early) closes the connection, which is how engines learn to abort
    the request and free its batch slot. A server that ignored `stream: true` and sent
    one JSON body gives its text as one delta (and no time to first token).
    """

    __slots__ = ("server", "sent_at", "stall_s", "whole_s", "text_parts", "usage",
                 "finish_reason", "model", "first_token_at", "_pending", "_tail",
                 "_done", "_one_body", "_stall_at")

    def __init__(self, response: ResponseBody, server: str, sent_at: float,
                 stall_s: float | None = None, *, whole_s: float | None = None,
                 on_end: Callable[[], None] | None = None) -> None:
        super().__init__(response, on_end)
        self.server = server
        self.sent_at = sent_at
        self.stall_s = stall_s
        self.whole_s = whole_s  # read for a whole answer due within it: timeouts say so
        self.text_parts: list[str] = []  # every delta read so far
        self.usage: dict[str, int] = {}
        self.finish_reason: str | None = None
        self.model = ""
        self.first_token_at: float | None = None
        self._pending: deque[str] = deque()  # read, not yet handed out
        self._tail = b""  # an incomplete last line
        self._done = False
        # One JSON body, not SSE: decided once from the headers, not on every read.
        self._one_body = response.content_type == _JSON
        # Bytes that carry no event after this moment are a trickle, not progress.
        self._stall_at = sent_at + (stall_s if stall_s is not None else float("inf"))

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

    def unread(self) -> list[str]:
        """The deltas read but never handed out: a read that failed may have taken some
        before the failure. A stream continued elsewhere gives them to its caller first."""
        pieces = list(self._pending)
        self._pending.clear()
        return pieces

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
            if self.finish_reason is None and not self.text_parts:
                self.close()
                raise malformed("the stream ended with no text and no finish_reason")
            return
        now = time.perf_counter()
        complete, newline, self._tail = (self._tail + data).rpartition(b"\n")
        try:
            events = parse_sse(complete) if newline else ()
            if not events:
                if now > self._stall_at:
                    raise EngineFailure(Failure.TIMEOUT, self._trickle_reason())
                return
            if self.stall_s is not None:
                self._stall_at = now + self.stall_s
            for event in events:
                if event is DONE:
                    self._done = True
                    if self.finish_reason is None and not self.text_parts:
                        raise malformed("the stream ended ([DONE]) with no text and no "
                                        "finish_reason")
                    break
                text = self._take(event)
                if text:
                    if self.first_token_at is None:
                        self.first_token_at = now
                    self.text_parts.append(text)
                    self._pending.append(text)
        except EngineFailure:
            self.close()
            raise
        except Exception as exc:  # not UTF-8, not JSON, too deep: the server's bytes
            self.close()
            raise _undecodable(exc, "stream ") from None

    async def _one_json_body(self) -> None:
        self._one_body = True
        try:
            raw = await _read_within(self.response, self._stall_at, self.whole_s or self.stall_s)
            text, usage, finish, model = parse_answer(decode_json(raw))
        except TRANSPORT_ERRORS as exc:
            self.close()
            raise engine_failure(exc, stall_s=self.stall_s, whole_s=self.whole_s) from None
        except EngineFailure:
            self.close()
            raise
        except Exception as exc:  # not JSON
            self.close()
            raise _undecodable(exc) from None
        self.first_token_at = time.perf_counter()
        self._done = True
        self.usage, self.finish_reason, self.model = usage, finish, model
        if text:
            self.text_parts.append(text)
            self._pending.append(text)

    def _trickle_reason(self) -> str:
        if self.whole_s is not None:
            return f"no whole answer within {self.whole_s:.1f} s, only bytes (answer deadline)"
        return f"sent bytes but no event for {self.stall_s:.1f} s (stall deadline)"

    def _take(self, event: Any) -> str:
        if type(event) is not dict:
            raise malformed(f"a stream event is {json_kind(event)}, not an object")
        if "error" in event:
            raise_in_band_error(event)
        if not self.model:
            model = event.get("model")
            self.model = model if isinstance(model, str) else ""
        usage = event.get("usage")
        if usage is not None:
            self.usage = usage_of(usage)
        text, finish = chunk_text(event)
        if finish:
            self.finish_reason = finish
        return text

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


def _undecodable(exc: Exception, what: str = "") -> EngineFailure:
    """The failure of bytes the parsers could not read (the exception says where)."""
    if isinstance(exc, ValueError):  # JSONDecodeError, UnicodeDecodeError
        return malformed(f"{what}not JSON ({exc})")
    return malformed(f"{what}{type(exc).__name__}: {exc}")


async def _read_within(response: ResponseBody, deadline_at: float,
                       deadline_s: float | None) -> bytes:
    """The whole body, chunk by chunk; a body still coming at `deadline_at` (a
    `time.perf_counter()` moment) is cut: every chunk restarts aiohttp's sock_read."""
    content = response.content
    parts = []
    while data := await content.readany():
        parts.append(data)
        if time.perf_counter() > deadline_at:
            within = f" within {deadline_s:.1f} s" if deadline_s is not None else ""
            raise EngineFailure(Failure.TIMEOUT, f"no whole answer{within}, only a body that "
                                                 f"kept coming (answer deadline)")
    return b"".join(parts)


async def _read_body(response: ResponseBody, on_end: Callable[[], None], *, deadline_at: float,
                     deadline_s: float, whole_s: float | None = None) -> bytes:
    """The whole body, due by `deadline_at`; the connection goes back to the pool (or is
    dropped on trouble)."""
    try:
        raw = await _read_within(response, deadline_at, deadline_s)
    except TRANSPORT_ERRORS as exc:
        response.close()
        raise engine_failure(exc, stall_s=deadline_s, whole_s=whole_s) from None
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
    raw = await _read_body(response, on_end, deadline_at=sent_at + deadline_s,
                           deadline_s=deadline_s, whole_s=deadline_s)
    total_s = time.perf_counter() - sent_at
    try:
        text, usage, finish, model = parse_answer(decode_json(raw))
    except EngineFailure:
        raise
    except Exception as exc:  # not JSON (or nested too deep to decode)
        raise _undecodable(exc) from None
    return Generation(text=text, usage=usage, finish_reason=finish, model=model, ttft_s=None,
                      total_s=total_s,
                      output_tokens=int(usage.get("completion_tokens") or (1 if text else 0)))


async def read_embeddings(response: ResponseBody, sent_at: float, *, stall_s: float,
                          on_end: Callable[[], None], as_numpy: bool = False,
                          expected: int | None = None) -> Embeddings:
    """The vectors of an embeddings answer, in input order: `expected` of them (when
    known), all of one length, the whole answer within `stall_s` (an embedding's stall
    deadline is its whole answer's)."""
    raw = await _read_body(response, on_end, deadline_at=sent_at + stall_s, deadline_s=stall_s)
    total_s = time.perf_counter() - sent_at
    try:
        data = decode_json(raw)
        vectors = parse_embeddings(data, as_numpy=as_numpy, expected=expected)
        usage = usage_of(data.get("usage"))
        model = data.get("model")
    except EngineFailure:
        raise
    except Exception as exc:  # not JSON, or what numpy makes of odd rows
        raise _undecodable(exc, "embeddings ") from None
    return Embeddings(vectors=vectors, usage=usage, model=model if isinstance(model, str) else "",
                      total_s=total_s)

"""Reading a 2xx response's bytes to pass them on unparsed (the gateway's relay).

The answer goes to the caller as the engine sent it: a whole body, or a stream's SSE
bytes chunk by chunk as they arrive. Only what routing and the access log need is read
out of it (usage, a count of events, whether the stream finished), so a relayed stream
costs one read and one write per network chunk.

Before its first bytes a stream can still move to another server: `RawStream.first()`
reads up to the first complete event and raises `EngineFailure` (or `RequestRejected`
for an in-band error about the request) when the server fails before it. After that a
failure ends the stream; the caller reports it to its own client.
"""

from __future__ import annotations

import time
from collections import deque
from collections.abc import Callable
from typing import Any

import orjson

from modelfleet._exceptions import TRANSPORT_ERRORS, EngineFailure, engine_failure
from modelfleet._transports.ending import Ending
from modelfleet._transports.models import RawAnswer, ResponseBody
from modelfleet._transports.parse import (
    json_kind,
    malformed,
    parse_sse,
    raise_in_band_error,
    usage_of,
)
from modelfleet._transports.reading import _read_body
from modelfleet.routing import Failure

_JSON = "application/json"
_DONE_LINE = b"data: [DONE]"
_TAIL_KEPT = 8192  # bytes of a stream's end kept to read its usage and [DONE] from


async def read_raw_answer(response: ResponseBody, sent_at: float, *, deadline_s: float,
                          on_end: Callable[[], None], generation: bool) -> RawAnswer:
    """A whole answer's bytes, due within `deadline_s`; not JSON (or an error object
    under a 200) is the server's malformed answer. `generation`: a chat or completion
    (its completion tokens are its work), else embeddings."""
    raw = await _read_body(response, on_end, deadline_at=sent_at + deadline_s,
                           deadline_s=deadline_s, whole_s=deadline_s)
    total_s = time.perf_counter() - sent_at
    try:
        data = orjson.loads(raw)
    except orjson.JSONDecodeError as exc:
        raise malformed(f"not JSON ({exc})") from None
    if type(data) is not dict:
        raise malformed(f"the answer is {json_kind(data)}, not an object")
    raise_in_band_error(data)
    usage = usage_of(data.get("usage"))
    output_tokens = None
    if generation:
        output_tokens = int(usage.get("completion_tokens") or 1)
    return RawAnswer(body=raw, content_type=response.content_type or _JSON, usage=usage,
                     total_s=total_s, output_tokens=output_tokens)


class RawStream(Ending):
    """A stream's bytes as they arrive (`async for chunk in ...`), after `first()`.

    Closing it (or leaving it early) closes the engine connection, which is how engines
    learn to abort the request. `finished` tells, at its end, whether the engine ended
    it properly (`data: [DONE]`, or one JSON body from a server that ignored `stream`).
    """

    __slots__ = ("_usage", "server", "sent_at", "stall_s", "content_type", "events",
                 "first_at", "finished", "_recent", "_recent_len", "_eof")

    def __init__(self, response: ResponseBody, server: str, sent_at: float, stall_s: float,
                 *, on_end: Callable[[], None] | None = None) -> None:
        super().__init__(response, on_end)
        self.server = server
        self.sent_at = sent_at
        self.stall_s = stall_s
        self.content_type = response.content_type or "text/event-stream"
        self.events = 0  # `data:` lines seen (about one per token)
        self.first_at: float | None = None
        self.finished = False
        # The stream's last chunks, at least _TAIL_KEPT bytes of them: joined only at the end,
        # so a chunk costs an append, not a copy of the whole tail.
        self._recent: deque[bytes] = deque()
        self._recent_len = 0
        self._eof = False
        self._usage: dict[str, int] | None = None  # read from the tail once it has ended

    async def first(self) -> bytes:
        """The bytes up to (at least) the first complete event, within the stall deadline;
        `EngineFailure` when the server fails first, so the request can move on."""
        buffered = b""
        deadline_at = self.sent_at + self.stall_s
        try:
            while True:
                data = await self._read()
                if not data:
                    if self.content_type == _JSON and buffered:
                        break  # one JSON body: checked below like a whole answer's
                    raise EngineFailure(Failure.REFUSED, "the stream ended before its first event")
                buffered += data
                if self.content_type == _JSON:
                    continue
                end = buffered.rfind(b"\n\n")
                if end >= 0:
                    self._check_opening(buffered[:end + 1])
                    break
                if time.perf_counter() > deadline_at:
                    raise EngineFailure(Failure.TIMEOUT, f"sent bytes but no event for "
                                                         f"{self.stall_s:.1f} s (stall deadline)")
            if self.content_type == _JSON:
                self._check_body(buffered)
        except BaseException:
            self.close()
            raise
        self.first_at = time.perf_counter()
        self._count(buffered)
        return buffered

    def _check_opening(self, events: bytes) -> None:
        """The first event must be JSON; an error event among the first ones is the
        server's (or the request's) failure, raised so the request is retried (or refused)
        as a whole. Only the first event, and any line naming an `"error"` key, is parsed:
        a fast engine's opening can hold the whole answer, which is passed on unparsed."""
        first = events.find(b"\n\n")
        head = events if first < 0 else events[:first + 1]
        rest = b"" if first < 0 else events[first + 1:]
        if b'"error"' in rest:  # (in JSON text a quote inside a string is escaped)
            head = events
        try:
            parsed = parse_sse(head)
        except Exception as exc:  # not UTF-8, not JSON
            raise malformed(f"stream not JSON ({exc})") from None
        for event in parsed:
            if type(event) is dict:
                raise_in_band_error(event)

    def _check_body(self, raw: bytes) -> None:
        try:
            data = orjson.loads(raw)
        except orjson.JSONDecodeError as exc:
            raise malformed(f"not JSON ({exc})") from None
        if type(data) is dict:
            raise_in_band_error(data)
        self.finished = True

    @property
    def at_end(self) -> bool:
        """Every byte of the stream has arrived and been read: the next read ends it
        without waiting (so a caller can send the last bytes together with its own end)."""
        return self._eof or self.response.content.at_eof()

    def __aiter__(self) -> RawStream:
        return self

    async def __anext__(self) -> bytes:
        if self._eof:
            raise StopAsyncIteration
        try:
            data = await self._read()
        except BaseException:
            self.close()
            raise
        if not data:
            self._eof = True
            self._finish()
            raise StopAsyncIteration
        self._count(data)
        return data

    async def _read(self) -> bytes:
        try:
            return await self.response.content.readany()
        except TRANSPORT_ERRORS as exc:
            raise engine_failure(exc, stall_s=self.stall_s) from None

    def _count(self, data: bytes) -> None:
        self.events += data.count(b"data:")
        recent = self._recent
        recent.append(data)
        self._recent_len += len(data)
        while self._recent_len - len(recent[0]) >= _TAIL_KEPT:
            self._recent_len -= len(recent.popleft())

    def _finish(self) -> None:
        if self.content_type != _JSON:
            self.finished = _DONE_LINE in self._tail()
        super()._finish()

    @property
    def usage(self) -> dict[str, int]:
        """The usage the engine reported at the end (when the request asked for it)."""
        if self._usage is None:
            usage = self._usage_in_tail()
            if self.ended_at is None:
                return usage  # (the tail may still change)
            self._usage = usage
        return self._usage

    def _tail(self) -> bytes:
        """The last _TAIL_KEPT bytes of the stream so far."""
        return b"".join(self._recent)[-_TAIL_KEPT:]

    def _usage_in_tail(self) -> dict[str, int]:
        tail = self._tail()
        at = tail.rfind(b'"usage"')
        if at < 0:
            return {}
        start = tail.rfind(b"\n", 0, at) + 1
        end = tail.find(b"\n", at)
        line = tail[start:end if end >= 0 else len(tail)].strip()
        if line.startswith(b"data:"):
            line = line[5:].strip()
        try:
            event: Any = orjson.loads(line)
            return usage_of(event.get("usage")) if type(event) is dict else {}
        except (orjson.JSONDecodeError, EngineFailure):
            return {}

    @property
    def output_tokens(self) -> int:
        """Tokens generated: the engine's usage, else about one per event."""
        completion = self.usage.get("completion_tokens")
        if completion:
            return int(completion)
        return max(1, self.events - (1 if self.finished else 0))

    @property
    def ttft_s(self) -> float | None:
        return None if self.first_at is None else self.first_at - self.sent_at

    @property
    def total_s(self) -> float:
        return (self.ended_at or time.perf_counter()) - self.sent_at

"""An in-process transport driven by a handler function, as httpx's MockTransport is.

    def handler(request: MockRequest) -> MockResponse:
        if request.server == "a:1":
            raise ConnectionRefusedError(111, "Connection refused")
        return MockResponse.answer(request, "Hello there")

    client = AsyncModelServer(config=fleet, transport=MockTransport(handler))

The handler answers every request (the client's background probes too), may be async,
and may raise what a network raises (OSError, asyncio.TimeoutError, aiohttp errors):
those go through the same exception map as the real transport's. Replies are read by
the same code as real ones (`parse`, `reading`), so what a handler sends is understood
exactly as if a server had sent it. A handler that does not answer within the request's
stall deadline (or whole-answer deadline) times out like a silent server.
"""

from __future__ import annotations

import asyncio
import inspect
import json
import re
import time
from collections import deque
from collections.abc import Awaitable, Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Final

import aiohttp

from modelfleet._exceptions import map_exceptions
from modelfleet._transports.base import AsyncBaseTransport
from modelfleet._transports.models import Sent
from modelfleet._transports.parse import status_failure
from modelfleet.config import ServerSpec


class _Silence:
    def __repr__(self) -> str:
        return "SILENCE"


SILENCE: Final = _Silence()  # in `chunks`: the server sends nothing more (until the stall deadline)


@dataclass(frozen=True)
class MockRequest:
    """What the client sent: to which server, where, and the JSON body (None for a GET)."""

    server: str  # host:port
    method: str  # GET | POST
    path: str
    json: Mapping[str, Any] | None
    api_key: str | None

    @property
    def stream(self) -> bool:
        return bool(self.json and self.json.get("stream"))


@dataclass(frozen=True)
class MockResponse:
    """What the server answers: a status, headers and a body (JSON, text, or chunks)."""

    status: int = 200
    json: Any = None  # a JSON body
    text: str | None = None  # a plain body (/metrics, an error page)
    chunks: Sequence[bytes | BaseException | _Silence] | None = None  # a body piece by piece;
    #            an exception is raised by the read that reaches it
    headers: Mapping[str, str] = field(default_factory=dict)
    content_type: str | None = None  # default: from the body's kind

    @classmethod
    def answer(cls, request: MockRequest, text: str, *, model: str | None = None,
               finish_reason: str = "stop", break_after: int | None = None,
               broken_by: BaseException | _Silence | None = None) -> MockResponse:
        """`text` as a chat or completions answer to `request`: SSE (one chunk per word)
        when it asked for a stream, else one JSON body. With `break_after`, a stream
        stops after that many words and `broken_by` is raised (or silence follows)."""
        body = request.json or {}
        model = model or str(body.get("model") or "m")
        pieces = re.findall(r"\s*\S+", text) or [text]
        chat = request.path.endswith("/chat/completions")
        usage = {"prompt_tokens": 8, "completion_tokens": len(pieces),
                 "total_tokens": 8 + len(pieces)}
        if not request.stream:
            choice: dict[str, Any] = {"index": 0, "finish_reason": finish_reason}
            if chat:
                choice["message"] = {"role": "assistant", "content": text}
            else:
                choice["text"] = text
            return cls(json={"model": model, "choices": [choice], "usage": usage})
        chunks: list[bytes | BaseException | _Silence] = []
        for number, piece in enumerate(pieces):
            if break_after is not None and number == break_after:
                chunks.append(broken_by if broken_by is not None else SILENCE)
                return cls(chunks=chunks)
            delta = {"delta": {"content": piece}} if chat else {"text": piece}
            chunks.append(_sse({"model": model,
                                "choices": [{"index": 0, **delta, "finish_reason": None}]}))
        last = {"delta": {}} if chat else {"text": ""}
        chunks.append(_sse({"model": model,
                            "choices": [{"index": 0, **last, "finish_reason": finish_reason}]}))
        chunks.append(_sse({"model": model, "choices": [], "usage": usage}))
        chunks.append(b"data: [DONE]\n\n")
        return cls(chunks=chunks)

    @classmethod
    def embeddings(cls, request: MockRequest, *, dim: int = 4) -> MockResponse:
        """One float vector per input of an embeddings request (vector i is all i)."""
        inputs = (request.json or {}).get("input") or []
        inputs = [inputs] if isinstance(inputs, str) else list(inputs)
        data = [{"index": i, "object": "embedding", "embedding": [float(i)] * dim}
                for i in range(len(inputs))]
        return cls(json={"data": data, "model": (request.json or {}).get("model", "e"),
                         "usage": {"prompt_tokens": len(inputs), "total_tokens": len(inputs)}})

    @classmethod
    def error(cls, status: int, message: str, *, retry_after: str | None = None) -> MockResponse:
        """An OpenAI-shaped error answer."""
        headers = {"Retry-After": retry_after} if retry_after is not None else {}
        return cls(status=status, json={"error": {"message": message, "code": status}},
                   headers=headers)

    def _rendered(self) -> tuple[str, list[bytes | BaseException | _Silence]]:
        if self.chunks is not None:
            return self.content_type or "text/event-stream", list(self.chunks)
        if self.json is not None:
            return self.content_type or "application/json", [json.dumps(self.json).encode()]
        return self.content_type or "text/plain", [(self.text or "").encode()]


def _sse(event: Mapping[str, Any]) -> bytes:
    return b"data: " + json.dumps(event).encode() + b"\n\n"


Handler = Callable[[MockRequest], "MockResponse | Awaitable[MockResponse]"]


class _MockBody:
    """A response body with the surface the readers use (`ResponseBody`)."""

    def __init__(self, response: MockResponse, stall_s: float | None,
                 on_done: Callable[[_MockBody], None]) -> None:
        self.content_type, chunks = response._rendered()
        self._chunks = deque(chunks)
        self._stall_s = stall_s
        self._on_done = on_done
        self.content = self  # aiohttp's shape: response.content.readany()
        self.done = False

    async def readany(self) -> bytes:
        if self.done:
            raise aiohttp.ClientConnectionError("Connection closed")
        if not self._chunks:
            return b""
        item = self._chunks.popleft()
        if isinstance(item, _Silence):
            await asyncio.sleep(self._stall_s or 0.0)
            raise aiohttp.ServerTimeoutError("Timeout on reading data from socket")
        if isinstance(item, BaseException):
            raise item
        return item

    def at_eof(self) -> bool:
        return not self._chunks

    async def read(self) -> bytes:
        parts = []
        while piece := await self.readany():
            parts.append(piece)
        return b"".join(parts)

    def release(self) -> None:
        self._end()

    def close(self) -> None:
        self._end()

    def _end(self) -> None:
        if not self.done:
            self.done = True
            self._on_done(self)


class MockTransport(AsyncBaseTransport):
    """Answers every request in-process with `handler(request)`."""

    def __init__(self, handler: Handler) -> None:
        self.handler = handler
        self._open: set[_MockBody] = set()

    @property
    def open_bodies(self) -> int:
        """Bodies handed out and neither read to the end nor closed (a leak when > 0 at rest)."""
        return len(self._open)

    async def post(self, server: ServerSpec, path: str, body: Mapping[str, Any], *,
                   api_key: str | None, stall_s: float, timeout_s: float,
                   whole_s: float | None = None) -> Sent:
        request = MockRequest(server.address, "POST", path, dict(body), api_key)
        sent_at = time.perf_counter()
        with map_exceptions(stall_s=stall_s, whole_s=whole_s):
            response = await self._answer(request, whole_s if whole_s is not None else stall_s)
        if response.status >= 300:
            _, chunks = response._rendered()
            raw = b"".join(c for c in chunks if isinstance(c, bytes))
            raise status_failure(response.status, raw, server.address,
                                 response.headers.get("Retry-After"))
        answer = _MockBody(response, stall_s, self._open.discard)
        self._open.add(answer)
        return answer, sent_at, _nothing

    async def get_text(self, server: ServerSpec, path: str, *, timeout_s: float,
                       api_key: str | None) -> tuple[int, str]:
        request = MockRequest(server.address, "GET", path, None, api_key)
        with map_exceptions():
            response = await self._answer(request, timeout_s)
            body = await _MockBody(response, timeout_s, _forget).read()
        return response.status, body.decode("utf-8", errors="replace")

    async def _answer(self, request: MockRequest, deadline_s: float) -> MockResponse:
        answer = self.handler(request)
        if inspect.isawaitable(answer):
            try:
                answer = await asyncio.wait_for(answer, deadline_s)
            except asyncio.TimeoutError:
                raise aiohttp.ServerTimeoutError("Timeout on reading data from socket") from None
        return answer  # type: ignore[return-value]


def _nothing() -> None:
    """The mock has no connection slots to give back."""


def _forget(body: _MockBody) -> None:
    pass

"""HTTP to the engines: the only module that speaks to a vLLM / SGLang / sim server.

Everything the routing needs to know about a server comes out of here in its own
terms: a finished generation with its timings, a `QueueSample` from /metrics, or an
`EngineFailure` carrying a routing `Failure` kind. A request that the server refused
on its merits (a 4xx other than 401/403/404) becomes `RequestRejected`, which the
client never retries.

A generation is streamed (SSE) when its length is unknown, even when the caller
wants the whole text: that is how a server that accepted a request and then went
silent is noticed after the stall deadline instead of after `request_timeout_s`.
When the caller bounds it (max_tokens), the client asks for the whole answer at
once (`generate_whole`) under a deadline sized for that answer: streaming costs a
busy engine a serialised chunk per token, about half its throughput. Timings start when the
request's headers went out on a connection, so waiting for a pooled connection is
never blamed on the server.
"""

from __future__ import annotations

import array
import asyncio
import base64
import email.utils
import json
import os
import sys
import time
from collections import deque
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import aiohttp

from modelfleet.config import ServerSpec
from modelfleet.errors import RequestRejected
from modelfleet.routing import Failure

# Statuses that say "this server, not this request": retried on another server.
_BACKPRESSURE = frozenset({429, 503})
_MISCONFIGURED = frozenset({401, 403, 404})

# Queue gauges of the engines we know (summed across label sets: engines, models).
_RUNNING_METRICS = frozenset({"vllm:num_requests_running", "sglang:num_running_reqs"})
_WAITING_METRICS = frozenset({"vllm:num_requests_waiting", "sglang:num_queue_reqs"})

_ERROR_TEXT_LIMIT = 500  # characters of a non-JSON error body kept in a message


class EngineFailure(Exception):
    """One server failed in a way another server might not; the client retries elsewhere.

    Internal to modelfleet: callers see `NoServerAvailable` (with these reasons) only
    when every attempt failed.
    """

    def __init__(self, failure: Failure, reason: str, *, retry_after_s: float | None = None,
                 status: int | None = None) -> None:
        super().__init__(reason)
        self.failure = failure
        self.reason = reason
        self.retry_after_s = retry_after_s
        self.status = status


@dataclass(frozen=True)
class QueueSample:
    """The server's own queue, as its /metrics reports it (all clients' requests)."""

    running: float
    waiting: float


@dataclass(frozen=True)
class Generation:
    """A finished chat or text completion, assembled from its stream."""

    text: str
    usage: Mapping[str, int]
    finish_reason: str | None
    model: str
    ttft_s: float | None  # from the request going out to the first token (None: not seen,
    #                       a whole answer arrives at once)
    total_s: float  # from the request going out to the end of the stream
    output_tokens: int


@dataclass(frozen=True)
class Embeddings:
    """Vectors in input order, with what the server said it consumed."""

    vectors: Any  # list[list[float]], or a 2-D numpy array when asked for
    usage: Mapping[str, int]
    model: str
    total_s: float


# ---------------------------------------------------------------------------
# Parsing (pure functions; tested on the captured vLLM fixtures)
# ---------------------------------------------------------------------------


def error_message(body: bytes | str) -> str:
    """The human part of an engine's error body (OpenAI, FastAPI and SGLang shapes)."""
    text = body.decode("utf-8", errors="replace") if isinstance(body, bytes) else body
    try:
        payload = json.loads(text)
    except ValueError:
        payload = None
    if isinstance(payload, dict):
        err = payload.get("error")
        if isinstance(err, dict) and err.get("message"):
            return str(err["message"])
        if isinstance(err, str) and err:
            return err
        for key in ("message", "detail"):
            if payload.get(key):
                value = payload[key]
                return value if isinstance(value, str) else json.dumps(value)
    text = text.strip()
    return text[:_ERROR_TEXT_LIMIT] if text else "(empty body)"


def retry_after_seconds(value: str | None) -> float | None:
    """Retry-After as seconds (a number or an HTTP date), or None when absent or unreadable."""
    if not value:
        return None
    value = value.strip()
    try:
        return max(0.0, float(value))
    except ValueError:
        pass
    try:
        when = email.utils.parsedate_to_datetime(value)
    except (TypeError, ValueError):
        return None
    return max(0.0, when.timestamp() - time.time())


def classify_status(status: int, message: str, server: str,
                    retry_after_s: float | None = None) -> EngineFailure | RequestRejected:
    """Decide whether a non-2xx answer is the server's fault (retry) or the request's (raise).

    A 404 or 401 from one server of a fleet means that server serves another model or
    wants another key, not that the request is wrong: vLLM answers an unknown model
    with 404, and the other servers of the model do have it.
    """
    if status in _BACKPRESSURE:
        return EngineFailure(Failure.BACKPRESSURE, f"HTTP {status}: {message}",
                             retry_after_s=retry_after_s, status=status)
    if status in _MISCONFIGURED:
        return EngineFailure(Failure.MISCONFIGURED, f"HTTP {status}: {message}", status=status)
    if status >= 500:
        return EngineFailure(Failure.SERVER_ERROR, f"HTTP {status}: {message}", status=status)
    return RequestRejected(status, message, server)


def parse_queue(metrics_text: str) -> QueueSample | None:
    """Running and waiting requests from Prometheus text; None if the engine reports neither."""
    running = waiting = 0.0
    seen = False
    for line in metrics_text.splitlines():
        if not line or line[0] == "#":
            continue
        name, value = _metric_sample(line)
        if name in _RUNNING_METRICS:
            running += value
            seen = True
        elif name in _WAITING_METRICS:
            waiting += value
            seen = True
    return QueueSample(running=running, waiting=waiting) if seen else None


def _metric_sample(line: str) -> tuple[str, float]:
    """(name, value) of one exposition line; labels may hold spaces, braces and escapes."""
    brace = line.find("{")
    space = line.find(" ")
    if brace != -1 and (space == -1 or brace < space):
        name = line[:brace]
        i, in_quotes = brace + 1, False
        while i < len(line):
            c = line[i]
            if in_quotes and c == "\\":
                i += 2
                continue
            if c == '"':
                in_quotes = not in_quotes
            elif c == "}" and not in_quotes:
                break
            i += 1
        rest = line[i + 1:]
    else:
        name, rest = (line, "") if space == -1 else (line[:space], line[space:])
    parts = rest.split()
    try:
        return name, float(parts[0])
    except (IndexError, ValueError):
        return name, 0.0


def decode_vector(value: str | Sequence[float]) -> list[float]:
    """One embedding from base64 float32 (little-endian, as OpenAI servers send) or a list."""
    if not isinstance(value, str):
        return [float(x) for x in value]
    floats = array.array("f")
    floats.frombytes(base64.b64decode(value))
    if sys.byteorder != "little":
        floats.byteswap()
    return floats.tolist()


def parse_embeddings(payload: Mapping[str, Any], *, as_numpy: bool = False) -> Any:
    """The vectors of an embeddings response, ordered by their `index`.

    With `as_numpy`, a 2-D float32 array decoded straight from base64 (no Python floats).
    """
    items = sorted(payload.get("data") or (), key=lambda item: item.get("index", 0))
    if as_numpy:
        import numpy as np

        rows = [np.frombuffer(base64.b64decode(e), dtype="<f4") if isinstance(e, str)
                else np.asarray(e, dtype=np.float32)
                for e in (item["embedding"] for item in items)]
        return np.stack(rows) if rows else np.zeros((0, 0), dtype=np.float32)
    return [decode_vector(item["embedding"]) for item in items]


DONE = object()  # the SSE terminator `data: [DONE]`


def parse_sse(text: str) -> list[Any]:
    """The events of complete SSE lines: decoded JSON of each `data:` line, `DONE` for
    the terminator; blank separators, comments and other fields are skipped."""
    events: list[Any] = []
    for line in text.split("\n"):
        if not line.startswith("data:"):
            continue
        data = line[5:].strip()
        if data == "[DONE]":
            events.append(DONE)
        elif data:
            events.append(_decode_json(data))
    return events


_decode_json = json.JSONDecoder().decode  # str in: skips json.loads' encoding sniffing


def chunk_text(chunk: Mapping[str, Any]) -> tuple[str, str | None]:
    """(text delta, finish_reason) of choice 0 in a chat or completions chunk."""
    choices = chunk.get("choices")
    if not choices:
        return "", None
    choice = choices[0]
    message = choice.get("delta") or choice.get("message")  # a stream chunk, or a whole answer
    text = (message.get("content") if message is not None else choice.get("text")) or ""
    return text, choice.get("finish_reason")


def parse_models(payload: Mapping[str, Any]) -> list[str]:
    """The model ids a server serves, from `GET /v1/models`."""
    return [str(item["id"]) for item in payload.get("data") or () if "id" in item]


# ---------------------------------------------------------------------------
# The HTTP client
# ---------------------------------------------------------------------------


_CONNECT_TIMEOUT = getattr(aiohttp, "ConnectionTimeoutError", ())  # aiohttp >= 3.10


def _failure_from_exception(exc: BaseException, stall_s: float | None = None, *,
                            whole_s: float | None = None) -> EngineFailure:
    """Connection-level trouble, in routing terms and in a few plain words."""
    if isinstance(exc, asyncio.TimeoutError):  # aiohttp's own timeouts subclass it
        if _CONNECT_TIMEOUT and isinstance(exc, _CONNECT_TIMEOUT):
            return EngineFailure(Failure.TIMEOUT, "could not connect in time")
        if whole_s is not None:
            return EngineFailure(Failure.TIMEOUT,
                                 f"no whole answer within {whole_s:.1f} s (answer deadline)")
        if isinstance(exc, aiohttp.ServerTimeoutError):  # sock_read: the stall deadline
            silent = f" for {stall_s:.1f} s" if stall_s is not None else ""
            return EngineFailure(Failure.TIMEOUT, f"went silent{silent} (stall deadline)")
        return EngineFailure(Failure.TIMEOUT, "no complete answer within request_timeout_s")
    if isinstance(exc, aiohttp.ClientConnectorError):
        return EngineFailure(Failure.REFUSED, f"cannot connect ({_os_reason(exc.os_error)})")
    if isinstance(exc, aiohttp.ServerDisconnectedError):
        return EngineFailure(Failure.REFUSED, "closed the connection")
    if isinstance(exc, aiohttp.ClientPayloadError):
        return EngineFailure(Failure.REFUSED, "the reply broke off")
    if isinstance(exc, OSError):
        return EngineFailure(Failure.REFUSED, _os_reason(exc))
    return EngineFailure(Failure.REFUSED, f"{type(exc).__name__}: {exc}")


def _os_reason(exc: OSError) -> str:
    return os.strerror(exc.errno) if exc.errno else (str(exc) or type(exc).__name__)


class TokenStream:
    """Text deltas of one streamed generation, as an async iterator.

    Reads whatever bytes have arrived (not line by line) and hands out the deltas
    they hold, so a fast stream costs one read per network chunk. Closing it (or
    leaving it early) closes the connection, which is how engines learn to abort
    the request and free its batch slot.
    """

    __slots__ = ("response", "server", "sent_at", "stall_s", "text_parts", "usage",
                 "finish_reason", "model", "first_token_at", "ended_at", "_pending", "_tail",
                 "_done", "whole_s", "whole", "_on_end")

    def __init__(self, response: aiohttp.ClientResponse, server: str, sent_at: float,
                 stall_s: float | None = None, *, whole_s: float | None = None,
                 on_end: Callable[[], None] | None = None) -> None:
        self.response = response
        self._on_end = on_end  # gives the connection slot back, once
        self.server = server
        self.sent_at = sent_at
        self.stall_s = stall_s
        self.whole_s = whole_s  # a whole-answer request's deadline (None: a stream)
        self.whole = False  # the answer came as one JSON body, not as SSE
        self.text_parts: list[str] = []  # every delta read so far
        self.usage: dict[str, int] = {}
        self.finish_reason: str | None = None
        self.model = ""
        self.first_token_at: float | None = None
        self.ended_at: float | None = None
        self._pending: deque[str] = deque()  # read, not yet handed out
        self._tail = b""  # an incomplete last line
        self._done = False

    def __aiter__(self) -> TokenStream:
        return self

    async def __anext__(self) -> str:
        while not self._pending:
            if self._done:
                self._finish()
                raise StopAsyncIteration
            await self._read_more()
        return self._pending.popleft()

    async def read_all(self) -> None:
        """Read to the end without handing deltas out one by one (a whole answer)."""
        while not self._done:
            await self._read_more()
        self._pending.clear()
        self._finish()

    async def _read_more(self) -> None:
        try:
            if self.response.content_type == "application/json":
                await self._whole_answer()
                return
            data = await self.response.content.readany()
        except (aiohttp.ClientError, asyncio.TimeoutError) as exc:
            self.close()
            raise _failure_from_exception(exc, self.stall_s, whole_s=self.whole_s) from None
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
            events = parse_sse(complete.decode("utf-8"))
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

    async def _whole_answer(self) -> None:
        """A whole answer (asked for, or a server that ignored `stream: true`)."""
        self.whole = True
        try:
            event = json.loads(await self.response.read())
        except ValueError as exc:
            self.close()
            raise EngineFailure(Failure.SERVER_ERROR, f"malformed answer: {exc}") from None
        text = self._take(event)
        self.first_token_at = time.perf_counter()
        self._done = True
        if text:
            self.text_parts.append(text)
            self._pending.append(text)

    def _take(self, event: Any) -> str:
        if not isinstance(event, dict):
            return ""
        if "error" in event:  # engines report errors that strike mid-stream in-band
            err = event["error"] if isinstance(event["error"], dict) else {}
            code = err.get("code")
            status = code if isinstance(code, int) else 500
            raise classify_status(status, error_message(json.dumps(event)), self.server)
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
        return Generation(text=self.text, usage=dict(self.usage), finish_reason=self.finish_reason,
                          model=self.model, ttft_s=None if self.whole else first - self.sent_at,
                          total_s=end - self.sent_at, output_tokens=self.output_tokens)


class Wire:
    """One pooled aiohttp session for every server a client talks to.

    Created and used on one event loop; `close()` releases every connection.
    """

    def __init__(self, *, limit_per_host: int = 256, keepalive_s: float = 30.0,
                 connect_timeout_s: float = 5.0) -> None:
        self._limit_per_host = limit_per_host
        self._keepalive_s = keepalive_s
        self._connect_timeout_s = connect_timeout_s
        self._session: aiohttp.ClientSession | None = None
        # One slot per connection a server may have. A request's clock starts once it holds
        # a slot, so time spent waiting for a connection is never counted as the server's.
        self._slots: dict[str, asyncio.Semaphore] = {}

    @property
    def session(self) -> aiohttp.ClientSession:
        if self._session is None or self._session.closed:
            # No limit in the connector: the slots above are the limit, and waiting for one
            # happens before a request's clock starts (aiohttp's tracing would time the
            # same moment, at a cost of tens of microseconds a request).
            connector = aiohttp.TCPConnector(limit=0, limit_per_host=0,
                                             keepalive_timeout=self._keepalive_s)
            self._session = aiohttp.ClientSession(
                connector=connector, raise_for_status=False,
                json_serialize=json.dumps, skip_auto_headers=("User-Agent",),
                headers={"User-Agent": "modelfleet"})
        return self._session

    def forget_session(self) -> None:
        """Its event loop is gone (closed): the next request opens a new session."""
        self._session = None
        self._slots = {}

    async def close(self) -> None:
        if self._session is not None and not self._session.closed:
            await self._session.close()
        self._session = None

    def _headers(self, api_key: str | None) -> dict[str, str] | None:
        return {"Authorization": f"Bearer {api_key}"} if api_key else None

    def _timeout(self, stall_s: float, timeout_s: float) -> aiohttp.ClientTimeout:
        return aiohttp.ClientTimeout(total=timeout_s, sock_read=stall_s,
                                     sock_connect=min(self._connect_timeout_s, timeout_s))

    async def _post(self, server: ServerSpec, path: str, body: Mapping[str, Any], *,
                    api_key: str | None, stall_s: float, timeout_s: float,
                    whole_s: float | None = None
                    ) -> tuple[aiohttp.ClientResponse, float, Callable[[], None]]:
        """POST and wait for a 2xx's headers.

        Returns the response, when its request went out (after a connection slot was
        free), and the function that gives the slot back once the body has been read.
        """
        slot = self._slots.get(server.address)
        if slot is None:
            slot = self._slots[server.address] = asyncio.Semaphore(self._limit_per_host)
        await slot.acquire()
        sent_at = time.perf_counter()
        try:
            response = await self.session.post(
                server.url + path, json=body, headers=self._headers(api_key),
                timeout=self._timeout(stall_s, timeout_s))
        except (aiohttp.ClientError, asyncio.TimeoutError) as exc:
            slot.release()
            raise _failure_from_exception(exc, stall_s, whole_s=whole_s) from None
        except BaseException:  # cancelled while waiting for the headers
            slot.release()
            raise
        if response.status >= 300:
            try:
                raw = await response.read()
            except (aiohttp.ClientError, asyncio.TimeoutError):
                raw = b""
            finally:
                response.release()
                slot.release()
            raise classify_status(response.status, error_message(raw), server.address,
                                  retry_after_seconds(response.headers.get("Retry-After")))
        return response, sent_at, slot.release

    async def open_stream(self, server: ServerSpec, path: str, body: Mapping[str, Any], *,
                          api_key: str | None, stall_s: float, timeout_s: float) -> TokenStream:
        """Start a streamed chat (`/v1/chat/completions`) or completion (`/v1/completions`).

        `stall_s` bounds every silence (before the first byte and between chunks);
        `timeout_s` bounds the whole request.
        """
        payload = dict(body)
        payload["stream"] = True
        options = dict(payload.get("stream_options") or {})
        options["include_usage"] = True
        payload["stream_options"] = options
        response, sent_at, release = await self._post(server, path, payload, api_key=api_key,
                                                       stall_s=stall_s, timeout_s=timeout_s)
        return TokenStream(response, server.address, sent_at, stall_s, on_end=release)

    async def generate(self, server: ServerSpec, path: str, body: Mapping[str, Any], *,
                       api_key: str | None, stall_s: float, timeout_s: float) -> Generation:
        """A whole chat or completion, streamed underneath so that silence is noticed."""
        stream = await self.open_stream(server, path, body, api_key=api_key, stall_s=stall_s,
                                        timeout_s=timeout_s)
        try:
            await stream.read_all()
        finally:
            stream.close()
        return stream.generation()

    async def generate_whole(self, server: ServerSpec, path: str, body: Mapping[str, Any], *,
                             api_key: str | None, deadline_s: float) -> Generation:
        """A whole chat or completion asked for in one piece (no SSE), within `deadline_s`.

        Only for answers of bounded length (max_tokens): the deadline must fit the whole
        answer, and it is the only way a hung server is noticed. The first token is not
        seen, so the result's `ttft_s` is None.
        """
        payload = dict(body)
        payload["stream"] = False
        payload.pop("stream_options", None)
        response, sent_at, release = await self._post(server, path, payload, api_key=api_key,
                                                       stall_s=deadline_s, timeout_s=deadline_s,
                                                       whole_s=deadline_s)
        answer = TokenStream(response, server.address, sent_at, deadline_s, whole_s=deadline_s,
                             on_end=release)
        try:
            await answer.read_all()  # one JSON body (or SSE, from a server that insists)
        finally:
            answer.close()
        return answer.generation()

    async def embed(self, server: ServerSpec, body: Mapping[str, Any], *, api_key: str | None,
                    stall_s: float, timeout_s: float, as_numpy: bool = False) -> Embeddings:
        """`/v1/embeddings`, asking for base64 (a quarter of the bytes of JSON floats)."""
        payload = dict(body)
        payload.setdefault("encoding_format", "base64")
        response, sent_at, release = await self._post(server, "/v1/embeddings", payload,
                                                       api_key=api_key, stall_s=stall_s,
                                                       timeout_s=timeout_s)
        try:
            raw = await response.read()
        except (aiohttp.ClientError, asyncio.TimeoutError) as exc:
            raise _failure_from_exception(exc, stall_s) from None
        finally:
            response.release()
            release()
        total_s = time.perf_counter() - sent_at
        try:
            data = json.loads(raw)
            vectors = parse_embeddings(data, as_numpy=as_numpy)
        except (ValueError, KeyError, TypeError, AttributeError) as exc:
            raise EngineFailure(Failure.SERVER_ERROR, f"malformed embeddings: {exc}") from None
        usage = {k: v for k, v in (data.get("usage") or {}).items() if isinstance(v, int)}
        return Embeddings(vectors=vectors, usage=usage, model=data.get("model") or "",
                          total_s=total_s)

    async def _get_text(self, server: ServerSpec, path: str, timeout_s: float,
                        api_key: str | None) -> tuple[int, str]:
        try:
            async with self.session.get(
                    server.url + path, headers=self._headers(api_key),
                    timeout=aiohttp.ClientTimeout(total=timeout_s)) as response:
                return response.status, await response.text(errors="replace")
        except (aiohttp.ClientError, asyncio.TimeoutError) as exc:
            raise _failure_from_exception(exc) from None

    async def health(self, server: ServerSpec, *, timeout_s: float = 5.0,
                     api_key: str | None = None) -> bool:
        """True when /health answers 2xx; False for any other answer or no answer."""
        try:
            status, _ = await self._get_text(server, "/health", timeout_s, api_key)
        except EngineFailure:
            return False
        return 200 <= status < 300

    async def queue(self, server: ServerSpec, *, timeout_s: float = 5.0,
                    api_key: str | None = None) -> QueueSample | None:
        """The server's running/waiting gauges; None when /metrics is missing or has neither."""
        status, text = await self._get_text(server, "/metrics", timeout_s, api_key)
        if not 200 <= status < 300:
            return None
        return parse_queue(text)

    async def models(self, server: ServerSpec, *, timeout_s: float = 5.0,
                     api_key: str | None = None) -> list[str]:
        """The model ids the server says it serves (to explain a 404 from it)."""
        status, text = await self._get_text(server, "/v1/models", timeout_s, api_key)
        if not 200 <= status < 300:
            raise classify_status(status, error_message(text), server.address)
        try:
            return parse_models(json.loads(text))
        except (ValueError, AttributeError, TypeError) as exc:
            raise EngineFailure(Failure.SERVER_ERROR, f"malformed /v1/models: {exc}") from None

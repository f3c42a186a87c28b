"""Servers that answer badly on purpose, to show that a bad answer is that server's failure.

A `HostileServer` is a raw-socket HTTP/1.1 server on 127.0.0.1 (a port the OS picks),
running on its own event loop on a daemon thread, so one test process can hold it for
a whole module. Raw sockets, not aiohttp.web: the misbehaviours include things a web
framework will not do (a body shorter than its Content-Length, a reset in mid-body,
a body that never ends, bytes that are not HTTP-shaped JSON or SSE).

It tells three kinds of request apart and can misbehave on each separately:

- the client's background benchmark (a chat or embedding request carrying
  `PROBE_MARK`, the fleet's benchmark text in these tests): `probe_behaviour`;
- `/metrics` and `/health`: `metrics_behaviour`;
- everything else (the caller's requests): `behaviour`.

`None` means a healthy answer, in the shapes vLLM sends, so that a server which is
hostile to callers only still passes its probes and is routed to (the tests want the
bad answer on the caller's path, not a server the probes already put down). Every
request is counted by kind in `hits`, so a test can assert the server WAS tried.

Every answer ends the connection (`Connection: close`): no request depends on what an
earlier one left on a pooled connection.
"""

from __future__ import annotations

import asyncio
import base64
import json
import socket
import struct
import threading
from collections import Counter
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any

PROBE_MARK = "hostile-test probe"
HOSTILE_TEXT = "hostile says hi"  # what a healthy answer from a hostile server says
HOSTILE_DIM = 4  # dimensions of its healthy embeddings (a sim's are longer: tests tell them apart)
TRICKLE_EVERY_S = 0.05  # a body that never ends: one byte this often


@dataclass(frozen=True)
class Request:
    method: str
    path: str
    body: Any  # decoded JSON, or None

    @property
    def kind(self) -> str:
        """chat | completion | embedding | metrics | health | models | other"""
        path = self.path.split("?", 1)[0]
        return {"/v1/chat/completions": "chat", "/v1/completions": "completion",
                "/v1/embeddings": "embedding", "/metrics": "metrics", "/health": "health",
                "/v1/models": "models"}.get(path, "other")

    @property
    def stream(self) -> bool:
        return isinstance(self.body, dict) and self.body.get("stream") is True

    @property
    def is_probe(self) -> bool:
        if not isinstance(self.body, dict):
            return False
        return PROBE_MARK in json.dumps(self.body.get("messages", self.body.get("input")))

    @property
    def inputs(self) -> list[Any]:
        value = self.body.get("input") if isinstance(self.body, dict) else None
        return [value] if isinstance(value, str) else list(value or [])


class Conn:
    """One accepted connection, and the few things a server can do with it."""

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.reader = reader
        self.writer = writer

    async def head(self, status: int = 200, content_type: str | None = "application/json", *,
                   length: int | None = None, extra: dict[str, str] | None = None) -> None:
        """Status line and headers. Without `length` the body runs until the socket closes."""
        lines = [f"HTTP/1.1 {status} {_REASONS.get(status, 'Whatever')}", "Connection: close"]
        if content_type is not None:
            lines.append(f"Content-Type: {content_type}")
        if length is not None:
            lines.append(f"Content-Length: {length}")
        lines += [f"{k}: {v}" for k, v in (extra or {}).items()]
        await self.send(("\r\n".join(lines) + "\r\n\r\n").encode())

    async def send(self, data: bytes) -> None:
        self.writer.write(data)
        await self.writer.drain()

    async def respond(self, status: int, body: bytes | str | dict | list,
                      content_type: str | None = "application/json",
                      extra: dict[str, str] | None = None) -> None:
        if isinstance(body, (dict, list)):
            body = json.dumps(body)
        data = body.encode() if isinstance(body, str) else body
        await self.head(status, content_type, length=len(data), extra=extra)
        await self.send(data)

    async def sse(self, events: list[Any], *, done: bool = True) -> None:
        """A close-delimited event stream: each event a `data:` line (dicts as JSON)."""
        await self.head(200, "text/event-stream")
        for event in events:
            data = event if isinstance(event, str) else json.dumps(event)
            await self.send(f"data: {data}\n\n".encode())
        if done:
            await self.send(b"data: [DONE]\n\n")

    def reset(self) -> None:
        """Close with a TCP RST (SO_LINGER 0), as a crashed or killed process's socket does."""
        sock = self.writer.get_extra_info("socket")
        if sock is not None:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        self.writer.transport.abort()

    async def until_client_leaves(self) -> None:
        """Say nothing until the client closes its end."""
        while await self.reader.read(65536):
            pass

    async def trickle(self, byte: bytes) -> None:
        """One byte every TRICKLE_EVERY_S until the client closes its end: never silent,
        never finished."""
        while True:
            try:
                if not await asyncio.wait_for(self.reader.read(65536), TRICKLE_EVERY_S):
                    return  # the client left
            except asyncio.TimeoutError:
                pass
            if self.writer.is_closing():
                return
            await self.send(byte)


Behaviour = Callable[[Conn, Request], Awaitable[None]]

_REASONS = {200: "OK", 301: "Moved Permanently", 302: "Found", 307: "Temporary Redirect",
            404: "Not Found", 500: "Internal Server Error"}


# ---------------------------------------------------------------------------
# Well-formed answers (the shapes vLLM 0.32 sends), with any value in the text slot
# ---------------------------------------------------------------------------


def usage_of(req: Request) -> dict[str, int]:
    return {"prompt_tokens": 5, "completion_tokens": 3, "total_tokens": 8}


def whole_body(req: Request, content: Any = HOSTILE_TEXT, **overrides: Any) -> dict[str, Any]:
    """A non-streamed chat or completion answer carrying `content` where the text goes."""
    model = req.body.get("model", "m") if isinstance(req.body, dict) else "m"
    if req.kind == "completion":
        choice = {"index": 0, "text": content, "finish_reason": "stop"}
        obj = "text_completion"
    else:
        choice = {"index": 0, "message": {"role": "assistant", "content": content},
                  "finish_reason": "stop"}
        obj = "chat.completion"
    body = {"id": "hostile-1", "object": obj, "created": 1, "model": model,
            "choices": [choice], "usage": usage_of(req)}
    body.update(overrides)
    return body


def chunk(req: Request, content: Any = None, *, finish: str | None = None,
          role: bool = False) -> dict[str, Any]:
    """One stream chunk of a chat or completion (`content` None: no text in it)."""
    model = req.body.get("model", "m") if isinstance(req.body, dict) else "m"
    if req.kind == "completion":
        choice: dict[str, Any] = {"index": 0, "text": "" if content is None else content,
                                  "finish_reason": finish}
        obj = "text_completion"
    else:
        delta: dict[str, Any] = {"role": "assistant"} if role else {}
        if content is not None:
            delta["content"] = content
        choice = {"index": 0, "delta": delta, "finish_reason": finish}
        obj = "chat.completion.chunk"
    return {"id": "hostile-1", "object": obj, "created": 1, "model": model, "choices": [choice]}


def healthy_chunks(req: Request, text: str = HOSTILE_TEXT) -> list[dict[str, Any]]:
    words = text.split(" ")
    pieces = [words[0]] + [" " + w for w in words[1:]]
    model = req.body.get("model", "m") if isinstance(req.body, dict) else "m"
    final = {"id": "hostile-1", "object": "chat.completion.chunk", "created": 1, "model": model,
             "choices": [], "usage": usage_of(req)}
    return ([chunk(req, "", role=True)] + [chunk(req, p) for p in pieces]
            + [chunk(req, finish="stop"), final])


def vector_b64(values: list[float]) -> str:
    return base64.b64encode(struct.pack(f"<{len(values)}f", *values)).decode()


def embeddings_body(req: Request, vectors: list[Any] | None = None, **overrides: Any
                    ) -> dict[str, Any]:
    """An embeddings answer; `vectors` as they go on the wire (default: one per input)."""
    if vectors is None:
        vectors = [[0.5] * HOSTILE_DIM for _ in req.inputs]
    base64_wanted = isinstance(req.body, dict) and req.body.get("encoding_format") == "base64"
    data = [{"object": "embedding", "index": i,
             "embedding": vector_b64(v) if base64_wanted and isinstance(v, list) else v}
            for i, v in enumerate(vectors)]
    model = req.body.get("model", "e") if isinstance(req.body, dict) else "e"
    body = {"object": "list", "data": data, "model": model,
            "usage": {"prompt_tokens": 3, "total_tokens": 3}}
    body.update(overrides)
    return body


async def healthy(conn: Conn, req: Request) -> None:
    """What a good server says."""
    kind = req.kind
    if kind in ("chat", "completion"):
        if req.stream:
            await conn.sse(healthy_chunks(req))
        else:
            await conn.respond(200, whole_body(req))
    elif kind == "embedding":
        await conn.respond(200, embeddings_body(req))
    elif kind == "metrics":
        await conn.respond(200, "# TYPE vllm:num_requests_running gauge\n"
                                "vllm:num_requests_running 0.0\n"
                                "vllm:num_requests_waiting 0.0\n", "text/plain")
    elif kind == "health":
        await conn.respond(200, b"", None)
    elif kind == "models":
        model = "m"
        await conn.respond(200, {"object": "list", "data": [{"id": model, "object": "model"}]})
    else:
        await conn.respond(404, {"error": {"message": "no such route", "code": 404}})


# ---------------------------------------------------------------------------
# The server
# ---------------------------------------------------------------------------


class HostileServer:
    """See the module docstring. start() and stop() from the test's thread."""

    def __init__(self) -> None:
        self.behaviour: Behaviour | None = None
        self.probe_behaviour: Behaviour | None = None
        self.metrics_behaviour: Behaviour | None = None
        self.hits: Counter[str] = Counter()  # "caller", "probe", "metrics", "health", "other"
        self.port = 0
        self._lock = threading.Lock()
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._loop.run_forever, daemon=True,
                                        name="hostile-server")
        self._server: asyncio.AbstractServer | None = None
        self._handlers: set[asyncio.Task[None]] = set()

    @property
    def host(self) -> str:
        return "127.0.0.1"

    @property
    def address(self) -> str:
        return f"127.0.0.1:{self.port}"

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def start(self) -> HostileServer:
        self._thread.start()
        asyncio.run_coroutine_threadsafe(self._listen(), self._loop).result(timeout=10)
        return self

    def stop(self) -> None:
        asyncio.run_coroutine_threadsafe(self._shutdown(), self._loop).result(timeout=10)
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(timeout=10)
        self._loop.close()

    def reset(self, behaviour: Behaviour | None = None, *, probe: Behaviour | None = None,
              metrics: Behaviour | None = None) -> None:
        """Misbehave this way from now on (None: answer well), and forget the counts."""
        with self._lock:
            self.behaviour, self.probe_behaviour, self.metrics_behaviour = (
                behaviour, probe, metrics)
            self.hits.clear()

    def misbehave(self, *, probe: Behaviour | None = None,
                  metrics: Behaviour | None = None) -> None:
        """Turn bad on probes or /metrics from now on, keeping the counts (a server that
        passed its first probe and went bad later)."""
        with self._lock:
            self.probe_behaviour, self.metrics_behaviour = probe, metrics

    def count(self, kind: str) -> int:
        with self._lock:
            return self.hits[kind]

    async def _listen(self) -> None:
        self._server = await asyncio.start_server(self._accept, "127.0.0.1", 0)
        self.port = self._server.sockets[0].getsockname()[1]

    async def _shutdown(self) -> None:
        if self._server is not None:
            self._server.close()
        for task in list(self._handlers):
            task.cancel()
        if self._handlers:
            await asyncio.gather(*self._handlers, return_exceptions=True)

    async def _accept(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        task = asyncio.current_task()
        assert task is not None
        self._handlers.add(task)
        conn = Conn(reader, writer)
        try:
            req = await _read_request(reader)
            if req is None:
                return
            if req.kind in ("metrics", "health"):
                who, behaviour = req.kind, self.metrics_behaviour
            elif req.is_probe:
                who, behaviour = "probe", self.probe_behaviour
            elif req.kind in ("chat", "completion", "embedding"):
                who, behaviour = "caller", self.behaviour
            else:
                who, behaviour = "other", None
            with self._lock:
                self.hits[who] += 1
            await (behaviour or healthy)(conn, req)
        except (ConnectionError, asyncio.IncompleteReadError):
            pass  # the client left first: nothing to tell it
        finally:
            self._handlers.discard(task)
            if not writer.is_closing():
                writer.close()


async def _read_request(reader: asyncio.StreamReader) -> Request | None:
    try:
        head = await reader.readuntil(b"\r\n\r\n")
    except (asyncio.IncompleteReadError, asyncio.LimitOverrunError):
        return None
    lines = head.decode("latin-1").split("\r\n")
    method, path, _ = (lines[0].split(" ", 2) + ["", ""])[:3]
    length = 0
    for line in lines[1:]:
        name, _, value = line.partition(":")
        if name.strip().lower() == "content-length":
            length = int(value.strip())
    raw = await reader.readexactly(length) if length else b""
    try:
        body = json.loads(raw) if raw else None
    except ValueError:
        body = None
    return Request(method=method, path=path, body=body)


# ---------------------------------------------------------------------------
# The misbehaviours: one function each, for any kind of request
# ---------------------------------------------------------------------------


def _json_or_sse(req: Request) -> str:
    return "text/event-stream" if req.stream else "application/json"


async def invalid_json(conn: Conn, req: Request) -> None:
    """200 application/json whose body is not JSON (cut short, as a broken proxy would)."""
    await conn.respond(200, '{"choices": [{"index": 0, "message": {"content": "hi"')


async def empty_200(conn: Conn, req: Request) -> None:
    """200 with an empty body (Content-Length: 0), of the type the request asked for."""
    await conn.respond(200, b"", _json_or_sse(req))


async def no_choices(conn: Conn, req: Request) -> None:
    """200 without `choices` (embeddings: without `data`); otherwise well-formed."""
    if req.kind == "embedding":
        body = embeddings_body(req)
        del body["data"]
        await conn.respond(200, body)
    elif req.stream:
        first = chunk(req, HOSTILE_TEXT)
        del first["choices"]
        await conn.sse([first])
    else:
        body = whole_body(req)
        del body["choices"]
        await conn.respond(200, body)


def _with_choices(value: Any) -> Behaviour:
    async def answer(conn: Conn, req: Request) -> None:
        if req.kind == "embedding":
            await conn.respond(200, embeddings_body(req, data=value))
        elif req.stream:
            await conn.sse([{**chunk(req, HOSTILE_TEXT), "choices": value}])
        else:
            await conn.respond(200, whole_body(req, choices=value))
    return answer


choices_string = _with_choices("hostile says hi")  # `choices` (embeddings: `data`) a string
choices_of_null = _with_choices([None])  # a list holding null instead of an object


async def content_int(conn: Conn, req: Request) -> None:
    """The text slot (message.content, delta.content, text; embeddings: embedding) an int."""
    if req.kind == "embedding":
        await conn.respond(200, embeddings_body(req, [42 for _ in req.inputs]))
    elif req.stream:
        await conn.sse([chunk(req, "", role=True), chunk(req, 42), chunk(req, finish="stop")])
    else:
        await conn.respond(200, whole_body(req, 42))


async def usage_string(conn: Conn, req: Request) -> None:
    """A good answer whose `usage` is a string (stream: in the last chunk, where vLLM puts it)."""
    if req.kind == "embedding":
        await conn.respond(200, embeddings_body(req, usage="lots"))
    elif req.stream:
        events = healthy_chunks(req)
        events[-1]["usage"] = "lots"
        await conn.sse(events)
    else:
        await conn.respond(200, whole_body(req, usage="lots"))


def _error_200(code: int, kind: str) -> Behaviour:
    async def answer(conn: Conn, req: Request) -> None:
        error = {"error": {"message": f"hostile {kind}: CUDA out of memory", "type": kind,
                           "code": code}}
        if req.stream:
            await conn.sse([error])
        else:
            await conn.respond(200, error)
    return answer


error_200 = _error_200(500, "InternalServerError")  # an error object, with status 200
error_200_code_400 = _error_200(400, "BadRequestError")  # the same, saying 400 inside


async def sse_garbage(conn: Conn, req: Request) -> None:
    """200 text/event-stream of lines that are no SSE field at all, then the end."""
    await conn.head(200, "text/event-stream")
    await conn.send(b"garbage\nmore garbage: 12\n\n\x00\x01\x02\n\n")


async def sse_without_data_prefix(conn: Conn, req: Request) -> None:
    """Good chunks, each on a line without `data: ` in front."""
    await conn.head(200, "text/event-stream")
    for event in healthy_chunks(req):
        await conn.send(json.dumps(event).encode() + b"\n\n")
    await conn.send(b"[DONE]\n\n")


async def sse_bad_json(conn: Conn, req: Request) -> None:
    """A `data:` line whose JSON does not parse."""
    await conn.sse(['{"choices": [{"delta": {"content": "hi"}'], done=False)


async def sse_json_not_object(conn: Conn, req: Request) -> None:
    """`data:` lines that parse, but as a list and a string, then [DONE]."""
    await conn.sse([[1, 2, 3], json.dumps(HOSTILE_TEXT)])


async def sse_ends_after_tokens(conn: Conn, req: Request) -> None:
    """Two tokens, no finish_reason, no [DONE]: the server went away mid-answer."""
    await conn.sse([chunk(req, "", role=True), chunk(req, "Hostile"), chunk(req, " partial")],
                   done=False)


async def sse_ends_before_tokens(conn: Conn, req: Request) -> None:
    """The role chunk only, then the end (no token, no finish_reason, no [DONE])."""
    await conn.sse([chunk(req, "", role=True)], done=False)


async def sse_done_without_answer(conn: Conn, req: Request) -> None:
    """`data: [DONE]` and nothing else."""
    await conn.sse([])


def redirect(status: int, to: Callable[[], str]) -> Behaviour:
    """A redirect to the same path on another server (`to()` gives its base URL)."""
    async def answer(conn: Conn, req: Request) -> None:
        await conn.respond(status, b"", None, extra={"Location": to() + req.path})
    return answer


async def never_ends(conn: Conn, req: Request) -> None:
    """The headers and the start of a body, then one byte every TRICKLE_EVERY_S, forever."""
    if req.stream:
        await conn.head(200, "text/event-stream")
        await conn.trickle(b"\n")  # blank lines: legal SSE, never an event
    else:
        await conn.head(200, "application/json", length=1_000_000)
        await conn.send(b'{"choices": ')
        await conn.trickle(b" ")


async def reset_at_request(conn: Conn, req: Request) -> None:
    """A TCP reset right after reading the request, before any byte of answer."""
    conn.reset()


async def close_at_request(conn: Conn, req: Request) -> None:
    """An orderly close (FIN) right after reading the request, with no answer at all."""
    conn.writer.close()


async def reset_mid_body(conn: Conn, req: Request) -> None:
    """The headers and part of the body (no token yet), then a TCP reset."""
    if req.stream:
        await conn.head(200, "text/event-stream")
        await conn.send(f"data: {json.dumps(chunk(req, '', role=True))}\n\n".encode())
    else:
        await conn.head(200, "application/json", length=1000)
        await conn.send(b'{"id": "hostile-1", "choices": [')
    await asyncio.sleep(0.05)  # let the client read what came before the reset
    conn.reset()


async def silence(conn: Conn, req: Request) -> None:
    """Accepts and reads the request, then never answers."""
    await conn.until_client_leaves()


async def embed_wrong_count(conn: Conn, req: Request) -> None:
    """One vector fewer than there were inputs (chat requests: answered well)."""
    if req.kind != "embedding":
        return await healthy(conn, req)
    vectors = [[0.5] * HOSTILE_DIM for _ in req.inputs][1:]
    await conn.respond(200, embeddings_body(req, vectors))


async def embed_ragged(conn: Conn, req: Request) -> None:
    """Vectors of different lengths in one answer (chat requests: answered well)."""
    if req.kind != "embedding":
        return await healthy(conn, req)
    vectors = [[0.5] * (HOSTILE_DIM - i % 2) for i in range(len(req.inputs))]
    await conn.respond(200, embeddings_body(req, vectors))


async def embed_bad_base64(conn: Conn, req: Request) -> None:
    """`embedding` strings that are not base64 (chat requests: answered well)."""
    if req.kind != "embedding":
        return await healthy(conn, req)
    await conn.respond(200, embeddings_body(req, ["%% not base64 %%" for _ in req.inputs]))


# /metrics and /health garbage (for the background probes)


async def binary_garbage(conn: Conn, req: Request) -> None:
    await conn.respond(200, bytes(range(256)) * 64 + b"\xff\xfe\x80", "text/plain")


async def unknown_charset(conn: Conn, req: Request) -> None:
    await conn.respond(200, b"vllm:num_requests_running 1\n",
                       "text/plain; charset=no-such-charset")


async def absurd_numbers(conn: Conn, req: Request) -> None:
    await conn.respond(200, "vllm:num_requests_running nan\nvllm:num_requests_waiting -1e308\n"
                            "vllm:num_requests_waiting inf\nvllm:num_requests_running{x=\"\n"
                            "vllm:num_requests_waiting{a=\"}\" 3 \n", "text/plain")


async def html_page(conn: Conn, req: Request) -> None:
    await conn.respond(200, "<html><body>Login required</body></html>", "text/html")

"""The seam between the client and the engines: what the client asks of a transport.

A transport does two things: POST a JSON body and hand back a 2xx response's body
(raising `EngineFailure` or `RequestRejected` for anything else), and GET a small text
(/health, /metrics, /v1/models). Everything the client needs of an engine (a streamed
generation, a whole answer, embeddings, the server's queue) is built here on those two,
so every transport reads replies with the same code (`parse`, `reading`). The aiohttp
transport is the one that speaks HTTP; the mock transport answers in-process from a
handler function, so the client's retry and failover branches are tested in milliseconds.

Timings start when a request goes out on a connection (`sent_at`), so waiting for a
pooled connection is never blamed on the server.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from typing import TYPE_CHECKING, Any

from modelfleet._exceptions import EngineFailure
from modelfleet._transports.models import Embeddings, Generation, QueueSample, RawAnswer, Sent
from modelfleet._transports.parse import parse_models, parse_queue, status_failure
from modelfleet._transports.raw import RawStream, read_raw_answer
from modelfleet._transports.reading import TokenStream, read_answer, read_embeddings
from modelfleet.routing import Failure

if TYPE_CHECKING:
    from modelfleet.config import ServerSpec


class AsyncBaseTransport:
    """How the client reaches engines; subclasses provide `post` and `get_text`.

    Created and used on one event loop; `close()` releases every connection.
    """

    async def post(self, server: ServerSpec, path: str, body: Mapping[str, Any], *,
                   api_key: str | None, stall_s: float, timeout_s: float,
                   whole_s: float | None = None) -> Sent:
        """POST `body` as JSON and wait for a 2xx's headers; raise `EngineFailure` (the
        server's trouble) or `RequestRejected` (the request's) for anything else.

        `stall_s` bounds every silence, `timeout_s` the whole request; `whole_s` is set
        when the whole answer is due within it (a timeout then says so).
        """
        raise NotImplementedError

    async def get_text(self, server: ServerSpec, path: str, *, timeout_s: float,
                       api_key: str | None) -> tuple[int, str]:
        """GET a small text: (status, body); `EngineFailure` when no answer came."""
        raise NotImplementedError

    async def close(self) -> None:
        """Release every connection."""

    def forget_session(self) -> None:
        """Its event loop is gone (closed): the next request starts afresh."""

    # -- what the client asks, built on post / get_text ---------------------

    async def open_stream(self, server: ServerSpec, path: str, body: Mapping[str, Any], *,
                          api_key: str | None, stall_s: float, timeout_s: float) -> TokenStream:
        """Start a streamed chat (`/v1/chat/completions`) or completion (`/v1/completions`)."""
        payload = dict(body)
        payload["stream"] = True
        options = dict(payload.get("stream_options") or {})
        options["include_usage"] = True
        payload["stream_options"] = options
        response, sent_at, release = await self.post(server, path, payload, api_key=api_key,
                                                      stall_s=stall_s, timeout_s=timeout_s)
        return TokenStream(response, server.address, sent_at, stall_s, on_end=release)

    async def generate(self, server: ServerSpec, path: str, body: Mapping[str, Any], *,
                       api_key: str | None, stall_s: float, timeout_s: float) -> Generation:
        """A whole chat or completion, streamed underneath so that silence is noticed
        after `stall_s` (for answers of unknown length)."""
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
        answer, and it is the only way a hung server is noticed. Streaming would cost a
        busy engine a serialised chunk per token. The first token is not seen, so the
        result's `ttft_s` is None.
        """
        payload = dict(body)
        payload["stream"] = False
        payload.pop("stream_options", None)
        response, sent_at, release = await self.post(server, path, payload, api_key=api_key,
                                                      stall_s=deadline_s, timeout_s=deadline_s,
                                                      whole_s=deadline_s)
        return await read_answer(response, server.address, sent_at, deadline_s=deadline_s,
                                 on_end=release)

    async def embed(self, server: ServerSpec, body: Mapping[str, Any], *, api_key: str | None,
                    stall_s: float, timeout_s: float, as_numpy: bool = False) -> Embeddings:
        """`/v1/embeddings`, asking for base64 (a quarter of the bytes of JSON floats)."""
        payload = dict(body)
        payload.setdefault("encoding_format", "base64")
        response, sent_at, release = await self.post(server, "/v1/embeddings", payload,
                                                      api_key=api_key, stall_s=stall_s,
                                                      timeout_s=timeout_s)
        return await read_embeddings(response, sent_at, stall_s=stall_s, on_end=release,
                                     as_numpy=as_numpy, expected=_input_count(payload))

    async def relay_whole(self, server: ServerSpec, path: str, body: Mapping[str, Any], *,
                          api_key: str | None, deadline_s: float) -> RawAnswer:
        """`body` sent as it is, its whole answer kept as bytes (the gateway passes it on),
        due within `deadline_s`."""
        response, sent_at, release = await self.post(server, path, body, api_key=api_key,
                                                      stall_s=deadline_s, timeout_s=deadline_s,
                                                      whole_s=deadline_s)
        return await read_raw_answer(response, sent_at, deadline_s=deadline_s, on_end=release,
                                     generation=path != "/v1/embeddings")

    async def open_relay_stream(self, server: ServerSpec, path: str, body: Mapping[str, Any], *,
                                api_key: str | None, stall_s: float,
                                timeout_s: float) -> RawStream:
        """`body` (which asks for a stream) sent as it is; its bytes read as they come."""
        response, sent_at, release = await self.post(server, path, body, api_key=api_key,
                                                      stall_s=stall_s, timeout_s=timeout_s)
        return RawStream(response, server.address, sent_at, stall_s, on_end=release)

    async def health(self, server: ServerSpec, *, timeout_s: float = 5.0,
                     api_key: str | None = None) -> bool:
        """True when /health answers 2xx; False for any other answer or no answer."""
        try:
            status, _ = await self.get_text(server, "/health", timeout_s=timeout_s,
                                            api_key=api_key)
        except EngineFailure:
            return False
        return 200 <= status < 300

    async def queue(self, server: ServerSpec, *, timeout_s: float = 5.0,
                    api_key: str | None = None) -> QueueSample | None:
        """The server's running/waiting gauges; None when /metrics is missing or has neither."""
        status, text = await self.get_text(server, "/metrics", timeout_s=timeout_s,
                                           api_key=api_key)
        if not 200 <= status < 300:
            return None
        return parse_queue(text)

    async def models(self, server: ServerSpec, *, timeout_s: float = 5.0,
                     api_key: str | None = None) -> list[str]:
        """The model ids the server says it serves (to explain a 404 from it)."""
        status, text = await self.get_text(server, "/v1/models", timeout_s=timeout_s,
                                           api_key=api_key)
        if not 200 <= status < 300:
            raise status_failure(status, text, server.address)
        try:
            return parse_models(json.loads(text))
        except Exception as exc:  # not JSON, or not the shape of a model list
            raise EngineFailure(Failure.SERVER_ERROR, f"malformed /v1/models: {exc}") from None


def _input_count(body: Mapping[str, Any]) -> int | None:
    """How many vectors an embeddings request asks for (one per string or token list)."""
    inputs = body.get("input")
    if isinstance(inputs, str):
        return 1
    if isinstance(inputs, list):
        return 1 if inputs and isinstance(inputs[0], int) else len(inputs)
    return None

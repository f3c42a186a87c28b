"""The gateway's routes: the fleet as one OpenAI-compatible endpoint (aiohttp.web).

A thin shell over the client core: each generation or embeddings request is checked
just enough to route it (JSON, a `model`, the field the route needs), then handed to
`AsyncModelServer.relay()`, which routes it (peak-EWMA, prefix awareness, retries and
failover before the first byte) and gives back the engine's answer as bytes. Those bytes
go to the client as they are: a whole body, or a stream chunk by chunk as it arrives.
Every other body parameter reaches the engine untouched. A stream whose server breaks
after its first event is continued on another server, its client seeing one stream
(`client/relay_continuation.py`); when none can, it ends with an error event.

A client that leaves cancels its handler (the runner is made with handler cancellation),
which closes the engine connection at once: the engine aborts the request.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Awaitable, Callable
from typing import Any

import orjson
from aiohttp import web
from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, generate_latest

from modelfleet.client.core import AsyncModelServer
from modelfleet.client.relay import RelayAnswer, RelayStream
from modelfleet.config import FleetConfig, GatewaySpec
from modelfleet.errors import FleetError
from modelfleet.gateway.access import CLIENT_GONE, Access
from modelfleet.gateway.auth import KeyCheck
from modelfleet.gateway.errors import (
    bad_request,
    error_response,
    for_exception,
    stream_error_event,
    too_large,
    too_many,
    unauthorized,
)
from modelfleet.gateway.limits import BodyTooLarge, Gate, read_body
from modelfleet.gateway.metrics import GatewaySeries

log = logging.getLogger("modelfleet.gateway")

# What each relayed route needs in its body besides `model`, and how to say so.
RELAY_FIELDS = {
    "/v1/chat/completions": ("messages", "a non-empty list of messages, e.g. "
                                         '[{"role": "user", "content": "Hello"}]'),
    "/v1/completions": ("prompt", "a string (or a list of strings or token ids)"),
    "/v1/embeddings": ("input", "a string or a non-empty list of strings (or token ids)"),
}
PROBE_PATHS = frozenset({"/health", "/metrics"})  # open unless gateway.auth_health_metrics
LIVE_PATH = "/livez"  # the process answers: always open (the launcher's readiness check)

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]


class Gateway:
    """One worker's routes over one client core (`fleet`)."""

    def __init__(self, fleet: AsyncModelServer, config: FleetConfig, spec: GatewaySpec,
                 keys: KeyCheck, registry: CollectorRegistry) -> None:
        self.fleet = fleet
        self.config = config
        self.spec = spec
        self.keys = keys
        self.registry = registry
        self.series = GatewaySeries(registry)
        self.gate = Gate(spec.max_concurrent)
        self.series.in_flight.set_function(self.gate.count)  # read at a scrape, not per request
        self.retry_after_s = config.routing.probe_interval_s
        self.access_log = spec.access_log
        self._models_body = _models_list(config)

    def app(self) -> web.Application:
        app = web.Application(client_max_size=self.spec.max_body_bytes,
                              middlewares=[self._guard])
        for path in RELAY_FIELDS:
            app.router.add_post(path, self._relay)
        app.router.add_get("/v1/models", self._models)
        app.router.add_get("/health", self._health)
        app.router.add_get("/metrics", self._metrics)
        app.router.add_get(LIVE_PATH, self._live)
        return app

    # -- around every request: key, errors in OpenAI's shape, the access line ------------

    @web.middleware
    async def _guard(self, request: web.Request, handler: Handler) -> web.StreamResponse:
        access = Access(request.method, request.path)
        request["access"] = access
        status = 500
        try:
            if not self._allowed(request):
                self.series.rejected.labels(reason="unauthorized").inc()
                response: web.StreamResponse = unauthorized()
            else:
                try:
                    response = await handler(request)
                except web.HTTPException as exc:  # no such route, wrong method
                    response = error_response(exc.status, _http_message(request, exc),
                                              exc.reason.lower().replace(" ", "_"))
            status = response.status
            return response
        except asyncio.CancelledError:
            status = CLIENT_GONE
            raise
        except Exception:  # a bug: the client still gets an answer in OpenAI's shape
            log.exception("%s %s failed", request.method, request.path)
            return error_response(500, "the gateway failed on this request (see its log)",
                                  "internal_error")
        finally:
            if self.access_log and request.path != LIVE_PATH:
                access.done(access.status or status)

    def _allowed(self, request: web.Request) -> bool:
        if not self.keys.required or request.path == LIVE_PATH:
            return True
        if request.path in PROBE_PATHS and not self.spec.auth_health_metrics:
            return True
        return self.keys.allows(request.headers.get("Authorization"))

    # -- the relayed routes -------------------------------------------------------------

    async def _relay(self, request: web.Request) -> web.StreamResponse:
        if not self.gate.enter():
            self.series.rejected.labels(reason="too_many").inc()
            return too_many(self.gate.limit)
        try:
            return await self._relay_body(request, request["access"])
        finally:
            self.gate.leave()

    async def _relay_body(self, request: web.Request, access: Access) -> web.StreamResponse:
        try:
            raw = await read_body(request, self.spec.max_body_bytes)
        except BodyTooLarge:
            self.series.rejected.labels(reason="too_large").inc()
            return too_large(self.spec.max_body_bytes)
        path = request.path
        body = _checked_body(path, raw, self.config)
        if isinstance(body, str):
            self.series.rejected.labels(reason="bad_request").inc()
            return bad_request(body)
        access.model = body["model"]
        access.stream = path != "/v1/embeddings" and body.get("stream") is True
        try:
            result = await self.fleet.relay(path, body)
        except FleetError as exc:
            response = for_exception(exc, retry_after_s=self.retry_after_s)
            if response is None:
                raise
            return response
        access.server, access.attempts = result.server, result.attempts
        if isinstance(result, RelayAnswer):
            access.usage(result.usage)
            return web.Response(body=result.body, headers={"Content-Type": result.content_type})
        return await self._stream(request, result, access)

    async def _stream(self, request: web.Request, stream: RelayStream,
                      access: Access) -> web.StreamResponse:
        response = _SSEResponse(headers={"Content-Type": stream.content_type,
                                         "Cache-Control": "no-cache"})
        last = b""  # the engine's last bytes, sent with the end of the answer
        try:
            await response.prepare(request)
            async for chunk in stream:
                if last:  # (a stream continued on another server after all)
                    await response.write(last)
                    last = b""
                if stream.at_end:  # nothing more is coming: no need to send it alone
                    last = chunk
                else:
                    await response.write(chunk)
            access.server, access.attempts = stream.server, stream.attempts
            access.continued = stream.continuations
            if stream.failure is not None:
                access.error = "stream_broken"
                last += stream_error_event(
                    f"the server answering broke off the stream: {stream.failure}")
            access.usage(stream.usage)
            if access.tokens_out is None:
                access.tokens_out = stream.output_tokens
            await response.write_eof(last)
        except ConnectionResetError:  # the client left between two chunks
            access.status = CLIENT_GONE
        finally:
            await stream.aclose()  # closes the engine connection unless the stream ended
        return response

    # -- what the gateway answers itself ----------------------------------------------

    async def _models(self, request: web.Request) -> web.Response:
        return web.Response(body=self._models_body, content_type="application/json")

    async def _health(self, request: web.Request) -> web.Response:
        missing = self.fleet.models_without_server()
        if missing:
            body = {"status": "unavailable", "models_without_server": missing}
            return web.Response(status=503, body=orjson.dumps(body),
                                content_type="application/json")
        body = {"status": "ok", "models": list(self.config.models)}
        return web.Response(body=orjson.dumps(body), content_type="application/json")

    async def _metrics(self, request: web.Request) -> web.Response:
        return web.Response(body=generate_latest(self.registry),
                            headers={"Content-Type": CONTENT_TYPE_LATEST})

    async def _live(self, request: web.Request) -> web.Response:
        return web.Response(text="ok")


class _SSEResponse(web.StreamResponse):
    """A relayed stream: its headers go out with its first chunk, in one packet (aiohttp
    sends a StreamResponse's headers at once otherwise; older versions ignore this)."""

    _send_headers_immediately = False


def _checked_body(path: str, raw: bytes, config: FleetConfig) -> dict[str, Any] | str:
    """The body as a dict, or what is wrong with it (a 400's message)."""
    if not raw.strip():
        return "the request has no body; send a JSON object"
    try:
        body = orjson.loads(raw)
    except orjson.JSONDecodeError as exc:
        return f"the body is not JSON ({exc})"
    if type(body) is not dict:
        return "the body must be a JSON object"
    model = body.get("model")
    if not isinstance(model, str) or not model:
        wanted = ", ".join(config.models)
        return f"the body needs `model` (a string): one of {wanted}"
    name, shape = RELAY_FIELDS[path]
    value = body.get(name)
    if value is None:
        return f"the body needs `{name}`: {shape}"
    if name == "messages":
        if not isinstance(value, list) or not value or \
                not all(isinstance(m, dict) for m in value):
            return f"`messages` must be {shape}"
    elif not isinstance(value, (str, list)) or (name == "input" and value == []):
        return f"`{name}` must be {shape}"
    if "stream" in body and not isinstance(body["stream"], bool) and body["stream"] is not None:
        return "`stream` must be true or false"
    return body


def _models_list(config: FleetConfig) -> bytes:
    """GET /v1/models: each model, then each alias naming its model as `parent`."""
    created = int(time.time())
    data: list[dict[str, Any]] = []
    for name, spec in config.models.items():
        data.append({"id": name, "object": "model", "created": created, "owned_by": "modelfleet",
                     "root": spec.wire_name, "parent": None})
    for name, spec in config.models.items():
        data.extend({"id": alias, "object": "model", "created": created,
                     "owned_by": "modelfleet", "root": spec.wire_name, "parent": name}
                    for alias in spec.aliases)
    return orjson.dumps({"object": "list", "data": data})


def _http_message(request: web.Request, exc: web.HTTPException) -> str:
    if exc.status == 404:
        return (f"no route {request.path}; the gateway serves POST /v1/chat/completions, "
                "/v1/completions, /v1/embeddings and GET /v1/models, /health, /metrics")
    if exc.status == 405:
        return f"{request.method} is not allowed on {request.path}"
    return exc.reason

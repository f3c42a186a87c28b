"""Errors in OpenAI's shape, so every OpenAI client reads them as it reads OpenAI's:
`{"error": {"message", "type", "code"}}` with the matching HTTP status.

One function per kind of answer the gateway gives of its own, and `for_exception`,
the one map from what the client core raises to a status and a message. Messages are
short, say what to change, and never carry a key or a prompt.
"""

from __future__ import annotations

import math

import orjson
from aiohttp import web

from modelfleet.errors import NoServerAvailable, RequestRejected, UnknownModel, UsageError

# The `type` OpenAI's API (and its clients' exception classes) pair with each status.
_TYPES = {400: "invalid_request_error", 401: "authentication_error", 403: "permission_error",
          404: "not_found_error", 409: "conflict_error", 413: "invalid_request_error",
          422: "invalid_request_error", 429: "rate_limit_error"}


def error_type(status: int) -> str:
    if status in _TYPES:
        return _TYPES[status]
    return "server_error" if status >= 500 else "invalid_request_error"


def error_body(message: str, *, status: int, code: str | None) -> bytes:
    return orjson.dumps({"error": {"message": message, "type": error_type(status), "code": code}})


def error_response(status: int, message: str, code: str | None = None, *,
                   retry_after_s: float | None = None) -> web.Response:
    """An OpenAI-shaped error answer (with Retry-After in whole seconds when given)."""
    headers = {"Retry-After": str(max(1, math.ceil(retry_after_s)))} \
        if retry_after_s is not None else None
    return web.Response(status=status, body=error_body(message, status=status, code=code),
                        content_type="application/json", headers=headers)


def bad_request(message: str) -> web.Response:
    return error_response(400, message, "invalid_request")


def unauthorized() -> web.Response:
    response = error_response(401, "a valid API key is needed: send `Authorization: Bearer "
                                   "<key>` with one of the gateway's keys", "invalid_api_key")
    response.headers["WWW-Authenticate"] = "Bearer"
    return response


def too_large(limit: int) -> web.Response:
    return error_response(413, f"the request body is over the gateway's limit of {limit} "
                               "bytes (gateway.max_body_bytes)", "request_too_large")


def too_many(limit: int) -> web.Response:
    return error_response(429, f"the gateway is answering its limit of {limit} requests at "
                               "once (gateway.max_concurrent); retry shortly",
                          "too_many_requests", retry_after_s=1)


def stream_error_event(message: str) -> bytes:
    """An error inside a stream whose headers went out already (as vLLM reports one):
    OpenAI's clients raise it as an APIError."""
    body = orjson.dumps({"error": {"message": message, "type": "server_error",
                                   "code": "stream_broken"}})
    return b"data: " + body + b"\n\n"


def for_exception(exc: Exception, *, retry_after_s: float) -> web.Response | None:
    """The answer for what the client core raised (None: not one it raises on purpose).
    `retry_after_s`: what a 503 tells clients (the fleet's probe interval)."""
    if isinstance(exc, UnknownModel):
        return error_response(404, f"the model {exc.name!r} does not exist here; known models: "
                                   f"{', '.join(exc.known) or '(none)'} (GET /v1/models lists "
                                   "them with their aliases)", "model_not_found")
    if isinstance(exc, RequestRejected):  # the engine's 4xx, with its status and message
        return error_response(exc.status, exc.message, "rejected_by_server")
    if isinstance(exc, NoServerAvailable):
        return error_response(503, str(exc), "no_server_available", retry_after_s=retry_after_s)
    if isinstance(exc, UsageError):
        return bad_request(str(exc))
    return None

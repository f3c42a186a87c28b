"""What engines send, parsed: pure functions over the OpenAI-compatible API's bodies.

No I/O: every transport reads its bytes its own way and hands them here, so a reply
is understood the same way whoever carried it. Tested on captured vLLM bodies.
"""

from __future__ import annotations

import array
import base64
import email.utils
import json
import re
import sys
import time
from collections.abc import Mapping, Sequence
from typing import Any

import orjson

from modelfleet._exceptions import EngineFailure
from modelfleet._transports.models import QueueSample
from modelfleet.errors import RequestRejected
from modelfleet.routing import Failure

# Statuses that say "this server, not this request": retried on another server.
_BACKPRESSURE = frozenset({429, 503})
_MISCONFIGURED = frozenset({401, 403, 404})

_ERROR_TEXT_LIMIT = 500  # characters of a non-JSON error body kept in a message




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
    """Running and waiting requests from Prometheus text; None if the engine reports neither.

    A vLLM /metrics page is about 50 KB, almost all of it other metrics: each engine's
    gauge prefix is looked for with `str.find` (at the start of a line: not in a HELP or
    TYPE comment) and only those lines are read, tens of microseconds instead of the
    milliseconds a parse of every line took.
    """
    totals = {"running": 0.0, "waiting": 0.0}
    seen = False
    for prefix in _QUEUE_PREFIXES:
        start = 0
        while (at := metrics_text.find(prefix, start)) != -1:
            start = at + len(prefix)
            if at and metrics_text[at - 1] != "\n":
                continue  # inside a comment
            sample = _QUEUE_SAMPLE.match(metrics_text, at)
            if sample is None:
                continue  # another metric of the engine
            try:
                value = float(sample.group(2) or "")
            except ValueError:
                value = 0.0
            totals[_QUEUE_GAUGES[sample.group(1)]] += value
            seen = True
    return QueueSample(**totals) if seen else None


# Queue gauges of the engines we know (summed across label sets: engines, models).
_QUEUE_GAUGES = {"vllm:num_requests_running": "running", "sglang:num_running_reqs": "running",
                 "vllm:num_requests_waiting": "waiting", "sglang:num_queue_reqs": "waiting"}
_QUEUE_PREFIXES = ("vllm:num_", "sglang:num_")  # what every gauge name above starts with
# One sample line of a gauge: its name (group 1), labels (quoted values may hold spaces,
# braces and escaped quotes), then the value (group 2; a timestamp may follow) or nothing.
_QUEUE_SAMPLE = re.compile(
    "(" + "|".join(map(re.escape, _QUEUE_GAUGES)) + ")"
    r'(?:\{(?:[^"}\n]|"(?:[^"\\\n]|\\.)*")*\})?(?:[ \t]+([^ \t\r\n]+)|[ \t\r]*(?:\n|$))')


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


def parse_sse(data: bytes | str) -> list[Any]:
    """The events of complete SSE lines: decoded JSON of each `data:` line, `DONE` for
    the terminator; blank separators, comments and other fields are skipped.

    Bytes are parsed as they came (orjson reads UTF-8 itself: no decoding to str first);
    a data line that is not JSON, or not UTF-8, raises ValueError."""
    if isinstance(data, str):
        data = data.encode()
    events: list[Any] = []
    for line in data.split(b"\n"):
        if not line.startswith(b"data:"):
            continue
        payload = line[5:].strip()
        if payload == b"[DONE]":
            events.append(DONE)
        elif payload:
            events.append(decode_json(payload))
    return events


decode_json = orjson.loads  # bytes or str in; its errors are ValueErrors


def chunk_text(chunk: Mapping[str, Any]) -> tuple[str, str | None]:
    """(text delta, finish_reason) of choice 0 in a chat or completions chunk."""
    choices = chunk.get("choices")
    if not choices:
        return "", None
    choice = choices[0]
    message = choice.get("delta") or choice.get("message")  # a stream chunk, or a whole answer
    text = (message.get("content") if message is not None else choice.get("text")) or ""
    return text, choice.get("finish_reason")


def raise_in_band_error(event: Mapping[str, Any], server: str) -> None:
    """Engines report an error that strikes after the headers inside the body."""
    if "error" in event:
        err = event["error"] if isinstance(event["error"], dict) else {}
        code = err.get("code")
        status = code if isinstance(code, int) else 500
        raise classify_status(status, error_message(json.dumps(event)), server)


def parse_answer(payload: Any, server: str) -> tuple[str, dict[str, int], str | None, str]:
    """(text, usage, finish_reason, model) of a whole chat or completions answer."""
    if not isinstance(payload, dict):
        return "", {}, None, ""
    raise_in_band_error(payload, server)
    usage = payload.get("usage") or {}
    text, finish = chunk_text(payload)
    return (text, {k: v for k, v in usage.items() if isinstance(v, int)}, finish,
            payload.get("model") or "")


def parse_models(payload: Mapping[str, Any]) -> list[str]:
    """The model ids a server serves, from `GET /v1/models`."""
    return [str(item["id"]) for item in payload.get("data") or () if "id" in item]



def status_failure(status: int, body: bytes | str, server: str,
                   retry_after: str | None = None) -> EngineFailure | RequestRejected:
    """What a non-2xx answer means, as the exception to raise (its body, its Retry-After)."""
    return classify_status(status, error_message(body), server, retry_after_seconds(retry_after))

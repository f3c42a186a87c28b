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

from modelfleet._exceptions import EngineFailure
from modelfleet._transports.models import CacheSample, QueueSample
from modelfleet.errors import RequestRejected
from modelfleet.routing import Failure

# Statuses that say "this server, not this request": retried on another server.
_BACKPRESSURE = frozenset({429, 503})
_MISCONFIGURED = frozenset({401, 403, 404})

# Queue gauges of the engines we know (summed across label sets: engines, models).
_RUNNING_METRICS = frozenset({"vllm:num_requests_running", "sglang:num_running_reqs"})
_WAITING_METRICS = frozenset({"vllm:num_requests_waiting", "sglang:num_queue_reqs"})
# Prefix / KV cache figures -> CacheSample field (older vLLM names beside the new ones).
_CACHE_METRICS = {
    "vllm:prefix_cache_hits_total": "hits", "vllm:gpu_prefix_cache_hits_total": "hits",
    "vllm:prefix_cache_queries_total": "queries", "vllm:gpu_prefix_cache_queries_total": "queries",
    "vllm:kv_cache_usage_perc": "usage", "vllm:gpu_cache_usage_perc": "usage",
    "sglang:token_usage": "usage", "sglang:max_total_num_tokens": "capacity_tokens",
    "sglang:cache_hit_rate": "hit_rate",
}
_CACHE_CONFIG = "vllm:cache_config_info"
_LABEL = re.compile(r'(\w+)="((?:[^"\\]|\\.)*)"')

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
    """Running and waiting requests from Prometheus text, with what it says of its prefix
    cache (CacheSample); None if the engine reports neither running nor waiting."""
    running = waiting = 0.0
    seen = False
    cache: dict[str, list[float]] = {}
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
        elif name in _CACHE_METRICS:
            cache.setdefault(_CACHE_METRICS[name], []).append(value)
        elif name == _CACHE_CONFIG:
            size = _cache_size(line)
            if size is not None:
                cache.setdefault("capacity_tokens", []).append(size)
    if not seen:
        return None
    return QueueSample(running=running, waiting=waiting, cache=_cache_sample(cache))


def _cache_sample(found: dict[str, list[float]]) -> CacheSample | None:
    """Counters and sizes add up across engines (data-parallel ranks); fractions average."""
    if not found:
        return None
    figures = {field: (sum(values) / len(values) if field in ("usage", "hit_rate") else sum(values))
               for field, values in found.items()}
    return CacheSample(**figures)


def _cache_size(line: str) -> float | None:
    """The KV cache's size in tokens from a `vllm:cache_config_info` line (0 when prefix
    caching is off: nothing stays cached for another request)."""
    labels = dict(_LABEL.findall(line))
    if labels.get("enable_prefix_caching") == "False":
        return 0.0
    try:
        return float(labels["kv_cache_size_tokens"])
    except (KeyError, ValueError):
        pass
    try:
        return float(labels["num_gpu_blocks"]) * float(labels["block_size"])
    except (KeyError, ValueError):
        return None


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

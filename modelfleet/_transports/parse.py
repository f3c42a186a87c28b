"""What engines send, parsed: pure functions over the OpenAI-compatible API's bodies.

No I/O: every transport reads its bytes its own way and hands them here, so a reply
is understood the same way whoever carried it. Tested on captured vLLM bodies.

A body that is not what the API promises (a field missing or of the wrong type, an
error object under a 200) raises `EngineFailure`: a server that answers badly has failed,
as one that answers 5xx has, and the client moves on. The checks are `isinstance` tests on
the values each function reads anyway; nothing is parsed twice.
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
from modelfleet._transports.models import CacheSample, QueueSample
from modelfleet.errors import RequestRejected
from modelfleet.routing import Failure

# Statuses that say "this server, not this request": retried on another server.
_BACKPRESSURE = frozenset({429, 503})
_MISCONFIGURED = frozenset({401, 403, 404})

_ERROR_TEXT_LIMIT = 500  # characters of a non-JSON error body kept in a message

_JSON_KINDS = {str: "a string", int: "a number", float: "a number", bool: "a boolean",
               list: "a list", dict: "an object", type(None): "null"}


def json_kind(value: object) -> str:
    """What a decoded JSON value is, in the words of JSON (for a malformed answer's reason)."""
    return _JSON_KINDS.get(type(value), type(value).__name__)


def malformed(what: str) -> EngineFailure:
    """The failure of a server whose 2xx answer is not what the API promises: a server
    error, counted against its health like a 5xx, and retried on another server."""
    return EngineFailure(Failure.SERVER_ERROR, f"malformed answer: {what}")


def error_message(body: bytes | str) -> str:
    """The human part of an engine's error body (OpenAI, FastAPI and SGLang shapes)."""
    text = body.decode("utf-8", errors="replace") if isinstance(body, bytes) else body
    try:
        payload = json.loads(text)
    except (ValueError, RecursionError):
        payload = None
    if isinstance(payload, dict):
        message = _payload_message(payload)
        if message:
            return message
    text = text.strip()
    return text[:_ERROR_TEXT_LIMIT] if text else "(empty body)"


def _payload_message(payload: Mapping[str, Any]) -> str | None:
    err = payload.get("error")
    if isinstance(err, dict) and err.get("message"):
        return str(err["message"])
    if isinstance(err, str) and err:
        return err
    for key in ("message", "detail"):
        if payload.get(key):
            value = payload[key]
            return value if isinstance(value, str) else json.dumps(value)
    return None


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
    if 300 <= status < 400:  # not followed: the answer (and the API key) stay with this server
        return EngineFailure(Failure.MISCONFIGURED,
                             f"HTTP {status}: a redirect, not followed (a fleet's server must "
                             f"answer itself)", status=status)
    if status >= 500:
        return EngineFailure(Failure.SERVER_ERROR, f"HTTP {status}: {message}", status=status)
    return RequestRejected(status, message, server)


def parse_queue(metrics_text: str) -> QueueSample | None:
    """Running and waiting requests from Prometheus text, with what it says of its prefix
    cache (CacheSample); None if the engine reports neither running nor waiting.

    A vLLM /metrics page is about 50 KB, almost all of it other metrics: each wanted
    metric's name is looked for with `str.find` (at the start of a line: not in a HELP or
    TYPE comment) and only those lines are read, tens of microseconds instead of the
    milliseconds a parse of every line took.
    """
    totals = {"running": 0.0, "waiting": 0.0}
    seen = False
    cache: dict[str, list[float]] = {}
    for name, field in _WANTED.items():
        start = 0
        while (at := metrics_text.find(name, start)) != -1:
            start = at + len(name)
            if at and metrics_text[at - 1] != "\n":
                continue  # inside a comment
            sample = _SAMPLE_TAIL.match(metrics_text, start)
            if sample is None:
                continue  # a longer name that starts with this one
            if field == "config":
                size = _cache_size(sample.group(1) or "")
                if size is not None:
                    cache.setdefault("capacity_tokens", []).append(size)
                continue
            try:
                value = float(sample.group(2) or "")
            except ValueError:
                value = 0.0
            if field in totals:
                totals[field] += value
                seen = True
            else:
                cache.setdefault(field, []).append(value)
    if not seen:
        return None
    return QueueSample(**totals, cache=_cache_sample(cache))


def _cache_sample(found: dict[str, list[float]]) -> CacheSample | None:
    """Counters and sizes add up across engines (data-parallel ranks); fractions average."""
    if not found:
        return None
    figures = {field: (sum(values) / len(values) if field in ("usage", "hit_rate") else sum(values))
               for field, values in found.items()}
    return CacheSample(**figures)


def _cache_size(labels_text: str) -> float | None:
    """The KV cache's size in tokens from a `vllm:cache_config_info` sample's labels (0 when
    prefix caching is off: nothing stays cached for another request)."""
    labels = dict(_LABEL.findall(labels_text))
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


# What parse_queue reads from /metrics, by name -> field. Queue gauges (running, waiting)
# are summed across label sets (engines, models); the prefix / KV cache figures go to a
# CacheSample (older vLLM names beside the new ones); "config" is vLLM's cache_config_info.
_WANTED = {
    "vllm:num_requests_running": "running", "sglang:num_running_reqs": "running",
    "vllm:num_requests_waiting": "waiting", "sglang:num_queue_reqs": "waiting",
    "vllm:prefix_cache_hits_total": "hits", "vllm:gpu_prefix_cache_hits_total": "hits",
    "vllm:prefix_cache_queries_total": "queries", "vllm:gpu_prefix_cache_queries_total": "queries",
    "vllm:kv_cache_usage_perc": "usage", "vllm:gpu_cache_usage_perc": "usage",
    "sglang:token_usage": "usage", "sglang:max_total_num_tokens": "capacity_tokens",
    "sglang:cache_hit_rate": "hit_rate", "vllm:cache_config_info": "config",
}
# What follows a wanted name on its sample line: labels (group 1; quoted values may hold
# spaces, braces and escaped quotes), then the value (group 2; a timestamp may follow) or
# nothing. A name that goes on (`..._total_created`) does not match.
_SAMPLE_TAIL = re.compile(
    r'(?:\{((?:[^"}\n]|"(?:[^"\\\n]|\\.)*")*)\})?(?:[ \t]+([^ \t\r\n]+)|[ \t\r]*(?:\n|$))')
_LABEL = re.compile(r'(\w+)="((?:[^"\\]|\\.)*)"')


def decode_vector(value: str | Sequence[float]) -> list[float]:
    """One embedding from base64 float32 (little-endian, as OpenAI servers send) or a list."""
    if isinstance(value, str):
        floats = array.array("f")
        floats.frombytes(base64.b64decode(value, validate=True))
        if sys.byteorder != "little":
            floats.byteswap()
        return floats.tolist()
    if isinstance(value, list) and all(type(x) is float or type(x) is int for x in value):
        return [float(x) for x in value]
    raise malformed(f"an embedding is {json_kind(value)}, not base64 or a list of numbers")


def _index(item: Any) -> int:
    if not isinstance(item, dict):
        raise malformed(f"an item of `data` is {json_kind(item)}, not an object")
    index = item.get("index", 0)
    if type(index) is not int:
        raise malformed(f"an embedding's `index` is {json_kind(index)}, not a number")
    return index


def parse_embeddings(payload: Any, *, as_numpy: bool = False,
                     expected: int | None = None) -> Any:
    """The vectors of an embeddings response, ordered by their `index`; `EngineFailure`
    unless there are `expected` of them (any number, at least one, when None), all of
    one length.

    With `as_numpy`, a 2-D float32 array decoded straight from base64 (no Python floats).
    """
    if not isinstance(payload, dict):
        raise malformed(f"the body is {json_kind(payload)}, not an object")
    if "error" in payload:
        raise_in_band_error(payload)
    data = payload.get("data")
    if not isinstance(data, list):
        raise malformed("no `data`" if data is None else
                        f"`data` is {json_kind(data)}, not a list")
    if expected is None:
        if not data:
            raise malformed("no embeddings in `data`")
    elif len(data) != expected:
        raise malformed(f"{len(data)} embeddings for {expected} inputs")
    items = sorted(data, key=_index)
    if as_numpy:
        import numpy as np

        try:
            rows = [np.frombuffer(base64.b64decode(e, validate=True), dtype="<f4")
                    if isinstance(e, str) else np.asarray(decode_vector(e), dtype=np.float32)
                    for e in (item.get("embedding") for item in items)]
        except ValueError as exc:  # base64 (binascii.Error), or a length not a float32's
            raise malformed(f"an embedding does not decode: {exc}") from None
        _check_lengths([len(row) for row in rows])
        return np.stack(rows) if rows else np.zeros((0, 0), dtype=np.float32)
    try:
        vectors = [decode_vector(item.get("embedding")) for item in items]
    except ValueError as exc:
        raise malformed(f"an embedding does not decode: {exc}") from None
    _check_lengths([len(vector) for vector in vectors])
    return vectors


def _check_lengths(lengths: list[int]) -> None:
    if lengths and (lengths[0] == 0 or lengths.count(lengths[0]) != len(lengths)):
        raise malformed(f"embeddings of unequal or no length ({sorted(set(lengths))})")


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
    """(text delta, finish_reason) of choice 0 in a chat or completions chunk (or whole
    answer); `EngineFailure` when a field is of the wrong type. No `choices`, or none in
    it, is no text (vLLM's last chunk carries only the usage)."""
    choices = chunk.get("choices")
    if not choices:
        if choices is None or isinstance(choices, list):
            return "", None
        raise malformed(f"`choices` is {json_kind(choices)}, not a list")
    if not isinstance(choices, list):
        raise malformed(f"`choices` is {json_kind(choices)}, not a list")
    choice = choices[0]
    if not isinstance(choice, dict):
        raise malformed(f"a choice is {json_kind(choice)}, not an object")
    message = choice.get("delta") or choice.get("message")  # a stream chunk, or a whole answer
    if message is None:
        text = choice.get("text")
    elif isinstance(message, dict):
        text = message.get("content")
    else:
        raise malformed(f"a choice's message is {json_kind(message)}, not an object")
    if text is None:
        text = ""
    elif not isinstance(text, str):
        raise malformed(f"the text is {json_kind(text)}, not a string")
    finish = choice.get("finish_reason")
    if finish is not None and not isinstance(finish, str):
        raise malformed(f"`finish_reason` is {json_kind(finish)}, not a string")
    return text, finish


def usage_of(value: Any) -> dict[str, int]:
    """The counts of a `usage` object (other fields, such as vLLM's null details, dropped)."""
    if value is None:
        return {}
    if not isinstance(value, dict):
        raise malformed(f"`usage` is {json_kind(value)}, not an object")
    return {k: v for k, v in value.items() if type(v) is int}


def raise_in_band_error(event: Mapping[str, Any]) -> None:
    """Engines report an error that strikes after the headers inside the body.

    Under a 200 it is always the server's failure, whatever code it names: the request
    was accepted, and vLLM reports any exception in a stream with code 400. Back-pressure
    and misconfiguration codes keep their meaning; everything else is a server error.
    """
    if "error" not in event:
        return
    err = event["error"]
    code = err.get("code") if isinstance(err, dict) else None
    if isinstance(code, str) and code.isdigit():
        code = int(code)
    status = code if type(code) is int else 500
    if status in _BACKPRESSURE:
        failure = Failure.BACKPRESSURE
    elif status in _MISCONFIGURED:
        failure = Failure.MISCONFIGURED
    else:
        failure = Failure.SERVER_ERROR
    said = f" {code}" if type(code) is int else ""
    raise EngineFailure(failure, f"an error{said} inside a 200 answer: "
                                 f"{_payload_message(event) or '(no message)'}", status=status)


def parse_answer(payload: Any) -> tuple[str, dict[str, int], str | None, str]:
    """(text, usage, finish_reason, model) of a whole chat or completions answer;
    `EngineFailure` for an error object, or for no answer in it."""
    if not isinstance(payload, dict):
        raise malformed(f"the body is {json_kind(payload)}, not an object")
    raise_in_band_error(payload)
    choices = payload.get("choices")
    if not isinstance(choices, list) or not choices:
        raise malformed("no `choices`" if choices is None else
                        f"`choices` is {'empty' if choices == [] else json_kind(choices)}")
    text, finish = chunk_text(payload)
    if not text and finish is None:
        raise malformed("an answer with neither text nor finish_reason")
    model = payload.get("model")
    return text, usage_of(payload.get("usage")), finish, model if isinstance(model, str) else ""


def parse_models(payload: Mapping[str, Any]) -> list[str]:
    """The model ids a server serves, from `GET /v1/models`."""
    return [str(item["id"]) for item in payload.get("data") or () if "id" in item]



def status_failure(status: int, body: bytes | str, server: str,
                   retry_after: str | None = None) -> EngineFailure | RequestRejected:
    """What a non-2xx answer means, as the exception to raise (its body, its Retry-After)."""
    return classify_status(status, error_message(body), server, retry_after_seconds(retry_after))

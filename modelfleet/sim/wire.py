"""vLLM 0.32's OpenAI wire format, as the sim speaks it: request checks and body shapes.

Client code parses what real vLLM sends, so the sim copies its shapes field
for field (fixtures/vllm-0.32.0-cpu/*.json, *.sse) and its error bodies
(error-*.txt): `{"error": {"message", "type", "param", "code"}}`, with
pydantic-style messages for malformed requests and vLLM's own wording for
bad parameters and over-long prompts.
"""

from __future__ import annotations

import json
import random
import time
from dataclasses import dataclass
from typing import Any

from modelfleet.sim.faults import error_type

FINGERPRINT = "modelfleet-sim-0.1.0"
VLLM_VERSION = "0.32.0"
DEFAULT_MAX_TOKENS = 32

_ids = random.Random()


def dumps(body: object) -> str:
    return json.dumps(body, separators=(",", ":"))


def new_id(prefix: str) -> str:
    return f"{prefix}-{_ids.getrandbits(64):016x}"


class ApiError(Exception):
    """A request the sim refuses, carried to the HTTP layer as vLLM's error body."""

    def __init__(self, status: int, message: str, param: str | None = None,
                 type_: str | None = None) -> None:
        super().__init__(message)
        self.status = status
        self.message = message
        self.param = param
        self.type = type_ or error_type(status)

    def body(self) -> dict[str, Any]:
        return {"error": {"message": self.message, "type": self.type, "param": self.param,
                          "code": self.status}}


def _pydantic_error(kind: str, loc: str, msg: str, input_: object, ctx: dict | None = None) -> ApiError:
    """The 400 vLLM's request validation gives (its exact style: see error-bad-json.txt)."""
    if isinstance(input_, dict):
        shown: object = f"<dict of {len(input_)} items>"
    elif isinstance(input_, list):
        shown = f"<list of {len(input_)} items>"
    else:
        shown = input_
    detail: dict[str, object] = {"type": kind, "loc": loc, "msg": msg, "input": shown}
    if ctx:
        detail["ctx"] = ctx
    return ApiError(400, f"1 validation error:\n  {detail!r}", param=loc, type_="Bad Request")


def parse_json(raw: bytes) -> dict[str, Any]:
    try:
        body = json.loads(raw)
    except ValueError as exc:
        pos = getattr(exc, "pos", 0)
        reason = getattr(exc, "msg", str(exc))
        raise _pydantic_error("json_invalid", f"body.{pos}", "JSON decode error", {},
                              {"error": reason}) from None
    if not isinstance(body, dict):
        raise _pydantic_error("model_attributes_type", "body",
                              "Input should be a valid dictionary or object to extract fields from",
                              body)
    return body


def check_model(body: dict[str, Any], served: str) -> None:
    """404 for a model this server does not serve, in vLLM's words (error-unknown-model.txt)."""
    name = body.get("model")
    if name is None or name == served:
        return
    if not isinstance(name, str):
        raise _pydantic_error("string_type", "body.model", "Input should be a valid string", name)
    raise ApiError(404, f"The model `{name}` does not exist. Valid aliases: {served}.", param="model")


def _int_field(body: dict[str, Any], key: str) -> int | None:
    value = body.get(key)
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int):
        if isinstance(value, float) and value.is_integer():
            return int(value)
        raise _pydantic_error("int_type", f"body.{key}", "Input should be a valid integer", value)
    return value


@dataclass(frozen=True)
class Generation:
    """What a chat or completions request asks for, checked."""

    prompts: tuple[tuple[str, int], ...]  # (text that seeds the reply, prompt tokens) per choice
    max_tokens: int
    stream: bool
    include_usage: bool


def check_generation(body: dict[str, Any], *, chat: bool, max_model_len: int,
                     prompts: list[tuple[str, int]]) -> Generation:
    """Validate sampling and stream options like vLLM, given the already counted prompts."""
    stream = body.get("stream", False)
    if not isinstance(stream, bool) and stream is not None:
        raise _pydantic_error("bool_type", "body.stream", "Input should be a valid boolean", stream)
    stream = bool(stream)
    options = body.get("stream_options")
    if options is not None:
        if not isinstance(options, dict):
            raise _pydantic_error("model_type", "body.stream_options",
                                  "Input should be a valid dictionary", options)
        if not stream:
            raise ApiError(400, "Stream options can only be defined when `stream=True`.",
                           param="stream_options")
    include_usage = bool(options and options.get("include_usage"))
    n = _int_field(body, "n")
    if n is not None and n != 1:
        raise ApiError(400, f"The simulator only generates n=1 choice per request, got n={n}.",
                       param="n")
    max_tokens = _int_field(body, "max_completion_tokens") if chat else None
    if max_tokens is None:
        max_tokens = _int_field(body, "max_tokens")
    if max_tokens is not None and max_tokens < 1:
        raise ApiError(400, f"max_tokens must be at least 1, got {max_tokens}. "
                            f"(parameter=max_tokens, value={max_tokens})", param="max_tokens")
    longest = max(tokens for _, tokens in prompts)
    if longest > max_model_len:
        raise prompt_too_long(longest, max_model_len)
    if max_tokens is None:
        max_tokens = min(DEFAULT_MAX_TOKENS, max_model_len - longest)
        if max_tokens < 1:
            raise prompt_too_long(longest, max_model_len)
    elif longest + max_tokens > max_model_len:
        raise ApiError(
            400,
            f"'max_tokens' or 'max_completion_tokens' is too large: {max_tokens}. This model's "
            f"maximum context length is {max_model_len} tokens and your request has {longest} "
            f"input tokens ({max_tokens} > {max_model_len} - {longest}). "
            f"(parameter=max_tokens, value={max_tokens})",
            param="max_tokens",
        )
    return Generation(tuple(prompts), max_tokens, stream, include_usage)


def prompt_too_long(tokens: int, max_model_len: int) -> ApiError:
    return ApiError(
        400,
        f"This model's maximum context length is {max_model_len} tokens. However, your prompt "
        f"contains at least {tokens} input tokens, which exceeds this limit even without any "
        f"output tokens. Please reduce the length of the input prompt. "
        f"(parameter=input_tokens, value={tokens})",
        param="input_tokens",
    )


def check_messages(body: dict[str, Any]) -> list[dict[str, Any]]:
    if "messages" not in body:
        raise _pydantic_error("missing", "body.messages", "Field required", body)
    messages = body["messages"]
    if not isinstance(messages, list):
        raise _pydantic_error("list_type", "body.messages", "Input should be a valid list", messages)
    for i, message in enumerate(messages):
        if not isinstance(message, dict):
            raise _pydantic_error("model_type", f"body.messages.{i}",
                                  "Input should be a valid dictionary", message)
        if "role" not in message:
            raise _pydantic_error("missing", f"body.messages.{i}.role", "Field required", message)
    return messages


def check_continuation(body: dict[str, Any], messages: list[dict[str, Any]]) -> bool:
    """Whether the chat continues its final (assistant) message, checked as vLLM 0.32 does.

    `continue_final_message: true` needs `add_generation_prompt: false`: both true is
    refused by vLLM's request validation, and left out (it defaults to true) by the
    chat template (transformers' wording). A last message that is not the assistant's
    is refused in the words of vLLM's Mistral tokenizer check (HF templates would
    continue whatever the last message is; a continuation of a user turn is never what
    a client means).
    """
    flag = body.get("continue_final_message", False)
    if not isinstance(flag, bool):
        raise _pydantic_error("bool_type", "body.continue_final_message",
                              "Input should be a valid boolean", flag)
    primer = body.get("add_generation_prompt", True)
    if not isinstance(primer, bool):
        raise _pydantic_error("bool_type", "body.add_generation_prompt",
                              "Input should be a valid boolean", primer)
    if not flag:
        return False
    if body.get("add_generation_prompt"):
        raise ApiError(400, "Cannot set both `continue_final_message` and "
                            "`add_generation_prompt` to True.")
    if primer:
        raise ApiError(400, "continue_final_message and add_generation_prompt are not "
                            "compatible. Use continue_final_message when you want the model to "
                            "continue the final message, and add_generation_prompt when you "
                            "want to add a header that will prompt it to start a new assistant "
                            "message instead.")
    if not messages or messages[-1].get("role") != "assistant":
        raise ApiError(400, "Cannot set `continue_final_message` to True when the last "
                            "message is not from the assistant.")
    return True


def check_inputs(body: dict[str, Any], key: str) -> list[str | list[int]]:
    """A completions `prompt` or embeddings `input`: text, texts, token ids, or lists of ids."""
    if key not in body:
        raise _pydantic_error("missing", f"body.{key}", "Field required", body)
    value = body[key]
    if isinstance(value, str):
        return [value]
    if isinstance(value, list) and value:
        if all(isinstance(v, int) and not isinstance(v, bool) for v in value):
            return [value]
        if all(isinstance(v, str) for v in value):
            return list(value)
        if all(isinstance(v, list) and v and all(isinstance(t, int) for t in v) for v in value):
            return list(value)
    if isinstance(value, list) and not value:
        raise ApiError(400, f"`{key}` must not be empty.", param=key)
    raise _pydantic_error("union_type", f"body.{key}",
                          "Input should be a string, a list of strings, a list of token ids "
                          "or a list of lists of token ids", value)


# ---- response bodies -------------------------------------------------------------------------


def usage(prompt_tokens: int, completion_tokens: int) -> dict[str, Any]:
    return {"prompt_tokens": prompt_tokens, "total_tokens": prompt_tokens + completion_tokens,
            "completion_tokens": completion_tokens, "prompt_tokens_details": None,
            "completion_tokens_details": None}


def chat_body(rid: str, model: str, text: str, finish: str, prompt_tokens: int,
              completion_tokens: int) -> dict[str, Any]:
    return {
        "id": rid, "object": "chat.completion", "created": int(time.time()), "model": model,
        "choices": [{
            "index": 0,
            "message": {"role": "assistant", "content": text, "refusal": None,
                        "annotations": None, "audio": None, "function_call": None,
                        "reasoning": None},
            "logprobs": None, "finish_reason": finish, "stop_reason": None, "token_ids": None,
            "routed_experts": None,
        }],
        "service_tier": None, "system_fingerprint": FINGERPRINT,
        "usage": usage(prompt_tokens, completion_tokens),
        "prompt_logprobs": None, "prompt_token_ids": None, "prompt_text": None,
        "kv_transfer_params": None, "ec_transfer_params": None, "metrics": None,
    }


def chat_chunk(rid: str, created: int, model: str, delta: dict[str, Any],
               finish: str | None = None, first: bool = False) -> str:
    choice: dict[str, Any] = {"index": 0, "delta": delta, "logprobs": None, "finish_reason": finish}
    chunk: dict[str, Any] = {"id": rid, "object": "chat.completion.chunk", "created": created,
                             "model": model, "choices": [choice]}
    if first:
        chunk["prompt_token_ids"] = None
        chunk["prompt_text"] = None
    else:
        if finish is not None:
            choice["stop_reason"] = None
        choice["token_ids"] = None
    return f"data: {dumps(chunk)}\n\n"


def completion_choice(index: int, text: str, finish: str) -> dict[str, Any]:
    return {"index": index, "text": text, "logprobs": None, "finish_reason": finish,
            "stop_reason": None, "token_ids": None, "prompt_logprobs": None,
            "prompt_token_ids": None, "routed_experts": None}


def completion_body(rid: str, model: str, choices: list[dict[str, Any]], prompt_tokens: int,
                    completion_tokens: int) -> dict[str, Any]:
    return {
        "id": rid, "object": "text_completion", "created": int(time.time()), "model": model,
        "choices": choices, "service_tier": None, "system_fingerprint": FINGERPRINT,
        "usage": usage(prompt_tokens, completion_tokens),
        "kv_transfer_params": None, "ec_transfer_params": None, "metrics": None,
    }


def completion_chunk(rid: str, created: int, model: str, index: int, text: str,
                     finish: str | None) -> str:
    choice = {"index": index, "text": text, "logprobs": None, "finish_reason": finish,
              "stop_reason": None, "token_ids": None}
    chunk = {"id": rid, "object": "text_completion", "created": created, "model": model,
             "choices": [choice]}
    return f"data: {dumps(chunk)}\n\n"


def usage_chunk(rid: str, created: int, model: str, obj: str, prompt_tokens: int,
                completion_tokens: int) -> str:
    chunk = {"id": rid, "object": obj, "created": created, "model": model, "choices": [],
             "usage": {"prompt_tokens": prompt_tokens,
                       "total_tokens": prompt_tokens + completion_tokens,
                       "completion_tokens": completion_tokens},
             "system_fingerprint": FINGERPRINT}
    return f"data: {dumps(chunk)}\n\n"


def embeddings_body(model: str, vectors: list[object], prompt_tokens: int) -> dict[str, Any]:
    return {
        "id": new_id("embd"), "object": "list", "created": int(time.time()), "model": model,
        "data": [{"index": i, "object": "embedding", "embedding": v} for i, v in enumerate(vectors)],
        "usage": usage(prompt_tokens, 0),
    }


def models_body(model: str, max_model_len: int, created: int) -> dict[str, Any]:
    return {"object": "list", "data": [{
        "id": model, "object": "model", "created": created, "owned_by": "vllm",
        "root": model, "parent": None, "max_model_len": max_model_len,
        "permission": [{
            "id": new_id("modelperm"), "object": "model_permission", "created": created,
            "allow_create_engine": False, "allow_sampling": True, "allow_logprobs": True,
            "allow_search_indices": False, "allow_view": True, "allow_fine_tuning": False,
            "organization": "*", "group": None, "is_blocking": False,
        }],
    }]}

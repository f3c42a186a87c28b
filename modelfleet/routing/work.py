"""What a request asks of a server, so that latency can be normalised by it.

A 2,000-token answer is not a slow server, and a 30,000-token prompt is not a
hung one: every latency sample is divided by the work it carried before it is
learnt, and every estimate is multiplied back by the work of the request at
hand. Token counts are estimates (about four characters a token) because a
tokenizer per model would cost more than the routing it improves.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

CHARS_PER_TOKEN = 4
MESSAGE_OVERHEAD_TOKENS = 4  # role and separators the chat template adds per message
DEFAULT_OUTPUT_TOKENS = 256  # expected answer length when the caller sets no max_tokens


def estimate_tokens(text: str) -> int:
    """Roughly how many tokens `text` is: cheap enough to run on every request."""
    return (len(text) + CHARS_PER_TOKEN - 1) // CHARS_PER_TOKEN


@dataclass(frozen=True)
class Work:
    """The size of one request: what a server must read and what it must write."""

    kind: str  # "chat" (chat and completions) | "embedding"
    prompt_tokens: int  # estimated input tokens (chat prompt, or all embedding inputs)
    output_tokens: int = 0  # expected output tokens (max_tokens, or a default)
    # Chained hashes of the prompt's blocks (routing/prefix_index.py), for prefix-aware
    # routing; empty when the prompt is shorter than one block or prefix awareness is off.
    blocks: tuple[int, ...] = field(default=(), repr=False)

    @classmethod
    def for_chat(cls, messages: Iterable[Mapping[str, Any]], max_tokens: int | None = None) -> Work:
        prompt = sum(MESSAGE_OVERHEAD_TOKENS + _content_tokens(m.get("content")) for m in messages)
        return cls("chat", prompt, _expected_output(max_tokens))

    @classmethod
    def for_prompt(cls, prompt: str, max_tokens: int | None = None) -> Work:
        return cls("chat", estimate_tokens(prompt), _expected_output(max_tokens))

    @classmethod
    def for_embedding(cls, inputs: str | Sequence[Any]) -> Work:
        return cls("embedding", _input_tokens(inputs))


def _expected_output(max_tokens: int | None) -> int:
    return DEFAULT_OUTPUT_TOKENS if max_tokens is None else max(0, int(max_tokens))


def _content_tokens(content: Any) -> int:
    """A message's content is a string or a list of parts (only text parts are counted)."""
    if isinstance(content, str):
        return estimate_tokens(content)
    if isinstance(content, list):
        return sum(
            _content_tokens(part.get("text")) for part in content if isinstance(part, Mapping)
        )
    return 0


def _input_tokens(inputs: Any) -> int:
    """Embedding input: a string, a list of strings, token ids, or lists of token ids."""
    if isinstance(inputs, str):
        return estimate_tokens(inputs)
    if isinstance(inputs, int):
        return 1
    if isinstance(inputs, Sequence):
        return sum(_input_tokens(item) for item in inputs)
    return 0

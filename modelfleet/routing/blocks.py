"""Prompts as chains of block hashes: the one unit in which prefix caches are compared.

vLLM and SGLang cache the KV of a prompt in fixed-size blocks, each found by a hash that
covers the block and everything before it, so two prompts share cached blocks exactly as
far as they share a prefix. The client cannot see tokens (no tokenizer: about four
characters a token, as everywhere in routing), so it cuts the *rendered* prompt into
blocks of a fixed number of characters and chains their hashes the same way. The
simulated engine uses these very functions, so what the client predicts and what the sim
caches agree by construction; against a real engine the estimate is approximate and the
engine's own hit counters are the check.

The hashes are stable across processes and machines (blake2b, not Python's salted
`hash`): independent clients must agree on a prefix's identity to agree on its server.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from hashlib import blake2b
from typing import Any

from modelfleet.routing.work import CHARS_PER_TOKEN

BLOCK_TOKENS = 16  # estimated tokens a block holds: vLLM's GPU block size
BLOCK_CHARS = BLOCK_TOKENS * CHARS_PER_TOKEN
_ROLE_MARK = "\x1e"  # separators no chat text uses, so "ab"+"c" and "a"+"bc" differ
_CONTENT_MARK = "\x1f"


def render_messages(messages: Iterable[Mapping[str, Any]]) -> str:
    """Chat messages in order, each with its role, as one string (text parts only)."""
    return "".join(f"{_ROLE_MARK}{m.get('role', '')}{_CONTENT_MARK}{_text(m.get('content'))}"
                   for m in messages)


def _text(content: Any) -> str:
    if isinstance(content, str):
        return content
    if isinstance(content, list):
        return "".join(part.get("text") or "" for part in content
                       if isinstance(part, Mapping) and isinstance(part.get("text"), str))
    return ""


def block_hashes(text: str, block_chars: int = BLOCK_CHARS, limit: int | None = None) -> list[int]:
    """The chained hash of each *whole* block of `text` (a partial last block is not cached).

    Block i's hash covers blocks 0..i, so equal hashes mean equal prefixes. `limit` stops
    after that many blocks: the router only needs the head of a very long prompt.
    """
    count = len(text) // block_chars
    if limit is not None:
        count = min(count, limit)
    hashes: list[int] = []
    previous = b""
    data = text.encode("utf-8", "surrogatepass")
    # Cut on characters, hash bytes: slicing the encoded text would split multibyte chars.
    if len(data) == len(text):  # ASCII: byte offsets are character offsets
        chunks: Sequence[bytes] = [data[i * block_chars:(i + 1) * block_chars] for i in range(count)]
    else:
        chunks = [text[i * block_chars:(i + 1) * block_chars].encode("utf-8", "surrogatepass")
                  for i in range(count)]
    for chunk in chunks:
        previous = blake2b(previous + chunk, digest_size=8).digest()
        hashes.append(int.from_bytes(previous, "big"))
    return hashes

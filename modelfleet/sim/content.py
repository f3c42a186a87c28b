"""What the simulated engine says: token counts, filler text and embedding vectors.

Everything here is a pure function of its inputs (and the server's seed for
text), so two sims given the same request agree, and tests can predict usage.

- Tokens: words and single punctuation marks (`\\w+|[^\\w\\s]`). Crude next to a
  real tokenizer, but it is used for every count the sim reports (prompt
  length, usage, the context-length check), so the counts agree with each
  other. A chat prompt also pays `CHAT_TOKENS_PER_MESSAGE` per message and
  `CHAT_TOKENS_REPLY_PRIMER` once, as a chat template would add.
- Text: filler words drawn from a seeded generator: obviously not a model's
  answer, but shaped like one (sentences, punctuation), one token per piece,
  so the number of streamed deltas is the completion token count.
- Embeddings: unit vectors derived from the text alone (SHAKE-256 of the UTF-8
  text), never from the seed, so every sim server returns the same vector for
  the same text, as replicas of one real model would. float32 values, so the
  "float" and "base64" encodings carry the same numbers.
"""

from __future__ import annotations

import base64
import hashlib
import math
import random
import re
import struct
from collections.abc import Iterable, Sequence
from functools import lru_cache

CHAT_TOKENS_PER_MESSAGE = 3
CHAT_TOKENS_REPLY_PRIMER = 3

_TOKEN = re.compile(r"\w+|[^\w\s]")

# Neutral filler: reads like prose, says nothing, cannot be mistaken for a model's answer.
_WORDS = (
    "the a of and to in that it is was for on with as by at from this which or "
    "system value signal record window river stone garden harbor morning "
    "paper market engine bridge field lantern meadow orbit parcel quarter ribbon "
    "summer timber valley winter yellow amber basket candle desert echo fabric "
    "gentle hollow island jacket kettle ladder mirror needle ocean pocket quiet "
    "rapid silver table under velvet wander almost between careful distant early "
    "simple steady slowly often later nearly plain quite rather still"
).split()


def count_tokens(text: str) -> int:
    return len(_TOKEN.findall(text))


def message_text(content: object) -> str:
    """The text of one chat message's `content` (a string or a list of text parts)."""
    if content is None:
        return ""
    if isinstance(content, str):
        return content
    if isinstance(content, list):
        parts = []
        for part in content:
            if isinstance(part, dict) and isinstance(part.get("text"), str):
                parts.append(part["text"])
        return " ".join(parts)
    return str(content)


def chat_prompt(messages: Sequence[dict]) -> tuple[str, int]:
    """The prompt a chat template would build (for seeding) and its token count."""
    texts = [f"{m.get('role', '')}: {message_text(m.get('content'))}" for m in messages]
    tokens = sum(count_tokens(message_text(m.get("content"))) for m in messages)
    tokens += CHAT_TOKENS_PER_MESSAGE * len(messages) + CHAT_TOKENS_REPLY_PRIMER
    return "\n".join(texts), tokens


def prompt_token_count(prompt: str | Sequence[int]) -> int:
    """Tokens of a completions/embeddings input: text, or token ids as vLLM accepts."""
    if isinstance(prompt, str):
        return count_tokens(prompt)
    return len(prompt)


def _rng(seed: int, prompt: str) -> random.Random:
    digest = hashlib.blake2b(prompt.encode("utf-8", "surrogatepass"), digest_size=8,
                             key=str(seed).encode()).digest()
    return random.Random(int.from_bytes(digest, "little"))


def reply_pieces(seed: int, prompt: str, max_tokens: int, leading_space: bool,
                 skip: int = 0) -> tuple[list[str], str]:
    """The reply's tokens (one string per streamed delta) and its finish reason.

    The reply's natural length is drawn from 1..256, so with the usual small
    `max_tokens` it is usually cut at `max_tokens` ("length"), and sometimes
    ends earlier on its own ("stop"), as sampling from a real model does.

    `skip` continues a reply whose first `skip` tokens were already given
    (`continue_final_message`): the pieces after them, at most `max_tokens`, so a
    reply cut after k tokens and continued with max_tokens less k is, joined, the
    reply the same server would have given unbroken. It always has a token to add.
    """
    rng = _rng(seed, prompt)
    natural = max(rng.randint(1, 256), skip + 1)
    max_tokens += skip
    n = min(max_tokens, natural)
    finish = "length" if n == max_tokens else "stop"
    pieces: list[str] = []
    capital = not leading_space  # a completion continues the prompt mid-sentence
    since_stop = 0
    for i in range(n):
        last = i == n - 1
        if since_stop >= 4 and (last and finish == "stop" or rng.random() < 0.12):
            pieces.append("." if last or rng.random() < 0.7 else ",")
            capital = pieces[-1] == "."
            since_stop = 0
            continue
        word = rng.choice(_WORDS)
        if capital:
            word = word.capitalize()
            capital = False
        space = " " if (i > 0 or leading_space) else ""
        pieces.append(space + word)
        since_stop += 1
    return pieces[skip:], finish


@lru_cache(maxsize=4096)
def _unit_vector(text: str, dim: int) -> tuple[bytes, tuple[float, ...]]:
    raw = hashlib.shake_256(b"modelfleet-sim\0" + text.encode("utf-8", "surrogatepass")).digest(4 * dim)
    ints = struct.unpack(f"<{dim}I", raw)
    centred = [i / 2147483648.0 - 1.0 for i in ints]
    norm = math.sqrt(math.fsum(x * x for x in centred)) or 1.0
    packed = struct.pack(f"<{dim}f", *(x / norm for x in centred))
    return packed, struct.unpack(f"<{dim}f", packed)


def embedding(text: str | Sequence[int], dim: int) -> tuple[float, ...]:
    """The unit vector of `text` (token-id inputs are hashed as their decimal ids)."""
    return _unit_vector(_as_text(text), dim)[1]


def embedding_base64(text: str | Sequence[int], dim: int) -> str:
    """The same vector as float32 little-endian bytes in base64, as OpenAI sends it."""
    return base64.b64encode(_unit_vector(_as_text(text), dim)[0]).decode("ascii")


def _as_text(text: str | Iterable[int]) -> str:
    return text if isinstance(text, str) else " ".join(str(t) for t in text)

"""The sim's KV cache: fixed-size blocks held by running requests or kept as cached prefixes.

Modelled on vLLM's block pool, so that prefix-aware routing has something true to aim at:

- The cache holds `capacity_tokens // BLOCK_TOKENS` blocks. A running request holds the
  blocks of its whole sequence (prompt and reply) from admission to its end; a request that
  cannot get them waits (the engine admits in FIFO order), so usage never passes 1.
- With prefix caching on, each *full* block of a prompt carries the chained hash of
  `modelfleet.routing.blocks` (the client's own functions, so both agree by construction).
  A new request reuses the longest run of leading blocks already present: those tokens are
  hits and skip prefill. As in vLLM, at least one prompt token is always computed.
- When a request ends, its blocks stay cached, the full blocks of its reply too (the next
  turn of a conversation starts with it), and join the back of an LRU list: they are
  evicted, oldest first, only when a new request needs room. Within one request the tail
  blocks go first, as vLLM frees them in reverse order.
- Usage (`vllm:kv_cache_usage_perc`) counts the blocks running requests hold, not the
  evictable cached ones: vLLM's definition.

Tokens here are the client's estimate (`routing.work.estimate_tokens`, about four characters
a token), not the sim's word count of `usage`: a block is `BLOCK_CHARS` characters.
"""

from __future__ import annotations

from collections import OrderedDict
from dataclasses import dataclass

from modelfleet.routing.blocks import BLOCK_CHARS, BLOCK_TOKENS, block_hashes
from modelfleet.routing.work import estimate_tokens


@dataclass(frozen=True)
class SequenceShape:
    """What one sequence asks of the cache: its prompt's blocks and its final size."""

    prompt_tokens: int  # estimated tokens of the rendered prompt
    prompt_hashes: tuple[int, ...]  # one per full block of the prompt
    reply_hashes: tuple[int, ...]  # the full blocks of prompt + reply beyond the prompt's
    total_blocks: int  # blocks the whole sequence fills

    @classmethod
    def of(cls, prompt_text: str, reply_text: str = "", *, hashed: bool = True) -> SequenceShape:
        """`prompt_text` as the client renders it (routing.blocks); `reply_text` follows it."""
        whole = prompt_text + reply_text
        prompt_tokens = estimate_tokens(prompt_text)
        total = -(-estimate_tokens(whole) // BLOCK_TOKENS)
        if not hashed:
            return cls(prompt_tokens, (), (), total)
        hashes = block_hashes(whole)
        cut = len(prompt_text) // BLOCK_CHARS
        return cls(prompt_tokens, tuple(hashes[:cut]), tuple(hashes[cut:]), total)

    @classmethod
    def uncached(cls, tokens: int) -> SequenceShape:
        """`tokens` that hold blocks while they run and are never reused (embedding inputs)."""
        return cls(tokens, (), (), -(-tokens // BLOCK_TOKENS))


class Allocation:
    """The blocks one admitted sequence holds: shared hashed ones and its own anonymous ones."""

    __slots__ = ("hashed", "anonymous", "hit_tokens", "shape", "completed")

    def __init__(self, shape: SequenceShape, hashed: list[int], anonymous: int,
                 hit_tokens: int) -> None:
        self.shape = shape
        self.hashed = hashed
        self.anonymous = anonymous
        self.hit_tokens = hit_tokens
        self.completed = False  # set when the reply is whole: its blocks are then worth keeping

    @property
    def uncached_tokens(self) -> int:
        return self.shape.prompt_tokens - self.hit_tokens


class KVCache:
    """Blocks in use (ref-counted when hashed), cached and evictable (LRU), or empty."""

    def __init__(self, capacity_tokens: int, *, prefix_caching: bool = True) -> None:
        self.num_blocks = max(1, capacity_tokens // BLOCK_TOKENS)
        self.prefix_caching = prefix_caching
        self._refs: dict[int, int] = {}  # hash -> running requests holding the block
        self._lru: OrderedDict[int, None] = OrderedDict()  # hashed blocks nobody holds, oldest first
        self._anonymous = 0  # blocks in use that no later request can reuse

    @property
    def size_tokens(self) -> int:
        return self.num_blocks * BLOCK_TOKENS

    @property
    def used_blocks(self) -> int:
        return self._anonymous + len(self._refs) - len(self._lru)

    @property
    def cached_blocks(self) -> int:
        """Blocks kept only as cached prefixes (evictable)."""
        return len(self._lru)

    @property
    def usage(self) -> float:
        return self.used_blocks / self.num_blocks

    def allocate(self, shape: SequenceShape) -> Allocation | None:
        """Take the blocks of `shape` (reusing cached ones), or None if they do not fit now."""
        total = min(shape.total_blocks, self.num_blocks)  # a huge request takes the whole cache
        hashed = list(shape.prompt_hashes[:total]) if self.prefix_caching else []
        anonymous = total - len(hashed)
        present = [h for h in hashed if h in self._refs]
        fresh = len(hashed) - len(present) + anonymous
        leaving_lru = sum(1 for h in present if h in self._lru)
        empty = self.num_blocks - len(self._refs) - self._anonymous
        if fresh + leaving_lru > empty + len(self._lru):
            return None
        hits = 0
        limit = min(len(hashed), (shape.prompt_tokens - 1) // BLOCK_TOKENS)  # compute >= 1 token
        while hits < limit and hashed[hits] in self._refs:
            hits += 1
        for h in present:
            self._refs[h] += 1
            self._lru.pop(h, None)
        for h in hashed:
            if h not in self._refs:
                self._make_room()
                self._refs[h] = 1
        for _ in range(anonymous):
            self._make_room()
            self._anonymous += 1
        return Allocation(shape, hashed, anonymous, hits * BLOCK_TOKENS)

    def _make_room(self) -> None:
        """Free one block for a new owner: an empty one, else the least recently used."""
        if len(self._refs) + self._anonymous >= self.num_blocks:
            oldest, _ = self._lru.popitem(last=False)
            del self._refs[oldest]

    def release(self, allocation: Allocation) -> None:
        """Give the blocks back; cached ones stay findable until evicted.

        A completed sequence (`allocation.completed`) also caches the full blocks of its reply (in the room it
        held for them); an aborted one did not write them.
        """
        blocks = list(allocation.hashed)
        self._anonymous -= allocation.anonymous
        if allocation.completed and self.prefix_caching:
            for h in allocation.shape.reply_hashes[:allocation.anonymous]:
                if h not in self._refs:  # else another request already holds the same block
                    self._refs[h] = 1
                    blocks.append(h)
        for h in reversed(blocks):  # tail blocks first: they are evicted first
            count = self._refs[h] - 1
            self._refs[h] = count
            if count == 0:
                self._lru[h] = None
        allocation.hashed, allocation.anonymous = [], 0

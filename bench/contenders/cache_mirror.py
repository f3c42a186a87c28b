"""The oracle's copy of one sim's KV cache: which prompt blocks that server still holds.

A sim reports only totals about its cache (`/sim/state`: size, blocks in use, hit counters),
not which prefixes it holds. The oracle is the fleet's only client in its runs, so it can
replay its own requests into a copy of the sim's cache: the same blocks and chained hashes
(`modelfleet.sim.kvcache.SequenceShape`), the same capacity (read from `/sim/state`), the
same order of eviction (least recently used first, a sequence's tail blocks before its
head). What it leaves out: blocks pinned by running requests (they only make the sim evict
cached prefixes a little sooner) and the exact moment each block enters (here: when the
request is sent). Close enough to know which server holds a prefix; not a bound.
"""

from __future__ import annotations

from collections import OrderedDict

from modelfleet.routing.blocks import BLOCK_TOKENS, render_messages
from modelfleet.sim.content import chat_prompt, reply_pieces
from modelfleet.sim.kvcache import SequenceShape


def sequence_shape(messages: list[dict[str, str]], max_tokens: int, seed: int) -> SequenceShape:
    """What a sim with `seed` will cache for this chat: its prompt blocks, then its answer's."""
    pieces, _ = reply_pieces(seed, chat_prompt(messages)[0], max_tokens, leading_space=False)
    reply = render_messages([{"role": "assistant", "content": "".join(pieces)}])
    return SequenceShape.of(render_messages(messages), reply)


class CacheMirror:
    """Block hashes one server holds, least recently used first, at most `blocks` of them."""

    def __init__(self, blocks: int) -> None:
        self.capacity = max(1, blocks)
        self._lru: OrderedDict[int, None] = OrderedDict()

    def cached_tokens(self, shape: SequenceShape) -> int:
        """Estimated tokens of the prompt's longest prefix held here (the sim's hit: whole
        blocks, and never the prompt's last token)."""
        limit = min(len(shape.prompt_hashes), (shape.prompt_tokens - 1) // BLOCK_TOKENS)
        hits = 0
        while hits < limit and shape.prompt_hashes[hits] in self._lru:
            hits += 1
        return hits * BLOCK_TOKENS

    def sent(self, shape: SequenceShape) -> None:
        """The server now holds this sequence, its head the most recently used."""
        lru = self._lru
        for h in reversed((*shape.prompt_hashes, *shape.reply_hashes)):
            lru[h] = None
            lru.move_to_end(h)
        while len(lru) > self.capacity:
            lru.popitem(last=False)

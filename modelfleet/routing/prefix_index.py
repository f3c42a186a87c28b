"""Which prompt prefixes each server of a model likely still holds in its KV cache.

The client cannot ask a server what it has cached, but it knows what it sent where:
each prompt is a chain of block hashes (blocks.py, here in coarse blocks of
INDEX_BLOCK_TOKENS estimated tokens, to keep hashing cheap), and a server that
prefilled a prompt holds its blocks until its cache needs the room. So the index
keeps, per (server, block), when that server last got the block, measured on the
server's *eviction clock*: the tokens written into its cache since (our own uncached
sends, plus what the server's own counters say other clients wrote). A block is
likely held while fewer than `retention` tokens were written after it, where

    retention = capacity_tokens x calibration

(LRU over the whole cache: the blocks running requests hold are the most recently
used ones, and a request sharing them hits them, so `kv_cache_usage` does not
shorten retention; subtracting it made the index forget nearly everything on a
busy server, predicting a quarter of the hits the server reported). The server's
hit counter keeps the index honest: when the hits it reports between two scrapes
fall far below what the index predicted, calibration shrinks (down to 0.1); when
they match, it recovers slowly. Counters that go back mean a restart: the index
forgets that server's cache.

Memory is bounded: at most `max_entries` (server, block) pairs, least recently
used dropped first; an entry costs about ENTRY_BYTES (an OrderedDict slot, a 64-bit
int key, an int value), so the default cap is about 12 MB per model, and tracks
4M tokens of prompts (64 tokens an entry): e.g. 8 servers x 512k cached tokens. Blocks of one
prompt are stamped from the last to the first, so a prompt's head, shared by most
requests, is the last to be dropped, and a held prefix is always a prefix: the
longest held one is found by bisection.

Pure logic, no I/O and no clock: the pool calls `record` when a server has taken a
request and `observe_metrics` after each /metrics scrape.
"""

from __future__ import annotations

import functools
import math
from collections import OrderedDict
from collections.abc import Sequence
from hashlib import blake2b
from itertools import count

from modelfleet.routing.blocks import block_hashes
from modelfleet.routing.work import CHARS_PER_TOKEN

INDEX_BLOCK_TOKENS = 64  # coarser than an engine's 16-token blocks: 4x less hashing
INDEX_BLOCK_CHARS = INDEX_BLOCK_TOKENS * CHARS_PER_TOKEN
INDEX_BLOCK_LIMIT = 512  # blocks hashed per prompt: its first 32k estimated tokens
MAX_ENTRIES = 65_536  # (server, block) pairs per model
ENTRY_BYTES = 180  # measured (tests/test_prefix_routing.py): OrderedDict slot, int key, int value
DEFAULT_CAPACITY_TOKENS = 200_000  # a server that does not say how large its cache is
MIN_CALIBRATION = 0.1
JUDGE_TOKENS = 4 * INDEX_BLOCK_TOKENS  # predicted hits needed between scrapes to judge them
SHRINK_BELOW = 0.5  # observed / predicted hits under this: the index is too optimistic
RECOVER_ABOVE = 0.8
_MASK64 = (1 << 64) - 1
_generations = count()


def prompt_blocks(text: str) -> tuple[int, ...]:
    """The index's block hashes of a rendered prompt (empty when under one block)."""
    if len(text) < INDEX_BLOCK_CHARS:
        return ()
    return tuple(block_hashes(text, INDEX_BLOCK_CHARS, INDEX_BLOCK_LIMIT))


def rendezvous_weight(block: int, address: str) -> int:
    """Highest-random-weight hashing: the same in every process, so clients that never
    talk to each other still agree on which server is a prefix's home."""
    return _mix64(block ^ _address_salt(address))


@functools.lru_cache(maxsize=4096)
def _address_salt(address: str) -> int:
    return int.from_bytes(blake2b(address.encode(), digest_size=8).digest(), "big")


def _mix64(x: int) -> int:
    """splitmix64's finaliser: a fast, well-spread 64-bit mix."""
    x &= _MASK64
    x = ((x ^ (x >> 30)) * 0xBF58476D1CE4E5B9) & _MASK64
    x = ((x ^ (x >> 27)) * 0x94D049BB133111EB) & _MASK64
    return x ^ (x >> 31)


class _ServerCache:
    """What the index knows of one server's cache."""

    __slots__ = ("salt", "clock", "capacity", "calibration", "predicted_hits",
                 "own_inserted", "hits", "queries")

    def __init__(self, address: str, capacity: float) -> None:
        # A fresh salt per life of the server in this index: entries of a removed
        # server that comes back are not mistaken for its new cache.
        self.salt = _mix64(_address_salt(address) + next(_generations))
        self.clock = 0  # tokens written into its cache so far
        self.capacity = capacity
        self.calibration = 1.0
        self.predicted_hits = 0  # since the last scrape
        self.own_inserted = 0  # uncached prompt tokens we sent since the last scrape
        self.hits: float | None = None  # the server's counters at the last scrape
        self.queries: float | None = None

    def horizon(self) -> float:
        """Blocks stamped at or before this clock value are likely evicted."""
        return self.clock - self.capacity * self.calibration


class PrefixIndex:
    """Not thread-safe: driven from one event loop (or under one lock), like the Pool."""

    def __init__(self, *, max_entries: int = MAX_ENTRIES, block_tokens: int = INDEX_BLOCK_TOKENS,
                 default_capacity_tokens: float = DEFAULT_CAPACITY_TOKENS) -> None:
        if max_entries < 1 or block_tokens < 1:
            raise ValueError("prefix index: max_entries and block_tokens must be >= 1")
        self.max_entries = max_entries
        self.block_tokens = block_tokens
        self._default_capacity = default_capacity_tokens
        self._entries: OrderedDict[int, int] = OrderedDict()  # block ^ server salt -> clock
        self._servers: dict[str, _ServerCache] = {}

    def __len__(self) -> int:
        return len(self._entries)

    def cached_tokens(self, address: str, blocks: Sequence[int]) -> int:
        """Tokens of the longest prefix of `blocks` that this server likely still holds."""
        server = self._servers.get(address)
        if server is None or not blocks:
            return 0
        return self._held(server, blocks) * self.block_tokens

    def _server(self, address: str) -> _ServerCache:
        server = self._servers.get(address)
        if server is None:
            server = self._servers[address] = _ServerCache(address, self._default_capacity)
        return server

    def record(self, address: str, blocks: Sequence[int], *, prompt_tokens: int,
               output_tokens: int = 0) -> int:
        """The server took a request with this prompt: from now on it holds every block.
        Returns the tokens it likely had cached already (its prefill skipped them)."""
        server = self._server(address)
        held = self._held(server, blocks) if blocks else 0
        cached = held * self.block_tokens
        uncached = max(prompt_tokens - cached, 0)
        server.predicted_hits += cached
        server.own_inserted += uncached
        server.clock += uncached + output_tokens  # an answer's blocks are cached too
        stamp, salt, entries = server.clock, server.salt, self._entries
        for block in reversed(blocks):  # the head last: it is dropped last
            key = block ^ salt
            entries[key] = stamp
            entries.move_to_end(key)
        while len(entries) > self.max_entries:
            entries.popitem(last=False)
        return cached

    def observe_metrics(self, address: str, *, hits: float | None = None,
                        queries: float | None = None, usage: float | None = None,
                        capacity_tokens: float | None = None) -> None:
        """What a /metrics scrape of the server said: prefix-cache hit and query counters
        (tokens), the fraction of its KV cache in use (accepted, not used: see the module
        docstring), its size in tokens (0: no prefix caching). Any may be None."""
        hits, queries, capacity_tokens = (
            v if v is None or math.isfinite(v) else None  # a broken exporter's NaN / Inf
            for v in (hits, queries, capacity_tokens))
        server = self._server(address)
        if capacity_tokens is not None:
            server.capacity = max(float(capacity_tokens), 0.0)
        if hits is None or queries is None:
            return
        if server.hits is not None and server.queries is not None \
                and (hits < server.hits or queries < server.queries):
            # Its counters went back: the server restarted, and its cache is empty.
            server = self._servers[address] = _ServerCache(address, server.capacity)
        elif server.hits is not None and server.queries is not None:
            new_hits = hits - server.hits
            others = (queries - server.queries - new_hits) - server.own_inserted
            if others > 0:  # tokens other clients had it prefill: they age our entries too
                server.clock += int(others)
            self._calibrate(server, new_hits)
        server.hits, server.queries = hits, queries
        server.predicted_hits = server.own_inserted = 0

    def retention_tokens(self, address: str) -> float:
        """How many tokens may be written into the server's cache before a block goes."""
        server = self._servers.get(address)
        if server is None:
            return self._default_capacity
        return server.clock - server.horizon()

    def counters(self, address: str) -> tuple[float, float] | None:
        """The server's prefix-cache (hits, queries) at its last scrape; None before one."""
        server = self._servers.get(address)
        if server is None or server.hits is None or server.queries is None:
            return None
        return server.hits, server.queries

    def calibration(self, address: str) -> float:
        server = self._servers.get(address)
        return 1.0 if server is None else server.calibration

    def forget(self, address: str) -> None:
        """The server left the pool; its entries age out of the LRU."""
        self._servers.pop(address, None)

    def _held(self, server: _ServerCache, blocks: Sequence[int]) -> int:
        """How many leading blocks are held: bisection, since a held block's whole prefix
        is held (it was stamped at the same time or later)."""
        get, salt, horizon = self._entries.get, server.salt, server.horizon()
        stamp = get(blocks[0] ^ salt)
        if stamp is None or stamp <= horizon:
            return 0
        low, high = 1, len(blocks)  # blocks[:low] held; blocks[high:] not known to be
        while low < high:
            mid = (low + high) // 2
            stamp = get(blocks[mid] ^ salt)
            if stamp is not None and stamp > horizon:
                low = mid + 1
            else:
                high = mid
        return low

    @staticmethod
    def _calibrate(server: _ServerCache, new_hits: float) -> None:
        if server.predicted_hits < JUDGE_TOKENS:
            return
        ratio = new_hits / server.predicted_hits
        if ratio < SHRINK_BELOW:
            server.calibration = max(MIN_CALIBRATION, server.calibration * 0.5)
        elif ratio >= RECOVER_ABOVE:
            server.calibration = min(1.0, server.calibration + 0.25 * (1.0 - server.calibration))

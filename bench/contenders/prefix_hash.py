"""Prefix-only routing: the first block of the prompt decides the server, load never does.

The baseline the issue warns about (llm-d's prefix-only scorer, a consistent-hash session
router): every request whose prompt starts alike goes to the same server, so caches are used
well until one prefix is hot, and then that server is saturated while the others idle. The
server is the rendezvous (highest-random-weight) winner for the hash of the rendered prompt's
first block (`modelfleet.routing.blocks`), which is a consistent hash: stable across
processes, and only 1/n of the prefixes move when a server comes or goes. Requests go out over
raw aiohttp, with no retries: these sims do not fail.
"""

from __future__ import annotations

from hashlib import blake2b

from bench.contenders.base import Contender, Reply, Target
from bench.contenders.raw import RawAiohttp
from bench.workload import ChatCall
from modelfleet.routing.blocks import block_hashes, render_messages


def rendezvous(key: int, servers: tuple[str, ...]) -> str:
    """The server with the highest hash of (key, server): every process picks the same one."""
    prefix = key.to_bytes(8, "big")
    return max(servers, key=lambda s: blake2b(prefix + s.encode(), digest_size=8).digest())


class PrefixHash(Contender):
    name = "prefix-hash"
    family = "prefix-hash"

    def __init__(self) -> None:
        self._wire = RawAiohttp(name="prefix-hash-wire")
        self._servers: tuple[str, ...] = ()

    async def open(self, target: Target) -> None:
        self._servers = target.servers
        await self._wire.open(target)

    def pick(self, messages: list[dict[str, str]]) -> str:
        first = block_hashes(render_messages(messages), limit=1)
        return rendezvous(first[0] if first else 0, self._servers)

    async def chat(self, call: ChatCall) -> Reply:
        return await self._wire.chat_to(self.pick(call.messages), call)

    async def chat_stream(self, call: ChatCall) -> Reply:
        return await self._wire.chat_stream_to(self.pick(call.messages), call)

    async def embed(self, texts: list[str], encoding: str | None = None) -> Reply:
        return await self._wire.embed(texts, encoding)

    async def close(self) -> None:
        await self._wire.close()

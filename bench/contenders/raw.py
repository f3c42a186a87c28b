"""Raw aiohttp straight to one server: the least any client can cost, so the overhead floor.

Written the way a careful user would by hand (one pooled session, keep-alive, the JSON parsed
by aiohttp), with no routing, retries or bookkeeping: whatever modelfleet adds on top of this is
its overhead.
"""

from __future__ import annotations

import base64
import json
import time
from collections.abc import Callable

import aiohttp

from bench.contenders.base import Contender, Reply, Target
from bench.workload import ChatCall


class RawAiohttp(Contender):
    family = "raw"
    routes = False

    def __init__(self, name: str = "raw-aiohttp", embed_encoding: str = "float") -> None:
        self.name = name
        self.embed_encoding = embed_encoding
        self._session: aiohttp.ClientSession | None = None
        self._server = ""
        self._model = ""

    async def open(self, target: Target) -> None:
        self._server = target.servers[0]
        self._model = target.model
        self._session = aiohttp.ClientSession(
            connector=aiohttp.TCPConnector(limit=256, ttl_dns_cache=None),
            timeout=aiohttp.ClientTimeout(total=target.tuning.request_timeout_s))

    async def chat(self, call: ChatCall) -> Reply:
        return await self.chat_to(self._server, call)

    async def chat_stream(self, call: ChatCall) -> Reply:
        return await self.chat_stream_to(self._server, call)

    async def chat_to(self, server: str, call: ChatCall) -> Reply:
        assert self._session is not None
        body = {"model": self._model, "messages": call.messages, "max_tokens": call.max_tokens}
        async with self._session.post(f"http://{server}/v1/chat/completions", json=body) as r:
            r.raise_for_status()
            data = await r.json()
        if not data["choices"]:
            raise ValueError("no choices in the reply")
        return Reply(server)

    async def chat_stream_to(self, server: str, call: ChatCall,
                             on_first: Callable[[], None] | None = None) -> Reply:
        """Stream from `server`; `on_first` is called as the first text arrives."""
        assert self._session is not None
        body = {"model": self._model, "messages": call.messages, "max_tokens": call.max_tokens,
                "stream": True}
        start = time.perf_counter()
        ttft = None
        async with self._session.post(f"http://{server}/v1/chat/completions", json=body) as r:
            r.raise_for_status()
            async for line in r.content:
                if not line.startswith(b"data: ") or line.startswith(b"data: [DONE]"):
                    continue
                chunk = json.loads(line[6:])
                if ttft is None and chunk["choices"] and chunk["choices"][0]["delta"].get("content"):
                    ttft = time.perf_counter() - start
                    if on_first is not None:
                        on_first()
        return Reply(server, ttft)

    async def embed(self, texts: list[str], encoding: str | None = None) -> Reply:
        assert self._session is not None
        encoding = encoding or self.embed_encoding
        body = {"model": self._model, "input": texts, "encoding_format": encoding}
        async with self._session.post(f"http://{self._server}/v1/embeddings", json=body) as r:
            r.raise_for_status()
            data = await r.json()
        vectors = [d["embedding"] for d in data["data"]]
        if encoding == "base64":  # decoded as a user would have to, so the comparison is fair
            vectors = [_floats(v) for v in vectors]
        return Reply(self._server, items=len(vectors))

    async def close(self) -> None:
        if self._session is not None:
            await self._session.close()
            self._session = None


def _floats(b64: str) -> list[float]:
    import array

    values = array.array("f")
    values.frombytes(base64.b64decode(b64))
    return values.tolist()

"""The oracle of the tail scenario: the oracle router, and it knows a stall the moment it starts.

No client can know that a request will sit silent for a second before its first token; a
sim with the stall fault says so in a header of the stalled reply (`X-Sim-Stall-S`, sent
before the silence). This contender routes as the oracle does (`oracle.py`: the sims' true
speeds and its own requests in flight) and, on that header, drops the request at once (the
sim counts it, as status 499) and sends it to the next-best server: the least any hedging
can cost (one extra request per stall, none wasted) and the latency it could reach.
Every request is streamed, so the header comes before the answer.
"""

from __future__ import annotations

import json
import time

import aiohttp

from bench.contenders.base import Reply
from bench.contenders.oracle import Oracle
from bench.workload import ChatCall

STALL_HEADER = "X-Sim-Stall-S"


class HedgeOracle(Oracle):
    name = "oracle"

    async def chat(self, call: ChatCall) -> Reply:
        return await self._unstalled(call)

    async def chat_stream(self, call: ChatCall) -> Reply:
        return await self._unstalled(call)

    async def _unstalled(self, call: ChatCall) -> Reply:
        session = self._wire._session
        assert session is not None
        body = {"model": self._wire._model, "messages": call.messages,
                "max_tokens": call.max_tokens, "stream": True}
        avoid: set[str] = set()
        start = time.perf_counter()
        while True:
            server, _, _ = self._pick(call, avoid)
            truth = self._truth[server]
            truth.in_flight += 1
            try:
                async with session.post(f"http://{server}/v1/chat/completions", json=body) as r:
                    r.raise_for_status()
                    if STALL_HEADER in r.headers and len(avoid) + 1 < len(self._truth):
                        avoid.add(server)
                        r.close()  # the engine learns at once; the request goes elsewhere
                        continue
                    ttft = None
                    async for line in r.content:
                        if ttft is None and line.startswith(b"data: {"):
                            choices = json.loads(line[6:])["choices"]
                            if choices and choices[0]["delta"].get("content"):
                                ttft = time.perf_counter() - start
                    return Reply(server, ttft)
            except (aiohttp.ClientError, OSError):
                if len(avoid) + 1 >= len(self._truth):
                    raise
                avoid.add(server)  # the next server is tried
            finally:
                truth.in_flight -= 1

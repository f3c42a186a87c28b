"""The oracle: a router that knows what no real client can, as the limit to aim for.

It reads each sim's true speed and injected faults from `/sim/state` (polled in the background
every few milliseconds) and counts its own requests in flight on each server, which, as the
only client of the fleet in a run, is that server's true batch. For each request it computes
the sim's own timing model (modelfleet.sim.engine) on every server and sends the request where
it will finish soonest. It knows a hung or erroring server at once; the moment a server dies
its state poll fails and it stops using it. It is greedy (best for this request, not for the
ones after it), so clever routers can occasionally beat it in a tail percentile; it is an aim,
not a proof of optimality.

Against sims with a prefix cache (`--kv-cache-tokens`) it also knows what each one holds: it
replays its own requests into a copy of each sim's cache (`cache_mirror`, sized from
`/sim/state`), so its prefill estimate counts only the share of the prompt that server has not
cached, as the sim's own prefill does. Where prefill is shared (`--max-num-batched-tokens`) it
counts the prompt tokens of its requests still prefilling there (it sees each stream's first
token) ahead of this one's, in engine steps of that budget.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import math
import time

import aiohttp

from bench.contenders.base import Contender, Reply, Target
from bench.contenders.cache_mirror import CacheMirror, sequence_shape
from bench.contenders.raw import RawAiohttp
from bench.workload import ChatCall

# The sim's own timing model and token counting, so the oracle computes what the sim will do.
from modelfleet.sim.content import chat_prompt
from modelfleet.sim.engine import DECODE_STEP_S, PREFILL_BASE_S, PREFILL_PER_TOKEN_S
from modelfleet.sim.kvcache import SequenceShape

POLL_S = 0.02


class _Truth:
    """What the oracle knows about one server right now."""

    def __init__(self) -> None:
        self.speed = 1.0
        self.slowdown = 1.0
        self.batch_slowdown = 0.02
        self.max_batch = 64
        self.erroring = False
        self.silent = asyncio.Event()  # set while it is dead or hanging
        self.in_flight = 0
        self.cache: CacheMirror | None = None  # with prefix caching on that sim
        self.seed = 0  # the sim's text seed: its answers, hence what it caches, depend on it
        self.batched_tokens: int | None = None  # shared prefill: prompt tokens per step
        self.prefilling = 0  # prompt tokens of our requests there not yet at their first token

    @property
    def broken(self) -> bool:
        return self.erroring or self.silent.is_set()


class Oracle(Contender):
    name = "oracle"
    family = "oracle"
    needs_fleet = True

    def __init__(self) -> None:
        self._truth: dict[str, _Truth] = {}
        self._wire = RawAiohttp(name="oracle-wire")
        self._poller: asyncio.Task | None = None
        self._session: aiohttp.ClientSession | None = None

    async def open(self, target: Target) -> None:
        self._truth = {s: _Truth() for s in target.servers}
        await self._wire.open(target)
        self._session = aiohttp.ClientSession(
            connector=aiohttp.TCPConnector(limit=0),
            timeout=aiohttp.ClientTimeout(total=1.0))
        await self._poll_once()
        self._poller = asyncio.create_task(self._poll_forever())

    async def _poll_one(self, server: str) -> None:
        assert self._session is not None
        truth = self._truth[server]
        try:
            async with self._session.get(f"http://{server}/sim/state") as r:
                state = await r.json()
        except (aiohttp.ClientError, OSError, asyncio.TimeoutError, ValueError):
            truth.silent.set()
            return
        faults = state.get("faults", state)
        truth.speed = float(state.get("speed", truth.speed))
        truth.slowdown = float(faults.get("slowdown", 1.0))
        truth.batch_slowdown = float(state.get("batch_slowdown", truth.batch_slowdown))
        truth.max_batch = int(state.get("max_batch", truth.max_batch))
        truth.seed = int(state.get("seed", truth.seed))
        truth.batched_tokens = state.get("max_num_batched_tokens")
        if state.get("prefix_caching") and truth.cache is None:
            truth.cache = CacheMirror(int(state.get("kv_cache_blocks", 0)))
        truth.erroring = float(faults.get("error_rate") or 0) > 0
        if faults.get("hang"):
            truth.silent.set()
        else:
            truth.silent.clear()

    async def _poll_once(self) -> None:
        await asyncio.gather(*(self._poll_one(s) for s in self._truth))

    async def _poll_forever(self) -> None:
        while True:
            started = time.perf_counter()
            await self._poll_once()
            await asyncio.sleep(max(0.0, POLL_S - (time.perf_counter() - started)))

    def expected_s(self, server: str, prompt_tokens: int, max_tokens: int) -> float:
        """The sim's own timing model for this request on `server`, at its present batch;
        `prompt_tokens`: the ones its prefill will compute (the uncached ones)."""
        t = self._truth[server]
        if t.broken:
            return math.inf
        running = t.in_flight + 1
        queued = max(0, running - t.max_batch)
        factor = 1.0 + t.batch_slowdown * (min(running, t.max_batch) - 1)
        if t.batched_tokens:  # computed in the steps, after the prompts ahead of it
            ahead = t.prefilling + max(1, prompt_tokens)
            steps = -(-ahead // t.batched_tokens)
            prefill = steps * DECODE_STEP_S * factor + PREFILL_PER_TOKEN_S * ahead
        else:
            prefill = PREFILL_BASE_S + PREFILL_PER_TOKEN_S * prompt_tokens
        decode = max(0, max_tokens - 1) * DECODE_STEP_S * factor
        own = prefill + decode
        wait = own * queued / t.max_batch  # rough: slots free up at about this pace
        return (own + wait) * t.slowdown / t.speed

    def _uncached(self, server: str, prompt_tokens: int, shape: SequenceShape | None) -> int:
        """The prompt tokens `server` would compute: the sim counts its hit in the client's
        token estimate and takes it off its own count as a share (sim.server._uncached)."""
        cache = self._truth[server].cache
        if cache is None or shape is None or shape.prompt_tokens <= 0:
            return prompt_tokens
        hit = cache.cached_tokens(shape)
        return -(-prompt_tokens * (shape.prompt_tokens - hit) // shape.prompt_tokens)

    def _pick(self, call: ChatCall, avoid: set[str]) -> tuple[str, int, SequenceShape | None]:
        """Where this request finishes soonest, the prompt tokens it computes there, and its
        blocks (None where no sim caches prefixes)."""
        prompt_tokens = chat_prompt(call.messages)[1]
        candidates = [s for s in self._truth if s not in avoid] or list(self._truth)
        shape = None
        if any(self._truth[s].cache is not None for s in candidates):
            shape = sequence_shape(call.messages, call.max_tokens, self._truth[candidates[0]].seed)
        computed = {s: self._uncached(s, prompt_tokens, shape) for s in candidates}
        server = min(candidates, key=lambda s: self.expected_s(s, computed[s], call.max_tokens))
        return server, computed[server], shape

    async def _routed(self, call: ChatCall, stream: bool) -> Reply:
        avoid: set[str] = set()
        last: Exception | None = None
        for _ in range(len(self._truth)):
            server, computed, shape = self._pick(call, avoid)
            truth = self._truth[server]
            truth.in_flight += 1
            if truth.cache is not None and shape is not None:
                truth.cache.sent(shape)
            prefilling = [computed]  # until its first token (a whole answer: until its end)

            def first(truth: _Truth = truth, prefilling: list[int] = prefilling) -> None:
                truth.prefilling -= prefilling[0]
                prefilling[0] = 0

            truth.prefilling += computed
            send = (functools.partial(self._wire.chat_stream_to, on_first=first) if stream
                    else self._wire.chat_to)(server, call)
            request = asyncio.ensure_future(send)
            silence = asyncio.ensure_future(truth.silent.wait())
            try:
                await asyncio.wait({request, silence}, return_when=asyncio.FIRST_COMPLETED)
                if request.done():
                    return Reply(server, request.result().ttft_s)
                # It learns at once that a server went silent under this request: go elsewhere.
                last = TimeoutError(f"{server} went silent")
                avoid.add(server)
            except (aiohttp.ClientError, OSError, asyncio.TimeoutError) as exc:
                # It knows the truth but not the future: a server can die under a request.
                last = exc
                avoid.add(server)
            finally:
                truth.in_flight -= 1
                first()
                for task in (request, silence):
                    if not task.done():
                        task.cancel()
                await asyncio.gather(request, silence, return_exceptions=True)
        assert last is not None
        raise last

    async def chat(self, call: ChatCall) -> Reply:
        return await self._routed(call, stream=False)

    async def chat_stream(self, call: ChatCall) -> Reply:
        return await self._routed(call, stream=True)

    async def embed(self, texts: list[str], encoding: str | None = None) -> Reply:
        return await self._wire.embed(texts, encoding)

    async def close(self) -> None:
        if self._poller is not None:
            self._poller.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._poller
        if self._session is not None:
            await self._session.close()
        await self._wire.close()

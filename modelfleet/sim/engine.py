"""When the simulated engine answers: a continuous-batching timing model, no HTTP.

The point is to load a client the way a vLLM server does, so routing can be
tested and benchmarked without a GPU. The model, in simulated seconds (every
time below is divided by `--speed` and multiplied by the fault `slowdown`):

- Admission: at most `max_batch` requests run at once, and together they hold
  at most the KV cache's blocks (`kvcache`: a running request holds the blocks
  of its whole sequence, prompt and reply). The rest wait in a FIFO queue and
  start, in order, once both a slot and their blocks are free (vLLM's
  `num_requests_running` / `num_requests_waiting`). A request holds its slot
  from prefill to its last token.
- Steps: one engine loop runs steps back to back while any request is
  decoding (or, shared, prefilling), each `DECODE_STEP_S x (1 + batch_slowdown x (running - 1))`
  (0.02 s, 2 % slower per extra running request by default), with `running`
  read again at every step, so a request speeds up as others finish:
  continuous batching. A step gives one token to every decoding request.
- Prefill, by default: on its own, beside the steps, `PREFILL_BASE_S +
  PREFILL_PER_TOKEN_S x tokens` (0.02 s + 0.2 ms per prompt token it computes),
  as if prompts cost the GPU nothing that others notice. The first token
  comes at its end; each further token takes one step. So with nothing else
  running a reply of n tokens takes `0.02 s + 0.2 ms x tokens + (n - 1) x
  0.02 s`.
- Prefill, shared (`max_num_batched_tokens` set, vLLM's chunked prefill): the
  prompts are computed in the steps. A step also computes up to
  `max_num_batched_tokens` (less one per decoding request) prompt tokens of
  the prefilling requests, oldest first, and lasts `PREFILL_PER_TOKEN_S` longer
  for each, so a heavy prefill delays every request's next token, as on a GPU.
  A request's first token comes at the end of the step that computes its last
  prompt token. Alone, a prompt that fits one step takes exactly the unshared
  time above (`PREFILL_BASE_S` is one step).
- The tokens a prefill computes are the prompt's (the sim's count, as in
  `usage`) less the share that the KV cache already holds (`kvcache`, prefix
  caching, counted in the client's token estimate): a cache hit is a shorter
  prefill.
- Embeddings: one pass per request outside the steps, `EMBED_BASE_S +
  EMBED_PER_TOKEN_S x input_tokens` (5 ms + 0.05 ms per token of all its
  inputs), times the batch factor taken when it starts.

One ticker task runs all steps (as one engine loop does), so 500 requests in
flight cost one timer, not 500. Steps keep to an absolute schedule: a step
that the event loop ran late is followed at once by every step whose time has
already passed, their decode tokens handed out together, so sub-millisecond
steps at high speed keep their average pace. At `speed >= ZERO_DELAY_SPEED`
nothing sleeps at all: the sim is then the zero-delay server that measures a
client's own overhead (the cache still counts hits).
"""

from __future__ import annotations

import asyncio
from collections import deque
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

from modelfleet.sim.faults import Faults
from modelfleet.sim.kvcache import Allocation, KVCache, SequenceShape

DECODE_STEP_S = 0.02
PREFILL_PER_TOKEN_S = 0.0002
PREFILL_BASE_S = DECODE_STEP_S  # a lone prefill is one step
EMBED_BASE_S = 0.005
EMBED_PER_TOKEN_S = 0.00005
ZERO_DELAY_SPEED = 1e6
_CATCH_UP_STEPS = 10_000  # steps run without yielding before the loop lets others in


class _Decoding:
    """One request's progress through the decode steps."""

    __slots__ = ("total", "produced", "each_token", "waiter")

    def __init__(self, total: int, each_token: bool) -> None:
        self.total = total
        self.produced = 0
        self.each_token = each_token
        self.waiter: asyncio.Future[None] | None = None

    def advance(self, tokens: int) -> bool:
        """Add tokens; wake the request if it wants them now. True when it is done."""
        self.produced = min(self.total, self.produced + tokens)
        done = self.produced >= self.total
        if (done or self.each_token) and self.waiter is not None and not self.waiter.done():
            self.waiter.set_result(None)
        return done


class _Prefill:
    """One request's prompt tokens still to compute, and who waits for the last of them."""

    __slots__ = ("remaining", "done")

    def __init__(self, tokens: int, done: asyncio.Future[None]) -> None:
        self.remaining = tokens
        self.done = done


class _Ticket:
    """A request waiting for a slot and its blocks."""

    __slots__ = ("shape", "granted")

    def __init__(self, shape: SequenceShape, granted: asyncio.Future[Allocation]) -> None:
        self.shape = shape
        self.granted = granted


class Engine:
    """The batch, the queue, the KV cache and the clock of one simulated server."""

    def __init__(self, *, speed: float, batch_slowdown: float, max_batch: int, faults: Faults,
                 kv_cache: KVCache, max_num_batched_tokens: int | None = None) -> None:
        self.speed = speed
        self.batch_slowdown = batch_slowdown
        self.max_batch = max_batch
        self.faults = faults
        self.kv = kv_cache
        # None: each prefill runs on its own beside the steps, as if prompts cost the GPU nothing
        self.max_num_batched_tokens = max_num_batched_tokens
        self.zero_delay = speed >= ZERO_DELAY_SPEED
        self.running = 0
        self._queue: deque[_Ticket] = deque()
        self._prefilling: deque[_Prefill] = deque()
        self._decoding: set[_Decoding] = set()
        self._ticker: asyncio.Task[None] | None = None

    @property
    def waiting(self) -> int:
        return len(self._queue)

    @property
    def kv_cache_usage(self) -> float:
        return self.kv.usage

    def seconds(self, simulated: float) -> float:
        """Wall-clock seconds for a simulated duration, under speed and slowdown."""
        return simulated / self.speed * self.faults.slowdown

    def batch_factor(self) -> float:
        return 1.0 + self.batch_slowdown * max(0, self.running - 1)

    # ---- admission ------------------------------------------------------------------------

    @asynccontextmanager
    async def admit(self, shape: SequenceShape) -> AsyncIterator[Allocation]:
        """Hold a place in the batch and the sequence's KV blocks; wait in FIFO order.

        Set `completed` on the allocation once the reply is whole: then its blocks stay
        cached as a prefix for later requests.
        """
        allocation = None
        if not self._queue and self.running < self.max_batch:
            allocation = self.kv.allocate(shape)
        if allocation is not None:
            self.running += 1
        else:
            ticket = _Ticket(shape, asyncio.get_running_loop().create_future())
            self._queue.append(ticket)
            try:
                allocation = await ticket.granted
            except asyncio.CancelledError:
                granted = ticket.granted
                if granted.done() and not granted.cancelled():
                    self._release(granted.result())  # admitted just as we were cancelled
                else:
                    try:
                        self._queue.remove(ticket)
                    except ValueError:
                        pass
                    self._admit_waiting()  # it may have held up the ones behind it
                raise
        try:
            yield allocation
        finally:
            self._release(allocation)

    @asynccontextmanager
    async def slot(self, kv_tokens: int = 0) -> AsyncIterator[None]:
        """A place in the batch for `kv_tokens` uncached tokens (an embedding pass)."""
        async with self.admit(SequenceShape.uncached(kv_tokens)):
            yield

    def _release(self, allocation: Allocation) -> None:
        self.kv.release(allocation)
        self.running -= 1
        self._admit_waiting()

    def _admit_waiting(self) -> None:
        queue = self._queue
        while queue and self.running < self.max_batch:
            ticket = queue[0]
            if ticket.granted.done():  # its waiter was cancelled
                queue.popleft()
                continue
            allocation = self.kv.allocate(ticket.shape)
            if allocation is None:
                return  # first come, first served: the ones behind it wait too, as in vLLM
            queue.popleft()
            self.running += 1
            ticket.granted.set_result(allocation)

    # ---- time -----------------------------------------------------------------------------

    async def sleep(self, simulated: float) -> None:
        if not self.zero_delay:
            await asyncio.sleep(self.seconds(simulated))

    async def prefill(self, tokens: int) -> None:
        """Compute `tokens` prompt tokens; return with the first token."""
        if self.max_num_batched_tokens is None:
            await self.sleep(PREFILL_BASE_S + PREFILL_PER_TOKEN_S * tokens)
            return
        if self.zero_delay:
            return
        state = _Prefill(max(1, tokens), asyncio.get_running_loop().create_future())
        self._prefilling.append(state)
        self._start_ticker()
        try:
            await state.done
        finally:
            if state.remaining > 0:  # cancelled: leave the steps at once
                try:
                    self._prefilling.remove(state)
                except ValueError:
                    pass

    async def embed_pass(self, input_tokens: int) -> None:
        await self.sleep((EMBED_BASE_S + EMBED_PER_TOKEN_S * input_tokens) * self.batch_factor())

    async def decode(self, count: int, *, each_token: bool) -> AsyncIterator[int]:
        """Yield how many new tokens each wake brought, until `count` are produced.

        With `each_token` false (a non-streamed reply) the request is woken
        only once, at the end: nobody reads its tokens before that. Callers
        close the iterator (contextlib.aclosing) so a cancelled request leaves
        the batch at once.
        """
        if count <= 0:
            return
        if self.zero_delay:
            yield count
            return
        state = _Decoding(count, each_token)
        self._decoding.add(state)
        self._start_ticker()
        seen = 0
        loop = asyncio.get_running_loop()
        try:
            while seen < count:
                if state.produced == seen:
                    state.waiter = loop.create_future()
                    await state.waiter
                new = state.produced - seen
                seen = state.produced
                yield new
        finally:
            self._decoding.discard(state)

    def _start_ticker(self) -> None:
        if self._ticker is None:
            self._ticker = asyncio.get_running_loop().create_task(self._tick())

    def _plan(self) -> tuple[list[tuple[_Prefill, int]], float]:
        """The prompt chunks of the next step and its simulated length."""
        budget = max(1, (self.max_num_batched_tokens or 0) - len(self._decoding))
        chunks: list[tuple[_Prefill, int]] = []
        tokens = 0
        for state in self._prefilling:
            take = min(state.remaining, budget - tokens)
            if take <= 0:
                break
            chunks.append((state, take))
            tokens += take
        return chunks, DECODE_STEP_S * self.batch_factor() + PREFILL_PER_TOKEN_S * tokens

    def _compute(self, chunks: list[tuple[_Prefill, int]]) -> None:
        for state, take in chunks:
            if state.done.done():
                continue  # its request left during the step
            state.remaining -= take
            if state.remaining <= 0:
                self._prefilling.remove(state)
                state.done.set_result(None)

    async def _tick(self) -> None:
        """The engine loop: steps back to back, on an absolute schedule."""
        loop = asyncio.get_running_loop()
        due = loop.time()
        try:
            while self._decoding or self._prefilling:
                chunks, simulated = self._plan()
                due += self.seconds(simulated)
                delay = due - loop.time()
                if delay > 0:
                    await asyncio.sleep(delay)
                self._compute(chunks)
                steps = 1
                # Steps whose time has passed already (a late wake, or sub-millisecond steps).
                pending = max((s.total - s.produced for s in self._decoding), default=0)
                while (steps < _CATCH_UP_STEPS and (self._prefilling or steps < pending)
                       and loop.time() >= due):
                    chunks, simulated = self._plan()
                    due += self.seconds(simulated)
                    self._compute(chunks)
                    steps += 1
                for state in list(self._decoding):
                    if state.advance(steps):
                        self._decoding.discard(state)
                if steps >= _CATCH_UP_STEPS:
                    due = loop.time()  # hopelessly behind: do not try to make it all up
                    await asyncio.sleep(0)
        finally:
            self._ticker = None

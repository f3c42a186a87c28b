"""When the simulated engine answers: a continuous-batching timing model, no HTTP.

The point is to load a client the way a vLLM server does, so routing can be
tested and benchmarked without a GPU. The model, in simulated seconds (every
time below is divided by `--speed` and multiplied by the fault `slowdown`):

- Batch and queue: at most `max_batch` requests run at once; the rest wait in
  a FIFO queue and start as slots free up (vLLM's `num_requests_running` /
  `num_requests_waiting`). A request holds its slot from prefill to its last
  token.
- Chat and completions: the first token comes after the prefill,
  `PREFILL_BASE_S + PREFILL_PER_TOKEN_S x prompt_tokens` (0.02 s + 0.2 ms per
  prompt token). Each further token costs one decode step,
  `DECODE_STEP_S x (1 + batch_slowdown x (running - 1))` (0.02 s, 2 % slower
  per extra running request by default), with `running` read again at every
  step, so a request speeds up as others finish: continuous batching.
  So with nothing else running a reply of n tokens takes
  `prefill + (n - 1) x 0.02 s`.
- Embeddings: one pass per request, `EMBED_BASE_S + EMBED_PER_TOKEN_S x
  input_tokens` (5 ms + 0.05 ms per token of all its inputs), times the same
  batch factor taken when it starts.

One ticker task runs all decode steps (as one engine loop does), so 500
requests in flight cost one timer, not 500. A step that the event loop ran
late yields the tokens of every step that fit in the time that passed, so
sub-millisecond steps at high speed keep their average pace. At
`speed >= ZERO_DELAY_SPEED` nothing sleeps at all: the sim is then the
zero-delay server that measures a client's own overhead.
"""

from __future__ import annotations

import asyncio
from collections import deque
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

from modelfleet.sim.faults import Faults

PREFILL_BASE_S = 0.02
PREFILL_PER_TOKEN_S = 0.0002
DECODE_STEP_S = 0.02
EMBED_BASE_S = 0.005
EMBED_PER_TOKEN_S = 0.00005
ZERO_DELAY_SPEED = 1e6


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


class Engine:
    """The batch, the queue and the clock of one simulated server."""

    def __init__(self, *, speed: float, batch_slowdown: float, max_batch: int,
                 faults: Faults, kv_capacity_tokens: int) -> None:
        self.speed = speed
        self.batch_slowdown = batch_slowdown
        self.max_batch = max_batch
        self.faults = faults
        self.zero_delay = speed >= ZERO_DELAY_SPEED
        self.running = 0
        self.kv_tokens = 0  # prompt + produced tokens held by running requests
        self._kv_capacity = max(1, kv_capacity_tokens)
        self._queue: deque[asyncio.Future[None]] = deque()
        self._decoding: set[_Decoding] = set()
        self._ticker: asyncio.Task[None] | None = None

    @property
    def waiting(self) -> int:
        return len(self._queue)

    @property
    def kv_cache_usage(self) -> float:
        return min(1.0, self.kv_tokens / self._kv_capacity)

    def seconds(self, simulated: float) -> float:
        """Wall-clock seconds for a simulated duration, under speed and slowdown."""
        return simulated / self.speed * self.faults.slowdown

    def batch_factor(self) -> float:
        return 1.0 + self.batch_slowdown * max(0, self.running - 1)

    @asynccontextmanager
    async def slot(self, kv_tokens: int = 0) -> AsyncIterator[None]:
        """Hold a place in the batch; wait in FIFO order while the batch is full."""
        if self.running < self.max_batch and not self._queue:
            self.running += 1
        else:
            ticket = asyncio.get_running_loop().create_future()
            self._queue.append(ticket)
            try:
                await ticket
            except asyncio.CancelledError:
                if ticket.done() and not ticket.cancelled():
                    self._release()  # the slot was handed over as we were cancelled
                else:
                    try:
                        self._queue.remove(ticket)
                    except ValueError:
                        pass
                raise
        self.kv_tokens += kv_tokens
        try:
            yield
        finally:
            self.kv_tokens -= kv_tokens
            self._release()

    def _release(self) -> None:
        while self._queue:
            ticket = self._queue.popleft()
            if not ticket.done():
                ticket.set_result(None)  # the slot passes on; running stays the same
                return
        self.running -= 1

    async def sleep(self, simulated: float) -> None:
        if not self.zero_delay:
            await asyncio.sleep(self.seconds(simulated))

    async def prefill(self, prompt_tokens: int) -> None:
        """Time to the first token, once the request holds a slot."""
        await self.sleep(PREFILL_BASE_S + PREFILL_PER_TOKEN_S * prompt_tokens)

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
            self.kv_tokens += count
            try:
                yield count
            finally:
                self.kv_tokens -= count
            return
        state = _Decoding(count, each_token)
        self._decoding.add(state)
        if self._ticker is None:
            self._ticker = asyncio.get_running_loop().create_task(self._tick())
        seen = 0
        loop = asyncio.get_running_loop()
        try:
            while seen < count:
                if state.produced == seen:
                    state.waiter = loop.create_future()
                    await state.waiter
                new = state.produced - seen
                seen = state.produced
                self.kv_tokens += new
                yield new
        finally:
            self._decoding.discard(state)
            self.kv_tokens -= seen

    async def _tick(self) -> None:
        """The engine loop: each step gives one token to every decoding request."""
        loop = asyncio.get_running_loop()
        last = loop.time()
        credit = 0.0
        try:
            while self._decoding:
                step = self.seconds(DECODE_STEP_S * self.batch_factor())
                await asyncio.sleep(step)
                now = loop.time()
                credit += (now - last) / step
                last = now
                tokens = int(credit)
                if tokens == 0:
                    continue
                credit -= tokens
                for state in list(self._decoding):
                    if state.advance(tokens):
                        self._decoding.discard(state)
        finally:
            self._ticker = None

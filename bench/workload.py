"""The seeded workload every contender gets, and the two ways of sending it.

Same seed, same requests, same order, same arrival times for every contender: differences in
the results come from the routing, not from the dice. Prompt and output lengths are mixed
(log-uniform, so short chats dominate and a few long ones make the tail), as real traffic is.

Closed loop (N callers, each sending its next request when the last returns) measures what a
batch job sees; open loop (arrivals at a set rate whatever happens) keeps load on while a server
is faulty, the way independent users do, so a router that stalls cannot hide it by slowing down
its own arrivals.
"""

from __future__ import annotations

import asyncio
import math
import random
import time
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass

from bench.measure import Sample

WORDS = ("alpha", "bravo", "charlie", "delta", "echo", "foxtrot", "golf", "hotel", "india",
         "juliet", "kilo", "lima", "mike", "november", "oscar", "papa", "quebec", "romeo")


@dataclass(frozen=True)
class ChatCall:
    """One chat request: its prompt, how many tokens to ask for, and (open loop) when to send."""

    index: int
    prompt: str
    max_tokens: int
    at_s: float = 0.0

    @property
    def messages(self) -> list[dict[str, str]]:
        return [{"role": "user", "content": self.prompt}]


def _log_uniform(rng: random.Random, low: int, high: int) -> int:
    return int(round(math.exp(rng.uniform(math.log(low), math.log(high)))))


def chat_calls(n: int, seed: int, *, prompt_words: tuple[int, int] = (8, 400),
               output_tokens: tuple[int, int] = (4, 64), rate_per_s: float | None = None,
               ) -> list[ChatCall]:
    """`n` requests with mixed lengths; with `rate_per_s`, Poisson arrival times at that rate."""
    rng = random.Random(seed)
    calls: list[ChatCall] = []
    at = 0.0
    for i in range(n):
        words = _log_uniform(rng, *prompt_words)
        prompt = f"[{seed}:{i}] " + " ".join(rng.choice(WORDS) for _ in range(words))
        if rate_per_s:
            at += rng.expovariate(rate_per_s)
        calls.append(ChatCall(i, prompt, _log_uniform(rng, *output_tokens), at))
    return calls


def embedding_batches(n_batches: int, batch: int, seed: int) -> list[list[str]]:
    """Batches of short, distinct sentences (embedding sims answer per text, deterministically)."""
    rng = random.Random(seed)
    return [[f"{b}-{i} " + " ".join(rng.choice(WORDS) for _ in range(rng.randint(4, 24)))
             for i in range(batch)] for b in range(n_batches)]


async def closed_loop(send: Callable[[object, float], Awaitable[Sample]], items: Sequence[object],
                      concurrency: int, *, deadline_s: float | None = None, min_done: int = 0,
                      max_s: float | None = None,
                      on_done: Callable[[int], None] | None = None) -> tuple[list[Sample], float]:
    """`concurrency` callers work through `items` in order; returns samples and wall time.

    With `deadline_s` the run is time-boxed (a throughput measurement, where a slow
    contender's backlog must not stretch the run): at the deadline, or later once `min_done`
    requests have finished (but never after `max_s`), the requests still in flight are
    cancelled and left out. `send(item, t0)` must never raise: it returns a failed Sample.
    """
    queue = list(reversed(items))
    samples: list[Sample] = []
    enough = asyncio.Event()
    t0 = time.perf_counter()

    async def caller() -> None:
        while queue:
            item = queue.pop()
            samples.append(await send(item, t0))
            if len(samples) >= min_done:
                enough.set()
            if on_done:
                on_done(len(samples))

    callers = [asyncio.create_task(caller()) for _ in range(concurrency)]
    waiter = asyncio.create_task(enough.wait())
    try:
        done, pending = await asyncio.wait(callers, timeout=deadline_s)
        if pending and deadline_s is not None and len(samples) < min_done:
            left = None if max_s is None else max(0.0, max_s - (time.perf_counter() - t0))
            await asyncio.wait([*pending, waiter], timeout=left,
                               return_when=asyncio.FIRST_COMPLETED)
        for task in callers:
            if task.done() and not task.cancelled():
                task.result()  # a bug in `send` must not pass silently
    finally:
        waiter.cancel()
        for task in callers:
            task.cancel()
        await asyncio.gather(*callers, waiter, return_exceptions=True)
    return samples, time.perf_counter() - t0


def steady_rate(samples: Sequence[Sample], concurrency: int, wall_s: float) -> float:
    """Requests per second once the loop is full: completions after the first `concurrency`,
    over the time from the `concurrency`-th completion to the last (the start-up wave and the
    cancelled tail left out, so neither a slow first answer nor the box's end skews it).

    A contender too slow to finish more than one wave in the box gets answers / wall time, a
    lower bound, rather than no figure.
    """
    ends = sorted(s.start_s + s.latency_s for s in samples if s.ok)
    first = min(concurrency, len(ends)) - 1
    if len(ends) - first < max(2, concurrency // 2) or ends[-1] <= ends[first]:
        return len(ends) / wall_s if wall_s > 0 else math.nan
    return (len(ends) - 1 - first) / (ends[-1] - ends[first])


async def open_loop(send: Callable[[ChatCall, float], Awaitable[Sample]],
                    calls: Sequence[ChatCall], *, drain_s: float,
                    timeline: Sequence[tuple[float, Callable[[], Awaitable[None]]]] = (),
                    on_done: Callable[[int], None] | None = None) -> tuple[list[Sample], float]:
    """Send each call at its `at_s`, whatever came back; run `timeline` events at their times.

    Requests still unanswered `drain_s` after the last arrival are counted as failed
    ("unfinished"): a router that lets requests hang must not make the bench hang.
    """
    samples: list[Sample] = []
    tasks: dict[asyncio.Task, ChatCall] = {}
    t0 = time.perf_counter()

    async def one(call: ChatCall) -> None:
        samples.append(await send(call, t0))
        if on_done:
            on_done(len(samples))

    async def events() -> None:
        for at_s, action in sorted(timeline, key=lambda e: e[0]):
            await asyncio.sleep(max(0.0, t0 + at_s - time.perf_counter()))
            await action()

    event_task = asyncio.create_task(events())
    try:
        for call in calls:
            await asyncio.sleep(max(0.0, t0 + call.at_s - time.perf_counter()))
            tasks[asyncio.create_task(one(call))] = call
        if tasks:
            await asyncio.wait(tasks, timeout=drain_s)
        await asyncio.wait_for(event_task, timeout=max(1.0, drain_s))
    finally:
        unfinished = [t for t in tasks if not t.done()]
        for t in unfinished:
            t.cancel()
        await asyncio.gather(*unfinished, return_exceptions=True)
        if not event_task.done():
            event_task.cancel()
            await asyncio.gather(event_task, return_exceptions=True)
    end = time.perf_counter() - t0
    for t in unfinished:
        at_s = tasks[t].at_s
        samples.append(Sample(start_s=at_s, latency_s=end - at_s, ok=False,
                              error="unfinished: no answer before the run's drain deadline"))
    return samples, time.perf_counter() - t0

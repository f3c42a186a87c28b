"""Helpers of the client tests: fleets of live sims as configs, and load in the four modes.

(Not a conftest: tests/real has a conftest.py of its own, so helpers shared by
name live in a module with a name of its own.)
"""

from __future__ import annotations

import asyncio
import threading
import time
from collections import Counter
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any

from modelfleet.client import AsyncModelServer, ModelServer
from modelfleet.config import FleetConfig, ModelSpec, RoutingSpec, ServerSpec

MESSAGES = [{"role": "user", "content": "Tell me about the sea."}]
MODES = [("async", False), ("async", True), ("sync", False), ("sync", True)]
MODE_IDS = ["async", "async-stream", "sync", "sync-stream"]


def start_sims(start_sim: Callable[..., Any], count: int, **flags: Any) -> list[Any]:
    """`count` sims started at once (the conftest factory waits for each one's /health)."""
    with ThreadPoolExecutor(count) as pool:
        return list(pool.map(lambda _: start_sim(**flags), range(count)))


def server_of(sim: Any) -> ServerSpec:
    return ServerSpec(host=sim.host, port=sim.port)


def fleet(sims: Sequence[Any], *, model: str = "m", kind: str = "chat",
          addresses: Sequence[tuple[str, int]] = (), api_key: str | None = None,
          **routing: Any) -> FleetConfig:
    """One model served by `sims` (plus bare addresses, e.g. ports nobody listens on)."""
    servers = tuple(server_of(s) for s in sims) + tuple(ServerSpec(h, p) for h, p in addresses)
    routing.setdefault("probe_interval_s", 60.0)  # tests that want probes ask for them
    spec = ModelSpec(name=model, servers=servers, kind=kind, backend="sim", api_key=api_key,
                     aliases=("M",) if model == "m" else ())
    return FleetConfig(models={model: spec}, routing=RoutingSpec(**routing))


@dataclass(frozen=True)
class Outcome:
    text: str
    seconds: float
    server: str | None  # None for streams (a stream yields text only)


def poll(condition: Callable[[], Any], timeout: float = 10.0, what: str = "condition") -> Any:
    deadline = time.monotonic() + timeout
    while True:
        value = condition()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"{what} not reached within {timeout}s")
        time.sleep(0.02)


async def async_load(client: AsyncModelServer, n: int, concurrency: int, *, stream: bool = False,
                     max_tokens: int | None = 8, model: str = "m",
                     on_done: Callable[[int], None] | None = None) -> list[Outcome]:
    """n chats, at most `concurrency` at once; any error propagates (the point of the tests)."""
    gate = asyncio.Semaphore(concurrency)
    done = 0
    params = _limit(max_tokens)

    async def one() -> Outcome:
        nonlocal done
        async with gate:
            started = time.perf_counter()
            if stream:
                pieces = [p async for p in client.chat_stream(model, MESSAGES, **params)]
                outcome = Outcome("".join(pieces), time.perf_counter() - started, None)
            else:
                r = await client.chat(model, MESSAGES, **params)
                outcome = Outcome(r.text, time.perf_counter() - started, r.server)
            done += 1
            if on_done is not None:
                on_done(done)
            return outcome

    return list(await asyncio.gather(*(one() for _ in range(n))))


def sync_load(client: ModelServer, n: int, concurrency: int, *, stream: bool = False,
              max_tokens: int | None = 8, model: str = "m",
              on_done: Callable[[int], None] | None = None) -> list[Outcome]:
    """The same from a thread pool over one ModelServer."""
    lock = threading.Lock()
    count = [0]
    params = _limit(max_tokens)

    def one(_: int) -> Outcome:
        started = time.perf_counter()
        if stream:
            text = "".join(client.chat_stream(model, MESSAGES, **params))
            outcome = Outcome(text, time.perf_counter() - started, None)
        else:
            r = client.chat(model, MESSAGES, **params)
            outcome = Outcome(r.text, time.perf_counter() - started, r.server)
        with lock:
            count[0] += 1
            done = count[0]
        if on_done is not None:
            on_done(done)
        return outcome

    with ThreadPoolExecutor(concurrency) as pool:
        return list(pool.map(one, range(n)))


def _limit(max_tokens: int | None) -> dict[str, int]:
    """None: no max_tokens at all (the client then streams a non-stream chat underneath)."""
    return {} if max_tokens is None else {"max_tokens": max_tokens}


def run_mode(config: FleetConfig, mode: str, stream: bool, n: int, concurrency: int,
             **kw: Any) -> list[Outcome]:
    """A fresh client of `mode` ("async" | "sync") runs the load, then is closed."""
    if mode == "sync":
        with ModelServer(config=config) as client:
            return sync_load(client, n, concurrency, stream=stream, **kw)

    async def main() -> list[Outcome]:
        async with AsyncModelServer(config=config) as client:
            return await async_load(client, n, concurrency, stream=stream, **kw)

    return asyncio.run(main())


def shares(outcomes: Sequence[Outcome]) -> Counter[str]:
    return Counter(o.server for o in outcomes if o.server)

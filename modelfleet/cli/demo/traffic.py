"""The demo's traffic and faults, all on one event loop with the live view: chat and
embedding workers through `AsyncModelServer`, one server made slower, another killed."""

from __future__ import annotations

import asyncio
import contextlib
import os
import random
import signal
import time

from modelfleet.cli.demo.fleet import DemoFleet, LaunchedFleet
from modelfleet.cli.demo.record import Done, Record
from modelfleet.cli.demo.view import LiveView
from modelfleet.config import ModelSpec, ServerSpec
from modelfleet.errors import FleetError

SLOWDOWN = 10.0
CHAT_WORKERS = 6
EMBED_WORKERS = 2
VIEW_EVERY_S = 0.5  # live view refresh in a terminal
SENTENCES = (
    "The tide comes in twice a day.", "A fleet of small boats left the harbour.",
    "Latency is a distribution, not a number.", "The lighthouse keeper wrote every night.",
    "Batching engines run many requests together.", "Kettles whistle when the water boils.",
)


async def drive(fleet: DemoFleet, launched: LaunchedFleet, duration_s: float, record: Record,
                view: LiveView) -> None:
    """Send traffic for duration_s, slow one server at 1/3 and kill another at 1/2."""
    from modelfleet.client import AsyncModelServer

    stop = asyncio.Event()
    start = time.monotonic()

    def now() -> float:
        return time.monotonic() - start

    async with AsyncModelServer(config=fleet.config, seed=1) as client:
        models = list(fleet.config.models.values())
        chats = [m for m in models if m.kind == "chat"]
        embeds = [m for m in models if m.kind == "embedding"]
        rng = random.Random(7)

        async def chat_worker(spec: ModelSpec) -> None:
            while not stop.is_set():
                messages = [{"role": "user", "content": rng.choice(SENTENCES)}]
                await timed(spec.name, client.chat(spec.name, messages,
                                                   max_tokens=rng.randint(16, 48)))

        async def embed_worker(spec: ModelSpec) -> None:
            while not stop.is_set():
                inputs = rng.sample(SENTENCES, 4)
                await timed(spec.name, client.embed(spec.name, inputs))

        async def timed(model: str, call: object) -> None:
            started = time.monotonic()
            error = None
            try:
                await call  # type: ignore[misc]
            except FleetError as exc:
                error = str(exc)
            record.done.append(Done(now(), model, time.monotonic() - started, error))

        async def sample_client() -> None:
            status = await client.status()
            counts = {m: {s.address: s.requests for s in st.servers} for m, st in status.items()}
            record.counts.append((now(), counts))
            record.health = {m: {s.address: s.health.value for s in st.servers}
                             for m, st in status.items()}

        workers = [asyncio.create_task(chat_worker(chats[i % len(chats)]))
                   for i in range(CHAT_WORKERS if chats else 0)]
        workers += [asyncio.create_task(embed_worker(embeds[i % len(embeds)]))
                    for i in range(EMBED_WORKERS if embeds else 0)]
        record.phases.append((0.0, "all servers healthy"))
        await sample_client()
        slow_at = duration_s / 3 if fleet.slow else None
        kill_at = duration_s / 2 if fleet.kill else None
        killed_pid: int | None = None
        try:
            while (t := now()) < duration_s:
                if slow_at is not None and t >= slow_at and fleet.slow:
                    slow_at = None
                    await sample_client()
                    await post_fault(fleet.slow, {"slowdown": SLOWDOWN})
                    what = f"{fleet.slow.address} made {SLOWDOWN:g}x slower"
                    record.events.append((now(), f"{what} (POST /sim/fault "
                                                 f"{{\"slowdown\": {SLOWDOWN:g}}})"))
                    record.phases.append((now(), what))
                    record.notes[fleet.slow.address] = f"made {SLOWDOWN:g}x slower"
                if kill_at is not None and t >= kill_at and fleet.kill:
                    kill_at = None
                    await sample_client()
                    killed_pid = launched.pids().get(fleet.kill.address)
                    if killed_pid is not None:
                        with contextlib.suppress(ProcessLookupError):
                            os.kill(killed_pid, signal.SIGKILL)
                        record.events.append((now(), f"{fleet.kill.address} killed (SIGKILL pid "
                                                     f"{killed_pid}); the launcher restarts it"))
                        record.phases.append((now(), f"{fleet.kill.address} killed"))
                        record.notes[fleet.kill.address] = "killed; the launcher restarts it"
                if killed_pid is not None and fleet.kill:
                    pid = launched.pids().get(fleet.kill.address)
                    if pid is not None and pid != killed_pid:
                        record.events.append((now(), f"{fleet.kill.address} is back "
                                                     f"(the launcher restarted it as pid {pid})"))
                        record.phases.append((now(), f"{fleet.kill.address} back"))
                        record.notes[fleet.kill.address] = "restarted by the launcher"
                        killed_pid = None
                await sample_client()
                view.update(record, now(), duration_s)
                await asyncio.sleep(min(VIEW_EVERY_S, max(0.0, duration_s - now())))
        finally:
            stop.set()
            await asyncio.wait(workers, timeout=10)
            for task in workers:
                task.cancel()
            await asyncio.gather(*workers, return_exceptions=True)
        await sample_client()
        view.update(record, now(), duration_s, final=True)


async def post_fault(server: ServerSpec, fault: dict[str, object]) -> None:
    import aiohttp

    timeout = aiohttp.ClientTimeout(total=5)
    async with aiohttp.ClientSession(timeout=timeout) as session:
        async with session.post(f"{server.url}/sim/fault", json=fault) as response:
            if response.status != 200:
                raise FleetError(f"{server.address} refused the fault {fault}: "
                                 f"HTTP {response.status} {await response.text()}")

"""The simulated fleets the bench runs against: `modelfleet sim` subprocesses on free ports.

Every process started here is stopped again: on a normal end, on an exception, on Ctrl-C and
on SIGTERM (the bench turns it into KeyboardInterrupt), and, on Linux, even if the bench itself
is killed (each sim asks the kernel for SIGTERM when its parent dies). Each sim runs in its own
process group so that a Ctrl-C at the terminal reaches the bench alone, which then stops the
sims in order instead of leaving half-torn-down servers behind mid-measurement. The process
itself is `modelfleet.testing.SimProcess`, the one the tests start too.
"""

from __future__ import annotations

import asyncio
import atexit
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import aiohttp

from modelfleet.testing import HOST, SimProcess, free_port, shared_port

_LIVE: set[SimServer] = set()
_STARTED: list[str] = []  # every address a sim was started on, for the report (and its test)


def started_addresses() -> list[str]:
    return list(_STARTED)


@dataclass(frozen=True)
class ServerPlan:
    """How to start one sim: its model, kind and `modelfleet sim` flags (speed, dim, ...).

    The KV cache fields are the sim's (`--kv-cache-tokens`, `--no-prefix-caching`,
    `--max-num-batched-tokens`): unset, a sim has no prefix cache and runs each prefill on
    its own, as every scenario before `prefix` assumes.
    """

    model: str
    kind: str = "chat"
    speed: float = 1.0
    flags: Mapping[str, Any] = field(default_factory=dict)
    kv_cache_tokens: int | None = None  # estimated tokens (about four characters each)
    prefix_caching: bool = True  # with kv_cache_tokens only, as in the sim
    max_num_batched_tokens: int | None = None  # prompt tokens one engine step computes at most

    def sim_flags(self) -> dict[str, Any]:
        """Every `modelfleet sim` flag of this plan, by name (None and False: left out)."""
        return {"speed": self.speed, "kv_cache_tokens": self.kv_cache_tokens,
                "no_prefix_caching": not self.prefix_caching,
                "max_num_batched_tokens": self.max_num_batched_tokens, **self.flags}

    def argv(self, port: int) -> list[str] | None:
        """Another server's command line (the cpu scenario's canned server); None: the sim."""
        return None


class SimServer(SimProcess):
    """One sim of the bench: its plan, and the bookkeeping that stops it even at exit."""

    def __init__(self, plan: ServerPlan, port: int, log_path: Path, host: str = HOST) -> None:
        super().__init__(port, plan.model, plan.kind, host=host,
                         flags=plan.sim_flags(), log_path=log_path)
        self.argv = plan.argv(port) or self.argv
        self.plan = plan

    def spawn(self) -> SimServer:
        """Start the process (on the main thread: the death signal follows the thread)."""
        super().spawn()
        _LIVE.add(self)
        if self.address not in _STARTED:
            _STARTED.append(self.address)
        return self

    async def wait_healthy(self, timeout: float = 60.0) -> None:
        await asyncio.to_thread(self.wait_ready, timeout)

    def kill(self) -> None:
        super().kill()
        _LIVE.discard(self)

    def stop(self) -> None:
        super().stop()
        _LIVE.discard(self)


@atexit.register
def _stop_leftovers() -> None:
    for server in list(_LIVE):
        server.stop()
    _LIVE.clear()


class SimFleet:
    """A group of sims started together and always stopped together (`async with`)."""

    def __init__(self, plans: Sequence[ServerPlan], log_dir: Path,
                 say: Callable[[str], None] | None = None,
                 hosts: Sequence[str] | None = None) -> None:
        """With `hosts` (loopback addresses, one per plan), every sim listens on its own
        address and all on ONE port, as the pods behind a headless Service do."""
        log_dir.mkdir(parents=True, exist_ok=True)
        if hosts is None:
            self.servers = [SimServer(p, free_port(), log_dir / f"sim-{p.model}-{i}.log")
                            for i, p in enumerate(plans)]
        else:
            port = shared_port(hosts)
            self.servers = [SimServer(p, port, log_dir / f"sim-{p.model}-{host}.log", host=host)
                            for p, host in zip(plans, hosts, strict=True)]
        self._say = say
        self._session: aiohttp.ClientSession | None = None

    @property
    def session(self) -> aiohttp.ClientSession:
        if self._session is None:
            self._session = aiohttp.ClientSession(
                connector=aiohttp.TCPConnector(limit=0, force_close=True))
        return self._session

    async def __aenter__(self) -> SimFleet:
        try:
            for server in self.servers:
                server.spawn()
            await asyncio.gather(*(s.wait_healthy() for s in self.servers))
        except BaseException:
            await self.__aexit__(None, None, None)
            raise
        if self._say:
            self._say("sims up: " + ", ".join(
                f"{s.address} ({s.plan.kind}, speed {s.plan.speed:g})" for s in self.servers))
        return self

    async def __aexit__(self, *exc: object) -> None:
        for server in self.servers:
            server.stop()
        if self._say:
            self._say("sims stopped: " + ", ".join(s.address for s in self.servers))
        if self._session is not None:
            await self._session.close()
            self._session = None

    async def restart(self, server: SimServer) -> None:
        """Bring a killed server back on its own port (the next contender gets a whole fleet)."""
        server.stop()
        deadline = time.monotonic() + 10
        while True:  # the old socket may linger for a moment after a SIGKILL
            server.spawn()
            try:
                await server.wait_healthy(timeout=30)
                return
            except RuntimeError:
                if time.monotonic() > deadline:
                    raise
                await asyncio.sleep(0.2)

    async def fault(self, server: SimServer, **fault: Any) -> None:
        async with self.session.post(f"{server.url}/sim/fault", json=fault,
                                     timeout=aiohttp.ClientTimeout(total=5)) as r:
            if r.status != 200:
                raise RuntimeError(f"{server.address} /sim/fault {fault}: HTTP {r.status} "
                                   f"{(await r.text())[:200]}")

    async def state(self, server: SimServer) -> dict[str, Any]:
        async with self.session.get(f"{server.url}/sim/state",
                                    timeout=aiohttp.ClientTimeout(total=5)) as r:
            r.raise_for_status()
            return await r.json()

    async def reset(self) -> None:
        """Between contenders: every server back to healthy, restarted if killed, and idle.

        Waiting for idle matters: a hung request from the last contender must not count
        against the next one.
        """
        for server in self.servers:
            if not server.alive:
                await self.restart(server)
        await asyncio.gather(*(self.fault(s, reset=True) for s in self.servers))
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            states = await asyncio.gather(*(self.state(s) for s in self.servers))
            if all(st.get("running", 0) == 0 and st.get("waiting", 0) == 0 for st in states):
                return
            await asyncio.sleep(0.05)

"""The simulated fleets the bench runs against: `modelfleet sim` subprocesses on free ports.

Every process started here is stopped again: on a normal end, on an exception, on Ctrl-C and
on SIGTERM (the bench turns it into KeyboardInterrupt), and, on Linux, even if the bench itself
is killed (each sim asks the kernel for SIGTERM when its parent dies). Each sim runs in its own
process group so that a Ctrl-C at the terminal reaches the bench alone, which then stops the
sims in order instead of leaving half-torn-down servers behind mid-measurement.
"""

from __future__ import annotations

import asyncio
import atexit
import contextlib
import ctypes
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import aiohttp

HOST = "127.0.0.1"
_LIVE: set[subprocess.Popen] = set()
_STARTED: list[str] = []  # every address a sim was started on, for the report (and its test)


def started_addresses() -> list[str]:
    return list(_STARTED)


def free_port() -> int:
    """A port nobody listens on right now (the OS picks it)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind((HOST, 0))
        return s.getsockname()[1]


@dataclass(frozen=True)
class ServerPlan:
    """How to start one sim: its model, kind and `modelfleet sim` flags (speed, dim, ...)."""

    model: str
    kind: str = "chat"
    speed: float = 1.0
    flags: Mapping[str, Any] = field(default_factory=dict)

    def argv(self, port: int) -> list[str]:
        argv = [sys.executable, "-m", "modelfleet", "sim", "--host", HOST, "--port", str(port),
                "--model", self.model, "--kind", self.kind, "--speed", str(self.speed)]
        for key, value in self.flags.items():
            argv += ["--" + key.replace("_", "-"), str(value)]
        return argv


def _die_with_parent() -> None:
    """In the child before exec: ask Linux to SIGTERM us when the bench goes away."""
    with contextlib.suppress(Exception):
        libc = ctypes.CDLL("libc.so.6", use_errno=True)
        libc.prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG


class SimServer:
    """One running sim: its address, its process, and the control calls the scenarios use."""

    def __init__(self, plan: ServerPlan, port: int, log_path: Path) -> None:
        self.plan = plan
        self.port = port
        self.log_path = log_path
        self.proc: subprocess.Popen | None = None

    @property
    def address(self) -> str:
        return f"{HOST}:{self.port}"

    @property
    def url(self) -> str:
        return f"http://{HOST}:{self.port}"

    def spawn(self) -> None:
        """Start the process (must run on the main thread: the death signal follows the thread)."""
        with self.log_path.open("ab") as log:
            self.proc = subprocess.Popen(
                self.plan.argv(self.port), stdin=subprocess.DEVNULL, stdout=log, stderr=log,
                start_new_session=True,
                preexec_fn=_die_with_parent if sys.platform.startswith("linux") else None,
                env={**os.environ, "PYTHONUNBUFFERED": "1"})
        _LIVE.add(self.proc)
        if self.address not in _STARTED:
            _STARTED.append(self.address)

    async def wait_healthy(self, session: aiohttp.ClientSession, timeout: float = 60.0) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc is None or self.proc.poll() is not None:
                raise RuntimeError(f"sim on port {self.port} exited before it answered /health; "
                                   f"see {self.log_path}")
            with contextlib.suppress(aiohttp.ClientError, OSError, asyncio.TimeoutError):
                async with session.get(f"{self.url}/health",
                                       timeout=aiohttp.ClientTimeout(total=2)) as r:
                    if r.status == 200:
                        return
            await asyncio.sleep(0.05)
        raise TimeoutError(f"sim on port {self.port} did not answer /health within {timeout:.0f}s; "
                           f"see {self.log_path}")

    @property
    def alive(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def kill(self) -> None:
        """SIGKILL the whole group, as a crashed server dies."""
        if self.proc is not None and self.proc.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(self.proc.pid, signal.SIGKILL)
            self.proc.wait(timeout=10)
        _LIVE.discard(self.proc)

    def stop(self) -> None:
        if self.proc is None:
            return
        _stop_process(self.proc)
        _LIVE.discard(self.proc)


def _stop_process(proc: subprocess.Popen) -> None:
    if proc.poll() is not None:
        return
    with contextlib.suppress(ProcessLookupError):
        os.killpg(proc.pid, signal.SIGTERM)
    try:
        proc.wait(timeout=5)
    except subprocess.TimeoutExpired:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGKILL)
        proc.wait(timeout=5)


@atexit.register
def _stop_leftovers() -> None:
    for proc in list(_LIVE):
        _stop_process(proc)
    _LIVE.clear()


class SimFleet:
    """A group of sims started together and always stopped together (`async with`)."""

    def __init__(self, plans: Sequence[ServerPlan], log_dir: Path,
                 say: Callable[[str], None] | None = None) -> None:
        log_dir.mkdir(parents=True, exist_ok=True)
        self.servers = [SimServer(p, free_port(), log_dir / f"sim-{p.model}-{i}.log")
                        for i, p in enumerate(plans)]
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
            await asyncio.gather(*(s.wait_healthy(self.session) for s in self.servers))
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
                await server.wait_healthy(self.session, timeout=30)
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

"""What every contender offers the scenarios, and the timing wrapper they all go through.

One wrapper times every contender the same way (a monotonic clock around the awaited call) and
turns every exception into a failed Sample, so no contender measures itself and no failure is
lost or crashes a run.
"""

from __future__ import annotations

import abc
import asyncio
import time
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from bench.measure import Sample
from bench.workload import ChatCall

if TYPE_CHECKING:
    from bench.fleet import SimFleet


class Unavailable(Exception):
    """A contender that cannot run here (a missing optional package): skipped with this note."""


@dataclass(frozen=True)
class Tuning:
    """Timeouts and probing given to every router alike, scaled to the sims' compressed time.

    The request timeout is set per scenario to a few times its longest legitimate request, as
    a user would set it for their fleet; it is what LiteLLM's Router waits on a silent server.
    """

    request_timeout_s: float = 10.0
    stall_timeout_s: float = 1.0
    probe_interval_s: float = 1.0
    max_retry: int = 5


@dataclass(frozen=True)
class Target:
    """The fleet a contender is pointed at for one run."""

    model: str
    kind: str
    servers: tuple[str, ...]  # host:port
    tuning: Tuning = Tuning()
    fleet: SimFleet | None = field(default=None, compare=False)  # only the oracle reads it


@dataclass(frozen=True)
class Reply:
    server: str | None = None
    ttft_s: float | None = None
    items: int = 1


class Contender(abc.ABC):
    """A way of sending requests to a fleet: a router, a baseline, or the oracle."""

    name: str = "?"
    family: str = "?"
    routes: bool = True  # False: talks to the first server only (the overhead floor)
    needs_fleet: bool = False  # True: must run in the process that owns the sims (the oracle)

    @abc.abstractmethod
    async def open(self, target: Target) -> None: ...

    @abc.abstractmethod
    async def chat(self, call: ChatCall) -> Reply: ...

    @abc.abstractmethod
    async def chat_stream(self, call: ChatCall) -> Reply: ...

    @abc.abstractmethod
    async def embed(self, texts: list[str], encoding: str | None = None) -> Reply: ...

    async def close(self) -> None:  # noqa: B027 - most contenders hold something to close
        pass


def _describe(exc: BaseException) -> str:
    text = str(exc).replace("\n", " ")
    return f"{type(exc).__name__}: {text[:160]}"


async def timed(op: str, contender: Contender, item: Any, t0: float, worker: int = 0,
                encoding: str | None = None) -> Sample:
    """Run one request through `contender` and say what the caller saw; never raises."""
    start = time.perf_counter()
    try:
        if op == "chat":
            reply = await contender.chat(item)
        elif op == "stream":
            reply = await contender.chat_stream(item)
        elif op == "embed":
            reply = await contender.embed(item, encoding)
        else:
            raise ValueError(f"unknown op {op!r}")
    except asyncio.CancelledError:
        raise
    except Exception as exc:  # every failure the caller would see counts, whatever its type
        return Sample(start - t0, time.perf_counter() - start, False, error=_describe(exc),
                      worker=worker)
    return Sample(start - t0, time.perf_counter() - start, True, reply.server, reply.ttft_s,
                  items=reply.items, worker=worker)

"""Shared fixtures: real sim servers on 127.0.0.1, and no process left behind."""

from __future__ import annotations

from collections.abc import Callable, Iterator

import pytest
from helpers import SimProcess, free_port


@pytest.fixture
def start_sim() -> Iterator[Callable[..., SimProcess]]:
    """Factory: start_sim(model="m", kind="chat", speed=50, **flags) -> a healthy SimProcess.

    Every server started through it is stopped at teardown.
    """
    started: list[SimProcess] = []

    def _start(model: str = "m", kind: str = "chat", port: int | None = None,
               **flags: object) -> SimProcess:
        flags.setdefault("speed", 50)
        sim = SimProcess(port or free_port(), model, kind, flags=flags).spawn()
        started.append(sim)
        return sim.wait_ready(timeout=30)

    yield _start
    for sim in started:
        sim.close()


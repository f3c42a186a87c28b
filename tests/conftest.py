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


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """Under pytest-xdist (`-n 2 --dist loadgroup`, the default), a test file runs whole in
    one worker, in its order, so its module fixtures start once; the real-engine tier is
    one group, so its vLLM fleets start one after another (each takes both cores), in file
    order, while the other worker runs the fast tier. The tests wait on sims and
    subprocesses far more than they compute, so two workers finish in about half the time
    even on two cores."""
    for item in items:
        real = "real" in item.path.parent.parts[-1:]
        item.add_marker(pytest.mark.xdist_group("real-engine" if real else item.path.name))

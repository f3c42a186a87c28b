"""Shared fixtures: real sim servers on 127.0.0.1, and no process left behind."""

from __future__ import annotations

import os
import subprocess
from collections.abc import Callable, Iterator

import pytest
from helpers import SimProcess, free_port, sim_argv, wait_http_ok


@pytest.fixture
def start_sim() -> Iterator[Callable[..., SimProcess]]:
    """Factory: start_sim(model="m", kind="chat", speed=50, **flags) -> a healthy SimProcess.

    Every server started through it is stopped at teardown.
    """
    started: list[SimProcess] = []

    def _start(model: str = "m", kind: str = "chat", port: int | None = None,
               **flags: object) -> SimProcess:
        flags.setdefault("speed", 50)
        port = port or free_port()
        argv = sim_argv(port, model, kind, **flags)
        proc = subprocess.Popen(argv, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                                env={**os.environ, "PYTHONUNBUFFERED": "1"})
        sim = SimProcess(proc=proc, port=port, model=model, kind=kind, argv=argv)
        started.append(sim)
        try:
            wait_http_ok(f"{sim.url}/health", timeout=30, proc=proc)
        except Exception:
            sim.stop()
            err = proc.stderr.read().decode(errors="replace") if proc.stderr else ""
            raise RuntimeError(f"sim did not start: {argv}\n{err}") from None
        return sim

    yield _start
    for sim in started:
        sim.stop()
        if sim.proc.stderr:
            sim.proc.stderr.close()

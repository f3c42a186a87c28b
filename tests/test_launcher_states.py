"""The supervisor's state machine: every move a server makes is one the table allows.

In process, with real sim servers (and a command that crashes) behind the real guard, so the
lifecycles walked here are the ones the launcher walks: start, die and restart, crash loop to
FATAL, wait for GPU memory, leave the plan, stop.
"""

from __future__ import annotations

import os
import signal
import sys
import time
from collections.abc import Callable
from pathlib import Path

import pytest
from helpers import free_port, sim_argv
from modelfleet.launcher.commands import LaunchSpec
from modelfleet.launcher.gpus import DescribedGpuProbe
from modelfleet.launcher.supervisor import (
    TRANSITIONS,
    GpuLocks,
    IllegalTransition,
    ServerProcess,
    State,
    Supervisor,
    SupervisorOptions,
)

pytestmark = pytest.mark.timeout(90)


def spec(tmp_path: Path, name: str, argv: list[str], port: int, **extra: object) -> LaunchSpec:
    return LaunchSpec(key=(name, "127.0.0.1", port), label=f"{name} 127.0.0.1:{port}",
                      argv=tuple(argv), env={}, secret_env=(),
                      health_url=f"http://127.0.0.1:{port}/health",
                      log_path=tmp_path / f"{name}.log", **extra)  # type: ignore[arg-type]


def until(what: Callable[[], bool], timeout: float = 30.0) -> None:
    deadline = time.monotonic() + timeout
    while not what():
        assert time.monotonic() < deadline, "condition not reached in time"
        time.sleep(0.02)


class RecordingSupervisor(Supervisor):
    """A Supervisor that also remembers each server's moves as (label, from, to)."""

    def __init__(self, *args: object, **kwargs: object) -> None:
        super().__init__(*args, **kwargs)  # type: ignore[arg-type]
        self.moves: list[tuple[str, State, State, str]] = []
        self._last: dict[int, State] = {}

    def _changed(self, server: ServerProcess, state: State, detail: str) -> None:
        old = self._last.get(id(server), State.STOPPED)
        self._last[id(server)] = state
        self.moves.append((server.spec.label, old, state, detail))
        super()._changed(server, state, detail)

    def states(self, label: str) -> list[State]:
        return [new for name, _, new, _ in self.moves if name == label]


def test_the_state_setter_refuses_a_move_the_table_does_not_allow(tmp_path: Path) -> None:
    seen: list[State] = []
    server = ServerProcess(spec(tmp_path, "m", ["true"], free_port()), None, SupervisorOptions(),
                           None, GpuLocks(), lambda _s, state, _d: seen.append(state))
    with pytest.raises(IllegalTransition, match=r"STOPPED -> RUNNING is not an allowed "
                                                r"transition \(from STOPPED only to .*\); this is a bug"):
        server._set(State.RUNNING)
    assert server.state is State.STOPPED and seen == []  # refused before anything changed
    server._set(State.STARTING)
    with pytest.raises(IllegalTransition):
        server._set(State.WAITING_GPU)
    assert server.state is State.STARTING and seen == [State.STARTING]
    assert all(TRANSITIONS[state] for state in State)  # no state is a dead end


def test_every_move_of_start_restart_crash_loop_gpu_wait_retire_and_stop_is_in_the_table(
        tmp_path: Path) -> None:
    gpus = tmp_path / "gpus.yaml"
    gpus.write_text("gpus:\n  - {index: 0, name: H100, total_gb: 80, free_gb: 10}\n")
    options = SupervisorOptions(poll_s=0.05, ready_timeout_s=60, grace_s=3, startsecs=0.1,
                                startretries=2, backoff_s=0.05)
    supervisor = RecordingSupervisor(options, DescribedGpuProbe(gpus))
    good_port, crash_port, wait_port = free_port(), free_port(), free_port()
    good = spec(tmp_path, "good", sim_argv(good_port, "good", "chat", speed=1000), good_port)
    crash = spec(tmp_path, "crash", [sys.executable, "-c", "import sys; sys.exit(3)"], crash_port)
    waiting = spec(tmp_path, "waiting", sim_argv(wait_port, "waiting", "chat"), wait_port,
                   gpus=(0,), need_gb=((0, 30.0),))
    try:
        supervisor.apply([(good, 1), (crash, 1), (waiting, 1)])
        until(lambda: supervisor.states(good.label).count(State.RUNNING) == 1)
        first = supervisor.servers[good.key].pid
        assert first is not None
        os.kill(first, signal.SIGKILL)  # it dies: BACKOFF, then started again
        until(lambda: supervisor.states(good.label).count(State.RUNNING) == 2)
        until(lambda: State.FATAL in supervisor.states(crash.label))
        until(lambda: State.WAITING_GPU in supervisor.states(waiting.label))

        supervisor.apply([(crash, 1), (waiting, 1)])  # good leaves the plan
        assert [s.spec.label for s in supervisor.retiring()] in ([good.label], [])
        until(lambda: supervisor.states(good.label)[-1] is State.STOPPED)
        assert supervisor.retiring() == []  # a retired server is forgotten once it is stopped
    finally:
        supervisor.stop_all()

    for label, old, new, detail in supervisor.moves:
        assert new in TRANSITIONS[old], f"{label}: {old.value} -> {new.value} ({detail})"
        assert "supervision failed" not in detail, f"{label}: {detail}"
    moves = {(old, new) for _, old, new, _ in supervisor.moves}
    S = State
    assert {(S.STOPPED, S.STARTING), (S.STARTING, S.RUNNING), (S.RUNNING, S.BACKOFF),
            (S.BACKOFF, S.STARTING), (S.STARTING, S.BACKOFF), (S.STARTING, S.FATAL),
            (S.STOPPED, S.WAITING_GPU), (S.WAITING_GPU, S.STOPPED), (S.RUNNING, S.STOPPING),
            (S.STOPPING, S.STOPPED)} <= moves, sorted((a.value, b.value) for a, b in moves)
    assert supervisor.states(waiting.label) == [State.WAITING_GPU, State.STOPPED]

"""Keeps this host's servers running: one explicit state machine per server.

States (after supervisor's process.py, plus a state for the GPU wait):

    STOPPED ──► WAITING_GPU ──► STARTING ──► RUNNING
       ▲            │  ▲           │  │         │
       │            │  └─ BACKOFF ◄┘  │  ◄──────┘ (died)
       │            │       │         ▼
       └─ STOPPING ◄┴───────┴──── FATAL (too many failed starts in a row)

The moves allowed from each state are the table TRANSITIONS below, and the one
setter refuses any other with IllegalTransition (as supervisor's
`_assertInState` does): a slip in the lifecycle is a loud bug, never a server
quietly in a state it cannot be in.

Every server has its own thread (a pool sized at startup could not take the
servers a SIGHUP adds, and every lifecycle lives as long as its server), so
servers start concurrently, except that starts and restarts on the same GPU
go one at a time: a lock per GPU is held from spawn until the server is ready
or has failed, because vLLM aborts when another process allocates memory
while it profiles. A start *fails* when the server dies or misses the ready
timeout before /health answers 200, or dies within `startsecs` of being
ready; after `startretries` failed starts in a row it is FATAL, with the last
lines of its log in the message, and the other servers are left alone.

Processes are started through `launcher/guard.py` (see there for why), which
owns the engine's process group and kills all of it when asked, when the
engine's main process dies, or when the launcher dies.
"""

from __future__ import annotations

import enum
import json
import logging
import os
import signal
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from collections import deque
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import psutil

from modelfleet.errors import GpuProbeError

from .commands import LaunchSpec
from .gpus import GpuProbe, GpuState

log = logging.getLogger("launcher")

GUARD_SCRIPT = str(Path(__file__).with_name("guard.py"))
# Health checks go straight to the server, never through an http_proxy from the environment.
_HTTP = urllib.request.build_opener(urllib.request.ProxyHandler({}))


class State(str, enum.Enum):
    STOPPED = "STOPPED"
    WAITING_GPU = "WAITING_GPU"
    STARTING = "STARTING"
    RUNNING = "RUNNING"
    BACKOFF = "BACKOFF"
    STOPPING = "STOPPING"
    FATAL = "FATAL"


# Every state a server may go to from each state; the setter refuses anything else, so a
# slip in the lifecycle shows at once as a bug instead of as a server in an impossible state.
TRANSITIONS: Mapping[State, frozenset[State]] = {
    # STOPPED -> STOPPED: asked to stop before it ever started, it still says it is stopped
    State.STOPPED: frozenset({State.WAITING_GPU, State.STARTING, State.FATAL, State.STOPPED}),
    State.WAITING_GPU: frozenset({State.STARTING, State.FATAL, State.STOPPED}),
    State.STARTING: frozenset({State.RUNNING, State.BACKOFF, State.FATAL, State.STOPPING,
                               State.STOPPED}),
    State.RUNNING: frozenset({State.BACKOFF, State.FATAL, State.STOPPING, State.STOPPED}),
    State.BACKOFF: frozenset({State.WAITING_GPU, State.STARTING, State.FATAL, State.STOPPED}),
    State.STOPPING: frozenset({State.STOPPED}),
    # FATAL -> STOPPING: a bug in supervision left its engine running, which must still go
    State.FATAL: frozenset({State.STOPPING}),
}


class IllegalTransition(RuntimeError):
    """A bug in the launcher: a server was moved between two states the table does not join."""

    def __init__(self, label: str, old: State, new: State) -> None:
        allowed = ", ".join(sorted(s.value for s in TRANSITIONS[old])) or "nothing"
        super().__init__(f"{label}: {old.value} -> {new.value} is not an allowed transition "
                         f"(from {old.value} only to {allowed}); this is a bug in the launcher")
        self.old = old
        self.new = new


@dataclass(frozen=True)
class SupervisorOptions:
    poll_s: float = 2.0  # how often a waiting server reads the GPUs
    ready_timeout_s: float = 1800.0  # big models take many minutes to load
    grace_s: float = 30.0  # SIGTERM to SIGKILL
    startsecs: float = 5.0  # a death sooner than this after ready is a failed start
    startretries: int = 3  # failed starts in a row before FATAL
    backoff_s: float = 1.0  # first restart delay, doubled per failed start
    backoff_max_s: float = 60.0
    wait_log_s: float = 30.0  # repeat "still waiting" this often when nothing changes
    log_max_bytes: int = 20_000_000
    log_backups: int = 3
    tail_lines: int = 15


class GpuLocks:
    """One lock per GPU index; taken in index order so two servers never deadlock."""

    def __init__(self) -> None:
        self._locks: dict[int, threading.Lock] = {}
        self._guard = threading.Lock()

    def acquire(self, gpus: Sequence[int], stop: threading.Event) -> bool:
        taken: list[threading.Lock] = []
        for g in sorted(set(gpus)):
            with self._guard:
                lock = self._locks.setdefault(g, threading.Lock())
            while not lock.acquire(timeout=0.1):
                if stop.is_set():
                    for held in taken:
                        held.release()
                    return False
            taken.append(lock)
        return True

    def release(self, gpus: Sequence[int]) -> None:
        for g in sorted(set(gpus), reverse=True):
            self._locks[g].release()


def describe_exit(code: int | None) -> str:
    """A guard's exit status in words (the guard returns 128+N when the engine died of signal N)."""
    if code is None:
        return "still running"
    if code < 0:
        return f"its guard was killed by {_signal_name(-code)}"
    if code > 128 and _signal_name(code - 128, None):
        return f"killed by {_signal_name(code - 128)}"
    if code == 127:
        return "could not be started (command not found?)"
    return f"exited with code {code}"


def _signal_name(number: int, default: str | None = "") -> str | None:
    try:
        return signal.Signals(number).name
    except ValueError:
        return default if default is None else f"signal {number}"


def log_tail(path: Path, lines: int) -> str:
    try:
        with path.open(errors="replace") as f:
            last = deque(f, maxlen=lines)
    except OSError:
        return "  | (no log)"
    return "\n".join("  | " + line.rstrip("\n") for line in last) or "  | (log is empty)"


class ServerProcess:
    """One server's lifecycle, run in its own thread; only that thread changes its state."""

    def __init__(
        self,
        spec: LaunchSpec,
        settings: object,
        options: SupervisorOptions,
        probe: GpuProbe | None,
        locks: GpuLocks,
        on_change: Callable[[ServerProcess, State, str], None],
        after: ServerProcess | None = None,
    ) -> None:
        self.spec = spec
        self.settings = settings  # what a reload compares to decide whether it changed
        self.options = options
        self.probe = probe
        self.locks = locks
        self.on_change = on_change
        self.after = after  # an older instance on the same port that must be gone first
        self.state = State.STOPPED
        self.pid: int | None = None  # the engine's pid (also its process group id)
        self._guard: subprocess.Popen | None = None
        self._stop = threading.Event()
        self._done = threading.Event()
        self._thread = threading.Thread(target=self._run, name=spec.label, daemon=True)

    # -- control, from other threads ------------------------------------------------------

    def start(self) -> None:
        self._thread.start()

    def request_stop(self) -> None:
        self._stop.set()

    def wait_done(self, timeout: float | None = None) -> bool:
        return self._done.wait(timeout)

    # -- the lifecycle --------------------------------------------------------------------

    def _set(self, state: State, detail: str = "") -> None:
        if state not in TRANSITIONS[self.state]:
            raise IllegalTransition(self.spec.label, self.state, state)
        self.state = state
        self.on_change(self, state, detail)

    def _run(self) -> None:
        try:
            if self.after is not None:
                self.after.wait_done()
            self._lifecycle()
        except Exception:  # a bug here must not take the other servers down
            log.exception("%s: supervision failed", self.spec.label)
            if State.FATAL in TRANSITIONS[self.state]:
                self._set(State.FATAL, "supervision failed (see the traceback above)")
        finally:
            try:
                if self._guard is not None and self._guard.poll() is None:
                    # STARTING/RUNNING/FATAL -> STOPPING: asked to stop (or a bug): end its group
                    self._set(State.STOPPING, f"pid {self.pid}")
                    self._end_guard()
                if self.state is not State.FATAL:
                    # any state -> STOPPED: nothing of it runs any more
                    self._set(State.STOPPED, "")
            finally:
                self._done.set()

    def _lifecycle(self) -> None:
        opts = self.options
        failures = 0
        while not self._stop.is_set():
            # STOPPED/BACKOFF -> WAITING_GPU, until its GPUs have the memory it needs
            if not self._wait_for_gpus():
                return
            outcome, detail, elapsed = self._start_once()
            if outcome == "stopped":
                return
            if outcome == "short":  # memory went to someone else meanwhile: wait again
                continue
            if outcome == "ready":
                # STARTING -> RUNNING: /health answered 200
                self._set(State.RUNNING, f"pid {self.pid}, ready in {elapsed:.1f} s")
                ran = self._watch()
                if ran is None:
                    return
                seconds, how = ran
                failures = 0 if seconds >= opts.startsecs else failures + 1
                why = f"{how} after {seconds:.1f} s running"
            else:
                failures += 1
                why = detail
            if failures >= opts.startretries:
                # BACKOFF -> FATAL: a crash loop; say why and leave the others alone
                self._set(
                    State.FATAL,
                    f"{why}; {failures} failed starts in a row, not retrying. "
                    f"Last lines of {self.spec.log_path}:\n{log_tail(self.spec.log_path, opts.tail_lines)}",
                )
                return
            delay = min(opts.backoff_max_s, opts.backoff_s * 2 ** max(failures - 1, 0))
            # RUNNING/STARTING -> BACKOFF: it died; restart after a delay that grows per failure
            self._set(State.BACKOFF, f"{why}; restarting in {delay:.1f} s")
            if self._stop.wait(delay):
                return

    # -- waiting for GPU memory -----------------------------------------------------------

    def _shortfall(self, gpus: Mapping[int, GpuState]) -> list[str]:
        label = " simulated" if self.probe is not None and self.probe.simulated else ""
        short = []
        for g, need in self.spec.need_gb:
            gpu = gpus.get(g)
            if gpu is None:
                short.append(f"GPU {g} is not there any more{label}")
            elif gpu.free_gb + 1e-6 < need:
                held = f", held by pids {', '.join(map(str, gpu.pids))}" if gpu.pids else ""
                short.append(
                    f"needs {need:.1f} GB free on{label} GPU {g} ({gpu.name}), "
                    f"which has {gpu.free_gb:.1f} of {gpu.total_gb:.1f} GB free{held}"
                )
        return short

    def _read_shortfall(self) -> tuple[list[str], object]:
        """What is missing now, and a key that changes only when the picture does."""
        assert self.probe is not None
        try:
            gpus = self.probe.read()
        except GpuProbeError as exc:
            return [f"cannot read the GPUs: {exc}"], ("error", str(exc))
        short = self._shortfall(gpus)
        key = tuple((g, round(gpus[g].free_gb, 1)) for g, _ in self.spec.need_gb if g in gpus)
        return short, key

    def _wait_for_gpus(self) -> bool:
        if not self.spec.need_gb or self.probe is None:
            return not self._stop.is_set()
        last_key: object = None
        last_log = 0.0
        while not self._stop.is_set():
            short, key = self._read_shortfall()
            if not short:
                return True
            now = time.monotonic()
            if self.state is not State.WAITING_GPU:
                self._set(State.WAITING_GPU, "; ".join(short))
                last_log = now
            elif key != last_key or now - last_log >= self.options.wait_log_s:
                log.info("%s still WAITING_GPU (%s)", self.spec.label, "; ".join(short))
                last_log = now
            last_key = key
            self._stop.wait(self.options.poll_s)
        return False

    # -- starting -------------------------------------------------------------------------

    def _start_once(self) -> tuple[str, str, float]:
        """One start attempt: ("ready" | "failed" | "short" | "stopped", why, seconds)."""
        gpus = self.spec.gpus
        if not self.locks.acquire(gpus, self._stop):
            return "stopped", "", 0.0
        try:
            if self.spec.need_gb and self.probe is not None:
                short, _ = self._read_shortfall()  # another start may have taken the memory
                if short:
                    return "short", "", 0.0
            started = time.monotonic()
            self._spawn()
            deadline = started + self.options.ready_timeout_s
            while True:
                assert self._guard is not None
                code = self._guard.poll()
                if code is not None:
                    self._after_guard_exit(code)
                    return "failed", f"{describe_exit(code)} before it was ready", 0.0
                if self._stop.is_set():
                    return "stopped", "", 0.0
                if self._healthy():
                    return "ready", "", time.monotonic() - started
                if time.monotonic() >= deadline:
                    self._end_guard()
                    return "failed", f"did not answer {self.spec.health_url} within {self.options.ready_timeout_s:g} s", 0.0
                self._stop.wait(0.2)
        finally:
            self.locks.release(gpus)

    def _spawn(self) -> None:
        spec = self.spec
        spec.log_path.parent.mkdir(parents=True, exist_ok=True)
        job = {
            "argv": list(spec.argv),
            "env": {**os.environ, **spec.env},
            "log": str(spec.log_path),
            "grace_s": self.options.grace_s,
            "secrets": list(spec.secrets()),
            "log_max_bytes": self.options.log_max_bytes,
            "log_backups": self.options.log_backups,
            "cpus": list(spec.cpus),
        }
        # The guard gets its own session, so a Ctrl-C in the launcher's terminal reaches only
        # the launcher, which then stops the servers in order.
        guard = subprocess.Popen(
            [sys.executable, GUARD_SCRIPT], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
            start_new_session=True,
        )
        assert guard.stdin is not None and guard.stdout is not None
        guard.stdin.write(json.dumps(job).encode() + b"\n")
        guard.stdin.flush()  # stdin stays open: it is the guard's lifeline
        answer = guard.stdout.readline().decode().split()
        guard.stdout.close()
        self._guard = guard
        self.pid = int(answer[1]) if len(answer) == 2 and answer[0] == "pid" else None
        started = f"pid {self.pid}" if self.pid else "could not spawn it"
        simulated = ", simulated GPU memory" if spec.need_gb and self.probe is not None and self.probe.simulated else ""
        # STOPPED/WAITING_GPU/BACKOFF -> STARTING: spawned; ready once /health answers 200
        self._set(State.STARTING, f"{started}, log {spec.log_path}{simulated}")

    def _healthy(self) -> bool:
        try:
            with _HTTP.open(self.spec.health_url, timeout=2) as response:
                return response.status == 200
        except (urllib.error.URLError, OSError, ValueError):
            return False

    # -- running and stopping ----------------------------------------------------------------

    def _watch(self) -> tuple[float, str] | None:
        """Until it dies (seconds it ran, how) or a stop is requested (None)."""
        assert self._guard is not None
        since = time.monotonic()
        while not self._stop.is_set():
            code = self._guard.poll()
            if code is not None:
                self._after_guard_exit(code)
                return time.monotonic() - since, describe_exit(code)
            self._stop.wait(0.2)
        return None

    def _after_guard_exit(self, code: int) -> None:
        """A guard killed outright could not clean up: make sure its engine's group goes too."""
        if code < 0 and self.pid:
            try:
                os.killpg(self.pid, signal.SIGKILL)
            except (ProcessLookupError, PermissionError):
                pass
        self._close_lifeline()

    def _end_guard(self) -> None:
        """SIGTERM the guard, which ends the engine's group (SIGKILL after the grace period)."""
        guard = self._guard
        assert guard is not None
        try:
            guard.send_signal(signal.SIGTERM)
        except ProcessLookupError:
            pass
        try:
            guard.wait(self.options.grace_s + 15)
        except subprocess.TimeoutExpired:
            log.warning("%s: its guard did not finish in time; killing every process of it", self.spec.label)
            kill_tree(guard.pid)
            guard.wait(10)
        self._after_guard_exit(guard.returncode)

    def _close_lifeline(self) -> None:
        if self._guard is not None and self._guard.stdin is not None and not self._guard.stdin.closed:
            try:
                self._guard.stdin.close()
            except OSError:
                pass


def kill_tree(pid: int) -> None:
    """Last resort: SIGKILL a process and everything under it."""
    try:
        root = psutil.Process(pid)
        procs = [*root.children(recursive=True), root]
    except psutil.Error:
        return
    for p in procs:
        try:
            p.kill()
        except psutil.Error:
            pass


class Supervisor:
    """All of this host's ServerProcesses; applies a plan, and reports each change on one line."""

    def __init__(
        self,
        options: SupervisorOptions,
        probe: GpuProbe | None,
        on_all_running: Callable[[Sequence[ServerProcess]], None] | None = None,
    ) -> None:
        self.options = options
        self.probe = probe
        self.locks = GpuLocks()
        self.servers: dict[tuple[str, str, int], ServerProcess] = {}
        self._retiring: list[ServerProcess] = []
        self._lock = threading.Lock()
        self._all_running = False
        self._on_all_running = on_all_running

    def _changed(self, server: ServerProcess, state: State, detail: str) -> None:
        head = f"{server.spec.label} {state.value}"
        if state is State.FATAL:
            log.error("%s: %s", head, detail)
        elif detail:
            log.info("%s (%s)", head, detail)
        else:
            log.info("%s", head)
        with self._lock:
            if state is State.STOPPED and server in self._retiring:
                self._retiring.remove(server)  # nothing of it runs any more: forget it
            current = list(self.servers.values())
            everyone = bool(current) and all(s.state is State.RUNNING for s in current)
            announce = everyone and not self._all_running
            self._all_running = everyone
        if announce:
            log.info("all %d servers RUNNING", len(current))
            if self._on_all_running is not None:
                self._on_all_running(current)

    def apply(self, planned: Iterable[tuple[LaunchSpec, object]]) -> tuple[list[str], list[str], list[str]]:
        """Start what is new, stop what is gone, restart what changed; keep the rest as it runs."""
        wanted = {spec.key: (spec, settings) for spec, settings in planned}
        added, removed, changed = [], [], []
        to_start = []
        with self._lock:
            for key, server in list(self.servers.items()):
                if key not in wanted:
                    removed.append(server.spec.label)
                    self._retire(key)
            for key, (spec, settings) in wanted.items():
                old = self.servers.get(key)
                if old is not None and old.settings == settings:
                    continue
                if old is not None:
                    changed.append(spec.label)
                    self._retire(key)
                else:
                    added.append(spec.label)
                server = ServerProcess(spec, settings, self.options, self.probe, self.locks,
                                       self._changed, after=old)
                self.servers[key] = server
                to_start.append(server)
            self._all_running = False
        for server in to_start:
            server.start()
        return added, removed, changed

    def _retire(self, key: tuple[str, str, int]) -> None:
        """Stop a server that left the plan; it is kept (stop_all must still wait for it) until
        it is STOPPED, or its thread has ended some other way."""
        server = self.servers.pop(key)
        server.request_stop()
        self._retiring = [s for s in self._retiring if not s.wait_done(0)]
        self._retiring.append(server)

    def stop_all(self) -> None:
        """Stop every server at once and wait for each (their guards enforce the grace period)."""
        with self._lock:
            everyone = [*self.servers.values(), *self._retiring]
        for server in everyone:
            server.request_stop()
        for server in everyone:
            server.wait_done(self.options.grace_s + 30)

    def snapshot(self) -> list[ServerProcess]:
        with self._lock:
            return list(self.servers.values())

    def retiring(self) -> list[ServerProcess]:
        """Servers that left the plan and are still stopping."""
        with self._lock:
            self._retiring = [s for s in self._retiring if not s.wait_done(0)]
            return list(self._retiring)

"""`modelfleet demo`: the whole system at work on a laptop, in about thirty seconds.

It starts the simulated fleet of the fleet file through the real launcher
(`modelfleet serve`, as a subprocess, exactly as an operator would), sends
traffic through `AsyncModelServer`, and while the traffic runs it makes one
chat server ten times slower (`POST /sim/fault`) and later kills another
(SIGKILL; the launcher restarts it). The live view shows where the requests
go, so the traffic can be seen leaving the slow server and the dead one with
no failed request. At the end it prints the report, stops the launcher and
checks that no process it started is left.

Nothing here is faked: the only simulated thing is the engine, and it says so.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import random
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from collections import deque
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TextIO

from modelfleet.config import FleetConfig, ModelSpec, ServerSpec, find_config_path, load_config
from modelfleet.errors import ConfigError, FleetError, UsageError

DEFAULT_DURATION_S = 30.0
READY_TIMEOUT_S = 60.0  # a cold laptop starting five Python servers
STOP_TIMEOUT_S = 20.0
SLOWDOWN = 10.0
CHAT_WORKERS = 6
EMBED_WORKERS = 2
VIEW_EVERY_S = 0.5  # live view refresh in a terminal
PLAIN_EVERY_S = 2.0  # one line this often when the output is not a terminal
WINDOW_S = 2.0  # rates, shares and percentiles of the live view cover this much recent time
LOCAL_HOSTS = ("127.0.0.1", "localhost", "::1")
BAR_WIDTH = 24
_HEALTH = ("up", "degraded", "down")
SENTENCES = (
    "The tide comes in twice a day.", "A fleet of small boats left the harbour.",
    "Latency is a distribution, not a number.", "The lighthouse keeper wrote every night.",
    "Batching engines run many requests together.", "Kettles whistle when the water boils.",
)


# --------------------------------------------------------------------------------------------
# The fleet: which file, which ports, which servers to break.
# --------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class DemoFleet:
    """The fleet file the demo launches (maybe a copy on free ports) and its chosen victims."""

    path: Path
    config: FleetConfig
    moved: tuple[tuple[str, str], ...]  # (address in the user's file, address used instead)
    chat_model: ModelSpec | None
    slow: ServerSpec | None  # made SLOWDOWN times slower at a third of the run
    kill: ServerSpec | None  # killed at half of the run


def default_config_path(explicit: str | None) -> Path:
    """-c, $MODELFLEET_CONFIG, ./client_config.yaml, else the repository's default fleet."""
    try:
        return find_config_path(explicit)
    except ConfigError:
        if explicit:
            raise
        bundled = Path(__file__).resolve().parent.parent / "client_config.yaml"
        if bundled.is_file():
            return bundled
        raise


def prepare_fleet(path: Path, workdir: Path, out: TextIO) -> DemoFleet:
    """Check the file is a local sim fleet; move it to free ports if its ports are taken."""
    config = load_config(path)
    for spec in config.models.values():
        if spec.backend != "sim":
            raise UsageError(
                f"the demo runs simulated servers only, and model {spec.name} has backend "
                f"{spec.backend}; run it on the default client_config.yaml (or a copy whose "
                "models all say `backend: sim`)")
        for server in spec.servers:
            if server.host not in LOCAL_HOSTS:
                raise UsageError(
                    f"the demo starts every server on this machine, and {spec.name} has a server "
                    f"on {server.host}; use 127.0.0.1 in the demo's fleet file")
    busy = [(spec.name, i, server) for spec in config.models.values()
            for i, server in enumerate(spec.servers) if not port_is_free(server.host, server.port)]
    moved: list[tuple[str, str]] = []
    if busy:
        from modelfleet.config import ConfigDocument

        copy = workdir / path.name
        shutil.copyfile(path, copy)
        document = ConfigDocument.open(copy)
        for name, index, server in busy:
            port = free_port(server.host)
            document.set(f"models.{name}.servers[{index}].port", str(port))
            moved.append((server.address, f"{server.host}:{port}"))
        document.save()
        ports = ", ".join(old.rsplit(":", 1)[1] for old, _ in moved)
        out.write(f"ports {ports} are in use here (another demo, or `modelfleet serve`?), so the "
                  f"demo runs on a copy of {path} with free ports instead: "
                  + ", ".join(f"{old} -> {new.rsplit(':', 1)[1]}" for old, new in moved) + "\n")
        path, config = copy, load_config(copy)
    chats = [m for m in config.models.values() if m.kind == "chat"]
    chat = max(chats, key=lambda m: len(m.servers), default=None)
    slow = chat.servers[0] if chat and len(chat.servers) >= 2 else None
    kill = chat.servers[1] if chat and len(chat.servers) >= 2 else None
    return DemoFleet(path=path, config=config, moved=tuple(moved), chat_model=chat,
                     slow=slow, kill=kill)


def port_is_free(host: str, port: int) -> bool:
    """Whether a server could listen there now (with SO_REUSEADDR, as aiohttp binds)."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    with socket.socket(family, socket.SOCK_STREAM) as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            s.bind((host, port))
        except OSError:
            return False
    return True


def free_port(host: str = "127.0.0.1") -> int:
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    with socket.socket(family, socket.SOCK_STREAM) as s:
        s.bind((host, 0))
        return s.getsockname()[1]


# --------------------------------------------------------------------------------------------
# The launcher, as a subprocess.
# --------------------------------------------------------------------------------------------

class LaunchedFleet:
    """`modelfleet serve` running in a subprocess, and everything it started."""

    def __init__(self, fleet: DemoFleet, workdir: Path) -> None:
        self.ready_file = workdir / "ready.json"
        self.output_path = workdir / "launcher.out"
        self.log_dir = workdir / "logs"
        argv = [sys.executable, "-m", "modelfleet", "serve", "-c", str(fleet.path),
                "--log-dir", str(self.log_dir), "--ready-file", str(self.ready_file),
                "--startsecs", "1", "--grace-s", "5"]
        self._output = self.output_path.open("wb")
        # Same process group as the demo: a Ctrl-C in the terminal reaches the launcher too,
        # which stops its servers even if this process could not.
        self.process = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=self._output,
                                        stderr=subprocess.STDOUT,
                                        env={**os.environ, "PYTHONUNBUFFERED": "1"})

    def wait_ready(self, timeout_s: float) -> dict[str, int]:
        """{address: pid} once every server is RUNNING; FleetError with the log tail if not."""
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise FleetError(f"the launcher exited with status {self.process.returncode} "
                                 f"before the fleet was up:\n{self.output_tail()}")
            pids = self.pids()
            if pids:
                return pids
            time.sleep(0.05)
        raise FleetError(f"the fleet was not up after {timeout_s:g} s:\n{self.output_tail()}")

    def pids(self) -> dict[str, int]:
        """Each server's pid as of the last time every server was RUNNING (the ready file)."""
        try:
            body = json.loads(self.ready_file.read_text())
        except (OSError, ValueError):
            return {}
        return {s["address"]: int(s["pid"]) for s in body.get("servers", []) if s.get("pid")}

    def output_tail(self, lines: int = 20) -> str:
        try:
            text = self.output_path.read_text(errors="replace")
        except OSError:
            return "(no launcher output)"
        return "\n".join("  " + line for line in text.splitlines()[-lines:])

    def stop(self) -> tuple[int, list[int]]:
        """SIGTERM the launcher, wait, and make sure every process it started is gone.

        Returns (processes that were running, pids still alive after all).
        """
        import psutil

        try:
            tree = [psutil.Process(self.process.pid)]
            tree += tree[0].children(recursive=True)
        except psutil.NoSuchProcess:
            tree = []
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
        try:
            self.process.wait(timeout=STOP_TIMEOUT_S)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait(timeout=5)
        self._output.close()
        _, alive = psutil.wait_procs(tree, timeout=10)
        alive = [p for p in alive if _still_running(p)]
        for proc in alive:  # only what this demo started, found by pid
            with contextlib.suppress(psutil.Error):
                proc.kill()
        return len(tree), [p.pid for p in alive]


def _still_running(proc: object) -> bool:
    import psutil

    try:
        return proc.is_running() and proc.status() != psutil.STATUS_ZOMBIE  # type: ignore[attr-defined]
    except psutil.Error:
        return False


# --------------------------------------------------------------------------------------------
# What happened: every request, the client's per-server counters, the events.
# --------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class Done:
    at: float  # seconds since the traffic started
    model: str
    latency_s: float
    error: str | None


@dataclass
class Record:
    """Everything the live view and the summary are drawn from."""

    done: list[Done] = field(default_factory=list)
    # (seconds, {model: {address: successes the client counted}}), sampled by the view
    counts: deque[tuple[float, dict[str, dict[str, int]]]] = field(default_factory=deque)
    events: list[tuple[float, str]] = field(default_factory=list)
    health: dict[str, dict[str, str]] = field(default_factory=dict)  # the client's view now
    phases: list[tuple[float, str]] = field(default_factory=list)  # (start, what is going on)
    notes: dict[str, str] = field(default_factory=dict)  # what the demo did to each server

    @property
    def failed(self) -> list[Done]:
        return [d for d in self.done if d.error is not None]

    def recent(self, now: float, window: float) -> list[Done]:
        return [d for d in self.done if d.at > now - window]

    def counts_at(self, t: float) -> dict[str, dict[str, int]]:
        """The counters as last sampled at or before t (empty before the first sample)."""
        best: dict[str, dict[str, int]] = {}
        for at, counts in self.counts:
            if at > t:
                break
            best = counts
        return best

    def shares(self, model: str, start: float, end: float) -> dict[str, float]:
        before = self.counts_at(start).get(model, {})
        after = self.counts_at(end).get(model, {})
        served = {a: max(0, n - before.get(a, 0)) for a, n in after.items()}
        total = sum(served.values())
        return {a: (n / total if total else 0.0) for a, n in served.items()}


def percentile(values: Sequence[float], q: float) -> float | None:
    if not values:
        return None
    if len(values) == 1:
        return values[0]
    return statistics.quantiles(values, n=100, method="inclusive")[int(q) - 1]


# --------------------------------------------------------------------------------------------
# Traffic, faults and the view, all on one event loop.
# --------------------------------------------------------------------------------------------

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


class LiveView:
    """Redrawn in place in a terminal (about twice a second); plain lines when piped."""

    def __init__(self, out: TextIO, *, tty: bool, colour: bool, fleet: DemoFleet) -> None:
        self.out = out
        self.tty = tty
        self.colour = colour
        self.fleet = fleet
        self._lines = 0
        self._last_plain = 0.0
        self._events_shown = 0
        try:
            "█░".encode(getattr(out, "encoding", None) or "ascii")
            self.full, self.empty = "█", "░"
        except (LookupError, UnicodeEncodeError):
            self.full, self.empty = "#", "."

    def update(self, record: Record, t: float, duration_s: float, *, final: bool = False) -> None:
        if self.tty:
            block = self._block(record, t, duration_s)
            up = f"\x1b[{self._lines}F" if self._lines else ""
            self.out.write(up + "\x1b[J" + "\n".join(block) + "\n")
            self._lines = len(block)
        else:
            for at, text in record.events[self._events_shown:]:
                self.out.write(f"{at:5.1f} s  >>> {text}\n")
            self._events_shown = len(record.events)
            if final or t - self._last_plain >= PLAIN_EVERY_S:
                self._last_plain = t
                self.out.write(self._line(record, t) + "\n")
        self.out.flush()

    def _line(self, record: Record, t: float) -> str:
        recent = record.recent(t, WINDOW_S)
        parts = [f"{t:5.1f} s  {len(recent) / WINDOW_S:3.0f} req/s"]
        for model in self.fleet.config.models.values():
            shares = record.shares(model.name, t - WINDOW_S, t)
            p50, p99 = self._percentiles(recent, model.name)
            spread = " ".join(f"{address.rsplit(':', 1)[1]} {share:4.0%}"
                              for address, share in shares.items())
            parts.append(f"{model.name} {spread} (p50 {p50}, p99 {p99})")
        parts.append(f"{len(record.failed)} failed")
        return "  ".join(parts)

    def _block(self, record: Record, t: float, duration_s: float) -> list[str]:
        from modelfleet.report import paint

        recent = record.recent(t, WINDOW_S)
        failed = len(record.failed)
        lines = [
            f"modelfleet demo  {t:4.1f} s of {duration_s:g} s   "
            f"{len(recent) / WINDOW_S:4.0f} req/s   {len(record.done)} requests, "
            + paint(f"{failed} failed", "down" if failed else "up", self.colour),
            paint(f"each server's share of the last {WINDOW_S:g} s of requests, and its health "
                  "as the client sees it", "dim", self.colour),
        ]
        for model in self.fleet.config.models.values():
            p50, p99 = self._percentiles(recent, model.name)
            lines.append(f"{model.name}  p50 {p50}  p99 {p99}")
            shares = record.shares(model.name, t - WINDOW_S, t)
            health = record.health.get(model.name, {})
            for server in model.servers:
                share = shares.get(server.address, 0.0)
                filled = round(share * BAR_WIDTH)
                bar = self.full * filled + self.empty * (BAR_WIDTH - filled)
                state = health.get(server.address, "")
                shown = paint(state, state, self.colour) if state in _HEALTH else state
                note = record.notes.get(server.address, "")
                lines.append(f"  {server.address:<21} {bar} {share:4.0%}  {shown:<8} "
                             + paint(note, "dim", self.colour))
        for at, text in record.events[-4:]:
            lines.append(f"  {at:5.1f} s  {text}")
        return lines

    @staticmethod
    def _percentiles(recent: Sequence[Done], model: str) -> tuple[str, str]:
        latencies = [d.latency_s for d in recent if d.model == model and d.error is None]
        return _ms(percentile(latencies, 50)), _ms(percentile(latencies, 99))


def _ms(seconds: float | None) -> str:
    return "-" if seconds is None else f"{seconds * 1000:.0f} ms"


# --------------------------------------------------------------------------------------------
# The story's end: where the traffic went in each phase, the report, the verdict.
# --------------------------------------------------------------------------------------------

def phase_table(record: Record, fleet: DemoFleet, duration_s: float) -> str:
    """Per phase of the run, each chat server's share of the requests and the latency."""
    model = fleet.chat_model
    if model is None or not record.phases:
        return ""
    addresses = [s.address for s in model.servers]
    bounds = [start for start, _ in record.phases[1:]] + [duration_s]
    rows = []
    for (start, what), end in zip(record.phases, bounds, strict=True):
        shares = record.shares(model.name, start, end)
        done = [d.latency_s for d in record.done
                if d.model == model.name and start <= d.at < end and d.error is None]
        rows.append([f"{start:4.1f}-{end:4.1f} s", what]
                    + [f"{shares.get(a, 0.0):.0%}" for a in addresses]
                    + [_ms(percentile(done, 50)), _ms(percentile(done, 99))])
    header = ["", f"{model.name}: share of requests per server"] + \
        [a.rsplit(":", 1)[1] for a in addresses] + ["p50", "p99"]
    widths = [max(len(r[i]) for r in [header, *rows]) for i in range(len(header))]

    def line(cells: list[str]) -> str:
        return "  ".join(c.ljust(w) if i < 2 else c.rjust(w)
                         for i, (c, w) in enumerate(zip(cells, widths, strict=True))).rstrip()

    return "\n".join([line(header)] + [line(r) for r in rows])


def run_demo(config: str | None = None, duration_s: float = DEFAULT_DURATION_S,
             out: TextIO = sys.stdout) -> int:
    """The whole demo; returns the exit code (0: every request answered, nothing left over)."""
    from modelfleet.report import format_table, probe_fleet, use_colour

    path = default_config_path(config)
    tty = out.isatty()
    colour = use_colour(out)
    workdir = Path(tempfile.mkdtemp(prefix="modelfleet-demo-"))
    keep_workdir = False
    restore_term = _sigterm_as_interrupt()
    record = Record()
    launched: LaunchedFleet | None = None
    interrupted = False
    stopped: tuple[int, list[int]] = (0, [])
    started = time.monotonic()
    try:
        fleet = prepare_fleet(path, workdir, out)
        count = sum(len(m.servers) for m in fleet.config.models.values())
        out.write(f"starting {count} simulated servers from {fleet.path} with the launcher "
                  f"(modelfleet serve) ...\n")
        out.flush()
        launched = LaunchedFleet(fleet, workdir)
        pids = launched.wait_ready(READY_TIMEOUT_S)
        out.write(f"all {len(pids)} servers up in {time.monotonic() - started:.1f} s; sending "
                  f"traffic for {duration_s:g} s through AsyncModelServer "
                  f"(policy {fleet.config.routing.policy})\n")
        if fleet.slow and fleet.kill:
            out.write(f"at {duration_s / 3:.0f} s {fleet.slow.address} becomes {SLOWDOWN:g}x "
                      f"slower; at {duration_s / 2:.0f} s {fleet.kill.address} is killed\n")
        out.write("\n")
        out.flush()
        view = LiveView(out, tty=tty, colour=colour, fleet=fleet)
        try:
            asyncio.run(drive(fleet, launched, duration_s, record, view))
        except KeyboardInterrupt:
            interrupted = True
        if not interrupted:
            out.write("\n" + phase_table(record, fleet, duration_s) + "\n\n")
            out.write("modelfleet report, right after the traffic stopped:\n")
            out.flush()
            try:
                report = asyncio.run(probe_fleet(fleet.config))
                out.write(format_table(report, colour=colour) + "\n\n")
            except KeyboardInterrupt:
                interrupted = True
    except KeyboardInterrupt:
        interrupted = True
    except FleetError:
        keep_workdir = launched is not None
        raise
    finally:
        previous = signal.signal(signal.SIGINT, signal.SIG_IGN)  # a second Ctrl-C must not
        try:                                                     # leave servers behind
            if launched is not None:
                stopped = launched.stop()
        finally:
            signal.signal(signal.SIGINT, previous)
            restore_term()
            if keep_workdir:
                out.write(f"(the launcher's output and the server logs are in {workdir})\n")
            else:
                shutil.rmtree(workdir, ignore_errors=True)
    return _verdict(record, stopped, interrupted, duration_s, out)


def _verdict(record: Record, stopped: tuple[int, list[int]], interrupted: bool,
             duration_s: float, out: TextIO) -> int:
    total, failed = len(record.done), record.failed
    processes, left = stopped
    seconds = max((d.at for d in record.done), default=0.0) or duration_s
    gone = (f"stopped the launcher and the {processes - 1} processes under it, none left"
            if not left else f"{len(left)} processes were still running and were killed: "
            f"{', '.join(map(str, left))}")
    if interrupted:
        out.write(f"demo interrupted: {total} requests, {len(failed)} failed; {gone}\n")
        return 130
    for done in failed[:5]:
        out.write(f"failed at {done.at:.1f} s ({done.model}): {done.error}\n")
    out.write(f"demo: {total} requests, {len(failed)} failed, {total / seconds:.0f} req/s "
              f"for {seconds:.0f} s; {gone}\n")
    out.flush()
    return 0 if not failed and not left else 1


def _sigterm_as_interrupt() -> Callable[[], None]:
    """SIGTERM ends the demo as Ctrl-C does, so its servers are stopped either way."""
    def interrupt(signum: int, frame: object) -> None:
        raise KeyboardInterrupt

    try:
        previous = signal.signal(signal.SIGTERM, interrupt)
    except ValueError:  # not the main thread: leave signals alone
        return lambda: None
    return lambda: signal.signal(signal.SIGTERM, previous)

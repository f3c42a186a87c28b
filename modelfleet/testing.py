"""Running a fleet on this machine, for the tests, the bench and the demo: free loopback
ports, `modelfleet sim` subprocesses that are always stopped, tiny blocking HTTP calls, and
percentiles.

In the package (not in tests/) because bench/ and the demo need the same things and cannot
import tests/; each used to carry its own copy. Stdlib only, so importing it costs nothing.
"""

from __future__ import annotations

import contextlib
import ctypes
import json
import math
import os
import signal
import socket
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Iterable, Iterator, Mapping, Sequence
from pathlib import Path

HOST = "127.0.0.1"
# Calls to local sims go straight there, never through an http_proxy from the environment.
_HTTP = urllib.request.build_opener(urllib.request.ProxyHandler({}))


def free_port(host: str = HOST) -> int:
    """A port nobody listens on right now (the OS picks it)."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    with socket.socket(family, socket.SOCK_STREAM) as s:
        s.bind((host, 0))
        return s.getsockname()[1]


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


def shared_port(hosts: Sequence[str]) -> int:
    """A port free on every one of `hosts` at once (loopback addresses: 127.0.0.2, ...), for
    servers told apart by address only, as the pods behind a headless Service are."""
    for _ in range(100):
        port = free_port(hosts[0])
        if all(port_is_free(host, port) for host in hosts[1:]):
            return port
    raise RuntimeError(f"no port is free on all of {', '.join(hosts)}")


def percentile(values: Sequence[float], q: float) -> float:
    """Linear-interpolated percentile (q in 0..100); NaN for no values."""
    if not values:
        return math.nan
    ordered = sorted(values)
    if len(ordered) == 1:
        return ordered[0]
    rank = (len(ordered) - 1) * q / 100.0
    low = math.floor(rank)
    high = min(low + 1, len(ordered) - 1)
    return ordered[low] + (ordered[high] - ordered[low]) * (rank - low)


# --------------------------------------------------------------------------------------------
# Tiny blocking HTTP calls (urllib: no event loop, no dependency).
# --------------------------------------------------------------------------------------------

def wait_http_ok(url: str, timeout: float = 30.0, proc: subprocess.Popen | None = None) -> None:
    """Poll until `url` answers 200; fail early if the process died."""
    deadline = time.monotonic() + timeout
    last: Exception | None = None
    while time.monotonic() < deadline:
        if proc is not None and proc.poll() is not None:
            raise RuntimeError(f"process exited with {proc.returncode} before {url} answered")
        try:
            with _HTTP.open(url, timeout=2) as r:
                if r.status == 200:
                    return
        except (urllib.error.URLError, OSError) as exc:
            last = exc
        time.sleep(0.05)
    raise TimeoutError(f"{url} did not answer 200 within {timeout}s: {last}")


def http_json(url: str, body: dict | None = None, timeout: float = 10.0) -> tuple[int, dict]:
    """POST `body` (GET without one); the status and the decoded JSON, errors included."""
    data = None if body is None else json.dumps(body).encode()
    req = urllib.request.Request(url, data=data, headers={"Content-Type": "application/json"})
    try:
        with _HTTP.open(req, timeout=timeout) as r:
            return r.status, json.loads(r.read() or b"{}")
    except urllib.error.HTTPError as exc:
        raw = exc.read()
        try:
            return exc.code, json.loads(raw or b"{}")
        except ValueError:
            return exc.code, {"raw": raw.decode(errors="replace")}


def http_text(url: str, timeout: float = 10.0) -> str:
    with _HTTP.open(url, timeout=timeout) as r:
        return r.read().decode()


def metric_value(metrics_text: str, name: str, labels: dict[str, str] | None = None) -> float:
    """Sum of the samples of `name` whose labels include `labels` (Prometheus text)."""
    total = 0.0
    for line in metrics_text.splitlines():
        if not line.startswith(name) or line.startswith("#"):
            continue
        head, _, value = line.rpartition(" ")
        metric, _, label_text = head.partition("{")
        if metric != name:
            continue
        if labels and not all(f'{k}="{v}"' in label_text for k, v in labels.items()):
            continue
        total += float(value)
    return total


# --------------------------------------------------------------------------------------------
# `modelfleet sim` as a subprocess.
# --------------------------------------------------------------------------------------------

def sim_argv(port: int, model: str, kind: str = "chat", host: str = HOST,
             **flags: object) -> list[str]:
    """`python -m modelfleet sim ...`; flags by name (speed=50 -> --speed 50, True -> bare)."""
    argv = [sys.executable, "-m", "modelfleet", "sim", "--host", host, "--port", str(port),
            "--model", model, "--kind", kind]
    for key, value in flags.items():
        flag = "--" + key.replace("_", "-")
        if value is True:
            argv.append(flag)
        elif value is not False and value is not None:
            argv += [flag, str(value)]
    return argv


def die_with_parent() -> None:
    """In the child before exec: ask Linux to SIGTERM it when its parent goes away."""
    with contextlib.suppress(Exception):
        libc = ctypes.CDLL("libc.so.6", use_errno=True)
        libc.prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG


class SimProcess:
    """One `modelfleet sim` on a loopback port, in a process group of its own.

    Its own group, so a Ctrl-C at the terminal reaches only whoever started it, which then
    stops it in order; on Linux it also gets SIGTERM if its starter dies without stopping it.
    Its output goes to `log_path`, or to a pipe (`stderr_text()`) without one.
    """

    def __init__(self, port: int, model: str = "m", kind: str = "chat", *, host: str = HOST,
                 flags: Mapping[str, object] | None = None, log_path: Path | None = None) -> None:
        self.port = port
        self.model = model
        self.kind = kind
        self.host = host
        self.flags = dict(flags or {})
        self.log_path = log_path
        self.argv = sim_argv(port, model, kind, host, **self.flags)
        self.proc: subprocess.Popen | None = None

    @property
    def url(self) -> str:
        return f"http://{self.host}:{self.port}"

    @property
    def address(self) -> str:
        return f"{self.host}:{self.port}"

    @property
    def alive(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def spawn(self) -> SimProcess:
        """Start it; /health answers soon after (wait_ready)."""
        env = {**os.environ, "PYTHONUNBUFFERED": "1"}
        # The parent-death signal follows the thread that started the child, and a pool's
        # thread ends long before the sim should: only from the main thread.
        tied = sys.platform.startswith("linux") and threading.current_thread() is threading.main_thread()
        preexec = die_with_parent if tied else None
        if self.log_path is not None:
            with self.log_path.open("ab") as log:
                self.proc = subprocess.Popen(
                    self.argv, stdin=subprocess.DEVNULL, stdout=log, stderr=log, env=env,
                    start_new_session=True, preexec_fn=preexec)
        else:
            self.proc = subprocess.Popen(
                self.argv, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                stderr=subprocess.PIPE, env=env, start_new_session=True, preexec_fn=preexec)
        return self

    def wait_ready(self, timeout: float = 30.0) -> SimProcess:
        """Until /health answers 200; RuntimeError with its output if it died or never did."""
        assert self.proc is not None, "spawn() it first"
        try:
            wait_http_ok(f"{self.url}/health", timeout=timeout, proc=self.proc)
        except (RuntimeError, TimeoutError) as exc:
            self.stop()
            output = self.output()
            self.close()
            raise RuntimeError(f"sim did not start: {exc}\n{output}") from None
        return self

    def output(self) -> str:
        """What it wrote (after it stopped, when it writes to a pipe)."""
        if self.log_path is not None:
            try:
                return self.log_path.read_text(errors="replace")
            except OSError:
                return ""
        if self.proc is not None and self.proc.stderr is not None and self.proc.poll() is not None:
            return self.proc.stderr.read().decode(errors="replace")
        return ""

    def fault(self, **fault: object) -> dict:
        status, body = http_json(f"{self.url}/sim/fault", fault)
        assert status == 200, body
        return body

    def metrics(self) -> str:
        return http_text(f"{self.url}/metrics")

    def metric(self, name: str, labels: dict[str, str] | None = None) -> float:
        return metric_value(self.metrics(), name, labels)

    def kill(self) -> None:
        """SIGKILL the whole group, as a crashed server dies."""
        if self.proc is not None and self.proc.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(self.proc.pid, signal.SIGKILL)
            self.proc.wait(timeout=10)

    def close(self) -> None:
        """Stop it and close its pipe (what it wrote is gone then)."""
        self.stop()
        if self.proc is not None and self.proc.stderr is not None:
            self.proc.stderr.close()

    def stop(self) -> None:
        """SIGTERM its group, SIGKILL after 5 s; its pipe stays readable."""
        proc = self.proc
        if proc is None:
            return
        if proc.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, signal.SIGTERM)
            try:
                proc.wait(timeout=5)
            except subprocess.TimeoutExpired:
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(proc.pid, signal.SIGKILL)
                proc.wait(timeout=5)


# --------------------------------------------------------------------------------------------
# `modelfleet gateway` as a subprocess.
# --------------------------------------------------------------------------------------------

@contextlib.contextmanager
def running(sims: Iterable[SimProcess]) -> Iterator[list[SimProcess]]:
    """Start every sim, then wait for each (so they boot side by side), and stop them all
    however the block ends, one that never came up included."""
    started: list[SimProcess] = []
    try:
        for sim in sims:
            started.append(sim if sim.proc is not None else sim.spawn())
        for sim in started:
            sim.wait_ready()
        yield started
    finally:
        for sim in started:
            sim.close()


class GatewayProcess:
    """`modelfleet gateway -c FILE --port PORT ...` on loopback, always stopped.

    Its own process group (as SimProcess); stderr (its status and access lines) goes to
    `log_path`. `stop()` sends SIGTERM to the gateway itself, which drains and exits 0.
    """

    def __init__(self, config: Path, port: int, *, args: Sequence[str] = (),
                 log_path: Path | None = None, env: Mapping[str, str] | None = None) -> None:
        self.port = port
        self.log_path = log_path
        self.argv = [sys.executable, "-m", "modelfleet", "gateway", "-c", str(config),
                     "--host", HOST, "--port", str(port), *args]
        self.env = {**os.environ, "PYTHONUNBUFFERED": "1", **(env or {})}
        self.proc: subprocess.Popen | None = None

    @property
    def url(self) -> str:
        return f"http://{HOST}:{self.port}"

    def spawn(self) -> GatewayProcess:
        tied = sys.platform.startswith("linux") and threading.current_thread() is threading.main_thread()
        err = self.log_path.open("ab") if self.log_path is not None else subprocess.DEVNULL
        try:
            self.proc = subprocess.Popen(self.argv, stdin=subprocess.DEVNULL,
                                         stdout=subprocess.DEVNULL, stderr=err, env=self.env,
                                         start_new_session=True,
                                         preexec_fn=die_with_parent if tied else None)
        finally:
            if self.log_path is not None:
                err.close()  # type: ignore[union-attr]
        return self

    def wait_ready(self, timeout: float = 60.0) -> GatewayProcess:
        """Until GET /livez answers (it listens after measuring the fleet)."""
        assert self.proc is not None, "spawn() it first"
        try:
            wait_http_ok(f"{self.url}/livez", timeout=timeout, proc=self.proc)
        except (RuntimeError, TimeoutError) as exc:
            self.kill()
            raise RuntimeError(f"gateway did not start: {exc}\n{self.output()}") from None
        return self

    def output(self) -> str:
        if self.log_path is None:
            return ""
        try:
            return self.log_path.read_text(errors="replace")
        except OSError:
            return ""

    def stop(self, timeout: float = 30.0) -> int | None:
        """SIGTERM (a drain), then SIGKILL to the group if it is still there after `timeout`."""
        proc = self.proc
        if proc is None:
            return None
        if proc.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(timeout=timeout)
            except subprocess.TimeoutExpired:
                self.kill()
        return proc.returncode

    def kill(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(self.proc.pid, signal.SIGKILL)
            self.proc.wait(timeout=10)

"""The launcher as a user runs it: `python serve_pipeline.py` as a subprocess, sim servers on 127.0.0.1.

Every test polls for what it expects with a deadline, and kills the launcher's
whole process tree (every process it ever saw) at teardown, whatever happened.
"""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import psutil
import pytest
from helpers import ROOT, free_port, http_json, wait_http_ok, write_fleet

pytestmark = pytest.mark.timeout(90)

GRACE_S = 4.0
API_KEY = "sk-launcher-test-7f3a"


def alive(p: psutil.Process) -> bool:
    """Running and not a zombie (an orphaned zombie waits for init, but holds nothing)."""
    try:
        return p.is_running() and p.status() != psutil.STATUS_ZOMBIE
    except psutil.Error:
        return False


class Launcher:
    """A running `serve_pipeline.py`, its output, and every process seen under it."""

    def __init__(self, tmp_path: Path, config: Path, *flags: str) -> None:
        self.tmp_path = tmp_path
        self.log_dir = tmp_path / "logs"
        self.out_path = tmp_path / "launcher.out"
        self._out = self.out_path.open("w")
        argv = [sys.executable, str(ROOT / "serve_pipeline.py"), "-c", str(config),
                "--log-dir", str(self.log_dir), "--grace-s", str(GRACE_S), "--poll-s", "0.05",
                "--backoff-s", "0.1", "--startsecs", "1", *flags]
        self.proc = subprocess.Popen(argv, stdout=self._out, stderr=subprocess.STDOUT, cwd=tmp_path,
                                     env={**os.environ, "PYTHONUNBUFFERED": "1"})
        self.root = psutil.Process(self.proc.pid)
        self.seen: dict[int, psutil.Process] = {self.proc.pid: self.root}

    def output(self) -> str:
        return self.out_path.read_text()

    def tree(self) -> list[psutil.Process]:
        """The launcher's descendants now (guards, engines, their workers), remembered for teardown."""
        try:
            procs = self.root.children(recursive=True)
        except psutil.Error:
            procs = []
        for p in procs:
            self.seen.setdefault(p.pid, p)
        return [p for p in procs if alive(p)]

    def wait_for(self, pattern: str, timeout: float = 30.0, count: int = 1) -> list[re.Match]:
        """Wait until `pattern` matches `count` times in the output; fail early if the launcher exits."""
        deadline = time.monotonic() + timeout
        while True:
            self.tree()
            found = list(re.finditer(pattern, self.output()))
            if len(found) >= count:
                return found
            if self.proc.poll() is not None:
                pytest.fail(f"launcher exited ({self.proc.returncode}) before {pattern!r}:\n{self.output()}")
            if time.monotonic() >= deadline:
                pytest.fail(f"no {pattern!r} x{count} within {timeout}s:\n{self.output()}")
            time.sleep(0.05)

    def running_pid(self, label: str, count: int = 1) -> int:
        """The engine pid from the `count`-th RUNNING line of a server."""
        found = self.wait_for(re.escape(label) + r" RUNNING \(pid (\d+)", count=count)
        return int(found[count - 1].group(1))

    def kill_everything(self) -> None:
        self.tree()
        for p in self.seen.values():
            try:
                p.kill()  # psutil checks the pid still names the same process
            except psutil.Error:
                pass
        try:
            self.proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            pass
        self._out.close()


@pytest.fixture
def launch(tmp_path: Path):
    started: list[Launcher] = []

    def _launch(config: Path, *flags: str) -> Launcher:
        launcher = Launcher(tmp_path, config, *flags)
        started.append(launcher)
        return launcher

    yield _launch
    for launcher in started:
        launcher.kill_everything()
    for launcher in started:
        # A move the state table refuses (or any other bug) is logged as "supervision failed".
        assert "supervision failed" not in launcher.output(), launcher.output()


def sim_model(*ports: int, **extra: object) -> dict:
    model = {"kind": "chat", "backend": "sim", "sim": {"speed": 1000},
             "servers": [{"host": "127.0.0.1", "port": p} for p in ports]}
    model.update(extra)
    return model


def wait_gone(procs: list[psutil.Process], timeout: float) -> list[psutil.Process]:
    deadline = time.monotonic() + timeout
    while True:
        left = [p for p in procs if alive(p)]
        if not left or time.monotonic() >= deadline:
            return left
        time.sleep(0.05)


def cmdline(pid: int) -> str:
    return " ".join(psutil.Process(pid).cmdline())


def test_two_sims_start_together_keep_the_key_secret_and_sigterm_stops_every_process(tmp_path, launch):
    a, b = free_port(), free_port()
    config = write_fleet(tmp_path / "fleet.yaml", {
        "chat": sim_model(a, b, api_key=API_KEY, backend_args={"fork-worker": True}),
    })
    ready_file = tmp_path / "ready.json"
    launcher = launch(config, "--ready-file", str(ready_file))
    launcher.wait_for(r"all 2 servers RUNNING")
    out = launcher.output()
    for port in (a, b):
        assert re.search(rf"chat 127\.0\.0\.1:{port} RUNNING \(pid \d+, ready in [\d.]+ s\)", out)
        wait_http_ok(f"http://127.0.0.1:{port}/health", timeout=5)
    # Concurrent: the second was spawned before the first was ready. One after the other,
    # their spawn times would lie at least one readiness time apart.
    ready_in = [float(x) for x in re.findall(r" RUNNING \(pid \d+, ready in ([\d.]+) s\)", out)]
    spawned = [psutil.Process(launcher.running_pid(f"chat 127.0.0.1:{p}")).create_time()
               for p in (a, b)]
    assert out.count(" STARTING (") == 2
    assert abs(spawned[0] - spawned[1]) < min(ready_in)
    assert ready_file.exists()

    # The key reaches the engine through its environment: required on the wire, absent from
    # `ps`, from the launcher's output and from the server logs.
    status, _ = http_json(f"http://127.0.0.1:{a}/v1/models")
    assert status == 401
    request = urllib.request.Request(f"http://127.0.0.1:{a}/v1/models",
                                     headers={"Authorization": f"Bearer {API_KEY}"})
    with urllib.request.urlopen(request, timeout=5) as response:
        assert response.status == 200
    engines = [launcher.running_pid(f"chat 127.0.0.1:{p}") for p in (a, b)]
    for pid in engines:
        assert API_KEY not in cmdline(pid)
    logs = "".join(p.read_text() for p in launcher.log_dir.glob("*.log"))
    assert API_KEY not in out and API_KEY not in logs

    # Each engine forked a worker (a grandchild of its guard): SIGTERM must take those too.
    procs = launcher.tree()
    workers = [p for p in procs if p.ppid() in engines]
    assert len(workers) == 2, [p.cmdline() for p in procs]
    launcher.proc.send_signal(signal.SIGTERM)
    assert launcher.proc.wait(timeout=GRACE_S + 20) == 0
    left = wait_gone(procs, timeout=GRACE_S)
    assert not left, [p.cmdline() for p in left]
    assert "all servers stopped" in launcher.output()
    assert not ready_file.exists()


def test_sigkill_of_the_launcher_takes_every_server_process_down(tmp_path, launch):
    a, b = free_port(), free_port()
    config = write_fleet(tmp_path / "fleet.yaml", {
        "chat": sim_model(a, b, backend_args={"fork-worker": True}),
    })
    launcher = launch(config)
    launcher.wait_for(r"all 2 servers RUNNING")
    procs = launcher.tree()
    assert len(procs) == 6, [p.cmdline() for p in procs]  # per server: guard, engine, worker
    launcher.proc.kill()
    launcher.proc.wait(timeout=10)
    left = wait_gone(procs, timeout=GRACE_S + 10)
    assert not left, [p.cmdline() for p in left]


def write_gpus(path: Path, free_gb: float) -> None:
    """Rewrite the described GPUs atomically, so the launcher never reads half a file."""
    tmp = path.with_suffix(".tmp")
    tmp.write_text(f"gpus:\n  - {{index: 0, name: H100, total_gb: 80, free_gb: {free_gb}}}\n")
    os.replace(tmp, path)


def test_waits_for_described_gpu_memory_then_starts_replicas_on_one_gpu_one_at_a_time(tmp_path, launch):
    # Sim servers that list a GPU and min_free_memory_gb wait like real engines would;
    # the described file is re-read on every poll.
    ports = free_port(), free_port()
    gpus = tmp_path / "gpus.yaml"
    write_gpus(gpus, 10)
    model = sim_model(*ports)
    for server in model["servers"]:
        server.update(gpus=[0], min_free_memory_gb=30)
    config = write_fleet(tmp_path / "fleet.yaml", {"chat": model})
    launcher = launch(config, "--fake-gpus", str(gpus))
    labels = [f"chat 127.0.0.1:{port}" for port in ports]
    for label in labels:
        launcher.wait_for(re.escape(label) + r" WAITING_GPU \(needs 30\.0 GB free on simulated GPU 0 "
                          r"\(H100\), which has 10\.0 of 80\.0 GB free\)")
    write_gpus(gpus, 20)  # better, still not enough: one more line each, with the new numbers
    launcher.wait_for(r"still WAITING_GPU \(.*which has 20\.0 of 80\.0 GB free\)", count=2)
    for port in ports:
        with pytest.raises(OSError):
            urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=1)
    write_gpus(gpus, 70)
    launcher.wait_for(r"all 2 servers RUNNING")
    for port in ports:
        wait_http_ok(f"http://127.0.0.1:{port}/health", timeout=5)
    out = launcher.output()
    # Many polls went by (every 0.05 s) but only the changes were logged.
    assert out.count("WAITING_GPU") == 4
    assert "simulated GPUs described in" in out and "simulated GPU memory" in out
    # One GPU: the second start began only once the first server was ready.
    events = re.findall(r"(STARTING|RUNNING) \(pid", out)
    assert events == ["STARTING", "RUNNING", "STARTING", "RUNNING"], out


def test_killed_server_restarts_and_a_crash_loop_ends_fatal_while_the_other_stays_up(tmp_path, launch):
    good, bad = free_port(), free_port()
    config = write_fleet(tmp_path / "fleet.yaml", {
        "good": sim_model(good, backend_args={"fork-worker": True}),
        "bad": sim_model(bad, backend_args={"no-such-flag": 1}),
    })
    launcher = launch(config, "--startretries", "2")
    good_label, bad_label = f"good 127.0.0.1:{good}", f"bad 127.0.0.1:{bad}"
    first = launcher.running_pid(good_label)

    fatal = launcher.wait_for(re.escape(bad_label) + r" FATAL: (.*)\n((?:  \|.*\n)+)")[0]
    assert "exited with code 2 before it was ready" in fatal.group(1)
    assert "2 failed starts in a row" in fatal.group(1)
    assert "unrecognized arguments: --no-such-flag" in fatal.group(2)  # the tail of its log
    assert launcher.output().count(f"{bad_label} STARTING") == 2

    # kill -9 leaves the engine no chance to stop its worker: the guard must find and end it.
    worker = [p for p in launcher.tree() if p.ppid() == first]
    assert len(worker) == 1
    os.kill(first, signal.SIGKILL)
    launcher.wait_for(re.escape(good_label) + r" BACKOFF \(killed by SIGKILL after")
    assert not wait_gone(worker, timeout=GRACE_S)
    second = launcher.running_pid(good_label, count=2)
    assert second != first
    wait_http_ok(f"http://127.0.0.1:{good}/health", timeout=5)
    assert launcher.proc.poll() is None


def test_sighup_starts_added_servers_and_stops_removed_ones_keeping_the_rest(tmp_path, launch):
    a, b, c = free_port(), free_port(), free_port()
    path = tmp_path / "fleet.yaml"
    write_fleet(path, {"chat": sim_model(a, b, backend_args={"fork-worker": True})})
    launcher = launch(path)
    launcher.wait_for(r"all 2 servers RUNNING")
    pid_a, pid_b = (launcher.running_pid(f"chat 127.0.0.1:{p}") for p in (a, b))

    write_fleet(path, {"chat": sim_model(a, b, backend_args={"fork-worker": True}),
                       "extra": sim_model(c, backend_args={"fork-worker": True})})
    launcher.proc.send_signal(signal.SIGHUP)
    launcher.wait_for(r"reloaded: 1 added, 0 removed, 0 changed \(restarted\), 2 unchanged")
    launcher.running_pid(f"extra 127.0.0.1:{c}")
    wait_http_ok(f"http://127.0.0.1:{c}/health", timeout=5)
    assert all(alive(psutil.Process(pid)) for pid in (pid_a, pid_b))

    b_procs = [psutil.Process(pid_b), *psutil.Process(pid_b).children(recursive=True)]
    write_fleet(path, {"chat": sim_model(a, backend_args={"fork-worker": True}),
                       "extra": sim_model(c, backend_args={"fork-worker": True})})
    launcher.proc.send_signal(signal.SIGHUP)
    launcher.wait_for(r"reloaded: 0 added, 1 removed, 0 changed \(restarted\), 2 unchanged")
    launcher.wait_for(rf"chat 127\.0\.0\.1:{b} STOPPED")
    assert not wait_gone(b_procs, timeout=GRACE_S)
    assert alive(psutil.Process(pid_a))
    assert launcher.output().count(f"chat 127.0.0.1:{a} STARTING") == 1  # never restarted

    path.write_text("models: [this is not a fleet\n")
    launcher.proc.send_signal(signal.SIGHUP)
    launcher.wait_for(r"reload failed, the servers keep running as they are")
    assert alive(psutil.Process(pid_a))


@pytest.mark.skipif(len(os.sched_getaffinity(0)) < 2 if hasattr(os, "sched_getaffinity") else True,
                    reason="pinning to CPU 0 is only observable with 2 or more usable CPUs")
def test_cpus_pin_the_whole_engine_and_its_children(tmp_path, launch):
    port = free_port()
    model = sim_model(port, backend_args={"fork-worker": True})
    model["servers"] = [{"host": "127.0.0.1", "port": port, "cpus": [0]}]
    launcher = launch(write_fleet(tmp_path / "fleet.yaml", {"chat": model}))
    engine = launcher.running_pid(f"chat 127.0.0.1:{port}")
    assert psutil.Process(engine).cpu_affinity() == [0]
    workers = [p for p in launcher.tree() if p.ppid() == engine]
    assert workers and all(p.cpu_affinity() == [0] for p in workers)  # inherited
    assert len(launcher.root.cpu_affinity()) > 1  # the launcher itself is not pinned

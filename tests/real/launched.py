"""Real vLLM fleets started the way users start them: `python serve_pipeline.py -c FILE`.

The launcher is a subprocess, exactly as on a GPU host; tests learn that every server is
up from its `--ready-file` (rewritten each time all servers are RUNNING again, so a
restart shows as a new pid for the same address). Stopping is SIGTERM to the launcher,
then a sweep of every process it ever started, so a launcher bug cannot leave 3 GB
engines behind on a 2-core CI machine.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import psutil
from vllm_server import START_TIMEOUT_S, free_port

ROOT = Path(__file__).resolve().parents[2]
VLLM_CPU_ENV = {"VLLM_TARGET_DEVICE": "cpu", "VLLM_CPU_KVCACHE_SPACE": "1"}
VLLM_CPU_ARGS = {"dtype": "float32", "enforce-eager": True, "max-model-len": 512}


def vllm_cpu_model(python: Path | str, model_dir: Path | str, kind: str, cpus: list[int],
                   **backend_args: object) -> dict:
    """A fleet-file model entry for real vLLM-CPU servers, one per core in `cpus`."""
    return {
        "kind": kind,
        "backend": "vllm",
        "device": "cpu",
        "python": str(python),
        "model_path": str(model_dir),
        "env": dict(VLLM_CPU_ENV),
        "backend_args": {**VLLM_CPU_ARGS, **backend_args},
        "servers": [{"host": "127.0.0.1", "port": free_port(), "cpus": [cpu]} for cpu in cpus],
    }


def write_fleet_file(path: Path, models: dict[str, dict], routing: dict | None = None) -> Path:
    from ruamel.yaml import YAML

    doc: dict = {"routing": routing} if routing else {}
    doc["models"] = models
    with path.open("w") as f:
        YAML().dump(doc, f)
    return path


@dataclass
class LaunchedFleet:
    """A running `serve_pipeline.py` and what it reported."""

    proc: subprocess.Popen
    config: Path
    ready_file: Path
    log_dir: Path
    out_path: Path
    seen: dict[int, float] = field(default_factory=dict)  # pid -> create time, for the sweep

    def output(self) -> str:
        return self.out_path.read_text(errors="replace")

    def servers(self) -> dict[str, int]:
        """{address: engine pid} from the ready file ({} while not every server is RUNNING)."""
        try:
            body = json.loads(self.ready_file.read_text())
        except (OSError, ValueError):
            return {}
        return {s["address"]: s["pid"] for s in body["servers"]}

    def wait_running(self, timeout: float = START_TIMEOUT_S,
                     not_pids: frozenset[int] = frozenset()) -> dict[str, int]:
        """Until every server is RUNNING (with none of `not_pids`, to wait for a restart)."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            self.remember_processes()
            if self.proc.poll() is not None:
                raise RuntimeError(f"the launcher exited with {self.proc.returncode}:\n"
                                   f"{self.output()[-4000:]}")
            running = self.servers()
            if running and not (set(running.values()) & not_pids):
                return running
            time.sleep(0.2)
        raise TimeoutError(f"not every server RUNNING within {timeout:.0f}s:\n"
                           f"{self.output()[-4000:]}")

    def remember_processes(self) -> None:
        """Note every descendant (guards, engines, engine workers) for the final sweep."""
        try:
            for child in psutil.Process(self.proc.pid).children(recursive=True):
                try:
                    self.seen.setdefault(child.pid, child.create_time())
                except psutil.Error:
                    pass
        except psutil.Error:
            pass

    def stop(self, timeout: float = 60) -> list[int]:
        """SIGTERM the launcher (it stops its servers); returns the pids it left behind."""
        self.remember_processes()
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout=timeout)
            except subprocess.TimeoutExpired:
                os.killpg(self.proc.pid, signal.SIGKILL)
                self.proc.wait(timeout=10)
        return self.sweep()

    def sweep(self) -> list[int]:
        """SIGKILL whatever the launcher left behind (it should leave nothing); returns them."""
        left = []
        for pid, created in self.seen.items():
            try:
                p = psutil.Process(pid)
                if p.create_time() == created and p.status() != psutil.STATUS_ZOMBIE:
                    # the same process (not a reused pid), and still running
                    p.kill()
                    left.append(pid)
            except psutil.Error:
                pass
        return left


def launch(config: Path, work_dir: Path, *extra: str) -> LaunchedFleet:
    """Start the launcher on `config`; the caller waits with `wait_running` and stops it."""
    ready_file = work_dir / "ready.json"
    log_dir = work_dir / "logs"
    out_path = work_dir / "launcher.out"
    with out_path.open("wb") as out:
        proc = subprocess.Popen(
            [sys.executable, str(ROOT / "serve_pipeline.py"), "-c", str(config),
             "--log-dir", str(log_dir), "--ready-file", str(ready_file), "--grace-s", "10",
             *extra],
            cwd=work_dir, stdout=out, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
            start_new_session=True, env={**os.environ, "PYTHONUNBUFFERED": "1"})
    return LaunchedFleet(proc=proc, config=config, ready_file=ready_file, log_dir=log_dir,
                         out_path=out_path)

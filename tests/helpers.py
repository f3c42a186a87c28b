"""Helpers the tests share: free ports, polling for readiness, tiny HTTP calls, sim processes.

A plain module (not conftest.py) so test files can import it by name: tests/real has a
conftest.py of its own, and two modules named `conftest` cannot both be imported."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
# What real vLLM 0.32.0 servers sent, kept in the repository (tests/fixtures/.../README.md).
FIXTURES = ROOT / "tests" / "fixtures" / "vllm-0.32.0-cpu"


def free_port() -> int:
    """A port nobody listens on right now (the OS picks it)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_http_ok(url: str, timeout: float = 30.0, proc: subprocess.Popen | None = None) -> None:
    """Poll until `url` answers 200; fail early if the process died."""
    deadline = time.monotonic() + timeout
    last: Exception | None = None
    while time.monotonic() < deadline:
        if proc is not None and proc.poll() is not None:
            raise RuntimeError(f"process exited with {proc.returncode} before {url} answered")
        try:
            with urllib.request.urlopen(url, timeout=2) as r:
                if r.status == 200:
                    return
        except (urllib.error.URLError, OSError) as exc:
            last = exc
        time.sleep(0.05)
    raise TimeoutError(f"{url} did not answer 200 within {timeout}s: {last}")


def http_json(url: str, body: dict | None = None, timeout: float = 10.0) -> tuple[int, dict]:
    """A tiny blocking HTTP helper for tests (returns status and decoded JSON)."""
    data = None if body is None else json.dumps(body).encode()
    req = urllib.request.Request(url, data=data, headers={"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(req, timeout=timeout) as r:
            return r.status, json.loads(r.read() or b"{}")
    except urllib.error.HTTPError as exc:
        raw = exc.read()
        try:
            return exc.code, json.loads(raw or b"{}")
        except ValueError:
            return exc.code, {"raw": raw.decode(errors="replace")}


def http_text(url: str, timeout: float = 10.0) -> str:
    with urllib.request.urlopen(url, timeout=timeout) as r:
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


@dataclass
class SimProcess:
    """A running `modelfleet sim` subprocess."""

    proc: subprocess.Popen
    port: int
    model: str
    kind: str
    host: str = "127.0.0.1"
    argv: list[str] = field(default_factory=list)

    @property
    def url(self) -> str:
        return f"http://{self.host}:{self.port}"

    @property
    def address(self) -> str:
        return f"{self.host}:{self.port}"

    def fault(self, **fault: object) -> dict:
        status, body = http_json(f"{self.url}/sim/fault", fault)
        assert status == 200, body
        return body

    def metrics(self) -> str:
        return http_text(f"{self.url}/metrics")

    def metric(self, name: str, labels: dict[str, str] | None = None) -> float:
        return metric_value(self.metrics(), name, labels)

    def kill(self) -> None:
        """SIGKILL, as a crashed server would die."""
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(timeout=10)

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout=5)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(timeout=5)


def sim_argv(port: int, model: str, kind: str, **flags: object) -> list[str]:
    argv = [sys.executable, "-m", "modelfleet", "sim", "--host", "127.0.0.1", "--port", str(port),
            "--model", model, "--kind", kind]
    for key, value in flags.items():
        flag = "--" + key.replace("_", "-")
        if value is True:
            argv.append(flag)
        elif value is not False and value is not None:
            argv += [flag, str(value)]
    return argv


def write_fleet(path: Path, models: dict[str, dict], routing: dict | None = None) -> Path:
    """Write a fleet file from plain dicts (tests build configs around live sims)."""
    from ruamel.yaml import YAML

    doc: dict = {}
    if routing:
        doc["routing"] = routing
    doc["models"] = models
    yaml = YAML()
    with path.open("w") as f:
        yaml.dump(doc, f)
    return path


def run_cli(*args: str, cwd: Path | None = None, env: dict | None = None,
            timeout: float = 60, input: str | None = None) -> subprocess.CompletedProcess:
    """Run `modelfleet ARGS` as a subprocess, as a user would."""
    return subprocess.run([sys.executable, "-m", "modelfleet", *args], cwd=cwd or ROOT,
                          env={**os.environ, **(env or {})}, capture_output=True, text=True,
                          timeout=timeout, input=input)

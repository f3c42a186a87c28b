"""The access log: one line per request, written when its answer (or stream) ended.

What it holds: method, path, the model asked for, the server that answered, status,
latency, tokens in and out, attempts, whether it streamed (and `continued=N` when a
stream moved to another server N times after a break). Never a key, a header or
a prompt: the only text from the client is the model name, cut short and kept on one line.
"""

from __future__ import annotations

import logging
import time

log = logging.getLogger("modelfleet.gateway.access")

CLIENT_GONE = 499  # the status logged for a client that left before its answer ended


def _clean(text: object, limit: int = 64) -> str:
    shown = str(text)[:limit]
    if shown.isprintable() and " " not in shown:  # (the usual case, checked in C)
        return shown or "-"
    return "".join(c if c.isprintable() and not c.isspace() else "?" for c in shown) or "-"


class Access:
    """What one request did, filled in as it goes, written once by `done()`."""

    __slots__ = ("method", "path", "started", "model", "server", "status", "tokens_in",
                 "tokens_out", "attempts", "stream", "error", "continued")

    def __init__(self, method: str, path: str) -> None:
        self.method = method
        self.path = path
        self.started = time.perf_counter()
        self.model = "-"
        self.server = "-"
        self.status = 0
        self.tokens_in: int | None = None
        self.tokens_out: int | None = None
        self.attempts = 0
        self.stream = False
        self.error: str | None = None  # what went wrong after the status went out
        self.continued = 0  # times a stream moved to another server after a break

    def usage(self, usage: object) -> None:
        if isinstance(usage, dict):
            self.tokens_in = usage.get("prompt_tokens")
            self.tokens_out = usage.get("completion_tokens")

    def done(self, status: int) -> None:
        self.status = status
        if not log.isEnabledFor(logging.INFO):
            return
        latency_ms = (time.perf_counter() - self.started) * 1000.0
        tokens_in = "-" if self.tokens_in is None else self.tokens_in
        tokens_out = "-" if self.tokens_out is None else self.tokens_out
        error = f" error={self.error}" if self.error else ""
        if self.continued:
            error = f" continued={self.continued:d}{error}"
        # One string, no arguments left for logging to format.
        log.info(f"{self.method} {self.path} model={_clean(self.model)} server={self.server} "
                 f"status={status:d} latency_ms={latency_ms:.1f} tokens_in={tokens_in} "
                 f"tokens_out={tokens_out} attempts={self.attempts:d} "
                 f"stream={'yes' if self.stream else 'no'}{error}")

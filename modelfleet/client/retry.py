"""One request's retries as a value, in the spirit of urllib3's `Retry`.

A `RetryState` says what was tried (each server and why it failed), what is left
(attempts) and, once retrying stopped, why it stopped. It never changes: each failure
gives the next state (`increment`), so the retry loop carries no loose counters, and
`NoServerAvailable` is written from it, saying what each server did.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass, replace

from modelfleet.errors import NoServerAvailable
from modelfleet.routing import Failure


@dataclass(frozen=True)
class Tried:
    """One failed attempt: where, and why."""

    server: str  # host:port
    failure: Failure
    reason: str


@dataclass(frozen=True)
class RetryState:
    """A request's attempts so far and what is left of them."""

    attempts_left: int  # including the one about to be made
    history: tuple[Tried, ...] = ()
    excluded: tuple[str, ...] = ()  # servers tried, each once: the next attempt goes elsewhere
    stopped: str | None = None  # why no further attempt was made (None: still going)

    @classmethod
    def first(cls, max_retry: int) -> RetryState:
        """Before the first attempt: `max_retry` attempts in all (at least one)."""
        return cls(attempts_left=max(1, max_retry))

    @property
    def attempts(self) -> int:
        """Attempts made (and failed) so far."""
        return len(self.history)

    def increment(self, server: str, failure: Failure, reason: str) -> RetryState:
        """The state after an attempt on `server` failed."""
        excluded = self.excluded if server in self.excluded else (*self.excluded, server)
        return RetryState(attempts_left=self.attempts_left - 1,
                          history=(*self.history, Tried(server, failure, reason)),
                          excluded=excluded)

    def is_exhausted(self) -> bool:
        return self.attempts_left <= 0

    def stop(self, why: str) -> RetryState:
        """No further attempt, for this reason (the retry budget, max_retry, no server)."""
        return replace(self, stopped=why)

    def reasons(self, servers: Iterable[str], known: Mapping[str, str]) -> dict[str, str]:
        """Per server: its last failure in this request (with how many attempts it took),
        else why the pool would not use it (`known`), else why it was not tried."""
        tried: dict[str, tuple[str, int]] = {}
        for attempt in self.history:
            count = tried.get(attempt.server, ("", 0))[1]
            tried[attempt.server] = (attempt.reason, count + 1)
        not_tried = f"not tried: {self.stopped}" if self.stopped else "not tried"
        why: dict[str, str] = {}
        for server in servers:
            if server in tried:
                reason, count = tried[server]
                why[server] = reason if count == 1 else f"{reason} ({count} attempts)"
            else:
                why[server] = known.get(server, not_tried)
        return why

    def error(self, model: str, servers: Iterable[str],
              known: Mapping[str, str]) -> NoServerAvailable:
        """What the caller gets when no attempt succeeded."""
        return NoServerAvailable(model, self.reasons(servers, known))

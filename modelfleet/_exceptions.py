"""The one map from transport trouble to routing failures.

A server that refuses, resets, breaks off or goes silent has failed in a way another
server might not: the client retries elsewhere. Every transport raises whatever its
library raises (aiohttp, asyncio, OSError); this table, and only this table, says which
routing `Failure` each one is and puts it in a few plain words. The transports catch
`TRANSPORT_ERRORS` and raise `engine_failure(exc)`, or wrap a block in `map_exceptions`
(as httpx's `_exceptions.py` does).
"""

from __future__ import annotations

import asyncio
import os
from collections.abc import Callable

import aiohttp

from modelfleet.routing import Failure


class EngineFailure(Exception):
    """One server failed in a way another server might not; the client retries elsewhere.

    Internal to modelfleet: callers see `NoServerAvailable` (with these reasons) only
    when every attempt failed.
    """

    def __init__(self, failure: Failure, reason: str, *, retry_after_s: float | None = None,
                 status: int | None = None) -> None:
        super().__init__(reason)
        self.failure = failure
        self.reason = reason
        self.retry_after_s = retry_after_s
        self.status = status


def _os_reason(exc: BaseException) -> str:
    if isinstance(exc, OSError) and exc.errno:
        return os.strerror(exc.errno)
    return str(exc) or type(exc).__name__


def _timeout_reason(exc: BaseException, stall_s: float | None, whole_s: float | None) -> str:
    if whole_s is not None:
        return f"no whole answer within {whole_s:.1f} s (answer deadline)"
    if isinstance(exc, aiohttp.ServerTimeoutError):  # sock_read: the stall deadline
        silent = f" for {stall_s:.1f} s" if stall_s is not None else ""
        return f"went silent{silent} (stall deadline)"
    return "no complete answer within request_timeout_s"


def _connect_reason(exc: BaseException, stall_s: float | None, whole_s: float | None) -> str:
    os_error = getattr(exc, "os_error", exc)
    return f"cannot connect ({_os_reason(os_error)})"


_Reason = Callable[[BaseException, "float | None", "float | None"], str]

# First match wins: the timeouts come first (in Python 3.11+ they are OSErrors too).
_TABLE: tuple[tuple[type[BaseException], Failure, _Reason], ...] = (
    *(((aiohttp.ConnectionTimeoutError, Failure.TIMEOUT,  # aiohttp >= 3.10
        lambda e, s, w: "could not connect in time"),)
      if hasattr(aiohttp, "ConnectionTimeoutError") else ()),
    (asyncio.TimeoutError, Failure.TIMEOUT, _timeout_reason),
    (aiohttp.ClientConnectorError, Failure.REFUSED, _connect_reason),
    (aiohttp.ServerDisconnectedError, Failure.REFUSED, lambda e, s, w: "closed the connection"),
    (aiohttp.ClientPayloadError, Failure.REFUSED, lambda e, s, w: "the reply broke off"),
    (OSError, Failure.REFUSED, lambda e, s, w: _os_reason(e)),
    (aiohttp.ClientError, Failure.REFUSED, lambda e, s, w: f"{type(e).__name__}: {e}"),
)

TRANSPORT_ERRORS: tuple[type[BaseException], ...] = (aiohttp.ClientError, asyncio.TimeoutError,
                                                     OSError)


def engine_failure(exc: BaseException, *, stall_s: float | None = None,
                   whole_s: float | None = None) -> EngineFailure:
    """The routing failure of one of `TRANSPORT_ERRORS`. `stall_s` and `whole_s` (the
    deadlines the request ran under) only make a timeout's reason say which one struck."""
    for kind, failure, reason in _TABLE:
        if isinstance(exc, kind):
            return EngineFailure(failure, reason(exc, stall_s, whole_s))
    return EngineFailure(Failure.REFUSED, f"{type(exc).__name__}: {exc}")


class map_exceptions:  # noqa: N801 - used as a context manager, named like one
    """`with map_exceptions(stall_s=...):` raises `EngineFailure` for transport errors."""

    __slots__ = ("stall_s", "whole_s")

    def __init__(self, *, stall_s: float | None = None, whole_s: float | None = None) -> None:
        self.stall_s = stall_s
        self.whole_s = whole_s

    def __enter__(self) -> None:
        return None

    def __exit__(self, kind: type[BaseException] | None, exc: BaseException | None,
                 tb: object) -> None:
        if exc is not None and isinstance(exc, TRANSPORT_ERRORS):
            raise engine_failure(exc, stall_s=self.stall_s, whole_s=self.whole_s) from None

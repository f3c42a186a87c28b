"""Faults injected into a running sim through `POST /sim/fault`.

Tests and benchmarks need servers that slow down, fail, refuse under load or
go silent, on demand and while they run, to see the client notice and move
on. A fault request merges into the current faults, so `{"slowdown": 3}` then
`{"error_rate": 0.5}` leaves both on; `{"reset": true}` clears everything
(and releases hung requests with a 503).

| key | effect on /v1/* requests |
| --- | --- |
| `slowdown` F (> 0) | every simulated time is multiplied by F |
| `error_rate` p, `error_status` S | a fraction p of requests fail at once with S (default 500) |
| `hang` true | requests are accepted and never answered, not even headers |
| `stall_after_tokens` N | a reply goes silent after N tokens (headers and N deltas sent) |
| `disconnect_after_tokens` N | the connection is dropped after N tokens, no end of reply |
| `stall_fraction` p, `stall_s` S | a fraction p of generations go silent S seconds before their first token (default 1 s), then go on normally |

`/health`, `/metrics` and `/sim/*` are never affected: a test must be able to
see a faulty server is alive, and to clear the fault.
"""

from __future__ import annotations

import asyncio
import random
from typing import Any

_ERROR_TYPES = {
    400: "BadRequestError",
    401: "AuthenticationError",
    403: "PermissionDeniedError",
    404: "NotFoundError",
    408: "RequestTimeoutError",
    429: "RateLimitError",
    500: "InternalServerError",
    502: "BadGatewayError",
    503: "ServiceUnavailableError",
    504: "GatewayTimeoutError",
}


def error_type(status: int) -> str:
    """The OpenAI-style `type` for an error status (vLLM names 400 and 404 this way too)."""
    return _ERROR_TYPES.get(status, "InternalServerError" if status >= 500 else "BadRequestError")


class FaultError(ValueError):
    """A `/sim/fault` body that does not make sense; the message says which key and why."""


class Faults:
    """The current faults of one sim, changed at runtime (hence mutable, unlike settings)."""

    def __init__(self, seed: int) -> None:
        self._rng = random.Random(seed)
        self._released: asyncio.Future[None] | None = None
        self.clear()

    def clear(self) -> None:
        self.slowdown = 1.0
        self.error_rate = 0.0
        self.error_status = 500
        self.hang = False
        self.stall_after_tokens: int | None = None
        self.disconnect_after_tokens: int | None = None
        self.stall_fraction = 0.0
        self.stall_s = 1.0

    def as_dict(self) -> dict[str, Any]:
        return {
            "slowdown": self.slowdown,
            "error_rate": self.error_rate,
            "error_status": self.error_status,
            "hang": self.hang,
            "stall_after_tokens": self.stall_after_tokens,
            "disconnect_after_tokens": self.disconnect_after_tokens,
            "stall_fraction": self.stall_fraction,
            "stall_s": self.stall_s,
        }

    def merge(self, body: object) -> None:
        """Apply a fault request; all of it or, when any key is wrong, none of it."""
        if not isinstance(body, dict):
            raise FaultError("the fault must be a JSON object, e.g. {\"slowdown\": 10}")
        known = set(self.as_dict()) | {"reset"}
        unknown = sorted(set(body) - known)
        if unknown:
            raise FaultError(f"unknown fault key(s) {', '.join(unknown)}; known: {', '.join(sorted(known))}")
        staged = self.as_dict()
        if body.get("reset") is True:
            self.release_hung()
            self.clear()
            staged = self.as_dict()
        elif "reset" in body and body["reset"] is not False:
            raise FaultError("reset: must be true or false")
        for key, value in body.items():
            if key != "reset":
                staged[key] = _checked(key, value)
        was_hanging = self.hang
        for key, value in staged.items():
            setattr(self, key, value)
        if was_hanging and not self.hang:
            self.release_hung()

    def should_fail(self) -> bool:
        return self.error_rate > 0 and self._rng.random() < self.error_rate

    def stall(self) -> float:
        """Seconds this generation stays silent before its first token (0: none)."""
        if self.stall_fraction > 0 and self._rng.random() < self.stall_fraction:
            return self.stall_s
        return 0.0

    async def wait_released(self) -> None:
        """Block a hung request until `reset` (or `hang: false`) releases it; raises then."""
        if self._released is None or self._released.done():
            self._released = asyncio.get_running_loop().create_future()
        await asyncio.shield(self._released)
        raise HangReleased

    def release_hung(self) -> None:
        if self._released is not None and not self._released.done():
            self._released.set_result(None)
        self._released = None


class HangReleased(Exception):
    """A hung request was let go by a reset; it is answered with a 503."""


def _checked(key: str, value: object) -> object:
    if key == "slowdown":
        if not _is_number(value) or value <= 0:
            raise FaultError(f"slowdown: must be a number > 0 (1 = normal speed), got {value!r}")
        return float(value)
    if key in ("error_rate", "stall_fraction"):
        if not _is_number(value) or not 0 <= value <= 1:
            raise FaultError(f"{key}: must be a number from 0 to 1, got {value!r}")
        return float(value)
    if key == "stall_s":
        if not _is_number(value) or value < 0:
            raise FaultError(f"stall_s: must be a number of seconds >= 0, got {value!r}")
        return float(value)
    if key == "error_status":
        if not isinstance(value, int) or isinstance(value, bool) or not 400 <= value <= 599:
            raise FaultError(f"error_status: must be an HTTP error status 400..599, got {value!r}")
        return value
    if key == "hang":
        if not isinstance(value, bool):
            raise FaultError(f"hang: must be true or false, got {value!r}")
        return value
    # stall_after_tokens / disconnect_after_tokens
    if value is not None and (not isinstance(value, int) or isinstance(value, bool) or value < 0):
        raise FaultError(f"{key}: must be a token count >= 0 or null, got {value!r}")
    return value


def _is_number(value: object) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)

"""How a response that is read as it comes ends: released at its end, closed when left.

A stream (`TokenStream`, `RawStream`) either reads to its end, and its connection goes
back to the pool, or is left early and its connection is closed, which is how engines
learn to abort the request. Either way its connection slot is given back exactly once
(`on_end`) and the moment is kept (`ended_at`).
"""

from __future__ import annotations

import time
from collections.abc import Callable

from modelfleet._transports.models import ResponseBody


class Ending:
    __slots__ = ("response", "ended_at", "_on_end")

    def __init__(self, response: ResponseBody, on_end: Callable[[], None] | None) -> None:
        self.response = response
        self.ended_at: float | None = None
        self._on_end = on_end  # gives the connection slot back, once

    def _finish(self) -> None:
        """Read to its end: the connection goes back to the pool."""
        if self.ended_at is None:
            self.ended_at = time.perf_counter()
            self.response.release()
            self._ended()

    def close(self) -> None:
        """Drop the connection (a no-op after the stream ended cleanly)."""
        if self.ended_at is None:
            self.ended_at = time.perf_counter()
            self.response.close()
            self._ended()

    def _ended(self) -> None:
        if self._on_end is not None:
            on_end, self._on_end = self._on_end, None
            on_end()

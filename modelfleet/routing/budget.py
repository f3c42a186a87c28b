"""How many retries the fleet may be sent: Finagle's RetryBudget.

When every server is overloaded, retrying each failed request up to
max_retry times multiplies the load by max_retry exactly when the fleet can
least bear it. The budget lets retries be at most ``ratio`` of the requests of
the last ``ttl_s`` seconds, plus a small reserve (``min_per_s x ttl_s``) so a
quiet client can still retry its occasional failure. Counts live in ten time
buckets, so old traffic ages out in steps of ttl_s / 10 at constant cost.
"""

from __future__ import annotations

import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass

BUCKETS = 10


@dataclass
class _Bucket:
    index: int  # clock // width
    deposits: int = 0
    withdrawals: int = 0


class RetryBudget:
    """Not thread-safe: the client uses it from one event loop (or under one lock)."""

    def __init__(
        self,
        ratio: float = 0.2,
        min_per_s: float = 10.0,
        ttl_s: float = 10.0,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        if ratio < 0 or min_per_s < 0 or ttl_s <= 0:
            raise ValueError("retry budget: ratio and min_per_s must be >= 0, ttl_s > 0")
        self._ratio = ratio
        self._reserve = min_per_s * ttl_s
        self._width = ttl_s / BUCKETS
        self._clock = clock
        self._buckets: deque[_Bucket] = deque()

    def deposit(self) -> None:
        """One per original request."""
        self._current().deposits += 1

    def try_withdraw(self) -> bool:
        """One per retry; False: the budget is spent, do not retry."""
        bucket = self._current()
        if self.balance() < 1.0:
            return False
        bucket.withdrawals += 1
        return True

    def balance(self) -> float:
        """Retries that may still be made now."""
        self._current()
        deposits = sum(b.deposits for b in self._buckets)
        withdrawals = sum(b.withdrawals for b in self._buckets)
        return self._ratio * deposits + self._reserve - withdrawals

    def _current(self) -> _Bucket:
        index = int(self._clock() // self._width)
        while self._buckets and self._buckets[0].index <= index - BUCKETS:
            self._buckets.popleft()
        if not self._buckets or self._buckets[-1].index != index:
            self._buckets.append(_Bucket(index))
        return self._buckets[-1]

"""A peak-sensitive, time-decayed moving average (Finagle's PeakEwma cost).

A sample above the current value replaces it at once, so one slow answer is
felt by the very next choice; a sample below pulls the value down with weight
``1 - exp(-dt / decay_s)``, where dt is the time since the previous sample.
Old samples therefore age out with *time*, not with a count: a server sampled
a thousand times a second and one probed every five seconds forget a spike
equally fast, and after a long silence a fresh sample all but replaces the old.
"""

from __future__ import annotations

import math


class PeakEwmaEstimate:
    """One latency figure of one server; None until the first sample."""

    __slots__ = ("_decay_s", "_value", "_stamp")

    def __init__(self, decay_s: float) -> None:
        if decay_s <= 0:
            raise ValueError(f"decay_s must be positive, got {decay_s}")
        self._decay_s = decay_s
        self._value: float | None = None
        self._stamp = 0.0

    @property
    def value(self) -> float | None:
        return self._value

    def observe(self, sample: float, now: float) -> None:
        if self._value is None or sample > self._value:
            self._value = sample
        else:
            weight = math.exp(-max(now - self._stamp, 0.0) / self._decay_s)
            self._value = self._value * weight + sample * (1.0 - weight)
        self._stamp = now

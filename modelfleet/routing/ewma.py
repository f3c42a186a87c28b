"""A peak-sensitive, time-decayed moving average (Finagle's PeakEwma cost).

A sample above the current value replaces it at once, so one slow answer is
felt by the very next choice; a sample below pulls the value down with weight
``1 - exp(-dt / decay_s)``, where dt is the time since the previous sample.
Old samples therefore age out with *time*, not with a count: a server sampled
a thousand times a second and one probed every five seconds forget a spike
equally fast, and after a long silence a fresh sample all but replaces the old.

A peak also fades while nobody samples (decay on read): the value read at
time t is the peak decayed toward the base, the plain time-decayed average of
the samples (what the value would be without peak jumps), with weight
``exp(-(t - stamp) / decay_s)``. Otherwise one spike would shut a fast server
out for good: no one picks it, so no lower sample ever comes to pull it down.
A server that is really slow keeps its figure, since its base is slow too.
"""

from __future__ import annotations

import math


class PeakEwmaEstimate:
    """One latency figure of one server; None until the first sample."""

    __slots__ = ("_decay_s", "_value", "_base", "_stamp")

    def __init__(self, decay_s: float) -> None:
        if decay_s <= 0:
            raise ValueError(f"decay_s must be positive, got {decay_s}")
        self._decay_s = decay_s
        self._value: float | None = None  # at _stamp, peak included
        self._base = 0.0  # at _stamp, the samples' average without peak jumps
        self._stamp = 0.0

    @property
    def value(self) -> float | None:
        """The figure as of the last sample (or restore), before any fading since."""
        return self._value

    def read(self, now: float) -> float | None:
        """The figure at `now`: the peak fades toward the base while nobody samples."""
        if self._value is None:
            return None
        return self._base + (self._value - self._base) * self._weight(now)

    def observe(self, sample: float, now: float) -> None:
        if self._value is None:
            self._value = self._base = sample
        else:
            weight = self._weight(now)
            current = self._base + (self._value - self._base) * weight
            self._base = self._base * weight + sample * (1.0 - weight)
            if sample > current:
                self._value = sample
            else:
                self._value = max(current * weight + sample * (1.0 - weight), self._base)
        self._stamp = max(now, self._stamp)

    def restore(self, value: float, now: float) -> None:
        """Take `value` as the figure from now on (a recovered server's old normal)."""
        self._value = self._base = value
        self._stamp = max(now, self._stamp)

    def _weight(self, now: float) -> float:
        return math.exp(-max(now - self._stamp, 0.0) / self._decay_s)

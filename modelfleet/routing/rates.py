"""How fast one server works, per unit of work: three peak EWMAs kept apart.

A request's time is split by what it asked for, so that one figure never
carries another's cost: time to first token per prompt token (prefill),
time per output token after the first (decode), and time per input token
(embeddings). A long prompt then does not look like slow decoding, and a long
answer does not look like a slow server. An estimate is multiplied back by
the size of the request at hand (``service_seconds``).
"""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable, Iterable, Mapping

from modelfleet.routing.ewma import PeakEwmaEstimate
from modelfleet.routing.work import Work

# A prompt of P tokens costs (P + PREFILL_OVERHEAD_TOKENS) x the TTFT rate: the overhead
# stands for scheduling and the first decode step, which even a one-word prompt pays
# (the sim: 0.02 s + 0.2 ms a token, i.e. 100 tokens' worth). Same idea for embeddings.
PREFILL_OVERHEAD_TOKENS = 128
EMBEDDING_OVERHEAD_TOKENS = 64
# Used only while no server of the pool has been measured: every server gets the same,
# so they order nothing; they only size the first stall deadlines.
DEFAULT_RATES = {"ttft": 2e-4, "per_token": 0.02, "per_input_token": 1e-4}
NEEDED_RATES = {"chat": ("ttft", "per_token"), "embedding": ("per_input_token",)}

Rates = Mapping[str, float]


class ServiceRates:
    """The learnt rates of one server (seconds per token; None until measured)."""

    def __init__(self, decay_s: float, clock: Callable[[], float] = time.monotonic) -> None:
        self._estimates = {name: PeakEwmaEstimate(decay_s) for name in DEFAULT_RATES}
        self._clock = clock

    def value(self, name: str) -> float | None:
        """The rate as of now (a peak fades with time even when nobody samples it)."""
        return self._estimates[name].read(self._clock())

    def snapshot(self) -> dict[str, float | None]:
        now = self._clock()
        return {name: est.read(now) for name, est in self._estimates.items()}

    def restore(self, rates: Mapping[str, float | None], now: float) -> None:
        """Take these rates back (a snapshot from before the server went bad); a rate
        missing or None in them keeps its present value."""
        for name, value in rates.items():
            if value is not None and name in self._estimates:
                self._estimates[name].restore(value, now)

    def learn(self, ttft_s: float | None, total_s: float, work: Work, now: float) -> None:
        """One successful answer; ttft_s is None when its first token was not seen."""
        if work.kind == "embedding":
            tokens = work.prompt_tokens + EMBEDDING_OVERHEAD_TOKENS
            self._estimates["per_input_token"].observe(total_s / tokens, now)
            return
        prefill_tokens = work.prompt_tokens + PREFILL_OVERHEAD_TOKENS
        if ttft_s is None and work.output_tokens <= 1:
            ttft_s = total_s  # one token: the whole answer was the first token
        if ttft_s is None:
            # Not seen: take the prompt's share from what is known, so that prompt
            # processing is not folded into the per-token figure; learn no TTFT from it.
            known = self.value("ttft")
            ttft_s = known * prefill_tokens if known is not None else total_s / work.output_tokens
        else:
            self._estimates["ttft"].observe(ttft_s / prefill_tokens, now)
        if work.output_tokens > 1:
            per_token = max(total_s - ttft_s, 0.0) / (work.output_tokens - 1)
            self._estimates["per_token"].observe(per_token, now)

    def measured(self, work: Work) -> Rates | None:
        """The rates this work needs, or None while any of them is unmeasured."""
        now = self._clock()
        rates = {}
        for name in _needed(work):
            value = self._estimates[name].read(now)
            if value is None:
                return None
            rates[name] = value
        return rates

    def with_prior(self, work: Work, peers: Iterable[ServiceRates]) -> Rates:
        """Measured rates; an unmeasured one is the median of the measured peers (so a
        new server is tried, yet not flooded as if it were the fastest), else a default."""
        now = self._clock()
        others: list[ServiceRates] | None = None  # read only when a rate is unmeasured
        rates = {}
        for name in _needed(work):
            value = self._estimates[name].read(now)
            if value is None:
                if others is None:
                    others = list(peers)
                known = [v for peer in others if (v := peer.value(name)) is not None]
                value = statistics.median(known) if known else DEFAULT_RATES[name]
            rates[name] = value
        return rates


def service_seconds(work: Work, rates: Rates) -> tuple[float, float]:
    """(seconds to the first token, seconds to the whole answer) at these rates;
    for embeddings both are the whole answer."""
    if work.kind == "embedding":
        total = rates["per_input_token"] * (work.prompt_tokens + EMBEDDING_OVERHEAD_TOKENS)
        return total, total
    first = rates["ttft"] * (work.prompt_tokens + PREFILL_OVERHEAD_TOKENS)
    return first, first + rates["per_token"] * max(work.output_tokens - 1, 0)


def rates_for(work: Work, rates: Mapping[str, float | None]) -> Rates | None:
    """The rates this work needs, taken from `rates`; None if any is missing."""
    needed = {name: rates.get(name) for name in _needed(work)}
    return None if None in needed.values() else needed  # type: ignore[return-value]


def _needed(work: Work) -> tuple[str, ...]:
    return NEEDED_RATES.get(work.kind, NEEDED_RATES["chat"])  # completions are chat

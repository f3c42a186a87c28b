"""One server of a model as the router sees it: health, speed, load.

Health is an explicit state machine::

    UP ──a sample slower than rate x expected──► DEGRADED ──a sample near its old normal──► UP
     │                                              │      (it takes its old rates back)
     ├── refused / timeout / misconfigured / 3 x 5xx in a row ──► DOWN
     │                                                             │
     └────────────── any success (a trial request or a probe) ◄────┘
                     (near its old normal: old rates back; slow: DEGRADED)

DOWN waits out a cooldown (1 s, doubling after each failed trial, at most
30 s); then ``usable()`` lets one trial request through. Back-pressure (429,
503) is not a health state: the server is alive but full, so it is paused for
a moment (1 s, or its Retry-After) and the next requests go elsewhere.

Speed is learnt from successes only (rates.py): a fast 500 must not make a
server look fast. A 5xx instead adds to a penalty that fades with decay_s.

Background probes use the same methods as requests: ``observe_success`` with
the benchmark's Work, ``observe_failure`` on error, ``observe_queue`` from
/metrics, and no ``begin``/``end`` (a probe does not take the trial slot of a
down server; its success alone brings the server back).

Not thread-safe: the client drives every Endpoint from one event loop (or
under one lock), and takes its ``lease()`` right after ``Pool.choose`` returns.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from enum import Enum

from modelfleet.routing.rates import (
    PREFILL_OVERHEAD_TOKENS,
    Rates,
    ServiceRates,
    rates_for,
    service_seconds,
)
from modelfleet.routing.work import Work

Clock = Callable[[], float]

IN_FLIGHT_WEIGHT = 0.05  # each request in flight from here adds 5 %: batching engines slow gently
ERRORS_TO_DOWN = 3  # consecutive 5xx that mark a server down
SILENT_LOSSES_TO_DOWN = 3  # hedges in a row it lost with no first token: it has stopped answering
COOLDOWN_START_S = 1.0
COOLDOWN_MAX_S = 30.0
BACKPRESSURE_PAUSE_S = 1.0
BACKPRESSURE_MAX_PAUSE_S = 30.0  # a Retry-After is honoured up to this
STALL_MULTIPLE = 4.0  # silence allowed before the first token, in expected TTFTs
SHORT_PROMPT = Work("chat", 0, 1)
REFERENCE_WORK = {"chat": Work("chat", 128, 128), "embedding": Work("embedding", 128)}


class Health(str, Enum):
    UP = "up"
    DEGRADED = "degraded"
    DOWN = "down"


class Failure(str, Enum):
    """How a request to one server failed, as the wire layer classifies it."""

    REFUSED = "refused"  # connection refused / reset / DNS
    TIMEOUT = "timeout"  # request timeout or silence past the stall deadline
    SERVER_ERROR = "server_error"  # 5xx other than 503
    BACKPRESSURE = "backpressure"  # 429 or 503: pause this server briefly, not a failure of health
    MISCONFIGURED = "misconfigured"  # 404/401/403 from this server: down with that reason


@dataclass(frozen=True)
class EndpointStatus:
    """A snapshot of one endpoint for status() and the report; times in seconds."""

    address: str
    health: Health
    reason: str | None
    in_flight: int
    queue_running: float | None
    queue_waiting: float | None
    ttft_s: float | None  # time to first token of a short prompt
    per_token_s: float | None  # per output token after the first
    per_input_token_s: float | None  # embeddings
    expected_latency_s: float | None  # of a 128-token prompt + 128-token answer (or embedding)
    requests: int  # successes observed (requests and probes)
    failures: int  # failures observed, back-pressure included
    down_since: float | None  # clock time it went down


class Lease:
    """One request on one endpoint, as a context manager: no path can forget ``end()``.

    `prefill_tokens`: the prompt tokens the server must compute for it (its uncached
    ones), held in the endpoint's prefill backlog until the lease ends; `ahead`: the
    backlog it found there, which its time to first token waited behind."""

    __slots__ = ("endpoint", "prefill_tokens", "ahead")

    def __init__(self, endpoint: Endpoint, prefill_tokens: int = 0) -> None:
        self.endpoint = endpoint
        self.prefill_tokens = prefill_tokens
        self.ahead = 0

    def __enter__(self) -> Endpoint:
        self.ahead = self.endpoint.prefilling
        self.endpoint.begin(self.prefill_tokens)
        return self.endpoint

    def __exit__(self, *exc: object) -> None:
        self.endpoint.end(self.prefill_tokens)


class Endpoint:
    """Everything the router knows about one server."""

    def __init__(
        self,
        address: str,
        *,
        clock: Clock = time.monotonic,
        decay_s: float = 5.0,
        degrade_ratio: float = 2.0,
        peers: Callable[[], Iterable[Endpoint]] | None = None,
    ) -> None:
        self.address = address
        self.in_flight = 0
        self.prefilling = 0  # prompt tokens of leases here still to be computed (prefix-aware)
        self.queue_running: float | None = None
        self.queue_waiting: float | None = None
        self.requests = 0
        self.failures = 0
        self.rates = ServiceRates(decay_s, clock)
        self._clock = clock
        self._decay_s = decay_s
        self._degrade_ratio = degrade_ratio
        self._peers = peers or (lambda: ())  # whom an unmeasured endpoint borrows rates from
        self._health = Health.UP
        self._reason: str | None = None
        self._normal: dict[str, float | None] = {}  # rates before it went DEGRADED or DOWN
        self._down_since: float | None = None
        self._cooldown_s = COOLDOWN_START_S
        self._retry_at = 0.0
        self._trial_in_flight = False
        self._paused_until = 0.0
        self._pause_reason: str | None = None
        self._consecutive_errors = 0
        self._silent_losses = 0
        self._error_score = 0.0  # recent 5xx, fading with decay_s
        self._error_stamp = 0.0

    def __repr__(self) -> str:
        return f"Endpoint({self.address!r}, {self._health.value}, in_flight={self.in_flight})"

    # -- state -------------------------------------------------------------

    @property
    def health(self) -> Health:
        return self._health

    @property
    def reason(self) -> str | None:
        """Why it is not plainly UP and open: down or degraded reason, or the pause."""
        if self._health is Health.UP and self._clock() < self._paused_until:
            return self._pause_reason
        return self._reason

    @property
    def down_since(self) -> float | None:
        return self._down_since

    @property
    def paused_until(self) -> float:
        return self._paused_until

    def usable(self) -> bool:
        now = self._clock()
        if now < self._paused_until:
            return False
        if self._health is Health.DOWN:
            return now >= self._retry_at and not self._trial_in_flight
        return True

    def why_unusable(self) -> str | None:
        """A short sentence for NoServerAvailable; None when it is usable."""
        now = self._clock()
        if self._health is Health.DOWN:
            if self._trial_in_flight:
                return f"down ({self._reason}); a trial request is in flight"
            if now < self._retry_at:
                return f"down ({self._reason}); next try in {self._retry_at - now:.1f} s"
        if now < self._paused_until:
            return f"busy ({self._pause_reason}); paused for {self._paused_until - now:.1f} s"
        return None

    # -- what happened -----------------------------------------------------

    def lease(self, prefill_tokens: int = 0) -> Lease:
        """`with endpoint.lease():` around one request: begin() on entry, end() on exit,
        whatever happens inside (observe_* belongs inside the block). `prefill_tokens`:
        the prompt tokens it will compute here, when known (Pool.prefill_tokens)."""
        return Lease(self, prefill_tokens)

    def begin(self, prefill_tokens: int = 0) -> None:
        """A request went out. On a down endpoint it is the trial: no other until it ends."""
        self.in_flight += 1
        self.prefilling += prefill_tokens
        if self._health is Health.DOWN:
            self._trial_in_flight = True

    def end(self, prefill_tokens: int = 0) -> None:
        """The request finished, whatever happened (call after observe_*)."""
        self.in_flight = max(0, self.in_flight - 1)
        self.prefilling = max(0, self.prefilling - prefill_tokens)
        self._trial_in_flight = False

    def observe_success(
        self, *, ttft_s: float | None, total_s: float, work: Work, output_tokens: int | None = None
    ) -> None:
        """Learn from a successful answer; ttft_s is None when the first token was not seen,
        output_tokens is what the server reported (usage), else work.output_tokens."""
        self.requests += 1
        self._consecutive_errors = self._silent_losses = 0
        if output_tokens is not None and output_tokens != work.output_tokens:
            work = Work(work.kind, work.prompt_tokens, output_tokens)
        now = self._clock()
        slow = self._slower_than_normal(total_s, work)
        # The rates before this sample are kept only if it is the one that degrades it.
        before = self.rates.snapshot() if slow and self._health is Health.UP else {}
        if self._health is Health.DOWN:
            self._health, self._reason, self._down_since = Health.UP, None, None
            self._cooldown_s = COOLDOWN_START_S
            if slow:  # back, but slow against what it was before it went down
                self._health = Health.DEGRADED
                self._reason = f"slower than {self._degrade_ratio}x expected"
        if slow is False and self._normal:
            # Back near its old normal: what it learnt while bad must not keep it starved
            # until decay_s wears it off, so it takes its old rates back, then this sample.
            self.rates.restore(self._normal, now)
            self._health, self._reason, self._normal = Health.UP, None, {}
        self.rates.learn(ttft_s, total_s, work, now)
        if slow and self._health is Health.UP:
            self._health, self._normal = Health.DEGRADED, before
            self._reason = f"slower than {self._degrade_ratio}x expected"

    def observe_failure(
        self, failure: Failure, reason: str, *, retry_after_s: float | None = None
    ) -> None:
        """Count a failed request or probe; never touches the latency estimates."""
        self.failures += 1
        now = self._clock()
        if failure is Failure.BACKPRESSURE:
            pause = BACKPRESSURE_PAUSE_S if retry_after_s is None else retry_after_s
            pause = min(max(pause, 0.0), BACKPRESSURE_MAX_PAUSE_S)
            self._paused_until = max(self._paused_until, now + pause)
            self._pause_reason = reason
            return
        if failure is Failure.SERVER_ERROR:
            self._error_score = self._error_penalty(now) + 1.0
            self._error_stamp = now
            self._consecutive_errors += 1
            if self._consecutive_errors < ERRORS_TO_DOWN and self._health is not Health.DOWN:
                return
        self._mark_down(reason, now)

    def observe_silent_loss(self, waited_s: float) -> None:
        """A hedge elsewhere won while this server, after `waited_s`, had shown no first
        token (its copy was cancelled, so no timeout ever fires here). One such is luck: a
        stall, a long prefill ahead. Several in a row with nothing answered in between is
        a server that stopped answering in time, which hedging would otherwise hide for
        ever: down, as the timeouts would have made it without hedging."""
        self._silent_losses += 1
        if self._silent_losses >= SILENT_LOSSES_TO_DOWN:
            self.failures += 1
            self._mark_down(f"no first token within {waited_s:.2f}s in {self._silent_losses} "
                            "hedged requests in a row", self._clock())

    def observe_queue(self, running: float | None, waiting: float | None) -> None:
        """The server's own queue, from its /metrics (None: unknown)."""
        self.queue_running, self.queue_waiting = running, waiting

    # -- estimates ---------------------------------------------------------

    def expected_latency(self, work: Work, cached_tokens: int = 0) -> float:
        """Seconds this request would take here now; `cached_tokens` of its prompt are
        likely in this server's prefix cache, so its prefill skips them, and the prompt
        tokens of the leases here still prefilling (`prefilling`) come before it: an
        engine computes prompts in steps of a token budget, so a long uncached prompt
        delays every first token behind it (the TTFT rate is learnt the same way:
        Pool.served counts the backlog a request found).

        The measured rates already carry the server's present batch, so load only
        adds (a) the wait behind its queue: each waiting request costs about one
        request's time divided by the number running together, and (b) a gentle
        5 % per request in flight from here. Recent 5xx multiply it by 1 + (fading
        count). Never latency x (in_flight + 1): an idle slow server would win.
        """
        if cached_tokens or self.prefilling:
            work = Work(work.kind, max(work.prompt_tokens - cached_tokens, 0) + self.prefilling,
                        work.output_tokens)
        _, service = service_seconds(work, self._rates_with_prior(work))
        return (service + self._queue_wait(service)) * self._load_factor(self._clock())

    def service_time(self, work: Work) -> float | None:
        """Seconds the request would take at this endpoint's measured rates, without
        load or penalty terms; None until it has been measured for this kind of work."""
        rates = self.rates.measured(work)
        return None if rates is None else service_seconds(work, rates)[1]

    def stall_deadline(
        self, *, floor_s: float, ceiling_s: float, work: Work | None = None
    ) -> float:
        """Silence allowed before the first token (the whole answer for embeddings):
        a few times what it should take, at least floor_s, never above ceiling_s.
        Pass the request's work: a long prompt legitimately takes longer to start."""
        work = work or SHORT_PROMPT
        first, service = service_seconds(work, self._rates_with_prior(work))
        return min(ceiling_s, max(floor_s, STALL_MULTIPLE * (first + self._queue_wait(service))))

    def answer_deadline(self, *, floor_s: float, ceiling_s: float, work: Work) -> float:
        """Time allowed for a whole answer asked for in one piece (its length bounded by
        max_tokens): a few times the expected latency of this work here now, at least
        floor_s, never above ceiling_s. Without a stream, this is what catches a hang."""
        return min(ceiling_s, max(floor_s, STALL_MULTIPLE * self.expected_latency(work)))

    def status(self) -> EndpointStatus:
        rates = self.rates.snapshot()
        ttft = rates["ttft"]
        measured = [w for w in REFERENCE_WORK.values() if self.rates.measured(w) is not None]
        return EndpointStatus(
            address=self.address,
            health=self._health,
            reason=self.reason,
            in_flight=self.in_flight,
            queue_running=self.queue_running,
            queue_waiting=self.queue_waiting,
            ttft_s=None if ttft is None else ttft * PREFILL_OVERHEAD_TOKENS,
            per_token_s=rates["per_token"],
            per_input_token_s=rates["per_input_token"],
            expected_latency_s=self.expected_latency(measured[0]) if measured else None,
            requests=self.requests,
            failures=self.failures,
            down_since=self._down_since,
        )

    # -- inside ------------------------------------------------------------

    def _slower_than_normal(self, total_s: float, work: Work) -> bool | None:
        """Compare a sample with what was expected before it (None: nothing to compare)."""
        if self._normal:  # DEGRADED, or DOWN after it had a normal
            rates = rates_for(work, self._normal)
            if rates is None:
                return False  # no normal for this kind of work: take it as normal
        else:
            rates = self.rates.measured(work)
            if rates is None:
                return None
        _, service = service_seconds(work, rates)
        return total_s > self._degrade_ratio * (service + self._queue_wait(service))

    def _mark_down(self, reason: str, now: float) -> None:
        if self._health is not Health.DOWN:
            if self._health is Health.UP:  # DEGRADED keeps the normal it had before
                self._normal = {k: v for k, v in self.rates.snapshot().items() if v is not None}
            self._health, self._down_since = Health.DOWN, now
            self._cooldown_s = COOLDOWN_START_S
            self._retry_at = now + self._cooldown_s
        elif now >= self._retry_at:  # a failed trial or probe after the cooldown: wait longer
            self._cooldown_s = min(2 * self._cooldown_s, COOLDOWN_MAX_S)
            self._retry_at = now + self._cooldown_s
        # else: a request sent before it went down; the running cooldown covers it
        self._reason = reason

    def _queue_wait(self, service_s: float) -> float:
        if not self.queue_waiting:
            return 0.0
        return service_s * self.queue_waiting / max(self.queue_running or 0.0, 1.0)

    def _load_factor(self, now: float) -> float:
        return (1.0 + IN_FLIGHT_WEIGHT * self.in_flight) * (1.0 + self._error_penalty(now))

    def _error_penalty(self, now: float) -> float:
        if not self._error_score:
            return 0.0
        return self._error_score * math.exp(-max(now - self._error_stamp, 0.0) / self._decay_s)

    def _rates_with_prior(self, work: Work) -> Rates:
        measured = self.rates.measured(work)  # the usual case: no peers to look at
        if measured is not None:
            return measured
        return self.rates.with_prior(work, (peer.rates for peer in self._peers()))

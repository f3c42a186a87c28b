"""Unit tests of the routing core on a fake clock: no servers, no sleeps."""

from __future__ import annotations

import collections
import math

import pytest
from hypothesis import given
from hypothesis import strategies as st

from modelfleet.config import POLICIES
from modelfleet.errors import ConfigError
from modelfleet.routing import (
    Endpoint,
    Failure,
    Fastest,
    Health,
    LeastLoaded,
    PeakEwma,
    Pool,
    RandomChoice,
    RetryBudget,
    RoundRobin,
    Work,
    estimate_tokens,
    make_policy,
)
from modelfleet.routing.ewma import PeakEwmaEstimate

CHAT = Work("chat", prompt_tokens=100, output_tokens=100)
EMBED = Work("embedding", prompt_tokens=200)


class FakeClock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now

    def advance(self, seconds: float) -> None:
        self.now += seconds


@pytest.fixture
def clock() -> FakeClock:
    return FakeClock()


def serve(
    ep: Endpoint, *, ttft: float, per_token: float, work: Work = CHAT, times: int = 1
) -> None:
    """Record `times` successful chat answers with this first-token time and pace."""
    for _ in range(times):
        ep.begin()
        total = ttft + per_token * (work.output_tokens - 1)
        ep.observe_success(ttft_s=ttft, total_s=total, work=work, output_tokens=work.output_tokens)
        ep.end()


def pool_of(n: int, policy, clock: FakeClock) -> Pool:
    return Pool([f"h{i}:80" for i in range(n)], policy, clock=clock)


# -- the estimate ------------------------------------------------------------


def test_peak_ewma_rises_at_once_and_decays_with_time() -> None:
    est = PeakEwmaEstimate(decay_s=5.0)
    est.observe(1.0, now=0.0)
    est.observe(10.0, now=0.1)
    assert est.value == 10.0  # a spike is felt at once
    est.observe(1.0, now=0.1)
    assert est.value == pytest.approx(10.0, rel=0.05)  # no time passed: barely moves
    est.observe(1.0, now=20.1)
    assert est.value < 1.2  # twenty seconds later the spike has aged out


def test_a_peak_fades_on_read_toward_its_base() -> None:
    est = PeakEwmaEstimate(decay_s=5.0)
    for i in range(10):
        est.observe(1.0, now=i * 0.1)
    est.observe(10.0, now=1.0)
    assert est.read(1.0) == 10.0 and est.value == 10.0
    assert 1.0 < est.read(6.0) < 10.0  # fading with nobody sampling it
    base = 1.0 + 9.0 * (1 - math.exp(-0.1 / 5.0))  # the spike's share of the plain average
    assert est.read(6.0) == pytest.approx(base + (10.0 - base) * math.exp(-1))
    assert est.read(101.0) == pytest.approx(base) and base < 1.2
    assert est.read(0.5) == 10.0  # the past does not count back
    est.restore(2.0, now=40.0)
    assert est.read(400.0) == 2.0


@given(st.lists(st.tuples(st.floats(0.001, 100), st.floats(0, 30)), min_size=1, max_size=40))
def test_peak_ewma_stays_within_its_samples(samples) -> None:
    est, now = PeakEwmaEstimate(decay_s=5.0), 0.0
    for value, dt in samples:
        now += dt
        est.observe(value, now)
        assert est.value >= value - 1e-9  # never below the latest sample
    values = [v for v, _ in samples]
    assert min(values) - 1e-9 <= est.value <= max(values) + 1e-9
    for later in (0.0, 1.0, 100.0):  # fading on read stays within the samples too
        assert min(values) - 1e-9 <= est.read(now + later) <= max(values) + 1e-9


def test_ttft_is_kept_apart_from_per_token_time(clock) -> None:
    ep = Endpoint("a:1", clock=clock)
    long_prompt = Work("chat", prompt_tokens=8000, output_tokens=11)
    ep.observe_success(ttft_s=2.0, total_s=2.5, work=long_prompt)
    status = ep.status()
    assert status.per_token_s == pytest.approx(0.05)  # (2.5 - 2.0) / 10: the prompt is not in it
    assert ep.expected_latency(long_prompt) == pytest.approx(2.5)
    short = Work("chat", prompt_tokens=10, output_tokens=11)
    assert ep.expected_latency(short) < 0.6  # short prompt + 10 x 0.05, not 10 x 0.25


def test_unseen_first_token_takes_the_prompt_share_from_the_known_ttft(clock) -> None:
    ep = Endpoint("a:1", clock=clock)
    ep.observe_success(ttft_s=None, total_s=1.0, work=Work("chat", 50, 1))  # one token: all TTFT
    ttft_rate = ep.rates.value("ttft")
    assert ttft_rate == pytest.approx(1.0 / (50 + 128))
    long_prompt = Work("chat", prompt_tokens=3000, output_tokens=101)
    prefill = ttft_rate * (3000 + 128)
    ep.observe_success(ttft_s=None, total_s=prefill + 100 * 0.03, work=long_prompt)
    assert ep.status().per_token_s == pytest.approx(0.03)  # the prompt is not folded in
    assert ep.rates.value("ttft") == ttft_rate  # and a guessed TTFT is not learnt


def test_embedding_latency_is_per_input_token(clock) -> None:
    ep = Endpoint("a:1", clock=clock)
    ep.observe_success(ttft_s=None, total_s=0.1, work=EMBED)
    big = Work("embedding", prompt_tokens=20_000)
    assert ep.expected_latency(big) > 50 * ep.expected_latency(Work("embedding", 10))
    assert ep.status().per_input_token_s is not None and ep.status().per_token_s is None


def test_failures_never_make_a_server_look_fast(clock) -> None:
    ep = Endpoint("a:1", clock=clock)
    serve(ep, ttft=0.5, per_token=0.05)
    before = ep.expected_latency(CHAT)
    for failure in (Failure.SERVER_ERROR, Failure.BACKPRESSURE, Failure.REFUSED):
        clock.advance(0.01)
        ep.observe_failure(failure, "fast error")
        assert ep.expected_latency(CHAT) >= before
    assert ep.status().per_token_s == pytest.approx(0.05)


def test_server_errors_add_a_fading_penalty_then_down_after_three_in_a_row(clock) -> None:
    ep = Endpoint("a:1", clock=clock)
    serve(ep, ttft=0.5, per_token=0.05)
    base = ep.expected_latency(CHAT)
    ep.observe_failure(Failure.SERVER_ERROR, "HTTP 500")
    assert ep.expected_latency(CHAT) > 1.5 * base and ep.health is Health.UP
    clock.advance(60)
    assert ep.expected_latency(CHAT) == pytest.approx(base, rel=0.01)  # the penalty fades
    ep.observe_failure(Failure.SERVER_ERROR, "HTTP 500")
    serve(ep, ttft=0.5, per_token=0.05)  # a success in between: not "in a row"
    ep.observe_failure(Failure.SERVER_ERROR, "HTTP 500")
    ep.observe_failure(Failure.SERVER_ERROR, "HTTP 500")
    assert ep.health is Health.UP and ep.failures == 4
    ep.observe_failure(Failure.SERVER_ERROR, "HTTP 502")
    assert ep.health is Health.DOWN and ep.reason == "HTTP 502"


def test_a_fresh_server_is_tried_but_not_flooded(clock) -> None:
    pool = pool_of(3, PeakEwma(seed=1), clock)
    a, b, fresh = pool.endpoints.values()
    serve(a, ttft=0.2, per_token=0.02)
    serve(b, ttft=0.4, per_token=0.04)
    # Unmeasured: it counts as the median of its measured peers, not as free.
    assert fresh.expected_latency(CHAT) == pytest.approx(
        (a.expected_latency(CHAT) + b.expected_latency(CHAT)) / 2
    )
    picks = collections.Counter()
    for _ in range(60):  # requests pile up, none finishes
        ep = pool.choose(CHAT)
        ep.begin()
        picks[ep.address] += 1
    assert picks[fresh.address] > 0
    assert picks[fresh.address] < 40  # b (the slowest) never wins; the fresh one shares with a


# -- load and batching ----------------------------------------------------------


def test_idle_slow_server_loses_to_a_busy_fast_one(clock) -> None:
    fast, slow = Endpoint("fast:1", clock=clock), Endpoint("slow:1", clock=clock)
    serve(fast, ttft=0.1, per_token=0.02)
    serve(slow, ttft=0.4, per_token=0.08)  # 4x slower
    fast.in_flight = 12  # busy, but its recent latency was measured at that load
    assert fast.expected_latency(CHAT) < slow.expected_latency(CHAT)
    assert PeakEwma(seed=0).pick([fast, slow], CHAT) is fast
    # Unlike latency x (in_flight + 1), which would send this request to the slow one:
    assert 13 * fast.service_time(CHAT) > slow.service_time(CHAT)


def test_waiting_queue_raises_the_estimate(clock) -> None:
    ep = Endpoint("a:1", clock=clock)
    serve(ep, ttft=0.1, per_token=0.02)
    ep.observe_queue(running=8, waiting=0)
    idle = ep.expected_latency(CHAT)
    ep.observe_queue(running=8, waiting=8)
    assert ep.expected_latency(CHAT) == pytest.approx(2 * idle)  # one batch's worth of waiting
    ep.observe_queue(running=8, waiting=24)
    assert ep.expected_latency(CHAT) == pytest.approx(4 * idle)
    assert ep.stall_deadline(floor_s=0.0, ceiling_s=600, work=CHAT) > 3 * ep.service_time(CHAT)


def test_p2c_gives_a_ten_times_slower_server_almost_nothing(clock) -> None:
    pool = pool_of(4, PeakEwma(seed=7), clock)
    eps = list(pool.endpoints.values())
    for ep in eps[:3]:
        serve(ep, ttft=0.1, per_token=0.02)
    serve(eps[3], ttft=1.0, per_token=0.2)
    picks = collections.Counter()
    in_flight = collections.deque()
    for _ in range(2000):  # concurrency 12: each request ends 12 requests later
        ep = pool.choose(CHAT)
        ep.begin()
        in_flight.append(ep)
        picks[ep.address] += 1
        if len(in_flight) == 12:
            in_flight.popleft().end()
    assert picks[eps[3].address] == 0
    assert min(picks[e.address] for e in eps[:3]) > 500  # the rest share the load


def test_least_loaded_counts_the_servers_queue(clock) -> None:
    a, b, c = (Endpoint(f"{x}:1", clock=clock) for x in "abc")
    for ep in (a, b, c):
        serve(ep, ttft=0.1, per_token=0.02)
    a.in_flight = 1
    b.observe_queue(running=3, waiting=2)
    c.observe_queue(running=0, waiting=0)
    assert LeastLoaded().pick([a, b, c], CHAT) is c
    c.in_flight = 1
    serve(a, ttft=0.5, per_token=0.1)  # a and c tie on load; c is faster
    assert LeastLoaded().pick([a, b, c], CHAT) is c


def test_round_robin_goes_in_order() -> None:
    eps = [Endpoint(f"h{i}:1") for i in range(3)]
    rr = RoundRobin()
    assert [rr.pick(eps, CHAT).address for _ in range(7)] == [
        "h0:1",
        "h1:1",
        "h2:1",
        "h0:1",
        "h1:1",
        "h2:1",
        "h0:1",
    ]


def test_random_is_uniform_and_seedable() -> None:
    eps = [Endpoint(f"h{i}:1") for i in range(4)]
    first = [RandomChoice(seed=3).pick(eps, CHAT).address for _ in range(50)]
    policy = RandomChoice(seed=3)
    again = [policy.pick(eps, CHAT).address for _ in range(4000)]
    assert first[0] == again[0]
    assert all(800 < n < 1200 for n in collections.Counter(again).values())


# -- health ---------------------------------------------------------------------


def test_back_pressure_pauses_but_does_not_down(clock) -> None:
    ep = Endpoint("a:1", clock=clock)
    ep.observe_failure(Failure.BACKPRESSURE, "HTTP 429")
    assert ep.health is Health.UP and not ep.usable()
    assert "HTTP 429" in ep.why_unusable()
    clock.advance(1.01)
    assert ep.usable()
    ep.observe_failure(Failure.BACKPRESSURE, "HTTP 503", retry_after_s=5)
    clock.advance(4)
    assert not ep.usable()
    clock.advance(1.01)
    assert ep.usable() and ep.health is Health.UP


def test_misconfigured_goes_down_with_its_reason(clock) -> None:
    ep = Endpoint("a:1", clock=clock)
    ep.observe_failure(Failure.MISCONFIGURED, "HTTP 404: model 'llama' does not exist")
    assert ep.health is Health.DOWN and not ep.usable()
    assert ep.reason == "HTTP 404: model 'llama' does not exist"
    assert "does not exist" in ep.status().reason and ep.status().down_since == clock.now


@pytest.mark.parametrize("failure", [Failure.REFUSED, Failure.TIMEOUT])
def test_refused_and_timeout_go_down_at_once(clock, failure) -> None:
    ep = Endpoint("a:1", clock=clock)
    ep.observe_failure(failure, failure.value)
    assert ep.health is Health.DOWN


def test_cooldown_doubles_and_a_successful_trial_recovers(clock) -> None:
    ep = Endpoint("a:1", clock=clock)
    ep.observe_failure(Failure.REFUSED, "connection refused")
    for _ in range(5):  # stragglers sent before it went down do not stretch the cooldown
        ep.observe_failure(Failure.REFUSED, "connection refused")
    waits = []
    for _ in range(7):
        waited = 0.0
        while not ep.usable():
            clock.advance(0.25)
            waited += 0.25
        waits.append(waited)
        ep.begin()  # the one trial request
        assert not ep.usable()  # no second trial while it runs
        ep.observe_failure(Failure.REFUSED, "connection refused")
        ep.end()
    assert waits == [1.0, 2.0, 4.0, 8.0, 16.0, 30.0, 30.0]
    clock.advance(30)
    assert ep.usable()
    ep.begin()
    serve(ep, ttft=0.1, per_token=0.02)
    ep.end()
    assert ep.health is Health.UP and ep.reason is None and ep.usable()
    ep.observe_failure(Failure.TIMEOUT, "silent for 5 s")  # the cooldown starts again at 1 s
    clock.advance(1.0)
    assert ep.usable()


def test_a_probe_brings_a_down_server_back(clock) -> None:
    ep = Endpoint("a:1", clock=clock)
    ep.observe_failure(Failure.REFUSED, "connection refused")
    ep.observe_success(ttft_s=0.05, total_s=0.2, work=Work("chat", 5, 8))  # no begin/end
    assert ep.health is Health.UP and ep.usable()


def test_degraded_when_slower_than_rate_and_back_when_normal(clock) -> None:
    ep = Endpoint("a:1", clock=clock, degrade_ratio=2.0)
    serve(ep, ttft=0.1, per_token=0.02, times=3)
    clock.advance(1)
    serve(ep, ttft=0.1, per_token=0.03)  # 1.5x: still up
    assert ep.health is Health.UP
    clock.advance(1)
    serve(ep, ttft=0.5, per_token=0.1)  # 5x
    assert ep.health is Health.DEGRADED and ep.reason == "slower than 2.0x expected"
    assert ep.usable()
    clock.advance(1)
    serve(ep, ttft=0.5, per_token=0.1)  # still slow against its old normal
    assert ep.health is Health.DEGRADED
    clock.advance(1)
    serve(ep, ttft=0.1, per_token=0.02)
    assert ep.health is Health.UP and ep.reason is None


def test_a_recovered_server_takes_its_old_rates_back_at_once(clock) -> None:
    ep = Endpoint("a:1", clock=clock, decay_s=5.0)
    serve(ep, ttft=0.1, per_token=0.02, times=3)
    normal = ep.expected_latency(CHAT)
    for _ in range(10):  # slow for a while: its figures learn the slowness, base included
        clock.advance(2)
        serve(ep, ttft=1.0, per_token=0.2)
    assert ep.health is Health.DEGRADED and ep.expected_latency(CHAT) > 8 * normal
    clock.advance(1)
    serve(ep, ttft=0.1, per_token=0.02)  # one sample back near its old normal (a probe)
    assert ep.health is Health.UP
    assert ep.expected_latency(CHAT) == pytest.approx(normal, rel=0.05)


def test_a_server_back_from_down_gets_its_pre_degraded_rates(clock) -> None:
    ep = Endpoint("a:1", clock=clock, decay_s=5.0)
    serve(ep, ttft=0.1, per_token=0.02, times=3)
    normal = ep.expected_latency(CHAT)
    for _ in range(5):
        clock.advance(2)
        serve(ep, ttft=1.0, per_token=0.2)
    ep.observe_failure(Failure.TIMEOUT, "went silent")
    assert ep.health is Health.DOWN
    clock.advance(1)
    serve(ep, ttft=0.1, per_token=0.02)  # its trial (or a probe) is back to normal
    assert ep.health is Health.UP
    assert ep.expected_latency(CHAT) == pytest.approx(normal, rel=0.05)
    ep.observe_failure(Failure.REFUSED, "refused")  # down from UP, back slow: DEGRADED
    clock.advance(1)
    serve(ep, ttft=1.0, per_token=0.2)
    assert ep.health is Health.DEGRADED
    clock.advance(1)
    serve(ep, ttft=0.1, per_token=0.02)
    assert ep.health is Health.UP
    assert ep.expected_latency(CHAT) == pytest.approx(normal, rel=0.05)


def test_a_spike_fades_while_nobody_samples_the_server(clock) -> None:
    pool = pool_of(2, PeakEwma(seed=5), clock)
    spiked, other = pool.endpoints.values()
    for _ in range(20):  # both equally fast, sampled often
        clock.advance(0.1)
        serve(spiked, ttft=0.1, per_token=0.02)
        serve(other, ttft=0.15, per_token=0.03)
    normal = spiked.expected_latency(CHAT)
    clock.advance(0.1)
    serve(spiked, ttft=1.0, per_token=0.2)  # one 10x spike
    assert spiked.expected_latency(CHAT) > 8 * normal
    assert pool.choose(CHAT) is other  # shut out for now: nobody samples it...
    clock.advance(4 * 5.0)  # ...yet a few decay_s later its figure is back near its base
    assert spiked.expected_latency(CHAT) < 1.4 * normal
    # Back in use: it takes most of the traffic again (not all: the two are within 1.2x,
    # and near ties are shared, not swung to one server).
    assert sum(pool.choose(CHAT) is spiked for _ in range(200)) > 100
    assert spiked.expected_latency(CHAT) < other.expected_latency(CHAT)


def test_a_server_that_is_really_slow_stays_slow_without_samples(clock) -> None:
    fast, slow = Endpoint("fast:1", clock=clock), Endpoint("slow:1", clock=clock)
    for _ in range(10):
        clock.advance(1)
        serve(fast, ttft=0.1, per_token=0.02)
        serve(slow, ttft=0.4, per_token=0.08)  # 4x slower, every time
    clock.advance(60)  # no samples for a long while: nothing to fade towards but itself
    assert slow.expected_latency(CHAT) == pytest.approx(4 * fast.expected_latency(CHAT), rel=0.05)
    fast.in_flight = 12
    assert PeakEwma(seed=0).pick([fast, slow], CHAT) is fast


def test_stall_deadline_follows_expected_ttft_within_bounds(clock) -> None:
    ep = Endpoint("a:1", clock=clock)
    assert ep.stall_deadline(floor_s=5, ceiling_s=600) == 5  # nothing known: the floor
    serve(ep, ttft=3.0, per_token=0.02)
    assert 5 < ep.stall_deadline(floor_s=5, ceiling_s=600, work=CHAT) < 60
    assert ep.stall_deadline(floor_s=5, ceiling_s=8, work=CHAT) == 8
    long_prompt = Work("chat", 100_000, 10)
    assert ep.stall_deadline(floor_s=1, ceiling_s=600, work=long_prompt) > 100


# -- the pool -------------------------------------------------------------------


def test_all_down_returns_the_earliest_down_not_none(clock) -> None:
    pool = pool_of(3, PeakEwma(seed=0), clock)
    a, b, c = pool.endpoints.values()
    b.observe_failure(Failure.REFUSED, "connection refused")
    clock.advance(0.1)
    a.observe_failure(Failure.TIMEOUT, "timeout")
    clock.advance(0.1)
    c.observe_failure(Failure.MISCONFIGURED, "HTTP 401")
    assert pool.choose(CHAT) is b
    assert pool.choose(CHAT, exclude={"h1:80"}) is a
    assert pool.choose(CHAT, exclude={"h0:80", "h1:80", "h2:80"}) is None
    reasons = pool.reasons()
    assert set(reasons) == {"h0:80", "h1:80", "h2:80"} and "HTTP 401" in reasons["h2:80"]


STATES = st.sampled_from(["fresh", "measured", "down", "paused", "misconfigured", "5xx"])


@given(states=st.lists(STATES, min_size=1, max_size=6), data=st.data())
def test_choose_never_ejects_the_pool(states, data) -> None:
    clock = FakeClock()
    policy = data.draw(st.sampled_from(POLICIES))
    pool = pool_of(len(states), make_policy(policy, seed=0), clock)
    for ep, state in zip(pool.endpoints.values(), states, strict=True):
        clock.advance(0.1)
        if state == "measured":
            serve(ep, ttft=0.1, per_token=0.02)
        elif state == "down":
            ep.observe_failure(Failure.REFUSED, "connection refused")
        elif state == "paused":
            ep.observe_failure(Failure.BACKPRESSURE, "HTTP 429")
        elif state == "misconfigured":
            ep.observe_failure(Failure.MISCONFIGURED, "HTTP 404")
        elif state == "5xx":
            ep.observe_failure(Failure.SERVER_ERROR, "HTTP 500")
    exclude = set(data.draw(st.lists(st.sampled_from(list(pool.endpoints)), unique=True)))
    chosen = pool.choose(CHAT, exclude=exclude, affinity=data.draw(st.none() | st.just("k")))
    if exclude == set(pool.endpoints):
        assert chosen is None
        return
    assert chosen is not None and chosen.address not in exclude
    usable = [e for a, e in pool.endpoints.items() if a not in exclude and e.usable()]
    assert chosen in usable or not usable
    assert set(pool.reasons()) == {a for a, e in pool.endpoints.items() if not e.usable()}


def test_a_paused_server_comes_before_a_down_one(clock) -> None:
    pool = pool_of(2, PeakEwma(seed=0), clock)
    a, b = pool.endpoints.values()
    a.observe_failure(Failure.REFUSED, "connection refused")
    b.observe_failure(Failure.BACKPRESSURE, "HTTP 429")
    assert pool.choose(CHAT) is b


def test_exclude_skips_tried_servers(clock) -> None:
    pool = pool_of(3, RoundRobin(), clock)
    for _ in range(10):
        assert pool.choose(CHAT, exclude={"h0:80", "h2:80"}).address == "h1:80"


def test_affinity_sticks_and_moves_when_its_server_goes_down(clock) -> None:
    pool = pool_of(4, PeakEwma(seed=5), clock)
    for ep in pool.endpoints.values():
        serve(ep, ttft=0.1, per_token=0.02)
    home = pool.choose(CHAT, affinity="conversation-42")
    assert all(pool.choose(CHAT, affinity="conversation-42") is home for _ in range(50))
    others = {pool.choose(CHAT, affinity=f"k{i}").address for i in range(40)}
    assert len(others) > 1  # keys spread over the pool
    home.observe_failure(Failure.REFUSED, "connection refused")
    moved = pool.choose(CHAT, affinity="conversation-42")
    assert moved is not home
    assert all(pool.choose(CHAT, affinity="conversation-42") is moved for _ in range(20))


def test_affinity_moves_off_a_much_slower_server(clock) -> None:
    pool = pool_of(3, PeakEwma(seed=5), clock)
    for ep in pool.endpoints.values():
        serve(ep, ttft=0.1, per_token=0.02)
    home = pool.choose(CHAT, affinity="k")
    clock.advance(1)
    serve(home, ttft=0.1, per_token=0.03)  # 1.4x: stays
    assert pool.choose(CHAT, affinity="k") is home
    serve(home, ttft=0.3, per_token=0.1)  # 5x: moves
    assert pool.choose(CHAT, affinity="k") is not home


def test_add_and_remove_servers(clock) -> None:
    pool = pool_of(2, RoundRobin(), clock)
    old = pool.endpoints["h0:80"]
    serve(old, ttft=0.1, per_token=0.02)
    old.begin()  # a request still running on it
    pool.remove("h0:80")
    pool.add("new:80")
    pool.add("h1:80")  # already there: keeps its state
    assert list(pool.endpoints) == ["h1:80", "new:80"]
    assert {pool.choose(CHAT).address for _ in range(6)} == {"h1:80", "new:80"}
    old.end()  # the drained request finishes harmlessly
    assert old.in_flight == 0


# -- policies -------------------------------------------------------------------


def test_fastest_keeps_then_switches_and_grows_its_threshold(clock) -> None:
    pool = pool_of(3, Fastest(latency_growing_rate=2.0), clock)
    a, b, c = pool.endpoints.values()
    serve(a, ttft=0.1, per_token=0.02)
    serve(b, ttft=0.1, per_token=0.03)
    serve(c, ttft=0.1, per_token=0.04)
    assert all(pool.choose(CHAT) is a for _ in range(10))
    assert not pool.wants_benchmark()
    clock.advance(1)
    serve(a, ttft=0.1, per_token=0.03)  # slower, but within 2x of its baseline: kept
    assert pool.choose(CHAT) is a and not pool.wants_benchmark()
    serve(a, ttft=0.5, per_token=0.1)  # 5x: switch to the fastest now, ask for a benchmark
    assert pool.choose(CHAT) is b
    assert pool.wants_benchmark() and not pool.wants_benchmark()  # asked once
    assert all(pool.choose(CHAT) is b for _ in range(10))
    clock.advance(1)
    for ep in (a, b, c):  # the whole fleet slows down 10x
        serve(ep, ttft=1.0, per_token=0.3)
    first = pool.choose(CHAT)
    assert pool.wants_benchmark()
    # the threshold has grown past the new normal: no switching on every request
    assert all(pool.choose(CHAT) is first for _ in range(10))
    assert not pool.wants_benchmark()


def test_fastest_benchmarks_first_and_prefers_measured_servers(clock) -> None:
    pool = pool_of(3, Fastest(), clock)
    a, b, c = pool.endpoints.values()
    first = pool.choose(CHAT)  # nothing measured: some server, and a benchmark request
    assert first is not None and pool.wants_benchmark()
    serve(b, ttft=0.1, per_token=0.02)
    assert pool.choose(CHAT) is b  # the first to answer is used, but not committed to
    serve(c, ttft=0.1, per_token=0.01)
    assert pool.choose(CHAT) is c
    assert pool.wants_benchmark()  # a is still unmeasured
    serve(a, ttft=0.1, per_token=0.015)
    assert pool.choose(CHAT) is c and not pool.wants_benchmark()
    serve(a, ttft=0.1, per_token=0.005)  # now a is faster, but c is kept while it holds up
    assert all(pool.choose(CHAT) is c for _ in range(5))


def test_fastest_moves_when_its_server_goes_down(clock) -> None:
    pool = pool_of(2, Fastest(), clock)
    a, b = pool.endpoints.values()
    serve(a, ttft=0.1, per_token=0.02)
    serve(b, ttft=0.1, per_token=0.03)
    assert pool.choose(CHAT) is a
    a.observe_failure(Failure.REFUSED, "connection refused")
    assert pool.choose(CHAT) is b


def test_make_policy_knows_every_configured_name() -> None:
    kinds = {name: type(make_policy(name, seed=1)).__name__ for name in POLICIES}
    assert kinds == {
        "peak_ewma": "PeakEwma",
        "fastest": "Fastest",
        "least_loaded": "LeastLoaded",
        "round_robin": "RoundRobin",
        "random": "RandomChoice",
    }
    with pytest.raises(ConfigError, match="peak_ewma"):
        make_policy("fastest_please")


# -- retry budget -----------------------------------------------------------------


def test_retry_budget_caps_retries_at_a_fraction_of_traffic(clock) -> None:
    budget = RetryBudget(ratio=0.2, min_per_s=1.0, ttl_s=10.0, clock=clock)
    for _ in range(100):
        budget.deposit()
    granted = sum(budget.try_withdraw() for _ in range(100))
    assert granted == 20 + 10  # 20 % of 100 requests, plus the 1/s x 10 s reserve
    assert not budget.try_withdraw()


def test_retry_budget_ages_out(clock) -> None:
    budget = RetryBudget(ratio=0.5, min_per_s=0.0, ttl_s=10.0, clock=clock)
    for _ in range(10):
        budget.deposit()
    assert sum(budget.try_withdraw() for _ in range(10)) == 5
    clock.advance(11)  # deposits and withdrawals have aged out
    assert not budget.try_withdraw()
    budget.deposit()
    budget.deposit()
    assert budget.try_withdraw() and not budget.try_withdraw()


def test_a_quiet_client_can_still_retry(clock) -> None:
    budget = RetryBudget(clock=clock)
    assert budget.try_withdraw()  # the reserve: no traffic yet, one failure may be retried


# -- work ---------------------------------------------------------------------------


def test_work_is_estimated_without_a_tokenizer() -> None:
    assert estimate_tokens("") == 0 and estimate_tokens("abcd" * 100) == 100
    work = Work.for_chat([{"role": "user", "content": "x" * 400}], max_tokens=64)
    assert work == Work("chat", 104, 64)
    parts = [
        {"role": "user", "content": [{"type": "text", "text": "y" * 40}, {"type": "image_url"}]}
    ]
    assert Work.for_chat(parts).prompt_tokens == 14
    assert Work.for_chat(parts).output_tokens == 256
    assert Work.for_embedding(["abcd", "abcdefgh"]) == Work("embedding", 3)
    assert Work.for_embedding([[1, 2, 3], [4]]).prompt_tokens == 4
    assert Work.for_prompt("Once upon", max_tokens=16) == Work("chat", 3, 16)

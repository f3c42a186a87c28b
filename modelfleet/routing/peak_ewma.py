"""The default policy: this request's expected latency, prefix caches counted.

A request whose prompt has blocks (prefix-aware routing, routing/prefix_index.py)
is weighed on every usable server: expected latency (Endpoint.expected_latency)
with the prefill of the tokens that server likely holds left out and the prompt
tokens still prefilling there put before it, so a cache hit and a queue are
compared in one unit, seconds. Among the servers within a band of the best
(PREFIX_BAND x best + PREFIX_SLACK_S) and under the load bound (fewer requests in
flight from here than LOAD_BOUND x the mean, plus one), the one likely holding the
most of the prompt wins, ties going to the earliest in rendezvous order of the
prompt's first block. So a held prefix stays where it is held, an unseen prefix
goes to its rendezvous home (the same server in every client process, without
coordination), and a hot prefix spills to the next server in that order once its
home is loaded: consistent hashing with bounded loads. The bound counts requests in
flight, which every client knows exactly (its share of the fleet's, in proportion);
latency estimates learnt from a few samples each are noisy (a peak, a queue behind
someone else's prefill), so the band is wide: it keeps prefixes off a server that is
clearly slower, while the bound does the balancing. With the band at 1.5x, eight
independent clients left a prefix's home on noise alone for half of the prefixes
new to them, and their fleet's hit ratio fell to 0.66x of one client's.

Any other request: power of two choices. Two distinct servers drawn at random;
the faster is kept with a probability that grows with how much faster it is, not
always: the log-odds are TIE_SLOPE x ln(ratio) within TIE_BAND, STEEP_SLOPE beyond.
Two equally fast servers then share a model's traffic evenly instead of swinging
all of it, second after second, to whichever looked a hair faster at its last
(peak-sensitive) sample, while a clearly faster one still takes nearly all (1.1x
faster: 55 %, 1.25x: 61 %, 1.5x: 93 %, 2x: 99.8 %). Comparing two rather than all
keeps independent clients from herding between two metric scrapes, and the slowest
server of three or more is rarely chosen.
"""

from __future__ import annotations

import math
import random
from collections.abc import Sequence

from modelfleet.routing.endpoint import Endpoint
from modelfleet.routing.prefix_index import PrefixIndex, rendezvous_weight
from modelfleet.routing.work import Work

TIE_BAND = math.log(1.25)  # latency ratios within 1.25x are near ties: shared gently
TIE_SLOPE = 2.0  # log-odds per unit of log ratio inside the band (a peak's noise lives there)
STEEP_SLOPE = 12.0  # and beyond it: a clearly slower server is all but left out
PREFIX_BAND = 3.0  # a server this much slower than the best may keep a prefix
PREFIX_SLACK_S = 0.02  # and this much: latency noise on a loaded host, not a queue
LOAD_BOUND = 1.25  # bounded-load rendezvous: requests in flight, x their mean, + 1
_MAX_ODDS = 40.0  # beyond this the slower one's chance is nil (and exp stays finite)


class PeakEwma:
    prefix_aware = True  # the Pool passes its PrefixIndex for work with blocks

    def __init__(self, seed: int | None = None) -> None:
        # Unseeded: the module's generator, which Python reseeds in a forked child,
        # so worker processes do not all make the same draws.
        self._rng = random if seed is None else random.Random(seed)

    def pick(self, endpoints: Sequence[Endpoint], work: Work,
             prefix: PrefixIndex | None = None) -> Endpoint:
        if len(endpoints) == 1:
            return endpoints[0]
        if prefix is not None and work.blocks:
            return _prefixed(endpoints, work, prefix)
        a, b = self._rng.sample(endpoints, 2)
        ea, eb = a.expected_latency(work), b.expected_latency(work)
        if ea > eb:
            a, b, ea, eb = b, a, eb, ea  # a: the faster
        if ea <= 0.0:
            return a
        gap = math.log(eb / ea)
        odds = TIE_SLOPE * min(gap, TIE_BAND) + STEEP_SLOPE * max(gap - TIE_BAND, 0.0)
        if odds > _MAX_ODDS:
            return a
        return b if self._rng.random() * (1.0 + math.exp(odds)) < 1.0 else a


def _prefixed(endpoints: Sequence[Endpoint], work: Work, prefix: PrefixIndex) -> Endpoint:
    blocks = work.blocks
    scored = []
    for endpoint in endpoints:
        cached = prefix.cached_tokens(endpoint.address, blocks)
        scored.append((endpoint.expected_latency(work, cached), cached, endpoint))
    limit = min(s[0] for s in scored) * PREFIX_BAND + PREFIX_SLACK_S
    # (+1: a client with a few requests in flight may still put two on one server)
    bound = LOAD_BOUND * (sum(e.in_flight for e in endpoints) + 1) / len(endpoints) + 1
    fit = [s for s in scored if s[0] <= limit and s[2].in_flight < bound]
    first = blocks[0]
    return max(fit or [s for s in scored if s[0] <= limit],
               key=lambda s: (s[1], rendezvous_weight(first, s[2].address)))[2]

"""A server that answers badly costs the caller nothing (issue 12, part 3).

Each misbehaviour of tests/hostile_servers.py is put beside one healthy sim, first in
the fleet under round_robin, so the caller's request goes to the hostile server first
(it answers the background probes well, so nothing has put it down before). Expected:

- beside a healthy sim: the caller gets the sim's own answer (the one a sim-only fleet
  gives), within a few stall deadlines, and the hostile server WAS asked;
- alone: `NoServerAvailable`, whose message says what the server did;
- never an exception from outside `modelfleet.errors`, never an empty or malformed
  answer returned as a success;
- the background probes survive any answer to the benchmark, /metrics or /health:
  they go on probing, and nothing is logged as an error (no "Task exception was never
  retrieved", no "probing failed").

A stream that already handed tokens to the caller is continued on the sim (issue 15):
the hostile server's tokens, then the rest of the sim's own answer
(`continue_final_message`); `StreamInterrupted` remains an accepted answer there.

A case the code gets wrong is marked xfail(strict=True) with the reason (FAILING,
PROBE_FAILING), so the suite stays green and turns red the moment one of them is fixed
without its mark being removed.
"""

from __future__ import annotations

import asyncio
import gc
import logging
import re
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

import hostile_servers as hs
import pytest
from helpers import SimProcess, free_port

from modelfleet.client import AsyncModelServer, ModelServer
from modelfleet.config import BenchmarkSpec, FleetConfig, ModelSpec, RoutingSpec, ServerSpec
from modelfleet.errors import FleetError, NoServerAvailable, StreamInterrupted
from modelfleet.testing import running

STALL_S = 0.3  # routing.stall_timeout_s: the floor of every stall and answer deadline here
#               (the sims answer at once: --speed 1e6 turns their simulated delays off)
REQUEST_TIMEOUT_S = 3.0  # routing.request_timeout_s: longer than BOUND_S, so a call that
#                          only ends at request_timeout_s shows up as too slow
BOUND_S = 1.5  # a call beside a hostile server must end within this: a few stall deadlines
PROBE_ROUNDS_WAIT_S = 3.0  # two more probe rounds (interval 0.05 s) must start within this

MESSAGES = [{"role": "user", "content": "Tell me about the sea."}]
PROMPT = "The sea is"
INPUTS = ["first sentence", "second sentence", "third sentence"]
CALLS = ("chat", "complete", "chat_stream", "embed")
BENCHMARK = BenchmarkSpec(messages=({"role": "user", "content": hs.PROBE_MARK},),
                          embedding_input=hs.PROBE_MARK, max_tokens=4)

ErrorWatch = Callable[[], Callable[[], list[str]]]  # see the loop_errors fixture
REDIRECT_TARGET: dict[str, str] = {}  # "url" of the server a redirect points to (fixture)


def _elsewhere() -> str:
    return REDIRECT_TARGET["url"]


@dataclass(frozen=True)
class Case:
    """One misbehaviour and what the caller must see of it."""

    behaviour: hs.Behaviour
    said: str  # NoServerAvailable's message must match this (case-insensitive regex)
    calls: tuple[str, ...] = CALLS
    slow: bool = False  # costs a deadline per attempt: sync runs leave it out, alone
    #                     runs try it on one call only (the file must stay fast)
    breaks_after_tokens: bool = False  # chat_stream sees tokens first: StreamInterrupted
    tolerable: bool = False  # the answer itself is good: taking it is fine as well


MALFORMED = r"malformed|invalid|json|choices|content|type|expected"
ENDED = r"ended|broke|incomplete|finish|closed"
CASES: dict[str, Case] = {
    "invalid_json": Case(hs.invalid_json, MALFORMED),
    "empty_200": Case(hs.empty_200, r"empty|malformed|ended"),
    "no_choices": Case(hs.no_choices, r"choices|data|empty|malformed|missing|no text"),
    "choices_string": Case(hs.choices_string, MALFORMED + r"|data"),
    "choices_of_null": Case(hs.choices_of_null, MALFORMED + r"|data"),
    "content_int": Case(hs.content_int, MALFORMED + r"|embedding"),
    "usage_string": Case(hs.usage_string, MALFORMED + r"|usage", tolerable=True),
    "error_200": Case(hs.error_200, r"CUDA out of memory"),
    "error_200_code_400": Case(hs.error_200_code_400, r"CUDA out of memory"),
    "sse_garbage": Case(hs.sse_garbage, MALFORMED + r"|stream|" + ENDED),
    "sse_without_data_prefix": Case(hs.sse_without_data_prefix,
                                    MALFORMED + r"|stream|" + ENDED),
    "sse_bad_json": Case(hs.sse_bad_json, MALFORMED + r"|stream"),
    "sse_json_not_object": Case(hs.sse_json_not_object, MALFORMED + r"|stream|" + ENDED),
    "sse_ends_after_tokens": Case(hs.sse_ends_after_tokens, MALFORMED + "|" + ENDED,
                                  breaks_after_tokens=True),
    "sse_ends_before_tokens": Case(hs.sse_ends_before_tokens, MALFORMED + "|" + ENDED),
    "sse_done_without_answer": Case(hs.sse_done_without_answer,
                                    MALFORMED + r"|empty|no text|" + ENDED),
    "redirect_307": Case(hs.redirect(307, _elsewhere), r"redirect|\b307\b"),
    "redirect_302": Case(hs.redirect(302, _elsewhere), r"redirect|\b302\b"),
    "never_ends": Case(hs.never_ends, r"stall|silent|deadline|no token|too long", slow=True),
    "reset_at_request": Case(hs.reset_at_request, r"closed|reset|disconnect|broke"),
    "close_at_request": Case(hs.close_at_request, r"closed|reset|disconnect|broke"),
    # (an SSE body has no length: a reset in it may read as the end of the stream)
    "reset_mid_body": Case(hs.reset_mid_body, r"closed|reset|disconnect|broke|ended"),
    "silence": Case(hs.silence, r"stall|silent|deadline", slow=True),
    "embed_wrong_count": Case(hs.embed_wrong_count, r"embeddings|vectors|inputs",
                              calls=("embed",)),
    "embed_ragged": Case(hs.embed_ragged, r"embeddings|vectors|length|dimension|ragged",
                         calls=("embed",)),
    "embed_bad_base64": Case(hs.embed_bad_base64, r"embeddings|base64|malformed",
                             calls=("embed",)),
}

# Cases the code gets wrong, each with the calls that fail and why (xfail, strict: a case
# fixed and left here fails). Every case passes today; add one here with a new hostile
# server that finds a new way to break the client, and remove it with the fix.
FAILING: dict[str, tuple[tuple[str, ...], str]] = {}
PROBE_FAILING: dict[str, str] = {}


def _marks(test: str, name: str, call: str) -> list[pytest.MarkDecorator]:
    if test == "probe":
        reason = PROBE_FAILING.get(name)
    else:
        calls, reason = FAILING.get(f"{name}/{call}") or FAILING.get(name) or ((), "")
        reason = reason if call in calls else None
    return [pytest.mark.xfail(strict=True, reason=reason)] if reason else []


def _params(test: str) -> list[Any]:
    def wanted(case: Case, call: str) -> bool:
        if case.slow:
            return test == "beside" or (test == "alone" and call == "complete")
        if test == "sync":  # a thin shell over the async core: its two bridges only
            return call in ("chat_stream", "embed")  # (_pull, and _call)
        return True

    return [pytest.param(name, call, id=f"{name}-{call}", marks=_marks(test, name, call))
            for name, case in CASES.items() for call in case.calls if wanted(case, call)]


# ---------------------------------------------------------------------------
# Servers (one hostile server, one redirect target and two sims for the module)
# ---------------------------------------------------------------------------


@pytest.fixture(scope="module")
def sims() -> Iterator[dict[str, SimProcess]]:
    """A chat sim ("m") and an embedding sim ("e"), with no simulated delays."""
    started = {model: SimProcess(free_port(), model, kind, flags={"speed": 1e6})
               for model, kind in (("m", "chat"), ("e", "embedding"))}
    with running(started.values()):
        yield started


@pytest.fixture(scope="module")
def servers() -> Iterator[tuple[hs.HostileServer, hs.HostileServer]]:
    """The hostile server, and a healthy one that redirects point to (it must never be
    asked: following a redirect would credit its answer to the hostile server and could
    carry the fleet's API key to a host outside the fleet)."""
    hostile, elsewhere = hs.HostileServer().start(), hs.HostileServer().start()
    REDIRECT_TARGET["url"] = elsewhere.url
    try:
        yield hostile, elsewhere
    finally:
        hostile.stop()
        elsewhere.stop()


@pytest.fixture
def hostile(servers: tuple[hs.HostileServer, hs.HostileServer]) -> hs.HostileServer:
    servers[0].reset()
    servers[1].reset()
    return servers[0]


@pytest.fixture
def elsewhere(servers: tuple[hs.HostileServer, hs.HostileServer]) -> hs.HostileServer:
    return servers[1]


@pytest.fixture(scope="module")
def reference(sims: dict[str, SimProcess]) -> dict[str, Any]:
    """What each call returns from a fleet of the healthy sims alone (sims are
    deterministic: the same request gets the same text and the same vectors)."""
    config = fleet_of([], sims, "m")
    config = FleetConfig(models={**config.models, **fleet_of([], sims, "e").models},
                         routing=config.routing, benchmark=BENCHMARK)
    with ModelServer(config=config) as client:
        return {call: ask_sync(client, call).value for call in CALLS}


@pytest.fixture
def loop_errors(caplog: pytest.LogCaptureFixture) -> ErrorWatch:
    """Call it in the test's event loop, at the start: it returns a function that lists
    what went wrong meanwhile. That is what this loop's exception handler heard (a
    task dead with "Task exception was never retrieved", an unclosed connection:
    garbage is collected first so that a dead task speaks) and modelfleet's error
    logs ("probing failed"). Only this test's loop: a task an earlier test left
    behind complains to its own loop."""

    def start() -> Callable[[], list[str]]:
        heard: list[str] = []
        loop = asyncio.get_running_loop()
        loop.set_exception_handler(lambda _, context: heard.append(
            f"{context.get('message')}: {context.get('exception')!r}"))
        caplog.clear()

        def errors() -> list[str]:
            gc.collect()
            return heard + [f"{r.name}: {r.getMessage()}" for r in caplog.records
                            if r.levelno >= logging.ERROR and r.name.startswith("modelfleet")]

        return errors

    return start


def fleet_of(first: list[Any], sims: dict[str, SimProcess], model: str,
             **routing: Any) -> FleetConfig:
    """`model` served by the servers in `first` (in that order), then by its sim."""
    sim = sims[model]
    servers = tuple(ServerSpec(s.host, s.port) for s in first) + (ServerSpec(sim.host, sim.port),)
    spec = ModelSpec(name=model, servers=servers, kind=sim.kind, backend="sim")
    settings = {"policy": "round_robin", "stall_timeout_s": STALL_S,
                "request_timeout_s": REQUEST_TIMEOUT_S, "probe_interval_s": 60.0, **routing}
    return FleetConfig(models={model: spec}, routing=RoutingSpec(**settings),
                       benchmark=BENCHMARK)


def alone(server: hs.HostileServer, model: str) -> FleetConfig:
    spec = ModelSpec(name=model, servers=(ServerSpec(server.host, server.port),),
                     kind="embedding" if model == "e" else "chat", backend="sim")
    return FleetConfig(models={model: spec}, benchmark=BENCHMARK,
                       routing=RoutingSpec(policy="round_robin", stall_timeout_s=STALL_S,
                                           request_timeout_s=REQUEST_TIMEOUT_S,
                                           probe_interval_s=60.0, max_retry=1))


def model_of(call: str) -> str:
    return "e" if call == "embed" else "m"


# ---------------------------------------------------------------------------
# The calls, through the public API
# ---------------------------------------------------------------------------


@dataclass(frozen=True)
class Answer:
    value: Any  # the text, or the vectors
    server: str | None


async def ask(client: AsyncModelServer, call: str) -> Answer:
    if call == "chat":  # max_tokens: the whole answer asked for in one piece
        r = await client.chat("m", MESSAGES, max_tokens=8)
        return Answer(r.text, r.server)
    if call == "complete":  # no max_tokens: streamed underneath
        r = await client.complete("m", PROMPT)
        return Answer(r.text, r.server)
    if call == "chat_stream":
        stream = client.chat_stream("m", MESSAGES, max_tokens=8)
        pieces = [piece async for piece in stream]
        assert all(isinstance(p, str) and p for p in pieces), f"stream pieces: {pieces!r}"
        return Answer("".join(pieces), stream.server)
    e = await client.embed_result("e", INPUTS)
    return Answer(e.vectors, e.servers[0])


def ask_sync(client: ModelServer, call: str) -> Answer:
    if call == "chat":
        r = client.chat("m", MESSAGES, max_tokens=8)
        return Answer(r.text, r.server)
    if call == "complete":
        r = client.complete("m", PROMPT)
        return Answer(r.text, r.server)
    if call == "chat_stream":
        with client.chat_stream("m", MESSAGES, max_tokens=8) as stream:
            pieces = list(stream)
        assert all(isinstance(p, str) and p for p in pieces), f"stream pieces: {pieces!r}"
        return Answer("".join(pieces), stream.server)
    e = client.embed_result("e", INPUTS)
    return Answer(e.vectors, e.servers[0])


def hostile_answer(call: str) -> Any:
    """What a hostile server's well-formed parts say (taken for a tolerable case)."""
    if call == "embed":
        return [[0.5] * hs.HOSTILE_DIM for _ in INPUTS]
    return hs.HOSTILE_TEXT


def check_beside(case: Case, call: str, outcome: Answer | BaseException,
                 sims: dict[str, SimProcess], hostile: hs.HostileServer,
                 reference: dict[str, Any]) -> None:
    """The caller got the healthy sim's answer (or, where allowed, the documented
    StreamInterrupted or the hostile server's good part)."""
    if call == "chat_stream" and isinstance(outcome, StreamInterrupted) and (
            case.breaks_after_tokens or case.tolerable):
        # the tokens it had sent (sse_ends_after_tokens: "Hostile partial"; a tolerable
        # case's text before its bad part)
        assert outcome.server == hostile.address
        assert outcome.text_so_far.startswith("Hostile") or (
            case.tolerable and outcome.text_so_far and
            hs.HOSTILE_TEXT.startswith(outcome.text_so_far)), outcome
        return
    if isinstance(outcome, BaseException):
        raise outcome
    if call == "chat_stream" and (case.breaks_after_tokens or case.tolerable) and \
            outcome.value.startswith(("Hostile", hs.HOSTILE_TEXT[:1])) and \
            outcome.server == sims[model_of(call)].address:
        # continued on the sim: what the hostile server sent, then the sim's answer past
        # as many tokens (the sim continues its own reply: its tokens are words and marks)
        pieces = re.findall(r"\s*(?:\w+|[^\w\s])", reference[call])
        for k in range(1, len(pieces)):
            if outcome.value.endswith("".join(pieces[k:])):
                given = outcome.value[:-len("".join(pieces[k:]))]
                assert len(re.findall(r"\w+|[^\w\s]", given)) == k, outcome
                return
        raise AssertionError(f"not the sim's answer continued: {outcome!r}")
    if case.tolerable and outcome.server == hostile.address:
        assert outcome.value == hostile_answer(call)
        return
    assert outcome.server == sims[model_of(call)].address, outcome
    assert outcome.value == reference[call]


# ---------------------------------------------------------------------------
# The tests
# ---------------------------------------------------------------------------


@pytest.mark.parametrize(("name", "call"), _params("beside"))
async def test_beside_a_healthy_sim_the_caller_gets_the_sims_answer(
        name: str, call: str, sims: dict[str, SimProcess], hostile: hs.HostileServer,
        elsewhere: hs.HostileServer, reference: dict[str, Any],
        loop_errors: ErrorWatch) -> None:
    case = CASES[name]
    hostile.reset(case.behaviour)
    errors = loop_errors()
    outcome: Answer | BaseException
    async with AsyncModelServer(config=fleet_of([hostile], sims, model_of(call))) as client:
        try:
            outcome = await asyncio.wait_for(ask(client, call), BOUND_S)
        except asyncio.TimeoutError:
            pytest.fail(f"no answer within {BOUND_S} s (stall deadline {STALL_S} s)")
        except FleetError as exc:  # judged below; anything else propagates as it is
            outcome = exc
    assert hostile.count("caller") >= 1, "the hostile server was never asked"
    check_beside(case, call, outcome, sims, hostile, reference)
    assert elsewhere.hits == {}, f"a redirect was followed: {dict(elsewhere.hits)}"
    del client
    assert errors() == []


@pytest.mark.parametrize(("name", "call"), _params("alone"))
async def test_alone_the_caller_hears_what_the_server_did(
        name: str, call: str, hostile: hs.HostileServer, elsewhere: hs.HostileServer) -> None:
    case = CASES[name]
    hostile.reset(case.behaviour)
    async with AsyncModelServer(config=alone(hostile, model_of(call))) as client:
        try:
            answer = await asyncio.wait_for(ask(client, call), BOUND_S)
        except asyncio.TimeoutError:
            pytest.fail(f"no answer within {BOUND_S} s (stall deadline {STALL_S} s)")
        except StreamInterrupted as exc:
            assert call == "chat_stream" and (case.breaks_after_tokens or case.tolerable), exc
            assert exc.server == hostile.address
            return
        except NoServerAvailable as exc:
            assert hostile.count("caller") >= 1, "the hostile server was never asked"
            assert set(exc.reasons) == {hostile.address}
            assert re.search(case.said, str(exc), re.IGNORECASE), \
                f"the message does not say what the server did: {exc}"
            return
    assert case.tolerable, f"a hostile answer was returned as a success: {answer!r}"
    assert answer.server == hostile.address and answer.value == hostile_answer(call)


@pytest.mark.parametrize(("name", "call"), _params("sync"))
def test_the_sync_client_gets_the_sims_answer_too(
        name: str, call: str, sims: dict[str, SimProcess], hostile: hs.HostileServer,
        elsewhere: hs.HostileServer, reference: dict[str, Any]) -> None:
    case = CASES[name]
    hostile.reset(case.behaviour)
    outcome: Answer | BaseException
    with ModelServer(config=fleet_of([hostile], sims, model_of(call))) as client:
        try:
            outcome = ask_sync(client, call)
        except FleetError as exc:
            outcome = exc
    assert hostile.count("caller") >= 1, "the hostile server was never asked"
    check_beside(case, call, outcome, sims, hostile, reference)
    assert elsewhere.hits == {}, f"a redirect was followed: {dict(elsewhere.hits)}"


# The background probes: the hostile server answers callers well, and, after its first
# probe, its benchmark (or its /metrics and /health; the client reads no /health today)
# badly. The chat model's benchmark meets every chat misbehaviour; the embedding model's
# shares most code paths with it, so one case stands for the rest there.
PROBE_CASES: dict[str, tuple[str, hs.Behaviour, str]] = {
    **{f"benchmark-{name}": ("probe", case.behaviour, "chat") for name, case in CASES.items()
       if "chat" in case.calls and name != "redirect_302"},
    "embedding-benchmark-usage_string": ("probe", hs.usage_string, "embed"),
    "metrics-binary_garbage": ("metrics", hs.binary_garbage, "chat"),
    "metrics-unknown_charset": ("metrics", hs.unknown_charset, "chat"),
    "metrics-absurd_numbers": ("metrics", hs.absurd_numbers, "chat"),
    "metrics-html_page": ("metrics", hs.html_page, "chat"),
    "metrics-invalid_json": ("metrics", hs.invalid_json, "chat"),
    "metrics-empty_200": ("metrics", hs.empty_200, "chat"),
    "metrics-reset_at_request": ("metrics", hs.reset_at_request, "chat"),
    "metrics-reset_mid_body": ("metrics", hs.reset_mid_body, "chat"),
    "metrics-never_ends": ("metrics", hs.never_ends, "chat"),
}


@pytest.mark.parametrize("name", [
    pytest.param(n, marks=_marks("probe", n, "")) for n in PROBE_CASES])
async def test_background_probes_survive_any_answer(
        name: str, sims: dict[str, SimProcess], hostile: hs.HostileServer,
        elsewhere: hs.HostileServer, reference: dict[str, Any],
        loop_errors: ErrorWatch) -> None:
    kind, behaviour, call = PROBE_CASES[name]
    model = model_of(call)
    good = (reference[call], hostile_answer(call))
    errors = loop_errors()
    config = fleet_of([hostile], sims, model, probe_interval_s=0.05)
    async with AsyncModelServer(config=config) as client:
        # The first call starts the probes (the hostile server passes the first one, and
        # answers callers well throughout): either server's answer will do.
        answer = await asyncio.wait_for(ask(client, call), BOUND_S)
        assert answer.value in good
        hostile.misbehave(**{"probe" if kind == "probe" else "metrics": behaviour})
        # Probes the caller waits for: each server's answer (a number, or None: down).
        latency = await asyncio.wait_for(client.get_all_latency(), BOUND_S)
        assert set(latency[model]) == {hostile.address, sims[model].address}
        assert latency[model][sims[model].address] is not None
        before = hostile.count(kind)
        assert before >= 2, "the hostile server was not probed after it went bad"
        deadline = time.monotonic() + PROBE_ROUNDS_WAIT_S
        while hostile.count(kind) < before + 2:  # the background loop goes on probing
            assert time.monotonic() < deadline, \
                f"probing stopped: {hostile.count(kind) - before} more probes in " \
                f"{PROBE_ROUNDS_WAIT_S} s at a 0.05 s interval"
            await asyncio.sleep(0.02)
        # ... and the client still answers from the healthy server at least.
        answer = await asyncio.wait_for(ask(client, call), BOUND_S)
        assert answer.value in good
    assert elsewhere.hits == {}, f"a redirect was followed: {dict(elsewhere.hits)}"
    del client
    assert errors() == []

"""The client API: one object that always talks to the best server of a model.

`AsyncModelServer` is the core: it owns one pooled HTTP session (`modelfleet.wire`),
one routing `Pool` per model (`modelfleet.routing`) and one background probe loop
(`modelfleet.probe`). Every request picks a server, and a failure that is the
server's (refused, reset, silent past its stall deadline, 429/503, 5xx, 404/401)
moves the request to another server, within `routing.max_retry` attempts and a
retry budget, so the caller sees an error only when no server could answer.

`ModelServer` is the same object for synchronous code: a private event loop on a
daemon thread runs one `AsyncModelServer`, so both share every line of routing.
It is safe to share between threads, and a forked child (multiprocessing) starts
its own loop on first use instead of inheriting a dead one.
"""

from __future__ import annotations

import asyncio
import logging
import os
import random
import threading
import weakref
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, TypeVar

from modelfleet.config import FleetConfig, ModelSpec, RoutingSpec, ServerSpec, load_config
from modelfleet.errors import FleetError, NoServerAvailable, StreamInterrupted, UsageError
from modelfleet.probe import apply_probe, benchmark_work, probe_server
from modelfleet.routing import (
    Endpoint,
    EndpointStatus,
    Health,
    Pool,
    RetryBudget,
    Work,
    make_policy,
)
from modelfleet.wire import Embeddings, EngineFailure, TokenStream, Wire

__all__ = ["AsyncModelServer", "ChatResult", "ChatStream", "EmbedResult", "ModelServer",
           "ModelStatus", "SyncChatStream"]

log = logging.getLogger(__name__)

T = TypeVar("T")

FIRST_USE_WAIT_S = 3.0  # how long a model's first call waits for its servers' first benchmark
BACKOFF_BASE_S = 0.05  # retry pause once every server was tried, doubling per attempt
BACKOFF_MAX_S = 1.0
EMBED_BATCH = 256  # inputs per embeddings request
CLOSE_WAIT_S = 5.0  # sync close: how long to wait for the loop to finish closing
PROBE_TIMEOUT_S = 60.0  # a tiny benchmark request that takes longer has failed


@dataclass(frozen=True)
class ChatResult:
    """A finished chat or text completion, and where and how fast it came."""

    text: str
    usage: Mapping[str, int]
    server: str  # host:port that answered
    latency_s: float  # from the request going out to its last byte
    ttft_s: float  # from the request going out to its first token (a whole answer, asked
    #               for in one piece when max_tokens is given, has all its tokens at latency_s)
    finish_reason: str | None
    model: str  # the model name the server reported


@dataclass
class _StreamProgress:
    server: str | None = None
    tokens: TokenStream | None = None


class ChatStream:
    """The text deltas of one streamed chat completion, as an async iterator.

    `server` is the host:port answering once the first token came (None before);
    `text`, `usage` and `finish_reason` fill in as the stream goes. Dropping it, `break`,
    `aclose()` or leaving an `async with` block cancels the request upstream.
    """

    def __init__(self, progress: _StreamProgress, pieces: AsyncIterator[str]) -> None:
        # The generator writes to `progress`, never to this object: no reference cycle, so
        # dropping the stream finalizes the generator at once (and closes the request).
        self._progress = progress
        self._pieces = pieces

    @property
    def server(self) -> str | None:
        return self._progress.server

    @property
    def text(self) -> str:
        """Everything received so far."""
        tokens = self._progress.tokens
        return tokens.text if tokens is not None else ""

    @property
    def usage(self) -> Mapping[str, int]:
        tokens = self._progress.tokens
        return dict(tokens.usage) if tokens is not None else {}

    @property
    def finish_reason(self) -> str | None:
        tokens = self._progress.tokens
        return tokens.finish_reason if tokens is not None else None

    def __aiter__(self) -> ChatStream:
        return self

    async def __anext__(self) -> str:
        return await self._pieces.__anext__()

    async def aclose(self) -> None:
        await self._pieces.aclose()  # type: ignore[attr-defined]

    async def __aenter__(self) -> ChatStream:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.aclose()


class SyncChatStream:
    """`ChatStream` for `ModelServer`: a plain iterator of text deltas.

    Each delta is fetched when asked for, so a slow reader holds the server back
    rather than filling a buffer. Dropping it, `break`, `close()` or leaving a `with`
    block cancels the request upstream.
    """

    def __init__(self, stream: ChatStream, pieces: Iterator[str]) -> None:
        self._stream = stream
        self._pieces = pieces

    @property
    def server(self) -> str | None:
        return self._stream.server

    @property
    def text(self) -> str:
        return self._stream.text

    @property
    def usage(self) -> Mapping[str, int]:
        return self._stream.usage

    @property
    def finish_reason(self) -> str | None:
        return self._stream.finish_reason

    def __iter__(self) -> SyncChatStream:
        return self

    def __next__(self) -> str:
        return next(self._pieces)

    def close(self) -> None:
        self._pieces.close()  # type: ignore[attr-defined]

    def __enter__(self) -> SyncChatStream:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


@dataclass(frozen=True)
class EmbedResult:
    """Embeddings with where and how fast they came (`embed` returns just the vectors)."""

    vectors: Any  # list of float lists, or a 2-D numpy float32 array
    usage: Mapping[str, int]  # summed over the batches
    servers: tuple[str, ...]  # host:port that answered each batch of up to 256 inputs
    latency_s: float  # of the slowest batch, from its request going out to its last byte


@dataclass(frozen=True)
class ModelStatus:
    """What the client knows about one model's servers right now."""

    model: str
    kind: str
    policy: str
    servers: tuple[EndpointStatus, ...]


class _Route:
    """One model as this client routes it: its servers, their endpoints, its retry budget."""

    def __init__(self, spec: ModelSpec, routing: RoutingSpec, seed: int | None) -> None:
        self.spec = spec
        self.routing = routing
        self.servers: dict[str, ServerSpec] = {s.address: s for s in spec.servers}
        self.pool = Pool(list(self.servers),
                         make_policy(routing.policy,
                                     latency_growing_rate=routing.latency_growing_rate,
                                     seed=seed),
                         degrade_ratio=routing.latency_growing_rate)
        self.budget = RetryBudget(ratio=routing.retry_budget_ratio,
                                  min_per_s=routing.retry_budget_min_per_s)
        self.first_probe: asyncio.Task[None] | None = None
        self.in_use = False  # a request asked for it: probed in the background from then on
        self.ready = False  # its first benchmark finished (or was waited for long enough)
        self.benchmarking = False

    def update(self, spec: ModelSpec, routing: RoutingSpec, seed: int | None) -> None:
        """A reloaded config: new servers join, removed ones drain (requests on them finish)."""
        if routing.policy != self.routing.policy or \
                routing.latency_growing_rate != self.routing.latency_growing_rate:
            self.pool.policy = make_policy(routing.policy,
                                           latency_growing_rate=routing.latency_growing_rate,
                                           seed=seed)
        if (routing.retry_budget_ratio, routing.retry_budget_min_per_s) != \
                (self.routing.retry_budget_ratio, self.routing.retry_budget_min_per_s):
            self.budget = RetryBudget(ratio=routing.retry_budget_ratio,
                                      min_per_s=routing.retry_budget_min_per_s)
        servers = {s.address: s for s in spec.servers}
        for address in self.servers.keys() - servers.keys():
            self.pool.remove(address)
        for address in servers.keys() - self.servers.keys():
            self.pool.add(address)
        self.spec, self.routing, self.servers = spec, routing, servers


class AsyncModelServer:
    """Latency-aware, failure-hiding access to a fleet, for asyncio code.

    Use it from one event loop (the one that first uses it). Build it from a fleet
    file (`path`, else $MODELFLEET_CONFIG, else ./client_config.yaml) or from a
    `FleetConfig` made in code. `seed` makes the random policies repeatable.
    """

    def __init__(self, path: str | os.PathLike[str] | None = None, *,
                 config: FleetConfig | None = None, seed: int | None = None) -> None:
        if config is not None and path is not None:
            raise UsageError("pass either a fleet file path or config=, not both")
        self._config = config if config is not None else load_config(path)
        self._seed = seed
        self._rng = random.Random(seed)
        self._wire = Wire(limit_per_host=256, keepalive_s=30.0)
        self._routes: dict[str, _Route] = {}  # by model key
        self._by_name: dict[str, _Route] = {}  # by any name a caller used (key or alias)
        self._background: set[asyncio.Task[Any]] = set()
        self._probe_loop: asyncio.Task[None] | None = None
        self._loop: asyncio.AbstractEventLoop | None = None  # the one it belongs to
        self._closed = False

    # -- the API -----------------------------------------------------------

    async def chat(self, model: str, messages: Sequence[Mapping[str, Any]], *,
                   affinity: str | None = None, **params: Any) -> ChatResult:
        """A chat completion from the best server; extra keywords go to the server."""
        route = await self._ready(model, "chat")
        body = {**params, "model": route.spec.wire_name, "messages": list(messages)}
        max_tokens = _max_tokens(params)
        work = Work.for_chat(messages, max_tokens)
        return await self._generate(route, "/v1/chat/completions", body, work, affinity,
                                    whole=max_tokens is not None)

    async def complete(self, model: str, prompt: str, *, affinity: str | None = None,
                       **params: Any) -> ChatResult:
        """A text completion (`/v1/completions`) of `prompt`."""
        route = await self._ready(model, "chat")
        body = {**params, "model": route.spec.wire_name, "prompt": prompt}
        max_tokens = _max_tokens(params)
        work = Work.for_prompt(prompt if isinstance(prompt, str) else str(prompt), max_tokens)
        return await self._generate(route, "/v1/completions", body, work, affinity,
                                    whole=max_tokens is not None)

    def chat_stream(self, model: str, messages: Sequence[Mapping[str, Any]], *,
                    affinity: str | None = None, **params: Any) -> ChatStream:
        """Text deltas of a chat completion as they come (`async for piece in ...`).

        Moves to another server only before the first token; a break after it raises
        `StreamInterrupted` with the text so far. Leaving early (break, aclose,
        cancellation) closes the connection, so the engine aborts the request.
        """
        progress = _StreamProgress()
        return ChatStream(progress, self._stream_chat(progress, model, messages, affinity, params))

    async def _stream_chat(self, progress: _StreamProgress, model: str,
                           messages: Sequence[Mapping[str, Any]], affinity: str | None,
                           params: dict[str, Any]) -> AsyncIterator[str]:
        route = await self._ready(model, "chat")
        body = {**params, "model": route.spec.wire_name, "messages": list(messages)}
        work = Work.for_chat(messages, _max_tokens(params))
        api_key = route.spec.api_key
        timeout_s = route.routing.request_timeout_s

        async def first_token(server: ServerSpec, stall_s: float) -> tuple[TokenStream, str]:
            stream = await self._wire.open_stream(server, "/v1/chat/completions", body,
                                                  api_key=api_key, stall_s=stall_s,
                                                  timeout_s=timeout_s)
            try:
                return stream, await stream.__anext__()
            except StopAsyncIteration:
                return stream, ""  # an empty answer
            except BaseException:
                stream.close()
                raise

        endpoint, (stream, first) = await self._attempts(route, work, affinity, first_token)
        progress.server, progress.tokens = endpoint.address, stream
        finished = False
        try:
            if first:
                yield first
            try:
                async for piece in stream:
                    yield piece
            except EngineFailure as exc:
                endpoint.observe_failure(exc.failure, exc.reason, retry_after_s=exc.retry_after_s)
                raise StreamInterrupted(stream.text, endpoint.address, exc.reason) from None
            finished = True
            generation = stream.generation()
            endpoint.observe_success(ttft_s=generation.ttft_s, total_s=generation.total_s,
                                     work=work, output_tokens=generation.output_tokens)
        finally:
            if not finished:
                stream.close()
            endpoint.end()
        self._maybe_benchmark(route)

    async def embed(self, model: str, inputs: str | Sequence[str], *, as_numpy: bool = False,
                    **params: Any) -> Any:
        """One vector per input, in input order: a list of float lists, or a 2-D numpy
        float32 array with `as_numpy=True`. Sent in batches of 256 inputs, spread over
        the servers."""
        return (await self.embed_result(model, inputs, as_numpy=as_numpy, **params)).vectors

    async def embed_result(self, model: str, inputs: str | Sequence[str], *,
                           as_numpy: bool = False, **params: Any) -> EmbedResult:
        """`embed`, with the usage, the servers that answered and the latency."""
        route = await self._ready(model, "embedding")
        items = [inputs] if isinstance(inputs, str) else list(inputs)
        batches = [items[i:i + EMBED_BATCH] for i in range(0, len(items), EMBED_BATCH)]
        if len(batches) <= 1:
            parts = [await self._embed_batch(route, items, as_numpy, params)]
        else:
            parts = list(await asyncio.gather(
                *(self._embed_batch(route, batch, as_numpy, params) for batch in batches)))
        usage: dict[str, int] = {}
        for _, answer in parts:
            for key, value in answer.usage.items():
                usage[key] = usage.get(key, 0) + value
        if as_numpy:
            import numpy as np

            vectors: Any = (parts[0][1].vectors if len(parts) == 1
                            else np.concatenate([answer.vectors for _, answer in parts]))
        else:
            vectors = [vector for _, answer in parts for vector in answer.vectors]
        return EmbedResult(vectors=vectors, usage=usage,
                           servers=tuple(server for server, _ in parts),
                           latency_s=max(answer.total_s for _, answer in parts))

    async def status(self, *, probe: bool = False) -> dict[str, ModelStatus]:
        """Per model, per server: health and why, latency estimates, in flight, server queue.

        Models not used yet show what is known (nothing measured) unless `probe=True`,
        which benchmarks every server of every model first.
        """
        self._check_open()
        if probe:
            await asyncio.gather(*(self._probe_route(self._route(name))
                                   for name in self._config.models))
        return {name: ModelStatus(model=name, kind=spec.kind, policy=self._config.routing.policy,
                                  servers=tuple(self._route(name).pool.status()))
                for name, spec in self._config.models.items()}

    def available_models(self) -> list[str]:
        """The model names of the fleet (aliases resolve to these)."""
        return list(self._config.models)

    @property
    def config(self) -> FleetConfig:
        return self._config

    async def reload(self, config: FleetConfig | None = None) -> None:
        """Read the fleet file again (or take `config`): new servers join, removed ones
        drain, changed routing settings apply; what was learnt about kept servers stays."""
        self._check_open()
        if config is None:
            if self._config.path is None:
                raise UsageError("this client was built from a FleetConfig, not a file: "
                                 "pass reload(config=...)")
            config = await asyncio.get_running_loop().run_in_executor(
                None, load_config, self._config.path)
        self._config = config
        self._by_name.clear()
        for name in list(self._routes):
            if name in config.models:
                self._routes[name].update(config.models[name], config.routing, self._seed)
            else:
                del self._routes[name]  # requests already on it finish with what they hold
        for route in self._routes.values():
            if route.ready:
                self._spawn(self._probe_route(route))  # measure newcomers at once

    async def close(self) -> None:
        """Stop probing and close every connection; the object cannot be used after."""
        if self._closed:
            return
        self._closed = True
        tasks = list(self._background)
        for task in tasks:
            task.cancel()
        if tasks:
            await asyncio.gather(*tasks, return_exceptions=True)
        self._background.clear()
        self._probe_loop = None
        await self._wire.close()

    async def __aenter__(self) -> AsyncModelServer:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    # -- the original entry points -----------------------------------------

    async def get_completion_or_embedding(self, model: str, messages_or_text: Any,
                                          **params: Any) -> Any:
        """The old one-call API. A chat model: `messages_or_text` is a message list or a
        user prompt string, and the reply text (str) is returned. An embedding model: a
        string gives one vector (list of floats), a list of strings a list of vectors."""
        spec = self._config.resolve_model(model)
        if spec.kind == "embedding":
            if isinstance(messages_or_text, str):
                return (await self.embed(model, [messages_or_text], **params))[0]
            return await self.embed(model, messages_or_text, **params)
        if isinstance(messages_or_text, str):
            messages_or_text = [{"role": "user", "content": messages_or_text}]
        return (await self.chat(model, messages_or_text, **params)).text

    async def get_fastest_server(self, model: str) -> str:
        """The `host:port` of the server of `model` with the lowest expected latency now
        (its servers are benchmarked first if they never were)."""
        route = await self._ready(model, None)
        work = benchmark_work(route.spec, self._config.benchmark)
        usable = [e for e in route.pool.endpoints.values() if e.usable()]
        if not usable:
            raise NoServerAvailable(route.spec.name, route.pool.reasons())
        return min(usable, key=lambda e: e.expected_latency(work)).address

    async def get_all_latency(self) -> dict[str, dict[str, float | None]]:
        """Every model's servers, benchmarked now: {model: {host:port: seconds or None}};
        seconds are the expected latency of a reference request (None: no answer)."""
        self._check_open()
        await asyncio.gather(*(self._probe_route(self._route(name))
                               for name in self._config.models))
        return {name: {s.address: s.expected_latency_s if s.health is not Health.DOWN else None
                       for s in self._route(name).pool.status()}
                for name in self._config.models}

    async def get_running_server_sizes(self) -> dict[str, int]:
        """How many servers of each model answer now: {model: usable servers} (the old
        setups named models by size, e.g. "8B"; a model with 0 has none running)."""
        self._check_open()
        await asyncio.gather(*(self._probe_route(self._route(name))
                               for name in self._config.models))
        return {name: sum(1 for e in self._route(name).pool.endpoints.values() if e.usable())
                for name in self._config.models}

    # -- routing a request -------------------------------------------------

    def _check_open(self) -> None:
        if self._closed:
            raise UsageError("this model server client is closed")
        loop = asyncio.get_running_loop()
        if self._loop is not loop:
            if self._loop is not None and not self._loop.is_closed():
                raise UsageError("an AsyncModelServer belongs to the event loop that first used "
                                 "it; make one per event loop (or share a ModelServer between "
                                 "threads)")
            if self._loop is not None:  # its old loop is gone (asyncio.run again): start over
                self._wire.forget_session()
                self._background.clear()
                self._probe_loop = None
                for route in self._routes.values():
                    route.first_probe = None
            self._loop = loop
            if any(route.in_use for route in self._routes.values()):
                self._start_probe_loop()

    def _route(self, model: str) -> _Route:
        route = self._by_name.get(model)
        if route is None:
            spec = self._config.resolve_model(model)  # UnknownModel lists the known names
            route = self._routes.get(spec.name)
            if route is None:
                route = self._routes[spec.name] = _Route(spec, self._config.routing, self._seed)
            self._by_name[model] = route
        return route

    async def _ready(self, model: str, kind: str | None) -> _Route:
        """The model's route, benchmarked on first use (waiting a few seconds at most)."""
        self._check_open()
        route = self._route(model)
        if kind is not None and route.spec.kind != kind:
            use = "embed()" if route.spec.kind == "embedding" else "chat() or complete()"
            raise UsageError(f"model {route.spec.name!r} is a {route.spec.kind} model; use {use}")
        if not route.ready:
            if route.first_probe is None:
                route.in_use = True
                route.first_probe = self._spawn(self._probe_route(route))
                self._start_probe_loop()
            await asyncio.wait({route.first_probe}, timeout=FIRST_USE_WAIT_S)
            route.ready = True
        return route

    async def _attempts(self, route: _Route, work: Work, affinity: str | None,
                        attempt: Callable[[ServerSpec, float], Awaitable[T]], *,
                        whole: bool = False) -> tuple[Endpoint, T]:
        """Run `attempt` on servers until one succeeds; returns it with its endpoint still
        begun (the caller observes the success and ends it). `attempt` gets the server and
        its deadline: the stall deadline, or with `whole` the deadline of a whole answer.

        Each retry goes to a server not tried yet while one is left, pauses (jittered,
        growing) only once all were tried, and must be allowed by the retry budget.
        """
        routing = route.routing
        route.budget.deposit()
        tried: list[str] = []
        reasons: dict[str, str] = {}
        for number in range(max(1, routing.max_retry)):
            if number and not route.budget.try_withdraw():
                break
            endpoint = route.pool.choose(work, exclude=tried, affinity=affinity)
            if endpoint is None:  # every server was tried: back off, then any server again
                await asyncio.sleep(self._backoff(number))
                endpoint = route.pool.choose(work, affinity=affinity)
                if endpoint is None:
                    break  # no server at all
            server = route.servers[endpoint.address]
            deadline = endpoint.answer_deadline if whole else endpoint.stall_deadline
            stall_s = deadline(floor_s=routing.stall_timeout_s,
                               ceiling_s=routing.request_timeout_s, work=work)
            endpoint.begin()
            try:
                value = await attempt(server, stall_s)
            except EngineFailure as exc:
                endpoint.observe_failure(exc.failure, exc.reason, retry_after_s=exc.retry_after_s)
                endpoint.end()
                log.debug("%s failed on %s (%s): %s", route.spec.name, endpoint.address,
                          exc.failure.value, exc.reason)
                if endpoint.address not in tried:
                    tried.append(endpoint.address)
                reasons[endpoint.address] = exc.reason
                continue
            except BaseException:
                endpoint.end()
                raise
            return endpoint, value
        self._maybe_benchmark(route)
        raise self._no_server(route, reasons)

    def _no_server(self, route: _Route, reasons: dict[str, str]) -> NoServerAvailable:
        why = {}
        known = route.pool.reasons()
        for address in route.servers:
            if address in reasons:
                why[address] = reasons[address]
            elif address in known:
                why[address] = known[address]
            else:
                why[address] = "not tried: the retry budget or max_retry was used up"
        return NoServerAvailable(route.spec.name, why)

    def _backoff(self, number: int) -> float:
        return min(BACKOFF_MAX_S, BACKOFF_BASE_S * 2 ** max(0, number - 1)) * \
            self._rng.uniform(0.5, 1.0)

    async def _generate(self, route: _Route, path: str, body: dict[str, Any], work: Work,
                        affinity: str | None, *, whole: bool) -> ChatResult:
        """A whole chat or completion. With `whole` (its length bounded by max_tokens) it
        is asked for in one piece under a deadline for the whole answer, which spares a
        busy engine a chunk per token; else it is streamed underneath, so that a server
        gone silent is caught by the stall deadline."""
        api_key = route.spec.api_key
        timeout_s = route.routing.request_timeout_s
        wire = self._wire

        def attempt(server: ServerSpec, deadline_s: float) -> Awaitable[Any]:
            if whole:
                return wire.generate_whole(server, path, body, api_key=api_key,
                                           deadline_s=deadline_s)
            return wire.generate(server, path, body, api_key=api_key, stall_s=deadline_s,
                                 timeout_s=timeout_s)

        endpoint, generation = await self._attempts(route, work, affinity, attempt,
                                                    whole=whole)
        try:
            endpoint.observe_success(ttft_s=generation.ttft_s, total_s=generation.total_s,
                                     work=work, output_tokens=generation.output_tokens)
        finally:
            endpoint.end()
        self._maybe_benchmark(route)
        return ChatResult(text=generation.text, usage=generation.usage,
                          server=endpoint.address, latency_s=generation.total_s,
                          ttft_s=(generation.total_s if generation.ttft_s is None
                                  else generation.ttft_s),
                          finish_reason=generation.finish_reason,
                          model=generation.model)

    async def _embed_batch(self, route: _Route, batch: list[str], as_numpy: bool,
                           params: Mapping[str, Any]) -> tuple[str, Embeddings]:
        body = {**params, "model": route.spec.wire_name, "input": batch}
        work = Work.for_embedding(batch)
        api_key = route.spec.api_key
        timeout_s = route.routing.request_timeout_s
        wire = self._wire

        def attempt(server: ServerSpec, stall_s: float) -> Awaitable[Any]:
            return wire.embed(server, body, api_key=api_key, stall_s=stall_s,
                              timeout_s=timeout_s, as_numpy=as_numpy)

        endpoint, answer = await self._attempts(route, work, None, attempt)
        try:
            endpoint.observe_success(ttft_s=None, total_s=answer.total_s, work=work)
        finally:
            endpoint.end()
        if len(answer.vectors) != len(batch):
            raise FleetError(f"{endpoint.address} returned {len(answer.vectors)} embeddings "
                             f"for {len(batch)} inputs")
        return endpoint.address, answer

    # -- background probing ------------------------------------------------

    def _spawn(self, coro: Awaitable[Any]) -> asyncio.Task[Any]:
        task = asyncio.ensure_future(coro)
        self._background.add(task)
        task.add_done_callback(self._background.discard)
        return task

    def _start_probe_loop(self) -> None:
        if self._probe_loop is None and not self._closed:
            self._probe_loop = self._spawn(self._probe_forever())

    def _maybe_benchmark(self, route: _Route) -> None:
        """The policy asked for every server to be measured afresh (Fastest switching)."""
        if route.pool.wants_benchmark() and not route.benchmarking and not self._closed:
            self._spawn(self._probe_route(route))

    async def _probe_forever(self) -> None:
        """Every probe_interval_s, probe every server of every model in use, at once."""
        while True:
            await asyncio.sleep(self._config.routing.probe_interval_s)
            routes = [r for r in self._routes.values() if r.in_use]
            try:
                await asyncio.gather(*(self._probe_route(r) for r in routes))
            except Exception:  # a probe must never end probing
                log.exception("probing failed")

    async def _probe_route(self, route: _Route) -> None:
        route.benchmarking = True
        try:
            await asyncio.gather(*(self._probe_one(route, s) for s in list(route.servers.values())))
        finally:
            route.benchmarking = False

    async def _probe_one(self, route: _Route, server: ServerSpec) -> None:
        endpoint = route.pool.endpoints.get(server.address)
        if endpoint is None:
            return
        routing = route.routing
        work = benchmark_work(route.spec, self._config.benchmark)
        stall_s = endpoint.stall_deadline(floor_s=routing.stall_timeout_s,
                                          ceiling_s=routing.request_timeout_s, work=work)
        result = await probe_server(self._wire, route.spec, server, self._config.benchmark,
                                    stall_s=stall_s,
                                    timeout_s=min(routing.request_timeout_s, PROBE_TIMEOUT_S))
        if route.pool.endpoints.get(server.address) is endpoint:  # not removed meanwhile
            apply_probe(endpoint, result)


def _max_tokens(params: Mapping[str, Any]) -> int | None:
    value = params.get("max_tokens", params.get("max_completion_tokens"))
    return value if isinstance(value, int) else None


# ---------------------------------------------------------------------------
# The synchronous client
# ---------------------------------------------------------------------------

_SYNC_CLIENTS: weakref.WeakSet[ModelServer] = weakref.WeakSet()
_LEFT_BY_PARENT: list[Any] = []  # the parent's loop objects, kept (never closed) in a child


def _after_fork_in_child() -> None:
    for client in list(_SYNC_CLIENTS):
        client._forget_parent()


if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_after_fork_in_child)


class ModelServer:
    """`AsyncModelServer` for synchronous code: same methods, same routing.

    A private event loop on a daemon thread runs the async client; calls from any
    number of threads are handed to it. After `fork` the child starts its own loop
    on first use. `close()` (or leaving the `with` block) stops the loop's thread.
    """

    def __init__(self, path: str | os.PathLike[str] | None = None, *,
                 config: FleetConfig | None = None, seed: int | None = None) -> None:
        if config is not None and path is not None:
            raise UsageError("pass either a fleet file path or config=, not both")
        self._config = config if config is not None else load_config(path)  # errors here
        self._seed = seed
        self._lock = threading.Lock()
        self._loop: asyncio.AbstractEventLoop | None = None
        self._thread: threading.Thread | None = None
        self._core: AsyncModelServer | None = None
        self._finalizer: weakref.finalize | None = None
        self._closed = False
        _SYNC_CLIENTS.add(self)

    # -- the loop thread ---------------------------------------------------

    def _running(self) -> tuple[asyncio.AbstractEventLoop, AsyncModelServer]:
        loop, core = self._loop, self._core
        if loop is not None and core is not None:
            return loop, core
        with self._lock:
            if self._closed:
                raise UsageError("this model server client is closed")
            if self._loop is None:
                loop = asyncio.new_event_loop()
                core = AsyncModelServer(config=self._config, seed=self._seed)
                thread = threading.Thread(target=_run_loop, args=(loop,), daemon=True,
                                          name=f"modelfleet-client-{id(self):x}")
                thread.start()
                self._loop, self._core, self._thread = loop, core, thread
                # Forgotten without close(): stop the loop thread when this object goes.
                self._finalizer = weakref.finalize(self, _abandon, loop, core)
            return self._loop, self._core  # type: ignore[return-value]

    def _call(self, make: Callable[[AsyncModelServer], Awaitable[T]]) -> T:
        loop, core = self._running()
        future = asyncio.run_coroutine_threadsafe(_await(make(core)), loop)
        try:
            return future.result()
        except BaseException:
            future.cancel()  # the caller gave up (KeyboardInterrupt): stop the request too
            raise

    def _forget_parent(self) -> None:
        """In a forked child: the loop thread did not survive the fork; start afresh."""
        if self._loop is not None:
            _LEFT_BY_PARENT.append((self._loop, self._core))
        if self._finalizer is not None:
            self._finalizer.detach()  # the parent's loop is the parent's business
            self._finalizer = None
        self._lock = threading.Lock()
        self._loop = self._thread = self._core = None

    # -- the API -----------------------------------------------------------

    def chat(self, model: str, messages: Sequence[Mapping[str, Any]], *,
             affinity: str | None = None, **params: Any) -> ChatResult:
        """See `AsyncModelServer.chat`."""
        return self._call(lambda c: c.chat(model, messages, affinity=affinity, **params))

    def complete(self, model: str, prompt: str, *, affinity: str | None = None,
                 **params: Any) -> ChatResult:
        """See `AsyncModelServer.complete`."""
        return self._call(lambda c: c.complete(model, prompt, affinity=affinity, **params))

    def chat_stream(self, model: str, messages: Sequence[Mapping[str, Any]], *,
                    affinity: str | None = None, **params: Any) -> SyncChatStream:
        """See `AsyncModelServer.chat_stream`: a `SyncChatStream` of text deltas."""
        loop, core = self._running()
        stream = core.chat_stream(model, messages, affinity=affinity, **params)
        return SyncChatStream(stream, _pull(stream, loop))

    def embed(self, model: str, inputs: str | Sequence[str], *, as_numpy: bool = False,
              **params: Any) -> Any:
        """See `AsyncModelServer.embed`."""
        return self._call(lambda c: c.embed(model, inputs, as_numpy=as_numpy, **params))

    def embed_result(self, model: str, inputs: str | Sequence[str], *, as_numpy: bool = False,
                     **params: Any) -> EmbedResult:
        """See `AsyncModelServer.embed_result`."""
        return self._call(lambda c: c.embed_result(model, inputs, as_numpy=as_numpy, **params))

    def status(self, *, probe: bool = False) -> dict[str, ModelStatus]:
        """See `AsyncModelServer.status`."""
        return self._call(lambda c: c.status(probe=probe))

    def available_models(self) -> list[str]:
        """The model names of the fleet (aliases resolve to these)."""
        return list(self.config.models)

    @property
    def config(self) -> FleetConfig:
        return self._core.config if self._core is not None else self._config

    def reload(self, config: FleetConfig | None = None) -> None:
        """See `AsyncModelServer.reload`."""
        if config is None:
            if self.config.path is None:
                raise UsageError("this client was built from a FleetConfig, not a file: "
                                 "pass reload(config=...)")
            config = load_config(self.config.path)
        self._config = config
        self._call(lambda c: c.reload(config))

    def get_completion_or_embedding(self, model: str, messages_or_text: Any,
                                    **params: Any) -> Any:
        """See `AsyncModelServer.get_completion_or_embedding` (reply text, or vectors)."""
        return self._call(lambda c: c.get_completion_or_embedding(model, messages_or_text,
                                                                  **params))

    def get_fastest_server(self, model: str) -> str:
        """See `AsyncModelServer.get_fastest_server` (a `host:port`)."""
        return self._call(lambda c: c.get_fastest_server(model))

    def get_all_latency(self) -> dict[str, dict[str, float | None]]:
        """See `AsyncModelServer.get_all_latency` ({model: {host:port: seconds}})."""
        return self._call(lambda c: c.get_all_latency())

    def get_running_server_sizes(self) -> dict[str, int]:
        """See `AsyncModelServer.get_running_server_sizes` ({model: usable servers})."""
        return self._call(lambda c: c.get_running_server_sizes())

    def close(self) -> None:
        """Stop probing, close connections and stop the loop thread (waits for it)."""
        with self._lock:
            self._closed = True
            loop, core, thread = self._loop, self._core, self._thread
            self._loop = self._core = self._thread = None
            if self._finalizer is not None:
                self._finalizer.detach()
                self._finalizer = None
        if loop is None or core is None or thread is None:
            return
        try:
            asyncio.run_coroutine_threadsafe(core.close(), loop).result(timeout=CLOSE_WAIT_S)
        finally:
            loop.call_soon_threadsafe(loop.stop)
            thread.join(timeout=CLOSE_WAIT_S)

    def __enter__(self) -> ModelServer:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def _run_loop(loop: asyncio.AbstractEventLoop) -> None:
    asyncio.set_event_loop(loop)
    try:
        loop.run_forever()
    finally:
        # Whatever is still pending (a caller's request when close() came) is cancelled.
        pending = [t for t in asyncio.all_tasks(loop) if not t.done()]
        for task in pending:
            task.cancel()
        if pending:
            loop.run_until_complete(asyncio.gather(*pending, return_exceptions=True))
        loop.run_until_complete(loop.shutdown_asyncgens())
        loop.run_until_complete(loop.shutdown_default_executor())
        loop.close()


def _abandon(loop: asyncio.AbstractEventLoop, core: AsyncModelServer) -> None:
    """A ModelServer was dropped unclosed: close its client and stop its loop, without
    waiting (this may run on any thread, the loop's own included)."""
    if loop.is_closed():
        return

    async def close_then_stop() -> None:
        try:
            await core.close()
        finally:
            loop.stop()

    try:
        loop.call_soon_threadsafe(lambda: loop.create_task(close_then_stop()))
    except RuntimeError:  # closed meanwhile
        pass


async def _await(awaitable: Awaitable[T]) -> T:
    return await awaitable


def _pull(stream: ChatStream, loop: asyncio.AbstractEventLoop) -> Iterator[str]:
    """Hand a stream's deltas from the loop thread to the caller's thread, one by one."""
    done = False
    try:
        while True:
            future = asyncio.run_coroutine_threadsafe(_next_or_done(stream), loop)
            try:
                piece = future.result()
            except BaseException:
                future.cancel()
                raise
            if piece is None:
                done = True
                return
            yield piece
    finally:
        if not done and not loop.is_closed():
            closing = asyncio.run_coroutine_threadsafe(stream.aclose(), loop)
            try:
                closing.result(timeout=CLOSE_WAIT_S)
            except Exception:  # best effort: the connection dies with the loop anyway
                log.debug("closing a stream failed", exc_info=True)


async def _next_or_done(stream: AsyncIterator[str]) -> str | None:
    try:
        return await stream.__anext__()
    except StopAsyncIteration:
        return None

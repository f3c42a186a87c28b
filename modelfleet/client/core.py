"""`AsyncModelServer`: the client's core, one object that always talks to the best server.

It owns one transport (`modelfleet._transports`: aiohttp unless told otherwise), one
`Route` per model (its routing `Pool` and retry budget) and one background probe loop
(`modelfleet.probe`). Every request picks a server through `send_with_retries`
(`attempt.py`), so the caller sees an error only when no server could answer.
"""

from __future__ import annotations

import asyncio
import logging
import os
import random
import time
from collections.abc import AsyncIterator, Awaitable, Mapping, Sequence
from contextlib import aclosing
from dataclasses import replace
from typing import TYPE_CHECKING, Any

from modelfleet._transports.base import AsyncBaseTransport
from modelfleet._transports.models import Embeddings, Generation
from modelfleet._transports.reading import TokenStream
from modelfleet.client.attempt import send_with_retries
from modelfleet.client.continuation import Opened, follow
from modelfleet.client.hedge import generate_hedgeable, hedge_counts
from modelfleet.client.relay import RelayAnswer, RelayStream, relay_stream, relay_whole
from modelfleet.client.route import Route
from modelfleet.client.types import ChatResult, ChatStream, EmbedResult, ModelStatus, StreamProgress
from modelfleet.config import FleetConfig, ServerSpec, load_config
from modelfleet.errors import NoServerAvailable, UsageError
from modelfleet.probe import apply_probe, benchmark_work, probe_server
from modelfleet.routing import Failure, Health, Work, prompt_blocks
from modelfleet.routing.blocks import render_messages
from modelfleet.routing.prefix_index import INDEX_BLOCK_TOKENS

if TYPE_CHECKING:
    from prometheus_client import CollectorRegistry

    from modelfleet.metrics import FleetMetrics

log = logging.getLogger("modelfleet.client")

FIRST_USE_WAIT_S = 3.0  # how long a model's first call waits for its servers' first benchmark
EMBED_BATCH = 256  # inputs per embeddings request
PROBE_TIMEOUT_S = 60.0  # a tiny benchmark request that takes longer has failed
RELAY_PATHS = {"/v1/chat/completions": "chat", "/v1/completions": "chat",
               "/v1/embeddings": "embedding"}  # what relay() sends, and the kind of model each needs


class AsyncModelServer:
    """Latency-aware, failure-hiding access to a fleet, for asyncio code.

    Use it from one event loop (the one that first uses it). Build it from a fleet
    file (`path`, else $MODELFLEET_CONFIG, else ./client_config.yaml) or from a
    `FleetConfig` made in code. `seed` makes the random policies repeatable.
    `transport` replaces the aiohttp transport (a `MockTransport` in tests).
    `metrics`, a prometheus_client `CollectorRegistry`, gets the modelfleet_* series
    (`modelfleet.metrics`); without it nothing is recorded.
    """

    def __init__(self, path: str | os.PathLike[str] | None = None, *,
                 config: FleetConfig | None = None, seed: int | None = None,
                 transport: AsyncBaseTransport | None = None,
                 metrics: CollectorRegistry | None = None) -> None:
        if config is not None and path is not None:
            raise UsageError("pass either a fleet file path or config=, not both")
        self._config = config if config is not None else load_config(path)
        self._seed = seed
        self._rng = random.Random(seed)
        if transport is None:
            from modelfleet._transports.aiohttp import AiohttpTransport

            transport = AiohttpTransport(limit_per_host=256, keepalive_s=30.0)
        self._transport = transport
        self._routes: dict[str, Route] = {}  # by model key
        self._by_name: dict[str, Route] = {}  # by any name a caller used (key or alias)
        self._background: set[asyncio.Task[Any]] = set()
        self._probe_loop: asyncio.Task[None] | None = None
        self._loop: asyncio.AbstractEventLoop | None = None  # the one it belongs to
        self._closed = False
        self._metrics: FleetMetrics | None = None
        if metrics is not None:
            from modelfleet.metrics import FleetMetrics

            self._metrics = FleetMetrics.for_registry(metrics)

    # -- the API -----------------------------------------------------------

    async def chat(self, model: str, messages: Sequence[Mapping[str, Any]], *,
                   affinity: str | None = None, prefix_aware: bool = True,
                   **params: Any) -> ChatResult:
        """A chat completion from the best server; extra keywords go to the server.

        `prefix_aware=False` routes this request as if its prompt shared nothing with
        others (`routing.prefix_aware: false` does so for every request)."""
        route = self._ready_now(model, "chat") or await self._ready(model, "chat")
        body = {**params, "model": route.spec.wire_name, "messages": list(messages)}
        max_tokens = _max_tokens(params)
        work = _with_blocks(route, Work.for_chat(messages, max_tokens), prefix_aware,
                            messages=messages)
        return await self._generate(route, "/v1/chat/completions", body, work, affinity,
                                    whole=max_tokens is not None)

    async def complete(self, model: str, prompt: str, *, affinity: str | None = None,
                       prefix_aware: bool = True, **params: Any) -> ChatResult:
        """A text completion (`/v1/completions`) of `prompt`."""
        route = self._ready_now(model, "chat") or await self._ready(model, "chat")
        body = {**params, "model": route.spec.wire_name, "prompt": prompt}
        max_tokens = _max_tokens(params)
        text = prompt if isinstance(prompt, str) else str(prompt)
        work = _with_blocks(route, Work.for_prompt(text, max_tokens), prefix_aware, prompt=text)
        return await self._generate(route, "/v1/completions", body, work, affinity,
                                    whole=max_tokens is not None)

    def chat_stream(self, model: str, messages: Sequence[Mapping[str, Any]], *,
                    affinity: str | None = None, prefix_aware: bool = True,
                    continue_stream: bool | None = None, **params: Any) -> ChatStream:
        """Text deltas of a chat completion as they come (`async for piece in ...`).

        A break after the first token is continued on another server, as one stream
        (`client/continuation.py`), unless `continue_stream=False` (or `routing:
        {continue_streams: false}`); then, or when no server can go on, it raises
        `StreamInterrupted` with the text so far. Leaving early (break, aclose,
        cancellation) closes the connection, so the engine aborts the request.
        """
        progress = StreamProgress()
        return ChatStream(progress, self._stream_chat(progress, model, messages, affinity, params,
                                                      prefix_aware, continue_stream))

    async def _stream_chat(self, progress: StreamProgress, model: str,
                           messages: Sequence[Mapping[str, Any]], affinity: str | None,
                           params: dict[str, Any], prefix_aware: bool = True,
                           continue_stream: bool | None = None) -> AsyncIterator[str]:
        route = self._ready_now(model, "chat") or await self._ready(model, "chat")
        body = {**params, "model": route.spec.wire_name, "messages": list(messages)}
        work = _with_blocks(route, Work.for_chat(messages, _max_tokens(params)), prefix_aware,
                            messages=messages)
        api_key = route.spec.api_key
        timeout_s = route.routing.request_timeout_s
        transport = self._transport
        metrics = route.metrics
        started = time.perf_counter() if metrics is not None else 0.0

        async def first_token(server: ServerSpec, stall_s: float) -> tuple[TokenStream, str]:
            stream = await transport.open_stream(server, "/v1/chat/completions", body,
                                                 api_key=api_key, stall_s=stall_s,
                                                 timeout_s=timeout_s)
            try:
                return stream, await stream.__anext__()
            except StopAsyncIteration:
                return stream, ""  # an empty answer
            except BaseException:
                stream.close()
                raise

        try:
            endpoint, (stream, first), work = await send_with_retries(
                route, work, affinity, first_token, self._rng, answer=False, hedge=True)
        except BaseException:
            self._maybe_benchmark(route)
            raise
        progress.server, progress.tokens = endpoint.address, stream
        go_on = route.routing.continue_streams if continue_stream is None else continue_stream
        async with aclosing(follow(route, transport, self._rng, progress,
                                   Opened(endpoint, stream, first, work), "/v1/chat/completions",
                                   body, started=started, go_on=go_on)) as pieces:
            async for piece in pieces:  # (closed with this one: its lease ends at once)
                yield piece
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
        route = self._ready_now(model, "embedding") or await self._ready(model, "embedding")
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

    async def relay(self, path: str, body: Mapping[str, Any], *, affinity: str | None = None,
                    prefix_aware: bool = True) -> RelayAnswer | RelayStream:
        """An OpenAI request body for `path` (`/v1/chat/completions`, `/v1/completions`,
        `/v1/embeddings`), sent as it is to the best server of `body["model"]` (a name or
        an alias; the server's own name is written in), with the same routing, retries and
        failover as `chat()` and `embed()`. The answer comes back as the engine sent it:
        a `RelayAnswer` (bytes), or with `"stream": true` a `RelayStream` of its bytes,
        retried elsewhere before its first event and continued elsewhere after it
        (`routing.continue_streams`; `client/relay_continuation.py`).

        Raises `UnknownModel`, `UsageError` (a model of the other kind, a path it does
        not serve), `NoServerAvailable`, `RequestRejected` (the engine's 4xx)."""
        kind = RELAY_PATHS.get(path)
        if kind is None:
            raise UsageError(f"relay() serves {', '.join(RELAY_PATHS)}, not {path!r}")
        name = body.get("model")
        if not isinstance(name, str):
            raise UsageError("the body needs a `model` (a string)")
        route = self._ready_now(name, kind)
        if route is None:
            spec = self._config.resolve_model(name)  # UnknownModel lists the known names
            if spec.kind != kind:
                serves = ("/v1/embeddings" if spec.kind == "embedding"
                          else "/v1/chat/completions and /v1/completions")
                raise UsageError(f"model {name!r} is a {spec.kind} model: it answers {serves}, "
                                 f"not {path}")
            route = await self._ready(name, kind)
        payload = dict(body)
        payload["model"] = route.spec.wire_name
        max_tokens = _max_tokens(body)
        if path == "/v1/chat/completions":
            messages = body.get("messages")
            messages = [m for m in messages if isinstance(m, Mapping)] \
                if isinstance(messages, list) else []
            work = _with_blocks(route, Work.for_chat(messages, max_tokens), prefix_aware,
                                messages=messages)
        elif path == "/v1/completions":
            prompt = body.get("prompt")
            text = prompt if isinstance(prompt, str) else "".join(
                p for p in prompt if isinstance(p, str)) if isinstance(prompt, list) else ""
            work = _with_blocks(route, Work.for_prompt(text, max_tokens), prefix_aware,
                                prompt=text)
        else:
            work = Work.for_embedding(body.get("input") or "")
        if kind == "chat" and body.get("stream") is True:
            return await relay_stream(route, self._transport, self._rng, path, payload, work,
                                      affinity, after=lambda: self._maybe_benchmark(route),
                                      go_on=route.routing.continue_streams)
        try:
            return await relay_whole(route, self._transport, self._rng, path, payload, work,
                                     affinity, bounded=kind == "embedding" or max_tokens is not None)
        finally:
            self._maybe_benchmark(route)

    async def warm(self) -> None:
        """Benchmark every model's servers now (a few seconds at most) and keep probing
        them: for a long-running process (the gateway) whose first requests should be
        routed on measurements and whose health should be known before any request."""
        self._check_open()
        # (a model whose servers are not found yet: models_without_server() says so)
        await asyncio.gather(*(self._ready(name, None) for name in self._config.models),
                             return_exceptions=True)

    def models_without_server(self) -> dict[str, dict[str, str]]:
        """The models none of whose servers is usable now, with why for each server
        (an empty dict: every model has a server to send to)."""
        missing: dict[str, dict[str, str]] = {}
        for name in self._config.models:
            route = self._route(name)
            if not any(e.health is not Health.DOWN and e.usable()
                       for e in route.pool.endpoints.values()):
                missing[name] = route.pool.reasons() or (
                    route.discovery.reasons() if route.discovery is not None else {"": "no servers"})
        return missing

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
                                  servers=tuple(self._route(name).pool.status()),
                                  hedges=hedge_counts(self._route(name).hedging))
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
                gone = self._routes.pop(name)  # requests already on it finish with what they hold
                if gone.discovery is not None:
                    gone.discovery.stop()
                if self._metrics is not None:
                    self._metrics.forget(gone)
        for route in self._routes.values():
            if route.ready:
                self._spawn(self._probe_route(route))  # measure newcomers at once
            if route.in_use and route.discovery is not None:
                route.discovery.ensure_running(self)  # (a new discover: has a new source)

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
        if self._metrics is not None:
            for route in self._routes.values():
                self._metrics.forget(route)
        await self._transport.close()

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
                self._transport.forget_session()
                self._background.clear()
                self._probe_loop = None
                for route in self._routes.values():
                    route.first_probe = None
            self._loop = loop
            if any(route.in_use for route in self._routes.values()):
                self._start_probe_loop()

    def _route(self, model: str) -> Route:
        route = self._by_name.get(model)
        if route is None:
            spec = self._config.resolve_model(model)  # UnknownModel lists the known names
            route = self._routes.get(spec.name)
            if route is None:
                route = self._routes[spec.name] = Route(spec, self._config.routing, self._seed)
                if self._metrics is not None:
                    route.metrics = self._metrics.model(route)
            self._by_name[model] = route
        return route

    def _ready_now(self, model: str, kind: str) -> Route | None:
        """The model's route when nothing is left to do first (the usual case: open, on
        its loop, benchmarked, the right kind), without a coroutine; else None: `_ready`."""
        route = self._by_name.get(model)
        if route is None or not route.ready or route.spec.kind != kind or self._closed or \
                self._loop is not asyncio.get_running_loop():
            return None
        return route

    async def _ready(self, model: str, kind: str | None) -> Route:
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
            if route.discovery is not None:  # its servers join once found and probed
                await route.discovery.wait_first(self)
            else:
                await asyncio.wait({route.first_probe}, timeout=FIRST_USE_WAIT_S)
            route.ready = True
        return route

    async def _generate(self, route: Route, path: str, body: dict[str, Any], work: Work,
                        affinity: str | None, *, whole: bool) -> ChatResult:
        """A whole chat or completion. With `whole` (its length bounded by max_tokens) it
        is asked for in one piece under a deadline for the whole answer, which spares a
        busy engine a chunk per token; else it is streamed underneath, so that a server
        gone silent is caught by the stall deadline. While hedging is on, every answer is
        streamed underneath: its first token is what a hedge races for (client/hedge.py)."""
        api_key = route.spec.api_key
        timeout_s = route.routing.request_timeout_s
        transport = self._transport
        hedged = route.hedging is not None
        whole = whole and not hedged

        def send(server: ServerSpec, deadline_s: float) -> Awaitable[Generation]:
            if hedged:
                return generate_hedgeable(transport, server, path, body, api_key=api_key,
                                          stall_s=deadline_s, timeout_s=timeout_s)
            if whole:
                return transport.generate_whole(server, path, body, api_key=api_key,
                                                deadline_s=deadline_s)
            return transport.generate(server, path, body, api_key=api_key, stall_s=deadline_s,
                                      timeout_s=timeout_s)

        try:
            endpoint, generation, _ = await send_with_retries(route, work, affinity, send,
                                                              self._rng, whole=whole, hedge=hedged)
        finally:
            self._maybe_benchmark(route)
        return ChatResult(text=generation.text, usage=generation.usage,
                          server=endpoint.address, latency_s=generation.total_s,
                          ttft_s=(generation.total_s if generation.ttft_s is None
                                  else generation.ttft_s),
                          finish_reason=generation.finish_reason,
                          model=generation.model)

    async def _embed_batch(self, route: Route, batch: list[str], as_numpy: bool,
                           params: Mapping[str, Any]) -> tuple[str, Embeddings]:
        body = {**params, "model": route.spec.wire_name, "input": batch}
        work = Work.for_embedding(batch)
        api_key = route.spec.api_key
        timeout_s = route.routing.request_timeout_s
        transport = self._transport

        def send(server: ServerSpec, stall_s: float) -> Awaitable[Embeddings]:
            return transport.embed(server, body, api_key=api_key, stall_s=stall_s,
                                   timeout_s=timeout_s, as_numpy=as_numpy)

        try:
            endpoint, answer, _ = await send_with_retries(route, work, None, send, self._rng)
        finally:
            self._maybe_benchmark(route)
        return endpoint.address, answer  # as many vectors as inputs: the transport checked

    # -- background probing ------------------------------------------------

    def _spawn(self, coro: Awaitable[Any]) -> asyncio.Task[Any]:
        task = asyncio.ensure_future(coro)
        self._background.add(task)
        task.add_done_callback(self._background.discard)
        return task

    def _start_probe_loop(self) -> None:
        if self._probe_loop is None and not self._closed:
            self._probe_loop = self._spawn(self._probe_forever())
            for route in self._routes.values():  # (again, after a change of event loop)
                if route.in_use and route.discovery is not None:
                    route.discovery.ensure_running(self)

    def _maybe_benchmark(self, route: Route) -> None:
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

    async def _probe_route(self, route: Route) -> None:
        route.benchmarking = True
        try:
            await asyncio.gather(*(self._probe_one(route, s) for s in list(route.servers.values())))
        finally:
            route.benchmarking = False

    async def _probe_one(self, route: Route, server: ServerSpec) -> None:
        endpoint = route.pool.endpoints.get(server.address)
        if endpoint is None:
            return
        routing = route.routing
        work = benchmark_work(route.spec, self._config.benchmark)
        stall_s = endpoint.stall_deadline(floor_s=routing.stall_timeout_s,
                                          ceiling_s=routing.request_timeout_s, work=work)
        try:
            result = await probe_server(self._transport, route.spec, server,
                                        self._config.benchmark, stall_s=stall_s,
                                        timeout_s=min(routing.request_timeout_s, PROBE_TIMEOUT_S))
        except Exception as exc:  # probe_server does not raise; if it ever does, the server
            #                       is marked failed and probing goes on (no dead task)
            why = f"probe failed ({type(exc).__name__}: {exc})"
            log.warning("%s: %s", server.address, why)
            if route.pool.endpoints.get(server.address) is endpoint:
                endpoint.observe_failure(Failure.SERVER_ERROR, why)
            return
        if route.pool.endpoints.get(server.address) is endpoint:  # not removed meanwhile
            apply_probe(endpoint, result, route.pool)
            if route.metrics is not None and result.queue is not None:
                route.metrics.observe_cache(server.address, result.queue.cache)


def _with_blocks(route: Route, work: Work, prefix_aware: bool, *,
                 messages: Sequence[Mapping[str, Any]] | None = None, prompt: str = "") -> Work:
    """The work with its prompt's block hashes, when prefix-aware routing applies to it.
    A prompt under one block is left alone before anything is rendered: it costs nothing."""
    if work.prompt_tokens < INDEX_BLOCK_TOKENS or route.pool.prefix is None or not prefix_aware:
        return work
    blocks = prompt_blocks(render_messages(messages) if messages is not None else prompt)
    return replace(work, blocks=blocks) if blocks else work


def _max_tokens(params: Mapping[str, Any]) -> int | None:
    value = params.get("max_tokens", params.get("max_completion_tokens"))
    return value if isinstance(value, int) else None



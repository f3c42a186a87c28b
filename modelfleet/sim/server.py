"""The sim's HTTP face: an aiohttp app with vLLM's OpenAI routes, metrics and fault controls.

Routes: `GET /health`, `/version`, `/v1/models`, `/metrics`; `POST
/v1/chat/completions`, `/v1/completions` (each also as SSE with `stream`),
`/v1/embeddings`; `GET|POST /sim/fault` and `GET /sim/state` to steer and
observe it. A chat sim answers `/v1/embeddings` (and an embedding sim answers
chat and completions) with a 404, as vLLM does for an API its model does not
serve (there FastAPI's bare 404; here an OpenAI-style body that says why).

Handler cancellation is on: a client that goes away takes its request out of
the batch at once, as vLLM aborts a disconnected request.
"""

from __future__ import annotations

import asyncio
import contextlib
import hmac
import json
import signal
import subprocess
import sys
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any

from aiohttp import web

from modelfleet.config import SimSpec
from modelfleet.routing.blocks import BLOCK_TOKENS, render_messages
from modelfleet.sim import content, wire
from modelfleet.sim.engine import Engine
from modelfleet.sim.faults import FaultError, Faults, HangReleased
from modelfleet.sim.kvcache import KVCache, SequenceShape
from modelfleet.sim.metrics import CacheConfig, SimMetrics
from modelfleet.sim.wire import ApiError

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]

# vLLM's instrumentator leaves these out of http_requests_total; /sim/* is ours, not vLLM's.
_UNCOUNTED = ("/metrics", "/health", "/version", "/sim/fault", "/sim/state")
CLIENT_LEFT = 499  # http_requests_total's status for a request whose client left first
_LEFT, _DROPPED = "modelfleet_sim_client_left", "modelfleet_sim_dropped"  # request keys
_SSE_HEADERS = {"Content-Type": "text/event-stream; charset=utf-8", "Cache-Control": "no-cache"}


@dataclass(frozen=True)
class SimSettings:
    """How one simulated server behaves (the `modelfleet sim` flags)."""

    model: str
    kind: str = "chat"
    # Defaults are the fleet file's (SimSpec), so a sim started by hand and one started by
    # the launcher behave alike.
    speed: float = SimSpec.speed
    batch_slowdown: float = SimSpec.batch_slowdown
    dim: int = SimSpec.dim
    max_batch: int = SimSpec.max_batch
    seed: int = SimSpec.seed
    max_model_len: int = 4096
    # None: no prefix cache, and room for max_batch requests of max_model_len tokens (usage only).
    kv_cache_tokens: int | None = SimSpec.kv_cache_tokens
    prefix_caching: bool = True  # with a kv_cache_tokens only
    # None: each prefill runs on its own, beside the steps (engine.py)
    max_num_batched_tokens: int | None = None
    api_key: str | None = field(default=None, repr=False)

    @property
    def cache_tokens(self) -> int:
        return self.kv_cache_tokens or self.max_batch * self.max_model_len

    @property
    def caching(self) -> bool:
        """Prefix caching is on where a cache size is given, unless turned off."""
        return self.kv_cache_tokens is not None and self.prefix_caching


class SimServer:
    """One simulated vLLM server: its engine, faults, metrics and routes."""

    def __init__(self, settings: SimSettings) -> None:
        self.settings = settings
        self.faults = Faults(settings.seed)
        self.kv = KVCache(settings.cache_tokens, prefix_caching=settings.caching)
        self.engine = Engine(speed=settings.speed, batch_slowdown=settings.batch_slowdown,
                             max_batch=settings.max_batch, faults=self.faults, kv_cache=self.kv,
                             max_num_batched_tokens=settings.max_num_batched_tokens)
        self.metrics = SimMetrics(settings.model, CacheConfig(
            block_size=BLOCK_TOKENS, num_blocks=self.kv.num_blocks,
            prefix_caching=settings.caching))
        self.created = int(time.time())
        self.hung = 0

    def app(self) -> web.Application:
        app = web.Application(middlewares=[self._count, self._auth, self._inject_faults],
                              client_max_size=64 * 1024 * 1024)
        r = app.router
        r.add_get("/health", self.health)
        r.add_get("/version", self.version)
        r.add_get("/metrics", self.metrics_text)
        r.add_get("/v1/models", self.models)
        r.add_post("/v1/chat/completions", self.chat)
        r.add_post("/v1/completions", self.completions)
        r.add_post("/v1/embeddings", self.embeddings)
        r.add_get("/sim/fault", self.get_fault)
        r.add_post("/sim/fault", self.post_fault)
        r.add_get("/sim/state", self.state)
        return app

    # ---- middlewares ----------------------------------------------------------------------

    @web.middleware
    async def _count(self, request: web.Request, handler: Handler) -> web.StreamResponse:
        """http_requests_total by route and status class, for every request that reached
        it: one whose client left before its end counts as status "499" (nginx's "client
        closed request"), so what hedged or abandoned requests cost a server shows."""
        resource = request.match_info.route.resource
        name = resource.canonical if resource is not None else None
        counted = name is not None and name not in _UNCOUNTED
        try:
            response = await handler(request)
        except web.HTTPException as exc:
            if counted:
                self.metrics.count_http(name, request.method, exc.status)
            if resource is None and exc.status in (404, 405):  # FastAPI's body for these
                return _json(exc.status, {"detail": exc.reason})
            raise
        except asyncio.CancelledError:
            if counted:  # the client left (aiohttp cancels the handler), or a fault dropped it
                self.metrics.count_http(name, request.method,
                                        500 if request.get(_DROPPED) else CLIENT_LEFT)
            raise
        except Exception:
            if counted:
                self.metrics.count_http(name, request.method, 500)
            raise
        if counted:
            self.metrics.count_http(name, request.method,
                                    CLIENT_LEFT if request.get(_LEFT) else response.status)
        return response

    @web.middleware
    async def _auth(self, request: web.Request, handler: Handler) -> web.StreamResponse:
        """With --api-key, /v1/* needs `Authorization: Bearer KEY` (vLLM's rule and body)."""
        key = self.settings.api_key
        if key and request.path.startswith("/v1"):
            given = request.headers.get("Authorization", "")
            if not hmac.compare_digest(given.encode(), f"Bearer {key}".encode()):
                return _json(401, {"error": "Unauthorized"})
        return await handler(request)

    @web.middleware
    async def _inject_faults(self, request: web.Request, handler: Handler) -> web.StreamResponse:
        if not request.path.startswith("/v1/"):
            return await handler(request)
        faults = self.faults
        if faults.hang:
            self.hung += 1
            try:
                await faults.wait_released()
            except HangReleased:
                return _error(ApiError(503, "Simulated fault: the hang was cleared; this "
                                            "request was never processed."))
            finally:
                self.hung -= 1
        if faults.should_fail():
            status = faults.error_status
            return _error(ApiError(status, f"Simulated fault: this sim fails {faults.error_rate:.0%} "
                                           f"of requests with HTTP {status} (POST /sim/fault "
                                           f"{{\"reset\": true}} clears it)."))
        return await handler(request)

    # ---- plain endpoints ------------------------------------------------------------------

    async def health(self, request: web.Request) -> web.Response:
        return web.Response(status=200)

    async def version(self, request: web.Request) -> web.Response:
        return _json(200, {"version": wire.VLLM_VERSION, "simulator": wire.FINGERPRINT})

    async def models(self, request: web.Request) -> web.Response:
        return _json(200, wire.models_body(self.settings.model, self.settings.max_model_len,
                                           self.created))

    async def metrics_text(self, request: web.Request) -> web.Response:
        engine = self.engine
        text = self.metrics.render(engine.running, engine.waiting, engine.kv_cache_usage)
        return web.Response(text=text, content_type="text/plain", charset="utf-8")

    async def get_fault(self, request: web.Request) -> web.Response:
        return _json(200, self.faults.as_dict())

    async def post_fault(self, request: web.Request) -> web.Response:
        try:
            self.faults.merge(json.loads(await request.read() or b"{}"))
        except ValueError as exc:  # FaultError and bad JSON
            message = str(exc) if isinstance(exc, FaultError) else f"the body is not JSON: {exc}"
            return _error(ApiError(400, message))
        return _json(200, self.faults.as_dict())

    async def state(self, request: web.Request) -> web.Response:
        s, engine = self.settings, self.engine
        return _json(200, {
            "model": s.model, "kind": s.kind, "running": engine.running,
            "waiting": engine.waiting, "hung": self.hung, "speed": s.speed,
            "slowdown": self.faults.slowdown, "batch_slowdown": s.batch_slowdown,
            "max_batch": s.max_batch, "batch_factor": engine.batch_factor(),
            "max_model_len": s.max_model_len, "dim": s.dim, "seed": s.seed,
            "zero_delay": engine.zero_delay, "kv_cache_usage": engine.kv_cache_usage,
            "kv_cache_tokens": self.kv.size_tokens, "block_size": BLOCK_TOKENS,
            "kv_cache_blocks": self.kv.num_blocks, "used_blocks": self.kv.used_blocks,
            "cached_blocks": self.kv.cached_blocks, "prefix_caching": s.caching,
            "prefix_cache_queries": self.metrics.prefix_queries,
            "prefix_cache_hits": self.metrics.prefix_hits,
            "max_num_batched_tokens": s.max_num_batched_tokens,
            "faults": self.faults.as_dict(),
        })

    # ---- generation -----------------------------------------------------------------------

    def _wrong_kind(self, api: str) -> ApiError:
        s = self.settings
        need = "an embedding (pooling) model" if api == "Embeddings" else "a generative model"
        return ApiError(404, f"The model `{s.model}` does not support the {api} API: this server "
                             f"runs a simulated {s.kind} model, and the {api} API needs {need}.",
                        param="model")

    async def chat(self, request: web.Request) -> web.StreamResponse:
        try:
            body = wire.parse_json(await request.read())
            messages = wire.check_messages(body)
            wire.check_model(body, self.settings.model)
            if self.settings.kind != "chat":
                raise self._wrong_kind("Chat Completions")
            skip = 0
            if wire.check_continuation(body, messages):  # the reply so far, then the rest
                text, tokens = content.chat_prompt(messages[:-1])
                skip = content.count_tokens(content.message_text(messages[-1].get("content")))
                tokens += skip
            else:
                text, tokens = content.chat_prompt(messages)
            gen = wire.check_generation(body, chat=True, max_model_len=self.settings.max_model_len,
                                        prompts=[(text, tokens)])
        except ApiError as exc:
            return _error(exc)
        return await self._generate(request, gen, chat=True, cache_texts=[render_messages(messages)],
                                    skip=skip)

    async def completions(self, request: web.Request) -> web.StreamResponse:
        try:
            body = wire.parse_json(await request.read())
            prompts = wire.check_inputs(body, "prompt")
            wire.check_model(body, self.settings.model)
            if self.settings.kind != "chat":
                raise self._wrong_kind("Completions")
            counted = [(p if isinstance(p, str) else " ".join(map(str, p)),
                        content.prompt_token_count(p)) for p in prompts]
            gen = wire.check_generation(body, chat=False, max_model_len=self.settings.max_model_len,
                                        prompts=counted)
        except ApiError as exc:
            return _error(exc)
        return await self._generate(request, gen, chat=False, cache_texts=[t for t, _ in counted])

    async def _generate(self, request: web.Request, gen: wire.Generation, *, chat: bool,
                        cache_texts: list[str], skip: int = 0) -> web.StreamResponse:
        """Run every prompt of the request through the engine at once; reply or stream.

        `cache_texts` are the prompts as the client renders them (routing.blocks): what
        the KV cache hashes, so that client and sim agree on every prefix. `skip`: the
        reply's tokens the request already holds (`continue_final_message`).
        """
        seed, model = self.settings.seed, self.settings.model
        replies = [content.reply_pieces(seed, text, gen.max_tokens, leading_space=not chat,
                                        skip=skip)
                   for text, _ in gen.prompts]
        rid = wire.new_id("chatcmpl" if chat else "cmpl")
        created = int(time.time())
        response: web.StreamResponse | None = None
        stall_s = self.faults.stall()
        if gen.stream:
            # A stalled stream says so in a sim-only header (the bench's hedging oracle reads
            # it; no client does): only an oracle may know a stall before it is over.
            headers = {**_SSE_HEADERS, "X-Sim-Stall-S": f"{stall_s:g}"} if stall_s else _SSE_HEADERS
            response = web.StreamResponse(status=200, headers=headers)
            await response.prepare(request)
        out = _ReplyWriter(response, rid, created, model, chat)
        if stall_s:  # the stall fault: silent before the first token (headers sent), then on
            await asyncio.sleep(stall_s)
        hashed = self.settings.caching
        shapes = [SequenceShape.of(text, _reply_text(pieces, chat), hashed=hashed)
                  for text, (pieces, _) in zip(cache_texts, replies, strict=True)]
        runs = [self._run_one(i, tokens, shape, pieces, finish, out)
                for i, ((_, tokens), shape, (pieces, finish))
                in enumerate(zip(gen.prompts, shapes, replies, strict=True))]
        try:
            if len(runs) == 1:
                await runs[0]
            else:
                await _all_or_none(runs)
        except _Disconnect:
            request[_DROPPED] = True
            if request.transport is not None:
                request.transport.close()  # what was written goes out; the reply never ends
            raise asyncio.CancelledError from None
        except ConnectionResetError:
            if response is None:
                raise
            request[_LEFT] = True
            return response  # the client left mid-stream
        prompt_tokens = sum(tokens for _, tokens in gen.prompts)
        completion_tokens = sum(len(pieces) for pieces, _ in replies)
        if response is not None:
            if gen.include_usage:
                obj = "chat.completion.chunk" if chat else "text_completion"
                await response.write(wire.usage_chunk(rid, created, model, obj, prompt_tokens,
                                                      completion_tokens).encode())
            await response.write(b"data: [DONE]\n\n")
            await response.write_eof()
            return response
        if chat:
            pieces, finish = replies[0]
            return _json(200, wire.chat_body(rid, model, "".join(pieces), finish, prompt_tokens,
                                             completion_tokens))
        choices = [wire.completion_choice(i, "".join(p), f) for i, (p, f) in enumerate(replies)]
        return _json(200, wire.completion_body(rid, model, choices, prompt_tokens,
                                               completion_tokens))

    async def _run_one(self, index: int, prompt_tokens: int, shape: SequenceShape,
                       pieces: list[str], finish: str, out: _ReplyWriter) -> None:
        """One sequence: queue, prefill of its uncached tokens, first token, decode steps."""
        engine, faults = self.engine, self.faults
        arrived = time.monotonic()
        sent = 0
        async with engine.admit(shape) as blocks:
            started = time.monotonic()
            if self.settings.caching:
                self.metrics.prefix_cache(queried=shape.prompt_tokens, hit=blocks.hit_tokens)
            await engine.prefill(_uncached(prompt_tokens, shape.prompt_tokens, blocks.hit_tokens))
            ttft = time.monotonic() - arrived
            await out.begin(index)
            streaming = out.streaming
            async with contextlib.aclosing(engine.decode(len(pieces) - 1, each_token=streaming)) as steps:
                produced = 1
                sent = await out.tokens(index, pieces, 0, 1, finish, faults)
                async for new in steps:
                    produced += new
                    sent = await out.tokens(index, pieces, sent, produced, finish, faults)
            blocks.completed = True
        self.metrics.finished(reason=finish, prompt_tokens=prompt_tokens,
                              generation_tokens=len(pieces), queued_s=started - arrived,
                              ttft_s=ttft, e2e_s=time.monotonic() - arrived)

    # ---- embeddings -----------------------------------------------------------------------

    async def embeddings(self, request: web.Request) -> web.StreamResponse:
        s = self.settings
        try:
            body = wire.parse_json(await request.read())
            inputs = wire.check_inputs(body, "input")
            wire.check_model(body, s.model)
            if s.kind != "embedding":
                raise self._wrong_kind("Embeddings")
            encoding = body.get("encoding_format") or "float"
            if encoding not in ("float", "base64"):
                raise ApiError(400, f"encoding_format must be 'float' or 'base64', got {encoding!r}.",
                               param="encoding_format")
            dimensions = body.get("dimensions")
            if dimensions is not None and dimensions != s.dim:
                raise ApiError(400, f"Model \"{s.model}\" does not support matryoshka "
                                    f"representation; its embeddings have {s.dim} dimensions, "
                                    f"got dimensions={dimensions!r}.", param="dimensions")
            counts = [content.prompt_token_count(i) for i in inputs]
            for n in counts:
                if n > s.max_model_len:
                    raise ApiError(400, f"This model's maximum context length is {s.max_model_len} "
                                        f"tokens. However, you requested {n} tokens in the input "
                                        f"for embedding generation. Please reduce the length of "
                                        f"the input. (parameter=input_tokens, value={n})",
                                   param="input_tokens")
        except ApiError as exc:
            return _error(exc)
        total = sum(counts)
        arrived = time.monotonic()
        async with self.engine.slot(kv_tokens=total):
            started = time.monotonic()
            await self.engine.embed_pass(total)
        if encoding == "base64":
            vectors: list[object] = [content.embedding_base64(i, s.dim) for i in inputs]
        else:
            vectors = [list(content.embedding(i, s.dim)) for i in inputs]
        done = time.monotonic()
        self.metrics.finished(reason="stop", prompt_tokens=total, generation_tokens=0,
                              queued_s=started - arrived, ttft_s=done - arrived,
                              e2e_s=done - arrived)
        return _json(200, wire.embeddings_body(s.model, vectors, total))


def _uncached(prompt_tokens: int, estimated: int, hit: int) -> int:
    """The prompt tokens a prefill computes: the cache counts the client's estimate of the
    rendered prompt, the clock the sim's own count (usage), so the hit is taken as a share."""
    if hit <= 0 or estimated <= 0:
        return prompt_tokens
    return -(-prompt_tokens * (estimated - hit) // estimated)


def _reply_text(pieces: list[str], chat: bool) -> str:
    """What follows the prompt in the sequence, rendered as the client renders the next turn."""
    reply = "".join(pieces)
    return render_messages([{"role": "assistant", "content": reply}]) if chat else reply


class _Disconnect(Exception):
    """The `disconnect_after_tokens` fault fired: drop the connection mid-reply."""


class _ReplyWriter:
    """Sends tokens as they are produced (SSE) or just counts them (one JSON body at the end).

    Also where mid-reply faults act, since only here is it known how many
    tokens the client has seen.
    """

    def __init__(self, response: web.StreamResponse | None, rid: str, created: int, model: str,
                 chat: bool) -> None:
        self.response = response
        self.streaming = response is not None
        self.rid, self.created, self.model, self.chat = rid, created, model, chat

    async def begin(self, index: int) -> None:
        if self.response is not None and self.chat:
            await self.response.write(wire.chat_chunk(
                self.rid, self.created, self.model, {"role": "assistant", "content": ""},
                first=True).encode())

    async def tokens(self, index: int, pieces: list[str], sent: int, produced: int, finish: str,
                     faults: Faults) -> int:
        """Deliver pieces[sent:produced]; returns the new `sent`."""
        stall, drop = faults.stall_after_tokens, faults.disconnect_after_tokens
        if stall is not None and produced > stall:
            produced = max(sent, stall)
        if drop is not None and produced > drop:
            produced = max(sent, drop)
        if self.response is not None and produced > sent:
            last = len(pieces)
            chunks = []
            for i in range(sent, produced):
                end = finish if i == last - 1 else None
                if self.chat:
                    chunks.append(wire.chat_chunk(self.rid, self.created, self.model,
                                                  {"content": pieces[i]}, end))
                else:
                    chunks.append(wire.completion_chunk(self.rid, self.created, self.model, index,
                                                        pieces[i], end))
            await self.response.write("".join(chunks).encode())
        sent = max(sent, produced)
        if drop is not None and sent >= drop and sent < len(pieces):
            raise _Disconnect
        if stall is not None and sent >= stall and sent < len(pieces):
            await asyncio.get_running_loop().create_future()  # silent until the client leaves
        return sent


async def _all_or_none(runs: list[Awaitable[None]]) -> None:
    """Run the sequences of one request together; when one fails, stop the others."""
    tasks = [asyncio.ensure_future(run) for run in runs]
    try:
        await asyncio.gather(*tasks)
    finally:
        for task in tasks:
            task.cancel()


def _json(status: int, body: Any) -> web.Response:
    return web.Response(status=status, text=wire.dumps(body), content_type="application/json")


def _error(exc: ApiError) -> web.Response:
    return _json(exc.status, exc.body())


# ---- running it ------------------------------------------------------------------------------

WORKER_CODE = (
    "import signal, sys, time\n"
    "signal.signal(signal.SIGINT, signal.SIG_IGN)\n"
    "end = time.monotonic() + 3600\n"  # a leak guard only: a worker left behind still dies in an hour
    "while time.monotonic() < end:\n"
    "    time.sleep(60)\n"
)


def start_worker(port: int) -> subprocess.Popen:
    """A child that lives as long as the server, like vLLM's engine-core process.

    It shares the server's process group and does not follow its parent's
    death: a launcher that kills only the server's pid leaves it behind, which
    is what the launcher's tests must catch.
    """
    return subprocess.Popen(
        [sys.executable, "-c", WORKER_CODE, "modelfleet-sim-worker", f"--port={port}"],
        stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
    )


def banner(settings: SimSettings, host: str, port: int, worker: int | None) -> str:
    s = settings
    lines = [
        f"modelfleet sim: SIMULATED {s.kind} engine (no model, no GPU; replies are filler text) "
        f"serving '{s.model}' on http://{host}:{port}",
        f"  speed x{s.speed:g}, batch slowdown {s.batch_slowdown:g}/request, max batch "
        f"{s.max_batch}, max model len {s.max_model_len}, seed {s.seed}, KV cache "
        f"{s.cache_tokens} tokens, prefix caching {'on' if s.caching else 'off'}, prefill "
        + (f"shared ({s.max_num_batched_tokens} tokens a step)" if s.max_num_batched_tokens
           else "unshared")
        + (f", dim {s.dim}" if s.kind == "embedding" else "")
        + (", api key required" if s.api_key else ""),
    ]
    if worker is not None:
        lines.append(f"  worker process pid {worker}")
    return "\n".join(lines)


async def serve(settings: SimSettings, host: str, port: int, fork_worker: bool = False) -> None:
    """Serve until SIGTERM or SIGINT, then stop quickly (hung requests are dropped)."""
    server = SimServer(settings)
    runner = web.AppRunner(server.app(), handler_cancellation=True, shutdown_timeout=0.5,
                           access_log=None)
    await runner.setup()
    site = web.TCPSite(runner, host, port)
    try:
        await site.start()
    except OSError as exc:
        await runner.cleanup()
        raise OSError(f"cannot listen on {host}:{port}: {exc.strerror or exc}") from None
    worker = start_worker(port) if fork_worker else None
    print(banner(settings, host, port, worker.pid if worker else None), file=sys.stderr, flush=True)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    try:
        await stop.wait()
    finally:
        server.faults.release_hung()
        await runner.cleanup()
        if worker is not None:
            worker.terminate()
            try:
                worker.wait(timeout=2)
            except subprocess.TimeoutExpired:
                worker.kill()
                worker.wait()

"""`ModelServer`: the client for synchronous code, a thin shell over `AsyncModelServer`.

A private event loop on a daemon thread runs one `AsyncModelServer`, so both share every
line of routing. It is safe to share between threads, and a forked child
(multiprocessing) starts its own loop on first use instead of inheriting a dead one.
"""

from __future__ import annotations

import asyncio
import logging
import os
import threading
import weakref
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator, Mapping, Sequence
from typing import TYPE_CHECKING, Any, TypeVar

from modelfleet._transports.base import AsyncBaseTransport
from modelfleet.client.core import AsyncModelServer
from modelfleet.client.types import ChatResult, ChatStream, EmbedResult, ModelStatus, SyncChatStream
from modelfleet.config import FleetConfig, load_config
from modelfleet.errors import UsageError

if TYPE_CHECKING:
    from prometheus_client import CollectorRegistry

log = logging.getLogger("modelfleet.client")

T = TypeVar("T")

CLOSE_WAIT_S = 5.0  # close: how long to wait for the loop to finish closing

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
    `transport` and `metrics` are handed to the async client (it runs on the loop thread).
    """

    def __init__(self, path: str | os.PathLike[str] | None = None, *,
                 config: FleetConfig | None = None, seed: int | None = None,
                 transport: AsyncBaseTransport | None = None,
                 metrics: CollectorRegistry | None = None) -> None:
        if config is not None and path is not None:
            raise UsageError("pass either a fleet file path or config=, not both")
        self._config = config if config is not None else load_config(path)  # errors here
        self._seed = seed
        self._transport = transport
        self._metrics = metrics
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
                core = AsyncModelServer(config=self._config, seed=self._seed,
                                        transport=self._transport, metrics=self._metrics)
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
        if self._transport is not None:
            self._transport.forget_session()  # its connections belong to the parent's loop

    # -- the API -----------------------------------------------------------

    def chat(self, model: str, messages: Sequence[Mapping[str, Any]], *,
             affinity: str | None = None, prefix_aware: bool = True, **params: Any) -> ChatResult:
        """See `AsyncModelServer.chat`."""
        return self._call(lambda c: c.chat(model, messages, affinity=affinity,
                                           prefix_aware=prefix_aware, **params))

    def complete(self, model: str, prompt: str, *, affinity: str | None = None,
                 prefix_aware: bool = True, **params: Any) -> ChatResult:
        """See `AsyncModelServer.complete`."""
        return self._call(lambda c: c.complete(model, prompt, affinity=affinity,
                                               prefix_aware=prefix_aware, **params))

    def chat_stream(self, model: str, messages: Sequence[Mapping[str, Any]], *,
                    affinity: str | None = None, prefix_aware: bool = True,
                    **params: Any) -> SyncChatStream:
        """See `AsyncModelServer.chat_stream`: a `SyncChatStream` of text deltas."""
        loop, core = self._running()
        stream = core.chat_stream(model, messages, affinity=affinity, prefix_aware=prefix_aware,
                                  **params)
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

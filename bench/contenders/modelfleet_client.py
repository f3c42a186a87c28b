"""modelfleet's own AsyncModelServer, one contender per routing policy.

The client is built from a FleetConfig in code, exactly as a user embedding modelfleet would,
with the bench's shared timeouts (scaled to the sims' compressed time, the same numbers
LiteLLM gets). `prefix_aware` sets the routing key of that name where this modelfleet has it
(issue 13); asked for prefix awareness where it has not, the contender is Unavailable.
`routing` sets further routing keys (the tail scenario's `hedge_after`).
"""

from __future__ import annotations

import dataclasses
import time
from collections.abc import Mapping
from typing import Any

from bench.contenders.base import Contender, Reply, Target, Unavailable
from bench.workload import ChatCall

try:
    from modelfleet.config import POLICIES
except ImportError:  # pragma: no cover - config.py is part of this repository
    POLICIES = ("peak_ewma", "fastest", "least_loaded", "round_robin", "random")


def _client_class() -> type:
    try:
        from modelfleet.client import AsyncModelServer
    except ImportError as exc:
        raise Unavailable(f"modelfleet.client cannot be imported ({exc})") from exc
    return AsyncModelServer


def knows_prefix_aware() -> bool:
    """Whether this modelfleet's routing settings have the `prefix_aware` key (issue 13)."""
    from modelfleet.config import RoutingSpec

    return any(f.name == "prefix_aware" for f in dataclasses.fields(RoutingSpec))


class ModelfleetClient(Contender):
    family = "modelfleet"

    def __init__(self, policy: str, *, prefix_aware: bool | None = None,
                 name: str | None = None, routing: Mapping[str, Any] | None = None) -> None:
        if policy not in POLICIES:
            raise ValueError(f"unknown policy {policy!r}; known: {', '.join(POLICIES)}")
        self.policy = policy
        self.name = name or f"modelfleet:{policy}"
        self._cls = _client_class()
        self._routing_extra: dict[str, Any] = dict(routing or {})
        if prefix_aware is not None:
            if knows_prefix_aware():
                self._routing_extra["prefix_aware"] = prefix_aware
            elif prefix_aware:
                raise Unavailable("this modelfleet has no `routing: {prefix_aware: ...}` key: "
                                  "prefix-aware routing (issue 13, branch `prefix`) is not "
                                  "merged here yet")
            # prefix_aware=False where the key is unknown: routing is prefix-blind anyway
        self._client = None
        self._model = ""

    async def open(self, target: Target) -> None:
        from modelfleet.config import FleetConfig, ModelSpec, RoutingSpec, ServerSpec

        servers = tuple(ServerSpec(host=h, port=int(p))
                        for h, p in (s.rsplit(":", 1) for s in target.servers))
        t = target.tuning
        config = FleetConfig(
            models={target.model: ModelSpec(name=target.model, servers=servers, kind=target.kind,
                                            backend="sim")},
            routing=RoutingSpec(policy=self.policy, max_retry=t.max_retry,
                                request_timeout_s=t.request_timeout_s,
                                probe_interval_s=t.probe_interval_s,
                                stall_timeout_s=t.stall_timeout_s, **self._routing_extra))
        self._model = target.model
        self._client = self._cls(config=config)
        enter = getattr(self._client, "__aenter__", None)
        if enter is not None:
            await enter()

    async def chat(self, call: ChatCall) -> Reply:
        r = await self._client.chat(self._model, call.messages, max_tokens=call.max_tokens)
        return Reply(r.server)

    async def chat_stream(self, call: ChatCall) -> Reply:
        start = time.perf_counter()
        ttft = None
        stream = self._client.chat_stream(self._model, call.messages, max_tokens=call.max_tokens)
        if hasattr(stream, "__await__"):  # a coroutine returning the iterator, or the iterator
            stream = await stream
        async for piece in stream:
            if ttft is None and piece:
                ttft = time.perf_counter() - start
        return Reply(getattr(stream, "server", None), ttft)

    async def embed(self, texts: list[str], encoding: str | None = None) -> Reply:
        vectors = await self._client.embed(self._model, texts)
        return Reply(getattr(vectors, "server", None), items=len(vectors))

    async def close(self) -> None:
        client, self._client = self._client, None
        if client is not None:
            await client.close()

"""LiteLLM's Router, in-process, pointed at the same sims: what most people would use instead.

Imported lazily and only when asked for (it is in the `bench` extra, not a dependency), run
fully offline (the local model cost map, no telemetry), each sim a deployment of one model
group named `openai/<model>` with its `api_base`. Timeouts and retries are set to the same
values modelfleet gets, so neither side wins by waiting longer. Which server answered is read
from the deployment id LiteLLM reports in `_hidden_params["model_id"]`.
"""

from __future__ import annotations

import asyncio
import logging
import os
import time
import warnings

from bench.contenders.base import Contender, Reply, Target, Unavailable
from bench.workload import ChatCall

STRATEGIES = ("simple-shuffle", "latency-based-routing", "least-busy")


def _import_router() -> type:
    os.environ.setdefault("LITELLM_LOCAL_MODEL_COST_MAP", "True")
    os.environ.setdefault("LITELLM_TELEMETRY", "False")
    try:
        import litellm
        from litellm import Router
    except ImportError as exc:
        raise Unavailable("litellm is not installed (pip install -e '.[bench]')") from exc
    litellm.telemetry = False
    litellm.suppress_debug_info = True
    warnings.filterwarnings("ignore", category=UserWarning, module="pydantic")
    for name in ("LiteLLM", "LiteLLM Router", "LiteLLM Proxy", "litellm"):
        logging.getLogger(name).setLevel(logging.CRITICAL)
    return Router


class LiteLLMRouter(Contender):
    family = "litellm"

    def __init__(self, strategy: str) -> None:
        if strategy not in STRATEGIES:
            raise ValueError(f"unknown LiteLLM strategy {strategy!r}; known: {', '.join(STRATEGIES)}")
        self.strategy = strategy
        self.name = f"litellm:{strategy}"
        self._router_cls = _import_router()
        self._router = None
        self._group = ""

    async def open(self, target: Target) -> None:
        self._group = target.model
        deployments = [{
            "model_name": target.model,
            "litellm_params": {"model": f"openai/{target.model}", "api_base": f"http://{s}/v1",
                               "api_key": "sk-bench-dummy"},
            "model_info": {"id": s},
        } for s in target.servers]
        t = target.tuning
        self._router = self._router_cls(
            model_list=deployments, routing_strategy=self.strategy,
            num_retries=t.max_retry - 1, timeout=t.request_timeout_s,
            stream_timeout=t.request_timeout_s, allowed_fails=1, cooldown_time=5 * t.probe_interval_s,
            retry_after=0)

    async def chat(self, call: ChatCall) -> Reply:
        r = await self._router.acompletion(model=self._group, messages=call.messages,
                                           max_tokens=call.max_tokens)
        if not r.choices:
            raise ValueError("no choices in the reply")
        return Reply((getattr(r, "_hidden_params", None) or {}).get("model_id"))

    async def chat_stream(self, call: ChatCall) -> Reply:
        start = time.perf_counter()
        stream = await self._router.acompletion(model=self._group, messages=call.messages,
                                                max_tokens=call.max_tokens, stream=True)
        ttft = None
        async for chunk in stream:
            if ttft is None and chunk.choices and chunk.choices[0].delta.content:
                ttft = time.perf_counter() - start
        return Reply((getattr(stream, "_hidden_params", None) or {}).get("model_id"), ttft)

    async def embed(self, texts: list[str], encoding: str | None = None) -> Reply:
        # Its default wire format: asked for base64, LiteLLM hands the strings back undecoded,
        # so the caller would still have work to do and the comparison would flatter it.
        r = await self._router.aembedding(model=self._group, input=texts)
        return Reply((getattr(r, "_hidden_params", None) or {}).get("model_id"), items=len(r.data))

    async def close(self) -> None:
        router, self._router = self._router, None
        retire = getattr(router, "retire", None)  # frees its background work and clients
        if retire is not None:
            retire()
        await asyncio.sleep(0.2)  # let its in-flight bookkeeping settle before the loop moves on

"""A client whose model is found through Kubernetes: servers join, and drain when terminating.

The stand-in API server (tests/kube_api.py) names sims on 127.0.0.1 as a Service's
endpoints; the client reads them through KubernetesSource and routes real requests.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable, Iterator
from pathlib import Path

import pytest
from helpers import SimProcess
from kube_api import KubeApi, endpoint, endpoint_slice, kubeconfig

from modelfleet.client import AsyncModelServer
from modelfleet.config import FleetConfig, ModelSpec, RoutingSpec, schema
from modelfleet.testing import free_port, running

TOKEN = "client-test-token-93b1"
MESSAGES = [{"role": "user", "content": "hi"}]


@pytest.fixture(scope="module")
def sims() -> Iterator[list[SimProcess]]:
    with running(SimProcess(free_port(), "m", flags={"speed": 50}) for _ in range(2)) as started:
        yield started


async def until(what: str, check: Callable[[], Awaitable[bool]], timeout: float = 15.0) -> None:
    """Wait until `await check()` holds, failing after `timeout`."""
    loop = asyncio.get_running_loop()
    end = loop.time() + timeout
    while not await check():
        if loop.time() > end:
            raise AssertionError(f"not within {timeout} s: {what}")
        await asyncio.sleep(0.02)


def pod_slice(sim: SimProcess, **conditions: bool) -> dict:
    """The Service's slice for one sim: its address, its port named http."""
    return endpoint_slice(f"m-{sim.port}", "m", [endpoint("127.0.0.1", **conditions)],
                          ports=[("http", sim.port)])


async def test_servers_join_and_drain_as_their_endpoints_say(sims, tmp_path: Path) -> None:
    api = await KubeApi(token=TOKEN).start()
    try:
        config_file = tmp_path / "kubeconfig"
        config_file.write_text(kubeconfig(api.url, TOKEN))
        api.put(pod_slice(sims[0]))
        spec = schema.DiscoverSpec(kubernetes=schema.KubernetesDiscoverSpec(
            namespace="llm", service="m", port_name="http", kubeconfig=str(config_file)))
        fleet = FleetConfig(models={"m": ModelSpec(name="m", backend="sim", discover=spec)},
                            routing=RoutingSpec(probe_interval_s=60.0))
        first, second = (f"127.0.0.1:{sim.port}" for sim in sims)
        async with AsyncModelServer(config=fleet) as client:
            async def served_by() -> set[str]:
                answers = await asyncio.gather(*(client.chat("m", MESSAGES, max_tokens=4)
                                                 for _ in range(8)))
                return {a.server for a in answers}

            def only(*servers: str) -> Callable[[], Awaitable[bool]]:
                async def check() -> bool:
                    return await served_by() == set(servers)
                return check

            assert await served_by() == {first}
            api.put(pod_slice(sims[1]))  # a second pod becomes ready: it takes its share
            await until("both servers answer", only(first, second))
            # the first pod terminates, still serving: it drains, no new requests
            api.put(pod_slice(sims[0], ready=False, serving=True, terminating=True))
            await until("only the second answers", only(second))
            api.delete("llm", f"m-{sims[0].port}")  # then it is gone
            assert await served_by() == {second}
    finally:
        await api.close()

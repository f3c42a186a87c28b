"""Kubernetes discovery against a stand-in API server, through the real client library.

`KubeApi` (tests/kube_api.py) speaks the EndpointSlice list and watch protocol on
127.0.0.1; `KubernetesSource` reaches it through kubernetes_asyncio with a kubeconfig
file and a bearer token, exactly as it would reach a cluster.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator, Callable
from pathlib import Path

import pytest
from kube_api import KubeApi, endpoint, endpoint_slice, kubeconfig

from modelfleet.config.schema import KubernetesDiscoverSpec
from modelfleet.discovery.kubernetes import Backoff, KubernetesSource, endpoints_of
from modelfleet.discovery.snapshot import Snapshot
from modelfleet.testing import free_port

TOKEN = "kube-token-5f3a9c1e7b"
NS, SERVICE = "llm", "qwen"
DEADLINE_S = 10.0
FAST = Backoff(first_s=0.05, max_s=0.2)


def Spec(**fields: object) -> KubernetesDiscoverSpec:  # noqa: N802 (reads like the class)
    """The `kubernetes:` mapping of a `discover:` entry: the test's Service, port 8000."""
    return KubernetesDiscoverSpec(**{"namespace": NS, "service": SERVICE, "port": 8000,
                                     **fields})


async def poll(what: str, check: Callable[[], bool], deadline_s: float = DEADLINE_S,
               stopped: asyncio.Task | None = None) -> None:
    """Wait until `check()` holds (checked every 10 ms), failing after `deadline_s`."""
    loop = asyncio.get_running_loop()
    end = loop.time() + deadline_s
    while not check():
        if stopped is not None and stopped.done():
            stopped.result()
            raise AssertionError(f"the source stopped before: {what}")
        if loop.time() > end:
            raise AssertionError(f"not within {deadline_s}s: {what}")
        await asyncio.sleep(0.01)


class Watcher:
    """Runs a source's snapshots() in a task and keeps every snapshot it yields."""

    def __init__(self, source: KubernetesSource) -> None:
        self.source = source
        self.seen: list[Snapshot] = []
        self.task = asyncio.create_task(self._run())

    async def _run(self) -> None:
        async for snapshot in self.source.snapshots():
            self.seen.append(snapshot)

    @property
    def last_good(self) -> Snapshot | None:
        good = [s for s in self.seen if s.error is None]
        return good[-1] if good else None

    async def until(self, what: str, check: Callable[[], bool]) -> None:
        try:
            await poll(what, check, stopped=self.task)
        except AssertionError as exc:
            raise AssertionError(f"{exc}; the last snapshots: {self.seen[-3:]}") from None

    async def until_ready(self, *ready: tuple[str, int], draining: tuple = ()) -> None:
        want = (tuple(sorted(ready)), tuple(sorted(draining)))
        await self.until(f"ready={want[0]} draining={want[1]}", lambda: (
            self.last_good is not None
            and (self.last_good.ready, self.last_good.draining) == want))

    async def stop(self) -> None:
        self.task.cancel()
        try:
            await self.task
        except asyncio.CancelledError:
            pass


@pytest.fixture
async def api() -> AsyncIterator[KubeApi]:
    server = await KubeApi(token=TOKEN).start()
    yield server
    await server.close()


@pytest.fixture
def config_file(tmp_path: Path) -> Callable[[str], str]:
    def write(server: str, token: str = TOKEN) -> str:
        path = tmp_path / "kubeconfig"
        path.write_text(kubeconfig(server, token))
        return str(path)
    return write


@pytest.fixture
async def watching() -> AsyncIterator[Callable[..., Watcher]]:
    started: list[Watcher] = []

    def start(spec: Spec) -> Watcher:
        watcher = Watcher(KubernetesSource(spec, backoff=FAST))
        started.append(watcher)
        return watcher

    yield start
    for watcher in started:
        await watcher.stop()


def slice_a(*endpoints: dict, ports: list[tuple[str, int]] | None = None) -> dict:
    return endpoint_slice("qwen-abc12", SERVICE, list(endpoints), ports=ports)


# --- what an endpoint's conditions make of it (pure) -------------------------------------


def test_conditions_follow_the_api_docs() -> None:
    slices = [endpoint_slice("s", SERVICE, [
        endpoint("10.0.0.1", ready=True, serving=True, terminating=False),
        endpoint("10.0.0.2", ready=None),  # unset: ready
        endpoint("10.0.0.3", ready=False, serving=True, terminating=True),  # draining
        endpoint("10.0.0.4", ready=False, serving=False, terminating=True),  # gone
        endpoint("10.0.0.5", ready=False, serving=None, terminating=True),  # serving defers: no
        endpoint("10.0.0.6", ready=False, serving=True, terminating=False),  # not ready: out
        endpoint("10.0.0.7", ready=True, terminating=True),  # publishNotReadyAddresses: ready
    ])]
    ready, draining = endpoints_of(slices, port=8000)
    assert ready == (("10.0.0.1", 8000), ("10.0.0.2", 8000), ("10.0.0.7", 8000))
    assert draining == (("10.0.0.3", 8000),)


def test_port_name_is_looked_up_per_slice_and_ready_wins_over_draining() -> None:
    slices = [
        endpoint_slice("a", SERVICE, [endpoint("10.0.0.1")], ports=[("http", 8000), ("metrics", 9090)]),
        endpoint_slice("b", SERVICE, [endpoint("10.0.0.2")], ports=[("http", 8001)]),
        endpoint_slice("c", SERVICE, [endpoint("fd00::3")], ports=[("http", 8000)],
                       address_type="IPv6"),
        # the same pod in two slices while one is rewritten: ready there, draining here
        endpoint_slice("d", SERVICE, [endpoint("10.0.0.1", ready=False, serving=True,
                                               terminating=True)], ports=[("http", 8000)]),
    ]
    assert endpoints_of(slices, port_name="http") == (
        (("10.0.0.1", 8000), ("10.0.0.2", 8001), ("fd00::3", 8000)), ())
    assert endpoints_of(slices, port_name="metrics") == ((("10.0.0.1", 9090),), ())
    assert endpoints_of(slices, port_name="grpc") == ((), ())


def test_a_source_needs_exactly_one_port() -> None:
    with pytest.raises(ValueError, match="exactly one of port and port_name"):
        KubernetesSource(Spec(port=None, port_name=None))
    with pytest.raises(ValueError, match="exactly one of port and port_name"):
        KubernetesSource(Spec(port=8000, port_name="http"))


def test_backoff_doubles_up_to_its_cap() -> None:
    backoff = Backoff(first_s=1, max_s=8, jitter=0)
    assert [backoff.delay(n) for n in (1, 2, 3, 4, 5, 50)] == [1, 2, 4, 8, 8, 8]


# --- against the stand-in API server ------------------------------------------------------


async def test_list_then_watch_follows_endpoints_through_their_life(api, config_file, watching):
    api.put(slice_a(endpoint("10.1.0.1"), endpoint("10.1.0.2", ready=False)))
    api.put(endpoint_slice("other-xyz", "other", [endpoint("10.9.9.9")]))  # another Service
    watcher = watching(Spec(kubeconfig=config_file(api.url)))
    await watcher.until_ready(("10.1.0.1", 8000))
    assert watcher.seen[0].source == "kubernetes llm/qwen:8000"
    await watcher.until("a watch is open", lambda: api.open_watches == 1)
    assert api.watches == [str(api.version)]  # watched from the list's resourceVersion

    # the second pod becomes ready: added
    api.put(slice_a(endpoint("10.1.0.1"), endpoint("10.1.0.2", ready=True)))
    await watcher.until_ready(("10.1.0.1", 8000), ("10.1.0.2", 8000))
    # a new slice of the same Service: merged with the first
    api.put(endpoint_slice("qwen-def34", SERVICE, [endpoint("10.1.0.3")]))
    await watcher.until_ready(("10.1.0.1", 8000), ("10.1.0.2", 8000), ("10.1.0.3", 8000))
    # the first pod terminates but still serves: it drains
    api.put(slice_a(endpoint("10.1.0.1", ready=False, serving=True, terminating=True),
                    endpoint("10.1.0.2")))
    await watcher.until_ready(("10.1.0.2", 8000), ("10.1.0.3", 8000),
                              draining=(("10.1.0.1", 8000),))
    # then it is gone from the slice, and the second slice is deleted
    api.put(slice_a(endpoint("10.1.0.2")))
    api.delete(NS, "qwen-def34")
    await watcher.until_ready(("10.1.0.2", 8000))
    assert api.lists == 1  # all of it came through the one watch
    assert all(s.error is None for s in watcher.seen)


async def test_port_name_is_looked_up_in_the_slices_ports(api, config_file, watching):
    api.put(slice_a(endpoint("10.1.0.1"), ports=[("metrics", 9090), ("http", 8080)]))
    watcher = watching(Spec(port=None, port_name="http", kubeconfig=config_file(api.url)))
    await watcher.until_ready(("10.1.0.1", 8080))
    assert watcher.source.describe() == "kubernetes llm/qwen:http"
    api.put(slice_a(endpoint("10.1.0.1"), ports=[("http", 8081)]))  # the port changes
    await watcher.until_ready(("10.1.0.1", 8081))


async def test_410_in_the_watch_relists_and_converges(api, config_file, watching):
    api.put(slice_a(endpoint("10.1.0.1")))
    watcher = watching(Spec(kubeconfig=config_file(api.url)))
    await watcher.until_ready(("10.1.0.1", 8000))
    await watcher.until("a watch is open", lambda: api.open_watches == 1)
    api.put(slice_a(endpoint("10.1.0.2")), notify=False)  # an event this watcher never gets
    api.expire()  # the history is compacted: ERROR 410 Expired on the open watch
    await watcher.until_ready(("10.1.0.2", 8000))
    assert api.lists == 2
    assert all(s.error is None for s in watcher.seen)  # 410 is routine, not a failure
    await watcher.until("watching again", lambda: api.open_watches == 1)
    assert api.watches[-1] == str(api.version)  # from the new list's version


async def test_http_410_for_a_too_old_version_relists(config_file, watching):
    api = await KubeApi(token=TOKEN, gone_as_http=True).start()
    try:
        api.put(slice_a(endpoint("10.1.0.1")))
        watcher = watching(Spec(kubeconfig=config_file(api.url)))
        await watcher.until("a watch is open", lambda: api.open_watches == 1)
        # the watch drops, and by the time it comes back its version is compacted away
        api.drop_watches()
        api.put(slice_a(endpoint("10.1.0.3")), notify=False)
        api.expire()
        await watcher.until_ready(("10.1.0.3", 8000))
        assert api.lists == 2
    finally:
        await api.close()


async def test_a_dropped_watch_resumes_from_the_last_version(api, config_file, watching):
    api.put(slice_a(endpoint("10.1.0.1")))
    watcher = watching(Spec(kubeconfig=config_file(api.url)))
    await watcher.until_ready(("10.1.0.1", 8000))
    await watcher.until("a watch is open", lambda: api.open_watches == 1)
    api.put(slice_a(endpoint("10.1.0.1"), endpoint("10.1.0.2")))
    await watcher.until_ready(("10.1.0.1", 8000), ("10.1.0.2", 8000))
    seen_version = str(api.version)
    # cut mid-stream; the change made meanwhile is replayed from the server's history
    api.drop_watches()
    api.put(slice_a(endpoint("10.1.0.2")))
    await watcher.until_ready(("10.1.0.2", 8000))
    assert api.watches[-1] == seen_version  # resumed where it was, not relisted
    assert api.lists == 1
    assert all(s.error is None for s in watcher.seen)


async def test_a_periodic_relist_repairs_a_lost_event(api, config_file, watching):
    api.put(slice_a(endpoint("10.1.0.1")))
    watcher = watching(Spec(kubeconfig=config_file(api.url), relist_s=1.0))
    await watcher.until_ready(("10.1.0.1", 8000))
    api.put(slice_a(endpoint("10.1.0.4")), notify=False)  # the watch never hears of it
    await watcher.until_ready(("10.1.0.4", 8000))
    assert api.lists >= 2


async def test_unreachable_api_server_yields_errors_then_recovers(config_file, watching, caplog):
    caplog.set_level(logging.DEBUG)
    port = free_port()
    watcher = watching(Spec(kubeconfig=config_file(f"http://127.0.0.1:{port}")))
    await watcher.until("an error snapshot", lambda: any(s.error for s in watcher.seen))
    error = next(s.error for s in watcher.seen if s.error)
    assert "unreachable" in error and f"127.0.0.1:{port}" in error
    assert all(s.ready == () for s in watcher.seen)

    api = await KubeApi(token=TOKEN, port=port).start()  # the API server comes up
    try:
        api.put(slice_a(endpoint("10.1.0.1")))
        await watcher.until_ready(("10.1.0.1", 8000))
        await watcher.until("a watch is open", lambda: api.open_watches == 1)
        errors_before = sum(1 for s in watcher.seen if s.error)
        await api.close()  # ... and goes away again
        await watcher.until("another error", lambda: sum(
            1 for s in watcher.seen if s.error) > errors_before)
    finally:
        await api.close()
    assert all(TOKEN not in (s.error or "") for s in watcher.seen)
    assert TOKEN not in caplog.text


async def test_forbidden_says_so_and_the_token_is_sent_but_never_shown(
        api, config_file, watching, caplog):
    caplog.set_level(logging.DEBUG)
    api.forbid = True
    api.put(slice_a(endpoint("10.1.0.1")))
    watcher = watching(Spec(kubeconfig=config_file(api.url)))
    await watcher.until("two error snapshots", lambda: sum(1 for s in watcher.seen if s.error) >= 2)
    error = watcher.seen[0].error
    assert error is not None and "403" in error and "forbidden" in error
    api.forbid = False  # the Role is granted: it recovers
    await watcher.until_ready(("10.1.0.1", 8000))
    assert api.auth_headers and set(api.auth_headers) == {f"Bearer {TOKEN}"}
    assert all(TOKEN not in (s.error or "") for s in watcher.seen)
    assert TOKEN not in caplog.text


async def test_a_wrong_token_is_an_error_without_the_token(api, config_file, watching, caplog):
    caplog.set_level(logging.DEBUG)
    wrong = "wrong-token-0c4d1e"
    watcher = watching(Spec(kubeconfig=config_file(api.url, token=wrong)))
    await watcher.until("an error snapshot", lambda: any(s.error for s in watcher.seen))
    error = watcher.seen[0].error
    assert error is not None and "401" in error and wrong not in error
    assert wrong not in caplog.text


async def test_a_message_that_echoes_the_token_is_scrubbed(api, config_file, watching):
    # Some proxies echo request headers in their error pages: whatever the failure
    # says, the credentials the client was loaded with never come out.
    watcher = watching(Spec(kubeconfig=config_file(api.url)))
    await watcher.until("listed", lambda: watcher.last_good is not None)
    why = watcher.source._why("list", RuntimeError(f"bad gateway for Authorization: Bearer {TOKEN}"))
    assert TOKEN not in why and "***" in why


async def test_cancelling_closes_the_watch(api, config_file):
    api.put(slice_a(endpoint("10.1.0.1")))
    watcher = Watcher(KubernetesSource(Spec(kubeconfig=config_file(api.url)), backoff=FAST))
    await watcher.until("a watch is open", lambda: api.open_watches == 1)
    await watcher.stop()
    await poll("the API server sees the watch end", lambda: api.open_watches == 0)


async def test_without_a_kubeconfig_key_the_default_file_is_read(
        api, tmp_path, monkeypatch, watching):
    from kubernetes_asyncio.config import kube_config

    (tmp_path / ".kube").mkdir()
    (tmp_path / ".kube" / "config").write_text(kubeconfig(api.url, TOKEN))
    monkeypatch.setenv("HOME", str(tmp_path))
    monkeypatch.delenv("KUBERNETES_SERVICE_HOST", raising=False)  # not in a pod
    monkeypatch.setattr(kube_config, "KUBE_CONFIG_DEFAULT_LOCATION", "~/.kube/config")
    api.put(slice_a(endpoint("10.1.0.1")))
    watcher = watching(Spec(kubeconfig=None))
    await watcher.until_ready(("10.1.0.1", 8000))

"""Servers from a Kubernetes Service's EndpointSlices: listed, watched, relisted.

The EndpointSlices labelled `kubernetes.io/service-name=<service>` are listed, then
watched from the list's resourceVersion, the way client-go's reflector does it:
events merge into the per-slice state, a dropped watch resumes from the last
resourceVersion seen, and `410 Gone` (the version fell out of the API server's
window) starts over with a fresh list. A full relist also happens every `relist_s`,
because a watcher that only merges events goes stale without noticing when one is
lost. A failed list or watch yields a Snapshot with `error` (the client keeps its
last known-good set) and is retried with backoff.

An endpoint's conditions decide its part (discovery.k8s.io/v1 semantics: `ready`
unset means ready, `serving` unset defers to `ready`, `terminating` unset means
not terminating): ready endpoints take new requests; serving but terminating ones
drain; the rest are left out.

The client library is kubernetes_asyncio (`pip install modelfleet[kubernetes]`): it
reads kubeconfig files (with their auth plugins) and the in-cluster service account.
"""

from __future__ import annotations

import asyncio
import json
import logging
import math
import os
import random
from collections.abc import AsyncIterator, Iterable, Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import aiohttp
from kubernetes_asyncio import client, config, watch
from kubernetes_asyncio.client.exceptions import ApiException
from kubernetes_asyncio.config.config_exception import ConfigException

from modelfleet.discovery.base import Source
from modelfleet.discovery.snapshot import Snapshot

if TYPE_CHECKING:
    from modelfleet.config.schema import KubernetesDiscoverSpec

log = logging.getLogger("modelfleet.discovery")

SERVICE_NAME_LABEL = "kubernetes.io/service-name"
IN_CLUSTER_TOKEN = "/var/run/secrets/kubernetes.io/serviceaccount/token"
LIST_TIMEOUT_S = 30.0  # one list call gives up after this
CONNECT_TIMEOUT_S = 10.0  # connecting to the API server gives up after this
WATCH_GRACE_S = 30.0  # the client ends a watch this long after the server should have
HEALTHY_WATCH_S = 5.0  # a watch open this long (or one that brought events) resets the backoff
# A watch ended by these lost its connection: it resumes from the last resourceVersion.
_DROPS = (aiohttp.ClientPayloadError, aiohttp.ServerDisconnectedError, asyncio.TimeoutError)

Address = tuple[str, int]


@dataclass(frozen=True)
class Backoff:
    """Waits between failed attempts: first_s, doubling up to max_s, with jitter so that
    many clients do not come back to a recovering API server at the same moment."""

    first_s: float = 0.5
    max_s: float = 30.0
    jitter: float = 0.2  # each wait is scaled by a random factor in [1 - jitter, 1 + jitter]

    def delay(self, failures: int) -> float:
        """Seconds to wait after the `failures`-th failure in a row (1, 2, ...)."""
        base = min(self.max_s, self.first_s * 2 ** max(0, min(failures - 1, 30)))
        return base * random.uniform(1 - self.jitter, 1 + self.jitter)


def endpoints_of(slices: Iterable[Mapping[str, Any]], port: int | None = None,
                 port_name: str | None = None) -> tuple[tuple[Address, ...], tuple[Address, ...]]:
    """The (ready, draining) addresses that EndpointSlices (as JSON objects) name.

    Each endpoint's addresses are paired with `port`, or with the port named
    `port_name` in its slice's `ports` (a slice without that port contributes
    nothing). An address both ready and draining (two slices disagreeing while one
    is updated) counts as ready.
    """
    ready: set[Address] = set()
    draining: set[Address] = set()
    for item in slices:
        number = port if port is not None else _named_port(item, port_name)
        if number is None:
            continue
        for endpoint in item.get("endpoints") or ():
            part = _part(endpoint.get("conditions") or {})
            if part is not None:
                for host in endpoint.get("addresses") or ():
                    (ready if part == "ready" else draining).add((str(host), number))
    return tuple(sorted(ready)), tuple(sorted(draining - ready))


def _named_port(item: Mapping[str, Any], name: str | None) -> int | None:
    for entry in item.get("ports") or ():
        if entry.get("name") == name and isinstance(entry.get("port"), int):
            return int(entry["port"])
    return None


def _part(conditions: Mapping[str, Any]) -> str | None:
    ready = conditions.get("ready")
    ready = True if ready is None else bool(ready)
    serving = conditions.get("serving")
    serving = ready if serving is None else bool(serving)
    terminating = bool(conditions.get("terminating"))
    if ready:
        return "ready"
    if serving and terminating:
        return "draining"
    return None


class KubernetesSource(Source):
    """`discover: {kubernetes: {namespace: NS, service: NAME, port: P | port_name: N}}`."""

    def __init__(self, spec: KubernetesDiscoverSpec, *, backoff: Backoff | None = None) -> None:
        if (spec.port is None) == (spec.port_name is None):
            raise ValueError("a KubernetesSource needs exactly one of port and port_name")
        self._spec = spec
        self._backoff = backoff or Backoff()
        self._slices: dict[str, Mapping[str, Any]] = {}  # by slice name: the last version seen
        self._secrets: tuple[str, ...] = ()  # credentials, scrubbed from every message

    def describe(self) -> str:
        spec = self._spec
        port = spec.port if spec.port is not None else spec.port_name
        return f"kubernetes {spec.namespace}/{spec.service}:{port}"

    async def snapshots(self) -> AsyncIterator[Snapshot]:
        failures = 0
        api_client: client.ApiClient | None = None
        try:
            while True:
                error: str | None = None
                try:
                    if api_client is None:
                        api_client = await self._connect()
                    api = client.DiscoveryV1Api(api_client)
                    version = await self._list(api)
                except Exception as exc:  # any failure is reported, and listing goes on
                    error = self._why("list", exc)
                if error is not None:
                    failures += 1
                    if api_client is not None:  # the next try reads the credentials again
                        await api_client.close()
                        api_client = None
                    yield self._error(error)
                    await asyncio.sleep(self._backoff.delay(failures))
                    continue
                failures = 0
                yield self._snapshot()
                async for snapshot in self._watch(api, version):
                    yield snapshot
        finally:
            if api_client is not None:
                await api_client.close()

    async def _connect(self) -> client.ApiClient:
        """An API client from the kubeconfig named, else the in-cluster service account,
        else ~/.kube/config ($KUBECONFIG)."""
        configuration = client.Configuration()
        path = self._spec.kubeconfig
        if path is None and _in_cluster():
            config.load_incluster_config(client_configuration=configuration)
        else:
            await config.load_kube_config(
                config_file=os.path.expanduser(path) if path else None,
                client_configuration=configuration, persist_config=False)
        self._secrets = _secrets_of(configuration)
        return client.ApiClient(configuration=configuration)

    async def _list(self, api: client.DiscoveryV1Api) -> str:
        """Replace the state with the slices listed now; the list's resourceVersion."""
        result = await api.list_namespaced_endpoint_slice(
            self._spec.namespace, label_selector=self._selector(),
            _request_timeout=LIST_TIMEOUT_S)
        listed = api.api_client.sanitize_for_serialization(result)
        self._slices = {item["metadata"]["name"]: item for item in listed.get("items") or ()}
        log.debug("%s: listed %d EndpointSlice(s) at resourceVersion %s", self.describe(),
                  len(self._slices), listed["metadata"]["resourceVersion"])
        return str(listed["metadata"]["resourceVersion"])

    async def _watch(self, api: client.DiscoveryV1Api, version: str) -> AsyncIterator[Snapshot]:
        """Merge watch events from `version` on, until a relist is due or the version is
        gone; a dropped watch resumes from the last version seen."""
        loop = asyncio.get_running_loop()
        relist_at = loop.time() + self._spec.relist_s
        failures = 0
        while (left := relist_at - loop.time()) > 0:
            seconds = max(1, math.ceil(left))
            started, events, error = loop.time(), 0, None
            try:
                async with watch.Watch(return_type="object") as stream:
                    async for event in stream.stream(
                            api.list_namespaced_endpoint_slice, self._spec.namespace,
                            label_selector=self._selector(), resource_version=version,
                            allow_watch_bookmarks=True, timeout_seconds=seconds,
                            _request_timeout=aiohttp.ClientTimeout(
                                total=seconds + WATCH_GRACE_S, sock_connect=CONNECT_TIMEOUT_S)):
                        version, changed = self._merge(event, version)
                        events += 1
                        if changed:
                            yield self._snapshot()
            except ApiException as exc:
                if exc.status == 410:
                    log.info("%s: resourceVersion %s is gone (410); listing again",
                             self.describe(), version)
                    return
                error = self._why("watch", exc)
            except _DROPS as exc:
                log.info("%s: the watch dropped (%s); resuming from resourceVersion %s",
                         self.describe(), type(exc).__name__, version)
            except Exception as exc:  # reported; the watch resumes after a wait
                error = self._why("watch", exc)
            healthy = events > 0 or loop.time() - started >= HEALTHY_WATCH_S
            if error is None and healthy:
                failures = 0
                continue
            failures = 1 if healthy else failures + 1
            if error is not None:
                yield self._error(error)
            await asyncio.sleep(min(self._backoff.delay(failures), max(0.0, relist_at - loop.time())))
        log.debug("%s: relisting after %ss", self.describe(), self._spec.relist_s)

    def _merge(self, event: Any, version: str) -> tuple[str, bool]:
        """Apply one watch event to the state: (the resourceVersion now, whether the set
        may have changed)."""
        if not isinstance(event, dict) or not isinstance(event.get("raw_object"), dict):
            raise ValueError(f"the watch sent something that is not an event: {str(event)[:80]!r}")
        kind, obj = event.get("type"), event["raw_object"]
        metadata = obj.get("metadata") or {}
        version = str(metadata.get("resourceVersion") or version)
        name = metadata.get("name")
        if kind in ("ADDED", "MODIFIED") and name:
            self._slices[name] = obj
        elif kind == "DELETED" and name:
            self._slices.pop(name, None)
        else:  # BOOKMARK: only the version moves
            return version, False
        return version, True

    def _selector(self) -> str:
        return f"{SERVICE_NAME_LABEL}={self._spec.service}"

    def _snapshot(self) -> Snapshot:
        ready, draining = endpoints_of(self._slices.values(), self._spec.port, self._spec.port_name)
        return Snapshot(ready=ready, draining=draining, source=self.describe())

    def _error(self, why: str) -> Snapshot:
        return Snapshot(ready=(), error=why, source=self.describe())

    def _why(self, doing: str, exc: BaseException) -> str:
        """A short reason, without credentials."""
        if isinstance(exc, ApiException):
            why = f"{doing}: HTTP {exc.status} {exc.reason or ''}".rstrip()
            message = _status_message(exc.body)
            if message:
                why += f": {message}"
        elif isinstance(exc, aiohttp.ClientConnectorError):
            why = f"{doing}: the API server is unreachable ({exc})"
        elif isinstance(exc, asyncio.TimeoutError):
            why = f"{doing}: the API server did not answer in time"
        elif isinstance(exc, ConfigException):
            why = f"no Kubernetes credentials: {exc}"
        else:
            why = f"{doing}: {type(exc).__name__}: {exc}"
        for secret in self._secrets:
            why = why.replace(secret, "***")
        return why[:300]


def _in_cluster() -> bool:
    return bool(os.environ.get("KUBERNETES_SERVICE_HOST")) and os.path.isfile(IN_CLUSTER_TOKEN)


def _secrets_of(configuration: client.Configuration) -> tuple[str, ...]:
    found = []
    for value in (configuration.api_key or {}).values():
        if isinstance(value, str) and value:
            found.append(value)
            found.append(value.removeprefix("Bearer ").strip())
    if configuration.password:
        found.append(configuration.password)
    return tuple(sorted({s for s in found if len(s) >= 4}, key=len, reverse=True))


def _status_message(body: Any) -> str:
    """The `message` of a Status object the API server sent with an error, if any."""
    if isinstance(body, bytes):
        body = body.decode("utf-8", "replace")
    if not isinstance(body, str) or not body.strip():
        return ""
    try:
        status = json.loads(body)
    except ValueError:
        return ""
    return str(status.get("message") or "")[:200] if isinstance(status, dict) else ""

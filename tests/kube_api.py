"""A stand-in for the Kubernetes API server: EndpointSlices, listed and watched.

No API server runs on the test machines, so `KubeApi` speaks the part of its protocol
that discovery uses, in the shapes the real one sends (discovery.k8s.io/v1):

- `GET /apis/discovery.k8s.io/v1/namespaces/NS/endpointslices?labelSelector=K=V`:
  an EndpointSliceList (`metadata.resourceVersion`, items without kind/apiVersion);
- the same with `watch=true` (or 1, True)`&resourceVersion=RV`: `200`, `Transfer-Encoding: chunked`,
  one JSON event per line (`{"type": "ADDED|MODIFIED|DELETED|BOOKMARK|ERROR",
  "object": ...}`): the events after RV from its history, then live ones, until
  `timeoutSeconds` (a BOOKMARK first when `allowWatchBookmarks`). A watch from a
  version older than the history gets an ERROR event with a `410` Status (reason
  `Expired`), or with `gone_as_http` an HTTP 410 carrying that Status;
- a bearer token is required (`401` Status otherwise); `forbid` answers `403` as RBAC does.

Tests change the world through it: `put` (ADDED or MODIFIED), `delete`, `put(...,
notify=False)` (a change whose event is lost), `expire` (history compacted: open
watches get the 410 ERROR), `drop_watches` (connections cut without the stream's
end). It runs on the test's own event loop, on 127.0.0.1.
"""

from __future__ import annotations

import asyncio
import copy
import itertools
from dataclasses import dataclass, field
from typing import Any

import orjson
from aiohttp import web

SERVICE_LABEL = "kubernetes.io/service-name"
PATH = "/apis/discovery.k8s.io/v1/namespaces/{namespace}/endpointslices"
_uids = itertools.count(1)


def endpoint(ip: str, ready: bool | None = True, serving: bool | None = None,
             terminating: bool | None = None, pod: str | None = None) -> dict[str, Any]:
    """One endpoint as the EndpointSlice controller writes it (unset conditions omitted)."""
    conditions = {k: v for k, v in (("ready", ready), ("serving", serving),
                                    ("terminating", terminating)) if v is not None}
    name = pod or f"pod-{ip.replace('.', '-').replace(':', '-')}"
    return {"addresses": [ip], "conditions": conditions, "nodeName": "node-a",
            "targetRef": {"kind": "Pod", "namespace": "llm", "name": name,
                          "uid": f"0000-{next(_uids):08d}"}}


def endpoint_slice(name: str, service: str, endpoints: list[dict[str, Any]],
                   ports: list[tuple[str, int]] | None = None, namespace: str = "llm",
                   address_type: str = "IPv4") -> dict[str, Any]:
    """An EndpointSlice object as a watch event carries it (a list's items drop kind and
    apiVersion)."""
    return {
        "kind": "EndpointSlice", "apiVersion": "discovery.k8s.io/v1",
        "metadata": {
            "name": name, "generateName": f"{service}-", "namespace": namespace,
            "uid": f"slice-{next(_uids):08d}", "generation": 1,
            "creationTimestamp": "2025-01-01T00:00:00Z",
            "labels": {SERVICE_LABEL: service, "service.kubernetes.io/headless": "",
                       "endpointslice.kubernetes.io/managed-by":
                           "endpointslice-controller.k8s.io"},
            "annotations": {"endpoints.kubernetes.io/last-change-trigger-time":
                            "2025-01-01T00:00:00Z"},
            "ownerReferences": [{"apiVersion": "v1", "kind": "Service", "name": service,
                                 "uid": "svc-0001", "controller": True,
                                 "blockOwnerDeletion": True}],
            "managedFields": [{"manager": "kube-controller-manager", "operation": "Update",
                               "apiVersion": "discovery.k8s.io/v1",
                               "time": "2025-01-01T00:00:00Z", "fieldsType": "FieldsV1",
                               "fieldsV1": {"f:addressType": {}, "f:endpoints": {}}}],
        },
        "addressType": address_type,
        "endpoints": endpoints,
        "ports": [{"name": n, "protocol": "TCP", "port": p}
                  for n, p in (ports if ports is not None else [("http", 8000)])],
    }


def status(code: int, reason: str, message: str, **extra: Any) -> dict[str, Any]:
    """A meta/v1 Status, the API server's error body."""
    return {"kind": "Status", "apiVersion": "v1", "metadata": {}, "status": "Failure",
            "message": message, "reason": reason, "code": code, **extra}


@dataclass
class _Watcher:
    queue: asyncio.Queue[bytes | None]
    request: web.Request
    cut: bool = False  # the connection was cut: the stream gets no proper end


@dataclass
class KubeApi:
    """The fake API server. `token`: the bearer token it accepts."""

    token: str
    port: int = 0
    gone_as_http: bool = False  # a too-old watch version: HTTP 410 instead of an ERROR event
    forbid: bool = False  # answer 403 as RBAC does without get/list/watch
    version: int = 100  # the store's resourceVersion
    slices: dict[tuple[str, str], dict[str, Any]] = field(default_factory=dict)
    history: list[tuple[int, bytes, str]] = field(default_factory=list)  # (rv, event, ns)
    oldest: int = 0  # watches from a version older than this get 410
    lists: int = 0
    watches: list[str] = field(default_factory=list)  # each watch's resourceVersion
    auth_headers: list[str | None] = field(default_factory=list)
    _watchers: list[_Watcher] = field(default_factory=list)
    _runner: web.AppRunner | None = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    @property
    def open_watches(self) -> int:
        return len(self._watchers)

    async def start(self) -> KubeApi:
        app = web.Application()
        app.router.add_get(PATH, self._endpointslices)
        # handler_cancellation: a watch whose client went away ends, as on the API server
        self._runner = web.AppRunner(app, handle_signals=False, shutdown_timeout=0.1,
                                     handler_cancellation=True)
        await self._runner.setup()
        site = web.TCPSite(self._runner, "127.0.0.1", self.port)
        await site.start()
        self.port = self._runner.addresses[0][1]
        return self

    async def close(self) -> None:
        """Stop listening and cut every open watch."""
        self.drop_watches()
        if self._runner is not None:
            await self._runner.cleanup()
            self._runner = None

    # --- the world changes -------------------------------------------------------------

    def put(self, obj: dict[str, Any], notify: bool = True) -> int:
        """Create or replace a slice; its event goes to watchers unless `notify` is False
        (the event is lost, as when a watcher misses one: only a relist shows it)."""
        key = (obj["metadata"]["namespace"], obj["metadata"]["name"])
        kind = "MODIFIED" if key in self.slices else "ADDED"
        return self._change(kind, key, copy.deepcopy(obj), notify)

    def delete(self, namespace: str, name: str, notify: bool = True) -> int:
        obj = self.slices[(namespace, name)]
        return self._change("DELETED", (namespace, name), obj, notify)

    def expire(self) -> None:
        """Compact the history (a watch from before the current version is too old) and
        send open watches the 410 ERROR, ending them, as the API server does."""
        self.oldest = self.version
        self.history = []
        message = f"too old resource version: {self.version - 1} ({self.version})"
        line = _line({"type": "ERROR", "object": status(410, "Expired", message)})
        for watcher in list(self._watchers):
            watcher.queue.put_nowait(line)
            watcher.queue.put_nowait(None)

    def drop_watches(self) -> None:
        """Cut the open watches' connections mid-stream (no final chunk)."""
        for watcher in list(self._watchers):
            watcher.cut = True
            transport = watcher.request.transport
            if transport is not None:
                transport.abort()
            watcher.queue.put_nowait(None)

    def _change(self, kind: str, key: tuple[str, str], obj: dict[str, Any], notify: bool) -> int:
        self.version += 1
        obj["metadata"]["resourceVersion"] = str(self.version)
        if kind == "DELETED":
            self.slices.pop(key, None)
        else:
            self.slices[key] = obj
        line = _line({"type": kind, "object": obj})
        if notify:
            self.history.append((self.version, line, key[0]))
            for watcher in self._watchers:
                if watcher.request.match_info["namespace"] == key[0]:
                    watcher.queue.put_nowait(line)
        return self.version

    # --- the protocol ------------------------------------------------------------------

    async def _endpointslices(self, request: web.Request) -> web.StreamResponse:
        self.auth_headers.append(request.headers.get("Authorization"))
        if request.headers.get("Authorization") != f"Bearer {self.token}":
            return _json(401, status(401, "Unauthorized", "Unauthorized"))
        namespace = request.match_info["namespace"]
        verb = "watch" if _go_bool(request.query.get("watch")) else "list"
        if self.forbid:
            return _json(403, status(
                403, "Forbidden",
                f'endpointslices.discovery.k8s.io is forbidden: User "system:serviceaccount:'
                f'{namespace}:modelfleet" cannot {verb} resource "endpointslices" in API group '
                f'"discovery.k8s.io" in the namespace "{namespace}"',
                details={"group": "discovery.k8s.io", "kind": "endpointslices"}))
        selector = _selector(request.query.get("labelSelector", ""))
        if verb == "list":
            return self._list(namespace, selector)
        return await self._watch(request, namespace, selector)

    def _list(self, namespace: str, selector: dict[str, str]) -> web.Response:
        self.lists += 1
        items = []
        for (ns, _), obj in sorted(self.slices.items()):
            if ns == namespace and _matches(obj, selector):
                item = copy.deepcopy(obj)
                item.pop("kind")
                item.pop("apiVersion")
                items.append(item)
        return _json(200, {"kind": "EndpointSliceList", "apiVersion": "discovery.k8s.io/v1",
                           "metadata": {"resourceVersion": str(self.version)}, "items": items})

    async def _watch(self, request: web.Request, namespace: str,
                     selector: dict[str, str]) -> web.StreamResponse:
        since = request.query.get("resourceVersion", "")
        self.watches.append(since)
        gone = since not in ("", "0") and int(since) < self.oldest
        if gone and self.gone_as_http:
            return _json(410, status(410, "Expired", f"too old resource version: {since} "
                                                     f"({self.oldest})"))
        response = web.StreamResponse(headers={"Content-Type": "application/json",
                                               "Cache-Control": "no-cache, private"})
        response.enable_chunked_encoding()
        await response.prepare(request)
        if gone:
            try:
                await response.write(_line({"type": "ERROR", "object": status(
                    410, "Expired", f"too old resource version: {since} ({self.oldest})")}))
                await response.write_eof()
            except ConnectionResetError:
                pass  # the client hung up first
            return response
        watcher = _Watcher(asyncio.Queue(), request)
        for rv, line, ns in self.history:
            if rv > int(since or 0) and ns == namespace and _matches(_object(line), selector):
                watcher.queue.put_nowait(line)
        self._watchers.append(watcher)
        timeout = float(request.query.get("timeoutSeconds") or 1800)
        deadline = asyncio.get_running_loop().time() + timeout
        try:
            while (left := deadline - asyncio.get_running_loop().time()) > 0:
                try:
                    line = await asyncio.wait_for(watcher.queue.get(), left)
                except asyncio.TimeoutError:
                    break
                if line is None:  # ended (expired) or cut (dropped)
                    if not watcher.cut:
                        await response.write_eof()
                    return response
                if line.startswith(b'{"type":"ERROR"') or _matches(_object(line), selector):
                    await response.write(line)
            if _go_bool(request.query.get("allowWatchBookmarks")):
                await response.write(_line({"type": "BOOKMARK", "object": {
                    "kind": "EndpointSlice", "apiVersion": "discovery.k8s.io/v1",
                    "metadata": {"resourceVersion": str(self.version)}}}))
            await response.write_eof()
        except (ConnectionResetError, RuntimeError):
            pass  # the client went away
        finally:
            self._watchers.remove(watcher)
        return response


def kubeconfig(server: str, token: str) -> str:
    """A kubeconfig file's text: one cluster at `server`, a token user."""
    return (
        "apiVersion: v1\nkind: Config\n"
        f"clusters:\n- name: test\n  cluster:\n    server: {server}\n"
        f"users:\n- name: test\n  user:\n    token: {token}\n"
        "contexts:\n- name: test\n  context:\n    cluster: test\n    user: test\n"
        "    namespace: llm\n"
        "current-context: test\n"
    )


def _line(event: dict[str, Any]) -> bytes:
    return orjson.dumps(event) + b"\n"


def _object(line: bytes) -> dict[str, Any]:
    return orjson.loads(line)["object"]


def _json(code: int, body: dict[str, Any]) -> web.Response:
    return web.Response(status=code, body=orjson.dumps(body), content_type="application/json")


def _go_bool(text: str | None) -> bool:
    """A query flag as the API server parses it (Go's strconv.ParseBool: clients send
    1, true or True)."""
    return text in ("1", "t", "T", "true", "TRUE", "True")


def _selector(text: str) -> dict[str, str]:
    """An equality-based label selector (`k=v,k2=v2`)."""
    pairs = (part.split("=", 1) for part in text.split(",") if part)
    return {k.strip(): v.strip() for k, v in pairs}


def _matches(obj: dict[str, Any], selector: dict[str, str]) -> bool:
    labels = obj.get("metadata", {}).get("labels") or {}
    return all(labels.get(k) == v for k, v in selector.items())

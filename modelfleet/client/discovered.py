"""A model whose servers are found (`discover:`), not listed: its source's snapshots, applied.

One task per model reads its `Source` (modelfleet/discovery/) and applies each
Snapshot to the model's `Route`, the way a reloaded fleet file is applied:

- a server that stays keeps everything learnt about it (its Endpoint is untouched);
- a new server is probed first (the client's own benchmark request) and joins the
  pool only once it answered; until then it is "pending", probed again with a
  growing pause, and takes no request;
- a server that left the ready set, or is named as draining (Kubernetes' serving
  but terminating), leaves the pool: no new request goes to it, those in flight
  finish on the Endpoint they hold;
- a failed lookup, or an answer with no ready server, changes nothing: the last
  known-good set stays (a warning is logged once per change of state), so one bad
  answer never takes a model to zero servers. Nor does a whole set replaced at
  once: the old servers stay until the first new one has answered its probe.

Requests that come before the first servers joined wait for them, at most
DISCOVERY_WAIT_S; then `NoServerAvailable` names the source and its last error.
"""

from __future__ import annotations

import asyncio
import logging
import time
from typing import TYPE_CHECKING, Any

from modelfleet.config import ServerSpec
from modelfleet.discovery import Snapshot, Source, source_for
from modelfleet.errors import NoServerAvailable
from modelfleet.probe import apply_probe, probe_server

if TYPE_CHECKING:
    from modelfleet.client.core import AsyncModelServer
    from modelfleet.client.route import Route
    from modelfleet.routing import Endpoint

log = logging.getLogger("modelfleet.client")

DISCOVERY_WAIT_S = 10.0  # how long a request waits for a model's first discovered servers
REPROBE_FIRST_S = 1.0  # a new server that did not answer its probe is probed again after this,
REPROBE_MAX_S = 10.0  # doubling up to this
RESTART_S = 1.0  # a source that broke (not a failed lookup: a bug, a missing library) is
#                  started again after this, doubling up to REPROBE_MAX_S


class Discovery:
    """The discovered servers of one model, and what the report and /metrics say of them."""

    def __init__(self, route: Route, source: Source | None = None) -> None:
        self.route = route
        spec = route.spec.discover
        assert spec is not None, "a Discovery is for a model with discover:"
        self._spec = spec
        self.source = source
        self.description = source.describe() if source is not None else spec.describe()
        self.last_error: str | None = None  # the last lookup's trouble, None once one worked
        self.last_change: float | None = None  # time.time() when the set of servers last changed
        self.errors = 0  # failed lookups
        self.pending: dict[str, ServerSpec] = {}  # found, not answered a probe yet
        self.probe_failures: dict[str, str] = {}  # why each pending one did not join yet
        self.named_draining: set[str] = set()  # the source says: terminating
        self.leaving: dict[str, Endpoint] = {}  # left the pool with requests still on it
        self._wanted: set[str] = set()  # the last good snapshot's ready servers
        self._stale: set[str] = set()  # left the records, kept until a newcomer joins
        self._probing: dict[str, asyncio.Task[Any]] = {}
        self._task: asyncio.Task[Any] | None = None
        self._joined: asyncio.Event | None = None
        self._trouble: str | None = None  # "failed" / "empty" while the source misbehaves
        self._client: AsyncModelServer | None = None

    # -- running ------------------------------------------------------------

    def ensure_running(self, client: AsyncModelServer) -> None:
        """Start reading the source on the running loop (again, after a loop change)."""
        self._client = client
        loop = asyncio.get_running_loop()
        if self._task is not None and not self._task.done() and self._task.get_loop() is loop:
            return
        self._joined = asyncio.Event()
        if self.route.servers:
            self._joined.set()
        self._probing.clear()
        if self.route.metrics is not None:
            self.route.metrics.discovery_failed(0)  # the series exists from the start
        self._task = client._spawn(self._run())

    def stop(self) -> None:
        """The model's discover: changed or went away (a reload)."""
        for task in [self._task, *self._probing.values()]:
            if task is not None:
                task.cancel()
        self._probing.clear()

    async def wait_first(self, client: AsyncModelServer, timeout_s: float | None = None) -> None:
        """Until the model has a server that answered its probe; NoServerAvailable after
        `timeout_s`, naming the source and what went wrong."""
        self.ensure_running(client)
        if self.route.servers:
            return
        assert self._joined is not None
        try:
            await asyncio.wait_for(self._joined.wait(), DISCOVERY_WAIT_S if timeout_s is None else timeout_s)
        except asyncio.TimeoutError:
            if not self.route.servers:
                raise NoServerAvailable(self.route.spec.name, self.reasons()) from None

    async def _run(self) -> None:
        pause = RESTART_S
        broke: str | None = None
        while True:
            snapshots = None
            try:
                if self.source is None:
                    self.source = source_for(self._spec)  # (a missing library raises here)
                    self.description = self.source.describe()
                snapshots = self.source.snapshots()
                async for snapshot in snapshots:
                    self.apply(snapshot)
                    pause = RESTART_S
            except asyncio.CancelledError:
                raise
            except Exception as exc:  # a broken source must not end discovery
                why = f"the source broke ({type(exc).__name__}: {exc})"
                if why != broke:  # once per new trouble, not every restart
                    log.error("%s: discovery through %s: %s", self.route.spec.name,
                              self.description, why, exc_info=exc)
                broke = why
                self.apply(Snapshot(ready=(), error=why, source=self.description))
            finally:
                close = getattr(snapshots, "aclose", None)
                if close is not None:
                    await close()
            await asyncio.sleep(pause)
            pause = min(pause * 2, REPROBE_MAX_S)

    # -- applying a snapshot ------------------------------------------------

    def apply(self, snapshot: Snapshot) -> None:
        """One look at the source: the route's servers follow it (see the module's doc)."""
        name = self.route.spec.name
        if snapshot.error is not None:
            self.errors += 1
            if self.route.metrics is not None:
                self.route.metrics.discovery_failed()
            self._keep("failed", f"lookup failed: {snapshot.error}")
            return
        if not snapshot.ready:
            self._keep("empty", "the answer named no ready server")
            return
        if self._trouble is not None:
            log.warning("%s: discovery through %s works again", name, self.description)
        self._trouble = self.last_error = None
        ready = {s.address: s for s in (ServerSpec(host=h, port=p) for h, p in snapshot.ready)}
        self._wanted = set(ready)
        self.named_draining = {ServerSpec(host=h, port=p).address for h, p in snapshot.draining} \
            - self._wanted
        gone = [address for address in self.route.servers if address not in ready]
        newcomers = [address for address in ready if address not in self.route.servers]
        changed = False
        if gone and len(gone) == len(self.route.servers) and newcomers:
            self._stale = set(gone)  # a whole set replaced: the old one serves until one joins
        else:
            for address in gone:
                self._leave(address)
                changed = True
        for address in list(self.pending):
            if address not in ready:
                self.pending.pop(address)
                self.probe_failures.pop(address, None)
                task = self._probing.pop(address, None)
                if task is not None:
                    task.cancel()
        for address in newcomers:
            if address not in self._probing and self._client is not None:
                self.pending[address] = ready[address]
                self._probing[address] = self._client._spawn(self._admit(ready[address]))
        self._prune()
        if changed or self.last_change is None:
            self._changed()

    def _keep(self, trouble: str, why: str) -> None:
        self.last_error = why
        if self._trouble != trouble:
            self._trouble = trouble
            kept = len(self.route.servers)
            log.warning("%s: discovery through %s: %s; %s", self.route.spec.name,
                        self.description, why,
                        f"keeping the last known-good set ({kept} servers)" if kept
                        else "no servers found yet")

    def _leave(self, address: str) -> None:
        endpoint = self.route.pool.endpoints.get(address)
        self.route.pool.remove(address)
        self.route.servers.pop(address, None)
        self._stale.discard(address)
        if endpoint is not None and endpoint.in_flight:
            self.leaving[address] = endpoint

    def _prune(self) -> None:
        for address in [a for a, e in self.leaving.items() if not e.in_flight]:
            del self.leaving[address]

    def _changed(self) -> None:
        self.last_change = time.time()

    async def _admit(self, server: ServerSpec) -> None:
        """Probe a new server until it answers (or leaves the records); then it joins."""
        assert self._client is not None
        address, route = server.address, self.route
        pause = REPROBE_FIRST_S
        try:
            while address in self.pending:
                routing = route.routing
                result = await probe_server(self._client._transport, route.spec, server,
                                            self._client.config.benchmark,
                                            stall_s=routing.stall_timeout_s,
                                            timeout_s=min(routing.request_timeout_s, 60.0))
                if address not in self.pending:
                    return
                if result.ok:
                    self._join(server, result)
                    return
                if address not in self.probe_failures:
                    log.warning("%s: new server %s did not answer its probe (%s); it joins "
                                "once it does", route.spec.name, address, result.reason)
                self.probe_failures[address] = result.reason or "no answer"
                await asyncio.sleep(pause)
                pause = min(pause * 2, REPROBE_MAX_S)
        finally:
            if self._probing.get(address) is asyncio.current_task():
                del self._probing[address]

    def _join(self, server: ServerSpec, result: Any) -> None:
        route, address = self.route, server.address
        self.pending.pop(address, None)
        self.probe_failures.pop(address, None)
        self.leaving.pop(address, None)
        endpoint = route.pool.add(address)
        apply_probe(endpoint, result, route.pool)
        if route.metrics is not None and result.queue is not None:
            route.metrics.observe_cache(address, result.queue.cache)
        route.servers[address] = server
        for stale in [a for a in self._stale if a not in self._wanted]:
            self._leave(stale)
        self._stale.clear()
        log.info("%s: %s joined (found through %s)", route.spec.name, address, self.description)
        self._changed()
        if self._joined is not None:
            self._joined.set()

    # -- what the report and /metrics show -----------------------------------

    def draining(self) -> list[str]:
        """Servers taking no new request: named so by the source, or gone with requests
        still in flight on them. (Read by /metrics from its own thread: it changes nothing.)"""
        leaving = {address for address, e in list(self.leaving.items()) if e.in_flight}
        return sorted(self.named_draining | leaving)

    def reasons(self) -> dict[str, str]:
        """For NoServerAvailable and the gateway's /health: why no server is there."""
        why = self.last_error
        if why is None:
            why = (f"found {len(self.pending)}, none answered its probe yet" if self.pending
                   else "no servers found yet")
        reasons = {self.description: why}
        for address in self.pending:
            reasons[address] = f"found, not yet answering its probe ({self.probe_failures.get(address, 'probing')})"
        return reasons

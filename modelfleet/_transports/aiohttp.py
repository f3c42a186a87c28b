"""HTTP to the engines over aiohttp: the only module that speaks to a vLLM / SGLang / sim server.

One pooled session for every server a client talks to. Requests to one server wait
for one of its connection slots *before* their clock starts, so time spent waiting
for a connection is never counted as the server's latency. Redirects are never
followed: a redirect is that server's failure, and the API key goes to no other host.
"""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import Mapping
from typing import Any

import aiohttp

from modelfleet._exceptions import TRANSPORT_ERRORS, engine_failure, map_exceptions
from modelfleet._transports.base import AsyncBaseTransport
from modelfleet._transports.models import Sent
from modelfleet._transports.parse import status_failure
from modelfleet.config import ServerSpec


class AiohttpTransport(AsyncBaseTransport):
    """One pooled aiohttp session. Created and used on one event loop."""

    def __init__(self, *, limit_per_host: int = 256, keepalive_s: float = 30.0,
                 connect_timeout_s: float = 5.0) -> None:
        self._limit_per_host = limit_per_host
        self._keepalive_s = keepalive_s
        self._connect_timeout_s = connect_timeout_s
        self._session: aiohttp.ClientSession | None = None
        # One slot per connection a server may have. A request's clock starts once it holds
        # a slot, so time spent waiting for a connection is never counted as the server's.
        self._slots: dict[str, asyncio.Semaphore] = {}

    @property
    def session(self) -> aiohttp.ClientSession:
        if self._session is None or self._session.closed:
            # No limit in the connector: the slots above are the limit, and waiting for one
            # happens before a request's clock starts (aiohttp's tracing would time the
            # same moment, at a cost of tens of microseconds a request).
            connector = aiohttp.TCPConnector(limit=0, limit_per_host=0,
                                             keepalive_timeout=self._keepalive_s)
            self._session = aiohttp.ClientSession(
                connector=connector, raise_for_status=False,
                json_serialize=json.dumps, skip_auto_headers=("User-Agent",),
                headers={"User-Agent": "modelfleet"})
        return self._session

    def forget_session(self) -> None:
        self._session = None
        self._slots = {}

    async def close(self) -> None:
        if self._session is not None and not self._session.closed:
            await self._session.close()
        self._session = None

    def _headers(self, api_key: str | None) -> dict[str, str] | None:
        return {"Authorization": f"Bearer {api_key}"} if api_key else None

    def _timeout(self, stall_s: float, timeout_s: float) -> aiohttp.ClientTimeout:
        return aiohttp.ClientTimeout(total=timeout_s, sock_read=stall_s,
                                     sock_connect=min(self._connect_timeout_s, timeout_s))

    async def post(self, server: ServerSpec, path: str, body: Mapping[str, Any], *,
                   api_key: str | None, stall_s: float, timeout_s: float,
                   whole_s: float | None = None) -> Sent:
        slot = self._slots.get(server.address)
        if slot is None:
            slot = self._slots[server.address] = asyncio.Semaphore(self._limit_per_host)
        await slot.acquire()
        sent_at = time.perf_counter()
        try:
            response = await self.session.post(
                server.url + path, json=body, headers=self._headers(api_key),
                timeout=self._timeout(stall_s, timeout_s), allow_redirects=False)
        except TRANSPORT_ERRORS as exc:
            slot.release()
            raise engine_failure(exc, stall_s=stall_s, whole_s=whole_s) from None
        except BaseException:  # cancelled while waiting for the headers
            slot.release()
            raise
        if response.status >= 300:
            try:
                raw = await response.read()
            except TRANSPORT_ERRORS:
                raw = b""
            finally:
                response.release()
                slot.release()
            raise status_failure(response.status, raw, server.address,
                                 response.headers.get("Retry-After"))
        return response, sent_at, slot.release

    async def get_text(self, server: ServerSpec, path: str, *, timeout_s: float,
                       api_key: str | None) -> tuple[int, str]:
        with map_exceptions():
            async with self.session.get(
                    server.url + path, headers=self._headers(api_key),
                    timeout=aiohttp.ClientTimeout(total=timeout_s),
                    allow_redirects=False) as response:
                # UTF-8 whatever charset it names: an unknown one must not raise.
                return response.status, (await response.read()).decode("utf-8", "replace")

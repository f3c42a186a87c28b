"""The gateway's limits: the size of a request body (413) and requests at once (429).

A queue with no bound only turns an overload into timeouts for everyone; refusing at
once with `Retry-After` lets clients back off, and their retries reach a worker (or a
gateway) with room. The routing timeouts (stall and answer deadlines,
request_timeout_s) are the client core's, as for every library caller.
"""

from __future__ import annotations

from aiohttp import web


class BodyTooLarge(Exception):
    """The request body is over the limit (the answer is 413)."""


async def read_body(request: web.Request, limit: int) -> bytes:
    """The request body, refused before reading when Content-Length says it is too large,
    and cut off while reading when a body without one grows past the limit."""
    length = request.content_length
    if length is not None and length > limit:
        raise BodyTooLarge
    try:
        return await request.read()  # aiohttp stops at client_max_size (set to the limit)
    except web.HTTPRequestEntityTooLarge:
        raise BodyTooLarge from None


class Gate:
    """Requests in flight in this worker, up to `limit`; `enter()` is False when full."""

    __slots__ = ("limit", "in_flight")

    def __init__(self, limit: int) -> None:
        self.limit = limit
        self.in_flight = 0

    def enter(self) -> bool:
        if self.in_flight >= self.limit:
            return False
        self.in_flight += 1
        return True

    def leave(self) -> None:
        self.in_flight -= 1

    def count(self) -> float:
        """Requests in flight now (the gateway's in-flight gauge reads it at each scrape)."""
        return self.in_flight

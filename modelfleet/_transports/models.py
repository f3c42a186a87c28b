"""What a transport hands the client: results in the client's own terms, and the
small surface of a response body that the readers use."""

from __future__ import annotations

from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass, field
from typing import Any, ClassVar, Protocol


@dataclass(frozen=True)
class CacheSample:
    """The server's KV / prefix cache, as its /metrics reports it (None: not exported)."""

    hits: float | None = None  # prompt tokens found in the prefix cache (a counter)
    queries: float | None = None  # prompt tokens looked up in it (a counter)
    usage: float | None = None  # fraction of the KV cache that running requests hold
    capacity_tokens: float | None = None  # the KV cache's size in tokens; 0: prefix caching off
    hit_rate: float | None = None  # SGLang's own gauge, where there are no counters

    @property
    def hit_ratio(self) -> float | None:
        """Hits / queries since the server started (SGLang: its recent rate)."""
        if self.hits is not None and self.queries:
            return self.hits / self.queries
        return self.hit_rate

    def ratio_since(self, before: CacheSample | None) -> float | None:
        """Hits / queries between `before` and this sample; None without both counters in
        both, with no new query since (idle), or when they went back (a restart)."""
        if (before is None or None in (self.hits, self.queries, before.hits, before.queries)
                or self.queries <= before.queries  # type: ignore[operator]
                or self.hits < before.hits):  # type: ignore[operator]
            return None
        return (self.hits - before.hits) / (self.queries - before.queries)  # type: ignore[operator]


@dataclass(frozen=True)
class QueueSample:
    """The server's own queue, as its /metrics reports it (all clients' requests)."""

    running: float
    waiting: float
    # What it says of its prefix cache, if anything (not part of the queue's equality).
    cache: CacheSample | None = field(default=None, compare=False)


@dataclass(frozen=True)
class Generation:
    """A finished chat or text completion."""

    text: str
    usage: Mapping[str, int]
    finish_reason: str | None
    model: str
    ttft_s: float | None  # from the request going out to the first token (None: not seen,
    #                       a whole answer arrives at once)
    total_s: float  # from the request going out to the end of the answer
    output_tokens: int


@dataclass(frozen=True)
class Embeddings:
    """Vectors in input order, with what the server said it consumed."""

    vectors: Any  # list[list[float]], or a 2-D numpy array when asked for
    usage: Mapping[str, int]
    model: str
    total_s: float
    ttft_s: ClassVar[None] = None  # an embedding has no first token
    output_tokens: ClassVar[None] = None


class StreamReader(Protocol):
    def readany(self) -> Awaitable[bytes]: ...


class ResponseBody(Protocol):
    """The part of a 2xx response the readers use (aiohttp's ClientResponse has it)."""

    content_type: str
    content: StreamReader  # content.readany(): whatever bytes arrived; b"" at the end
    # (content.at_eof(): every byte arrived and was read: the next readany() is b"")

    async def read(self) -> bytes: ...

    def release(self) -> None:
        """The body was read: the connection goes back to the pool."""

    def close(self) -> None:
        """Drop the connection (how an engine learns to abort a request)."""


Sent = tuple[ResponseBody, float, Callable[[], None]]  # response, sent_at, give the slot back


@dataclass(frozen=True)
class RawAnswer:
    """A whole answer kept as the engine sent it (bytes), for a caller that passes it on
    (the gateway), with what routing and the access log need read out of it."""

    body: bytes
    content_type: str
    usage: Mapping[str, int]
    total_s: float
    output_tokens: int | None  # None for embeddings: their work is their input
    ttft_s: ClassVar[None] = None  # a whole answer arrives at once

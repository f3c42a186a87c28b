"""What a transport hands the client: results in the client's own terms, and the
small surface of a response body that the readers use."""

from __future__ import annotations

from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass
from typing import Any, ClassVar, Protocol


@dataclass(frozen=True)
class QueueSample:
    """The server's own queue, as its /metrics reports it (all clients' requests)."""

    running: float
    waiting: float


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

    async def read(self) -> bytes: ...

    def release(self) -> None:
        """The body was read: the connection goes back to the pool."""

    def close(self) -> None:
        """Drop the connection (how an engine learns to abort a request)."""


Sent = tuple[ResponseBody, float, Callable[[], None]]  # response, sent_at, give the slot back

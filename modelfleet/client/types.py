"""What the client hands back: finished answers, streams, embeddings, status."""

from __future__ import annotations

from collections.abc import AsyncIterator, Iterator, Mapping
from dataclasses import dataclass, field
from typing import Any

from modelfleet._transports.reading import TokenStream
from modelfleet.routing import EndpointStatus


@dataclass(frozen=True)
class ChatResult:
    """A finished chat or text completion, and where and how fast it came."""

    text: str
    usage: Mapping[str, int]
    server: str  # host:port that answered
    latency_s: float  # from the request going out to its last byte
    ttft_s: float  # from the request going out to its first token (a whole answer, asked
    #               for in one piece when max_tokens is given, has all its tokens at latency_s)
    finish_reason: str | None
    model: str  # the model name the server reported


@dataclass
class StreamProgress:
    """Where a stream is answered from, and its tokens so far (filled in as it goes).

    A stream continued on another server (`client/continuation.py`) keeps what the
    servers before the current one gave in `earlier_text` / `earlier_tokens`."""

    server: str | None = None
    tokens: TokenStream | None = None
    earlier_text: str = ""
    earlier_tokens: int = 0  # completion tokens the earlier servers produced
    continuations: int = 0
    finish_reason: str | None = None  # set when the stream ended without its server's word

    def text(self) -> str:
        tokens = self.tokens
        return self.earlier_text + tokens.text if tokens is not None else self.earlier_text

    def usage(self) -> dict[str, int]:
        """The current server's usage; after a continuation the answer's as a whole:
        completion tokens summed over the servers, prompt tokens the original prompt's
        (the continuation's prompt, which held the answer so far, less the tokens of it)."""
        usage = dict(self.tokens.usage) if self.tokens is not None else {}
        earlier = self.earlier_tokens
        if not earlier or not usage:
            return usage
        completion = usage.get("completion_tokens", 0) + earlier
        prompt = max(0, usage.get("prompt_tokens", 0) - earlier)
        usage.update(prompt_tokens=prompt, completion_tokens=completion,
                     total_tokens=prompt + completion)
        return usage


class ChatStream:
    """The text deltas of one streamed chat completion, as an async iterator.

    `server` is the host:port answering once the first token came (None before; after a
    continuation, the server that continued it); `text`, `usage` and `finish_reason` fill
    in as the stream goes, for the whole answer however many servers gave it
    (`continuations`: how many times it moved). Dropping it, `break`, `aclose()` or
    leaving an `async with` block cancels the request upstream.
    """

    def __init__(self, progress: StreamProgress, pieces: AsyncIterator[str]) -> None:
        # The generator writes to `progress`, never to this object: no reference cycle, so
        # dropping the stream finalizes the generator at once (and closes the request).
        self._progress = progress
        self._pieces = pieces

    @property
    def server(self) -> str | None:
        return self._progress.server

    @property
    def text(self) -> str:
        """Everything received so far."""
        return self._progress.text()

    @property
    def usage(self) -> Mapping[str, int]:
        return self._progress.usage()

    @property
    def finish_reason(self) -> str | None:
        tokens = self._progress.tokens
        if tokens is not None and tokens.finish_reason is not None:
            return tokens.finish_reason
        return self._progress.finish_reason

    @property
    def continuations(self) -> int:
        """How many times the stream broke and went on on another server."""
        return self._progress.continuations

    def __aiter__(self) -> ChatStream:
        return self

    async def __anext__(self) -> str:
        # Once the first token came, the deltas already read are handed out from here:
        # the generator would only pass them through (two frames a delta). It sits at a
        # `yield`, and its next step would take the same delta from the same stream.
        tokens = self._progress.tokens
        if tokens is not None:
            piece = tokens.ready_delta()
            if piece is not None:
                return piece
        return await self._pieces.__anext__()

    async def aclose(self) -> None:
        await self._pieces.aclose()  # type: ignore[attr-defined]

    async def __aenter__(self) -> ChatStream:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.aclose()


class SyncChatStream:
    """`ChatStream` for `ModelServer`: a plain iterator of text deltas.

    Each delta is fetched when asked for, so a slow reader holds the server back
    rather than filling a buffer. Dropping it, `break`, `close()` or leaving a `with`
    block cancels the request upstream.
    """

    def __init__(self, stream: ChatStream, pieces: Iterator[str]) -> None:
        self._stream = stream
        self._pieces = pieces

    @property
    def server(self) -> str | None:
        return self._stream.server

    @property
    def text(self) -> str:
        return self._stream.text

    @property
    def usage(self) -> Mapping[str, int]:
        return self._stream.usage

    @property
    def finish_reason(self) -> str | None:
        return self._stream.finish_reason

    @property
    def continuations(self) -> int:
        return self._stream.continuations

    def __iter__(self) -> SyncChatStream:
        return self

    def __next__(self) -> str:
        return next(self._pieces)

    def close(self) -> None:
        self._pieces.close()  # type: ignore[attr-defined]

    def __enter__(self) -> SyncChatStream:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


@dataclass(frozen=True)
class EmbedResult:
    """Embeddings with where and how fast they came (`embed` returns just the vectors)."""

    vectors: Any  # list of float lists, or a 2-D numpy float32 array
    usage: Mapping[str, int]  # summed over the batches
    servers: tuple[str, ...]  # host:port that answered each batch of up to 256 inputs
    latency_s: float  # of the slowest batch, from its request going out to its last byte


@dataclass(frozen=True)
class ModelStatus:
    """What the client knows about one model's servers right now."""

    model: str
    kind: str
    policy: str
    servers: tuple[EndpointStatus, ...]
    # Hedged requests so far (routing.hedge_after): sent, won, lost, denied_by_budget;
    # empty while hedging is off.
    hedges: Mapping[str, int] = field(default_factory=dict)


"""How the client reaches engines: the transport seam (`base`), the aiohttp transport
(the only code that speaks HTTP to engines) and an in-process mock for tests."""

from modelfleet._transports.base import AsyncBaseTransport
from modelfleet._transports.models import Embeddings, Generation, QueueSample

__all__ = ["AsyncBaseTransport", "Embeddings", "Generation", "QueueSample"]

"""The client API: one object that always talks to the best server of a model.

`AsyncModelServer` (core.py) is the core: one transport, one routing `Route` per model,
one background probe loop. Every request picks a server, and a failure that is the
server's (refused, reset, silent past its stall deadline, 429/503, 5xx, 404/401) moves
the request to another server (attempt.py, with its `RetryState` in retry.py), within
`routing.max_retry` attempts and a retry budget, so the caller sees an error only when
no server could answer. `ModelServer` (sync.py) is the same object for synchronous
code. What they return is in types.py.
"""

from modelfleet.client.core import AsyncModelServer
from modelfleet.client.sync import ModelServer
from modelfleet.client.types import ChatResult, ChatStream, EmbedResult, ModelStatus, SyncChatStream

__all__ = ["AsyncModelServer", "ChatResult", "ChatStream", "EmbedResult", "ModelServer",
           "ModelStatus", "SyncChatStream"]

"""modelfleet: latency-aware routing for vLLM / SGLang fleets, and the launcher for their servers.

The public surface is re-exported here; everything else is private to its module.
"""

from modelfleet.config import (
    BenchmarkSpec,
    FleetConfig,
    ModelSpec,
    RoutingSpec,
    ServerSpec,
    SimSpec,
)
from modelfleet.errors import (
    ConfigError,
    FleetError,
    NoServerAvailable,
    RequestRejected,
    StreamInterrupted,
    UnknownModel,
)

__version__ = "0.1.0"

# The client pulls in aiohttp: imported on first use, so `modelfleet --help` and the
# launcher stay quick.
_CLIENT_NAMES = ("AsyncModelServer", "ChatResult", "ChatStream", "EmbedResult", "ModelServer",
                 "ModelStatus", "SyncChatStream")


def __getattr__(name: str) -> object:
    if name in _CLIENT_NAMES:
        from modelfleet import client

        return getattr(client, name)
    if name == "serve_metrics":  # prometheus_client, likewise only when asked for
        from modelfleet.metrics import serve_metrics

        return serve_metrics
    raise AttributeError(f"module 'modelfleet' has no attribute {name!r}")


__all__ = [
    "AsyncModelServer",
    "ChatResult",
    "ChatStream",
    "EmbedResult",
    "ModelServer",
    "ModelStatus",
    "SyncChatStream",
    "BenchmarkSpec",
    "ConfigError",
    "FleetConfig",
    "FleetError",
    "ModelSpec",
    "NoServerAvailable",
    "RequestRejected",
    "RoutingSpec",
    "ServerSpec",
    "SimSpec",
    "StreamInterrupted",
    "UnknownModel",
    "serve_metrics",
]

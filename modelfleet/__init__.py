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

__all__ = [
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
]

"""The fleet file: its schema, reading, display and editing, one module each.

  schema.py  every key, declared once beside its dataclass field (the single-edit rule)
  source.py  finding the file and loading its YAML with lines kept
  values.py  checking one value: types, ranges, choices, `${VAR}` / `${VAR:-default}`
  reader.py  the YAML walked along the schema, every problem reported at once
  show.py    `config show`: defaults filled in, secrets masked
  edit.py    `config set / add-* / remove-*`: checked, comment-keeping, atomic edits
  layout.py  keeping comments and indentation while editing

INTERFACE CONTRACT (other modules rely on these names):
  load_config(path=None, *, resolve_env=True) -> FleetConfig   (raises only ConfigError)
  find_config_path(explicit: str | Path | None) -> Path   (-c, $MODELFLEET_CONFIG, ./client_config.yaml)
  parse_config(text: str, filename: str, *, resolve_env=True) -> FleetConfig
  reload_config(config) -> FleetConfig      (the launcher's SIGHUP: read config.path again)
  fleet_to_dict(config) -> dict             (defaults filled in, secrets masked: `config show`)
  ConfigDocument.open(path)                 (edit: get / set / add_server / remove_server /
                                             add_model / remove_model, then save())
"""

from modelfleet.config.edit import ConfigDocument, parse_address, parse_index_list, parse_key_path
from modelfleet.config.reader import load_config, parse_config, reload_config
from modelfleet.config.schema import (
    BACKENDS,
    DEVICES,
    KINDS,
    MASK,
    MESSAGE_KEYS,
    POLICIES,
    SECRET_KEYS,
    BenchmarkSpec,
    DiscoverSpec,
    FleetConfig,
    GatewaySpec,
    KubernetesDiscoverSpec,
    ModelSpec,
    RoutingSpec,
    ServerSpec,
    SimSpec,
    known_keys,
)
from modelfleet.config.show import dump_yaml, fleet_to_dict, mask_secrets
from modelfleet.config.source import CONFIG_ENV_VAR, DEFAULT_CONFIG_NAME, find_config_path
from modelfleet.config.values import INVALID
from modelfleet.errors import ConfigError, ConfigProblem, UsageError

# The key lists of each section, as they were before the schema declared them.
TOP_KEYS = known_keys("")
ROUTING_KEYS = known_keys("routing")
BENCHMARK_KEYS = known_keys("benchmark")
GATEWAY_KEYS = known_keys("gateway")
SIM_KEYS = known_keys("models.*.sim")
MODEL_KEYS = known_keys("models.*")
SERVER_KEYS = known_keys("models.*.servers[]")

__all__ = [
    "BACKENDS", "BENCHMARK_KEYS", "CONFIG_ENV_VAR", "DEFAULT_CONFIG_NAME", "DEVICES", "GATEWAY_KEYS", "INVALID", "KINDS",
    "MASK", "MESSAGE_KEYS", "MODEL_KEYS", "POLICIES", "ROUTING_KEYS", "SECRET_KEYS", "SERVER_KEYS",
    "SIM_KEYS", "TOP_KEYS", "BenchmarkSpec", "ConfigDocument", "ConfigError", "ConfigProblem",
    "DiscoverSpec", "FleetConfig", "GatewaySpec", "KubernetesDiscoverSpec", "ModelSpec", "RoutingSpec", "ServerSpec", "SimSpec", "UsageError", "dump_yaml",
    "find_config_path", "fleet_to_dict", "load_config", "mask_secrets", "parse_address",
    "parse_config", "parse_index_list", "parse_key_path", "reload_config",
]

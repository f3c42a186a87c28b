"""`modelfleet config`: check, show and edit the fleet file.

Every edit goes through `modelfleet.config.ConfigDocument`, which checks the
result before writing it, so a command can refuse a change but never leave a
broken or half-written file behind.
"""

from __future__ import annotations

import argparse
import sys
from typing import Any

ACTIONS = ("validate", "show", "get", "set", "add-server", "remove-server", "add-model", "remove-model")


def register(sub: argparse._SubParsersAction, common: argparse.ArgumentParser) -> None:
    from modelfleet.config import BACKENDS, KINDS

    parser = sub.add_parser(
        "config", parents=[common], help="check, show or edit the fleet file",
        description="Check, show or edit the fleet file. Edits keep comments and layout, and "
                    "are refused (file unchanged) when the result would not be valid.",
    )
    actions = parser.add_subparsers(dest="action", metavar="ACTION")
    actions.required = True

    actions.add_parser("validate", parents=[common], help="check the file; exit 2 listing every problem")
    actions.add_parser("show", parents=[common],
                       help="print the resolved config, defaults filled in, secrets masked")

    get = actions.add_parser("get", parents=[common], help="print one value, e.g. routing.policy")
    get.add_argument("key_path", metavar="KEY.PATH")

    set_ = actions.add_parser("set", parents=[common],
                             help="set one value, e.g. `set routing.policy round_robin`")
    set_.add_argument("key_path", metavar="KEY.PATH")
    set_.add_argument("value", metavar="VALUE", help="read as YAML: 8081 is a number, '\"8081\"' a string")

    add_server = actions.add_parser("add-server", parents=[common], help="add a server to a model")
    add_server.add_argument("model", metavar="MODEL")
    add_server.add_argument("address", metavar="HOST:PORT")
    add_server.add_argument("--gpus", metavar="0,1", help="GPU indexes the server uses")
    add_server.add_argument("--min-free-memory-gb", metavar="N", type=_positive_float,
                            help="free memory each GPU needs before the server starts")

    remove_server = actions.add_parser("remove-server", parents=[common], help="remove a server from a model")
    remove_server.add_argument("model", metavar="MODEL")
    remove_server.add_argument("address", metavar="HOST:PORT")

    add_model = actions.add_parser("add-model", parents=[common], help="add a model with its servers")
    add_model.add_argument("name", metavar="NAME")
    add_model.add_argument("--kind", choices=KINDS, default="chat")
    add_model.add_argument("--backend", choices=BACKENDS, default="vllm")
    add_model.add_argument("--server", metavar="HOST:PORT", action="append", dest="servers", default=[],
                           help="a server of the model (repeat for more; at least one)")
    add_model.add_argument("--model-path", metavar="P", help="what the engine loads (default: NAME)")

    remove_model = actions.add_parser("remove-model", parents=[common], help="remove a model and its servers")
    remove_model.add_argument("name", metavar="NAME")

    parser.set_defaults(func=run)


def _positive_float(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"must be a number of GB, got {text!r}") from None
    if not value > 0:
        raise argparse.ArgumentTypeError(f"must be greater than 0, got {text}")
    return value


def run(args: argparse.Namespace) -> int:
    action = args.action.replace("-", "_")
    return int(globals()[f"_{action}"](args) or 0)


def _validate(args: argparse.Namespace) -> int:
    from modelfleet.config import load_config

    config = load_config(args.config)
    servers = sum(len(m.servers) for m in config.models.values())
    found = sum(m.discover is not None for m in config.models.values())
    discovered = f" (and {_plural(found, 'model')} whose servers are found through discover:)" \
        if found else ""
    print(f"ok: {_plural(len(config.models), 'model')}, {_plural(servers, 'server')}{discovered} "
          f"in {config.path}")
    return 0


def _show(args: argparse.Namespace) -> int:
    from modelfleet.config import dump_yaml, fleet_to_dict, load_config

    config = load_config(args.config)
    sys.stdout.write(f"# {config.path}, resolved: defaults filled in, secrets masked\n")
    sys.stdout.write(dump_yaml(fleet_to_dict(config)))
    return 0


def _get(args: argparse.Namespace) -> int:
    from modelfleet.config import ConfigDocument, dump_yaml, mask_secrets

    value = mask_secrets(ConfigDocument.open(args.config).get(args.key_path), args.key_path)
    if isinstance(value, (dict, list)):
        sys.stdout.write(dump_yaml(_plain(value)))
    else:
        print(_scalar_text(value))
    return 0


def _set(args: argparse.Namespace) -> int:
    from modelfleet.config import ConfigDocument, mask_secrets

    document = ConfigDocument.open(args.config)
    document.set(args.key_path, args.value)
    document.save()
    shown = mask_secrets(document.get(args.key_path), args.key_path)
    print(f"set {args.key_path} = {_scalar_text(shown) if not isinstance(shown, (dict, list)) else args.value} "
          f"in {document.path}")
    return 0


def _add_server(args: argparse.Namespace) -> int:
    from modelfleet.config import ConfigDocument, parse_address, parse_index_list

    host, port = parse_address(args.address)
    gpus = parse_index_list(args.gpus, "--gpus") if args.gpus is not None else None
    document = ConfigDocument.open(args.config)
    document.add_server(args.model, host, port, gpus=gpus, min_free_memory_gb=args.min_free_memory_gb)
    document.save()
    print(f"added server {host}:{port} to {args.model} in {document.path}")
    return 0


def _remove_server(args: argparse.Namespace) -> int:
    from modelfleet.config import ConfigDocument, parse_address

    host, port = parse_address(args.address)
    document = ConfigDocument.open(args.config)
    document.remove_server(args.model, host, port)
    document.save()
    print(f"removed server {host}:{port} from {args.model} in {document.path}")
    return 0


def _add_model(args: argparse.Namespace) -> int:
    from modelfleet.config import ConfigDocument, parse_address
    from modelfleet.errors import UsageError

    if not args.servers:
        raise UsageError(f"a model needs at least one server: add --server HOST:PORT to add-model {args.name}")
    servers = [parse_address(text) for text in args.servers]
    document = ConfigDocument.open(args.config)
    document.add_model(args.name, args.kind, args.backend, servers, model_path=args.model_path)
    document.save()
    print(f"added model {args.name} ({args.kind}, {args.backend}, {_plural(len(servers), 'server')}) "
          f"in {document.path}")
    return 0


def _remove_model(args: argparse.Namespace) -> int:
    from modelfleet.config import ConfigDocument

    document = ConfigDocument.open(args.config)
    document.remove_model(args.name)
    document.save()
    print(f"removed model {args.name} in {document.path}")
    return 0


def _plural(count: int, noun: str) -> str:
    return f"{count} {noun}{'' if count == 1 else 's'}"


def _scalar_text(value: Any) -> str:
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "true" if value else "false"
    return str(value)


def _plain(value: Any) -> Any:
    """Round-trip nodes as plain data, so `get` prints them in one consistent style."""
    if isinstance(value, dict):
        return {str(k): _plain(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_plain(v) for v in value]
    return value

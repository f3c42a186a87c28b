"""API keys: which the gateway accepts, and checking a request's `Authorization` header.

Keys come from the fleet file (`gateway.api_keys`, usually `${VAR}`s resolved when the
file is read) and from `gateway.api_keys_file` (one a line). A request's key is compared
with every key in constant time (`hmac.compare_digest`), so the answer's timing tells
nothing about how much of a key was right. No key is ever logged, echoed or counted by name.
"""

from __future__ import annotations

import hmac
from collections.abc import Iterable
from pathlib import Path

from modelfleet.config import GatewaySpec
from modelfleet.errors import UsageError


def load_keys(spec: GatewaySpec, base: Path | None = None) -> tuple[bytes, ...]:
    """Every key the gateway accepts (none: it asks for none).

    A file named relative to the fleet file's folder (`base`); a key file that cannot
    be read, or one whose lines are all blank, is a UsageError (a gateway meant to be
    closed must not start open)."""
    keys = [key for key in spec.api_keys if key.strip()]
    if spec.api_keys_file:
        path = Path(spec.api_keys_file).expanduser()
        if not path.is_absolute() and base is not None:
            path = base / path
        try:
            lines = path.read_text(encoding="utf-8").splitlines()
        except OSError as exc:
            raise UsageError(f"gateway.api_keys_file: cannot read {path}: "
                             f"{exc.strerror or exc}") from None
        from_file = [line.strip() for line in lines
                     if line.strip() and not line.lstrip().startswith("#")]
        if not from_file:
            raise UsageError(f"gateway.api_keys_file: {path} holds no key (one a line)")
        keys += from_file
    return tuple(dict.fromkeys(key.strip().encode() for key in keys))


class KeyCheck:
    """Whether a request carries one of the keys (always true when there are none)."""

    __slots__ = ("_keys",)

    def __init__(self, keys: Iterable[bytes]) -> None:
        self._keys = tuple(keys)

    @property
    def required(self) -> bool:
        return bool(self._keys)

    def allows(self, authorization: str | None) -> bool:
        if not self._keys:
            return True
        if not authorization:
            return False
        scheme, _, given = authorization.partition(" ")
        if scheme.lower() != "bearer":
            return False
        candidate = given.strip().encode("utf-8", "surrogateescape")
        matched = False
        for key in self._keys:  # every key compared, whichever matches
            matched |= hmac.compare_digest(candidate, key)
        return matched

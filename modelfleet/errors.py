"""One exception hierarchy for everything modelfleet raises on purpose.

Callers catch `FleetError` to handle every failure modelfleet understands, and
the CLI turns these into short messages (exit 2 for usage and config errors)
instead of tracebacks. Messages never carry secrets.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass


class FleetError(Exception):
    """Base of every error modelfleet raises deliberately."""


@dataclass(frozen=True)
class ConfigProblem:
    """One thing wrong in a config file, located so a person can jump to it."""

    file: str
    line: int | None
    path: str
    message: str

    def __str__(self) -> str:
        where = f"{self.file}:{self.line}" if self.line else self.file
        return f"{where}: {self.path}: {self.message}" if self.path else f"{where}: {self.message}"


class ConfigError(FleetError):
    """The fleet file is wrong; carries every problem found, not just the first."""

    def __init__(self, problems: Sequence[ConfigProblem] | str) -> None:
        if isinstance(problems, str):
            problems = [ConfigProblem(file="", line=None, path="", message=problems)]
        self.problems: tuple[ConfigProblem, ...] = tuple(problems)
        super().__init__("\n".join(str(p) for p in self.problems))


class UsageError(FleetError):
    """A command-line flag or argument is wrong (the CLI exits 2)."""


class UnknownModel(FleetError, KeyError):
    """Client code asked for a model the fleet does not have."""

    def __init__(self, name: str, known: Sequence[str]) -> None:
        self.name = name
        self.known = tuple(known)
        super().__init__(f"unknown model {name!r}; known models: {', '.join(self.known) or '(none)'}")

    def __str__(self) -> str:  # KeyError would quote the message otherwise
        return str(self.args[0])


class NoServerAvailable(FleetError):
    """Every server of a model was unusable; says why for each one."""

    def __init__(self, model: str, reasons: Mapping[str, str]) -> None:
        self.model = model
        self.reasons = dict(reasons)
        detail = "; ".join(f"{server}: {why}" for server, why in self.reasons.items())
        super().__init__(f"no server available for {model!r}: {detail or 'no servers configured'}")


class RequestRejected(FleetError):
    """A server refused the request itself (4xx): retrying elsewhere would not help."""

    def __init__(self, status: int, message: str, server: str) -> None:
        self.status = status
        self.message = message
        self.server = server
        super().__init__(f"{server} rejected the request (HTTP {status}): {message}")


class StreamInterrupted(FleetError):
    """A stream broke after its first token; the text so far is kept for the caller."""

    def __init__(self, text_so_far: str, server: str, reason: str) -> None:
        self.text_so_far = text_so_far
        self.server = server
        self.reason = reason
        super().__init__(f"stream from {server} broke after {len(text_so_far)} characters: {reason}")


class GpuProbeError(FleetError):
    """GPU memory could not be read (no NVML, no driver, bad described-GPU file)."""

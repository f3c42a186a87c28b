"""Colour for a person at a terminal, plain text for a pipe; shared by the report's table
and the demo's live view."""

from __future__ import annotations

import os
import re
from typing import TextIO

_COLOURS = {"up": "32", "degraded": "33", "down": "31", "dim": "2", "bold": "1"}
_ANSI = re.compile(r"\x1b\[[0-9;]*m")


def use_colour(stream: TextIO) -> bool:
    """Colour only for a person at a terminal (https://no-color.org: NO_COLOR turns it off)."""
    if os.environ.get("NO_COLOR") or os.environ.get("TERM") == "dumb":
        return False
    isatty = getattr(stream, "isatty", None)
    return bool(isatty and isatty())


def paint(text: str, style: str, colour: bool) -> str:
    return f"\x1b[{_COLOURS[style]}m{text}\x1b[0m" if colour and text else text


def visible_len(text: str) -> int:
    return len(_ANSI.sub("", text))

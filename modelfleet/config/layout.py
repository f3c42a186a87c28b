"""Keeping the user's layout while editing: comments stay with what they describe.

ruamel attaches the comment lines *below* an entry to that entry; these helpers
move them so that adding or removing an entry keeps every comment where a person
would expect it, keep the file's own indentation, and write atomically.
"""

from __future__ import annotations

import os
import re
from pathlib import Path
from typing import Any

from ruamel.yaml.comments import CommentedMap, CommentedSeq
from ruamel.yaml.error import CommentMark
from ruamel.yaml.tokens import CommentToken


def is_flow(node: Any) -> bool:
    return isinstance(node, (CommentedMap, CommentedSeq)) and bool(node.fa.flow_style())


def _is_block(node: Any) -> bool:
    return isinstance(node, (CommentedMap, CommentedSeq)) and len(node) > 0 and not node.fa.flow_style()


def _slot(container: Any) -> int:
    """Where ruamel keeps the comment after an entry: index 2 for mappings, 0 for lists."""
    return 2 if isinstance(container, dict) else 0


def last_key(container: Any) -> Any:
    return next(reversed(container)) if isinstance(container, dict) else len(container) - 1


def _token_text(token: Any) -> str:
    value = str(token.value)
    if value.lstrip(" ").startswith("#") and not value.startswith(" "):
        column = getattr(getattr(token, "start_mark", None), "column", 0) or 0
        return " " * column + value
    return value


def take_trailing(container: Any, key: Any) -> str:
    """Detach the comment lines after an entry's subtree (they belong to what follows it)."""
    value = container[key]
    if _is_block(value):
        text = take_trailing(value, last_key(value))
        end = getattr(value.ca, "end", None) or []
        text += "".join(_token_text(t) for t in end)
        if end:
            value.ca.end = []
        return text
    tokens = container.ca.items.get(key)
    slot = _slot(container)
    if not tokens or len(tokens) <= slot or tokens[slot] is None:
        return ""
    own, newline, after = str(tokens[slot].value).partition("\n")
    tokens[slot].value = own + newline
    return after


def put_trailing(container: Any, key: Any, text: str) -> None:
    """Attach comment lines after an entry's subtree."""
    if not text:
        return
    value = container[key]
    if _is_block(value):
        put_trailing(value, last_key(value), text)
        return
    slot = _slot(container)
    tokens = container.ca.items.setdefault(key, [None, None, None, None])
    while len(tokens) <= slot:
        tokens.append(None)
    if tokens[slot] is None:
        tokens[slot] = CommentToken("\n" + text, CommentMark(0), None)
    else:
        existing = str(tokens[slot].value)
        tokens[slot].value = existing + ("" if existing.endswith("\n") else "\n") + text


def remove_entry(container: Any, key: Any) -> None:
    """Delete a mapping key or list item, keeping the comments that belong to its neighbours.

    ruamel attaches the comment lines *below* an entry to that entry, so deleting
    it naively would also delete the heading comment of the next model or the
    commented example at the end of the file.
    """
    keys = list(container) if isinstance(container, dict) else list(range(len(container)))
    position = keys.index(key)
    trailing = take_trailing(container, key)
    if isinstance(container, dict):
        container.ca.items.pop(key, None)
    del container[key]
    if position > 0:
        before = take_trailing(container, keys[position - 1])
        put_trailing(container, keys[position - 1], _one_blank_line(before + trailing))
    elif trailing.strip():
        first = next(iter(container)) if isinstance(container, dict) else 0
        if isinstance(container, dict):
            tokens = container.ca.items.setdefault(first, [None, None, None, None])
            tokens[1] = [CommentToken(trailing, CommentMark(0), None)]


def append(container: Any, key: Any, value: Any) -> None:
    """Add an entry at the end, below the previous last entry but above the comments after it."""
    trailing = take_trailing(container, last_key(container)) if len(container) else ""
    if isinstance(container, dict):
        container[key] = value
    else:
        container.append(value)
    put_trailing(container, last_key(container), trailing)


def _one_blank_line(text: str) -> str:
    """Joined comment runs keep at most one blank line between them."""
    return re.sub(r"(?:^|(?<=\n))(?:[ \t]*\n){2,}", "\n", text)


def guess_indent(text: str) -> tuple[int, int, int]:
    """The file's own indentation (mapping, sequence, dash offset), so edits keep it."""
    mapping = sequence = offset = None
    previous: tuple[int, str] | None = None
    for raw in text.splitlines():
        stripped = raw.strip()
        if not stripped or stripped.startswith("#"):
            continue
        indent = len(raw) - len(raw.lstrip(" "))
        if previous is not None and indent > previous[0] and previous[1].split(" #")[0].rstrip().endswith(":"):
            step = indent - previous[0]
            if stripped.startswith("- ") or stripped == "-":
                if sequence is None:
                    after_dash = len(stripped) - len(stripped[1:].lstrip(" ")) if len(stripped) > 1 else 2
                    offset, sequence = step, step + after_dash
            elif mapping is None:
                mapping = step
        previous = (indent, stripped)
        if mapping is not None and sequence is not None:
            break
    mapping = mapping or 2
    if sequence is None:
        sequence, offset = mapping, 0
    return mapping, sequence, offset or 0


def atomic_write(path: Path, text: str) -> None:
    """Write through a temp file in the same directory and rename: never a half-written file."""
    import stat
    import tempfile

    target = path.resolve()
    mode = stat.S_IMODE(target.stat().st_mode)
    fd, temp = tempfile.mkstemp(dir=target.parent, prefix=f".{target.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "w", encoding="utf-8", newline="") as handle:
            handle.write(text)
            handle.flush()
            os.fsync(handle.fileno())
        os.chmod(temp, mode)
        os.replace(temp, target)
    except BaseException:
        try:
            os.unlink(temp)
        except OSError:
            pass
        raise

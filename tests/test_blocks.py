"""Block hashes: equal exactly as far as prompts share a prefix, stable across processes."""

from __future__ import annotations

import subprocess
import sys

from modelfleet.routing.blocks import BLOCK_CHARS, block_hashes, render_messages


def test_hashes_agree_exactly_as_far_as_the_prefix_goes() -> None:
    system = "s" * (BLOCK_CHARS * 3)
    a = block_hashes(system + "a" * BLOCK_CHARS * 2)
    b = block_hashes(system + "b" * BLOCK_CHARS * 2)
    assert len(a) == len(b) == 5
    assert a[:3] == b[:3]
    assert a[3] != b[3] and a[4] != b[4]


def test_a_partial_block_is_not_counted_and_limit_stops_early() -> None:
    assert block_hashes("x" * (BLOCK_CHARS - 1)) == []
    assert len(block_hashes("x" * (BLOCK_CHARS * 2 + 5))) == 2
    assert block_hashes("x" * BLOCK_CHARS * 10, limit=3) == block_hashes("x" * BLOCK_CHARS * 3)


def test_roles_and_message_boundaries_are_part_of_the_prefix() -> None:
    long = "w" * BLOCK_CHARS * 2
    user = render_messages([{"role": "user", "content": long}])
    system = render_messages([{"role": "system", "content": long}])
    assert block_hashes(user) != block_hashes(system)
    parts = render_messages([{"role": "user", "content": [{"type": "text", "text": long}]}])
    assert parts == user


def test_non_ascii_text_is_cut_on_characters() -> None:
    text = "é" * BLOCK_CHARS * 2
    assert len(block_hashes(text)) == 2
    assert block_hashes(text)[0] == block_hashes("é" * BLOCK_CHARS + "a" * BLOCK_CHARS)[0]


def test_hashes_are_the_same_in_another_process() -> None:
    text = "the same long system prompt " * 20
    code = ("from modelfleet.routing.blocks import block_hashes; "
            f"print(block_hashes({text!r}))")
    other = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert other.stdout.strip() == str(block_hashes(text))

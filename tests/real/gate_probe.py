"""Run only by test_real_gate.py, by path (the name keeps normal collection away from it).

Under the gate it is skipped or failed before its body; it needs no venv otherwise, so the
gate tests stay fast.
"""


def test_probe() -> None:
    """Reaching this body means the real tier was not gated."""

"""Benchmarks for modelfleet: routing quality and client overhead, side by side with baselines.

Speed claims live here, measured against baselines (raw aiohttp, an oracle, LiteLLM's Router)
in the same run on the same simulated fleet, so every figure can be read as a ratio that the
machine's speed and the noise of other work cancel out of. Run `python -m bench --help`.
"""

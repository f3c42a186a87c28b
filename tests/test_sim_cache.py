"""The sim's KV cache and shared prefill, end to end: real `modelfleet sim` processes, real HTTP.

Prefix-aware routing is measured against these sims, so their cache must behave as vLLM's
does where routing can see it: block-granular hits counted in vLLM's metrics, LRU eviction
of blocks no running request holds, requests waiting when running ones fill the cache, a
cached prompt's first token sooner, and one prefill budget per step that every request
shares. Expected counts are derived from routing.blocks, the functions the client uses.
"""

from __future__ import annotations

import asyncio
import re
import statistics
import time

import aiohttp
from helpers import FIXTURES, http_json, metric_value, run_cli, write_fleet

from modelfleet.routing.blocks import BLOCK_CHARS, BLOCK_TOKENS, block_hashes, render_messages
from modelfleet.routing.work import estimate_tokens
from modelfleet.sim import content

FAST = 1e6  # zero delay: the cache still counts, nothing sleeps
CACHE = 100_000  # tokens: a cache no test here fills unless it means to
WORDS = "amber basket candle desert echo fabric garden harbor island jacket kettle ladder".split()


def text_of(tag: str, chars: int) -> str:
    """`chars` characters of words, different from the first character on for each tag."""
    words = [tag]
    i = 0
    while sum(len(w) + 1 for w in words) < chars:
        words.append(WORDS[(i * 7 + len(tag)) % len(WORDS)])
        i += 1
    return " ".join(words)[:chars]


def user(text: str) -> list[dict]:
    return [{"role": "user", "content": text}]


def chat(sim, messages: list[dict], max_tokens: int = 1) -> dict:
    status, body = http_json(f"{sim.url}/v1/chat/completions",
                             {"model": sim.model, "messages": messages, "max_tokens": max_tokens})
    assert status == 200, body
    return body


def counters(sim) -> tuple[float, float]:
    text = sim.metrics()
    return (metric_value(text, "vllm:prefix_cache_queries_total", {"model_name": sim.model}),
            metric_value(text, "vllm:prefix_cache_hits_total", {"model_name": sim.model}))


def hits_of(sim, messages: list[dict]) -> float:
    """Send one request; the cache hits it brought, in tokens."""
    before = counters(sim)[1]
    chat(sim, messages)
    return counters(sim)[1] - before


def expected_hits(cached: str, prompt: str) -> int:
    """Tokens of `prompt` a cache holding `cached` serves: whole shared blocks, one token left."""
    shared = 0
    for a, b in zip(block_hashes(cached), block_hashes(prompt), strict=False):
        if a != b:
            break
        shared += 1
    return min(shared, (estimate_tokens(prompt) - 1) // BLOCK_TOKENS) * BLOCK_TOKENS


# ---- hits and counters ------------------------------------------------------------------------


def test_shared_prefix_hits_counted_in_tokens_block_by_block(start_sim):
    sim = start_sim(speed=FAST, kv_cache_tokens=CACHE)
    system = {"role": "system", "content": text_of("policy", 1000)}  # 1000 chars: not whole blocks
    first = [system, {"role": "user", "content": "What is the first question?"}]
    second = [system, {"role": "user", "content": "And a second one, please."}]
    one, two = render_messages(first), render_messages(second)
    chat(sim, first)
    assert counters(sim) == (estimate_tokens(one), 0)
    chat(sim, second)
    hit = expected_hits(one, two)
    assert counters(sim) == (estimate_tokens(one) + estimate_tokens(two), hit)
    # Block-granular: the shared text is longer than the whole blocks it fills.
    assert hit % BLOCK_TOKENS == 0 and 0 < hit < estimate_tokens(render_messages([system]))
    assert hit == (len(render_messages([system])) // BLOCK_CHARS) * BLOCK_TOKENS

    # The same prompt again hits every block but the one holding its last token.
    before = counters(sim)
    chat(sim, second)
    after = counters(sim)
    assert after[1] - before[1] == (estimate_tokens(two) - 1) // BLOCK_TOKENS * BLOCK_TOKENS


def test_next_turn_hits_the_cached_reply(start_sim):
    """A finished reply's blocks stay cached, so a conversation's next turn hits through it."""
    sim = start_sim(speed=FAST, kv_cache_tokens=CACHE)
    turn = user(text_of("question", 300))
    reply = chat(sim, turn, max_tokens=40)["choices"][0]["message"]["content"]
    assistant = {"role": "assistant", "content": reply}
    grown = [*turn, assistant, {"role": "user", "content": "Go on."}]
    cached = render_messages([*turn, assistant])
    assert hits_of(sim, grown) == expected_hits(cached, render_messages(grown))
    assert expected_hits(cached, render_messages(grown)) > expected_hits(
        render_messages(turn), render_messages(grown))  # more than the first prompt alone


def test_no_prefix_caching_never_hits(start_sim):
    """Off with the flag, and off without a cache size: sims behave as before unless asked."""
    for sim in (start_sim(speed=FAST, kv_cache_tokens=CACHE, no_prefix_caching=True),
                start_sim(speed=FAST)):
        prompt = user(text_of("again", 800))
        for _ in range(3):
            chat(sim, prompt)
        assert counters(sim) == (0, 0)  # vLLM counts no queries with caching off either
        assert 'enable_prefix_caching="False"' in sim.metrics()


def test_completions_prompts_are_cached_as_sent(start_sim):
    sim = start_sim(speed=FAST, kv_cache_tokens=CACHE)
    prompt = text_of("complete", 500)
    for _ in range(2):
        status, body = http_json(f"{sim.url}/v1/completions",
                                 {"model": "m", "prompt": prompt, "max_tokens": 1})
        assert status == 200, body
    assert counters(sim) == (2 * estimate_tokens(prompt), expected_hits(prompt, prompt))


# ---- eviction -------------------------------------------------------------------------------


def lru_sim(start_sim):
    """16 blocks; each prompt below fills 4 whole blocks and runs in 5 (its reply's)."""
    return start_sim(speed=FAST, kv_cache_tokens=16 * BLOCK_TOKENS, max_model_len=256)


def four_blocks(tag: str) -> list[dict]:
    messages = user(text_of(tag, 4 * BLOCK_CHARS - len(render_messages(user("")))))
    assert len(render_messages(messages)) == 4 * BLOCK_CHARS
    return messages


FULL_HIT = 3 * BLOCK_TOKENS  # four whole blocks, less the one holding the last token


def test_small_cache_evicts_least_recently_used(start_sim):
    sim = lru_sim(start_sim)
    a, b, c, d, e = (four_blocks(t) for t in "ABCDE")
    assert hits_of(sim, a) == 0
    assert hits_of(sim, a) == FULL_HIT
    for other in (b, c, d, e):  # 4 x 4 cached blocks: more than the 16 - 4 left beside A's
        assert hits_of(sim, other) == 0
    assert hits_of(sim, a) == 0  # pushed out


def test_recently_used_prefix_stays(start_sim):
    sim = lru_sim(start_sim)
    a, b, c, d, e = (four_blocks(t) for t in "abcde")
    hits_of(sim, a)
    hits_of(sim, b)
    assert hits_of(sim, a) == FULL_HIT  # A used again: now B is the least recent
    for other in (c, d, e):
        hits_of(sim, other)
    assert hits_of(sim, a) == FULL_HIT
    assert hits_of(sim, b) == 0


def test_config_rejects_a_cache_smaller_than_one_request():
    done = run_cli("sim", "--model", "m", "--port", "1", "--kv-cache-tokens", "1000", timeout=20)
    assert done.returncode == 2 and "Traceback" not in done.stderr
    assert "--kv-cache-tokens (1000)" in done.stderr and "--max-model-len (4096)" in done.stderr


def test_fleet_file_kv_cache_tokens_reaches_the_sim(tmp_path):
    config = write_fleet(tmp_path / "fleet.yaml", {"m": {
        "backend": "sim", "sim": {"kv_cache_tokens": 8192},
        "servers": [{"host": "127.0.0.1", "port": 8401}]}})
    done = run_cli("serve", "-c", str(config), "--dry-run", timeout=30)
    assert done.returncode == 0, done.stderr
    assert "--kv-cache-tokens 8192" in done.stdout


# ---- usage and waiting ------------------------------------------------------------------------


def long_reply_prompt(tag: str, max_tokens: int) -> list[dict]:
    """A prompt whose reply (seed 0) runs to max_tokens, so its size is known in advance."""
    for i in range(1000):
        messages = user(f"{tag} {i}: tell me everything.")
        pieces, _ = content.reply_pieces(0, content.chat_prompt(messages)[0], max_tokens, False)
        if len(pieces) == max_tokens:
            return messages
    raise AssertionError("no prompt with a long enough reply")


def sequence_blocks(messages: list[dict], max_tokens: int) -> int:
    """Blocks the whole sequence (prompt and reply, as the client renders them) fills."""
    pieces, _ = content.reply_pieces(0, content.chat_prompt(messages)[0], max_tokens, False)
    whole = render_messages([*messages, {"role": "assistant", "content": "".join(pieces)}])
    return -(-estimate_tokens(whole) // BLOCK_TOKENS)


async def _watch(sim, requests: list[list[dict]], max_tokens: int) -> list[dict[str, float]]:
    """Send the requests at once; sample the gauges until all are answered."""
    samples: list[dict[str, float]] = []
    async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=0)) as session:
        async def one(messages: list[dict]) -> None:
            async with session.post(f"{sim.url}/v1/chat/completions", json={
                    "model": "m", "messages": messages, "max_tokens": max_tokens}) as r:
                assert r.status == 200, await r.text()
                await r.read()
        burst = asyncio.gather(*(one(m) for m in requests))
        deadline = time.monotonic() + 30
        while not burst.done():
            assert time.monotonic() < deadline, "the burst did not finish"
            async with session.get(f"{sim.url}/metrics") as r:
                text = await r.text()
            samples.append({name: metric_value(text, f"vllm:{name}") for name in
                            ("kv_cache_usage_perc", "num_requests_running", "num_requests_waiting")})
            await asyncio.sleep(0.01)
        await burst
    return samples


async def test_kv_cache_usage_rises_under_load_and_stays_within_0_and_1(start_sim):
    sim = start_sim(speed=5, kv_cache_tokens=4096)
    assert sim.metric("vllm:kv_cache_usage_perc") == 0
    prompt = long_reply_prompt("load", 64)
    samples = await _watch(sim, [prompt] * 8, 64)
    usage = [s["kv_cache_usage_perc"] for s in samples]
    assert all(0 <= u <= 1 for u in usage)
    assert max(usage) > 0.05  # 8 sequences of ~7 blocks each in 256
    assert sim.metric("vllm:kv_cache_usage_perc") == 0  # cached blocks are not "used"


async def test_requests_wait_while_running_ones_fill_the_cache(start_sim):
    """Each sequence needs more than half the cache, so they run one at a time."""
    sim = start_sim(speed=5, kv_cache_tokens=256, max_model_len=256)
    prompt = long_reply_prompt("fill", 100)
    assert 8 < sequence_blocks(prompt, 100) <= 16
    samples = await _watch(sim, [prompt] * 4, 100)
    assert max(s["num_requests_running"] for s in samples) == 1
    assert max(s["num_requests_waiting"] for s in samples) >= 1
    assert all(0 <= s["kv_cache_usage_perc"] <= 1 for s in samples)
    assert sim.metric("vllm:request_success_total") == 4


# ---- time: cached prefill, shared prefill ---------------------------------------------------


def _ttft(sim, messages: list[dict]) -> float:
    start = time.monotonic()
    chat(sim, messages)  # one token: the time to it is the prefill
    return time.monotonic() - start


def test_cached_prompt_answers_sooner_than_an_uncached_one(start_sim):
    sim = start_sim(speed=2, kv_cache_tokens=CACHE)
    warm, cold = user(text_of("warm", 16_000)), user(text_of("cold", 16_000))  # ~2,300 words
    assert estimate_tokens(render_messages(warm)) == estimate_tokens(render_messages(cold))
    chat(sim, warm)
    cached = _ttft(sim, warm)
    uncached = _ttft(sim, cold)
    assert cached < 0.7 * uncached, (cached, uncached)
    assert uncached > 0.15  # the prefill of ~2,300 tokens did take its time: (0.02 + 0.46 s) / 2


async def _decode_gaps_around_a_heavy_prefill(sim) -> tuple[list[float], float]:
    """Stream a long reply; once it flows, send a heavy uncached prompt; the gaps between chunks."""
    heavy = user(text_of("heavy", 20_000))  # ~2,900 words: the sim's tokens
    stream_prompt = long_reply_prompt("stream", 80)
    arrivals: list[float] = []
    async with aiohttp.ClientSession() as session:
        heavy_task = None
        async with session.post(f"{sim.url}/v1/chat/completions", json={
                "model": "m", "messages": stream_prompt, "max_tokens": 80, "stream": True}) as r:
            assert r.status == 200
            async for line in r.content:
                if not line.startswith(b"data: {"):
                    continue
                arrivals.append(time.monotonic())
                if len(arrivals) == 10:
                    heavy_task = asyncio.ensure_future(session.post(
                        f"{sim.url}/v1/chat/completions",
                        json={"model": "m", "messages": heavy, "max_tokens": 1}))
        assert heavy_task is not None
        async with await heavy_task as h:
            assert h.status == 200
    gaps = [b - a for a, b in zip(arrivals[2:], arrivals[3:], strict=False)]
    return gaps, statistics.median(gaps)


async def test_heavy_prefill_slows_everyones_decode_steps_chunked_less(start_sim):
    whole = start_sim(speed=2, max_num_batched_tokens=8192)  # one step: (0.02 + 0.58 s) / 2
    gaps, median = await _decode_gaps_around_a_heavy_prefill(whole)
    assert max(gaps) > 5 * median, (max(gaps), median)
    chunked = start_sim(speed=2, max_num_batched_tokens=64)  # steps of 63 prompt tokens: 16 ms
    chunked_gaps, _ = await _decode_gaps_around_a_heavy_prefill(chunked)
    assert max(chunked_gaps) < max(gaps) / 3, (max(chunked_gaps), max(gaps))


# ---- the names clients read ---------------------------------------------------------------------


CACHE_SERIES = ("vllm:kv_cache_usage_perc", "vllm:prefix_cache_queries_total",
                "vllm:prefix_cache_queries_created", "vllm:prefix_cache_hits_total",
                "vllm:prefix_cache_hits_created", "vllm:cache_config_info")


def _series(text: str, name: str) -> tuple[list[str], dict[str, str]]:
    """The HELP and TYPE lines of `name` and the labels of its one sample."""
    heads = [line for line in text.splitlines()
             if line.startswith((f"# HELP {name} ", f"# TYPE {name} "))]
    samples = [line for line in text.splitlines() if line.startswith(name + "{")]
    assert len(samples) == 1, (name, samples)
    return heads, dict(re.findall(r'(\w+)="([^"]*)"', samples[0].rpartition("}")[0]))


def test_cache_metrics_match_vllm_names_and_labels(start_sim):
    sim = start_sim(speed=FAST, kv_cache_tokens=10_000)
    chat(sim, user(text_of("metrics", 400)))
    ours, real = sim.metrics(), (FIXTURES / "metrics-chat.txt").read_text()
    for name in CACHE_SERIES:
        our_heads, our_labels = _series(ours, name)
        real_heads, real_labels = _series(real, name)
        assert our_heads == real_heads, name
        if name == "vllm:cache_config_info":
            assert set(our_labels) <= set(real_labels)
            assert {"block_size", "enable_prefix_caching", "num_gpu_blocks",
                    "kv_cache_size_tokens"} <= set(our_labels)
        else:
            assert our_labels.keys() == real_labels.keys(), name
            assert our_labels["model_name"] == "m"
    labels = _series(ours, "vllm:cache_config_info")[1]
    assert labels["block_size"] == str(BLOCK_TOKENS) and labels["enable_prefix_caching"] == "True"
    assert labels["num_gpu_blocks"] == str(10_000 // BLOCK_TOKENS)
    assert labels["kv_cache_size_tokens"] == str(10_000 // BLOCK_TOKENS * BLOCK_TOKENS)
    assert metric_value(ours, "vllm:prefix_cache_hits_created") > 1e9  # a Unix time

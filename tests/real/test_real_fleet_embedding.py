"""A real vLLM embedding server (`--runner pooling`), started by serve_pipeline.py.

Its own module, so it never runs beside the two chat replicas: 2 cores, ~3 GB each.
"""

from __future__ import annotations

import json
import time
import urllib.request
from collections.abc import Iterator

import pytest
from fleet_checks import delta, ok_requests, scrape, worker_affinity
from launched import LaunchedFleet, launch, vllm_cpu_model, write_fleet_file

from modelfleet.client import ModelServer

MODEL = "tiny-bert"
TEXTS = ["benchmark sentence", "other words here", "benchmark sentence"]


@pytest.fixture(scope="module")
def fleet(vllm_venv, tiny_models, tmp_path_factory) -> Iterator[tuple[LaunchedFleet, str, ModelServer]]:
    work = tmp_path_factory.mktemp("embedding-fleet")
    models = {MODEL: vllm_cpu_model(vllm_venv.python, tiny_models["embedding"], "embedding",
                                    cpus=[0], runner="pooling")}
    launched = launch(write_fleet_file(work / "fleet.yaml", models), work)
    try:
        started = time.monotonic()
        launched.wait_running()
        print(f"vLLM embedding server RUNNING after {time.monotonic() - started:.1f}s")
        client_file = write_fleet_file(work / "client.yaml", models, {"probe_interval_s": 3600})
        with ModelServer(client_file) as client:
            client.embed(MODEL, "warm up")  # first use benchmarks the server: not counted below
            yield launched, f"127.0.0.1:{models[MODEL]['servers'][0]['port']}", client
    finally:
        left = launched.stop()
    assert not left, f"the launcher left engine processes behind: {left}"


def raw_embeddings(address: str, texts: list[str]) -> dict:
    req = urllib.request.Request(f"http://{address}/v1/embeddings",
                                 data=json.dumps({"model": MODEL, "input": texts}).encode(),
                                 headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(req, timeout=30) as r:
        return json.loads(r.read())


def test_launcher_serves_the_pooling_runner_on_its_core(fleet) -> None:
    launched, address, _ = fleet
    assert list(launched.servers()) == [address]
    assert worker_affinity(launched.proc.pid, int(address.rsplit(":", 1)[1])) == [[0]]
    engine_log = (launched.log_dir / f"tiny-bert-{address.rsplit(':', 1)[1]}.log").read_text()
    assert "'runner': 'pooling'" in engine_log  # vLLM's own echo of the flags it was given


def test_embed_returns_what_vllm_computed_in_one_request(fleet) -> None:
    _, address, client = fleet
    reference = raw_embeddings(address, TEXTS)
    before = {address: scrape(address)}
    vectors = client.embed(MODEL, TEXTS)
    after = {address: scrape(address)}
    assert vectors == [d["embedding"] for d in reference["data"]]
    assert vectors[0] == vectors[2] != vectors[1]
    assert ok_requests(after[address], "/v1/embeddings") - \
        ok_requests(before[address], "/v1/embeddings") == 1
    assert delta(before, after, "vllm:prompt_tokens_total") == {
        address: reference["usage"]["prompt_tokens"]}


def test_embed_as_numpy_and_a_single_string(fleet) -> None:
    _, address, client = fleet
    matrix = client.embed(MODEL, TEXTS, as_numpy=True)
    assert matrix.shape == (3, 64) and str(matrix.dtype) == "float32"
    single = client.embed(MODEL, "other words here")
    assert len(single) == 1 and len(single[0]) == 64
    assert abs(matrix[1] - single[0]).max() < 1e-6

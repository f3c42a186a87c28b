"""Editing the fleet file by command: comments and layout kept, bad edits refused, file untouched."""

from __future__ import annotations

import os
import stat
from pathlib import Path

import pytest
from helpers import run_cli

from modelfleet.config import ConfigDocument, load_config
from modelfleet.errors import ConfigError

# Full of comments, odd spacing, quotes, a `${VAR}` nobody sets here, and a section after models.
COMMENTED = """\
# Team fleet. Ask #infra before changing ports.

routing:   # client side
  policy: peak_ewma    # the default
  max_retry: 3         # keep it low, the 70B is slow

models:
  # ---- chat ----
  chat-a:
    kind: chat          # the workhorse
    aliases: ['A']
    backend: vllm
    api_key: ${MF_EDIT_TEST_KEY}   # never set on laptops
    servers:
      - {host: "${MF_EDIT_TEST_HOST:-10.0.0.3}", port: 8080, gpus: [0]}   # rack 1
      - {host: 10.0.0.4, port: 8080, gpus: [1, 2]}                      # rack 2

  # ---- embeddings ----
  embed-b:
    kind: embedding
    backend: sim
    servers:
      - {host: 127.0.0.1, port: 9101}   # local

# benchmark probes stay tiny
benchmark:
  max_tokens: 4   # enough for "OK"
"""

COMMENTS = [line.split("#", 1)[1] for line in COMMENTED.splitlines() if "#" in line]
UNSET = {"MF_EDIT_TEST_KEY": "", "MF_EDIT_TEST_HOST": ""}  # run_cli merges, so blank them


@pytest.fixture
def fleet(tmp_path: Path) -> Path:
    path = tmp_path / "fleet.yaml"
    path.write_text(COMMENTED)
    return path


def edit(fleet: Path, *argv: str) -> str:
    """Run one edit command (with the file's variables unset) and return the new text."""
    env = {k: v for k, v in UNSET.items()}
    result = run_cli("config", *argv, "-c", str(fleet), env=env)
    assert result.returncode == 0, result.stderr
    assert "Traceback" not in result.stderr
    return fleet.read_text()


def assert_still_valid(fleet: Path) -> None:
    """Structure-only right away; fully resolved once the variable is set."""
    load_config(fleet, resolve_env=False)
    result = run_cli("config", "validate", "-c", str(fleet), env={"MF_EDIT_TEST_KEY": "k"})
    assert result.returncode == 0, result.stderr


def assert_refused(fleet: Path, argv: list[str], *expected: str) -> None:
    before = fleet.read_bytes()
    result = run_cli("config", *argv, "-c", str(fleet), env=UNSET)
    assert result.returncode == 2, result.stdout
    for text in expected:
        assert text in result.stderr
    assert "Traceback" not in result.stderr
    assert fleet.read_bytes() == before
    assert sorted(p.name for p in fleet.parent.iterdir()) == ["fleet.yaml"]  # no temp file left


def test_add_server_keeps_everything_else(fleet: Path) -> None:
    text = edit(fleet, "add-server", "chat-a", "10.0.0.5:8080", "--gpus", "3,4", "--min-free-memory-gb", "40")
    assert text == COMMENTED.replace(
        "# rack 2\n",
        "# rack 2\n      - {host: 10.0.0.5, port: 8080, gpus: [3, 4], min_free_memory_gb: 40}\n")
    assert_still_valid(fleet)
    assert load_config(fleet, resolve_env=False).models["chat-a"].servers[2].gpus == (3, 4)


def test_add_server_by_alias_and_remove_it_again(fleet: Path) -> None:
    edit(fleet, "add-server", "A", "10.0.0.6:8081")
    assert "{host: 10.0.0.6, port: 8081}" in fleet.read_text()
    assert edit(fleet, "remove-server", "chat-a", "10.0.0.6:8081") == COMMENTED


def test_remove_server_keeps_the_comments_around_it(fleet: Path) -> None:
    text = edit(fleet, "remove-server", "chat-a", "10.0.0.4:8080")
    assert text == COMMENTED.replace(
        "      - {host: 10.0.0.4, port: 8080, gpus: [1, 2]}                      # rack 2\n", "")
    assert_still_valid(fleet)


def test_remove_server_matches_a_host_written_as_a_variable(fleet: Path) -> None:
    text = edit(fleet, "remove-server", "chat-a", "10.0.0.3:8080")
    assert "rack 1" not in text and "# rack 2" in text


def test_add_and_remove_model(fleet: Path) -> None:
    text = edit(fleet, "add-model", "e5", "--kind", "embedding", "--backend", "sim",
                "--server", "127.0.0.1:9201", "--server", "127.0.0.1:9202", "--model-path", "intfloat/e5")
    assert text == COMMENTED.replace(
        "      - {host: 127.0.0.1, port: 9101}   # local\n",
        "      - {host: 127.0.0.1, port: 9101}   # local\n\n"
        "  e5:\n    kind: embedding\n    backend: sim\n    model_path: intfloat/e5\n    servers:\n"
        "      - {host: 127.0.0.1, port: 9201}\n      - {host: 127.0.0.1, port: 9202}\n")
    assert_still_valid(fleet)
    assert edit(fleet, "remove-model", "e5") == COMMENTED


def test_remove_model_keeps_the_next_models_heading(fleet: Path) -> None:
    text = edit(fleet, "remove-model", "chat-a")
    assert "chat-a" not in text and "rack 1" not in text
    for kept in ("# Team fleet.", "# ---- embeddings ----", "# local", "# benchmark probes stay tiny",
                 "# enough for \"OK\""):
        assert kept in text
    assert_still_valid(fleet)


def test_set_keeps_comments_and_quotes(fleet: Path) -> None:
    text = edit(fleet, "set", "routing.policy", "round_robin")
    assert text == COMMENTED.replace("policy: peak_ewma    # the default", "policy: round_robin  # the default")
    text = edit(fleet, "set", "models.chat-a.servers[1].port", "8081")
    assert "{host: 10.0.0.4, port: 8081, gpus: [1, 2]}" in text
    text = edit(fleet, "set", "routing.probe_interval_s", "0.5")  # a key the file did not have
    assert "  max_retry: 3         # keep it low, the 70B is slow\n  probe_interval_s: 0.5\n" in text
    text = edit(fleet, "set", "models.embed-b.sim.speed", "20")  # creates the sim section
    assert "    backend: sim\n    servers:\n      - {host: 127.0.0.1, port: 9101}   # local\n" \
           "    sim:\n      speed: 20\n" in text
    for comment in COMMENTS:
        assert comment in text
    assert_still_valid(fleet)
    cfg = load_config(fleet, resolve_env=False)
    assert cfg.routing.policy == "round_robin" and cfg.routing.probe_interval_s == 0.5
    assert cfg.models["embed-b"].sim.speed == 20


def test_get_reads_the_file_as_written(fleet: Path) -> None:
    result = run_cli("config", "get", "models.chat-a.servers[0].host", "-c", str(fleet), env=UNSET)
    assert result.returncode == 0 and result.stdout == "${MF_EDIT_TEST_HOST:-10.0.0.3}\n"


@pytest.mark.parametrize(("argv", "expected"), [
    (["set", "routing.policy", "teleport"],
     ["fleet.yaml:4: routing.policy: must be one of peak_ewma, fastest"]),
    (["set", "models.chat-a.servers[1].port", "70000"],
     ["fleet.yaml:16: models.chat-a.servers[1].port: must be 1..65535, got 70000"]),
    (["add-server", "embed-b", "127.0.0.1:70000"],
     ["fleet.yaml:24: models.embed-b.servers[1].port: must be 1..65535, got 70000"]),
    (["add-server", "embed-b", "10.0.0.4:8080"],
     ["fleet.yaml:24: models.embed-b.servers[1]: 10.0.0.4:8080 is already used by models.chat-a.servers[1]"]),
    (["add-model", "dup", "--backend", "sim", "--server", "127.0.0.1:9101"],
     ["models.dup.servers[0]: 127.0.0.1:9101 is already used by models.embed-b.servers[0]"]),
    (["add-model", "A", "--server", "127.0.0.1:9300"], ["alias 'A' is also the name of a model"]),
    (["set", "routing.stall_timeout_s", "1000"], ["must not exceed request_timeout_s"]),
    (["set", "routing.polcy", "fastest"], ["routing.polcy: unknown key; did you mean 'policy'?"]),
    (["set", "models.chat-a.kind", "chat-ish"], ["models.chat-a.kind: must be one of chat, embedding"]),
    (["set", "models.chat-a.served_name", "123"], ["must be a string, got 123"]),
    (["set", "routng.policy", "fastest"], ["routng: no such section; did you mean 'routing'?"]),
    (["set", "models.chat-a.servers[7].port", "1"], ["the list has 2 item(s)"]),
    (["set", "models.nope.kind", "chat"], ["models.nope: no such model", "add-model"]),
    (["add-server", "chat-a", "10.0.0.9"], ["is not HOST:PORT", "127.0.0.1:8101"]),
    (["add-server", "chat-a", "10.0.0.9:80", "--gpus", "0,x"], ["--gpus must be comma-separated indexes"]),
    (["add-server", "nope", "10.0.0.9:80"], ["no model 'nope'", "known models: chat-a, embed-b"]),
    (["remove-server", "chat-a", "10.0.0.9:80"], ["chat-a has no server 10.0.0.9:80", "10.0.0.4:8080"]),
    (["remove-server", "embed-b", "127.0.0.1:9101"], ["last server of embed-b", "remove-model embed-b"]),
    (["remove-model", "nope"], ["no model 'nope'"]),
    (["add-model", "x", "--kind", "chat"], ["a model needs at least one server"]),
    (["add-model", "embed-b", "--server", "127.0.0.1:9300"], ["model embed-b already exists"]),
])
def test_bad_edits_are_refused_and_the_file_is_untouched(fleet: Path, argv: list[str],
                                                         expected: list[str]) -> None:
    assert_refused(fleet, argv, *expected)


def test_edit_of_a_broken_file_lists_its_problems_and_writes_nothing(fleet: Path) -> None:
    fleet.write_text(COMMENTED.replace("policy: peak_ewma", "policy: teleport"))
    assert_refused(fleet, ["add-server", "embed-b", "127.0.0.1:9102"], "fleet.yaml:4: routing.policy")
    # ... and fixing the problem by command works.
    edit(fleet, "set", "routing.policy", "fastest")
    assert_still_valid(fleet)


def test_write_is_atomic_and_keeps_the_file_mode(fleet: Path) -> None:
    os.chmod(fleet, 0o640)
    inode = fleet.stat().st_ino
    edit(fleet, "set", "routing.max_retry", "4")
    assert stat.S_IMODE(fleet.stat().st_mode) == 0o640
    assert fleet.stat().st_ino != inode  # a new file renamed over the old one, never rewritten in place
    assert sorted(p.name for p in fleet.parent.iterdir()) == ["fleet.yaml"]


def test_edit_through_a_symlink_changes_the_target(fleet: Path, tmp_path: Path) -> None:
    link = tmp_path / "link.yaml"
    link.symlink_to(fleet)
    result = run_cli("config", "set", "routing.max_retry", "2", "-c", str(link), env=UNSET)
    assert result.returncode == 0, result.stderr
    assert link.is_symlink() and "max_retry: 2 " in fleet.read_text()


def test_document_refuses_to_overwrite_a_file_changed_meanwhile(fleet: Path) -> None:
    document = ConfigDocument.open(fleet)
    document.set("routing.max_retry", "2")
    fleet.write_text(COMMENTED.replace("max_retry: 3", "max_retry: 9"))
    with pytest.raises(ConfigError, match="changed while it was being edited"):
        document.save()
    assert "max_retry: 9" in fleet.read_text()


def test_editing_keeps_four_space_indentation(tmp_path: Path) -> None:
    path = tmp_path / "fleet.yaml"
    original = ("models:\n    m:\n        servers:\n        -   host: h   # first\n            port: 1\n")
    path.write_text(original)
    text = edit(path, "add-server", "m", "h:2")
    assert text == original + "        -   host: h\n            port: 2\n"

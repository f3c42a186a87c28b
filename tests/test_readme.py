"""Every command and Python example in README.md, run as the README shows it.

How README.md is read (keep it this way when editing the README):

- Fenced blocks tagged ```bash are run as one bash script each (`bash -e -o pipefail`),
  and blocks tagged ```python as one Python script each, in README order, in one working
  directory. That directory holds a copy of client_config.yaml, links to
  model_server.py and serve_pipeline.py, and the fleet of that file, started by this
  test with the real launcher (`modelfleet serve`). Every block must exit 0, and no block
  may print a traceback.
- The default fleet's ports and the simulator example's port (8101-8103, 8201-8202,
  9000) are replaced by free ports wherever they appear in a block, because the test
  runs its fleet on free ports.
- Blocks tagged ```yaml or ```text are not run (they show files and output), unless a
  marker says otherwise.
- An HTML comment on the line just before a block changes how it is handled:
    <!-- readme-test: skip: REASON -->   not run (the set-up lines, `modelfleet serve`);
    <!-- readme-test: file NAME -->      the block is written to NAME for later blocks;
    <!-- readme-test: gpu-host HOST -->  a GPU-host block: every serve_pipeline.py command
                                         in it gets `--dry-run`, `--host HOST` and
                                         simulated GPUs (`--fake-gpus`) unless it has them;
    <!-- readme-test: interrupt -->      a command that runs until Ctrl-C: it gets SIGINT
                                         once it has printed something, and must exit 0;
    <!-- readme-test: exit N -->         the block must exit with status N; a ```text
                                         block right after it is what it prints on stderr.
  A serve_pipeline.py command is only ever run with --dry-run: the test fails on one
  that would start GPU servers.

`modelfleet demo` is covered by tests/test_demo.py; the set-up lines (pip install,
pytest) are not run here. Blocks depend on earlier ones (files, config edits), so run
this module whole.
"""

from __future__ import annotations

import os
import re
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import psutil
import pytest
from helpers import ROOT, free_port

README = ROOT / "README.md"
MAPPED_PORTS = (8101, 8102, 8103, 8201, 8202, 9000)
SETUP = (
    "python3 -m venv .venv && . .venv/bin/activate && pip install -e . && modelfleet demo",
    "python3 -m venv .venv && . .venv/bin/activate && pip install -e '.[test]' && pytest",
)
MARKER = re.compile(r"^<!--\s*readme-test:\s*(?P<kind>[a-z-]+)(?::?\s*(?P<arg>.*?))?\s*-->$")
FENCE = re.compile(r"^```(?P<lang>[a-z]*)\s*$")
TEST_GPUS = "gpus:\n" + "".join(
    f"  - {{index: {i}, name: H100, total_gb: 80, free_gb: 80}}\n" for i in range(8))
BLOCK_TIMEOUT_S = 90


@dataclass(frozen=True)
class Block:
    line: int  # where its fence opens in README.md
    lang: str
    text: str
    marker: str | None  # skip | file | gpu-host | interrupt | exit
    arg: str

    @property
    def id(self) -> str:
        return f"L{self.line}-{self.lang}" + (f"-{self.marker}" if self.marker else "")


def readme_blocks(text: str) -> list[Block]:
    blocks: list[Block] = []
    lines = text.splitlines()
    i = 0
    while i < len(lines):
        fence = FENCE.match(lines[i])
        if not fence:
            i += 1
            continue
        start = i
        body: list[str] = []
        i += 1
        while i < len(lines) and lines[i].rstrip() != "```":
            body.append(lines[i])
            i += 1
        marker = MARKER.match(lines[start - 1].strip()) if start else None
        blocks.append(Block(line=start + 1, lang=fence.group("lang"), text="\n".join(body) + "\n",
                            marker=marker.group("kind") if marker else None,
                            arg=(marker.group("arg") or "").strip() if marker else ""))
        i += 1
    return blocks


BLOCKS = readme_blocks(README.read_text())


@dataclass
class Workspace:
    path: Path
    ports: dict[int, int]
    env: dict[str, str]

    def localise(self, text: str) -> str:
        """The block as it must run here: the fleet's ports are the test's free ones."""
        pattern = r"(?<!\d)(" + "|".join(map(str, self.ports)) + r")(?!\d)"
        return re.sub(pattern, lambda m: str(self.ports[int(m.group(1))]), text)


def _stop_background(path: Path) -> None:
    """A README block that starts a process in the background (`... & echo $! > X.pid`)
    and a later one that stops it: should the later one fail, the process must not
    outlive the test (it belongs to init by then, not to any tree we track)."""
    for pid_file in path.glob("*.pid"):
        try:
            process = psutil.Process(int(pid_file.read_text().split()[0]))
            if str(path) in (process.cwd() or ""):
                process.kill()
        except (ValueError, IndexError, OSError, psutil.Error):
            continue


@pytest.fixture(scope="module")
def workspace(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Workspace]:
    """A copy of the default fleet on free ports, running under the real launcher."""
    path = tmp_path_factory.mktemp("readme")
    ports = {old: free_port() for old in MAPPED_PORTS}
    text = (ROOT / "client_config.yaml").read_text()
    for old in MAPPED_PORTS[:5]:
        assert f"port: {old}" in text, f"client_config.yaml no longer uses port {old}"
        text = text.replace(f"port: {old}", f"port: {ports[old]}")
    (path / "client_config.yaml").write_text(text)
    for script in ("model_server.py", "serve_pipeline.py"):
        (path / script).symlink_to(ROOT / script)
    (path / "test_gpus.yaml").write_text(TEST_GPUS)
    bin_dir = str(Path(sys.executable).parent)
    env = {k: v for k, v in os.environ.items() if k not in ("MODELFLEET_CONFIG", "NO_COLOR")}
    env.update(PATH=bin_dir + os.pathsep + env.get("PATH", ""), PYTHONUNBUFFERED="1")

    ready = path / "ready.json"
    launcher = subprocess.Popen(
        [sys.executable, "-m", "modelfleet", "serve", "--log-dir", str(path / "logs"),
         "--ready-file", str(ready)], cwd=path, env=env, stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL)
    try:
        deadline = time.monotonic() + 60
        while not ready.exists():
            assert launcher.poll() is None, "the launcher exited before the fleet was up"
            assert time.monotonic() < deadline, "the fleet was not up within 60 s"
            time.sleep(0.05)
        tree = psutil.Process(launcher.pid).children(recursive=True)
        yield Workspace(path=path, ports=ports, env=env)
    finally:
        _stop_background(path)
        launcher.terminate()
        try:
            launcher.wait(timeout=30)
        except subprocess.TimeoutExpired:
            launcher.kill()
            launcher.wait()
    _, alive = psutil.wait_procs(tree, timeout=10)
    assert not alive, f"the launcher left processes behind: {alive}"


def test_setup_commands_are_the_two_at_the_top_and_the_ci_runs_the_second() -> None:
    runnable = [b for b in BLOCKS if b.lang in ("bash", "python")]
    first = runnable[0]
    assert first.marker == "skip"
    assert first.text.strip().splitlines() == list(SETUP)
    ci = (ROOT / ".ci" / "run").read_text().splitlines()
    test_line = ci[ci.index("# The README's test command:") + 1]
    assert SETUP[1].endswith(" && " + test_line), test_line


def test_the_demo_output_shown_is_a_successful_run() -> None:
    text = README.read_text()
    assert re.search(r"^demo: \d+ requests, 0 failed", text, re.MULTILINE)
    assert "ok: every model has a healthy server" in text


def test_every_block_is_of_a_known_kind() -> None:
    for block in BLOCKS:
        assert block.lang in ("bash", "python", "yaml", "text"), block
        assert block.marker in (None, "skip", "file", "gpu-host", "interrupt", "exit"), block
        if block.marker == "file":
            assert block.arg and "/" not in block.arg, block


# Blocks that are only shown (text, YAML that no command reads) or marked skip (the set-up
# commands, checked above) are not collected at all: a test that always skips proves nothing.
RUN = [b for b in BLOCKS
       if b.marker != "skip" and (b.marker == "file" or b.lang in ("bash", "python"))]


@pytest.mark.parametrize("block", RUN, ids=[b.id for b in RUN])
def test_readme_block(block: Block, workspace: Workspace) -> None:
    if block.marker == "file":
        (workspace.path / block.arg).write_text(block.text)
        return
    text = workspace.localise(block.text)
    if block.marker == "gpu-host":
        text = as_dry_run(text, host=block.arg)
    for line in text.splitlines():
        if "serve_pipeline.py" in line and not line.lstrip().startswith("#"):
            assert "--dry-run" in line, f"README.md:{block.line} would start GPU servers: {line}"
    if "curl " in text and shutil.which("curl") is None:
        pytest.skip("curl is not installed here")
    if block.lang == "python":
        script = workspace.path / f"readme_example_{block.line}.py"
        script.write_text(text)
        argv = [sys.executable, str(script)]
    else:
        argv = ["bash", "-e", "-o", "pipefail", "-c", text]
    if block.marker == "interrupt":
        code, out, err = run_until_output_then_interrupt(argv, workspace)
        expected = 0
    else:
        result = subprocess.run(argv, cwd=workspace.path, env=workspace.env, capture_output=True,
                                text=True, timeout=BLOCK_TIMEOUT_S)
        code, out, err = result.returncode, result.stdout, result.stderr
        expected = int(block.arg) if block.marker == "exit" else 0
    where = f"README.md:{block.line}\n--- stdout\n{out}\n--- stderr\n{err}"
    assert code == expected, where
    assert "Traceback" not in out + err, where
    if block.marker == "gpu-host":
        assert "dry run: nothing is started" in out, where
    if block.marker == "exit":
        assert err.strip(), where  # a refusal says why
        shown = BLOCKS[BLOCKS.index(block) + 1]
        if shown.lang == "text":  # the README shows the message: it must be the real one
            assert shown.text.strip() in err, where


def as_dry_run(text: str, *, host: str) -> str:
    """serve_pipeline.py commands as a test may run them here: nothing started, GPUs described."""
    lines = []
    for line in text.splitlines():
        if "serve_pipeline.py" in line and not line.lstrip().startswith("#"):
            for flag, value in (("--dry-run", None), ("--host", host),
                                ("--fake-gpus", "test_gpus.yaml")):
                if flag not in line:
                    line += f" {flag}" + (f" {value}" if value else "")
        lines.append(line)
    return "\n".join(lines) + "\n"


def run_until_output_then_interrupt(argv: list[str], workspace: Workspace) -> tuple[int, str, str]:
    """Start a command that runs until Ctrl-C, wait until it has printed, then press Ctrl-C
    (SIGINT to its process group, as a terminal sends it)."""
    out_path, err_path = workspace.path / "interrupt.out", workspace.path / "interrupt.err"
    with out_path.open("w") as out, err_path.open("w") as err:
        proc = subprocess.Popen(argv, cwd=workspace.path, env=workspace.env, stdout=out,
                                stderr=err, start_new_session=True)
        try:
            deadline = time.monotonic() + 30
            while not out_path.read_text().strip() and not err_path.read_text().strip():
                assert proc.poll() is None, f"exited with {proc.returncode} before printing"
                assert time.monotonic() < deadline, "printed nothing within 30 s"
                time.sleep(0.05)
            os.killpg(proc.pid, signal.SIGINT)
            code = proc.wait(timeout=30)
        finally:
            if proc.poll() is None:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait()
    return code, out_path.read_text(), err_path.read_text()

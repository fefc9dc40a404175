"""The README's promises: its marked Python examples run, and its set-up lines are what CI runs."""

import os
import re
import shlex
from pathlib import Path

import pytest
import torch
from typer.testing import CliRunner

from attnkit import models as models_module
from attnkit.cli import app

ROOT = Path(__file__).resolve().parents[1]
README = (ROOT / "README.md").read_text()
HAS_BUNDLED = (models_module.BUNDLED_MODEL / "model_index.json").is_file()

# A Python block runs as a test when the line before its fence is <!-- test --> (or <!-- test: needs-bundled -->).
BLOCK = re.compile(r"<!-- test(?P<tag>: needs-bundled)? -->\n```python\n(?P<code>.*?)```", re.S)
BLOCKS = [(m["code"], bool(m["tag"])) for m in BLOCK.finditer(README)]


def setup_lines():
    first_block = re.search(r"```bash\n(.*?)```", README, re.S)
    assert first_block and README.index("```bash") < README.index("\n## "), "set-up commands must open the README"
    return first_block.group(1).strip().splitlines()


def test_readme_has_runnable_examples():
    assert len(BLOCKS) >= 3


@pytest.mark.parametrize("code, needs_bundled", BLOCKS, ids=[f"block{i}" for i in range(len(BLOCKS))])
def test_readme_example_runs(code, needs_bundled, tmp_path, monkeypatch):
    if needs_bundled and not HAS_BUNDLED:
        pytest.skip("the bundled model has not been exported yet")
    torch.set_num_threads(1)
    monkeypatch.chdir(tmp_path)  # examples may write files
    exec(compile(code, "README.md", "exec"), {"__name__": "readme"})
    written = [p for p in tmp_path.iterdir() if p.suffix == ".png"]
    assert written or "save" not in code


def test_ci_runs_the_readme_test_line_verbatim():
    lines = setup_lines()
    assert len(lines) == 2
    run = (ROOT / ".ci" / "run").read_text().strip().splitlines()
    assert "set -euo pipefail" in run
    assert run[-1] == lines[1]
    assert os.access(ROOT / ".ci" / "run", os.X_OK)
    for line in lines:  # a fresh machine stays lean: torch pinned to the CPU wheel before anything pulls it in
        assert line.index("pip install torch==2.13.0") < line.index("pip install -e")
    assert "pytest" in lines[1] and "ruff check src tests benchmarks" in lines[1]


@pytest.mark.skipif(not HAS_BUNDLED, reason="the bundled model has not been exported yet")
def test_readme_first_command_runs(tmp_path):
    line = setup_lines()[0]
    args = shlex.split(line.split(".venv/bin/attnkit", 1)[1])
    out = tmp_path / "maps"
    args = [a for a in args] + ["--out", str(out), "--threads", "1", "--quiet"]  # the last --out wins
    result = CliRunner().invoke(app, args)
    assert result.exit_code == 0, result.output
    assert (out / "maps.png").is_file() and (out / "record.json").is_file()

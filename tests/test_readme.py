"""The README's promises: its marked Python examples run, and its set-up lines are what CI runs."""

import json
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


def test_every_python_block_runs_or_says_why_not():
    """Before: the "Controllers" block used a `pipe` it never made and was run by no test."""
    for match in re.finditer(r"```python\n", README):
        before = README[: match.start()].rstrip("\n").splitlines()[-1]
        line = README[: match.start()].count("\n") + 1
        assert re.fullmatch(r"<!-- (test(: needs-bundled)?|not run: .+) -->", before), f"README.md:{line}"


# -- the README's shell examples, run through the CLI in this process ------------------------------------------
# Every ```bash block after the set-up lines runs unless the line before it says <!-- shell: not run: why -->.
# Each command gets quick settings (few steps, one thread, no progress bars); paths under outputs/ land in a
# temporary folder, docs/ is the repository's; a hub model becomes --model tiny and --device cuda becomes cpu,
# so the examples run offline on any CPU. An image file the README only names as a stand-in for your own photo
# (giraffe.png, bed.jpg: not in docs/, not written by an earlier command) becomes docs/sample_scene.png. A
# heredoc (cat > jobs.jsonl <<'EOF') writes its file, each JSON job given "steps": 2 unless it has steps.
QUICK = {
    "generate": ["--steps", "2"], "maps": ["--steps", "2"], "invert": ["--steps", "2", "--inner-steps", "1"],
    "edit": ["--steps", "2"], "style": ["--steps", "2"], "consistent": ["--steps", "2"],
    "mutual-edit": ["--steps", "2"],
    "transfer": ["--steps", "2"], "segment": ["--steps", "2"], "batch": [],
    "concepts": ["--steps", "2"], "stable-flow": ["--steps", "2"],
    "rf-invert": ["--steps", "2"], "flow-edit": ["--steps", "2"],
}
TINY = ("tiny", "tiny-sdxl", "tiny-sd3", "tiny-flux")
SAMPLE = ROOT / "docs" / "sample_scene.png"
SHELL = re.compile(r"(?:<!-- (?P<skip>shell: not run: [^\n]+) -->\n)?```bash\n(?P<code>.*?)```", re.S)
HEREDOC = re.compile(r"^cat > (?P<file>\S+) <<'(?P<end>\w+)'\n(?P<body>.*?)^(?P=end)\n", re.S | re.M)


def shell_blocks():
    """(code, skip reason or None, README line) of every bash block but the first (the set-up lines)."""
    blocks = [(m["code"], m["skip"], README[: m.start("code")].count("\n") + 1) for m in SHELL.finditer(README)]
    return blocks[1:]


def heredocs(code):
    """The files a block writes with ``cat > FILE <<'EOF'`` and the block without them."""
    return {m["file"]: m["body"] for m in HEREDOC.finditer(code)}, HEREDOC.sub("", code)


def commands(code):
    """The block's commands: continuation lines joined, comments dropped, each split like a shell would."""
    return [shlex.split(line, comments=True) for line in code.replace("\\\n", " ").splitlines() if line.strip()]


def quick_jobs(body):
    """A JSONL heredoc with quick settings: every job without ``steps`` gets 2."""
    jobs = [json.loads(line) for line in body.splitlines() if line.strip()]
    return "".join(json.dumps({"steps": 2, **job}) + "\n" for job in jobs)


def quick(args, tmp_path):
    """``args`` of one README command made quick and offline (see the comment above)."""
    if args[:3] == ["python", "-m", "attnkit"] or args[0] in (".venv/bin/attnkit",):
        args = ["attnkit", *args[3 if args[0] == "python" else 1:]]
    assert args[0] == "attnkit", f"not an attnkit command: {shlex.join(args)} (mark the block as not run)"
    args = args[1:]
    out = []
    for i, arg in enumerate(args):
        before = args[i - 1] if i else ""
        if arg.startswith("docs/"):
            arg = str(ROOT / arg)
        elif before == "--model" and arg not in TINY:
            arg = "tiny"  # a hub id: no downloads in tests
        elif before == "--device":
            arg = "cpu"
        elif (before != "--out" and Path(arg).suffix.lower() in (".png", ".jpg", ".jpeg")
              and not (tmp_path / arg).exists()):
            arg = str(SAMPLE)  # a stand-in for the reader's own photo
        out.append(arg)
    if not out or out[0].startswith("-"):
        return out  # attnkit --help / --version
    command = out[0]
    assert command in QUICK, f"add quick settings for `attnkit {command}` to QUICK in tests/test_readme.py"
    extra = list(QUICK[command])
    if command == "edit" and "--image" in out and (tmp_path / out[out.index("--image") + 1]).is_dir():
        extra = []  # a saved inversion fixes the steps
    elif command == "edit" and "--image" in out:
        extra += ["--inner-steps", "1"]
    return [*out, *extra, "--quiet", "--threads", "1"]


def test_the_readme_has_shell_examples_and_says_why_any_are_not_run():
    blocks = shell_blocks()
    assert sum(skip is None for _, skip, _ in blocks) >= 3
    for _, skip, line in blocks:
        assert skip is None or len(skip) > len("shell: not run: ") + 10, f"README.md:{line}"


def test_stand_in_photos_become_the_sample_scene(tmp_path):
    (tmp_path / "outputs" / "inv").mkdir(parents=True)
    args = quick(["attnkit", "edit", "a b", "--image", "outputs/inv", "--reference", "bed.jpg", "--out",
                  "outputs/x.png", "--model", "runwayml/stable-diffusion-v1-5"], tmp_path)
    assert args == ["edit", "a b", "--image", "outputs/inv", "--reference", str(SAMPLE), "--out", "outputs/x.png",
                    "--model", "tiny", "--quiet", "--threads", "1"]
    files, rest = heredocs("cat > jobs.jsonl <<'EOF'\n{\"id\": 1}\n{\"id\": 2, \"steps\": 3}\nEOF\nattnkit batch\n")
    assert rest == "attnkit batch\n" and quick_jobs(files["jobs.jsonl"]).splitlines() == [
        '{"steps": 2, "id": 1}', '{"steps": 3, "id": 2}']


@pytest.mark.parametrize("code", [c for c, skip, _ in shell_blocks() if skip is None],
                         ids=[f"README.md:{line}" for _, skip, line in shell_blocks() if skip is None])
def test_readme_shell_example_runs(code, tmp_path, monkeypatch):
    files, code = heredocs(code)
    if not HAS_BUNDLED and any("--model" not in args for args in commands(code)):
        pytest.skip("the bundled model has not been exported yet")
    monkeypatch.chdir(tmp_path)  # outputs/... land here
    for name, body in files.items():
        (tmp_path / name).write_text(quick_jobs(body) if name.endswith(".jsonl") else body)
    for args in commands(code):
        run = quick(args, tmp_path)
        result = CliRunner().invoke(app, run)
        assert result.exit_code == 0, f"{shlex.join(args)}\n{result.output}"
        if "--out" in run:
            out = tmp_path / run[run.index("--out") + 1]
            done = out / ("results.jsonl" if run[0] == "batch" else "record.json")
            assert done.is_file(), shlex.join(args)
        if run and run[0] in ("generate", "maps", "edit") and "--out" not in run:
            assert (tmp_path / "outputs" / run[0] / "record.json").is_file(), shlex.join(args)


def test_the_sample_scene_is_the_held_out_render_the_readme_captions():
    """Before: the README's real-image examples edited a `photo.png` that nobody had."""
    import numpy as np
    from PIL import Image

    from attnkit.bundled.scenes import HELDOUT_SEED_START, render_scene

    scene = render_scene(HELDOUT_SEED_START + 18)  # docs/make_sample_scene.py's seed: held out from training
    with Image.open(SAMPLE) as shipped:
        assert np.array_equal(np.asarray(shipped.convert("RGB")), np.asarray(scene.image.convert("RGB")))
    assert f'docs/sample_scene.png --prompt "{scene.caption}"' in README
    assert "photo.png" not in README


def test_the_readme_lists_the_words_the_bundled_model_knows():
    from attnkit.bundled.scenes import VOCABULARY

    paragraph = README[README.index("**The bundled model's words.**"):].split("\n\n")[0]
    listed = re.search(r"\*a, .*?\*", paragraph, re.S).group(0).strip("*").replace("\n", " ")
    assert sorted(word.strip() for word in listed.split(",")) == sorted(VOCABULARY)

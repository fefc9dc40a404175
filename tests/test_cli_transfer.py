"""The `attnkit transfer` command: the files it promises, record.json, and one-line failures that write nothing."""

from __future__ import annotations

import json
import re

import numpy as np
import pytest
from PIL import Image
from typer.testing import CliRunner

from attnkit.cli import app


def _picture(seed: int, size: tuple[int, int]) -> Image.Image:
    rng = np.random.default_rng(seed)
    return Image.fromarray((rng.random((size[1], size[0], 3)) * 255).astype(np.uint8))


def _invoke(*args):
    return CliRunner().invoke(app, [str(a) for a in args])


CLI_FAST = ["--model", "tiny", "--steps", "4", "--masks", "none", "--threads", "1", "--quiet", "--device", "cpu"]


def test_cli_transfer_writes_strip_output_and_record(tmp_path):
    a, b = tmp_path / "a.png", tmp_path / "b.jpg"
    _picture(0, (40, 32)).save(a)
    _picture(1, (32, 48)).save(b)
    out = tmp_path / "out"
    result = _invoke("transfer", "--structure", a, "--appearance", b, "--prompt", "a red circle", *CLI_FAST,
                     "--out", out)
    assert result.exit_code == 0, result.output
    names = sorted(p.name for p in out.iterdir())
    assert names == ["appearance.png", "appearance_reconstructed.png", "output.png", "record.json", "strip.png",
                     "structure.png", "structure_reconstructed.png"]
    record = json.loads((out / "record.json").read_text())
    assert record["command"] == "transfer" and record["prompt"] == "a red circle"
    assert record["transfer"]["kinds"] == {"structure": "image", "appearance": "image"}
    assert record["transfer"]["masks"] is None and record["transfer"]["steps"] == 4
    with Image.open(out / "strip.png") as strip:
        assert strip.size == (96, 32)


def test_cli_transfer_with_prompts(tmp_path):
    out = tmp_path / "out"
    result = _invoke("transfer", "--structure", "a red circle", "--appearance", "a blue square", *CLI_FAST,
                     "--out", out)
    assert result.exit_code == 0, result.output
    assert (out / "output.png").is_file()


@pytest.mark.parametrize("args, message", [
    (["--structure", "missing.png", "--appearance", "a blue square", "--prompt", "a circle"], "does not exist"),
    (["--structure", "{bad}", "--appearance", "a blue square", "--prompt", "a circle"], "not an image"),
    (["--structure", "a red circle", "--appearance", "a blue square", "--prompt", "a red circle " * 40],
     "too long|tokens"),
    (["--structure", "{img}", "--appearance", "a blue square"], "--prompt is missing"),
    (["--structure", "a red circle", "--appearance", "a blue square", "--masks", "magic"], "--masks"),
    (["--structure", "a red circle", "--appearance", "a blue square", "--skip", "1"], "--skip"),
    (["--structure", "a red circle", "--appearance", "a blue square", "--swap-guidance", "0.5"], "--swap-guidance"),
])
def test_cli_transfer_bad_input_is_one_line_and_writes_nothing(tmp_path, args, message):
    bad, img = tmp_path / "bad.png", tmp_path / "img.png"
    bad.write_bytes(b"garbage")
    _picture(0, (32, 32)).save(img)
    args = [str(a).replace("{bad}", str(bad)).replace("{img}", str(img)) for a in args]
    out = tmp_path / "out"
    result = _invoke("transfer", *args, "--model", "tiny", "--steps", "4", "--quiet", "--out", out)
    assert result.exit_code == 2, result.output
    assert "attnkit: error:" in result.output and len(result.output.strip().splitlines()) == 1
    assert re.search(message, result.output)
    assert not out.exists()

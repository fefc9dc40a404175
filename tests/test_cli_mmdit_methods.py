"""``attnkit concepts`` and ``attnkit stable-flow`` end to end on the tiny MM-DiT pipelines."""

import json

import pytest
from PIL import Image
from typer.testing import CliRunner

from attnkit.cli import app

FAST = ["--steps", "2", "--threads", "1", "--quiet", "--device", "cpu"]
PROMPT = "a red cat wearing sunglasses"


def invoke(*args):
    return CliRunner().invoke(app, [str(a) for a in args])


def files_under(folder):
    return sorted(str(p.relative_to(folder)) for p in folder.rglob("*") if p.is_file())


@pytest.mark.parametrize("model", ["tiny-sd3", "tiny-flux"])
def test_concepts_writes_maps(tmp_path, model):
    out = tmp_path / "c"
    result = invoke("concepts", PROMPT, "-c", "cat", "-c", "sunglasses", "--model", model, *FAST, "--out", out)
    assert result.exit_code == 0, result.output
    assert files_under(out) == ["concepts.png", "concepts/00_cat.png", "concepts/01_sunglasses.png", "image.png",
                                "record.json", "segments.png"]
    record = json.loads((out / "record.json").read_text())
    assert record["command"] == "concepts" and record["concepts"] == ["cat", "sunglasses"]
    assert record["layers"] and record["steps"] == 2


def test_concepts_real_image(tmp_path):
    picture = tmp_path / "in.png"
    Image.new("RGB", (40, 40), (200, 20, 20)).save(picture)
    out = tmp_path / "c"
    result = invoke("concepts", "", "-c", "cat", "-c", "background", "--image", picture, "--blocks", "0,-1",
                    "--model", "tiny-flux", *FAST, "--out", out)
    assert result.exit_code == 0, result.output
    record = json.loads((out / "record.json").read_text())
    assert record["settings"]["real_image"] and record["settings"]["blocks"] == [0, 1]


@pytest.mark.parametrize("args, message", [
    (["-c", "cat", "-c", "cat"], "repeat"),
    (["-c", "cat", "--noise", "0"], "--noise"),
    (["-c", "cat", "--blocks", "x"], "--blocks"),
    (["-c", "cat", "--samples", "0"], "--samples"),
])
def test_concepts_bad_input(tmp_path, args, message):
    result = invoke("concepts", PROMPT, *args, "--model", "tiny-sd3", *FAST, "--out", tmp_path / "c")
    assert result.exit_code == 2 and message in result.output, result.output
    assert not (tmp_path / "c").exists()


def test_mmdit_commands_need_an_mmdit_model(tmp_path, monkeypatch):
    import attnkit.models as models

    result = invoke("concepts", PROMPT, "-c", "cat", "--model", "tiny", *FAST, "--out", tmp_path / "c")
    assert result.exit_code == 2 and "MM-DiT" in result.output, result.output
    # no --model and no bundled MM-DiT beside the bundled model: refused before anything loads
    monkeypatch.setattr(models, "bundled_model_path", lambda: tmp_path / "bundled" / "model")
    for command in (["concepts", PROMPT, "-c", "cat"], ["stable-flow", PROMPT, "--to", "a blue cat"]):
        result = invoke(*command, *FAST, "--out", tmp_path / "c")
        assert result.exit_code == 2 and "needs an MM-DiT model" in result.output, result.output
    assert not (tmp_path / "c").exists()


def test_stable_flow_with_layers_and_vital(tmp_path):
    out = tmp_path / "s"
    result = invoke("stable-flow", "a red cat", "--to", "a blue cat", "--to", "a red cat wearing sunglasses",
                    "--layer", "transformer_blocks.0", "--model", "tiny-flux", *FAST, "--out", out)
    assert result.exit_code == 0, result.output
    assert files_under(out) == ["00_source.png", "01_edit.png", "02_edit.png", "grid.png", "record.json"]
    record = json.loads((out / "record.json").read_text())
    assert record["layers"] == ["transformer_blocks.0"] and record["targets"][0] == "a blue cat"
    out2 = tmp_path / "v"
    result = invoke("stable-flow", "a red cat", "--to", "a blue cat", "--vital", "2", "--model", "tiny-sd3",
                    *FAST, "--out", out2)
    assert result.exit_code == 0, result.output
    vital = json.loads((out2 / "vital_layers.json").read_text())
    record = json.loads((out2 / "record.json").read_text())
    assert len(record["layers"]) == 2 and set(record["layers"]) <= set(vital["scores"])
    assert "vital_layers.json" in record["files"]


def test_stable_flow_bad_input(tmp_path):
    result = invoke("stable-flow", "a red cat", "--to", "a blue cat", "--layer", "nope", "--model", "tiny-sd3",
                    *FAST, "--out", tmp_path / "s")
    assert result.exit_code == 2 and "not a block" in result.output, result.output
    assert not (tmp_path / "s").exists()
    result = invoke("stable-flow", "a red cat", "--to", "a blue cat", "--vital", "0", "--model", "tiny-sd3",
                    *FAST, "--out", tmp_path / "s")
    assert result.exit_code == 2 and "--vital" in result.output

"""``attnkit rf-invert`` and ``attnkit flow-edit`` end to end on the tiny MM-DiT pipelines."""

import json

import pytest
from PIL import Image
from typer.testing import CliRunner

from attnkit.cli import app
from attnkit.flow_inversion import FlowInversion

FAST = ["--steps", "2", "--threads", "1", "--quiet", "--device", "cpu"]
SOURCE, TARGET = "a red circle on a white background", "a blue circle on a white background"


def invoke(*args):
    return CliRunner().invoke(app, [str(a) for a in args])


def files_under(folder):
    return sorted(str(p.relative_to(folder)) for p in folder.rglob("*") if p.is_file())


@pytest.fixture
def picture(tmp_path):
    path = tmp_path / "in.png"
    Image.new("RGB", (40, 48), (200, 20, 20)).save(path)
    return path


@pytest.mark.parametrize("model", ["tiny-sd3", "tiny-flux"])
def test_rf_invert_reconstructs_and_edits(tmp_path, picture, model):
    out = tmp_path / "inv"
    result = invoke("rf-invert", picture, "--prompt", SOURCE, "--solver", "fireflow", "--to", TARGET,
                    "--model", model, *FAST, "--out", out)
    assert result.exit_code == 0, result.output
    assert files_under(out) == ["01_edit.png", "grid.png", "image.png", "inversion.json", "inversion.safetensors",
                                "reconstruction.png", "record.json"]
    record = json.loads((out / "record.json").read_text())
    assert record["command"] == "rf-invert" and record["solver"] == "fireflow" and record["steps"] == 2
    assert record["evaluations"] == {"invert": 3, "reconstruct": 3, "edit": 3}
    assert record["psnr_reconstruction"] > 0 and record["crop"]["original_size"] == [40, 48]
    assert Image.open(out / "reconstruction.png").size == (32, 32)
    inv = FlowInversion.load(out)
    assert inv.solver == "fireflow" and inv.steps == 2 and inv.latents.shape == (3, 4, 16, 16)


def test_flow_edit_writes_the_edit(tmp_path, picture):
    out = tmp_path / "fe"
    result = invoke("flow-edit", picture, SOURCE, "--to", TARGET, "--n-max", "2", "--model", "tiny-sd3", *FAST,
                    "--out", out)
    assert result.exit_code == 0, result.output
    assert files_under(out) == ["01_edit.png", "grid.png", "image.png", "record.json"]
    record = json.loads((out / "record.json").read_text())
    assert record["command"] == "flow-edit" and record["n_max"] == 2 and record["evaluations"] == 2
    assert record["targets"] == [TARGET] and record["target_guidance"] == 13.5


@pytest.mark.parametrize("args, message", [
    (["rf-invert", "{pic}", "--prompt", SOURCE, "--solver", "rk4"], "--solver rk4: use one of"),
    (["rf-invert", "{pic}", "--prompt", SOURCE, "--edit-guidance", "2"], "pass --to as well"),
    (["rf-invert", "{pic}", "--prompt", SOURCE, "--model", "tiny"], "UNet diffusion pipeline"),
    (["flow-edit", "{pic}", SOURCE, "--to", TARGET, "--n-avg", "0"], "--n-avg 0"),
    (["flow-edit", "{pic}", SOURCE, "--to", TARGET, "--n-max", "5"], "n_max=5"),
    (["flow-edit", "missing.png", SOURCE, "--to", TARGET], "missing.png"),
])
def test_bad_input_is_one_line_and_writes_nothing(tmp_path, picture, args, message):
    out = tmp_path / "o"
    args = [str(picture) if a == "{pic}" else a for a in args]
    extra = [] if "--model" in args else ["--model", "tiny-sd3"]
    result = invoke(*args, *extra, *FAST, "--out", out)
    assert result.exit_code == 2, result.output
    assert message in result.output and "Traceback" not in result.output
    assert not out.exists()

"""The command line end to end: the files each command promises, record.json, and clean failures."""

import json
import subprocess
import sys

import numpy as np
import pytest
from PIL import Image
from typer.testing import CliRunner

from attnkit import models as models_module
from attnkit import read_png_metadata
from attnkit.cli import app
from attnkit.viz import enlarge

PROMPT = "a red circle and a blue square on a white background"
FAST = ["--steps", "2", "--threads", "1", "--quiet", "--device", "cpu"]
HAS_BUNDLED = (models_module.BUNDLED_MODEL / "model_index.json").is_file()


def invoke(*args):
    return CliRunner().invoke(app, [str(a) for a in args])


def files_under(folder):
    return sorted(str(p.relative_to(folder)) for p in folder.rglob("*") if p.is_file())


def test_generate_writes_image_and_record(tmp_path):
    out = tmp_path / "gen"
    result = invoke("generate", PROMPT, "--model", "tiny", "--seed", "7", "--guidance", "3", *FAST, "--out", out)
    assert result.exit_code == 0, result.output
    assert files_under(out) == ["image.png", "record.json"]
    record = json.loads((out / "record.json").read_text())
    assert record["command"] == "generate" and record["prompt"] == PROMPT and record["model"] == "tiny"
    assert (record["seed"], record["steps"], record["guidance"]) == (7, 2, 3.0)
    assert (record["device"], record["dtype"]) == ("cpu", "float32")
    assert record["files"] == ["image.png", "record.json"]
    assert set(record["timings"]) == {"load", "generate", "total"}
    assert "attnkit_version" in record
    meta = read_png_metadata(out / "image.png")
    assert (meta["prompt"], meta["seed"], meta["steps"]) == (PROMPT, 7, 2)
    with Image.open(out / "image.png") as image:
        assert image.size == (record["width"], record["height"])


def test_generate_is_reproducible_from_the_seed(tmp_path):
    pixels = []
    for name in ("a", "b"):
        assert invoke("generate", "a red circle", "--model", "tiny", *FAST, "--out", tmp_path / name).exit_code == 0
        with Image.open(tmp_path / name / "image.png") as image:
            pixels.append(np.asarray(image))
    assert np.array_equal(pixels[0], pixels[1])


def test_maps_writes_strip_overlays_self_attention_and_record(tmp_path):
    out = tmp_path / "maps"
    (out / "keep.txt").parent.mkdir(parents=True)
    (out / "keep.txt").write_text("files already in --out stay")
    result = invoke("maps", PROMPT, "--model", "tiny", "--words", "red", "--words", "square", "--self-at", "4,4",
                    *FAST, "--out", out)
    assert result.exit_code == 0, result.output
    expected = ["image.png", "keep.txt", "maps.png", "record.json", "self_attention.png", "words/00_red.png",
                "words/01_square.png"]
    assert files_under(out) == expected
    record = json.loads((out / "record.json").read_text())
    assert record["words"] == ["red", "square"] and record["self_at"] == [4, 4] and record["res"] == 16
    assert sorted(record["files"]) == sorted(f for f in expected if f != "keep.txt")
    with Image.open(out / "image.png") as image, Image.open(out / "words/00_red.png") as red:
        assert red.size == enlarge(image).size  # small images are enlarged to stay readable
    with Image.open(out / "maps.png") as strip:
        assert strip.width > 3 * strip.height // 2  # image + 2 words side by side
    assert read_png_metadata(out / "words/01_square.png")["word"] == "square"


def test_maps_defaults_to_every_word(tmp_path):
    out = tmp_path / "all"
    assert invoke("maps", "a lemon cake", "--model", "tiny-sdxl", *FAST, "--out", out).exit_code == 0
    record = json.loads((out / "record.json").read_text())
    assert record["words"] == ["a", "lemon", "cake"]
    assert record["res"] == 8  # the SDXL-like UNet has cross-attention at 8x8 only: found, not assumed
    assert len(list((out / "words").iterdir())) == 3


@pytest.mark.parametrize("args, message", [
    (["maps", PROMPT, "--words", "dragon"], "'dragon' is not a word of the prompt"),
    (["maps", PROMPT, "--self-at", "99,99"], "outside the"),           # fails after sampling
    (["maps", PROMPT, "--self-at", "middle"], "Y,X"),
    (["generate", " ".join(["red"] * 100)], "tokens long"),
    (["generate", PROMPT, "--dtype", "int8"], "unknown dtype"),
    (["edit", PROMPT, "--to", PROMPT.replace("blue", "green"), "--blend", "green", "--paste-unedited"], "--image"),
    (["edit", PROMPT, "--to", PROMPT.replace("blue", "green"), "--target-uncond", "source"], "'pipeline' or"),
])
def test_bad_input_gives_clear_error_and_writes_nothing(tmp_path, args, message):
    out = tmp_path / "out"
    result = invoke(*args, "--model", "tiny", *FAST, "--out", out)
    assert result.exit_code == 2
    assert "attnkit: error:" in result.stderr and message in result.stderr
    assert not out.exists()


def test_edit_of_a_real_image_inverts_then_edits(tmp_path):
    picture = tmp_path / "in.png"
    Image.fromarray((np.random.default_rng(0).random((40, 48, 3)) * 255).astype(np.uint8)).save(picture)
    out = tmp_path / "out"
    result = invoke("edit", PROMPT, "--to", PROMPT.replace("blue", "green"), "--image", picture, "--method",
                    "negative-prompt", "--target-uncond", "inversion", "--model", "tiny", *FAST, "--out", out)
    assert result.exit_code == 0, result.output
    record = json.loads((out / "record.json").read_text())
    assert record["method"] == "negative-prompt" and record["target_uncond"] == "inversion"
    assert record["guidance"] == 7.5 and record["self"] == 0.5  # the null-text paper's, for real images
    assert {"grid.png", "00_source.png", "record.json"} <= set(files_under(out))


def test_missing_bundled_model_is_explained(tmp_path, monkeypatch):
    monkeypatch.setattr(models_module, "BUNDLED_MODEL", tmp_path / "nowhere")
    result = invoke("generate", PROMPT, *FAST, "--out", tmp_path / "out")
    assert result.exit_code == 2 and "bundled model is missing" in result.stderr and "tiny" in result.stderr
    assert not (tmp_path / "out").exists()


def test_out_must_be_a_folder(tmp_path):
    target = tmp_path / "file.txt"
    target.write_text("x")
    result = invoke("generate", PROMPT, "--model", "tiny", *FAST, "--out", target)
    assert result.exit_code == 2 and "is a file" in result.stderr


def test_python_dash_m_runs_the_cli():
    out = subprocess.run([sys.executable, "-m", "attnkit", "--help"], capture_output=True, text=True, timeout=300)
    assert out.returncode == 0
    assert "generate" in out.stdout and "maps" in out.stdout


@pytest.mark.skipif(not HAS_BUNDLED, reason="the bundled model has not been exported yet")
def test_maps_on_the_bundled_model(tmp_path):
    out = tmp_path / "bundled"
    result = invoke("maps", PROMPT, *FAST, "--out", out)
    assert result.exit_code == 0, result.output
    record = json.loads((out / "record.json").read_text())
    assert record["model"] == "bundled" and record["guidance"] < 7.5
    assert "maps.png" in record["files"]


def test_train_bundled_calls_the_trainer(tmp_path, monkeypatch):
    import attnkit.bundled.train as trainer

    seen = {}
    monkeypatch.setattr(trainer, "train", lambda **kwargs: seen.update(kwargs))
    result = invoke("train-bundled", "--run-dir", tmp_path / "run", "--minutes", "0.5")
    assert result.exit_code == 0, result.output
    assert seen == {"run_dir": tmp_path / "run", "minutes": 0.5, "export_dir": tmp_path / "run" / "model",
                    "n_scenes": 100_000, "lr": 1e-3, "restart_schedule": False, "text_layers": 2, "warm_start": None,
                    "ground_weight": 0.0, "open_color_rate": 0.0, "open_background_rate": 0.0}
    seen.clear()
    result = invoke("train-bundled", "--run-dir", tmp_path / "run", "--open-color-rate", "0.2",
                    "--open-background-rate", "0.25")
    assert result.exit_code == 0, result.output
    assert (seen["open_color_rate"], seen["open_background_rate"]) == (0.2, 0.25)
    seen.clear()
    result = invoke("train-bundled", "--run-dir", tmp_path / "run", "--open-color-rate", "1.5")
    assert result.exit_code == 2 and "probability" in result.output and not seen
    result = invoke("train-bundled", "--run-dir", tmp_path / "run", "--n-scenes", "60000", "--lr", "3e-4",
                    "--restart-schedule", "--text-layers", "0", "--warm-start", tmp_path / "ema.safetensors",
                    "--ground-weight", "0.1")
    assert result.exit_code == 0, result.output
    assert seen["n_scenes"] == 60000 and seen["lr"] == 3e-4 and seen["restart_schedule"] is True
    assert seen["text_layers"] == 0 and seen["warm_start"] == tmp_path / "ema.safetensors"
    assert seen["ground_weight"] == 0.1

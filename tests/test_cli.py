"""The command line end to end: the files each command promises, record.json, and clean failures."""

import json
import os
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
    (["maps", PROMPT, "--self-at", "99,99"], "outside the 16x16 grid"),  # checked before sampling
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
    assert len(result.stderr.strip().splitlines()) == 1  # one line, no traceback
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
    assert files_under(out) == ["00_reconstruction.png", "01_green.png", "grid.png", "input.png", "record.json"]


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
                    "ground_weight": 0.0, "open_color_rate": 0.0, "open_background_rate": 0.0,
                    "bind_weight": 0.0, "coherence_weight": 0.0}
    result = invoke("train-bundled", "--run-dir", tmp_path / "run", "--n-scenes", "60000", "--lr", "3e-4",
                    "--restart-schedule", "--text-layers", "0", "--warm-start", tmp_path / "ema.safetensors",
                    "--ground-weight", "0.1", "--bind-weight", "0.5", "--coherence-weight", "2")
    assert result.exit_code == 0, result.output
    assert seen["n_scenes"] == 60000 and seen["lr"] == 3e-4 and seen["restart_schedule"] is True
    assert seen["text_layers"] == 0 and seen["warm_start"] == tmp_path / "ema.safetensors"
    assert seen["ground_weight"] == 0.1 and seen["bind_weight"] == 0.5 and seen["coherence_weight"] == 2.0
    result = invoke("train-bundled", "--run-dir", tmp_path / "run", "--bind-weight", "-1")
    assert result.exit_code == 2 and "give 0 or more" in result.output
    result = invoke("train-bundled", "--run-dir", tmp_path / "run", "--coherence-weight", "1", "--family", "mmdit")
    assert result.exit_code == 2 and "unet only" in result.output


@pytest.mark.parametrize("model", ["tiny-sd3", "tiny-flux"])
def test_maps_on_tiny_transformer_pipelines(tmp_path, model):
    out = tmp_path / model
    result = invoke("maps", "a red cat wearing sunglasses", "--model", model, *FAST, "--out", out)
    assert result.exit_code == 0, result.output
    assert "words/04_sunglasses.png" in files_under(out)
    record = json.loads((out / "record.json").read_text())
    assert record["model"] == model and record["res"] == 8  # the 8x8 grid of image tokens at 32 px


# -- a new user's first run (issue 12): fast one-line errors, honest output folders, quiet runs ---------------
def never_load(monkeypatch):
    import attnkit.cli as cli

    def refuse(*args, **kwargs):
        raise AssertionError("the model was loaded before the arguments were checked")

    monkeypatch.setattr(cli, "_load", refuse)


def snapshot(folder):
    return {str(p.relative_to(folder)): p.read_bytes() for p in folder.rglob("*") if p.is_file()}


@pytest.mark.parametrize("args, message", [
    (["generate", PROMPT, "--height", "30"], "--height 30: image sizes must be positive multiples of 8"),
    (["generate", PROMPT, "--width", "0"], "--width 0: image sizes must be positive multiples of 8"),
    (["generate", PROMPT, "--steps", "0"], "--steps 0: give from 1 to 1000 denoising steps"),
    (["generate", PROMPT, "--guidance", "nan"], "--guidance nan: give a finite guidance scale"),
    (["generate", PROMPT, "--guidance", "inf"], "--guidance inf: give a finite guidance scale"),
    (["generate", PROMPT, "--threads", "0"], "--threads 0: give a positive number of threads"),
    (["generate", PROMPT, "--dtype", "int8"], "--dtype int8: unknown dtype"),
    (["generate", PROMPT, "--device", "cuda:99"], "device 'cuda:99' is not usable on this machine"),
    (["maps", ""], "the prompt is empty"),
    (["maps", PROMPT, "--cmap", "nosuch"], "use one of matplotlib's: "),
    (["edit", PROMPT, "--to", "a big " + PROMPT, "--kind", "replace"], "use --kind refine (or auto)"),
    (["edit", PROMPT, "--to", PROMPT, "--kind", "swap"], "--kind swap: use replace"),
    (["edit", PROMPT, "--to", PROMPT, "--subtract", "square"], "pass it with --blend"),
    (["edit", PROMPT, "--to", PROMPT, "--blend", "red", "--blend-start", "2"], "--blend-start 2.0: give"),
    (["edit", PROMPT, "--to", " "], "--to ' ' is empty"),
    (["edit", PROMPT, "--to", PROMPT, "--lr", "0.1"], "pass an image"),
    (["invert", "docs/sample_scene.png", "--prompt", PROMPT, "--method", "edict"], "--method edict: use one of"),
    pytest.param(["generate", PROMPT, "--device", "mps"], "device 'mps' is not usable on this machine",
                 marks=pytest.mark.skipif(sys.platform == "darwin", reason="a Mac may have MPS")),
])
def test_argument_errors_are_one_line_before_the_model_loads(tmp_path, monkeypatch, args, message):
    never_load(monkeypatch)
    out = tmp_path / "out"
    result = invoke(*args, "--model", "tiny", "--quiet", "--out", out)  # the checks come before --steps matters
    assert result.exit_code == 2, result.output
    assert result.stderr.startswith("attnkit: error: ") and message in result.stderr, result.stderr
    assert len(result.stderr.strip().splitlines()) == 1
    assert not out.exists()
    if "--cmap" in args:
        assert "viridis" in result.stderr and "inferno" in result.stderr  # names the valid ones


def test_the_res_error_names_the_grids_there_are(tmp_path):
    result = invoke("maps", PROMPT, "--res", "32", "--model", "tiny", *FAST, "--out", tmp_path / "out")
    assert result.exit_code == 2 and "--res 32: this model's cross-attention grids at this size are 8, 16" in \
        result.stderr
    assert not (tmp_path / "out").exists()


def read_only_folder(tmp_path):
    """A folder nobody may write in, root included: chmod for users, the immutable flag for root, /proc as
    the last resort."""
    folder = tmp_path / "locked"
    folder.mkdir()
    if os.geteuid() != 0:
        folder.chmod(0o555)
        return folder, lambda: folder.chmod(0o755)
    if subprocess.run(["chattr", "+i", str(folder)], capture_output=True).returncode == 0:
        return folder, lambda: subprocess.run(["chattr", "-i", str(folder)], check=True)
    from pathlib import Path

    return Path("/proc"), lambda: None


def test_an_unwritable_out_fails_at_once(tmp_path, monkeypatch):
    never_load(monkeypatch)
    folder, unlock = read_only_folder(tmp_path)
    try:
        result = invoke("generate", PROMPT, "--model", "tiny", *FAST, "--out", folder / "out")
        assert result.exit_code == 2 and "cannot write in" in result.stderr, result.output
        assert len(result.stderr.strip().splitlines()) == 1
        assert not (folder / "out").exists()
    finally:
        unlock()


def test_a_reused_out_folder_holds_exactly_what_record_json_lists(tmp_path):
    out = tmp_path / "out"
    assert invoke("maps", PROMPT, "--model", "tiny", *FAST, "--out", out).exit_code == 0  # all 10 words
    (out / "notes.txt").write_text("the user's own file: never touched")
    assert invoke("maps", PROMPT, "--words", "red", "--model", "tiny", *FAST, "--out", out).exit_code == 0
    record = json.loads((out / "record.json").read_text())
    assert files_under(out) == sorted([*record["files"], "notes.txt"])
    assert files_under(out / "words") == ["00_red.png"]
    assert invoke("generate", PROMPT, "--model", "tiny", *FAST, "--out", out).exit_code == 0
    assert files_under(out) == ["image.png", "notes.txt", "record.json"]  # words/ went with its files
    assert not (out / "words").exists()


def test_a_blocked_out_folder_is_refused_before_anything_moves(tmp_path):
    out = tmp_path / "out"
    assert invoke("generate", PROMPT, "--model", "tiny", *FAST, "--out", out).exit_code == 0
    (out / "words").write_text("a file where maps writes a folder")
    before = snapshot(out)
    result = invoke("maps", PROMPT, "--model", "tiny", *FAST, "--out", out)
    assert result.exit_code == 2 and "words is a file where attnkit writes the folder words/" in result.stderr
    assert len(result.stderr.strip().splitlines()) == 1
    assert snapshot(out) == before  # no image.png and maps.png without a record.json


def test_a_failure_while_moving_puts_the_folder_back(tmp_path, monkeypatch):
    import shutil

    out = tmp_path / "out"
    assert invoke("maps", PROMPT, "--words", "red", "--model", "tiny", *FAST, "--out", out).exit_code == 0
    before = snapshot(out)
    real_move, moved = shutil.move, []

    def full_disk(src, dst):
        moved.append(dst)
        if len(moved) == 3:
            raise OSError(28, "No space left on device")
        return real_move(src, dst)

    monkeypatch.setattr(shutil, "move", full_disk)
    result = invoke("maps", PROMPT, "--words", "square", "--model", "tiny", *FAST, "--out", out)
    assert result.exit_code == 2 and "No space left on device" in result.stderr and "left as it was" in \
        result.stderr
    assert len(moved) == 3 and snapshot(out) == before


def test_help_is_plain_complete_and_starts_without_torch():
    code = "import sys, attnkit.cli; print([m for m in ('torch', 'diffusers', 'transformers') if m in sys.modules])"
    loaded = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert loaded.stdout.strip() == "[]", loaded.stdout + loaded.stderr
    text = CliRunner().invoke(app, ["edit", "--help"], terminal_width=80).output
    assert "<bool>" not in text and "…" not in text and "--no-paste-unedited" not in text
    for option in ("--paste-unedited", "--blend-threshold", "--blend-start", "--subtract", "--subtract-threshold",
                   "--target-uncond", "--lr", "--image"):
        assert f"{option} " in text or f"{option}\n" in text, option
    assert max(len(line) for line in text.splitlines()) <= 80
    top = CliRunner().invoke(app, ["--help"], terminal_width=80).output
    for word in ("circle", "outlined", "an", "background", "grey"):  # the bundled model's words
        assert f" {word}" in top
    from attnkit import __version__

    version = invoke("--version")
    assert version.exit_code == 0 and version.output.strip() == f"attnkit {__version__}"


def test_fp16_on_the_cpu_warns_once_and_records_float16(tmp_path):
    out = tmp_path / "fp16"
    result = invoke("generate", PROMPT, "--model", "tiny", "--dtype", "fp16", *FAST, "--out", out)
    assert result.exit_code == 0, result.output
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("attnkit: warning: float16 on the CPU"), result.stderr
    assert json.loads((out / "record.json").read_text())["dtype"] == "float16"


def test_edit_files_are_named_after_what_changed(tmp_path):
    out = tmp_path / "edit"
    source = "a red circle on a white background"
    result = invoke("edit", source, "--to", "a blue circle on a white background", "--to",
                    "a red outlined circle on a white background", "--to", "a red circle", "--model", "tiny", *FAST,
                    "--out", out)
    assert result.exit_code == 0, result.output
    assert files_under(out) == ["00_source.png", "01_blue.png", "02_outlined.png",
                                "03_without_on_a_white_background.png", "grid.png", "record.json"]
    assert read_png_metadata(out / "02_outlined.png")["edited_prompt"] == "a red outlined circle on a white background"


def test_edit_local_blend_options_reach_the_record(tmp_path):
    out = tmp_path / "blend"
    result = invoke("edit", PROMPT, "--to", PROMPT.replace("red", "green"), "--blend", "circle", "--subtract",
                    "square", "--subtract-threshold", "0.6", "--blend-start", "0.2", "--self-res", "8", "--model",
                    "tiny", *FAST, "--out", out)
    assert result.exit_code == 0, result.output
    record = json.loads((out / "record.json").read_text())
    assert record["subtract"] == ["square"] and record["subtract_threshold"] == 0.6
    assert record["blend_start"] == 0.2 and record["self_res"] == 8


def test_edit_reuses_the_folder_attnkit_invert_wrote(tmp_path, monkeypatch):
    import attnkit.inversion as inversion

    picture = tmp_path / "in.png"
    Image.fromarray((np.random.default_rng(3).random((32, 32, 3)) * 255).astype(np.uint8)).save(picture)
    folder = tmp_path / "inv"
    made = invoke("invert", picture, "--prompt", PROMPT, "--inner-steps", "1", "--model", "tiny", *FAST,
                  "--out", folder)
    assert made.exit_code == 0, made.output

    def no_second_inversion(*args, **kwargs):
        raise AssertionError("edit --image FOLDER inverted the image again")

    monkeypatch.setattr(inversion, "invert", no_second_inversion)
    import attnkit.viz as viz

    real_grid, grids = viz.image_grid, []
    monkeypatch.setattr(viz, "image_grid", lambda tiles, captions, **kw: grids.append(captions) or
                        real_grid(tiles, captions, **kw))
    out = tmp_path / "edit"
    target = PROMPT.replace("blue", "green")
    result = invoke("edit", PROMPT, "--to", target, "--image", folder, "--model", "tiny", *FAST, "--out", out)
    assert result.exit_code == 0, result.output
    assert grids == [["input", f"reconstruction: {PROMPT}", target]]  # before: "source" and no input
    assert files_under(out) == ["00_reconstruction.png", "01_green.png", "grid.png", "input.png", "record.json"]
    record = json.loads((out / "record.json").read_text())
    assert record["reused_inversion"] is True and record["steps"] == 2 and record["self_res"] == 32
    with Image.open(out / "grid.png") as grid, Image.open(out / "input.png") as shown:
        assert grid.width > 3 * enlarge(shown).width  # input, reconstruction and the edit side by side
    with Image.open(folder / "image.png") as fitted, Image.open(out / "input.png") as shown:
        assert np.array_equal(np.asarray(fitted), np.asarray(shown))
    wrong = invoke("edit", "a cat", "--to", "a dog", "--image", folder, "--model", "tiny", *FAST, "--out",
                   tmp_path / "wrong")
    assert wrong.exit_code == 2 and "was inverted with the caption" in wrong.stderr
    fixed = invoke("edit", PROMPT, "--to", target, "--image", folder, "--lr", "0.1", "--model", "tiny", *FAST,
                   "--out", tmp_path / "fixed")
    assert fixed.exit_code == 2 and "--lr: the saved inversion" in fixed.stderr and "nothing to invert" in \
        fixed.stderr
    steps = invoke("edit", PROMPT, "--to", target, "--image", folder, "--model", "tiny", "--steps", "5", "--out",
                   tmp_path / "steps")
    assert steps.exit_code == 2 and "has 2 steps" in steps.stderr and not (tmp_path / "steps").exists()
    assert not (tmp_path / "wrong").exists() and not (tmp_path / "fixed").exists()


def test_edit_of_an_image_file_takes_the_learning_rate(tmp_path):
    picture = tmp_path / "in.png"
    Image.fromarray((np.random.default_rng(4).random((32, 32, 3)) * 255).astype(np.uint8)).save(picture)
    out = tmp_path / "out"
    result = invoke("edit", PROMPT, "--to", PROMPT.replace("blue", "green"), "--image", picture, "--inner-steps",
                    "1", "--lr", "0.05", "--model", "tiny", *FAST, "--out", out)
    assert result.exit_code == 0, result.output
    record = json.loads((out / "record.json").read_text())
    assert record["null_text"]["lr"] == 0.05 and record["inner_steps"] == [1, 1]


@pytest.mark.skipif(not HAS_BUNDLED, reason="the bundled model has not been exported yet")
def test_words_the_bundled_model_does_not_know_are_named_once(tmp_path):
    out = tmp_path / "unknown"
    result = invoke("edit", "a cat wearing sunglasses", "--to", "a dog wearing sunglasses", "--to",
                    "a cat wearing 🕶️", *FAST, "--out", out)
    assert result.exit_code == 0, result.output
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("attnkit: warning: the model does not know"), result.stderr
    for word in ("'cat'", "'wearing'", "'sunglasses'", "'dog'", "'🕶️'", "circle", "outlined", "grey"):
        assert word in lines[0]
    known = invoke("generate", "an outlined square", *FAST, "--out", tmp_path / "known")
    assert known.exit_code == 0 and "warning" not in known.stderr

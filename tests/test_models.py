"""load_pipeline: local folders offline, dtype names, pipelines passed through, clear errors; defaults_for."""

import json
import os
import subprocess
import sys

import pytest
import torch
from PIL import Image

from attnkit import AttnkitError, ModelDefaults, defaults_for, load_pipeline
from attnkit import models as models_module
from attnkit.models import parse_dtype
from attnkit.testing import tiny_pipeline


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    torch.set_num_threads(1)
    pipe = tiny_pipeline("sd")
    folder = tmp_path_factory.mktemp("tiny-sd")
    pipe.save_pretrained(folder)
    return pipe, folder


def test_loads_a_local_folder_offline(saved, monkeypatch):
    original, folder = saved
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    pipe = load_pipeline(folder)
    assert type(pipe).__name__ == "StableDiffusionPipeline"
    assert pipe.safety_checker is None  # the folder has none; loading must not complain or add one
    for name, tensor in original.unet.state_dict().items():
        assert torch.equal(pipe.unet.state_dict()[name], tensor), name
    assert pipe.unet.dtype == torch.float32


@pytest.mark.parametrize("name, expected", [("fp16", torch.float16), ("bfloat16", torch.bfloat16),
                                            ("float32", torch.float32), (torch.float16, torch.float16)])
def test_dtype_names(saved, name, expected):
    assert parse_dtype(name) is expected
    pipe = load_pipeline(saved[1], dtype=name)
    assert pipe.unet.dtype == expected and pipe.text_encoder.dtype == expected


def test_unknown_dtype_and_device_are_explained(saved):
    with pytest.raises(AttnkitError, match="unknown dtype 'int8'"):
        load_pipeline(saved[1], dtype="int8")
    with pytest.raises(AttnkitError, match="not usable"):
        load_pipeline(saved[1], device="no-such-device")


def test_pipeline_object_passes_through(saved):
    pipe = tiny_pipeline("sd")
    assert load_pipeline(pipe) is pipe
    moved = load_pipeline(pipe, dtype="fp16", device="cpu")
    assert moved is pipe and pipe.unet.dtype == torch.float16


def test_folder_that_is_not_a_pipeline(saved, tmp_path):
    (tmp_path / "notes.txt").write_text("hello")
    with pytest.raises(AttnkitError, match="not a diffusers pipeline folder"):
        load_pipeline(tmp_path)
    with pytest.raises(AttnkitError, match="not a diffusers pipeline folder"):
        load_pipeline(saved[1] / "unet")  # a model folder, not a pipeline
    with pytest.raises(AttnkitError, match="is not a folder"):
        load_pipeline(tmp_path / "missing" / "folder")


def test_unreachable_hub_id_with_hf_hub_offline(tmp_path):
    # The hub library reads HF_HUB_OFFLINE when imported, so this runs in a fresh interpreter.
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_HOME": str(tmp_path / "hf-home"), "OMP_NUM_THREADS": "1"}
    code = ("from attnkit import load_pipeline\n"
            "try:\n    load_pipeline('attnkit-tests/no-such-model')\n"
            "except Exception as e:\n    print(type(e).__name__, '|', e)\n")
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=300)
    assert out.stdout.startswith("AttnkitError |"), out.stdout + out.stderr
    for hint in ("no-such-model", "no network", "HF_HUB_OFFLINE", "local folder"):
        assert hint in out.stdout


def test_missing_bundled_model_is_explained(monkeypatch, tmp_path):
    monkeypatch.setattr(models_module, "BUNDLED_MODEL", tmp_path / "model")
    with pytest.raises(AttnkitError, match="bundled model is missing"):
        load_pipeline()


def test_defaults_from_attnkit_json(saved, tmp_path):
    pipe, folder = saved
    side = pipe.unet.config.sample_size * pipe.vae_scale_factor
    assert defaults_for(pipe) == ModelDefaults(7.5, 50, side, side)  # no folder: Stable Diffusion's
    copy = tmp_path / "with-defaults"
    pipe.save_pretrained(copy)
    (copy / "attnkit.json").write_text(json.dumps({"guidance_scale": 1.5, "num_inference_steps": 25,
                                                   "null_text_lr": 0.1, "comment": "unknown keys are ignored"}))
    loaded = load_pipeline(copy)
    assert defaults_for(loaded) == ModelDefaults(1.5, 25, side, side, null_text_lr=0.1)
    # null-text inversion takes the model's own learning rate unless options are given
    from attnkit.inversion import NullTextOptions, invert

    picture = Image.new("RGB", (side, side), (200, 30, 30))
    inv = invert(loaded, picture, "a red circle", steps=2, null_text=None, progress=False)
    assert inv.null_text["lr"] == 0.1
    assert inv.guidance == 7.5  # the paper's guidance on every model, not the model's 1.5
    inv = invert(loaded, picture, "a red circle", steps=2, null_text=NullTextOptions(inner_steps=1), progress=False)
    assert inv.null_text["lr"] == 1e-2  # explicit options win: the paper's


@pytest.mark.skipif(not (models_module.BUNDLED_MODEL / "model_index.json").is_file(),
                    reason="the bundled model has not been exported yet")
def test_bundled_model_loads_with_its_defaults():
    pipe = load_pipeline()
    defaults = defaults_for(pipe)
    assert defaults.guidance_scale < 7.5  # the bundled model samples with a low guidance scale
    assert hasattr(pipe, "unet") and hasattr(pipe, "tokenizer")


def test_loads_an_sdxl_folder(tmp_path):
    original = tiny_pipeline("sdxl")
    original.save_pretrained(tmp_path / "xl")
    pipe = load_pipeline(tmp_path / "xl", dtype="bf16")
    assert type(pipe).__name__ == "StableDiffusionXLPipeline"
    assert pipe.unet.dtype == torch.bfloat16 and pipe.text_encoder_2.dtype == torch.bfloat16
    assert pipe.unet.config.addition_embed_type == "text_time"


HAS_BUNDLED = (models_module.BUNDLED_MODEL / "model_index.json").is_file()


@pytest.mark.skipif(not HAS_BUNDLED, reason="the bundled model has not been exported yet")
def test_a_script_loads_and_samples_without_noise():
    """Before: diffusers' five lines about accelerate and transformers' two about torchvision on every run.

    accelerate is hidden (``find_spec`` gives None, as on a plain ``pip install attnkit``): the test extra
    installs it, and with it diffusers has nothing to say anyway."""
    hide = "import sys; sys.modules['accelerate'] = None; "
    code = (hide + "import attnkit; pipe = attnkit.load_pipeline(); pipe.set_progress_bar_config(disable=True); "
            "attnkit.generate(pipe, 'a red circle', steps=1, progress=False)")
    run = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=600,
                         env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert run.returncode == 0, run.stderr
    text = run.stdout + run.stderr.replace("Loading pipeline components", "")
    assert "accelerate" not in text and "torchvision" not in text and "Warning" not in text, text


def test_float16_on_the_cpu_warns_once_in_one_line(saved):
    from attnkit.notices import AttnkitWarning

    with pytest.warns(AttnkitWarning, match="float16 on the CPU") as caught:
        pipe = load_pipeline(saved[1], dtype="fp16", device="cpu")
    assert pipe.unet.dtype == torch.float16
    assert len([w for w in caught if issubclass(w.category, AttnkitWarning)]) == 1


def test_unknown_words_are_named_against_the_models_vocabulary(saved, tmp_path):
    assert models_module.unknown_words(saved[0], "a cat wearing sunglasses") == []  # CLIP reads any word
    folder = tmp_path / "shapes"
    saved[0].save_pretrained(folder)
    (folder / "attnkit.json").write_text(json.dumps({"vocabulary": ["a", "red", "circle", "on"]}))
    pipe = load_pipeline(folder)
    assert defaults_for(pipe).vocabulary == ("a", "red", "circle", "on")
    assert models_module.unknown_words(pipe, ["a red cat,", "a 🕶️ circle", "A RED CIRCLE"]) == ["cat", "🕶️"]
    from attnkit.notices import AttnkitWarning

    with pytest.warns(AttnkitWarning, match="'cat', 'dog'.*It knows only: a red circle on"):
        models_module.warn_unknown_words(pipe, ["a red cat", "a dog"])


@pytest.mark.skipif(not HAS_BUNDLED, reason="the bundled model has not been exported yet")
def test_the_bundled_model_knows_the_shapes_world_words():
    from attnkit.bundled.scenes import VOCABULARY

    pipe = load_pipeline()
    assert defaults_for(pipe).vocabulary == VOCABULARY and "an" in VOCABULARY
    for prompt in ("a circle", "an outlined square", "a red circle and a square",
                   "a red circle and a blue outlined square on a black background"):
        assert models_module.unknown_words(pipe, prompt) == [], prompt
    assert models_module.unknown_words(pipe, "a cat wearing sunglasses") == ["cat", "wearing", "sunglasses"]

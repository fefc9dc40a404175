"""The bundled MM-DiT model: load_pipeline("bundled-mmdit") gives a StableDiffusion3Pipeline that samples 64x64
with 16x16 image->text maps, at its own defaults (no zero T5 tokens) and at the pipeline's (256 of them)."""

import json

import pytest
import torch

import attnkit
from attnkit import models

MODEL = models.BUNDLED_MMDIT
needs_model = pytest.mark.skipif(not (MODEL / "model_index.json").exists(),
                                 reason="bundled MM-DiT model not exported yet")


def test_missing_model_has_a_clear_error(tmp_path, monkeypatch):
    monkeypatch.setattr(models, "BUNDLED_MMDIT", tmp_path / "mmdit")
    with pytest.raises(attnkit.AttnkitError, match="train-bundled --family mmdit"):
        attnkit.load_pipeline("bundled-mmdit")


@needs_model
def test_bundled_mmdit_files():
    size_mb = sum(p.stat().st_size for p in MODEL.rglob("*") if p.is_file()) / 2**20
    assert size_mb <= 30
    assert not list(MODEL.rglob("*.bin")) and not list(MODEL.rglob("*.pt"))  # safetensors only
    index = json.loads((MODEL / "model_index.json").read_text())
    assert index["_class_name"] == "StableDiffusion3Pipeline" and index["text_encoder_3"] == [None, None]


@needs_model
def test_bundled_mmdit_generates_with_maps():
    from diffusers import StableDiffusion3Pipeline

    pipe = attnkit.load_pipeline("bundled-mmdit")
    assert isinstance(pipe, StableDiffusion3Pipeline) and pipe.text_encoder_3 is None
    assert pipe.transformer.config.patch_size == 1 and pipe.transformer.dtype == torch.float32
    defaults = attnkit.defaults_for(pipe)
    assert defaults.height == defaults.width == 64 and defaults.max_sequence_length == 0
    assert defaults.vocabulary is not None and "circle" in defaults.vocabulary
    prompt = "a red circle on a white background"
    store = attnkit.AttentionStore(res=16)
    result = attnkit.generate(pipe, prompt, store, seed=1, steps=3, progress=False)
    assert result.images[0].size == (64, 64)
    maps = store.word_maps(prompt)
    assert maps["circle"].shape == (16, 16) and torch.isfinite(maps["circle"]).all()
    # the pipeline's own default (256 zero T5 tokens) works too: the model was trained on both
    image = pipe(prompt, num_inference_steps=3, guidance_scale=defaults.guidance_scale,
                 generator=torch.Generator().manual_seed(1)).images[0]
    assert image.size == (64, 64)

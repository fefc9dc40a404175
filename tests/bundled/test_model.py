"""The shipped bundled model loads offline as a standard Stable Diffusion folder and generates 64x64."""

import json
from pathlib import Path

import pytest
import torch

MODEL = Path(__file__).resolve().parents[2] / "src" / "attnkit" / "bundled" / "model"


@pytest.mark.skipif(not (MODEL / "model_index.json").exists(), reason="bundled model not exported yet")
def test_bundled_model_generates():
    from diffusers import StableDiffusionPipeline

    defaults = json.loads((MODEL / "attnkit.json").read_text())
    assert defaults["height"] == defaults["width"] == 64
    assert 0 < defaults["guidance_scale"] < 5
    size_mb = sum(p.stat().st_size for p in MODEL.rglob("*") if p.is_file()) / 2**20
    assert size_mb <= 30
    assert not list(MODEL.rglob("*.bin")) and not list(MODEL.rglob("*.pt"))  # safetensors only
    pipe = StableDiffusionPipeline.from_pretrained(MODEL)
    pipe.set_progress_bar_config(disable=True)
    img = pipe("a red circle on a white background", num_inference_steps=4,
               guidance_scale=defaults["guidance_scale"], generator=torch.Generator().manual_seed(0)).images[0]
    assert img.size == (64, 64)

"""The shared generate-and-score helper of the training evaluation and the quality benchmark."""

from pathlib import Path

import pytest
from diffusers import StableDiffusionPipeline

from attnkit.bundled.evaluate import generate_scored
from attnkit.bundled.scenes import ObjectSpec, SceneSpec

MODEL = Path(__file__).resolve().parents[2] / "src" / "attnkit" / "bundled" / "model"


@pytest.mark.skipif(not (MODEL / "model_index.json").exists(), reason="bundled model not exported yet")
def test_generate_scored_reads_attributes_and_localisation():
    pipe = StableDiffusionPipeline.from_pretrained(MODEL)
    pipe.set_progress_bar_config(disable=True)
    specs = [SceneSpec("white", (ObjectSpec("circle", "red", "solid", (32, 32), 16),)),
             SceneSpec("black", (ObjectSpec("square", "blue", "solid", (20, 20), 10),
                                 ObjectSpec("diamond", "yellow", "outlined", (44, 44), 10)))]
    results = generate_scored(pipe, specs, [0, 1], guidance=2.5, steps=8)
    assert [len(r["iou"]["color"]) for r in results] == [1, 2]
    assert [len(r["iou"]["shape"]) for r in results] == [1, 2]
    for r in results:
        assert r["image"].size == (64, 64)
        assert all(0.0 <= v <= 1.0 for kind in ("color", "shape") for v in r["iou"][kind])
    single = results[0]
    assert single["background"] == 1.0 and single["color"] == 1.0  # one big red circle on white: easy
    assert single["iou"]["shape"][0] > 0.3  # its shape word's map lands on it

"""The shared generate-and-score helper of the training evaluation and the quality benchmark."""

from pathlib import Path

import pytest
from diffusers import StableDiffusionPipeline

from attnkit.bundled.evaluate import chosen_values, generate_scored, open_prompts, spread
from attnkit.bundled.scenes import ObjectSpec, Prompt, SceneSpec

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


def test_spread_measures_how_evenly_values_cover_their_support():
    even = spread(["a", "b", "c"] * 4, ["a", "b", "c"])
    assert abs(even["entropy"] - 1.0) < 1e-9 and abs(even["min_share_ratio"] - 1.0) < 1e-9
    one = spread(["a"] * 9, ["a", "b", "c"])
    assert one["entropy"] == 0.0 and one["min_share_ratio"] == 0.0 and one["histogram"] == {"a": 9, "b": 0, "c": 0}
    skewed = spread(["a"] * 6 + ["b"] * 3 + ["c"], ["a", "b", "c"])
    assert 0.0 < skewed["entropy"] < 1.0 and abs(skewed["min_share_ratio"] - 0.3) < 1e-9


def test_open_prompts_leave_one_attribute_open():
    bg, col = open_prompts(range(10_200_000, 10_200_010), "background"), open_prompts(range(10, 20), "color")
    assert all(p.open_background and not p.open_colors and "background" not in p.caption for p in bg)
    assert all(p.open_colors == (0,) and p.spec.objects[0].color not in p.caption.split()[:2] for p in col)
    with pytest.raises(ValueError, match="kind"):
        open_prompts(range(3), "shape")


@pytest.mark.skipif(not (MODEL / "model_index.json").exists(), reason="bundled model not exported yet")
def test_generate_scored_reads_what_an_open_prompt_left_to_the_model():
    pipe = StableDiffusionPipeline.from_pretrained(MODEL)
    pipe.set_progress_bar_config(disable=True)
    spec = SceneSpec("white", (ObjectSpec("circle", "red", "solid", (32, 32), 16),))
    results = generate_scored(pipe, [Prompt(spec, (0,), True)], [0], guidance=2.5, steps=6)
    r = results[0]
    assert r["color"] is None and r["background"] is None  # nothing about them was asked
    assert r["iou"]["color"] == [] and len(r["iou"]["shape"]) == 1  # no colour word to localise
    assert r["chosen_background"] in ("white", "black", "grey")
    assert set(r["chosen_colors"]) <= {0}
    assert chosen_values(results, "background") == [r["chosen_background"]]

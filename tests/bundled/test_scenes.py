"""Tests of the shapes-world scene generator."""

import numpy as np
import pytest
from scipy import ndimage

from attnkit.bundled.scenes import (
    BACKGROUNDS,
    COLORS,
    HELDOUT_SEED_START,
    OPEN_BACKGROUND_RATE,
    OPEN_COLOR_RATE,
    SHAPES,
    TRAIN_SEEDS,
    VOCABULARY,
    ObjectSpec,
    Prompt,
    SceneSpec,
    caption_for,
    recolour_first,
    render_scene,
    render_spec,
    spec_for_seed,
    training_prompt,
)


def test_deterministic_for_a_seed():
    a, b = render_scene(HELDOUT_SEED_START + 3), render_scene(HELDOUT_SEED_START + 3)
    assert a.caption == b.caption
    assert np.array_equal(a.array, b.array)
    assert all(np.array_equal(x.mask, y.mask) for x, y in zip(a.objects, b.objects, strict=True))
    assert not np.array_equal(a.array, render_scene(HELDOUT_SEED_START + 4).array)


def test_masks_match_pixels():
    for seed in range(HELDOUT_SEED_START, HELDOUT_SEED_START + 30):
        sc = render_scene(seed)
        arr = sc.array.astype(int)
        bg = np.array(BACKGROUNDS[sc.background])
        union = np.zeros(arr.shape[:2], bool)
        for obj in sc.objects:
            assert obj.mask.shape == (64, 64) and obj.mask.sum() > 30
            # pixels under the mask (coverage >= 0.5) are closer to the object's colour than to the background
            d_obj = np.abs(arr[obj.mask] - np.array(COLORS[obj.color])).sum(-1)
            d_bg = np.abs(arr[obj.mask] - bg).sum(-1)
            assert (d_obj <= d_bg + 3).all()
            assert not (union & obj.mask).any()
            union |= obj.mask
        # more than two pixels away from every mask there is only background (sharp tips can leave faint pixels)
        far = ~ndimage.binary_dilation(union, iterations=2)
        assert (np.abs(arr[far] - bg).max(-1) <= 1).all()


def test_caption_grammar():
    vocab = set(VOCABULARY)
    for seed in range(HELDOUT_SEED_START, HELDOUT_SEED_START + 200):
        sc = render_scene(seed)
        assert set(sc.caption.split()) <= vocab
        assert sc.caption.endswith(f"on a {sc.background} background")
        assert sc.caption == caption_for(sc.objects, sc.background)
        assert 1 <= len(sc.objects) <= 3
        assert len({o.color for o in sc.objects}) == len(sc.objects)  # distinct colours
        for o in sc.objects:
            assert o.shape in SHAPES and o.color in COLORS
            assert f"a {o.color} outlined {o.shape}" in sc.caption or o.fill == "solid"
            assert f"a {o.color} {o.shape}" in sc.caption or o.fill == "outlined"


def test_spec_edit_renders_exactly():
    sc = render_scene(HELDOUT_SEED_START + 11)
    assert np.array_equal(render_spec(sc.spec).array, sc.array)
    new_color = next(c for c in COLORS if c not in {o.color for o in sc.objects})
    edited = render_spec(sc.spec.with_object(0, color=new_color))
    assert edited.objects[0].color == new_color
    assert np.array_equal(edited.objects[0].mask, sc.objects[0].mask)  # same geometry
    assert new_color in edited.caption


def test_heldout_range_disjoint():
    assert TRAIN_SEEDS.stop <= HELDOUT_SEED_START
    assert HELDOUT_SEED_START not in TRAIN_SEEDS


def test_recolour_first_picks_an_unused_colour_and_the_objects_own_words():
    fills = set()
    for seed in range(HELDOUT_SEED_START, HELDOUT_SEED_START + 40):
        spec = render_scene(seed).spec
        edited, (color_at, shape_at) = recolour_first(spec)
        first = spec.objects[0]
        fills.add(first.fill)
        assert edited.objects[0].color not in {o.color for o in spec.objects}
        assert edited.objects[1:] == spec.objects[1:] and edited.background == spec.background
        words = edited.caption.split()
        assert (words[color_at], words[shape_at]) == (edited.objects[0].color, first.shape)
    assert fills == {"solid", "outlined"}  # both caption forms were checked


def test_grammar_v2_leaves_colours_and_background_open_with_the_right_article():
    spec = SceneSpec("black", (ObjectSpec("circle", "red", "solid", (20, 20), 10),
                               ObjectSpec("square", "blue", "outlined", (44, 44), 10)))
    assert spec.partial_caption() == spec.caption == "a red circle and a blue outlined square on a black background"
    assert spec.partial_caption([0]) == "a circle and a blue outlined square on a black background"
    assert spec.partial_caption([1], open_background=True) == "a red circle and an outlined square"
    assert Prompt(spec, (0, 1), True).caption == "a circle and an outlined square"
    assert Prompt(spec).is_full and not Prompt(spec, open_background=True).is_full
    with pytest.raises(ValueError, match="open_colors"):
        spec.partial_caption([2])


def test_training_prompts_keep_their_scene_and_open_attributes_at_the_chosen_rates():
    vocab = set(VOCABULARY)
    prompts = [training_prompt(seed) for seed in range(3000)]
    assert all(p.spec == spec_for_seed(seed) for seed, p in enumerate(prompts[:50]))  # same scenes as v1
    assert all(set(p.caption.split()) <= vocab for p in prompts)
    n_objects = sum(len(p.spec.objects) for p in prompts)
    color_rate = sum(len(p.open_colors) for p in prompts) / n_objects
    background_rate = np.mean([p.open_background for p in prompts])
    assert abs(color_rate - OPEN_COLOR_RATE) < 0.03 and abs(background_rate - OPEN_BACKGROUND_RATE) < 0.03
    assert training_prompt(5) == training_prompt(5)  # deterministic
    assert all(training_prompt(s, 0.0, 0.0).is_full for s in range(100))  # rates 0: today's grammar
    for p in prompts[:300]:  # every full caption is exactly the v1 caption; open ones drop words only
        words = p.caption.split()
        assert ("background" in words) != p.open_background
        for i, o in enumerate(p.spec.objects):
            assert (o.color in words) != (i in p.open_colors)

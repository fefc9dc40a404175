"""Tests of the shapes-world scene generator."""

import numpy as np
from scipy import ndimage

from attnkit.bundled.scenes import (
    BACKGROUNDS,
    COLORS,
    HELDOUT_SEED_START,
    SHAPES,
    TRAIN_SEEDS,
    VOCABULARY,
    caption_for,
    recolour_first,
    render_scene,
    render_spec,
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

"""The rule-based checker must read the generator's own renders (>= 98% per attribute)."""

import numpy as np

from attnkit.bundled.checker import read_image, score, validate
from attnkit.bundled.scenes import render_scene


def test_checker_accuracy_on_renders():
    acc = validate(range(10_000_000, 10_000_100))
    assert min(acc.values()) >= 0.98, acc


def test_checker_masks_match():
    sc = render_scene(10_000_007)
    r = score(read_image(sc.image), sc.spec)
    for i, obj in enumerate(sc.objects):
        m = r["matches"][i].mask
        inter = np.logical_and(m, obj.mask).sum()
        if obj.fill == "solid":
            assert inter / np.logical_or(m, obj.mask).sum() > 0.8
        else:
            assert inter / obj.mask.sum() > 0.9  # the reading's mask is the hole-filled silhouette


def test_score_of_open_attributes_reports_what_was_chosen():
    checked = 0
    for seed in range(10_000_000, 10_000_060):
        sc = render_scene(seed)
        if len(sc.objects) < 2:
            continue
        reading = read_image(sc.image)
        full = score(reading, sc.spec)
        r = score(reading, sc.spec, open_colors=[0], open_background=True)
        assert r["background"] is None and r["chosen_background"] == sc.background
        assert r["chosen_colors"] == {0: sc.objects[0].color}  # the render's own colour, read back
        assert (r["shape"], r["fill"], r["count"]) == (full["shape"], full["fill"], full["count"])
        assert r["color"] == full["color"] == 1.0  # the prompted colours only
        checked += 1
    assert checked > 20
    everything_open = score(read_image(sc.image), sc.spec, open_colors=range(len(sc.objects)))
    assert everything_open["color"] is None and everything_open["background"] == 1.0


def test_open_colour_matches_by_shape_not_by_the_largest_object():
    from attnkit.bundled.scenes import ObjectSpec, SceneSpec, render_spec

    spec = SceneSpec("white", (ObjectSpec("triangle", "red", "solid", (18, 18), 9),
                               ObjectSpec("square", "blue", "solid", (44, 44), 14)))
    reading = read_image(render_spec(spec).image)
    # the prompt names neither colour: each object is found by its own shape, not by size
    r = score(reading, spec, open_colors=[0, 1])
    assert r["chosen_colors"] == {0: "red", 1: "blue"} and r["shape"] == 1.0

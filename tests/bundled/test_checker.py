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

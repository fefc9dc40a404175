"""A rule-based reader of shapes-world images (generated or rendered): background, objects, attributes.

Pipeline: background = palette colour nearest to the median border pixel; every pixel gets its nearest
palette colour (objects' and backgrounds'; anti-aliased fringes mostly land on a background colour and are
ignored); per object colour, 8-connected components above ``MIN_AREA`` pixels that survive a 4-neighbour
erosion are objects.  Per object:
``fill`` from how much of its hole-filled silhouette its own colour covers, ``shape`` from the silhouette's
bounding-box fill ratio and how its mass splits between top and bottom halves.

Usage::

    from attnkit.bundled.checker import read_image, score
    reading = read_image(image)                 # PIL image or uint8 array (64, 64, 3)
    result = score(reading, scene.spec)         # {"color": 1.0, "shape": 0.5, ...}
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, field

import numpy as np
from PIL import Image
from scipy import ndimage

from .scenes import BACKGROUNDS, COLORS, SceneSpec

MIN_AREA = 20  # pixels; smaller blobs are noise
MIN_CORE = 4  # pixels left after a 4-neighbour erosion; thin lines are fringes, not objects
_CROSS = ndimage.generate_binary_structure(2, 1)
_PALETTE_NAMES = list(COLORS) + [f"bg:{b}" for b in BACKGROUNDS]
_PALETTE = np.array(list(COLORS.values()) + list(BACKGROUNDS.values()), np.float32)


@dataclass
class ObjectReading:
    """One object found in an image."""

    color: str
    shape: str
    fill: str
    mask: np.ndarray = field(repr=False)  # bool (H, W): the filled silhouette
    bbox: tuple[int, int, int, int]  # x0, y0, x1, y1 (exclusive)
    area: int = 0
    features: dict = field(default_factory=dict, repr=False)


@dataclass
class Reading:
    """What :func:`read_image` found: background name and objects (largest first)."""

    background: str
    objects: list[ObjectReading]


def _as_array(img) -> np.ndarray:
    if isinstance(img, Image.Image):
        img = np.asarray(img.convert("RGB"))
    return np.asarray(img)[..., :3].astype(np.float32)


def classify_shape(sil: np.ndarray) -> tuple[str, dict]:
    """Shape name of a filled boolean silhouette (cropped or not) + the features used."""
    ys, xs = np.nonzero(sil)
    y0, y1, x0, x1 = ys.min(), ys.max() + 1, xs.min(), xs.max() + 1
    crop = sil[y0:y1, x0:x1]
    h, w = crop.shape
    area = crop.sum()
    ratio = area / float(h * w)
    # mass in the top half vs total: an upward triangle has ~1/4 of its area above the middle
    top = crop[: h // 2].sum() + (crop[h // 2].sum() * 0.5 if h % 2 else 0.0)
    top_frac = top / float(area)
    # corner emptiness: squares fill their bbox corners; circles/diamonds do not
    feats = {"ratio": float(ratio), "top_frac": float(top_frac), "aspect": float(w / max(h, 1))}
    if ratio > 0.87:
        shape = "square"
    elif ratio > 0.655:
        shape = "circle"
    elif top_frac < 0.38:
        shape = "triangle"
    else:
        shape = "diamond"
    return shape, feats


def read_image(img) -> Reading:
    """Read a 64x64 shapes-world image: ``read_image(scene.image).objects[0].shape``."""
    arr = _as_array(img)
    border = np.concatenate([arr[0], arr[-1], arr[:, 0], arr[:, -1]])
    bg_rgb = np.median(border, axis=0)
    bg_names = list(BACKGROUNDS)
    bg_vals = np.array(list(BACKGROUNDS.values()), np.float32)
    background = bg_names[int(np.argmin(((bg_vals - bg_rgb) ** 2).sum(-1)))]
    dist = ((arr[:, :, None, :] - _PALETTE[None, None]) ** 2).sum(-1)
    label = dist.argmin(-1)
    objects: list[ObjectReading] = []
    struct = np.ones((3, 3), bool)  # 8-connectivity: thin diagonal outlines stay one component
    for ci, cname in enumerate(COLORS):
        cmask = label == ci
        if cmask.sum() < MIN_AREA:
            continue
        comps, n = ndimage.label(cmask, structure=struct)
        sizes = ndimage.sum(cmask, comps, range(1, n + 1))
        for k in np.nonzero(sizes >= MIN_AREA)[0]:
            comp = comps == (k + 1)
            # one-pixel anti-aliasing fringes (e.g. blue on white read as purple) vanish under erosion
            if ndimage.binary_erosion(comp, structure=_CROSS).sum() < MIN_CORE:
                continue
            sil = ndimage.binary_fill_holes(comp)
            coverage = comp.sum() / float(sil.sum())
            fill = "solid" if coverage > 0.87 else "outlined"
            shape, feats = classify_shape(sil)
            feats["coverage"] = float(coverage)
            ys, xs = np.nonzero(sil)
            bbox = (int(xs.min()), int(ys.min()), int(xs.max()) + 1, int(ys.max()) + 1)
            objects.append(ObjectReading(cname, shape, fill, sil, bbox, int(sil.sum()), feats))
    objects.sort(key=lambda o: -o.area)
    return Reading(background, objects)


def score(reading: Reading, spec: SceneSpec, open_colors: Iterable[int] = (), open_background: bool = False
          ) -> dict:
    """Compare a reading with the intended scene, matching objects by colour.

    Returns fractions in [0, 1]: ``background``, ``count`` (exact object count), and per expected object
    ``color`` (an object of that colour was found), ``shape`` and ``fill`` (that object's attributes right;
    a missing object counts as wrong).  Also ``n_expected``/``n_found`` and ``matches`` (index -> reading).

    Grammar v2 (a caption that leaves attributes open): objects in ``open_colors`` are matched among the
    readings no prompted colour claimed (same shape and fill first, then same shape, then the largest), and
    ``color`` counts the prompted colours only (``None`` when every colour is open); with ``open_background``,
    ``background`` is ``None``. What the model chose is in ``chosen_background`` and ``chosen_colors``
    (object index -> colour read).
    """
    open_set = set(open_colors)
    by_color: dict[str, ObjectReading] = {}
    for o in reading.objects:  # largest object of each colour
        by_color.setdefault(o.color, o)
    n = len(spec.objects)
    color = shape = fill = 0
    matches: dict[int, ObjectReading] = {}
    for i, o in enumerate(spec.objects):
        r = None if i in open_set else by_color.get(o.color)
        if r is not None:
            matches[i] = r
            color += 1
    free = [r for r in reading.objects if all(r is not m for m in matches.values())]
    for i in sorted(open_set):
        o = spec.objects[i]
        ranked = sorted(free, key=lambda r, o=o: (r.shape != o.shape, r.fill != o.fill))  # stable: largest first
        if ranked:
            matches[i] = ranked[0]
            free.remove(ranked[0])
    for i, r in matches.items():
        shape += r.shape == spec.objects[i].shape
        fill += r.fill == spec.objects[i].fill
    n_prompted = n - len(open_set)
    return {
        "background": None if open_background else float(reading.background == spec.background),
        "count": float(len(reading.objects) == n),
        "color": color / n_prompted if n_prompted else None,
        "shape": shape / n,
        "fill": fill / n,
        "n_expected": n,
        "n_found": len(reading.objects),
        "matches": matches,
        "chosen_background": reading.background,
        "chosen_colors": {i: matches[i].color for i in sorted(open_set) if i in matches},
    }


def validate(seeds, verbose: bool = False) -> dict:
    """Checker accuracy on ground-truth renders of ``seeds``: ``validate(range(10_000_000, 10_000_500))``."""
    from .scenes import render_scene

    tot = {"background": 0.0, "count": 0.0, "color": 0.0, "shape": 0.0, "fill": 0.0}
    n = 0
    for s in seeds:
        sc = render_scene(s)
        r = score(read_image(sc.image), sc.spec)
        for k in tot:
            tot[k] += r[k]
        n += 1
        if verbose and min(r[k] for k in tot) < 1:
            print(s, sc.caption, [(o.color, o.shape, o.fill, o.features) for o in read_image(sc.image).objects])
    return {k: v / n for k, v in tot.items()}


def mask_iou(a: np.ndarray, b: np.ndarray) -> float:
    """Intersection over union of two boolean masks (0 when both are empty): ``mask_iou(found, truth)``."""
    union = np.logical_or(a, b).sum()
    return float(np.logical_and(a, b).sum() / union) if union else 0.0

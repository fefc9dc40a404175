"""The "shapes world": a seeded, deterministic generator of 64x64 scenes with captions and masks.

Every scene is fully described by a :class:`SceneSpec` (background + objects), so a benchmark can render
"the same scene with the red circle turned blue" exactly with :func:`render_spec`.

Usage::

    from attnkit.bundled.scenes import render_scene, render_spec
    scene = render_scene(10_000_000)          # held-out seed -> Scene(image, objects, caption, ...)
    scene.image.save("scene.png"); print(scene.caption)
    blue = render_spec(scene.spec.with_object(0, color="blue"))

Seed ranges (disjoint by construction):

* ``TRAIN_SEEDS`` = ``range(0, 10_000_000)``: the only seeds the bundled model's training ever renders.
* ``HELDOUT_SEED_START`` = 10_000_000: seeds ``>= 10_000_000`` are never used in training; benchmarks and
  tests draw their scenes from there.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field

import numpy as np
from PIL import Image

SIZE = 64  # image side in pixels
SUPERSAMPLE = 4  # anti-aliasing: render at 4x and box-filter down
OUTLINE_PX = 3.0  # outline thickness in pixels; >= 3 so it survives the 4x downsampling VAE

SHAPES: tuple[str, ...] = ("circle", "square", "triangle", "diamond")
COLORS: dict[str, tuple[int, int, int]] = {
    "red": (230, 40, 40),
    "green": (40, 190, 60),
    "blue": (40, 90, 230),
    "yellow": (240, 220, 40),
    "purple": (160, 60, 210),
}
BACKGROUNDS: dict[str, tuple[int, int, int]] = {
    "white": (255, 255, 255),
    "black": (0, 0, 0),
    "grey": (128, 128, 128),
}
FILLS: tuple[str, ...] = ("solid", "outlined")  # "solid" has no word in the caption

#: Every word the caption grammar can produce ("an" only before "outlined" when the colour is left open).
VOCABULARY: tuple[str, ...] = tuple(
    ["a", "and", "on", "background", "outlined"] + list(COLORS) + list(SHAPES) + list(BACKGROUNDS) + ["an"]
)

#: Grammar v2: how often a training caption leaves an attribute open (per object for the colour). A fifth per
#: colour keeps every colour named in 80%, 64% and 51% of the 1-, 2- and 3-object captions, so the full grammar
#: (and its colour-shape binding) stays most of the data; a quarter for the background, one choice among three
#: values, which the model reads from the whole image rather than from one object (model card).
OPEN_COLOR_RATE = 0.2
OPEN_BACKGROUND_RATE = 0.25

TRAIN_SEEDS = range(0, 10_000_000)
HELDOUT_SEED_START = 10_000_000

# Number of objects: 1 or 2 mostly, 3 rarer.  Half-extent ranges (pixels) per object count, chosen so that
# objects stay big (>= 9 px half-extent: an outlined triangle still has a visible hole) and still fit.
_COUNT_PROBS = {1: 0.35, 2: 0.5, 3: 0.15}
_SIZE_RANGE = {1: (11.0, 20.0), 2: (9.0, 14.0), 3: (9.0, 11.0)}
_GAP = 2.0  # minimum gap in pixels between object bounding boxes


@dataclass(frozen=True)
class ObjectSpec:
    """One object: attributes + geometry (centre ``(x, y)`` and half-extent ``size`` in pixels)."""

    shape: str
    color: str
    fill: str
    center: tuple[float, float]
    size: float


@dataclass(frozen=True)
class SceneSpec:
    """A full scene description; :func:`render_spec` turns it into a :class:`Scene`."""

    background: str
    objects: tuple[ObjectSpec, ...]

    def with_object(self, index: int, **changes: object) -> SceneSpec:
        """Copy with object ``index`` changed, e.g. ``spec.with_object(0, color="blue")``."""
        objs = list(self.objects)
        objs[index] = dataclasses.replace(objs[index], **changes)  # type: ignore[arg-type]
        return SceneSpec(self.background, tuple(objs))

    @property
    def caption(self) -> str:
        return caption_for(self.objects, self.background)

    def partial_caption(self, open_colors: Iterable[int] = (), open_background: bool = False) -> str:
        """The caption with the colour words of objects ``open_colors`` (indices) and, with
        ``open_background``, the background phrase left out: ``spec.partial_caption([0], True)`` ->
        ``"a circle and a blue square"``."""
        return caption_for(self.objects, self.background, open_colors, open_background)


@dataclass(frozen=True)
class Prompt:
    """A scene and the attributes its caption leaves open (grammar v2): what a prompt asks for, and what the
    model must choose. ``Prompt(spec, open_colors=(0,)).caption`` -> ``"a circle on a white background"``."""

    spec: SceneSpec
    open_colors: tuple[int, ...] = ()
    open_background: bool = False

    @property
    def caption(self) -> str:
        return self.spec.partial_caption(self.open_colors, self.open_background)

    @property
    def is_full(self) -> bool:
        return not self.open_colors and not self.open_background


@dataclass
class SceneObject:
    """A rendered object: its attributes and its boolean visibility mask (64x64)."""

    shape: str
    color: str
    fill: str
    center: tuple[float, float]
    size: float
    mask: np.ndarray = field(repr=False)


@dataclass
class Scene:
    """A rendered scene: ``image`` (PIL RGB 64x64), ``objects``, ``background``, ``caption``, ``spec``."""

    objects: list[SceneObject]
    background: str
    caption: str
    image: Image.Image = field(repr=False)
    spec: SceneSpec = field(repr=False)

    @property
    def array(self) -> np.ndarray:
        """The image as a uint8 array (64, 64, 3)."""
        return np.asarray(self.image)


def object_phrase(shape: str, color: str | None, fill: str) -> str:
    """``"a red circle"`` / ``"a blue outlined square"`` (solid has no fill word); ``color=None`` leaves the
    colour open: ``"a circle"`` / ``"an outlined square"``."""
    words = [w for w in (color, "outlined" if fill == "outlined" else None, shape) if w]
    article = "an" if words[0][0] in "aeiou" else "a"
    return " ".join([article, *words])


def caption_for(objects: Sequence, background: str, open_colors: Iterable[int] = (),
                open_background: bool = False) -> str:
    """Caption from the grammar, e.g. ``"a red circle and a blue outlined square on a black background"``.

    ``objects`` is any sequence of things with ``shape``, ``color`` and ``fill`` attributes. Grammar v2 may
    leave attributes open: no colour word for the objects at ``open_colors``, no ``"on a ... background"`` with
    ``open_background``. With neither, the caption is exactly the full grammar's.
    """
    open_set = set(open_colors)
    if not open_set <= set(range(len(objects))):
        raise ValueError(f"open_colors {sorted(open_set)} name objects that the scene (of {len(objects)}) lacks")
    phrases = " and ".join(object_phrase(o.shape, None if i in open_set else o.color, o.fill)
                           for i, o in enumerate(objects))
    return phrases if open_background else f"{phrases} on a {background} background"


def draw_open(rng: np.random.Generator, spec: SceneSpec, color_rate: float = OPEN_COLOR_RATE,
              background_rate: float = OPEN_BACKGROUND_RATE) -> Prompt:
    """Which attributes a training caption leaves open: each object's colour with ``color_rate``, the
    background with ``background_rate``, independently. ``draw_open(np.random.default_rng(0), spec)``"""
    colors = tuple(i for i in range(len(spec.objects)) if rng.random() < color_rate)
    return Prompt(spec, colors, bool(rng.random() < background_rate))


def training_prompt(seed: int, color_rate: float = OPEN_COLOR_RATE,
                    background_rate: float = OPEN_BACKGROUND_RATE) -> Prompt:
    """The training prompt of ``seed`` under grammar v2 (deterministic: its own generator stream, so the scene
    of a seed is the same as under the full grammar). Rates 0 give the full caption."""
    return draw_open(np.random.default_rng([int(seed), 0x0BE4]), spec_for_seed(seed), color_rate, background_rate)


def recolour_first(spec: SceneSpec) -> tuple[SceneSpec, list[int]]:
    """The colour swap that the inversion benchmark and ``docs/make_real_edits.py`` make: ``spec`` with object 0
    in the first colour no object of the scene has, and the word indices of that object's colour and shape words
    in the caption (``"a <colour> [outlined] <shape> ..."``), its local-blend words picked by index because a
    scene may repeat a shape. ``edited, words = recolour_first(scene.spec)``"""
    new = next(c for c in COLORS if c not in {o.color for o in spec.objects})
    return spec.with_object(0, color=new), [1, 2 + (spec.objects[0].fill == "outlined")]


def _depth(shape: str, cx: float, cy: float, s: float, xs: np.ndarray, ys: np.ndarray) -> np.ndarray:
    """Signed distance (pixels) inside the shape's boundary: > 0 inside, exact for the convex shapes here."""
    dx, dy = xs - cx, ys - cy
    if shape == "circle":
        return s - np.sqrt(dx * dx + dy * dy)
    if shape == "square":
        # 0.9: a square of the same half-extent looks much bigger than the other shapes
        return 0.9 * s - np.maximum(np.abs(dx), np.abs(dy))
    if shape == "diamond":
        return (s - (np.abs(dx) + np.abs(dy))) / np.sqrt(2.0)
    if shape == "triangle":
        # apex (cx, cy - s), base corners (cx +- s, cy + s): three half-planes
        inv = 1.0 / np.sqrt(5.0)  # side normals of a slope-2 edge: (2, 1)/sqrt(5)
        base = s - dy
        left = (2.0 * dx + dy + s) * inv  # edge through apex and (cx - s, cy + s)
        right = (-2.0 * dx + dy + s) * inv
        return np.minimum(base, np.minimum(left, right))
    raise ValueError(f"unknown shape {shape!r}")


def _coverage(obj: ObjectSpec) -> np.ndarray:
    """Anti-aliased coverage in [0, 1] of one object on the 64x64 grid (float32)."""
    ss = SUPERSAMPLE
    cov = np.zeros((SIZE, SIZE), np.float32)
    cx, cy = obj.center
    # Only evaluate the object's bounding box (plus a pixel) on the fine grid.
    x0, x1 = max(0, int(cx - obj.size) - 1), min(SIZE, int(np.ceil(cx + obj.size)) + 1)
    y0, y1 = max(0, int(cy - obj.size) - 1), min(SIZE, int(np.ceil(cy + obj.size)) + 1)
    fx = x0 + (np.arange((x1 - x0) * ss, dtype=np.float32) + 0.5) / ss
    fy = y0 + (np.arange((y1 - y0) * ss, dtype=np.float32) + 0.5) / ss
    d = _depth(obj.shape, cx, cy, obj.size, fx[None, :], fy[:, None])
    inside = d >= 0
    if obj.fill == "outlined":
        inside &= d < OUTLINE_PX
    fine = inside.astype(np.float32)
    cov[y0:y1, x0:x1] = fine.reshape(y1 - y0, ss, x1 - x0, ss).mean(axis=(1, 3))
    return cov


def render_spec(spec: SceneSpec) -> Scene:
    """Render a :class:`SceneSpec` exactly (deterministic): ``render_spec(scene.spec) == scene``."""
    img = np.empty((SIZE, SIZE, 3), np.float32)
    img[:] = BACKGROUNDS[spec.background]
    covs = []
    for obj in spec.objects:
        cov = _coverage(obj)
        img = img * (1.0 - cov[..., None]) + np.asarray(COLORS[obj.color], np.float32) * cov[..., None]
        covs.append(cov)
    objects = []
    for i, obj in enumerate(spec.objects):
        vis = covs[i].copy()
        for later in covs[i + 1 :]:  # later objects are drawn on top
            vis *= 1.0 - later
        objects.append(SceneObject(obj.shape, obj.color, obj.fill, obj.center, obj.size, vis >= 0.5))
    image = Image.fromarray(np.clip(np.rint(img), 0, 255).astype(np.uint8), "RGB")
    return Scene(objects, spec.background, spec.caption, image, spec)


def _overlaps(a: tuple[float, float, float], b: tuple[float, float, float]) -> bool:
    (ax, ay, asz), (bx, by, bsz) = a, b
    need = asz + bsz + _GAP
    return abs(ax - bx) < need and abs(ay - by) < need


def random_spec(rng: np.random.Generator) -> SceneSpec:
    """Draw a random :class:`SceneSpec` from ``rng`` (a ``numpy.random.Generator``)."""
    counts = list(_COUNT_PROBS)
    n = int(rng.choice(counts, p=[_COUNT_PROBS[c] for c in counts]))
    background = str(rng.choice(list(BACKGROUNDS)))
    colors = rng.choice(list(COLORS), size=n, replace=False)
    lo, hi = _SIZE_RANGE[n]
    for _attempt in range(200):
        placed: list[tuple[float, float, float]] = []
        for _ in range(n):
            s = float(rng.uniform(lo, hi))
            for _try in range(50):
                margin = s + 1.0
                cx, cy = (float(v) for v in rng.uniform(margin, SIZE - margin, size=2))
                if not any(_overlaps((cx, cy, s), p) for p in placed):
                    placed.append((cx, cy, s))
                    break
            else:
                break
        if len(placed) == n:
            break
        lo, hi = lo, max(lo, hi - 0.5)  # shrink the size range until the objects fit
    objects = tuple(
        ObjectSpec(
            shape=str(rng.choice(SHAPES)),
            color=str(colors[i]),
            fill="outlined" if rng.random() < 0.35 else "solid",
            center=(round(cx, 3), round(cy, 3)),
            size=round(s, 3),
        )
        for i, (cx, cy, s) in enumerate(placed)
    )
    return SceneSpec(background, objects)


def random_scene(rng: np.random.Generator) -> Scene:
    """Draw and render a random scene: ``random_scene(np.random.default_rng(0))``."""
    return render_spec(random_spec(rng))


def spec_for_seed(seed: int) -> SceneSpec:
    """The :class:`SceneSpec` of ``seed`` (deterministic across runs and platforms)."""
    return random_spec(np.random.default_rng([int(seed), 0x5CE4E]))


def render_scene(seed: int) -> Scene:
    """Render the scene of ``seed``: ``render_scene(10_000_000).caption``."""
    return render_spec(spec_for_seed(seed))


def is_heldout(seed: int) -> bool:
    """True for benchmark seeds (never used by training)."""
    return seed >= HELDOUT_SEED_START

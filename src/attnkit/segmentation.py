"""Self-segmentation: segments from self-attention, labels from cross-attention.

    seg = attnkit.segment(pipe, prompt="a red circle and a blue square on a white background", seed=1)
    [(s.label, round(s.score, 2)) for s in seg.segments]   # [("background", 0.12), ("circle", 0.81), ...]
    seg.overlay().save("segments.png")                        # coloured segments + legend over the image
    real = attnkit.segment(pipe, prompt="a red circle on a white background", image="photo.png")

Two ways to cut the self-attention into segments, both on maps averaged over layers, heads and steps by one
running sum per grid size (:class:`~attnkit.store.AttentionStore` with ``combine_layers=True``):

* ``method="kmeans"`` (Patashnik et al., "Localizing Object-level Shape Variations with Text-to-Image
  Diffusion Models", ICCV 2023): the rows of the self-attention matrix at one grid (32x32 for SD1.x at 512 px,
  the largest grid of at most :data:`KMEANS_MAX_SIDE` per side) clustered by scikit-learn's KMeans (fixed seed,
  10 restarts) into ``n_segments`` (default the paper's 5) clusters.
* ``method="merge"`` (Tian et al., "Diffuse, Attend, and Segment", CVPR 2024; DiffSeg): the self-attention of
  every grid aggregated onto the largest one (key maps upsampled bilinearly, query cells repeated, weights
  proportional to the grid side), an anchor grid (16x16 points) whose attention maps absorb every pixel within
  a symmetric-KL threshold, three merging rounds, then DiffSeg's KMeans refinement started from the merged
  maps. The number of segments comes out of the threshold.

Clusters are split into their connected parts on the grid (a cluster may hold two objects far apart).
Labels (Patashnik et al.): each candidate word's cross-attention map (mean of its tokens; the largest
cross-attention grid of at most ``max(16, latent side / 4)``, 16x16 for SD1.x, resized to the segment grid) is
normalised as ``(m - |min m|) / max m``; a part's score for a word is the mean of that map over the part; the
best word names it when its score exceeds ``threshold``, else it is background. Then (``merge_labels``) all
background parts become one segment and parts named by the same word merge where they touch, as the paper's
masks and DiffSeg's semantic step merge by label. Candidate words default to the prompt's words minus
:data:`STOP_WORDS` and the words of a "... background" phrase (no tagger, no download); a repeated word is one
candidate per occurrence (``"circle"``, ``"circle#2"``), each with its own tokens' map.

From the grid to pixels: the one-hot segment map is upsampled bilinearly (soft assignments) and, with
``refine="bilateral"`` (default), filtered by a joint bilateral filter guided by the image (edge-aware:
probabilities spread only between pixels of similar colour), then each pixel takes its most likely segment.

Generated images: the maps come from the generation itself (one pass; the store reads the conditional half).
Real images (``image=``: a path, PIL image or array): ``real="noise"`` (default) runs DiffSeg's single UNet
pass on the encoded image noised to ``timestep``; ``real="invert"`` inverts the image (negative-prompt DDIM
inversion) and reads the maps while regenerating it; an :class:`~attnkit.inversion.Inversion` passed as
``image`` is regenerated the same way. ``benchmarks/segmentation.py`` measures both (README).
"""

from __future__ import annotations

import math
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any, Literal

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

from attnkit.engine import AttnkitError, Layout, control
from attnkit.store import AttentionStore
from attnkit.tokens import word_spans

Method = Literal["kmeans", "merge"]
Refine = Literal["none", "bilateral"]
Real = Literal["noise", "invert"]
METHODS: tuple[str, ...] = ("kmeans", "merge")
REFINEMENTS: tuple[str, ...] = ("none", "bilateral")
REAL_PATHS: tuple[str, ...] = ("noise", "invert")
BACKGROUND = "background"

#: Words never used as labels: articles, prepositions, conjunctions, and "background" itself (a segment that
#: no word claims *is* the background). A small fixed list instead of a part-of-speech tagger (no downloads).
STOP_WORDS = frozenset(
    "a an the this that these those some any one two three and or but nor of on in at to into onto from by "
    "for with without over under above below near next behind beside between inside outside up down off out "
    "is are was were be been being it its their his her my our your there here as than very background".split()
)
KMEANS_MAX_SIDE = 32  # Patashnik et al. cluster SD1.x's 32x32 self-attention (1024 rows) at 512 px
DEFAULT_SEGMENTS = 5  # Patashnik et al.'s k
DEFAULT_THRESHOLD = 0.4
DEFAULT_WINDOW = (0.5, 1.0)  # the second half of the schedule: measured best on the bundled model (README)
DEFAULT_TIMESTEP = 300  # DiffSeg's single pass at t = 300 of 1000
ANCHORS = 16  # DiffSeg's 16x16 anchor grid
MERGE_ROUNDS = 3  # DiffSeg: three merging iterations
KL_SCALE = 0.2  # default merging threshold: this fraction of the mean KL between anchor maps


@dataclass
class Segment:
    """One segment: its index in the label maps, its label (a candidate word, or ``"background"``), the
    winning score, every candidate's score, and its share of the image's pixels."""

    index: int
    label: str
    score: float
    scores: dict[str, float]
    area: float = 0.0
    word_position: int | None = None  # the labelling word's index among the prompt's words
    clusters: list[int] = field(default_factory=list)  # the clusters (before label merging) it holds

    @property
    def is_background(self) -> bool:
        return self.label == BACKGROUND

    def to_dict(self) -> dict[str, Any]:
        return {"index": self.index, "label": self.label, "score": round(self.score, 4),
                "scores": {k: round(v, 4) for k, v in self.scores.items()}, "area": round(self.area, 4),
                "word_position": self.word_position, "clusters": self.clusters}


@dataclass
class Segmentation:
    """What :func:`segment` returns.

    ``label_map`` (H, W) and ``grid_map`` (h, w) hold segment indices (into ``segments``) at image resolution
    and at the attention grid; ``self_attention`` is the aggregated ``(h*w, h*w)`` self-attention matrix that
    was clustered, ``word_maps`` the normalised cross-attention map of every candidate word at the grid,
    ``probabilities`` the per-segment soft assignment at image resolution (after refinement).
    """

    image: Image.Image
    prompt: str
    label_map: np.ndarray
    grid_map: np.ndarray
    segments: list[Segment]
    self_attention: torch.Tensor
    word_maps: dict[str, torch.Tensor]
    probabilities: torch.Tensor
    settings: dict[str, Any] = field(default_factory=dict)
    seconds: dict[str, float] = field(default_factory=dict)

    @property
    def labels(self) -> list[str]:
        return [s.label for s in self.segments]

    def mask(self, label: str | int) -> np.ndarray:
        """Boolean (H, W) mask of a segment index, or of every segment with that label.
        ``seg.mask("circle")``"""
        if isinstance(label, int):
            if not 0 <= label < len(self.segments):
                raise AttnkitError(f"segment {label} does not exist: there are {len(self.segments)} segments")
            return self.label_map == label
        found = [s.index for s in self.segments if s.label == label]
        if not found:
            raise AttnkitError(f"no segment is labelled {label!r}; the labels are: {', '.join(self.labels)}")
        return np.isin(self.label_map, found)

    def overlay(self, alpha: float = 0.55) -> Image.Image:
        """The image with coloured segments over it and a legend (label + score) beside it."""
        from attnkit.viz import segment_overlay

        return segment_overlay(self.image, self.label_map, self.legend(), alpha=alpha)

    def legend(self) -> list[str]:
        """One line per segment: ``"1 – circle 0.81"`` (background segments without a score; segments that
        refinement left without pixels are marked ``(empty)``)."""
        lines = []
        for s in self.segments:
            line = f"{s.index} – {s.label}" if s.is_background else f"{s.index} – {s.label} {s.score:.2f}"
            lines.append(line if s.area > 0 else f"{line} (empty)")
        return lines

    def label_image(self) -> Image.Image:
        """The label map as an image whose pixel value is the segment index: a palette image with the colours
        of :meth:`overlay` (16-bit greyscale beyond 256 segments, which a palette cannot hold)."""
        from attnkit.viz import segment_colors

        if len(self.segments) > 256:
            return Image.fromarray(self.label_map.astype(np.uint16))
        image = Image.fromarray(self.label_map.astype(np.uint8), "P")
        colors = segment_colors(len(self.segments))
        image.putpalette([c for rgb in colors for c in rgb] + [0] * (768 - 3 * len(colors)))
        return image

    def record(self) -> dict[str, Any]:
        """A JSON-ready description: settings, segments with their scores, timings."""
        return {"prompt": self.prompt, "segments": [s.to_dict() for s in self.segments],
                "grid": list(self.grid_map.shape), "size": list(self.label_map.shape),
                "settings": self.settings, "seconds": {k: round(v, 4) for k, v in self.seconds.items()}}


# -- candidate words and their maps --------------------------------------------------------------------------
@dataclass(frozen=True)
class _Candidate:
    name: str  # the word, or "word#k" for its k-th occurrence
    word: str
    position: int
    tokens: tuple[int, ...]


def candidate_words(tokenizer: Any, prompt: str, words: Sequence[str] | None = None) -> list[str]:
    """The words that may name segments: ``words`` (checked against the prompt) or, by default, the prompt's
    words minus :data:`STOP_WORDS`. ``candidate_words(pipe.tokenizer, "a cat on a mat")  # ["cat", "mat"]``"""
    return [c.name for c in _candidates(tokenizer, prompt, words)]


def _candidates(tokenizer: Any, prompt: str, words: Sequence[str] | None) -> list[_Candidate]:
    spans = word_spans(tokenizer, prompt)
    present = {s.word.lower() for s in spans}
    if words is not None:
        if isinstance(words, str):
            words = [words]
        wanted = [w.strip().lower() for w in words]
        if not wanted:
            raise AttnkitError("words=[] leaves nothing to label segments with: pass some of the prompt's words "
                               "or None for its content words")
        missing = [w for w in wanted if w not in present]
        if missing:
            raise AttnkitError(f"candidate word(s) {', '.join(map(repr, missing))} are not in the prompt {prompt!r}; "
                               f"its words are: {', '.join(s.word for s in spans)}")
        chosen = [s for s in spans if s.word.lower() in set(wanted)]
    else:  # content words; the words of a "... background" phrase name the background itself
        bare = [s.word.lower().strip(".,;:!?") for s in spans]
        chosen = [s for i, s in enumerate(spans) if bare[i] not in STOP_WORDS
                  and not (i + 1 < len(bare) and bare[i + 1] == BACKGROUND)]
    seen: dict[str, int] = {}
    out = []
    for s in chosen:
        key = s.word.lower()
        seen[key] = seen.get(key, 0) + 1
        name = s.word if seen[key] == 1 else f"{s.word}#{seen[key]}"
        out.append(_Candidate(name, s.word, s.position, s.tokens))
    return out


def normalized_word_maps(token_maps: torch.Tensor, candidates: Sequence[_Candidate]) -> dict[str, torch.Tensor]:
    """Per candidate: the mean of its tokens' cross-attention maps ``(keys, h, w)``, normalised as in
    Patashnik et al.'s code: ``(m - |min m|) / max m``."""
    out = {}
    for c in candidates:
        m = token_maps[list(c.tokens)].mean(dim=0)
        out[c.name] = (m - m.min().abs()) / m.max().clamp_min(1e-12)
    return out


# -- aggregation ---------------------------------------------------------------------------------------------
def _grid_maps(store: AttentionStore, kind: str) -> dict[tuple[int, int], torch.Tensor]:
    """{(h, w): mean map (h*w, keys)} of the store's first row, one per grid size (combined layers)."""
    out = {}
    for key, mean in store.layer_maps(kind).items():  # type: ignore[arg-type]
        _, h, w = store.layers[key]
        out[(h, w)] = mean[0].reshape(h * w, -1)
    return out


def aggregate_self_attention(maps: dict[tuple[int, int], torch.Tensor], size: tuple[int, int]) -> torch.Tensor:
    """DiffSeg's aggregation onto the ``size`` = (H, W) grid: every grid's key maps upsampled bilinearly and
    renormalised, its query cells repeated, the grids weighted in proportion to their side. ``(H*W, H*W)``.
    Grids whose sides do not divide ``size`` are left out."""
    height, width = size
    total: torch.Tensor | None = None
    weights = 0.0
    for (h, w), m in sorted(maps.items(), reverse=True):
        if h > height or w > width or height % h or width % w:
            continue
        keys = m.reshape(h * w, 1, h, w)
        if (h, w) != size:
            keys = F.interpolate(keys, size=size, mode="bilinear", align_corners=False)
        keys = keys.reshape(h * w, height * width)
        keys = keys / keys.sum(dim=1, keepdim=True).clamp_min(1e-12)
        if (h, w) != size:
            keys = keys.reshape(h, w, -1).repeat_interleave(height // h, 0).repeat_interleave(width // w, 1)
            keys = keys.reshape(height * width, height * width)
        side = max(h, w)
        total = keys * side if total is None else total.add_(keys, alpha=side)
        weights += side
    if total is None:
        raise AttnkitError(f"no self-attention grid divides {height}x{width}: cannot aggregate")
    return total / weights


# -- clustering ----------------------------------------------------------------------------------------------
def kmeans_segments(attention: torch.Tensor, n_segments: int, seed: int = 0) -> np.ndarray:
    """Patashnik et al.: KMeans (``n_init=10``, fixed seed) on the self-attention rows; labels per row."""
    from sklearn.cluster import KMeans

    data = attention.double().numpy()
    return KMeans(n_clusters=n_segments, n_init=10, random_state=seed).fit(data).labels_


def symmetric_kl(x: torch.Tensor, y: torch.Tensor, eps: float = 1e-12) -> torch.Tensor:
    """``(n, m)`` symmetric KL divergences, ``½ KL(x‖y) + ½ KL(y‖x)``, between the rows of ``x`` (n, d) and
    ``y`` (m, d) (distributions), as two matrix products (no (n, m, d) tensor)."""
    x, y = x.clamp_min(eps), y.clamp_min(eps)
    lx, ly = x.log(), y.log()
    self_x = (x * lx).sum(dim=1, keepdim=True)
    self_y = (y * ly).sum(dim=1).unsqueeze(0)
    return 0.5 * (self_x - x @ ly.T + self_y - lx @ y.T)


def anchor_indices(grid: tuple[int, int], points: int = ANCHORS) -> torch.Tensor:
    """Row indices of a ``points`` x ``points`` anchor grid spread evenly over an (h, w) grid (at most one
    anchor per cell)."""
    h, w = grid
    ys = torch.linspace(0, h - 1, min(points, h)).round().long()
    xs = torch.linspace(0, w - 1, min(points, w)).round().long()
    return (ys[:, None] * w + xs[None, :]).flatten()


def merge_segments(attention: torch.Tensor, grid: tuple[int, int], threshold: float, n_segments: int | None = None,
                   anchors: int = ANCHORS, rounds: int = MERGE_ROUNDS, seed: int = 0) -> np.ndarray:
    """DiffSeg's iterative attention merging and KMeans refinement; labels per row of ``attention``.

    Round 1: each anchor's map becomes the mean of every row within ``threshold`` (symmetric KL) of it.
    Later rounds: proposals within ``threshold`` of each other are averaged into one. Finally KMeans, started
    from the proposals, assigns every row. ``n_segments`` (optional) caps the count: the closest pair of
    proposals is merged until it is met."""
    from sklearn.cluster import KMeans

    a = attention.double()
    proposals = a[anchor_indices(grid, anchors)]
    close = (symmetric_kl(proposals, a) < threshold).double()
    proposals = (close @ a) / close.sum(dim=1, keepdim=True).clamp_min(1.0)
    for _ in range(rounds - 1):
        close = symmetric_kl(proposals, proposals) < threshold
        taken = torch.zeros(len(proposals), dtype=torch.bool)
        merged = []
        for i in range(len(proposals)):
            if taken[i]:
                continue
            group = close[i] & ~taken
            group[i] = True
            taken |= group
            merged.append(proposals[group].mean(dim=0))
        proposals = torch.stack(merged)
    while n_segments is not None and len(proposals) > n_segments:
        d = symmetric_kl(proposals, proposals) + torch.eye(len(proposals)) * 1e30
        i, j = divmod(int(d.argmin()), len(proposals))
        keep = [k for k in range(len(proposals)) if k not in (i, j)]
        proposals = torch.cat([proposals[keep], ((proposals[i] + proposals[j]) / 2)[None]])
    if len(proposals) == 1:
        return np.zeros(a.shape[0], dtype=np.int64)
    km = KMeans(n_clusters=len(proposals), init=proposals.numpy(), n_init=1, random_state=seed)
    return km.fit(a.numpy()).labels_


# -- labelling -----------------------------------------------------------------------------------------------
def label_clusters(grid: np.ndarray, word_maps: dict[str, torch.Tensor], threshold: float
                   ) -> list[tuple[str | None, float, dict[str, float]]]:
    """Patashnik et al.'s labels: per cluster id 0..K-1 in ``grid`` (h, w), (best word or None, its score,
    every word's score), the score being the mean of the word's normalised map over the cluster."""
    out = []
    flat = torch.as_tensor(grid).flatten()
    stacked = torch.stack(list(word_maps.values())).flatten(1) if word_maps else None
    for k in range(int(grid.max()) + 1):
        inside = flat == k
        if stacked is None or not inside.any():
            out.append((None, 0.0, {}))
            continue
        scores = stacked[:, inside].mean(dim=1)
        named = dict(zip(word_maps, (float(s) for s in scores), strict=True))
        best = int(scores.argmax())
        word = list(word_maps)[best] if float(scores[best]) > threshold else None
        out.append((word, float(scores[best]), named))
    return out


# -- from the grid to pixels ---------------------------------------------------------------------------------
def upsample_assignments(grid: np.ndarray, count: int, size: tuple[int, int]) -> torch.Tensor:
    """One-hot segment map (h, w) → soft assignments ``(count, H, W)`` by bilinear upsampling."""
    onehot = F.one_hot(torch.as_tensor(grid, dtype=torch.long), count).permute(2, 0, 1).float()
    return F.interpolate(onehot[None], size=size, mode="bilinear", align_corners=False)[0]


def joint_bilateral(probs: torch.Tensor, guide: torch.Tensor, radius: int, sigma_space: float,
                    sigma_color: float = 0.1, iterations: int = 6, max_taps: int = 17) -> torch.Tensor:
    """Joint bilateral filter of soft assignments ``(K, H, W)`` guided by an image ``(3, H, W)`` in [0, 1]:
    each pixel averages its neighbours' assignments within ``radius``, weighted by spatial distance
    (``sigma_space``) and colour difference (``sigma_color``), so probabilities cross no colour edge. At most
    ``max_taps`` taps per side (larger radii are sampled with a stride)."""
    _, height, width = probs.shape
    stride = max(1, math.ceil((2 * radius + 1) / max_taps))
    pad = radius
    guide_p = F.pad(guide[None], (pad, pad, pad, pad), mode="replicate")[0]
    offsets = range(-radius, radius + 1, stride)
    for _ in range(iterations):
        probs_p = F.pad(probs[None], (pad, pad, pad, pad), mode="replicate")[0]
        total = torch.zeros_like(probs)
        norm = torch.zeros(height, width)
        for dy in offsets:
            for dx in offsets:
                shifted = guide_p[:, pad + dy: pad + dy + height, pad + dx: pad + dx + width]
                weight = math.exp(-(dy * dy + dx * dx) / (2 * sigma_space**2)) * torch.exp(
                    -((guide - shifted) ** 2).sum(dim=0) / (2 * sigma_color**2))
                total += weight * probs_p[:, pad + dy: pad + dy + height, pad + dx: pad + dx + width]
                norm += weight
        probs = total / norm
    return probs


def refine_assignments(probs: torch.Tensor, image: Image.Image, cell: float, refine: str) -> torch.Tensor:
    """Apply the chosen refinement; ``cell`` is the size (pixels) of one attention-grid cell."""
    if refine == "none":
        return probs
    guide = torch.from_numpy(np.asarray(image.convert("RGB"), dtype=np.float32) / 255.0).permute(2, 0, 1)
    return joint_bilateral(probs, guide, radius=max(1, round(cell)), sigma_space=max(1.0, cell),
                           sigma_color=0.1, iterations=6)


# -- the entry point -----------------------------------------------------------------------------------------
def self_attention_grids(pipe: Any, height: int, width: int) -> list[tuple[int, int]]:
    """(h, w) of the UNet's self-attention grids for an image of ``height`` x ``width`` pixels, largest first,
    from its config (the attention blocks of the down path and the mid block; the up path mirrors them)."""
    config = pipe.unet.config
    scale = int(getattr(pipe, "vae_scale_factor", 8))
    lh, lw = -(-height // scale), -(-width // scale)
    grids = set()
    for i, kind in enumerate(config.down_block_types):
        if "CrossAttn" in kind:
            grids.add((-(-lh // 2**i), -(-lw // 2**i)))
    if "CrossAttn" in str(config.mid_block_type):
        n = len(config.down_block_types) - 1
        grids.add((-(-lh // 2**n), -(-lw // 2**n)))
    return sorted(grids, reverse=True)


def _kmeans_grid(grids: list[tuple[int, int]], res: int | None) -> tuple[int, int]:
    if res is not None:
        for grid in grids:
            if max(grid) == res:
                return grid
        raise AttnkitError(f"res={res}: this UNet has self-attention grids of "
                           f"{', '.join(f'{h}x{w}' for h, w in grids)} at this image size; pass one of "
                           f"{', '.join(str(max(g)) for g in grids)}")
    fitting = [g for g in grids if max(g) <= KMEANS_MAX_SIDE]
    return fitting[0] if fitting else grids[-1]


def label_grid(grids: list[tuple[int, int]], latent_side: int) -> tuple[int, int]:
    """The cross-attention grid the labels read, among the UNet's ``grids`` (largest first): the largest of at
    most max(16, latent side / 4) (16x16 for SD1.x at 512 px, Patashnik et al.'s), else the smallest."""
    if not grids:
        raise AttnkitError("this UNet has no attention layers to read labels from")
    fitting = [g for g in grids if max(g) <= max(16, latent_side // 4)]
    return fitting[0] if fitting else grids[-1]


def _image_size(pipe: Any, image: Any, height: int | None, width: int | None) -> tuple[int, int]:
    """(height, width) in pixels of the pass: an inversion's own size, else the given or the model's."""
    from attnkit.inversion import Inversion
    from attnkit.models import defaults_for

    if isinstance(image, Inversion):
        width_px, height_px = image.size
        return height_px, width_px
    defaults = defaults_for(pipe)
    return int(height or defaults.height), int(width or defaults.width)


def _resize_maps(maps: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """(C, h, w) maps resized bilinearly to ``size``."""
    if tuple(maps.shape[-2:]) == tuple(size):
        return maps
    return F.interpolate(maps[None], size=size, mode="bilinear", align_corners=False)[0]


@dataclass
class Capture:
    """The attention one pass left in the stores, and the image it belongs to (see :func:`capture`)."""

    image: Image.Image
    prompt: str
    self_store: AttentionStore
    cross_store: AttentionStore
    label_grid: tuple[int, int]
    settings: dict[str, Any] = field(default_factory=dict)
    seconds: float = 0.0


def capture(pipe: Any, prompt: str, image: Any = None, *, self_res: int | None = None,
            window: tuple[float, float] | None = DEFAULT_WINDOW, real: Real = "noise",
            timestep: int = DEFAULT_TIMESTEP, seed: int = 0, steps: int | None = None, guidance: float | None = None,
            height: int | None = None, width: int | None = None, progress: bool = True) -> Capture:
    """Run the pass whose attention :func:`segment` clusters: generate ``prompt`` (``image=None``), or read a
    real image (a loaded PIL image or an :class:`~attnkit.inversion.Inversion`). Self-attention is summed at
    ``self_res`` (down and up layers, Patashnik et al.) or, with ``self_res=None``, at every grid (DiffSeg);
    cross-attention at the grid the labels read (:func:`label_grid`).
    ``capture(pipe, "a red circle on a white background", seed=1)``"""
    from attnkit.inversion import Inversion

    start = time.perf_counter()
    height, width = _image_size(pipe, image, height, width)
    latent_side = max(height, width) // int(getattr(pipe, "vae_scale_factor", 8))
    labels_at = label_grid(self_attention_grids(pipe, height, width), latent_side)
    noised = image is not None and real == "noise" and not isinstance(image, Inversion)
    span = None if noised else window  # one noised pass has no steps to choose from
    if self_res is not None:
        self_store = AttentionStore(kinds="self", res=self_res, places=("down", "up"), steps=span,
                                    combine_layers=True)
    else:
        self_store = AttentionStore(kinds="self", res=None, steps=span, combine_layers=True)
    cross_store = AttentionStore(kinds="cross", res=max(labels_at), steps=span, combine_layers=True)
    settings: dict[str, Any] = {"window": list(window) if span else None, "seed": seed}
    if image is None:
        from attnkit.sampling import generate

        result = generate(pipe, prompt, self_store, cross_store, seed=seed, steps=steps, guidance=guidance,
                          height=height, width=width, progress=progress)
        picture = result.images[0]
        settings.update(source="generated", steps=result.steps, guidance=result.guidance)
    elif noised:
        picture = _noised_pass(pipe, prompt, image, self_store, cross_store, timestep, seed, height, width)
        settings.update(source="real", real="noise", timestep=timestep)
    else:
        from attnkit.inversion import generate_from, invert

        inversion = image if isinstance(image, Inversion) else invert(
            pipe, image, prompt, method="negative-prompt", steps=steps, progress=progress)
        rebuilt = generate_from(pipe, inversion, None, self_store, cross_store, progress=progress)
        picture = inversion.image if inversion.image is not None else rebuilt.images[0]
        settings.update(source="real", real="invert", steps=inversion.steps, inversion=inversion.method)
    return Capture(picture, prompt, self_store, cross_store, labels_at, settings, time.perf_counter() - start)


def default_kl_threshold(attention: torch.Tensor, anchors: torch.Tensor, scale: float = KL_SCALE) -> float:
    """The merging threshold when none is given: ``scale`` times the mean symmetric KL between the anchors'
    maps. DiffSeg's fixed 0.9-1.1 fit SD1.x's 64x64 maps (4096 keys); on the bundled model's flatter 16x16 maps
    (256 keys) pixels of one object are ~0.02 apart and of different objects ~0.2, so a fixed value does not
    carry over between models, while a fraction of the image's own spread does (0.2 of the mean: the best of
    the fractions and fixed values tried on the development scenes, README)."""
    d = symmetric_kl(attention[anchors].double(), attention[anchors].double())
    off = d[~torch.eye(len(anchors), dtype=torch.bool)]
    return float(scale * off.mean()) if len(off) else 0.0


def _check_options(method: str, refine: str, real: str, threshold: float, n_segments: int | None,
                   anchors: int, timestep: int) -> None:
    if method not in METHODS:
        raise AttnkitError(f"unknown method {method!r}: use 'kmeans' (Patashnik et al.) or 'merge' (DiffSeg)")
    if refine not in REFINEMENTS:
        raise AttnkitError(f"unknown refine {refine!r}: use {' or '.join(map(repr, REFINEMENTS))}")
    if real not in REAL_PATHS:
        raise AttnkitError(f"unknown real={real!r}: use 'noise' (one noised UNet pass, DiffSeg) or 'invert'")
    if isinstance(threshold, bool) or not (isinstance(threshold, (int, float)) and 0.0 <= threshold <= 1.0):
        raise AttnkitError(f"threshold must be a number from 0 to 1 (a normalised attention score), got {threshold!r}")
    if n_segments is not None and (isinstance(n_segments, bool) or not isinstance(n_segments, int) or n_segments < 2):
        raise AttnkitError(f"n_segments={n_segments!r}: give at least 2 segments (or None for the default)")
    if isinstance(anchors, bool) or not isinstance(anchors, int) or anchors < 1:
        raise AttnkitError(f"anchors={anchors!r}: give a positive number of anchor points per side")
    if timestep < 0:
        raise AttnkitError(f"timestep must be >= 0, got {timestep}")


def segment(pipe: Any, prompt: str | None = None, image: Any = None, n_segments: int | None = None,
            method: Method = "kmeans", *, words: Sequence[str] | None = None,
            threshold: float = DEFAULT_THRESHOLD, res: int | None = None,
            window: tuple[float, float] | None = DEFAULT_WINDOW, kl_threshold: float | None = None,
            anchors: int = ANCHORS, refine: Refine = "bilateral", merge_labels: bool = True,
            real: Real = "noise", timestep: int = DEFAULT_TIMESTEP, seed: int = 0, steps: int | None = None,
            guidance: float | None = None, height: int | None = None, width: int | None = None,
            progress: bool = True) -> Segmentation:
    """Segment a generated image (``image=None``: ``prompt`` is generated from ``seed``) or a real one
    (``image``: a path, PIL image, array or :class:`~attnkit.inversion.Inversion`) into labelled segments.

    ``n_segments``: clusters for ``"kmeans"`` (default 5) or a cap for ``"merge"`` (default none: the
    ``kl_threshold`` decides). ``res``: the kmeans grid side (default the largest of at most 32).
    ``window``: the step window whose attention is averaged (fractions of the schedule; ``None``: all steps).
    ``words``: candidate labels (default the prompt's content words); ``threshold``: the score a word needs to
    name a segment. ``refine``: ``"bilateral"`` (image-guided) or ``"none"``. ``real``/``timestep``: how a real
    image's maps are read (module docstring). The pipeline is left as it was (hooks removed, also on errors).

        seg = segment(pipe, prompt="a red circle and a blue square on a white background", seed=3)
        seg = segment(pipe, prompt="a red circle on a white background", image="scene.png", method="merge")
    """
    from attnkit.inversion import Inversion, check_prompt

    if getattr(pipe, "unet", None) is None:
        raise AttnkitError(f"segment needs a UNet pipeline (Stable Diffusion 1.x/2.x, SDXL); "
                           f"{type(pipe).__name__} has none")
    if isinstance(image, Inversion):
        if prompt is not None and prompt != image.prompt:
            raise AttnkitError(f"the inversion was made for {image.prompt!r}, not {prompt!r}: leave prompt out "
                               "(the inversion's own is used) or invert the image with this prompt")
        prompt = image.prompt
    if prompt is None:
        raise AttnkitError("no prompt given: pass prompt='...' (the caption to generate, or the real image's)")
    check_prompt(pipe, prompt)
    _check_options(method, refine, real, threshold, n_segments, anchors, timestep)
    candidates = _candidates(pipe.tokenizer, prompt, words)
    loaded = image
    if image is not None and not isinstance(image, Inversion):
        from attnkit.images import load_image

        loaded = load_image(image)  # an unreadable file fails here, before any model call
    height_px, width_px = _image_size(pipe, image, height, width)
    grids = self_attention_grids(pipe, height_px, width_px)
    if not grids:
        raise AttnkitError("this UNet has no self-attention layers to segment with")
    grid = _kmeans_grid(grids, res) if method == "kmeans" else grids[0]
    cells = grid[0] * grid[1]
    if n_segments is not None and n_segments > cells:
        raise AttnkitError(f"n_segments={n_segments} is more than the {grid[0]}x{grid[1]} attention grid has "
                           f"pixels ({cells}): ask for at most {cells}")
    captured = capture(pipe, prompt, loaded, self_res=max(grid) if method == "kmeans" else None, window=window,
                       real=real, timestep=timestep, seed=seed, steps=steps, guidance=guidance,
                       height=height_px, width=width_px, progress=progress)
    return segment_capture(captured, candidates, method=method, grid=grid, n_segments=n_segments,
                           threshold=threshold, kl_threshold=kl_threshold, anchors=anchors, refine=refine,
                           merge_labels=merge_labels)


def segment_capture(captured: Capture, candidates: Sequence[_Candidate], *, method: Method, grid: tuple[int, int],
                    n_segments: int | None = None, threshold: float = DEFAULT_THRESHOLD,
                    kl_threshold: float | None = None, anchors: int = ANCHORS, refine: Refine = "bilateral",
                    merge_labels: bool = True) -> Segmentation:
    """Cluster, label and upsample the attention of one :func:`capture` (the work :func:`segment` does
    after its pass; benchmarks call it to compare settings on one pass)."""
    start = time.perf_counter()
    seconds = {"attention": captured.seconds}
    settings: dict[str, Any] = {**captured.settings, "method": method, "n_segments": n_segments,
                                "res": max(grid), "grid": list(grid), "threshold": threshold,
                                "words": [c.name for c in candidates], "refine": refine,
                                "merge_labels": merge_labels}
    maps = _grid_maps(captured.self_store, "self")
    if method == "kmeans":
        if grid not in maps:
            raise AttnkitError(f"no {grid[0]}x{grid[1]} self-attention was stored (stored: "
                               f"{', '.join(f'{h}x{w}' for h, w in maps) or 'nothing'})")
        attention = maps[grid]
        k = n_segments or DEFAULT_SEGMENTS
        settings["n_segments"] = k
        clusters = kmeans_segments(attention, k, seed=0)
    else:
        attention = aggregate_self_attention(maps, grid)
        points = anchor_indices(grid, anchors)
        tau = default_kl_threshold(attention, points) if kl_threshold is None else float(kl_threshold)
        settings.update(kl_threshold=tau, anchors=anchors)
        clusters = merge_segments(attention, grid, tau, n_segments, anchors)
    cluster_grid = split_components(np.asarray(clusters).reshape(grid))
    seconds["cluster"] = time.perf_counter() - start

    t = time.perf_counter()
    settings["label_res"] = max(captured.label_grid)
    token_maps = captured.cross_store.maps("cross", res=max(captured.label_grid))[0].permute(2, 0, 1)
    word_maps = normalized_word_maps(_resize_maps(token_maps, grid), candidates)
    segments, grid_map = _labelled_segments(cluster_grid, word_maps, candidates, threshold, merge_labels)
    seconds["label"] = time.perf_counter() - t

    t = time.perf_counter()
    picture = captured.image
    probs = upsample_assignments(grid_map, len(segments), (picture.height, picture.width))
    probs = refine_assignments(probs, picture, cell=picture.height / grid[0], refine=refine)
    label_map = probs.argmax(dim=0).numpy()
    for s in segments:
        s.area = float((label_map == s.index).mean())
    seconds["pixels"] = time.perf_counter() - t
    seconds["total"] = captured.seconds + time.perf_counter() - start
    return Segmentation(image=picture, prompt=captured.prompt, label_map=label_map, grid_map=grid_map,
                        segments=segments, self_attention=attention.float(), word_maps=word_maps,
                        probabilities=probs, settings=settings, seconds=seconds)


def _labelled_segments(cluster_grid: np.ndarray, word_maps: dict[str, torch.Tensor],
                       candidates: Sequence[_Candidate], threshold: float, merge_labels: bool
                       ) -> tuple[list[Segment], np.ndarray]:
    """Label the clusters, merge those with the same label (``merge_labels``) and order the segments:
    background first, then the labelled ones in prompt order. Returns the segments and the grid map.

    Background clusters all merge into one segment. Clusters named by the same word merge only where they
    touch (8-neighbours on the grid): one object cut in two becomes one segment again, while two objects that
    one word's attention reaches both stay two segments with the same label."""
    named = label_clusters(cluster_grid, word_maps, threshold)
    position = {c.name: c.position for c in candidates}
    parent = list(range(len(named)))

    def root(k: int) -> int:
        while parent[k] != k:
            parent[k] = parent[parent[k]]
            k = parent[k]
        return k

    if merge_labels:
        touching = _touching_pairs(cluster_grid)
        for a in range(len(named)):
            for b in range(a + 1, len(named)):
                same = named[a][0] == named[b][0]
                if same and (named[a][0] is None or (a, b) in touching):
                    parent[root(b)] = root(a)
    groups: dict[int, list[int]] = {}
    for k in range(len(named)):
        groups.setdefault(root(k), []).append(k)

    def order(members: list[int]) -> tuple[bool, int, int]:
        word = named[members[0]][0]
        return (word is not None, position[word] if word else 0, members[0])

    segments: list[Segment] = []
    remap = np.zeros(len(named), dtype=np.int64)
    for index, members in enumerate(sorted(groups.values(), key=order)):
        remap[members] = index
        word = named[members[0]][0]
        sizes = [int((cluster_grid == m).sum()) for m in members]
        scores = {name: float(np.average([named[m][2].get(name, 0.0) for m in members], weights=sizes))
                  for name in word_maps}
        best = scores[word] if word else max(scores.values(), default=0.0)
        segments.append(Segment(index=index, label=word or BACKGROUND, score=best, scores=scores,
                                word_position=position[word] if word else None, clusters=members))
    return segments, remap[cluster_grid]


def split_components(grid: np.ndarray) -> np.ndarray:
    """Each cluster of the (h, w) grid split into its 8-connected parts, renumbered 0..K-1: KMeans on attention
    rows may put two objects far apart into one cluster (a big background takes the other clusters), and
    labelling must see them apart."""
    from scipy import ndimage

    out = np.zeros_like(grid)
    count = 0
    for k in np.unique(grid):
        parts, n = ndimage.label(grid == k, structure=np.ones((3, 3), dtype=bool))
        out[parts > 0] = parts[parts > 0] - 1 + count
        count += n
    return out


def _touching_pairs(grid: np.ndarray) -> set[tuple[int, int]]:
    """Pairs (a < b) of cluster ids that are 8-neighbours somewhere on the grid."""
    pairs: set[tuple[int, int]] = set()
    h, w = grid.shape
    for dy, dx in ((0, 1), (1, 0), (1, 1), (1, -1)):  # cell (y, x) against (y + dy, x + dx)
        a = grid[: h - dy, max(0, -dx): w - max(0, dx)]
        b = grid[dy:, max(0, dx): w - max(0, -dx)]
        differ = a != b
        for x, y in zip(a[differ].tolist(), b[differ].tolist(), strict=True):
            pairs.add((min(x, y), max(x, y)))
    return pairs


@torch.no_grad()
def _noised_pass(pipe: Any, prompt: str, image: Image.Image, self_store: AttentionStore,
                 cross_store: AttentionStore, timestep: int, seed: int, height: int | None,
                 width: int | None) -> Image.Image:
    """DiffSeg's real-image path: the encoded image noised to ``timestep`` (noise from ``seed``), one
    conditional UNet pass under the stores. Returns the image fitted to the model's size."""
    from diffusers import DDIMScheduler

    from attnkit.images import fit_image
    from attnkit.inversion import _predict, encode_image, encode_text
    from attnkit.models import defaults_for

    total = int(pipe.scheduler.config.num_train_timesteps)
    if timestep >= total:
        raise AttnkitError(f"timestep {timestep} is past the model's {total} training timesteps: give 0..{total - 1}")
    defaults = defaults_for(pipe)
    height, width = int(height or defaults.height), int(width or defaults.width)
    fitted, _ = fit_image(image, width, height)
    x0 = encode_image(pipe, fitted)
    text = encode_text(pipe, prompt, height, width)
    alpha = DDIMScheduler.from_config(pipe.scheduler.config).alphas_cumprod[timestep]
    noise = torch.randn(x0.shape, generator=torch.Generator("cpu").manual_seed(seed))
    noisy = alpha.sqrt() * x0 + (1 - alpha).sqrt() * noise.to(x0)
    with control(pipe, self_store, cross_store, layout=Layout(prompts=1, cfg=False)) as ctl:
        ctl.set_step(0, 1)
        _predict(pipe, text, noisy, timestep, text.cond, text.pooled)
    return fitted

"""Generate held-out prompts with the bundled model and score them: checker attributes + attention IoU.

Shared by the training-time evaluation (``train.py``) and ``benchmarks/bundled_quality.py``, so both
measure the same thing. Localisation: each object's colour and shape word get their cross-attention map
(16x16, mean over heads, layers and steps), upsampled to 64x64 and thresholded at 0.5 x its maximum; the IoU
with the object's mask as the checker found it in the image (0 when the checker did not find the object).

Usage::

    results = generate_scored(pipe, [spec_for_seed(s) for s in seeds], seeds, guidance=2.5, steps=25)
    results[0]["color"], results[0]["iou"]["shape"]
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from attnkit.engine import control
from attnkit.store import AttentionStore

from .checker import mask_iou, read_image, score
from .scenes import SIZE, Prompt, SceneSpec, spec_for_seed
from .tokenizer import object_word_tokens

IOU_WORDS = ("color", "shape")


def _as_prompt(p: SceneSpec | Prompt) -> Prompt:
    return p if isinstance(p, Prompt) else Prompt(p)


@torch.no_grad()
def generate_scored(pipe: Any, specs: Sequence[SceneSpec | Prompt], seeds: Sequence[int], guidance: float,
                    steps: int, **call_kwargs: Any) -> list[dict]:
    """One image per spec or :class:`Prompt` (generator seeded from ``seeds``); per image:
    :func:`checker.score`'s dict plus ``"image"`` and ``"iou"`` = ``{"color": [per object with a colour word],
    "shape": [per object]}``. ``call_kwargs`` go to the pipeline call (the MM-DiT model's
    ``max_sequence_length``)."""
    prompts = [_as_prompt(p) for p in specs]
    store = AttentionStore(kinds="cross", res=16)  # conditional half, summed over layers and steps
    gens = [torch.Generator().manual_seed(int(s)) for s in seeds]
    with control(pipe, store):
        images = pipe([p.caption for p in prompts], num_inference_steps=steps, guidance_scale=guidance,
                      generator=gens, height=SIZE, width=SIZE, **call_kwargs).images
    maps = store.maps("cross", res=16).permute(0, 3, 1, 2)  # (B, tokens, 16, 16)
    maps = F.interpolate(maps.float(), size=(SIZE, SIZE), mode="bilinear", align_corners=False).numpy()
    out = []
    for b, (img, prompt) in enumerate(zip(images, prompts, strict=True)):
        r = score(read_image(img), prompt.spec, prompt.open_colors, prompt.open_background)
        r["image"] = img
        r["iou"] = {k: [] for k in IOU_WORDS}
        for oi, positions in enumerate(object_word_tokens(pipe.tokenizer, prompt)):
            found = r["matches"].get(oi)
            for kind in IOU_WORDS:
                if not positions[kind]:
                    continue  # an open colour has no word to localise
                if found is None:
                    r["iou"][kind].append(0.0)
                    continue
                m = maps[b, positions[kind]].mean(0)
                r["iou"][kind].append(mask_iou(m >= 0.5 * m.max(), found.mask))
        out.append(r)
    return out


ATTRIBUTES = ("color", "shape", "count", "background", "fill")


def open_prompts(seeds: Iterable[int], kind: str) -> list[Prompt]:
    """Held-out prompts that leave one attribute open: ``kind="background"`` (every colour named, no
    background phrase) or ``"color"`` (the first object's colour open, the rest named): the benchmark's and the
    training evaluation's sets. ``open_prompts(range(10_200_000, 10_200_200), "color")``"""
    if kind not in ("background", "color"):
        raise ValueError(f"kind must be 'background' or 'color', not {kind!r}")
    return [Prompt(spec_for_seed(s), (0,) if kind == "color" else (), kind == "background") for s in seeds]


def chosen_values(results: Sequence[dict], kind: str) -> list[str]:
    """What the model chose for the open attribute ``kind`` in each result (objects it drew; a missing object
    has no colour to count)."""
    if kind == "background":
        return [r["chosen_background"] for r in results]
    return [c for r in results for c in r["chosen_colors"].values()]


def spread(values: Sequence[str], support: Sequence[str]) -> dict:
    """How evenly ``values`` cover ``support``: normalised entropy of the histogram (1 = uniform, 0 = one
    value), the smallest share relative to a uniform one, and the histogram."""
    counts = np.array([sum(v == s for v in values) for s in support], float)
    total = counts.sum()
    if total == 0:
        return {"entropy": 0.0, "min_share_ratio": 0.0, "histogram": dict.fromkeys(support, 0)}
    p = counts / total
    nz = p[p > 0]
    return {"entropy": float(-(nz * np.log(nz)).sum() / np.log(len(support))),
            "min_share_ratio": float(p.min() * len(support)),
            "histogram": {s: int(c) for s, c in zip(support, counts, strict=True)}}


def mean_attributes(results: Sequence[dict]) -> dict[str, float]:
    """Mean of each attribute accuracy over the results that ask for it (an open attribute is ``None``)."""
    out = {}
    for k in ATTRIBUTES:
        vals = [r[k] for r in results if r[k] is not None]
        out[k] = float(np.mean(vals)) if vals else float("nan")
    return out

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

from collections.abc import Sequence
from typing import Any

import torch
import torch.nn.functional as F

from attnkit.engine import control
from attnkit.store import AttentionStore

from .checker import mask_iou, read_image, score
from .scenes import SIZE, SceneSpec
from .tokenizer import object_word_tokens

IOU_WORDS = ("color", "shape")


@torch.no_grad()
def generate_scored(pipe: Any, specs: Sequence[SceneSpec], seeds: Sequence[int], guidance: float,
                    steps: int) -> list[dict]:
    """One image per spec (generator seeded from ``seeds``); per image: :func:`checker.score`'s dict plus
    ``"image"`` and ``"iou"`` = ``{"color": [per object], "shape": [per object]}``."""
    store = AttentionStore(kinds="cross", res=16)  # conditional half, summed over layers and steps
    gens = [torch.Generator().manual_seed(int(s)) for s in seeds]
    with control(pipe, store):
        images = pipe([s.caption for s in specs], num_inference_steps=steps, guidance_scale=guidance,
                      generator=gens, height=SIZE, width=SIZE).images
    maps = store.maps("cross", res=16).permute(0, 3, 1, 2)  # (B, tokens, 16, 16)
    maps = F.interpolate(maps.float(), size=(SIZE, SIZE), mode="bilinear", align_corners=False).numpy()
    out = []
    for b, (img, spec) in enumerate(zip(images, specs, strict=True)):
        r = score(read_image(img), spec)
        r["image"] = img
        r["iou"] = {k: [] for k in IOU_WORDS}
        for oi, positions in enumerate(object_word_tokens(pipe.tokenizer, spec)):
            found = r["matches"].get(oi)
            for kind in IOU_WORDS:
                if found is None:
                    r["iou"][kind].append(0.0)
                    continue
                m = maps[b, positions[kind]].mean(0)
                r["iou"][kind].append(mask_iou(m >= 0.5 * m.max(), found.mask))
        out.append(r)
    return out

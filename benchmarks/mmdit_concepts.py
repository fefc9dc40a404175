"""ConceptAttention vs plain cross-attention maps as a zero-shot segmentation of held-out shapes-world scenes.

    .venv/bin/python benchmarks/mmdit_concepts.py --quick                 # < 5 min on a 2-core CPU
    .venv/bin/python benchmarks/mmdit_concepts.py                         # 60 scenes
    .venv/bin/python benchmarks/mmdit_concepts.py --quick --model tiny-sd3   # the plumbing, on random weights

Scenes: ``attnkit.bundled.scenes.render_scene(seed)`` for held-out seeds from ``--seed-start`` (10,400,000 by
default; training never sees seeds ≥ 10,000,000). Each rendered image comes with exact object masks. Concepts:
the scene's shape words (each once) and ``"background"``. The caption is the prompt.

One pass per scene (the paper's real-image protocol, ``attnkit.concept_maps(..., image=...)``): the image is
encoded, noised to σ = ``--noise`` (0.5, the official ``encode_image``) and run through the transformer once,
with an :class:`attnkit.AttentionStore` in the same pass, so both methods read the same computation:

* **ConceptAttention** (``concept_miou``): the concept maps (softmax over the concepts of output-space dot
  products, the paper's last double blocks), upsampled to 64x64, argmax per pixel;
* **cross-attention** (``xattn_miou``): each concept word's image x text attention map in the caption
  (``store.word_maps``: every layer, heads averaged; a word that occurs twice, averaged), upsampled the same
  way, argmax per pixel over the concept words.

mIoU: per scene, the IoU of each ground-truth class (each shape word: the union of its objects' masks; the
background: the rest) with the pixels labelled so, averaged over the scene's classes; then over scenes.
``run_concepts(pipe, n)`` is what ``benchmarks/mmdit_methods.py`` imports. The last line is one JSON object.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

ROOT = Path(__file__).resolve().parents[1]
BUNDLED_MMDIT = ROOT / "src" / "attnkit" / "bundled" / "mmdit"
SEED_START = 10_400_000


def scene_truth(scene: Any, concepts: list[str]) -> np.ndarray:
    """(64, 64) class index per pixel: each object's shape word, the background elsewhere."""
    labels = np.full(scene.array.shape[:2], concepts.index("background"), dtype=np.int64)
    for obj in scene.objects:
        labels[obj.mask] = concepts.index(obj.shape)
    return labels


def scene_concepts(scene: Any) -> list[str]:
    shapes = []
    for obj in scene.objects:
        if obj.shape not in shapes:
            shapes.append(obj.shape)
    return [*shapes, "background"]


def miou(pred: np.ndarray, truth: np.ndarray, classes: int) -> float:
    """Mean over the classes present in ``truth`` of IoU(pred == c, truth == c)."""
    ious = []
    for c in range(classes):
        t = truth == c
        if not t.any():
            continue
        p = pred == c
        ious.append((p & t).sum() / (p | t).sum())
    return float(np.mean(ious))


def argmax_at(maps: torch.Tensor, size: tuple[int, int]) -> np.ndarray:
    """``maps`` (classes, h, w) bilinearly upsampled to ``size``, argmax per pixel."""
    up = F.interpolate(maps[None].float(), size=size, mode="bilinear", align_corners=False)[0]
    return up.argmax(dim=0).numpy()


def run_concepts(pipe: Any, n: int, *, seed_start: int = SEED_START, noise_level: float = 0.5, samples: int = 1,
                 blocks: list[int] | None = None, progress: bool = False) -> dict[str, Any]:
    """ConceptAttention and cross-attention mIoU on ``n`` held-out scenes (see the module docstring)."""
    import attnkit
    from attnkit.bundled.scenes import is_heldout, render_scene

    concept_scores, xattn_scores, seconds = [], [], []
    for i in range(n):
        seed = seed_start + i
        assert is_heldout(seed)
        scene = render_scene(seed)
        concepts = scene_concepts(scene)
        truth = scene_truth(scene, concepts)
        store = attnkit.AttentionStore(res=None)
        start = time.process_time()
        maps = attnkit.concept_maps(pipe, scene.caption, concepts, store, image=scene.image,
                                    noise_level=noise_level, samples=samples, blocks=blocks, seed=seed,
                                    progress=progress)
        seconds.append(time.process_time() - start)
        words = store.word_maps(scene.caption, words=concepts)
        xattn = torch.stack([words[c] for c in concepts])
        concept_scores.append(miou(argmax_at(maps.maps, truth.shape), truth, len(concepts)))
        xattn_scores.append(miou(argmax_at(xattn, truth.shape), truth, len(concepts)))
    return {"concept_miou": round(statistics.mean(concept_scores), 4),
            "xattn_miou": round(statistics.mean(xattn_scores), 4), "scenes": n, "seed_start": seed_start,
            "noise_level": noise_level, "samples": samples, "blocks": maps.settings["blocks"],
            "cpu_s_per_scene": round(statistics.mean(seconds), 3),
            "concept_wins": sum(c > x for c, x in zip(concept_scores, xattn_scores, strict=True))}


def load_model(name: str | None) -> tuple[Any, str]:
    """The pipeline to measure: ``tiny-sd3`` / ``tiny-flux`` (random weights, for the plumbing), a pipeline
    folder or hub id, or (default) the bundled MM-DiT model once it ships."""
    import attnkit
    from attnkit.testing import tiny_pipeline

    if name in ("tiny-sd3", "tiny-flux"):
        return tiny_pipeline(name.split("-")[1]), name
    if name is None:
        if not BUNDLED_MMDIT.exists():
            sys.exit("benchmarks/mmdit_concepts.py: the bundled MM-DiT model (src/attnkit/bundled/mmdit) does not "
                     "exist yet, and ConceptAttention needs a trained MM-DiT to localise anything; pass --model "
                     "PATH_OR_HUB_ID (an SD3/FLUX pipeline), or --model tiny-sd3 to check the plumbing on random "
                     "weights (its numbers mean nothing)")
        name = "bundled-mmdit"
    return attnkit.load_pipeline(name), name


def main(argv: list[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true", help="12 scenes (under 5 minutes on this CPU)")
    parser.add_argument("--scenes", type=int, default=None, help="number of scenes (default 60, --quick 12)")
    parser.add_argument("--model", default=None, help="default: the bundled MM-DiT; tiny-sd3 / tiny-flux; a path")
    parser.add_argument("--seed-start", type=int, default=SEED_START)
    parser.add_argument("--noise", type=float, default=0.5, help="the noise level σ of the pass (default 0.5)")
    parser.add_argument("--samples", type=int, default=1, help="noisy passes per scene, averaged (default 1)")
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    n = args.scenes or (12 if args.quick else 60)
    pipe, name = load_model(args.model)
    result = run_concepts(pipe, n, seed_start=args.seed_start, noise_level=args.noise, samples=args.samples)
    result["model"] = name
    print(f"ConceptAttention vs cross-attention segmentation, {n} held-out scenes from seed {args.seed_start}, "
          f"model {name}, one pass at σ = {args.noise} ({args.samples} sample(s)), blocks {result['blocks']}\n")
    print("| maps | mIoU |")
    print("|---|---|")
    print(f"| ConceptAttention (output space) | {result['concept_miou']:.3f} |")
    print(f"| cross-attention (image x text, AttentionStore) | {result['xattn_miou']:.3f} |")
    print(f"\nConceptAttention better on {result['concept_wins']} of {n} scenes; "
          f"{result['cpu_s_per_scene']:.2f} CPU s per scene\n")
    print(json.dumps(result))
    return result


if __name__ == "__main__":
    main()

"""Cross-image attention (appearance transfer) on the bundled model: does the output keep the structure image's
shapes and take the appearance image's colours and background?

    python benchmarks/transfer.py            # 30 held-out pairs, every ablation (long on a CPU)
    python benchmarks/transfer.py --quick    # 2 pairs, 16 steps, the three component ablations (< 5 minutes)
    python benchmarks/transfer.py --model-dir runs/open/model   # other weights (an exported folder), same pairs

Pairs (held-out seeds, shapes world): the structure is a rendered scene whose shapes are all different; the
appearance is the same shapes with the same fills in other colours, on another background, at the positions and
sizes of another scene with as many objects. The output prompt names the structure's shapes and leaves colours
and background open (``Prompt(spec, open_colors=all, open_background=True).caption``, e.g. "a circle and an
outlined square"). Both inputs are real images: inverted (edit-friendly DDPM by default) with that prompt, as
the official code inverts with its one prompt.

Scores (``attnkit.bundled.checker.read_image`` on the output):

* ``structure_iou``: per object of the structure scene, the IoU of its exact (hole-filled) mask with the best
  overlapping object the reader finds in the output (0 if none), averaged over objects, then pairs.
* ``appearance_match``: per object, whether that output object (the same best overlap) has the colour of the
  appearance object *of the same shape* (objects paired by shape: each scene's shapes are distinct), plus
  whether the output's background is the appearance's; the fraction right over objects + background.
* Baselines: ``baseline_structure_iou`` = the appearance image itself scored against the structure's masks;
  ``baseline_appearance_match`` = the structure image itself scored against the appearance's colours;
  ``noswap_*`` = the output prompt sampled from the structure's inverted noise without any swap.
* Ablations: each component (contrast, swap guidance, AdaIN) removed at a time; DDIM instead of DDPM inversion.
* Speed: ``time_ratio`` = one denoising step's UNet call (4 rows) under the swap and contrast divided by the stock
  UNet on the same 4 rows (interleaved, median; ``swap_only_time_ratio``: the swap without contrast;
  ``prob_path_time_ratio``: the contrast on the engine's probability path, every row's maps, as beside a store);
  ``total_time_ratio`` = a whole transfer (inversions included) divided by one plain generation with the model's
  defaults.

The last line printed is one JSON object with the headline figures.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import numpy as np
import torch
from scipy import ndimage

import attnkit
from attnkit.bundled.checker import mask_iou, read_image
from attnkit.bundled.scenes import (
    BACKGROUNDS,
    COLORS,
    HELDOUT_SEED_START,
    ObjectSpec,
    Prompt,
    SceneSpec,
    render_spec,
    spec_for_seed,
)
from attnkit.controllers.cross_image import FINE_STEPS
from attnkit.engine import Controller

PAIR_SEED = HELDOUT_SEED_START + 150_000  # a held-out range of its own
DONOR_OFFSET = 500_000  # geometry donors: another held-out range


# -- pairs ----------------------------------------------------------------------------------------------------------
def make_pair(seed: int) -> tuple[SceneSpec, SceneSpec] | None:
    """(structure, appearance) specs for ``seed``, or None when the structure scene repeats a shape."""
    structure = spec_for_seed(seed)
    shapes = [o.shape for o in structure.objects]
    if len(set(shapes)) != len(shapes):
        return None
    n = len(shapes)
    rng = np.random.default_rng([seed, 0x7A5])
    donor = next(spec for k in range(1000) if len((spec := spec_for_seed(seed + DONOR_OFFSET + 1000 * k)).objects) == n)
    unused = [c for c in COLORS if c not in {o.color for o in structure.objects}]
    colors: list[str] = []
    for o in structure.objects:  # another colour per object, unused ones first, never the structure's own
        pool = [c for c in unused if c not in colors] or [c for c in COLORS if c != o.color and c not in colors]
        colors.append(str(rng.choice(pool)))
    background = str(rng.choice([b for b in BACKGROUNDS if b != structure.background]))
    objects = tuple(ObjectSpec(o.shape, c, o.fill, d.center, d.size)
                    for o, c, d in zip(structure.objects, colors, donor.objects, strict=True))
    return structure, SceneSpec(background, objects)


def pairs(count: int) -> list[tuple[int, SceneSpec, SceneSpec]]:
    found, seed = [], PAIR_SEED
    while len(found) < count:
        pair = make_pair(seed)
        if pair is not None:
            found.append((seed, *pair))
        seed += 1
    return found


def output_prompt(spec: SceneSpec) -> str:
    return Prompt(spec, open_colors=tuple(range(len(spec.objects))), open_background=True).caption


# -- scores ---------------------------------------------------------------------------------------------------------
def evaluate(image, structure: SceneSpec, appearance: SceneSpec) -> dict[str, float]:
    """structure IoU and appearance match of ``image`` (see the module docstring)."""
    truth = render_spec(structure)
    reading = read_image(image)
    ious, right = [], 0
    colour_of = {o.shape: o.color for o in appearance.objects}
    for obj in truth.objects:
        target = ndimage.binary_fill_holes(obj.mask)
        scored = [(mask_iou(r.mask, target), r) for r in reading.objects]
        best = max(scored, key=lambda item: item[0], default=(0.0, None))
        ious.append(best[0])
        right += best[1] is not None and best[0] > 0 and best[1].color == colour_of[obj.shape]
    right += reading.background == appearance.background
    return {"structure_iou": float(np.mean(ious)), "appearance_match": right / (len(truth.objects) + 1)}


# -- timing ---------------------------------------------------------------------------------------------------------
class _Reader(Controller):
    """Reads attention maps (as a store does): puts the contrast on the engine's probability path."""

    def observe(self, call) -> None:
        pass


def step_overhead(pipe, repeats: int) -> tuple[float, float, float, float]:
    """(seconds per stock 4-row UNet call, ratio of the call under swap + contrast to it, ratio under the swap
    alone, ratio under swap + contrast on the probability path), interleaved medians. The contrast needs the
    output row's probabilities: alone, the controller makes them for that row only (the others stay fused);
    beside a map reader every row's are made. The swap alone only edits keys and values."""
    from attnkit.controllers.cross_image import CrossImageAttention
    from attnkit.engine import Layout, control
    from attnkit.transfer import _unet

    text = attnkit.inversion.encode_text(pipe, "a circle and a square", 64, 64)
    x = torch.randn(4, 4, 16, 16, generator=torch.Generator().manual_seed(0))
    t = int(pipe.scheduler.timesteps[0]) if len(pipe.scheduler.timesteps) else 500
    stock, controlled, swapped, explicit = [], [], [], []
    full, swap_only, beside = CrossImageAttention(), CrossImageAttention(contrast=1.0), CrossImageAttention()
    with torch.no_grad():
        for _ in range(2):  # warm-up
            _unet(pipe, x, t, [text] * 4)
        for _ in range(repeats):
            start = time.perf_counter()
            _unet(pipe, x, t, [text] * 4)
            stock.append(time.perf_counter() - start)
            for hooks, times in (((full,), controlled), ((swap_only,), swapped), ((beside, _Reader()), explicit)):
                with control(pipe, *hooks, layout=Layout(prompts=4, cfg=False)) as ctl:
                    ctl.set_step(30, 68)  # inside both swap windows
                    start = time.perf_counter()
                    _unet(pipe, x, t, [text] * 4)
                    times.append(time.perf_counter() - start)
    assert full.swapped_calls > 0 and swap_only.swapped_calls > 0 and beside.swapped_calls > 0
    base = statistics.median(stock)
    return base, *(statistics.median(times) / base for times in (controlled, swapped, explicit))


# -- the run --------------------------------------------------------------------------------------------------------
def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true", help="2 pairs, 16 steps, the component ablations only (< 5 minutes)")
    parser.add_argument("--pairs", type=int, default=None, help="number of pairs (default 30, quick 2)")
    parser.add_argument("--steps", type=int, default=None,
                        help="timesteps (default 25, the model's own; quick 16; official 100)")
    parser.add_argument("--model-dir", type=Path, default=None, help="pipeline folder (default: the shipped weights)")
    parser.add_argument("--inversion-guidance", type=float, default=None,
                        help="DDPM inversion guidance (default: the model's ddpm_inversion_guidance, else the "
                             "paper's 3.5)")
    parser.add_argument("--ablations", default=None,
                        help="comma-separated variants to run besides the full method (default: the component "
                             "ablations and DDIM inversion; quick: the component ablations); also 'follow inputs', "
                             "'structure K/V quirk', 'finest grid only', 'inversion guidance 3.5'")
    args = parser.parse_args()
    torch.set_num_threads(1)
    count = args.pairs or (2 if args.quick else 30)
    steps = args.steps or (16 if args.quick else 25)
    weights = str(args.model_dir) if args.model_dir else "shipped bundled weights"
    pipe = attnkit.load_pipeline(str(args.model_dir) if args.model_dir else None)
    pipe.set_progress_bar_config(disable=True)
    variants = {
        "full": {},
        "no contrast": {"contrast": 1.0},
        "no swap guidance": {"swap_guidance": None},
        "no AdaIN": {"adain": False},
        "plain AdaIN (no masks)": {"masks": None},
        "follow inputs": {"follow_inputs": True},
        "structure K/V quirk": {"structure_kv": True},
        "finest grid only": {"grid_steps": (FINE_STEPS,)},  # the bundled UNet has attention on two decoder grids only
        "DDIM inversion": {"inversion": "ddim"},
        "inversion guidance 3.5": {"inversion_guidance": 3.5},  # the paper's (Stable Diffusion) value
    }
    chosen = ["full"]
    if args.ablations is not None:
        chosen += [v.strip() for v in args.ablations.split(",") if v.strip()]
    elif args.quick:  # what each component adds, one removed at a time
        chosen = ["full", "no contrast", "no swap guidance", "no AdaIN"]
    else:
        chosen = ["full", "no contrast", "no swap guidance", "no AdaIN", "plain AdaIN (no masks)", "DDIM inversion"]
    unknown = [v for v in chosen if v not in variants]
    if unknown:
        sys.exit(f"unknown variant(s) {unknown}: choose from {list(variants)}")

    from attnkit.ddpm_inversion import ddpm_invert, ddpm_sample, from_inversion
    from attnkit.transfer import ddpm_inversion_guidance, transfer

    guidance = ddpm_inversion_guidance(pipe) if args.inversion_guidance is None else args.inversion_guidance

    scores: dict[str, list[dict[str, float]]] = {v: [] for v in [*chosen, "noswap", "structure image",
                                                                  "appearance image"]}
    timings: dict[str, list[float]] = {"invert": [], "transfer": []}
    started = time.perf_counter()
    skip = 32 / 100
    for index, (seed, s_spec, a_spec) in enumerate(pairs(count)):
        prompt = output_prompt(s_spec)
        s_img, a_img = render_spec(s_spec).image, render_spec(a_spec).image
        scores["structure image"].append(evaluate(s_img, s_spec, a_spec))
        scores["appearance image"].append(evaluate(a_img, s_spec, a_spec))
        start = time.perf_counter()
        trajectories = {("ddpm", guidance): (
            ddpm_invert(pipe, s_img, prompt, steps=steps, guidance=guidance, seed=seed, progress=False),
            ddpm_invert(pipe, a_img, prompt, steps=steps, guidance=guidance, seed=seed + 1, progress=False))}
        timings["invert"].append(time.perf_counter() - start)
        for name in chosen:  # the variants inverted at another guidance
            g = variants[name].get("inversion_guidance", guidance)
            if ("ddpm", g) not in trajectories:
                trajectories[("ddpm", g)] = tuple(ddpm_invert(pipe, im, prompt, steps=steps, guidance=g, seed=seed + k,
                                                              progress=False) for k, im in enumerate((s_img, a_img)))
        if "DDIM inversion" in chosen:
            trajectories[("ddim", 1.0)] = tuple(from_inversion(attnkit.invert(pipe, im, prompt, method="ddim", steps=steps,
                                                                        progress=False)) for im in (s_img, a_img))
        noswap = ddpm_sample(pipe, trajectories[("ddpm", guidance)][0], prompt, guidance=1.0,
                             skip=int(skip * steps + 1e-9), progress=False)
        scores["noswap"].append(evaluate(noswap, s_spec, a_spec))
        masks = "auto"
        for name in chosen:
            options = dict(variants[name])
            method = options.pop("inversion", "ddpm")
            key = (method, options.pop("inversion_guidance", guidance) if method == "ddpm" else 1.0)
            if key == ("ddpm", guidance):  # the masks depend on the inputs only: found once per pair (timed in "full")
                options.setdefault("masks", masks)
            start = time.perf_counter()
            result = transfer(pipe, structure=trajectories[key][0], appearance=trajectories[key][1],
                              prompt=prompt, steps=steps, skip=skip, progress=False, **options)
            if name == "full":
                timings["transfer"].append(time.perf_counter() - start)
                masks = result.masks
            scores[name].append(evaluate(result.image, s_spec, a_spec))
        print(f"pair {index + 1}/{count} seed {seed} ({prompt!r}): full {scores['full'][-1]}, noswap "
              f"{scores['noswap'][-1]}  [{time.perf_counter() - started:.0f} s]", file=sys.stderr, flush=True)

    def mean(name: str, key: str) -> float:
        return float(np.mean([s[key] for s in scores[name]]))

    # speed
    per_call, time_ratio, swap_ratio, prob_ratio = step_overhead(pipe, repeats=15 if args.quick else 25)
    start = time.perf_counter()
    attnkit.generate(pipe, output_prompt(pairs(1)[0][1]), seed=0, progress=False)
    generation = time.perf_counter() - start
    transfer_total = float(np.mean(timings["transfer"])) + float(np.mean(timings["invert"]))

    print(f"\n## Cross-image attention on the bundled model ({weights}); {count} held-out pairs, {steps} timesteps "
          f"({steps - int(skip * steps + 1e-9)} denoised), DDPM inversion guidance {guidance:g}, objects paired by "
          "shape\n")
    print("| output | structure IoU | appearance match |")
    print("|---|---|---|")
    labels = {"full": "cross-image attention (all components)", "noswap": "prompt from the structure's noise, no swap",
              "structure image": "the structure image itself", "appearance image": "the appearance image itself"}
    for name in ["full", *[c for c in chosen if c != "full"], "noswap", "structure image", "appearance image"]:
        label = labels.get(name, f"  {name}" if name.startswith(("DDIM", "follow", "structure K", "plain", "finest",
                                                                      "inversion"))
                           else f"  without: {name.removeprefix('no ')}")
        print(f"| {label} | {mean(name, 'structure_iou'):.3f} | {mean(name, 'appearance_match'):.3f} |")
    print(f"\nper step: stock 4-row UNet call {per_call * 1000:.1f} ms, under swap + contrast {time_ratio:.3f}x "
          f"(swap alone, fused attention: {swap_ratio:.3f}x; contrast on every row's probabilities, as beside a "
          f"map reader: {prob_ratio:.3f}x); "
          f"one transfer (2 inversions + {steps - int(skip * steps + 1e-9)} steps) {transfer_total:.1f} s = "
          f"{transfer_total / generation:.1f}x one plain generation ({generation:.1f} s)")
    headline = {
        "structure_iou": round(mean("full", "structure_iou"), 4),
        "appearance_match": round(mean("full", "appearance_match"), 4),
        "baseline_structure_iou": round(mean("appearance image", "structure_iou"), 4),
        "baseline_appearance_match": round(mean("structure image", "appearance_match"), 4),
        "noswap_appearance_match": round(mean("noswap", "appearance_match"), 4),
        "noswap_structure_iou": round(mean("noswap", "structure_iou"), 4),
        "time_ratio": round(time_ratio, 4),
        "swap_only_time_ratio": round(swap_ratio, 4),
        "prob_path_time_ratio": round(prob_ratio, 4),
        "total_time_ratio": round(transfer_total / generation, 3),
        "pairs": count, "steps": steps, "weights": weights, "inversion_guidance": guidance,
        "ablations": {name: {"structure_iou": round(mean(name, "structure_iou"), 4),
                             "appearance_match": round(mean(name, "appearance_match"), 4)}
                      for name in chosen if name != "full"},
    }
    print(json.dumps(headline))


if __name__ == "__main__":
    main()

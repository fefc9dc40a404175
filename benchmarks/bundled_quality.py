"""Quality benchmark of attnkit's bundled shapes-world model (issue 3).

(a) checker accuracy on ground-truth renders; (b) generated images for held-out prompts (seeds >= 10_000_000,
never used in training), sampled with the model's own defaults (``attnkit.json``) and fixed generator seeds:
colour / shape / count / background / fill accuracy read by the rule-based checker, and cross-attention
localisation IoU (each object's colour word and shape word vs. that object's mask found by the checker; a
missing object scores 0; details in ``attnkit.bundled.evaluate``); (c) grammar v2 (issue 11): held-out prompts
that leave the background open (every colour named) and prompts that leave the first object's colour open:
the prompted attributes' accuracy, and how evenly the model spreads the open attribute over its values
(normalised entropy of the histogram of what the checker read, and the smallest value's share relative to
its share in the data, which is uniform for both attributes).

Usage::

    python benchmarks/bundled_quality.py            # full: 500 renders, 200 full + 2 x 200 open prompts
    python benchmarks/bundled_quality.py --quick    # < 5 min: 200 renders, 48 full + 2 x 32 open prompts
    python benchmarks/bundled_quality.py --model bundled-mmdit --quick   # the bundled MM-DiT (SD3) model

The last line printed is one JSON object with the headline numbers.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

import numpy as np
import torch

from attnkit.bundled.checker import validate
from attnkit.bundled.evaluate import (
    ATTRIBUTES,
    chosen_values,
    generate_scored,
    mean_attributes,
    open_prompts,
    spread,
)
from attnkit.bundled.scenes import BACKGROUNDS, COLORS, spec_for_seed

MODEL_DIR = Path(__file__).resolve().parents[1] / "src" / "attnkit" / "bundled" / "model"
MODELS = {"bundled": MODEL_DIR, "bundled-mmdit": MODEL_DIR.parent / "mmdit"}
BENCH_SEED_START = 10_100_000  # held-out; the training-time evaluation uses 10_500_000..
OPEN_SEED_START = {"background": 10_200_000, "color": 10_300_000}  # held-out, disjoint from the above
CHECKER_SEED_START = 10_000_000


def load(model_dir: Path):
    """The pipeline class the folder names (StableDiffusionPipeline or, for the MM-DiT model,
    StableDiffusion3Pipeline without T5) and the pipeline-call settings of its ``attnkit.json`` beyond
    guidance and steps (the MM-DiT model's ``max_sequence_length``)."""
    import diffusers

    index = json.loads((model_dir / "model_index.json").read_text())
    absent = {k: None for k in ("text_encoder_3", "tokenizer_3") if k in index and index[k][0] is None}
    pipe = getattr(diffusers, index["_class_name"]).from_pretrained(model_dir, **absent)
    defaults = json.loads((model_dir / "attnkit.json").read_text())
    call = {k: defaults[k] for k in ("max_sequence_length",) if k in defaults}
    return pipe, defaults, call


def run_open(pipe, n: int, guidance: float, steps: int, batch: int = 8, call: dict | None = None) -> dict:
    """Grammar v2: ``n`` prompts with an open background and ``n`` with an open colour."""
    out: dict = {}
    every = []
    for kind, support in (("background", list(BACKGROUNDS)), ("color", list(COLORS))):
        start = OPEN_SEED_START[kind]
        prompts = open_prompts(range(start, start + n), kind)
        results = []
        for i in range(0, n, batch):
            seeds = range(start + i, start + min(n, i + batch))
            results += generate_scored(pipe, prompts[i : i + batch], seeds, guidance, steps, **(call or {}))
            print(f"  open {kind}: {min(n, i + batch)}/{n}", file=sys.stderr, flush=True)
        sp = spread(chosen_values(results, kind), support)
        out[f"open_{kind}_entropy"] = sp["entropy"]
        out[f"open_{kind}_min_share"] = sp["min_share_ratio"]
        out[f"open_{kind}_histogram"] = sp["histogram"]
        out[f"open_{kind}_prompted"] = mean_attributes(results)
        out[f"open_{kind}_examples"] = [p.caption for p in prompts[:2]]
        every += results
    acc = mean_attributes(every)
    out["open_prompted"] = acc
    out["open_prompted_acc"] = float(np.mean([acc[k] for k in ATTRIBUTES]))
    out["n_open"] = n
    return out


def run(quick: bool, model_dir: Path, guidance: float | None, n_gen: int | None, batch: int = 8,
        n_open: int | None = None) -> dict:
    torch.set_num_threads(int(os.environ.get("ATTNKIT_BENCH_THREADS", "1")))
    t0 = time.time()
    n_check = 200 if quick else 500
    checker = validate(range(CHECKER_SEED_START, CHECKER_SEED_START + n_check))
    checker_acc = float(np.mean(list(checker.values())))

    pipe, defaults, call = load(model_dir)
    g = defaults["guidance_scale"] if guidance is None else guidance
    steps = defaults["num_inference_steps"]
    pipe.set_progress_bar_config(disable=True)
    n = n_gen or (48 if quick else 200)
    specs = [spec_for_seed(BENCH_SEED_START + i) for i in range(n)]
    keys = ("color", "shape", "count", "background", "fill")
    tot = dict.fromkeys(keys, 0.0)
    ious: dict[str, list[float]] = {"color": [], "shape": []}
    failures = 0
    t_gen = 0.0
    for start in range(0, n, batch):
        chunk = specs[start : start + batch]
        ts = time.time()
        seeds = range(BENCH_SEED_START + start, BENCH_SEED_START + start + len(chunk))
        results = generate_scored(pipe, chunk, seeds, g, steps, **call)
        t_gen += time.time() - ts
        for r in results:
            failures += r["n_found"] == 0
            for k in keys:
                tot[k] += r[k]
            for kind in ious:
                ious[kind] += r["iou"][kind]
        print(f"  generated {min(start + batch, n)}/{n}", file=sys.stderr, flush=True)
    # wall time of one single-prompt generation at the defaults (the brief's <= 1 s per image)
    single = []
    for i in range(3):
        ts = time.time()
        with torch.no_grad():
            pipe(specs[i].caption, num_inference_steps=steps, guidance_scale=g,
                 generator=torch.Generator().manual_seed(i), height=64, width=64, **call)
        single.append(time.time() - ts)
    acc = {k: v / n for k, v in tot.items()}
    opened = run_open(pipe, n_open if n_open is not None else (32 if quick else 200), g, steps, batch, call)
    res = {
        "color_acc": acc["color"],
        "shape_acc": acc["shape"],
        "count_acc": acc["count"],
        "background_acc": acc["background"],
        "fill_acc": acc["fill"],
        "xattn_iou": float(np.mean(ious["color"] + ious["shape"])),
        "xattn_iou_color": float(np.mean(ious["color"])),
        "xattn_iou_shape": float(np.mean(ious["shape"])),
        "checker_acc": checker_acc,
        "checker": checker,
        "failures": int(failures),
        "n_images": n,
        "n_checker": n_check,
        "guidance_scale": g,
        "num_inference_steps": steps,
        "s_per_image": t_gen / n,
        "single_image_s": float(np.median(single)),
        **opened,
        "seconds": time.time() - t0,
    }
    return res


def print_table(res: dict, model: str = "bundled", sampler: str = "DDIM") -> None:
    targets = {"color_acc": 0.95, "shape_acc": 0.85, "count_acc": 0.90, "background_acc": 0.95,
               "fill_acc": 0.85, "xattn_iou": 0.5}
    print(f"{model} model: {res['n_images']} held-out prompts, guidance {res['guidance_scale']}, "
          f"{res['num_inference_steps']} {sampler} steps, {res['s_per_image']:.2f} s/image in batches of 8 "
          f"(one image alone: {res['single_image_s']:.2f} s)")
    print("| metric | value | target |\n|---|---|---|")
    for k, t in targets.items():
        print(f"| {k} | {res[k]:.3f} | >= {t} |")
    print(f"| xattn_iou (colour words) | {res['xattn_iou_color']:.3f} | |")
    print(f"| xattn_iou (shape words) | {res['xattn_iou_shape']:.3f} | |")
    print(f"| no object found (failures) | {res['failures']}/{res['n_images']} | |")
    ck = " ".join(f"{k} {v:.3f}" for k, v in res["checker"].items())
    print(f"| checker on {res['n_checker']} renders | {res['checker_acc']:.3f} ({ck}) | >= 0.98 |")
    if not res["n_open"]:
        return
    print(f"\ngrammar v2: {res['n_open']} prompts with an open background, {res['n_open']} with the first object's "
          f"colour open (e.g. {res['open_color_examples'][0]!r})")
    print("| prompts | " + " | ".join(ATTRIBUTES) + " | open value: entropy | min share / data share | histogram |")
    print("|---" * (len(ATTRIBUTES) + 4) + "|")
    full = {k: res[f"{k}_acc"] for k in ATTRIBUTES}
    print("| full captions (above) | " + " | ".join(f"{full[k]:.3f}" for k in ATTRIBUTES) + " | | | |")
    for kind in ("background", "color"):
        acc = res[f"open_{kind}_prompted"]
        cells = " | ".join("open" if np.isnan(acc[k]) else f"{acc[k]:.3f}" for k in ATTRIBUTES)
        hist = " ".join(f"{k} {v}" for k, v in res[f"open_{kind}_histogram"].items())
        print(f"| open {kind} | {cells} | {res[f'open_{kind}_entropy']:.3f} (>= 0.9) | "
              f"{res[f'open_{kind}_min_share']:.2f} (>= 0.5) | {hist} |")
    print(f"| open_prompted_acc (mean of the prompted attributes) | {res['open_prompted_acc']:.3f} | | | | | | | |")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--quick", action="store_true", help="fewer samples (< 5 min)")
    p.add_argument("--model", choices=sorted(MODELS), default="bundled",
                   help="bundled: the UNet model; bundled-mmdit: the SD3 transformer model")
    p.add_argument("--model-dir", type=Path, default=None, help="a model folder (overrides --model)")
    p.add_argument("--guidance", type=float, default=None, help="override the model's default guidance")
    p.add_argument("--n", type=int, default=None, help="number of generated images")
    p.add_argument("--n-open", type=int, default=None, help="prompts per open attribute (0: skip grammar v2)")
    a = p.parse_args()
    model_dir = a.model_dir or MODELS[a.model]
    res = run(a.quick, model_dir, a.guidance, a.n, n_open=a.n_open)
    index = json.loads((model_dir / "model_index.json").read_text())
    sd3 = index["_class_name"] == "StableDiffusion3Pipeline"
    print_table(res, "bundled MM-DiT (SD3)" if sd3 else "bundled", "flow-matching Euler" if sd3 else "DDIM")
    print(json.dumps({k: v for k, v in res.items() if k != "checker" and not k.endswith("_examples")}))


if __name__ == "__main__":
    main()

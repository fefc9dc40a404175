"""Shared attention on the bundled model (Style Aligned, MasaCtrl, ConsiStory's subject sharing), and its speed.

    .venv/bin/python benchmarks/shared_attention.py --quick                        # < 5 min on a 2-core CPU
    .venv/bin/python benchmarks/shared_attention.py --quick --model runs/open/model  # any exported model folder

The quality parts need a model that understands captions which leave colours or the background open
(grammar v2 of the shapes world: ``attnkit.bundled.scenes.Prompt``, "a circle and a blue square"); on weights
that never saw such captions the numbers say nothing about the method. What the model chose for an open
attribute is read by ``attnkit.bundled.checker.score`` (``chosen_background``, ``chosen_colors``).

(a) Style Aligned (``attnkit.style_aligned``, defaults): batches of 4 prompts, each a different held-out scene.
    ``background`` rows: every colour named, the background left open; a target *matches* when it draws the
    reference's background. ``colour`` rows: the background named, object 0's colour left open; a target
    matches when its object 0 takes the reference's colour. ``free``: the same prompts and seeds without
    sharing (the reference image is the same in both: sharing never changes it; the table shows the largest
    pixel difference). ``prompt_kept``: the targets' shape accuracy under sharing (each keeps its own prompted
    shapes), beside the same figure without sharing, which bounds it (``prompt_kept_vs_free``: their ratio).
    GroupNorm sharing follows the model's ``style_group_norm`` (``attnkit.json``) where it sets one, else the
    official rule (on for SD1.x-type UNets); ``style_group_norm`` in the JSON says which ran.
(b) MasaCtrl (``attnkit.mutual_edit``, defaults: step 4, layer fraction 0.625): a one-object source whose colour
    is open, and a target that changes its shape; *kept*: the target's object takes the source's colour (free:
    the same two prompts from the same noise, no control); the target's shape accuracy beside it.
(c) Subject sharing (``attnkit.consistent``, defaults): 3 prompts naming the same shape with an open colour
    and three different backgrounds. *match*: a target's object takes the reference's colour; *background
    kept*: the target draws its own prompted background. Shown for subject sharing, free generation and full
    sharing (the same layers and steps, the reference's keys unmasked: ``StyleAligned`` without AdaIN), which
    should match the colour but lose the backgrounds.
(d) Speed: a randomly initialised UNet with the SD1.5 configuration (from its config dict, no download), a
    batch of 4 prompts with guidance (8 UNet rows): stock diffusers vs ``StyleAligned`` (defaults for SD1.x:
    AdaIN on queries and keys, group-norm sharing, every self-attention layer), interleaved rounds in one
    process, median of the per-round ratios of this process's CPU time (one thread).

Headline JSON (last line): style_match_shared / style_match_free (background rows), style_color_match_*,
masa_color_kept / masa_color_free, subject_match_shared / subject_match_free (+ _full and the background
figures), prompt_kept, time_ratio.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
import types
from pathlib import Path
from typing import Any

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from overhead import SD15_DDIM, build_unet, denoise  # noqa: E402  (the SD1.5 UNet and loop written out once)

MODEL_DIR = Path(__file__).resolve().parents[1] / "src" / "attnkit" / "bundled" / "model"
SEED_START = 10_400_000  # held-out scenes (>= 10_000_000 are never rendered in training)


def _score(image: Any, prompt: Any) -> dict:
    from attnkit.bundled.checker import read_image, score

    return score(read_image(image), prompt.spec, prompt.open_colors, prompt.open_background)


def _progress(part: str, done: int, total: int) -> None:
    if done == total or done % 5 == 0:
        print(f"  {part}: {done}/{total}", file=sys.stderr, flush=True)


def _max_pixel_diff(a: Any, b: Any) -> int:
    return int(np.abs(np.asarray(a, np.int16) - np.asarray(b, np.int16)).max())


# -- (a) Style Aligned -----------------------------------------------------------------------------------------
def style_part(pipe: Any, kind: str, batches: int, offset: int) -> dict[str, Any]:
    import attnkit
    from attnkit.bundled.scenes import Prompt, spec_for_seed

    matches = {"shared": [], "free": []}
    shapes = {"shared": [], "free": []}
    ref_diff = 0
    for b in range(batches):
        seeds = [SEED_START + offset + 4 * b + i for i in range(4)]
        prompts = [Prompt(spec_for_seed(s), (0,) if kind == "color" else (), kind == "background") for s in seeds]
        captions = [p.caption for p in prompts]
        noise_seed = 1000 + offset + b
        shared = attnkit.style_aligned(pipe, captions, seed=noise_seed, progress=False)
        group_norm = shared.settings["share_group_norm"]  # the model's choice (attnkit.json) or the official rule
        free = attnkit.generate(pipe, captions, seed=noise_seed, shared_noise=False, progress=False)
        ref_diff = max(ref_diff, _max_pixel_diff(shared.images[0], free.images[0]))
        for name, images in (("shared", shared.images), ("free", free.images)):
            scores = [_score(im, p) for im, p in zip(images, prompts, strict=True)]
            chosen = [s["chosen_background"] if kind == "background" else s["chosen_colors"].get(0) for s in scores]
            for i in range(1, 4):
                matches[name].append(chosen[i] is not None and chosen[i] == chosen[0])
                shapes[name].append(scores[i]["shape"])
        _progress(f"style ({kind})", b + 1, batches)
    return {"match_shared": float(np.mean(matches["shared"])), "match_free": float(np.mean(matches["free"])),
            "shape_shared": float(np.mean(shapes["shared"])), "shape_free": float(np.mean(shapes["free"])),
            "targets": len(matches["shared"]), "reference_max_pixel_diff": ref_diff, "group_norm": group_norm}


# -- (b) MasaCtrl ------------------------------------------------------------------------------------------------
def masa_part(pipe: Any, pairs: int, offset: int) -> dict[str, Any]:
    import attnkit
    from attnkit.bundled.scenes import SHAPES, Prompt, SceneSpec, spec_for_seed

    rng = np.random.default_rng(7)
    kept = {"masa": [], "free": []}
    shape_ok = {"masa": [], "free": []}
    for k in range(pairs):
        spec = spec_for_seed(SEED_START + 50_000 + offset + k)
        one = SceneSpec(spec.background, spec.objects[:1])
        new_shape = str(rng.choice([s for s in SHAPES if s != one.objects[0].shape]))
        source, target = Prompt(one, (0,)), Prompt(one.with_object(0, shape=new_shape), (0,))
        seed = 2000 + offset + k
        masa = attnkit.mutual_edit(pipe, source.caption, target.caption, seed=seed, progress=False)
        free = attnkit.generate(pipe, [source.caption, target.caption], seed=seed, progress=False)
        for name, images in (("masa", masa.images), ("free", free.images)):
            s, t = _score(images[0], source), _score(images[1], target)
            color_s, color_t = s["chosen_colors"].get(0), t["chosen_colors"].get(0)
            kept[name].append(color_s is not None and color_s == color_t)
            shape_ok[name].append(t["shape"])
        _progress("MasaCtrl", k + 1, pairs)
    return {"kept_masa": float(np.mean(kept["masa"])), "kept_free": float(np.mean(kept["free"])),
            "shape_masa": float(np.mean(shape_ok["masa"])), "shape_free": float(np.mean(shape_ok["free"])),
            "pairs": pairs}


# -- (c) subject sharing -------------------------------------------------------------------------------------------
def subject_part(pipe: Any, batches: int, offset: int) -> dict[str, Any]:
    import attnkit
    from attnkit.bundled.scenes import BACKGROUNDS, Prompt, SceneSpec, spec_for_seed
    from attnkit.controllers import StyleAligned

    backgrounds = list(BACKGROUNDS)
    match = {"subject": [], "free": [], "full": []}
    kept = {"subject": [], "free": [], "full": []}
    for b in range(batches):
        obj = spec_for_seed(SEED_START + 80_000 + offset + b).objects[0]
        order = backgrounds[b % 3:] + backgrounds[:b % 3]  # every background is the reference's in turn
        prompts = [Prompt(SceneSpec(bg, (obj,)), (0,)) for bg in order]
        captions = [p.caption for p in prompts]
        seed = 3000 + offset + b
        full = StyleAligned(adain_queries=False, adain_keys=False, share_group_norm=False, places=("up",), steps=1)
        runs = {"subject": attnkit.consistent(pipe, captions, subject=obj.shape, seed=seed, progress=False).images,
                "free": attnkit.generate(pipe, captions, seed=seed, shared_noise=False, progress=False).images,
                "full": attnkit.generate(pipe, captions, full, seed=seed, shared_noise=False, progress=False).images}
        for name, images in runs.items():
            scores = [_score(im, p) for im, p in zip(images, prompts, strict=True)]
            colors = [s["chosen_colors"].get(0) for s in scores]
            for i in (1, 2):
                match[name].append(colors[i] is not None and colors[i] == colors[0])
                kept[name].append(scores[i]["background"])
        _progress("subject", b + 1, batches)
    return {**{f"match_{k}": float(np.mean(v)) for k, v in match.items()},
            **{f"background_{k}": float(np.mean(v)) for k, v in kept.items()}, "targets": len(match["subject"])}


# -- (d) speed -------------------------------------------------------------------------------------------------------
def speed_part(size: int, steps: int, rounds: int) -> dict[str, Any]:
    from diffusers import DDIMScheduler

    from attnkit import control
    from attnkit.controllers import StyleAligned

    unet, scheduler = build_unet(), DDIMScheduler(**SD15_DDIM)
    g = torch.Generator("cpu").manual_seed(0)
    noise = torch.randn(4, 4, size // 8, size // 8, generator=g)
    embeddings = torch.randn(8, 77, 768, generator=g)
    pipe = types.SimpleNamespace(unet=unet, scheduler=scheduler, do_classifier_free_guidance=True)

    def stock() -> torch.Tensor:
        return denoise(unet, scheduler, noise, embeddings, steps)

    def style() -> torch.Tensor:
        with control(pipe, StyleAligned()):
            return denoise(unet, scheduler, noise, embeddings, steps)

    variants = {"stock": stock, "style_aligned": style}
    stock()  # warm-up
    cpu: dict[str, list[float]] = {k: [] for k in variants}
    wall: dict[str, list[float]] = {k: [] for k in variants}
    out: dict[str, torch.Tensor] = {}
    names = list(variants)
    for r in range(rounds):
        for name in names[r % 2:] + names[:r % 2]:  # alternate the order: load drifts hit both alike
            start, start_cpu = time.perf_counter(), time.process_time()
            out[name] = variants[name]()
            cpu[name].append(time.process_time() - start_cpu)
            wall[name].append(time.perf_counter() - start)
        print(f"  speed round {r + 1}/{rounds}: " + ", ".join(f"{k} {cpu[k][-1]:.1f} s" for k in names),
              file=sys.stderr, flush=True)
    ratios = [s / t for s, t in zip(cpu["style_aligned"], cpu["stock"], strict=True)]
    wall_ratios = [s / t for s, t in zip(wall["style_aligned"], wall["stock"], strict=True)]
    return {"stock_cpu_s": statistics.median(cpu["stock"]), "style_cpu_s": statistics.median(cpu["style_aligned"]),
            "time_ratio": statistics.median(ratios), "time_ratio_range": (min(ratios), max(ratios)),
            "time_ratio_wall": statistics.median(wall_ratios),
            "reference_diff": float((out["style_aligned"][0] - out["stock"][0]).abs().max()),
            "target_diff": float((out["style_aligned"][1:] - out["stock"][1:]).abs().max())}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="3 style batches per row, 6 MasaCtrl pairs, 3 subject batches; speed at 128 px, 1 step, 2 rounds")
    parser.add_argument("--model", "--model-dir", dest="model_dir", type=Path, default=MODEL_DIR,
                        help="a diffusers folder of a shapes-world model for the quality parts (default: the "
                             "shipped bundled model; e.g. an open-attribute fine-tune's export)")
    parser.add_argument("--style-batches", type=int, default=20, help="batches of 4 per style row (3 targets each)")
    parser.add_argument("--masa-pairs", type=int, default=40)
    parser.add_argument("--subject-batches", type=int, default=30, help="batches of 3 (2 targets each)")
    parser.add_argument("--seed-offset", type=int, default=0, help="offset into the held-out scenes")
    parser.add_argument("--size", type=int, default=256, help="image side of the speed part")
    parser.add_argument("--steps", type=int, default=2, help="DDIM steps per speed run")
    parser.add_argument("--rounds", type=int, default=3, help="interleaved speed rounds")
    parser.add_argument("--skip-speed", action="store_true")
    parser.add_argument("--skip-quality", action="store_true")
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args()
    if args.quick:
        args.style_batches, args.masa_pairs, args.subject_batches = 3, 6, 3
        args.size, args.steps, args.rounds = 128, 1, 2
    torch.set_num_threads(args.threads)
    started = time.perf_counter()
    summary: dict[str, Any] = {"model": str(args.model_dir)}

    if not args.skip_quality and (args.model_dir / "model_index.json").is_file():
        from attnkit.models import load_pipeline

        pipe = load_pipeline(str(args.model_dir))
        pipe.set_progress_bar_config(disable=True)
        print(f"model: {args.model_dir}")
        bg = style_part(pipe, "background", args.style_batches, args.seed_offset)
        col = style_part(pipe, "color", args.style_batches, args.seed_offset + 100_000)
        masa = masa_part(pipe, args.masa_pairs, args.seed_offset)
        subj = subject_part(pipe, args.subject_batches, args.seed_offset)
        print("\n| part | what is measured | shared | free | full sharing | n |")
        print("|---|---|---|---|---|---|")
        print(f"| style: open background | target takes the reference's background | {bg['match_shared']:.3f} | "
              f"{bg['match_free']:.3f} | | {bg['targets']} |")
        print(f"| style: open colour | target's object 0 takes the reference's colour | {col['match_shared']:.3f} | "
              f"{col['match_free']:.3f} | | {col['targets']} |")
        kept = (bg["shape_shared"] * bg["targets"] + col["shape_shared"] * col["targets"]) / (bg["targets"] +
                                                                                             col["targets"])
        kept_free = (bg["shape_free"] * bg["targets"] + col["shape_free"] * col["targets"]) / (bg["targets"] +
                                                                                              col["targets"])
        print(f"| style: prompt kept | targets' prompted shapes drawn | {kept:.3f} | {kept_free:.3f} | | "
              f"{bg['targets'] + col['targets']} |")
        print(f"| MasaCtrl: colour kept | target (new shape) takes the source's colour | {masa['kept_masa']:.3f} | "
              f"{masa['kept_free']:.3f} | | {masa['pairs']} |")
        print(f"| MasaCtrl: new shape | target draws its prompted shape | {masa['shape_masa']:.3f} | "
              f"{masa['shape_free']:.3f} | | {masa['pairs']} |")
        print(f"| subject: colour shared | target's subject takes the reference's colour | "
              f"{subj['match_subject']:.3f} | {subj['match_free']:.3f} | {subj['match_full']:.3f} | "
              f"{subj['targets']} |")
        print(f"| subject: own background | target draws its own prompted background | "
              f"{subj['background_subject']:.3f} | {subj['background_free']:.3f} | {subj['background_full']:.3f} | "
              f"{subj['targets']} |")
        worst = max(bg["reference_max_pixel_diff"], col["reference_max_pixel_diff"])
        print(f"\nreference image, shared vs free: largest pixel difference {worst} (of 255); Style Aligned's "
              f"GroupNorm sharing on this model: {'on' if bg['group_norm'] else 'off'}")
        summary.update({
            "style_match_shared": round(bg["match_shared"], 4), "style_match_free": round(bg["match_free"], 4),
            "style_color_match_shared": round(col["match_shared"], 4),
            "style_color_match_free": round(col["match_free"], 4),
            "style_targets": bg["targets"] + col["targets"],
            "masa_color_kept": round(masa["kept_masa"], 4), "masa_color_free": round(masa["kept_free"], 4),
            "masa_shape": round(masa["shape_masa"], 4), "masa_shape_free": round(masa["shape_free"], 4),
            "subject_match_shared": round(subj["match_subject"], 4),
            "subject_match_free": round(subj["match_free"], 4), "subject_match_full": round(subj["match_full"], 4),
            "subject_background_kept": round(subj["background_subject"], 4),
            "subject_background_kept_free": round(subj["background_free"], 4),
            "subject_background_kept_full": round(subj["background_full"], 4),
            "prompt_kept": round(kept, 4), "prompt_kept_free": round(kept_free, 4),
            # the model's own shape accuracy on these prompts bounds prompt_kept: sharing keeps this share of it
            "prompt_kept_vs_free": round(kept / kept_free, 4) if kept_free else None,
            "style_group_norm": bg["group_norm"],
            "reference_max_pixel_diff": worst,
        })
    else:
        reason = "skipped" if args.skip_quality else f"skipped: no model at {args.model_dir} (model_index.json)"
        print(f"(a)-(c) quality {reason}")
        summary.update(dict.fromkeys(("style_match_shared", "style_match_free", "masa_color_kept",
                                      "masa_color_free", "subject_match_shared", "subject_match_free",
                                      "prompt_kept")))

    if not args.skip_speed:
        s = speed_part(args.size, args.steps, args.rounds)
        lo, hi = s["time_ratio_range"]
        print(f"\n| speed: SD1.5 UNet, random weights, {args.size}x{args.size}, {args.steps} DDIM step(s), 4 prompts "
              f"x CFG, {args.threads} thread(s) | CPU s | ratio |")
        print("|---|---|---|")
        print(f"| stock diffusers (SDPA) | {s['stock_cpu_s']:.2f} | 1.000 |")
        print(f"| Style Aligned (defaults) | {s['style_cpu_s']:.2f} | {s['time_ratio']:.3f} "
              f"(rounds {lo:.2f}..{hi:.2f}; wall {s['time_ratio_wall']:.3f}) |")
        print(f"reference row vs stock: max |Δ| {s['reference_diff']:.2e}; targets changed by up to "
              f"{s['target_diff']:.3g}")
        summary.update(time_ratio=round(s["time_ratio"], 4), time_ratio_wall=round(s["time_ratio_wall"], 4),
                       speed_size=args.size, speed_steps=args.steps, speed_rounds=args.rounds)
    else:
        summary["time_ratio"] = None
    summary["seconds"] = round(time.perf_counter() - started, 1)
    summary["cpu_seconds"] = round(time.process_time(), 1)  # what the run costs on an idle core
    print(json.dumps(summary))


if __name__ == "__main__":
    main()

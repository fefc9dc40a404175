"""Self-segmentation benchmark: segments from self-attention, labels from cross-attention, on the bundled model.

    .venv/bin/python benchmarks/segmentation.py --quick          # < 5 min on a 2-core CPU
    .venv/bin/python benchmarks/segmentation.py                  # 60 held-out scenes
    .venv/bin/python benchmarks/segmentation.py --memory         # + peak memory, SD1.5 UNet at 512 px (random)

Scenes: held-out seeds from ``--seed-start`` (benchmark seeds start at 10,300,000; the defaults were chosen on
the development seeds 10,200,000 upwards, never on these).

* **Generated**: each scene's caption is generated (seed = scene seed); the maps come from that pass. Ground
  truth: the objects ``attnkit.bundled.checker`` reads in the image, matched to the caption's objects by colour;
  an object's mask is its own colour's pixels inside its silhouette (the outline only for an outlined object,
  as the renderer's masks), background = the rest. Objects the model failed to draw are not scored (counted).
* **Real**: the rendered scene (``render_scene(seed)``) with its exact masks, through ``segment(image=...)``:
  ``real="noise"`` (one UNet pass at t = 300, and other t in the full run) and ``real="invert"``.
* mIoU: per scene, segments (after label merging) matched one-to-one to the regions (objects + background)
  by the Hungarian method on IoU, unmatched regions scoring 0; mean over regions, then over scenes. Label
  accuracy: an object's matched segment is named by that object's colour or shape word (the right
  occurrence); "own word" also accepts its fill word ("outlined"); background accuracy: the background's
  segment is labelled background.
* Baseline (DAAM): each candidate word's cross-attention map (bicubic to the image) thresholded at 0.4 of its
  max, argmax over the words above threshold, background elsewhere. Grid ceiling: the ground truth pooled to
  the attention grid (each cell takes its majority region) and upsampled the same way as the segments.
* Speed: CPU time of ``attnkit.segment`` on a generated image / CPU time of generating it, same scene, same
  run. Memory (``--memory``): peak RSS of one denoising step (CFG) of a randomly initialised SD1.5 UNet at
  512 x 512 on the CPU, per way of aggregating the self-attention, each in a fresh process.

The last line is one JSON object: miou_kmeans, miou_merge, miou_xattn_baseline, miou_real, label_accuracy,
time_ratio, ...
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

MODEL_DIR = Path(__file__).resolve().parents[1] / "src" / "attnkit" / "bundled" / "model"
BENCH_START = 10_300_000  # benchmark scenes; the defaults were tuned on 10_200_000.. (development)


# -- ground truth -------------------------------------------------------------------------------------------
def generated_truth(image: Any, spec: Any) -> list[tuple[int, np.ndarray]]:
    """(caption object index, mask) for each object the checker finds, matched to the caption by colour."""
    from attnkit.bundled.checker import read_image, score
    from attnkit.bundled.scenes import BACKGROUNDS, COLORS

    palette = np.array(list(COLORS.values()) + list(BACKGROUNDS.values()), np.float32)
    pixels = np.asarray(image.convert("RGB"), np.float32)
    nearest = ((pixels[:, :, None] - palette[None, None]) ** 2).sum(-1).argmin(-1)
    matches = score(read_image(image), spec)["matches"]
    return [(i, r.mask & (nearest == list(COLORS).index(r.color))) for i, r in sorted(matches.items())]


def real_truth(scene: Any) -> list[tuple[int, np.ndarray]]:
    return [(i, o.mask) for i, o in enumerate(scene.objects) if o.mask.any()]


def regions(truth: list[tuple[int, np.ndarray]], shape: tuple[int, int]) -> list[np.ndarray]:
    """Background first, then the objects."""
    objects = [m for _, m in truth]
    background = ~np.logical_or.reduce(objects) if objects else np.ones(shape, bool)
    return [background, *objects]


def hungarian_ious(label_map: np.ndarray, truth_regions: list[np.ndarray]) -> tuple[np.ndarray, dict[int, int]]:
    """Per region its IoU with the segment the Hungarian method gives it (0 if none) and region -> label."""
    from scipy.optimize import linear_sum_assignment

    labels = np.unique(label_map)
    iou = np.zeros((len(truth_regions), len(labels)))
    for i, g in enumerate(truth_regions):
        for j, lab in enumerate(labels):
            p = label_map == lab
            union = (g | p).sum()
            iou[i, j] = (g & p).sum() / union if union else 0.0
    rows, cols = linear_sum_assignment(iou, maximize=True)
    out = np.zeros(len(truth_regions))
    match = {}
    for r, c in zip(rows, cols, strict=True):
        out[r] = iou[r, c]
        match[int(r)] = int(labels[c])
    return out, match


def object_words(tokenizer: Any, spec: Any, fill: bool = False) -> list[set[int]]:
    """Per caption object, the word indices of its colour and shape words (and its fill word, "outlined")."""
    from attnkit.bundled.tokenizer import object_word_tokens
    from attnkit.tokens import word_spans

    spans = word_spans(tokenizer, spec.caption)
    token_to_word = {t: s.position for s in spans for t in s.tokens}
    return [{token_to_word[t] for t in o["color"] + o["shape"] + (o["fill"] if fill else [])}
            for o in object_word_tokens(tokenizer, spec)]


# -- the cross-attention baseline and the grid ceiling -----------------------------------------------------
def xattn_baseline(captured: Any, candidates: Any, size: tuple[int, int], threshold: float = 0.4) -> np.ndarray:
    """DAAM-style: each word's map (mean of its tokens, bicubic to the image, clamped at 0) thresholded at
    ``threshold`` x its max; each pixel takes the word with the largest map among those above threshold,
    label 0 (background) where none is. Labels 1..n follow ``candidates``."""
    tokens = captured.cross_store.maps("cross", res=max(captured.label_grid))[0].permute(2, 0, 1)
    maps = torch.stack([tokens[list(c.tokens)].mean(0) for c in candidates])
    maps = F.interpolate(maps[None], size=size, mode="bicubic", align_corners=False)[0].clamp_min(0)
    above = maps >= threshold * maps.flatten(1).max(1).values[:, None, None]
    scored = torch.where(above, maps, torch.full_like(maps, -1.0))
    best = scored.argmax(0)
    return np.where(above.any(0).numpy(), best.numpy() + 1, 0)


def ceiling_map(truth_regions: list[np.ndarray], grid: tuple[int, int], image: Any, refine: str) -> np.ndarray:
    """Ground truth pooled to the grid (majority per cell), then upsampled (and refined) as segments are."""
    from attnkit.segmentation import refine_assignments, upsample_assignments

    h, w = truth_regions[0].shape
    gh, gw = grid
    onehot = torch.from_numpy(np.stack(truth_regions).astype(np.float32))[None]
    pooled = F.adaptive_avg_pool2d(onehot, (gh, gw))[0].argmax(0).numpy()
    probs = upsample_assignments(pooled, len(truth_regions), (h, w))
    return refine_assignments(probs, image, cell=h / gh, refine=refine).argmax(0).numpy()


# -- one scene ----------------------------------------------------------------------------------------------
VARIANTS = (("kmeans", "bilateral"), ("kmeans", "none"), ("merge", "bilateral"), ("merge", "none"))


def score_segmentation(seg: Any, truth: list[tuple[int, np.ndarray]], words: list[set[int]],
                       own_words: list[set[int]]) -> dict[str, Any]:
    truth_regions = regions(truth, seg.label_map.shape)
    ious, match = hungarian_ious(seg.label_map, truth_regions)
    by_index = {s.index: s for s in seg.segments}
    labels, own = [], []
    for k, (obj, _) in enumerate(truth, start=1):
        s = by_index.get(match.get(k, -1))
        labels.append(bool(s is not None and s.word_position in words[obj]))
        own.append(bool(s is not None and s.word_position in own_words[obj]))
    background = by_index.get(match.get(0, -1))
    return {"miou": float(ious.mean()), "object_ious": [float(v) for v in ious[1:]], "labels": labels,
            "own_labels": own, "background_ok": bool(background is not None and background.is_background)}


def run_scene(pipe: Any, seed: int, real_paths: list[tuple[str, int]], grid: tuple[int, int]) -> dict[str, Any]:
    from attnkit.bundled.scenes import render_scene
    from attnkit.segmentation import _candidates, capture, segment_capture

    scene = render_scene(seed)
    spec = scene.spec
    tok = pipe.tokenizer
    candidates = _candidates(tok, spec.caption, None)
    words, own = object_words(tok, spec), object_words(tok, spec, fill=True)
    row: dict[str, Any] = {"seed": seed, "objects": len(spec.objects), "fills": [o.fill for o in spec.objects]}

    captured = capture(pipe, spec.caption, None, self_res=None, seed=seed, progress=False)
    truth = generated_truth(captured.image, spec)
    row["found"] = [i for i, _ in truth]
    size = (captured.image.height, captured.image.width)
    for method, refine in VARIANTS:
        seg = segment_capture(captured, candidates, method=method, grid=grid, refine=refine)
        row[f"gen_{method}_{refine}"] = score_segmentation(seg, truth, words, own)
        if (method, refine) == ("kmeans", "bilateral"):
            row["segments_kmeans"] = len(seg.segments)
        if (method, refine) == ("merge", "bilateral"):
            row["segments_merge"] = len(seg.segments)
    truth_regions = regions(truth, size)
    xa = xattn_baseline(captured, candidates, size)
    row["gen_xattn"] = {"miou": float(hungarian_ious(xa, truth_regions)[0].mean())}
    for refine in ("bilateral", "none"):
        row[f"gen_ceiling_{refine}"] = {"miou": float(hungarian_ious(
            ceiling_map(truth_regions, grid, captured.image, refine), truth_regions)[0].mean())}

    real = real_truth(scene)
    for path, timestep in real_paths:
        image = scene.image
        captured = capture(pipe, spec.caption, image, self_res=None, real=path, timestep=timestep, seed=seed,
                           progress=False)
        for method in ("kmeans", "merge"):
            seg = segment_capture(captured, candidates, method=method, grid=grid)
            row[f"real_{path}{timestep if path == 'noise' else ''}_{method}"] = score_segmentation(
                seg, real, words, own)
        row[f"real_{path}{timestep if path == 'noise' else ''}_seconds"] = captured.seconds
    real_regions = regions(real, (scene.image.height, scene.image.width))
    row["real_ceiling"] = {"miou": float(hungarian_ious(
        ceiling_map(real_regions, grid, scene.image, "bilateral"), real_regions)[0].mean())}
    return row


def timing(pipe: Any, seed: int) -> tuple[float, float]:
    """CPU seconds of generating the scene's caption, and of segmenting it (default settings), same run."""
    from attnkit import generate, segment
    from attnkit.bundled.scenes import spec_for_seed

    caption = spec_for_seed(seed).caption
    start = time.process_time()
    generate(pipe, caption, seed=seed, progress=False)
    plain = time.process_time() - start
    start = time.process_time()
    segment(pipe, prompt=caption, seed=seed, progress=False)
    return plain, time.process_time() - start


# -- summary ------------------------------------------------------------------------------------------------
def mean(values: list[float]) -> float:
    return float(statistics.fmean(values)) if values else float("nan")


def summarize(rows: list[dict[str, Any]], key: str) -> dict[str, float]:
    """mIoU overall, per object count, per fill; label and background accuracy, for one variant."""
    scored = [r for r in rows if key in r]
    out = {"miou": mean([r[key]["miou"] for r in scored])}
    for n in (1, 2, 3):
        out[f"miou_{n}obj"] = mean([r[key]["miou"] for r in scored if r["objects"] == n])
    if scored and "object_ious" in scored[0][key]:
        gen = key.startswith("gen")
        solid, outlined, labels, own, background = [], [], [], [], []
        for r in scored:
            objects = r["found"] if gen else list(range(r["objects"]))
            for obj, iou in zip(objects, r[key]["object_ious"], strict=True):
                (solid if r["fills"][obj] == "solid" else outlined).append(iou)
            labels += r[key]["labels"]
            own += r[key]["own_labels"]
            background.append(r[key]["background_ok"])
        out.update(solid=mean(solid), outlined=mean(outlined), label_accuracy=mean([float(v) for v in labels]),
                   own_word_accuracy=mean([float(v) for v in own]),
                   background_accuracy=mean([float(v) for v in background]))
    return out


def print_table(title: str, entries: list[tuple[str, dict[str, float]]]) -> None:
    print(f"\n{title}")
    print("| variant | mIoU | 1 obj | 2 obj | 3 obj | solid | outlined | label acc | own word | bg acc |")
    print("|---|---|---|---|---|---|---|---|---|---|")
    for name, s in entries:
        cells = [s.get(k, float("nan")) for k in ("miou", "miou_1obj", "miou_2obj", "miou_3obj", "solid",
                                                   "outlined", "label_accuracy", "own_word_accuracy",
                                                   "background_accuracy")]
        print(f"| {name} | " + " | ".join("–" if np.isnan(c) else f"{c:.3f}" for c in cells) + " |")


# -- memory: SD1.5 UNet at 512 px, one step -----------------------------------------------------------------
MEMORY_MODES = ("stock", "segment_store", "per_layer_full")


def memory_child(mode: str) -> None:
    """One denoising step in this process; prints a JSON line with peak RSS before and after the step."""
    import resource

    from attnkit import control
    from attnkit.engine import Controller
    from attnkit.store import AttentionStore

    class PerLayerFull(Controller):
        """What a plain store does without the lean options: full per-head probabilities, one sum per layer."""

        def __init__(self) -> None:
            self.sums: dict[str, torch.Tensor] = {}

        def observe(self, call: Any) -> None:
            probs = call.probs(call.layout.cond_rows).float().mean(dim=1)
            name = call.layer.name
            self.sums[name] = probs.clone() if name not in self.sums else self.sums[name] + probs

    torch.set_num_threads(1)
    from p2p import sd15_pipeline  # SD1.5 at random weights, written out once (benchmarks/p2p.py)

    pipe = sd15_pipeline(512)
    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    stores: list[Any] = []
    if mode == "segment_store":  # what segment(method="merge") keeps: every self grid + cross, combined
        stores = [AttentionStore(kinds="self", res=None, combine_layers=True),
                  AttentionStore(kinds="cross", res=None, combine_layers=True)]
    elif mode == "per_layer_full":
        stores = [PerLayerFull()]
    start = time.process_time()
    with torch.no_grad(), control(pipe, *stores) as ctl:
        pipe("a red circle", num_inference_steps=1, guidance_scale=7.5, output_type="latent",
             callback_on_step_end=ctl.callback)
    seconds = time.process_time() - start
    after = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    kept = sum(t.numel() * t.element_size() for s in stores for t in s.sums.values() if t is not None) / 2**20
    print(json.dumps({"mode": mode, "rss_before_mb": before, "peak_rss_mb": after, "kept_mb": kept,
                      "cpu_s": seconds}))


def memory() -> dict[str, dict[str, float]]:
    out = {}
    for mode in MEMORY_MODES:
        done = subprocess.run([sys.executable, __file__, "--memory-child", mode], capture_output=True, text=True,
                              check=True, env={"OMP_NUM_THREADS": "1", **__import__("os").environ})
        out[mode] = json.loads(done.stdout.strip().splitlines()[-1])
    return out


# -- main ---------------------------------------------------------------------------------------------------
def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true", help="8 scenes, t = 300 only, invert on 4 (< 5 min)")
    parser.add_argument("--scenes", type=int, default=60)
    parser.add_argument("--seed-start", type=int, default=BENCH_START)
    parser.add_argument("--invert-scenes", type=int, default=None, help="scenes that also run real='invert'")
    parser.add_argument("--timing-scenes", type=int, default=None, help="scenes timed (default: all)")
    parser.add_argument("--model-dir", type=Path, default=MODEL_DIR)
    parser.add_argument("--memory", action="store_true", help="also measure SD1.5 peak memory (slow)")
    parser.add_argument("--memory-child", default=None, help=argparse.SUPPRESS)
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    if args.memory_child:
        memory_child(args.memory_child)
        return
    if args.quick:
        args.scenes = min(args.scenes, 8)
    invert_scenes = args.invert_scenes if args.invert_scenes is not None else (4 if args.quick else args.scenes)
    timing_scenes = args.timing_scenes if args.timing_scenes is not None else (4 if args.quick else args.scenes)
    timesteps = [300] if args.quick else [100, 300, 500]

    if not (args.model_dir / "model_index.json").is_file():
        print(f"no model at {args.model_dir} (model_index.json): nothing to measure")
        print(json.dumps({"miou_kmeans": None, "miou_merge": None, "miou_xattn_baseline": None,
                          "miou_real": None, "label_accuracy": None, "time_ratio": None}))
        return
    summary: dict[str, Any] = {}
    if args.scenes > 0:
        summary.update(quality(args, timesteps, invert_scenes, timing_scenes))
    if args.memory:
        summary.update(memory_table())
    print(json.dumps(summary))


def quality(args: argparse.Namespace, timesteps: list[int], invert_scenes: int, timing_scenes: int
            ) -> dict[str, Any]:
    from attnkit.models import load_pipeline
    from attnkit.segmentation import DEFAULT_TIMESTEP, self_attention_grids

    pipe = load_pipeline(str(args.model_dir))
    pipe.set_progress_bar_config(disable=True)
    grid = self_attention_grids(pipe, pipe.unet.config.sample_size * pipe.vae_scale_factor,
                                pipe.unet.config.sample_size * pipe.vae_scale_factor)[0]
    rows, ratios, cpu = [], [], {"generate": 0.0, "segment": 0.0}
    if timing_scenes:
        timing(pipe, 10_200_000)  # warm-up (first calls of scikit-learn and the stores), not counted
    wall = time.perf_counter()
    for k in range(args.scenes):
        seed = args.seed_start + k
        paths = [("noise", t) for t in timesteps] + ([("invert", 0)] if k < invert_scenes else [])
        rows.append(run_scene(pipe, seed, paths, grid))
        if k < timing_scenes:
            plain, seg = timing(pipe, seed)
            ratios.append(seg / plain)
            cpu["generate"] += plain
            cpu["segment"] += seg
        print(f"scene {k + 1}/{args.scenes} seed {seed}: kmeans {rows[-1]['gen_kmeans_bilateral']['miou']:.3f} "
              f"merge {rows[-1]['gen_merge_bilateral']['miou']:.3f} xattn {rows[-1]['gen_xattn']['miou']:.3f} "
              f"({time.perf_counter() - wall:.0f} s)", file=sys.stderr, flush=True)

    n_found = sum(len(r["found"]) for r in rows)
    n_objects = sum(r["objects"] for r in rows)
    print(f"Self-segmentation on the bundled model ({args.model_dir.name}), {len(rows)} held-out scenes "
          f"(seeds {args.seed_start}..{args.seed_start + len(rows) - 1}), {grid[0]}x{grid[1]} attention grid; "
          f"generated: {n_found}/{n_objects} caption objects drawn and scored")
    gen = {f"{m} + {r}": summarize(rows, f"gen_{m}_{r}") for m, r in VARIANTS}
    entries = [(f"self-seg {name}", s) for name, s in gen.items()]
    entries += [("cross-attention only (DAAM, 0.4 x max)", summarize(rows, "gen_xattn")),
                ("grid ceiling (GT pooled), bilateral", summarize(rows, "gen_ceiling_bilateral")),
                ("grid ceiling (GT pooled), bilinear", summarize(rows, "gen_ceiling_none"))]
    print_table("Generated images (maps from the generation pass)", entries)
    real_keys = [f"noise{t}" for t in timesteps] + (["invert"] if invert_scenes else [])
    real_entries = []
    for key in real_keys:
        for method in ("kmeans", "merge"):
            real_entries.append((f"{method}, real={key.rstrip('0123456789')}"
                                 f"{' t=' + key[5:] if key.startswith('noise') else ''}",
                                 summarize(rows, f"real_{key}_{method}")))
    real_entries.append(("grid ceiling (exact masks pooled), bilateral", summarize(rows, "real_ceiling")))
    print_table("Real images (rendered scenes, exact masks; bilateral refinement)", real_entries)
    for key in real_keys:
        secs = [r[f"real_{key}_seconds"] for r in rows if f"real_{key}_seconds" in r]
        print(f"real={key}: {mean(secs):.2f} s wall per image for the attention pass ({len(secs)} scenes)")
    print(f"\nSpeed: segment() / generate() CPU time, {len(ratios)} scenes: median {statistics.median(ratios):.3f}, "
          f"mean {mean(ratios):.3f}, max {max(ratios):.3f}; total {cpu['segment']:.1f} s / {cpu['generate']:.1f} s "
          f"= {cpu['segment'] / cpu['generate']:.3f}")
    print(f"segments per image: kmeans {mean([r['segments_kmeans'] for r in rows]):.2f}, merge "
          f"{mean([r['segments_merge'] for r in rows]):.2f}")

    best_real = f"real_noise{DEFAULT_TIMESTEP}_kmeans"  # the library's default real-image path
    summary: dict[str, Any] = {
        "miou_kmeans": round(gen["kmeans + bilateral"]["miou"], 4),
        "miou_merge": round(gen["merge + bilateral"]["miou"], 4),
        "miou_xattn_baseline": round(summarize(rows, "gen_xattn")["miou"], 4),
        "miou_real": round(summarize(rows, best_real)["miou"], 4),
        "label_accuracy": round(gen["kmeans + bilateral"]["label_accuracy"], 4),
        "time_ratio": round(statistics.median(ratios), 4),
        "time_ratio_total": round(cpu["segment"] / cpu["generate"], 4),
        "miou_kmeans_no_refine": round(gen["kmeans + none"]["miou"], 4),
        "miou_merge_no_refine": round(gen["merge + none"]["miou"], 4),
        "miou_real_merge": round(summarize(rows, f"real_noise{DEFAULT_TIMESTEP}_merge")["miou"], 4),
        "label_accuracy_merge": round(gen["merge + bilateral"]["label_accuracy"], 4),
        "label_accuracy_real": round(summarize(rows, best_real)["label_accuracy"], 4),
        "grid_ceiling": round(summarize(rows, "gen_ceiling_bilateral")["miou"], 4),
        "scenes": len(rows), "objects_scored": n_found, "objects_in_captions": n_objects,
    }
    if invert_scenes:
        summary["miou_real_invert"] = round(summarize(rows, "real_invert_kmeans")["miou"], 4)
    return summary


def memory_table() -> dict[str, Any]:
    summary: dict[str, Any] = {}
    mem = memory()
    print("\nMemory: one denoising step (CFG) of a random SD1.5 UNet at 512 x 512, CPU, fresh process each")
    print("| aggregation | peak RSS MB | over stock MB | maps kept MB | CPU s |")
    print("|---|---|---|---|---|")
    base = mem["stock"]["peak_rss_mb"]
    names = {"stock": "none (stock diffusers step)",
             "segment_store": "segment(): one running sum per grid, blocked head mean",
             "per_layer_full": "per-layer sums, full per-head probabilities"}
    for mode in MEMORY_MODES:
        m = mem[mode]
        print(f"| {names[mode]} | {m['peak_rss_mb']:.0f} | {m['peak_rss_mb'] - base:.0f} | {m['kept_mb']:.0f} "
              f"| {m['cpu_s']:.1f} |")
    summary["sd15_peak_rss_mb"] = round(mem["segment_store"]["peak_rss_mb"], 1)
    summary["sd15_extra_rss_mb"] = round(mem["segment_store"]["peak_rss_mb"] - base, 1)
    summary["sd15_extra_rss_mb_per_layer_full"] = round(mem["per_layer_full"]["peak_rss_mb"] - base, 1)
    return summary


if __name__ == "__main__":
    main()

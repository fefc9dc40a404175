"""What does attention control cost on MM-DiT transformers? Stock diffusers vs attnkit on SD3 and FLUX.

The SD3 network is the real SD3-medium transformer architecture (``stabilityai/stable-diffusion-3-medium``,
``transformer/config.json``: 24 joint blocks of 24 heads x 64, 2B parameters) with random weights, built from
its config (no download); ``--sd3-layers`` keeps the width and cuts the depth (``--quick``: 3 blocks, so the
run fits five minutes of one CPU thread). FLUX is the FLUX.1-dev transformer config (width 3072: 24 heads x 128,
T5 width 4096, guidance embedding) reduced in depth only (``--flux-double``/``--flux-single`` blocks). Text
encoders are replaced by random embeddings of the real shapes (SD3: 77 CLIP + 256 T5 tokens of 4096, pooled
2048; FLUX: 512 T5 tokens of 4096, pooled 768); the loops are the pipelines' own (flow-matching Euler; SD3
with classifier-free guidance, FLUX guidance-distilled). Variants, each against stock in the same rounds:

- ``store``: ``AttentionStore`` of every layer's image x text block, head-averaged (what word maps need);
- ``p2p`` (SD3): a Prompt-to-Prompt word swap whose words change token counts (``Replace``: every layer's
  image x text maps materialised, mixed through the mapper and put back into the joint attention for 80% of the
  steps; the self copy for 40%), against stock with the same two prompts (batch 4).

Time: variants interleaved in rounds (order rotated), ratio = median over rounds of variant / stock CPU time of
the same round (one torch thread, so CPU time is compute time). Memory (SD3 stock vs store): each in a fresh
subprocess, peak RSS (``VmHWM`` reset right before sampling), whole process and the extra above the loaded model.

    python benchmarks/overhead_mmdit.py --quick   # SD3 width x 3 blocks, FLUX 1+1 blocks at 128 px, 1 step (~4 CPU min)
    python benchmarks/overhead_mmdit.py           # SD3-medium (24 blocks), FLUX 1+2 blocks at 256 px, 3 steps
"""

from __future__ import annotations

import argparse
import json
import re
import statistics
import subprocess
import sys
import time
import types
from contextlib import contextmanager
from pathlib import Path
from typing import Any
from unittest import mock

import torch

SD3_MEDIUM = dict(sample_size=128, patch_size=2, in_channels=16, out_channels=16, num_layers=24,
                  attention_head_dim=64, num_attention_heads=24, joint_attention_dim=4096,
                  caption_projection_dim=1536, pooled_projection_dim=2048, pos_embed_max_size=192)
FLUX_DEV = dict(patch_size=1, in_channels=64, num_layers=19, num_single_layers=38, attention_head_dim=128,
                num_attention_heads=24, joint_attention_dim=4096, pooled_projection_dim=768, guidance_embeds=True,
                axes_dims_rope=(16, 56, 56))
SD3_TEXT, FLUX_TEXT = 77 + 256, 512
GUIDANCE = 7.0
P2P_PROMPTS = ["a cat wearing sunglasses", "a dog wearing red"]  # "sunglasses" is two tokens, "red" one


@contextmanager
def _fast_init():
    # Random weights are what we want, but torch's kaiming init of 2B parameters takes a minute on one core:
    # skip it and fill every weight with N(0, 0.02) afterwards (norms keep their ones, buffers are computed).
    with mock.patch.object(torch.nn.init, "kaiming_uniform_", lambda t, *a, **k: t), \
            mock.patch.object(torch.nn.init, "uniform_", lambda t, *a, **k: t):
        yield


def build(family: str, args: argparse.Namespace) -> Any:
    from diffusers import FluxTransformer2DModel, SD3Transformer2DModel

    with _fast_init():
        if family == "sd3":
            model = SD3Transformer2DModel(**{**SD3_MEDIUM, "num_layers": args.sd3_layers})
        else:
            model = FluxTransformer2DModel(**{**FLUX_DEV, "num_layers": args.flux_double,
                                              "num_single_layers": args.flux_single})
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.ndim >= 2:
                p.normal_(0.0, 0.02, generator=g)
            elif name.endswith("bias"):
                p.zero_()  # norm weights keep their ones
    return model.eval()


def tokenizer(family: str) -> Any:
    """Locally built CLIP/T5 tokenizers numbering the text columns (the embeddings themselves are random)."""
    from attnkit.testing import TEST_WORDS, build_clip_tokenizer, build_t5_tokenizer
    from attnkit.tokens import Segment, SegmentedTokenizer

    clip = build_clip_tokenizer(TEST_WORDS, keep_split=["sunglasses"])
    t5 = build_t5_tokenizer(TEST_WORDS, keep_split=["sunglasses"])
    if family == "sd3":
        return clip, t5, SegmentedTokenizer([Segment(clip, 77), Segment(t5, 256)], "SD3")
    return clip, t5, SegmentedTokenizer([Segment(t5, FLUX_TEXT)], "FLUX")


def inputs(family: str, size: int, prompts: int, seed: int = 0) -> dict[str, torch.Tensor]:
    g = torch.Generator("cpu").manual_seed(seed)
    latent = size // 8
    if family == "sd3":
        rows = 2 * prompts  # [negative, positive]
        return dict(noise=torch.randn(1, 16, latent, latent, generator=g).expand(prompts, -1, -1, -1).clone(),
                    text=torch.randn(rows, SD3_TEXT, 4096, generator=g), pooled=torch.randn(rows, 2048, generator=g))
    grid = latent // 2
    ids = torch.zeros(grid, grid, 3)
    ids[..., 1], ids[..., 2] = torch.arange(grid)[:, None], torch.arange(grid)[None, :]
    return dict(noise=torch.randn(prompts, grid * grid, 64, generator=g), text=torch.randn(prompts, FLUX_TEXT, 4096,
                generator=g), pooled=torch.randn(prompts, 768, generator=g), img_ids=ids.reshape(-1, 3),
                txt_ids=torch.zeros(FLUX_TEXT, 3))


@torch.no_grad()
def denoise(family: str, model: Any, scheduler: Any, x: dict[str, torch.Tensor], steps: int) -> torch.Tensor:
    """StableDiffusion3Pipeline's / FluxPipeline's loop on latents."""
    scheduler.set_timesteps(steps)
    latents = x["noise"].clone()
    for t in scheduler.timesteps:
        if family == "sd3":
            both = torch.cat([latents] * 2)
            eps = model(hidden_states=both, timestep=t.expand(both.shape[0]), encoder_hidden_states=x["text"],
                        pooled_projections=x["pooled"], return_dict=False)[0]
            uncond, cond = eps.chunk(2)
            eps = uncond + GUIDANCE * (cond - uncond)
        else:
            b = latents.shape[0]
            eps = model(hidden_states=latents, timestep=t.expand(b) / 1000, guidance=torch.full((b,), 3.5),
                        pooled_projections=x["pooled"], encoder_hidden_states=x["text"], txt_ids=x["txt_ids"],
                        img_ids=x["img_ids"], return_dict=False)[0]
        latents = scheduler.step(eps, t, latents, return_dict=False)[0]
    return latents


def controllers(name: str, family: str, tok: Any) -> list[Any]:
    from attnkit import AttentionStore, Replace

    if name == "store":
        return [AttentionStore(kinds="cross", res=None)]
    if name == "p2p":
        return [Replace(P2P_PROMPTS, tok, cross_steps=0.8, self_steps=0.4)]
    return []


@contextmanager
def variant(name: str, family: str, model: Any, scheduler: Any):
    from attnkit import control

    chosen = controllers(name, family, TOKENIZERS[family][2])
    if not chosen:
        yield chosen
        return
    clip, t5, _ = TOKENIZERS[family]
    # What the engine reads from a pipeline: the denoiser, the scheduler's timesteps, CFG, the tokenizers.
    pipe = types.SimpleNamespace(transformer=model, scheduler=scheduler, do_classifier_free_guidance=True,
                                 tokenizer=clip, tokenizer_2=t5, tokenizer_3=t5)
    with control(pipe, *chosen):
        yield chosen
    if name == "store":
        assert chosen[0].sums, "the store recorded nothing"


TOKENIZERS: dict[str, Any] = {}


def scheduler_for(family: str) -> Any:
    from diffusers import FlowMatchEulerDiscreteScheduler

    return FlowMatchEulerDiscreteScheduler(shift=3.0)


def _vm(field: str) -> int:
    return int(re.search(rf"{field}:\s+(\d+) kB", Path("/proc/self/status").read_text()).group(1)) * 1024


def memory_child(args: argparse.Namespace) -> dict[str, Any]:
    family, name = args.child.split(":")
    TOKENIZERS[family] = tokenizer(family)
    model, scheduler = build(family, args), scheduler_for(family)
    x = inputs(family, args.size if family == "sd3" else args.flux_size, 2 if name.startswith("p2p") else 1)
    before = _vm("VmRSS")
    Path("/proc/self/clear_refs").write_text("5")  # reset the peak (VmHWM) to the current RSS
    with variant(name, family, model, scheduler):
        denoise(family, model, scheduler, x, args.steps)
    peak = _vm("VmHWM")
    return {"variant": args.child, "rss_before": before, "peak": peak, "extra": peak - before}


def measure_memory(args: argparse.Namespace, runs: list[str]) -> dict[str, dict[str, Any]]:
    results = {}
    for run in runs:
        cmd = [sys.executable, __file__, "--child", run, *args.passthrough]
        out = subprocess.run(cmd, capture_output=True, text=True, check=False)
        if out.returncode != 0:
            raise SystemExit(f"memory run of {run} failed:\n{out.stderr[-3000:]}")
        results[run] = json.loads(out.stdout.strip().splitlines()[-1])
        print(f"  memory {run}: peak {results[run]['peak'] / 2**30:.2f} GiB", file=sys.stderr, flush=True)
    return results


def measure_time(family: str, args: argparse.Namespace, names: list[str]) -> tuple[dict, dict]:
    """CPU seconds per round for each (variant, stock twin) pair, and the max |Δ| of each variant vs its twin."""
    model, scheduler = build(family, args), scheduler_for(family)
    size = args.size if family == "sd3" else args.flux_size
    one, two = inputs(family, size, 1), inputs(family, size, 2)
    runs = []  # (label, variant, inputs)
    for name in names:
        runs += [(f"stock:{name}", "stock", two if name == "p2p" else one), (name, name, two if name == "p2p" else one)]
    labels = list(dict.fromkeys(r[0] for r in runs))
    runs = list({r[0]: r for r in runs}.values())
    times: dict[str, list[float]] = {label: [] for label in labels}
    outputs: dict[str, torch.Tensor] = {}
    denoise(family, model, scheduler, one, 1)  # warm-up
    for r in range(args.rounds):
        order = runs[r % len(runs):] + runs[: r % len(runs)]
        for label, name, x in order:
            start = time.process_time()
            with variant(name, family, model, scheduler):
                outputs[label] = denoise(family, model, scheduler, x, args.steps)
            times[label].append(time.process_time() - start)
        print(f"  {family} round {r + 1}/{args.rounds} (cpu s): "
              + ", ".join(f"{k} {v[-1]:.1f}" for k, v in times.items()), file=sys.stderr, flush=True)
    diffs = {name: float((outputs[name] - outputs[f"stock:{name}"]).abs().max()) for name in names}
    return times, diffs


def ratio(times: dict[str, list[float]], name: str) -> tuple[float, float, float]:
    ratios = [t / s for t, s in zip(times[name], times[f"stock:{name}"], strict=True)]
    return statistics.median(ratios), min(ratios), max(ratios)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="fewer blocks, steps and rounds (under 5 minutes)")
    parser.add_argument("--size", type=int, default=256, help="SD3 image side in pixels")
    parser.add_argument("--flux-size", type=int, default=None, help="FLUX image side (default 256; --quick 128)")
    parser.add_argument("--steps", type=int, default=None, help="denoising steps (default 3; --quick 1)")
    parser.add_argument("--rounds", type=int, default=None, help="interleaved rounds (default 3)")
    parser.add_argument("--sd3-layers", type=int, default=None, help="SD3 blocks (default 24; --quick 3)")
    parser.add_argument("--flux-double", type=int, default=None, help="FLUX double blocks (default 1)")
    parser.add_argument("--flux-single", type=int, default=None, help="FLUX single blocks (default 2; --quick 1)")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--child", help=argparse.SUPPRESS)
    args = parser.parse_args()
    args.steps = args.steps or (1 if args.quick else 3)
    args.rounds = args.rounds or 3
    args.sd3_layers = args.sd3_layers or (3 if args.quick else 24)
    args.flux_double = args.flux_double or 1
    args.flux_single = args.flux_single or (1 if args.quick else 2)
    args.flux_size = args.flux_size or (128 if args.quick else 256)
    args.passthrough = ["--size", str(args.size), "--flux-size", str(args.flux_size), "--steps", str(args.steps),
                        "--sd3-layers", str(args.sd3_layers), "--flux-double", str(args.flux_double),
                        "--flux-single", str(args.flux_single), "--threads", str(args.threads)]
    torch.set_num_threads(args.threads)
    if args.child:
        print(json.dumps(memory_child(args)))
        return

    started = time.perf_counter()
    memory = measure_memory(args, ["sd3:stock", "sd3:store"])
    for family in ("sd3", "flux"):
        TOKENIZERS[family] = tokenizer(family)
    sd3_times, sd3_diffs = measure_time("sd3", args, ["store", "p2p"])
    flux_times, flux_diffs = measure_time("flux", args, ["store"])
    gib = 2**30
    print(f"\nMM-DiT transformers with random weights, one CPU thread, {args.rounds} interleaved rounds of "
          f"{args.steps} step(s); {sys.platform}, torch {torch.__version__}")
    print(f"SD3: SD3-medium width, {args.sd3_layers} of 24 blocks, {args.size}x{args.size} "
          f"({(args.size // 16) ** 2} image + {SD3_TEXT} text tokens), CFG. FLUX: FLUX.1-dev width, "
          f"{args.flux_double} double + {args.flux_single} single blocks, {args.flux_size}x{args.flux_size} "
          f"({(args.flux_size // 16) ** 2} image + {FLUX_TEXT} text tokens), guidance-distilled.")
    header = (f"{'model':<5} {'variant':<8} {'batch':>5} {'stock cpu s':>11} {'cpu s':>7} {'time ratio':>10} "
              f"{'(range)':>11} {'max |Δ| vs stock':>17}")
    print(header)
    print("-" * len(header))
    rows = {}
    for family, times, diffs, names in (("sd3", sd3_times, sd3_diffs, ["store", "p2p"]),
                                        ("flux", flux_times, flux_diffs, ["store"])):
        for name in names:
            med, low, high = ratio(times, name)
            rows[(family, name)] = med
            batch = {"sd3": 2, "flux": 1}[family] * (2 if name == "p2p" else 1)
            diff = f"{diffs[name]:.2e}" if name == "store" else "(an edit)"
            print(f"{family:<5} {name:<8} {batch:>5} {statistics.median(times[f'stock:{name}']):>11.2f} "
                  f"{statistics.median(times[name]):>7.2f} {med:>10.3f} {f'{low:.2f}..{high:.2f}':>11} {diff:>17}")
    stock_m, store_m = memory["sd3:stock"], memory["sd3:store"]
    mem_ratio = store_m["peak"] / stock_m["peak"]
    extra_ratio = store_m["extra"] / stock_m["extra"]
    print(f"\nSD3 memory (fresh process each): stock peak {stock_m['peak'] / gib:.2f} GiB (extra "
          f"{stock_m['extra'] / gib:.3f}), store peak {store_m['peak'] / gib:.2f} GiB (extra "
          f"{store_m['extra'] / gib:.3f}): peak ratio {mem_ratio:.3f}, extra ratio {extra_ratio:.2f}")
    print("time ratio: median over rounds of variant / stock CPU seconds in the same round (range: the rounds' "
          "spread). p2p is compared with stock sampling of the same two prompts.")
    headline = {
        "time_ratio_store_sd3": round(rows[("sd3", "store")], 4),
        "mem_ratio_store_sd3": round(mem_ratio, 4),
        "extra_mem_ratio_store_sd3": round(extra_ratio, 4),
        "time_ratio_p2p_sd3": round(rows[("sd3", "p2p")], 4),
        "time_ratio_store_flux": round(rows[("flux", "store")], 4),
        "max_abs_diff_store_sd3": sd3_diffs["store"], "max_abs_diff_store_flux": flux_diffs["store"],
        "sd3_layers": args.sd3_layers, "flux_blocks": [args.flux_double, args.flux_single], "size": args.size,
        "flux_size": args.flux_size, "steps": args.steps, "rounds": args.rounds, "threads": args.threads,
        "seconds": round(time.perf_counter() - started, 1),
    }
    print(json.dumps(headline))


if __name__ == "__main__":
    main()

"""What does reading attention cost? Stock diffusers sampling vs sampling under attnkit with attention stores.

The network is the real Stable Diffusion 1.5 UNet architecture (860M parameters) with random weights, built
from its config (no download); the text encoder is replaced by random 77x768 embeddings, and a DDIM loop with
classifier-free guidance (batch 2) runs it exactly as ``StableDiffusionPipeline`` does. Variants:

- ``stock``: diffusers' default processors (fused SDPA attention), no attnkit;
- ``store``: ``AttentionStore`` of the cross-attention maps at 16x16 and 32x32 (what word heatmaps need);
- ``store+self32``: the same plus self-attention maps at 32x32 (1024x1024 per layer, computed explicitly);
- ``explicit``: diffusers' ``AttnProcessor`` everywhere (softmax(QK^T)V materialised in every layer), for context.

Then the MM-DiT rows (``benchmarks/overhead_mmdit.py``, run as a subprocess with the same ``--quick`` and
``--threads``; its table is printed here and its headline keys join this script's last line): the SD3-medium
transformer architecture (map store, a Prompt-to-Prompt edit, peak memory) and a FLUX.1-dev-width transformer
reduced in depth (map store). ``--families unet`` or ``--families mmdit`` runs one part only.

Time: all variants run in one process, interleaved in rounds (order rotated each round), so background load hits
them alike; the ratio is the median over rounds of (variant time / stock time of the same round). The headline
uses the process's CPU time (one torch thread, so CPU time is compute time; on a shared machine it is far less
disturbed by other processes than wall time, which is reported beside it).
Memory: each variant samples once in a fresh subprocess; its peak resident set size (Linux ``VmHWM``, reset via
``/proc/self/clear_refs`` right before sampling) is compared. Reported as the whole-process peak (weights
included: what a user's machine must hold) and as the extra memory sampling needs above the loaded model.

    python benchmarks/overhead.py --quick        # UNet: 256x256, 1 step, 4 rounds; then the MM-DiT --quick rows
                                                 # (~4 + ~3 CPU minutes: each part alone is under 5)
    python benchmarks/overhead.py                # UNet: 256x256, 3 steps, 3 rounds; then the full MM-DiT rows
    python benchmarks/overhead.py --quick --families mmdit   # the SD3/FLUX rows only
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

import torch

# Stable Diffusion 1.5's UNet (runwayml/stable-diffusion-v1-5, unet/config.json), written out.
SD15_UNET_CONFIG: dict[str, Any] = dict(
    sample_size=64, in_channels=4, out_channels=4, center_input_sample=False, flip_sin_to_cos=True, freq_shift=0,
    down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"),
    up_block_types=("UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"),
    block_out_channels=(320, 640, 1280, 1280), layers_per_block=2, downsample_padding=1, mid_block_scale_factor=1,
    act_fn="silu", norm_num_groups=32, norm_eps=1e-5, cross_attention_dim=768, attention_head_dim=8,
)
# Stable Diffusion 1.5's scheduler settings, as DDIM.
SD15_DDIM = dict(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear", clip_sample=False,
                 set_alpha_to_one=False, steps_offset=1)
VARIANTS = ("stock", "store", "store+self32", "explicit")
GUIDANCE = 7.5
MMDIT_SCRIPT = Path(__file__).with_name("overhead_mmdit.py")
# Keys of overhead_mmdit.py's headline that name run settings this script's headline also has.
MMDIT_RENAMED = {"size": "sd3_size", "steps": "mmdit_steps", "rounds": "mmdit_rounds", "threads": "mmdit_threads",
                 "seconds": "mmdit_seconds"}


def build_unet(seed: int = 0) -> Any:
    from diffusers import UNet2DConditionModel

    torch.manual_seed(seed)
    return UNet2DConditionModel(**SD15_UNET_CONFIG).eval()


def make_inputs(size: int, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """Initial noise (1, 4, size/8, size/8) and [unconditional; conditional] embeddings (2, 77, 768)."""
    g = torch.Generator("cpu").manual_seed(seed)
    noise = torch.randn(1, 4, size // 8, size // 8, generator=g)
    embeddings = torch.randn(2, 77, 768, generator=g)
    return noise, embeddings


@torch.no_grad()
def denoise(unet: Any, scheduler: Any, noise: torch.Tensor, embeddings: torch.Tensor, steps: int) -> torch.Tensor:
    """The DDIM + classifier-free-guidance loop of StableDiffusionPipeline, on latents."""
    scheduler.set_timesteps(steps)
    latents = noise * scheduler.init_noise_sigma
    for t in scheduler.timesteps:
        model_input = scheduler.scale_model_input(torch.cat([latents] * 2), t)
        eps = unet(model_input, t, encoder_hidden_states=embeddings).sample
        uncond, cond = eps.chunk(2)
        latents = scheduler.step(uncond + GUIDANCE * (cond - uncond), t, latents).prev_sample
    return latents


@contextmanager
def variant(name: str, unet: Any, scheduler: Any):
    """Set up one variant around a sampling run; yields the attnkit stores (empty for non-attnkit variants)."""
    from diffusers.models.attention_processor import AttnProcessor

    from attnkit import AttentionStore, control

    if name == "stock":
        yield []
    elif name == "explicit":
        saved = dict(unet.attn_processors)
        unet.set_attn_processor(AttnProcessor())
        try:
            yield []
        finally:
            unet.set_attn_processor(saved)
    else:
        stores = [AttentionStore(kinds="cross", res=(16, 32))]
        if name == "store+self32":
            stores.append(AttentionStore(kinds="self", res=32))
        # The engine reads the step from scheduler.timesteps and the CFG layout from the pipeline.
        pipe = types.SimpleNamespace(unet=unet, scheduler=scheduler, do_classifier_free_guidance=True)
        with control(pipe, *stores):
            yield stores
    if name.startswith("store"):
        assert all(store.sums for store in stores), "a store recorded nothing"


def _vm(field: str) -> int:
    """A /proc/self/status memory field in bytes."""
    return int(re.search(rf"{field}:\s+(\d+) kB", Path("/proc/self/status").read_text()).group(1)) * 1024


def memory_child(name: str, size: int, steps: int) -> dict[str, Any]:
    """Runs in a fresh process: peak RSS while sampling one variant once."""
    from diffusers import DDIMScheduler

    unet, scheduler = build_unet(), DDIMScheduler(**SD15_DDIM)
    noise, embeddings = make_inputs(size)
    before = _vm("VmRSS")
    Path("/proc/self/clear_refs").write_text("5")  # reset the peak (VmHWM) to the current RSS
    with variant(name, unet, scheduler):
        denoise(unet, scheduler, noise, embeddings, steps)
    peak = _vm("VmHWM")
    return {"variant": name, "rss_before": before, "peak": peak, "extra": peak - before}


def measure_memory(args: argparse.Namespace) -> dict[str, dict[str, Any]]:
    results = {}
    for name in VARIANTS:
        cmd = [sys.executable, __file__, "--child", name, "--size", str(args.size), "--steps", str(args.steps),
               "--threads", str(args.threads)]
        out = subprocess.run(cmd, capture_output=True, text=True, check=False)
        if out.returncode != 0:
            raise SystemExit(f"memory run of {name} failed:\n{out.stderr[-3000:]}")
        results[name] = json.loads(out.stdout.strip().splitlines()[-1])
        print(f"  memory {name}: peak {results[name]['peak'] / 2**30:.2f} GiB", file=sys.stderr, flush=True)
    return results


def measure_time(args: argparse.Namespace) -> tuple[dict[str, list[float]], dict[str, float]]:
    from diffusers import DDIMScheduler

    unet, scheduler = build_unet(), DDIMScheduler(**SD15_DDIM)
    noise, embeddings = make_inputs(args.size)
    times: dict[str, list[float]] = {name: [] for name in VARIANTS}
    walls: dict[str, list[float]] = {name: [] for name in VARIANTS}
    outputs: dict[str, torch.Tensor] = {}
    with variant("stock", unet, scheduler):
        denoise(unet, scheduler, noise, embeddings, 1)  # warm-up: first-call allocations and kernel choices
    for r in range(args.rounds):
        order = VARIANTS[r % len(VARIANTS):] + VARIANTS[: r % len(VARIANTS)]
        for name in order:
            start, start_cpu = time.perf_counter(), time.process_time()
            with variant(name, unet, scheduler):
                outputs[name] = denoise(unet, scheduler, noise, embeddings, args.steps)
            times[name].append(time.process_time() - start_cpu)
            walls[name].append(time.perf_counter() - start)
        print(f"  round {r + 1}/{args.rounds} (cpu s): " + ", ".join(f"{n} {times[n][-1]:.1f}" for n in VARIANTS),
              file=sys.stderr, flush=True)
    diffs = {name: float((outputs[name] - outputs["stock"]).abs().max()) for name in VARIANTS}
    return times, walls, diffs


def paired_ratios(times: dict[str, list[float]], name: str) -> list[float]:
    return [t / s for t, s in zip(times[name], times["stock"], strict=True)]


def paired_ratio(times: dict[str, list[float]], name: str) -> float:
    return statistics.median(paired_ratios(times, name))


def run_mmdit(args: argparse.Namespace) -> dict[str, Any]:
    """The SD3/FLUX rows: ``overhead_mmdit.py`` in a subprocess (it spawns its own memory children); its table is
    printed here, its last-line JSON returned with the run-setting keys renamed (``MMDIT_RENAMED``)."""
    cmd = [sys.executable, str(MMDIT_SCRIPT), "--threads", str(args.threads), *(["--quick"] if args.quick else [])]
    out = subprocess.run(cmd, stdout=subprocess.PIPE, text=True, check=False)  # its progress goes to our stderr
    if out.returncode != 0:
        raise SystemExit(f"benchmarks/overhead_mmdit.py failed (exit {out.returncode}); see its output above")
    lines = out.stdout.strip().splitlines()
    print("\n".join(lines[:-1]), flush=True)
    return {MMDIT_RENAMED.get(k, k): v for k, v in json.loads(lines[-1]).items()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="1 step per run, 4 rounds (a few minutes)")
    parser.add_argument("--size", type=int, default=256, help="image side in pixels (latents are size/8)")
    parser.add_argument("--steps", type=int, default=None, help="DDIM steps per run (default 3; --quick: 1)")
    parser.add_argument("--rounds", type=int, default=None, help="interleaved timing rounds (3; --quick: 4)")
    parser.add_argument("--threads", type=int, default=1, help="torch CPU threads")
    parser.add_argument("--families", choices=("all", "unet", "mmdit"), default="all",
                        help="which rows: the SD1.5 UNet, the SD3/FLUX transformers (overhead_mmdit.py), or both")
    parser.add_argument("--child", choices=VARIANTS, help=argparse.SUPPRESS)
    args = parser.parse_args()
    args.steps = args.steps or (1 if args.quick else 3)
    args.rounds = args.rounds or (4 if args.quick else 3)
    torch.set_num_threads(args.threads)
    if args.child:
        print(json.dumps(memory_child(args.child, args.size, args.steps)))
        return

    started = time.perf_counter()
    if args.families == "mmdit":
        print(json.dumps(run_mmdit(args)))
        return
    memory = measure_memory(args)
    times, walls, diffs = measure_time(args)
    gib = 2**30
    stock_mem = memory["stock"]
    print(f"\nSD1.5 UNet architecture (random weights), {args.size}x{args.size} "
          f"({args.size // 8}x{args.size // 8} latents), DDIM {args.steps} step(s), CFG batch 2, "
          f"{args.threads} CPU thread(s), {args.rounds} interleaved rounds; {sys.platform}, torch {torch.__version__}")
    header = (f"{'variant':<14} {'cpu s':>7} {'time ratio':>10} {'(range)':>13} {'wall ratio':>10} {'peak GiB':>9} "
              f"{'peak ratio':>10} "
              f"{'extra GiB':>9} {'extra ratio':>11} {'max |Δ| vs stock':>17}")
    print(header)
    print("-" * len(header))
    rows = {}
    for name in VARIANTS:
        m = memory[name]
        rows[name] = dict(time_ratio=paired_ratio(times, name), wall_ratio=paired_ratio(walls, name),
                          mem_ratio=m["peak"] / stock_mem["peak"], extra_ratio=m["extra"] / stock_mem["extra"])
        spread = paired_ratios(times, name)
        print(f"{name:<14} {statistics.median(times[name]):>7.2f} {rows[name]['time_ratio']:>10.3f} "
              f"{f'{min(spread):.2f}..{max(spread):.2f}':>13} {rows[name]['wall_ratio']:>10.3f} "
              f"{m['peak'] / gib:>9.2f} {rows[name]['mem_ratio']:>10.3f} {m['extra'] / gib:>9.3f} "
              f"{rows[name]['extra_ratio']:>11.2f} {diffs[name]:>17.2e}")
    print("time/wall ratio: median over rounds of variant/stock CPU/wall seconds in the same round (range: the "
          "rounds' spread, i.e. the noise of this machine). peak: whole-process peak RSS while sampling (fresh "
          "process per variant); extra: peak minus RSS with the model loaded.")
    headline = {
        "time_ratio_store": round(rows["store"]["time_ratio"], 4),
        "wall_ratio_store": round(rows["store"]["wall_ratio"], 4),
        "mem_ratio_store": round(rows["store"]["mem_ratio"], 4),
        "extra_mem_ratio_store": round(rows["store"]["extra_ratio"], 4),
        "time_ratio_store_self32": round(rows["store+self32"]["time_ratio"], 4),
        "mem_ratio_store_self32": round(rows["store+self32"]["mem_ratio"], 4),
        "extra_mem_ratio_store_self32": round(rows["store+self32"]["extra_ratio"], 4),
        "time_ratio_explicit": round(rows["explicit"]["time_ratio"], 4),
        "mem_ratio_explicit": round(rows["explicit"]["mem_ratio"], 4),
        "max_abs_diff_store": diffs["store"],
        "size": args.size, "steps": args.steps, "rounds": args.rounds, "threads": args.threads,
    }
    if args.families == "all":
        print(flush=True)
        headline.update(run_mmdit(args))
    headline["seconds"] = round(time.perf_counter() - started, 1)
    print(json.dumps(headline))


if __name__ == "__main__":
    main()

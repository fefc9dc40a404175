"""How many CPU threads should attnkit give torch? Sampling and null-text inversion on the bundled model with
attnkit's default (``attnkit.threads``: the cores no other process is busy on), 1 thread, 2 threads and every
usable core, on the machine as it is ("idle") and with a busy neighbour (one more process spinning on a core).

On a shared machine "idle" is whatever the machine is doing anyway: the table prints how many cores other
processes kept busy while each condition was measured (``attnkit.threads.busy_cores``), so read the rows with
that number. Everything runs in one process (the pipeline loads once); each setting is timed ``--repeats``
times, the median wall time is reported with its ratio to the 1-thread time of the same condition.

    python benchmarks/threads.py --quick     # 4 sampling steps, 2 inversion steps x 3 inner steps (~2-4 min)
    python benchmarks/threads.py             # the model's 25 steps, null-text 25 x 10 inner steps, 2 repeats

Thread counts that collapse take 10-60x the 1-thread time, so the full run can take an hour on a busy machine.
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import time
from typing import Any

import torch

import attnkit
from attnkit import threads
from attnkit.bundled.scenes import render_scene
from attnkit.inversion import NullTextOptions, invert, use_ddim

PROMPT = "a red circle and a blue square on a white background"
SPIN = "while True: pass"


def settings() -> list[tuple[str, int | str]]:
    cores = threads.usable_cores()
    rows: list[tuple[str, int | str]] = [("default (auto)", "auto"), ("1", 1), ("2", 2)]
    if cores not in (1, 2):
        rows.append((f"all ({cores})", cores))
    return rows


def timed(fn: Any, repeats: int) -> float:
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def measure(pipe: Any, photo: Any, caption: str, args: argparse.Namespace) -> dict[str, dict[str, Any]]:
    """{setting: {"threads": n, "generate": s, "invert": s}} under the current neighbours."""
    options = NullTextOptions(inner_steps=args.inner_steps, lr=attnkit.defaults_for(pipe).null_text_lr)
    out: dict[str, dict[str, Any]] = {}
    for name, value in settings():
        threads.set_threads(value)
        n = torch.get_num_threads()
        gen = timed(lambda: attnkit.generate(pipe, PROMPT, seed=1, steps=args.steps, progress=False), args.repeats)
        inv = timed(lambda: invert(pipe, photo, caption, method="null-text", steps=args.invert_steps,
                                   null_text=options, progress=False), args.repeats)
        out[name] = {"threads": n, "generate": gen, "invert": inv}
        print(f"  {name}: {n} threads, generate {gen:.2f} s, invert {inv:.2f} s", file=sys.stderr, flush=True)
    threads.set_threads(None)
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="fewer steps (a few minutes)")
    parser.add_argument("--steps", type=int, default=None, help="sampling steps (default 25; quick 4)")
    parser.add_argument("--invert-steps", type=int, default=None, help="inversion steps (default 25; quick 2)")
    parser.add_argument("--inner-steps", type=int, default=None, help="null-text inner steps (10; quick 3)")
    parser.add_argument("--repeats", type=int, default=None, help="timings per setting (default 2; quick 1)")
    args = parser.parse_args()
    args.steps = args.steps or (4 if args.quick else 25)
    args.invert_steps = args.invert_steps or (2 if args.quick else 25)
    args.inner_steps = args.inner_steps or (3 if args.quick else 10)
    args.repeats = args.repeats or (1 if args.quick else 2)

    threads.set_threads(1)
    pipe = use_ddim(attnkit.load_pipeline())
    pipe.set_progress_bar_config(disable=True)
    scene = render_scene(10_000_123)  # held out from training
    attnkit.generate(pipe, PROMPT, steps=2, progress=False)  # warm-up

    results: dict[str, dict[str, Any]] = {}
    neighbours: dict[str, float] = {}
    for condition in ("idle", "busy neighbour"):
        spinner = subprocess.Popen([sys.executable, "-c", SPIN]) if condition != "idle" else None
        try:
            time.sleep(1.0)
            neighbours[condition] = threads.busy_cores(window=1.0) or 0.0
            print(f"{condition}: other processes keep {neighbours[condition]:.2f} cores busy", file=sys.stderr)
            results[condition] = measure(pipe, scene.image, scene.caption, args)
        finally:
            if spinner is not None:
                spinner.kill()
                spinner.wait()

    cores = threads.usable_cores()
    print(f"\nBundled model, {cores} usable cores; generate: {args.steps} steps; null-text invert: "
          f"{args.invert_steps} steps x {args.inner_steps} inner steps; median of {args.repeats}.\n")
    print("| condition (cores busy with others) | threads | generate s | vs 1 thread | invert s | vs 1 thread |")
    print("|---|---|---|---|---|---|")
    for condition, rows in results.items():
        one = rows["1"]
        for name, row in rows.items():
            label = f"{name} → {row['threads']}" if name.startswith("default") else name
            print(f"| {condition} ({neighbours[condition]:.2f}) | {label} | {row['generate']:.2f} | "
                  f"{row['generate'] / one['generate']:.2f}x | {row['invert']:.2f} | "
                  f"{row['invert'] / one['invert']:.2f}x |")

    def worst(kind: str, name: str) -> float:  # the largest slowdown of a setting against the best setting
        return max(rows[name][kind] / min(r[kind] for r in rows.values()) for rows in results.values())

    all_name = [n for n, _ in settings()][-1]
    summary = {
        "cores": cores,
        "neighbour_cores": {k: round(v, 2) for k, v in neighbours.items()},
        "default_threads": {k: rows["default (auto)"]["threads"] for k, rows in results.items()},
        "default_worst_vs_best": {k: round(worst(k, "default (auto)"), 2) for k in ("generate", "invert")},
        "all_threads_worst_vs_best": {k: round(worst(k, all_name), 2) for k in ("generate", "invert")},
        "seconds": {c: {n: {k: round(r[k], 3) for k in ("generate", "invert")} for n, r in rows.items()}
                    for c, rows in results.items()},
        "quick": args.quick,
    }
    print(json.dumps(summary))


if __name__ == "__main__":
    main()

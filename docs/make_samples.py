"""Redraw ``docs/bundled_samples.png``: the bundled model's images for eight held-out prompts.

    python docs/make_samples.py [--model-dir runs/bundled/export] [--out docs/bundled_samples.png]

Prompts come from held-out scene seeds 10_100_000.. (the quality benchmark's first eight); image ``i`` is
``attnkit.generate(pipe, prompt_i, seed=i)`` at the model's own defaults.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import torch

from attnkit import generate, load_pipeline
from attnkit.bundled.scenes import spec_for_seed
from attnkit.viz import image_grid

PROMPT_SEED_START = 10_100_000


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model-dir", default=None, help="model folder (default: the bundled model)")
    parser.add_argument("--out", type=Path, default=Path(__file__).resolve().parent / "bundled_samples.png")
    parser.add_argument("--n", type=int, default=8)
    args = parser.parse_args()
    torch.set_num_threads(1)
    pipe = load_pipeline(args.model_dir)
    prompts = [spec_for_seed(PROMPT_SEED_START + i).caption for i in range(args.n)]
    images = [generate(pipe, p, seed=i, progress=False).images[0] for i, p in enumerate(prompts)]
    image_grid(images, prompts, cols=4).save(args.out)
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()

"""Redraw ``docs/real_image_edits.png``: colour swaps of held-out renders edited from their null-text inversions.

    python docs/make_real_edits.py [--model-dir runs/bundled/export] [--out docs/real_image_edits.png]

Rows are the inversion benchmark's scenes (seeds 10_200_000..): the input render, its null-text reconstruction
(guidance 7.5, ``attnkit.invert``'s defaults), the colour swap of its first object with the edited row on the
pipeline's own unconditional embedding (``edit_image``'s default), and the same edit with the source's null-text
embeddings shared by the edited row (``target_uncond="inversion"``, the null-text notebook). Local blend on the
object's colour and shape words, as in ``benchmarks/inversion.py``.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import torch
from PIL import Image

from attnkit import invert, load_pipeline
from attnkit.bundled.scenes import recolour_first, render_scene
from attnkit.inversion import edit_image, use_ddim
from attnkit.viz import image_grid

SEED_START = 10_200_000
SCENES = (0, 2, 3, 7)  # four of the benchmark's first ten: both backgrounds, a failure of the shared embedding
SHOWN = 128  # the 64-px images, enlarged without smoothing


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model-dir", default=None, help="model folder (default: the bundled model)")
    parser.add_argument("--out", type=Path, default=Path(__file__).resolve().parent / "real_image_edits.png")
    args = parser.parse_args()
    torch.set_num_threads(1)
    pipe = use_ddim(load_pipeline(args.model_dir))
    tiles, captions = [], []
    for k in SCENES:
        scene = render_scene(SEED_START + k)
        inv = invert(pipe, scene.image, scene.caption, method="null-text", progress=False)
        first = scene.objects[0]
        edited_spec, blend = recolour_first(scene.spec)  # the benchmark's swap and blend words
        target, new = edited_spec.caption, edited_spec.objects[0].color
        own = edit_image(pipe, inv, target, blend=blend, maps=False, progress=False)
        shared = edit_image(pipe, inv, target, blend=blend, target_uncond="inversion", maps=False, progress=False)
        tiles += [scene.image, own.source, own.edits[0], shared.edits[0]]
        captions += [f"input: {first.color} {first.shape}", "null-text reconstruction", f"{new}: default",
                     f"{new}: target_uncond='inversion'"]
    tiles = [t.resize((SHOWN, SHOWN), Image.Resampling.NEAREST) for t in tiles]
    image_grid(tiles, captions, cols=4).save(args.out)
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()

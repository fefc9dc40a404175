"""Write docs/sample_scene.png, the picture the README's real-image examples edit: a held-out shapes-world
scene (seed 10,000,018: never rendered for training, which uses seeds below 10,000,000), drawn by
``attnkit.bundled.scenes.render_scene`` with its exact caption.

    python docs/make_sample_scene.py   # prints the caption: a yellow circle and a green square on a white background
"""

from pathlib import Path

from attnkit.bundled.scenes import HELDOUT_SEED_START, render_scene

SEED = HELDOUT_SEED_START + 18
OUT = Path(__file__).resolve().parent / "sample_scene.png"

if __name__ == "__main__":
    scene = render_scene(SEED)
    scene.image.save(OUT, optimize=True)
    print(f"{OUT.name}: {scene.caption} ({scene.image.size[0]}x{scene.image.size[1]}, seed {SEED})")

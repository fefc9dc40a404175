"""The MM-DiT methods on held-out shapes-world scenes: rectified-flow inversion (Euler vs second order at equal
model evaluations), real-image edits by inversion + regeneration vs FlowEdit, and ConceptAttention.

    .venv/bin/python benchmarks/mmdit_methods.py --quick                 # < 5 min on one CPU thread
    .venv/bin/python benchmarks/mmdit_methods.py                         # 40 + 40 scenes
    .venv/bin/python benchmarks/mmdit_methods.py --quick --model tiny-sd3   # the plumbing, on random weights

Scenes: ``attnkit.bundled.scenes.render_scene(seed)`` for held-out seeds from ``--seed-start`` (10,600,000;
training never sees seeds >= 10,000,000), each with exact object masks; the caption is the prompt.

* **Reconstruction** (``psnr_euler``, ``psnr_second_order``): each scene is inverted (``attnkit.rf_invert``,
  guidance 1, the conditional velocity alone as RF-Solver and FireFlow invert) and regenerated from its noise
  with the same solver (``attnkit.rf_reconstruct``), every solver spending the same ``--budget`` model
  evaluations in each direction: Euler ``E`` steps, FireFlow ``E - 1``, RF-Solver ``E / 2``. PSNR against the
  rendered scene; the VAE round trip (encode, decode) is the ceiling no inversion can pass.
  ``psnr_second_order`` is FireFlow's (the solver built for a small budget); RF-Solver's is in the table and in
  the JSON as ``psnr_rf_solver``.
* **Edit** (``edit_layout_iou``, ``flowedit_layout_iou``): object 0's colour is swapped in the caption
  (``scenes.recolour_first``: "a red circle ..." -> "a blue circle ..."). Inversion + regeneration
  (``attnkit.rf_edit``: FireFlow inversion at guidance 1, the batch [source, target] regenerated from the noise
  with the source row on the inversion trajectory, at the model's own guidance; also composed with
  Prompt-to-Prompt's ``Replace``: ``edit_p2p_layout_iou``) against FlowEdit
  (``attnkit.flow_edit``, the paper's defaults carried over to the step count), both over ``--edit-steps``
  steps. Layout IoU as in ``benchmarks/inversion.py``: the checker (``attnkit.bundled.checker``) reads object 0
  in the source render and the largest object of the new colour in the edit; their mask IoU (0 where no object
  of the new colour is found). "changed": the new colour is there and the old one is gone.
* **ConceptAttention** (``concept_miou``, ``xattn_miou``): ``run_concepts`` of ``benchmarks/mmdit_concepts.py``.

The last line is one JSON object with the headline figures.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path
from typing import Any

import torch
from PIL import Image

ROOT = Path(__file__).resolve().parent.parent
BUNDLED_MMDIT = ROOT / "src" / "attnkit" / "bundled" / "mmdit"
SEED_START = 10_600_000  # held out; mmdit_concepts uses 10_400_000.., inversion.py 10_200_000..
SOLVERS = ("euler", "fireflow", "rf-solver")


def load_model(name: str | None) -> tuple[Any, str]:
    """``tiny-sd3`` / ``tiny-flux`` (random weights: the plumbing only), a pipeline folder or hub id, or (default)
    the bundled MM-DiT model where it exists."""
    from diffusers.utils import logging as diffusers_logging
    from transformers.utils import logging as transformers_logging

    import attnkit
    from attnkit.testing import tiny_pipeline

    diffusers_logging.disable_progress_bar()  # loading bars would bury the table
    transformers_logging.disable_progress_bar()
    if name in ("tiny-sd3", "tiny-flux"):
        return tiny_pipeline(name.split("-")[1]), name
    if name is None:
        if not (BUNDLED_MMDIT / "model_index.json").is_file():
            sys.exit("benchmarks/mmdit_methods.py: the bundled MM-DiT model (src/attnkit/bundled/mmdit) does not "
                     "exist yet, and these methods need a trained flow model to mean anything: pass --model "
                     "PATH_OR_HUB_ID (an SD3/FLUX pipeline folder), or --model tiny-sd3 to check the plumbing on "
                     "random weights (its numbers mean nothing)")
        try:
            return attnkit.load_pipeline("bundled-mmdit"), "bundled-mmdit"
        except attnkit.AttnkitError:  # before models.py knows the name: the folder itself
            return attnkit.load_pipeline(BUNDLED_MMDIT), "bundled-mmdit"
    return attnkit.load_pipeline(name), name


def full_size(image: Image.Image) -> Image.Image:
    """Outputs compared at the scene size (64 px), whatever the model's resolution."""
    from attnkit.bundled.scenes import SIZE

    return image if image.size == (SIZE, SIZE) else image.resize((SIZE, SIZE), Image.Resampling.BICUBIC)


def reconstruction(pipe: Any, scene: Any, budget: int) -> dict[str, float]:
    import attnkit
    from attnkit.flow_inversion import encode, steps_for
    from attnkit.images import fit_image, psnr
    from attnkit.models import defaults_for
    from attnkit.sampling import decode_latents

    d = defaults_for(pipe)
    fitted, _ = fit_image(scene.image, d.width, d.height)
    row = {"roundtrip": psnr(full_size(decode_latents(pipe, encode(pipe, fitted).to(pipe.vae.dtype))[0]),
                             scene.image)}
    for solver in SOLVERS:
        inv = attnkit.rf_invert(pipe, scene.image, scene.caption, steps=steps_for(solver, budget), solver=solver,
                                progress=False)
        rec = attnkit.rf_reconstruct(pipe, inv, progress=False)
        assert inv.evaluations == rec.evaluations == budget
        row[solver] = psnr(full_size(rec.images[0]), scene.image)
    return row


def _largest(reading: Any, color: str) -> Any:
    found = [o for o in reading.objects if o.color == color]
    return max(found, key=lambda o: o.area) if found else None


def layout(scene: Any, edited: Image.Image, old: str, new: str) -> tuple[float, bool]:
    """(mask IoU of object 0 in the source and the largest new-colour object in the edit, colour changed)."""
    from attnkit.bundled.checker import mask_iou, read_image

    source = _largest(read_image(scene.image), old)
    source_mask = source.mask if source is not None else scene.objects[0].mask
    after = read_image(full_size(edited))
    moved = _largest(after, new)
    return (mask_iou(source_mask, moved.mask) if moved else 0.0), bool(moved and _largest(after, old) is None)


def edits(pipe: Any, scene: Any, steps: int, seed: int) -> dict[str, Any]:
    import attnkit
    from attnkit.bundled.scenes import recolour_first
    from attnkit.flow_edit import PAPER_DEFAULTS
    from attnkit.flow_inversion import flow_family
    from attnkit.models import defaults_for

    spec, _ = recolour_first(scene.spec)
    old, new, target = scene.objects[0].color, spec.objects[0].color, spec.caption
    guidance = defaults_for(pipe).guidance_scale
    _, _, paper_src, paper_tar = PAPER_DEFAULTS[flow_family(pipe)]
    row: dict[str, Any] = {"target": target}
    inv = attnkit.rf_invert(pipe, scene.image, scene.caption, steps=steps, solver="fireflow", progress=False)
    # Prompt-to-Prompt on MM-DiT: the cross copy also gives the target the source's image queries (Shin et al.'s
    # image-query replacement), for the first 30% of the steps; copying longer, or the image block's keys too,
    # kept the old colour on the shapes model (picked among cross .3 / self .3 / self .5 and P2P's own .8/.4 on
    # the quick run's 5 scenes)
    p2p = attnkit.Replace([scene.caption, target], attnkit.text_tokenizer(pipe), cross_steps=0.3, self_steps=0.0)
    variants = {"regen_model_g": ((), dict(guidance=guidance)), "regen_g1": ((), dict(guidance=1.0)),
                "regen_p2p": ((p2p,), dict(guidance=guidance))}
    for name, (controllers, kwargs) in variants.items():
        out = attnkit.rf_edit(pipe, inv, target, *controllers, progress=False, **kwargs)
        row[name], row[name + "_changed"] = layout(scene, out.edits[0], old, new)
        row[name + "_evaluations"] = inv.evaluations + out.evaluations
    flow_variants = {"flowedit_paper": dict(source_guidance=paper_src, target_guidance=paper_tar),
                     "flowedit_model_g": dict(source_guidance=1.0, target_guidance=guidance)}
    for name, kwargs in flow_variants.items():
        out = attnkit.flow_edit(pipe, scene.image, scene.caption, target, steps=steps, seed=seed,
                                progress=False, **kwargs)
        row[name], row[name + "_changed"] = layout(scene, out.image, old, new)
        row[name + "_evaluations"] = out.evaluations
    return row


def mean(values: Any) -> float:
    values = [v for v in values if v is not None]
    return round(float(statistics.fmean(values)), 4) if values else float("nan")


def main(argv: list[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true", help="fewer scenes: under 5 minutes on one CPU thread")
    parser.add_argument("--model", default=None, help="default: the bundled MM-DiT; tiny-sd3 / tiny-flux; a path")
    parser.add_argument("--scenes", type=int, default=None, help="reconstruction scenes (default 40, --quick 5)")
    parser.add_argument("--edit-scenes", type=int, default=None, help="edited scenes (default 40, --quick 5)")
    parser.add_argument("--concept-scenes", type=int, default=None, help="ConceptAttention scenes (60, --quick 8)")
    parser.add_argument("--budget", type=int, default=None,
                        help="model evaluations per direction (default 12, --quick 8): Euler E steps, FireFlow "
                             "E - 1, RF-Solver E / 2")
    parser.add_argument("--edit-steps", type=int, default=None, help="steps of both edits (default 20, --quick 10)")
    parser.add_argument("--seed-start", type=int, default=SEED_START)
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    quick = args.quick
    n_rec = args.scenes if args.scenes is not None else (5 if quick else 40)
    n_edit = args.edit_scenes if args.edit_scenes is not None else (5 if quick else 40)
    n_concepts = args.concept_scenes if args.concept_scenes is not None else (8 if quick else 60)
    budget = args.budget or (8 if quick else 12)
    edit_steps = args.edit_steps or (10 if quick else 20)
    from attnkit.bundled.scenes import is_heldout, render_scene

    pipe, name = load_model(args.model)
    start = time.perf_counter()
    rows, edit_rows = [], []
    for k in range(max(n_rec, n_edit)):
        seed = args.seed_start + k
        assert is_heldout(seed)
        scene = render_scene(seed)
        if k < n_rec:
            rows.append(reconstruction(pipe, scene, budget))
        if k < n_edit:
            edit_rows.append(edits(pipe, scene, edit_steps, seed))
    flow_seconds = time.perf_counter() - start

    concepts: dict[str, Any] = {"concept_miou": None, "xattn_miou": None}
    concepts_note = ""
    try:
        sys.path.insert(0, str(Path(__file__).resolve().parent))
        from mmdit_concepts import run_concepts
    except ImportError as exc:
        concepts_note = f"ConceptAttention not measured: benchmarks/mmdit_concepts.py could not be imported ({exc})"
    else:
        if n_concepts:
            concepts = run_concepts(pipe, n_concepts)

    roundtrip = mean(r["roundtrip"] for r in rows)
    print(f"\nmodel {name}; reconstruction: {len(rows)} held-out scenes from seed {args.seed_start}, {budget} model "
          f"evaluations per direction (inversion guidance 1)\n")
    print("| solver | steps | evaluations (invert + regenerate) | PSNR (dB) | min | vs Euler | vs VAE round trip |")
    print("|---|---|---|---|---|---|---|")
    from attnkit.flow_inversion import steps_for

    euler = mean(r["euler"] for r in rows)
    for solver in SOLVERS:
        values = [r[solver] for r in rows]
        m = mean(values)
        print(f"| {solver} | {steps_for(solver, budget)} | {budget} + {budget} | {m:.2f} | {min(values):.2f} | "
              f"{m - euler:+.2f} | {m - roundtrip:+.2f} |")
    print(f"| VAE round trip (ceiling) | - | - | {roundtrip:.2f} | {min(r['roundtrip'] for r in rows):.2f} | "
          f"{roundtrip - euler:+.2f} | 0 |")
    print(f"\nedit: object 0's colour swapped, {len(edit_rows)} scenes, {edit_steps} steps each\n")
    print("| method | layout IoU | changed | evaluations |")
    print("|---|---|---|---|")
    labels = {"regen_model_g": "FireFlow inversion + regeneration, model guidance (headline)",
              "regen_g1": "FireFlow inversion + regeneration, guidance 1",
              "regen_p2p": "FireFlow inversion + regeneration + Prompt-to-Prompt Replace (cross .3, no self)",
              "flowedit_paper": "FlowEdit, the paper's guidance (headline)",
              "flowedit_model_g": "FlowEdit, source 1 / target model guidance"}
    for key, label in labels.items():
        print(f"| {label} | {mean(r[key] for r in edit_rows):.3f} | "
              f"{mean(float(r[key + '_changed']) for r in edit_rows):.2f} | "
              f"{mean(r[key + '_evaluations'] for r in edit_rows):.0f} |")
    if concepts.get("concept_miou") is not None:
        print(f"\nConceptAttention mIoU {concepts['concept_miou']:.3f} vs cross-attention {concepts['xattn_miou']:.3f} "
              f"({concepts.get('scenes')} scenes, benchmarks/mmdit_concepts.py)")
    if concepts_note:
        print("\n" + concepts_note)
    print(f"\n{flow_seconds:.0f} s for inversion and edits ({time.perf_counter() - start:.0f} s in all)")
    summary = {
        "concept_miou": concepts.get("concept_miou"), "xattn_miou": concepts.get("xattn_miou"),
        "psnr_euler": euler, "psnr_second_order": mean(r["fireflow"] for r in rows),
        "psnr_rf_solver": mean(r["rf-solver"] for r in rows), "psnr_vae_roundtrip": roundtrip,
        "edit_layout_iou": mean(r["regen_model_g"] for r in edit_rows),
        "edit_p2p_layout_iou": mean(r["regen_p2p"] for r in edit_rows),
        "flowedit_layout_iou": mean(r["flowedit_paper"] for r in edit_rows),
        "edit_changed": mean(float(r["regen_model_g_changed"]) for r in edit_rows),
        "edit_p2p_changed": mean(float(r["regen_p2p_changed"]) for r in edit_rows),
        "flowedit_changed": mean(float(r["flowedit_paper_changed"]) for r in edit_rows),
        "budget": budget, "edit_steps": edit_steps, "scenes": len(rows), "edit_scenes": len(edit_rows),
        "model": name, "quick": quick,
    }
    print(json.dumps(summary))
    return summary


if __name__ == "__main__":
    main()

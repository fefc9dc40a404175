"""Real-image editing on flow models as runs (registered from :mod:`attnkit.runs.methods`): rectified-flow
inversion (``rf-invert``, with edits regenerated from the inverted noise) and FlowEdit (``flow-edit``), with the
fields, files and ``record.json`` of ``attnkit rf-invert`` and ``attnkit flow-edit``, so the web app and the batch
runner run them the same way.
"""

from __future__ import annotations

import time
from typing import Any

from attnkit.engine import AttnkitError
from attnkit.runs.execute import Output, RunContext
from attnkit.runs.spec import Field, Method, register

SOLVER_CHOICES = ("euler", "rf-solver", "fireflow")
CROP = Field("crop", "choice", "center", "Fit the image: 'center' (crop to the aspect ratio) or 'stretch'.", "--crop",
             choices=("center", "stretch"))
STEPS = Field("steps", "int", None, "Steps (default: the model's own).", "--steps", minimum=1, maximum=1000)


def _flow_check(pipe: Any, args: dict[str, Any], what: str) -> None:
    from attnkit.adapters import text_tokenizer
    from attnkit.flow_inversion import flow_family
    from attnkit.tokens import check_prompt_length

    flow_family(pipe, what)  # a UNet: the error points to attnkit.invert
    tokenizer = text_tokenizer(pipe)
    for key in ("prompt", "source", "target"):
        if key in args:
            check_prompt_length(tokenizer, args[key])
    for target in args.get("targets") or []:
        check_prompt_length(tokenizer, target)


def _edits(out: Output, source: Any, edits: list[Any], prompts: list[str]) -> None:
    from attnkit.viz import image_grid

    out.images.append(("grid.png", image_grid([source, *edits], prompts), {}))
    for i, (edited, target) in enumerate(zip(edits, prompts[1:], strict=True), start=1):
        out.images.append((f"{i:02d}_edit.png", edited, {"target": target}))


# -- rf-invert ----------------------------------------------------------------------------------------------
def _rf_invert_check(pipe: Any, args: dict[str, Any]) -> None:
    if args["edit_guidance"] is not None and not args["targets"]:
        raise AttnkitError("edit_guidance sets the guidance of the edits: give targets as well, or leave it out")
    _flow_check(pipe, args, "rectified-flow inversion")


def _run_rf_invert(pipe: Any, args: dict[str, Any], ctx: RunContext) -> Output:
    from attnkit.flow_inversion import rf_edit, rf_invert, rf_reconstruct
    from attnkit.images import load_image, psnr

    out = Output(None, settings={"image": args["image"]})  # type: ignore[arg-type]
    start = time.perf_counter()
    inv = rf_invert(pipe, load_image(args["image"]), args["prompt"], steps=args["steps"], solver=args["solver"],
                    guidance=args["guidance"], crop=args["crop"], progress=ctx.progress)
    out.timings["invert"] = round(time.perf_counter() - start, 3)
    start = time.perf_counter()
    rebuilt = rf_reconstruct(pipe, inv, progress=ctx.progress)
    out.timings["reconstruct"] = round(time.perf_counter() - start, 3)
    out.settings.update(solver=inv.solver, steps=inv.steps, guidance=inv.guidance, crop=inv.crop.to_dict(),
                        evaluations={"invert": inv.evaluations, "reconstruct": rebuilt.evaluations},
                        psnr_reconstruction=round(psnr(inv.image, rebuilt.images[0]), 3))
    out.writers.append((("inversion.safetensors", "inversion.json", "image.png"),
                        lambda folder: inv.save(folder, overwrite=True)))
    out.images.append(("reconstruction.png", rebuilt.images[0], {"solver": inv.solver}))
    targets = list(args["targets"] or [])
    result: dict[str, Any] = {"inversion": inv, "reconstruction": rebuilt}
    if targets:
        start = time.perf_counter()
        edited = rf_edit(pipe, inv, targets, guidance=args["edit_guidance"], progress=ctx.progress)
        out.timings["edit"] = round(time.perf_counter() - start, 3)
        out.settings.update(targets=targets, edit_guidance=inv.guidance if args["edit_guidance"] is None
                            else args["edit_guidance"])
        out.settings["evaluations"]["edit"] = edited.evaluations
        _edits(out, inv.image, edited.edits, [args["prompt"], *targets])
        result["edit"] = edited
    out.result = result
    return out


register(Method(
    "rf-invert", "Rectified-flow inversion (MM-DiT models): invert a real image to noise, regenerate it, and edit it "
    "by regenerating edited prompts from that noise.",
    (Field("image", "path", help="The image file to invert.", cli="arg", required=True),
     Field("prompt", "text", help="A caption of the image (the source prompt).", cli="--prompt", required=True),
     Field("targets", "words", None, "Edited prompts, regenerated from the inverted noise.", "--to"),
     Field("solver", "choice", "fireflow", "ODE solver: fireflow (2nd order), rf-solver (2nd order) or euler.",
           "--solver", choices=SOLVER_CHOICES),
     Field("guidance", "float", 1.0, "Guidance of the inversion and the reconstruction (1: conditional only).",
           "--guidance", minimum=0),
     Field("edit_guidance", "float", None, "Guidance of the edits (default: the inversion's).", "--edit-guidance",
           minimum=0),
     STEPS, CROP),
    _run_rf_invert, check=_rf_invert_check,
))


# -- flow-edit ------------------------------------------------------------------------------------------------
def _flow_edit_check(pipe: Any, args: dict[str, Any]) -> None:
    _flow_check(pipe, args, "FlowEdit")


def _run_flow_edit(pipe: Any, args: dict[str, Any], ctx: RunContext) -> Output:
    from attnkit.flow_edit import flow_edit
    from attnkit.images import load_image

    out = Output(None, settings={"image": args["image"]})  # type: ignore[arg-type]
    start = time.perf_counter()
    result = flow_edit(pipe, load_image(args["image"]), args["source"], args["target"], steps=args["steps"],
                       n_max=args["n_max"], n_min=args["n_min"], n_avg=args["n_avg"],
                       source_guidance=args["source_guidance"], target_guidance=args["target_guidance"],
                       seed=args["seed"], crop=args["crop"], progress=ctx.progress)
    out.timings["edit"] = round(time.perf_counter() - start, 3)
    record = result.record()
    out.settings.update(seed=args["seed"], steps=record["steps"], targets=[args["target"]], crop=record["crop"],
                        evaluations=result.evaluations,
                        **{k: record[k] for k in ("n_max", "n_min", "n_avg", "source_guidance", "target_guidance")})
    out.images.append(("image.png", result.source, {}))
    _edits(out, result.source, [result.image], [args["source"], args["target"]])
    out.result = result
    return out


register(Method(
    "flow-edit", "FlowEdit (MM-DiT models): edit a real image without inverting it.",
    (Field("image", "path", help="The image file to edit.", cli="arg", required=True),
     Field("source", "text", help="A caption of the image (the source prompt).", cli="arg", required=True),
     Field("target", "text", help="The edited prompt.", cli="--to", required=True),
     Field("n_max", "int", None, "Edit during the last N steps (default: the paper's share).", "--n-max", minimum=1),
     Field("n_min", "int", 0, "The last N steps sample the target plainly.", "--n-min", minimum=0),
     Field("n_avg", "int", 1, "Noise draws averaged per step.", "--n-avg", minimum=1),
     Field("source_guidance", "float", None, "Guidance of the source velocity (default: the paper's).",
           "--source-guidance", minimum=0),
     Field("target_guidance", "float", None, "Guidance of the target velocity (default: the paper's).",
           "--target-guidance", minimum=0),
     Field("seed", "int", 0, "Seed of the per-step noise.", "--seed", minimum=0),
     STEPS, CROP),
    _run_flow_edit, prompt_field="source", check=_flow_edit_check,
))

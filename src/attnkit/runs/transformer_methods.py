"""The MM-DiT methods as runs (registered from :mod:`attnkit.runs.methods`): ConceptAttention (``concepts``) and
Stable Flow (``stable-flow``), with the fields, files and ``record.json`` of ``attnkit concepts`` and
``attnkit stable-flow``, so the web app and the batch runner run them the same way.
"""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any

from attnkit.engine import AttnkitError
from attnkit.runs.execute import Output, RunContext, safe_name
from attnkit.runs.spec import Field, Method, register

SAMPLING = (Field("seed", "int", 0, "Seed of the initial noise.", "--seed", minimum=0),
            Field("steps", "int", None, "Denoising steps (default: the model's own).", "--steps", minimum=1,
                  maximum=1000),
            Field("guidance", "float", None, "Guidance scale (default: the model's own).", "--guidance", minimum=0),
            Field("height", "int", None, "Image height in pixels (default: the model's own).", "--height",
                  minimum=8, maximum=4096),
            Field("width", "int", None, "Image width in pixels (default: the model's own).", "--width", minimum=8,
                  maximum=4096))


def parse_blocks(text: str | None) -> list[int] | None:
    """``"15,16,-1"`` → ``[15, 16, -1]`` (None stays None), or a clear error."""
    if text is None:
        return None
    parts = [p for p in str(text).replace(" ", "").split(",") if p]
    if not parts or not all(p.lstrip("-").isdigit() for p in parts):
        raise AttnkitError(f"blocks {text!r}: give double-stream block indices separated by commas, e.g. 15,16,17,18 "
                           "(negative counts from the end: -1 is the last)")
    return [int(p) for p in parts]


# -- concepts -----------------------------------------------------------------------------------------------
def _concepts_check(pipe: Any, args: dict[str, Any]) -> None:
    from attnkit.adapters import adapter_for
    from attnkit.concepts import check_concepts

    check_concepts(args["concepts"])
    parse_blocks(args["blocks"])
    if not 0.0 < args["noise"] <= 1.0:
        raise AttnkitError(f"noise {args['noise']}: give the noise level σ in (0, 1], e.g. 0.5")
    if adapter_for(pipe).family not in ("sd3", "flux"):
        raise AttnkitError("ConceptAttention needs an MM-DiT model (SD3/SD3.5 or FLUX.1); this model is a UNet: "
                           "load an SD3/FLUX pipeline (or the tiny-sd3 / tiny-flux test pipelines)")


def _run_concepts(pipe: Any, args: dict[str, Any], ctx: RunContext) -> Output:
    from attnkit.concepts import concept_maps
    from attnkit.images import load_image
    from attnkit.viz import enlarge, overlay, segment_overlay

    picture = load_image(args["image"]) if args["image"] else None
    start = time.perf_counter()
    result = concept_maps(pipe, args["prompt"], list(args["concepts"]), image=picture,
                          blocks=parse_blocks(args["blocks"]), seed=args["seed"], steps=args["steps"],
                          guidance=args["guidance"], height=args["height"], width=args["width"],
                          noise_level=args["noise"], samples=args["samples"], progress=ctx.progress)
    record = result.record()
    settings = {"seed": args["seed"], "height": result.image.height, "width": result.image.width,
                "concepts": result.concepts, "layers": record["layers"], "concept_steps": record["steps"],
                "settings": {k: v for k, v in record.items() if k not in ("prompt", "concepts", "layers")}}
    if "steps" in result.settings:
        settings.update(steps=result.settings["steps"], guidance=result.settings["guidance"])
    if args["image"]:
        settings["image"] = args["image"]
    out = Output(None, settings=settings, result=result)  # type: ignore[arg-type]
    out.timings["concepts"] = round(time.perf_counter() - start, 3)
    out.images.append(("image.png", result.image, {}))
    out.images.append(("concepts.png", result.strip(), {"concepts": result.concepts}))
    out.images.append(("segments.png", segment_overlay(result.image, result.segment().numpy(), result.concepts),
                       {"concepts": result.concepts}))
    big = enlarge(result.image)
    for i, (name, heat) in enumerate(result.as_dict().items()):
        out.images.append((f"concepts/{i:02d}_{safe_name(name)}.png", overlay(big, heat), {"concept": name}))
    return out


register(Method(
    "concepts", "ConceptAttention (MM-DiT models): concept saliency maps from attention outputs.",
    (Field("prompt", "text", help="The prompt to generate, or the caption of the image.", cli="arg",
           required=True),
     Field("concepts", "words", help="The concepts to map, e.g. circle, square, background.", cli="--concept",
           required=True),
     Field("image", "path", None, "Map this real image (a file) instead of generating the prompt.", "--image"),
     Field("blocks", "str", None, "Double-stream blocks to average, e.g. 15,16,17,18 (default: the paper's last 4 "
           "of 19, relative to the depth).", "--blocks"),
     Field("noise", "float", 0.5, "A real image: the noise level σ of the pass, in (0, 1].", "--noise", minimum=0,
           maximum=1),
     Field("samples", "int", 1, "A real image: noisy passes averaged.", "--samples", minimum=1, maximum=64),
     *SAMPLING),
    _run_concepts, check=_concepts_check,
))


# -- stable-flow --------------------------------------------------------------------------------------------
def _stable_flow_check(pipe: Any, args: dict[str, Any]) -> None:
    from attnkit.adapters import adapter_for

    if not args["targets"]:
        raise AttnkitError("no edited prompt: give at least one target")
    if args["vital"] is not None and args["layers"]:
        raise AttnkitError("vital chooses among measured vital layers; leave it out when you name layers")
    adapter = adapter_for(pipe)
    if adapter.family not in ("sd3", "flux"):
        raise AttnkitError("Stable Flow needs an MM-DiT model (SD3/SD3.5 or FLUX.1); this model is a UNet: load "
                           "an SD3/FLUX pipeline (or the tiny-sd3 / tiny-flux test pipelines)")
    names = list(adapter.blocks())
    for layer in args["layers"] or []:
        if layer not in names:
            raise AttnkitError(f"{layer!r} is not a block of this transformer; its blocks are {', '.join(names)}")


def _run_stable_flow(pipe: Any, args: dict[str, Any], ctx: RunContext) -> Output:
    from attnkit.images import load_image
    from attnkit.stable_flow import stable_flow_edit, vital_layers
    from attnkit.viz import image_grid

    picture = load_image(args["image"]) if args["image"] else None
    sampling = {k: args[k] for k in ("steps", "guidance", "height", "width")}
    out = Output(None)  # type: ignore[arg-type]
    chosen: Any = list(args["layers"]) if args["layers"] else None
    if chosen is None:
        start = time.perf_counter()
        measured = vital_layers(pipe, [args["source"]], seeds=[args["seed"]], progress=ctx.progress, **sampling)
        out.timings["vital_layers"] = round(time.perf_counter() - start, 3)
        chosen = measured.top(args["vital"])
        text = json.dumps(measured.record(), indent=2) + "\n"
        out.writers.append((("vital_layers.json",), lambda folder: (Path(folder) / "vital_layers.json")
                            .write_text(text)))
    start = time.perf_counter()
    result = stable_flow_edit(pipe, args["source"], list(args["targets"]), layers=chosen, image=picture,
                              seed=args["seed"], progress=ctx.progress, **sampling)
    out.timings["edit"] = round(time.perf_counter() - start, 3)
    out.settings = {"seed": args["seed"], "targets": list(args["targets"]), "layers": result.layers,
                    "height": result.source.height, "width": result.source.width,
                    **{k: v for k, v in result.settings.items() if k in ("steps", "guidance", "nudge", "crop")}}
    if args["image"]:
        out.settings["image"] = args["image"]
    out.result = result
    out.images.append(("grid.png", image_grid(result.images, result.prompts), {}))
    out.images.append(("00_source.png", result.source, {}))
    for i, edited in enumerate(result.edits, start=1):
        out.images.append((f"{i:02d}_edit.png", edited, {"target": args["targets"][i - 1]}))
    return out


register(Method(
    "stable-flow", "Stable Flow (MM-DiT models): edit by injecting the source's image keys and values in the "
    "vital layers.",
    (Field("source", "text", help="The source prompt (the image's caption with an image).", cli="arg",
           required=True),
     Field("targets", "words", help="The edited prompts.", cli="--to", required=True),
     Field("image", "path", None, "Edit this real image (a file) instead of the source prompt's.", "--image"),
     Field("layers", "words", None, "Blocks to inject into (default: the vital layers, measured first).", "--layer"),
     Field("vital", "int", None, "Without layers: how many vital blocks (default: the paper's share).", "--vital",
           minimum=1),
     *SAMPLING),
    _run_stable_flow, prompt_field="source", check=_stable_flow_check,
))

"""The methods front ends can run, one :func:`~attnkit.runs.spec.register` entry each: its fields (with the CLI's
option names), model-aware checks, the Python call, and for generate/maps a batched call.

Adding a method (e.g. segmentation): write ``_run_segment(pipe, args, ctx) -> Output`` that calls the library
function and lists the images it made, then ``register(Method("segment", "what it does", (fields...),
_run_segment))``. The batch runner, the web app and record.json pick it up from the registry.
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

from attnkit.adapters import text_tokenizer
from attnkit.engine import AttnkitError
from attnkit.runs.execute import Output, RunContext, safe_name
from attnkit.runs.spec import Field, Method, register
from attnkit.viz import HEAT_CMAP

# -- fields shared by the methods ---------------------------------------------------------------------------
SEED = Field("seed", "int", 0, "Seed of the initial noise.", "--seed", minimum=0)
STEPS = Field("steps", "int", None, "Denoising steps (default: the model's own).", "--steps", minimum=1,
              maximum=1000)
GUIDANCE = Field("guidance", "float", None, "Guidance scale (default: the model's own).", "--guidance", minimum=0)
HEIGHT = Field("height", "int", None, "Image height in pixels (default: the model's own).", "--height", minimum=8,
               maximum=4096)
WIDTH = Field("width", "int", None, "Image width in pixels (default: the model's own).", "--width", minimum=8,
              maximum=4096)
SAMPLING = (SEED, STEPS, GUIDANCE, HEIGHT, WIDTH)
INVERSION = Field("inversion", "choice", "null-text", "Inversion method.", "--method",
                  choices=("null-text", "negative-prompt", "ddim"))
INNER_STEPS = Field("inner_steps", "int", 10, "Null-text: at most this many optimisation steps per step.",
                    "--inner-steps", minimum=1, maximum=100)
CROP = Field("crop", "choice", "center", "Fit the image: 'center' (crop to the aspect ratio) or 'stretch'.",
             "--crop", choices=("center", "stretch"))


def _prompt_check(pipe: Any, *prompts: str) -> None:
    from attnkit.tokens import check_prompt_length

    for p in prompts:
        check_prompt_length(text_tokenizer(pipe), p)


def _sampling(pipe: Any, args: dict[str, Any]) -> tuple[int, float, int, int]:
    """Steps, guidance, height and width after the model's defaults."""
    from attnkit.models import defaults_for

    d = defaults_for(pipe)
    guidance = d.guidance_scale if args["guidance"] is None else args["guidance"]
    return (int(args["steps"] or d.num_inference_steps), float(guidance), int(args["height"] or d.height),
            int(args["width"] or d.width))


def _generation_settings(gen: Any, seed: int) -> dict[str, Any]:
    return {"seed": seed, "steps": gen.steps, "guidance": gen.guidance, "height": gen.height, "width": gen.width}


def _row_latents(pipe: Any, seeds: list[int], height: int, width: int) -> Any:
    """One noise per row, each drawn exactly as a single run of that seed draws it."""
    import torch

    from attnkit.engine import shared_latents

    return torch.cat([shared_latents(pipe, s, 1, height, width) for s in seeds])


# -- generate -----------------------------------------------------------------------------------------------
def _run_generate(pipe: Any, args: dict[str, Any], ctx: RunContext) -> Output:
    from attnkit.sampling import generate

    start = time.perf_counter()
    gen = generate(pipe, args["prompt"], seed=args["seed"], steps=args["steps"], guidance=args["guidance"],
                   height=args["height"], width=args["width"], progress=ctx.progress)
    out = Output(None, settings=_generation_settings(gen, args["seed"]), result=gen)  # type: ignore[arg-type]
    out.timings["generate"] = round(time.perf_counter() - start, 3)
    out.images.append(("image.png", gen.images[0], {}))
    return out


def _sampling_key(pipe: Any, args: dict[str, Any]) -> tuple:
    return _sampling(pipe, args)


def _run_generate_batch(pipe: Any, many: list[dict[str, Any]], ctx: RunContext) -> list[Output]:
    from attnkit.sampling import generate

    steps, guidance, height, width = _sampling(pipe, many[0])
    start = time.perf_counter()
    gen = generate(pipe, [a["prompt"] for a in many], steps=steps, guidance=guidance, height=height, width=width,
                   latents=_row_latents(pipe, [a["seed"] for a in many], height, width), progress=ctx.progress)
    seconds = round(time.perf_counter() - start, 3)
    outs = []
    for i, a in enumerate(many):
        out = Output(None, settings=_generation_settings(gen, a["seed"]), result=gen)  # type: ignore[arg-type]
        out.timings["generate"] = seconds
        out.images.append(("image.png", gen.images[i], {}))
        outs.append(out)
    return outs


register(Method(
    "generate", "Generate an image from a prompt.",
    (Field("prompt", "text", help="The text prompt.", cli="arg", required=True), *SAMPLING),
    _run_generate, check=lambda pipe, a: _prompt_check(pipe, a["prompt"]), batch_key=_sampling_key,
    run_batch=_run_generate_batch,
))


# -- maps ---------------------------------------------------------------------------------------------------
def attention_grids(pipe: Any, height: int | None = None, width: int | None = None) -> list[int]:
    """Grid sizes (larger side) of the UNet's cross-attention layers at this image size, from its config."""
    from attnkit.models import defaults_for

    d = defaults_for(pipe)
    side = max(height or d.height, width or d.width) // int(getattr(pipe, "vae_scale_factor", 8))
    if getattr(pipe, "unet", None) is None:  # an MM-DiT: every layer sees the one grid of image tokens
        return [-(-side // 2)]  # SD3's patch size and FLUX's 2x2 packing
    config = pipe.unet.config
    grids = {-(-side // 2**i) for i, kind in enumerate(config.down_block_types) if "CrossAttn" in kind}
    if "CrossAttn" in str(config.mid_block_type):
        grids.add(-(-side // 2 ** (len(config.down_block_types) - 1)))
    return sorted(grids)


def default_res(pipe: Any, height: int | None = None, width: int | None = None) -> int:
    """Prompt-to-Prompt's grid: the largest of at most max(16, latent side / 4), else the smallest there is."""
    from attnkit.models import defaults_for

    grids = attention_grids(pipe, height, width)
    if not grids:
        raise AttnkitError("this UNet has no cross-attention layers to map")
    d = defaults_for(pipe)
    side = max(height or d.height, width or d.width) // int(getattr(pipe, "vae_scale_factor", 8))
    fitting = [g for g in grids if g <= max(16, side // 4)]
    return max(fitting) if fitting else min(grids)


def _maps_check(pipe: Any, args: dict[str, Any]) -> None:
    from attnkit.tokens import word_token_indices

    _prompt_check(pipe, args["prompt"])
    for word in args["words"] or []:
        word_token_indices(text_tokenizer(pipe), args["prompt"], word)
    grids = attention_grids(pipe, args["height"], args["width"])
    if args["res"] is not None and args["res"] not in grids:
        raise AttnkitError(f"field 'res': this model has cross-attention grids {grids} at this size, not "
                           f"{args['res']}: pick one of them")
    from attnkit.viz import check_cmap

    try:
        check_cmap(args["cmap"])
    except ValueError as error:
        raise AttnkitError(f"field 'cmap': {error}") from None
    for place in args["places"] or []:
        if place not in ("down", "mid", "up"):
            raise AttnkitError(f"field 'places': {place!r} is not one of 'down', 'mid', 'up'")


def _maps_store(pipe: Any, args: dict[str, Any], res: int, with_self: bool) -> Any:
    from attnkit.store import AttentionStore

    places = tuple(args["places"]) if args["places"] else ("down", "mid", "up")
    return AttentionStore(kinds=("cross", "self") if with_self else ("cross",), res=res, places=places,
                          steps=args["window"])


def self_attention_picture(store: Any, image: Any, pixel: tuple[int, int], cmap: str = HEAT_CMAP,
                           row: int = 0) -> Any:
    """The image with the query pixel marked, where that pixel attends, and the top self-attention components
    (the Prompt-to-Prompt notebook's views), in two rows of four."""
    from PIL import Image

    from attnkit.viz import colorize, enlarge, image_grid, mark_point, overlay

    attended = store.self_map(pixel, row=row)
    h, w = attended.shape
    big = enlarge(image.convert("RGB"))
    y, x = (pixel[0] + 0.5) * big.height / h, (pixel[1] + 0.5) * big.width / w
    components = [colorize(c, "viridis").resize(big.size, Image.Resampling.NEAREST)
                  for c in store.self_components(row=row, k=6)]
    # the query marked (black and white rings: visible on any background) on the image and on its heat
    tiles = [mark_point(big, y, x), mark_point(overlay(big, attended, cmap=cmap), y, x), *components]
    captions = [f"query {pixel[0]},{pixel[1]}", f"attends to ({h}x{w})"]
    captions += [f"component {i}" for i in range(len(components))]
    return image_grid(tiles, captions, cols=4)


def _maps_output(store: Any, gen: Any, row: int, args: dict[str, Any], res: int, seconds: float) -> Output:
    from attnkit.tokens import word_spans
    from attnkit.viz import enlarge, overlay, word_strip

    prompt, cmap = args["prompt"], args["cmap"]
    tokenizer = store.tokenizer
    chosen = list(args["words"]) if args["words"] else [s.word for s in word_spans(tokenizer, prompt)]
    image = gen.images[row]
    heat = store.word_maps(prompt, row=row, words=chosen)
    settings = {**_generation_settings(gen, args["seed"]), "res": res, "cmap": cmap, "words": list(heat)}
    if args["window"] is not None:
        settings["window"] = args["window"]
    if args["places"]:
        settings["places"] = list(args["places"])
    out = Output(None, settings=settings, result={"generation": gen, "store": store, "maps": heat, "row": row})  # type: ignore[arg-type]
    out.timings["generate"] = seconds
    out.images.append(("image.png", image, {}))
    out.images.append(("maps.png", word_strip(image, heat, cmap=cmap), {"words": list(heat), "res": res}))
    big = enlarge(image)  # small images (the bundled model's 64x64) are enlarged to stay readable
    for i, (word, m) in enumerate(heat.items()):
        out.images.append((f"words/{i:02d}_{safe_name(word)}.png", overlay(big, m, cmap=cmap),
                           {"word": word, "res": res}))
    if args["self_at"] is not None:
        pixel = tuple(args["self_at"])
        out.images.append(("self_attention.png", self_attention_picture(store, image, pixel, cmap, row),
                           {"pixel": list(pixel), "res": res}))
        out.settings["self_at"] = list(pixel)
    return out


def _run_maps(pipe: Any, args: dict[str, Any], ctx: RunContext) -> Output:
    from attnkit.sampling import generate

    res = args["res"] or default_res(pipe, args["height"], args["width"])
    store = _maps_store(pipe, args, res, with_self=args["self_at"] is not None or ctx.keep_self_maps)
    start = time.perf_counter()
    gen = generate(pipe, args["prompt"], store, seed=args["seed"], steps=args["steps"], guidance=args["guidance"],
                   height=args["height"], width=args["width"], progress=ctx.progress)
    return _maps_output(store, gen, 0, args, res, round(time.perf_counter() - start, 3))


def _maps_key(pipe: Any, args: dict[str, Any]) -> tuple | None:
    if args["self_at"] is not None:  # the self-attention picture reads one row's big maps: run it alone
        return None
    res = args["res"] or default_res(pipe, args["height"], args["width"])
    places = tuple(args["places"]) if args["places"] else None
    return (*_sampling(pipe, args), res, places, args["window"])


def _run_maps_batch(pipe: Any, many: list[dict[str, Any]], ctx: RunContext) -> list[Output]:
    from attnkit.sampling import generate

    first = many[0]
    steps, guidance, height, width = _sampling(pipe, first)
    res = first["res"] or default_res(pipe, first["height"], first["width"])
    store = _maps_store(pipe, first, res, with_self=False)
    start = time.perf_counter()
    gen = generate(pipe, [a["prompt"] for a in many], store, steps=steps, guidance=guidance, height=height,
                   width=width, latents=_row_latents(pipe, [a["seed"] for a in many], height, width),
                   progress=ctx.progress)
    seconds = round(time.perf_counter() - start, 3)
    return [_maps_output(store, gen, i, a, res, seconds) for i, a in enumerate(many)]


register(Method(
    "maps", "Generate an image and the cross-attention map of each word of its prompt.",
    (Field("prompt", "text", help="The text prompt.", cli="arg", required=True), *SAMPLING,
     Field("words", "words", None, "Words to map (default: every word of the prompt).", "--words"),
     Field("res", "int", None, "Attention grid to read, e.g. 16 (default: Prompt-to-Prompt's choice).", "--res",
           minimum=1),
     Field("self_at", "pixel", None, "Also map where this query pixel [y, x] of the grid attends.", "--self-at"),
     Field("cmap", "str", HEAT_CMAP, "matplotlib colormap of the heat.", "--cmap"),
     Field("window", "window", None, "Steps to average over: a fraction or [start, end] fractions of the "
           "schedule (default: every step)."),
     Field("places", "words", None, "UNet parts to read: any of down, mid, up (default: all).")),
    _run_maps, check=_maps_check, batch_key=_maps_key, run_batch=_run_maps_batch,
))


# -- invert -------------------------------------------------------------------------------------------------
@contextmanager
def ddim_for_the_run(pipe: Any) -> Iterator[Any]:
    """The pipeline with a DDIM scheduler (what regenerating an inversion needs) for one run, its own scheduler
    back afterwards: a batch or the app runs other jobs on the same pipeline next, which must not change."""
    from attnkit.inversion import use_ddim

    saved = pipe.scheduler
    try:
        yield use_ddim(pipe)
    finally:
        pipe.scheduler = saved


def _invert(pipe: Any, image: Any, prompt: str, args: dict[str, Any], ctx: RunContext, out: Output) -> Any:
    """Invert an image as ``attnkit invert`` / ``attnkit edit --image`` do; records the settings in ``out``."""
    from attnkit.inversion import NullTextOptions, invert
    from attnkit.models import defaults_for

    lr = args.get("lr")
    options = NullTextOptions(inner_steps=args["inner_steps"], lr=defaults_for(pipe).null_text_lr if lr is None else lr)
    start = time.perf_counter()
    inv = invert(pipe, image, prompt, method=args["inversion"], steps=args["steps"], guidance=args["guidance"],
                 crop=args["crop"], null_text=options, progress=ctx.progress)
    out.timings["invert"] = round(time.perf_counter() - start, 3)
    _record_inversion(out, inv)
    return inv


def _run_invert(pipe: Any, args: dict[str, Any], ctx: RunContext) -> Output:
    from attnkit.images import load_image, psnr
    from attnkit.inversion import reconstruct

    out = Output(None, settings={"image": args["image"]})  # type: ignore[arg-type]
    with ddim_for_the_run(pipe):
        inv = _invert(pipe, load_image(args["image"]), args["prompt"], args, ctx, out)
        start = time.perf_counter()
        rebuilt = reconstruct(pipe, inv, progress=ctx.progress)
    out.timings["reconstruct"] = round(time.perf_counter() - start, 3)
    out.settings["psnr_reconstruction"] = round(psnr(inv.image, rebuilt), 3)
    out.writers.append((("inversion.safetensors", "inversion.json", "image.png"),
                        lambda folder: inv.save(folder, overwrite=True)))
    out.images.append(("reconstruction.png", rebuilt, {"method": args["inversion"]}))
    out.result = {"inversion": inv, "reconstruction": rebuilt}
    return out


register(Method(
    "invert", "Invert a real image (find the noise and embeddings the pipeline regenerates it from).",
    (Field("image", "path", help="The image file to invert.", cli="arg", required=True),
     Field("prompt", "text", help="A caption of the image (the source prompt).", cli="--prompt", required=True),
     INVERSION, STEPS,
     Field("guidance", "float", None, "Guidance scale null-text optimises for (default 7.5).", "--guidance",
           minimum=0),
     INNER_STEPS, Field("lr", "float", None, "Null-text: Adam learning rate at step 0 (default: the model's own).",
                        "--lr", minimum=0), CROP),
    _run_invert, check=lambda pipe, a: _prompt_check(pipe, a["prompt"]),
))


# -- edit ---------------------------------------------------------------------------------------------------
def _is_saved_inversion(path: str | None) -> bool:
    from pathlib import Path

    return path is not None and Path(path).expanduser().is_dir()


def _edit_check(pipe: Any, args: dict[str, Any]) -> None:
    from attnkit.edit import build_controllers

    _prompt_check(pipe, args["source"], *args["targets"])
    image = args["image"]
    if args["paste_unedited"] and (image is None or not args["blend"]):
        raise AttnkitError("field 'paste_unedited' keeps a real image's pixels outside the local-blend region: "
                           "use it with 'image' and 'blend'")
    if args["subtract"] and not args["blend"]:
        raise AttnkitError("field 'subtract' keeps a word's region out of the local blend: give 'blend' words too")
    inverting = [f for f in ("inversion", "inner_steps", "lr", "crop") if args[f] is not None]
    if inverting and (image is None or _is_saved_inversion(image)):
        raise AttnkitError(f"field {inverting[0]!r} sets how an image file is inverted: give 'image' (a file)")
    if image is not None and (args["height"] is not None or args["width"] is not None):
        raise AttnkitError("fields 'height'/'width': with 'image' the image fixes the size; leave them out")
    # The controllers check every schedule, word and weight against the tokenizer, before any sampling.
    build_controllers(text_tokenizer(pipe), [args["source"], *args["targets"]], **_edit_options(args))


def _edit_options(args: dict[str, Any]) -> dict[str, Any]:
    """The keyword arguments of edit() / edit_image() (and build_controllers) for these fields."""
    cross = args["cross"]
    if args["cross_words"]:  # the CLI's --cross F --cross-word W=F is Python's {"default_": F, W: F}
        base = cross if isinstance(cross, dict) else {"default_": cross}
        cross = {**base, **args["cross_words"]}
    options: dict[str, Any] = dict(kind=args["kind"], cross=cross, blend=args["blend"] or None,
                                   blend_threshold=args["blend_threshold"], blend_start=args["blend_start"],
                                   subtract=args["subtract"] or None, subtract_threshold=args["subtract_threshold"],
                                   reweight=args["reweight"] or None)
    for name in ("self", "self_res"):  # else the library's defaults, which differ for generated and real images
        if args[name] is not None:
            options[name] = args[name]
    return options


def edit_names(source: str, targets: list[str]) -> list[str]:
    """File names of edits after what changed (as ``attnkit edit`` names them): the target's words that differ
    from the source (``01_blue.png``), or the removed words (``01_without_square.png``)."""
    import difflib

    before = source.split()
    names = []
    for i, target in enumerate(targets, start=1):
        after = target.split()
        matcher = difflib.SequenceMatcher(a=[w.lower() for w in before], b=[w.lower() for w in after],
                                          autojunk=False)
        added, removed = [], []
        for tag, i1, i2, j1, j2 in matcher.get_opcodes():
            if tag in ("replace", "insert"):
                added += after[j1:j2]
            if tag == "delete":
                removed += before[i1:i2]
        words = added or (["without", *removed] if removed else ["same"])
        names.append(f"{i:02d}_{safe_name('_'.join(words))[:48].strip('_') or 'edit'}.png")
    return names


def _record_inversion(out: Output, inv: Any) -> None:
    out.settings.update(method=inv.method, steps=inv.steps, guidance=inv.guidance, crop=inv.crop.to_dict(),
                        inner_steps=inv.inner_steps, null_text=inv.null_text)


def _run_edit(pipe: Any, args: dict[str, Any], ctx: RunContext) -> Output:
    import json

    from attnkit.edit import edit
    from attnkit.viz import image_grid

    options = _edit_options(args)
    out = Output(None, settings={"targets": list(args["targets"])})  # type: ignore[arg-type]
    start = time.perf_counter()
    inv = None
    image = args["image"]
    if image is None:
        result = edit(pipe, args["source"], list(args["targets"]), seed=args["seed"], steps=args["steps"],
                      guidance=args["guidance"], height=args["height"], width=args["width"], maps=False,
                      progress=ctx.progress, **options)
    else:
        from attnkit.inversion import Inversion, edit_image

        out.settings["image"] = str(image)
        with ddim_for_the_run(pipe):
            if _is_saved_inversion(image):  # an inversion `attnkit invert` (or the app) saved: not made again
                inv = Inversion.load(image)
                _record_inversion(out, inv)
                out.settings["reused_inversion"] = True
            else:
                from attnkit.images import load_image

                defaults = {"inversion": "null-text", "inner_steps": 10, "crop": "center"}
                inv = _invert(pipe, load_image(image), args["source"],
                              {**args, **{k: v for k, v in defaults.items() if args[k] is None}}, ctx, out)
            result = edit_image(pipe, inv, list(args["targets"]), maps=False,
                                paste_unedited=args["paste_unedited"], target_uncond=args["target_uncond"],
                                guidance=args["guidance"], progress=ctx.progress, **options)
    out.timings["edit"] = round(time.perf_counter() - start, 3)
    out.settings.update(json.loads(json.dumps(result.settings, default=str)))
    first = "reconstruction" if image is not None else "source"
    inputs = [(inv.image, "input")] if inv is not None and inv.image is not None else []
    tiles = [im for im, _ in inputs] + list(result.images)
    captions = [c for _, c in inputs] + [f"{first}: {args['source']}", *args["targets"]]
    out.images.append(("grid.png", image_grid(tiles, captions), {}))
    for picture, _ in inputs:
        out.images.append(("input.png", picture, {}))
    names = [f"00_{first}.png", *edit_names(args["source"], list(args["targets"]))]
    for img, prompt, name in zip(result.images, result.prompts, names, strict=True):
        out.images.append((name, img, {"edited_prompt": prompt}))
    out.result = {"edit": result, "inversion": inv}
    return out


register(Method(
    "edit", "Prompt-to-Prompt: edit the source prompt's image into each edited prompt, from the same noise.",
    (Field("source", "text", help="The source prompt (the image's caption for a real image).", cli="arg",
           required=True),
     Field("targets", "words", help="The edited prompts.", cli="--to", required=True),
     Field("kind", "choice", "auto", "replace (word swap), refine (words added/removed) or auto.", "--kind",
           choices=("auto", "replace", "refine")),
     Field("cross", "cross", 0.8, "Cross-attention replacement: a fraction or [start, end].", "--cross"),
     Field("cross_words", "weights", None, "Per-word cross-attention replacement fractions {word: f}.",
           "--cross-word"),
     Field("self", "window", None, "Self-attention replacement (default 0.4; 0.5 for a real image).", "--self"),
     Field("self_res", "int", None, "Largest self-attention grid side replaced (default: the paper's 16; 32 "
           "for a real image).", "--self-res", minimum=1),
     Field("blend", "words", None, "Local blend: words whose region may change; the rest stays.", "--blend"),
     Field("blend_threshold", "float", 0.3, "Local-blend mask threshold.", "--blend-threshold", minimum=0,
           maximum=1),
     Field("blend_start", "float", 0.0, "Local blend starts after this fraction of the steps.", "--blend-start",
           minimum=0, maximum=1),
     Field("subtract", "words", None, "Local blend: words whose region must stay.", "--subtract"),
     Field("subtract_threshold", "float", 0.3, "Mask threshold of the subtract words.", "--subtract-threshold",
           minimum=0, maximum=1),
     Field("reweight", "weights", None, "Scale the edits' attention to words {word: factor}.", "--reweight"),
     Field("image", "path", None, "A real image to edit (inverted first; 'source' is its caption), or a folder "
           "an inversion was saved to (reused: no second inversion).", "--image"),
     Field("paste_unedited", "bool", False, "Real image + blend: keep the input's pixels outside the blend.",
           "--paste-unedited"),
     Field("target_uncond", "choice", "pipeline", "Real image: the edits' unconditional embedding.",
           "--target-uncond", choices=("pipeline", "inversion")),
     Field("inversion", "choice", None, "Image file: inversion method (default null-text).", "--method",
           choices=("null-text", "negative-prompt", "ddim")),
     Field("inner_steps", "int", None, "Image file: null-text's optimisation steps per step (default 10).",
           "--inner-steps", minimum=1, maximum=100),
     Field("lr", "float", None, "Image file: null-text's learning rate (default: the model's own).", "--lr",
           minimum=0),
     Field("crop", "choice", None, "Image file: 'center' (default) or 'stretch'.", "--crop",
           choices=("center", "stretch")),
     *SAMPLING),
    _run_edit, prompt_field="source", check=_edit_check,
))


# -- segment ------------------------------------------------------------------------------------------------
def _segment_check(pipe: Any, args: dict[str, Any]) -> None:
    from attnkit.segmentation import _check_options, candidate_words

    _check_options(args["clustering"], args["refine"], args["real"], args["threshold"], args["segments"], 1,
                   args["timestep"])
    _prompt_check(pipe, args["prompt"])
    if args["words"]:
        candidate_words(text_tokenizer(pipe), args["prompt"], list(args["words"]))  # names a missing word


def _run_segment(pipe: Any, args: dict[str, Any], ctx: RunContext) -> Output:
    from attnkit.images import load_image
    from attnkit.segmentation import segment

    picture = load_image(args["image"]) if args["image"] else None
    start = time.perf_counter()
    seg = segment(pipe, prompt=args["prompt"], image=picture, n_segments=args["segments"], method=args["clustering"],
                  words=list(args["words"]) if args["words"] else None, threshold=args["threshold"],
                  refine=args["refine"], real=args["real"], timestep=args["timestep"], seed=args["seed"],
                  steps=args["steps"], guidance=args["guidance"], height=args["height"], width=args["width"],
                  progress=ctx.progress)
    record = seg.record()
    settings = {"seed": args["seed"], "height": seg.image.height, "width": seg.image.width,
                **{k: record["settings"][k] for k in ("steps", "guidance") if k in record["settings"]},
                "segments": record["segments"], "grid": record["grid"], "settings": record["settings"],
                "segment_seconds": record["seconds"]}
    if args["image"]:
        settings["image"] = args["image"]
    out = Output(None, settings=settings, result=seg)  # type: ignore[arg-type]
    out.timings["segment"] = round(time.perf_counter() - start, 3)
    out.images.append(("image.png", seg.image, {}))
    out.images.append(("overlay.png", seg.overlay(), {"legend": seg.legend()}))
    out.images.append(("labels.png", seg.label_image(), {"labels": seg.labels}))
    return out


register(Method(
    "segment", "Self-segmentation: segments from self-attention, each named by a prompt word through "
    "cross-attention.",
    (Field("prompt", "text", help="The prompt to generate, or the caption of the image.", cli="--prompt",
           required=True),
     Field("image", "path", None, "Segment this real image (a file) instead of generating the prompt.", "--image"),
     # "method" names the job's method in a job line, so the Python API's ``method=`` is "clustering" here
     Field("clustering", "choice", "kmeans", "kmeans (Patashnik et al.) or merge (DiffSeg: no segment count "
           "needed).", "--method", choices=("kmeans", "merge")),
     Field("segments", "int", None, "kmeans: clusters (default 5); merge: at most this many.", "--segments",
           minimum=2),
     Field("words", "words", None, "Candidate labels (default: the prompt's content words).", "--words"),
     Field("threshold", "float", 0.4, "Score a word needs to name a segment (else background).", "--threshold",
           minimum=0, maximum=1),
     Field("refine", "choice", "bilateral", "bilateral (image-guided) or none (bilinear only).", "--refine",
           choices=("bilateral", "none")),
     Field("real", "choice", "noise", "A real image: noise (one UNet pass, DiffSeg) or invert.", "--real",
           choices=("noise", "invert")),
     Field("timestep", "int", 300, "A real image with real=noise: the noise level (0-999).", "--timestep",
           minimum=0, maximum=999),
     *SAMPLING),
    _run_segment, check=_segment_check,
))


# -- style / consistent (shared attention: Style Aligned, ConsiStory) ----------------------------------------
PROMPTS = Field("prompts", "words", help="Two or more prompts: the first is the reference, every other one a target.",
                cli="arg", required=True)


def shared_names(prompts: list[str], references: list[int]) -> list[str]:
    """File names of a shared-attention run's images (as ``attnkit style`` / ``consistent`` name them):
    ``00_reference.png``, then ``NN_<first five words of the prompt>.png`` per target."""
    import re

    names = []
    for i, prompt in enumerate(prompts):
        words = "reference" if i in references else "_".join(re.findall(r"[A-Za-z0-9]+", prompt)[:5])[:48]
        names.append(f"{i:02d}_{words.strip('_') or 'target'}.png")
    return names


def _shared_check(pipe: Any, prompts: list[str], style: str | None = None) -> None:
    if len(prompts) < 2:
        raise AttnkitError(f"field 'prompts': give at least 2 prompts (the reference first, then one target or "
                           f"more), got {len(prompts)}")
    _prompt_check(pipe, *(f"{p}, {style.strip()}" if style else p for p in prompts))


def _shared_output(args: dict[str, Any], result: Any, start: float, settings: dict[str, Any]) -> Output:
    """The CLI's files: grid.png (each prompt under its image; a real reference's input first), input.png,
    00_reference.png and NN_<prompt>.png; the library's record in the settings."""
    import json

    from attnkit.viz import image_grid

    record = json.loads(json.dumps(result.record()))
    out = Output(None, settings={"prompt": args["prompts"][0], **settings, **record}, result=result)  # type: ignore[arg-type]
    out.timings["generate"] = round(time.perf_counter() - start, 3)
    inputs = [(result.inversion.image, "input")] if result.inversion is not None else []
    captions = [f"reference: {p}" if i in result.references else p for i, p in enumerate(result.prompts)]
    out.images.append(("grid.png", image_grid([im for im, _ in inputs] + list(result.images),
                                              [c for _, c in inputs] + captions), {}))
    for picture, name in inputs:
        out.images.append((f"{name}.png", picture, {}))
    for img, prompt, name in zip(result.images, result.prompts, shared_names(result.prompts, result.references),
                                 strict=True):
        out.images.append((name, img, {"image_prompt": prompt}))
    return out


def _style_check(pipe: Any, args: dict[str, Any]) -> None:
    style = args["style"]
    if style is not None and not style.strip():
        raise AttnkitError("field 'style' is empty: give a style description, or leave it out")
    if args["reference"] is not None and (args["height"] is not None or args["width"] is not None):
        raise AttnkitError("fields 'height'/'width': with 'reference' the image fixes the size; leave them out")
    _shared_check(pipe, list(args["prompts"]), style)


def _run_style(pipe: Any, args: dict[str, Any], ctx: RunContext) -> Output:
    from attnkit.shared import style_aligned

    options = dict(style=args["style"], seed=args["seed"], scale=args["scale"], shift=args["shift"],
                   adain_values=args["adain_values"], share_group_norm=args["group_norm"],
                   only_self_level=args["only_self_level"], steps=args["steps"], guidance=args["guidance"],
                   height=args["height"], width=args["width"], progress=ctx.progress)
    start = time.perf_counter()
    if args["reference"] is None:
        return _shared_output(args, style_aligned(pipe, list(args["prompts"]), **options), start, {})
    from attnkit.images import load_image

    picture = load_image(args["reference"])
    with ddim_for_the_run(pipe):  # the reference follows its DDIM trajectory; the pipeline's scheduler comes back
        result = style_aligned(pipe, list(args["prompts"]), reference=picture, **options)
    return _shared_output(args, result, start, {"reference_image": args["reference"]})


register(Method(
    "style", "Style Aligned: every prompt after the first takes the first one's style (shared attention).",
    (PROMPTS,
     Field("style", "str", None, "A style description appended to every prompt, e.g. 'watercolor painting'.",
           "--style"),
     Field("reference", "path", None, "A real reference image (DDIM-inverted; the first prompt is its caption).",
           "--reference"),
     Field("shift", "float", 0.0, "Log-shift added to the reference's attention scores (0: none; the official "
           "transfer notebook: 0.693 = log 2).", "--shift"),
     Field("scale", "float", 1.0, "Scale of the reference's attention scores.", "--scale"),
     Field("adain_values", "bool", False, "Also normalise the values to the reference's statistics (queries and "
           "keys always are).", "--adain-values"),
     Field("group_norm", "bool", None, "Share GroupNorm statistics with the reference (default: on for SD1.x/2.x, "
           "off for SDXL).", "--group-norm"),
     Field("only_self_level", "float", 0.0, "Fraction of the self-attention layers left unshared, by the official "
           "rule (0: all share).", "--only-self-level", minimum=0, maximum=1),
     *SAMPLING),
    _run_style, prompt_field="prompts", check=_style_check,
))


def _consistent_check(pipe: Any, args: dict[str, Any]) -> None:
    subject = args["subject"]
    if not subject.strip() or len(subject.split()) != 1:
        raise AttnkitError(f"field 'subject' {subject!r}: give one word that every prompt contains, e.g. dog")
    for prompt in args["prompts"]:
        if subject.strip().lower() not in (w.strip(".,;:!?").lower() for w in prompt.split()):
            raise AttnkitError(f"field 'subject' {subject!r} is not a word of the prompt {prompt!r}: every prompt "
                               "must name the subject")
    if not args["mask_dropout"] < 1.0:
        raise AttnkitError(f"field 'mask_dropout' {args['mask_dropout']}: give a probability from 0 up to (not "
                           "including) 1")
    _shared_check(pipe, list(args["prompts"]))


def _run_consistent(pipe: Any, args: dict[str, Any], ctx: RunContext) -> Output:
    from attnkit.shared import consistent

    start = time.perf_counter()
    result = consistent(pipe, list(args["prompts"]), subject=args["subject"].strip(), seed=args["seed"],
                        mask_dropout=args["mask_dropout"], steps=args["steps"], guidance=args["guidance"],
                        height=args["height"], width=args["width"], progress=ctx.progress)
    return _shared_output(args, result, start, {})


register(Method(
    "consistent", "Subject-consistent generation (ConsiStory's shared attention): the first prompt's subject is "
    "shared with every other prompt inside the subject's mask.",
    (PROMPTS,
     Field("subject", "str", help="The subject: a word of every prompt (its cross-attention gives the shared "
           "region).", cli="--subject", required=True),
     Field("mask_dropout", "float", 0.5, "Probability of dropping a pixel of the subject mask at each step, for "
           "layout diversity (ConsiStory: 0.5).", "--mask-dropout", minimum=0, maximum=1),
     *SAMPLING),
    _run_consistent, prompt_field="prompts", check=_consistent_check,
))


# -- mutual-edit (MasaCtrl's mutual self-attention) ------------------------------------------------------------
def index_or_fraction(value: float | None, what: str) -> int | float | None:
    """A start step or layer as the front ends take it (one number): below 1 a fraction of the steps/layers
    (``0.625``), from 1 on an index (``4``, a whole number). None stays None (the library's default)."""
    if value is None:
        return None
    if not value >= 0:  # also NaN
        raise AttnkitError(f"{what} {value}: give an index (a whole number such as 4) or a fraction below 1")
    if value < 1:
        return float(value)
    if value != int(value):
        raise AttnkitError(f"{what} {value}: from 1 on it is an index (a whole number such as 4); a fraction of "
                           "the total lies below 1")
    return int(value)


def mask_words_for(words: list[str] | None, prompts: list[str], what: str) -> str | list[str] | None:
    """The mask words as :func:`attnkit.mutual_edit` takes them (one word for every prompt, or one per prompt,
    the source first), checked against the prompts' words before any model runs."""
    if not words:
        return None
    if len(words) not in (1, len(prompts)):
        raise AttnkitError(f"{what}: give one word for every prompt or one per prompt ({len(prompts)}, the source "
                           f"first), got {len(words)}")
    per_prompt = list(words) * len(prompts) if len(words) == 1 else list(words)
    for word, prompt in zip(per_prompt, prompts, strict=True):
        if word.strip().lower() not in (w.strip(".,;:!?").lower() for w in prompt.split()):
            raise AttnkitError(f"{what} {word!r} is not a word of the prompt {prompt!r}: the mask of each prompt "
                               "comes from its own word's cross-attention")
    return per_prompt[0].strip() if len(words) == 1 else [w.strip() for w in per_prompt]


def _mutual_check(pipe: Any, args: dict[str, Any]) -> None:
    from attnkit.controllers.shared import MutualSelfAttention

    prompts = [args["source"], *args["targets"]]
    starts = {name: index_or_fraction(args[name], f"field {name!r}") for name in ("start_step", "start_layer")}
    mask_words_for(args["mask_words"], prompts, "field 'mask_words'")
    if args["image"] is not None and (args["height"] is not None or args["width"] is not None):
        raise AttnkitError("fields 'height'/'width': with 'image' the image fixes the size; leave them out")
    _prompt_check(pipe, *prompts)
    # a start layer this model lacks fails here, before any job of a batch samples
    MutualSelfAttention(0, **{k: v for k, v in starts.items() if v is not None}).check(pipe)


def _run_mutual(pipe: Any, args: dict[str, Any], ctx: RunContext) -> Output:
    from attnkit.shared import mutual_edit

    prompts = [args["source"], *args["targets"]]
    options: dict[str, Any] = dict(seed=args["seed"], mask_words=mask_words_for(args["mask_words"], prompts, "mask"),
                                   mask_threshold=args["mask_threshold"], steps=args["steps"],
                                   guidance=args["guidance"], height=args["height"], width=args["width"],
                                   progress=ctx.progress)
    for name in ("start_step", "start_layer"):
        if args[name] is not None:
            options[name] = index_or_fraction(args[name], name)
    start = time.perf_counter()
    if args["image"] is None:
        result = mutual_edit(pipe, args["source"], list(args["targets"]), **options)
        settings: dict[str, Any] = {}
    else:
        from attnkit.images import load_image

        picture = load_image(args["image"])
        with ddim_for_the_run(pipe):  # the source follows its DDIM trajectory; the scheduler comes back after
            result = mutual_edit(pipe, args["source"], list(args["targets"]), reference=picture, **options)
        settings = {"image": args["image"]}
    return mutual_output(args["source"], list(args["targets"]), result, start, settings)


def mutual_output(source: str, targets: list[str], result: Any, start: float, settings: dict[str, Any]) -> Output:
    """``attnkit mutual-edit``'s files: grid.png (source first, each prompt under its image; a real source's
    input before it), input.png, 00_source.png and one NN_<changed words>.png per target (as ``attnkit edit``
    names its edits); the library's record in the settings."""
    import json

    from attnkit.viz import image_grid

    record = json.loads(json.dumps(result.record()))
    out = Output(None, settings={"prompt": source, **settings, **record}, result=result)  # type: ignore[arg-type]
    out.timings["generate"] = round(time.perf_counter() - start, 3)
    inputs = [(result.inversion.image, "input")] if result.inversion is not None else []
    captions = [c for _, c in inputs] + [f"source: {source}", *targets]
    out.images.append(("grid.png", image_grid([im for im, _ in inputs] + list(result.images), captions), {}))
    for picture, name in inputs:
        out.images.append((f"{name}.png", picture, {}))
    for img, prompt, name in zip(result.images, result.prompts, ["00_source.png", *edit_names(source, targets)],
                                 strict=True):
        out.images.append((name, img, {"image_prompt": prompt}))
    return out


register(Method(
    "mutual-edit", "MasaCtrl: edit the source prompt's image into each target prompt (a new pose or shape) keeping "
    "its appearance (mutual self-attention).",
    (Field("source", "text", help="The source prompt (the image's caption with 'image').", cli="arg",
           required=True),
     Field("targets", "words", help="The target prompts (each changes the source's pose or shape).", cli="--to",
           required=True),
     Field("start_step", "float", None, "Step the sharing starts at: an index (whole number) or a fraction of "
           "the steps below 1 (default: MasaCtrl's 4).", "--start-step", minimum=0),
     Field("start_layer", "float", None, "Self-attention layer the sharing starts at: an index (whole number) or "
           "a fraction of the layers below 1 (default 0.625, MasaCtrl's layer 10 of 16).", "--start-layer",
           minimum=0),
     Field("mask_words", "words", None, "Mask-guided MasaCtrl: a word whose cross-attention splits foreground "
           "from background (one for every prompt, or one per prompt, the source first).", "--mask-word"),
     Field("mask_threshold", "float", 0.1, "Mask threshold after min-max normalisation (MasaCtrl: 0.1).",
           "--mask-threshold", minimum=0, maximum=1),
     Field("image", "path", None, "A real source image (DDIM-inverted; the source prompt is its caption).",
           "--image"),
     *SAMPLING),
    _run_mutual, prompt_field="source", check=_mutual_check,
))


# -- transfer (cross-image attention: appearance transfer) ----------------------------------------------------------
TRANSFER_ROLES = ("structure", "appearance")


def _transfer_prompt(args: dict[str, Any]) -> str:
    """The output's prompt: ``prompt``, else the structure when that is a prompt (as ``attnkit transfer``)."""
    return args["prompt"] if args["prompt"] is not None else args["structure"]


def _transfer_check(pipe: Any, args: dict[str, Any]) -> None:
    from pathlib import Path

    from attnkit.transfer import input_kind, object_words

    if not args["skip"] < 1.0:
        raise AttnkitError(f"field 'skip' {args['skip']}: give the fraction of the timesteps to skip, from 0 up to "
                           "(not including) 1")
    kinds = {role: input_kind(args[role]) for role in TRANSFER_ROLES}
    for role, kind in kinds.items():
        if kind == "image" and not Path(args[role]).expanduser().is_file():
            raise AttnkitError(f"field {role!r}: {args[role]!r} looks like an image file, and there is none: check "
                               "the path, or give a prompt (words, no file extension)")
    if args["prompt"] is None and kinds["structure"] != "prompt":
        raise AttnkitError("field 'prompt' is missing: give the output's prompt (with an image as the structure it "
                           "is not known)")
    prompt = _transfer_prompt(args)
    _prompt_check(pipe, prompt, *(args[role] for role in TRANSFER_ROLES if kinds[role] == "prompt"))
    if args["adain"] and args["masks"] != "none":  # the masks' words, checked now rather than after the inputs
        words = list(args["object_words"]) if args["object_words"] else None
        for role in TRANSFER_ROLES:
            text = args[role] if kinds[role] == "prompt" else prompt  # a real image is inverted with the prompt
            if not object_words(text, words):
                raise AttnkitError(f"field 'object_words': no object word for the {role}'s masks in {text!r}: give "
                                   "words of that prompt, or masks='none' (plain AdaIN)")


def _run_transfer(pipe: Any, args: dict[str, Any], ctx: RunContext) -> Output:
    import json

    from attnkit.images import load_image
    from attnkit.transfer import input_kind, transfer

    # images are read here, as the CLI reads them, so both hand transfer() the same pixels
    sources = {role: load_image(args[role]) if input_kind(args[role]) == "image" else args[role]
               for role in TRANSFER_ROLES}
    start = time.perf_counter()
    result = transfer(
        pipe, structure=sources["structure"], appearance=sources["appearance"], prompt=_transfer_prompt(args),
        steps=args["steps"], skip=args["skip"], inversion=args["inversion"], contrast=args["contrast"],
        swap_guidance=None if args["swap_guidance"] == 1 else args["swap_guidance"], adain=args["adain"],
        masks=None if args["masks"] == "none" else args["masks"],
        object_words=list(args["object_words"]) if args["object_words"] else None,
        structure_kv=args["structure_kv"], seed=args["seed"], crop=args["crop"], progress=ctx.progress)
    # the record `attnkit transfer` writes: its prompt, both inputs as given, the size and the library's record
    settings = {"prompt": result.prompt, "structure": args["structure"], "appearance": args["appearance"],
                "seed": args["seed"], "steps": args["steps"], "height": result.image.height,
                "width": result.image.width, "transfer": json.loads(json.dumps(result.record()))}
    out = Output(None, settings=settings, result=result)  # type: ignore[arg-type]
    out.timings["transfer"] = round(time.perf_counter() - start, 3)
    out.images.append(("strip.png", result.strip(), {}))
    out.images.append(("output.png", result.image, {}))
    for role in TRANSFER_ROLES:
        out.images.append((f"{role}.png", result.inputs[role], {}))
        out.images.append((f"{role}_reconstructed.png", getattr(result, role), {}))
    return out


register(Method(
    "transfer", "Cross-image attention: the structure's layout in the appearance's look (each an image file, "
    "inverted, or a prompt, generated).",
    (Field("structure", "text", help="The structure: an image file (inverted) or a prompt (generated with seed).",
           cli="--structure", required=True),
     Field("appearance", "text", help="The appearance: an image file (inverted) or a prompt (generated with "
           "seed + 1).", cli="--appearance", required=True),
     Field("prompt", "text", None, "The output's prompt; real images are inverted with it too (default: the "
           "structure when that is a prompt).", "--prompt"),
     Field("steps", "int", 100, "Timesteps of the schedule (the paper's 100).", "--steps", minimum=1, maximum=1000),
     Field("skip", "float", 0.32, "Fraction of the timesteps skipped at the start (the paper's 32 of 100).",
           "--skip", minimum=0, maximum=1),
     Field("inversion", "choice", "ddpm", "Real images: ddpm (edit-friendly, the paper's) or ddim.", "--inversion",
           choices=("ddpm", "ddim")),
     Field("contrast", "float", 1.67, "Attention contrast strength (1: off).", "--contrast", minimum=0),
     Field("swap_guidance", "float", 3.5, "Swap guidance scale at the first step (1: off).", "--swap-guidance",
           minimum=1),
     Field("adain", "bool", True, "Masked AdaIN of the output's latents.", "--adain"),
     Field("masks", "choice", "auto", "AdaIN's object masks: auto (self-segmentation where attnkit has it, else "
           "attention), segment, attention, or none (plain AdaIN).", "--masks",
           choices=("auto", "segment", "attention", "none")),
     Field("object_words", "words", None, "Words naming the objects for the masks (default: the prompts' content "
           "words).", "--object-word"),
     Field("structure_kv", "bool", False, "The official code's quirk: structure keys/values at steps 10, 15, ..., "
           "35 of 68.", "--structure-kv"),
     CROP, SEED),
    _run_transfer, check=_transfer_check,
))


# The MM-DiT methods (ConceptAttention, Stable Flow; rectified-flow inversion and FlowEdit) register themselves in
# their own modules.
from attnkit.runs import flow_methods, transformer_methods  # noqa: E402,F401

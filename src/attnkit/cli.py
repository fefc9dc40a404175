"""The ``attnkit`` command line (also ``python -m attnkit``): one function per command.

    attnkit generate "a red circle on a white background" --seed 1 --out outputs/gen
    attnkit maps "a red circle and a blue square on a white background" --words red --words square
    attnkit maps "a cat wearing sunglasses" --model runwayml/stable-diffusion-v1-5 --device cuda --dtype fp16

Every command writes into a staging folder first and moves the finished files into ``--out`` at the end, so a
failed run leaves nothing half-written. ``record.json`` beside the images says what was run.
``--model`` defaults to the bundled model; ``--model tiny`` (or ``tiny-sdxl``) builds a random tiny pipeline
for trying the commands out without any model files (its images are noise).

Adding a command: one function with ``@app.command()`` and ``@_friendly_errors`` that loads with ``_load``,
samples with ``_sample`` and writes through ``_staged_output`` and ``_Run`` (which writes record.json).
"""

from __future__ import annotations

import functools
import json
import re
import shutil
import tempfile
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Annotated, Any

import typer

app = typer.Typer(
    help="Attention maps and attention control for diffusers text-to-image pipelines.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)

TINY_MODELS = {"tiny": "sd", "tiny-sdxl": "sdxl"}
RECORD = "record.json"

# Options shared by the commands (typer reads them from the annotations).
Prompt = Annotated[str, typer.Argument(help="The text prompt.")]
Model = Annotated[str | None, typer.Option(
    help="A local pipeline folder, a Hugging Face hub id, or 'tiny'/'tiny-sdxl' (random test pipelines). "
         "Default: the bundled model.")]
Seed = Annotated[int, typer.Option(help="Seed of the initial noise.")]
Steps = Annotated[int | None, typer.Option(help="Denoising steps (default: the model's own).")]
Guidance = Annotated[float | None, typer.Option(help="Guidance scale (default: the model's own).")]
Height = Annotated[int | None, typer.Option(help="Image height in pixels (default: the model's own).")]
Width = Annotated[int | None, typer.Option(help="Image width in pixels (default: the model's own).")]
Device = Annotated[str, typer.Option(help="'auto' (cuda when available, else cpu), 'cpu', 'cuda', 'cuda:1', 'mps'.")]
Dtype = Annotated[str, typer.Option(help="float32 (fp32), float16 (fp16) or bfloat16 (bf16).")]
Out = Annotated[Path, typer.Option(help="Output folder (created; files of the same name are replaced).")]
Quiet = Annotated[bool, typer.Option("--quiet", "-q", help="No progress bars or summary.")]
Threads = Annotated[int | None, typer.Option(
    help="CPU threads for torch (default: torch's choice; 1 is fastest on a busy shared machine).")]


def _friendly_errors(command: Callable[..., None]) -> Callable[..., None]:
    """Turn attnkit's own errors (bad input, missing model) into one clear line and exit code 2."""

    @functools.wraps(command)
    def wrapper(*args: Any, **kwargs: Any) -> None:
        from attnkit.engine import AttnkitError

        try:
            command(*args, **kwargs)
        except AttnkitError as error:
            typer.echo(f"attnkit: error: {error}", err=True)
            raise typer.Exit(code=2) from None

    return wrapper


def _resolve_device(device: str, threads: int | None = None) -> str:
    import torch

    if threads is not None:
        if threads < 1:
            from attnkit.engine import AttnkitError

            raise AttnkitError(f"--threads {threads}: give a positive number of threads")
        torch.set_num_threads(threads)
    if device != "auto":
        return device

    return "cuda" if torch.cuda.is_available() else "cpu"


def _quiet_loading(quiet: bool) -> None:
    # Loading bars and log levels of diffusers/transformers are global switches; the CLI owns its process, so
    # flip them. transformers' warnings are always muted: loading any SD pipeline makes it warn about
    # torchvision for an image processor attnkit never uses, which only confuses.
    import diffusers
    import transformers

    transformers.utils.logging.set_verbosity_error()
    if quiet:
        diffusers.utils.logging.disable_progress_bar()
        transformers.utils.logging.disable_progress_bar()


def _load(model: str | None, device: str, dtype: str) -> Any:
    """The pipeline for ``--model``: the bundled model (None), a tiny random one, a folder or a hub id."""
    from attnkit.models import load_pipeline

    if model in TINY_MODELS:
        from attnkit.testing import tiny_pipeline

        return load_pipeline(tiny_pipeline(TINY_MODELS[model]), dtype=dtype, device=device)
    return load_pipeline(model, dtype=dtype, device=device)


@contextmanager
def _staged_output(out: Path) -> Iterator[Path]:
    """A fresh staging folder whose files move into ``out`` only when the block succeeds (record.json last,
    so its presence means the run finished)."""
    if out.exists() and not out.is_dir():
        from attnkit.engine import AttnkitError

        raise AttnkitError(f"--out {out} is a file: pass a folder")
    staging = Path(tempfile.mkdtemp(prefix="attnkit-"))
    try:
        yield staging
        out.mkdir(parents=True, exist_ok=True)
        files = sorted((p for p in staging.rglob("*") if p.is_file()), key=lambda p: (p.name == RECORD, str(p)))
        for path in files:
            target = out / path.relative_to(staging)
            target.parent.mkdir(parents=True, exist_ok=True)
            shutil.move(str(path), str(target))
    finally:
        shutil.rmtree(staging, ignore_errors=True)


def _safe_name(word: str) -> str:
    return re.sub(r"[^A-Za-z0-9_-]+", "_", word).strip("_") or "word"


def _parse_pixel(text: str) -> tuple[int, int]:
    from attnkit.engine import AttnkitError

    parts = text.replace(" ", "").split(",")
    if len(parts) != 2 or not all(p.lstrip("-").isdigit() for p in parts):
        raise AttnkitError(f"--self-at {text!r}: give the query pixel as Y,X in the self-attention grid, e.g. 8,8")
    return int(parts[0]), int(parts[1])


class _Run:
    """What one command did: settings, files and timings, written as ``record.json``."""

    def __init__(self, command: str, prompt: str, model: str | None, device: str, dtype: str) -> None:
        import attnkit

        self.model, self.device, self.dtype = model, device, dtype
        self.started = time.perf_counter()
        self.record: dict[str, Any] = {
            "command": command, "prompt": prompt, "model": model or "bundled", "device": device, "dtype": dtype,
            "attnkit_version": attnkit.__version__, "files": [], "timings": {},
        }

    @classmethod
    def begin(cls, command: str, prompt: str, model: str | None, device: str, dtype: str, threads: int | None,
              quiet: bool) -> _Run:
        """Quiet the loaders, resolve the device and start the record (before any output folder exists)."""
        _quiet_loading(quiet)
        return cls(command, prompt, model, _resolve_device(device, threads), dtype)

    def load(self) -> Any:
        """The run's pipeline, its loading time recorded."""
        start = time.perf_counter()
        pipe = _load(self.model, self.device, self.dtype)
        self.time("load", start)
        return pipe

    def time(self, name: str, since: float) -> None:
        self.record["timings"][name] = round(time.perf_counter() - since, 3)

    def png_metadata(self) -> dict[str, Any]:
        keys = ("prompt", "seed", "model", "steps", "guidance", "height", "width", "dtype", "attnkit_version")
        return {k: self.record[k] for k in keys if k in self.record}

    def save(self, image: Any, folder: Path, name: str, **extra: Any) -> None:
        from attnkit.viz import save_png

        save_png(image, folder / name, {**self.png_metadata(), **extra})
        self.record["files"].append(name)

    def finish(self, folder: Path) -> None:
        self.time("total", self.started)
        self.record["files"].append(RECORD)
        (folder / RECORD).write_text(json.dumps(self.record, indent=2) + "\n")


def _sample(run: _Run, pipe: Any, prompt: str, controllers: tuple, seed: int, steps: int | None,
            guidance: float | None, height: int | None, width: int | None, quiet: bool) -> Any:
    from attnkit.sampling import generate as sample

    start = time.perf_counter()
    result = sample(pipe, prompt, *controllers, seed=seed, steps=steps, guidance=guidance, height=height,
                    width=width, progress=not quiet)
    run.time("generate", start)
    run.record.update(seed=seed, steps=result.steps, guidance=result.guidance, height=result.height,
                      width=result.width)
    return result


def _report(run: _Run, out: Path, quiet: bool) -> None:
    if not quiet:
        typer.echo(f"wrote {len(run.record['files'])} files to {out}: {', '.join(run.record['files'])}")


@app.command()
@_friendly_errors
def generate(prompt: Prompt, model: Model = None, seed: Seed = 0, steps: Steps = None, guidance: Guidance = None,
             height: Height = None, width: Width = None, device: Device = "auto", dtype: Dtype = "float32",
             out: Out = Path("outputs/generate"), quiet: Quiet = False, threads: Threads = None) -> None:
    """Generate an image: writes image.png (prompt, seed and settings in its metadata) and record.json."""
    run = _Run.begin("generate", prompt, model, device, dtype, threads, quiet)
    with _staged_output(out) as folder:
        pipe = run.load()
        result = _sample(run, pipe, prompt, (), seed, steps, guidance, height, width, quiet)
        run.save(result.images[0], folder, "image.png")
        run.finish(folder)
    _report(run, out, quiet)


@app.command()
@_friendly_errors
def maps(prompt: Prompt, model: Model = None, seed: Seed = 0, steps: Steps = None, guidance: Guidance = None,
         height: Height = None, width: Width = None, device: Device = "auto", dtype: Dtype = "float32",
         out: Out = Path("outputs/maps"), quiet: Quiet = False, threads: Threads = None,
         words: Annotated[list[str] | None, typer.Option(
             "--words", "-w", help="Words to map (repeat the option); default: every word of the prompt.")] = None,
         res: Annotated[int | None, typer.Option(
             help="Attention grid size to read, e.g. 16 (the 16x16 layers). Default: the largest grid of at "
                  "most max(16, latent size / 4), Prompt-to-Prompt's choice (16 for SD1.x at 512, 32 for SDXL)."
         )] = None,
         self_at: Annotated[str | None, typer.Option(
             help="Also map self-attention of the query pixel Y,X of the res x res grid, e.g. 8,8.")] = None,
         cmap: Annotated[str, typer.Option(help="matplotlib colormap of the heatmaps.")] = "jet") -> None:
    """Generate an image and its cross-attention maps: image.png, maps.png (a strip with the word under each
    map), words/NN_word.png overlays, self_attention.png with --self-at, and record.json."""
    from attnkit.store import AttentionStore
    from attnkit.tokens import word_spans, word_token_indices
    from attnkit.viz import enlarge, overlay, word_strip

    pixel = _parse_pixel(self_at) if self_at is not None else None
    run = _Run.begin("maps", prompt, model, device, dtype, threads, quiet)
    with _staged_output(out) as folder:
        pipe = run.load()
        res = res or _default_res(pipe, height, width)
        run.record.update(res=res, cmap=cmap)
        chosen = list(words) if words else [s.word for s in word_spans(pipe.tokenizer, prompt)]
        for word in chosen:  # fail before sampling when a word is not in the prompt
            word_token_indices(pipe.tokenizer, prompt, word)
        store = AttentionStore(kinds=("cross", "self") if pixel else ("cross",), res=res)
        result = _sample(run, pipe, prompt, (store,), seed, steps, guidance, height, width, quiet)
        image = result.images[0]
        heat = store.word_maps(prompt, words=chosen)
        run.record["words"] = list(heat)
        run.save(image, folder, "image.png")
        run.save(word_strip(image, heat, cmap=cmap), folder, "maps.png", words=list(heat), res=res)
        big = enlarge(image)  # small images (the bundled model's 64x64) are enlarged to stay readable
        for i, (word, m) in enumerate(heat.items()):
            run.save(overlay(big, m, cmap=cmap), folder, f"words/{i:02d}_{_safe_name(word)}.png", word=word, res=res)
        if pixel is not None:
            run.save(_self_attention_picture(store, image, pixel, cmap), folder, "self_attention.png",
                     pixel=list(pixel), res=res)
            run.record["self_at"] = list(pixel)
        run.finish(folder)
    _report(run, out, quiet)


def _invert_image(run: _Run, pipe: Any, image: Any, prompt: str, method: str, steps: int | None,
                  guidance: float | None, inner_steps: int, crop: str, quiet: bool, lr: float | None = None) -> Any:
    """Invert ``image`` (already loaded) for the ``invert`` and ``edit --image`` commands; records settings."""
    from attnkit.inversion import NullTextOptions, invert, use_ddim
    from attnkit.models import defaults_for

    use_ddim(pipe)  # regenerating an inversion needs DDIM; the CLI owns this pipeline
    options = NullTextOptions(inner_steps=inner_steps, lr=defaults_for(pipe).null_text_lr if lr is None else lr)
    start = time.perf_counter()
    inv = invert(pipe, image, prompt, method=method, steps=steps, guidance=guidance, crop=crop,  # type: ignore[arg-type]
                 null_text=options, progress=not quiet)
    run.time("invert", start)
    run.record.update(method=method, steps=inv.steps, guidance=inv.guidance, crop=inv.crop.to_dict(),
                      inner_steps=inv.inner_steps, null_text=inv.null_text)
    return inv


Method = Annotated[str, typer.Option(help="Inversion method: null-text, negative-prompt or ddim.")]
InnerSteps = Annotated[int, typer.Option(help="Null-text: at most this many optimisation steps per step.")]
LearningRate = Annotated[float | None, typer.Option(help="Null-text: Adam learning rate at step 0 (default: the "
                                                         "model's own; the paper's 0.01 for Stable Diffusion).")]
CropOpt = Annotated[str, typer.Option(help="Fit the image to the model: 'center' (crop to its aspect ratio) or "
                                           "'stretch'.")]
EditGuidance = Annotated[float | None, typer.Option(
    help="Guidance scale (default: the model's own; with --image 7.5, the null-text paper's).")]
InversionGuidance = Annotated[float | None, typer.Option(
    help="Guidance scale that null-text optimises for and that regeneration and edits use (default: 7.5, the "
         "null-text paper's, on every model).")]


@app.command()
@_friendly_errors
def invert(image: Annotated[str, typer.Argument(help="The image file to invert.")],
           prompt: Annotated[str, typer.Option(help="A caption of the image (the source prompt).")],
           method: Method = "null-text", model: Model = None, steps: Steps = None,
           guidance: InversionGuidance = None, inner_steps: InnerSteps = 10, lr: LearningRate = None,
           crop: CropOpt = "center", device: Device = "auto", dtype: Dtype = "float32", out: Out = Path("outputs/invert"), quiet: Quiet = False,
           threads: Threads = None) -> None:
    """Invert a real image: inversion.safetensors + inversion.json (load with attnkit.Inversion.load), the
    fitted input image.png, its reconstruction.png and record.json (reconstruction PSNR, crop, timings)."""
    from attnkit.images import load_image, psnr
    from attnkit.inversion import METHODS, check_prompt, reconstruct

    if method not in METHODS:
        from attnkit.engine import AttnkitError

        raise AttnkitError(f"--method {method!r}: use one of {', '.join(METHODS)}")
    picture = load_image(image)  # a bad file fails before the model loads
    run = _Run.begin("invert", prompt, model, device, dtype, threads, quiet)
    run.record["image"] = str(image)
    with _staged_output(out) as folder:
        pipe = run.load()
        check_prompt(pipe, prompt)
        inv = _invert_image(run, pipe, picture, prompt, method, steps, guidance, inner_steps, crop, quiet, lr)
        inv.save(folder, overwrite=True)
        run.record["files"] += ["inversion.safetensors", "inversion.json", "image.png"]
        start = time.perf_counter()
        rebuilt = reconstruct(pipe, inv, progress=not quiet)
        run.time("reconstruct", start)
        run.record["psnr_reconstruction"] = round(psnr(inv.image, rebuilt), 3)
        run.save(rebuilt, folder, "reconstruction.png", method=method)
        run.finish(folder)
    _report(run, out, quiet)


def _parse_window(text: str, option: str) -> float | tuple[float, float]:
    """``"0.8"`` → 0.8 and ``"0.2,0.8"`` → (0.2, 0.8), for --cross / --self."""
    from attnkit.engine import AttnkitError

    try:
        parts = [float(p) for p in text.split(",")]
    except ValueError:
        parts = []
    if len(parts) not in (1, 2):
        raise AttnkitError(f"{option} {text!r}: give a fraction like 0.8 or START,END like 0.2,0.8")
    return parts[0] if len(parts) == 1 else (parts[0], parts[1])


def _parse_weights(items: list[str] | None, option: str) -> dict[str, float]:
    """``["lego=2", "pink=-1"]`` → ``{"lego": 2.0, "pink": -1.0}``."""
    from attnkit.engine import AttnkitError

    weights: dict[str, float] = {}
    for item in items or []:
        word, _, value = item.partition("=")
        try:
            weights[word.strip()] = float(value)
        except ValueError:
            raise AttnkitError(f"{option} {item!r}: use WORD=FACTOR, e.g. {option} lego=2.0") from None
        if not word.strip():
            raise AttnkitError(f"{option} {item!r}: use WORD=FACTOR, e.g. {option} lego=2.0")
    return weights


@app.command()
@_friendly_errors
def edit(source: Annotated[str, typer.Argument(help="The source prompt (the image's caption with --image).")],
         to: Annotated[list[str], typer.Option("--to", help="An edited prompt (repeat for a series).")],
         kind: Annotated[str, typer.Option(help="replace (word swap), refine (words added/removed) or auto.")] = "auto",
         cross: Annotated[str, typer.Option(help="Cross-attention replacement: a fraction or START,END.")] = "0.8",
         cross_word: Annotated[list[str] | None, typer.Option(
             help="Per-word cross-attention replacement fraction WORD=F (repeatable).")] = None,
         self_steps: Annotated[str | None, typer.Option(
             "--self", help="Self-attention replacement: a fraction or START,END (default 0.4; 0.5 with "
                            "--image, as the null-text paper's notebook).")] = None,
         self_res: Annotated[int, typer.Option(help="Largest self-attention grid side replaced (paper: 16).")] = 16,
         blend: Annotated[list[str] | None, typer.Option(
             help="Local blend: a word whose region may change (repeatable); the rest stays.")] = None,
         blend_threshold: Annotated[float, typer.Option(help="Local-blend mask threshold.")] = 0.3,
         reweight: Annotated[list[str] | None, typer.Option(
             help="Scale a word's attention in the edits: WORD=F (repeatable; negative allowed).")] = None,
         image: Annotated[str | None, typer.Option(help="Edit this real image (inverted first; SOURCE is its "
                                                   "caption).")] = None,
         paste_unedited: Annotated[bool, typer.Option(
             help="With --image and --blend: keep the input's own pixels outside the blend region.")] = False,
         target_uncond: Annotated[str, typer.Option(
             help="With --image: the edits' unconditional embedding: 'pipeline' (the model's own) or 'inversion' "
                  "(the source's optimised ones, as the null-text notebook).")] = "pipeline",
         method: Method = "null-text", inner_steps: InnerSteps = 10, crop: CropOpt = "center",
         model: Model = None, seed: Seed = 0, steps: Steps = None, guidance: EditGuidance = None,
         height: Height = None, width: Width = None, device: Device = "auto", dtype: Dtype = "float32",
         out: Out = Path("outputs/edit"), quiet: Quiet = False, threads: Threads = None) -> None:
    """Prompt-to-Prompt: edit SOURCE's image into each --to prompt from the same noise. Writes grid.png
    (source + edits, prompts under the images), 00_source.png, 01_edit.png, ... and record.json."""
    from attnkit.edit import TARGET_UNCONDS
    from attnkit.edit import edit as p2p_edit
    from attnkit.viz import image_grid

    options: dict[str, Any] = dict(kind=kind, self_res=self_res, blend=list(blend) if blend else None,
                                   blend_threshold=blend_threshold,
                                   reweight=_parse_weights(reweight, "--reweight") or None, progress=not quiet)
    if self_steps is not None:  # else the library's default for generated / real images
        options["self"] = _parse_window(self_steps, "--self")
    window = _parse_window(cross, "--cross")
    per_word = _parse_weights(cross_word, "--cross-word")
    options["cross"] = {"default_": window, **per_word} if per_word else window
    if paste_unedited and (image is None or not blend):
        from attnkit.engine import AttnkitError

        raise AttnkitError("--paste-unedited keeps a real image's pixels outside the local-blend region: "
                           "pass it with --image and --blend")
    if target_uncond not in TARGET_UNCONDS:
        from attnkit.engine import AttnkitError

        raise AttnkitError(f"--target-uncond {target_uncond!r}: use {' or '.join(map(repr, TARGET_UNCONDS))}")
    picture = None
    if image is not None:
        from attnkit.images import load_image

        picture = load_image(image)  # a bad file fails before the model loads
    run = _Run.begin("edit", source, model, device, dtype, threads, quiet)
    run.record["targets"] = list(to)
    with _staged_output(out) as folder:
        pipe = run.load()
        start = time.perf_counter()
        if picture is None:  # edit() checks every option before it samples anything
            result = p2p_edit(pipe, source, list(to), seed=seed, steps=steps, guidance=guidance, height=height,
                              width=width, maps=False, **options)
        else:
            from attnkit.inversion import edit_image

            run.record["image"] = str(image)
            inv = _invert_image(run, pipe, picture, source, method, steps, guidance, inner_steps, crop, quiet)
            result = edit_image(pipe, inv, list(to), maps=False, paste_unedited=paste_unedited,
                                target_uncond=target_uncond, **options)
        run.time("edit", start)
        run.record.update(json.loads(json.dumps(result.settings)))
        captions = [f"source: {source}", *to]
        run.save(image_grid(result.images, captions), folder, "grid.png")
        for i, (img, prompt) in enumerate(zip(result.images, result.prompts, strict=True)):
            name = "00_source.png" if i == 0 else f"{i:02d}_{_safe_name('_'.join(prompt.split()[-3:]))}.png"
            run.save(img, folder, name, edited_prompt=prompt)
        run.finish(folder)
    _report(run, out, quiet)


@app.command("train-bundled")
@_friendly_errors
def train_bundled(
    run_dir: Annotated[Path, typer.Option(help="Working folder (resumable: finished stages are skipped).")] =
        Path("runs/bundled"),
    minutes: Annotated[float, typer.Option(help="UNet training budget of this call, in minutes.")] = 90.0,
    export_dir: Annotated[Path | None, typer.Option(
        help="Where the trained pipeline is written (default: RUN_DIR/model; pass src/attnkit/bundled/model "
             "to replace the shipped model).")] = None,
    n_scenes: Annotated[int, typer.Option(help="Training scenes rendered and encoded once (the shipped model: "
                                               "60000).")] = 100_000,
    lr: Annotated[float, typer.Option(help="Peak learning rate of the UNet and text encoder.")] = 1e-3,
    restart_schedule: Annotated[bool, typer.Option(
        help="When resuming, start a new warm-up + cosine schedule from the current step.")] = False,
    text_layers: Annotated[int, typer.Option(help="Transformer layers of the text encoder (new runs).")] = 2,
    warm_start: Annotated[Path | None, typer.Option(
        help="A checkpoint (.safetensors) whose matching tensors initialise a new run.")] = None,
    ground_weight: Annotated[float, typer.Option(
        help="Weight of the grounding loss that keeps each object word's cross-attention on its object "
             "(the shipped model's fine-tuning: 0.1).")] = 0.0,
    open_color_rate: Annotated[float, typer.Option(
        help="Grammar v2: how often a training caption leaves an object's colour open (\"a circle\"; the issue-11 "
             "fine-tune: 0.2).")] = 0.0,
    open_background_rate: Annotated[float, typer.Option(
        help="Grammar v2: how often a training caption leaves the background open (the issue-11 fine-tune: "
             "0.25).")] = 0.0,
) -> None:
    """Retrain the bundled shapes-world model on this machine's CPU (see attnkit/bundled/train.py), then use it
    with --model RUN_DIR/model."""
    from attnkit.bundled.train import train

    for name, rate in (("--open-color-rate", open_color_rate), ("--open-background-rate", open_background_rate)):
        if not 0.0 <= rate <= 1.0:
            raise typer.BadParameter(f"{name} is a probability: give a value from 0 to 1, not {rate}")
    train(run_dir=run_dir, minutes=minutes, export_dir=export_dir or run_dir / "model", n_scenes=n_scenes, lr=lr,
          restart_schedule=restart_schedule, text_layers=text_layers, warm_start=warm_start,
          ground_weight=ground_weight, open_color_rate=open_color_rate,
          open_background_rate=open_background_rate)


def _attention_grids(pipe: Any, height: int | None, width: int | None) -> list[int]:
    """Grid sizes (larger side) of the UNet's cross-attention layers at this image size, from its config."""
    from attnkit.models import defaults_for

    defaults = defaults_for(pipe)
    scale = int(getattr(pipe, "vae_scale_factor", 8))
    side = max(height or defaults.height, width or defaults.width) // scale
    config = pipe.unet.config
    grids = {-(-side // 2**i) for i, kind in enumerate(config.down_block_types) if "CrossAttn" in kind}
    if "CrossAttn" in str(config.mid_block_type):
        grids.add(-(-side // 2 ** (len(config.down_block_types) - 1)))
    return sorted(grids)


def _default_res(pipe: Any, height: int | None, width: int | None) -> int:
    """Prompt-to-Prompt reads 16x16 maps of SD1.x at 512 px (latents / 4): the largest grid of at most
    max(16, latents / 4), else the smallest grid there is."""
    from attnkit.models import defaults_for

    grids = _attention_grids(pipe, height, width)
    if not grids:
        from attnkit.engine import AttnkitError

        raise AttnkitError("this UNet has no cross-attention layers to map")
    defaults = defaults_for(pipe)
    side = max(height or defaults.height, width or defaults.width) // int(getattr(pipe, "vae_scale_factor", 8))
    fitting = [g for g in grids if g <= max(16, side // 4)]
    return max(fitting) if fitting else min(grids)


def _self_attention_picture(store: Any, image: Any, pixel: tuple[int, int], cmap: str) -> Any:
    """The image with the query pixel marked, where that pixel attends, and the top self-attention
    components (the Prompt-to-Prompt notebook's views), in two rows of four."""
    from PIL import Image, ImageDraw

    from attnkit.viz import colorize, enlarge, image_grid, overlay

    attended = store.self_map(pixel)
    h, w = attended.shape
    marked = enlarge(image.convert("RGB"))
    draw = ImageDraw.Draw(marked)
    y = (pixel[0] + 0.5) * marked.height / h
    x = (pixel[1] + 0.5) * marked.width / w
    r = max(3, marked.width // 40)
    draw.ellipse((x - r, y - r, x + r, y + r), outline="white", width=2)
    components = [colorize(c, "viridis").resize(marked.size, Image.Resampling.NEAREST)
                  for c in store.self_components(k=6)]
    tiles = [marked, overlay(marked, attended, cmap=cmap), *components]
    captions = [f"query {pixel[0]},{pixel[1]}", f"attends to ({h}x{w})"]
    captions += [f"component {i}" for i in range(len(components))]
    return image_grid(tiles, captions, cols=4)


def main() -> None:
    """Console entry point (``attnkit = "attnkit.cli:main"``)."""
    app()

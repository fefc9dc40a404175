"""The ``attnkit`` command line (also ``python -m attnkit``): one function per command.

    attnkit generate "a red circle on a white background" --seed 1 --out outputs/gen
    attnkit maps "a red circle and a blue square on a white background" --words red --words square
    attnkit maps "a cat wearing sunglasses" --model runwayml/stable-diffusion-v1-5 --device cuda --dtype fp16

Every command checks its arguments before it loads anything (bad input: one line ``attnkit: error: ...`` and
exit code 2), writes into a staging folder and moves the finished files into ``--out`` only when the run
succeeded. Files an earlier run wrote there (the ones its record.json lists) are replaced as a whole, so the
folder then holds exactly what the new ``record.json`` lists (plus any files of the user's own, which are never
touched); if moving fails, the folder is put back as it was. ``--model`` defaults to the bundled model;
``--model tiny`` (or ``tiny-sdxl``, ``tiny-sd3``, ``tiny-flux``) builds a random tiny pipeline for trying the commands out without any model
files (its images are noise). Only typer is imported at start-up (torch, diffusers and the model load inside
the commands), so ``attnkit --help`` answers at once.

Adding a command: one function with ``@app.command()`` and ``@_friendly_errors`` that checks its own options,
starts with ``_Run.begin`` (the shared checks), loads with ``run.load()``, samples with ``_sample`` and writes
through ``_staged_output`` and ``_Run`` (which writes record.json).
"""

from __future__ import annotations

import functools
import json
import os
import re
import shutil
import tempfile
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Annotated, Any

import typer

from attnkit.notices import AttnkitError


def _bundled_words() -> str:
    from attnkit.bundled.scenes import VOCABULARY

    return ("The bundled model (the default --model) knows only these words: " + " ".join(VOCABULARY) + ". "
            "Colours, 'outlined' and the background may be left out ('a circle', 'an outlined square', 'a red "
            "circle and a square'); other words still draw shapes, with a warning that names them.")


BUNDLED_WORDS = _bundled_words()

app = typer.Typer(
    help="Attention maps and attention control for diffusers text-to-image pipelines.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
    rich_markup_mode=None,  # click's plain help: full option names at any width, no <type> column
    epilog=BUNDLED_WORDS,
)

TINY_MODELS = {"tiny": "sd", "tiny-sdxl": "sdxl", "tiny-sd3": "sd3", "tiny-flux": "flux"}
RECORD = "record.json"

# Options shared by the commands (typer reads them from the annotations).
Prompt = Annotated[str, typer.Argument(help="The text prompt.", show_default=False)]
Model = Annotated[str | None, typer.Option(
    help="A local pipeline folder, a Hugging Face hub id, or 'tiny'/'tiny-sdxl'/'tiny-sd3'/'tiny-flux' (random "
         "test pipelines). "
         "Default: the bundled model.")]
Seed = Annotated[int, typer.Option(help="Seed of the initial noise.")]
Steps = Annotated[int | None, typer.Option(help="Denoising steps, 1 to 1000 (default: the model's own).")]
Guidance = Annotated[float | None, typer.Option(help="Guidance scale (default: the model's own).")]
Height = Annotated[int | None, typer.Option(
    help="Image height in pixels, a multiple of 8 (default: the model's own).")]
Width = Annotated[int | None, typer.Option(help="Image width in pixels, a multiple of 8 (default: the model's own).")]
Device = Annotated[str, typer.Option(help="'auto' (cuda when available, else cpu), 'cpu', 'cuda', 'cuda:1', 'mps'.")]
Dtype = Annotated[str, typer.Option(help="float32 (fp32), float16 (fp16, for GPUs) or bfloat16 (bf16).")]
Out = Annotated[Path, typer.Option(
    help="Output folder (created). Files an earlier attnkit run wrote there are replaced; other files stay.")]
Quiet = Annotated[bool, typer.Option("--quiet", "-q", help="No progress bars or summary.")]
Threads = Annotated[str | None, typer.Option(
    help="CPU threads for torch: a number, 'auto' (the cores no other process is busy on, at least 1) or "
         "'torch' (torch's own choice). Default: ATTNKIT_THREADS, else auto.")]


def _version(value: bool) -> None:
    if value:
        from attnkit import __version__

        typer.echo(f"attnkit {__version__}")
        raise typer.Exit()


@app.callback()
def _options(version: Annotated[bool, typer.Option(
        "--version", callback=_version, is_eager=True, help="Print attnkit's version and exit.")] = False) -> None:
    pass


@contextmanager
def _one_line_warnings() -> Iterator[None]:
    """attnkit's warnings as one line each on stderr, each distinct message once per command."""
    import warnings

    from attnkit.notices import AttnkitWarning

    shown: set[str] = set()
    previous = warnings.showwarning

    def show(message: Any, category: type, filename: str, lineno: int, file: Any = None, line: Any = None) -> None:
        if not issubclass(category, AttnkitWarning):
            previous(message, category, filename, lineno, file, line)
        elif str(message) not in shown:
            shown.add(str(message))
            typer.echo(f"attnkit: warning: {message}", err=True)

    with warnings.catch_warnings():
        warnings.simplefilter("always", AttnkitWarning)  # "once" is handled here, per command
        warnings.showwarning = show
        yield


def _friendly_errors(command: Callable[..., None]) -> Callable[..., None]:
    """Turn attnkit's own errors (bad input, missing model) into one clear line and exit code 2; print
    attnkit's warnings as one line each."""

    @functools.wraps(command)
    def wrapper(*args: Any, **kwargs: Any) -> None:
        with _one_line_warnings():
            try:
                command(*args, **kwargs)
            except AttnkitError as error:
                typer.echo(f"attnkit: error: {error}", err=True)
                raise typer.Exit(code=2) from None

    return wrapper


def _quiet_loading(quiet: bool) -> None:
    # Loading bars of diffusers/transformers are global switches; the CLI owns its process, so flip them.
    # transformers' warnings are muted: attnkit never uses the image processors they are about.
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


# -- argument checks (plain Python: they run before torch is imported) --------------------------------------
def _check_prompt(prompt: str, what: str = "the prompt") -> str:
    if not prompt.strip():
        raise AttnkitError(f"{what} is empty: give a text prompt, e.g. \"a red circle on a white background\"")
    return prompt


def _check_sampling(steps: int | None, guidance: float | None, height: int | None, width: int | None) -> None:
    from attnkit.settings import check_guidance, check_size, check_steps

    if steps is not None:
        check_steps(steps, "--steps")
    if guidance is not None:
        check_guidance(guidance, "--guidance")
    for name, value in (("--height", height), ("--width", width)):
        if value is not None:
            check_size(value, name)  # 8: every Stable Diffusion autoencoder; the model's own is checked again


def _dtype_name(dtype: str) -> str:
    from attnkit.models import _DTYPE_NAMES

    key = str(dtype).lower().removeprefix("torch.")
    if key not in _DTYPE_NAMES:
        raise AttnkitError(f"--dtype {dtype}: unknown dtype; use float32 (fp32), float16 (fp16) or bfloat16 (bf16)")
    return _DTYPE_NAMES[key]


def _check_out(out: Path) -> None:
    """``--out`` must be (or become) a folder this process can write in: checked before anything runs."""
    if out.exists() and not out.is_dir():
        raise AttnkitError(f"--out {out} is a file: pass a folder")
    existing = out
    while not existing.exists() and existing != existing.parent:
        existing = existing.parent
    if not existing.is_dir():
        raise AttnkitError(f"--out {out}: {existing} is a file, not a folder: pass another --out")
    try:  # a real write: permission bits do not tell for root, read-only mounts or immutable folders
        handle, probe = tempfile.mkstemp(prefix=".attnkit-probe-", dir=existing)
        os.close(handle)
        os.unlink(probe)
    except OSError as error:
        raise AttnkitError(f"--out {out}: cannot write in {existing} ({error.strerror or error}): pass a folder "
                           "you can write to") from None


# -- writing --out ------------------------------------------------------------------------------------------
def _safe_relative(name: Any) -> Path | None:
    path = Path(str(name))
    if path.is_absolute() or ".." in path.parts or not path.parts:
        return None
    return path


def _earlier_files(out: Path) -> list[Path]:
    """Files an earlier attnkit run wrote into ``out``: the ones its record.json lists (nothing else is ever
    removed from a user's folder)."""
    try:
        record = json.loads((out / RECORD).read_text())
    except (OSError, ValueError):
        return []
    if not isinstance(record, dict) or "attnkit_version" not in record or not isinstance(record.get("files"), list):
        return []
    paths = [_safe_relative(name) for name in record["files"]]
    return [p for p in paths if p is not None and (out / p).is_file() and not (out / p).is_symlink()]


def _blockers(staging: Path, out: Path, files: Sequence[Path], leaving: set[Path]) -> list[str]:
    """What in ``out`` stops the new files from moving in (a file where a folder must go, a folder where a
    file must go), before anything is moved."""
    problems = []
    for rel in files:
        for parent in list(reversed(rel.parents))[1:]:
            if (out / parent).exists() and not (out / parent).is_dir() and parent not in leaving:
                problems.append(f"{out / parent} is a file where attnkit writes the folder {parent}/")
        if (out / rel).is_dir() and not (out / rel).is_symlink():
            problems.append(f"{out / rel} is a folder where attnkit writes the file {rel}")
    return sorted(set(problems))


def _commit(staging: Path, out: Path) -> None:
    """Move the staged files into ``out`` as one change: the earlier run's files go, the new ones come, or, if
    anything fails, ``out`` is left exactly as it was (record.json moves last)."""
    new = sorted((p.relative_to(staging) for p in staging.rglob("*") if p.is_file()),
                 key=lambda p: (p.name == RECORD and len(p.parts) == 1, str(p)))
    old = set(_earlier_files(out)) if out.is_dir() else set()
    problems = _blockers(staging, out, new, old)
    if problems:
        raise AttnkitError(f"cannot write into --out {out}: {'; '.join(problems)}. Move it away or pass another "
                           "--out (nothing was written)")
    created = not out.exists()
    out.mkdir(parents=True, exist_ok=True)
    backup = Path(tempfile.mkdtemp(prefix=".attnkit-old-", dir=out))  # same file system: moves are renames
    set_aside: list[Path] = []
    placed: list[Path] = []
    made: list[Path] = []
    try:
        for rel in sorted(old | {p for p in new if (out / p).is_file() or (out / p).is_symlink()}):
            (backup / rel).parent.mkdir(parents=True, exist_ok=True)
            os.replace(out / rel, backup / rel)
            set_aside.append(rel)
        for rel in new:
            for parent in reversed(rel.parents):
                if not (out / parent).exists():
                    (out / parent).mkdir()
                    made.append(out / parent)
            shutil.move(str(staging / rel), str(out / rel))
            placed.append(rel)
    except OSError as error:
        for rel in placed:
            (out / rel).unlink(missing_ok=True)
        for rel in set_aside:
            os.replace(backup / rel, out / rel)
        for folder in reversed(made):
            if folder.is_dir() and not any(folder.iterdir()):
                folder.rmdir()
        if created and not any(p for p in out.iterdir() if p != backup):
            shutil.rmtree(out, ignore_errors=True)
        raise AttnkitError(f"could not write into --out {out} ({error}); it was left as it was") from None
    finally:
        shutil.rmtree(backup, ignore_errors=True)
    for rel in old - set(new):  # folders only the earlier run's files lived in (e.g. words/) go with them
        for parent in rel.parents:
            folder = out / parent
            if folder != out and folder.is_dir() and not any(folder.iterdir()):
                folder.rmdir()


@contextmanager
def _staged_output(out: Path) -> Iterator[Path]:
    """A fresh staging folder whose files move into ``out`` (see :func:`_commit`) only when the block
    succeeds, so a failed run leaves ``out`` as it was."""
    _check_out(out)
    staging = Path(tempfile.mkdtemp(prefix="attnkit-"))
    try:
        yield staging
        _commit(staging, out)
    finally:
        shutil.rmtree(staging, ignore_errors=True)


def _parse_pixel(text: str) -> tuple[int, int]:
    parts = text.replace(" ", "").split(",")
    if len(parts) != 2 or not all(p.lstrip("-").isdigit() for p in parts):
        raise AttnkitError(f"--self-at {text!r}: give the query pixel as Y,X in the self-attention grid, e.g. 8,8")
    return int(parts[0]), int(parts[1])


class _Run:
    """What one command did: settings, files and timings, written as ``record.json``."""

    def __init__(self, command: str, prompt: str, model: str | None, device: str, dtype: str) -> None:
        from attnkit import __version__

        self.model, self.device, self.dtype = model, device, dtype
        self.started = time.perf_counter()
        self.record: dict[str, Any] = {
            "command": command, "prompt": prompt, "model": model or "bundled", "device": device, "dtype": dtype,
            "attnkit_version": __version__, "files": [], "timings": {},
        }

    @classmethod
    def begin(cls, command: str, prompt: str, model: str | None, device: str, dtype: str, threads: str | None,
              quiet: bool, out: Path, steps: int | None = None, guidance: float | None = None,
              height: int | None = None, width: int | None = None) -> _Run:
        """The checks every command shares, cheapest first and all before the model loads (prompt, sampling
        settings, dtype, threads, then the device and --out); then quiet the loaders and start the record."""
        _check_prompt(prompt)
        _check_sampling(steps, guidance, height, width)
        dtype = _dtype_name(dtype)
        from attnkit.threads import parse_threads, set_threads

        choice = parse_threads(threads, "--threads") if threads is not None else None
        from attnkit.models import check_device

        device = check_device(device)
        _check_out(out)
        set_threads(choice)
        _quiet_loading(quiet)
        return cls(command, prompt, model, device, dtype)

    def input_image(self, image: str | Path | None) -> Any:
        """The command's input image as a PIL image (None when not given), read before the model loads so that
        a bad file fails first; its path goes into the record."""
        if image is None:
            return None
        from attnkit.images import load_image

        picture = load_image(image)
        self.record["image"] = str(image)
        return picture

    def load(self) -> Any:
        """The run's pipeline, its loading time recorded."""
        import torch

        start = time.perf_counter()
        pipe = _load(self.model, self.device, self.dtype)
        self.time("load", start)
        self.record["threads"] = torch.get_num_threads()
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
        # allow_nan=False: record.json stays JSON (NaN and Infinity are not); the checks above keep them out
        (folder / RECORD).write_text(json.dumps(self.record, indent=2, allow_nan=False) + "\n")


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


@app.command(epilog=BUNDLED_WORDS)
@_friendly_errors
def generate(prompt: Prompt, model: Model = None, seed: Seed = 0, steps: Steps = None, guidance: Guidance = None,
             height: Height = None, width: Width = None, device: Device = "auto", dtype: Dtype = "float32",
             out: Out = Path("outputs/generate"), quiet: Quiet = False, threads: Threads = None) -> None:
    """Generate an image: writes image.png (prompt, seed and settings in its metadata) and record.json."""
    run = _Run.begin("generate", prompt, model, device, dtype, threads, quiet, out, steps, guidance, height, width)
    with _staged_output(out) as folder:
        pipe = run.load()
        result = _sample(run, pipe, prompt, (), seed, steps, guidance, height, width, quiet)
        run.save(result.images[0], folder, "image.png")
        run.finish(folder)
    _report(run, out, quiet)


def _check_cmap(cmap: str) -> str:
    import matplotlib

    if cmap not in matplotlib.colormaps:
        names = sorted((n for n in matplotlib.colormaps if not n.endswith("_r")), key=str.lower)
        raise AttnkitError(f"--cmap {cmap}: unknown colormap; use one of matplotlib's: {', '.join(names)} "
                           "(each also reversed with _r; inferno and viridis read best as heat)")
    return cmap


@app.command(epilog=BUNDLED_WORDS)
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
         cmap: Annotated[str, typer.Option(
             help="matplotlib colormap of the heat, painted over a grey copy of the image.")] = "inferno") -> None:
    """Generate an image and its cross-attention maps: image.png, maps.png (a strip with the word under each
    map), words/NN_word.png overlays, self_attention.png with --self-at, and record.json."""
    from attnkit.adapters import text_tokenizer
    from attnkit.store import AttentionStore
    from attnkit.tokens import word_spans, word_token_indices
    from attnkit.viz import enlarge, overlay, word_strip

    pixel = _parse_pixel(self_at) if self_at is not None else None
    if res is not None and res < 1:
        raise AttnkitError(f"--res {res}: give an attention grid side such as 16")
    _check_cmap(cmap)
    run = _Run.begin("maps", prompt, model, device, dtype, threads, quiet, out, steps, guidance, height, width)
    with _staged_output(out) as folder:
        pipe = run.load()
        from attnkit.runs.execute import safe_name

        grids = _attention_grids(pipe, height, width)
        if res is not None and res not in grids:
            raise AttnkitError(f"--res {res}: this model's cross-attention grids at this size are "
                               f"{', '.join(map(str, grids))}: pass one of them (or leave --res out)")
        res = res or _default_res(pipe, height, width)
        if pixel is not None and not all(0 <= p < res for p in pixel):
            raise AttnkitError(f"--self-at {pixel[0]},{pixel[1]} is outside the {res}x{res} grid: give Y,X "
                               f"from 0 to {res - 1}")
        run.record.update(res=res, cmap=cmap)
        text = text_tokenizer(pipe)  # numbers the key columns (SD3: CLIP + T5, FLUX: T5)
        chosen = list(words) if words else [s.word for s in word_spans(text, prompt)]
        for word in chosen:  # fail before sampling when a word is not in the prompt
            word_token_indices(text, prompt, word)
        store = AttentionStore(kinds=("cross", "self") if pixel else ("cross",), res=res)
        result = _sample(run, pipe, prompt, (store,), seed, steps, guidance, height, width, quiet)
        image = result.images[0]
        heat = store.word_maps(prompt, words=chosen)
        run.record["words"] = list(heat)
        run.save(image, folder, "image.png")
        run.save(word_strip(image, heat, cmap=cmap), folder, "maps.png", words=list(heat), res=res)
        big = enlarge(image)  # small images (the bundled model's 64x64) are enlarged to stay readable
        for i, (word, m) in enumerate(heat.items()):
            run.save(overlay(big, m, cmap=cmap), folder, f"words/{i:02d}_{safe_name(word)}.png", word=word, res=res)
        if pixel is not None:
            run.save(_self_attention_picture(store, image, pixel, cmap), folder, "self_attention.png",
                     pixel=list(pixel), res=res)
            run.record["self_at"] = list(pixel)
        run.finish(folder)
    _report(run, out, quiet)


INVERSION_METHODS = ("null-text", "negative-prompt", "ddim")
CROPS = ("center", "stretch")


def _check_inversion_options(method: str, inner_steps: int, lr: float | None, crop: str) -> None:
    import math

    if method not in INVERSION_METHODS:
        raise AttnkitError(f"--method {method}: use one of {', '.join(INVERSION_METHODS)}")
    if inner_steps < 1:
        raise AttnkitError(f"--inner-steps {inner_steps}: give at least 1 optimisation step per step")
    if lr is not None and not (math.isfinite(lr) and lr > 0):
        raise AttnkitError(f"--lr {lr}: give a positive learning rate, e.g. 0.01")
    if crop not in CROPS:
        raise AttnkitError(f"--crop {crop}: use 'center' or 'stretch'")


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
    _record_inversion(run, inv)
    return inv


def _record_inversion(run: _Run, inv: Any) -> None:
    run.record.update(method=inv.method, steps=inv.steps, guidance=inv.guidance, crop=inv.crop.to_dict(),
                      inner_steps=inv.inner_steps, null_text=inv.null_text)


Method = Annotated[str, typer.Option(help="Inversion method: null-text, negative-prompt or ddim.")]
InnerSteps = Annotated[int, typer.Option(help="Null-text: at most this many optimisation steps per step.")]
LearningRate = Annotated[float | None, typer.Option(help="Null-text: Adam learning rate at step 0 (default: the "
                                                         "model's own; the paper's 0.01 for Stable Diffusion).")]
CropOpt = Annotated[str, typer.Option(help="Fit the image to the model: 'center' (crop to its aspect ratio) or "
                                           "'stretch'.")]
EditGuidance = Annotated[float | None, typer.Option(
    help="Guidance scale (default: the model's own; with --image the inversion's, 7.5 unless it was made with "
         "another).")]
InversionGuidance = Annotated[float | None, typer.Option(
    help="Guidance scale that null-text optimises for and that regeneration and edits use (default: 7.5, the "
         "null-text paper's, on every model).")]


@app.command(epilog=BUNDLED_WORDS)
@_friendly_errors
def invert(image: Annotated[str, typer.Argument(help="The image file to invert.", show_default=False)],
           prompt: Annotated[str, typer.Option(help="A caption of the image (the source prompt).")],
           method: Method = "null-text", model: Model = None, steps: Steps = None,
           guidance: InversionGuidance = None, inner_steps: InnerSteps = 10, lr: LearningRate = None,
           crop: CropOpt = "center", device: Device = "auto", dtype: Dtype = "float32",
           out: Out = Path("outputs/invert"), quiet: Quiet = False, threads: Threads = None) -> None:
    """Invert a real image: inversion.safetensors + inversion.json (load with attnkit.Inversion.load, or pass
    the folder to `attnkit edit --image`), the fitted input image.png, its reconstruction.png and record.json
    (reconstruction PSNR, crop, timings)."""
    _check_inversion_options(method, inner_steps, lr, crop)
    run = _Run.begin("invert", prompt, model, device, dtype, threads, quiet, out, steps, guidance)
    from attnkit.images import psnr
    from attnkit.inversion import check_prompt, reconstruct
    from attnkit.models import warn_unknown_words

    picture = run.input_image(image)  # a bad file fails before the model loads
    with _staged_output(out) as folder:
        pipe = run.load()
        check_prompt(pipe, prompt)
        warn_unknown_words(pipe, prompt)
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
    """``"0.8"`` → 0.8 and ``"0.2,0.8"`` → (0.2, 0.8), for --cross / --self; fractions from 0 to 1."""
    try:
        parts = [float(p) for p in text.split(",")]
    except ValueError:
        parts = []
    if len(parts) not in (1, 2) or not all(0.0 <= p <= 1.0 for p in parts):
        raise AttnkitError(f"{option} {text}: give a fraction of the steps from 0 to 1 like 0.8, or START,END like "
                           "0.2,0.8")
    return parts[0] if len(parts) == 1 else (parts[0], parts[1])


def _parse_weights(items: list[str] | None, option: str) -> dict[str, float]:
    """``["lego=2", "pink=-1"]`` → ``{"lego": 2.0, "pink": -1.0}``."""
    import math

    weights: dict[str, float] = {}
    for item in items or []:
        word, _, value = item.partition("=")
        try:
            weights[word.strip()] = float(value)
        except ValueError:
            raise AttnkitError(f"{option} {item!r}: use WORD=FACTOR, e.g. {option} lego=2.0") from None
        if not word.strip() or not math.isfinite(weights[word.strip()]):
            raise AttnkitError(f"{option} {item!r}: use WORD=FACTOR with a finite factor, e.g. {option} lego=2.0")
    return weights


def _check_fraction(value: float, option: str, what: str) -> float:
    if not 0.0 <= value <= 1.0:
        raise AttnkitError(f"{option} {value}: give {what} from 0 to 1")
    return value


def _saved_inversion(folder: Path, source: str, method: str | None, steps: int | None,
                     unused: dict[str, Any]) -> None:
    """Checks of ``edit --image FOLDER`` (a folder written by `attnkit invert`) that need no torch: the
    caption, and no inversion options that would have nothing to do."""
    for name in ("inversion.json", "inversion.safetensors"):
        if not (folder / name).is_file():
            raise AttnkitError(f"--image {folder} is a folder without {name}: pass an image file, or a folder "
                               "written by `attnkit invert --out`")
    try:
        saved = json.loads((folder / "inversion.json").read_text())
        prompt, saved_steps, saved_method = saved["prompt"], len(saved["timesteps"]), saved["method"]
    except (OSError, ValueError, KeyError, TypeError):
        raise AttnkitError(f"--image {folder}: its inversion.json is unreadable; run `attnkit invert` again") from None
    if prompt != source:
        raise AttnkitError(f"--image {folder} was inverted with the caption {prompt!r}, and SOURCE is {source!r}: "
                           "pass the same caption as SOURCE (or invert again with the new one)")
    if steps is not None and steps != saved_steps:
        raise AttnkitError(f"--steps {steps}: the saved inversion in {folder} has {saved_steps} steps; leave --steps "
                           "out, or invert the image again with the steps you want")
    if method is not None and method != saved_method:
        raise AttnkitError(f"--method {method}: the saved inversion in {folder} was made with {saved_method}; leave "
                           "--method out, or pass the image file to invert it again")
    given = [option for option, value in unused.items() if value is not None]
    if given:
        raise AttnkitError(f"{', '.join(given)}: the saved inversion in {folder} is finished, so there is nothing to "
                           f"invert; leave {'them' if len(given) > 1 else 'it'} out, or pass the image file to "
                           "invert it again")


@app.command(epilog=BUNDLED_WORDS)
@_friendly_errors
def edit(source: Annotated[str, typer.Argument(help="The source prompt (the image's caption with --image).",
                                               show_default=False)],
         to: Annotated[list[str], typer.Option("--to", help="An edited prompt (repeat for a series).")],
         kind: Annotated[str, typer.Option(help="replace (word swap), refine (words added/removed) or auto.")] = "auto",
         cross: Annotated[str, typer.Option(help="Cross-attention replacement: a fraction or START,END.")] = "0.8",
         cross_word: Annotated[list[str] | None, typer.Option(
             help="Per-word cross-attention replacement fraction WORD=F (repeatable).")] = None,
         self_steps: Annotated[str | None, typer.Option(
             "--self", help="Self-attention replacement: a fraction or START,END (default 0.4; 0.5 with "
                            "--image, as the null-text paper's notebook).")] = None,
         self_res: Annotated[int | None, typer.Option(
             help="Self-attention is replaced on grids of at most SELF_RES x SELF_RES query pixels (default 16, "
                  "the paper's; 32 with --image, the null-text notebook's).")] = None,
         blend: Annotated[list[str] | None, typer.Option(
             help="Local blend: a word whose region may change (repeatable); the rest stays.")] = None,
         blend_threshold: Annotated[float, typer.Option(help="Local-blend mask threshold, 0 to 1.")] = 0.3,
         blend_start: Annotated[float, typer.Option(
             help="Local blend starts after this fraction of the steps (the null-text notebook: 0.2).")] = 0.0,
         subtract: Annotated[list[str] | None, typer.Option(
             help="Local blend: a word whose region must stay as it is (repeatable; needs --blend).")] = None,
         subtract_threshold: Annotated[float, typer.Option(
             help="Mask threshold of the --subtract words, 0 to 1.")] = 0.3,
         reweight: Annotated[list[str] | None, typer.Option(
             help="Scale a word's attention in the edits: WORD=F (repeatable; negative allowed).")] = None,
         image: Annotated[str | None, typer.Option(
             help="Edit this real image (SOURCE is its caption): an image file (inverted first) or the folder "
                  "`attnkit invert` wrote (its inversion is reused).")] = None,
         paste_unedited: Annotated[bool, typer.Option(
             "--paste-unedited",
             help="With --image and --blend: keep the input's own pixels outside the blend region.")] = False,
         target_uncond: Annotated[str, typer.Option(
             help="With --image: the edits' unconditional embedding: 'pipeline' (the model's own) or 'inversion' "
                  "(the source's optimised ones, as the null-text notebook).")] = "pipeline",
         method: Annotated[str | None, typer.Option(
             help="With an image file: inversion method, null-text (default), negative-prompt or ddim.")] = None,
         inner_steps: Annotated[int | None, typer.Option(
             help="With an image file: null-text's optimisation steps per step (default 10).")] = None,
         lr: Annotated[float | None, typer.Option(
             help="With an image file: null-text's Adam learning rate at step 0 (default: the model's own; the "
                  "paper's 0.01 for Stable Diffusion).")] = None,
         crop: Annotated[str | None, typer.Option(
             help="With an image file: 'center' (crop to the model's aspect ratio, default) or 'stretch'.")] = None,
         model: Model = None, seed: Seed = 0, steps: Steps = None, guidance: EditGuidance = None,
         height: Height = None, width: Width = None, device: Device = "auto", dtype: Dtype = "float32",
         out: Out = Path("outputs/edit"), quiet: Quiet = False, threads: Threads = None) -> None:
    """Prompt-to-Prompt: edit SOURCE's image into each --to prompt from the same noise. Writes grid.png
    (source + edits, prompts under the images), 00_source.png, one NN_<changed words>.png per edit (e.g.
    01_blue.png) and record.json; with --image also input.png, and the source row is 00_reconstruction.png."""
    from attnkit.edit import TARGET_UNCONDS

    _check_prompt(source, "SOURCE")
    for target in to:
        _check_prompt(target, f"--to {target!r}")
    if kind not in ("auto", "replace", "refine"):
        raise AttnkitError(f"--kind {kind}: use replace (word swap), refine (words added or removed) or auto")
    if kind == "replace":
        for target in to:
            if len(target.split()) != len(source.split()):
                raise AttnkitError(f"--to {target!r} has {len(target.split())} words and SOURCE "
                                   f"{len(source.split())}: a word swap (--kind replace) needs the same number of "
                                   "words; use --kind refine (or auto) to add or remove words")
    options: dict[str, Any] = dict(kind=kind, blend=list(blend) if blend else None,
                                   blend_threshold=_check_fraction(blend_threshold, "--blend-threshold", "a threshold"),
                                   blend_start=_check_fraction(blend_start, "--blend-start", "a fraction of the steps"),
                                   subtract=list(subtract) if subtract else None,
                                   subtract_threshold=_check_fraction(subtract_threshold, "--subtract-threshold",
                                                                      "a threshold"),
                                   reweight=_parse_weights(reweight, "--reweight") or None, progress=not quiet)
    if subtract and not blend:
        raise AttnkitError("--subtract keeps a word's region out of the local blend: pass it with --blend words")
    if self_res is not None:
        if self_res < 1:
            raise AttnkitError(f"--self-res {self_res}: give a grid side such as 16")
        options["self_res"] = self_res
    if self_steps is not None:  # else the library's default for generated / real images
        options["self"] = _parse_window(self_steps, "--self")
    window = _parse_window(cross, "--cross")
    per_word = _parse_weights(cross_word, "--cross-word")
    for word, fraction in per_word.items():
        _check_fraction(fraction, f"--cross-word {word}=", "a fraction of the steps")
    options["cross"] = {"default_": window, **per_word} if per_word else window
    if paste_unedited and (image is None or not blend):
        raise AttnkitError("--paste-unedited keeps a real image's pixels outside the local-blend region: "
                           "pass it with --image and --blend")
    if target_uncond not in TARGET_UNCONDS:
        raise AttnkitError(f"--target-uncond {target_uncond!r}: use {' or '.join(map(repr, TARGET_UNCONDS))}")
    saved = image is not None and Path(image).is_dir()
    if image is not None:
        if height is not None or width is not None:
            raise AttnkitError("--height/--width: with --image the image fixes the size; leave them out")
        if saved:
            _saved_inversion(Path(image), source, method, steps, {"--inner-steps": inner_steps, "--lr": lr,
                                                                  "--crop": crop})
        else:
            _check_inversion_options(method or "null-text", inner_steps or 10, lr, crop or "center")
    elif any(v is not None for v in (method, inner_steps, lr, crop)):
        raise AttnkitError("--method, --inner-steps, --lr and --crop set how --image is inverted: pass an image")
    run = _Run.begin("edit", source, model, device, dtype, threads, quiet, out, steps, guidance, height, width)
    from attnkit.edit import edit as p2p_edit
    from attnkit.viz import image_grid

    picture = None
    if image is not None and not saved:
        from attnkit.images import load_image

        picture = load_image(image)  # a bad file fails before the model loads
    run.record["targets"] = list(to)
    with _staged_output(out) as folder:
        pipe = run.load()
        start = time.perf_counter()
        if image is None:  # edit() checks every option before it samples anything
            result = p2p_edit(pipe, source, list(to), seed=seed, steps=steps, guidance=guidance, height=height,
                              width=width, maps=False, **options)
            inputs: list[tuple[Any, str]] = []
        else:
            from attnkit.inversion import Inversion, edit_image, use_ddim

            run.record["image"] = str(image)
            if saved:
                inv = Inversion.load(image)
                use_ddim(pipe)
                _record_inversion(run, inv)
                run.record["reused_inversion"] = True
            else:
                inv = _invert_image(run, pipe, picture, source, method or "null-text", steps, guidance,
                                    inner_steps or 10, crop or "center", quiet, lr)
            result = edit_image(pipe, inv, list(to), maps=False, paste_unedited=paste_unedited,
                                target_uncond=target_uncond, guidance=guidance, **options)
            inputs = [(inv.image, "input")] if inv.image is not None else []
        run.time("edit", start)
        run.record.update(json.loads(json.dumps(result.settings)))
        if image is not None:  # the inversion's null-text options, not edit()'s "were embeddings given" flag
            run.record["null_text"] = inv.null_text
        first = "reconstruction" if image is not None else "source"
        tiles = [im for im, _ in inputs] + list(result.images)
        captions = [c for _, c in inputs] + [f"{first}: {source}", *to]
        run.save(image_grid(tiles, captions), folder, "grid.png")
        for picture_in, _ in inputs:
            run.save(picture_in, folder, "input.png")
        from attnkit.runs.methods import edit_names  # the batch runner and the app name edits the same way

        names = [f"00_{first}.png", *edit_names(source, to)]
        for img, prompt, name in zip(result.images, result.prompts, names, strict=True):
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
    n_scenes: Annotated[int | None, typer.Option(
        help="Training scenes rendered and encoded once (default: 100000; the shipped model: 60000; mmdit: "
             "60000).", show_default=False)] = None,
    lr: Annotated[float | None, typer.Option(
        help="Peak learning rate of the denoiser and text encoder (default: 1e-3; mmdit: 8e-4).",
        show_default=False)] = None,
    restart_schedule: Annotated[bool, typer.Option(
        help="When resuming, start a new warm-up + cosine schedule from the current step.")] = False,
    text_layers: Annotated[int, typer.Option(help="Transformer layers of the text encoder (new runs).")] = 2,
    warm_start: Annotated[Path | None, typer.Option(
        help="A checkpoint (.safetensors) whose matching tensors initialise a new run.")] = None,
    ground_weight: Annotated[float | None, typer.Option(
        help="Weight of the grounding loss that keeps each object word's cross-attention on its object "
             "(default: 0; the shipped model's fine-tuning and mmdit: 0.1).", show_default=False)] = None,
    bind_weight: Annotated[float, typer.Option(
        help="Weight of the grounding loss's pixel side: an object's pixels attending to another object's words "
             "(attnkit.bundled.train.binding_loss; unet only).")] = 0.0,
    coherence_weight: Annotated[float, typer.Option(
        help="Weight of the loss that keeps an open-coloured object one colour, not a blend "
             "(attnkit.bundled.train.coherence_loss; unet only).")] = 0.0,
    open_color_rate: Annotated[float | None, typer.Option(
        help="Grammar v2: how often a training caption leaves an object's colour open (\"a circle\"; default: 0; "
             "the shipped model and mmdit: 0.2).", show_default=False)] = None,
    open_background_rate: Annotated[float | None, typer.Option(
        help="Grammar v2: how often a training caption leaves the background open (default: 0; the shipped "
             "model and mmdit: 0.25).", show_default=False)] = None,
    family: Annotated[str, typer.Option(
        help="unet: the bundled UNet model (attnkit/bundled/train.py); mmdit: the bundled SD3 transformer "
             "(attnkit/bundled/train_mmdit.py; --text-layers, --warm-start and --restart-schedule do not "
             "apply), used with --model RUN_DIR/model or, shipped, --model bundled-mmdit.")] = "unet",
) -> None:
    """Retrain the bundled shapes-world model on this machine's CPU (see attnkit/bundled/train.py), then use it
    with --model RUN_DIR/model."""
    if family not in ("unet", "mmdit"):
        raise typer.BadParameter(f"--family {family!r}: use unet or mmdit")
    mmdit = family == "mmdit"
    for name, weight in (("--bind-weight", bind_weight), ("--coherence-weight", coherence_weight)):
        if mmdit and weight:
            raise typer.BadParameter(f"{name} applies to --family unet only: leave it out for mmdit")
        if weight < 0:
            raise typer.BadParameter(f"{name} is a loss weight: give 0 or more, not {weight}")
    picked = {"n_scenes": n_scenes, "lr": lr, "ground_weight": ground_weight, "open_color_rate": open_color_rate,
              "open_background_rate": open_background_rate}
    defaults = ({"n_scenes": 60_000, "lr": 8e-4, "ground_weight": 0.1, "open_color_rate": 0.2,
                 "open_background_rate": 0.25} if mmdit else
                {"n_scenes": 100_000, "lr": 1e-3, "ground_weight": 0.0, "open_color_rate": 0.0,
                 "open_background_rate": 0.0})
    chosen = {k: defaults[k] if v is None else v for k, v in picked.items()}
    for name in ("open_color_rate", "open_background_rate"):
        if not 0.0 <= chosen[name] <= 1.0:
            raise typer.BadParameter(f"--{name.replace('_', '-')} is a probability: give a value from 0 to 1, "
                                     f"not {chosen[name]}")
    if mmdit:
        from attnkit.bundled.train_mmdit import train as train_mmdit

        train_mmdit(run_dir=run_dir, minutes=minutes, export_dir=export_dir or run_dir / "model", **chosen)
        return
    from attnkit.bundled.train import train

    n_scenes, lr, ground_weight = chosen["n_scenes"], chosen["lr"], chosen["ground_weight"]
    open_color_rate, open_background_rate = chosen["open_color_rate"], chosen["open_background_rate"]
    train(run_dir=run_dir, minutes=minutes, export_dir=export_dir or run_dir / "model", n_scenes=n_scenes, lr=lr,
          restart_schedule=restart_schedule, text_layers=text_layers, warm_start=warm_start,
          ground_weight=ground_weight, open_color_rate=open_color_rate,
          open_background_rate=open_background_rate, bind_weight=bind_weight, coherence_weight=coherence_weight)


# -- shared attention: style (Style Aligned) and consistent (ConsiStory's subject sharing) -------------------
SharedPrompts = Annotated[list[str], typer.Argument(
    help="Two or more prompts: the first is the reference, every other one a target.", show_default=False)]


def _check_shared_prompts(prompts: Sequence[str]) -> list[str]:
    if len(prompts) < 2:
        raise AttnkitError(f"give at least 2 prompts (the reference first, then one target or more), got "
                           f"{len(prompts)}")
    for i, prompt in enumerate(prompts):
        _check_prompt(prompt, f"prompt {i + 1}")
    return list(prompts)


def _finite(value: float, option: str) -> float:
    import math

    if not math.isfinite(value):
        raise AttnkitError(f"{option} {value}: give a finite number")
    return value


def _shared_files(run: _Run, folder: Path, result: Any, inputs: Sequence[tuple[Any, str]] = ()) -> None:
    """grid.png (the reference and the targets, each prompt under its image), 00_reference.png,
    NN_<prompt words>.png per target, input.png with a real reference."""
    from attnkit.viz import image_grid

    run.record.update(json.loads(json.dumps(result.record())))
    captions = [f"reference: {p}" if i in result.references else p for i, p in enumerate(result.prompts)]
    run.save(image_grid([im for im, _ in inputs] + list(result.images), [c for _, c in inputs] + captions),
             folder, "grid.png")
    for picture, name in inputs:
        run.save(picture, folder, f"{name}.png")
    for i, (img, prompt) in enumerate(zip(result.images, result.prompts, strict=True)):
        words = "reference" if i in result.references else "_".join(re.findall(r"[A-Za-z0-9]+", prompt)[:5])[:48]
        run.save(img, folder, f"{i:02d}_{words.strip('_') or 'target'}.png", image_prompt=prompt)


@app.command(epilog=BUNDLED_WORDS)
@_friendly_errors
def style(prompts: SharedPrompts,
          style_text: Annotated[str | None, typer.Option(
              "--style", help="A style description appended to every prompt, e.g. 'watercolor painting'.")] = None,
          reference: Annotated[str | None, typer.Option(
              help="A real reference image (DDIM-inverted; the first prompt is its caption).")] = None,
          shift: Annotated[float, typer.Option(
              help="Log-shift added to the reference's attention scores (0: none; the official transfer "
                   "notebook: 0.693 = log 2).")] = 0.0,
          scale: Annotated[float, typer.Option(help="Scale of the reference's attention scores.")] = 1.0,
          adain_values: Annotated[bool, typer.Option(
              "--adain-values", help="Also normalise the values to the reference's statistics.")] = False,
          group_norm: Annotated[bool | None, typer.Option(
              "--group-norm/--no-group-norm",
              help="Share GroupNorm statistics with the reference (default: on for SD1.x/2.x, off for SDXL).")] = None,
          only_self_level: Annotated[float, typer.Option(
              help="Fraction of the self-attention layers left unshared, by the official rule (0: all share).")
          ] = 0.0,
          model: Model = None, seed: Seed = 0, steps: Steps = None, guidance: Guidance = None,
          height: Height = None, width: Width = None, device: Device = "auto", dtype: Dtype = "float32",
          out: Out = Path("outputs/style"), quiet: Quiet = False, threads: Threads = None) -> None:
    """Style Aligned: every prompt after the first takes the first one's style (shared attention). Writes
    grid.png (each prompt under its image), 00_reference.png, NN_<prompt>.png per target and record.json; with
    --reference also input.png."""
    prompt_list = _check_shared_prompts(prompts)
    _finite(shift, "--shift")
    _finite(scale, "--scale")
    _check_fraction(only_self_level, "--only-self-level", "a fraction of the layers")
    if style_text is not None and not style_text.strip():
        raise AttnkitError("--style is empty: give a style description, or leave the option out")
    if reference is not None and (height is not None or width is not None):
        raise AttnkitError("--height/--width: with --reference the image fixes the size; leave them out")
    run = _Run.begin("style", prompt_list[0], model, device, dtype, threads, quiet, out, steps, guidance, height,
                     width)
    picture = None
    if reference is not None:
        from attnkit.images import load_image

        picture = load_image(reference)  # an unreadable file fails before the model loads
        run.record["reference_image"] = str(reference)
    with _staged_output(out) as folder:
        pipe = run.load()
        from attnkit.shared import style_aligned

        if picture is not None:
            from attnkit.inversion import use_ddim

            use_ddim(pipe)  # the reference follows its DDIM trajectory; the CLI owns this pipeline
        start = time.perf_counter()
        result = style_aligned(pipe, prompt_list, style=style_text, seed=seed, reference=picture, scale=scale,
                               shift=shift, adain_values=adain_values, share_group_norm=group_norm,
                               only_self_level=only_self_level, steps=steps, guidance=guidance, height=height,
                               width=width, progress=not quiet)
        run.time("generate", start)
        inputs = [(result.inversion.image, "input")] if result.inversion is not None else []
        _shared_files(run, folder, result, inputs)
        run.finish(folder)
    _report(run, out, quiet)


@app.command(epilog=BUNDLED_WORDS)
@_friendly_errors
def consistent(prompts: SharedPrompts,
               subject: Annotated[str, typer.Option(
                   help="The subject: a word of every prompt (its cross-attention gives the shared region).",
                   show_default=False)],
               mask_dropout: Annotated[float, typer.Option(
                   help="Probability of dropping a pixel of the subject mask at each step, for layout diversity "
                        "(ConsiStory: 0.5).")] = 0.5,
               model: Model = None, seed: Seed = 0, steps: Steps = None, guidance: Guidance = None,
               height: Height = None, width: Width = None, device: Device = "auto", dtype: Dtype = "float32",
               out: Out = Path("outputs/consistent"), quiet: Quiet = False, threads: Threads = None) -> None:
    """Subject-consistent generation (ConsiStory's shared attention): the first prompt's subject is shared with
    every other prompt inside the subject's mask, the rest follows each prompt. Writes grid.png (each prompt
    under its image), 00_reference.png, NN_<prompt>.png per target and record.json."""
    prompt_list = _check_shared_prompts(prompts)
    if not subject.strip() or len(subject.split()) != 1:
        raise AttnkitError(f"--subject {subject!r}: give one word that every prompt contains, e.g. --subject dog")
    for prompt in prompt_list:
        if subject.strip().lower() not in (w.strip(".,;:!?").lower() for w in prompt.split()):
            raise AttnkitError(f"--subject {subject!r} is not a word of the prompt {prompt!r}: every prompt must "
                               "name the subject")
    if not 0.0 <= mask_dropout < 1.0:
        raise AttnkitError(f"--mask-dropout {mask_dropout}: give a probability from 0 up to (not including) 1")
    run = _Run.begin("consistent", prompt_list[0], model, device, dtype, threads, quiet, out, steps, guidance,
                     height, width)
    with _staged_output(out) as folder:
        pipe = run.load()
        from attnkit.shared import consistent as consistent_generation

        start = time.perf_counter()
        result = consistent_generation(pipe, prompt_list, subject=subject.strip(), seed=seed,
                                       mask_dropout=mask_dropout, steps=steps, guidance=guidance, height=height,
                                       width=width, progress=not quiet)
        run.time("generate", start)
        _shared_files(run, folder, result)
        run.finish(folder)
    _report(run, out, quiet)


@app.command("mutual-edit", epilog=BUNDLED_WORDS)
@_friendly_errors
def mutual_edit_command(
        source: Annotated[str, typer.Argument(help="The source prompt (the image's caption with --image).",
                                              show_default=False)],
        to: Annotated[list[str], typer.Option("--to", help="A target prompt: a new pose or shape (repeatable).")],
        start_step: Annotated[float | None, typer.Option(
            help="Step the sharing starts at: an index (4) or a fraction of the steps below 1 (default: "
                 "MasaCtrl's step 4).")] = None,
        start_layer: Annotated[float | None, typer.Option(
            help="Self-attention layer the sharing starts at, in forward order: an index or a fraction of the "
                 "layers below 1 (default 0.625, MasaCtrl's layer 10 of 16: the decoder's finest grids).")] = None,
        mask_word: Annotated[list[str] | None, typer.Option(
            help="Mask-guided MasaCtrl: the word whose cross-attention splits foreground from background (once "
                 "for every prompt, or once per prompt, the source first).")] = None,
        mask_threshold: Annotated[float, typer.Option(
            help="Mask threshold after min-max normalisation, 0 to 1 (MasaCtrl: 0.1).")] = 0.1,
        image: Annotated[str | None, typer.Option(
            help="A real source image (DDIM-inverted; SOURCE is its caption).")] = None,
        model: Model = None, seed: Seed = 0, steps: Steps = None, guidance: Guidance = None,
        height: Height = None, width: Width = None, device: Device = "auto", dtype: Dtype = "float32",
        out: Out = Path("outputs/mutual-edit"), quiet: Quiet = False, threads: Threads = None) -> None:
    """MasaCtrl: edit SOURCE's image into each --to prompt (a new pose or shape) from the same noise, keeping its
    appearance: the targets' queries read the source's keys and values (mutual self-attention). Writes grid.png
    (source first, prompts under the images), 00_source.png, one NN_<changed words>.png per target (e.g.
    01_square.png) and record.json; with --image also input.png."""
    from attnkit.runs.methods import index_or_fraction, mask_words_for, mutual_output

    _check_prompt(source, "SOURCE")
    for target in to:
        _check_prompt(target, f"--to {target!r}")
    options: dict[str, Any] = {}
    if start_step is not None:
        options["start_step"] = index_or_fraction(start_step, "--start-step")
    if start_layer is not None:
        options["start_layer"] = index_or_fraction(start_layer, "--start-layer")
    words = mask_words_for(mask_word, [source, *to], "--mask-word")
    _check_fraction(mask_threshold, "--mask-threshold", "a threshold")
    if image is not None and (height is not None or width is not None):
        raise AttnkitError("--height/--width: with --image the image fixes the size; leave them out")
    run = _Run.begin("mutual-edit", source, model, device, dtype, threads, quiet, out, steps, guidance, height,
                     width)
    picture = None
    if image is not None:
        from attnkit.images import load_image

        picture = load_image(image)  # an unreadable file fails before the model loads
    with _staged_output(out) as folder:
        pipe = run.load()
        from attnkit.shared import mutual_edit

        if picture is not None:
            from attnkit.inversion import use_ddim

            use_ddim(pipe)  # the source follows its DDIM trajectory; the CLI owns this pipeline
        start = time.perf_counter()
        result = mutual_edit(pipe, source, list(to), seed=seed, mask_words=words, mask_threshold=mask_threshold,
                             reference=picture, steps=steps, guidance=guidance, height=height, width=width,
                             progress=not quiet, **options)
        run.time("generate", start)
        output = mutual_output(source, list(to), result, start, {"image": str(image)} if image is not None else {})
        run.record.update(output.settings)
        for name, picture_out, extra in output.images:
            run.save(picture_out, folder, name, **extra)
        run.finish(folder)
    _report(run, out, quiet)


def _attention_grids(pipe: Any, height: int | None, width: int | None) -> list[int]:
    """Grid sizes (larger side) of the UNet's cross-attention layers at this image size, from its config."""
    from attnkit.models import defaults_for

    defaults = defaults_for(pipe)
    scale = int(getattr(pipe, "vae_scale_factor", 8))
    side = max(height or defaults.height, width or defaults.width) // scale
    if getattr(pipe, "unet", None) is None:  # an MM-DiT: every layer sees the one grid of image tokens
        patch = 2  # SD3's patch size and FLUX's 2x2 packing
        return [-(-side // patch)]
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
        raise AttnkitError("this UNet has no cross-attention layers to map")
    defaults = defaults_for(pipe)
    side = max(height or defaults.height, width or defaults.width) // int(getattr(pipe, "vae_scale_factor", 8))
    fitting = [g for g in grids if g <= max(16, side // 4)]
    return max(fitting) if fitting else min(grids)


def _self_attention_picture(store: Any, image: Any, pixel: tuple[int, int], cmap: str) -> Any:
    """The image with the query pixel marked, where that pixel attends, and the top self-attention
    components (the Prompt-to-Prompt notebook's views), in two rows of four."""
    from PIL import Image

    from attnkit.viz import colorize, enlarge, image_grid, mark_point, overlay

    attended = store.self_map(pixel)
    h, w = attended.shape
    big = enlarge(image.convert("RGB"))
    y, x = (pixel[0] + 0.5) * big.height / h, (pixel[1] + 0.5) * big.width / w
    components = [colorize(c, "viridis").resize(big.size, Image.Resampling.NEAREST)
                  for c in store.self_components(k=6)]
    # the query marked (black and white rings: visible on any background) on the image and on its heat
    tiles = [mark_point(big, y, x), mark_point(overlay(big, attended, cmap=cmap), y, x), *components]
    captions = [f"query {pixel[0]},{pixel[1]}", f"attends to ({h}x{w})"]
    captions += [f"component {i}" for i in range(len(components))]
    return image_grid(tiles, captions, cols=4)


@app.command("segment", epilog=BUNDLED_WORDS)
@_friendly_errors
def segment(prompt: Annotated[str, typer.Option(help="The prompt to generate, or the caption of --image.",
                                                show_default=False)],
            image: Annotated[str | None, typer.Option(
                help="Segment this real image (a file) instead of generating PROMPT.")] = None,
            method: Annotated[str, typer.Option(
                help="kmeans (Patashnik et al.: KMeans on the self-attention) or merge (DiffSeg: KL merging of "
                     "anchor maps, no segment count needed).")] = "kmeans",
            segments: Annotated[int | None, typer.Option(
                "--segments", "-k", help="kmeans: number of clusters (default 5); merge: at most this many.")] = None,
            words: Annotated[list[str] | None, typer.Option(
                "--words", "-w", help="Candidate labels (repeat the option); default: the prompt's content words.")
            ] = None,
            threshold: Annotated[float, typer.Option(
                help="Score (0-1) a word needs to name a segment; below it the segment is background.")] = 0.4,
            refine: Annotated[str, typer.Option(
                help="bilateral (image-guided joint bilateral filter) or none (bilinear upsampling only).")]
            = "bilateral",
            real: Annotated[str, typer.Option(
                help="With --image: noise (one UNet pass on the noised image, DiffSeg) or invert (DDIM-invert, "
                     "then read the maps while regenerating).")] = "noise",
            timestep: Annotated[int, typer.Option(help="With --image --real noise: the noise level (0-999).")] = 300,
            model: Model = None, seed: Seed = 0, steps: Steps = None, guidance: Guidance = None,
            height: Height = None, width: Width = None, device: Device = "auto", dtype: Dtype = "float32",
            out: Out = Path("outputs/segment"), quiet: Quiet = False, threads: Threads = None) -> None:
    """Self-segmentation: segments from self-attention, named by cross-attention. Writes image.png (generated
    or the fitted input), overlay.png (coloured segments with a legend: label + score), labels.png (the label
    map: pixel value = segment index) and record.json (segments, scores, settings)."""
    from attnkit.segmentation import _check_options

    _check_options(method, refine, real, threshold, segments, 1, timestep)
    run = _Run.begin("segment", prompt, model, device, dtype, threads, quiet, out, steps, guidance, height, width)
    picture = run.input_image(image)  # a bad file fails before the model loads
    with _staged_output(out) as folder:
        pipe = run.load()
        from attnkit.segmentation import segment as segment_image

        start = time.perf_counter()
        seg = segment_image(pipe, prompt=prompt, image=picture, n_segments=segments, method=method,  # type: ignore[arg-type]
                            words=list(words) if words else None, threshold=threshold, refine=refine,  # type: ignore[arg-type]
                            real=real, timestep=timestep, seed=seed, steps=steps, guidance=guidance,  # type: ignore[arg-type]
                            height=height, width=width, progress=not quiet)
        run.time("segment", start)
        record = seg.record()
        run.record.update(seed=seed, height=seg.image.height, width=seg.image.width,
                          **{k: record["settings"][k] for k in ("steps", "guidance") if k in record["settings"]})
        run.record.update(segments=record["segments"], grid=record["grid"], settings=record["settings"],
                          segment_seconds=record["seconds"])
        run.save(seg.image, folder, "image.png")
        run.save(seg.overlay(), folder, "overlay.png", legend=seg.legend())
        run.save(seg.label_image(), folder, "labels.png", labels=seg.labels)
        run.finish(folder)
    if not quiet:
        typer.echo("segments: " + "; ".join(seg.legend()))
    _report(run, out, quiet)


# -- transfer: cross-image attention (appearance transfer) --------------------------------------------------------
TransferInput = Annotated[str, typer.Option(
    help="An image file (inverted), or a prompt (generated with --seed).", show_default=False)]
TRANSFER_MASKS = ("auto", "segment", "attention", "none")


@app.command("transfer", epilog=BUNDLED_WORDS)
@_friendly_errors
def transfer_command(
        structure: TransferInput, appearance: TransferInput,
        prompt: Annotated[str | None, typer.Option(
            help="The output's prompt; real images are inverted with it too (default: --structure when that is a "
                 "prompt).")] = None,
        steps: Annotated[int, typer.Option(help="Timesteps of the schedule (the paper's 100).")] = 100,
        skip: Annotated[float, typer.Option(help="Fraction of the timesteps skipped at the start (the paper's "
                                                 "32 of 100).")] = 0.32,
        inversion: Annotated[str, typer.Option(help="Real images: 'ddpm' (edit-friendly, the paper's) or "
                                                    "'ddim'.")] = "ddpm",
        contrast: Annotated[float, typer.Option(help="Attention contrast strength (1: off).")] = 1.67,
        swap_guidance: Annotated[float, typer.Option(help="Swap guidance scale at the first step (1: off).")] = 3.5,
        adain: Annotated[bool, typer.Option("--adain/--no-adain", help="Masked AdaIN of the output's latents.")
                         ] = True,
        masks: Annotated[str, typer.Option(
            help="AdaIN's object masks: auto (self-segmentation where attnkit has it, else attention), segment, "
                 "attention, or none (plain AdaIN).")] = "auto",
        object_word: Annotated[list[str] | None, typer.Option(
            help="A word naming the objects for the masks (repeatable; default: the prompts' content words).")
        ] = None,
        structure_kv: Annotated[bool, typer.Option(
            "--structure-kv", help="The official code's quirk: structure keys/values at steps 10, 15, ..., 35 "
                                   "of 68.")] = False,
        crop: CropOpt = "center", model: Model = None, seed: Seed = 0, device: Device = "auto",
        dtype: Dtype = "float32", out: Out = Path("outputs/transfer"), quiet: Quiet = False,
        threads: Threads = None) -> None:
    """Cross-image attention: the structure's layout in the appearance's look. Writes strip.png (structure |
    appearance | output), output.png, the two inputs as given (structure.png, appearance.png) and as the model
    reconstructs them (structure_reconstructed.png, appearance_reconstructed.png), and record.json."""
    _check_prompt(structure, "--structure")
    _check_prompt(appearance, "--appearance")
    if prompt is not None:
        _check_prompt(prompt, "--prompt")
    from attnkit.settings import check_steps

    check_steps(steps, "--steps")
    if not 0.0 <= skip < 1.0:
        raise AttnkitError(f"--skip {skip}: give the fraction of the timesteps to skip, from 0 up to (not "
                           "including) 1")
    if inversion not in ("ddpm", "ddim"):
        raise AttnkitError(f"--inversion {inversion}: use 'ddpm' (edit-friendly, the paper's) or 'ddim'")
    if masks not in TRANSFER_MASKS:
        raise AttnkitError(f"--masks {masks}: use {', '.join(TRANSFER_MASKS)}")
    if crop not in CROPS:
        raise AttnkitError(f"--crop {crop}: use 'center' or 'stretch'")
    if _finite(contrast, "--contrast") < 0:
        raise AttnkitError(f"--contrast {contrast}: give a strength >= 0 (1: off)")
    if _finite(swap_guidance, "--swap-guidance") < 1:
        raise AttnkitError(f"--swap-guidance {swap_guidance}: give a scale >= 1 (1: off)")
    from attnkit.transfer import input_kind

    kinds = {"--structure": input_kind(structure), "--appearance": input_kind(appearance)}
    if prompt is None and kinds["--structure"] != "prompt":
        raise AttnkitError("--prompt is missing: give the output's prompt (with an image as --structure it is "
                           "not known)")
    output_prompt = prompt if prompt is not None else structure
    run = _Run.begin("transfer", output_prompt, model, device, dtype, threads, quiet, out)
    from attnkit.images import load_image

    pictures = {}
    for option, text in (("--structure", structure), ("--appearance", appearance)):
        run.record[option.removeprefix("--")] = text
        if kinds[option] == "image":
            pictures[option] = load_image(text)  # an unreadable file fails before the model loads
    with _staged_output(out) as folder:
        pipe = run.load()
        from attnkit.transfer import transfer as cross_image_transfer

        start = time.perf_counter()
        result = cross_image_transfer(
            pipe, structure=pictures.get("--structure", structure), appearance=pictures.get("--appearance", appearance),
            prompt=output_prompt, steps=steps, skip=skip, inversion=inversion, contrast=contrast,  # type: ignore[arg-type]
            swap_guidance=None if swap_guidance == 1 else swap_guidance, adain=adain,
            masks=None if masks == "none" else masks, object_words=list(object_word) if object_word else None,
            structure_kv=structure_kv, seed=seed, crop=crop, progress=not quiet)
        run.time("transfer", start)
        run.record.update(seed=seed, steps=steps, height=result.image.height, width=result.image.width)
        run.record["transfer"] = json.loads(json.dumps(result.record()))
        run.save(result.strip(), folder, "strip.png")
        run.save(result.image, folder, "output.png")
        for role in ("structure", "appearance"):
            run.save(result.inputs[role], folder, f"{role}.png")
            run.save(getattr(result, role), folder, f"{role}_reconstructed.png")
        run.finish(folder)
    _report(run, out, quiet)


# -- MM-DiT methods: ConceptAttention and Stable Flow ------------------------------------------------------------
def _mmdit_model(model: str | None) -> str:
    """``--model`` for the MM-DiT-only commands: given, else the bundled MM-DiT model once it ships."""
    if model is not None:
        return model
    from attnkit.models import bundled_model_path

    if (bundled_model_path().parent / "mmdit").is_dir():
        return "bundled-mmdit"
    raise AttnkitError("this method needs an MM-DiT model (SD3/SD3.5 or FLUX.1) and the bundled model is a UNet: "
                       "pass --model with an SD3/FLUX pipeline folder or hub id, or --model tiny-sd3 / tiny-flux")


def _parse_blocks(text: str | None) -> list[int] | None:
    if text is None:
        return None
    parts = [p for p in text.replace(" ", "").split(",") if p]
    if not parts or not all(p.lstrip("-").isdigit() for p in parts):
        raise AttnkitError(f"--blocks {text!r}: give double-stream block indices separated by commas, e.g. 15,16,17,18 "
                           "(negative counts from the end: -1 is the last)")
    return [int(p) for p in parts]


@app.command("concepts")
@_friendly_errors
def concepts_command(
        prompt: Annotated[str, typer.Argument(help="The prompt to generate, or the caption of --image ('' allowed "
                                                   "with --image).", show_default=False)],
        concept: Annotated[list[str], typer.Option(
            "--concept", "-c", help="A concept to map (repeat the option), e.g. -c circle -c square -c background.",
            show_default=False)],
        image: Annotated[str | None, typer.Option(help="Map this real image (a file) instead of generating.")] = None,
        blocks: Annotated[str | None, typer.Option(
            help="Double-stream blocks to average, e.g. 15,16,17,18 (default: the paper's last 4 of 19, relative "
                 "to the model's depth).")] = None,
        noise: Annotated[float, typer.Option(help="With --image: the noise level σ of the pass, in (0, 1].")] = 0.5,
        samples: Annotated[int, typer.Option(help="With --image: noisy passes averaged.")] = 1,
        model: Model = None, seed: Seed = 0, steps: Steps = None, guidance: Guidance = None,
        height: Height = None, width: Width = None, device: Device = "auto", dtype: Dtype = "float32",
        out: Out = Path("outputs/concepts"), quiet: Quiet = False, threads: Threads = None) -> None:
    """ConceptAttention (MM-DiT models): concept saliency maps from attention outputs. Writes image.png,
    concepts.png (the image and one overlay per concept), segments.png (each pixel's most salient concept),
    concepts/NN_concept.png overlays and record.json."""
    from attnkit.concepts import check_concepts

    names = check_concepts(concept)
    chosen_blocks = _parse_blocks(blocks)
    if not 0.0 < noise <= 1.0:
        raise AttnkitError(f"--noise {noise}: give the noise level σ in (0, 1], e.g. 0.5")
    if samples < 1:
        raise AttnkitError(f"--samples {samples}: give at least 1")
    if image is None:
        _check_prompt(prompt)
    model = _mmdit_model(model)
    run = _Run.begin("concepts", prompt if prompt.strip() else "(none)", model, device, dtype, threads, quiet, out,
                     steps, guidance, height, width)
    run.record["prompt"] = prompt
    picture = run.input_image(image)  # a bad file fails before the model loads
    with _staged_output(out) as folder:
        pipe = run.load()
        from attnkit.concepts import concept_maps
        from attnkit.runs.execute import safe_name
        from attnkit.viz import enlarge, overlay, segment_overlay

        start = time.perf_counter()
        result = concept_maps(pipe, prompt, names, image=picture, blocks=chosen_blocks, seed=seed, steps=steps,
                              guidance=guidance, height=height, width=width, noise_level=noise, samples=samples,
                              progress=not quiet)
        run.time("concepts", start)
        record = result.record()
        run.record.update(seed=seed, height=result.image.height, width=result.image.width, concepts=names,
                          layers=record["layers"], concept_steps=record["steps"],
                          settings={k: v for k, v in record.items() if k not in ("prompt", "concepts", "layers")})
        if "steps" in result.settings:
            run.record.update(steps=result.settings["steps"], guidance=result.settings["guidance"])
        run.save(result.image, folder, "image.png")
        run.save(result.strip(), folder, "concepts.png", concepts=names)
        labels = result.segment().numpy()
        run.save(segment_overlay(result.image, labels, names), folder, "segments.png", concepts=names)
        big = enlarge(result.image)
        for i, (name, heat) in enumerate(result.as_dict().items()):
            run.save(overlay(big, heat), folder, f"concepts/{i:02d}_{safe_name(name)}.png", concept=name)
        run.finish(folder)
    _report(run, out, quiet)


@app.command("stable-flow")
@_friendly_errors
def stable_flow_command(
        source: Annotated[str, typer.Argument(help="The source prompt (the image's caption with --image).",
                                              show_default=False)],
        to: Annotated[list[str], typer.Option(
            "--to", "-t", help="An edited prompt (repeat the option for several edits).", show_default=False)],
        image: Annotated[str | None, typer.Option(
            help="Edit this real image (a file): nudged by 1.15, Euler-inverted at guidance 1.")] = None,
        layers: Annotated[list[str] | None, typer.Option(
            "--layer", "-l", help="A block to inject into, e.g. transformer_blocks.0 (repeat the option); default: "
                                  "the vital layers, measured first on the source prompt.")] = None,
        vital: Annotated[int | None, typer.Option(
            help="Without --layer: how many vital blocks to inject into (default: the paper's share, 9 of 57).")]
        = None,
        model: Model = None, seed: Seed = 0, steps: Steps = None, guidance: Guidance = None,
        height: Height = None, width: Width = None, device: Device = "auto", dtype: Dtype = "float32",
        out: Out = Path("outputs/stable-flow"), quiet: Quiet = False, threads: Threads = None) -> None:
    """Stable Flow (MM-DiT models): edit by injecting the source's image keys and values in the vital layers.
    Writes grid.png (source and edits, each prompt under its image), 00_source.png, NN_edit.png per edit,
    vital_layers.json (when measured) and record.json."""
    targets = [_check_prompt(t, "an edited prompt") for t in to]
    if not targets:
        raise AttnkitError("no edited prompt: pass --to \"...\" at least once")
    if vital is not None and vital < 1:
        raise AttnkitError(f"--vital {vital}: give at least 1 block")
    if vital is not None and layers:
        raise AttnkitError("--vital chooses among measured vital layers; leave it out when you pass --layer")
    model = _mmdit_model(model)
    run = _Run.begin("stable-flow", source, model, device, dtype, threads, quiet, out, steps, guidance, height, width)
    picture = run.input_image(image)  # a bad file fails before the model loads
    with _staged_output(out) as folder:
        pipe = run.load()
        from attnkit.stable_flow import stable_flow_edit, vital_layers
        from attnkit.viz import image_grid

        chosen: Any = list(layers) if layers else None
        if chosen is None:
            start = time.perf_counter()
            measured = vital_layers(pipe, [source], seeds=[seed], steps=steps, guidance=guidance, height=height,
                                    width=width, progress=not quiet)
            run.time("vital_layers", start)
            chosen = measured.top(vital)
            (folder / "vital_layers.json").write_text(json.dumps(measured.record(), indent=2) + "\n")
            run.record["files"].append("vital_layers.json")
        start = time.perf_counter()
        result = stable_flow_edit(pipe, source, targets, layers=chosen, image=picture, seed=seed, steps=steps,
                                  guidance=guidance, height=height, width=width, progress=not quiet)
        run.time("edit", start)
        run.record.update(seed=seed, targets=targets, layers=result.layers, height=result.source.height,
                          width=result.source.width, **{k: v for k, v in result.settings.items()
                                                        if k in ("steps", "guidance", "nudge", "crop")})
        run.save(image_grid(result.images, result.prompts), folder, "grid.png")
        run.save(result.source, folder, "00_source.png")
        for i, edited in enumerate(result.edits, start=1):
            run.save(edited, folder, f"{i:02d}_edit.png", target=targets[i - 1])
        run.finish(folder)
    _report(run, out, quiet)


# -- rectified-flow inversion and FlowEdit (MM-DiT models) ------------------------------------------------------
def _check_solver(solver: str) -> str:
    from attnkit.flow_inversion import SOLVERS

    if solver not in SOLVERS:
        raise AttnkitError(f"--solver {solver}: use one of {', '.join(SOLVERS)}")
    return solver


def _save_edits(run: _Run, folder: Path, source: Any, edits: Sequence[Any], prompts: Sequence[str]) -> None:
    from attnkit.viz import image_grid

    run.save(image_grid([source, *edits], list(prompts)), folder, "grid.png")
    for i, (edited, target) in enumerate(zip(edits, prompts[1:], strict=True), start=1):
        run.save(edited, folder, f"{i:02d}_edit.png", target=target)


@app.command("rf-invert")
@_friendly_errors
def rf_invert_command(
        image: Annotated[str, typer.Argument(help="The image file to invert.", show_default=False)],
        prompt: Annotated[str, typer.Option(help="A caption of the image (the source prompt).")],
        to: Annotated[list[str] | None, typer.Option(
            "--to", "-t", help="An edited prompt, regenerated from the inverted noise (repeat for several).",
            show_default=False)] = None,
        solver: Annotated[str, typer.Option(
            help="fireflow (2nd order, 1 evaluation a step), rf-solver (2nd order, 2 a step) or euler.")]
        = "fireflow",
        guidance: Annotated[float, typer.Option(
            help="Guidance of the inversion and the reconstruction (1: the conditional velocity alone).")] = 1.0,
        edit_guidance: Annotated[float | None, typer.Option(
            help="With --to: guidance of the edits (default: the inversion's).")] = None,
        crop: CropOpt = "center", model: Model = None, steps: Steps = None, device: Device = "auto",
        dtype: Dtype = "float32", out: Out = Path("outputs/rf-invert"), quiet: Quiet = False,
        threads: Threads = None) -> None:
    """Rectified-flow inversion (MM-DiT models): invert a real image to noise and regenerate it. Writes
    inversion.safetensors + inversion.json (load with attnkit.FlowInversion.load), image.png (the fitted input),
    reconstruction.png, with --to grid.png and NN_edit.png per edit, and record.json (reconstruction PSNR, model
    evaluations)."""
    _check_solver(solver)
    if crop not in CROPS:
        raise AttnkitError(f"--crop {crop}: use 'center' or 'stretch'")
    targets = [_check_prompt(t, "an edited prompt") for t in to or []]
    if edit_guidance is not None and not targets:
        raise AttnkitError("--edit-guidance sets the guidance of --to edits: pass --to as well, or leave it out")
    model = _mmdit_model(model)
    run = _Run.begin("rf-invert", prompt, model, device, dtype, threads, quiet, out, steps, guidance)
    if edit_guidance is not None:
        _check_sampling(None, edit_guidance, None, None)
    from attnkit.images import psnr

    picture = run.input_image(image)  # a bad file fails before the model loads
    with _staged_output(out) as folder:
        pipe = run.load()
        from attnkit.flow_inversion import rf_edit, rf_invert, rf_reconstruct

        start = time.perf_counter()
        inv = rf_invert(pipe, picture, prompt, steps=steps, solver=solver, guidance=guidance, crop=crop,  # type: ignore[arg-type]
                        progress=not quiet)
        run.time("invert", start)
        start = time.perf_counter()
        rebuilt = rf_reconstruct(pipe, inv, progress=not quiet)
        run.time("reconstruct", start)
        run.record.update(solver=solver, steps=inv.steps, guidance=inv.guidance, crop=inv.crop.to_dict(),
                          evaluations={"invert": inv.evaluations, "reconstruct": rebuilt.evaluations},
                          psnr_reconstruction=round(psnr(inv.image, rebuilt.images[0]), 3))
        inv.save(folder, overwrite=True)  # attnkit.FlowInversion.load(folder) reads it back
        run.record["files"] += ["inversion.safetensors", "inversion.json", "image.png"]
        run.save(rebuilt.images[0], folder, "reconstruction.png", solver=solver)
        if targets:
            start = time.perf_counter()
            edited = rf_edit(pipe, inv, targets, guidance=edit_guidance, progress=not quiet)
            run.time("edit", start)
            run.record.update(targets=targets, edit_guidance=inv.guidance if edit_guidance is None else edit_guidance)
            run.record["evaluations"]["edit"] = edited.evaluations
            _save_edits(run, folder, inv.image, edited.edits, [prompt, *targets])
        run.finish(folder)
    _report(run, out, quiet)


@app.command("flow-edit")
@_friendly_errors
def flow_edit_command(
        image: Annotated[str, typer.Argument(help="The image file to edit.", show_default=False)],
        source: Annotated[str, typer.Argument(help="A caption of the image (the source prompt).", show_default=False)],
        to: Annotated[str, typer.Option("--to", "-t", help="The edited prompt.", show_default=False)],
        n_max: Annotated[int | None, typer.Option(
            help="Edit during the last N steps (default: the paper's share, 33 of 50 on SD3, 24 of 28 on FLUX).")]
        = None,
        n_min: Annotated[int, typer.Option(help="The last N steps sample the target plainly.")] = 0,
        n_avg: Annotated[int, typer.Option(help="Noise draws averaged per step.")] = 1,
        source_guidance: Annotated[float | None, typer.Option(
            help="Guidance of the source velocity (default: the paper's, 3.5 on SD3, 1.5 on FLUX).")] = None,
        target_guidance: Annotated[float | None, typer.Option(
            help="Guidance of the target velocity (default: the paper's, 13.5 on SD3, 5.5 on FLUX).")] = None,
        crop: CropOpt = "center", model: Model = None, seed: Seed = 0, steps: Steps = None, device: Device = "auto",
        dtype: Dtype = "float32", out: Out = Path("outputs/flow-edit"), quiet: Quiet = False,
        threads: Threads = None) -> None:
    """FlowEdit (MM-DiT models): edit a real image without inverting it. Writes image.png (the fitted input),
    01_edit.png, grid.png and record.json."""
    target = _check_prompt(to, "the edited prompt")
    if crop not in CROPS:
        raise AttnkitError(f"--crop {crop}: use 'center' or 'stretch'")
    if n_min < 0:
        raise AttnkitError(f"--n-min {n_min}: give a whole number of steps >= 0")
    if n_avg < 1:
        raise AttnkitError(f"--n-avg {n_avg}: average at least 1 noise draw per step")
    for value, option in ((source_guidance, "--source-guidance"), (target_guidance, "--target-guidance")):
        if value is not None:
            _finite(value, option)
    model = _mmdit_model(model)
    run = _Run.begin("flow-edit", source, model, device, dtype, threads, quiet, out, steps)
    picture = run.input_image(image)  # a bad file fails before the model loads
    with _staged_output(out) as folder:
        pipe = run.load()
        from attnkit.flow_edit import flow_edit

        start = time.perf_counter()
        result = flow_edit(pipe, picture, source, target, steps=steps, n_max=n_max, n_min=n_min, n_avg=n_avg,
                           source_guidance=source_guidance, target_guidance=target_guidance, seed=seed, crop=crop,
                           progress=not quiet)
        run.time("edit", start)
        settings = result.record()
        run.record.update(seed=seed, steps=settings["steps"], targets=[target], crop=settings["crop"],
                          evaluations=result.evaluations,
                          **{k: settings[k] for k in ("n_max", "n_min", "n_avg", "source_guidance",
                                                      "target_guidance")})
        run.save(result.source, folder, "image.png")
        _save_edits(run, folder, result.source, [result.image], [source, target])
        run.finish(folder)
    _report(run, out, quiet)


# Front ends built on attnkit.runs (one description of a run): their options live beside their code.
from attnkit.app.command import app_command  # noqa: E402
from attnkit.batch.command import batch_command  # noqa: E402

app.command("batch")(_friendly_errors(batch_command))
app.command("app")(_friendly_errors(app_command))


def main() -> None:
    """Console entry point (``attnkit = "attnkit.cli:main"``)."""
    app()

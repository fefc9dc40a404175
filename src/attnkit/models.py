"""Model loading and each model's own sampling defaults.

    pipe = load_pipeline()                                   # the bundled model shipped with attnkit
    pipe = load_pipeline("runwayml/stable-diffusion-v1-5", dtype="fp16", device="cuda")
    pipe = load_pipeline("path/to/a/saved/pipeline")         # a local folder: works offline
    defaults = defaults_for(pipe)      # ModelDefaults(guidance_scale=1.5, num_inference_steps=25, ...)
"""

from __future__ import annotations

import json
import logging
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from importlib.util import find_spec
from pathlib import Path
from typing import Any

from attnkit.notices import AttnkitError, warn
from attnkit.threads import apply_threads

DEFAULTS_FILE = "attnkit.json"
BUNDLED_MODEL = Path(__file__).resolve().parent / "bundled" / "model"
# The bundled MM-DiT model (StableDiffusion3Pipeline), load_pipeline("bundled-mmdit"); bundled/train_mmdit.py
BUNDLED_MMDIT = Path(__file__).resolve().parent / "bundled" / "mmdit"

_DTYPE_NAMES = {
    "float32": "float32", "fp32": "float32", "float": "float32",
    "float16": "float16", "fp16": "float16", "half": "float16",
    "bfloat16": "bfloat16", "bf16": "bfloat16",
}


@dataclass(frozen=True)
class ModelDefaults:
    """Sampling defaults of one model. The bundled model needs a low guidance scale, so no command may
    assume Stable Diffusion's 7.5: read them from here."""

    guidance_scale: float = 7.5
    num_inference_steps: int = 50
    height: int = 512
    width: int = 512
    # Null-text inversion's Adam learning rate at step 0: the paper's 1e-2 for Stable Diffusion; a model may
    # need another one (the bundled model measured +13 dB over DDIM at 0.1 against +8 dB at 0.01).
    null_text_lr: float = 1e-2
    # Style Aligned's GroupNorm sharing where a model needs its own choice (None: the official notebooks' rule,
    # on for SD1.x/2.x, off for SDXL). The bundled model: off, its 4x4 and 8x8 GroupNorm statistics carry the
    # layout, and sharing them cost the targets their prompted shapes (benchmarks/shared_attention.py, README).
    style_group_norm: bool | None = None
    # Edit-friendly DDPM inversion's guidance in attnkit.transfer: None is the paper's 3.5 (Stable Diffusion).
    # The transfer samples every row without text guidance, so a model whose sampling guidance is low may need
    # its inputs inverted at 1 to be rebuilt at all (the bundled model: benchmarks/transfer.py).
    ddpm_inversion_guidance: float | None = None
    # The words a model was trained on, where it knows only a few (the bundled model): prompts with other words
    # get a warning naming them. None: any word (CLIP-based Stable Diffusion models).
    vocabulary: tuple[str, ...] | None = None
    # SD3 without T5: how many zero "T5" embeddings the pipeline appends (its own default 256; the bundled
    # MM-DiT model samples with 0, 2-3x faster, and was trained on both). None: the pipeline's default.
    max_sequence_length: int | None = None


def _model_folder(pipe: Any) -> Path | None:
    name = getattr(pipe, "_attnkit_folder", None) or getattr(getattr(pipe, "config", None), "_name_or_path", None)
    if name and Path(str(name)).is_dir():
        return Path(str(name))
    return None


_FAMILY_DEFAULTS: dict[str, dict[str, Any]] = {
    "sd3": {"guidance_scale": 7.0, "num_inference_steps": 28},
    "flux": {"guidance_scale": 3.5, "num_inference_steps": 28},
}


def defaults_for(pipe: Any) -> ModelDefaults:
    """The model's defaults: its folder's ``attnkit.json`` where present, else Stable Diffusion's.

    ``vocabulary``: ``attnkit.json``'s list, else the shapes-world words for a folder written by attnkit's
    shapes-world trainer (``attnkit train-bundled``, which leaves a ``training_info.json``), else None."""
    from attnkit.adapters import adapter_for

    adapter = adapter_for(pipe)
    side = adapter.native_size()
    # Without attnkit.json: the pipeline's own call defaults (SD3 7.0 / 28 steps, FLUX 3.5 / 28), else SD's.
    family = _FAMILY_DEFAULTS.get(adapter.family, {})
    base = ModelDefaults(height=side, width=side, **family)
    folder = _model_folder(pipe)
    if folder is not None and (folder / DEFAULTS_FILE).is_file():
        stored = json.loads((folder / DEFAULTS_FILE).read_text())
        known = {k: stored[k] for k in ModelDefaults.__dataclass_fields__ if k in stored}
        if "vocabulary" in known:
            known["vocabulary"] = tuple(known["vocabulary"])
        elif (folder / "training_info.json").is_file():
            from attnkit.bundled.scenes import VOCABULARY

            known["vocabulary"] = VOCABULARY
        return ModelDefaults(**{**base.__dict__, **known})
    return base


_PUNCTUATION = ".,;:!?\"'()[]{}"


def unknown_words(pipe: Any, prompts: str | Sequence[str]) -> list[str]:
    """Words of ``prompts`` outside the model's vocabulary (``defaults_for(pipe).vocabulary``), in order, each
    once; empty for models without a fixed vocabulary. ``unknown_words(pipe, "a cat")  # ["cat"] (bundled)``"""
    vocabulary = defaults_for(pipe).vocabulary
    if vocabulary is None:
        return []
    known = {w.lower() for w in vocabulary}
    found: dict[str, None] = {}
    for prompt in [prompts] if isinstance(prompts, str) else prompts:
        for word in prompt.split():
            bare = word.strip(_PUNCTUATION).lower()
            if (bare or word) not in known:
                found[bare or word] = None
    return list(found)


def warn_unknown_words(pipe: Any, prompts: str | Sequence[str], stacklevel: int = 4) -> list[str]:
    """One warning naming the words the model does not know and the words it does; returns the unknown ones.
    (``stacklevel`` 4 points the warning at the code that called :func:`attnkit.generate`.)"""
    unknown = unknown_words(pipe, prompts)
    if unknown:
        vocabulary = defaults_for(pipe).vocabulary or ()
        warn(f"the model does not know the word{'s' if len(unknown) > 1 else ''} "
             f"{', '.join(map(repr, unknown))} and will draw what it knows instead. It knows only: "
             f"{' '.join(vocabulary)} (e.g. 'a red circle and an outlined square on a black background')",
             stacklevel=stacklevel)
    return unknown


def bundled_model_path() -> Path:
    """The folder of the bundled model; raises a clear error when it is not there (not trained/shipped yet)."""
    if not (BUNDLED_MODEL / "model_index.json").is_file():
        raise AttnkitError(
            f"the bundled model is missing ({BUNDLED_MODEL} has no model_index.json): reinstall attnkit, "
            "train it with `attnkit train-bundled`, or pass a model (a local pipeline folder, a hub id, or "
            "'tiny' on the command line for a random test pipeline)"
        )
    return BUNDLED_MODEL


def bundled_mmdit_path() -> Path:
    """The folder of the bundled MM-DiT (SD3) model, ``load_pipeline("bundled-mmdit")``; a clear error when it
    is not there."""
    if not (BUNDLED_MMDIT / "model_index.json").is_file():
        raise AttnkitError(
            f"the bundled MM-DiT model is missing ({BUNDLED_MMDIT} has no model_index.json): reinstall attnkit, "
            "train it with `attnkit train-bundled --family mmdit`, or pass an SD3/FLUX pipeline folder or hub id"
        )
    return BUNDLED_MMDIT


def parse_dtype(dtype: Any) -> Any:
    """A ``torch.dtype`` from a dtype or a name ("float32"/"fp32", "float16"/"fp16", "bfloat16"/"bf16");
    None stays None. ``parse_dtype("fp16") is torch.float16``"""
    import torch

    if dtype is None or isinstance(dtype, torch.dtype):
        return dtype
    key = str(dtype).lower().removeprefix("torch.")
    if key not in _DTYPE_NAMES:
        raise AttnkitError(f"unknown dtype {dtype!r}: use float32 (fp32), float16 (fp16) or bfloat16 (bf16)")
    return getattr(torch, _DTYPE_NAMES[key])


def _diffusers_takes_dtype() -> bool:
    # diffusers 0.40 renamed from_pretrained's `torch_dtype=` to `dtype=` (the old name is deprecated).
    import diffusers

    major, minor = (int(part) for part in diffusers.__version__.split(".")[:2])
    return (major, minor) >= (0, 40)


def _looks_like_path(name: str) -> bool:
    # Hub ids are "org/name" (or "name"); anything with more parts or a path prefix was meant as a folder.
    return name.startswith((".", "/", "~", "\\")) or name.count("/") > 1 or "\\" in name


def _is_pipeline(obj: Any) -> bool:
    from diffusers import DiffusionPipeline

    return isinstance(obj, DiffusionPipeline)


def _folder_kwargs(folder: Path) -> dict[str, Any]:
    """Extra from_pretrained arguments for a local folder: its own (absent) safety checker stays absent."""
    index = json.loads((folder / "model_index.json").read_text())
    if "safety_checker" in index and not (folder / "safety_checker").is_dir():
        # The folder was saved without a checker; tell the pipeline so, instead of warning about it.
        return {"safety_checker": None, "requires_safety_checker": False}
    # SD3 saved without T5 (null entries): from_pretrained wants the absent encoder passed as None
    return {name: None for name in ("text_encoder_3", "tokenizer_3") if index.get(name, [0])[0] is None}


def _network_errors() -> tuple[type[BaseException], ...]:
    from huggingface_hub.errors import HfHubHTTPError, OfflineModeIsEnabled

    errors: list[type[BaseException]] = [OSError, HfHubHTTPError, OfflineModeIsEnabled]
    try:
        import httpx

        errors.append(httpx.HTTPError)
    except ImportError:  # older huggingface_hub versions use requests only (its errors are OSErrors)
        pass
    return tuple(errors)


def load_pipeline(
    name_or_path: str | Path | Any | None = None,
    dtype: Any = None,
    device: str | Any | None = None,
    local_files_only: bool | None = None,
) -> Any:
    """Load a diffusers text-to-image pipeline (SD1.x, SD2.x, SDXL) for use with attnkit.

    ``name_or_path``: None (the bundled model), ``"bundled-mmdit"`` (the bundled SD3 model), a local pipeline
    folder (loaded offline), a Hugging Face hub id, or an existing pipeline object (moved to ``dtype``/``device``
    where given). Weights load from safetensors only and no remote code runs. ``dtype`` takes torch dtypes or names ("fp16", "bfloat16", ...).
    ``local_files_only=True`` makes a hub id load from the local hub cache only (as ``HF_HUB_OFFLINE=1`` does).

        pipe = attnkit.load_pipeline("stabilityai/stable-diffusion-2-1-base", dtype="fp16", device="cuda")
    """
    torch_dtype = parse_dtype(dtype)
    apply_threads()  # before the first tensor op: torch's default can be 10-60x slower on a busy CPU
    if name_or_path is not None and _is_pipeline(name_or_path):
        return _to_device(name_or_path, device, torch_dtype)
    if not isinstance(name_or_path, str | Path | None):
        raise AttnkitError(f"cannot load a pipeline from a {type(name_or_path).__name__}: pass a folder, a "
                           "hub id or a diffusers pipeline")

    from diffusers import DiffusionPipeline

    if name_or_path is None:
        folder = bundled_model_path()
    elif name_or_path == "bundled-mmdit":
        folder = bundled_mmdit_path()
    else:
        folder = Path(name_or_path).expanduser()
    kwargs: dict[str, Any] = {"use_safetensors": True}
    if find_spec("accelerate") is None:
        # what diffusers falls back to anyway, said explicitly so that it does not print five lines about it;
        # with accelerate installed (pip install "attnkit[accelerate]") large models load faster
        kwargs["low_cpu_mem_usage"] = False
    if torch_dtype is not None:
        kwargs["dtype" if _diffusers_takes_dtype() else "torch_dtype"] = torch_dtype
    if folder.is_dir():
        if not (folder / "model_index.json").is_file():
            raise AttnkitError(
                f"{folder} is not a diffusers pipeline folder (it has no model_index.json): pass the folder "
                "written by pipe.save_pretrained(...) or a hub id such as 'runwayml/stable-diffusion-v1-5'"
            )
        pipe = DiffusionPipeline.from_pretrained(str(folder), local_files_only=True, **kwargs,
                                                 **_folder_kwargs(folder))
        pipe._attnkit_folder = str(folder)
    elif folder.exists() or _looks_like_path(str(name_or_path)):
        raise AttnkitError(f"{name_or_path} is not a folder: pass a diffusers pipeline folder or a hub id")
    else:
        pipe = _from_hub(DiffusionPipeline, str(name_or_path), local_files_only, kwargs)
    return _to_device(pipe, device, None)  # from_pretrained applied the dtype (keeping fp32-only modules)


@contextmanager
def _muted(name: str) -> Iterator[None]:
    """Only errors from the logger ``name`` during the block."""
    logger = logging.getLogger(name)
    level = logger.level
    logger.setLevel(logging.ERROR)
    try:
        yield
    finally:
        logger.setLevel(level)


def _from_hub(cls: Any, repo_id: str, local_files_only: bool | None, kwargs: dict[str, Any]) -> Any:
    try:
        return cls.from_pretrained(repo_id, local_files_only=local_files_only, **kwargs)
    except _network_errors() as error:
        raise AttnkitError(
            f"cannot load {repo_id!r} from the Hugging Face hub ({type(error).__name__}: "
            f"{str(error).splitlines()[0] if str(error) else 'no details'}). If this machine has no network, "
            "download the model elsewhere and pass its local folder, or set HF_HUB_OFFLINE=1 to use a copy "
            "already in the hub cache; also check that the id is spelled right and the repo is public"
        ) from error


def available_devices() -> list[str]:
    """The devices torch can use here: ``["cpu"]``, plus ``"cuda"`` / ``"mps"`` where present."""
    import torch

    found = ["cpu"]
    if torch.cuda.is_available():
        found.append("cuda")
    mps = getattr(torch.backends, "mps", None)
    if mps is not None and mps.is_available():
        found.append("mps")
    return found


def check_device(device: Any) -> str:
    """``device`` as a string after checking that torch can use it here (``"auto"``: cuda when present, else
    cpu); a clear error naming the devices there are otherwise. ``check_device("mps")``"""
    import torch

    if str(device) == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    try:
        torch.empty(0, device=device)
    except (RuntimeError, AssertionError, ValueError, TypeError) as error:
        kind = str(device).split(":")[0]
        if kind == "cuda" and not torch.cuda.is_available():
            reason = "torch.cuda.is_available() is False: no usable NVIDIA GPU, or a CPU-only torch build"
        elif kind == "mps":
            reason = "torch.backends.mps.is_available() is False: MPS needs Apple silicon and macOS"
        else:  # torch's first sentence (its messages can run to pages of dispatcher tables)
            reason = (str(error).strip().splitlines() or [type(error).__name__])[0].split(". ")[0].rstrip(".:( ")
        choices = [repr(d) for d in [*available_devices(), "auto"]]
        raise AttnkitError(f"device {str(device)!r} is not usable on this machine ({reason}); use "
                           f"{', '.join(choices[:-1])} or {choices[-1]}") from None
    return str(device)


def _to_device(pipe: Any, device: Any, dtype: Any) -> Any:
    import torch

    if device is not None:
        check_device(device)
    if dtype is not None and getattr(pipe, "dtype", None) == dtype:
        dtype = None  # already there: casting again would only make diffusers warn
    if device is not None or dtype is not None:
        # attnkit says it once below, in one line, where diffusers would warn once per component (and about
        # fp32 modules of an autoencoder that has none)
        with _muted("diffusers.models.modeling_utils"):
            pipe = pipe.to(device=device, dtype=dtype, silence_dtype_warnings=True)
    unet = getattr(pipe, "unet", None)
    if unet is not None and unet.dtype == torch.float16 and unet.device.type == "cpu":
        warn("float16 on the CPU is slow and not supported by diffusers there: use float32 (the default) on a CPU "
             "and float16 on a GPU (--device cuda)", stacklevel=4)  # points at the load_pipeline call
    return pipe

"""Appearance transfer between two images with cross-image attention (Alaluf, Garibi et al., SIGGRAPH 2024).

    result = attnkit.transfer(pipe, structure="giraffe.png", appearance="zebra.png", prompt="a photo of an animal")
    result.image.save("output.png")            # the giraffe's layout in the zebra's look
    result.strip().save("strip.png")           # structure | appearance | output

Each input is a real image (a path, PIL image or array), a prompt (generated, no inversion) or a ready
trajectory (:class:`attnkit.ddpm_inversion.Trajectory`, or an :class:`attnkit.Inversion` from
:func:`attnkit.invert`). Real images are inverted with edit-friendly DDPM inversion (``inversion="ddpm"``, the
paper's and the default: in ``benchmarks/transfer.py`` the output keeps far more of the structure with it than
with ``"ddim"``, mask IoU 0.39 against 0.14 on the bundled model); prompts are sampled with
DDPM and their noise kept (:func:`attnkit.ddpm_inversion.ddpm_generate`), which describes a generated image
exactly, as inversion describes a real one.

Then one batch is denoised from the structure's latent at ``timesteps[skip]`` (official: 100 timesteps, 32
skipped), every row with its own trajectory's noise maps (the output: the structure's). Batch layout, rows of
every UNet call (:data:`ROWS`): ``[output, appearance, structure, output_plain]``. ``output_plain`` is the output
without the swap: the second pass of swap guidance, batched into the same UNet call (the appearance and
structure rows are the same in both official passes, so four rows do the work of its two calls of three). After
each step it is set back to the output, so it costs one row and holds no image of its own. The pieces
(:mod:`attnkit.controllers.cross_image`): decoder self-attention swap, attention contrast, swap guidance, masked
AdaIN on latents with object masks (:func:`object_masks`), each a parameter with the paper's default.

Other controllers compose (``controllers=[store]``): they run after the swap and see all four rows.
"""

from __future__ import annotations

import importlib
import importlib.util
import math
import os
import re
import time
import warnings
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any, Literal

import numpy as np
import torch
from PIL import Image

from attnkit.controllers.cross_image import (
    ADAIN_STEPS,
    COARSE_STEPS,
    CONTRAST,
    FINE_STEPS,
    SWAP_GUIDANCE,
    CrossImageAttention,
    MaskedAdaIN,
    Steps,
    check_strength,
    check_window,
    guide,
    step_bound,
    swap_guidance_scales,
)
from attnkit.ddpm_inversion import GUIDANCE as DDPM_INVERSION_GUIDANCE
from attnkit.ddpm_inversion import STEPS as PAPER_STEPS
from attnkit.ddpm_inversion import (
    Trajectory,
    ddpm_generate,
    ddpm_invert,
    ddpm_step,
    from_inversion,
)
from attnkit.engine import AttnkitError, Controller, Layout, control
from attnkit.inversion import check_prompt, ddim_scheduler, encode_text
from attnkit.notices import AttnkitWarning
from attnkit.sampling import decode_latents

ROWS = ("output", "appearance", "structure", "output_plain")
OUTPUT, APPEARANCE, STRUCTURE, PLAIN = range(4)
SKIP = 32 / PAPER_STEPS  # official skip_steps = 32 of 100 timesteps; a float scales with ``steps``
InversionMethod = Literal["ddpm", "ddim"]
INVERSIONS = ("ddpm", "ddim")
# Words that never name an object, left out of the default object words of the masks.
FUNCTION_WORDS = frozenset("a an the of on in at with and or to from by for is are photo image picture painting "
                           "drawing background".split())
MaskFunction = Callable[[Any, Trajectory, Sequence[str], int], torch.Tensor]


@dataclass
class TransferResult:
    """What :func:`transfer` returns: the output, the inputs as the model reconstructs them, the inputs as given
    (fitted to the model, or generated), the object masks and the settings. ``images`` is in batch order."""

    image: Image.Image
    appearance: Image.Image
    structure: Image.Image
    inputs: dict[str, Image.Image]
    latents: torch.Tensor
    prompt: str
    trajectories: dict[str, Trajectory] = field(repr=False, default_factory=dict)
    masks: dict[str, torch.Tensor] | None = field(repr=False, default=None)
    settings: dict[str, Any] = field(default_factory=dict)
    seconds: dict[str, float] = field(default_factory=dict)

    @property
    def images(self) -> list[Image.Image]:
        """``[output, appearance, structure]``: the rows of the batch."""
        return [self.image, self.appearance, self.structure]

    def strip(self) -> Image.Image:
        """structure | appearance | output side by side (the inputs as given)."""
        tiles = [self.inputs["structure"], self.inputs["appearance"], self.image]
        width, height = sum(t.width for t in tiles), max(t.height for t in tiles)
        canvas = Image.new("RGB", (width, height), (255, 255, 255))
        x = 0
        for tile in tiles:
            canvas.paste(tile.convert("RGB"), (x, 0))
            x += tile.width
        return canvas

    def record(self) -> dict[str, Any]:
        """A JSON-ready record of the run."""
        return {"prompt": self.prompt, **self.settings,
                "inputs": {k: v.record() for k, v in self.trajectories.items()},
                "seconds": {k: round(v, 3) for k, v in self.seconds.items()}}


# -- inputs -------------------------------------------------------------------------------------------------------
def _is_path_like(text: str) -> bool:
    # a file that exists, or a name that looks like one ("A.png", "photo.jpeg", "dir/x"): a typo in a file name
    # must fail as a missing file, not be generated as a prompt
    return os.path.exists(text) or bool(re.search(r"\.[A-Za-z][A-Za-z0-9]{1,4}$", text.strip())) or \
        os.sep in text or "/" in text


def input_kind(source: Any) -> str:
    """``"trajectory"``, ``"inversion"``, ``"prompt"`` or ``"image"``: how :func:`transfer` reads an input. A
    string is an image when it names an existing file or looks like a file name (``A.png``, ``dir/x``), else a
    prompt."""
    from attnkit.inversion import Inversion

    if isinstance(source, Trajectory):
        return "trajectory"
    if isinstance(source, Inversion):
        return "inversion"
    if isinstance(source, str):
        if not source.strip():
            raise AttnkitError("an input is an empty string: give an image path or a prompt")
        return "image" if _is_path_like(source) else "prompt"
    if isinstance(source, (os.PathLike, Image.Image, np.ndarray)):
        return "image"
    raise AttnkitError(f"cannot use a {type(source).__name__} as an input: give an image (path, PIL image or "
                       "array), a prompt, an attnkit.Inversion or a Trajectory")


def _load_input(source: Any) -> Any:
    """Read an image input now, so an unreadable file fails before any model work."""
    from attnkit.images import load_image

    return load_image(source)


def _prepare(pipe: Any, role: str, source: Any, kind: str, caption: str, steps: int, inversion: str,
             inversion_guidance: float | None, seed: int, crop: str, progress: bool) -> Trajectory:
    if kind == "trajectory":
        trajectory = source
    elif kind == "inversion":
        trajectory = from_inversion(source)
    elif kind == "prompt":
        trajectory = ddpm_generate(pipe, source, steps=steps, seed=seed, progress=progress)
    elif inversion == "ddpm":
        guidance = ddpm_inversion_guidance(pipe) if inversion_guidance is None else inversion_guidance
        trajectory = ddpm_invert(pipe, source, caption, steps=steps, guidance=guidance, seed=seed,
                                 crop=crop, progress=progress)  # type: ignore[arg-type]
    else:
        from attnkit.inversion import invert

        inv = invert(pipe, source, caption, method="ddim", steps=steps, crop=crop,  # type: ignore[arg-type]
                     inversion_guidance=1.0 if inversion_guidance is None else inversion_guidance,
                     progress=progress)
        trajectory = from_inversion(inv)
    trajectory.check_pipeline(pipe)
    if trajectory.steps != steps:
        raise AttnkitError(f"the {role} was inverted with {trajectory.steps} steps and the transfer runs "
                           f"{steps}: pass steps={trajectory.steps}")
    return trajectory


def ddpm_inversion_guidance(pipe: Any) -> float:
    """The guidance real inputs are DDPM-inverted with by default: the model's ``ddpm_inversion_guidance``
    (``attnkit.json``) where it sets one, else the paper's 3.5. ``ddpm_inversion_guidance(pipe)``"""
    from attnkit.models import defaults_for

    value = defaults_for(pipe).ddpm_inversion_guidance
    return DDPM_INVERSION_GUIDANCE if value is None else float(value)


# -- masks --------------------------------------------------------------------------------------------------------
def object_words(prompt: str, words: Sequence[str] | None = None) -> list[str]:
    """The words whose attention marks objects: ``words`` where given (those in ``prompt``), else the prompt's
    words minus function words and the word before "background". ``object_words("a circle on a white
    background") == ["circle"]``"""
    tokens = [w.strip(".,;:!?\"'()").lower() for w in prompt.split()]
    if words is not None:
        wanted = {w.lower() for w in words}
        return [w for w in dict.fromkeys(tokens) if w in wanted]
    skip = {tokens[i - 1] for i, w in enumerate(tokens) if w == "background" and i > 0}
    return [w for w in dict.fromkeys(tokens) if w and w not in FUNCTION_WORDS and w not in skip]


def _otsu(values: torch.Tensor, bins: int = 64) -> float:
    """Otsu's threshold of ``values``: the bin edge that maximises the between-class variance."""
    v = values.flatten().double()
    lo, hi = float(v.min()), float(v.max())
    if hi <= lo:
        return lo
    hist = torch.histc(v, bins=bins, min=lo, max=hi)
    centers = lo + (torch.arange(bins, dtype=torch.float64) + 0.5) * (hi - lo) / bins
    w1, w2 = hist.cumsum(0), hist.sum() - hist.cumsum(0)
    m1 = (hist * centers).cumsum(0) / w1.clamp_min(1e-12)
    m2 = ((hist * centers).sum() - (hist * centers).cumsum(0)) / w2.clamp_min(1e-12)
    between = w1 * w2 * (m1 - m2) ** 2
    return float(lo + (int(between[:-1].argmax()) + 1) * (hi - lo) / bins)


@torch.no_grad()
def attention_mask(pipe: Any, trajectory: Trajectory, words: Sequence[str], index: int) -> torch.Tensor:
    """An object mask (h, w) at the latent grid from cross-attention: one UNet pass on the trajectory's latent
    ``index`` with its prompt, the object words' maps (all cross-attention layers, heads) each scaled to [0, 1],
    summed, upsampled (bilinear) and cut at Otsu's threshold."""
    from attnkit.store import AttentionStore

    latent = trajectory.latents[index : index + 1].to(pipe.unet.device)
    store = AttentionStore(kinds="cross", res=None)
    text = encode_text(pipe, trajectory.prompt, *(s * int(getattr(pipe, "vae_scale_factor", 8))
                                                  for s in latent.shape[-2:]))
    with control(pipe, store, layout=Layout(prompts=1, cfg=False)) as ctl:
        ctl.set_step(0, 1)
        _unet(pipe, latent, trajectory.timesteps[index], [text])
    maps = store.word_maps(trajectory.prompt, words=list(words))
    total = sum((m - m.min()) / (m.max() - m.min()).clamp_min(1e-12) for m in maps.values())
    total = torch.nn.functional.interpolate(total[None, None].float(), size=latent.shape[-2:], mode="bilinear",
                                            align_corners=False)[0, 0]
    return (total > _otsu(total)).float()


def _segment_function() -> Callable[..., Any] | None:
    """``attnkit.segment`` where this attnkit has it (the self-segmentation method), else None."""
    if importlib.util.find_spec("attnkit.segmentation") is None:
        return None
    module = importlib.import_module("attnkit.segmentation")
    return getattr(module, "segment", None)


def segment_mask(pipe: Any, trajectory: Trajectory, words: Sequence[str], index: int) -> torch.Tensor:
    """An object mask (h, w) at the latent grid from attnkit's self-segmentation: :func:`attnkit.segment` of
    the input image with its prompt and ``words`` as the candidate labels; the segments it names (not
    background) are the objects. ``index`` is unused (the segmentation reads its own timestep)."""
    segment = _segment_function()
    if segment is None:
        raise AttnkitError("masks='segment' needs attnkit.segment (attnkit.segmentation), which this attnkit "
                           "lacks: use masks='attention'")
    if trajectory.image is None:
        raise AttnkitError("masks='segment' needs the input image; this trajectory has none: use "
                           "masks='attention'")
    result = segment(pipe, prompt=trajectory.prompt, image=trajectory.image, words=list(words), progress=False)
    objects = [s.index for s in result.segments if not s.is_background]
    mask = torch.from_numpy(np.isin(np.asarray(result.label_map), objects).astype(np.float32))
    return torch.nn.functional.interpolate(mask[None, None], size=tuple(trajectory.latents.shape[-2:]),
                                           mode="area")[0, 0].gt(0.5).float()


MASKS: dict[str, MaskFunction] = {"attention": attention_mask, "segment": segment_mask}


def object_masks(pipe: Any, trajectories: dict[str, Trajectory], masks: str | MaskFunction,
                 words: Sequence[str] | None, index: int) -> dict[str, torch.Tensor]:
    """The structure's and the appearance's object masks (h, w) for masked AdaIN: ``masks`` is ``"auto"``
    (:func:`attnkit.segment` where it exists, else ``"attention"``), ``"segment"``, ``"attention"`` or a function
    ``f(pipe, trajectory, words, index) -> (h, w) tensor``; ``index`` is the trajectory step where AdaIN starts."""
    if masks == "auto":
        masks = "segment" if _segment_function() is not None else "attention"
    function = MASKS[masks] if isinstance(masks, str) else masks
    found = {}
    for role in ("structure", "appearance"):
        trajectory = trajectories[role]
        chosen = object_words(trajectory.prompt, words)
        if not chosen:
            raise AttnkitError(f"no object words for the {role}'s masks in its prompt {trajectory.prompt!r}: pass "
                               "object_words=[...] with words of that prompt, or masks=None (plain AdaIN)")
        mask = torch.as_tensor(function(pipe, trajectory, chosen, index)).float()
        if mask.ndim != 2:
            raise AttnkitError(f"the mask function gave a {tuple(mask.shape)} tensor for the {role}: return (h, w)")
        found[role] = mask
    return found


# -- the UNet call ---------------------------------------------------------------------------------------------------
def _unet(pipe: Any, x: torch.Tensor, t: int, texts: Sequence[Any]) -> torch.Tensor:
    """The UNet's output (float32) for rows ``x`` at timestep ``t``, row ``i`` conditioned on ``texts[i]``'s
    prompt (no guidance)."""
    unet = pipe.unet
    embeds = torch.cat([text.cond for text in texts]).to(unet.device, unet.dtype)
    added = None
    if texts[0].time_ids is not None:
        added = {"text_embeds": torch.cat([text.pooled for text in texts]).to(unet.device, unet.dtype),
                 "time_ids": torch.cat([text.time_ids for text in texts]).to(unet.device, unet.dtype)}
    out = unet(x.to(unet.device, unet.dtype), t, encoder_hidden_states=embeds, added_cond_kwargs=added,
               return_dict=False)[0]
    return out.float()


# -- checks ---------------------------------------------------------------------------------------------------------
def _skip_steps(skip: int | float, steps: int) -> int:
    if isinstance(skip, bool) or not isinstance(skip, (int, float)) or not math.isfinite(skip) or skip < 0:
        raise AttnkitError(f"skip={skip!r}: give the number of timesteps to skip (int) or a fraction (float < 1)")
    count = int(skip * steps + 1e-9) if isinstance(skip, float) else int(skip)
    if count >= steps:
        raise AttnkitError(f"skip={skip!r} skips {count} of {steps} steps: leave at least one step to denoise")
    return count


def _check_seed(seed: Any) -> int:
    if isinstance(seed, bool) or not isinstance(seed, int):
        raise AttnkitError(f"seed={seed!r}: give an int")
    return seed


def transfer(pipe: Any, structure: Any, appearance: Any, prompt: str | None = None, *,
             controllers: Sequence[Controller] = (), steps: int = PAPER_STEPS, skip: int | float = SKIP,
             inversion: InversionMethod = "ddpm", inversion_guidance: float | None = None,
             structure_prompt: str | None = None, appearance_prompt: str | None = None,
             contrast: float = CONTRAST, swap_guidance: float | None = SWAP_GUIDANCE,
             grids: Sequence[int] | None = None, grid_steps: Sequence[Steps] = (FINE_STEPS, COARSE_STEPS),
             adain: bool = True, adain_steps: Steps = ADAIN_STEPS, masks: str | MaskFunction | dict | None = "auto",
             object_words: Sequence[str] | None = None, structure_kv: bool = False,
             follow_inputs: bool | None = None, seed: int = 0, crop: str = "center",
             progress: bool = True) -> TransferResult:
    """The structure's layout in the appearance's look (cross-image attention). Usage:
    ``attnkit.transfer(pipe, structure="a.png", appearance="b.png", prompt="a photo of an animal").image``

    Inputs: an image, a prompt, a :class:`~attnkit.ddpm_inversion.Trajectory` or an :class:`attnkit.Inversion`
    (see :func:`input_kind`). ``prompt`` conditions the output; real images are inverted with
    ``structure_prompt``/``appearance_prompt`` (default: ``prompt``, as the official code, which uses one prompt
    for all three rows) and each input row keeps its own prompt. ``inversion``: ``"ddpm"`` (edit-friendly, the
    paper's, guidance ``inversion_guidance``: the paper's 3.5, or the model's own ``ddpm_inversion_guidance`` from
    its ``attnkit.json``, see :func:`ddpm_inversion_guidance`) or ``"ddim"`` (:func:`attnkit.invert`, guidance 1).

    Schedule: ``steps`` timesteps (official 100), the first ``skip`` skipped (official 32; a float is a fraction);
    windows are fractions of the remaining loop (official: 68 steps). ``contrast`` β (1: off);
    ``swap_guidance`` the starting scale (None or 1: off, and the batch drops the plain row); ``grids``/
    ``grid_steps`` where and when the swap acts (:class:`~attnkit.controllers.cross_image.CrossImageAttention`);
    ``adain``/``adain_steps``; ``masks`` the object masks of masked AdaIN (:func:`object_masks`; None: plain
    AdaIN); ``object_words`` the words the masks look for (default: each prompt's content words);
    ``structure_kv`` the official code's quirk. ``follow_inputs``: put the input rows back on their
    trajectories after each step (None: for generated inputs only, prompts or :func:`ddpm_generate`
    trajectories, so their rows are exactly the generated images; real images sample freely, as the official
    code). ``seed``: the structure's (inversion noise or
    generation); the appearance's is ``seed + 1``.
    """
    from attnkit.settings import check_steps
    from attnkit.threads import apply_threads

    # -- everything is checked before any model work --
    steps = check_steps(steps)
    skip_count = _skip_steps(skip, steps)
    seed = _check_seed(seed)
    if inversion not in INVERSIONS:
        raise AttnkitError(f"inversion={inversion!r}: use 'ddpm' (edit-friendly, the paper's) or 'ddim'")
    if crop not in ("center", "stretch"):
        raise AttnkitError(f"crop={crop!r}: use 'center' or 'stretch'")
    contrast = check_strength(contrast, "contrast")
    if swap_guidance is not None:
        swap_guidance = check_strength(swap_guidance, "swap_guidance", 1.0)
    if inversion_guidance is not None:
        inversion_guidance = check_strength(inversion_guidance, "inversion_guidance")
    adain_steps = check_window(adain_steps, "adain_steps")
    if isinstance(masks, dict):
        if set(masks) != {"structure", "appearance"} or not all(
                isinstance(m, torch.Tensor) and m.ndim == 2 for m in masks.values()):
            raise AttnkitError("masks as a dict: give {'structure': (h, w) tensor, 'appearance': (h, w) tensor} "
                               "(e.g. an earlier result's .masks)")
    elif masks is not None and not callable(masks) and masks not in ("auto", *MASKS):
        raise AttnkitError(f"masks={masks!r}: use 'auto', 'segment', 'attention', a function, a dict of two "
                           "masks or None")
    for c in controllers:
        if not isinstance(c, Controller):
            raise AttnkitError(f"{c!r} is not an attnkit Controller")
    swap = CrossImageAttention(OUTPUT, APPEARANCE, STRUCTURE, grids=grids, grid_steps=grid_steps, contrast=contrast,
                               structure_kv=structure_kv)
    sources = {"structure": structure, "appearance": appearance}
    kinds = {role: input_kind(source) for role, source in sources.items()}
    if prompt is None:
        if kinds["structure"] == "prompt":
            prompt = structure
        elif kinds["structure"] in ("trajectory", "inversion"):
            prompt = structure.prompt
        else:
            raise AttnkitError("prompt is missing: give the output's prompt, e.g. prompt=\"a photo of an animal\"")
    check_prompt(pipe, prompt)
    captions = {"structure": structure_prompt or prompt, "appearance": appearance_prompt or prompt}
    for role, caption in (("structure", structure_prompt), ("appearance", appearance_prompt)):
        if caption is not None and kinds[role] != "image":
            raise AttnkitError(f"{role}_prompt is the caption a real image is inverted with, and the {role} is a "
                               f"{kinds[role]}: leave {role}_prompt out")
    for role, kind in kinds.items():
        if kind == "prompt":
            check_prompt(pipe, sources[role])
        elif kind == "image":
            check_prompt(pipe, captions[role])
            sources[role] = _load_input(sources[role])  # unreadable files fail here
    apply_threads()

    # -- inputs --
    seconds: dict[str, float] = {}
    trajectories = {}
    for role, offset in (("structure", 0), ("appearance", 1)):
        start = time.perf_counter()
        trajectories[role] = _prepare(pipe, role, sources[role], kinds[role], captions[role], steps, inversion,
                                      inversion_guidance, seed + offset, crop, progress)
        seconds[f"{role}_input"] = time.perf_counter() - start
    s_traj, a_traj = trajectories["structure"], trajectories["appearance"]
    if s_traj.timesteps != a_traj.timesteps:
        raise AttnkitError("the structure and appearance trajectories have different timesteps: make both with "
                           "the same pipeline and steps")
    if s_traj.latents.shape[1:] != a_traj.latents.shape[1:]:
        raise AttnkitError(f"the structure's latents {tuple(s_traj.latents.shape[1:])} and the appearance's "
                           f"{tuple(a_traj.latents.shape[1:])} differ in size: make both at one image size")
    follow = {role: (traj.method == "generated") if follow_inputs is None else bool(follow_inputs)
              for role, traj in trajectories.items()}
    loop = steps - skip_count

    # -- masks for AdaIN --
    mask_tensors, mask_source = None, None
    if adain and masks is not None:
        start = time.perf_counter()
        if isinstance(masks, dict):
            mask_source, mask_tensors = "given", {k: v.float() for k, v in masks.items()}
        else:
            mask_source = ("segment" if _segment_function() is not None else "attention") if masks == "auto" \
                else masks
            first = 0 if adain_steps is None else min(loop - 1, step_bound(adain_steps[0], loop))
            mask_tensors = object_masks(pipe, trajectories, mask_source, object_words, skip_count + first)
        seconds["masks"] = time.perf_counter() - start
        for role, mask in mask_tensors.items():
            if int((mask > 0.5).sum()) < 2:
                warnings.warn(f"the {role}'s object mask is empty, so masked AdaIN leaves the output as it is; "
                              "check object_words or pass masks=None (plain AdaIN)", AttnkitWarning, stacklevel=2)

    # -- the batch --
    start = time.perf_counter()
    latents = _denoise(pipe, prompt, trajectories, follow, swap, swap_guidance, adain, adain_steps, mask_tensors,
                       list(controllers), skip_count, progress)
    seconds["transfer"] = time.perf_counter() - start
    start = time.perf_counter()
    output, appearance_image, structure_image = decode_latents(pipe, latents)
    seconds["decode"] = time.perf_counter() - start
    inputs = {role: traj.image if traj.image is not None else decode_latents(pipe, traj.latents[-1:])[0]
              for role, traj in trajectories.items()}
    settings = {
        "rows": list(ROWS if _plain_row(swap_guidance) else ROWS[:3]), "steps": steps, "skip": skip_count,
        "loop_steps": loop, "inversion": inversion,
        "inversion_guidance": inversion_guidance if inversion_guidance is not None
        else ddpm_inversion_guidance(pipe) if inversion == "ddpm" else 1.0, "kinds": kinds, "follow_inputs": follow,
        "contrast": contrast, "swap_guidance": swap_guidance, "grids": None if grids is None else list(grids),
        "grid_steps": [None if w is None else list(w) for w in swap.grid_steps], "adain": adain,
        "adain_steps": None if adain_steps is None else list(adain_steps),
        "masks": mask_source if isinstance(mask_source, str) or mask_source is None
        else getattr(mask_source, "__name__", "function"),
        "object_words": None if object_words is None else list(object_words), "structure_kv": structure_kv,
        "seed": seed, "crop": crop, "swapped_calls": swap.swapped_calls,
    }
    return TransferResult(image=output, appearance=appearance_image, structure=structure_image, inputs=inputs,
                          latents=latents, prompt=prompt, trajectories=trajectories, masks=mask_tensors,
                          settings=settings, seconds=seconds)


def _plain_row(swap_guidance: float | None) -> bool:
    return swap_guidance is not None and swap_guidance != 1.0


@torch.no_grad()
def _denoise(pipe: Any, prompt: str, trajectories: dict[str, Trajectory], follow: dict[str, bool],
             swap: CrossImageAttention, swap_guidance: float | None, adain: bool, adain_steps: Steps,
             masks: dict[str, torch.Tensor] | None, controllers: list[Controller], skip: int,
             progress: bool) -> torch.Tensor:
    """The denoising loop over ``[output, appearance, structure(, output_plain)]``; returns the final latents of
    the first three rows."""
    from tqdm.auto import tqdm

    s_traj, a_traj = trajectories["structure"], trajectories["appearance"]
    device = pipe.unet.device
    scheduler = ddim_scheduler(pipe, s_traj.steps)
    timesteps = s_traj.timesteps[skip:]
    loop = len(timesteps)
    factor = int(getattr(pipe, "vae_scale_factor", 8))
    height, width = (s * factor for s in s_traj.latents.shape[-2:])
    texts = [encode_text(pipe, p, height, width) for p in (prompt, a_traj.prompt, s_traj.prompt)]
    plain = _plain_row(swap_guidance)
    if plain:
        texts.append(texts[OUTPUT])
    scales = swap_guidance_scales(swap_guidance, loop) if plain else []
    noise_of = [s_traj, a_traj, s_traj]  # the output follows the structure's noise maps, as officially
    x = torch.cat([s_traj.start(skip), a_traj.start(skip), s_traj.start(skip)]).to(device)
    hooks: list[Controller] = [swap]
    if adain:
        pair = None if masks is None else (masks["structure"], masks["appearance"])
        hooks.append(MaskedAdaIN(OUTPUT, APPEARANCE, masks=pair, steps=adain_steps))
    layout = Layout(prompts=len(texts), cfg=False)
    with control(pipe, *hooks, *controllers, layout=layout) as ctl:
        for i, t in enumerate(tqdm(timesteps, desc="cross-image attention", disable=not progress)):
            ctl.set_step(i, loop)
            batch = torch.cat([x, x[OUTPUT : OUTPUT + 1]]) if plain else x
            eps = _unet(pipe, batch, t, texts)
            out_eps = eps[OUTPUT]
            if plain and _guided_step(swap, i, loop):
                out_eps = guide(eps[OUTPUT], eps[PLAIN], scales[i])
            rows = []
            for row, trajectory in enumerate(noise_of):
                e = out_eps if row == OUTPUT else eps[row]
                noise = trajectory.noises[skip + i : skip + i + 1].to(device)
                rows.append(ddpm_step(scheduler, e[None], t, x[row : row + 1], trajectory.eta, noise))
            new = torch.cat(rows)
            for row, role in ((APPEARANCE, "appearance"), (STRUCTURE, "structure")):
                if follow[role]:
                    new[row] = trajectories[role].latents[skip + i + 1].to(new)
            full = torch.cat([new, new[OUTPUT : OUTPUT + 1]]) if plain else new
            updates = ctl.callback(pipe, i, t, {"latents": full})
            x = updates.get("latents", full)[:3].float()
    return x


def _guided_step(swap: CrossImageAttention, step: int, loop: int) -> bool:
    """Swap guidance acts from the first swapping window's start to the last one's end (inclusive, as the
    official ``cross_image_attention_range.start <= i <= end``)."""
    windows = [w for w in swap.grid_steps if w is not None]
    if len(windows) < len(swap.grid_steps):
        return True  # a grid swaps at every step
    start = min(step_bound(w[0], loop) for w in windows)
    end = max(step_bound(w[1], loop) for w in windows)
    return start <= step <= end


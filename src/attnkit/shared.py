"""Consistent generation across a batch, one call per method of the shared-attention family.

    result = attnkit.style_aligned(pipe, ["a toy train", "a toy airplane", "a toy car"],
                                   style="macro photo, 3d game asset", seed=1)
    result.reference.save("reference.png"); result.targets[0].save("airplane.png")
    attnkit.mutual_edit(pipe, "a sitting cat", "a running cat", seed=4).images[1]     # MasaCtrl
    attnkit.consistent(pipe, ["a dog in a field", "a dog on a sofa"], subject="dog")   # ConsiStory's attention

The first prompt is the reference (the source of an edit): its image is exactly what plain generation of the
batch gives it, and every other prompt is a target that attends to its keys and values
(:mod:`attnkit.controllers.shared`). ``reference=`` takes a real image instead (a path, a PIL image or an
:class:`attnkit.Inversion`; the first prompt is then its caption): it is DDIM-inverted and the reference row is
put back on the inversion trajectory after every step (:class:`FollowTrajectory`), as the official Style Aligned
and MasaCtrl code do. On a UNet that needs a DDIM scheduler (``attnkit.inversion.use_ddim(pipe)``); on SD3/FLUX
the reference is inverted by :func:`attnkit.rf_invert` (Euler, the pipeline's own sampler and schedule).

Each call composes with other controllers (``controllers=[store, Reweight(...)]``), which run after the shared
attention: an :class:`attnkit.AttentionStore` records the maps of every image, a Prompt-to-Prompt edit acts on
the same batch.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import torch

from attnkit.controllers.shared import (
    MaskedMutualSelfAttention,
    MutualSelfAttention,
    SharedAttention,
    Steps,
    StyleAligned,
    SubjectShare,
)
from attnkit.engine import AttnkitError, Control, Controller, shared_latents
from attnkit.models import defaults_for
from attnkit.sampling import Generation, generate, normalize_prompts

# The official notebooks' inversion guidance: Style Aligned's transfer notebook inverts at 2; MasaCtrl inverts
# with an empty prompt (guidance has no effect there); attnkit's default for a captioned image is the
# conditional-only DDIM inversion (1).
STYLE_INVERSION_GUIDANCE = 2.0


@dataclass
class SharedResult:
    """What the shared-attention calls return: the images in prompt order (reference first), the prompts as
    generated, which prompts are references, the final latents and the settings."""

    images: list[Any]
    prompts: list[str]
    references: list[int]
    latents: torch.Tensor
    settings: dict[str, Any] = field(default_factory=dict)
    generation: Generation | None = None
    inversion: Any = None

    @property
    def reference(self) -> Any:
        """The (first) reference image."""
        return self.images[self.references[0]]

    @property
    def targets(self) -> list[Any]:
        """The images of every prompt that is not a reference, in prompt order."""
        return [im for i, im in enumerate(self.images) if i not in self.references]

    def record(self) -> dict[str, Any]:
        """A JSON-ready record of the run."""
        return {"prompts": self.prompts, "references": self.references, **self.settings}


class FollowTrajectory(Controller):
    """Put chosen rows back on a DDIM inversion trajectory after every step (a real reference image).

    Usage: ``FollowTrajectory(inv.latents, rows=(0,))`` with ``inv = attnkit.invert(pipe, image, caption, "ddim")``.

    ``trajectory`` is ``(steps + 1, C, h, w)`` from ``x_0`` to ``x_T`` (:attr:`attnkit.Inversion.latents`);
    after step ``i`` the rows get ``trajectory[steps − 1 − i]``, the inverted latent of that noise level.
    """

    def __init__(self, trajectory: torch.Tensor, rows: Sequence[int] = (0,)) -> None:
        if trajectory.dim() != 4 or trajectory.shape[0] < 2:
            raise AttnkitError(f"the trajectory must be (steps + 1, C, h, w), got {tuple(trajectory.shape)}")
        self.trajectory = trajectory
        self.rows = list(rows)

    def on_step_end(self, ctl: Control, step: int, tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        latents = tensors["latents"]
        steps = self.trajectory.shape[0] - 1
        if ctl.num_steps != steps:
            raise AttnkitError(f"the inversion has {steps} steps but the pipeline runs {ctl.num_steps}: generate "
                               "with the inversion's step count")
        latents = latents.clone()
        latents[self.rows] = self.trajectory[steps - 1 - step].to(latents).expand(len(self.rows), -1, -1, -1)
        return {"latents": latents}


# -- shared input handling ------------------------------------------------------------------------------------
def _prompts(prompts: str | Sequence[str], what: str, style: str | None = None,
             empty_reference: bool = False) -> list[str]:
    """The prompt list, checked; ``empty_reference``: a real reference image may have an empty caption."""
    items = normalize_prompts(prompts if isinstance(prompts, str) else list(prompts))
    if len(items) < 2:
        raise AttnkitError(f"{what} needs at least 2 prompts: the reference (first) and one target or more; "
                           f"got {len(items)}")
    for i, p in enumerate(items):
        if not p.strip() and not (i == 0 and empty_reference):
            raise AttnkitError(f"prompts must be non-empty strings, got {p!r} (only a real reference image's "
                               "caption may be empty)")
    if style is not None:
        if not isinstance(style, str) or not style.strip():
            raise AttnkitError(f"style={style!r}: give a style description such as 'watercolor painting', or None")
        items = [f"{p}, {style.strip()}" for p in items]
    return items


def _check_all(pipe: Any, prompts: list[str], shared: SharedAttention, controllers: Sequence[Controller]) -> None:
    from attnkit.inversion import check_prompt

    for p in prompts:
        check_prompt(pipe, p)
    for c in controllers:
        if not isinstance(c, Controller):
            raise AttnkitError(f"{c!r} is not an attnkit Controller; controllers subclass attnkit.Controller")
    shared.check(pipe)  # an invalid layer selection fails here, before anything runs
    shared.roles(len(prompts))


def _load_reference(pipe: Any, reference: Any) -> Any:
    """The Inversion, or the loaded image, of ``reference`` (None: a generated reference)."""
    if reference is None:
        return None
    from diffusers import DDIMScheduler

    from attnkit.images import load_image
    from attnkit.inversion import Inversion

    if _is_flow(pipe):  # SD3/FLUX: rectified-flow inversion on the pipeline's own schedule, no DDIM needed
        from attnkit.flow_inversion import FlowInversion

        return reference if isinstance(reference, FlowInversion) else load_image(reference)
    if not isinstance(pipe.scheduler, DDIMScheduler):
        raise AttnkitError(f"a real reference image is put back on its DDIM inversion trajectory, which needs a DDIM "
                           f"scheduler; the pipeline has {type(pipe.scheduler).__name__}: call "
                           "attnkit.inversion.use_ddim(pipe) first")
    return reference if isinstance(reference, Inversion) else load_image(reference)


def _is_flow(pipe: Any) -> bool:
    from attnkit.adapters import adapter_for

    return adapter_for(pipe).family != "unet"


def _run(pipe: Any, prompts: list[str], shared: SharedAttention, controllers: Sequence[Controller], *,
         method: str, seed: int, shared_noise: bool, reference: Any, inversion_guidance: float,
         steps: int | None, guidance: float | None, height: int | None, width: int | None, progress: bool,
         settings: dict[str, Any]) -> SharedResult:
    from attnkit.inversion import Inversion, invert

    _check_all(pipe, prompts, shared, controllers)
    source = _load_reference(pipe, reference)
    inversion = None
    extra: list[Controller] = []
    latents = None
    if source is not None:
        refs = list(shared.references)
        if _is_flow(pipe):
            from attnkit.flow_inversion import FlowInversion, rf_invert

            # The pipeline samples with Euler, so the reference follows an Euler inversion on the same schedule.
            inversion = source if isinstance(source, FlowInversion) else rf_invert(
                pipe, source, prompts[refs[0]], steps=steps, solver="euler", guidance=inversion_guidance,
                progress=progress)
            start = inversion.noise
        else:
            inversion = source if isinstance(source, Inversion) else invert(
                pipe, source, prompts[refs[0]], method="ddim", steps=steps, inversion_guidance=inversion_guidance,
                progress=progress)
            inversion.check_pipeline(pipe)
            start = inversion.start_latents
        if steps is not None and steps != inversion.steps:
            raise AttnkitError(f"steps={steps} but the inversion has {inversion.steps}: leave steps out")
        steps = inversion.steps
        width, height = inversion.size
        from attnkit.adapters import adapter_for

        adapter = adapter_for(pipe)
        extra.append(FollowTrajectory(inversion.latents.to(adapter.model.device), rows=refs))
        latents = _noise(pipe, len(prompts), seed, shared_noise, height, width)
        start = adapter.pack_noise(start.to(latents.device, torch.float32)).to(latents)  # FLUX: packed patches
        latents[refs] = start.expand(len(refs), *start.shape[1:])
    gen = generate(pipe, prompts, *extra, shared, *controllers, seed=seed, steps=steps, guidance=guidance,
                   height=height, width=width, latents=latents, shared_noise=shared_noise, progress=progress)
    record = {"method": method, "seed": seed, "steps": gen.steps, "guidance": gen.guidance, "height": gen.height,
              "width": gen.width, "shared_noise": shared_noise, **settings,
              "real_reference": inversion is not None, "seconds": round(gen.seconds, 3)}
    if inversion is not None:
        record["inversion_guidance"] = getattr(inversion, "inversion_guidance", getattr(inversion, "guidance", None))
    return SharedResult(images=gen.images, prompts=prompts, references=list(shared.references),
                        latents=gen.latents, settings=record, generation=gen, inversion=inversion)


def _noise(pipe: Any, count: int, seed: int, shared: bool, height: int | None, width: int | None) -> torch.Tensor:
    """Initial noise as :func:`attnkit.generate` draws it: one noise for all, or seed + i for prompt i."""
    defaults = defaults_for(pipe)
    h, w = height or defaults.height, width or defaults.width
    if shared:
        return shared_latents(pipe, seed, count, h, w)
    return torch.cat([shared_latents(pipe, seed + i, 1, h, w) for i in range(count)])


# -- the three methods ---------------------------------------------------------------------------------------
def style_aligned(pipe: Any, prompts: Sequence[str], *, style: str | None = None, seed: int = 0,
                  reference: Any = None, scale: float = 1.0, shift: float = 0.0, adain_queries: bool = True,
                  adain_keys: bool = True, adain_values: bool = False, share_group_norm: bool | None = None,
                  only_self_level: float = 0.0, layers: Sequence[int | str] | None = None, share_steps: Steps = None,
                  places: Sequence[str] = ("down", "mid", "up"), shift_positions: bool = True,
                  references: int | Sequence[int] = (0,), steps: int | None = None, guidance: float | None = None,
                  height: int | None = None, width: int | None = None,
                  inversion_guidance: float = STYLE_INVERSION_GUIDANCE, controllers: Sequence[Controller] = (),
                  progress: bool = True) -> SharedResult:
    """Generate ``prompts`` in one style: every prompt after the first takes the first one's style
    (:class:`~attnkit.controllers.shared.StyleAligned`, Hertz, Voynov et al., CVPR 2024).

    Usage: ``style_aligned(pipe, ["a toy train", "a toy car"], style="macro photo", seed=1).images``

    ``style`` is appended to every prompt (``"a toy train, macro photo"``). Each prompt starts from its own
    noise (``seed + i``), as the official notebooks. ``reference``: a real image (path, PIL image or
    :class:`attnkit.Inversion`) captioned by ``prompts[0]``, DDIM-inverted at ``inversion_guidance`` (the
    transfer notebook's 2) and followed along its trajectory; the transfer notebook pairs it with
    ``shift=math.log(2)``. ``scale``/``shift``: score scale and log-shift on the reference's columns;
    ``adain_*``: which of queries/keys/values are normalised to the reference's statistics;
    ``share_group_norm`` (None: the model's ``style_group_norm`` where its ``attnkit.json`` sets one, as the
    bundled model's does (off, measured), else the official notebooks' rule: on for SD1.x/2.x, off for SDXL);
    ``only_self_level`` (fraction of layers left unshared, the official rule) or ``layers`` (explicit); ``share_steps``: the steps that share (default all).
    On MM-DiT pipelines (SD3, FLUX) the joint layers' image blocks share; ``places=("single",)`` keeps sharing to
    FLUX's single-stream blocks (AlignedGen's choice) and ``shift_positions`` moves the reference's RoPE
    positions beside the image so its keys do not collide with the targets' (FLUX).
    """
    prompt_list = _prompts(prompts, "style_aligned", style)
    if share_group_norm is None:  # the model's own choice where its attnkit.json makes one (the bundled model)
        share_group_norm = defaults_for(pipe).style_group_norm
    shared = StyleAligned(references, scale=scale, shift=shift, adain_queries=adain_queries,
                          adain_keys=adain_keys, adain_values=adain_values, share_group_norm=share_group_norm,
                          only_self_level=only_self_level, layers=layers, steps=share_steps, places=places,
                          shift_positions=shift_positions)
    if share_group_norm is None:  # on for SD1.x/2.x, off for SDXL; MM-DiT transformers have no group norms
        denoiser = getattr(pipe, "unet", None) or getattr(pipe, "transformer", None)
        share_group_norm = (getattr(getattr(denoiser, "config", None), "addition_embed_type", None) != "text_time"
                            and any(isinstance(m, torch.nn.GroupNorm) for m in denoiser.modules()))
    settings = {"style": style, "scale": scale, "shift": shift, "adain_queries": adain_queries,
                "adain_keys": adain_keys, "adain_values": adain_values, "share_group_norm": share_group_norm,
                "only_self_level": only_self_level, "layers": list(layers) if layers is not None else None,
                "share_steps": share_steps, "places": list(places), "shift_positions": shift_positions}
    return _run(pipe, prompt_list, shared, controllers, method="style_aligned", seed=seed, shared_noise=False,
                reference=reference, inversion_guidance=inversion_guidance, steps=steps, guidance=guidance,
                height=height, width=width, progress=progress, settings=settings)


def mutual_edit(pipe: Any, source: str, targets: str | Sequence[str], *, seed: int = 0,
                start_step: int | float = 4, start_layer: int | float = 0.625,
                layers: Sequence[int | str] | None = None, mask_words: str | Sequence[str] | None = None,
                mask_threshold: float = 0.1, reference: Any = None, steps: int | None = None,
                guidance: float | None = None, height: int | None = None, width: int | None = None,
                inversion_guidance: float = 1.0, controllers: Sequence[Controller] = (),
                progress: bool = True) -> SharedResult:
    """Edit ``source``'s image into each of ``targets`` keeping its appearance: MasaCtrl's mutual
    self-attention (Cao et al., ICCV 2023; :class:`~attnkit.controllers.shared.MutualSelfAttention`).

    Usage: ``mutual_edit(pipe, "a sitting cat", "a running cat", seed=4).images[1]``

    Every prompt starts from the same noise (as the official code). From ``start_step`` (step index or fraction;
    official 4) and self-attention layer ``start_layer`` (number or fraction; default 0.625 = layer 10 of 16,
    the official SD1.x setting) on, the targets' queries read the source's keys and values only.
    ``mask_words`` (one word for all prompts, or one per prompt) turns on the mask-guided variant, with masks
    from the words' cross-attention thresholded at ``mask_threshold``. ``reference``: a real source image
    (``source`` is its caption; the official notebook inverts with an empty caption, ``""``).
    """
    target_list = [targets] if isinstance(targets, str) else list(targets)
    prompt_list = _prompts([source, *target_list], "mutual_edit", empty_reference=reference is not None)
    if mask_words is None:
        shared: MutualSelfAttention = MutualSelfAttention(0, start_step=start_step, start_layer=start_layer,
                                                          layers=layers)
    else:
        shared = MaskedMutualSelfAttention(prompt_list, pipe.tokenizer, mask_words, threshold=mask_threshold,
                                           start_step=start_step, start_layer=start_layer, layers=layers)
    settings = {"start_step": start_step, "start_layer": start_layer,
                "layers": list(layers) if layers is not None else None,
                "mask_words": mask_words if mask_words is None or isinstance(mask_words, str) else list(mask_words),
                "mask_threshold": mask_threshold if mask_words is not None else None}
    return _run(pipe, prompt_list, shared, controllers, method="mutual_edit", seed=seed, shared_noise=True,
                reference=reference, inversion_guidance=inversion_guidance, steps=steps, guidance=guidance,
                height=height, width=width, progress=progress, settings=settings)


def consistent(pipe: Any, prompts: Sequence[str], *, subject: str | Sequence[str], seed: int = 0,
               references: int | Sequence[int] = (0,), mask_dropout: float = 0.5, start_step: int | float = 1,
               places: Sequence[str] = ("up",), layers: Sequence[int | str] | None = None, window: int = 20,
               reference: Any = None, steps: int | None = None, guidance: float | None = None,
               height: int | None = None, width: int | None = None, inversion_guidance: float = 1.0,
               controllers: Sequence[Controller] = (), progress: bool = True) -> SharedResult:
    """Keep one subject the same across prompts: ConsiStory's subject-driven shared attention (Tewel et al.,
    SIGGRAPH 2024; :class:`~attnkit.controllers.shared.SubjectShare`).

    Usage: ``consistent(pipe, ["a dog in a field", "a dog on a sofa"], subject="dog", seed=2).images``

    ``subject`` must be a word of every prompt (or give one word per prompt). The targets see the reference's
    keys and values inside the subject's mask only (from the subject word's cross-attention), so the subject
    is shared while everything else follows each prompt; ``mask_dropout`` (official 0.5) drops mask pixels at
    random for layout diversity. Each prompt starts from its own noise (``seed + i``). Sharing starts at
    ``start_step`` in the ``places`` of the UNet (official: the decoder, from step 1).
    """
    prompt_list = _prompts(prompts, "consistent")
    shared = SubjectShare(prompt_list, pipe.tokenizer, subject, references, mask_dropout=mask_dropout,
                          start_step=start_step, places=places, layers=layers, window=window, seed=seed)
    settings = {"subject": subject if isinstance(subject, str) else list(subject), "mask_dropout": mask_dropout,
                "start_step": start_step, "places": list(places), "window": window,
                "layers": list(layers) if layers is not None else None}
    return _run(pipe, prompt_list, shared, controllers, method="consistent", seed=seed, shared_noise=False,
                reference=reference, inversion_guidance=inversion_guidance, steps=steps, guidance=guidance,
                height=height, width=width, progress=progress, settings=settings)


__all__ = ["FollowTrajectory", "SharedResult", "consistent", "mutual_edit", "style_aligned"]

"""Rectified-flow inversion: real images back to noise on flow-matching models (SD3/SD3.5, FLUX.1), and back.

    inv = attnkit.rf_invert(pipe, "photo.png", "a red circle on a white background", solver="fireflow")
    image = attnkit.rf_reconstruct(pipe, inv).images[0]                  # the photo again
    edited = attnkit.rf_edit(pipe, inv, "a blue circle on a white background").images[1]

A flow-matching model predicts the velocity ``v(x, σ)`` of the straight path ``x_σ = (1 − σ)·x_0 + σ·ε``
(diffusers' ``FlowMatchEulerDiscreteScheduler``; ``σ = 1`` is noise). Sampling integrates ``dx/dσ = v`` from
``σ = 1`` to 0; inversion integrates the same ODE the other way, from the encoded image (``σ = 0``) up to noise,
on the pipeline's own schedule (its shift, FLUX's resolution-dependent ``mu``) reversed. Three solvers, each
usable in both directions (:func:`solve`):

* ``"euler"``: ``x ← x + h·v(x, σ)``; one model evaluation per step. What the pipeline's sampler does.
* ``"rf-solver"`` (Wang et al., "Taming Rectified Flow for Inversion and Editing", 2024): a second-order Taylor
  step ``x ← x + h·v + ½h²·v'`` with ``v'`` from a finite difference at the half step
  (``(v(x + h/2·v, σ + h/2) − v) / (h/2)``); two evaluations per step.
* ``"fireflow"`` (Deng et al., "FireFlow: Fast Inversion of Rectified Flow for Image Semantic Editing", 2024):
  the midpoint step ``x ← x + h·v(x + h/2·v̂, σ + h/2)`` where ``v̂`` is the previous step's midpoint
  velocity (reused, not recomputed); one evaluation per step plus one at the start.

At an equal budget of model evaluations ``E`` (what costs time): Euler runs ``E`` steps, FireFlow ``E − 1`` and
RF-Solver ``E / 2`` (:func:`steps_for`). Both second-order solvers are exact for velocity fields linear in σ
along the path, where Euler errs by ``O(h)``.

Regeneration runs attnkit's own loop with the chosen solver (the pipeline's ``__call__`` only has Euler), inside
:func:`attnkit.control`, so attention controllers compose with it (``rf_edit(pipe, inv, target, store)``).
For UNet models (SD1.x/2.x, SDXL) use :func:`attnkit.invert` (DDIM, null-text).
"""

from __future__ import annotations

import math
import os
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import torch
from PIL import Image

from attnkit.engine import AttnkitError, Controller, Layout, control
from attnkit.images import Crop, CropMode, fit_image, load_image
from attnkit.inversion_files import read_folder, write_folder

Solver = Literal["euler", "rf-solver", "fireflow"]
SOLVERS: tuple[str, ...] = ("euler", "rf-solver", "fireflow")
Velocity = Callable[[torch.Tensor, float], torch.Tensor]
INVERSION_GUIDANCE = 1.0  # RF-Solver's and FireFlow's inversions run the conditional velocity alone (guidance 1)
FORMAT, VERSION = "attnkit-flow-inversion", 1


# -- solvers ------------------------------------------------------------------------------------------------
def check_solver(solver: str) -> str:
    if solver not in SOLVERS:
        raise AttnkitError(f"unknown solver {solver!r}: use one of {', '.join(SOLVERS)}")
    return solver


def evaluations_for(solver: str, steps: int) -> int:
    """Model evaluations ``solver`` spends on ``steps`` steps: Euler ``steps``, RF-Solver ``2·steps``, FireFlow
    ``steps + 1``. ``evaluations_for("fireflow", 8)  # 9``"""
    check_solver(solver)
    return {"euler": steps, "rf-solver": 2 * steps, "fireflow": steps + 1}[solver]


def steps_for(solver: str, evaluations: int) -> int:
    """The step count that spends exactly ``evaluations`` model evaluations (the inverse of
    :func:`evaluations_for`); an error where no step count does. ``steps_for("rf-solver", 8)  # 4``"""
    check_solver(solver)
    steps = {"euler": evaluations, "rf-solver": evaluations // 2, "fireflow": evaluations - 1}[solver]
    if steps < 1 or evaluations_for(solver, steps) != evaluations:
        raise AttnkitError(f"{solver} cannot spend exactly {evaluations} model evaluations (it spends "
                           f"{evaluations_for(solver, 1)} on one step, then "
                           f"{evaluations_for(solver, 2) - evaluations_for(solver, 1)} per step): pick another budget")
    return steps


def solve(velocity: Velocity, x: torch.Tensor, sigmas: Sequence[float], solver: str = "euler", *,
          step_start: Callable[[int], None] | None = None,
          step_end: Callable[[int, torch.Tensor], torch.Tensor | None] | None = None) -> tuple[torch.Tensor, list]:
    """Integrate ``dx/dσ = velocity(x, σ)`` along ``sigmas`` (increasing: inversion; decreasing: sampling).

    Returns the final ``x`` and the trajectory ``[x at sigmas[0], ..., x at sigmas[-1]]``. ``step_start(i)``
    runs before the evaluations of step ``i``; ``step_end(i, x)`` after it, and may return a replacement ``x``
    (a controller's blended latents). Works on any tensor and velocity function, e.g. a toy linear field::

        x1, path = solve(lambda x, s: -x, torch.ones(3), [1.0, 0.5, 0.0], "rf-solver")
    """
    check_solver(solver)
    sigmas = [float(s) for s in sigmas]
    trajectory = [x]
    reused: torch.Tensor | None = None  # FireFlow: the previous step's midpoint velocity
    for i, (sigma, nxt) in enumerate(zip(sigmas[:-1], sigmas[1:], strict=True)):
        if step_start is not None:
            step_start(i)
        h = nxt - sigma
        if solver == "euler":
            x = x + h * velocity(x, sigma)
        elif solver == "rf-solver":
            v = velocity(x, sigma)
            v_mid = velocity(x + 0.5 * h * v, sigma + 0.5 * h)
            derivative = (v_mid - v) / (0.5 * h)  # dv/dσ along the path, by a finite difference
            x = x + h * v + 0.5 * h * h * derivative
        else:  # fireflow
            v = velocity(x, sigma) if reused is None else reused
            reused = velocity(x + 0.5 * h * v, sigma + 0.5 * h)
            x = x + h * reused
        if step_end is not None:
            replaced = step_end(i, x)
            if replaced is not None:
                x = replaced
        trajectory.append(x)
    return x, trajectory


# -- the pipeline's velocity ------------------------------------------------------------------------------------
def flow_family(pipe: Any, what: str = "rectified-flow inversion") -> str:
    """``"sd3"`` or ``"flux"``, or a clear error (a UNet pipeline: use attnkit.invert)."""
    from diffusers import FlowMatchEulerDiscreteScheduler

    from attnkit.adapters import adapter_for

    family = adapter_for(pipe).family
    if family == "unet":
        raise AttnkitError(f"{what} works on flow-matching transformer pipelines (StableDiffusion3Pipeline, "
                           f"FluxPipeline); {type(pipe).__name__} is a UNet diffusion pipeline: invert it with "
                           "attnkit.invert(pipe, image, prompt) (DDIM or null-text inversion) instead")
    if not isinstance(pipe.scheduler, FlowMatchEulerDiscreteScheduler):
        raise AttnkitError(f"{what} follows the flow-matching ODE of FlowMatchEulerDiscreteScheduler; the pipeline "
                           f"has {type(pipe.scheduler).__name__}: load the model with its own scheduler")
    return family


def schedule(pipe: Any, steps: int, height: int, width: int) -> list[float]:
    """The sampling sigmas ``[σ_0 = 1, ..., σ_{N−1}, 0]`` the pipeline's own ``__call__`` uses for ``steps``
    steps at this size (SD3: the scheduler's shift; FLUX: ``linspace(1, 1/N, N)`` with its resolution-dependent
    ``mu``), computed on a copy of its scheduler so the pipeline is untouched."""
    import numpy as np
    from diffusers.pipelines.flux.pipeline_flux import calculate_shift

    family = flow_family(pipe)
    scheduler = type(pipe.scheduler).from_config(pipe.scheduler.config)
    config = scheduler.config
    factor = int(getattr(pipe, "vae_scale_factor", 8))
    kwargs: dict[str, Any] = {}
    if family == "flux":
        tokens = (height // (factor * 2)) * (width // (factor * 2))
        kwargs["sigmas"] = np.linspace(1.0, 1 / steps, steps)
        if getattr(config, "use_flow_sigmas", False):
            kwargs.pop("sigmas")
        kwargs["mu"] = calculate_shift(tokens, config.get("base_image_seq_len", 256),
                                       config.get("max_image_seq_len", 4096), config.get("base_shift", 0.5),
                                       config.get("max_shift", 1.15))
    elif config.get("use_dynamic_shifting", False):
        patch = int(pipe.transformer.config.patch_size)
        tokens = (height // factor // patch) * (width // factor // patch)
        kwargs["mu"] = calculate_shift(tokens, config.get("base_image_seq_len", 256),
                                       config.get("max_image_seq_len", 4096), config.get("base_shift", 0.5),
                                       config.get("max_shift", 1.16))
    scheduler.set_timesteps(steps, device="cpu", **kwargs)
    return [float(s) for s in scheduler.sigmas]


class FlowVelocity:
    """The guided velocity of a flow pipeline for a batch of prompts: ``v = velocity(x, σ)`` on latent grids
    ``(prompts, C, h, w)`` (FLUX's packing and position ids handled here). ``guidance`` is one scale or one per
    prompt: SD3 runs classifier-free guidance (a doubled batch) where any scale exceeds 1; FLUX passes it as
    its guidance embedding. ``calls`` counts the transformer passes (one per evaluation of the whole batch).
    ``max_sequence_length`` (T5 tokens) defaults to the model's own (``attnkit.defaults_for``), else the
    pipeline's.

    ``velocity = FlowVelocity(pipe, ["a red circle"], guidance=1.0, height=64, width=64)``
    """

    def __init__(self, pipe: Any, prompts: Sequence[str], guidance: float | Sequence[float], height: int,
                 width: int, max_sequence_length: int | None = None) -> None:
        self.pipe = pipe
        self.family = flow_family(pipe)
        self.model = pipe.transformer
        self.prompts = list(prompts)
        scales = [float(guidance)] * len(self.prompts) if isinstance(guidance, (int, float)) else \
            [float(g) for g in guidance]
        if len(scales) != len(self.prompts):
            raise AttnkitError(f"{len(scales)} guidance scales for {len(self.prompts)} prompts")
        for g in scales:
            if not math.isfinite(g):
                raise AttnkitError(f"guidance {g}: give a finite guidance scale")
        self.guidance = scales
        self.height, self.width = height, width
        self.calls = 0
        device, dtype = self.model.device, self.model.dtype
        if max_sequence_length is None:  # the model's own (attnkit.json: the bundled MM-DiT samples with 0)
            from attnkit.models import defaults_for

            max_sequence_length = getattr(defaults_for(pipe), "max_sequence_length", None)
        with torch.no_grad():
            if self.family == "sd3":
                self.cfg = any(g > 1.0 for g in scales)
                kwargs = {} if max_sequence_length is None else {"max_sequence_length": max_sequence_length}
                embeds, negative, pooled, negative_pooled = pipe.encode_prompt(
                    prompt=self.prompts, prompt_2=None, prompt_3=None, device=device,
                    do_classifier_free_guidance=self.cfg, **kwargs)
                if self.cfg:
                    embeds, pooled = torch.cat([negative, embeds]), torch.cat([negative_pooled, pooled])
                self.embeds, self.pooled = embeds.to(dtype), pooled.to(dtype)
                self.scales = torch.tensor(scales, device=device, dtype=torch.float32).view(-1, 1, 1, 1)
            else:
                self.cfg = False
                kwargs = {} if max_sequence_length is None else {"max_sequence_length": max_sequence_length}
                embeds, pooled, text_ids = pipe.encode_prompt(prompt=self.prompts, prompt_2=None, device=device,
                                                              **kwargs)
                self.embeds, self.pooled, self.text_ids = embeds.to(dtype), pooled.to(dtype), text_ids
                factor = int(getattr(pipe, "vae_scale_factor", 8))
                self.grid = (height // (factor * 2), width // (factor * 2))
                self.image_ids = pipe._prepare_latent_image_ids(len(self.prompts), self.grid[0], self.grid[1],
                                                                device, dtype)
                self.guidance_embed = None
                if getattr(self.model.config, "guidance_embeds", False):
                    self.guidance_embed = torch.tensor(scales, device=device, dtype=torch.float32)

    @property
    def layout(self) -> Layout:
        """The batch layout of this velocity's transformer calls (for :func:`attnkit.control`)."""
        return Layout(prompts=len(self.prompts), cfg=self.cfg)

    @torch.no_grad()
    def __call__(self, x: torch.Tensor, sigma: float) -> torch.Tensor:
        if x.shape[0] != len(self.prompts):
            raise AttnkitError(f"latents have {x.shape[0]} rows for {len(self.prompts)} prompts")
        self.calls += 1
        model = self.model
        dtype = model.dtype
        if self.family == "sd3":
            rows = torch.cat([x, x]) if self.cfg else x
            t = torch.full((rows.shape[0],), sigma * 1000.0, device=model.device, dtype=dtype)
            out = model(hidden_states=rows.to(dtype), timestep=t, encoder_hidden_states=self.embeds,
                        pooled_projections=self.pooled, return_dict=False)[0].float()
            if not self.cfg:
                return out
            uncond, cond = out.chunk(2)
            return uncond + self.scales * (cond - uncond)
        from attnkit.adapters.flux import pack, unpack

        t = torch.full((x.shape[0],), sigma, device=model.device, dtype=dtype)
        out = model(hidden_states=pack(x).to(dtype), timestep=t, guidance=self.guidance_embed,
                    pooled_projections=self.pooled, encoder_hidden_states=self.embeds, txt_ids=self.text_ids,
                    img_ids=self.image_ids, return_dict=False)[0].float()
        return unpack(out, self.grid)


# -- image <-> latents ------------------------------------------------------------------------------------
@torch.no_grad()
def encode(pipe: Any, image: Image.Image) -> torch.Tensor:
    """The latent grid (1, C, h, w) float32 of a fitted RGB image: ``(mean − shift) · scale``, the inverse of
    :func:`attnkit.sampling.decode_latents` (SD3's and FLUX's autoencoders shift their latents)."""
    from attnkit.inversion import encode_image

    return encode_image(pipe, image)


def _size(pipe: Any) -> tuple[int, int]:
    from attnkit.models import defaults_for

    d = defaults_for(pipe)
    return d.height, d.width


# -- results --------------------------------------------------------------------------------------------------
@dataclass
class FlowInversion:
    """A real image inverted on a flow model: ``latents`` (steps + 1, C, h, w) float32 from the encoded image
    (``σ = 0``) to the noise it maps to (``σ = 1``), on ``sigmas`` (the sampling schedule, descending, ending
    at 0). ``evaluations``: model evaluations the inversion spent."""

    prompt: str
    solver: str
    sigmas: list[float]
    latents: torch.Tensor
    guidance: float
    evaluations: int
    crop: Crop
    image: Image.Image | None = field(default=None, repr=False)
    seconds: float = 0.0

    @property
    def steps(self) -> int:
        return len(self.sigmas) - 1

    @property
    def noise(self) -> torch.Tensor:
        """The inverted noise (1, C, h, w): where regeneration starts."""
        return self.latents[-1:]

    @property
    def size(self) -> tuple[int, int]:
        """(width, height) of the fitted image."""
        return self.crop.size

    def at_step(self, step: int) -> torch.Tensor:
        """The inverted latent (1, C, h, w) at the noise level sampling reaches after ``step`` steps."""
        return self.latents[self.steps - 1 - step: self.steps - step]

    def record(self) -> dict[str, Any]:
        return {"format": FORMAT, "version": VERSION, "method": "rf-inversion", "prompt": self.prompt,
                "solver": self.solver, "steps": self.steps, "sigmas": self.sigmas, "guidance": self.guidance,
                "evaluations": self.evaluations, "crop": self.crop.to_dict(), "seconds": round(self.seconds, 3),
                "latent_shape": list(self.latents.shape)}

    def save(self, directory: str | os.PathLike, overwrite: bool = False) -> Path:
        """Write ``inversion.safetensors`` (the trajectory), ``inversion.json`` and ``image.png`` into
        ``directory``, through a temporary folder so a failure leaves nothing partial. ``inv.save("out/photo")``"""
        return write_folder(directory, {"latents": self.latents}, self.record(), self.image, overwrite)

    @classmethod
    def load(cls, directory: str | os.PathLike) -> FlowInversion:
        """Read an inversion written by :meth:`save`. ``inv = FlowInversion.load("out/photo")``"""
        data, tensors, image = read_folder(directory, FORMAT, VERSION,
                                           "FlowInversion.save or `attnkit rf-invert --out`",
                                           "a UNet inversion loads with attnkit.Inversion.load")
        return cls(prompt=data["prompt"], solver=data["solver"], sigmas=[float(s) for s in data["sigmas"]],
                   latents=tensors["latents"], guidance=float(data["guidance"]),
                   evaluations=int(data["evaluations"]), crop=Crop.from_dict(data["crop"]), image=image,
                   seconds=float(data.get("seconds", 0.0)))


@dataclass
class FlowGeneration:
    """Images regenerated from a :class:`FlowInversion` (prompt order), their final latents, the prompts and
    the model evaluations the regeneration spent."""

    images: list[Any]
    latents: torch.Tensor
    prompts: list[str]
    evaluations: int
    settings: dict[str, Any] = field(default_factory=dict)

    @property
    def source(self) -> Any:
        return self.images[0]

    @property
    def edits(self) -> list[Any]:
        return self.images[1:]


# -- the entry points ---------------------------------------------------------------------------------------------
def _check_prompt(pipe: Any, prompt: Any) -> str:
    from attnkit.adapters import text_tokenizer
    from attnkit.tokens import check_prompt_length

    if not isinstance(prompt, str):
        raise AttnkitError(f"the prompt must be a string, got {type(prompt).__name__}")
    check_prompt_length(text_tokenizer(pipe), prompt)
    return prompt


def _progress(total: int, progress: bool, desc: str) -> Any:
    from tqdm.auto import tqdm

    return tqdm(total=total, disable=not progress, desc=desc, leave=False)


def rf_invert(pipe: Any, image: Any, prompt: str, *, steps: int | None = None, solver: Solver = "fireflow",
              guidance: float = INVERSION_GUIDANCE, crop: CropMode = "center",
              controllers: Sequence[Controller] = (), progress: bool = True) -> FlowInversion:
    """Invert a real image (path, PIL image or array) captioned ``prompt`` on a flow-matching pipeline.

    Usage: ``inv = rf_invert(pipe, "photo.png", "a red circle", solver="rf-solver", steps=14)``

    ``steps`` defaults to the model's own (``attnkit.defaults_for``); ``solver``: ``"fireflow"`` (default: on
    the shapes model it reconstructs 12 dB better than Euler at the same cost, ``benchmarks/mmdit_methods.py``),
    ``"rf-solver"`` or ``"euler"`` (module docstring); ``guidance``: the inversion's guidance (1: the conditional velocity
    alone, as RF-Solver and FireFlow invert; on FLUX the value of its guidance embedding). The image is fitted
    to the model's size (``crop``). ``controllers`` run on the inversion's transformer calls (e.g. a store).
    """
    from attnkit.settings import check_guidance, check_steps
    from attnkit.threads import apply_threads

    flow_family(pipe)
    check_solver(solver)
    _check_prompt(pipe, prompt)
    from attnkit.models import defaults_for

    steps = check_steps(defaults_for(pipe).num_inference_steps if steps is None else steps)
    guidance = check_guidance(guidance)
    height, width = _size(pipe)
    fitted, box = fit_image(load_image(image), width, height, mode=crop)
    apply_threads()
    start = time.perf_counter()
    sigmas = schedule(pipe, steps, height, width)
    velocity = FlowVelocity(pipe, [prompt], guidance, height, width)
    x0 = encode(pipe, fitted).to(pipe.transformer.device)
    bar = _progress(steps, progress, "rf-invert")
    try:
        with control(pipe, *controllers, layout=velocity.layout) as ctl:
            def start_step(i: int) -> None:
                ctl.set_step(steps - 1 - i, steps)  # inversion step i undoes sampling step N - 1 - i

            def end_step(i: int, x: torch.Tensor) -> None:
                bar.update()

            _, path = solve(velocity, x0, sigmas[::-1], solver, step_start=start_step, step_end=end_step)
    finally:
        bar.close()
    return FlowInversion(prompt=prompt, solver=solver, sigmas=sigmas, latents=torch.cat(path).float().cpu(),
                         guidance=guidance, evaluations=velocity.calls, crop=box, image=fitted,
                         seconds=time.perf_counter() - start)


def rf_generate(pipe: Any, inversion: FlowInversion, prompts: str | Sequence[str] | None = None,
                *controllers: Controller, solver: str | None = None, guidance: float | Sequence[float] | None = None,
                follow_source: bool = False, progress: bool = True) -> FlowGeneration:
    """Sample ``prompts`` (default: the inversion's own) from the inverted noise with ``solver`` (default the
    inversion's) on the inversion's schedule, under ``controllers``; every prompt starts from the same noise.

    ``follow_source``: row 0 is put back on the inversion trajectory after every step (it then reproduces the
    image exactly, and controllers that copy its attention read the real image's). ``guidance`` defaults to
    the inversion's. ``rf_generate(pipe, inv).images[0]`` is the reconstruction.
    """
    from attnkit.sampling import decode_latents, normalize_prompts
    from attnkit.threads import apply_threads

    flow_family(pipe)
    if not isinstance(inversion, FlowInversion):
        raise AttnkitError(f"expected an attnkit FlowInversion (from attnkit.rf_invert), got "
                           f"{type(inversion).__name__}; a UNet Inversion regenerates with attnkit.inversion")
    prompt_list = normalize_prompts(inversion.prompt if prompts is None else
                                    (prompts if isinstance(prompts, str) else list(prompts)))
    for p in prompt_list:
        _check_prompt(pipe, p)
    solver = check_solver(inversion.solver if solver is None else solver)
    for c in controllers:
        if not isinstance(c, Controller):
            raise AttnkitError(f"{c!r} is not an attnkit Controller; controllers subclass attnkit.Controller")
    channels = int(pipe.vae.config.latent_channels)
    if inversion.latents.shape[1] != channels:
        raise AttnkitError(f"the inversion has {inversion.latents.shape[1]} latent channels, this pipeline's "
                           f"autoencoder {channels}: invert the image with this pipeline")
    width, height = inversion.size
    apply_threads()
    velocity = FlowVelocity(pipe, prompt_list, inversion.guidance if guidance is None else guidance, height, width)
    steps = inversion.steps
    device = pipe.transformer.device
    x = inversion.noise.to(device).expand(len(prompt_list), -1, -1, -1).clone()
    bar = _progress(steps, progress, "rf-generate")
    try:
        with control(pipe, *controllers, layout=velocity.layout) as ctl:
            adapter = ctl.adapter

            def start_step(i: int) -> None:
                ctl.set_step(i, steps)

            def end_step(i: int, latents: torch.Tensor) -> torch.Tensor | None:
                bar.update()
                changed = None
                if follow_source:
                    changed = latents.clone()
                    changed[:1] = inversion.at_step(i).to(latents)
                tensors = {"latents": adapter.grid_to_latents(changed if changed is not None else latents,
                                                              ctl.state)}
                updates = ctl.callback(pipe, i, None, tensors)
                if "latents" in updates:
                    return adapter.latents_to_grid(updates["latents"], ctl.state).float()
                return changed

            x, _ = solve(velocity, x, inversion.sigmas, solver, step_start=start_step, step_end=end_step)
    finally:
        bar.close()
    images = decode_latents(pipe, x.to(pipe.vae.dtype))
    return FlowGeneration(images=images, latents=x.cpu(), prompts=prompt_list, evaluations=velocity.calls,
                          settings={"solver": solver, "steps": steps, "follow_source": follow_source,
                                    "guidance": velocity.guidance})


def rf_reconstruct(pipe: Any, inversion: FlowInversion, *, solver: str | None = None, progress: bool = True
                   ) -> FlowGeneration:
    """Regenerate the inverted image from its noise with the inversion's prompt, guidance and solver.
    ``rf_reconstruct(pipe, inv).images[0]``"""
    return rf_generate(pipe, inversion, None, solver=solver, progress=progress)


def rf_edit(pipe: Any, inversion: FlowInversion, targets: str | Sequence[str], *controllers: Controller,
            solver: str | None = None, guidance: float | None = None, follow_source: bool = True,
            progress: bool = True) -> FlowGeneration:
    """Edit an inverted image: the batch ``[source prompt, *targets]`` regenerated from its noise; the source row
    follows the inversion (``follow_source``) so attention controllers (Prompt-to-Prompt's ``Replace``, a
    store, ...) see the real image's attention in row 0. ``images[0]`` is the source, ``images[1:]`` the edits.

    Usage: ``rf_edit(pipe, inv, "a blue circle on a white background").edits[0]``
    """
    target_list = [targets] if isinstance(targets, str) else list(targets)
    if not target_list:
        raise AttnkitError("no target prompt given: pass the edited caption, e.g. 'a blue circle'")
    return rf_generate(pipe, inversion, [inversion.prompt, *target_list], *controllers, solver=solver,
                       guidance=guidance, follow_source=follow_source, progress=progress)


__all__ = ["FlowGeneration", "FlowInversion", "FlowVelocity", "SOLVERS", "evaluations_for", "rf_edit",
           "rf_generate", "rf_invert", "rf_reconstruct", "schedule", "solve", "steps_for"]

"""Edit-friendly DDPM inversion, and DDPM sampling that keeps its noise: one record (:class:`Trajectory`) for both.

    traj = attnkit.ddpm_inversion.ddpm_invert(pipe, "photo.png", "a photo of a cat")  # a real image
    gen = attnkit.ddpm_inversion.ddpm_generate(pipe, "a red circle", seed=1)          # a generated one
    image = attnkit.ddpm_inversion.ddpm_sample(pipe, traj, "a photo of a dog", skip=32)

* **Edit-friendly DDPM inversion** (Huberman-Spiegelglas, Kulikov and Michaeli, CVPR 2024; the inversion of
  Cross-Image Attention): draw every noisy latent independently from the encoded image,
  ``x_t = √ᾱ_t·x_0 + √(1 − ᾱ_t)·ε_t``, then solve each DDPM step for the noise map that lands on the next one,
  ``z_t = (x_{t−1} − μ_t(x_t)) / σ_t``. Sampling with the same prompt and guidance and these ``z`` retraces the
  latents exactly; the ``z`` carry the image's structure, so sampling another prompt with them keeps it.
  Official defaults (``utils/ddpm_inversion.py`` of garibida/cross-image-attention): 100 steps, guidance 3.5 with
  the empty prompt as the unconditional one, η = 1; the last step's noise is set to zero, as there.
* **Sampling that records its noise** (:func:`ddpm_generate`): a plain DDPM (η = 1) generation whose ``x_t`` and
  ``z_t`` are kept, so a generated image is described exactly like an inverted one, with no inversion.
* :func:`from_inversion` turns attnkit's DDIM inversion (:func:`attnkit.invert`) into the same record: its
  latents, no noise, η = 0.

One step of either direction (:func:`ddpm_step`) is the DDIM-family update of ``DDIMScheduler.step`` with
``σ_t = η·√((1 − ᾱ_{t−1})/(1 − ᾱ_t)·(1 − ᾱ_t/ᾱ_{t−1}))``, written out here for epsilon-, v- and sample-prediction
models. (The official code scales the direction term by ``√(1 − ᾱ_{t−1} − η·σ²)``; the two agree at its η = 1.)
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass, field
from typing import Any

import torch
from PIL import Image

from attnkit.engine import AttnkitError
from attnkit.images import Crop, CropMode, fit_image, load_image
from attnkit.inversion import (
    TextConditioning,
    _alpha,
    _eps_and_x0,
    _guided,
    _previous,
    check_prompt,
    ddim_scheduler,
    encode_image,
    encode_text,
)
from attnkit.sampling import decode_latents

STEPS = 100  # the official number of timesteps
GUIDANCE = 3.5  # the official inversion guidance (cfg_scale_src)
ETA = 1.0


@dataclass
class Trajectory:
    """Latents along a schedule and the noise maps that reproduce them, for one image.

    ``latents``: ``(steps + 1, C, h, w)`` float32: ``latents[i]`` is the latent at ``timesteps[i]`` (index 0 the
    noisiest), ``latents[-1]`` the clean ``x_0``. ``noises``: ``(steps, C, h, w)``: the ``z`` that step ``i``
    adds (scaled by its σ·η); zero where a step adds none. ``guidance`` and ``prompt``: what the trajectory was
    made with (sampling them with :func:`ddpm_sample` retraces it). ``method``: ``"ddpm"`` (edit-friendly
    inversion), ``"generated"`` (:func:`ddpm_generate`) or ``"ddim"`` (:func:`from_inversion`).
    """

    latents: torch.Tensor
    noises: torch.Tensor
    timesteps: list[int]
    eta: float
    prompt: str
    guidance: float
    method: str
    prediction_type: str
    image: Image.Image | None = field(default=None, repr=False)
    crop: Crop | None = None
    seed: int | None = None
    seconds: float = 0.0

    @property
    def steps(self) -> int:
        return len(self.timesteps)

    def start(self, skip: int = 0) -> torch.Tensor:
        """The latent ``(1, C, h, w)`` at ``timesteps[skip]``, where sampling that skips ``skip`` steps starts."""
        return self.latents[skip : skip + 1]

    def record(self) -> dict[str, Any]:
        """The JSON-ready settings (no tensors)."""
        return {"method": self.method, "prompt": self.prompt, "steps": self.steps, "guidance": self.guidance,
                "eta": self.eta, "seed": self.seed, "crop": None if self.crop is None else self.crop.to_dict(),
                "seconds": round(self.seconds, 3)}

    def check_pipeline(self, pipe: Any) -> None:
        """Raise a clear error unless ``pipe`` samples this trajectory's schedule (timesteps, prediction type,
        latent channels)."""
        scheduler = ddim_scheduler(pipe, self.steps)
        if scheduler.config.prediction_type != self.prediction_type:
            raise AttnkitError(f"this trajectory was made for a {self.prediction_type} model, the pipeline is "
                               f"{scheduler.config.prediction_type}: invert the image with this pipeline")
        if scheduler.timesteps.tolist() != self.timesteps:
            raise AttnkitError(f"the pipeline's scheduler gives other timesteps for {self.steps} steps than this "
                               "trajectory: invert the image with this pipeline")
        if pipe.unet.config.in_channels != self.latents.shape[1]:
            raise AttnkitError(f"the trajectory has {self.latents.shape[1]} latent channels, the pipeline's UNet "
                               f"takes {pipe.unet.config.in_channels}: invert the image with this pipeline")


# -- the arithmetic -------------------------------------------------------------------------------------------
def variance(scheduler: Any, t: int) -> torch.Tensor:
    """DDPM posterior variance from ``t`` to the previous level: ``(1 − ᾱ')/(1 − ᾱ)·(1 − ᾱ/ᾱ')``."""
    alpha, alpha_prev = _alpha(scheduler, t), _alpha(scheduler, _previous(scheduler, t))
    return (1 - alpha_prev) / (1 - alpha) * (1 - alpha / alpha_prev)


def sigma(scheduler: Any, t: int, eta: float) -> float:
    """The noise scale ``η·√variance`` of the step from ``t``."""
    return float(eta * math.sqrt(max(float(variance(scheduler, t)), 0.0)))


def ddpm_step(scheduler: Any, output: torch.Tensor, t: int, x: torch.Tensor, eta: float = ETA,
              noise: torch.Tensor | None = None) -> torch.Tensor:
    """One step from level ``t`` to the previous level: ``√ᾱ'·x̂_0 + √(1 − ᾱ' − σ²)·ε̂ + σ·z`` with
    ``σ = η·√variance`` (``noise`` None: no ``σ·z`` term, i.e. the step's mean). η = 0 is DDIM's step."""
    eps, x0 = _eps_and_x0(scheduler, output, x, _alpha(scheduler, t))
    if scheduler.config.clip_sample:
        limit = scheduler.config.clip_sample_range
        x0 = x0.clamp(-limit, limit)
    alpha_prev = _alpha(scheduler, _previous(scheduler, t))
    s = sigma(scheduler, t, eta)
    direction = max(float(1 - alpha_prev) - s**2, 0.0) ** 0.5
    out = alpha_prev.sqrt().to(x) * x0 + direction * eps
    if noise is not None and s > 0:
        out = out + s * noise.to(out)
    return out


def _text(pipe: Any, prompt: str, latents: torch.Tensor) -> TextConditioning:
    factor = int(getattr(pipe, "vae_scale_factor", 8))
    return encode_text(pipe, prompt, latents.shape[-2] * factor, latents.shape[-1] * factor)


def _check_eta(eta: float) -> float:
    eta = float(eta)
    if not math.isfinite(eta) or not 0.0 <= eta <= 1.0:
        raise AttnkitError(f"eta={eta}: give a number from 0 (deterministic DDIM) to 1 (DDPM, the paper's)")
    return eta


def _check_guidance(guidance: float, name: str = "guidance") -> float:
    guidance = float(guidance)
    if not math.isfinite(guidance) or guidance < 0:
        raise AttnkitError(f"{name}={guidance}: give a finite guidance scale >= 0 (1 or less: no guidance)")
    return guidance


# -- the three ways in ----------------------------------------------------------------------------------------
@torch.no_grad()
def ddpm_invert(pipe: Any, image: Any, prompt: str, steps: int = STEPS, guidance: float = GUIDANCE,
                eta: float = ETA, seed: int = 0, crop: CropMode = "center", progress: bool = True) -> Trajectory:
    """Edit-friendly DDPM inversion of a real image (path, PIL image or array) described by ``prompt``.

    The image is fitted to the model's size (``crop``); ``seed`` draws the independent noisy latents. The model
    runs with classifier-free guidance ``guidance`` (the pipeline's own unconditional embedding: the empty
    prompt). ``traj = ddpm_invert(pipe, "photo.png", "a photo of a cat")``
    """
    from attnkit.models import defaults_for
    from attnkit.settings import check_steps
    from attnkit.threads import apply_threads

    check_prompt(pipe, prompt)
    steps, guidance, eta = check_steps(steps), _check_guidance(guidance), _check_eta(eta)
    if eta == 0:
        raise AttnkitError("eta=0 has no noise maps to invert for: use attnkit.invert(..., method='ddim') and "
                           "from_inversion() for a deterministic trajectory")
    apply_threads()
    defaults = defaults_for(pipe)
    fitted, box = fit_image(load_image(image), defaults.width, defaults.height, mode=crop)
    start = time.perf_counter()
    scheduler = ddim_scheduler(pipe, steps)
    x0 = encode_image(pipe, fitted).to(pipe.unet.device)
    text = _text(pipe, prompt, x0)
    generator = torch.Generator("cpu").manual_seed(int(seed))
    draws = torch.randn((steps, *x0.shape[1:]), generator=generator, dtype=torch.float32).to(x0.device)
    timesteps = scheduler.timesteps.tolist()
    alphas = torch.stack([_alpha(scheduler, t) for t in timesteps]).to(x0).view(-1, 1, 1, 1)
    latents = torch.cat([alphas.sqrt() * x0 + (1 - alphas).sqrt() * draws, x0])
    noises = torch.zeros_like(draws)
    for i, t in enumerate(_bar(timesteps, "DDPM inversion", progress)):
        s = sigma(scheduler, t, eta)
        if i == steps - 1 or s == 0:
            continue  # the official code leaves the last step's noise at zero
        output = _guided(pipe, text, latents[i : i + 1], t, guidance, text.uncond, text.uncond_pooled)
        mean = ddpm_step(scheduler, output, t, latents[i : i + 1], eta)
        noises[i] = ((latents[i + 1 : i + 2] - mean) / s)[0]
    return Trajectory(latents=latents.cpu(), noises=noises.cpu(), timesteps=timesteps, eta=eta, prompt=prompt,
                      guidance=guidance, method="ddpm", prediction_type=scheduler.config.prediction_type,
                      image=fitted, crop=box, seed=int(seed), seconds=time.perf_counter() - start)


@torch.no_grad()
def ddpm_generate(pipe: Any, prompt: str, steps: int = STEPS, guidance: float | None = None, eta: float = ETA,
                  seed: int = 0, height: int | None = None, width: int | None = None,
                  progress: bool = True) -> Trajectory:
    """Generate ``prompt`` with DDPM sampling (η = 1) and keep every latent and noise map: the record of a
    generated image, exact with no inversion. ``guidance`` defaults to the model's own.
    ``gen = ddpm_generate(pipe, "a red circle on a white background", seed=1); gen.image.save("gen.png")``"""
    from attnkit.engine import shared_latents
    from attnkit.models import defaults_for
    from attnkit.settings import check_size, check_steps
    from attnkit.threads import apply_threads

    check_prompt(pipe, prompt)
    defaults = defaults_for(pipe)
    steps, eta = check_steps(steps), _check_eta(eta)
    guidance = _check_guidance(defaults.guidance_scale if guidance is None else guidance)
    factor = int(getattr(pipe, "vae_scale_factor", 8))
    height = check_size(defaults.height if height is None else height, "height", factor)
    width = check_size(defaults.width if width is None else width, "width", factor)
    apply_threads()
    start = time.perf_counter()
    scheduler = ddim_scheduler(pipe, steps)
    x = shared_latents(pipe, int(seed), 1, height, width, torch.float32)
    text = _text(pipe, prompt, x)
    generator = torch.Generator("cpu").manual_seed(int(seed) + 1)  # the initial noise used seed itself
    noises = torch.randn((steps, *x.shape[1:]), generator=generator, dtype=torch.float32).to(x.device)
    noises[-1] = 0  # as the inversion: the last step adds no noise
    timesteps = scheduler.timesteps.tolist()
    latents = [x]
    for i, t in enumerate(_bar(timesteps, "DDPM sampling", progress)):
        output = _guided(pipe, text, x, t, guidance, text.uncond, text.uncond_pooled)
        x = ddpm_step(scheduler, output, t, x, eta, noises[i : i + 1])
        latents.append(x)
    if eta == 0:
        noises.zero_()
    image = decode_latents(pipe, x)[0]
    return Trajectory(latents=torch.cat(latents).cpu(), noises=noises.cpu(), timesteps=timesteps, eta=eta,
                      prompt=prompt, guidance=guidance, method="generated",
                      prediction_type=scheduler.config.prediction_type, image=image, seed=int(seed),
                      seconds=time.perf_counter() - start)


def from_inversion(inversion: Any) -> Trajectory:
    """The :class:`Trajectory` of an :class:`attnkit.Inversion` (DDIM, null-text or negative-prompt): its DDIM
    latents from ``x_T`` to ``x_0``, no noise (η = 0), sampled with guidance 1 by the methods here (the
    per-step unconditional embeddings of null-text have no effect without guidance)."""
    latents = inversion.latents.flip(0).float()  # Inversion keeps x_0 first
    return Trajectory(latents=latents, noises=torch.zeros_like(latents[1:]), timesteps=list(inversion.timesteps),
                      eta=0.0, prompt=inversion.prompt, guidance=float(inversion.inversion_guidance),
                      method="ddim", prediction_type=inversion.prediction_type, image=inversion.image,
                      crop=inversion.crop, seconds=float(sum(inversion.seconds.values())))


def _bar(items: list[int], desc: str, progress: bool) -> Any:
    from tqdm.auto import tqdm

    return tqdm(items, desc=desc, disable=not progress)


@torch.no_grad()
def ddpm_sample_latents(pipe: Any, trajectory: Trajectory, prompt: str | None = None,
                        guidance: float | None = None, skip: int = 0, progress: bool = True) -> torch.Tensor:
    """The final latent (1, C, h, w) of :func:`ddpm_sample` (no decoding)."""
    trajectory.check_pipeline(pipe)
    prompt = trajectory.prompt if prompt is None else prompt
    check_prompt(pipe, prompt)
    guidance = _check_guidance(trajectory.guidance if guidance is None else guidance)
    if isinstance(skip, bool) or not isinstance(skip, int) or not 0 <= skip < trajectory.steps:
        raise AttnkitError(f"skip={skip!r}: give a number of steps from 0 to {trajectory.steps - 1}")
    scheduler = ddim_scheduler(pipe, trajectory.steps)
    device = pipe.unet.device
    x = trajectory.start(skip).to(device)
    text = _text(pipe, prompt, x)
    for i, t in enumerate(_bar(trajectory.timesteps[skip:], "DDPM sampling", progress), start=skip):
        output = _guided(pipe, text, x, t, guidance, text.uncond, text.uncond_pooled)
        x = ddpm_step(scheduler, output, t, x, trajectory.eta, trajectory.noises[i : i + 1].to(device))
    return x


def ddpm_sample(pipe: Any, trajectory: Trajectory, prompt: str | None = None, guidance: float | None = None,
                skip: int = 0, progress: bool = True) -> Image.Image:
    """Sample from ``trajectory``'s latent at ``timesteps[skip]`` with its noise maps: with its own prompt and
    guidance (the defaults) this retraces it; another ``prompt`` is an edit-friendly edit that keeps the
    image's structure. ``ddpm_sample(pipe, traj, "a photo of a dog", skip=32)``"""
    return decode_latents(pipe, ddpm_sample_latents(pipe, trajectory, prompt, guidance, skip, progress))[0]

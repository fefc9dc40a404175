"""Real-image inversion: DDIM inversion, null-text inversion and negative-prompt inversion.

    inv = attnkit.invert(pipe, "photo.png", "a red circle on a white background", method="null-text")
    image = attnkit.inversion.reconstruct(pipe, inv)            # through the pipeline's own loop
    inv.save("out/photo"); inv = Inversion.load("out/photo")     # safetensors + JSON (crop included)

* **DDIM inversion** runs the deterministic DDIM update backwards with the conditional prompt only (guidance 1),
  from the encoded image ``x_0`` to ``x_T``: ``steps + 1`` latents.
* **Null-text inversion** (Mokady et al., CVPR 2023) then optimises one unconditional ("null") embedding per
  step so that sampling with classifier-free guidance from ``x_T`` retraces that trajectory: Adam with
  ``lr = 1e-2·(1 − i/100)`` at step i, up to 10 inner steps, early stop when the loss drops below
  ``1e-5 + i·2e-5`` (:class:`NullTextOptions`). The embedding, the optimiser and the loss stay in float32 even
  when the pipeline runs in float16 (gradients through a half-precision UNet are loss-scaled).
* **Negative-prompt inversion** (Miyake et al., 2023) skips the optimisation: the source prompt's own embedding
  serves as the unconditional one, so guidance cancels and sampling retraces the guidance-1 trajectory.

An :class:`Inversion` plugs into generation: its ``x_T`` is the starting noise, its first unconditional
embedding goes in as ``negative_prompt_embeds`` and :class:`UncondSchedule` swaps in the next step's embedding
after every step (the pipeline re-reads ``prompt_embeds`` from the step callback). DDIM arithmetic is written
out here for both directions and for epsilon-, v- and sample-prediction models.
"""

from __future__ import annotations

import math
import os
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Literal

import torch
import torch.nn.functional as F
from PIL import Image

from attnkit.engine import AttnkitError, Control, Controller
from attnkit.images import Crop, CropMode, fit_image, image_to_tensor, load_image
from attnkit.inversion_files import read_folder, write_folder
from attnkit.sampling import decode_latents, generate, normalize_prompts, vae_precision
from attnkit.tokens import check_prompt_length

Method = Literal["ddim", "null-text", "negative-prompt"]
METHODS: tuple[str, ...] = ("ddim", "null-text", "negative-prompt")
FORMAT = "attnkit-inversion"
VERSION = 1
REAL_IMAGE_SELF_STEPS = 0.5  # self-attention replacement of real-image edits (null-text notebook)
REAL_IMAGE_SELF_RES = 32  # ...on grids of up to 32x32 query pixels (the notebook's 32 ** 2; generated: 16 ** 2)
INVERSION_GUIDANCE = 7.5  # the null-text paper's guidance: the default of every inversion, whatever the model


@dataclass(frozen=True)
class NullTextOptions:
    """Null-text optimisation schedule (defaults: the paper's). Step i uses ``lr·max(0, 1 − i/lr_horizon)``
    and stops its inner loop once the loss is below ``early_stop + i·early_stop_slope``."""

    inner_steps: int = 10
    lr: float = 1e-2
    lr_horizon: float = 100.0
    early_stop: float = 1e-5
    early_stop_slope: float = 2e-5

    def __post_init__(self) -> None:
        if self.inner_steps < 0 or self.lr < 0 or self.lr_horizon <= 0:
            raise AttnkitError(f"invalid null-text options {self}: inner_steps and lr must be >= 0 and "
                               "lr_horizon > 0")


# -- text conditioning for direct UNet calls (SD and SDXL) ------------------------------------------------
@dataclass
class TextConditioning:
    """One prompt's conditioning: token embeddings ``(1, tokens, dim)`` for the prompt and for the
    pipeline's own unconditional input, and SDXL's pooled embeddings + time ids (None for SD1.x/2.x)."""

    cond: torch.Tensor
    uncond: torch.Tensor
    pooled: torch.Tensor | None = None
    uncond_pooled: torch.Tensor | None = None
    time_ids: torch.Tensor | None = None


def is_sdxl(pipe: Any) -> bool:
    """True for pipelines whose UNet takes SDXL's pooled text embeddings and time ids."""
    return getattr(pipe.unet.config, "addition_embed_type", None) == "text_time"


def check_prompt(pipe: Any, prompt: str) -> None:
    """Raise :class:`AttnkitError` when ``prompt`` is not a string or is too long for any of the tokenizers."""
    if not isinstance(prompt, str):
        raise AttnkitError(f"the prompt must be a string, got {type(prompt).__name__}")
    for name in ("tokenizer", "tokenizer_2"):
        tokenizer = getattr(pipe, name, None)
        if tokenizer is not None:
            check_prompt_length(tokenizer, prompt)


@torch.no_grad()
def encode_text(pipe: Any, prompt: str, height: int, width: int) -> TextConditioning:
    """The conditioning ``pipe(prompt)`` would use, via the pipeline's own ``encode_prompt`` (and SDXL's
    ``_get_add_time_ids`` with the default original size = target size, crop (0, 0))."""
    check_prompt(pipe, prompt)
    device = pipe.unet.device
    if not is_sdxl(pipe):
        cond, uncond = pipe.encode_prompt(prompt, device, 1, True)
        return TextConditioning(cond, uncond)
    cond, uncond, pooled, uncond_pooled = pipe.encode_prompt(prompt=prompt, device=device,
                                                             num_images_per_prompt=1,
                                                             do_classifier_free_guidance=True)
    encoder_2 = getattr(pipe, "text_encoder_2", None)
    projection = int(pooled.shape[-1]) if encoder_2 is None else encoder_2.config.projection_dim
    time_ids = pipe._get_add_time_ids((height, width), (0, 0), (height, width), dtype=cond.dtype,
                                      text_encoder_projection_dim=projection).to(device)
    return TextConditioning(cond, uncond, pooled, uncond_pooled, time_ids)


def _predict(pipe: Any, text: TextConditioning, x: torch.Tensor, t: int, embeds: torch.Tensor,
             pooled: torch.Tensor | None) -> torch.Tensor:
    """The UNet's raw output (float32) for latents ``x`` at timestep ``t`` under ``embeds``."""
    unet = pipe.unet
    added = None
    if text.time_ids is not None:
        added = {"text_embeds": pooled.to(unet.device, unet.dtype).expand(x.shape[0], -1),
                 "time_ids": text.time_ids.to(unet.device, unet.dtype).expand(x.shape[0], -1)}
    out = unet(x.to(unet.device, unet.dtype), t, encoder_hidden_states=embeds.to(unet.device, unet.dtype),
               added_cond_kwargs=added, return_dict=False)[0]
    return out.float()


def _guided(pipe: Any, text: TextConditioning, x: torch.Tensor, t: int, guidance: float,
            uncond: torch.Tensor, uncond_pooled: torch.Tensor | None) -> torch.Tensor:
    """Classifier-free-guided model output as the pipeline computes it (no CFG at guidance <= 1)."""
    if guidance <= 1.0:
        return _predict(pipe, text, x, t, text.cond, text.pooled)
    embeds = torch.cat([uncond.to(text.cond), text.cond])
    pooled = None if text.pooled is None else torch.cat([uncond_pooled.to(text.pooled), text.pooled])
    out_u, out_c = _predict(pipe, text, torch.cat([x, x]), t, embeds, pooled).chunk(2)
    return out_u + guidance * (out_c - out_u)


# -- DDIM arithmetic, both directions ---------------------------------------------------------------------
def ddim_scheduler(pipe: Any, steps: int) -> Any:
    """A DDIM scheduler built from ``pipe.scheduler``'s config (same betas, spacing, prediction type) with
    ``steps`` timesteps set. The pipeline's own scheduler is left untouched."""
    from diffusers import DDIMScheduler

    scheduler = DDIMScheduler.from_config(pipe.scheduler.config)
    if scheduler.config.thresholding:
        raise AttnkitError("inversion needs a scheduler without dynamic thresholding: load the pipeline with "
                           "DDIMScheduler.from_config(pipe.scheduler.config, thresholding=False)")
    if scheduler.config.prediction_type not in ("epsilon", "v_prediction", "sample"):
        raise AttnkitError(f"unknown prediction type {scheduler.config.prediction_type!r}")
    if not 1 <= steps <= scheduler.config.num_train_timesteps:
        raise AttnkitError(f"steps must be between 1 and {scheduler.config.num_train_timesteps}, got {steps}")
    scheduler.set_timesteps(steps)
    return scheduler


def _alpha(scheduler: Any, t: int) -> torch.Tensor:
    """ᾱ at timestep ``t``; below 0 the scheduler's final ᾱ (1 or ᾱ_0, per ``set_alpha_to_one``)."""
    return scheduler.alphas_cumprod[t] if t >= 0 else scheduler.final_alpha_cumprod


def _previous(scheduler: Any, t: int) -> int:
    # The same rule as DDIMScheduler.step, so our steps and the pipeline's land on the same noise levels.
    return t - scheduler.config.num_train_timesteps // scheduler.num_inference_steps


def _eps_and_x0(scheduler: Any, output: torch.Tensor, x: torch.Tensor, alpha: torch.Tensor
                ) -> tuple[torch.Tensor, torch.Tensor]:
    """(predicted noise, predicted clean latent) from a model output for latents ``x`` at noise level ᾱ."""
    kind = scheduler.config.prediction_type
    a, b = alpha.sqrt().to(x), (1 - alpha).sqrt().to(x)
    if kind == "epsilon":
        return output, (x - b * output) / a
    if kind == "v_prediction":  # v = √ᾱ·ε − √(1−ᾱ)·x0
        return a * output + b * x, a * x - b * output
    return (x - a * output) / b, output  # "sample": the model predicts x0


def ddim_step(scheduler: Any, output: torch.Tensor, t: int, x: torch.Tensor) -> torch.Tensor:
    """One deterministic DDIM sampling step from level ``t`` to the previous level (eta = 0), as
    ``DDIMScheduler.step`` computes it: ``x' = √ᾱ'·x0 + √(1−ᾱ')·ε``."""
    eps, x0 = _eps_and_x0(scheduler, output, x, _alpha(scheduler, t))
    if scheduler.config.clip_sample:
        limit = scheduler.config.clip_sample_range
        x0 = x0.clamp(-limit, limit)
    alpha_prev = _alpha(scheduler, _previous(scheduler, t))
    return alpha_prev.sqrt().to(x) * x0 + (1 - alpha_prev).sqrt().to(x) * eps


def ddim_inverse_step(scheduler: Any, output: torch.Tensor, t: int, x: torch.Tensor) -> torch.Tensor:
    """One DDIM inversion step: ``x`` sits at the level before ``t``; ``output`` is the model's prediction
    at ``(x, t)`` (the usual approximation ε(x_{t−1}, t) ≈ ε(x_t, t)); returns the latent at level ``t``."""
    alpha_next, alpha_cur = _alpha(scheduler, t), _alpha(scheduler, _previous(scheduler, t))
    eps, _ = _eps_and_x0(scheduler, output, x, alpha_next)  # the model read x as a level-t latent
    x0 = (x - (1 - alpha_cur).sqrt().to(x) * eps) / alpha_cur.sqrt().to(x)
    return alpha_next.sqrt().to(x) * x0 + (1 - alpha_next).sqrt().to(x) * eps


# -- image <-> latents ------------------------------------------------------------------------------------
@torch.no_grad()
def encode_image(pipe: Any, image: Image.Image | torch.Tensor) -> torch.Tensor:
    """Latents (1, C, h, w) float32 of an RGB image (PIL, or a tensor in [-1, 1]) of the model's size:
    ``vae.encode(x).latent_dist.mean · scaling_factor`` (float32 where the VAE asks to be upcast)."""
    vae = pipe.vae
    x = image_to_tensor(image) if isinstance(image, Image.Image) else image
    with vae_precision(vae) as dtype:
        z = vae.encode(x.to(vae.device, dtype)).latent_dist.mean.float()
    mean, std = getattr(vae.config, "latents_mean", None), getattr(vae.config, "latents_std", None)
    if mean is not None and std is not None:  # the inverse of sampling.decode_latents' de-normalisation
        mean = torch.tensor(mean).view(1, -1, 1, 1).to(z)
        std = torch.tensor(std).view(1, -1, 1, 1).to(z)
        return (z - mean) * vae.config.scaling_factor / std
    # SD3 and FLUX autoencoders shift their latents too (decode_latents adds shift_factor back); SD's have none
    return (z - (getattr(vae.config, "shift_factor", None) or 0.0)) * vae.config.scaling_factor


def decode(pipe: Any, latents: torch.Tensor) -> list[Image.Image]:
    """PIL images from latents with the pipeline's VAE: ``decode(pipe, encode_image(pipe, image))``."""
    return decode_latents(pipe, latents)


# -- the three methods ------------------------------------------------------------------------------------
@torch.no_grad()
def _ddim_invert(pipe: Any, x0: torch.Tensor, text: TextConditioning, scheduler: Any, guidance: float,
                 progress: bool) -> torch.Tensor:
    from tqdm.auto import tqdm

    latents = [x0.to(pipe.unet.device, torch.float32)]
    x = latents[0]
    for t in tqdm(scheduler.timesteps.flip(0).tolist(), desc="DDIM inversion", disable=not progress):
        output = _guided(pipe, text, x, t, guidance, text.uncond, text.uncond_pooled)
        x = ddim_inverse_step(scheduler, output, t, x)
        latents.append(x)
    return torch.cat(latents)


def ddim_invert(pipe: Any, latents: torch.Tensor, prompt: str, steps: int | None = None, guidance: float = 1.0,
                progress: bool = True) -> torch.Tensor:
    """DDIM-invert encoded image latents (1, C, h, w) under ``prompt``: returns ``steps + 1`` latents, from
    ``x_0`` (index 0) to ``x_T`` (index -1). ``traj = ddim_invert(pipe, encode_image(pipe, img), "a cat")``"""
    steps = _default_steps(pipe, steps)
    height, width = (s * _vae_factor(pipe) for s in latents.shape[-2:])
    text = encode_text(pipe, prompt, height, width)
    return _ddim_invert(pipe, latents, text, ddim_scheduler(pipe, steps), guidance, progress)


@dataclass
class NullTextResult:
    """Per-step unconditional embeddings (steps, tokens, dim), inner steps used and final MSE per step."""

    embeddings: torch.Tensor
    inner_steps: list[int]
    losses: list[float]
    latents: torch.Tensor  # the reconstruction's final latent under the optimised embeddings


def _null_text(pipe: Any, trajectory: torch.Tensor, text: TextConditioning, scheduler: Any, guidance: float,
               options: NullTextOptions, progress: bool) -> NullTextResult:
    from tqdm.auto import tqdm

    steps = len(scheduler.timesteps)
    half = pipe.unet.dtype in (torch.float16, torch.bfloat16)
    # Gradients of a ~1e-5 loss underflow in half precision: scale the loss, unscale the float32 gradient.
    scale = 2.0**14 if half else 1.0
    uncond = text.uncond.detach().float().clone()  # float32 master copy, whatever the pipeline's dtype
    trajectory = trajectory.to(pipe.unet.device, torch.float32)
    x = trajectory[-1:]
    embeddings, used, losses = [], [], []
    bar = tqdm(scheduler.timesteps.tolist(), desc="null-text inversion", disable=not progress)
    for i, t in enumerate(bar):
        target = trajectory[steps - i - 1 : steps - i]
        with torch.no_grad():
            out_c = _predict(pipe, text, x, t, text.cond, text.pooled)
        lr = options.lr * max(0.0, 1.0 - i / options.lr_horizon)
        threshold = options.early_stop + i * options.early_stop_slope
        param = uncond.clone().requires_grad_(True)
        optimizer = torch.optim.Adam([param], lr=lr)
        inner, loss_value = 0, float("nan")
        rounds = options.inner_steps if lr > 0 and guidance > 1.0 else 0  # at guidance 1 uncond has no effect
        for _ in range(rounds):
            out_u = _predict(pipe, text, x, t, param, text.uncond_pooled)
            loss = F.mse_loss(ddim_step(scheduler, out_u + guidance * (out_c - out_u), t, x), target)
            (grad,) = torch.autograd.grad(loss * scale, param)  # grads of the embedding only, never the UNet's
            inner += 1
            if not torch.isfinite(grad).all():
                scale /= 4.0  # half-precision overflow: retry with a smaller loss scale
                continue
            param.grad = grad / scale
            optimizer.step()
            loss_value = float(loss.detach())
            if loss_value < threshold:
                break
        uncond = param.detach()
        with torch.no_grad():
            out_u = _predict(pipe, text, x, t, uncond, text.uncond_pooled)
            x = ddim_step(scheduler, out_u + guidance * (out_c - out_u) if guidance > 1.0 else out_c, t, x)
        final = float(F.mse_loss(x, target))
        embeddings.append(uncond)
        used.append(inner)
        losses.append(final)
        bar.set_postfix(loss=f"{(loss_value if inner else final):.2e}", inner=inner)
    return NullTextResult(torch.cat(embeddings), used, losses, x)


def null_text_optimize(pipe: Any, trajectory: torch.Tensor, prompt: str, guidance: float = 7.5,
                       options: NullTextOptions | None = None, progress: bool = True) -> NullTextResult:
    """Optimise per-step unconditional embeddings so that guided DDIM sampling from ``trajectory[-1]``
    retraces ``trajectory`` (from :func:`ddim_invert`, same step count).
    ``null_text_optimize(pipe, traj, "a cat", guidance=7.5).embeddings.shape  # (steps, tokens, dim)``"""
    height, width = (s * _vae_factor(pipe) for s in trajectory.shape[-2:])
    text = encode_text(pipe, prompt, height, width)
    scheduler = ddim_scheduler(pipe, len(trajectory) - 1)
    return _null_text(pipe, trajectory, text, scheduler, float(guidance), options or NullTextOptions(), progress)


# -- the record -------------------------------------------------------------------------------------------
@dataclass
class Inversion:
    """A real image turned into something a pipeline can regenerate and edit.

    ``latents``: (steps + 1, C, h, w) float32, ``x_0`` (the encoded image) first and ``x_T`` last.
    ``uncond_embeddings``: per-step (null-text: steps rows) or constant (negative-prompt: one row)
    unconditional embeddings (rows, tokens, dim), None for plain DDIM (the pipeline's own then).
    ``uncond_pooled``: the SDXL pooled counterpart (rows, dim) where it differs from the pipeline's own.
    ``guidance``: the guidance scale generation uses by default (null-text optimised for it).
    """

    method: str
    prompt: str
    latents: torch.Tensor
    timesteps: list[int]
    guidance: float
    crop: Crop
    prediction_type: str
    uncond_embeddings: torch.Tensor | None = None
    uncond_pooled: torch.Tensor | None = None
    image: Image.Image | None = field(default=None, repr=False)
    inversion_guidance: float = 1.0
    null_text: dict[str, Any] | None = None
    inner_steps: list[int] = field(default_factory=list)
    losses: list[float] = field(default_factory=list)
    seconds: dict[str, float] = field(default_factory=dict)

    @property
    def steps(self) -> int:
        return len(self.timesteps)

    @property
    def start_latents(self) -> torch.Tensor:
        """``x_T`` (1, C, h, w): where sampling starts."""
        return self.latents[-1:]

    @property
    def size(self) -> tuple[int, int]:
        """(width, height) of the image the inversion was made from (after fitting)."""
        return self.crop.size

    def uncond_for_step(self, step: int) -> torch.Tensor | None:
        """The unconditional embedding (1, tokens, dim) sampling step ``step`` uses (None: the pipeline's)."""
        if self.uncond_embeddings is None:
            return None
        return self.uncond_embeddings[min(step, len(self.uncond_embeddings) - 1)].unsqueeze(0)

    # -- generation -----------------------------------------------------------------------------------
    def check_pipeline(self, pipe: Any) -> None:
        """Raise a clear error unless ``pipe`` can regenerate this inversion (DDIM scheduler with the same
        timesteps and prediction type, same latent channels and text-embedding width)."""
        from diffusers import DDIMScheduler

        if not isinstance(pipe.scheduler, DDIMScheduler):
            raise AttnkitError(f"regenerating an inversion needs a DDIM scheduler, the pipeline has "
                               f"{type(pipe.scheduler).__name__}: call attnkit.inversion.use_ddim(pipe) first")
        scheduler = ddim_scheduler(pipe, self.steps)
        if scheduler.config.prediction_type != self.prediction_type:
            raise AttnkitError(f"this inversion was made for a {self.prediction_type} model, the pipeline is "
                               f"{scheduler.config.prediction_type}: invert the image with this pipeline")
        if scheduler.timesteps.tolist() != self.timesteps:
            raise AttnkitError("the pipeline's scheduler gives other timesteps for "
                               f"{self.steps} steps than the inversion used: invert with this pipeline")
        if pipe.unet.config.in_channels != self.latents.shape[1]:
            raise AttnkitError(f"the inversion has {self.latents.shape[1]} latent channels, the pipeline's UNet "
                               f"takes {pipe.unet.config.in_channels}: invert the image with this pipeline")
        if self.uncond_embeddings is not None and \
                self.uncond_embeddings.shape[-1] != pipe.unet.config.cross_attention_dim:
            raise AttnkitError("the inversion's text embeddings do not fit this pipeline's UNet: invert the "
                               "image with this pipeline")

    def controllers(self) -> list[Controller]:
        """Controllers generation needs: :class:`UncondSchedule` where the embedding changes per step."""
        if self.uncond_embeddings is None or len(self.uncond_embeddings) <= 1:
            return []
        return [UncondSchedule(self.uncond_embeddings)]

    def generate_kwargs(self, pipe: Any, batch: int = 1, guidance: float | None = None) -> dict[str, Any]:
        """Keyword arguments for :func:`attnkit.sampling.generate` (latents, steps, guidance, size and the
        first step's unconditional embeddings as pipeline arguments) for ``batch`` prompts; pass
        :meth:`controllers` too. ``generate(pipe, prompts, *inv.controllers(), **inv.generate_kwargs(pipe, 2))``
        """
        self.check_pipeline(pipe)
        unet = pipe.unet
        width, height = self.size
        kwargs: dict[str, Any] = {
            "latents": self.start_latents.to(unet.device, unet.dtype).expand(batch, -1, -1, -1).clone(),
            "steps": self.steps, "guidance": self.guidance if guidance is None else float(guidance),
            "height": height, "width": width,
        }
        first = self.uncond_for_step(0)
        if first is not None:
            kwargs["negative_prompt_embeds"] = first.to(unet.device, unet.dtype).expand(batch, -1, -1).clone()
            if is_sdxl(pipe):
                pooled = self.uncond_pooled
                if pooled is None:  # the pipeline's own unconditional pooled embedding
                    pooled = encode_text(pipe, self.prompt, height, width).uncond_pooled
                kwargs["negative_pooled_prompt_embeds"] = pooled[:1].to(unet.device, unet.dtype).expand(
                    batch, -1).clone()
        return kwargs

    # -- files ----------------------------------------------------------------------------------------
    def record(self) -> dict[str, Any]:
        """The JSON-ready settings (everything but the tensors and the image)."""
        return {
            "format": FORMAT, "version": VERSION, "method": self.method, "prompt": self.prompt,
            "steps": self.steps, "timesteps": self.timesteps, "guidance": self.guidance,
            "inversion_guidance": self.inversion_guidance, "prediction_type": self.prediction_type,
            "crop": self.crop.to_dict(), "null_text": self.null_text, "inner_steps": self.inner_steps,
            "losses": self.losses, "seconds": self.seconds,
            "latent_shape": list(self.latents.shape),
        }

    def save(self, directory: str | os.PathLike, overwrite: bool = False) -> Path:
        """Write ``inversion.safetensors``, ``inversion.json`` and ``image.png`` into ``directory``.

        Files are written to a temporary folder first and moved in at the end, so a failure leaves nothing
        partial behind. ``inv.save("out/photo")``"""
        tensors = {"latents": self.latents}
        if self.uncond_embeddings is not None:
            tensors["uncond_embeddings"] = self.uncond_embeddings
        if self.uncond_pooled is not None:
            tensors["uncond_pooled"] = self.uncond_pooled
        return write_folder(directory, tensors, self.record(), self.image, overwrite)

    @classmethod
    def load(cls, directory: str | os.PathLike) -> Inversion:
        """Read an inversion written by :meth:`save`. ``inv = Inversion.load("out/photo")``"""
        data, tensors, image = read_folder(directory, FORMAT, VERSION, "Inversion.save or `attnkit invert --out`",
                                           "re-run the inversion with this attnkit (a rectified-flow inversion "
                                           "loads with attnkit.FlowInversion.load)")
        return cls(method=data["method"], prompt=data["prompt"], latents=tensors["latents"],
                   timesteps=[int(t) for t in data["timesteps"]], guidance=float(data["guidance"]),
                   crop=Crop.from_dict(data["crop"]), prediction_type=data["prediction_type"],
                   uncond_embeddings=tensors.get("uncond_embeddings"), uncond_pooled=tensors.get("uncond_pooled"),
                   image=image, inversion_guidance=float(data.get("inversion_guidance", 1.0)),
                   null_text=data.get("null_text"), inner_steps=list(data.get("inner_steps", [])),
                   losses=list(data.get("losses", [])), seconds=dict(data.get("seconds", {})))


class UncondSchedule(Controller):
    """Feeds per-step unconditional embeddings to the pipeline's own loop: after step i it returns
    ``prompt_embeds`` with the unconditional half set to embedding i + 1 (step 0's goes in as
    ``negative_prompt_embeds``); ``rows=1`` sets only the first prompt's (the source of an edit).
    Needs ``"prompt_embeds"`` among the callback's tensor inputs."""

    def __init__(self, embeddings: torch.Tensor, rows: int | None = None) -> None:
        self.embeddings = embeddings
        self.rows = rows

    def on_step_end(self, ctl: Control, step: int, tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        if step + 1 >= len(self.embeddings) or ctl.layout is None or not ctl.layout.cfg:
            return {}
        if "prompt_embeds" not in tensors:
            raise AttnkitError("per-step unconditional embeddings need callback_on_step_end_tensor_inputs to "
                               "include 'prompt_embeds' (attnkit.generate passes it)")
        embeds = tensors["prompt_embeds"].clone()
        uncond = ctl.layout.uncond_rows
        embeds[uncond if self.rows is None else slice(uncond.start, uncond.start + self.rows)] = \
            self.embeddings[step + 1].to(embeds)
        return {"prompt_embeds": embeds}


# -- the entry points -------------------------------------------------------------------------------------
def _vae_factor(pipe: Any) -> int:
    return int(getattr(pipe, "vae_scale_factor", 8))


def _default_steps(pipe: Any, steps: int | None) -> int:
    from attnkit.models import defaults_for

    return int(defaults_for(pipe).num_inference_steps if steps is None else steps)


def use_ddim(pipe: Any) -> Any:
    """Give ``pipe`` a DDIM scheduler built from its current scheduler's config (what regenerating an
    inversion needs); returns ``pipe``. ``use_ddim(pipe)``"""
    from diffusers import DDIMScheduler

    if not isinstance(pipe.scheduler, DDIMScheduler):
        pipe.scheduler = DDIMScheduler.from_config(pipe.scheduler.config)
    return pipe


def invert(pipe: Any, image: Any, prompt: str, method: Method = "null-text", steps: int | None = None,
           guidance: float | None = None, *, inversion_guidance: float = 1.0,
           null_text: NullTextOptions | None = None, crop: CropMode = "center", progress: bool = True) -> Inversion:
    """Invert a real image (file path, PIL image or array) described by ``prompt``.

    ``method``: "ddim", "null-text" (Mokady et al. 2023) or "negative-prompt" (Miyake et al. 2023).
    ``steps`` defaults to the model's own (``attnkit.models.defaults_for``: 50, the paper's, for Stable
    Diffusion), ``guidance`` to the paper's 7.5 on every model: the guidance null-text optimises for, and the
    one regeneration and edits use. A model that samples best at a lower guidance (the bundled model's 2.5)
    still edits real images better at 7.5 (``benchmarks/inversion.py``). ``inversion_guidance`` is the
    guidance of the DDIM inversion pass itself (1: conditional only, as in the paper). ``null_text`` defaults to
    the paper's schedule with the model's own learning rate (``null_text_lr``). The image is fitted to
    the model's resolution (``crop="center"`` or ``"stretch"``), and the crop is kept in the record.

        inv = invert(pipe, "photo.png", "a red circle on a white background", method="null-text")
    """
    from attnkit.models import defaults_for

    if method not in METHODS:
        raise AttnkitError(f"unknown inversion method {method!r}: use one of {', '.join(METHODS)}")
    from attnkit.settings import check_steps
    from attnkit.threads import apply_threads

    check_prompt(pipe, prompt)
    defaults = defaults_for(pipe)
    steps = check_steps(defaults.num_inference_steps if steps is None else steps)
    apply_threads()  # null-text's backward passes collapse like sampling does on a busy CPU
    guidance = float(INVERSION_GUIDANCE if guidance is None else guidance)
    if not math.isfinite(guidance) or guidance < 0:
        raise AttnkitError(f"guidance must be a finite number >= 0, got {guidance}")
    scheduler = ddim_scheduler(pipe, steps)
    fitted, box = fit_image(load_image(image), defaults.width, defaults.height, mode=crop)
    start = time.perf_counter()
    text = encode_text(pipe, prompt, defaults.height, defaults.width)
    x0 = encode_image(pipe, fitted)
    trajectory = _ddim_invert(pipe, x0, text, scheduler, float(inversion_guidance), progress)
    seconds = {"ddim_inversion": time.perf_counter() - start}
    inversion = Inversion(method=method, prompt=prompt, latents=trajectory.cpu(),
                          timesteps=scheduler.timesteps.tolist(), guidance=guidance, crop=box,
                          prediction_type=scheduler.config.prediction_type, image=fitted,
                          inversion_guidance=float(inversion_guidance), seconds=seconds)
    if method == "negative-prompt":
        inversion.uncond_embeddings = text.cond.detach().float().cpu()
        inversion.uncond_pooled = None if text.pooled is None else text.pooled.detach().float().cpu()
    elif method == "null-text":
        options = null_text or NullTextOptions(lr=defaults.null_text_lr)
        start = time.perf_counter()
        result = _null_text(pipe, trajectory, text, scheduler, guidance, options, progress)
        seconds["null_text"] = time.perf_counter() - start
        inversion.uncond_embeddings = result.embeddings.cpu()
        inversion.inner_steps, inversion.losses = result.inner_steps, result.losses
        inversion.null_text = asdict(options)
    return inversion


def generate_from(pipe: Any, inversion: Inversion, prompts: str | list[str] | None = None,
                  *controllers: Controller, guidance: float | None = None, progress: bool = True) -> Any:
    """Regenerate (``prompts`` None: the inversion's own prompt) or edit from an inversion through
    :func:`attnkit.sampling.generate`; returns its ``Generation``.
    ``generate_from(pipe, inv).images[0]`` is the reconstruction."""

    prompts = normalize_prompts(inversion.prompt if prompts is None else prompts)
    kwargs = inversion.generate_kwargs(pipe, len(prompts), guidance)
    return generate(pipe, prompts, *inversion.controllers(), *controllers, progress=progress, **kwargs)


def reconstruct(pipe: Any, inversion: Inversion, guidance: float | None = None, progress: bool = True
                ) -> Image.Image:
    """The image the inversion regenerates through the pipeline's own loop: ``reconstruct(pipe, inv)``."""
    return generate_from(pipe, inversion, guidance=guidance, progress=progress).images[0]


def edit_image(pipe: Any, inversion: Inversion, targets: str | list[str], *, paste_unedited: bool = False,
               **options: Any) -> Any:
    """Prompt-to-Prompt edit of an inverted real image: :func:`attnkit.edit.edit` with the inversion's
    prompt as source, ``x_T`` as the shared start and its unconditional embeddings on the source row at every
    step. Steps and size come from the inversion; ``guidance`` defaults to the one it was made for.
    ``edit_image(pipe, inv, "a blue circle on a white background", blend=["blue"]).edits[0]``

    The edited rows use the pipeline's own unconditional embedding (``target_uncond="pipeline"``, as PnP
    Inversion does): null-text's embeddings are tuned to reproduce the source, colours included, and hold
    an edit back. ``target_uncond="inversion"`` shares them with the edited rows, as the null-text notebook.

    Self-attention is replaced for the first half of the steps on grids of up to 32x32 query pixels
    (``self=0.5, self_res=32``, the null-text paper's notebook; generated images use Prompt-to-Prompt's 0.4 and
    16x16): a real image's layout needs the firmer hold.
    ``paste_unedited=True`` (needs ``blend`` words) finishes each edit by pasting the input image back outside
    its local-blend mask (:func:`attnkit.images.paste_outside`): the unedited pixels are then the user's own,
    not the autoencoder's round trip of them.
    """
    from attnkit.edit import edit
    from attnkit.images import paste_outside

    for fixed in ("steps", "height", "width", "latents", "uncond_embeddings", "seed"):
        if fixed in options:
            raise AttnkitError(f"{fixed}= is fixed by the inversion when editing a real image: leave it out")
    if paste_unedited and not options.get("blend"):
        raise AttnkitError("paste_unedited needs local-blend words to know what is edited: pass blend=[...]")
    if paste_unedited and inversion.image is None:
        raise AttnkitError("paste_unedited needs the input image, and this inversion has none: invert the image "
                           "again (Inversion.save keeps it as image.png)")
    inversion.check_pipeline(pipe)
    unet = pipe.unet
    uncond = pooled = None
    if inversion.uncond_embeddings is not None:
        uncond = [inversion.uncond_for_step(i).to(unet.device, unet.dtype) for i in range(inversion.steps)]
        if inversion.uncond_pooled is not None:
            pooled = inversion.uncond_pooled[:1].to(unet.device, unet.dtype)
    width, height = inversion.size
    guidance = options.pop("guidance", None)
    options.setdefault("self", REAL_IMAGE_SELF_STEPS)
    options.setdefault("self_res", REAL_IMAGE_SELF_RES)
    result = edit(pipe, inversion.prompt, targets, steps=inversion.steps, height=height, width=width,
                  guidance=inversion.guidance if guidance is None else guidance,
                  latents=inversion.start_latents.to(unet.device, unet.dtype), uncond_embeddings=uncond,
                  uncond_pooled=pooled, **options)
    if paste_unedited:
        result.images[1:] = [paste_outside(image, inversion.image, mask)
                             for image, mask in zip(result.images[1:], result.blend_masks[1:], strict=True)]
    result.settings["paste_unedited"] = paste_unedited
    return result


@torch.no_grad()
def reconstruct_latents(pipe: Any, inversion: Inversion, guidance: float | None = None) -> torch.Tensor:
    """The final latent of an explicit DDIM loop over the inversion (attnkit's own arithmetic, not the
    pipeline's): a reference to check the pipeline path against. ``reconstruct_latents(pipe, inv)``"""
    guidance = inversion.guidance if guidance is None else float(guidance)
    width, height = inversion.size
    text = encode_text(pipe, inversion.prompt, height, width)
    scheduler = ddim_scheduler(pipe, inversion.steps)
    pooled = text.uncond_pooled if inversion.uncond_pooled is None else inversion.uncond_pooled[:1]
    x = inversion.start_latents.float().to(pipe.unet.device)
    for i, t in enumerate(scheduler.timesteps.tolist()):
        uncond = inversion.uncond_for_step(i)
        output = _guided(pipe, text, x, t, guidance, text.uncond if uncond is None else uncond, pooled)
        x = ddim_step(scheduler, output, t, x)
    return x

"""``generate``: the one sampling call every attnkit method goes through.

    result = generate(pipe, ["a red circle", "a blue circle"], store, seed=8888)
    result.images[1].save("blue.png")

It runs the pipeline's own denoising loop (diffusers' ``__call__``) inside :func:`attnkit.control`, with the
model's own defaults (steps, guidance, size), one initial noise from ``seed`` shared by every prompt (what
Prompt-to-Prompt needs), and the controllers' step-end hooks wired to ``callback_on_step_end``.
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any

import torch

from attnkit.adapters import text_tokenizer
from attnkit.engine import AttnkitError, Controller, control, shared_latents
from attnkit.models import defaults_for, warn_unknown_words
from attnkit.settings import check_guidance, check_size, check_steps
from attnkit.threads import apply_threads
from attnkit.tokens import check_prompt_length

# Tensors a controller may replace after a step: the latents (local blend) and the prompt embeddings
# (per-step unconditional embeddings of null-text inversion). Both SD and SDXL pipelines expose them.
STEP_TENSORS = ["latents", "prompt_embeds"]


@dataclass
class Generation:
    """What :func:`generate` returns: images, final latents and the settings that produced them."""

    images: list[Any]
    latents: torch.Tensor
    prompts: list[str]
    seed: int
    steps: int
    guidance: float
    height: int
    width: int
    seconds: float = 0.0
    settings: dict[str, Any] = field(default_factory=dict)

    def record(self) -> dict[str, Any]:
        """A JSON-ready record of what was run."""
        return {"prompts": self.prompts, "seed": self.seed, "steps": self.steps, "guidance": self.guidance,
                "height": self.height, "width": self.width, "seconds": round(self.seconds, 3), **self.settings}


def normalize_prompts(prompts: str | list[str]) -> list[str]:
    """A list of non-empty prompts, or a clear error."""
    items = [prompts] if isinstance(prompts, str) else list(prompts)
    if not items:
        raise AttnkitError("no prompt given: pass a prompt string or a list of prompts")
    for p in items:
        if not isinstance(p, str):
            raise AttnkitError(f"prompts must be strings, got {type(p).__name__}")
    return items


@contextmanager
def vae_precision(vae: Any) -> Iterator[torch.dtype]:
    """Run the VAE in float32 for the block where its config asks for it (SDXL's float16 VAE overflows),
    putting it back afterwards; yields the dtype to feed it: ``with vae_precision(vae) as dtype: ...``"""
    upcast = vae.dtype == torch.float16 and bool(getattr(vae.config, "force_upcast", False))
    if not upcast:
        yield vae.dtype
        return
    # torch's own Module.to: diffusers' ModelMixin.to warns about fp32 modules on every cast, and this pair of
    # casts is exactly what its force_upcast asks for
    torch.nn.Module.to(vae, torch.float32)
    try:
        yield torch.float32
    finally:
        torch.nn.Module.to(vae, torch.float16)


@torch.no_grad()
def decode_latents(pipe: Any, latents: torch.Tensor) -> list[Any]:
    """Decode latents to PIL images with the pipeline's VAE (float32 where the VAE asks to be upcast)."""
    vae = pipe.vae
    with vae_precision(vae) as dtype:
        z = latents.to(dtype)
        mean, std = getattr(vae.config, "latents_mean", None), getattr(vae.config, "latents_std", None)
        if mean is not None and std is not None:
            mean = torch.tensor(mean).view(1, -1, 1, 1).to(z)
            std = torch.tensor(std).view(1, -1, 1, 1).to(z)
            z = z * std / vae.config.scaling_factor + mean
        else:
            # SD3 and FLUX autoencoders also shift their latents (shift_factor); SD's have none
            z = z / vae.config.scaling_factor + (getattr(vae.config, "shift_factor", None) or 0.0)
        image = vae.decode(z, return_dict=False)[0]
    return pipe.image_processor.postprocess(image, output_type="pil")


def generate(pipe: Any, prompts: str | list[str], *controllers: Controller, seed: int = 0,
             steps: int | None = None, guidance: float | None = None, height: int | None = None,
             width: int | None = None, latents: torch.Tensor | None = None,
             negative_prompt: str | list[str] | None = None, shared_noise: bool = True, progress: bool = True,
             **pipe_kwargs: Any) -> Generation:
    """Sample ``prompts`` under ``controllers``; every prompt starts from the same noise (``shared_noise``).

    ``latents`` overrides the initial noise (e.g. an inverted image). Extra keyword arguments go to the
    pipeline call. Usage: ``generate(pipe, "a red circle", AttentionStore(), seed=1).images[0]``

    ``None`` takes the model's own steps, guidance and size (:func:`attnkit.defaults_for`); anything else is
    checked: steps from 1 to 1000, a finite guidance scale, sides that are positive multiples of the
    autoencoder's factor (8). Prompts with words a small model does not know (the bundled model) get one
    warning naming them. CPU threads follow :mod:`attnkit.threads`.
    """
    prompts = normalize_prompts(prompts)
    text = text_tokenizer(pipe)  # the tokenizer(s) whose tokens the model attends to (SD3: CLIP + T5)
    for p in prompts:
        check_prompt_length(text, p)
    defaults = defaults_for(pipe)
    factor = max(8, int(getattr(pipe, "vae_scale_factor", 8)))  # diffusers' SD pipelines check multiples of 8
    steps = check_steps(defaults.num_inference_steps if steps is None else steps)
    guidance = check_guidance(defaults.guidance_scale if guidance is None else guidance)
    height = check_size(defaults.height if height is None else height, "height", factor)
    width = check_size(defaults.width if width is None else width, "width", factor)
    if defaults.max_sequence_length is not None:  # the bundled MM-DiT model: sampled without zero T5 tokens
        pipe_kwargs.setdefault("max_sequence_length", defaults.max_sequence_length)
    warn_unknown_words(pipe, prompts)
    apply_threads()
    if latents is None:
        if shared_noise:
            latents = shared_latents(pipe, seed, len(prompts), height, width)
        else:
            latents = torch.cat([shared_latents(pipe, seed + i, 1, height, width) for i in range(len(prompts))])
    elif latents.shape[0] != len(prompts):
        raise AttnkitError(f"latents have {latents.shape[0]} rows for {len(prompts)} prompts")
    saved_progress = dict(getattr(pipe, "_progress_bar_config", {}))
    pipe.set_progress_bar_config(**{**saved_progress, "disable": not progress})
    start = time.perf_counter()
    try:
        with control(pipe, *controllers) as ctl:
            out = pipe(prompts, num_inference_steps=steps, guidance_scale=guidance, height=height, width=width,
                       latents=latents, negative_prompt=negative_prompt, output_type="latent",
                       callback_on_step_end=ctl.callback, callback_on_step_end_tensor_inputs=STEP_TENSORS,
                       **pipe_kwargs)
        final = out.images
        # FLUX returns packed latents: the decoder takes them as the image grid of the last call
        images = decode_latents(pipe, ctl.adapter.latents_to_grid(final, ctl.state))
    finally:
        pipe._progress_bar_config = saved_progress
    return Generation(images=images, latents=final, prompts=prompts, seed=seed, steps=steps, guidance=guidance,
                      height=height, width=width, seconds=time.perf_counter() - start)

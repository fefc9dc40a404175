"""FlowEdit (Kulikov et al., "FlowEdit: Inversion-Free Text-Based Editing Using Pre-Trained Flow Models", 2024;
fallenshock/FlowEdit): edit a real image on a flow-matching model without inverting it.

    edited = attnkit.flow_edit(pipe, "photo.png", "a red circle on a white background",
                               "a blue circle on a white background").image

Instead of mapping the image to noise and back, FlowEdit integrates the *difference* of two velocities
directly from the source image: at each step ``σ`` it noises the source, ``z_src = (1 − σ)·x_src + σ·ε`` (fresh
``ε`` each step), puts the edit at the same offset, ``z_tar = z_edit + z_src − x_src``, and moves the edit by
``h·(v(z_tar, target) − v(z_src, source))``, averaged over ``n_avg`` noise draws. It starts at step
``N − n_max`` (less noise: a smaller edit that keeps more of the image) and stops at ``N − n_min`` (the last
``n_min`` steps sample the target plainly from there). No attention is touched: this is the baseline the
attention-based edits (:func:`attnkit.rf_edit`) are measured against.

Defaults (the official ones, ``n_max`` kept as a fraction of the steps so they carry over to any step count):
SD3: 50 steps, ``n_max = 33``, source guidance 3.5, target guidance 13.5; FLUX: 28 steps, ``n_max = 24``,
guidance 1.5 and 5.5; ``n_min = 0``, ``n_avg = 1``.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import torch

from attnkit.engine import AttnkitError, Controller, control
from attnkit.flow_inversion import (
    FlowVelocity,
    _check_prompt,
    _progress,
    _size,
    encode,
    flow_family,
    schedule,
)
from attnkit.images import Crop, CropMode, fit_image, load_image

# family: (steps, n_max, source guidance, target guidance), the official run scripts' settings.
PAPER_DEFAULTS: dict[str, tuple[int, int, float, float]] = {
    "sd3": (50, 33, 3.5, 13.5),
    "flux": (28, 24, 1.5, 5.5),
}


@dataclass
class FlowEditResult:
    """The edited image, its latents (1, C, h, w), the source image as fitted, and the settings."""

    image: Any
    latents: torch.Tensor
    source: Any
    crop: Crop
    evaluations: int
    settings: dict[str, Any] = field(default_factory=dict)

    def record(self) -> dict[str, Any]:
        return {"method": "flowedit", **self.settings, "evaluations": self.evaluations, "crop": self.crop.to_dict()}


def paper_n_max(family: str, steps: int) -> int:
    """The official ``n_max`` carried over to ``steps`` steps as the same fraction: ``round(33 / 50 · steps)`` on
    SD3, ``round(24 / 28 · steps)`` on FLUX. ``paper_n_max("sd3", 25)  # 16``"""
    total, n_max, _, _ = PAPER_DEFAULTS[family]
    return max(1, min(steps, round(n_max * steps / total)))


def flow_edit(pipe: Any, image: Any, source_prompt: str, target_prompt: str, *, steps: int | None = None,
              n_max: int | None = None, n_min: int = 0, n_avg: int = 1, source_guidance: float | None = None,
              target_guidance: float | None = None, seed: int = 0, crop: CropMode = "center",
              controllers: Sequence[Controller] = (), progress: bool = True) -> FlowEditResult:
    """Edit a real image (path, PIL image or array) from ``source_prompt`` to ``target_prompt`` with FlowEdit.

    Usage: ``flow_edit(pipe, "scene.png", "a red circle", "a blue circle", steps=20).image``

    ``steps`` defaults to the model's own (``attnkit.defaults_for``); ``n_max`` to the paper's fraction of them
    (:func:`paper_n_max`); ``source_guidance``/``target_guidance`` to the paper's per family. ``seed`` seeds
    the per-step noise (a CPU ``torch.Generator``). ``controllers`` only observe here (e.g. a store): FlowEdit
    itself changes no attention.
    """
    from attnkit.models import defaults_for
    from attnkit.settings import check_guidance, check_steps
    from attnkit.threads import apply_threads

    family = flow_family(pipe, "FlowEdit")
    _check_prompt(pipe, source_prompt)
    _check_prompt(pipe, target_prompt)
    steps = check_steps(defaults_for(pipe).num_inference_steps if steps is None else steps)
    _, _, src_g, tar_g = PAPER_DEFAULTS[family]
    n_max = paper_n_max(family, steps) if n_max is None else n_max
    for name, value in (("n_max", n_max), ("n_min", n_min)):
        if isinstance(value, bool) or not isinstance(value, int) or not 0 <= value <= steps:
            raise AttnkitError(f"{name}={value!r}: give a whole number of steps from 0 to steps ({steps})")
    if n_min >= n_max:
        raise AttnkitError(f"n_min={n_min} must be below n_max={n_max}: FlowEdit edits during steps "
                           f"{steps - n_max}..{steps - n_min - 1}")
    if isinstance(n_avg, bool) or not isinstance(n_avg, int) or n_avg < 1:
        raise AttnkitError(f"n_avg={n_avg!r}: average the velocity difference over at least 1 noise draw")
    source_guidance = check_guidance(src_g if source_guidance is None else source_guidance, "source_guidance")
    target_guidance = check_guidance(tar_g if target_guidance is None else target_guidance, "target_guidance")
    height, width = _size(pipe)
    fitted, box = fit_image(load_image(image), width, height, mode=crop)
    apply_threads()
    start = time.perf_counter()
    sigmas = schedule(pipe, steps, height, width)
    pair = FlowVelocity(pipe, [source_prompt, target_prompt], [source_guidance, target_guidance], height, width)
    target_only = FlowVelocity(pipe, [target_prompt], target_guidance, height, width)
    device = pipe.transformer.device
    x_src = encode(pipe, fitted).to(device)
    generator = torch.Generator("cpu").manual_seed(seed)
    z_edit = x_src.clone()
    x_tar = None
    first = steps - n_max
    bar = _progress(steps - first, progress, "flowedit")
    try:
        with control(pipe, *controllers, layout=pair.layout) as ctl:
            for i in range(first, steps):
                sigma, nxt = sigmas[i], sigmas[i + 1]
                if i < steps - n_min:
                    delta = torch.zeros_like(x_src)
                    for _ in range(n_avg):
                        noise = torch.randn(x_src.shape, generator=generator, dtype=torch.float32).to(device)
                        z_src = (1 - sigma) * x_src + sigma * noise
                        z_tar = z_edit + z_src - x_src
                        ctl.set_step(i, steps)
                        v = pair(torch.cat([z_src, z_tar]), sigma)
                        delta = delta + (v[1:] - v[:1]) / n_avg
                    z_edit = z_edit + (nxt - sigma) * delta
                else:  # the last n_min steps: plain sampling of the target from where the edit got to
                    if x_tar is None:
                        noise = torch.randn(x_src.shape, generator=generator, dtype=torch.float32).to(device)
                        x_tar = z_edit + ((1 - sigma) * x_src + sigma * noise) - x_src
                    ctl.set_layout(target_only.layout)
                    ctl.set_step(i, steps)
                    x_tar = x_tar + (nxt - sigma) * target_only(x_tar, sigma)
                bar.update()
    finally:
        bar.close()
    from attnkit.sampling import decode_latents

    out = z_edit if x_tar is None else x_tar
    edited = decode_latents(pipe, out.to(pipe.vae.dtype))[0]
    settings = {"source_prompt": source_prompt, "target_prompt": target_prompt, "steps": steps, "n_max": n_max,
                "n_min": n_min, "n_avg": n_avg, "source_guidance": source_guidance,
                "target_guidance": target_guidance, "seed": seed, "seconds": round(time.perf_counter() - start, 3)}
    return FlowEditResult(image=edited, latents=out.cpu(), source=fitted, crop=box,
                          evaluations=pair.calls + target_only.calls, settings=settings)


__all__ = ["FlowEditResult", "PAPER_DEFAULTS", "flow_edit", "paper_n_max"]

"""Checks of sampling settings, shared by the library and the CLI: plain Python (no torch), so the command
line can refuse bad arguments before it loads anything. Each names the setting the way the caller does
(``"--height"`` on the command line, ``"height"`` in Python) and says what to pass instead.

    check_steps(0, "steps")                    # AttnkitError: steps 0: give at least 1 denoising step
    check_size(30, "--height", factor=8)       # AttnkitError: --height 30: ... a multiple of 8 ... (32 or 24)
"""

from __future__ import annotations

import math
import numbers
from typing import Any

from attnkit.notices import AttnkitError

MAX_STEPS = 1000  # DDPM-trained schedulers have 1000 training timesteps: more steps than that cannot exist


def _show(name: str, value: Any) -> str:
    return f"{name}={value!r}" if name.isidentifier() else f"{name} {value}"


def check_steps(steps: Any, name: str = "steps") -> int:
    """A whole number of denoising steps from 1 to 1000."""
    if isinstance(steps, bool) or not isinstance(steps, numbers.Real) or not float(steps).is_integer():
        raise AttnkitError(f"{_show(name, steps)}: give a whole number of denoising steps, e.g. 25")
    if not 1 <= steps <= MAX_STEPS:
        raise AttnkitError(f"{_show(name, steps)}: give from 1 to {MAX_STEPS} denoising steps")
    return int(steps)


def check_guidance(guidance: Any, name: str = "guidance") -> float:
    """A finite guidance scale (nan would sample without guidance, inf makes a black image)."""
    try:
        value = float(guidance)
    except (TypeError, ValueError):
        value = math.nan
    if not math.isfinite(value):
        raise AttnkitError(f"{_show(name, guidance)}: give a finite guidance scale, e.g. 7.5 (1 or less turns "
                           "classifier-free guidance off)")
    return value


def check_size(pixels: Any, name: str = "height", factor: int = 8) -> int:
    """An image side in pixels: a positive multiple of ``factor``, 8 for every Stable Diffusion model (the
    autoencoder's downscale factor, which diffusers' pipelines check; more where a model's own is larger)."""
    whole = isinstance(pixels, numbers.Integral) and not isinstance(pixels, bool)
    if not whole or pixels < factor or pixels % factor:
        hint = ""
        if whole and pixels >= factor:
            low = pixels // factor * factor
            hint = f", e.g. {low} or {low + factor}"
        raise AttnkitError(f"{_show(name, pixels)}: image sizes must be positive multiples of {factor} (what "
                           f"diffusers accepts: Stable Diffusion's autoencoder shrinks each side 8 times)"
                           f"{hint or f', e.g. {8 * factor}'}")
    return int(pixels)

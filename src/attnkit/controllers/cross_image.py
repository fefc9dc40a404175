"""Cross-image attention (Alaluf, Garibi et al., "Cross-Image Attention for Zero-Shot Appearance Transfer",
SIGGRAPH 2024; official code garibida/cross-image-attention): the output's queries attend to the appearance
image's keys and values, so the output keeps the structure image's layout and takes the appearance's look.

    with attnkit.control(pipe, CrossImageAttention(), layout=Layout(prompts=4, cfg=False)) as ctl: ...
    latents = MaskedAdaIN(masks=(structure_mask, appearance_mask)).apply(latents)   # or as a step-end hook

Batch layout, in prompt indices within each half of the batch: ``output`` (default 0), ``appearance`` (1),
``structure`` (2), as the official ``constants.py``; any other row (e.g. :func:`attnkit.transfer`'s no-swap copy
of the output, row 3) is left alone. Without guidance there is one half; with it, each half swaps within itself.

The pieces, each with the official default:

* **Swap** (:class:`CrossImageAttention`): in the decoder's self-attention layers on the two finest grids (64² and
  32² for SD1.5 at 512 px: ``cross_attn_64_range`` 10–90 and ``cross_attn_32_range`` 10–70 of the official run's
  68 denoising steps), the output row's keys and values are replaced by the appearance row's. Windows are
  fractions of the denoising loop (``10 / 68`` ...), so they scale with the number of steps.
* **Attention contrast** on the output's swapped maps: ``A ← clip((A − mean(A))·β + mean(A), 0, 1)`` with the
  mean over keys (``1/N`` for a softmax row), β = 1.67, not renormalised (:func:`contrast`). The maps are made
  for the output rows only (:meth:`CrossImageAttention.edit_output`), the other rows keep fused attention;
  beside a controller that reads or edits maps, the engine's probability path is taken instead (same numbers).
* **Swap guidance** (:func:`swap_guidance_scales`, :func:`guide`): ``ε = ε_plain + s_i·(ε_swap − ε_plain)``,
  ``s_i`` from 3.5 down to ``max(3.5/2, 1)`` linearly over the loop; no text guidance.
* **Masked AdaIN on latents** (:class:`MaskedAdaIN`, :func:`masked_adain`): after each step from 20/68 of the
  loop, the output latent's per-channel mean and std inside the structure's object mask are set to the
  appearance latent's inside its own mask (unbiased variance, eps 1e-5); outside the mask it is unchanged.

Code-only quirk, offered as an option (``structure_kv=True``): the official processor gives the output the
*structure's* keys and values instead at loop steps ``10, 15, …, 35`` (``step % 5 == 0 and step < 40``).
Not matched (deliberately): the official step counter is set in the step callback, so its attention sees the
previous step's index (every window starts one step later there); here a step's attention sees its own index.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any, ClassVar

import torch
import torch.nn.functional as F

from attnkit.engine import AttentionCall, AttnkitError, Control, Controller, Layout

Steps = tuple[int | float, int | float] | None

PAPER_LOOP = 68  # the official run's denoising steps: 100 timesteps, the first 32 skipped
FINE_STEPS: tuple[float, float] = (10 / PAPER_LOOP, 90 / PAPER_LOOP)  # cross_attn_64_range = (10, 90)
COARSE_STEPS: tuple[float, float] = (10 / PAPER_LOOP, 70 / PAPER_LOOP)  # cross_attn_32_range = (10, 70)
ADAIN_STEPS: tuple[float, float] = (20 / PAPER_LOOP, 100 / PAPER_LOOP)  # adain_range = (20, 100)
CONTRAST = 1.67  # contrast_strength
SWAP_GUIDANCE = 3.5  # swap_guidance_scale
STRUCTURE_KV_EVERY = 5 / PAPER_LOOP  # the quirk: structure K/V where step % 5 == 0 ...
STRUCTURE_KV_UNTIL = 40 / PAPER_LOOP  # ... and step < 40
ADAIN_EPS = 1e-5  # calc_mean_std's eps


# -- formulas ---------------------------------------------------------------------------------------------------
def contrast(probs: torch.Tensor, strength: float = CONTRAST) -> torch.Tensor:
    """Attention contrast: ``clip((A − μ)·β + μ, 0, 1)`` with ``μ`` each query row's mean over keys (``1/N`` for
    softmax rows); not renormalised. ``contrast(probs, 1.67)``"""
    mean = probs.mean(dim=-1, keepdim=True)
    return ((probs - mean) * strength + mean).clamp(0.0, 1.0)


def swap_guidance_scales(scale: float, steps: int) -> list[float]:
    """The swap-guidance scale of each loop step: linear from ``scale`` to ``max(scale / 2, 1)`` (official
    ``np.linspace(s, max(s / 2, 1), n)``). ``swap_guidance_scales(3.5, 68)[0] == 3.5``"""
    end = max(scale / 2, 1.0)
    if steps == 1:
        return [float(scale)]
    return [float(scale + (end - scale) * i / (steps - 1)) for i in range(steps)]


def guide(swap: torch.Tensor, plain: torch.Tensor, scale: float) -> torch.Tensor:
    """Swap guidance: ``plain + scale·(swap − plain)`` (the no-swap prediction as the "unconditional" one)."""
    return plain + scale * (swap - plain)


def _mean_std(x: torch.Tensor, mask: torch.Tensor | None, eps: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-channel mean and ``√(var + eps)`` (unbiased) of ``x`` (C, h, w) over the pixels where ``mask``."""
    flat = x.reshape(x.shape[0], -1)
    if mask is not None:
        flat = flat[:, mask.reshape(-1) > 0.5]
    return flat.mean(dim=1).view(-1, 1, 1), (flat.var(dim=1) + eps).sqrt().view(-1, 1, 1)


def adain(content: torch.Tensor, style: torch.Tensor, eps: float = ADAIN_EPS) -> torch.Tensor:
    """AdaIN of one latent (C, h, w) to another's per-channel statistics over all pixels."""
    c_mean, c_std = _mean_std(content, None, eps)
    s_mean, s_std = _mean_std(style, None, eps)
    return (content - c_mean) / c_std * s_std + s_mean


def masked_adain(content: torch.Tensor, style: torch.Tensor, content_mask: torch.Tensor | None,
                 style_mask: torch.Tensor | None, eps: float = ADAIN_EPS) -> torch.Tensor:
    """Masked AdaIN (official ``utils/adain.py``): inside ``content_mask`` the content latent (C, h, w) gets the
    style latent's per-channel mean and std over ``style_mask``; outside it is unchanged. Masks are (h, w), 1
    inside. A mask with fewer than 2 pixels (no statistics) leaves the content as it is.
    ``masked_adain(latents[0], latents[1], structure_mask, appearance_mask)``"""
    if content_mask is None and style_mask is None:
        return adain(content, style, eps)
    for mask in (content_mask, style_mask):
        if mask is not None and int((mask > 0.5).sum()) < 2:
            return content
    c_mean, c_std = _mean_std(content, content_mask, eps)
    s_mean, s_std = _mean_std(style, style_mask, eps)
    normalised = (content - c_mean) / c_std * s_std + s_mean
    if content_mask is None:
        return normalised
    inside = (content_mask > 0.5).to(content.dtype)
    return content * (1 - inside) + normalised * inside


# -- windows ------------------------------------------------------------------------------------------------------
def step_bound(value: int | float, steps: int) -> int:
    """A window bound: an int is a step index; a float a fraction of the loop (``int(f · steps)``)."""
    if isinstance(value, float):
        return int(value * steps + 1e-9)  # 10/68 · 68 must give 10, not 9.999...
    return int(value)


def in_window(step: int, steps: int, window: Steps) -> bool:
    """Whether loop ``step`` of ``steps`` lies in ``window`` = ``(start, end)`` (end exclusive; ints: indices,
    floats: fractions of the loop, e.g. ``(10 / 68, 90 / 68)``) or None (every step)."""
    if window is None:
        return True
    start, end = window
    return step_bound(start, steps) <= step < step_bound(end, steps)


def check_window(window: Any, name: str) -> Steps:
    """A ``(start, end)`` pair of non-negative ints or floats (or None), else a clear error."""
    if window is None:
        return None
    if not isinstance(window, (tuple, list)) or len(window) != 2 or any(
            isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v) or v < 0 for v in window):
        raise AttnkitError(f"{name}={window!r}: give a (start, end) pair of step indices (ints) or fractions of "
                           "the denoising loop (floats), e.g. (10 / 68, 90 / 68), or None for every step")
    return (window[0], window[1])


def check_strength(value: Any, name: str, minimum: float = 0.0) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) or value < minimum:
        raise AttnkitError(f"{name}={value!r}: give a finite number >= {minimum:g}")
    return float(value)


def decoder_grid_ranks(unet: Any) -> dict[int, int]:
    """``{up-block index: rank}`` for the decoder blocks that have attention, rank 0 on the finest grid (up block
    ``j`` of ``n`` works at ``1 / 2^(n − 1 − j)`` of the latent size). SD1.5: ``{3: 0, 2: 1, 1: 2}``."""
    blocks = list(unet.up_blocks)
    with_attention = [j for j, block in enumerate(blocks) if getattr(block, "attentions", None)]
    by_scale = sorted({len(blocks) - 1 - j for j in with_attention})
    return {j: by_scale.index(len(blocks) - 1 - j) for j in with_attention}


# -- the controllers ----------------------------------------------------------------------------------------------
def _rows(value: int | Sequence[int], name: str) -> tuple[int, ...]:
    items = (value,) if isinstance(value, int) else tuple(value)
    if not items or any(isinstance(v, bool) or not isinstance(v, int) or v < 0 for v in items):
        raise AttnkitError(f"{name}={value!r}: give prompt indices (ints >= 0) within each half of the batch")
    return items


class CrossImageAttention(Controller):
    """The output rows' decoder self-attention takes the appearance row's keys and values, with attention
    contrast (the official ``AttentionProcessor`` of ``appearance_transfer_model.py``).

    ``output``/``appearance``/``structure``: prompt indices within each half of the batch (default 0/1/2).
    ``grids``: the query grids (larger side) that swap, e.g. ``(64, 32)``; None (default): the finest
    ``len(grid_steps)`` decoder grids of the model (SD1.5 at 512 px: 64 and 32; SDXL at 1024: 64 and 32).
    ``grid_steps``: one loop window per grid (default the official 64² and 32² ranges). ``contrast``: β
    (1: off). ``structure_kv``: the official code's quirk (structure K/V at every ``structure_kv_every``-th step
    before ``structure_kv_until``, inside the windows). ``CrossImageAttention(contrast=1.0)``
    """

    families: ClassVar[tuple[str, ...]] = ("unet",)
    family_note: ClassVar[str] = "cross-image attention swaps UNet decoder self-attention (up blocks)"

    def __init__(self, output: int | Sequence[int] = 0, appearance: int = 1, structure: int = 2,
                 grids: Sequence[int] | None = None, grid_steps: Sequence[Steps] = (FINE_STEPS, COARSE_STEPS),
                 contrast: float = CONTRAST, structure_kv: bool = False,
                 structure_kv_every: int | float = STRUCTURE_KV_EVERY,
                 structure_kv_until: int | float = STRUCTURE_KV_UNTIL) -> None:
        self.outputs = _rows(output, "output")
        (self.appearance,) = _rows(appearance, "appearance")
        (self.structure,) = _rows(structure, "structure")
        if {self.appearance, self.structure} & set(self.outputs):
            raise AttnkitError(f"output rows {self.outputs} overlap the appearance ({self.appearance}) or structure "
                               f"({self.structure}) row: each row has one role")
        self.grid_steps = tuple(check_window(w, "grid_steps") for w in grid_steps)
        if not self.grid_steps:
            raise AttnkitError("grid_steps is empty: give one step window per grid that swaps")
        if grids is not None:
            grids = tuple(grids)
            if len(grids) != len(self.grid_steps) or any(isinstance(g, bool) or not isinstance(g, int) or g < 1
                                                         for g in grids):
                raise AttnkitError(f"grids={grids!r}: give one grid side (int) per step window in grid_steps "
                                   f"({len(self.grid_steps)})")
        self.grids = grids
        self.contrast = check_strength(contrast, "contrast")
        self.structure_kv = bool(structure_kv)
        self.structure_kv_every = structure_kv_every
        self.structure_kv_until = structure_kv_until
        self._ranks: dict[int, int] = {}
        self._rowwise = False  # contrast on the output rows only (set on entering a block, see _alone)
        self.swapped_calls = 0  # how many attention calls swapped during the last run

    def on_enter(self, ctl: Control) -> None:
        self._ranks = {} if self.grids is not None else decoder_grid_ranks(ctl.unet)
        if self.grids is None and not self._ranks:
            raise AttnkitError("this UNet has no decoder (up-block) attention layers to swap")
        self.swapped_calls = 0
        self._rowwise = self._alone(ctl)

    def window(self, call: AttentionCall) -> Steps | bool:
        """The step window of this call's layer, or False where the layer never swaps."""
        layer = call.layer
        if layer.is_cross or layer.place != "up":
            return False
        if self.grids is not None:
            side = max(call.height, call.width)
            return self.grid_steps[self.grids.index(side)] if side in self.grids else False
        rank = self._ranks.get(layer.block)
        return self.grid_steps[rank] if rank is not None and rank < len(self.grid_steps) else False

    def active(self, call: AttentionCall) -> bool:
        """Whether the output rows swap keys and values at this call."""
        window = self.window(call)
        return window is not False and in_window(call.step, call.num_steps, window)  # type: ignore[arg-type]

    def source(self, step: int, steps: int) -> int:
        """The row whose keys and values the output takes at ``step``: the appearance, or the structure at the
        quirk's steps."""
        if self.structure_kv:
            every = max(1, step_bound(self.structure_kv_every, steps))
            if step % every == 0 and step < step_bound(self.structure_kv_until, steps):
                return self.structure
        return self.appearance

    def _check_layout(self, layout: Layout) -> None:
        needed = max(*self.outputs, self.appearance, self.structure) + 1
        if layout.prompts < needed:
            raise AttnkitError(f"cross-image attention needs rows {self.outputs} (output), {self.appearance} "
                               f"(appearance) and {self.structure} (structure) in each half, the batch has "
                               f"{layout.prompts} prompt rows: lay the batch out as [output, appearance, structure]")

    def edit_qkv(self, call: AttentionCall) -> None:
        if not self.active(call):
            return
        self._check_layout(call.layout)
        source = self.source(call.step, call.num_steps)
        key, value = call.key.clone(), call.value.clone()
        for half in call.layout.halves():
            for out in self.outputs:
                key[half.start + out] = call.key[half.start + source]
                value[half.start + out] = call.value[half.start + source]
        call.key, call.value = key, value
        self.swapped_calls += 1

    def _alone(self, ctl: Control) -> bool:
        """Whether no other controller of the block reads or edits attention maps, so the contrast may take
        the row-wise path (:meth:`edit_output`): only the output rows' probabilities are made, the other rows
        stay on fused attention. Otherwise the probability path keeps the composition exact (a store sees the
        contrasted maps, a map editor's edits are contrasted)."""
        hooks = ("wants_probs", "edit_probs", "observe", "edit_output")
        return all(c is self or all(getattr(type(c), h) is getattr(Controller, h) for h in hooks)
                   for c in ctl.controllers)

    def wants_probs(self, call: AttentionCall) -> bool:
        return self.contrast != 1.0 and not self._rowwise and self.active(call)

    def edit_output(self, call: AttentionCall, output: torch.Tensor) -> torch.Tensor:
        # the row-wise contrast: the same numbers as edit_probs, made for the output rows only
        if self.contrast == 1.0 or not self._rowwise or not self.active(call):
            return output
        out = output.clone()
        for half in call.layout.halves():
            for row in self.outputs:
                r = half.start + row
                scores = torch.matmul(call.query[r], call.key[r].transpose(-1, -2)) * call.scale
                if call.mask is not None:
                    scores = scores + call.mask[r]
                out[r] = torch.matmul(contrast(scores.softmax(dim=-1), self.contrast), call.value[r])
        return out

    def edit_probs(self, call: AttentionCall, probs: torch.Tensor) -> torch.Tensor:
        # fresh probabilities (no controller edited them before) are ours to overwrite: no copy of the batch
        out = probs if call.edited is None else probs.clone()
        for half in call.layout.halves():
            for row in self.outputs:
                out[half.start + row] = contrast(probs[half.start + row], self.contrast)
        return out


class MaskedAdaIN(Controller):
    """After each step in ``steps``, masked AdaIN of the output latent rows to the appearance row's (official
    ``get_adain_callback``). ``masks``: ``(output_mask, appearance_mask)`` at any size (resized to the latent
    grid, nearest), 1 on objects; the output's mask is the structure image's. None: plain AdaIN over all pixels
    (the official ``use_masked_adain=False``). Rows index the latents the step hook sees.
    ``MaskedAdaIN(masks=(m_structure, m_appearance))``"""

    def __init__(self, output: int | Sequence[int] = 0, appearance: int = 1,
                 masks: tuple[torch.Tensor, torch.Tensor] | None = None, steps: Steps = ADAIN_STEPS,
                 eps: float = ADAIN_EPS) -> None:
        self.outputs = _rows(output, "output")
        (self.appearance,) = _rows(appearance, "appearance")
        if masks is not None and (len(masks) != 2 or not all(isinstance(m, torch.Tensor) and m.ndim == 2
                                                               for m in masks)):
            raise AttnkitError("masks: give (output_mask, appearance_mask), two (h, w) tensors, or None")
        self.masks = masks
        self.steps = check_window(steps, "adain_steps")
        self.eps = eps
        self.applied: list[int] = []

    def on_enter(self, ctl: Control) -> None:
        self.applied = []

    def _mask(self, mask: torch.Tensor, latents: torch.Tensor) -> torch.Tensor:
        mask = mask.to(latents.device, torch.float32)
        if tuple(mask.shape) != tuple(latents.shape[-2:]):
            mask = F.interpolate(mask[None, None], size=latents.shape[-2:], mode="nearest")[0, 0]
        return mask

    def apply(self, latents: torch.Tensor) -> torch.Tensor:
        """The latents (rows, C, h, w) with the output rows AdaIN-ed to the appearance row (a new tensor)."""
        if max(*self.outputs, self.appearance) >= latents.shape[0]:
            raise AttnkitError(f"masked AdaIN needs latent rows {self.outputs} and {self.appearance}, the latents "
                               f"have {latents.shape[0]}")
        out = latents.clone()
        masks = (None, None) if self.masks is None else tuple(self._mask(m, latents) for m in self.masks)
        for row in self.outputs:
            out[row] = masked_adain(latents[row], latents[self.appearance], masks[0], masks[1], self.eps)
        return out

    def on_step_end(self, ctl: Control, step: int, tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        if "latents" not in tensors or not in_window(step, ctl.num_steps, self.steps):
            return {}
        self.applied.append(step)
        return {"latents": self.apply(tensors["latents"])}

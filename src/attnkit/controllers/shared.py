"""Shared attention: images of one batch attend to a reference image's keys and values.

Three members of one family, each a controller on :func:`attnkit.control`:

* :class:`StyleAligned` (Hertz, Voynov et al., "Style Aligned Image Generation via Shared Attention", CVPR 2024):
  targets attend to ``[K_i; K_ref]``/``[V_i; V_ref]`` with AdaIN-normalised queries and keys, so a set of prompts
  comes out in the reference's style.
* :class:`MutualSelfAttention` (Cao et al., "MasaCtrl", ICCV 2023): from a start step and layer the target's
  queries attend to the source's keys and values only, so an edit keeps the source's appearance;
  :class:`MaskedMutualSelfAttention` is the mask-guided variant (masks from attnkit's cross-attention maps).
* :class:`SubjectShare` (the attention part of ConsiStory, Tewel et al., SIGGRAPH 2024): targets see the
  reference's keys and values only inside the subject's mask, so the subject is shared and the rest of each
  image follows its own prompt.

    prompts = ["a toy train, macro photo", "a toy airplane, macro photo", "a toy car, macro photo"]
    generate(pipe, prompts, StyleAligned(), seed=1, shared_noise=False)

Batch layout: the engine's :class:`~attnkit.engine.Layout` says which rows hold which prompt in each half of a
guidance batch (one half without guidance); ``references`` and ``targets`` are prompt indices, so the same
controller works with and without guidance and for any number of targets. Every row of each half attends to
the reference row of the same half, as the official code does. References (and prompts that are neither reference
nor target) keep their own attention, so their images are exactly what they are without sharing.

Attention stays fused (SDPA): sharing changes only the keys, values and queries, plus an additive mask where
a method needs one (a score shift, a subject mask). Only self-attention layers share.
"""

from __future__ import annotations

import math
from collections import deque
from collections.abc import Sequence
from typing import Any, ClassVar

import torch
import torch.nn.functional as F

from attnkit.controllers.word_maps import WordMapSums
from attnkit.engine import (
    FAMILIES,
    STREAM_PLACES,
    UNET_PLACES,
    AttentionCall,
    AttnkitError,
    Control,
    Controller,
    LayerInfo,
    Layout,
    describe_layers,
    place_selected,
)
from attnkit.tokens import word_spans, word_token_indices

Steps = int | float | tuple[int | float, int | float] | None
ADAIN_EPS = 1e-5  # the official calc_mean_std's eps


# -- formulas -------------------------------------------------------------------------------------------------
def mean_std(x: torch.Tensor, eps: float = ADAIN_EPS) -> tuple[torch.Tensor, torch.Tensor]:
    """Mean and ``sqrt(var + eps)`` over tokens (dim -2) per row, head and channel; ``var`` is unbiased, as
    in the official ``calc_mean_std``. ``mean, std = mean_std(query)  # (B, H, 1, D) each``"""
    return x.mean(dim=-2, keepdim=True), (x.var(dim=-2, keepdim=True) + eps).sqrt()


def adain(x: torch.Tensor, to_mean: torch.Tensor, to_std: torch.Tensor, eps: float = ADAIN_EPS) -> torch.Tensor:
    """AdaIN over tokens: ``(x − μ(x)) / σ(x) · σ_ref + μ_ref``. ``adain(q, *mean_std(q_ref))``"""
    mean, std = mean_std(x, eps)
    return (x - mean) / std * to_std + to_mean


def switch_vector(count: int, level: float) -> list[bool]:
    """Style Aligned's layer rule (``only_self_level``): which of ``count`` self-attention layers keep their
    own attention (True) instead of sharing. ``level`` is the fraction kept: every ``count // int(level·count)``-th
    layer from the first (levels above 0.5: the complement of that rule for ``1 − level``).
    ``switch_vector(16, 0.25)`` keeps layers 0, 4, 8, 12. A level too small to keep one layer keeps none (the
    official code divides by zero there)."""
    if isinstance(level, bool) or not isinstance(level, (int, float)) or not 0.0 <= level <= 1.0:
        raise AttnkitError(f"only_self_level={level!r}: give the fraction of self-attention layers that keep "
                           "their own attention, from 0 (all share, the default) to 1 (none share)")
    if level == 0:
        return [False] * count
    if level == 1:
        return [True] * count
    flip = level > 0.5
    chosen = int((1 - level if flip else level) * count)
    keep = [False] * count if chosen == 0 else [i % (count // chosen) == 0 for i in range(count)]
    return [not k for k in keep] if flip else keep


def otsu_threshold(values: torch.Tensor, bins: int = 256) -> float:
    """Otsu's threshold of ``values`` (a 256-bin histogram, as ``skimage.filters.threshold_otsu``): the bin
    centre that maximises the between-class variance; ``values > t`` is the foreground."""
    v = values.detach().flatten().double()
    lo, hi = float(v.min()), float(v.max())
    if hi <= lo:
        return lo
    hist = torch.histc(v, bins=bins, min=lo, max=hi)
    centers = lo + (torch.arange(bins, dtype=torch.float64) + 0.5) * (hi - lo) / bins
    w1, w2 = hist.cumsum(0), hist.flip(0).cumsum(0).flip(0)
    m1 = (hist * centers).cumsum(0) / w1.clamp_min(1e-12)
    m2 = (hist * centers).flip(0).cumsum(0).flip(0) / w2.clamp_min(1e-12)
    between = w1[:-1] * w2[1:] * (m1[:-1] - m2[1:]) ** 2
    return float(centers[int(between.argmax())])


# -- which layers and steps -------------------------------------------------------------------------------------
def self_layers(layers: dict[str, LayerInfo]) -> list[LayerInfo]:
    """The self-attention layers of a UNet in forward order (down, mid, up): what ``layers=`` numbers count."""
    return sorted((info for info in layers.values() if not info.is_cross), key=lambda info: info.index)


def _check_places(places: Sequence[str]) -> tuple[str, ...]:
    places = (places,) if isinstance(places, str) else tuple(places)
    for place in places:
        if place not in UNET_PLACES + STREAM_PLACES:
            raise AttnkitError(f"unknown place {place!r}: use 'down', 'mid' and/or 'up' (UNet), 'double' and/or "
                               "'single' (transformer streams)")
    if not places:
        raise AttnkitError("places is empty: name at least one of 'down', 'mid', 'up' (or 'double', 'single')")
    return places


def _explicit_layers(chosen: Sequence[int | str], layers: dict[str, LayerInfo]) -> list[LayerInfo]:
    ordered = self_layers(layers)
    by_name = {info.name: info for info in ordered}
    by_name.update({info.name.removesuffix(".processor"): info for info in ordered})
    found = []
    for item in chosen:
        if isinstance(item, bool) or not isinstance(item, (int, str)):
            raise AttnkitError(f"layers entry {item!r}: give self-attention layer numbers (0..{len(ordered) - 1}) "
                               "or layer names")
        if isinstance(item, int):
            if not 0 <= item < len(ordered):
                raise AttnkitError(f"layer {item} does not exist: this UNet has {len(ordered)} self-attention "
                                   f"layers, numbered 0..{len(ordered) - 1} in forward order")
            found.append(ordered[item])
        elif item in by_name:
            found.append(by_name[item])
        elif item in layers or item + ".processor" in layers:
            raise AttnkitError(f"layer {item!r} is a cross-attention layer: shared attention works on "
                               "self-attention layers (attn1)")
        else:
            raise AttnkitError(f"no attention layer is named {item!r}; self-attention layers are e.g. "
                               f"{ordered[0].name!r}")
    if not found:
        raise AttnkitError("layers is empty: name at least one self-attention layer, or pass layers=None")
    return found


def _start(value: int | float, count: int, what: str) -> int:
    """An int start index, or a float fraction of ``count`` (``int(f · count)``)."""
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise AttnkitError(f"{what}={value!r}: give an index (int) or a fraction of the total (float in [0, 1])")
    if isinstance(value, float):
        if not 0.0 <= value <= 1.0:
            raise AttnkitError(f"{what}={value!r}: a fraction must lie in [0, 1]")
        return int(value * count)
    if value < 0:
        raise AttnkitError(f"{what}={value!r} is negative")
    return value


def _in_steps(step: int, num_steps: int, steps: Steps) -> bool:
    """``steps``: None (all), an int start step, a float start fraction, or a ``(start, end)`` pair (ints:
    indices, end exclusive; floats: fractions of the steps)."""
    if steps is None:
        return True
    if isinstance(steps, tuple):
        start, end = (_start(s, num_steps, "steps") for s in steps)
        return start <= step < end
    return step >= _start(steps, num_steps, "steps")


def _check_steps(steps: Steps) -> Steps:
    if isinstance(steps, list):
        steps = tuple(steps)
    if steps is None:
        return None
    if isinstance(steps, tuple):
        if len(steps) != 2:
            raise AttnkitError(f"steps={steps!r}: give a start, or a (start, end) pair")
        for s in steps:
            _start(s, 1_000_000, "steps")
        return steps
    _start(steps, 1_000_000, "steps")
    return steps


def _indices(values: int | Sequence[int] | None, what: str) -> tuple[int, ...] | None:
    if values is None:
        return None
    items = (values,) if isinstance(values, int) else tuple(values)
    for v in items:
        if isinstance(v, bool) or not isinstance(v, int) or v < 0:
            raise AttnkitError(f"{what} must be prompt indices (ints >= 0), got {values!r}")
    if len(set(items)) != len(items):
        raise AttnkitError(f"{what} {values!r} names a prompt twice")
    return items


# -- the family's shared machinery ----------------------------------------------------------------------------
class SharedAttention(Controller):
    """Base of the shared-attention controllers: batch roles (references, targets), layer and step selection.

    ``references``: prompt indices whose keys/values are shared (default the first prompt); ``targets``: the
    prompts that attend to them (default every other prompt). ``layers``: self-attention layer numbers in
    forward order (0 = the first down-block layer) or layer names; ``places``: which parts of the UNet;
    ``steps``: None (all), a start (int step, float fraction) or a ``(start, end)`` pair.
    """

    families: ClassVar[tuple[str, ...]] = ("unet",)
    family_note: ClassVar[str] = ("it is written for UNet self-attention (on MM-DiT models StyleAligned shares "
                                  "attention, with the reference's RoPE positions shifted as AlignedGen does)")

    def __init__(self, references: int | Sequence[int] = (0,), targets: int | Sequence[int] | None = None,
                 layers: Sequence[int | str] | None = None, places: Sequence[str] = ("down", "mid", "up"),
                 steps: Steps = None) -> None:
        self.references = _indices(references, "references")
        if not self.references:
            raise AttnkitError("references is empty: name the prompt (index) whose attention is shared")
        self.targets = _indices(targets, "targets")
        if self.targets is not None and set(self.targets) & set(self.references):
            raise AttnkitError(f"prompts {sorted(set(self.targets) & set(self.references))} are both reference "
                               "and target: a reference keeps its own attention")
        self.layers = None if layers is None else tuple(layers)
        self.places = _check_places(places)
        self.steps = _check_steps(steps)
        self._names: set[str] = set()
        self._roles_cache: dict[int, tuple[tuple[int, ...], tuple[int, ...]]] = {}
        self._ctl: Control | None = None

    # -- layers ------------------------------------------------------------------------------------------
    def shared_layers(self, layers: dict[str, LayerInfo], unet: Any = None) -> list[LayerInfo]:
        """The self-attention layers this controller acts on (raises for an invalid selection)."""
        chosen = _explicit_layers(self.layers, layers) if self.layers is not None else self_layers(layers)
        # places of the other model family do not restrict (the engine's rule): the default takes every layer
        return [info for info in chosen if place_selected(info.place, self.places)]

    def check(self, pipe: Any) -> list[str]:
        """Validate the selection against ``pipe``'s denoiser before sampling; returns the shared layers' names."""
        from attnkit.adapters import adapter_for

        model = adapter_for(pipe).model
        unet = getattr(pipe, "unet", None)
        return self._selected(describe_layers(model), unet)

    def _selected(self, layers: dict[str, LayerInfo], unet: Any) -> list[str]:
        names = [info.name for info in self.shared_layers(layers, unet)]
        if not names:
            raise AttnkitError(f"no self-attention layer is selected (places={self.places}, layers={self.layers}): "
                               "widen the selection")
        return names

    def on_enter(self, ctl: Control) -> None:
        self._ctl = ctl
        self._names = set(self._selected(ctl.layers, ctl.unet))
        self._index_cache: dict[tuple, tuple[torch.Tensor, torch.Tensor]] = {}

    def active(self, call: AttentionCall) -> bool:
        """Whether this call shares: a selected self-attention layer at a selected step."""
        return (not call.is_cross and call.layer.name in self._names
                and _in_steps(call.step, call.num_steps, self.steps))

    # -- batch roles -------------------------------------------------------------------------------------
    def roles(self, prompts: int) -> tuple[tuple[int, ...], tuple[int, ...]]:
        """(references, targets) as prompt indices for a batch of ``prompts`` prompts."""
        if prompts not in self._roles_cache:
            bad = [i for i in (*self.references, *(self.targets or ())) if i >= prompts]
            if bad:
                raise AttnkitError(f"prompt index {bad[0]} is out of range: the batch has {prompts} prompts "
                                   f"(references={self.references}, targets={self.targets})")
            targets = self.targets if self.targets is not None else \
                tuple(i for i in range(prompts) if i not in self.references)
            if not targets:
                raise AttnkitError(f"no target prompt: the batch has {prompts} prompts and all are references; "
                                   "shared attention needs at least 2 prompts")
            self._roles_cache[prompts] = (self.references, targets)
        return self._roles_cache[prompts]

    def reference_index(self, layout: Layout, device: Any) -> tuple[torch.Tensor, torch.Tensor]:
        """``index`` (batch, R): for each UNet row, the rows of the references it attends to (a target row: the
        references of its half; any other row: itself, R times), and ``is_target`` (batch,) bool."""
        key = (layout, str(device))
        cache = getattr(self, "_index_cache", None)
        if cache is not None and key in cache:
            return cache[key]
        refs, targets = self.roles(layout.prompts)
        index = torch.arange(layout.batch).unsqueeze(1).repeat(1, len(refs))
        is_target = torch.zeros(layout.batch, dtype=torch.bool)
        for half in layout.halves():
            for t in targets:
                index[half.start + t] = torch.tensor([half.start + r for r in refs])
                is_target[half.start + t] = True
        result = index.to(device), is_target.to(device)
        if cache is not None:
            cache[key] = result
        return result


def _no_mask(call: AttentionCall, what: str) -> None:
    if call.mask is not None:
        raise AttnkitError(f"{what} got an attention mask on a self-attention layer, which it cannot extend; "
                           "call the pipeline without attention masks")


def _gather(x: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
    """Rows ``index`` (B, R) of ``x`` (B, H, N, D) side by side along tokens: (B, H, R·N, D)."""
    b, h, n, d = x.shape
    return x[index].permute(0, 2, 1, 3, 4).reshape(b, h, index.shape[1] * n, d)


# -- Style Aligned -----------------------------------------------------------------------------------------
class StyleAligned(SharedAttention):
    """Style Aligned shared attention (Hertz, Voynov et al., CVPR 2024; google/style-aligned ``sa_handler.py``).

    Usage::

        with control(pipe, StyleAligned(shift=math.log(2))) as ctl: ...
        generate(pipe, prompts, StyleAligned(), seed=1, shared_noise=False)

    In each selected self-attention layer, target ``i`` computes, per head,
    ``softmax([Q̂ K̂_iᵀ, s·Q̂ K_refᵀ]·d^-½ + [0, shift]) · [V̂_i; V_ref]`` where ``Q̂, K̂_i`` (and ``V̂_i`` with
    ``adain_values``) are AdaIN-normalised to the reference's mean and std over tokens (per head and channel;
    unbiased variance, eps 1e-5), ``s = scale`` and ``shift`` adds ``log``-weight to the reference columns
    (``math.log(2)`` doubles their pull; the transfer notebook's setting). Several references: the target sees
    all of them side by side and AdaIN uses the mean of their statistics. With ``shift = 0`` the layer runs
    plain fused SDPA; otherwise SDPA with an additive mask.

    ``only_self_level`` keeps that fraction of the self-attention layers unshared by the official rule
    (:func:`switch_vector`, counted in the order of ``unet.attn_processors``, as the official code: down, up,
    mid); ``layers=`` picks layers explicitly (self-attention numbers in forward order, or names) and
    ``places``/``steps`` narrow further. ``share_group_norm`` makes every GroupNorm of the UNet normalise each
    target with the joint statistics of itself and the references (the official ``register_shared_norm``);
    ``None`` (default) turns it on for SD1.x/2.x and off for SDXL, as the official notebooks. The official
    ``share_layer_norm`` has no effect (LayerNorm is per token) and is not offered.

    Differences from the official code (deliberate): the reference's own row attends only to itself (the official
    code gives it ``[K_ref; K_ref]``, the same attention up to rounding) and its own keys enter the targets
    un-normalised (official: AdaIN-normalised to themselves, the identity up to rounding), so the reference's
    output is unchanged to the last bits of SDPA.

    MM-DiT models (SD3, FLUX): the self view of each joint layer (image queries × image keys) shares; text
    tokens keep their own attention. Where the layer's queries and keys carry positions (FLUX's RoPE,
    ``call.positions``), concatenated reference keys would sit at the targets' own positions, each target pixel
    seeing two keys at relative distance 0; with ``shift_positions`` (default) reference ``j`` is moved
    ``(j + 1)`` image widths to the right, as AlignedGen shifts its reference's position ids
    (``ids[:, 2] += width // 16``), and AdaIN runs on the position-free queries and keys (AlignedGen normalises
    before RoPE). AlignedGen shares in FLUX's single-stream blocks only: ``places=("single",)``.
    """

    families: ClassVar[tuple[str, ...]] = FAMILIES

    def __init__(self, references: int | Sequence[int] = (0,), targets: int | Sequence[int] | None = None, *,
                 scale: float = 1.0, shift: float = 0.0, adain_queries: bool = True, adain_keys: bool = True,
                 adain_values: bool = False, share_attention: bool = True, share_group_norm: bool | None = None,
                 only_self_level: float = 0.0, layers: Sequence[int | str] | None = None,
                 places: Sequence[str] = ("down", "mid", "up"), steps: Steps = None,
                 shift_positions: bool = True) -> None:
        super().__init__(references, targets, layers, places, steps)
        self.shift_positions = bool(shift_positions)
        for name, value in (("scale", scale), ("shift", shift)):
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
                raise AttnkitError(f"{name}={value!r}: give a finite number")
        self.scale, self.shift = float(scale), float(shift)
        self.adain_queries, self.adain_keys, self.adain_values = adain_queries, adain_keys, adain_values
        self.share_attention = share_attention
        self.share_group_norm = share_group_norm
        switch_vector(1, only_self_level)  # validate now
        self.only_self_level = float(only_self_level)
        self._hooks: list[Any] = []

    def shared_layers(self, layers: dict[str, LayerInfo], unet: Any = None) -> list[LayerInfo]:
        chosen = super().shared_layers(layers, unet)
        if self.only_self_level == 0.0:
            return chosen
        # The official rule indexes self-attention layers in unet.attn_processors order (down, up, mid).
        registered = [n for n in (unet.attn_processors if unet is not None else layers) if not layers[n].is_cross]
        keep = switch_vector(len(registered), self.only_self_level)
        unshared = {name for name, k in zip(registered, keep, strict=True) if k}
        return [info for info in chosen if info.name not in unshared]

    def _selected(self, layers: dict[str, LayerInfo], unet: Any) -> list[str]:
        if not self.share_attention and self.share_group_norm:
            return [info.name for info in self.shared_layers(layers, unet)]  # group norms only: may be none
        return super()._selected(layers, unet)

    # -- attention ---------------------------------------------------------------------------------------
    def edit_qkv(self, call: AttentionCall) -> None:
        if not self.share_attention or not self.active(call):
            return
        _no_mask(call, "StyleAligned")
        index, is_target = self.reference_index(call.layout, call.query.device)
        target = is_target.view(-1, 1, 1, 1)
        q, k, v = call.query, call.key, call.value
        n = k.shape[-2]
        positions = call.positions  # set where queries/keys carry token positions (FLUX's RoPE)

        def normalised(x: torch.Tensor, positional: bool = False) -> torch.Tensor:
            free = positions.remove(x) if positional and positions is not None else x
            mean, std = mean_std(free)
            to_mean, to_std = mean[index].mean(dim=1), std[index].mean(dim=1)
            out = (free - mean) / std * to_std + to_mean
            if positional and positions is not None:
                out = positions.apply(out)
            return torch.where(target, out, x)

        extra_k, extra_v = _gather(k, index), _gather(v, index)  # the references' raw keys/values
        if positions is not None and self.shift_positions:
            # reference j beside the image, (j + 1) widths to the right: no key shares a target token's position.
            # Other rows attend to exact copies of their own keys, which leaves their output as it is: keep those.
            blocks = extra_k.split(n, dim=-2)
            moved = torch.cat([positions.shift(b, cols=(j + 1) * call.width) for j, b in enumerate(blocks)], dim=-2)
            extra_k = torch.where(target, moved, extra_k)
        if self.scale != 1.0:
            extra_k = torch.where(target, extra_k * self.scale, extra_k)
        if self.adain_queries:
            q = normalised(q, positional=True)
        if self.adain_keys:
            k = normalised(k, positional=True)
        if self.adain_values:
            v = normalised(v)
        call.query = q
        call.key = torch.cat([k, extra_k], dim=-2)
        call.value = torch.cat([v, extra_v], dim=-2)
        # On a joint (MM-DiT) layer the text keys share this softmax: copies of a row's own image keys would
        # double their weight against the text, so other rows' copies are masked out there (AlignedGen's
        # constrain_first). Alone in its softmax (a UNet), a row's copies leave its output as it is: no mask.
        joint = call.tokens is not None
        if self.shift != 0.0 or joint:
            mask = torch.zeros(k.shape[0], 1, 1, call.key.shape[-2], dtype=q.dtype, device=q.device)
            mask[is_target, :, :, n:] = self.shift
            if joint:
                mask[~is_target.to(mask.device), :, :, n:] = float("-inf")
            call.mask = mask

    # -- group norm ---------------------------------------------------------------------------------------
    def _group_norm_on(self, model: Any) -> bool:
        if self.share_group_norm is not None:
            return bool(self.share_group_norm)
        return getattr(model.config, "addition_embed_type", None) != "text_time"  # off for SDXL

    def on_enter(self, ctl: Control) -> None:
        super().on_enter(ctl)
        self._hooks = []
        if self._group_norm_on(ctl.model):
            for module in ctl.model.modules():  # MM-DiT transformers have none
                if isinstance(module, torch.nn.GroupNorm):
                    self._hooks.append(module.register_forward_hook(self._shared_group_norm))

    def on_exit(self, ctl: Control) -> None:
        for hook in self._hooks:
            hook.remove()
        self._hooks = []

    def _shared_group_norm(self, module: torch.nn.GroupNorm, inputs: tuple, output: torch.Tensor) -> Any:
        ctl = self._ctl
        layout = None if ctl is None else ctl.state.layout
        x = inputs[0]
        if layout is None or x.shape[0] != layout.batch or not _in_steps(ctl.state.step, ctl.state.num_steps,
                                                                           self.steps):
            return None
        return shared_group_norm(module, x, output, *self.reference_index(layout, x.device))


def shared_group_norm(module: torch.nn.GroupNorm, x: torch.Tensor, output: torch.Tensor, index: torch.Tensor,
                      is_target: torch.Tensor) -> torch.Tensor:
    """GroupNorm of each target row with the statistics of itself and its references pooled (equal weights,
    biased variance, as ``GroupNorm`` of ``[x_i; x_ref]`` concatenated along space); other rows keep ``output``.
    ``shared_group_norm(gn, x, gn(x), *controller.reference_index(layout, x.device))``"""
    rows = is_target.nonzero().flatten()
    if len(rows) == 0:
        return output
    b, groups = x.shape[0], module.num_groups
    grouped = x.reshape(b, groups, -1)
    mean = grouped.mean(dim=-1)
    var = grouped.var(dim=-1, unbiased=False)
    members = torch.cat([rows.unsqueeze(1), index[rows]], dim=1)  # (targets, 1 + R): itself and its references
    joint_mean = mean[members].mean(dim=1)
    joint_var = (var[members] + (mean[members] - joint_mean.unsqueeze(1)) ** 2).mean(dim=1)
    normed = (grouped[rows] - joint_mean.unsqueeze(-1)) / (joint_var.unsqueeze(-1) + module.eps).sqrt()
    normed = normed.reshape(len(rows), *x.shape[1:])
    if module.affine:
        shape = (1, -1) + (1,) * (x.dim() - 2)
        normed = normed * module.weight.view(shape) + module.bias.view(shape)
    out = output.clone()
    out[rows] = normed.to(output.dtype)
    return out


# -- MasaCtrl ----------------------------------------------------------------------------------------------
class MutualSelfAttention(SharedAttention):
    """MasaCtrl's mutual self-attention (Cao et al., ICCV 2023; TencentARC/MasaCtrl ``masactrl.py``).

    Usage: ``MutualSelfAttention(start_step=4, start_layer=10)`` on the batch ``[source, target, ...]``.

    From step ``start_step`` and self-attention layer ``start_layer`` on (official: step 4 of 50, layer 10 of
    the 16 in SD1.x, i.e. the decoder's two finest resolutions), every target's queries attend to the source's
    keys and values only: ``softmax(Q_t K_srcᵀ·d^-½) V_src``, per half of a guidance batch. The source keeps its
    own attention. ``start_layer`` is a self-attention layer number in forward order or a fraction of them
    (default ``0.625`` = 10 of 16); ``start_step`` a step index or a fraction of the steps. ``layers=`` /
    ``steps=`` (a ``(start, end)`` pair) select explicitly instead.
    """

    def __init__(self, source: int = 0, targets: int | Sequence[int] | None = None, *, start_step: int | float = 4,
                 start_layer: int | float = 0.625, layers: Sequence[int | str] | None = None,
                 steps: Steps = None, places: Sequence[str] = ("down", "mid", "up")) -> None:
        _start(start_step, 1_000_000, "start_step")
        _start(start_layer, 1_000_000, "start_layer")
        super().__init__(source, targets, layers, places, steps if steps is not None else start_step)
        self.source = source
        self.start_step, self.start_layer = start_step, start_layer

    def shared_layers(self, layers: dict[str, LayerInfo], unet: Any = None) -> list[LayerInfo]:
        chosen = super().shared_layers(layers, unet)
        if self.layers is not None:
            return chosen
        ordered = self_layers(layers)
        first = _start(self.start_layer, len(ordered), "start_layer")
        if first >= len(ordered):
            raise AttnkitError(f"start_layer={self.start_layer!r}: this UNet has {len(ordered)} self-attention "
                               f"layers (0..{len(ordered) - 1}); start at one of them")
        late = {info.name for info in ordered[first:]}
        return [info for info in chosen if info.name in late]

    def edit_qkv(self, call: AttentionCall) -> None:
        if not self.active(call):
            return
        _no_mask(call, "MutualSelfAttention")
        index, is_target = self.reference_index(call.layout, call.key.device)
        rows = index[:, 0]  # a target row: the source row of its half; any other row: itself
        call.key, call.value = call.key[rows], call.value[rows]
        mask = self.attention_mask(call, is_target)
        if mask is not None:
            call.mask = mask

    def attention_mask(self, call: AttentionCall, is_target: torch.Tensor) -> torch.Tensor | None:
        """An additive mask over the source's keys for the target rows (None: plain mutual attention)."""
        return None


class _WordMaps:
    """Per prompt, the cross-attention map of chosen tokens on one grid (mean over layers and heads, summed over
    the tokens), kept per step for the last ``window`` steps. The grid is LocalBlend's
    (:func:`attnkit.controllers.word_maps.default_grid`), or ``res``."""

    def __init__(self, tokens: list[list[int]], res: int | None, window: int, owner: str) -> None:
        self.current = WordMapSums([tokens], res, owner)
        self.window = window
        self.reset()

    def reset(self) -> None:
        self.current.reset()
        self.history: deque[torch.Tensor] = deque(maxlen=self.window)

    def observe(self, call: AttentionCall) -> None:
        self.current.observe(call)

    def end_step(self, latent_hw: tuple[int, int]) -> None:
        if not self.current.seen:
            return
        self.current.choose(latent_hw)
        (total,), count = self.current.get()
        self.history.append(total[:, 0] / count)
        self.current.sums = {}

    def mean(self) -> torch.Tensor | None:
        """The maps ``(P, h, w)`` averaged over the kept steps, or None before the first step ended."""
        return torch.stack(list(self.history)).mean(dim=0) if self.history else None


def _word_tokens(tokenizer: Any, prompts: Sequence[str], words: str | Sequence[str], what: str) -> list[list[int]]:
    """Token positions of ``words`` (one word for every prompt, or one per prompt) in each prompt."""
    prompts = list(prompts)
    per_prompt = [words] * len(prompts) if isinstance(words, str) else list(words)
    if len(per_prompt) != len(prompts):
        raise AttnkitError(f"{what}: give one word for all prompts or one per prompt ({len(prompts)}), "
                           f"got {len(per_prompt)}")
    tokens = []
    for prompt, word in zip(prompts, per_prompt, strict=True):
        try:
            tokens.append(word_token_indices(tokenizer, prompt, word))
        except AttnkitError:
            words = ", ".join(repr(s.word) for s in word_spans(tokenizer, prompt))
            raise AttnkitError(f"{what} {word!r} is not in the prompt {prompt!r} (its words: {words}); every "
                               f"prompt must contain it, or give one {what} per prompt") from None
    return tokens


class _MasksFromWordMaps:
    """The hooks of a controller whose masks come from ``self.maps`` (a :class:`_WordMaps`): maps read on every
    cross-attention call, closed at each step's end, and the masks cached per step (``self._cache``)."""

    maps: _WordMaps

    def on_enter(self, ctl: Control) -> None:
        super().on_enter(ctl)  # type: ignore[misc]
        self.maps.reset()
        self._cache: dict[tuple[int, int, int], torch.Tensor] = {}

    def observe(self, call: AttentionCall) -> None:
        self.maps.observe(call)

    def on_step_end(self, ctl: Control, step: int, tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        self.maps.end_step(ctl.state.latent_hw)
        self._cache = {}
        return {}


class MaskedMutualSelfAttention(_MasksFromWordMaps, MutualSelfAttention):
    """Mask-guided MasaCtrl (the official ``MutualSelfAttentionControlMaskAuto``): the foreground of each target
    attends to the source's foreground only, and the background to the background.

    Usage: ``MaskedMutualSelfAttention(prompts, pipe.tokenizer, "cat")`` (or ``("cat", "dog")``, one word per
    prompt).

    The masks come from attnkit's cross-attention maps of ``words`` (summed over a word's tokens, mean over the
    grid's layers and heads, conditional rows): min-max normalised, nearest-resized to the layer's grid and
    thresholded at ``threshold`` (official 0.1). A target query in its own mask attends to source keys in the
    source's mask, a query outside to keys outside: one fused SDPA call with an additive mask, which equals the
    official foreground/background blend for binary masks. Maps are averaged over the last ``window`` completed
    steps (official: the current step's 16x16 layers so far; the previous step's here, which does not depend on
    the order of layers); until a step has ended, attention is unmasked. Where the source's mask is empty or
    covers everything, that target attends to all of the source's keys (the official code degenerates there).
    """

    def __init__(self, prompts: Sequence[str], tokenizer: Any, words: str | Sequence[str], source: int = 0,
                 targets: int | Sequence[int] | None = None, *, threshold: float = 0.1, res: int | None = None,
                 window: int = 1, start_step: int | float = 4, start_layer: int | float = 0.625,
                 layers: Sequence[int | str] | None = None, steps: Steps = None,
                 places: Sequence[str] = ("down", "mid", "up")) -> None:
        super().__init__(source, targets, start_step=start_step, start_layer=start_layer, layers=layers,
                         steps=steps, places=places)
        if not 0.0 <= threshold <= 1.0:
            raise AttnkitError(f"threshold={threshold!r}: masks are thresholded after min-max normalisation; "
                               "give a value in [0, 1]")
        if window < 1:
            raise AttnkitError(f"window={window!r}: average the maps of at least 1 step")
        self.prompts = list(prompts)
        self.roles(len(self.prompts))
        self.threshold = float(threshold)
        self.maps = _WordMaps(_word_tokens(tokenizer, self.prompts, words, "mask word"), res, window,
                              "MaskedMutualSelfAttention")
        self.words = words


    def masks(self, height: int, width: int) -> torch.Tensor | None:
        """The binary masks ``(prompts, height·width)`` used at a layer of that grid, or None."""
        maps = self.maps.mean()
        if maps is None:
            return None
        key = (len(self.maps.history), height, width)
        if key not in self._cache:
            lo = maps.amin(dim=(1, 2), keepdim=True)
            hi = maps.amax(dim=(1, 2), keepdim=True)
            normed = (maps - lo) / (hi - lo).clamp_min(torch.finfo(maps.dtype).tiny)
            resized = F.interpolate(normed.unsqueeze(1), size=(height, width)).flatten(1)  # nearest, as official
            self._cache[key] = resized >= self.threshold
        return self._cache[key]

    def attention_mask(self, call: AttentionCall, is_target: torch.Tensor) -> torch.Tensor | None:
        masks = self.masks(call.height, call.width)
        if masks is None:
            return None
        masks = masks.to(call.query.device)
        refs, targets = self.roles(call.layout.prompts)
        source = masks[refs[0]]
        if bool(source.all()) or not bool(source.any()):
            return None  # no foreground/background split of the source's keys
        q = call.query.shape[-2]
        bias = torch.zeros(call.layout.batch, 1, q, q, dtype=call.query.dtype, device=call.query.device)
        for half in call.layout.halves():
            for t in targets:
                same = masks[t].unsqueeze(1) == source.unsqueeze(0)  # query in fg ↔ key in fg
                bias[half.start + t, 0] = torch.where(same, 0.0, float("-inf"))
        return bias


# -- ConsiStory's subject-driven shared attention ----------------------------------------------------------
class SubjectShare(_MasksFromWordMaps, SharedAttention):
    """Subject-driven shared self-attention, the attention part of ConsiStory (Tewel et al., SIGGRAPH 2024;
    NVlabs/consistory ``attention_processor.py``).

    Usage: ``SubjectShare(prompts, pipe.tokenizer, "dog")`` (every prompt names the subject).

    Each target attends to ``[K_i; K_ref]``/``[V_i; V_ref]`` with the reference's tokens outside its subject mask
    masked out (an additive −inf), so the subject's appearance is shared and the rest follows each prompt. The
    mask: the subject word's cross-attention (summed over its tokens, mean over heads and the layers of one
    grid, conditional rows) averaged over the last ``window`` steps (official 20), resized bilinearly to the
    layer's grid and thresholded by Otsu's method (:func:`otsu_threshold`, or a fixed ``threshold`` in the
    maps' units); then each mask pixel is dropped with probability ``mask_dropout`` (official 0.5, for layout
    diversity), drawn anew every step from a generator seeded with ``seed``. Sharing starts at step
    ``start_step`` (official 1: the first step makes the first masks) in the ``places`` parts of the UNet
    (official: the decoder only). References keep their own attention. Not included: ConsiStory's query
    sharing in early steps and its DIFT feature injection, which need a second pass.
    """

    def __init__(self, prompts: Sequence[str], tokenizer: Any, subject: str | Sequence[str],
                 references: int | Sequence[int] = (0,), targets: int | Sequence[int] | None = None, *,
                 mask_dropout: float = 0.5, start_step: int | float = 1, places: Sequence[str] = ("up",),
                 layers: Sequence[int | str] | None = None, steps: Steps = None, window: int = 20,
                 threshold: float | str = "otsu", res: int | None = None, seed: int = 0) -> None:
        super().__init__(references, targets, layers, places, steps if steps is not None else start_step)
        if isinstance(mask_dropout, bool) or not 0.0 <= float(mask_dropout) < 1.0:
            raise AttnkitError(f"mask_dropout={mask_dropout!r}: give the probability of dropping a mask pixel, "
                               "in [0, 1)")
        if window < 1:
            raise AttnkitError(f"window={window!r}: average the maps of at least 1 step")
        if threshold != "otsu" and (isinstance(threshold, (bool, str)) or not math.isfinite(float(threshold))):
            raise AttnkitError(f"threshold={threshold!r}: use 'otsu' or a number")
        self.prompts = list(prompts)
        self.roles(len(self.prompts))
        self.subject = subject
        self.mask_dropout, self.threshold, self.seed = float(mask_dropout), threshold, int(seed)
        self.maps = _WordMaps(_word_tokens(tokenizer, self.prompts, subject, "subject word"), res, window,
                              "SubjectShare")

    def on_enter(self, ctl: Control) -> None:
        super().on_enter(ctl)
        self._generator = torch.Generator("cpu").manual_seed(self.seed)
        self.last_masks: dict[tuple[int, int], torch.Tensor] = {}

    def masks(self, height: int, width: int) -> torch.Tensor | None:
        """The references' subject masks ``(R, height·width)`` after dropout at this step, or None."""
        maps = self.maps.mean()
        if maps is None:
            return None
        key = (len(self.maps.history), height, width)
        if key not in self._cache:
            refs = list(self.references)
            resized = F.interpolate(maps[refs].unsqueeze(1), size=(height, width), mode="bilinear",
                                    align_corners=False).flatten(1)
            masks = torch.stack([m > (otsu_threshold(m) if self.threshold == "otsu" else float(self.threshold))
                                 for m in resized])
            self.last_masks[(height, width)] = masks.cpu()
            if self.mask_dropout > 0:
                keep = torch.rand(masks.shape, generator=self._generator) >= self.mask_dropout
                masks = masks & keep.to(masks.device)
            self._cache[key] = masks
        return self._cache[key]

    def edit_qkv(self, call: AttentionCall) -> None:
        if not self.active(call):
            return
        masks = self.masks(call.height, call.width)
        if masks is None:
            return
        _no_mask(call, "SubjectShare")
        index, is_target = self.reference_index(call.layout, call.key.device)
        k, v = call.key, call.value
        b, n = k.shape[0], k.shape[-2]
        call.key = torch.cat([k, _gather(k, index)], dim=-2)
        call.value = torch.cat([v, _gather(v, index)], dim=-2)
        blocked = torch.full((b, index.shape[1], n), float("-inf"), dtype=k.dtype, device=k.device)
        open_ = torch.zeros_like(blocked)
        visible = masks.to(k.device).unsqueeze(0).expand(b, -1, -1)  # (B, R, N): reference j's subject pixels
        extra = torch.where(visible & is_target.view(-1, 1, 1), open_, blocked).reshape(b, 1, 1, -1)
        call.mask = torch.cat([torch.zeros(b, 1, 1, n, dtype=k.dtype, device=k.device), extra], dim=-1)

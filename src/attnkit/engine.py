"""The attention-control engine: one processor layer that every attnkit method plugs into.

``control(pipe, *controllers)`` installs an :class:`AttnkitProcessor` on every attention layer of the
pipeline's UNet, tracks the denoising step and the batch layout explicitly, and restores the exact previous
processors on exit (also when an exception is raised inside the block)::

    with attnkit.control(pipe, store := AttentionStore()) as ctl:
        image = pipe("a red circle", callback_on_step_end=ctl.callback).images[0]

Layers that no controller needs at the current call run fused attention (SDPA), exactly as diffusers'
``AttnProcessor2_0`` does, so an uncontrolled layer costs nothing extra. Probabilities drive the output only
where a controller edits them (:meth:`Controller.wants_probs`); read-only controllers (:meth:`Controller.observe`)
compute the maps they read on the side, so the output stays bit-identical to the stock processor's.
"""

from __future__ import annotations

import math
import re
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any, Literal

import torch
import torch.nn.functional as F

Place = Literal["down", "mid", "up"]

# Processor classes that compute plain attention; anything else carries behaviour we would silently drop.
_PLAIN_PROCESSORS = ("AttnProcessor", "AttnProcessor2_0")
_CONFLICT_FIXES = {
    "SlicedAttnProcessor": "attention slicing is enabled: call pipe.disable_attention_slicing() first",
    "XFormersAttnProcessor": "xformers attention is enabled: call pipe.disable_xformers_memory_efficient_attention() first",
    "FusedAttnProcessor2_0": "fused QKV projections are enabled: call pipe.unfuse_qkv_projections() first",
}
_NAME_PATTERN = re.compile(
    r"^(?:(?P<place>down|up)_blocks\.(?P<block>\d+)|mid_block)\.attentions\.(?P<attention>\d+)"
    r"\.transformer_blocks\.(?P<transformer>\d+)\.attn(?P<attn>\d+)\.processor$"
)


class AttnkitError(ValueError):
    """A problem with the user's input or set-up; the message names the problem and the fix."""


@dataclass(frozen=True)
class LayerInfo:
    """Static facts about one attention layer of a UNet, derived from its module name.

    ``index`` is the layer's position in forward order (down, mid, up) among all ``count`` attention layers,
    so "layer 35 of 70" is ``index == 35``.
    """

    name: str
    place: Place
    block: int
    attention: int
    transformer: int
    is_cross: bool
    heads: int
    index: int = 0
    count: int = 0

    @property
    def kind(self) -> Literal["self", "cross"]:
        return "cross" if self.is_cross else "self"


@dataclass(frozen=True)
class Layout:
    """Which rows of the UNet batch are which: ``prompts`` rows per half, unconditional half first under CFG.

    >>> Layout(prompts=2, cfg=True).cond_rows
    slice(2, 4, None)
    """

    prompts: int
    cfg: bool

    @property
    def batch(self) -> int:
        return self.prompts * (2 if self.cfg else 1)

    @property
    def cond_rows(self) -> slice:
        return slice(self.prompts, 2 * self.prompts) if self.cfg else slice(0, self.prompts)

    @property
    def uncond_rows(self) -> slice:
        if not self.cfg:
            raise AttnkitError("this batch has no unconditional half (guidance is off)")
        return slice(0, self.prompts)

    def halves(self) -> list[slice]:
        """Row ranges that each hold one row per prompt (one range without CFG, two with it)."""
        return [self.uncond_rows, self.cond_rows] if self.cfg else [self.cond_rows]

    def rows(self, which: Literal["cond", "uncond", "all"]) -> slice:
        if which == "cond":
            return self.cond_rows
        if which == "uncond":
            return self.uncond_rows
        return slice(0, self.batch)


@dataclass
class AttentionCall:
    """Everything a controller sees at one attention call.

    ``query``, ``key`` and ``value`` have shape ``(batch, heads, tokens, head_dim)``. Controllers replace them
    by assignment (never in place). ``probs()`` materialises ``softmax(q kᵀ · scale)`` on demand.
    """

    layer: LayerInfo
    height: int
    width: int
    step: int
    num_steps: int
    layout: Layout
    query: torch.Tensor
    key: torch.Tensor
    value: torch.Tensor
    scale: float
    mask: torch.Tensor | None = None
    edited: torch.Tensor | None = None

    @property
    def resolution(self) -> tuple[int, int]:
        return (self.height, self.width)

    @property
    def is_cross(self) -> bool:
        return self.layer.is_cross

    def probs(self, rows: slice | None = None) -> torch.Tensor:
        """Attention probabilities ``(rows, heads, queries, keys)``: as edited by the controllers before the
        caller where one of them edited them, else ``softmax(q kᵀ · scale)`` from the current q/k."""
        rows = rows or slice(None)
        if self.edited is not None:
            return self.edited[rows]
        scores = torch.matmul(self.query[rows], self.key[rows].transpose(-1, -2)) * self.scale
        if self.mask is not None:
            scores = scores + self.mask[rows]
        return scores.softmax(dim=-1)


class Controller:
    """Base class of everything that reads or rewrites attention under :func:`control`.

    Override only what you need; every default leaves the computation unchanged, so a controller that does
    nothing at a call keeps that layer on the fused path. Controllers run in the order they were given.
    """

    def on_enter(self, ctl: Control) -> None:
        """Called once when the control block starts (reset per-run state here)."""

    def on_exit(self, ctl: Control) -> None:
        """Called once when the control block ends, also after an exception."""

    def edit_qkv(self, call: AttentionCall) -> None:
        """Replace ``call.query/key/value`` (e.g. reference keys, AdaIN). Keeps the fused path."""

    def wants_probs(self, call: AttentionCall) -> bool:
        """Return True where :meth:`edit_probs` must see explicit probabilities at this call."""
        return False

    def edit_probs(self, call: AttentionCall, probs: torch.Tensor) -> torch.Tensor:
        """Rewrite the probabilities (full batch) where :meth:`wants_probs` said so; return the new tensor."""
        return probs

    def observe(self, call: AttentionCall) -> None:
        """Read-only look at a call (e.g. store ``call.probs(rows)``). Reading never changes the output:
        layers no controller edits keep the fused path, the maps being computed on the side."""

    def on_step_end(self, ctl: Control, step: int, tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """After each denoising step: return replacements for ``tensors`` (e.g. blended ``latents``)."""
        return {}


class AttnkitProcessor:
    """A diffusers attention processor that computes attention like ``AttnProcessor2_0`` and lets the
    engine's controllers read or edit it. One instance per layer; it holds no tensors between calls."""

    def __init__(self, ctl: Control, layer: LayerInfo) -> None:
        self.ctl = ctl
        self.layer = layer

    def __call__(
        self,
        attn: Any,
        hidden_states: torch.Tensor,
        encoder_hidden_states: torch.Tensor | None = None,
        attention_mask: torch.Tensor | None = None,
        temb: torch.Tensor | None = None,
    ) -> torch.Tensor:
        residual = hidden_states
        if attn.spatial_norm is not None:
            hidden_states = attn.spatial_norm(hidden_states, temb)
        input_ndim = hidden_states.ndim
        if input_ndim == 4:
            batch_size, channel, h4, w4 = hidden_states.shape
            hidden_states = hidden_states.view(batch_size, channel, h4 * w4).transpose(1, 2)
        batch_size, queries, _ = hidden_states.shape
        context = hidden_states if encoder_hidden_states is None else encoder_hidden_states
        if attention_mask is not None:
            attention_mask = attn.prepare_attention_mask(attention_mask, context.shape[1], batch_size)
            attention_mask = attention_mask.view(batch_size, attn.heads, -1, attention_mask.shape[-1])
        if attn.group_norm is not None:
            hidden_states = attn.group_norm(hidden_states.transpose(1, 2)).transpose(1, 2)
        query = attn.to_q(hidden_states)
        if encoder_hidden_states is None:
            context = hidden_states
        elif attn.norm_cross:
            context = attn.norm_encoder_hidden_states(encoder_hidden_states)
        key = attn.to_k(context)
        value = attn.to_v(context)
        head_dim = key.shape[-1] // attn.heads
        query = query.view(batch_size, -1, attn.heads, head_dim).transpose(1, 2)
        key = key.view(batch_size, -1, attn.heads, head_dim).transpose(1, 2)
        value = value.view(batch_size, -1, attn.heads, head_dim).transpose(1, 2)
        if attn.norm_q is not None:
            query = attn.norm_q(query)
        if attn.norm_k is not None:
            key = attn.norm_k(key)

        hidden_states = self.ctl._attend(self.layer, queries, query, key, value, attention_mask, head_dim)

        hidden_states = hidden_states.transpose(1, 2).reshape(batch_size, -1, attn.heads * head_dim)
        hidden_states = hidden_states.to(query.dtype)
        hidden_states = attn.to_out[0](hidden_states)
        hidden_states = attn.to_out[1](hidden_states)
        if input_ndim == 4:
            hidden_states = hidden_states.transpose(-1, -2).reshape(batch_size, channel, h4, w4)
        if attn.residual_connection:
            hidden_states = hidden_states + residual
        return hidden_states / attn.rescale_output_factor


@dataclass
class _StepState:
    step: int = 0
    num_steps: int = 1
    latent_hw: tuple[int, int] = (0, 0)
    layout: Layout | None = None


class Control:
    """The live engine of one :func:`control` block. Use :func:`control`, not this class directly."""

    def __init__(self, pipe: Any, controllers: Sequence[Controller], layout: Layout | None = None) -> None:
        self.pipe = pipe
        self.unet = _unet_of(pipe)
        self.controllers = list(controllers)
        self.layers = describe_layers(self.unet)
        self._fixed_layout = layout
        self._manual_step: tuple[int, int] | None = None
        self.state = _StepState()
        self._saved: dict[str, Any] | None = None
        self._hook: Any = None

    # -- explicit step and layout, for custom sampling loops -------------------------------------------
    def set_step(self, step: int, num_steps: int) -> None:
        """Pin the step index for the following UNet calls (custom loops such as inversion)."""
        if not 0 <= step < num_steps:
            raise AttnkitError(f"step {step} is outside 0..{num_steps - 1}")
        self._manual_step = (step, num_steps)

    def set_layout(self, layout: Layout | None) -> None:
        """Pin the batch layout for the following UNet calls (None: read it from the pipeline)."""
        self._fixed_layout = layout

    @property
    def step(self) -> int:
        return self.state.step

    @property
    def num_steps(self) -> int:
        return self.state.num_steps

    @property
    def layout(self) -> Layout | None:
        return self.state.layout

    # -- helpers users need with Prompt-to-Prompt-style batches -----------------------------------------
    def shared_latents(self, seed: int, batch: int, height: int | None = None, width: int | None = None,
                       dtype: torch.dtype | None = None) -> torch.Tensor:
        """One initial noise from ``seed`` repeated for every prompt, as Prompt-to-Prompt needs."""
        return shared_latents(self.pipe, seed, batch, height, width, dtype)

    def callback(self, pipe: Any, step: int, timestep: Any, tensors: dict[str, torch.Tensor]) -> dict:
        """Pass as ``callback_on_step_end``: lets controllers act after each step (e.g. local blend)."""
        updates: dict[str, torch.Tensor] = {}
        for c in self.controllers:
            current = {**tensors, **updates}
            updates.update(c.on_step_end(self, step, current) or {})
        return updates

    # -- installation -----------------------------------------------------------------------------------
    def _install(self) -> None:
        current = dict(self.unet.attn_processors)
        _check_processors(current)
        self._saved = current
        new = {name: AttnkitProcessor(self, info) for name, info in self.layers.items()}
        self._hook = self.unet.register_forward_pre_hook(self._before_unet, with_kwargs=True)
        self.unet.set_attn_processor(new)  # set_attn_processor pops from the dict it is given
        for c in self.controllers:
            c.on_enter(self)

    def _restore(self) -> None:
        try:
            for c in self.controllers:
                c.on_exit(self)
        finally:
            if self._hook is not None:
                self._hook.remove()
                self._hook = None
            if self._saved is not None:
                self.unet.set_attn_processor(dict(self._saved))
                self._saved = None

    def _before_unet(self, module: Any, args: tuple, kwargs: dict) -> None:
        sample = args[0] if args else kwargs["sample"]
        timestep = args[1] if len(args) > 1 else kwargs.get("timestep")
        self.state.latent_hw = (int(sample.shape[-2]), int(sample.shape[-1]))
        if self._manual_step is not None:
            self.state.step, self.state.num_steps = self._manual_step
        else:
            self.state.step, self.state.num_steps = _step_from_timestep(self.pipe, timestep)
        self.state.layout = self._fixed_layout or _layout_from_pipeline(self.pipe, int(sample.shape[0]))
        if self.state.layout.batch != sample.shape[0]:
            raise AttnkitError(
                f"the UNet batch has {sample.shape[0]} rows but the layout expects {self.state.layout.batch} "
                f"({self.state.layout}); pass layout=Layout(prompts=..., cfg=...) to control()"
            )

    # -- the attention computation ----------------------------------------------------------------------
    def _attend(self, layer: LayerInfo, queries: int, query: torch.Tensor, key: torch.Tensor,
                value: torch.Tensor, mask: torch.Tensor | None, head_dim: int) -> torch.Tensor:
        if not self.controllers:
            return F.scaled_dot_product_attention(query, key, value, attn_mask=mask)
        if self.state.layout is None:
            raise AttnkitError("attention ran before the UNet step hook; call the UNet, not its layers directly")
        height, width = _spatial_size(self.state.latent_hw, queries)
        call = AttentionCall(layer, height, width, self.state.step, self.state.num_steps, self.state.layout,
                             query, key, value, scale=1.0 / math.sqrt(head_dim), mask=mask)
        for c in self.controllers:
            c.edit_qkv(call)
        for c in self.controllers:  # in order: a controller sees the edits of those before it
            if c.wants_probs(call):
                call.edited = c.edit_probs(call, call.probs())
            c.observe(call)
        if call.edited is None:
            return F.scaled_dot_product_attention(call.query, call.key, call.value, attn_mask=call.mask)
        return torch.matmul(call.edited, call.value)


@contextmanager
def control(pipe: Any, *controllers: Controller, layout: Layout | None = None) -> Iterator[Control]:
    """Install ``controllers`` on ``pipe``'s attention layers for the duration of the block.

    Usage::

        with control(pipe, AttentionStore(res=16)) as ctl:
            pipe(prompt, callback_on_step_end=ctl.callback)

    ``layout`` pins the batch layout; by default it is read from the pipeline at each UNet call
    (``pipe.do_classifier_free_guidance``: unconditional half first, then one row per prompt).
    """
    for c in controllers:
        if not isinstance(c, Controller):
            raise AttnkitError(f"{c!r} is not an attnkit Controller; controllers subclass attnkit.Controller")
    ctl = Control(pipe, controllers, layout)
    ctl._install()
    try:
        yield ctl
    finally:
        ctl._restore()


# -- derivations from names, shapes and the pipeline -------------------------------------------------------
def describe_layers(unet: Any) -> dict[str, LayerInfo]:
    """``LayerInfo`` for every attention processor of ``unet``, keyed by processor name, in forward order."""
    found = []
    for name in unet.attn_processors:
        m = _NAME_PATTERN.match(name)
        if m is None:
            raise AttnkitError(
                f"unknown attention layer {name!r}: attnkit supports UNet2DConditionModel pipelines "
                "(Stable Diffusion 1.x/2.x, SDXL)"
            )
        module = unet.get_submodule(name[: -len(".processor")])
        place: Place = m["place"] or "mid"  # type: ignore[assignment]
        order = ({"down": 0, "mid": 1, "up": 2}[place], int(m["block"] or 0), int(m["attention"]),
                 int(m["transformer"]), int(m["attn"]))
        found.append((order, name, place, module))
    found.sort(key=lambda item: item[0])
    layers = {}
    for index, (order, name, place, module) in enumerate(found):
        layers[name] = LayerInfo(name=name, place=place, block=order[1], attention=order[2],
                                 transformer=order[3], is_cross=bool(module.is_cross_attention),
                                 heads=int(module.heads), index=index, count=len(found))
    return layers


def _unet_of(pipe: Any) -> Any:
    unet = getattr(pipe, "unet", None)
    if unet is None or not hasattr(unet, "set_attn_processor"):
        raise AttnkitError(
            f"{type(pipe).__name__} has no UNet with attention processors: attnkit supports "
            "UNet2DConditionModel pipelines (Stable Diffusion 1.x/2.x, SDXL)"
        )
    return unet


def _check_processors(processors: dict[str, Any]) -> None:
    for name, proc in processors.items():
        cls = type(proc).__name__
        if isinstance(proc, AttnkitProcessor):
            raise AttnkitError("attnkit.control is already active on this pipeline: pass all controllers to "
                               "one control(pipe, c1, c2, ...) call instead of nesting blocks")
        if cls in _PLAIN_PROCESSORS:
            continue
        fix = _CONFLICT_FIXES.get(cls, "reset it with pipe.unet.set_default_attn_processor()")
        raise AttnkitError(f"layer {name} uses {cls}, which attnkit would replace and silently drop; {fix}")


def _step_from_timestep(pipe: Any, timestep: Any) -> tuple[int, int]:
    timesteps = getattr(getattr(pipe, "scheduler", None), "timesteps", None)
    if timesteps is None or timestep is None:
        raise AttnkitError("cannot tell the denoising step: the scheduler has no timesteps; in a custom loop "
                           "call ctl.set_step(i, num_steps) before each UNet call")
    t = torch.as_tensor(timestep).flatten()[0].to(timesteps.device, timesteps.dtype)
    matches = (timesteps == t).nonzero()
    if len(matches) == 0:
        raise AttnkitError(f"timestep {float(t)} is not in pipe.scheduler.timesteps; in a custom loop call "
                           "ctl.set_step(i, num_steps) before each UNet call")
    return int(matches[0]), len(timesteps)


def _layout_from_pipeline(pipe: Any, batch: int) -> Layout:
    try:
        cfg = bool(pipe.do_classifier_free_guidance)
    except AttributeError:
        raise AttnkitError("cannot tell whether this batch uses classifier-free guidance; pass "
                           "layout=Layout(prompts=..., cfg=...) to control()") from None
    if cfg and batch % 2:
        raise AttnkitError(f"guidance is on but the UNet batch has an odd number of rows ({batch})")
    return Layout(prompts=batch // 2 if cfg else batch, cfg=cfg)


def _spatial_size(latent_hw: tuple[int, int], queries: int) -> tuple[int, int]:
    """The (height, width) of a layer's query grid, from the latent size: no resolution constants."""
    lh, lw = latent_hw
    factor = round(math.sqrt(lh * lw / queries))
    height, width = -(-lh // factor), -(-lw // factor)
    if height * width != queries:
        raise AttnkitError(f"cannot map {queries} queries onto a grid for latents of {lh}x{lw}")
    return height, width


def shared_latents(pipe: Any, seed: int, batch: int, height: int | None = None, width: int | None = None,
                   dtype: torch.dtype | None = None) -> torch.Tensor:
    """Initial noise drawn once from ``torch.Generator("cpu").manual_seed(seed)`` and repeated ``batch`` times.

    ``height``/``width`` are in pixels (default: the UNet's native size).
    """
    unet = _unet_of(pipe)
    scale = getattr(pipe, "vae_scale_factor", 8)
    h = (height or unet.config.sample_size * scale) // scale
    w = (width or unet.config.sample_size * scale) // scale
    generator = torch.Generator("cpu").manual_seed(seed)
    noise = torch.randn((1, unet.config.in_channels, h, w), generator=generator, dtype=torch.float32)
    return noise.to(device=unet.device, dtype=dtype or unet.dtype).expand(batch, -1, -1, -1).clone()


@dataclass
class Selection:
    """Which attention calls a controller acts on: kind, resolution, place, layer index and step window.

    ``res`` matches the larger side of a layer's query grid (16 → 16x16 layers); ``steps`` is an int (one
    step), a float in [0, 1] (the step nearest that fraction of the schedule, e.g. ``0.6``), or a ``(start,
    end)`` pair of ints (step indices, end exclusive) or floats (fractions). ``layers`` holds forward-order
    indices or layer names.
    """

    kinds: tuple[str, ...] = ("cross",)
    res: tuple[int, ...] | None = None
    places: tuple[str, ...] = ("down", "mid", "up")
    layers: tuple[int | str, ...] | None = None
    steps: int | float | tuple[int | float, int | float] | None = None

    def __post_init__(self) -> None:
        for kind in self.kinds:
            if kind not in ("self", "cross"):
                raise AttnkitError(f"unknown attention kind {kind!r}: use 'self' and/or 'cross'")
        for place in self.places:
            if place not in ("down", "mid", "up"):
                raise AttnkitError(f"unknown place {place!r}: use 'down', 'mid' and/or 'up'")

    def matches(self, call: AttentionCall) -> bool:
        layer = call.layer
        if layer.kind not in self.kinds or layer.place not in self.places:
            return False
        if self.res is not None and max(call.height, call.width) not in self.res:
            return False
        if self.layers is not None and layer.index not in self.layers and layer.name not in self.layers:
            return False
        return step_in_window(call.step, call.num_steps, self.steps)


def step_in_window(step: int, num_steps: int, window: int | float | tuple | None) -> bool:
    """Whether ``step`` lies in ``window`` (see :class:`Selection` for the forms a window takes)."""
    if window is None:
        return True
    if isinstance(window, tuple):
        start, end = window
        if isinstance(start, float) or isinstance(end, float):
            start, end = int(start * num_steps), int(end * num_steps)
        return start <= step < end
    if isinstance(window, float):
        return step == min(num_steps - 1, round(window * (num_steps - 1)))
    return step == window

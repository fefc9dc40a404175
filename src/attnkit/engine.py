"""The attention-control engine: one protocol that every attnkit method plugs into, on every model family.

``control(pipe, *controllers)`` installs attnkit processors on every attention layer of the pipeline's
denoiser (a UNet, or an MM-DiT transformer: SD3/SD3.5, FLUX.1), tracks the denoising step and the batch layout
explicitly, and restores the exact previous processors on exit (also when an exception is raised)::

    with attnkit.control(pipe, store := AttentionStore()) as ctl:
        image = pipe("a red circle", callback_on_step_end=ctl.callback).images[0]

What differs between model families lives in one adapter per family (``attnkit.adapters``: which layers exist,
how a layer's tokens split into text and image, how diffusers computes that layer's attention). Controllers see
one protocol everywhere: a ``"cross"`` call is image queries × text keys, a ``"self"`` call image × image. On a
joint (MM-DiT) layer both are blocks of one softmax; see :mod:`attnkit.adapters.joint` for how reading and
editing them maps onto the joint attention.

Layers that no controller needs at the current call run the fused attention diffusers' own processor runs
(SDPA, or diffusers' attention dispatcher where its processor uses it), so an uncontrolled layer costs nothing
extra. Probabilities drive the output only where a controller edits them (:meth:`Controller.wants_probs`);
read-only controllers (:meth:`Controller.observe`) compute the maps they read on the side, so the output stays
bit-identical to the stock processor's.
"""

from __future__ import annotations

import inspect
import math
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any, ClassVar, Literal

import torch

from attnkit.notices import AttnkitError  # defined without torch, so the CLI checks arguments fast

Place = Literal["down", "mid", "up", "double", "single"]
UNET_PLACES = ("down", "mid", "up")
STREAM_PLACES = ("double", "single")
FAMILIES = ("unet", "sd3", "flux")


@dataclass(frozen=True)
class LayerInfo:
    """Static facts about one attention layer, derived from its module name (one entry per controller view).

    ``index`` is the layer's position in forward order among all ``count`` attention layers, so "layer 35 of
    70" is ``index == 35``. On a UNet, ``place`` is down/mid/up and every attention module is one layer (attn1
    self, attn2 cross). On an MM-DiT transformer (``family`` ``"sd3"`` or ``"flux"``), ``place`` is the
    ``stream``: ``"double"`` (separate text and image weights: every SD3 block, FLUX's double blocks) or
    ``"single"`` (FLUX's single blocks); ``block`` is the block index among ``blocks`` blocks of that stream;
    one joint attention module is two views that share ``index`` and ``processor``: ``<module>.cross`` (image
    queries × text keys) and ``<module>.self`` (image × image). SD3.5's second attention of a block
    (``attn2``, image tokens only) has ``second=True``, ``attention == 1`` and a self view only.
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
    family: str = "unet"
    stream: str | None = None
    blocks: int = 0
    second: bool = False
    processor: str = ""
    joint: bool = False

    @property
    def kind(self) -> Literal["self", "cross"]:
        return "cross" if self.is_cross else "self"


@dataclass(frozen=True)
class Layout:
    """Which rows of the denoiser batch are which: ``prompts`` rows per half, unconditional half first under CFG.

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
            raise AttnkitError("this batch has no unconditional half (guidance is off, or the model runs the "
                               "negative prompt as a separate pass, as FLUX's true CFG does)")
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


@dataclass(frozen=True)
class TokenLayout:
    """Where the text and the image tokens sit in the sequence of a joint (MM-DiT) attention layer.

    FLUX puts the text first (``text=slice(0, 512)``), SD3 the image first. ``TokenLayout(slice(0, 3),
    slice(3, 7)).text_first is True``
    """

    text: slice
    image: slice

    @property
    def length(self) -> int:
        return max(self.text.stop, self.image.stop)

    @property
    def text_first(self) -> bool:
        return self.text.start == 0 and self.text.stop > 0

    @property
    def text_tokens(self) -> int:
        return self.text.stop - self.text.start

    @property
    def image_tokens(self) -> int:
        return self.image.stop - self.image.start


@dataclass
class ExtraTokens:
    """Extra text-stream tokens at one joint double-stream layer (see :meth:`Controller.extra_text_tokens`):
    their queries, keys and values ``(batch, heads, tokens, head_dim)`` after the layer's text projections and
    norms, and their attention ``output`` over ``[themselves; the layer's image tokens]``."""

    query: torch.Tensor
    key: torch.Tensor
    value: torch.Tensor
    output: torch.Tensor


class Positions:
    """How one layer's attention sees the positions of its image tokens, for controllers that move tokens (e.g.
    Style Aligned's reference keys placed beside the image, as AlignedGen does on FLUX). The adapter sets
    ``AttentionCall.positions`` where queries and keys carry positions of their own (FLUX's rotary embedding);
    it is None where attention sees none (UNet and SD3 layers: positions live in the hidden states, so tokens
    cannot collide). Tensors are ``(batch, heads, tokens, head_dim)`` image queries or keys of the call.
    """

    def shift(self, x: torch.Tensor, rows: int = 0, cols: int = 0) -> torch.Tensor:
        """``x`` as if every token sat ``rows`` rows and ``cols`` columns further on the image-token grid."""
        raise NotImplementedError

    def remove(self, x: torch.Tensor) -> torch.Tensor:
        """``x`` with the tokens' own positions taken out (the queries/keys as they were before them)."""
        raise NotImplementedError

    def apply(self, x: torch.Tensor) -> torch.Tensor:
        """``x`` with the tokens' own positions put in (the inverse of :meth:`remove`)."""
        raise NotImplementedError


@dataclass
class AttentionCall:
    """Everything a controller sees at one attention call (one view of a joint layer).

    ``query``, ``key`` and ``value`` have shape ``(batch, heads, tokens, head_dim)``: image queries, and text
    keys (``"cross"``) or image keys (``"self"``). Controllers replace them by assignment (never in place).
    ``probs()`` materialises ``softmax(q kᵀ · scale)`` on demand; on a joint layer that is the layer's own
    block renormalised over the view's keys (the image × text block over the text columns, the image × image
    block over the image columns). ``tokens`` (joint layers only) says where the view's tokens sit in the joint
    sequence. ``positions`` (:class:`Positions`) is set where the layer's queries and keys carry token positions
    of their own (FLUX's RoPE). ``output`` (``(batch, heads, queries, head_dim)``, the image queries' attention output before the
    output projection) and ``extra`` are set after the layer's attention ran, for :meth:`Controller.observe_output`.
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
    tokens: TokenLayout | None = None
    output: torch.Tensor | None = None
    extra: ExtraTokens | None = None
    positions: Positions | None = None

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
    ``families`` names the model families the controller can act on (``"unet"``, ``"sd3"``, ``"flux"``);
    :func:`control` refuses it elsewhere before sampling, with ``family_note`` as the reason.
    """

    families: ClassVar[tuple[str, ...]] = FAMILIES
    family_note: ClassVar[str] = ""

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

    def edit_output(self, call: AttentionCall, output: torch.Tensor) -> torch.Tensor:
        """Rewrite a UNet layer's attention output ``(batch, heads, queries, head_dim)`` (before the output
        projection); return a new tensor (never edit in place). For edits of a few rows that need those rows'
        own probabilities (cross-image attention's contrast on the output row): computing them for those rows
        only keeps the rest of the batch on the fused path, where :meth:`wants_probs` would materialise every
        row's. Runs after the fused or probability path and before :meth:`observe_output`; UNet layers only."""
        return output

    def observe_output(self, call: AttentionCall) -> None:
        """Read-only look at a call after its attention ran: ``call.output`` holds the image queries' attention
        output ``(batch, heads, queries, head_dim)`` before the output projection (one tensor for both views of
        a joint layer), ``call.extra`` the extra text-stream tokens' (:class:`ExtraTokens`) where there are any."""

    def extra_text_tokens(self, ctl: Control) -> torch.Tensor | None:
        """Extra tokens ``(n, dim)`` in the space of the pipeline's prompt embeddings (what the denoiser takes as
        ``encoder_hidden_states``) that ride along the text stream of a joint model's double-stream blocks.

        Called once when the block starts. They pass through the text weights of every double-stream block
        (input projection, modulated norms, q/k/v projections and norms, output projection, feed-forward) and
        attend to ``[themselves; the image tokens]`` (no positional rotation: FLUX's text position 0); no image
        or text token attends to them, so the image is unchanged. Their per-layer attention reaches
        :meth:`observe_output` as ``call.extra``. Single-stream blocks never see them. Joint families only (a
        UNet has no text stream): ConceptAttention's concept tokens are the use.
        """
        return None

    def on_step_end(self, ctl: Control, step: int, tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """After each denoising step: return replacements for ``tensors`` (e.g. blended ``latents``). Latents
        are always an image grid ``(batch, channels, h, w)``: FLUX's packed latents are unpacked for the
        controllers and packed again by the engine."""
        return {}


class AttnkitProcessor:
    """Base of attnkit's diffusers attention processors (one per family in ``attnkit.adapters``): computes
    attention as the family's stock processor does and lets the engine's controllers read or edit it. One
    instance per layer; it holds no tensors between calls."""

    def __init__(self, ctl: Control, layer: LayerInfo) -> None:
        self.ctl = ctl
        self.layer = layer


def run_probability_hooks(ctl: Control, call: AttentionCall) -> torch.Tensor | None:
    """``wants_probs``/``edit_probs`` then ``observe``, controller by controller: each sees the edits of the
    controllers before it. Returns the call's map before the first edit (None where no controller edited), which
    a joint layer needs to put the edit back into its one softmax. Every adapter's processor runs this."""
    before = None
    for c in ctl.controllers:
        if c.wants_probs(call):
            probs = call.probs()
            if call.edited is None:
                before = probs
            call.edited = c.edit_probs(call, probs)
        c.observe(call)
    return before


@dataclass
class _StepState:
    step: int = 0
    num_steps: int = 1
    latent_hw: tuple[int, int] = (0, 0)
    layout: Layout | None = None
    grid: tuple[int, int] | None = None  # the image-token grid of a transformer call
    text_len: int = 0  # text tokens of a transformer call
    passthrough: bool = False  # this denoiser call runs stock attention (FLUX's negative-prompt pass)
    extra_tokens: int = 0  # extra text-stream tokens riding the double-stream blocks (Controller.extra_text_tokens)
    last_timesteps: Any = None
    last_step: int | None = None


class Control:
    """The live engine of one :func:`control` block. Use :func:`control`, not this class directly."""

    def __init__(self, pipe: Any, controllers: Sequence[Controller], layout: Layout | None = None) -> None:
        from attnkit.adapters import adapter_for

        self.pipe = pipe
        self.adapter = adapter_for(pipe)
        self.family = self.adapter.family
        self.model = self.adapter.model
        self.unet = self.model if self.family == "unet" else None
        self.controllers = list(controllers)
        self.layers = self.adapter.layers()
        self._fixed_layout = layout
        self._manual_step: tuple[int, int] | None = None
        self.state = _StepState()
        self._saved: dict[str, Any] | None = None
        self._hook: Any = None
        self._stream_hooks: list[Any] = []
        self._entered: list[Controller] = []
        self._signature = inspect.signature(self.model.forward)

    # -- explicit step and layout, for custom sampling loops -------------------------------------------
    def set_step(self, step: int, num_steps: int) -> None:
        """Pin the step index for the following denoiser calls (custom loops such as inversion)."""
        if not 0 <= step < num_steps:
            raise AttnkitError(f"step {step} is outside 0..{num_steps - 1}")
        self._manual_step = (step, num_steps)

    def set_layout(self, layout: Layout | None) -> None:
        """Pin the batch layout for the following denoiser calls (None: read it from the pipeline)."""
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

    @property
    def text_tokenizer(self) -> Any:
        """The tokenizer whose token positions are this model's cross-attention key columns (see
        :func:`attnkit.adapters.text_tokenizer`)."""
        return self.adapter.text_tokenizer()

    # -- helpers users need with Prompt-to-Prompt-style batches -----------------------------------------
    def shared_latents(self, seed: int, batch: int, height: int | None = None, width: int | None = None,
                       dtype: torch.dtype | None = None) -> torch.Tensor:
        """One initial noise from ``seed`` repeated for every prompt, as Prompt-to-Prompt needs."""
        return self.adapter.shared_latents(seed, batch, height, width, dtype)

    def callback(self, pipe: Any, step: int, timestep: Any, tensors: dict[str, torch.Tensor]) -> dict:
        """Pass as ``callback_on_step_end``: lets controllers act after each step (e.g. local blend)."""
        tensors = dict(tensors)
        if "latents" in tensors:
            tensors["latents"] = self.adapter.latents_to_grid(tensors["latents"], self.state)
        updates: dict[str, torch.Tensor] = {}
        for c in self.controllers:
            current = {**tensors, **updates}
            updates.update(c.on_step_end(self, step, current) or {})
        if "latents" in updates:
            updates["latents"] = self.adapter.grid_to_latents(updates["latents"], self.state)
        return updates

    # -- installation -----------------------------------------------------------------------------------
    def _install(self) -> None:
        for c in self.controllers:
            if self.family not in c.families:
                note = f": {c.family_note}" if c.family_note else ""
                raise AttnkitError(f"{type(c).__name__} cannot act on this {self.adapter.description} (it works on "
                                   f"{', '.join(c.families)} pipelines){note}")
        self.adapter.check()
        self._saved = dict(self.model.attn_processors)
        new = self.adapter.processors(self)
        self._hook = self.model.register_forward_pre_hook(self._before_model, with_kwargs=True)
        self.model.set_attn_processor(new)  # set_attn_processor pops from the dict it is given
        for c in self.controllers:
            c.on_enter(self)
            self._entered.append(c)
        extra = [(c, t) for c, t in ((c, c.extra_text_tokens(self)) for c in self.controllers) if t is not None]
        if len(extra) > 1:
            names = ", ".join(type(c).__name__ for c, _ in extra)
            raise AttnkitError(f"{names} each add text-stream tokens; one control block carries one set: run them "
                               "in separate blocks")
        if extra:
            tokens = extra[0][1]
            if tokens.ndim != 2 or tokens.shape[0] == 0:
                raise AttnkitError(f"extra text-stream tokens must be (tokens, dim) with at least one token, got "
                                   f"shape {tuple(tokens.shape)}")
            self._stream_hooks = self.adapter.add_text_tokens(tokens)
            self.state.extra_tokens = int(tokens.shape[0])

    def _restore(self) -> None:
        try:
            for c in self._entered:
                c.on_exit(self)
        finally:
            self._entered = []
            for handle in self._stream_hooks:
                handle.remove()
            self._stream_hooks = []
            self.state.extra_tokens = 0
            if self._hook is not None:
                self._hook.remove()
                self._hook = None
            if self._saved is not None:
                self.model.set_attn_processor(dict(self._saved))
                self._saved = None

    def _before_model(self, module: Any, args: tuple, kwargs: dict) -> None:
        bound = self._signature.bind_partial(*args, **kwargs).arguments
        call = self.adapter.read_call(bound)
        state = self.state
        state.latent_hw, state.grid, state.text_len = call.latent_hw, call.grid, call.text_len
        if self._manual_step is not None:
            state.step, state.num_steps = self._manual_step
            state.passthrough = False
        else:
            state.step, state.num_steps = _step_from_timestep(self.pipe, call.timestep, self.adapter.timestep_scale)
            timesteps = self.pipe.scheduler.timesteps
            repeat = state.last_timesteps is timesteps and state.last_step == state.step
            state.last_timesteps, state.last_step = timesteps, state.step
            # A second denoiser call at the same step: FLUX's true-CFG negative-prompt pass (see the adapter).
            state.passthrough = repeat and self.adapter.repeat_is_negative_pass
        if state.passthrough:
            return
        state.layout = self._fixed_layout or self.adapter.layout(call.batch)
        if state.layout.batch != call.batch:
            raise AttnkitError(
                f"the {self.adapter.model_name} batch has {call.batch} rows but the layout expects "
                f"{state.layout.batch} ({state.layout}); pass layout=Layout(prompts=..., cfg=...) to control()"
            )


@contextmanager
def control(pipe: Any, *controllers: Controller, layout: Layout | None = None) -> Iterator[Control]:
    """Install ``controllers`` on ``pipe``'s attention layers for the duration of the block.

    Usage::

        with control(pipe, AttentionStore(res=16)) as ctl:
            pipe(prompt, callback_on_step_end=ctl.callback)

    ``layout`` pins the batch layout; by default it is read from the pipeline at each denoiser call
    (``pipe.do_classifier_free_guidance``: unconditional half first, then one row per prompt; FLUX: one row per
    prompt). Works on UNet pipelines (SD1.x/2.x, SDXL), ``StableDiffusion3Pipeline`` and ``FluxPipeline``.
    """
    for c in controllers:
        if not isinstance(c, Controller):
            raise AttnkitError(f"{c!r} is not an attnkit Controller; controllers subclass attnkit.Controller")
    ctl = Control(pipe, controllers, layout)
    try:
        ctl._install()
        yield ctl
    finally:
        ctl._restore()


# -- derivations from names, shapes and the pipeline -------------------------------------------------------
def describe_layers(model: Any) -> dict[str, LayerInfo]:
    """``LayerInfo`` for every attention layer (view) of a UNet or MM-DiT ``model``, in forward order.

    Keyed by processor name on a UNet; by view name (``transformer_blocks.3.attn.cross`` / ``.self``) on a
    transformer. ``describe_layers(pipe.unet)``, ``describe_layers(pipe.transformer)``
    """
    from attnkit.adapters import adapter_for_model

    return adapter_for_model(model).layers()


def _step_from_timestep(pipe: Any, timestep: Any, scale: float = 1.0) -> tuple[int, int]:
    timesteps = getattr(getattr(pipe, "scheduler", None), "timesteps", None)
    if timesteps is None or timestep is None:
        raise AttnkitError("cannot tell the denoising step: the scheduler has no timesteps; in a custom loop "
                           "call ctl.set_step(i, num_steps) before each denoiser call")
    t = torch.as_tensor(timestep).flatten()[0].to(timesteps.device, torch.float64) * scale
    known = timesteps.to(torch.float64)
    gaps = (known - t).abs()
    index = int(gaps.argmin()) if len(known) else 0
    # Exact for integer timesteps; FLUX passes t / 1000 in the model's dtype, so allow its rounding (bfloat16
    # keeps 8 bits: up to 0.4% of t).
    given = torch.as_tensor(timestep)
    rounding = max(1e-3, torch.finfo(given.dtype).eps) if given.is_floating_point() else 1e-3
    tolerance = 0.0 if scale == 1.0 else rounding * max(1.0, float(t.abs()))
    if len(known) == 0 or float(gaps[index]) > tolerance:
        raise AttnkitError(f"timestep {float(t)} is not in pipe.scheduler.timesteps; in a custom loop call "
                           "ctl.set_step(i, num_steps) before each denoiser call")
    return index, len(timesteps)


def _layout_from_pipeline(pipe: Any, batch: int) -> Layout:
    try:
        cfg = bool(pipe.do_classifier_free_guidance)
    except AttributeError:
        raise AttnkitError("cannot tell whether this batch uses classifier-free guidance; pass "
                           "layout=Layout(prompts=..., cfg=...) to control()") from None
    if cfg and batch % 2:
        raise AttnkitError(f"guidance is on but the denoiser batch has an odd number of rows ({batch})")
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

    ``height``/``width`` are in pixels (default: the model's native size). The noise has the shape the
    pipeline's ``latents=`` argument takes (FLUX: packed 2x2 patches). ``shared_latents(pipe, 8888, 2)``
    """
    from attnkit.adapters import adapter_for

    return adapter_for(pipe).shared_latents(seed, batch, height, width, dtype)


@dataclass
class Selection:
    """Which attention calls a controller acts on: kind, resolution, place, layer index and step window.

    ``res`` matches the larger side of a layer's query grid (16 → 16x16 layers); ``steps`` is an int (one
    step), a float in [0, 1] (the step nearest that fraction of the schedule, e.g. ``0.6``), or a ``(start,
    end)`` pair of ints (step indices, end exclusive) or floats (fractions). ``layers`` holds forward-order
    indices, layer names or (transformers) processor names. ``places`` takes UNet places (down/mid/up) and
    transformer streams (double/single); places of one family do not restrict layers of the other, so the
    default (all UNet places) selects every transformer layer too.
    """

    kinds: tuple[str, ...] = ("cross",)
    res: tuple[int, ...] | None = None
    places: tuple[str, ...] = UNET_PLACES
    layers: tuple[int | str, ...] | None = None
    steps: int | float | tuple[int | float, int | float] | None = None

    def __post_init__(self) -> None:
        for kind in self.kinds:
            if kind not in ("self", "cross"):
                raise AttnkitError(f"unknown attention kind {kind!r}: use 'self' and/or 'cross'")
        for place in self.places:
            if place not in UNET_PLACES + STREAM_PLACES:
                raise AttnkitError(f"unknown place {place!r}: use 'down', 'mid' and/or 'up' (UNet), "
                                   "'double' and/or 'single' (transformer streams)")

    def matches(self, call: AttentionCall) -> bool:
        layer = call.layer
        if layer.kind not in self.kinds or not place_selected(layer.place, self.places):
            return False
        if self.res is not None and max(call.height, call.width) not in self.res:
            return False
        if (self.layers is not None and layer.index not in self.layers and layer.name not in self.layers
                and layer.processor not in self.layers):
            return False
        return step_in_window(call.step, call.num_steps, self.steps)


def place_selected(place: str, places: Sequence[str]) -> bool:
    """Whether a layer at ``place`` is among ``places`` (places of the other model family do not restrict)."""
    family = UNET_PLACES if place in UNET_PLACES else STREAM_PLACES
    named = [p for p in places if p in family]
    return not named or place in named


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

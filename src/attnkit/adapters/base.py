"""What every model-family adapter provides to the engine (one small interface; an adapter knows no method).

An adapter answers, for one denoiser (a UNet or an MM-DiT transformer): which attention layers exist
(:meth:`Adapter.layers`), what cannot be served (:meth:`Adapter.check`), the attnkit processors that compute each
layer's attention exactly as diffusers does (:meth:`Adapter.processors`), what one denoiser call looks like
(:meth:`Adapter.read_call`: batch, timestep, latent and token grid, text length), the batch layout, the shape
of the initial noise, and which tokenizer numbers the text keys.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch

from attnkit.engine import AttnkitError, AttnkitProcessor, Control, LayerInfo, Layout, _layout_from_pipeline

# diffusers hooks that skip or replay attention: a controlled layer would silently not run under them.
# Matched against hook names: FirstBlockCache ("fbc_..."), FasterCache, MagCache, TaylorSeer, SeaCache, text K/V
# caches ("..._cache..."), PyramidAttentionBroadcast, LayerSkip, smoothed-energy guidance.
_SKIPPING_HOOKS = ("cache", "fbc_", "broadcast", "layer_skip", "smoothed_energy")


@dataclass(frozen=True)
class ModelCall:
    """What the engine needs to know about one denoiser call, read from its arguments."""

    batch: int
    timestep: Any
    latent_hw: tuple[int, int]
    grid: tuple[int, int] | None = None
    text_len: int = 0


class Adapter:
    """Base class of the model-family adapters (``attnkit.adapters.unet``, ``.sd3``, ``.flux``)."""

    family = ""
    description = ""  # e.g. "FLUX transformer (FluxTransformer2DModel)", for messages
    model_name = "denoiser"
    timestep_scale = 1.0  # the pipeline passes timestep / scale to the model (FLUX: / 1000)
    repeat_is_negative_pass = False  # a second call at one step is a separate negative-prompt pass

    def __init__(self, pipe: Any, model: Any) -> None:
        self.pipe = pipe
        self.model = model

    # -- layers and processors ------------------------------------------------------------------------
    def layers(self) -> dict[str, LayerInfo]:
        raise NotImplementedError

    def check(self) -> None:
        """Raise a clear error for whatever attnkit would silently break (conflicting processors, caches)."""
        check_no_skipping_hooks(self.model)

    def processors(self, ctl: Control) -> dict[str, Any]:
        """One attnkit processor per diffusers processor name."""
        raise NotImplementedError

    def add_text_tokens(self, tokens: torch.Tensor) -> list[Any]:
        """Hooks that make ``tokens`` ride the text stream of the double-stream blocks (see
        :meth:`attnkit.engine.Controller.extra_text_tokens`); returns their handles (removed on exit)."""
        raise AttnkitError(f"extra text-stream tokens need a joint (MM-DiT) model with a text stream, such as SD3 or "
                           f"FLUX; this {self.description} has none")

    def prompt_embeddings(self, prompts: list[str]) -> torch.Tensor:
        """``(len(prompts), tokens, dim)``: the prompt embeddings the denoiser takes as ``encoder_hidden_states``
        (the pipeline's own ``encode_prompt``, no guidance half); MM-DiT families only."""
        raise AttnkitError(f"prompt embeddings for extra text-stream tokens need an MM-DiT pipeline (SD3, FLUX); "
                           f"this {self.description} is not one")

    def blocks(self) -> dict[str, Any]:
        """The denoiser's transformer blocks by module name, in forward order (what :func:`bypass_block` can
        skip); MM-DiT families only."""
        raise AttnkitError(f"bypassing blocks needs an MM-DiT transformer (SD3, FLUX); this {self.description} "
                           "is not one")

    # -- one denoiser call ------------------------------------------------------------------------------
    def read_call(self, arguments: dict[str, Any]) -> ModelCall:
        raise NotImplementedError

    def layout(self, batch: int) -> Layout:
        return _layout_from_pipeline(self.pipe, batch)

    # -- latents -----------------------------------------------------------------------------------------
    def native_size(self) -> int:
        """The model's native image side in pixels."""
        raise NotImplementedError

    def noise_shape(self, height: int, width: int) -> tuple[int, ...]:
        """Shape of one row of initial noise for an image of ``height × width`` pixels, as the model's grid."""
        raise NotImplementedError

    def shared_latents(self, seed: int, batch: int, height: int | None, width: int | None,
                       dtype: torch.dtype | None) -> torch.Tensor:
        side = self.native_size()
        generator = torch.Generator("cpu").manual_seed(seed)
        noise = torch.randn(self.noise_shape(height or side, width or side), generator=generator,
                            dtype=torch.float32)
        noise = self.pack_noise(noise)
        model = self.model
        return noise.to(device=model.device, dtype=dtype or model.dtype).expand(batch, *noise.shape[1:]).clone()

    def pack_noise(self, noise: torch.Tensor) -> torch.Tensor:
        """Noise drawn on the latent grid, in the layout the pipeline's ``latents=`` takes."""
        return noise

    def latents_to_grid(self, latents: torch.Tensor, state: Any) -> torch.Tensor:
        """The pipeline's latents as an image grid ``(batch, channels, h, w)`` for step-end controllers."""
        return latents

    def grid_to_latents(self, grid: torch.Tensor, state: Any) -> torch.Tensor:
        return grid

    # -- text ----------------------------------------------------------------------------------------------
    def text_tokenizer(self, max_sequence_length: int | None = None) -> Any:
        """The tokenizer (or segmented tokenizer) whose positions are the cross-attention key columns."""
        return getattr(self.pipe, "tokenizer", None)


def check_processor(name: str, proc: Any, plain: tuple[str, ...], fixes: dict[str, str], reset: str) -> None:
    """Refuse a diffusers processor that attnkit would replace and so silently drop (``plain``: the classes that
    compute plain attention; ``fixes``: what to do per other class, ``reset`` for any class not listed), and an
    attnkit processor already in place (nested ``control`` blocks)."""
    if isinstance(proc, AttnkitProcessor):
        raise AttnkitError("attnkit.control is already active on this pipeline: pass all controllers to "
                           "one control(pipe, c1, c2, ...) call instead of nesting blocks")
    cls = type(proc).__name__
    if cls not in plain:
        raise AttnkitError(f"layer {name} uses {cls}, which attnkit would replace and silently drop; "
                           f"{fixes.get(cls, reset)}")


def check_no_skipping_hooks(model: Any) -> None:
    """Refuse diffusers caches (FirstBlockCache, FasterCache, PyramidAttentionBroadcast, TaylorSeer, MagCache,
    ...) and layer-skip hooks: they skip or replay attention, so a controller would miss calls unseen."""
    config = getattr(model, "_cache_config", None)
    if config is not None:
        raise AttnkitError(f"{type(config).__name__} caching is enabled on the {type(model).__name__}: it skips or "
                           "replays attention, so controllers would silently miss layers; call "
                           "pipe.transformer.disable_cache() before attnkit.control")
    for name, module in model.named_modules():
        registry = getattr(module, "_diffusers_hook", None)
        hooks = getattr(registry, "hooks", None) or {}
        for hook in hooks:
            if any(word in hook for word in _SKIPPING_HOOKS):
                where = name or type(model).__name__
                raise AttnkitError(f"a diffusers hook {hook!r} on {where} skips or replays attention, so attnkit "
                                   "controllers would silently miss layers; remove it (e.g. "
                                   "diffusers.hooks.HookRegistry.check_if_exists_or_initialize(module)"
                                   f".remove_hook({hook!r}, recurse=True)) before attnkit.control")


def project_heads(attn: Any, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor
                  ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, int]:
    """Projected ``(batch, tokens, heads * dim)`` q/k/v split into ``(batch, heads, tokens, dim)``, with the
    layer's q/k norms where it has them, as diffusers' processors do. Returns ``(query, key, value, head_dim)``.

    Usage: ``query, key, value, head_dim = project_heads(attn, attn.to_q(x), attn.to_k(x), attn.to_v(x))``.
    """
    batch = query.shape[0]
    head_dim = key.shape[-1] // attn.heads
    query, key, value = (t.view(batch, -1, attn.heads, head_dim).transpose(1, 2) for t in (query, key, value))
    if attn.norm_q is not None:
        query = attn.norm_q(query)
    if attn.norm_k is not None:
        key = attn.norm_k(key)
    return query, key, value, head_dim

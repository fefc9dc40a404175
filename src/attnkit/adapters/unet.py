"""The UNet adapter: Stable Diffusion 1.x/2.x and SDXL (``UNet2DConditionModel``).

Every attention module is one layer: ``attn1`` self-attention (image × image), ``attn2`` cross-attention (image
queries × text keys). Its processor computes attention as diffusers' ``AttnProcessor2_0`` does (SDPA).
"""

from __future__ import annotations

import math
import re
from typing import Any

import torch
import torch.nn.functional as F

from attnkit.adapters.base import Adapter, ModelCall, check_processor, project_heads
from attnkit.engine import (
    AttentionCall,
    AttnkitError,
    AttnkitProcessor,
    Control,
    LayerInfo,
    Place,
    _spatial_size,
    run_probability_hooks,
)

SUPPORTED_UNETS = "UNet2DConditionModel pipelines (Stable Diffusion 1.x/2.x, SDXL)"
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


class UNetAdapter(Adapter):
    family = "unet"
    description = "UNet (UNet2DConditionModel)"
    model_name = "UNet"

    def layers(self) -> dict[str, LayerInfo]:
        return describe_unet_layers(self.model)

    def check(self) -> None:
        super().check()
        check_processors(dict(self.model.attn_processors))

    def processors(self, ctl: Control) -> dict[str, Any]:
        return {name: UNetProcessor(ctl, info) for name, info in ctl.layers.items()}

    def read_call(self, arguments: dict[str, Any]) -> ModelCall:
        sample = arguments["sample"]
        return ModelCall(batch=int(sample.shape[0]), timestep=arguments.get("timestep"),
                         latent_hw=(int(sample.shape[-2]), int(sample.shape[-1])))

    def native_size(self) -> int:
        return int(self.model.config.sample_size) * int(getattr(self.pipe, "vae_scale_factor", 8))

    def noise_shape(self, height: int, width: int) -> tuple[int, ...]:
        scale = int(getattr(self.pipe, "vae_scale_factor", 8))
        return (1, int(self.model.config.in_channels), height // scale, width // scale)


def describe_unet_layers(unet: Any) -> dict[str, LayerInfo]:
    """``LayerInfo`` for every attention processor of ``unet``, keyed by processor name, in forward order."""
    found = []
    for name in unet.attn_processors:
        m = _NAME_PATTERN.match(name)
        if m is None:
            raise AttnkitError(f"unknown attention layer {name!r}: attnkit supports {SUPPORTED_UNETS}")
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
                                 heads=int(module.heads), index=index, count=len(found), processor=name)
    return layers


def check_processors(processors: dict[str, Any]) -> None:
    for name, proc in processors.items():
        check_processor(name, proc, _PLAIN_PROCESSORS, _CONFLICT_FIXES, "reset it with pipe.unet.set_default_attn_processor()")


class UNetProcessor(AttnkitProcessor):
    """A diffusers attention processor that computes attention like ``AttnProcessor2_0`` and lets the
    engine's controllers read or edit it."""

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
        query, key, value, head_dim = project_heads(attn, query, attn.to_k(context), attn.to_v(context))

        hidden_states = attend(self.ctl, self.layer, queries, query, key, value, attention_mask, head_dim)

        hidden_states = hidden_states.transpose(1, 2).reshape(batch_size, -1, attn.heads * head_dim)
        hidden_states = hidden_states.to(query.dtype)
        hidden_states = attn.to_out[0](hidden_states)
        hidden_states = attn.to_out[1](hidden_states)
        if input_ndim == 4:
            hidden_states = hidden_states.transpose(-1, -2).reshape(batch_size, channel, h4, w4)
        if attn.residual_connection:
            hidden_states = hidden_states + residual
        return hidden_states / attn.rescale_output_factor


def attend(ctl: Control, layer: LayerInfo, queries: int, query: torch.Tensor, key: torch.Tensor,
           value: torch.Tensor, mask: torch.Tensor | None, head_dim: int) -> torch.Tensor:
    """One attention call offered to the controllers: q/k/v edits, then probabilities edited or observed."""
    if not ctl.controllers:
        return F.scaled_dot_product_attention(query, key, value, attn_mask=mask)
    if ctl.state.layout is None:
        raise AttnkitError("attention ran before the UNet step hook; call the UNet, not its layers directly")
    height, width = _spatial_size(ctl.state.latent_hw, queries)
    call = AttentionCall(layer, height, width, ctl.state.step, ctl.state.num_steps, ctl.state.layout,
                         query, key, value, scale=1.0 / math.sqrt(head_dim), mask=mask)
    for c in ctl.controllers:
        c.edit_qkv(call)
    run_probability_hooks(ctl, call)
    if call.edited is None:
        out = F.scaled_dot_product_attention(call.query, call.key, call.value, attn_mask=call.mask)
    else:
        out = torch.matmul(call.edited, call.value)
    for c in ctl.controllers:
        out = c.edit_output(call, out)
    call.output = out
    for c in ctl.controllers:
        c.observe_output(call)
    return out

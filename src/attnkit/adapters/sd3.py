"""The SD3 adapter: Stable Diffusion 3 / 3.5 (``SD3Transformer2DModel``, ``StableDiffusion3Pipeline``).

Every block's ``attn`` is a joint layer over ``[image; text]`` (image first; text = 77 CLIP-L+G tokens, then
the T5 tokens), computed as diffusers' ``JointAttnProcessor2_0`` does: q/k/v projections, optional q/k RMS
norms (SD3.5), SDPA, the text output projected by ``to_add_out`` except in the last (``context_pre_only``)
block. SD3.5's ``dual_attention_layers`` have a second attention ``attn2`` over the image tokens only (a self
view, ``LayerInfo.second``). The CFG batch is ``[negative, positive]``, read from
``pipe.do_classifier_free_guidance``. Skip-layer guidance (``skip_guidance_layers``) runs an extra, partial
pass the controllers' schedules know nothing about, so it is refused.
"""

from __future__ import annotations

import re
from typing import Any

import torch
import torch.nn.functional as F

from attnkit.adapters.base import Adapter, ModelCall, check_processor, project_heads
from attnkit.adapters.joint import Views, add_text_tokens, attend_joint, split_extra
from attnkit.engine import AttnkitError, AttnkitProcessor, Control, LayerInfo, TokenLayout

_NAME = re.compile(r"^transformer_blocks\.(?P<block>\d+)\.attn(?P<second>2?)\.processor$")
_PLAIN = ("JointAttnProcessor2_0",)
_FIXES = {
    "FusedJointAttnProcessor2_0": "fused QKV projections are enabled: call pipe.transformer.unfuse_qkv_projections() "
                                  "first",
    "PAGJointAttnProcessor2_0": "perturbed-attention guidance replaces attention: use StableDiffusion3Pipeline "
                                "without PAG",
    "PAGCFGJointAttnProcessor2_0": "perturbed-attention guidance replaces attention: use StableDiffusion3Pipeline "
                                   "without PAG",
    "IPAdapterJointAttnProcessor2_0": "an IP-Adapter is loaded: call pipe.unload_ip_adapter() first",
}


class SD3Adapter(Adapter):
    family = "sd3"
    description = "SD3 transformer (SD3Transformer2DModel)"
    model_name = "transformer"

    def layers(self) -> dict[str, LayerInfo]:
        modules = []
        for name in self.model.attn_processors:
            m = _NAME.match(name)
            if m is None:
                raise AttnkitError(f"unknown attention layer {name!r} in the SD3 transformer: attnkit knows "
                                   "transformer_blocks.N.attn (joint) and .attn2 (SD3.5 dual attention)")
            modules.append(((int(m["block"]), bool(m["second"])), name))
        modules.sort()
        blocks = len(self.model.transformer_blocks)
        layers: dict[str, LayerInfo] = {}
        for index, ((block, second), name) in enumerate(modules):
            attn = self.model.get_submodule(name[: -len(".processor")])
            base = name[: -len(".processor")]
            common = dict(place="double", block=block, attention=int(second), transformer=0, heads=int(attn.heads),
                          index=index, count=len(modules), family="sd3", stream="double", blocks=blocks,
                          second=second, processor=name, joint=not second)
            if not second:
                layers[f"{base}.cross"] = LayerInfo(name=f"{base}.cross", is_cross=True, **common)
            layers[f"{base}.self"] = LayerInfo(name=f"{base}.self", is_cross=False, **common)
        return layers

    def check(self) -> None:
        super().check()
        for name, proc in self.model.attn_processors.items():
            check_processor(name, proc, _PLAIN, _FIXES,
                            "reset it with pipe.transformer.set_attn_processor(JointAttnProcessor2_0())")

    def processors(self, ctl: Control) -> dict[str, Any]:
        views: dict[str, dict[str, LayerInfo]] = {}
        for info in ctl.layers.values():
            views.setdefault(info.processor, {})[info.kind] = info
        return {name: SD3Processor(ctl, Views(self=v["self"], cross=v.get("cross"))) for name, v in views.items()}

    def read_call(self, arguments: dict[str, Any]) -> ModelCall:
        if arguments.get("skip_layers") is not None:
            raise AttnkitError("skip-layer guidance (skip_guidance_layers=...) runs an extra partial transformer "
                               "pass per step that controllers cannot follow; call the pipeline without "
                               "skip_guidance_layers under attnkit.control")
        sample = arguments["hidden_states"]
        patch = int(self.model.config.patch_size)
        h, w = int(sample.shape[-2]), int(sample.shape[-1])
        text = arguments.get("encoder_hidden_states")
        return ModelCall(batch=int(sample.shape[0]), timestep=arguments.get("timestep"), latent_hw=(h, w),
                         grid=(h // patch, w // patch), text_len=0 if text is None else int(text.shape[1]))

    def prompt_embeddings(self, prompts: list[str]) -> torch.Tensor:
        with torch.no_grad():
            embeds = self.pipe.encode_prompt(prompt=list(prompts), prompt_2=None, prompt_3=None,
                                             device=self.model.device, do_classifier_free_guidance=False)[0]
        return embeds

    def blocks(self) -> dict[str, Any]:
        return {f"transformer_blocks.{i}": b for i, b in enumerate(self.model.transformer_blocks)}

    def add_text_tokens(self, tokens: torch.Tensor) -> list[Any]:
        return add_text_tokens(self.model, tokens)  # the last block is context-pre-only: the stream ends there

    def native_size(self) -> int:
        scale = int(getattr(self.pipe, "vae_scale_factor", 8))
        return int(getattr(self.pipe, "default_sample_size", self.model.config.sample_size)) * scale

    def noise_shape(self, height: int, width: int) -> tuple[int, ...]:
        scale = int(getattr(self.pipe, "vae_scale_factor", 8))
        return (1, int(self.model.config.in_channels), height // scale, width // scale)

    def text_tokenizer(self, max_sequence_length: int | None = None) -> Any:
        from attnkit.tokens import Segment, SegmentedTokenizer

        clip = self.pipe.tokenizer
        segments = [Segment(clip, int(clip.model_max_length))]
        t5 = getattr(self.pipe, "tokenizer_3", None)
        if getattr(self.pipe, "text_encoder_3", None) is None:
            t5 = None  # without T5 the pipeline appends zero embeddings of its length: columns no word names
        if max_sequence_length is None:  # the model's own (attnkit.json: the bundled MM-DiT samples with 0), else 256
            from attnkit.models import defaults_for

            max_sequence_length = getattr(defaults_for(self.pipe), "max_sequence_length", None)
        segments.append(Segment(t5, 256 if max_sequence_length is None else int(max_sequence_length)))
        return SegmentedTokenizer(segments, "SD3")


class SD3Processor(AttnkitProcessor):
    """``JointAttnProcessor2_0``'s computation, with the engine's controllers on its two views."""

    def __init__(self, ctl: Control, views: Views) -> None:
        super().__init__(ctl, views.self)
        self.views = views

    def __call__(self, attn: Any, hidden_states: torch.Tensor, encoder_hidden_states: torch.Tensor = None,
                 attention_mask: torch.Tensor | None = None, *args: Any, **kwargs: Any) -> Any:
        residual = hidden_states
        batch_size = hidden_states.shape[0]
        query, key, value, head_dim = project_heads(attn, attn.to_q(hidden_states), attn.to_k(hidden_states),
                                                    attn.to_v(hidden_states))
        image_tokens = query.shape[2]
        extra = None
        if encoder_hidden_states is not None:
            context_q = attn.add_q_proj(encoder_hidden_states).view(batch_size, -1, attn.heads, head_dim).transpose(1, 2)
            context_k = attn.add_k_proj(encoder_hidden_states).view(batch_size, -1, attn.heads, head_dim).transpose(1, 2)
            context_v = attn.add_v_proj(encoder_hidden_states).view(batch_size, -1, attn.heads, head_dim).transpose(1, 2)
            if attn.norm_added_q is not None:
                context_q = attn.norm_added_q(context_q)
            if attn.norm_added_k is not None:
                context_k = attn.norm_added_k(context_k)
            (context_q, context_k, context_v), extra = split_extra(self.ctl, context_q, context_k, context_v, 2)
            query = torch.cat([query, context_q], dim=2)
            key = torch.cat([key, context_k], dim=2)
            value = torch.cat([value, context_v], dim=2)
        length = query.shape[2]
        tokens = TokenLayout(text=slice(image_tokens, length), image=slice(0, image_tokens))

        # JointAttnProcessor2_0 calls SDPA itself (not the dispatcher) and ignores attention_mask: so do we.
        hidden_states = attend_joint(self.ctl, self.views, query, key, value, tokens, _sdpa, extra=extra)

        hidden_states = hidden_states.transpose(1, 2).reshape(batch_size, -1, attn.heads * head_dim)
        hidden_states = hidden_states.to(query.dtype)
        if encoder_hidden_states is not None:
            hidden_states, encoder_hidden_states = (hidden_states[:, : residual.shape[1]],
                                                    hidden_states[:, residual.shape[1]:])
            if not attn.context_pre_only:
                encoder_hidden_states = attn.to_add_out(encoder_hidden_states)
        hidden_states = attn.to_out[0](hidden_states)
        hidden_states = attn.to_out[1](hidden_states)
        if encoder_hidden_states is not None:
            return hidden_states, encoder_hidden_states
        return hidden_states


def _sdpa(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
    return F.scaled_dot_product_attention(query, key, value, attn_mask=mask, dropout_p=0.0, is_causal=False)

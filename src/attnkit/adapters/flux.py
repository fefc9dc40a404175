"""The FLUX adapter: FLUX.1 (``FluxTransformer2DModel``, ``FluxPipeline``).

Double-stream blocks (``transformer_blocks.N.attn``) project text and image with separate weights and attend
over ``[text; image]`` (text first); single-stream blocks (``single_transformer_blocks.N.attn``) get the joined
sequence, already ``[text; image]``, and return it whole (no output projection). Attention is computed as
diffusers' ``FluxAttnProcessor`` does: RMS norms on q/k (and on the text q/k), RoPE over the joint sequence
(text positions are zeros), then diffusers' attention dispatcher with the processor's backend
(``transformer.set_attention_backend(...)`` keeps working on every layer no controller edits).

Batch: FLUX.1-dev is guidance-distilled (guidance is an embedding, one row per prompt). With
``true_cfg_scale > 1`` the pipeline runs the negative prompt as a second transformer call per step; that pass
runs with stock attention (controllers see the conditional pass only, as Prompt-to-Prompt edits only the
conditional half). Latents are packed 2x2 patches; step-end controllers see them unpacked.
"""

from __future__ import annotations

import re
from typing import Any

import torch

from attnkit.adapters.base import Adapter, ModelCall, check_processor
from attnkit.adapters.joint import Views, add_text_tokens, attend_joint, split_extra
from attnkit.engine import AttnkitError, AttnkitProcessor, Control, LayerInfo, Layout, Positions, TokenLayout

_NAME = re.compile(r"^(?P<stream>transformer_blocks|single_transformer_blocks)\.(?P<block>\d+)\.attn\.processor$")
_FIXES = {
    "FluxIPAdapterAttnProcessor": "an IP-Adapter is loaded: call pipe.unload_ip_adapter() first",
}


class FluxAdapter(Adapter):
    family = "flux"
    description = "FLUX transformer (FluxTransformer2DModel)"
    model_name = "transformer"
    timestep_scale = 1000.0  # FluxPipeline calls the transformer with timestep / 1000
    repeat_is_negative_pass = True

    def layers(self) -> dict[str, LayerInfo]:
        modules = []
        for name in self.model.attn_processors:
            m = _NAME.match(name)
            if m is None:
                raise AttnkitError(f"unknown attention layer {name!r} in the FLUX transformer: attnkit knows "
                                   "transformer_blocks.N.attn and single_transformer_blocks.N.attn")
            single = m["stream"] == "single_transformer_blocks"
            modules.append(((int(single), int(m["block"])), name))
        modules.sort()
        counts = {0: len(self.model.transformer_blocks), 1: len(self.model.single_transformer_blocks)}
        layers: dict[str, LayerInfo] = {}
        for index, ((single, block), name) in enumerate(modules):
            attn = self.model.get_submodule(name[: -len(".processor")])
            base = name[: -len(".processor")]
            stream = "single" if single else "double"
            common = dict(place=stream, block=block, attention=0, transformer=0, heads=int(attn.heads), index=index,
                          count=len(modules), family="flux", stream=stream, blocks=counts[single], processor=name,
                          joint=True)
            layers[f"{base}.cross"] = LayerInfo(name=f"{base}.cross", is_cross=True, **common)
            layers[f"{base}.self"] = LayerInfo(name=f"{base}.self", is_cross=False, **common)
        return layers

    def check(self) -> None:
        super().check()
        for name, proc in self.model.attn_processors.items():
            check_processor(name, proc, ("FluxAttnProcessor",), _FIXES,
                            "reset it with pipe.transformer.set_attn_processor(FluxAttnProcessor())")
            if getattr(proc, "_parallel_config", None) is not None:
                raise AttnkitError(f"layer {name} runs context parallelism, which splits the sequence attnkit "
                                   "needs whole; run without a parallel config under attnkit.control")
            module = self.model.get_submodule(name[: -len(".processor")])
            if getattr(module, "fused_projections", False):
                raise AttnkitError("fused QKV projections are enabled: call pipe.transformer.unfuse_qkv_projections()"
                                   " first")

    def processors(self, ctl: Control) -> dict[str, Any]:
        views: dict[str, dict[str, LayerInfo]] = {}
        for info in ctl.layers.values():
            views.setdefault(info.processor, {})[info.kind] = info
        current = self.model.attn_processors
        return {name: FluxProcessor(ctl, Views(self=v["self"], cross=v["cross"]),
                                    getattr(current[name], "_attention_backend", None))
                for name, v in views.items()}

    def read_call(self, arguments: dict[str, Any]) -> ModelCall:
        sample = arguments["hidden_states"]
        ids = arguments.get("img_ids")
        text = arguments.get("encoder_hidden_states")
        if ids is None:
            raise AttnkitError("the FLUX transformer was called without img_ids: attnkit reads the image grid "
                               "from them; call it as FluxPipeline does")
        ids = ids[0] if ids.ndim == 3 else ids
        grid = (int(ids[:, 1].max()) + 1, int(ids[:, 2].max()) + 1)
        return ModelCall(batch=int(sample.shape[0]), timestep=arguments.get("timestep"),
                         latent_hw=(2 * grid[0], 2 * grid[1]), grid=grid,
                         text_len=0 if text is None else int(text.shape[1]))

    def layout(self, batch: int) -> Layout:
        return Layout(prompts=batch, cfg=False)

    def prompt_embeddings(self, prompts: list[str]) -> torch.Tensor:
        with torch.no_grad():
            embeds = self.pipe.encode_prompt(prompt=list(prompts), prompt_2=None, device=self.model.device)[0]
        return embeds

    def blocks(self) -> dict[str, Any]:
        double = {f"transformer_blocks.{i}": b for i, b in enumerate(self.model.transformer_blocks)}
        single = {f"single_transformer_blocks.{i}": b for i, b in enumerate(self.model.single_transformer_blocks)}
        return {**double, **single}

    def add_text_tokens(self, tokens: torch.Tensor) -> list[Any]:
        singles = self.model.single_transformer_blocks
        return add_text_tokens(self.model, tokens, strip_before=singles[0] if len(singles) else None)

    def native_size(self) -> int:
        return int(getattr(self.pipe, "default_sample_size", 128)) * int(getattr(self.pipe, "vae_scale_factor", 8))

    def noise_shape(self, height: int, width: int) -> tuple[int, ...]:
        scale = int(getattr(self.pipe, "vae_scale_factor", 8))
        h, w = 2 * (height // (scale * 2)), 2 * (width // (scale * 2))
        return (1, int(self.model.config.in_channels) // 4, h, w)

    def pack_noise(self, noise: torch.Tensor) -> torch.Tensor:
        return pack(noise)

    def latents_to_grid(self, latents: torch.Tensor, state: Any) -> torch.Tensor:
        if latents.ndim != 3:
            return latents
        if state.grid is None:
            raise AttnkitError("cannot unpack FLUX latents before the first transformer call")
        return unpack(latents, state.grid)

    def grid_to_latents(self, grid: torch.Tensor, state: Any) -> torch.Tensor:
        return pack(grid) if grid.ndim == 4 else grid

    def text_tokenizer(self, max_sequence_length: int | None = None) -> Any:
        from attnkit.tokens import Segment, SegmentedTokenizer

        return SegmentedTokenizer([Segment(self.pipe.tokenizer_2, int(max_sequence_length or 512))], "FLUX")


def pack(latents: torch.Tensor) -> torch.Tensor:
    """``(B, C, h, w)`` latents → FLUX's packed ``(B, h/2 · w/2, 4C)`` (``FluxPipeline._pack_latents``)."""
    b, c, h, w = latents.shape
    x = latents.view(b, c, h // 2, 2, w // 2, 2).permute(0, 2, 4, 1, 3, 5)
    return x.reshape(b, (h // 2) * (w // 2), c * 4)


def unpack(latents: torch.Tensor, grid: tuple[int, int]) -> torch.Tensor:
    """Packed ``(B, gh · gw, 4C)`` latents → ``(B, C, 2gh, 2gw)`` (``FluxPipeline._unpack_latents``)."""
    b, n, c4 = latents.shape
    gh, gw = grid
    if gh * gw != n:
        raise AttnkitError(f"{n} packed latent tokens do not fill the {gh}x{gw} grid of the last transformer call")
    x = latents.view(b, gh, gw, c4 // 4, 2, 2).permute(0, 3, 1, 4, 2, 5)
    return x.reshape(b, c4 // 4, gh * 2, gw * 2)


class RotaryPositions(Positions):
    """FLUX's rotary positions of one layer's image tokens (``cos``/``sin``: ``(image tokens, head_dim)``, the
    rows of ``image_rotary_emb`` the processor applied). Rotary angles add up, so moving a token by ``(rows,
    cols)`` is one more rotation by the angles of the position ids ``(0, rows, cols)``, computed by the
    transformer's own ``pos_embed``; taking positions out rotates back by the token's own angles."""

    def __init__(self, model: Any, cos: torch.Tensor, sin: torch.Tensor) -> None:
        self.model, self.cos, self.sin = model, cos, sin

    @staticmethod
    def _rotate(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
        from diffusers.models.embeddings import apply_rotary_emb

        return apply_rotary_emb(x, (cos, sin), sequence_dim=2)  # what FluxAttnProcessor applies, on (B, H, S, d)

    def shift(self, x: torch.Tensor, rows: int = 0, cols: int = 0) -> torch.Tensor:
        ids = torch.tensor([[0.0, float(rows), float(cols)]], device=x.device)
        cos, sin = self.model.pos_embed(ids)
        return self._rotate(x, cos.to(x.device), sin.to(x.device))

    def remove(self, x: torch.Tensor) -> torch.Tensor:
        return self._rotate(x, self.cos, -self.sin)

    def apply(self, x: torch.Tensor) -> torch.Tensor:
        return self._rotate(x, self.cos, self.sin)


class FluxProcessor(AttnkitProcessor):
    """``FluxAttnProcessor``'s computation (double or single stream), with the engine's controllers on its
    two views; the fused path goes through diffusers' attention dispatcher with this layer's backend."""

    _parallel_config = None

    def __init__(self, ctl: Control, views: Views, backend: Any = None) -> None:
        super().__init__(ctl, views.self)
        self.views = views
        self._attention_backend = backend  # set_attention_backend(...) inside the block updates it too

    def _fused(self, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
               mask: torch.Tensor | None) -> torch.Tensor:
        from diffusers.models.attention_dispatch import dispatch_attention_fn

        # The dispatcher takes (B, S, H, d); our tensors are (B, H, S, d) views of exactly those tensors.
        out = dispatch_attention_fn(query.transpose(1, 2), key.transpose(1, 2), value.transpose(1, 2),
                                    attn_mask=mask, backend=self._attention_backend,
                                    parallel_config=self._parallel_config)
        return out.transpose(1, 2)

    def __call__(self, attn: Any, hidden_states: torch.Tensor, encoder_hidden_states: torch.Tensor = None,
                 attention_mask: torch.Tensor | None = None,
                 image_rotary_emb: torch.Tensor | None = None) -> Any:
        from diffusers.models.embeddings import apply_rotary_emb

        query = attn.to_q(hidden_states).unflatten(-1, (-1, attn.head_dim))
        key = attn.to_k(hidden_states).unflatten(-1, (-1, attn.head_dim))
        value = attn.to_v(hidden_states).unflatten(-1, (-1, attn.head_dim))
        query = attn.norm_q(query)
        key = attn.norm_k(key)
        double = attn.added_kv_proj_dim is not None
        extra = None
        if double:
            context_q = attn.add_q_proj(encoder_hidden_states).unflatten(-1, (-1, attn.head_dim))
            context_k = attn.add_k_proj(encoder_hidden_states).unflatten(-1, (-1, attn.head_dim))
            context_v = attn.add_v_proj(encoder_hidden_states).unflatten(-1, (-1, attn.head_dim))
            context_q = attn.norm_added_q(context_q)
            context_k = attn.norm_added_k(context_k)
            # Extra text-stream tokens stay out of the joint sequence (and of RoPE: FLUX's text position 0).
            (context_q, context_k, context_v), extra = split_extra(self.ctl, context_q, context_k, context_v, 1)
            query = torch.cat([context_q, query], dim=1)
            key = torch.cat([context_k, key], dim=1)
            value = torch.cat([context_v, value], dim=1)
        if image_rotary_emb is not None:
            query = apply_rotary_emb(query, image_rotary_emb, sequence_dim=1)
            key = apply_rotary_emb(key, image_rotary_emb, sequence_dim=1)
        length = query.shape[1]
        text_len = context_q.shape[1] if double else self.ctl.state.text_len
        tokens = TokenLayout(text=slice(0, text_len), image=slice(text_len, length))

        positions = None
        if image_rotary_emb is not None:
            positions = RotaryPositions(self.ctl.model, image_rotary_emb[0][text_len:length],
                                        image_rotary_emb[1][text_len:length])
        out = attend_joint(self.ctl, self.views, query.transpose(1, 2), key.transpose(1, 2), value.transpose(1, 2),
                           tokens, self._fused, attention_mask, extra=extra, positions=positions)

        hidden_states = out.transpose(1, 2).flatten(2, 3)
        hidden_states = hidden_states.to(query.dtype)
        if encoder_hidden_states is not None:
            encoder_hidden_states, hidden_states = hidden_states.split_with_sizes(
                [encoder_hidden_states.shape[1], hidden_states.shape[1] - encoder_hidden_states.shape[1]], dim=1)
            hidden_states = attn.to_out[0](hidden_states.contiguous())
            hidden_states = attn.to_out[1](hidden_states)
            encoder_hidden_states = attn.to_add_out(encoder_hidden_states.contiguous())
            return hidden_states, encoder_hidden_states
        return hidden_states

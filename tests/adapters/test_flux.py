"""The FLUX adapter on a tiny random FLUX.1-like pipeline: layers, the text-first token layout against an oracle
computed from the attention modules' own weights, RoPE, the attention backend, true CFG, packed latents."""

import math

import pytest
import torch
from diffusers.models.attention_dispatch import AttentionBackendName, _AttentionBackendRegistry

from attnkit import AttentionStore, AttnkitError, Controller, LocalBlend, control, describe_layers, generate
from attnkit.adapters import text_tokenizer
from attnkit.adapters.flux import pack, unpack

PROMPTS = ["a red cat wearing sunglasses", "a blue circle"]
TEXT = 32  # max_sequence_length: T5 columns


class Recorder(Controller):
    def __init__(self):
        self.calls = []

    def observe(self, call):
        self.calls.append((call.layer, call.height, call.width, call.step, call.layout, call.key.shape[-2],
                           call.tokens))


def test_layers_double_then_single_two_views_each(flux_pipe):
    layers = describe_layers(flux_pipe.transformer)
    procs = list(flux_pipe.transformer.attn_processors)
    assert sorted({info.processor for info in layers.values()}) == sorted(procs)
    ordered = sorted(layers.values(), key=lambda i: (i.index, i.kind))
    assert [(i.stream, i.block, i.kind) for i in ordered] == [
        ("double", 0, "cross"), ("double", 0, "self"), ("double", 1, "cross"), ("double", 1, "self"),
        ("single", 0, "cross"), ("single", 0, "self"), ("single", 1, "cross"), ("single", 1, "self")]
    assert {i.count for i in ordered} == {4} and {i.blocks for i in ordered} == {2}
    assert all(i.family == "flux" and i.joint and i.place == i.stream and i.heads == 2 for i in ordered)
    assert layers["single_transformer_blocks.1.attn.cross"].processor == "single_transformer_blocks.1.attn.processor"


def _rope(x, cos, sin):
    """RoPE written out: consecutive channel pairs (a, b) rotate to (a cos − b sin, b cos + a sin)."""
    a, b = x[..., 0::2], x[..., 1::2]
    c, s = cos[None, :, None, 0::2], sin[None, :, None, 0::2]
    return torch.stack([a * c - b * s, b * c + a * s], dim=-1).flatten(-2)


def _capture(module):
    seen = {}

    def hook(mod, args, kwargs):
        seen.setdefault("inputs", kwargs)

    return seen, module.register_forward_pre_hook(hook, with_kwargs=True)


def _oracle_maps(attn, inputs, text_len, double):
    """Text-first joint softmax of one FLUX attention module, from its weights: the (image × text) block over
    the text columns and the (image × image) block over the image columns, head-averaged."""
    hs, cos_sin = inputs["hidden_states"], inputs["image_rotary_emb"]

    def heads(x):
        return x.unflatten(-1, (-1, attn.head_dim))

    q, k = attn.norm_q(heads(attn.to_q(hs))), attn.norm_k(heads(attn.to_k(hs)))
    if double:
        ehs = inputs["encoder_hidden_states"]
        q = torch.cat([attn.norm_added_q(heads(attn.add_q_proj(ehs))), q], dim=1)  # text first
        k = torch.cat([attn.norm_added_k(heads(attn.add_k_proj(ehs))), k], dim=1)
    q, k = _rope(q, *cos_sin), _rope(k, *cos_sin)
    scores = torch.einsum("bqhd,bkhd->bhqk", q, k) / math.sqrt(attn.head_dim)
    p = scores.softmax(-1)
    img, txt = slice(text_len, None), slice(0, text_len)
    cross, own = p[:, :, img, txt], p[:, :, img, img]
    return (cross / cross.sum(-1, keepdim=True)).mean(1), (own / own.sum(-1, keepdim=True)).mean(1)


@pytest.mark.parametrize("module", ["transformer_blocks.0.attn", "single_transformer_blocks.1.attn"])
def test_maps_equal_the_text_first_oracle(flux_pipe, run, module):
    attn = flux_pipe.transformer.get_submodule(module)
    seen, handle = _capture(attn)
    store = AttentionStore(kinds=("cross", "self"), res=None, steps=0, layers=[f"{module}.processor"])
    try:
        run(flux_pipe, store, steps=2, max_sequence_length=TEXT)
    finally:
        handle.remove()
    with torch.no_grad():
        cross, own = _oracle_maps(attn, seen["inputs"], TEXT, double=module.startswith("transformer_blocks"))
    got_cross = store.layer_maps("cross")[f"{module}.cross"]
    got_self = store.layer_maps("self")[f"{module}.self"]
    assert got_cross.shape == (2, 8, 8, TEXT) and got_self.shape == (2, 8, 8, 64)
    torch.testing.assert_close(got_cross.reshape(2, 64, TEXT), cross, atol=1e-5, rtol=1e-4)
    torch.testing.assert_close(got_self.reshape(2, 64, 64), own, atol=1e-5, rtol=1e-4)


def test_grid_steps_and_layout_from_the_call(flux_pipe, run):
    rec = Recorder()
    run(flux_pipe, rec, steps=3, prompts=PROMPTS[:1], height=32, width=48, max_sequence_length=TEXT)
    assert len(rec.calls) == 3 * 8  # 4 modules x 2 views per step
    assert {(h, w) for _, h, w, *_ in rec.calls} == {(8, 12)}  # 2x2 patches of 16x24 latents
    assert [c[3] for c in rec.calls] == sorted(c[3] for c in rec.calls) and rec.calls[-1][3] == 2
    assert {c[4] for c in rec.calls} == {__import__("attnkit").Layout(prompts=1, cfg=False)}
    cross = [c for c in rec.calls if c[0].is_cross]
    assert {c[5] for c in cross} == {TEXT} and all(c[6].text_first for c in cross)


def test_true_cfg_negative_pass_runs_stock_and_unseen(flux_pipe, run):
    kwargs = dict(negative_prompt=["a green tree"] * 2, true_cfg_scale=2.0, max_sequence_length=TEXT)
    stock = run(flux_pipe, steps=2, **kwargs)
    rec = Recorder()
    hooked = run(flux_pipe, rec, AttentionStore(res=None), steps=2, **kwargs)
    assert abs(hooked - stock).max() <= 1e-5
    assert len(rec.calls) == 2 * 8  # one (conditional) pass per step, not two


def test_chosen_attention_backend_keeps_running(flux_pipe, run):
    # A spy in place of the "_native_math" backend: every layer no controller edits must call it.
    name = AttentionBackendName._NATIVE_MATH
    original = _AttentionBackendRegistry._backends[name]
    active = _AttentionBackendRegistry._active_backend
    calls = []

    def spy(*args, **kwargs):
        calls.append(kwargs["query"].shape)
        return original(*args, **kwargs)

    stock = run(flux_pipe, steps=1, max_sequence_length=TEXT)
    _AttentionBackendRegistry._backends[name] = spy
    try:
        flux_pipe.transformer.set_attention_backend("_native_math")
        calls.clear()
        hooked = run(flux_pipe, AttentionStore(res=None), steps=1, max_sequence_length=TEXT)
        assert len(calls) == 4 and abs(hooked - stock).max() <= 1e-5
        with control(flux_pipe, AttentionStore()):  # processors keep the backend while installed
            assert {p._attention_backend for p in flux_pipe.transformer.attn_processors.values()} == {name}
    finally:
        _AttentionBackendRegistry._backends[name] = original
        flux_pipe.transformer.reset_attention_backend()
        _AttentionBackendRegistry._active_backend = active
    assert {p._attention_backend for p in flux_pipe.transformer.attn_processors.values()} == {None}


def test_fused_projections_refused(flux_pipe):
    flux_pipe.transformer.fuse_qkv_projections()
    try:
        with pytest.raises(AttnkitError, match="unfuse_qkv_projections"):
            with control(flux_pipe, AttentionStore()):
                pass
    finally:
        flux_pipe.transformer.unfuse_qkv_projections()
    with control(flux_pipe, AttentionStore()):
        pass


def test_packed_latents_round_trip_and_shared_noise(flux_pipe):
    grid = torch.randn(2, 4, 16, 24)
    assert torch.equal(unpack(pack(grid), (8, 12)), grid)
    from diffusers import FluxPipeline

    ours = pack(grid)
    theirs = FluxPipeline._pack_latents(grid, 2, 4, 16, 24)
    assert torch.equal(ours, theirs)
    noise = __import__("attnkit").shared_latents(flux_pipe, seed=3, batch=2)
    assert noise.shape == (2, 64, 16) and torch.equal(noise[0], noise[1])


def test_local_blend_works_on_unpacked_latents(flux_pipe):
    prompts = ["a red cat", "a blue cat"]
    tok = text_tokenizer(flux_pipe, TEXT)
    blend = LocalBlend(prompts, tok, ["blue"], threshold=0.6)
    result = generate(flux_pipe, prompts, blend, steps=3, progress=False, max_sequence_length=TEXT)
    mask = blend.last_mask  # (prompts, 1, 16, 16): the latent grid, not the packed tokens
    assert mask.shape == (2, 1, 16, 16) and 0 < int(mask[1].sum()) < mask[1].numel()
    grid = unpack(result.latents, (8, 8))
    keep = ~mask[1, 0]
    # Outside the mask the target is the source (the blend after the last step): exactly, per channel.
    torch.testing.assert_close(grid[1][:, keep], grid[0][:, keep], atol=1e-6, rtol=0)
    assert not torch.allclose(grid[1][:, ~keep], grid[0][:, ~keep])

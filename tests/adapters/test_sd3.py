"""The SD3 adapter on a tiny random SD3.5-like pipeline (q/k RMS norms, dual attention in block 0, a
context-pre-only last block): layers, the image-first token layout against an oracle computed from the
attention modules' own weights, the CFG layout, what is refused."""

import math

import pytest
import torch

from attnkit import AttentionStore, AttnkitError, Controller, Layout, control, describe_layers

PROMPTS = ["a red cat wearing sunglasses", "a blue circle"]
TEXT = 77 + 256  # CLIP-L/G columns, then T5 (the pipeline's default max_sequence_length)


class Recorder(Controller):
    def __init__(self):
        self.calls = []

    def observe(self, call):
        self.calls.append((call.layer, call.height, call.width, call.step, call.layout, call.key.shape[-2]))


def test_layers_joint_views_and_the_second_attention(sd3_pipe):
    layers = describe_layers(sd3_pipe.transformer)
    assert sorted({i.processor for i in layers.values()}) == sorted(sd3_pipe.transformer.attn_processors)
    ordered = sorted(layers.values(), key=lambda i: (i.index, i.kind))
    assert [(i.block, i.second, i.kind) for i in ordered] == [
        (0, False, "cross"), (0, False, "self"), (0, True, "self"), (1, False, "cross"), (1, False, "self"),
        (2, False, "cross"), (2, False, "self")]
    assert [i.index for i in ordered] == [0, 0, 1, 2, 2, 3, 3] and {i.count for i in ordered} == {4}
    second = layers["transformer_blocks.0.attn2.self"]
    assert second.attention == 1 and not second.joint and second.blocks == 3 and second.place == "double"


def _oracle_maps(attn, inputs, joint):
    """Image-first joint softmax of one SD3 attention module, from its weights (cond rows of the CFG batch):
    the image × text block over the text columns, the image × image block over the image columns."""
    hs = inputs["hidden_states"]
    b = hs.shape[0]

    def heads(x):
        return x.view(b, -1, attn.heads, x.shape[-1] // attn.heads).transpose(1, 2)

    q, k = attn.norm_q(heads(attn.to_q(hs))), attn.norm_k(heads(attn.to_k(hs)))
    n_img = q.shape[2]
    if joint:
        ehs = inputs["encoder_hidden_states"]
        q = torch.cat([q, attn.norm_added_q(heads(attn.add_q_proj(ehs)))], dim=2)  # image first
        k = torch.cat([k, attn.norm_added_k(heads(attn.add_k_proj(ehs)))], dim=2)
    p = (q @ k.transpose(-1, -2) / math.sqrt(q.shape[-1])).softmax(-1)[b // 2:]  # [negative, positive]
    own = p[:, :, :n_img, :n_img]
    own = (own / own.sum(-1, keepdim=True)).mean(1)
    if not joint:
        return None, own
    cross = p[:, :, :n_img, n_img:]
    return (cross / cross.sum(-1, keepdim=True)).mean(1), own


@pytest.mark.parametrize("module", ["transformer_blocks.1.attn", "transformer_blocks.0.attn2",
                                    "transformer_blocks.2.attn"])
def test_maps_equal_the_image_first_oracle(sd3_pipe, run, module):
    attn = sd3_pipe.transformer.get_submodule(module)
    seen = {}

    def capture(mod, args, kwargs):
        seen.setdefault("inputs", kwargs)

    handle = attn.register_forward_pre_hook(capture, with_kwargs=True)
    store = AttentionStore(kinds=("cross", "self"), res=None, steps=0, layers=[f"{module}.processor"])
    try:
        run(sd3_pipe, store, steps=2, guidance_scale=5.0)
    finally:
        handle.remove()
    joint = not module.endswith("attn2")
    with torch.no_grad():
        cross, own = _oracle_maps(attn, seen["inputs"], joint)
    got_self = store.layer_maps("self")[f"{module}.self"]
    assert got_self.shape == (2, 8, 8, 64)
    torch.testing.assert_close(got_self.reshape(2, 64, 64), own, atol=1e-5, rtol=1e-4)
    if joint:
        got_cross = store.layer_maps("cross")[f"{module}.cross"]
        assert got_cross.shape == (2, 8, 8, TEXT)
        torch.testing.assert_close(got_cross.reshape(2, 64, TEXT), cross, atol=1e-5, rtol=1e-4)
    else:
        assert f"{module}.cross" not in store.layer_maps("cross")


@pytest.mark.parametrize("guidance", [5.0, 1.0])
def test_layout_grid_and_steps(sd3_pipe, run, guidance):
    rec = Recorder()
    run(sd3_pipe, rec, steps=2, guidance_scale=guidance, height=48, width=32)
    assert len(rec.calls) == 2 * 7
    assert {c[4] for c in rec.calls} == {Layout(prompts=2, cfg=guidance > 1)}
    assert {(c[1], c[2]) for c in rec.calls} == {(12, 8)}
    assert [c[3] for c in rec.calls] == [0] * 7 + [1] * 7
    assert {c[5] for c in rec.calls if c[0].is_cross} == {TEXT}


def test_skip_layer_guidance_refused_and_restored(sd3_pipe, run):
    before = dict(sd3_pipe.transformer.attn_processors)
    with pytest.raises(AttnkitError, match="skip_guidance_layers"):
        run(sd3_pipe, AttentionStore(res=None), steps=3, skip_guidance_layers=[1], skip_layer_guidance_start=0.0,
            skip_layer_guidance_stop=1.0)
    after = sd3_pipe.transformer.attn_processors
    assert all(after[n] is before[n] for n in before)


def test_fused_projections_and_pag_refused(sd3_pipe):
    sd3_pipe.transformer.fuse_qkv_projections()
    try:
        with pytest.raises(AttnkitError, match="unfuse_qkv_projections"):
            with control(sd3_pipe, AttentionStore()):
                pass
    finally:
        sd3_pipe.transformer.unfuse_qkv_projections()
    from diffusers.models.attention_processor import JointAttnProcessor2_0, PAGJointAttnProcessor2_0

    stock = dict(sd3_pipe.transformer.attn_processors)
    sd3_pipe.transformer.set_attn_processor(PAGJointAttnProcessor2_0())
    try:
        with pytest.raises(AttnkitError, match="PAGJointAttnProcessor2_0"):
            with control(sd3_pipe, AttentionStore()):
                pass
    finally:
        sd3_pipe.transformer.set_attn_processor(stock)
    assert all(isinstance(p, JointAttnProcessor2_0) for p in sd3_pipe.transformer.attn_processors.values())

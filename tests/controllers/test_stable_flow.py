"""Stable Flow's injection against explicit oracles, block bypassing, vital layers and editing on the tiny
MM-DiT pipelines."""

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from attnkit import AttnkitError, Controller, control, generate
from attnkit.adapters import adapter_for
from attnkit.adapters.joint import bypass_block
from attnkit.controllers.stable_flow import StableFlowInjection, block_of, inject_reference
from attnkit.stable_flow import VitalLayers, nudged_inversion, stable_flow_edit, vital_layers
from attnkit.testing import tiny_pipeline

PROMPTS = ["a red cat", "a blue cat wearing sunglasses"]


class Recorder(Controller):
    """Records, per layer view, the q/k/v it is offered (before or after other controllers' edits) and the
    image queries' attention output."""

    def __init__(self):
        self.qkv, self.out = {}, {}

    def edit_qkv(self, call):
        self.qkv[call.layer.name] = (call.query, call.key, call.value)

    def observe_output(self, call):
        self.out[call.layer.name] = call.output


def test_inject_reference_copies_row_0_of_each_half():
    x = torch.arange(8.0).view(4, 2)
    out = inject_reference(x, [slice(0, 2), slice(2, 4)])
    assert torch.equal(out[1], x[0]) and torch.equal(out[3], x[2])
    assert torch.equal(out[0], x[0]) and torch.equal(out[2], x[2])
    assert torch.equal(x, torch.arange(8.0).view(4, 2))  # the input is not changed in place


def test_injected_attention_matches_the_oracle(mmdit):
    """At an injected block, row 1's image output is attention of its own queries over [its text keys; row 0's
    image keys] (values alike); blocks not chosen are untouched; row 0 keeps its own output."""
    blocks = list(adapter_for(mmdit).blocks())
    chosen = blocks[0]
    before, after = Recorder(), Recorder()
    with control(mmdit, before, StableFlowInjection([chosen]), after) as ctl:
        mmdit(PROMPTS, num_inference_steps=1, generator=torch.Generator().manual_seed(0), output_type="latent",
              callback_on_step_end=ctl.callback)
    cond = getattr(mmdit, "_guidance_scale", 0) > 1 and adapter_for(mmdit).family == "sd3"  # SD3 doubles its batch
    rows = slice(2, 4) if cond else slice(0, 2)
    for name, (q, k, v) in before.qkv.items():
        if not name.endswith(".self") or "attn2" in name:
            continue
        _, k_after, v_after = after.qkv[name]
        if block_of_name(name) == chosen:
            assert torch.equal(k_after[rows][1], k[rows][0]) and torch.equal(v_after[rows][1], v[rows][0])
            assert torch.equal(k_after[rows][0], k[rows][0])
            cross = name[: -len(".self")] + ".cross"
            if cross in before.qkv:
                _, kt, vt = before.qkv[cross]
                r0, r1 = rows.start, rows.start + 1
                keys = torch.cat([kt[r1], k[r0]], dim=1)
                values = torch.cat([vt[r1], v[r0]], dim=1)
                expected = F.scaled_dot_product_attention(q[r1], keys, values)
                torch.testing.assert_close(after.out[name][r1], expected, atol=1e-5, rtol=1e-4)
                own = F.scaled_dot_product_attention(q[r0], torch.cat([kt[r0], k[r0]], 1),
                                                     torch.cat([vt[r0], v[r0]], 1))
                torch.testing.assert_close(after.out[name][r0], own, atol=1e-5, rtol=1e-4)
        else:
            assert torch.equal(k_after, k) and torch.equal(v_after, v)


def block_of_name(view_name: str) -> str:
    return view_name.rsplit(".", 2)[0]


def test_reference_row_unchanged_and_edits_changed(mmdit):
    plain = generate(mmdit, PROMPTS, steps=2, progress=False)
    injected = generate(mmdit, PROMPTS, StableFlowInjection(), steps=2, progress=False)
    assert (injected.latents[0] - plain.latents[0]).abs().max() <= 1e-5
    assert (injected.latents[1] - plain.latents[1]).abs().max() > 1e-4


def test_identical_prompts_with_injection_everywhere_equal_row_0(mmdit):
    """Rows with the reference's prompt and noise, injected in every block, stay the reference."""
    result = generate(mmdit, [PROMPTS[0]] * 3, StableFlowInjection(), steps=2, progress=False)
    for row in (1, 2):
        assert (result.latents[row] - result.latents[0]).abs().max() <= 1e-5


def test_layers_by_index_and_bad_names(mmdit):
    names = list(adapter_for(mmdit).blocks())
    inject = StableFlowInjection([0, names[-1]])
    with control(mmdit, inject):
        assert inject.blocks == {names[0], names[-1]}
    with pytest.raises(AttnkitError, match="not a block"):
        with control(mmdit, StableFlowInjection(["transformer_blocks.99"])):
            pass
    with pytest.raises(AttnkitError, match="does not exist"):
        with control(mmdit, StableFlowInjection([len(names)])):
            pass
    with pytest.raises(AttnkitError, match="no layers"):
        StableFlowInjection([])


def test_block_of():
    layers = {info.name: info for info in adapter_for(tiny_pipeline("flux")).layers().values()}
    assert block_of(layers["single_transformer_blocks.1.attn.self"]) == "single_transformer_blocks.1"


def test_bypass_block_is_identity_and_always_removed(mmdit):
    block = next(iter(adapter_for(mmdit).blocks().values()))
    with pytest.raises(RuntimeError, match="boom"):
        with bypass_block(block):
            assert block._forward_hooks
            raise RuntimeError("boom")
    assert not block._forward_hooks
    records = []
    handle = block.register_forward_pre_hook(lambda m, a, k: records.append(k), with_kwargs=True)
    try:
        with bypass_block(block):
            generate(mmdit, PROMPTS[0], steps=1, progress=False)
    finally:
        handle.remove()
    # the block's output is its input: the next block received exactly what this one got
    nxt = list(adapter_for(mmdit).blocks().values())[1]
    got = []
    h1 = nxt.register_forward_pre_hook(lambda m, a, k: got.append(k["hidden_states"]), with_kwargs=True)
    h2 = block.register_forward_pre_hook(lambda m, a, k: got.append(k["hidden_states"]), with_kwargs=True)
    try:
        with bypass_block(block):
            generate(mmdit, PROMPTS[0], steps=1, progress=False)
    finally:
        h1.remove()
        h2.remove()
    assert torch.equal(got[0], got[1])
    assert not block._forward_hooks


def test_vital_layers_scores_match_a_manual_bypass(mmdit):
    vital = vital_layers(mmdit, PROMPTS[0], steps=2, progress=False)
    names = list(adapter_for(mmdit).blocks())
    assert list(vital.scores) == names and set(vital.ranked) == set(names)
    assert all(s >= 0 for s in vital.scores.values())
    # oracle for one block: bypass it by hand and measure the RMS pixel difference
    reference = generate(mmdit, PROMPTS[0], steps=2, progress=False).images[0]
    with bypass_block(adapter_for(mmdit).blocks()[names[1]]):
        changed = generate(mmdit, PROMPTS[0], steps=2, progress=False).images[0]
    a = np.asarray(reference, dtype=np.float64) / 255
    b = np.asarray(changed, dtype=np.float64) / 255
    assert vital.scores[names[1]] == pytest.approx(float(np.sqrt(((a - b) ** 2).mean())), abs=1e-9)
    assert vital.top(1) == [vital.ranked[0]]
    assert len(vital.top()) == max(1, round(9 / 57 * len(names)))
    # the pipeline is left as it was
    assert np.array_equal(np.asarray(generate(mmdit, PROMPTS[0], steps=2, progress=False).images[0]),
                          np.asarray(reference))
    custom = vital_layers(mmdit, PROMPTS[0], steps=1, blocks=names[:1], metric=lambda x, y: 1.0, progress=False)
    assert custom.scores == {names[0]: 1.0}
    latent = vital_layers(mmdit, PROMPTS[0], steps=1, blocks=names[:1], metric="latent", progress=False)
    assert latent.metric == "latent"


def test_vital_layers_bad_input(mmdit):
    with pytest.raises(AttnkitError, match="not a block"):
        vital_layers(mmdit, "a cat", blocks=["nope"], progress=False)
    with pytest.raises(AttnkitError, match="unknown metric"):
        vital_layers(mmdit, "a cat", metric="dino", progress=False)
    with pytest.raises(AttnkitError, match="no seeds"):
        vital_layers(mmdit, "a cat", seeds=[], progress=False)
    scores = VitalLayers(scores={"a": 1.0, "b": 2.0}, metric="pixel", prompts=["x"], seeds=[0])
    with pytest.raises(AttnkitError, match="choose between"):
        scores.top(3)
    assert scores.top(1) == ["b"] and scores.top(2) == ["a", "b"]


def test_stable_flow_edit_generated(mmdit):
    names = list(adapter_for(mmdit).blocks())
    result = stable_flow_edit(mmdit, PROMPTS[0], PROMPTS[1:], layers=[names[0]], steps=2, progress=False)
    plain = generate(mmdit, PROMPTS, steps=2, progress=False)
    assert np.array_equal(np.asarray(result.source), np.asarray(plain.images[0]))
    assert result.layers == [names[0]] and len(result.edits) == 1
    auto = stable_flow_edit(mmdit, PROMPTS[0], PROMPTS[1], steps=1, progress=False)  # vital layers measured
    assert auto.layers and set(auto.layers) <= set(names)
    with pytest.raises(AttnkitError, match="no edit prompt"):
        stable_flow_edit(mmdit, PROMPTS[0], [], layers=[0])
    with pytest.raises(AttnkitError, match="nudge"):
        stable_flow_edit(mmdit, PROMPTS[0], PROMPTS[1], layers=[0], image=tiny_image(), nudge=0)


def test_stable_flow_edit_real_image_source_row_is_the_encoded_image(mmdit):
    from attnkit.flow_inversion import encode
    from attnkit.sampling import decode_latents

    image = tiny_image()
    names = list(adapter_for(mmdit).blocks())
    result = stable_flow_edit(mmdit, PROMPTS[0], PROMPTS[1], layers=[names[0]], image=image, steps=2,
                              progress=False)
    expected = decode_latents(mmdit, encode(mmdit, image))[0]
    assert np.abs(np.asarray(result.source, dtype=int) - np.asarray(expected, dtype=int)).max() <= 1
    assert result.settings["nudge"] == 1.15 and result.settings["real_image"]
    inv = nudged_inversion(mmdit, image, PROMPTS[0], steps=2)
    torch.testing.assert_close(inv.latents[0:1], encode(mmdit, image) * 1.15)
    assert inv.evaluations == 2 and inv.guidance == 1.0


def tiny_image():
    from PIL import Image

    picture = Image.new("RGB", (32, 32), (240, 240, 240))
    picture.paste((200, 30, 30), (8, 8, 20, 20))
    return picture


def test_composes_with_the_store(mmdit):
    from attnkit import AttentionStore

    names = list(adapter_for(mmdit).blocks())
    alone = generate(mmdit, PROMPTS, StableFlowInjection([names[0]]), steps=2, progress=False)
    store = AttentionStore(res=None)
    both = generate(mmdit, PROMPTS, StableFlowInjection([names[0]]), store, steps=2, progress=False)
    assert torch.equal(alone.latents, both.latents)
    assert store.word_map(PROMPTS[1], "sunglasses", row=1).shape == (8, 8)

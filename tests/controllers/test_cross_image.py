"""Cross-image attention controller: formulas against plain-torch oracles, where and when it swaps, batch rows."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from attnkit.controllers.cross_image import (
    COARSE_STEPS,
    FINE_STEPS,
    PAPER_LOOP,
    CrossImageAttention,
    MaskedAdaIN,
    adain,
    contrast,
    decoder_grid_ranks,
    guide,
    in_window,
    masked_adain,
    swap_guidance_scales,
)
from attnkit.engine import AttnkitError, Controller, Layout, control
from attnkit.inversion import encode_text
from attnkit.testing import tiny_pipeline


@pytest.fixture(scope="module")
def pipe():
    return tiny_pipeline("sd")


def _unet(pipe, x, t=500, prompt="a red circle"):
    text = encode_text(pipe, prompt, 32, 32)
    with torch.no_grad():
        return pipe.unet(x, t, encoder_hidden_states=text.cond.expand(x.shape[0], -1, -1)).sample


# -- formulas ---------------------------------------------------------------------------------------------------
def test_contrast_matches_the_papers_formula_on_softmax_rows():
    probs = torch.randn(2, 3, 16, 16).softmax(dim=-1)
    n = probs.shape[-1]
    oracle = torch.clip((probs - 1 / n) * 1.67 + 1 / n, 0.0, 1.0)
    assert torch.allclose(contrast(probs, 1.67), oracle, atol=1e-7)
    assert torch.allclose(contrast(probs, 1.0), probs, atol=1e-7)
    assert not torch.allclose(contrast(probs, 1.67).sum(-1), torch.ones(2, 3, 16))  # not renormalised


def test_adain_and_masked_adain_match_explicit_per_channel_statistics():
    g = torch.Generator().manual_seed(0)
    content, style = torch.randn(4, 8, 8, generator=g), torch.randn(4, 8, 8, generator=g) * 3 + 1
    c_mask = (torch.rand(8, 8, generator=g) > 0.5).float()
    s_mask = (torch.rand(8, 8, generator=g) > 0.3).float()
    out = masked_adain(content, style, c_mask, s_mask)
    for ch in range(4):
        c = content[ch][c_mask > 0]
        s = style[ch][s_mask > 0]
        c_mean, c_std = c.mean(), math.sqrt(float(c.var(unbiased=True)) + 1e-5)
        s_mean, s_std = s.mean(), math.sqrt(float(s.var(unbiased=True)) + 1e-5)
        expected = torch.where(c_mask > 0, (content[ch] - c_mean) / c_std * s_std + s_mean, content[ch])
        assert torch.allclose(out[ch], expected, atol=1e-5)
    plain = adain(content, style)
    for ch in range(4):
        assert math.isclose(float(plain[ch].mean()), float(style[ch].mean()), abs_tol=1e-5)
        assert math.isclose(float(plain[ch].std()), math.sqrt(float(style[ch].var()) + 1e-5), rel_tol=1e-4)
    assert torch.equal(masked_adain(content, style, None, None), plain)
    empty = torch.zeros(8, 8)
    assert torch.equal(masked_adain(content, style, empty, s_mask), content)  # no statistics: unchanged


def test_swap_guidance_schedule_is_the_official_linspace():
    assert swap_guidance_scales(3.5, 68) == pytest.approx(np.linspace(3.5, 1.75, 68).tolist())
    assert swap_guidance_scales(1.5, 5) == pytest.approx(np.linspace(1.5, 1.0, 5).tolist())
    assert swap_guidance_scales(3.5, 1) == [3.5]
    plain, swap = torch.zeros(3), torch.ones(3)
    assert torch.equal(guide(swap, plain, 2.5), torch.full((3,), 2.5))


def test_windows_are_fractions_of_the_loop_and_reproduce_the_official_ranges():
    fine = [s for s in range(PAPER_LOOP) if in_window(s, PAPER_LOOP, FINE_STEPS)]
    coarse = [s for s in range(PAPER_LOOP) if in_window(s, PAPER_LOOP, COARSE_STEPS)]
    assert fine == coarse == list(range(10, 68))  # official 10-90 and 10-70 of 68 steps: both to the end
    assert [s for s in range(17) if in_window(s, 17, FINE_STEPS)] == list(range(2, 17))
    assert in_window(3, 10, (3, 4)) and not in_window(4, 10, (3, 4))
    assert in_window(0, 5, None)


def test_structure_kv_quirk_steps():
    swap = CrossImageAttention(structure_kv=True)
    steps = [s for s in range(PAPER_LOOP) if swap.source(s, PAPER_LOOP) == swap.structure]
    assert [s for s in steps if s >= 10] == [10, 15, 20, 25, 30, 35]
    assert CrossImageAttention().source(10, PAPER_LOOP) == 1  # off by default


def test_decoder_grid_ranks(pipe):
    assert decoder_grid_ranks(pipe.unet) == {1: 0, 0: 1}  # up block 1 is the finest (16x16)
    xl = tiny_pipeline("sdxl")
    assert decoder_grid_ranks(xl.unet) == {0: 0}  # one decoder grid with attention


# -- the controller in the engine -----------------------------------------------------------------------------------
class Spy(Controller):
    """Records q/k/v of every self-attention call as it arrives (placed before or after the swap)."""

    def __init__(self):
        self.calls = []

    def edit_qkv(self, call):
        self.calls.append((call.layer, call.height, call.key.clone(), call.value.clone(), call.query.clone()))

    def observe(self, call):
        if call.edited is not None:
            self.calls[-1] = (*self.calls[-1], call.edited.clone())


def test_swap_acts_on_decoder_self_attention_of_the_output_row_only(pipe):
    before, swap, after = Spy(), CrossImageAttention(contrast=1.0), Spy()
    x = torch.randn(3, 4, 16, 16, generator=torch.Generator().manual_seed(0))
    with control(pipe, before, swap, after, layout=Layout(prompts=3, cfg=False)) as ctl:
        ctl.set_step(30, PAPER_LOOP)
        _unet(pipe, x)
    swapped = 0
    for (layer, _, k0, v0, _), (_, _, k1, v1, _) in zip(before.calls, after.calls, strict=True):
        if layer.place == "up" and not layer.is_cross:
            swapped += 1
            assert torch.equal(k1[0], k0[1]) and torch.equal(v1[0], v0[1])  # output <- appearance
            assert torch.equal(k1[1:], k0[1:]) and torch.equal(v1[1:], v0[1:])  # others untouched
        else:
            assert torch.equal(k1, k0) and torch.equal(v1, v0)
    assert swapped == swap.swapped_calls == 4
    # outside the window nothing changes
    quiet = CrossImageAttention()
    with control(pipe, quiet, layout=Layout(prompts=3, cfg=False)) as ctl:
        ctl.set_step(5, PAPER_LOOP)
        _unet(pipe, x)
    assert quiet.swapped_calls == 0


def test_layer_output_matches_a_plain_torch_oracle(pipe):
    """One swapped layer's output = to_out(clip((softmax(q_out k_appᵀ/√d) − 1/N)·β + 1/N) · v_app)."""
    name = "up_blocks.1.attentions.0.transformer_blocks.0.attn1"
    module = pipe.unet.get_submodule(name)
    seen = {}
    pre = module.register_forward_pre_hook(lambda m, args, kwargs: seen.update(x=args[0] if args else
                                                                                 kwargs["hidden_states"]),
                                           with_kwargs=True)
    post = module.register_forward_hook(lambda m, args, out: seen.update(out=out))
    x = torch.randn(3, 4, 16, 16, generator=torch.Generator().manual_seed(1))
    try:
        with control(pipe, CrossImageAttention(), layout=Layout(prompts=3, cfg=False)) as ctl:
            ctl.set_step(30, PAPER_LOOP)
            _unet(pipe, x)
            hidden = seen["x"]
    finally:
        pre.remove()
        post.remove()
    heads = module.heads
    with torch.no_grad():
        q, k, v = module.to_q(hidden), module.to_k(hidden), module.to_v(hidden)
        b, n, c = q.shape
        d = c // heads

        def split(t):
            return t.view(b, n, heads, d).transpose(1, 2)

        q, k, v = split(q), split(k), split(v)
        probs = torch.softmax(q[0] @ k[1].transpose(-1, -2) / math.sqrt(d), dim=-1)
        probs = torch.clip((probs - 1 / n) * 1.67 + 1 / n, 0, 1)
        out0 = (probs @ v[1]).transpose(0, 1).reshape(n, c)
        plain = torch.softmax(q @ k.transpose(-1, -2) / math.sqrt(d), dim=-1) @ v
        rest = plain.transpose(1, 2).reshape(b, n, c)
        expected = module.to_out[0](torch.cat([out0[None], rest[1:]]))
    assert torch.allclose(seen["out"], expected, atol=1e-5)


class Observer(Controller):
    """Reads every self-attention map (as a store does), which puts the contrast on the probability path."""

    def __init__(self):
        self.maps = []

    def observe(self, call):
        if not call.is_cross and call.layer.place == "up":
            self.maps.append(call.probs(slice(0, 1)).clone())


def test_rowwise_contrast_equals_the_probability_path(pipe):
    """Alone, the contrast is made for the output row only (no controller asks for every row's probabilities);
    beside a controller that reads maps it takes the probability path. Both give the same UNet output, and the
    reader sees the contrasted maps."""
    x = torch.randn(8, 4, 16, 16, generator=torch.Generator().manual_seed(4))
    for cfg in (False, True):
        layout, rows = Layout(prompts=4, cfg=cfg), x if cfg else x[:4]
        alone, beside, reader = CrossImageAttention(), CrossImageAttention(), Observer()
        with control(pipe, alone, layout=layout) as ctl:
            ctl.set_step(30, PAPER_LOOP)
            rowwise = _unet(pipe, rows)
            assert alone._rowwise
        with control(pipe, beside, reader, layout=layout) as ctl:
            ctl.set_step(30, PAPER_LOOP)
            explicit = _unet(pipe, rows)
            assert not beside._rowwise
        assert alone.swapped_calls == beside.swapped_calls == 4
        assert torch.allclose(rowwise, explicit, atol=1e-5)
        assert len(reader.maps) == 4 and all(float(m.min()) == 0.0 for m in reader.maps)  # clipped: contrasted
    with control(pipe, CrossImageAttention(contrast=1.0), layout=Layout(prompts=4, cfg=False)) as ctl:
        ctl.set_step(30, PAPER_LOOP)
        plain_swap = _unet(pipe, x[:4])
    assert not torch.allclose(plain_swap[0], explicit[0], atol=1e-4)  # the contrast does change the output row


def test_both_halves_swap_within_themselves_under_guidance(pipe):
    before, after = Spy(), Spy()
    x = torch.randn(6, 4, 16, 16, generator=torch.Generator().manual_seed(2))
    with control(pipe, before, CrossImageAttention(contrast=1.0), after, layout=Layout(prompts=3, cfg=True)) as c:
        c.set_step(30, PAPER_LOOP)
        _unet(pipe, x)
    for (layer, _, k0, _, _), (_, _, k1, _, _) in zip(before.calls, after.calls, strict=True):
        if layer.place == "up" and not layer.is_cross:
            assert torch.equal(k1[0], k0[1]) and torch.equal(k1[3], k0[4])
            assert torch.equal(k1[[1, 2, 4, 5]], k0[[1, 2, 4, 5]])


def test_other_rows_outputs_are_unchanged_by_the_swap(pipe):
    x = torch.randn(4, 4, 16, 16, generator=torch.Generator().manual_seed(3))
    stock = _unet(pipe, x)
    with control(pipe, CrossImageAttention(), layout=Layout(prompts=4, cfg=False)) as ctl:
        ctl.set_step(30, PAPER_LOOP)
        swapped = _unet(pipe, x)
    assert torch.allclose(swapped[1:], stock[1:], atol=1e-5)  # appearance, structure and the plain row
    assert not torch.allclose(swapped[0], stock[0], atol=1e-3)


def test_explicit_grids_choose_layers_by_side(pipe):
    spy = Spy()
    swap = CrossImageAttention(grids=(8,), grid_steps=((0, 100),), contrast=1.0)
    with control(pipe, swap, spy, layout=Layout(prompts=3, cfg=False)) as ctl:
        ctl.set_step(0, 10)
        _unet(pipe, torch.randn(3, 4, 16, 16))
    assert swap.swapped_calls == 2  # the two 8x8 decoder self-attention layers


def test_masked_adain_controller_acts_in_its_window_on_the_output_row():
    g = torch.Generator().manual_seed(4)
    latents = torch.randn(4, 4, 8, 8, generator=g)
    masks = (torch.ones(4, 4), torch.ones(4, 4))  # resized to 8x8
    hook = MaskedAdaIN(masks=masks, steps=(2, 4))

    class Ctl:
        num_steps = 10

    assert hook.on_step_end(Ctl(), 1, {"latents": latents}) == {}
    out = hook.on_step_end(Ctl(), 2, {"latents": latents})["latents"]
    assert torch.allclose(out[0], adain(latents[0], latents[1]), atol=1e-6)
    assert torch.equal(out[1:], latents[1:])
    assert hook.applied == [2]


def test_bad_settings_are_refused():
    with pytest.raises(AttnkitError, match="one role"):
        CrossImageAttention(output=1, appearance=1)
    with pytest.raises(AttnkitError, match="contrast"):
        CrossImageAttention(contrast=float("nan"))
    with pytest.raises(AttnkitError, match="grid_steps"):
        CrossImageAttention(grid_steps=((0, 1, 2),))
    with pytest.raises(AttnkitError, match="grids"):
        CrossImageAttention(grids=(64, 32, 16))
    with pytest.raises(AttnkitError, match="masks"):
        MaskedAdaIN(masks=(torch.ones(2, 2),))


def test_too_few_rows_is_a_clear_error_and_hooks_are_removed(pipe):
    saved = dict(pipe.unet.attn_processors)
    with pytest.raises(AttnkitError, match=r"\[output, appearance, structure\]"):
        with control(pipe, CrossImageAttention(), layout=Layout(prompts=2, cfg=False)) as ctl:
            ctl.set_step(30, PAPER_LOOP)
            _unet(pipe, torch.randn(2, 4, 16, 16))
    assert dict(pipe.unet.attn_processors) == saved

"""Shared-attention controllers against explicit oracles of the official code's formulas.

The oracles below do not use attnkit's engine: each installs its own attention processor that computes
attention explicitly, counts steps with its own UNet hook and layers with its own call counter, and applies the
official formulas (google/style-aligned ``sa_handler.py``, TencentARC/MasaCtrl ``masactrl.py``,
NVlabs/consistory ``attention_processor.py``) as REFERENCES.md describes them. attnkit's run (fused SDPA on
edited keys/values) must give the same final latents. Pipelines run in float64 so that the comparison checks
formulas, not summation order.
"""

import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from attnkit import AttnkitError, control, generate
from attnkit.controllers.p2p import Reweight
from attnkit.controllers.shared import (
    MaskedMutualSelfAttention,
    MutualSelfAttention,
    StyleAligned,
    SubjectShare,
    adain,
    mean_std,
    otsu_threshold,
    shared_group_norm,
    switch_vector,
)
from attnkit.engine import AttentionCall, LayerInfo, Layout
from attnkit.store import AttentionStore
from attnkit.testing import tiny_pipeline

STEPS, GUIDANCE, SEED = 3, 7.5, 3
TOL = dict(atol=1e-5, rtol=0)
PROMPTS = ["a red circle", "a blue square on a white background", "a cat wearing sunglasses"]


@pytest.fixture(scope="module", params=["sd", "sdxl"])
def pipe(request):
    torch.set_num_threads(1)
    return tiny_pipeline(request.param).to(torch.float64)


# -- oracle machinery ------------------------------------------------------------------------------------------
def split_heads(x, heads):
    b = x.shape[0]
    return x.view(b, -1, heads, x.shape[-1] // heads).transpose(1, 2)


class OracleProcessor:
    """Explicit attention; ``fn(name, q, k, v, is_cross, scale) -> out (B, H, N, d)`` may change anything."""

    def __init__(self, name, fn):
        self.name, self.fn = name, fn

    def __call__(self, attn, hidden_states, encoder_hidden_states=None, attention_mask=None, temb=None):
        assert attn.group_norm is None and attn.spatial_norm is None and not attn.residual_connection
        is_cross = encoder_hidden_states is not None
        ctx = encoder_hidden_states if is_cross else hidden_states
        b, n, _ = hidden_states.shape
        q, k, v = (split_heads(f(x), attn.heads) for f, x in
                   ((attn.to_q, hidden_states), (attn.to_k, ctx), (attn.to_v, ctx)))
        out = self.fn(self.name, q, k, v, is_cross, attn.scale)
        out = out.transpose(1, 2).reshape(b, n, -1)
        return attn.to_out[1](attn.to_out[0](out))


def plain(q, k, v, scale):
    return (q @ k.transpose(-1, -2) * scale).softmax(-1) @ v


def own_noise(pipe, count):
    side = pipe.unet.config.sample_size
    return torch.cat([torch.randn((1, pipe.unet.config.in_channels, side, side),
                                  generator=torch.Generator().manual_seed(SEED + i)) for i in range(count)])


def oracle_run(pipe, prompts, fn, guidance=GUIDANCE, latents=None, before_step=None, hooks=()):
    """Sample with ``fn`` in every attention layer; ``before_step(step)`` runs at each UNet call."""
    unet = pipe.unet
    saved = dict(unet.attn_processors)
    state = {"step": -1}

    def pre(*args):
        state["step"] += 1
        if before_step is not None:
            before_step(state["step"])

    handles = [unet.register_forward_pre_hook(pre)] + [m.register_forward_hook(h) for m, h in hooks]
    unet.set_attn_processor({name: OracleProcessor(name, fn) for name in saved})
    try:
        latents = own_noise(pipe, len(prompts)) if latents is None else latents
        out = pipe(prompts, num_inference_steps=STEPS, guidance_scale=guidance, latents=latents.to(unet.dtype),
                   output_type="latent").images
    finally:
        for h in handles:
            h.remove()
        unet.set_attn_processor(saved)
    assert state["step"] == STEPS - 1
    return out


def engine_run(pipe, prompts, *controllers, guidance=GUIDANCE, shared_noise=False):
    return generate(pipe, prompts, *controllers, seed=SEED, steps=STEPS, guidance=guidance,
                    shared_noise=shared_noise, progress=False).latents


_FREE = {}


def free_run(pipe, prompts, guidance=GUIDANCE, shared_noise=False):
    """Plain generation of the batch (cached: several tests compare against the same one)."""
    key = (id(pipe), tuple(prompts), guidance, shared_noise)
    if key not in _FREE:  # the entry keeps the pipeline alive, so its id is never reused
        _FREE[key] = (pipe, engine_run(pipe, prompts, guidance=guidance, shared_noise=shared_noise))
    return _FREE[key][1]


def assert_reference_kept_and_targets_changed(pipe, prompts, out, free, references=(0,)):
    for r in references:
        torch.testing.assert_close(out[r], free[r], **TOL)  # the reference's output is unchanged
    targets = [i for i in range(len(prompts)) if i not in references]
    assert all((out[t] - free[t]).abs().max() > 1e-3 for t in targets)  # and sharing changed every target


# -- Style Aligned --------------------------------------------------------------------------------------------
def official_switch(total, level):
    """``_get_switch_vec`` of sa_handler.py."""
    if level == 0:
        return torch.zeros(total, dtype=torch.bool)
    if level == 1:
        return torch.ones(total, dtype=torch.bool)
    flip = level > 0.5
    if flip:
        level = 1 - level
    vec = torch.arange(total) % (total // int(level * total)) == 0
    return ~vec if flip else vec


def style_oracle(pipe, prompts, *, cfg=True, scale=1.0, shift=0.0, aq=True, ak=True, av=False, gn=True, level=0.0):
    halves = 2 if cfg else 1

    def expand_first(feat, s=1.0):  # every row gets the reference (row 0) of its half; scale all but row 0
        b = feat.shape[0]
        per = b // halves
        rows = []
        for i in range(b):
            ref = feat[(i // per) * per]
            rows.append(ref if i % per == 0 else s * ref)
        return torch.stack(rows)

    def oracle_adain(feat):
        mean = feat.mean(dim=-2, keepdim=True)
        std = (feat.var(dim=-2, keepdim=True) + 1e-5).sqrt()
        return (feat - mean) / std * expand_first(std) + expand_first(mean)

    names = list(pipe.unet.attn_processors)
    self_count = sum("attn1" in n for n in names)
    keep_own = official_switch(self_count, level)
    shared = {n for i, n in enumerate(names) if "attn1" in n and not keep_own[i // 2]}

    def fn(name, q, k, v, is_cross, sc):
        if name not in shared:
            return plain(q, k, v, sc)
        if aq:
            q = oracle_adain(q)
        if ak:
            k = oracle_adain(k)
        if av:
            v = oracle_adain(v)
        n = q.shape[2]
        k = torch.cat([k, expand_first(k, scale)], dim=-2)
        v = torch.cat([v, expand_first(v)], dim=-2)
        logits = q @ k.transpose(-1, -2) * sc
        logits[..., n:] += shift
        return logits.softmax(-1) @ v

    def shared_norm(module, inputs, output):  # register_shared_norm: GroupNorm of [x; x_ref] along H
        x = inputs[0]
        n = x.shape[-2]
        both = torch.cat([x, expand_first(x)], dim=-2)
        return F.group_norm(both, module.num_groups, module.weight, module.bias, module.eps)[..., :n, :]

    hooks = [(m, shared_norm) for m in pipe.unet.modules() if isinstance(m, torch.nn.GroupNorm)] if gn else []
    return oracle_run(pipe, prompts, fn, guidance=GUIDANCE if cfg else 1.0, hooks=hooks)


def test_style_aligned_defaults_equal_the_official_formulas(pipe):
    gn = pipe.unet.config.addition_embed_type != "text_time"  # the official notebooks: on for SD1, off for SDXL
    out = engine_run(pipe, PROMPTS, StyleAligned())
    torch.testing.assert_close(out, style_oracle(pipe, PROMPTS, gn=gn), **TOL)
    assert_reference_kept_and_targets_changed(pipe, PROMPTS, out, free_run(pipe, PROMPTS))


def test_style_aligned_scale_shift_values_without_guidance(pipe):
    prompts = PROMPTS + ["a green triangle"]  # four prompts: three targets
    controller = StyleAligned(scale=0.7, shift=math.log(2), adain_values=True, share_group_norm=True)
    out = engine_run(pipe, prompts, controller, guidance=1.0)
    oracle = style_oracle(pipe, prompts, cfg=False, scale=0.7, shift=math.log(2), av=True, gn=True)
    torch.testing.assert_close(out, oracle, **TOL)
    assert_reference_kept_and_targets_changed(pipe, prompts, out, free_run(pipe, prompts, guidance=1.0))


def test_style_aligned_fraction_rule_picks_the_official_layers(pipe):
    controller = StyleAligned(only_self_level=0.5, adain_queries=False, share_group_norm=False)
    out = engine_run(pipe, PROMPTS, controller)
    torch.testing.assert_close(out, style_oracle(pipe, PROMPTS, level=0.5, aq=False, gn=False), **TOL)
    shared = controller.check(pipe)
    total = sum("attn1" in n for n in pipe.unet.attn_processors)
    assert 0 < len(shared) < total


def test_switch_vector_matches_the_official_rule():
    for total in (7, 8, 16, 70):
        for level in (0.0, 0.1, 0.25, 0.5, 0.6, 0.75, 0.9, 1.0):
            if 0 < level < 1 and int(min(level, 1 - level) * total) == 0:
                continue  # the official code divides by zero there
            assert switch_vector(total, level) == official_switch(total, level).tolist()
    assert switch_vector(16, 0.25) == [i % 4 == 0 for i in range(16)]
    assert switch_vector(16, 0.01) == [False] * 16
    with pytest.raises(AttnkitError, match="only_self_level"):
        StyleAligned(only_self_level=1.5)


def test_several_references_see_each_other_never(pipe):
    prompts = PROMPTS + ["a yellow diamond"]
    out = engine_run(pipe, prompts, StyleAligned(references=(0, 1), shift=0.5))
    assert_reference_kept_and_targets_changed(pipe, prompts, out, free_run(pipe, prompts), references=(0, 1))


def attention_call(q, k, v, layout):
    layer = LayerInfo(name="x.attn1.processor", place="up", block=0, attention=0, transformer=0, is_cross=False,
                      heads=q.shape[1])
    return AttentionCall(layer, 4, 4, 0, 1, layout, q, k, v, scale=1 / math.sqrt(q.shape[-1]))


def test_style_aligned_call_formula_with_two_references():
    """One call, written out: target i sees [K̂_i; s·K_r1; s·K_r2] with AdaIN to the mean of the references'
    statistics, and the shift on the reference columns."""
    torch.manual_seed(0)
    layout = Layout(prompts=4, cfg=True)
    q, k, v = (torch.randn(8, 2, 16, 4, dtype=torch.float64) for _ in range(3))
    controller = StyleAligned(references=(0, 2), scale=1.3, shift=-0.4, adain_values=True)
    controller._names = {"x.attn1.processor"}
    call = attention_call(q, k, v, layout)
    controller.edit_qkv(call)
    got = F.scaled_dot_product_attention(call.query, call.key, call.value, attn_mask=call.mask)
    for half in (0, 4):
        refs = [half, half + 2]
        for row in range(half, half + 4):
            if row in refs:
                torch.testing.assert_close(got[row], plain(q[row], k[row], v[row], call.scale), **TOL)
                continue
            stats = [mean_std(x[refs]) for x in (q, k, v)]
            to = [(m.mean(0), s.mean(0)) for m, s in stats]
            qh, kh, vh = (adain(x[row], *t) for x, t in zip((q, k, v), to, strict=True))
            keys = torch.cat([kh, 1.3 * k[refs[0]], 1.3 * k[refs[1]]], dim=-2)
            values = torch.cat([vh, v[refs[0]], v[refs[1]]], dim=-2)
            logits = qh @ keys.transpose(-1, -2) * call.scale
            logits[..., 16:] += -0.4
            torch.testing.assert_close(got[row], logits.softmax(-1) @ values, **TOL)


def test_shared_group_norm_is_group_norm_of_the_concatenation():
    torch.manual_seed(1)
    gn = torch.nn.GroupNorm(4, 8).double()
    torch.nn.init.normal_(gn.weight)
    torch.nn.init.normal_(gn.bias)
    x = torch.randn(6, 8, 5, 3, dtype=torch.float64)
    index = torch.tensor([[0], [0], [0], [3], [3], [3]])
    is_target = torch.tensor([False, True, True, False, True, True])
    got = shared_group_norm(gn, x, gn(x), index, is_target)
    for row in range(6):
        ref = 0 if row < 3 else 3
        expected = gn(torch.cat([x[row:row + 1], x[ref:ref + 1]], dim=-2))[..., :5, :] if is_target[row] \
            else gn(x[row:row + 1])
        torch.testing.assert_close(got[row:row + 1], expected, **TOL)


def test_fused_attention_without_shift_and_masked_sdpa_with_it(pipe, monkeypatch):
    seen = []
    original = AttentionCall.probs
    monkeypatch.setattr(AttentionCall, "probs", lambda self, rows=None: seen.append(1) or original(self, rows))
    masks = []
    sdpa = F.scaled_dot_product_attention

    def spy(q, k, v, attn_mask=None, **kw):
        masks.append(attn_mask is not None)
        return sdpa(q, k, v, attn_mask=attn_mask, **kw)

    monkeypatch.setattr(F, "scaled_dot_product_attention", spy)
    engine_run(pipe, PROMPTS, StyleAligned())
    assert seen == [] and not any(masks)  # SDPA everywhere, no explicit probabilities, no mask
    masks.clear()
    engine_run(pipe, PROMPTS, StyleAligned(shift=1.0))
    assert seen == [] and any(masks)  # the shift rides on an additive mask, still SDPA


# -- MasaCtrl ---------------------------------------------------------------------------------------------------
def masa_oracle(pipe, prompts, start_step, start_layer, masked=None):
    """MutualSelfAttentionControl(.MaskAuto): counts attention calls per UNet call (``cur_att_layer // 2`` is the
    transformer block); targets of each half read the source's K/V from ``start_step``/``start_layer``.
    ``masked = (token lists per prompt, grid side, threshold)`` adds the foreground/background split."""
    state = {"step": -1, "calls": 0, "maps": [], "prev": None}
    per = len(prompts)

    def before_step(step):
        state["step"], state["calls"] = step, 0
        if state["maps"]:
            state["prev"] = torch.stack(state["maps"]).mean(0)
        state["maps"] = []

    def fn(name, q, k, v, is_cross, sc):
        block = state["calls"] // 2
        state["calls"] += 1
        if is_cross:
            probs = (q @ k.transpose(-1, -2) * sc).softmax(-1)
            side = int(round(q.shape[2] ** 0.5))
            if masked is not None and side == masked[1]:
                cond = probs[per:].mean(1)
                maps = torch.stack([cond[i][:, t].sum(-1) for i, t in enumerate(masked[0])])
                state["maps"].append(maps.reshape(per, side, side))
            return probs @ v
        if state["step"] < start_step or block < start_layer:
            return plain(q, k, v, sc)
        outs = []
        for half in (0, per):
            src = half
            outs.append(plain(q[half:half + 1], k[src:src + 1], v[src:src + 1], sc))  # the source: its own
            for t in range(half + 1, half + per):
                out = plain(q[t], k[src], v[src], sc)
                if masked is not None and state["prev"] is not None:
                    side = int(round(q.shape[2] ** 0.5))
                    m = state["prev"]
                    lo, hi = m.amin(dim=(1, 2), keepdim=True), m.amax(dim=(1, 2), keepdim=True)
                    m = F.interpolate(((m - lo) / (hi - lo)).unsqueeze(1), (side, side)).flatten(1)
                    m = (m >= masked[2]).to(q.dtype)
                    ms, mt = m[0], m[t - half]
                    if 0 < ms.sum() < len(ms):
                        sim = q[t] @ k[src].transpose(-1, -2) * sc
                        low = torch.finfo(sim.dtype).min
                        fg = (sim + ms.masked_fill(ms == 0, low)).softmax(-1) @ v[src]  # official: +1 on fg
                        bg = (sim + ms.masked_fill(ms == 1, low)).softmax(-1) @ v[src]
                        out = fg * mt[:, None] + bg * (1 - mt[:, None])
                outs.append(out.unsqueeze(0))
        return torch.cat(outs)

    shared = own_noise(pipe, 1).expand(len(prompts), -1, -1, -1)  # MasaCtrl: one noise for all
    return oracle_run(pipe, prompts, fn, latents=shared, before_step=before_step)


def test_mutual_self_attention_equals_masactrl(pipe):
    prompts = PROMPTS
    out = engine_run(pipe, prompts, MutualSelfAttention(start_step=1, start_layer=2), shared_noise=True)
    torch.testing.assert_close(out, masa_oracle(pipe, prompts, 1, 2), **TOL)
    free = free_run(pipe, prompts, shared_noise=True)
    assert_reference_kept_and_targets_changed(pipe, prompts, out, free)


def test_mutual_self_attention_default_layer_fraction(pipe):
    controller = MutualSelfAttention()
    count = sum("attn1" in n for n in pipe.unet.attn_processors)
    assert len(controller.check(pipe)) == count - int(0.625 * count)  # layers 10..15 of 16 on SD1.x


def test_masked_mutual_self_attention_equals_the_official_blend(pipe):
    prompts = ["a red circle", "a red square", "a circle on a white background"]
    words = ["circle", "square", "circle"]
    tok = pipe.tokenizer
    tokens = [[i + 1 for i, w in enumerate(p.split()) if w == word] for p, word in zip(prompts, words, strict=True)]
    side = 16 if "CrossAttn" in pipe.unet.config.down_block_types[0] else 8
    controller = MaskedMutualSelfAttention(prompts, tok, words, threshold=0.5, start_step=1, start_layer=1)
    out = engine_run(pipe, prompts, controller, shared_noise=True)
    torch.testing.assert_close(out, masa_oracle(pipe, prompts, 1, 1, masked=(tokens, side, 0.5)), **TOL)
    masks = controller.masks(side, side)
    assert masks[0].any() and not masks[0].all()  # a real foreground/background split was used
    plain_masa = engine_run(pipe, prompts, MutualSelfAttention(start_step=1, start_layer=1), shared_noise=True)
    assert (out[1:] - plain_masa[1:]).abs().max() > 1e-4


# -- ConsiStory's subject sharing -------------------------------------------------------------------------------
def skimage_otsu(values, nbins=256):
    """skimage.filters.threshold_otsu, written out (numpy histogram over the value range)."""
    values = np.asarray(values, dtype=np.float64).ravel()
    if values.min() == values.max():
        return float(values.min())
    counts, edges = np.histogram(values, bins=nbins, range=(values.min(), values.max()))
    centers = (edges[:-1] + edges[1:]) / 2
    w1, w2 = np.cumsum(counts), np.cumsum(counts[::-1])[::-1]
    m1 = np.cumsum(counts * centers) / w1
    m2 = (np.cumsum((counts * centers)[::-1]) / w2[::-1])[::-1]
    return float(centers[np.argmax(w1[:-1] * w2[1:] * (m1[:-1] - m2[1:]) ** 2)])


def test_otsu_matches_skimage():
    rng = np.random.default_rng(0)
    for _ in range(20):
        x = np.concatenate([rng.normal(0, 1, 300), rng.normal(rng.uniform(2, 6), 0.5, rng.integers(20, 300))])
        assert otsu_threshold(torch.tensor(x)) == pytest.approx(skimage_otsu(x), abs=1e-9)


def subject_oracle(pipe, prompts, tokens, side):
    """SDSA of ConsiStory, ``mask_dropout=0``: targets of each half attend to [K_i; K_ref inside its mask] in the
    up blocks from step 1; the mask is the subject's cross-attention (mean of the last 20 steps), bilinear to
    the layer grid, Otsu-thresholded."""
    per = len(prompts)
    state = {"maps": [], "history": []}

    def before_step(step):
        if state["maps"]:
            state["history"] = (state["history"] + [torch.stack(state["maps"]).mean(0)])[-20:]
        state["maps"] = []

    def fn(name, q, k, v, is_cross, sc):
        if is_cross:
            probs = (q @ k.transpose(-1, -2) * sc).softmax(-1)
            if int(round(q.shape[2] ** 0.5)) == side:
                cond = probs[per:].mean(1)
                maps = torch.stack([cond[i][:, t].sum(-1) for i, t in enumerate(tokens)])
                state["maps"].append(maps.reshape(per, side, side))
            return probs @ v
        if not name.startswith("up_blocks") or not state["history"]:
            return plain(q, k, v, sc)
        n = q.shape[2]
        grid = int(round(n ** 0.5))
        ref_map = torch.stack(state["history"]).mean(0)[0]
        ref_map = F.interpolate(ref_map[None, None], (grid, grid), mode="bilinear", align_corners=False).flatten()
        mask = ref_map > skimage_otsu(ref_map.numpy())
        outs = []
        for half in (0, per):
            for row in range(half, half + per):
                if row == half:
                    outs.append(plain(q[row], k[row], v[row], sc))
                    continue
                keys = torch.cat([k[row], k[half][:, mask]], dim=-2)
                values = torch.cat([v[row], v[half][:, mask]], dim=-2)
                outs.append(plain(q[row], keys, values, sc))
        return torch.stack(outs)

    return oracle_run(pipe, prompts, fn, before_step=before_step)


def test_subject_share_equals_consistory_attention(pipe):
    prompts = ["a cat", "a red cat on a field", "a cat wearing sunglasses"]
    tokens = [[2], [3], [2]]
    side = 16 if "CrossAttn" in pipe.unet.config.down_block_types[0] else 8
    controller = SubjectShare(prompts, pipe.tokenizer, "cat", mask_dropout=0.0)
    out = engine_run(pipe, prompts, controller)
    torch.testing.assert_close(out, subject_oracle(pipe, prompts, tokens, side), **TOL)
    mask = next(iter(controller.last_masks.values()))
    assert mask.any() and not mask.all()
    assert_reference_kept_and_targets_changed(pipe, prompts, out, free_run(pipe, prompts))


def test_subject_mask_dropout_is_seeded_and_changes_targets_only(pipe):
    prompts = ["a cat", "a red cat on a field", "a cat wearing sunglasses"]
    runs = [engine_run(pipe, prompts, SubjectShare(prompts, pipe.tokenizer, "cat", mask_dropout=0.5, seed=s))
            for s in (0, 0, 1)]
    torch.testing.assert_close(runs[0], runs[1], atol=0, rtol=0)  # same seed, same dropout
    assert (runs[2][1:] - runs[0][1:]).abs().max() > 1e-6  # another seed drops other pixels
    free = free_run(pipe, prompts)
    for r in runs:
        torch.testing.assert_close(r[0], free[0], **TOL)


def test_subject_word_must_be_in_every_prompt(pipe):
    with pytest.raises(AttnkitError, match="subject word 'cat' is not in the prompt 'a dog'"):
        SubjectShare(["a cat", "a dog"], pipe.tokenizer, "cat")
    with pytest.raises(AttnkitError, match="one word for all prompts or one per prompt"):
        SubjectShare(["a cat", "a dog"], pipe.tokenizer, ["cat"])
    SubjectShare(["a cat", "a dog"], pipe.tokenizer, ["cat", "dog"])  # one subject word per prompt


# -- composition, layouts, bad input ------------------------------------------------------------------------------
def test_composes_with_a_store_and_a_prompt_to_prompt_reweight(pipe):
    prompts = ["a red circle", "a blue square", "a red cat"]
    store = AttentionStore(kinds="cross", res=None)
    out = engine_run(pipe, prompts, StyleAligned(), store)
    assert store.maps("cross").shape[0] == 3  # the store saw every image's cross-attention
    torch.testing.assert_close(out, engine_run(pipe, prompts, StyleAligned()), atol=0, rtol=0)  # reading is free
    weighted = engine_run(pipe, prompts, StyleAligned(), Reweight(prompts, pipe.tokenizer, {"red": 3.0}))
    assert (weighted[2] - out[2]).abs().max() > 1e-4
    torch.testing.assert_close(weighted[0], out[0], **TOL)  # P2P leaves the first prompt alone too


def test_float32_reference_matches_to_rounding():
    pipe = tiny_pipeline("sd")
    assert pipe.unet.dtype == torch.float32
    for controller in (StyleAligned(shift=0.3), MutualSelfAttention(start_step=0, start_layer=0),
                       SubjectShare(["a cat", "a red cat", "a cat on a field"], pipe.tokenizer, "cat")):
        prompts = controller.prompts if isinstance(controller, SubjectShare) else PROMPTS
        shared = isinstance(controller, MutualSelfAttention)
        base = free_run(pipe, prompts, shared_noise=shared)
        out = engine_run(pipe, prompts, controller, shared_noise=shared)
        scale = float(base[0].abs().max())
        assert float((out[0] - base[0]).abs().max()) <= 1e-5 * scale, type(controller).__name__


def processor_state(pipe):
    gn_hooks = sum(len(m._forward_hooks) for m in pipe.unet.modules() if isinstance(m, torch.nn.GroupNorm))
    return {n: type(p).__name__ for n, p in pipe.unet.attn_processors.items()}, gn_hooks, \
        len(pipe.unet._forward_pre_hooks)


@pytest.mark.parametrize("make, message", [
    (lambda tok: StyleAligned(layers=[99]), "layer 99 does not exist"),
    (lambda tok: StyleAligned(layers=["down_blocks.1.attentions.0.transformer_blocks.0.attn2"]),
     "cross-attention layer"),
    (lambda tok: StyleAligned(layers=["nope"]), "no attention layer is named 'nope'"),
    (lambda tok: StyleAligned(places=("mid",), layers=[0]), "no self-attention layer is selected"),
    (lambda tok: MutualSelfAttention(start_layer=40), "start_layer=40"),
    (lambda tok: StyleAligned(references=5), "prompt index 5 is out of range"),
])
def test_bad_selection_is_refused_and_the_pipeline_is_restored(pipe, make, message):
    before = processor_state(pipe)
    with pytest.raises(AttnkitError, match=message):
        engine_run(pipe, PROMPTS, make(pipe.tokenizer))
    assert processor_state(pipe) == before


def test_bad_arguments_are_refused_up_front(pipe):
    for make, message in [(lambda: StyleAligned(references=(0,), targets=(0, 1)), "both reference and target"),
                          (lambda: StyleAligned(shift=float("nan")), "shift=nan"),
                          (lambda: StyleAligned(steps=(1, 2, 3)), "steps="),
                          (lambda: MutualSelfAttention(start_step=-1), "negative"),
                          (lambda: SubjectShare(["a cat", "a cat"], pipe.tokenizer, "cat", mask_dropout=1.0),
                           "mask_dropout"),
                          (lambda: MaskedMutualSelfAttention(["a cat"], pipe.tokenizer, "cat"), "no target prompt"),
                          (lambda: StyleAligned(places=("side",)), "unknown place")]:
        with pytest.raises(AttnkitError, match=message):
            make()


def test_group_norm_hooks_are_removed_after_an_exception(pipe):
    before = processor_state(pipe)
    with pytest.raises(RuntimeError, match="boom"):
        with control(pipe, StyleAligned(share_group_norm=True)):
            assert processor_state(pipe)[1] > 0
            raise RuntimeError("boom")
    assert processor_state(pipe) == before


def test_targets_can_be_chosen_explicitly(pipe):
    prompts = PROMPTS + ["a green triangle"]
    out = engine_run(pipe, prompts, StyleAligned(targets=(2,)))
    free = free_run(pipe, prompts)
    for row in (0, 1, 3):  # neither reference nor target: untouched
        torch.testing.assert_close(out[row], free[row], **TOL)
    assert (out[2] - free[2]).abs().max() > 1e-3

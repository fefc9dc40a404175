"""Prompt-to-Prompt controllers against an explicit oracle of the paper's formulas.

The oracle below does not use attnkit's engine: it installs its own attention processor that computes
``softmax(q kᵀ · scale)`` explicitly in every layer, counts steps with its own UNet hook, builds its own
mappers from the tokenizer, and applies the formulas of REFERENCES.md (Prompt-to-Prompt) to the conditional
half. attnkit's run (fused attention where an edit is a pure copy) must give the same final latents and the
same stored cross-attention maps.
"""

import pytest
import torch
import torch.nn.functional as F

from attnkit import AttnkitError, Controller, generate
from attnkit.controllers import LocalBlend, Refine, Replace, Reweight
from attnkit.engine import AttentionCall, describe_layers
from attnkit.store import AttentionStore
from attnkit.testing import tiny_pipeline
from attnkit.tokens import word_token_indices

STEPS, GUIDANCE, SEED = 6, 7.5, 3
TOL = dict(atol=1e-5, rtol=0)


@pytest.fixture(scope="module", params=["sd", "sdxl"])
def pipe(request):
    # float64: the comparison checks formulas, not summation order. In float32 diffusers' own two stock
    # processors (AttnProcessor vs AttnProcessor2_0) already differ by ~4e-5 on these latents (|x| ~ 20).
    torch.set_num_threads(1)
    return tiny_pipeline(request.param).to(torch.float64)


# -- the oracle ------------------------------------------------------------------------------------------------
def word_tokens(tok, prompt):
    """[(word, [positions])] with position 0 the start token: one tokenizer call per word."""
    out, pos = [], 1
    for w in prompt.split():
        n = len(tok(w, add_special_tokens=False).input_ids)
        out.append((w, list(range(pos, pos + n))))
        pos += n
    return out


def oracle_swap_mapper(tok, src, tgt):
    L = tok.model_max_length
    m = torch.zeros(L, L)
    m[0, 0] = 1
    ws, wt = word_tokens(tok, src), word_tokens(tok, tgt)
    for (_, s), (_, t) in zip(ws, wt, strict=True):
        if len(s) == len(t):
            for a, b in zip(s, t, strict=True):
                m[a, b] = 1
        else:
            for b in t:
                for a in s:
                    m[a, b] = 1 / len(t)
    i, j = ws[-1][1][-1] + 1, wt[-1][1][-1] + 1
    while i < L and j < L:
        m[i, j] = 1
        i, j = i + 1, j + 1
    return m


def oracle_insertion_mapper(tok, src, tgt):
    """Refinement mapper for a target that only inserts words: source tokens matched in order."""
    x, y = tok(src).input_ids, tok(tgt).input_ids
    L = tok.model_max_length
    index, keep = list(range(L)), [1.0] * L
    i = 0
    for j, token in enumerate(y):
        if i < len(x) and x[i] == token:
            index[j], keep[j] = i, 1.0
            i += 1
        else:
            index[j], keep[j] = 0, 0.0
    assert i == len(x), "the oracle handles insertions only"
    return torch.tensor(index), torch.tensor(keep)


def oracle_alpha(tok, targets, schedule, n):
    L = tok.model_max_length
    alpha = torch.zeros(n + 1, len(targets), L)
    sched = dict(schedule) if isinstance(schedule, dict) else {"default_": schedule}

    def bounds(w):
        s, e = (0.0, w) if isinstance(w, float) else w
        return int(s * (n + 1)), int(e * (n + 1))

    s, e = bounds(sched.pop("default_", (0.0, 1.0)))
    alpha[s:e] = 1
    for word, w in sched.items():
        s, e = bounds(w)
        for t, prompt in enumerate(targets):
            for ww, pos in word_tokens(tok, prompt):
                if ww == word:
                    alpha[:, t, pos] = 0
                    alpha[s:e, t, pos] = 1
    return alpha


class OracleProcessor:
    def __init__(self, name, fn):
        self.name, self.fn = name, fn

    def __call__(self, attn, hidden_states, encoder_hidden_states=None, attention_mask=None, temb=None):
        assert attn.group_norm is None and attn.spatial_norm is None and not attn.residual_connection
        is_cross = encoder_hidden_states is not None
        ctx = encoder_hidden_states if is_cross else hidden_states
        b, n, _ = hidden_states.shape
        h = attn.heads

        def split(x):
            return x.view(b, -1, h, x.shape[-1] // h).transpose(1, 2)

        q, k, v = split(attn.to_q(hidden_states)), split(attn.to_k(ctx)), split(attn.to_v(ctx))
        probs = (q @ k.transpose(-1, -2) * attn.scale).softmax(-1)
        probs = self.fn(self.name, probs, is_cross)
        out = (probs @ v).transpose(1, 2).reshape(b, n, -1)
        return attn.to_out[1](attn.to_out[0](out))


def oracle_run(pipe, prompts, *, edit="replace", cross=0.8, self_steps=0.4, self_res=16, weights=None,
               blend=None, subtract=None, start=0.0, blend_side=None, th=0.3, sub_th=0.3):
    tok, P, N = pipe.tokenizer, len(prompts), STEPS
    targets = prompts[1:]
    # the grid local blend reads by default: 16x16 maps where the UNet has them (SD-like), else 8x8 (SDXL-like)
    blend_side = blend_side or (16 if "CrossAttn" in pipe.unet.config.down_block_types[0] else 8)
    alpha = oracle_alpha(tok, targets, cross, N)
    if edit == "replace":
        mappers = [oracle_swap_mapper(tok, prompts[0], t) for t in targets]
    else:
        mappers = [oracle_insertion_mapper(tok, prompts[0], t) for t in targets]
    eqs = None
    if weights:
        eqs = []
        for t in targets:
            eq = torch.ones(tok.model_max_length)
            for w, pos in word_tokens(tok, t):
                if w in weights:
                    eq[pos] = weights[w]
            eqs.append(eq)
    s = (0.0, self_steps) if isinstance(self_steps, float) else self_steps
    s0, s1 = int(N * s[0]), int(N * s[1])
    state = {"step": -1}
    sums, blend_sums, sub_sums = {}, {}, {}

    def selector(words):
        sel = torch.zeros(P, tok.model_max_length)
        for i, p in enumerate(prompts):
            for w, pos in word_tokens(tok, p):
                if w in words:
                    sel[i, pos] = 1
        return sel

    add_sel = selector(blend or [])
    sub_sel = selector(subtract or [])

    def fn(name, probs, is_cross):
        step = state["step"]
        cond = probs[P:].clone()
        side = int(round(probs.shape[2] ** 0.5))
        if is_cross:
            for i in range(1, P):
                a, src, own = alpha[step, i - 1], probs[P], probs[P + i]
                if edit == "replace":
                    rep = torch.einsum("hqk,kn->hqn", src, mappers[i - 1].to(src))
                else:
                    index, keep = mappers[i - 1]
                    rep = src[..., index] * keep.to(src) + own * (1 - keep.to(src))
                if eqs is not None:
                    rep = rep * eqs[i - 1].to(rep)
                a = a.to(rep)
                cond[i] = a * rep + (1 - a) * own
            mean = cond.mean(1)
            sums[name] = sums.get(name, 0) + mean
            if blend and side == blend_side:
                blend_sums[name] = blend_sums.get(name, 0) + torch.einsum("bqk,bk->bq", mean, add_sel.to(mean))
                sub_sums[name] = sub_sums.get(name, 0) + torch.einsum("bqk,bk->bq", mean, sub_sel.to(mean))
        elif s0 <= step < s1 and probs.shape[2] <= self_res ** 2:  # the official test: query pixels
            cond[1:] = cond[0]
        return torch.cat([probs[:P], cond])

    def mask_of(store, pool, size, th):
        maps = torch.stack(list(store.values())).mean(0).reshape(P, 1, blend_side, blend_side)
        if pool:
            maps = F.max_pool2d(maps, 3, 1, 1)
        maps = F.interpolate(maps, size=size)
        maps = maps / maps.amax(dim=(2, 3), keepdim=True)
        return maps > th

    def callback(p, i, t, kw):
        if not blend or i < int(start * N):
            return {}
        x = kw["latents"]
        m = mask_of(blend_sums, True, x.shape[-2:], th)
        new = x.clone()
        for r in range(1, P):
            mr = m[0] | m[r]
            if subtract:
                d = mask_of(sub_sums, False, x.shape[-2:], sub_th)
                mr = mr & ~(d[0] | d[r])
            new[r] = x[0] + mr.float() * (x[r] - x[0])
        return {"latents": new}

    unet = pipe.unet
    saved = dict(unet.attn_processors)
    hook = unet.register_forward_pre_hook(lambda *a: state.__setitem__("step", state["step"] + 1))
    unet.set_attn_processor({name: OracleProcessor(name, fn) for name in saved})
    try:
        side = unet.config.sample_size
        noise = torch.randn((1, unet.config.in_channels, side, side), generator=torch.Generator().manual_seed(SEED))
        latents = noise.to(unet.dtype).expand(P, -1, -1, -1)
        out = pipe(prompts, num_inference_steps=N, guidance_scale=GUIDANCE, latents=latents,
                   output_type="latent", callback_on_step_end=callback,
                   callback_on_step_end_tensor_inputs=["latents"]).images
    finally:
        hook.remove()
        unet.set_attn_processor(saved)
    assert state["step"] == N - 1
    return out, {name: total / N for name, total in sums.items()}


def engine_run(pipe, prompts, *controllers):
    store = AttentionStore(kinds=("cross",), res=None)
    gen = generate(pipe, prompts, *controllers, store, seed=SEED, steps=STEPS, guidance=GUIDANCE, progress=False)
    return gen.latents, store


def assert_same(pipe, engine, oracle):
    (latents, store), (o_latents, o_maps) = engine, oracle
    torch.testing.assert_close(latents, o_latents, **TOL)
    maps = store.layer_maps("cross")
    assert set(maps) == set(o_maps)
    for name, m in maps.items():
        torch.testing.assert_close(m.reshape(o_maps[name].shape), o_maps[name].float(), **TOL)


def assert_edit_matters(pipe, prompts, engine):
    """Guard against a vacuous pass: the edited target differs from unedited generation of the batch."""
    free = generate(pipe, prompts, seed=SEED, steps=STEPS, guidance=GUIDANCE, progress=False).latents
    torch.testing.assert_close(engine[0][0], free[0], **TOL)  # the source row is never edited
    assert (engine[0][1:] - free[1:]).abs().max() > 1e-3


# -- exactness ---------------------------------------------------------------------------------------------------
def test_replace_equal_token_counts_two_targets(pipe):
    prompts = ["a lemon cake", "a chocolate cake", "a beet cake"]
    tok = pipe.tokenizer
    engine = engine_run(pipe, prompts, Replace(prompts, tok, cross_steps=0.8, self_steps=0.4))
    assert_same(pipe, engine, oracle_run(pipe, prompts, cross=0.8, self_steps=0.4))
    assert_edit_matters(pipe, prompts, engine)


def test_replace_unequal_token_counts_with_word_schedule(pipe):
    tok = pipe.tokenizer
    prompts = ["a cat wearing sunglasses", "a dog wearing red"]  # "sunglasses" is two tokens, "red" one
    assert len(tok("sunglasses", add_special_tokens=False).input_ids) == 2
    cross = {"default_": 0.8, "red": (0.2, 0.6)}
    engine = engine_run(pipe, prompts, Replace(prompts, tok, cross_steps=cross, self_steps=(0.2, 0.7)))
    assert_same(pipe, engine, oracle_run(pipe, prompts, cross=cross, self_steps=(0.2, 0.7)))
    reverse = ["a cat wearing red", "a dog wearing sunglasses"]
    engine = engine_run(pipe, reverse, Replace(reverse, tok, cross_steps=0.6, self_steps=0.4, self_res=8))
    assert_same(pipe, engine, oracle_run(pipe, reverse, cross=0.6, self_steps=0.4, self_res=8))
    assert_edit_matters(pipe, reverse, engine)


def test_refine(pipe):
    prompts = ["a cake", "a lego cake", "a cake on a field"]
    engine = engine_run(pipe, prompts, Refine(prompts, pipe.tokenizer, cross_steps=(0.0, 0.8), self_steps=(0.2, 0.6)))
    assert_same(pipe, engine, oracle_run(pipe, prompts, edit="refine", cross=(0.0, 0.8), self_steps=(0.2, 0.6)))
    assert_edit_matters(pipe, prompts, engine)


@pytest.mark.parametrize("base", ["replace", "refine"])
def test_reweight_chained(pipe, base):
    tok = pipe.tokenizer
    if base == "replace":
        prompts, weights = ["a lemon cake", "a lego cake", "a lemon cake"], {"lego": -1.5, "lemon": 4.0}
        first = Replace(prompts, tok, cross_steps=0.6, self_steps=0.4)
    else:
        prompts, weights = ["a cake", "a lego cake"], {"lego": 3.0}
        first = Refine(prompts, tok, cross_steps=0.6, self_steps=0.4)
    engine = engine_run(pipe, prompts, first, Reweight(prompts, tok, weights, cross_steps=0.6))
    assert_same(pipe, engine, oracle_run(pipe, prompts, edit=base, cross=0.6, self_steps=0.4, weights=weights))
    plain = engine_run(pipe, prompts, type(first)(prompts, tok, cross_steps=0.6, self_steps=0.4))
    assert (engine[0][1:] - plain[0][1:]).abs().max() > 1e-4  # the weights change the result


def test_local_blend(pipe):
    tok = pipe.tokenizer
    prompts = ["a lemon cake", "a chocolate cake", "a lego cake"]
    controllers = (Replace(prompts, tok, cross_steps=0.8, self_steps=0.4),
                   LocalBlend(prompts, tok, ["cake"], threshold=0.98))  # random weights: flat maps
    engine = engine_run(pipe, prompts, *controllers)
    assert_same(pipe, engine, oracle_run(pipe, prompts, blend=["cake"], th=0.98))
    mask = controllers[1].mask(tuple(engine[0].shape[-2:]))[1:]
    assert mask.any() and not mask.all()  # the blend keeps part of the source, not nothing or everything
    outside = ~mask.expand(-1, engine[0].shape[1], -1, -1)
    torch.testing.assert_close(engine[0][1:][outside], engine[0][:1].expand(2, -1, -1, -1)[outside], **TOL)
    # subtract words and a late start, blending on the source's and the targets' words
    controllers = (Replace(prompts, tok, cross_steps=0.8, self_steps=0.4),
                   LocalBlend(prompts, tok, ["lemon", "chocolate", "lego"], subtract=["a"], start=0.3,
                              threshold=0.97, subtract_threshold=0.95))
    engine = engine_run(pipe, prompts, *controllers)
    oracle = oracle_run(pipe, prompts, blend=["lemon", "chocolate", "lego"], subtract=["a"], start=0.3, th=0.97,
                        sub_th=0.95)
    assert_same(pipe, engine, oracle)
    mask = controllers[1].mask(tuple(engine[0].shape[-2:]))[1:]
    assert mask.any() and not mask.all()


# -- fused path ----------------------------------------------------------------------------------------------
def count_materialised(monkeypatch):
    seen = []
    original = AttentionCall.probs

    def spy(self, rows=None):
        seen.append((self.layer.kind, self.edited is None))
        return original(self, rows)

    monkeypatch.setattr(AttentionCall, "probs", spy)
    return seen


def test_pure_copies_stay_fused(pipe, monkeypatch):
    tok = pipe.tokenizer
    seen = count_materialised(monkeypatch)
    prompts = ["a lemon cake", "a lego cake"]
    generate(pipe, prompts, Replace(prompts, tok), seed=SEED, steps=STEPS, guidance=GUIDANCE, progress=False)
    assert seen == []  # identity mapper + self replacement: only q/k copies, SDPA everywhere
    unequal = ["a cat wearing sunglasses", "a cat wearing red"]
    generate(pipe, unequal, Replace(unequal, tok), seed=SEED, steps=STEPS, guidance=GUIDANCE, progress=False)
    assert seen and all(kind == "cross" for kind, _ in seen)  # only the mixed cross maps are materialised


def test_composes_with_store_and_restores_processors(pipe):
    tok = pipe.tokenizer
    before = dict(pipe.unet.attn_processors)
    prompts = ["a lemon cake", "a lego cake"]
    with pytest.raises(AttnkitError, match="batch has 3 prompts"):
        generate(pipe, prompts + ["a beet cake"], Replace(prompts, tok), seed=SEED, steps=2, progress=False)
    assert dict(pipe.unet.attn_processors) == before
    store = AttentionStore(kinds=("cross", "self"), res=None)
    generate(pipe, prompts, Replace(prompts, tok, self_steps=1.0), store, seed=SEED, steps=2, progress=False)
    self_maps = store.layer_maps("self")
    for m in self_maps.values():  # with self replacement at every step, the target's map is the source's
        torch.testing.assert_close(m[1], m[0], **TOL)


def test_local_blend_target_without_blend_words_keeps_the_source(pipe):
    # Deliberate difference: the official code divides an all-zero map by its zero maximum; here a prompt
    # without any blend word contributes an empty mask, so a target whose union mask is empty stays the source.
    tok = pipe.tokenizer
    prompts = ["a lemon cake", "a chocolate cake", "a lego cake"]
    blend = LocalBlend(prompts, tok, ["lego"], threshold=0.5)
    latents, _ = engine_run(pipe, prompts, Replace(prompts, tok), blend)
    mask = blend.mask(tuple(latents.shape[-2:]))
    assert not mask[0].any() and not mask[1].any() and mask[2].any()
    torch.testing.assert_close(latents[1], latents[0], **TOL)
    assert (latents[2] - latents[0]).abs().max() > 1e-3


def test_local_blend_word_index_picks_one_occurrence(pipe):
    tok = pipe.tokenizer
    prompts = ["a red cake and a blue cake", "a red cake and a green cake"]
    by_index = LocalBlend(prompts, tok, [6])  # the second "cake" only (word 6)
    by_word = LocalBlend(prompts, tok, ["cake"])  # both
    assert by_index.add_tokens == [word_token_indices(tok, p, 6) for p in prompts]
    assert all(set(i) < set(w) for i, w in zip(by_index.add_tokens, by_word.add_tokens, strict=True))
    with pytest.raises(AttnkitError, match="blend word 9 is in none of the prompts"):
        LocalBlend(prompts, tok, [9])


def test_standalone_reweight_scales_the_targets_own_map(pipe):
    tok = pipe.tokenizer
    prompts = ["a lemon cake", "a lego cake"]
    store = AttentionStore(kinds=("cross",), res=None, steps=0)
    plain = AttentionStore(kinds=("cross",), res=None, steps=0)
    generate(pipe, prompts, Reweight(prompts, tok, {"lego": 3.0}), store, seed=SEED, steps=2, progress=False)
    generate(pipe, prompts, plain, seed=SEED, steps=2, progress=False)
    layers = describe_layers(pipe.unet)
    first = min(store.layer_maps("cross"), key=lambda name: layers[name].index)
    for name, m in store.layer_maps("cross").items():
        torch.testing.assert_close(m[0], plain.layer_maps("cross")[name][0], **TOL)  # the source: untouched
    # step 0, first cross layer: same inputs as plain generation, so the target's map differs only by w
    m, ref = store.layer_maps("cross")[first], plain.layer_maps("cross")[first]
    torch.testing.assert_close(m[1][..., 2], 3.0 * ref[1][..., 2], **TOL)
    torch.testing.assert_close(m[1][..., 3:], ref[1][..., 3:], **TOL)


# -- which self-attention layers are replaced: the official code counts query pixels ---------------------------
def test_self_replacement_counts_query_pixels_like_the_official_code():
    from attnkit.controllers.p2p import self_replaced

    assert self_replaced(16, 16, 16, (64, 64)) and not self_replaced(32, 32, 16, (64, 64))  # square: side
    assert self_replaced(20, 12, 16, (40, 24))  # 240 pixels <= 256: replaced (the larger side, 20, is not <= 16)
    assert self_replaced(32, 8, 16, (32, 8))  # 256 pixels, exactly the official limit
    assert not self_replaced(18, 16, 16, (36, 32))  # 288 pixels
    assert self_replaced(32, 32, 32, (128, 128)) and self_replaced(16, 16, 0.25, (64, 64))


class SelfCopies(Controller):
    """Records, per self-attention grid, whether the edited row attended exactly like the source row."""

    def __init__(self):
        self.copied = {}

    def observe(self, call):
        if not call.is_cross and call.step == 0:
            probs = call.probs(call.layout.cond_rows)
            self.copied[(call.height, call.width)] = bool(torch.equal(probs[0], probs[1]))


@pytest.mark.parametrize("size, expected", [
    ((40, 24), {(20, 12): True, (10, 6): True}),  # a 20x12 grid has 240 query pixels: replaced at self_res 16
    ((48, 16), {(24, 8): True, (12, 4): True}),  # 192 pixels: replaced (side 24)
    ((40, 32), {(20, 16): False, (10, 8): True}),  # 320 pixels: not replaced
])
def test_self_replacement_on_non_square_grids(size, expected):
    pipe = tiny_pipeline("sd")
    prompts = ["a red circle", "a blue circle"]
    probe = SelfCopies()
    generate(pipe, prompts, Replace(prompts, pipe.tokenizer, cross_steps=0.8, self_steps=0.5, self_res=16), probe,
             seed=SEED, steps=2, height=size[0], width=size[1], progress=False)
    assert probe.copied == expected

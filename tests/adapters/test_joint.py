"""Joint attention as two views, against an explicit oracle: one full softmax over the whole joint sequence,
written out here with the token order spelled as index lists (text first as FLUX, image first as SD3)."""

import math
import types

import pytest
import torch

from attnkit import Controller, Layout
from attnkit.adapters.joint import Views, attend_joint
from attnkit.engine import LayerInfo, TokenLayout

B, H, D = 2, 2, 8
N_TXT, GRID = 5, (2, 3)
N_IMG = GRID[0] * GRID[1]
S = N_TXT + N_IMG


def layer(kind):
    return LayerInfo(name=f"blocks.0.attn.{kind}", place="double", block=0, attention=0, transformer=0,
                     is_cross=kind == "cross", heads=H, family="flux", stream="double", processor="blocks.0.attn",
                     joint=True)


VIEWS = Views(self=layer("self"), cross=layer("cross"))


def columns(text_first):
    """The oracle's token order: which sequence positions are text, which image."""
    if text_first:
        return list(range(N_TXT)), list(range(N_TXT, S))
    return list(range(N_IMG, S)), list(range(N_IMG))


def tokens_for(text_first):
    txt, img = columns(text_first)
    return TokenLayout(text=slice(txt[0], txt[-1] + 1), image=slice(img[0], img[-1] + 1))


def fake_ctl(*controllers):
    state = types.SimpleNamespace(passthrough=False, layout=Layout(prompts=B, cfg=False), grid=GRID, step=0,
                                  num_steps=1)
    return types.SimpleNamespace(controllers=list(controllers), state=state)


def sdpa(q, k, v, mask):
    return torch.nn.functional.scaled_dot_product_attention(q, k, v, attn_mask=mask)


def qkv(seed=0):
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(B, H, S, D, generator=g, dtype=torch.float64) for _ in range(3)]


def full_probs(q, k):
    return (q @ k.transpose(-1, -2) / math.sqrt(D)).softmax(dim=-1)


@pytest.fixture(params=[True, False], ids=["text-first", "image-first"])
def text_first(request):
    return request.param


class Observer(Controller):
    def __init__(self):
        self.seen = {}

    def observe(self, call):
        self.seen[call.layer.kind] = (call.probs(), call.query.shape, call.key.shape, call.tokens)


def test_views_are_the_renormalised_blocks_of_the_joint_softmax(text_first):
    q, k, v = qkv()
    obs = Observer()
    out = attend_joint(fake_ctl(obs), VIEWS, q, k, v, tokens_for(text_first), sdpa)
    txt, img = columns(text_first)
    p = full_probs(q, k)
    cross = p[:, :, img][..., txt]
    own = p[:, :, img][..., img]
    torch.testing.assert_close(obs.seen["cross"][0], cross / cross.sum(-1, keepdim=True))
    torch.testing.assert_close(obs.seen["self"][0], own / own.sum(-1, keepdim=True))
    assert obs.seen["cross"][1] == (B, H, N_IMG, D) and obs.seen["cross"][2] == (B, H, N_TXT, D)
    assert obs.seen["cross"][3].text_first == text_first
    torch.testing.assert_close(out, p @ v)  # observing changes nothing


class ScaleTextColumn(Controller):
    """Rewrites the cross view: doubles column 1 of target row 1, then renormalises the row."""

    def wants_probs(self, call):
        return call.is_cross

    def edit_probs(self, call, probs):
        out = probs.clone()
        out[1, :, :, 1] *= 2
        return out / out.sum(-1, keepdim=True)


class CopySourceSelf(Controller):
    """Rewrites the self view: row 1 takes row 0's (renormalised) image × image map."""

    def wants_probs(self, call):
        return not call.is_cross

    def edit_probs(self, call, probs):
        out = probs.clone()
        out[1] = probs[0]
        return out


@pytest.mark.parametrize("chunk", [None, 1], ids=["whole", "row-blocks"])
def test_edited_maps_go_back_at_the_rows_own_mass(text_first, chunk, monkeypatch):
    if chunk is not None:  # the explicit path, one query row at a time
        monkeypatch.setattr("attnkit.adapters.joint.CHUNK_BYTES", chunk)
    q, k, v = qkv(1)
    out = attend_joint(fake_ctl(ScaleTextColumn(), CopySourceSelf()), VIEWS, q, k, v, tokens_for(text_first), sdpa)
    txt, img = columns(text_first)
    p = full_probs(q, k)
    expected = p.clone()
    for rows, cols, edit in ((img, txt, "cross"), (img, img, "self")):
        block = p[:, :, rows][..., cols]
        mass = block.sum(-1, keepdim=True)
        renorm = block / mass
        if edit == "cross":
            renorm = renorm.clone()
            renorm[1, :, :, 1] *= 2
            renorm = renorm / renorm.sum(-1, keepdim=True)
        else:
            renorm = torch.stack([renorm[0], renorm[0]])
        expected[:, :, rows[0]:rows[-1] + 1, cols[0]:cols[-1] + 1] = renorm * mass
    torch.testing.assert_close(expected.sum(-1), torch.ones(B, H, S, dtype=p.dtype))  # still distributions
    torch.testing.assert_close(out, expected @ v)
    # Text-query rows are never edited: exactly the stock rows.
    torch.testing.assert_close(out[:, :, txt], (p @ v)[:, :, txt])


class ReplaceImageKV(Controller):
    """Row 1 takes row 0's image keys and values (Stable Flow's injection), on the self view."""

    def edit_qkv(self, call):
        if not call.is_cross:
            call.key = torch.stack([call.key[0], call.key[0]])
            call.value = torch.stack([call.value[0], call.value[0]])


def test_replaced_keys_are_the_layers_keys_for_every_query(text_first):
    q, k, v = qkv(2)
    out = attend_joint(fake_ctl(ReplaceImageKV()), VIEWS, q, k, v, tokens_for(text_first), sdpa)
    txt, img = columns(text_first)
    k2, v2 = k.clone(), v.clone()
    k2[1][:, img], v2[1][:, img] = k[0][:, img], v[0][:, img]
    torch.testing.assert_close(out, full_probs(q, k2) @ v2)  # text queries see the replaced keys too


class ShareReference(Controller):
    """Style-Aligned-like: every row's image keys/values are extended by row 0's, with a score shift mask."""

    def edit_qkv(self, call):
        if call.is_cross:
            return
        k, v = call.key, call.value
        call.key = torch.cat([k, k[:1].expand_as(k)], dim=-2)
        call.value = torch.cat([v, v[:1].expand_as(v)], dim=-2)
        mask = torch.zeros(k.shape[0], 1, 1, 2 * k.shape[-2], dtype=k.dtype)
        mask[..., k.shape[-2]:] = math.log(0.5)
        call.mask = mask


def test_added_keys_and_masks_reach_the_image_queries_only(text_first):
    q, k, v = qkv(3)
    out = attend_joint(fake_ctl(ShareReference()), VIEWS, q, k, v, tokens_for(text_first), sdpa)
    txt, img = columns(text_first)
    stock = full_probs(q, k) @ v
    torch.testing.assert_close(out[:, :, txt], stock[:, :, txt])
    # Image queries: one softmax over [own text | own image | reference image (scores + log 0.5)].
    keys = torch.cat([k[:, :, txt], k[:, :, img], k[:1, :, img].expand(B, -1, -1, -1)], dim=2)
    values = torch.cat([v[:, :, txt], v[:, :, img], v[:1, :, img].expand(B, -1, -1, -1)], dim=2)
    scores = q[:, :, img] @ keys.transpose(-1, -2) / math.sqrt(D)
    scores[..., N_TXT + N_IMG:] += math.log(0.5)
    torch.testing.assert_close(out[:, :, img], scores.softmax(-1) @ values)


def test_without_controllers_or_on_a_passthrough_call_the_stock_function_runs(text_first):
    q, k, v = qkv(4)
    calls = []

    def fused(*args):
        calls.append(args)
        return sdpa(*args)

    ctl = fake_ctl(ScaleTextColumn())
    ctl.state.passthrough = True
    out = attend_joint(ctl, VIEWS, q, k, v, tokens_for(text_first), fused)
    assert len(calls) == 1 and calls[0][0] is q and calls[0][1] is k  # the very tensors, unsplit
    torch.testing.assert_close(out, full_probs(q, k) @ v)


def test_image_only_layer_has_a_self_view_only():
    # SD3.5's attn2: image tokens only, no text.
    q, k, v = [t[:, :, :N_IMG] for t in qkv(5)]
    obs = Observer()
    tokens = TokenLayout(text=slice(N_IMG, N_IMG), image=slice(0, N_IMG))
    out = attend_joint(fake_ctl(obs, CopySourceSelf()), Views(self=layer("self")), q, k, v, tokens, sdpa)
    assert set(obs.seen) == {"self"}
    p = full_probs(q, k)
    torch.testing.assert_close(out, torch.stack([p[0], p[0]]) @ v)


@pytest.mark.parametrize("masked", [False, True], ids=["plain", "masked"])
def test_row_logsumexp_from_the_views_own_map_or_in_row_blocks(masked, monkeypatch):
    # The mass of an edited block needs each row's logsumexp: from the materialised map (one logit per row) or,
    # where no map exists, block by block of query rows; both equal the whole-row logsumexp.
    from attnkit.adapters.joint import _logsumexp, _probs, _view_logsumexp

    q, k, _ = qkv(6)
    mask = None
    if masked:
        mask = torch.zeros(B, 1, 1, S, dtype=q.dtype)
        mask[..., N_TXT:] = math.log(0.5)
    scores = q @ k.transpose(-1, -2) / math.sqrt(D) + (0 if mask is None else mask)
    expected = torch.logsumexp(scores, dim=-1)
    torch.testing.assert_close(_view_logsumexp(q, k, 1 / math.sqrt(D), mask, _probs(q, k, 1 / math.sqrt(D), mask)),
                               expected)
    monkeypatch.setattr("attnkit.adapters.joint.CHUNK_BYTES", 1)
    torch.testing.assert_close(_logsumexp(q, k, 1 / math.sqrt(D), mask), expected, atol=1e-5, rtol=1e-6)

"""Style Aligned on MM-DiT models: on FLUX the reference's keys are moved beside the image in RoPE (AlignedGen),
checked against an explicit rotary-embedding oracle; without sharing nothing changes."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from attnkit import Controller, StyleAligned, control
from attnkit.adapters.flux import RotaryPositions
from attnkit.controllers.shared import mean_std

torch.set_num_threads(1)
PROMPTS = ["a red circle", "a blue square", "a green triangle"]


def run(pipe, *controllers, prompts=PROMPTS, steps=2):
    generator = torch.Generator("cpu").manual_seed(0)
    kwargs = dict(num_inference_steps=steps, generator=generator, output_type="np")
    if not controllers:
        return pipe(prompts, **kwargs).images
    with control(pipe, *controllers) as ctl:
        return pipe(prompts, callback_on_step_end=ctl.callback, **kwargs).images


def rope(x: torch.Tensor, ids: torch.Tensor, model) -> torch.Tensor:
    """The oracle: rotate each (even, odd) channel pair of ``x`` (B, H, N, d) by the angles of position ``ids``
    (N, 3), the cosines and sines taken from the transformer's pos_embed, the rotation written out by hand."""
    cos, sin = model.pos_embed(ids)
    cos, sin = cos[:, ::2].double(), sin[:, ::2].double()  # one angle per channel pair
    even, odd = x[..., 0::2].double(), x[..., 1::2].double()
    out = torch.stack([even * cos - odd * sin, even * sin + odd * cos], dim=-1)
    return out.flatten(-2).to(x.dtype)


def test_rotary_positions_shift_against_the_oracle(flux_pipe):
    model = flux_pipe.transformer
    h, w = 4, 5
    ids = torch.zeros(h * w, 3)
    ids[:, 1] = torch.arange(h).repeat_interleave(w).float()
    ids[:, 2] = torch.arange(w).repeat(h).float()
    raw = torch.randn(2, 2, h * w, 16)
    cos, sin = model.pos_embed(ids)
    positions = RotaryPositions(model, cos, sin)
    placed = positions.apply(raw)
    torch.testing.assert_close(placed, rope(raw, ids, model), atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(positions.remove(placed), raw, atol=1e-5, rtol=1e-5)
    moved = ids.clone()
    moved[:, 1] += 3
    moved[:, 2] += w
    torch.testing.assert_close(positions.shift(placed, rows=3, cols=w), rope(raw, moved, model),
                               atol=1e-5, rtol=1e-5)


class Spy(Controller):
    """Keeps the self view's q/k of one layer at step 0 as it sees them (before or after other controllers)."""

    def __init__(self, layer: str):
        self.layer, self.seen = layer, {}

    def edit_qkv(self, call):
        if call.step == 0 and call.layer.name == self.layer:
            self.seen = dict(query=call.query, key=call.key, positions=call.positions, width=call.width,
                             height=call.height)


@pytest.mark.parametrize("layer", ["transformer_blocks.1.attn.self", "single_transformer_blocks.0.attn.self"])
def test_reference_keys_sit_beside_the_image_and_adain_is_position_free(flux_pipe, layer):
    before, after = Spy(layer), Spy(layer)
    run(flux_pipe, before, StyleAligned(), after)
    q, k, positions = before.seen["query"], before.seen["key"], before.seen["positions"]
    gh, gw = before.seen["height"], before.seen["width"]
    assert positions is not None and (gh, gw) == (8, 8)
    n = k.shape[-2]
    key = after.seen["key"]
    assert key.shape[-2] == 2 * n
    # The oracle: the reference's raw keys (positions taken out) rotated to rows i, columns j + width.
    model = flux_pipe.transformer
    ids = torch.zeros(n, 3)
    ids[:, 1] = torch.arange(gh).repeat_interleave(gw).float()
    ids[:, 2] = torch.arange(gw).repeat(gh).float()
    raw_ref = positions.remove(k[0:1])
    torch.testing.assert_close(rope(raw_ref, ids, model), k[0:1], atol=1e-4, rtol=1e-4)  # RoPE as the oracle's
    shifted = ids.clone()
    shifted[:, 2] += gw
    expected = rope(raw_ref, shifted, model)
    for target in (1, 2):
        torch.testing.assert_close(key[target:target + 1, :, n:], expected, atol=1e-4, rtol=1e-4)
    # the reference row sees exact copies of its own keys (which leaves its output as it is), unshifted
    assert torch.equal(key[0:1, :, :n], k[0:1]) and torch.equal(key[0:1, :, n:], k[0:1])
    # AdaIN on the position-free queries: target statistics become the reference's, then positions go back in
    free_q = positions.remove(q)
    mean, std = mean_std(free_q)
    expected_q = rope((free_q[1:2] - mean[1:2]) / std[1:2] * std[0:1] + mean[0:1], ids, model)
    torch.testing.assert_close(after.seen["query"][1:2], expected_q, atol=1e-4, rtol=1e-4)


def test_without_sharing_the_output_is_unchanged(flux_pipe):
    free = run(flux_pipe)
    off = run(flux_pipe, StyleAligned(share_attention=False))
    no_steps = run(flux_pipe, StyleAligned(steps=(0, 0)))
    assert np.array_equal(off, free) and np.array_equal(no_steps, free)
    shared = run(flux_pipe, StyleAligned())
    np.testing.assert_allclose(shared[0], free[0], atol=1e-5)  # the reference is what it is without sharing
    assert np.abs(shared[1:] - free[1:]).max() > 1e-3


def test_the_position_shift_changes_what_targets_see(flux_pipe):
    shifted = run(flux_pipe, StyleAligned())
    collided = run(flux_pipe, StyleAligned(shift_positions=False))
    np.testing.assert_allclose(shifted[0], collided[0], atol=1e-6)
    assert np.abs(shifted[1:] - collided[1:]).max() > 1e-4


def test_single_stream_only_as_alignedgen(flux_pipe):
    spy = Spy("transformer_blocks.0.attn.self")
    run(flux_pipe, StyleAligned(places=("single",)), spy)
    assert spy.seen["key"].shape[-2] == 64  # double-stream layers keep their own keys


def test_sd3_shares_without_positions(sd3_pipe):
    spy = Spy("transformer_blocks.1.attn.self")
    free = run(sd3_pipe, prompts=PROMPTS[:2])
    shared = run(sd3_pipe, StyleAligned(), spy, prompts=PROMPTS[:2])
    assert spy.seen["positions"] is None and spy.seen["key"].shape[-2] == 2 * 64
    np.testing.assert_allclose(shared[0], free[0], atol=1e-5)
    assert math.isfinite(float(np.abs(shared[1] - free[1]).max()))


@pytest.mark.parametrize("kind", ["flux", "sd3"])
def test_real_reference_follows_its_rectified_flow_inversion(flux_pipe, sd3_pipe, kind):
    from PIL import Image

    from attnkit import style_aligned
    from attnkit.adapters.flux import unpack
    from attnkit.flow_inversion import FlowInversion

    pipe = flux_pipe if kind == "flux" else sd3_pipe
    photo = Image.new("RGB", (32, 32), (30, 160, 60))
    result = style_aligned(pipe, ["a green circle", "a red square"], reference=photo, steps=3,
                           inversion_guidance=1.0, progress=False)
    inv = result.inversion
    assert isinstance(inv, FlowInversion) and inv.steps == 3 and result.settings["real_reference"]
    final = result.latents[:1]
    if kind == "flux":
        final = unpack(final, (8, 8))
    # put back on the trajectory after every step: the reference row ends on the encoded photo
    torch.testing.assert_close(final.float().cpu(), inv.latents[:1], atol=1e-6, rtol=0)

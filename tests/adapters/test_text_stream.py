"""The engine's extra text-stream tokens (Controller.extra_text_tokens) and attention outputs
(Controller.observe_output) on the joint families, and what a UNet answers."""

import pytest
import torch
import torch.nn.functional as F

from attnkit import AttnkitError, Controller, control
from attnkit.testing import tiny_pipeline


class Extra(Controller):
    def __init__(self, tokens):
        self.tokens, self.seen, self.outputs = tokens, {}, {}

    def extra_text_tokens(self, ctl):
        return self.tokens

    def edit_qkv(self, call):
        if call.is_cross:
            self.seen.setdefault(call.layer.name, (call.query, call.key, call.value))

    def observe_output(self, call):
        self.outputs.setdefault(call.layer.name, (call.output, call.extra))


def test_extra_tokens_reach_double_stream_layers_only(mmdit, run):
    width = mmdit.transformer.context_embedder.in_features
    extra = Extra(torch.randn(3, width))
    plain = run(mmdit, output_type="latent")
    with_extra = run(mmdit, extra, output_type="latent")
    assert (with_extra - plain).abs().max() <= 1e-5  # nobody attends to them
    for name, (output, tokens) in extra.outputs.items():
        double = not name.startswith("single_") and "attn2" not in name
        assert (tokens is not None) == double, name
        assert output.shape[-2] == 64  # the 8x8 image tokens
        if tokens is not None:
            assert tokens.query.shape[2] == tokens.output.shape[2] == 3
            # the extra tokens' output is attention over [themselves; the image tokens]
            q_img, _, _ = extra.seen[name.replace(".self", ".cross")]
            assert tokens.output.shape == (q_img.shape[0], q_img.shape[1], 3, q_img.shape[-1])


def test_extra_output_is_attention_over_extra_and_image(sd3_pipe, run):
    """Oracle on SD3's first block: the extra tokens' output from their own q/k/v and the image keys/values
    (recorded by a controller that sees the self view's untouched keys)."""

    class Both(Extra):
        def edit_qkv(self, call):
            self.seen.setdefault(call.layer.name, (call.query, call.key, call.value))

    width = sd3_pipe.transformer.context_embedder.in_features
    both = Both(torch.randn(2, width))
    run(sd3_pipe, both, steps=1, output_type="latent")
    name = "transformer_blocks.0.attn"
    _, k_img, v_img = both.seen[f"{name}.self"]
    _, tokens = both.outputs[f"{name}.cross"]
    expected = F.scaled_dot_product_attention(tokens.query, torch.cat([tokens.key, k_img], 2),
                                              torch.cat([tokens.value, v_img], 2))
    torch.testing.assert_close(tokens.output, expected, atol=1e-6, rtol=1e-5)


def test_two_sets_of_extra_tokens_are_refused(mmdit):
    width = mmdit.transformer.context_embedder.in_features
    with pytest.raises(AttnkitError, match="one set"):
        with control(mmdit, Extra(torch.randn(1, width)), Extra(torch.randn(1, width))):
            pass
    with pytest.raises(AttnkitError, match="at least one token"):
        with control(mmdit, Extra(torch.randn(0, width))):
            pass
    assert not mmdit.transformer.context_embedder._forward_pre_hooks


def test_unet_has_no_text_stream_but_reports_outputs():
    pipe = tiny_pipeline("sd")
    with pytest.raises(AttnkitError, match="text stream"):
        with control(pipe, Extra(torch.randn(1, 32))):
            pass
    outputs = Extra(None)
    with control(pipe, outputs) as ctl:
        pipe("a red cat", num_inference_steps=1, callback_on_step_end=ctl.callback, output_type="latent")
    assert outputs.outputs and all(out is not None and extra is None for out, extra in outputs.outputs.values())

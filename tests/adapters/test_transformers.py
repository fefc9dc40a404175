"""The engine on both MM-DiT families (tiny random SD3.5-like and FLUX.1-like pipelines): observing changes
nothing, the pipeline is always restored, what cannot be served is refused before sampling, and the
Prompt-to-Prompt controllers act on the joint layers as their definitions say."""

import numpy as np
import pytest
import torch

from attnkit import (
    AttentionStore,
    AttnkitError,
    Controller,
    Replace,
    Reweight,
    control,
    generate,
    shared_latents,
)
from attnkit.adapters import text_tokenizer
from attnkit.engine import AttnkitProcessor
from attnkit.tokens import word_token_indices

PROMPTS = ["a red cat wearing sunglasses", "a blue circle"]


class Boom(Controller):
    def observe(self, call):
        if call.step == 1:
            raise RuntimeError("boom")


class Identity(Controller):
    """The explicit-probabilities path on every view, probabilities unchanged."""

    def wants_probs(self, call):
        return True


class Exits(Controller):
    def __init__(self):
        self.entered = self.exited = 0

    def on_enter(self, ctl):
        self.entered += 1

    def on_exit(self, ctl):
        self.exited += 1


def test_observing_leaves_the_output_equal_to_stock(mmdit, run):
    stock = run(mmdit)
    store = AttentionStore(kinds=("cross", "self"), res=None)
    hooked = run(mmdit, store)
    assert np.abs(hooked - stock).max() <= 1e-5
    assert store.layer_maps("cross") and store.layer_maps("self")  # it really read maps on the way
    maps = store.maps("cross")
    torch.testing.assert_close(maps.sum(-1), torch.ones(maps.shape[:-1]))  # distributions over the text


def test_explicit_probability_path_matches_fused(mmdit, run):
    stock = run(mmdit, steps=2)
    assert np.abs(run(mmdit, Identity(), steps=2) - stock).max() <= 1e-5


def test_processors_restored_after_exit_and_exceptions(mmdit, run):
    model = mmdit.transformer
    before = dict(model.attn_processors)
    hooks = len(model._forward_pre_hooks)
    exits = Exits()
    with control(mmdit, exits):
        assert all(isinstance(p, AttnkitProcessor) for p in model.attn_processors.values())
    with pytest.raises(RuntimeError, match="boom"):
        run(mmdit, exits, Boom(), steps=3)
    with pytest.raises(KeyError):
        with control(mmdit, AttentionStore()):
            raise KeyError("user code failed")
    after = model.attn_processors
    assert all(after[name] is before[name] for name in before)
    assert len(model._forward_pre_hooks) == hooks
    assert (exits.entered, exits.exited) == (2, 2)


def test_nested_control_refused(mmdit):
    with control(mmdit, AttentionStore()):
        inside = dict(mmdit.transformer.attn_processors)
        with pytest.raises(AttnkitError, match="one control"):
            with control(mmdit, AttentionStore()):
                pass
        assert all(mmdit.transformer.attn_processors[n] is inside[n] for n in inside)


class UNetOnly(Controller):
    families = ("unet",)
    family_note = "it reads UNet block names"


def test_controller_for_another_family_refused_before_sampling(mmdit):
    before = dict(mmdit.transformer.attn_processors)
    exits = Exits()
    with pytest.raises(AttnkitError, match="UNetOnly cannot act on this .* it reads UNet block names"):
        with control(mmdit, exits, UNetOnly()):
            pass
    assert exits.entered == 0 and exits.exited == 0
    assert all(mmdit.transformer.attn_processors[n] is before[n] for n in before)


def test_caches_that_skip_attention_refused(mmdit):
    from diffusers.hooks import FirstBlockCacheConfig, HookRegistry, apply_first_block_cache

    model = mmdit.transformer
    if hasattr(model, "enable_cache"):  # FLUX: CacheMixin
        model.enable_cache(FirstBlockCacheConfig(threshold=0.2))
        try:
            with pytest.raises(AttnkitError, match="FirstBlockCacheConfig caching .*disable_cache"):
                with control(mmdit, AttentionStore()):
                    pass
        finally:
            model.disable_cache()
    apply_first_block_cache(model, FirstBlockCacheConfig(threshold=0.2))  # the hooks alone, as SD3 takes them
    try:
        with pytest.raises(AttnkitError, match="fbc_leader_block_hook.*remove it"):
            with control(mmdit, AttentionStore()):
                pass
    finally:
        registry = HookRegistry.check_if_exists_or_initialize(model)
        for name in ("fbc_leader_block_hook", "fbc_block_hook"):
            registry.remove_hook(name, recurse=True)
    with control(mmdit, AttentionStore()):
        pass


def test_generate_decodes_as_the_pipeline_does(mmdit):
    prompt = PROMPTS[0]
    ours = generate(mmdit, prompt, seed=5, steps=2, progress=False)
    theirs = mmdit(prompt, num_inference_steps=2, guidance_scale=ours.guidance, output_type="np",
                   latents=shared_latents(mmdit, 5, 1)).images[0]
    assert np.abs(np.asarray(ours.images[0], dtype=np.float64) / 255 - theirs).max() <= 1 / 255 + 1e-6


def test_word_swap_copies_the_source_map_and_reweight_scales_it(mmdit):
    # Same token counts: Replace copies the source's image queries and text keys into the target row, so the
    # target's (renormalised) cross map is the source's; a Reweight after it scales the "blue" columns by 2.
    prompts = ["a red cat", "a blue cat"]
    tok = text_tokenizer(mmdit)
    edit = Replace(prompts, tok, cross_steps=1.0, self_steps=0.0)
    after_edit = AttentionStore(res=None, rows="cond")
    generate(mmdit, prompts, edit, after_edit, steps=2, progress=False)
    maps = after_edit.maps("cross")
    torch.testing.assert_close(maps[1], maps[0])
    weighted = AttentionStore(res=None)
    generate(mmdit, prompts, Replace(prompts, tok, cross_steps=1.0, self_steps=0.0),
             Reweight(prompts, tok, {"blue": 2.0}, cross_steps=1.0), weighted, steps=2, progress=False)
    maps = weighted.maps("cross")
    blue = word_token_indices(tok, prompts[1], "blue")
    assert len(blue) == (2 if "SD3" in repr(tok) else 1)  # SD3: its CLIP and its T5 column
    expected = maps[0].clone()
    expected[..., blue] *= 2
    torch.testing.assert_close(maps[1], expected)


def test_edit_changes_only_the_target(mmdit):
    prompts = ["a red cat", "a blue cat"]
    tok = text_tokenizer(mmdit)
    plain = generate(mmdit, prompts, steps=2, progress=False)
    edited = generate(mmdit, prompts, Replace(prompts, tok, cross_steps=1.0, self_steps=1.0), steps=2,
                      progress=False)
    torch.testing.assert_close(edited.latents[0], plain.latents[0])  # the source row is untouched
    assert not torch.allclose(edited.latents[1], plain.latents[1])

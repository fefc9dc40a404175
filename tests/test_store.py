import pytest
import torch

from attnkit import AttentionStore, AttnkitError, control, generate
from attnkit.testing import tiny_pipeline

PROMPTS = ["a lemon cake", "a cat wearing sunglasses"]


@pytest.fixture(scope="module", params=["sd", "sdxl"])
def pipe(request):
    torch.set_num_threads(1)
    return tiny_pipeline(request.param)


def run(pipe, store, steps=4, prompts=PROMPTS, guidance=7.5):
    return generate(pipe, prompts, store, seed=1, steps=steps, guidance=guidance, progress=False)


def test_cross_maps_are_probabilities_over_tokens(pipe):
    store = AttentionStore(res=None)
    run(pipe, store)
    maps = store.maps("cross")
    assert maps.shape[0] == len(PROMPTS)
    assert maps.shape[-1] == pipe.tokenizer.model_max_length
    torch.testing.assert_close(maps.sum(-1), torch.ones(maps.shape[:-1]), atol=1e-5, rtol=0)
    assert (maps >= 0).all()


def test_memory_does_not_grow_with_steps(pipe):
    sizes = []
    for steps in (2, 6):
        store = AttentionStore(kinds=("cross", "self"), res=None)
        run(pipe, store, steps=steps)
        assert store.steps_seen == set(range(steps))
        sizes.append(sum(t.numel() for t in store.sums.values()))
    assert sizes[0] == sizes[1]


def test_store_reads_conditional_half_by_default(pipe):
    cond, uncond = AttentionStore(res=None), AttentionStore(res=None, rows="uncond")
    run(pipe, cond)
    run(pipe, uncond)
    # The empty unconditional prompt attends differently from the real prompts.
    assert not torch.allclose(cond.maps(), uncond.maps())
    # Both prompts' rows differ too: row 1 is the second prompt, not a copy of row 0.
    assert not torch.allclose(cond.maps()[0], cond.maps()[1])


def test_step_window_and_layer_selection(pipe):
    everything = AttentionStore(res=None)
    run(pipe, everything, steps=5)
    late = AttentionStore(res=None, steps=(3, 5))
    run(pipe, late, steps=5)
    assert late.steps_seen == {3, 4}
    nearest = AttentionStore(res=None, steps=0.5)
    run(pipe, nearest, steps=5)
    assert nearest.steps_seen == {2}
    first_cross = min(info.index for info, _, _ in everything.layers.values())
    one = AttentionStore(res=None, layers=first_cross)
    run(pipe, one)
    assert [info.index for info, _, _ in one.layers.values()] == [first_cross]


def test_resolution_selection(pipe):
    store = AttentionStore(kinds=("cross", "self"), res=None)
    run(pipe, store)
    resolutions = {max(h, w) for _, h, w in store.layers.values()}
    smallest = min(resolutions)
    only = AttentionStore(kinds=("cross",), res=smallest)
    run(pipe, only)
    assert {max(h, w) for _, h, w in only.layers.values()} == {smallest}
    assert only.maps().shape[1:3] == (smallest, smallest)


def test_word_maps_handle_multi_token_words_and_unknown_words(pipe):
    store = AttentionStore(res=None)
    run(pipe, store)
    tokens = store.token_maps(row=1)
    maps = store.word_maps(PROMPTS[1], row=1)
    assert list(maps) == ["a", "cat", "wearing", "sunglasses"]
    # "sunglasses" is two tokens (positions 4 and 5): its map is their mean.
    torch.testing.assert_close(maps["sunglasses"], tokens[4:6].mean(0))
    torch.testing.assert_close(maps["cat"], tokens[2])
    with pytest.raises(AttnkitError, match="'a', 'cat', 'wearing', 'sunglasses'"):
        store.word_map(PROMPTS[1], "dog", row=1)


def test_prompt_over_token_limit_is_refused(pipe):
    long_prompt = " ".join(["cake"] * 100)
    with pytest.raises(AttnkitError, match="tokens long but the model reads at most 77"):
        run(pipe, AttentionStore(), prompts=[long_prompt])


def test_self_attention_map_and_components(pipe):
    store = AttentionStore(kinds=("self",), res=None)
    run(pipe, store)
    maps = store.maps("self")
    h, w = maps.shape[1:3]
    assert maps.shape[-1] == h * w
    pixel_map = store.self_map((1, 2), row=0)
    assert pixel_map.shape == (h, w)
    torch.testing.assert_close(pixel_map.sum(), torch.tensor(1.0), atol=1e-4, rtol=0)
    comps = store.self_components(row=0, k=3)
    assert comps.shape == (3, h, w)
    with pytest.raises(AttnkitError, match="outside"):
        store.self_map((h, 0))


def test_missing_maps_explain_what_was_stored(pipe):
    store = AttentionStore(kinds=("cross",), res=None)
    run(pipe, store)
    with pytest.raises(AttnkitError, match="no self-attention maps"):
        store.maps("self")


def test_store_composes_without_changing_output(pipe):
    kw = dict(num_inference_steps=3, guidance_scale=7.5, output_type="latent")
    ref = pipe(PROMPTS, generator=torch.Generator().manual_seed(0), **kw).images
    with control(pipe, AttentionStore(res=None), AttentionStore(kinds="self", res=None)) as ctl:
        out = pipe(PROMPTS, generator=torch.Generator().manual_seed(0), callback_on_step_end=ctl.callback,
                   **kw).images
    torch.testing.assert_close(out, ref, atol=1e-5, rtol=0)

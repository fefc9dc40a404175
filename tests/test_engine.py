"""The engine: installing it changes nothing, it always restores the pipeline, refuses what it cannot honour,
and describes layers, steps and the batch layout correctly (SD-like and SDXL-like tiny pipelines)."""

import types

import numpy as np
import pytest
import torch
from diffusers.models.attention_processor import AttnProcessor, XFormersAttnProcessor

from attnkit import AttentionStore, AttnkitError, Controller, Layout, control, describe_layers, generate
from attnkit.engine import AttnkitProcessor
from attnkit.testing import tiny_pipeline

PROMPTS = ["a lemon cake", "a cat wearing sunglasses"]


@pytest.fixture(scope="module", params=["sd", "sdxl"])
def pipe(request):
    torch.set_num_threads(1)
    return tiny_pipeline(request.param)


class Recorder(Controller):
    """Remembers what the engine told it at every attention call and every step end."""

    def __init__(self):
        self.calls = []
        self.step_ends = []
        self.exited = 0

    def observe(self, call):
        self.calls.append(types.SimpleNamespace(
            layer=call.layer, height=call.height, width=call.width, queries=call.query.shape[-2],
            step=call.step, num_steps=call.num_steps, layout=call.layout, after_step_ends=len(self.step_ends)))

    def on_step_end(self, ctl, step, tensors):
        self.step_ends.append(step)
        return {}

    def on_exit(self, ctl):
        self.exited += 1


class Boom(Controller):
    """Raises inside the pipeline call, at the second step."""

    def observe(self, call):
        if call.step == 1:
            raise RuntimeError("boom")


class Identity(Controller):
    """Takes the explicit-probabilities path everywhere without changing the probabilities."""

    def wants_probs(self, call):
        return True


def sample(pipe, *controllers, steps=3, guidance=7.5, prompts=PROMPTS, **kwargs):
    generator = torch.Generator("cpu").manual_seed(0)
    call = dict(num_inference_steps=steps, guidance_scale=guidance, generator=generator, output_type="np", **kwargs)
    if not controllers:
        return pipe(prompts, **call).images
    with control(pipe, *controllers) as ctl:
        return pipe(prompts, callback_on_step_end=ctl.callback, **call).images


# -- installing the engine changes nothing --------------------------------------------------------------------
def test_store_leaves_output_equal_to_stock(pipe):
    stock = sample(pipe)
    cross, both = AttentionStore(res=None), AttentionStore(kinds=("cross", "self"), res=None)
    with_cross = sample(pipe, cross)
    with_both = sample(pipe, both)
    assert np.abs(with_cross - stock).max() <= 1e-5
    assert np.abs(with_both - stock).max() <= 1e-5
    # The stores really read attention on the way (else equality would prove nothing).
    assert cross.layer_maps("cross") and both.layer_maps("self")


def test_explicit_probability_path_matches_fused(pipe):
    # Materialising softmax(QK^T) and multiplying by V must agree with SDPA up to float rounding.
    stock = sample(pipe, steps=2)
    explicit = sample(pipe, Identity(), steps=2)
    assert np.abs(explicit - stock).max() <= 1e-4


# -- restoring the pipeline -----------------------------------------------------------------------------------
def test_processors_restored_after_normal_exit(pipe):
    before = dict(pipe.unet.attn_processors)
    hooks = len(pipe.unet._forward_pre_hooks)
    recorder = Recorder()
    with control(pipe, recorder) as ctl:
        inside = pipe.unet.attn_processors
        assert all(isinstance(p, AttnkitProcessor) for p in inside.values())
        pipe(PROMPTS[0], num_inference_steps=2, output_type="latent", callback_on_step_end=ctl.callback)
    after = pipe.unet.attn_processors
    assert after.keys() == before.keys()
    assert all(after[name] is before[name] for name in before)
    assert len(pipe.unet._forward_pre_hooks) == hooks
    assert recorder.exited == 1


def test_processors_restored_after_exception_inside_pipeline(pipe):
    # Custom (plain) processors the user had installed come back as the very same objects.
    stock = dict(pipe.unet.attn_processors)
    pipe.unet.set_attn_processor(AttnProcessor())
    try:
        before = dict(pipe.unet.attn_processors)
        recorder = Recorder()
        with pytest.raises(RuntimeError, match="boom"):
            with control(pipe, recorder, Boom()) as ctl:
                pipe(PROMPTS[0], num_inference_steps=3, output_type="latent", callback_on_step_end=ctl.callback)
        after = pipe.unet.attn_processors
        assert all(after[name] is before[name] for name in before)
        assert recorder.exited == 1
        assert recorder.step_ends == [0]  # it really failed mid-sampling, at the second step
        assert len(pipe.unet._forward_pre_hooks) == 0
    finally:
        pipe.unet.set_attn_processor(stock)


def test_processors_restored_after_exception_in_block_body(pipe):
    before = dict(pipe.unet.attn_processors)
    with pytest.raises(KeyError):
        with control(pipe, AttentionStore()):
            raise KeyError("user code failed")
    assert all(pipe.unet.attn_processors[name] is before[name] for name in before)


# -- refusing what the engine cannot honour -------------------------------------------------------------------
def test_refuses_attention_slicing(pipe):
    pipe.enable_attention_slicing()
    try:
        before = dict(pipe.unet.attn_processors)
        with pytest.raises(AttnkitError, match="disable_attention_slicing"):
            with control(pipe, AttentionStore()):
                pass
        assert all(pipe.unet.attn_processors[name] is before[name] for name in before)
    finally:
        pipe.disable_attention_slicing()
    with control(pipe, AttentionStore()):  # usable again once slicing is off
        pass


def test_refuses_xformers(pipe):
    # XFormersAttnProcessor can be built without the xformers package: the engine must refuse it by type.
    stock = dict(pipe.unet.attn_processors)
    pipe.unet.set_attn_processor(XFormersAttnProcessor())
    try:
        with pytest.raises(AttnkitError, match="disable_xformers_memory_efficient_attention"):
            with control(pipe, AttentionStore()):
                pass
        assert all(isinstance(p, XFormersAttnProcessor) for p in pipe.unet.attn_processors.values())
    finally:
        pipe.unet.set_attn_processor(stock)


def test_refuses_nested_control(pipe):
    with control(pipe, AttentionStore()):
        inside = dict(pipe.unet.attn_processors)
        with pytest.raises(AttnkitError, match="one control"):
            with control(pipe, AttentionStore()):
                pass
        # The outer block is untouched by the refused inner one.
        assert all(pipe.unet.attn_processors[n] is inside[n] for n in inside)
    assert not any(isinstance(p, AttnkitProcessor) for p in pipe.unet.attn_processors.values())


def test_refuses_non_unet_pipelines_and_non_controllers(pipe):
    transformer_pipe = types.SimpleNamespace(transformer=torch.nn.Linear(2, 2))
    with pytest.raises(AttnkitError, match="UNet"):
        with control(transformer_pipe, AttentionStore()):
            pass
    with pytest.raises(AttnkitError, match="Controller"):
        with control(pipe, object()):
            pass


# -- layers, resolution, steps, layout ------------------------------------------------------------------------
def test_layer_info_from_names(pipe):
    layers = describe_layers(pipe.unet)
    assert layers.keys() == pipe.unet.attn_processors.keys()
    ordered = sorted(layers.values(), key=lambda info: info.index)
    assert [info.index for info in ordered] == list(range(len(layers)))
    assert all(info.count == len(layers) for info in ordered)
    places = [info.place for info in ordered]
    assert places == sorted(places, key=["down", "mid", "up"].index)  # down, then mid, then up
    for info in ordered:
        module = pipe.unet.get_submodule(info.name.removesuffix(".processor"))
        assert info.is_cross == info.name.endswith("attn2.processor") == (info.kind == "cross")
        assert info.heads == module.heads
        if info.place != "mid":
            assert info.name.startswith(f"{info.place}_blocks.{info.block}.attentions.{info.attention}.")
        assert f"transformer_blocks.{info.transformer}.attn" in info.name


def test_forward_order_and_runtime_resolution(pipe):
    # A non-square image: 16x24 latents on the SD-like pipeline. Grids come from shapes, not constants.
    scale = pipe.vae_scale_factor
    recorder = Recorder()
    sample(pipe, recorder, steps=1, prompts=PROMPTS[:1], height=16 * scale, width=24 * scale)
    calls = recorder.calls
    assert [c.layer.index for c in calls] == list(range(calls[0].layer.count))  # forward order = index order
    for c in calls:
        assert c.height * c.width == c.queries
        # Each grid is the latent grid downsampled by a whole power of two.
        factor = 16 // c.height
        assert (c.height * factor, c.width * factor) == (16, 24) and factor & (factor - 1) == 0


def test_step_index_matches_scheduler(pipe):
    recorder = Recorder()
    sample(pipe, recorder, steps=4, prompts=PROMPTS[:1])
    per_step = len(describe_layers(pipe.unet))
    assert len(recorder.calls) == 4 * per_step
    assert recorder.step_ends == [0, 1, 2, 3]
    for c in recorder.calls:
        # Calls between step end i-1 and step end i belong to diffusers' step i.
        assert c.step == c.after_step_ends
        assert c.num_steps == 4 == len(pipe.scheduler.timesteps)


def test_custom_loop_must_set_step(pipe):
    # A UNet call at a timestep the scheduler does not know needs ctl.set_step(...): say so.
    unet = pipe.unet
    latents = torch.zeros(1, unet.config.in_channels, 8, 8)
    embeddings = torch.zeros(1, 5, unet.config.cross_attention_dim)
    extra = {}
    if unet.config.addition_embed_type == "text_time":
        extra["added_cond_kwargs"] = {"text_embeds": torch.zeros(1, pipe.text_encoder_2.config.projection_dim),
                                      "time_ids": torch.zeros(1, 6)}
    recorder = Recorder()
    pipe.scheduler.set_timesteps(5)
    with control(pipe, recorder, layout=Layout(prompts=1, cfg=False)) as ctl:
        with pytest.raises(AttnkitError, match="set_step"):
            unet(latents, 3, encoder_hidden_states=embeddings, **extra)
        ctl.set_step(2, 5)
        unet(latents, 3, encoder_hidden_states=embeddings, **extra)
    assert {c.step for c in recorder.calls} == {2}
    assert {c.num_steps for c in recorder.calls} == {5}


@pytest.mark.parametrize("guidance", [7.5, 1.0])
def test_layout_follows_guidance(pipe, guidance):
    recorder = Recorder()
    sample(pipe, recorder, steps=1, guidance=guidance)
    layouts = {c.layout for c in recorder.calls}
    assert layouts == {Layout(prompts=len(PROMPTS), cfg=guidance > 1)}


def test_layout_rows():
    cfg = Layout(prompts=2, cfg=True)
    assert (cfg.batch, cfg.uncond_rows, cfg.cond_rows) == (4, slice(0, 2), slice(2, 4))
    assert cfg.halves() == [slice(0, 2), slice(2, 4)]
    plain = Layout(prompts=3, cfg=False)
    assert (plain.batch, plain.cond_rows, plain.halves()) == (3, slice(0, 3), [slice(0, 3)])
    with pytest.raises(AttnkitError, match="unconditional"):
        _ = plain.uncond_rows


def test_generate_shares_one_noise_and_restores(pipe):
    before = dict(pipe.unet.attn_processors)
    result = generate(pipe, ["a red circle", "a red circle"], seed=3, steps=2, progress=False)
    # Same prompt and one shared noise: identical rows.
    torch.testing.assert_close(result.latents[0], result.latents[1])
    assert all(pipe.unet.attn_processors[n] is before[n] for n in before)


# -- model families -------------------------------------------------------------------------------------------
def test_unknown_denoisers_name_the_supported_families():
    from diffusers import PixArtTransformer2DModel

    pixart = types.SimpleNamespace(transformer=PixArtTransformer2DModel(
        num_attention_heads=1, attention_head_dim=8, in_channels=4, sample_size=8, num_layers=1,
        caption_channels=8, cross_attention_dim=8))
    for pipe in (pixart, types.SimpleNamespace(vae=torch.nn.Linear(2, 2))):
        with pytest.raises(AttnkitError, match="SD3Transformer2DModel .*FluxTransformer2DModel") as info:
            with control(pipe, AttentionStore()):
                pass
        assert "UNet2DConditionModel" in str(info.value)


class FluxOnly(Controller):
    families = ("flux",)

    def on_enter(self, ctl):
        raise AssertionError("a refused controller must not be entered")


def test_controller_families_are_checked_before_anything_is_installed(pipe):
    before = dict(pipe.unet.attn_processors)
    with pytest.raises(AttnkitError, match="FluxOnly cannot act on this UNet .*works on flux pipelines"):
        with control(pipe, AttentionStore(), FluxOnly()):
            pass
    assert all(pipe.unet.attn_processors[n] is before[n] for n in before)
    assert len(pipe.unet._forward_pre_hooks) == 0


def test_selection_places_name_unet_places_or_transformer_streams():
    from attnkit import Selection
    from attnkit.engine import LayerInfo

    def call(place):
        info = LayerInfo(name="x", place=place, block=0, attention=0, transformer=0, is_cross=True, heads=1)
        return types.SimpleNamespace(layer=info, height=4, width=4, step=0, num_steps=1)

    default, single, up = Selection(), Selection(places=("single",)), Selection(places=("up",))
    assert all(default.matches(call(p)) for p in ("down", "mid", "up", "double", "single"))
    assert single.matches(call("single")) and not single.matches(call("double"))
    assert up.matches(call("up")) and not up.matches(call("down")) and up.matches(call("double"))
    with pytest.raises(AttnkitError, match="'double' and/or 'single'"):
        Selection(places=("middle",))


def test_flux_timesteps_divided_by_1000_resolve_to_their_step():
    from attnkit.engine import _step_from_timestep

    scheduler = types.SimpleNamespace(timesteps=torch.tensor([1000.0, 614.7919, 250.5]))
    pipe = types.SimpleNamespace(scheduler=scheduler)
    t = (scheduler.timesteps[1:2] / 1000).to(torch.float32)
    assert _step_from_timestep(pipe, t, 1000.0) == (1, 3)
    with pytest.raises(AttnkitError, match="set_step"):
        _step_from_timestep(pipe, torch.tensor([0.5]), 1000.0)
    with pytest.raises(AttnkitError, match="set_step"):  # a UNet's integer timesteps stay exact
        _step_from_timestep(pipe, torch.tensor([614.0]))

"""Inversion on tiny random pipelines: DDIM arithmetic, the three methods, the pipeline path, files, bad input."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from diffusers import DDIMScheduler, PNDMScheduler
from PIL import Image

from attnkit.engine import AttnkitError
from attnkit.images import Crop
from attnkit.inversion import (
    Inversion,
    NullTextOptions,
    ddim_inverse_step,
    ddim_invert,
    ddim_scheduler,
    ddim_step,
    edit_image,
    generate_from,
    invert,
    null_text_optimize,
    reconstruct_latents,
)
from attnkit.sampling import generate
from attnkit.testing import tiny_pipeline

torch.set_num_threads(1)
PROMPT = "a red circle on a white background"


def _pipe(kind: str, prediction_type: str) -> object:
    pipe = tiny_pipeline(kind)
    pipe.scheduler = DDIMScheduler.from_config(pipe.scheduler.config, prediction_type=prediction_type)
    return pipe


@pytest.fixture(scope="module")
def sd_v():
    return _pipe("sd", "v_prediction")


@pytest.fixture(scope="module")
def sd_eps():
    return _pipe("sd", "epsilon")


@pytest.fixture(scope="module")
def sdxl_v():
    return _pipe("sdxl", "v_prediction")


@pytest.fixture(scope="module")
def picture() -> Image.Image:
    rng = np.random.default_rng(0)
    return Image.fromarray((rng.random((32, 32, 3)) * 255).astype(np.uint8))


def _unit_latents(seed: int = 0) -> torch.Tensor:
    # Unit-scale latents: the tiny VAE's own latents are tiny, which would make relative errors meaningless.
    return torch.randn(1, 4, 16, 16, generator=torch.Generator().manual_seed(seed))


def _record(pipe, trajectory: torch.Tensor, method: str = "ddim", guidance: float = 1.0, **extra) -> Inversion:
    steps = len(trajectory) - 1
    return Inversion(method, PROMPT, trajectory, ddim_scheduler(pipe, steps).timesteps.tolist(), guidance,
                     Crop((32, 32), (0, 0, 32, 32), (32, 32)), pipe.scheduler.config.prediction_type, **extra)


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).norm() / b.norm())


# -- DDIM arithmetic ---------------------------------------------------------------------------------------
@pytest.mark.parametrize("prediction_type", ["epsilon", "v_prediction", "sample"])
def test_sampling_step_matches_diffusers(prediction_type):
    scheduler = DDIMScheduler(beta_schedule="squaredcos_cap_v2", prediction_type=prediction_type,
                              timestep_spacing="trailing", clip_sample=False, set_alpha_to_one=False)
    scheduler.set_timesteps(7)
    x, output = torch.randn(1, 4, 8, 8), torch.randn(1, 4, 8, 8)
    for t in scheduler.timesteps.tolist():
        expected = scheduler.step(output, t, x).prev_sample
        assert torch.allclose(ddim_step(scheduler, output, t, x), expected, atol=1e-5)


def test_inverse_step_undoes_sampling_step_for_a_fixed_noise_prediction(sd_eps):
    scheduler = ddim_scheduler(sd_eps, 10)
    x, eps = torch.randn(1, 4, 8, 8), torch.randn(1, 4, 8, 8)
    for t in scheduler.timesteps.tolist():
        assert torch.allclose(ddim_step(scheduler, eps, t, ddim_inverse_step(scheduler, eps, t, x)), x, atol=1e-4)


@pytest.mark.parametrize("fixture", ["sd_v", "sdxl_v"])
def test_ddim_inversion_reconstructs_better_with_more_steps(fixture, request):
    # v-prediction only: a random epsilon UNet's noise guesses are inconsistent between noise levels, so its
    # inversion error falls only beyond ~100 steps (too slow here); epsilon arithmetic is checked exactly above.
    pipe = request.getfixturevalue(fixture)
    x0 = _unit_latents()
    errors = {}
    for steps in (3, 30):
        trajectory = ddim_invert(pipe, x0, PROMPT, steps=steps, progress=False)
        assert trajectory.shape == (steps + 1, 4, 16, 16)
        assert torch.equal(trajectory[:1], x0)
        errors[steps] = _rel(reconstruct_latents(pipe, _record(pipe, trajectory), guidance=1.0), x0)
    assert errors[30] < 0.6 * errors[3]
    assert errors[30] < 0.05


# -- the three methods -------------------------------------------------------------------------------------
def test_null_text_reconstructs_better_than_ddim_at_guidance_7_5(sd_v):
    x0 = _unit_latents(1)
    trajectory = ddim_invert(sd_v, x0, PROMPT, steps=5, progress=False)
    plain = _rel(reconstruct_latents(sd_v, _record(sd_v, trajectory), guidance=7.5), x0)
    result = null_text_optimize(sd_v, trajectory, PROMPT, guidance=7.5, progress=False)
    assert result.embeddings.shape[0] == 5 and len(result.losses) == 5
    assert _rel(result.latents, x0) < 0.7 * plain
    rebuilt = reconstruct_latents(sd_v, _record(sd_v, trajectory, "null-text", 7.5,
                                                uncond_embeddings=result.embeddings), guidance=7.5)
    assert torch.allclose(rebuilt, result.latents, atol=1e-5)


def test_early_stopping_cuts_the_inner_loop(sd_v):
    trajectory = ddim_invert(sd_v, _unit_latents(2), PROMPT, steps=3, progress=False)
    loose = null_text_optimize(sd_v, trajectory, PROMPT, options=NullTextOptions(inner_steps=5, early_stop=1.0),
                               progress=False)
    assert loose.inner_steps == [1, 1, 1]
    strict = null_text_optimize(sd_v, trajectory, PROMPT, options=NullTextOptions(inner_steps=3, early_stop=0.0,
                                early_stop_slope=0.0), progress=False)
    assert strict.inner_steps == [3, 3, 3]


def test_float16_pipeline_optimises_in_float32():
    pipe = _pipe("sd", "v_prediction")
    trajectory = ddim_invert(pipe, _unit_latents(3), PROMPT, steps=2, progress=False)
    pipe.to(dtype=torch.float16)
    result = null_text_optimize(pipe, trajectory, PROMPT, options=NullTextOptions(inner_steps=2), progress=False)
    assert result.embeddings.dtype == torch.float32
    assert torch.isfinite(result.embeddings).all()
    start = pipe.encode_prompt(PROMPT, "cpu", 1, True)[1].float()
    # Adam moves by ~lr per step wherever the gradient is non-zero: loss-scaled fp16 gradients arrived.
    assert (result.embeddings[0] - start[0]).abs().max() > 5e-3


def test_negative_prompt_inversion_uses_the_source_embedding(sd_v, picture):
    inv = invert(sd_v, picture, PROMPT, method="negative-prompt", steps=4, guidance=7.5, progress=False)
    cond = sd_v.encode_prompt(PROMPT, "cpu", 1, True)[0]
    assert inv.uncond_embeddings.shape == (1, *cond.shape[1:])
    assert torch.allclose(inv.uncond_embeddings[0], cond[0])
    # guidance cancels: the reconstruction is the guidance-1 one
    assert torch.allclose(reconstruct_latents(sd_v, inv), reconstruct_latents(sd_v, inv, guidance=1.0), atol=1e-5)


# -- the pipeline's own loop -------------------------------------------------------------------------------
@pytest.mark.parametrize(("fixture", "method"), [("sd_v", "null-text"), ("sdxl_v", "null-text"),
                                                 ("sdxl_v", "negative-prompt"), ("sd_eps", "ddim")])
def test_pipeline_path_matches_the_explicit_loop(fixture, method, picture, request):
    pipe = request.getfixturevalue(fixture)
    inv = invert(pipe, picture, PROMPT, method=method, steps=3, guidance=4.0,
                 null_text=NullTextOptions(inner_steps=2), progress=False)
    through_pipe = generate_from(pipe, inv, progress=False).latents.float()
    assert torch.allclose(through_pipe, reconstruct_latents(pipe, inv), atol=1e-5)
    if method == "null-text":  # the per-step embeddings really are fed: without them the result differs
        without = generate(pipe, [PROMPT], progress=False, **inv.generate_kwargs(pipe)).latents.float()
        assert not torch.allclose(without, through_pipe, atol=1e-4)


@pytest.mark.parametrize("fixture", ["sd_v", "sdxl_v"])
def test_editing_a_null_text_inversion_keeps_the_reconstruction_as_source(fixture, picture, request):
    pipe = request.getfixturevalue(fixture)
    inv = invert(pipe, picture, PROMPT, method="null-text", steps=3, guidance=4.0,
                 null_text=NullTextOptions(inner_steps=2), progress=False)
    result = edit_image(pipe, inv, "a blue circle on a white background", maps=False, progress=False)
    reference = reconstruct_latents(pipe, inv)
    assert torch.allclose(result.latents[:1].float(), reference, atol=1e-4)  # source row = reconstruction
    assert (result.latents[1:].float() - reference).abs().max() > 1e-4  # the edit row really differs
    # the null-text notebook's real-image schedule: self-attention for half the steps, grids up to 32x32
    assert (result.settings["self"], result.settings["self_res"]) == (0.5, 32)


@pytest.mark.parametrize("fixture", ["sd_v", "sdxl_v"])
def test_edited_rows_use_the_pipelines_own_unconditional_embedding(fixture, picture, request):
    pipe = request.getfixturevalue(fixture)
    inv = invert(pipe, picture, PROMPT, method="null-text", steps=3, guidance=4.0,
                 null_text=NullTextOptions(inner_steps=2), progress=False)
    target = "a blue circle on a white background"
    still = dict(cross=0.0, self=0.0, maps=False, progress=False)  # no attention edits: only the embeddings act
    own = edit_image(pipe, inv, target, **still)
    # the edited row is plain generation of the target from x_T with the pipeline's own unconditional input
    width, height = inv.size
    plain = generate(pipe, [target], latents=inv.start_latents.clone(), steps=inv.steps, guidance=inv.guidance,
                     height=height, width=width, progress=False).latents.float()
    assert torch.allclose(own.latents[1:].float(), plain, atol=1e-4)
    assert torch.allclose(own.latents[:1].float(), reconstruct_latents(pipe, inv), atol=1e-4)
    assert own.settings["target_uncond"] == "pipeline"
    # shared (the null-text notebook): the same prompt then gives the source row exactly
    shared = edit_image(pipe, inv, PROMPT, target_uncond="inversion", **still)
    torch.testing.assert_close(shared.latents[1:], shared.latents[:1])
    assert (own.latents[1:].float() - edit_image(pipe, inv, target, target_uncond="inversion", **still)
            .latents[1:].float()).abs().max() > 1e-4
    with pytest.raises(AttnkitError, match="target_uncond='source'"):
        edit_image(pipe, inv, target, target_uncond="source", **still)


def test_paste_unedited_keeps_the_input_pixels_outside_the_blend_mask(sd_v, picture):
    inv = invert(sd_v, picture, PROMPT, method="negative-prompt", steps=3, progress=False)
    assert inv.guidance == 7.5  # the null-text paper's, whatever the model samples with
    target = "a blue circle on a white background"
    # the tiny random model's maps are flat: threshold 0.97 leaves most of the grid unblended
    options = dict(blend=["red", "blue"], blend_threshold=0.97, maps=False, progress=False)
    plain = edit_image(sd_v, inv, target, **options)
    pasted = edit_image(sd_v, inv, target, paste_unedited=True, **options)
    mask = pasted.blend_masks[1]
    assert 0 < int(mask.sum()) < mask.numel()
    # latent cells two cells away from the mask are far outside the feathered edge: exactly the input there
    def pixels(cells: torch.Tensor) -> np.ndarray:
        cell = inv.image.size[0] // mask.shape[-1]
        return cells.repeat_interleave(cell, 0).repeat_interleave(cell, 1).numpy()

    far = pixels(~torch.nn.functional.max_pool2d(mask[None, None].float(), 5, 1, 2)[0, 0].bool())
    edited, original, latent_only = (np.asarray(x) for x in (pasted.edits[0], inv.image, plain.edits[0]))
    assert far.any() and (edited[far] == original[far]).all()  # 2 cells beyond the feathered edge
    assert (latent_only[far] != original[far]).any()  # the latent path alone does not keep them
    assert (edited != original).any()  # inside the mask the edit shows
    assert pasted.settings["paste_unedited"] is True
    assert plain.settings["self"] == 0.5  # real images: the null-text notebook's self-attention window
    with pytest.raises(AttnkitError, match="blend"):
        edit_image(sd_v, inv, target, paste_unedited=True, maps=False, progress=False)
    late = edit_image(sd_v, inv, target, paste_unedited=True, **{**options, "blend_start": 1.0})
    assert late.blend_masks is not None  # the mask is known even where latent blending never started


def test_regeneration_needs_a_ddim_scheduler(picture):
    pipe = tiny_pipeline("sd")
    inv = invert(pipe, picture, PROMPT, method="ddim", steps=3, progress=False)
    pipe.scheduler = PNDMScheduler.from_config(pipe.scheduler.config)
    with pytest.raises(AttnkitError, match="use_ddim"):
        generate_from(pipe, inv, progress=False)


# -- files -------------------------------------------------------------------------------------------------
def test_save_load_round_trip(sd_v, tmp_path):
    rgba = Image.fromarray((np.random.default_rng(4).random((40, 48, 4)) * 255).astype(np.uint8), "RGBA")
    inv = invert(sd_v, rgba, PROMPT, method="null-text", steps=3, guidance=3.0,
                 null_text=NullTextOptions(inner_steps=2), progress=False)
    folder = inv.save(tmp_path / "inv")
    record = json.loads((folder / "inversion.json").read_text())
    assert record["crop"] == {"original_size": [48, 40], "box": [4, 0, 44, 40], "size": [32, 32],
                              "mode": "center", "original_mode": "RGBA"}
    loaded = Inversion.load(folder)
    assert torch.equal(loaded.latents, inv.latents)
    assert torch.equal(loaded.uncond_embeddings, inv.uncond_embeddings)
    assert (loaded.method, loaded.prompt, loaded.guidance, loaded.timesteps, loaded.crop, loaded.inner_steps) == \
        (inv.method, inv.prompt, inv.guidance, inv.timesteps, inv.crop, inv.inner_steps)
    assert np.array_equal(np.asarray(loaded.image), np.asarray(inv.image))
    assert torch.equal(generate_from(sd_v, loaded, progress=False).latents,
                       generate_from(sd_v, inv, progress=False).latents)
    with pytest.raises(AttnkitError, match="overwrite"):
        inv.save(folder)
    with pytest.raises(AttnkitError, match="not an attnkit inversion"):
        Inversion.load(tmp_path)


def test_failed_save_leaves_nothing(sd_v, tmp_path):
    trajectory = ddim_invert(sd_v, _unit_latents(), PROMPT, steps=2, progress=False)
    broken = _record(sd_v, trajectory, image="not an image")  # image.save fails after the tensors are written
    with pytest.raises(AttributeError):
        broken.save(tmp_path / "out")
    assert list(tmp_path.iterdir()) == []


# -- bad input ---------------------------------------------------------------------------------------------
def test_bad_inputs_raise_clear_errors(sd_v, tmp_path):
    text_file = tmp_path / "notes.png"
    text_file.write_text("not an image")
    truncated = tmp_path / "cut.png"
    Image.new("RGB", (32, 32), "red").save(truncated)
    truncated.write_bytes(truncated.read_bytes()[:60])
    cases = [(text_file, PROMPT, "not an image"), (tmp_path / "missing.png", PROMPT, "does not exist"),
             (truncated, PROMPT, "cannot read image"), (Image.new("RGB", (3, 3)), PROMPT, "at least"),
             (Image.new("RGB", (32, 32)), "red " * 80, "tokens long"), (42, PROMPT, "cannot read an image")]
    for image, prompt, message in cases:
        with pytest.raises(AttnkitError, match=message):
            invert(sd_v, image, prompt, method="ddim", steps=2, progress=False)
    with pytest.raises(AttnkitError, match="unknown inversion method"):
        invert(sd_v, Image.new("RGB", (32, 32)), PROMPT, method="edict", progress=False)  # type: ignore[arg-type]


@pytest.mark.parametrize("mode", ["RGBA", "L", "LA", "P"])
def test_other_image_modes_are_inverted(sd_v, mode):
    image = Image.new("RGB", (32, 32), "blue").convert(mode)
    inv = invert(sd_v, image, PROMPT, method="ddim", steps=2, progress=False)
    assert inv.crop.original_mode == mode and inv.image.mode == "RGB"


def test_cli_invert_writes_everything_or_nothing(tmp_path):
    from typer.testing import CliRunner

    from attnkit.cli import app

    image = tmp_path / "in.png"
    Image.fromarray((np.random.default_rng(5).random((32, 32, 3)) * 255).astype(np.uint8)).save(image)
    runner = CliRunner()
    bad = runner.invoke(app, ["invert", str(tmp_path / "nope.png"), "--prompt", PROMPT, "--model", "tiny",
                              "--out", str(tmp_path / "bad"), "--quiet", "--threads", "1"])
    assert bad.exit_code == 2 and "does not exist" in bad.output
    assert not (tmp_path / "bad").exists()
    long = runner.invoke(app, ["invert", str(image), "--prompt", "red " * 80, "--model", "tiny",
                               "--out", str(tmp_path / "long"), "--quiet", "--threads", "1"])
    assert long.exit_code == 2 and not (tmp_path / "long").exists()
    good = runner.invoke(app, ["invert", str(image), "--prompt", PROMPT, "--model", "tiny", "--steps", "2",
                               "--inner-steps", "1", "--lr", "0.05", "--out", str(tmp_path / "good"), "--quiet",
                               "--threads", "1"])
    assert good.exit_code == 0, good.output
    record = json.loads((tmp_path / "good" / "record.json").read_text())
    assert record["method"] == "null-text" and record["inner_steps"] == [1, 1]
    assert record["null_text"]["lr"] == 0.05 and record["psnr_reconstruction"] > 0
    assert Inversion.load(tmp_path / "good").steps == 2

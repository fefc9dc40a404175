"""attnkit.transfer and the edit-friendly DDPM inversion under it, on tiny random pipelines."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

import attnkit
from attnkit.controllers.cross_image import CrossImageAttention, guide, masked_adain, swap_guidance_scales
from attnkit.ddpm_inversion import (
    Trajectory,
    ddpm_generate,
    ddpm_invert,
    ddpm_sample_latents,
    ddpm_step,
    from_inversion,
)
from attnkit.engine import AttnkitError, Controller, Layout, control
from attnkit.inversion import _guided, ddim_scheduler, encode_text
from attnkit.testing import tiny_pipeline
from attnkit.transfer import _unet, input_kind, object_words, segment_mask, transfer

STEPS = 6  # skip 0.32 -> 1 skipped, 5 denoised


@pytest.fixture(scope="module")
def pipe():
    return tiny_pipeline("sd")


def _picture(seed: int, size: tuple[int, int]) -> Image.Image:
    rng = np.random.default_rng(seed)
    return Image.fromarray((rng.random((size[1], size[0], 3)) * 255).astype(np.uint8))


@pytest.fixture(scope="module")
def trajectories(pipe):
    structure = ddpm_invert(pipe, _picture(0, (32, 40)), "a red circle", steps=STEPS, progress=False)
    appearance = ddpm_invert(pipe, _picture(1, (48, 32)), "a red circle", steps=STEPS, seed=1, progress=False)
    return structure, appearance


# -- the DDPM step and inversion -------------------------------------------------------------------------------------
@pytest.mark.parametrize("prediction", ["epsilon", "v_prediction"])
def test_ddpm_step_matches_diffusers_ddim_step_with_eta_1(pipe, prediction):
    from diffusers import DDIMScheduler

    scheduler = DDIMScheduler.from_config(pipe.scheduler.config, prediction_type=prediction)
    scheduler.set_timesteps(10)
    g = torch.Generator().manual_seed(0)
    x, out, z = (torch.randn(1, 4, 8, 8, generator=g) for _ in range(3))
    for t in scheduler.timesteps.tolist()[:-1]:
        expected = scheduler.step(out, t, x, eta=1.0, variance_noise=z).prev_sample
        assert torch.allclose(ddpm_step(scheduler, out, t, x, 1.0, z), expected, atol=1e-5)
        deterministic = scheduler.step(out, t, x, eta=0.0).prev_sample
        assert torch.allclose(ddpm_step(scheduler, out, t, x, 0.0), deterministic, atol=1e-5)


def test_edit_friendly_noise_retraces_every_step(pipe, trajectories):
    traj = trajectories[0]
    assert traj.latents.shape == (STEPS + 1, 4, 16, 16) and traj.noises.shape == (STEPS, 4, 16, 16)
    assert torch.count_nonzero(traj.noises[-1]) == 0  # the official code zeroes the last step's noise
    scheduler = ddim_scheduler(pipe, STEPS)
    text = encode_text(pipe, traj.prompt, 32, 32)
    for i, t in enumerate(traj.timesteps[:-1]):
        out = _guided(pipe, text, traj.latents[i : i + 1], t, traj.guidance, text.uncond, text.uncond_pooled)
        step = ddpm_step(scheduler, out, t, traj.latents[i : i + 1], 1.0, traj.noises[i : i + 1])
        assert torch.allclose(step, traj.latents[i + 1 : i + 2], atol=1e-4)
    # x_t are independent draws around x_0: the noisiest is nearly pure noise
    alpha = scheduler.alphas_cumprod[traj.timesteps[0]]
    assert torch.allclose(traj.latents[0] - alpha.sqrt() * traj.latents[-1], traj.latents[0], atol=0.5)


def test_generated_trajectory_is_exact_and_decodes_to_its_image(pipe):
    gen = ddpm_generate(pipe, "a blue square", steps=4, guidance=2.0, seed=3, progress=False)
    assert gen.method == "generated" and gen.image.size == (32, 32)
    again = ddpm_sample_latents(pipe, gen, progress=False)
    assert torch.allclose(again, gen.latents[-1:], atol=1e-5)
    other = ddpm_generate(pipe, "a blue square", steps=4, guidance=2.0, seed=4, progress=False)
    assert not torch.allclose(other.latents[-1], gen.latents[-1])


def test_ddim_inversion_becomes_a_noise_free_trajectory(pipe):
    inv = attnkit.invert(pipe, _picture(2, (32, 32)), "a red circle", method="ddim", steps=4, progress=False)
    traj = from_inversion(inv)
    assert traj.eta == 0 and torch.count_nonzero(traj.noises) == 0
    assert torch.equal(traj.latents[0], inv.latents[-1].float()) and torch.equal(traj.latents[-1], inv.latents[0])


# -- the method --------------------------------------------------------------------------------------------------------
def test_transfer_of_two_images_of_different_sizes(pipe):
    result = transfer(pipe, structure=_picture(0, (32, 40)), appearance=_picture(1, (48, 32)), prompt="a red circle",
                      steps=STEPS, masks="attention", progress=False)
    assert result.image.size == result.structure.size == result.appearance.size == (32, 32)
    assert result.images == [result.image, result.appearance, result.structure]
    assert result.settings["rows"] == ["output", "appearance", "structure", "output_plain"]
    assert result.settings["kinds"] == {"structure": "image", "appearance": "image"}
    assert result.settings["swapped_calls"] > 0 and result.settings["skip"] == 1
    assert result.settings["inversion_guidance"] == 3.5  # the paper's, where the model sets none
    assert {t.guidance for t in result.trajectories.values()} == {3.5}


def test_a_models_own_ddpm_inversion_guidance_is_the_default(tmp_path):
    import json

    from attnkit.transfer import ddpm_inversion_guidance

    model = tiny_pipeline("sd")
    (tmp_path / "attnkit.json").write_text(json.dumps({"ddpm_inversion_guidance": 1.0}))
    model._attnkit_folder = str(tmp_path)
    assert ddpm_inversion_guidance(model) == 1.0
    result = transfer(model, structure=_picture(0, (32, 32)), appearance=_picture(1, (32, 32)), prompt="a red circle",
                      steps=STEPS, masks=None, progress=False)
    assert result.settings["inversion_guidance"] == 1.0
    assert {t.guidance for t in result.trajectories.values()} == {1.0}
    given = transfer(model, structure=result.trajectories["structure"], appearance=_picture(1, (32, 32)),
                     prompt="a red circle", steps=STEPS, masks=None, inversion_guidance=2.0, progress=False)
    assert given.trajectories["appearance"].guidance == 2.0  # an explicit value wins
    assert result.strip().size == (96, 32)
    assert set(result.record()["inputs"]) == {"structure", "appearance"}


def _oracle(pipe, s, a, prompt, skip, masks):
    """The official two-pass loop written out: a 3-row swap pass and a 3-row stock pass per step, swap guidance
    on the output, DDPM steps with each row's noise, masked AdaIN from the window's start."""
    scheduler = ddim_scheduler(pipe, s.steps)
    texts = [encode_text(pipe, p, 32, 32) for p in (prompt, a.prompt, s.prompt)]
    x = torch.cat([s.start(skip), a.start(skip), s.start(skip)])
    loop = s.steps - skip
    scales = swap_guidance_scales(3.5, loop)
    swap = CrossImageAttention()
    for i, t in enumerate(s.timesteps[skip:]):
        with control(pipe, swap, layout=Layout(prompts=3, cfg=False)) as ctl:
            ctl.set_step(i, loop)
            eps_swap = _unet(pipe, x, t, texts)
        eps_plain = _unet(pipe, x, t, texts)
        eps = eps_swap.clone()
        if i >= int(10 / 68 * loop + 1e-9):
            eps[0] = guide(eps_swap[0], eps_plain[0], scales[i])
        assert torch.allclose(eps_swap[1:], eps_plain[1:], atol=1e-5)  # the two passes agree on the inputs
        noises = [s, a, s]
        x = torch.cat([ddpm_step(scheduler, eps[r : r + 1], t, x[r : r + 1], 1.0,
                                 noises[r].noises[skip + i : skip + i + 1]) for r in range(3)])
        if i >= int(20 / 68 * loop + 1e-9):
            x[0] = masked_adain(x[0], x[1], masks["structure"], masks["appearance"])
    return x


def test_four_row_batch_equals_the_official_two_pass_loop(pipe, trajectories):
    s, a = trajectories
    steps = STEPS
    masks = {"structure": (torch.arange(256).view(16, 16) % 3 == 0).float(),
             "appearance": (torch.arange(256).view(16, 16) % 2 == 0).float()}
    result = transfer(pipe, structure=s, appearance=a, prompt="a blue square", steps=steps, masks=masks,
                      progress=False)
    expected = _oracle(pipe, s, a, "a blue square", result.settings["skip"], masks)
    assert torch.allclose(result.latents, expected, atol=1e-4)


def test_input_rows_are_their_own_sampling_and_the_output_without_swap_is_the_prompt(pipe, trajectories):
    s, a = trajectories
    result = transfer(pipe, structure=s, appearance=a, prompt="a blue square", steps=STEPS, masks=None,
                      progress=False)
    skip = result.settings["skip"]
    for row, traj in ((1, a), (2, s)):  # guidance 1, own prompt, own noise: untouched by the swap
        alone = ddpm_sample_latents(pipe, traj, guidance=1.0, skip=skip, progress=False)
        assert torch.allclose(result.latents[row : row + 1], alone, atol=1e-4)
    never = transfer(pipe, structure=s, appearance=a, prompt="a blue square", steps=STEPS, progress=False,
                     grid_steps=((0, 0), (0, 0)), swap_guidance=None, adain=False)
    assert never.settings["swapped_calls"] == 0 and never.settings["rows"] == ["output", "appearance", "structure"]
    noswap = ddpm_sample_latents(pipe, s, "a blue square", guidance=1.0, skip=skip, progress=False)
    assert torch.allclose(never.latents[:1], noswap, atol=1e-4)
    assert not torch.allclose(result.latents[:1], noswap, atol=1e-3)


def test_following_the_inputs_keeps_them_exact(pipe, trajectories):
    s, a = trajectories
    result = transfer(pipe, structure=s, appearance=a, prompt="a red circle", steps=STEPS, follow_inputs=True,
                      masks=None, progress=False)
    assert torch.equal(result.latents[1], a.latents[-1]) and torch.equal(result.latents[2], s.latents[-1])


def test_prompt_inputs_are_generated_not_inverted(pipe):
    result = transfer(pipe, structure="a red circle", appearance="a blue square", prompt="a circle", steps=4,
                      masks=None, progress=False)
    assert result.settings["kinds"] == {"structure": "prompt", "appearance": "prompt"}
    assert result.settings["follow_inputs"] == {"structure": True, "appearance": True}
    assert result.trajectories["structure"].method == "generated"
    assert np.array_equal(np.asarray(result.structure), np.asarray(result.inputs["structure"]))
    assert np.array_equal(np.asarray(result.appearance), np.asarray(result.inputs["appearance"]))
    assert transfer(pipe, structure="a red circle", appearance="a blue square", steps=4, progress=False,
                    masks=None).prompt == "a red circle"  # the structure's prompt by default


def test_ddim_inversion_option(pipe):
    result = transfer(pipe, structure=_picture(0, (32, 32)), appearance=_picture(1, (32, 32)), prompt="a red circle",
                      steps=4, inversion="ddim", masks=None, progress=False)
    assert result.trajectories["structure"].method == "ddim" and result.settings["inversion"] == "ddim"


def test_sdxl(pipe):
    xl = tiny_pipeline("sdxl")
    result = transfer(xl, structure="a red circle", appearance=_picture(1, (32, 32)), prompt="a circle", steps=4,
                      masks="attention", progress=False)
    assert result.image.size == (32, 32) and result.settings["swapped_calls"] > 0


class Recorder(Controller):
    def __init__(self):
        self.rows = set()

    def observe(self, call):
        self.rows.add(call.query.shape[0])


def test_other_controllers_compose(pipe, trajectories):
    store, recorder = attnkit.AttentionStore(res=None), Recorder()
    transfer(pipe, structure=trajectories[0], appearance=trajectories[1], prompt="a red circle", steps=STEPS,
             controllers=[store, recorder], masks=None, progress=False)
    assert recorder.rows == {4}
    assert store.maps("cross").shape[0] == 4  # every row of [output, appearance, structure, output_plain]


class Boom(Controller):
    def edit_qkv(self, call):
        if call.step == 2:
            raise RuntimeError("boom")


def test_hooks_are_removed_after_an_exception(pipe, trajectories):
    saved = dict(pipe.unet.attn_processors)
    with pytest.raises(RuntimeError, match="boom"):
        transfer(pipe, structure=trajectories[0], appearance=trajectories[1], prompt="a red circle", steps=STEPS,
                 controllers=[Boom()], masks=None, progress=False)
    assert dict(pipe.unet.attn_processors) == saved
    assert not pipe.unet._forward_pre_hooks


# -- masks -------------------------------------------------------------------------------------------------------------
def test_object_words():
    assert object_words("a circle and an outlined square") == ["circle", "outlined", "square"]
    assert object_words("a red circle on a white background") == ["red", "circle"]
    assert object_words("a photo of a zebra", ["zebra", "horse"]) == ["zebra"]


def test_attention_masks_are_binary_latent_grids(pipe, trajectories):
    result = transfer(pipe, structure=trajectories[0], appearance=trajectories[1], prompt="a red circle",
                      steps=STEPS, masks="attention", progress=False)
    for mask in result.masks.values():
        assert mask.shape == (16, 16) and set(mask.unique().tolist()) <= {0.0, 1.0}
    assert result.settings["masks"] == "attention"


def test_segment_masks_go_through_attnkit_segment(pipe, trajectories, monkeypatch):
    import attnkit.transfer as module

    calls = []

    class Seg:
        label_map = np.zeros((32, 32), np.int64)
        label_map[:16] = 1
        segments = [type("S", (), {"index": 0, "is_background": True})(),
                    type("S", (), {"index": 1, "is_background": False})()]

    def fake(pipe, prompt, image, words, progress):
        calls.append((prompt, words))
        return Seg()

    monkeypatch.setattr(module, "_segment_function", lambda: fake)
    mask = segment_mask(pipe, trajectories[0], ["circle"], 0)
    assert calls == [("a red circle", ["circle"])]
    assert torch.equal(mask[:8], torch.ones(8, 16)) and torch.equal(mask[8:], torch.zeros(8, 16))


# -- bad input ---------------------------------------------------------------------------------------------------------
def test_bad_inputs_fail_clearly_before_any_work(pipe, tmp_path, trajectories):
    saved = dict(pipe.unet.attn_processors)
    broken = tmp_path / "broken.png"
    broken.write_bytes(b"not a png")
    with pytest.raises(AttnkitError, match="not an image"):
        transfer(pipe, structure=str(broken), appearance="a red circle", prompt="a circle", steps=4)
    with pytest.raises(AttnkitError, match="does not exist"):
        transfer(pipe, structure=str(tmp_path / "missing.png"), appearance="a red circle", prompt="a circle")
    with pytest.raises(AttnkitError, match="too long|tokens"):
        transfer(pipe, structure="a red circle", appearance="a blue square", prompt="a red circle " * 40, steps=4)
    with pytest.raises(AttnkitError, match="prompt is missing"):
        transfer(pipe, structure=_picture(0, (32, 32)), appearance="a blue square", steps=4)
    with pytest.raises(AttnkitError, match="skip"):
        transfer(pipe, structure="a red circle", appearance="a blue square", steps=4, skip=4)
    with pytest.raises(AttnkitError, match="inverted with 6 steps"):
        transfer(pipe, structure=trajectories[0], appearance=trajectories[1], steps=8)
    with pytest.raises(AttnkitError, match="masks"):
        transfer(pipe, structure="a red circle", appearance="a blue square", steps=4, masks="magic")
    with pytest.raises(AttnkitError, match="inversion"):
        transfer(pipe, structure="a red circle", appearance="a blue square", steps=4, inversion="null-text")
    with pytest.raises(AttnkitError, match="swap_guidance"):
        transfer(pipe, structure="a red circle", appearance="a blue square", steps=4, swap_guidance=0.5)
    with pytest.raises(AttnkitError, match="cannot use a"):
        transfer(pipe, structure=3, appearance="a blue square", steps=4)
    with pytest.raises(AttnkitError, match="appearance_prompt"):
        transfer(pipe, structure="a red circle", appearance="a blue square", appearance_prompt="a square", steps=4)
    assert dict(pipe.unet.attn_processors) == saved


def test_input_kinds(tmp_path, trajectories):
    path = tmp_path / "x.png"
    _picture(0, (8, 8)).save(path)
    assert input_kind(str(path)) == "image" and input_kind(path) == "image"
    assert input_kind("missing/x.jpg") == "image"  # looks like a path: an image (and a clear error later)
    assert input_kind("a red circle") == "prompt"
    assert input_kind(trajectories[0]) == "trajectory" and isinstance(trajectories[0], Trajectory)


def test_attnkit_transfer_is_callable_even_after_importing_the_module(pipe):
    import attnkit.transfer as module

    assert callable(module) and callable(attnkit.transfer)
    with pytest.raises(AttnkitError, match="cannot use a"):
        module(pipe, structure=None, appearance="a blue square", steps=4)


@pytest.mark.parametrize("imports", [
    "import attnkit; import attnkit.cli; import attnkit.controllers",
    "from attnkit.transfer import TransferResult; import attnkit",
    "import attnkit; import attnkit.transfer as module; assert module.TransferResult",
])
def test_attnkit_transfer_in_a_fresh_interpreter(imports):
    """Before: a submodule import bound the module ``attnkit.transfer`` over the function, and
    ``attnkit.transfer(pipe, ...)`` raised "'module' object is not callable". Now it calls the function (with its
    signature) whatever was imported first."""
    import os
    import subprocess
    import sys

    code = (f"{imports}\nimport inspect\nfrom attnkit import AttnkitError\n"
            "from attnkit.transfer import transfer\n"
            "print(inspect.signature(attnkit.transfer) == inspect.signature(transfer))\n"
            "try:\n    attnkit.transfer(None, structure=None, appearance='a blue square', steps=4)\n"
            "except AttnkitError as e:\n    print('refused:', e)\n")
    run = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120,
                         env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert run.returncode == 0, run.stderr
    lines = run.stdout.strip().splitlines()
    assert lines[0] == "True" and lines[1].startswith("refused: cannot use a NoneType")

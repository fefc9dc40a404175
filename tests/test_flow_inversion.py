"""Rectified-flow inversion: the solvers on known ODEs, the pipeline velocity against the pipeline's own loop,
evaluation counts, edits, hooks removed, bad input."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from PIL import Image

import attnkit
from attnkit.adapters.flux import pack, unpack
from attnkit.engine import AttnkitError, Controller
from attnkit.flow_inversion import (
    FlowInversion,
    evaluations_for,
    rf_edit,
    rf_generate,
    rf_invert,
    rf_reconstruct,
    schedule,
    solve,
    steps_for,
)
from attnkit.inversion import encode_image
from attnkit.testing import tiny_pipeline

torch.set_num_threads(1)
PROMPT = "a red circle on a white background"


@pytest.fixture(scope="module")
def pipes():
    return {"sd3": tiny_pipeline("sd3"), "flux": tiny_pipeline("flux")}


@pytest.fixture(scope="module")
def picture() -> Image.Image:
    rng = np.random.default_rng(0)
    return Image.fromarray((rng.random((32, 32, 3)) * 255).astype(np.uint8))


# -- solvers on known ODEs ------------------------------------------------------------------------------------
def _linear(x: torch.Tensor, sigma: float) -> torch.Tensor:
    return -1.5 * x + sigma  # dx/dσ = −1.5x + σ: exact solution below


def _exact(x0: torch.Tensor, s0: float, s1: float) -> torch.Tensor:
    # x(σ) = σ/1.5 − 1/1.5² + C·e^{−1.5σ}
    c = (x0 - s0 / 1.5 + 1 / 1.5**2) * math.exp(1.5 * s0)
    return s1 / 1.5 - 1 / 1.5**2 + c * math.exp(-1.5 * s1)


@pytest.mark.parametrize("direction", ["invert", "sample"])
def test_second_order_beats_euler_at_equal_evaluations(direction):
    x0 = torch.tensor([1.0, -2.0, 0.5], dtype=torch.float64)
    budget = 12
    errors = {}
    for solver in ("euler", "rf-solver", "fireflow"):
        steps = steps_for(solver, budget)
        sigmas = np.linspace(0.0, 1.0, steps + 1)
        if direction == "sample":
            sigmas = sigmas[::-1]
        calls = []

        def velocity(x, s, calls=calls):
            calls.append(s)
            return _linear(x, s)

        x1, path = solve(velocity, x0, sigmas, solver)
        assert len(calls) == budget == evaluations_for(solver, steps)
        assert len(path) == steps + 1 and torch.equal(path[0], x0) and torch.equal(path[-1], x1)
        errors[solver] = float((x1 - _exact(x0, sigmas[0], sigmas[-1])).abs().max())
    assert errors["rf-solver"] < errors["euler"] / 5
    assert errors["fireflow"] < errors["euler"] / 3


def test_second_order_solvers_are_exact_for_a_velocity_linear_in_sigma():
    x0 = torch.zeros(2, dtype=torch.float64)
    velocity = lambda x, s: torch.full_like(x, 2.0) + 3.0 * s  # noqa: E731  x(1) = 2 + 1.5 exactly
    for solver, exact in (("euler", False), ("rf-solver", True), ("fireflow", True)):
        x1, _ = solve(velocity, x0, [0.0, 0.3, 0.7, 1.0], solver)
        error = float((x1 - 3.5).abs().max())
        assert (error < 1e-12) == exact, (solver, error)


def test_euler_inversion_then_euler_sampling_with_the_same_velocities_is_exact():
    """The inversion's own velocities replayed backwards retrace it: Euler's bookkeeping is exact; with fresh
    velocities at the sampling points the round trip converges as the steps grow."""
    x0 = torch.tensor([0.3, -1.0], dtype=torch.float64)
    sigmas = np.linspace(0.0, 1.0, 9)
    seen = []

    def recording(x, s):
        seen.append(_linear(x, s))
        return seen[-1]

    noise, _ = solve(recording, x0, sigmas, "euler")
    replay = iter(reversed(seen))
    back, _ = solve(lambda x, s: next(replay), noise, sigmas[::-1], "euler")
    assert float((back - x0).abs().max()) < 1e-12

    def round_trip(steps):
        grid = np.linspace(0.0, 1.0, steps + 1)
        z, _ = solve(_linear, x0, grid, "euler")
        x, _ = solve(_linear, z, grid[::-1], "euler")
        return float((x - x0).abs().max())

    assert round_trip(80) < round_trip(8) / 5


def test_step_counts_for_a_budget():
    assert [steps_for(s, 8) for s in ("euler", "rf-solver", "fireflow")] == [8, 4, 7]
    with pytest.raises(AttnkitError, match="cannot spend exactly 7"):
        steps_for("rf-solver", 7)
    with pytest.raises(AttnkitError, match="unknown solver 'heun'"):
        solve(_linear, torch.zeros(1), [0.0, 1.0], "heun")


# -- the pipeline velocity -------------------------------------------------------------------------------------
@pytest.mark.parametrize("kind", ["sd3", "flux"])
def test_euler_regeneration_equals_the_pipelines_own_loop(pipes, picture, kind):
    pipe = pipes[kind]
    inv = rf_invert(pipe, picture, PROMPT, steps=3, solver="euler", progress=False)
    start = pack(inv.noise) if kind == "flux" else inv.noise
    theirs = pipe(PROMPT, num_inference_steps=3, guidance_scale=inv.guidance, height=32, width=32, latents=start,
                  output_type="latent").images
    if kind == "flux":
        theirs = unpack(theirs, (8, 8))
    mine = rf_reconstruct(pipe, inv, progress=False).latents
    assert float((mine - theirs).abs().max()) <= 1e-5
    # the schedule is the pipeline's own, from 1 to 0, and the inversion walks it backwards from the image
    assert schedule(pipe, 3, 32, 32) == inv.sigmas and inv.sigmas[0] == 1.0 and inv.sigmas[-1] == 0.0
    assert torch.allclose(inv.latents[:1], encode_image(pipe, picture).cpu())


def test_guided_sd3_velocity_matches_the_pipeline(pipes, picture):
    """Guidance above 1 runs classifier-free guidance as StableDiffusion3Pipeline does ([negative, positive])."""
    pipe = pipes["sd3"]
    inv = rf_invert(pipe, picture, PROMPT, steps=2, solver="euler", guidance=4.0, progress=False)
    theirs = pipe(PROMPT, num_inference_steps=2, guidance_scale=4.0, height=32, width=32, latents=inv.noise,
                  output_type="latent").images
    mine = rf_reconstruct(pipe, inv, progress=False).latents
    assert float((mine - theirs).abs().max()) <= 1e-5


@pytest.mark.parametrize("solver", ["euler", "rf-solver", "fireflow"])
def test_inversion_counts_evaluations(pipes, picture, solver):
    pipe = pipes["flux"]
    inv = rf_invert(pipe, picture, PROMPT, steps=3, solver=solver, progress=False)
    assert inv.evaluations == evaluations_for(solver, 3)
    assert inv.latents.shape == (4, 4, 16, 16) and inv.steps == 3
    rec = rf_reconstruct(pipe, inv, progress=False)
    assert rec.evaluations == evaluations_for(solver, 3)
    assert rec.images[0].size == (32, 32)
    assert inv.record()["solver"] == solver


def _processors(pipe):
    return {k: type(v) for k, v in pipe.transformer.attn_processors.items()}, dict(pipe.transformer.attn_processors)


def test_edit_follows_the_source_and_composes_with_controllers(pipes, picture):
    pipe = pipes["sd3"]
    before = dict(pipe.transformer.attn_processors)
    inv = rf_invert(pipe, picture, PROMPT, steps=3, solver="fireflow", progress=False)
    store = attnkit.AttentionStore(res=None)
    out = rf_edit(pipe, inv, "a blue circle on a white background", store, progress=False)
    assert len(out.images) == 2 and out.prompts[1].startswith("a blue")
    # the source row was put back on the inversion after every step: it ends on the encoded image
    assert torch.equal(out.latents[:1], inv.latents[:1])
    assert not torch.equal(out.latents[1:], inv.latents[:1])
    assert store.word_map(out.prompts[1], "blue").shape == (8, 8)
    assert all(a is b for a, b in zip(pipe.transformer.attn_processors.values(), before.values(), strict=True))


class _Boom(Controller):
    def observe(self, call):
        raise RuntimeError("boom")


@pytest.mark.parametrize("kind", ["sd3", "flux"])
def test_hooks_removed_after_an_exception(pipes, picture, kind):
    pipe = pipes[kind]
    before = dict(pipe.transformer.attn_processors)
    hooks = len(pipe.transformer._forward_pre_hooks)
    with pytest.raises(RuntimeError, match="boom"):
        rf_invert(pipe, picture, PROMPT, steps=2, controllers=[_Boom()], progress=False)
    inv = rf_invert(pipe, picture, PROMPT, steps=2, progress=False)
    with pytest.raises(RuntimeError, match="boom"):
        rf_edit(pipe, inv, "a blue circle", _Boom(), progress=False)
    after = pipe.transformer.attn_processors
    assert all(a is b for a, b in zip(after.values(), before.values(), strict=True))
    assert len(pipe.transformer._forward_pre_hooks) == hooks


def test_unet_pipelines_are_pointed_to_ddim_inversion(picture):
    with pytest.raises(AttnkitError, match=r"UNet diffusion pipeline: invert it with attnkit\.invert"):
        rf_invert(tiny_pipeline("sd"), picture, PROMPT, steps=2)


def test_bad_input(pipes, picture):
    pipe = pipes["sd3"]
    with pytest.raises(AttnkitError, match="unknown solver"):
        rf_invert(pipe, picture, PROMPT, solver="rk4")
    with pytest.raises(AttnkitError, match="steps=0"):
        rf_invert(pipe, picture, PROMPT, steps=0)
    with pytest.raises(AttnkitError, match="finite guidance"):
        rf_invert(pipe, picture, PROMPT, guidance=float("nan"))
    inv = rf_invert(pipe, picture, PROMPT, steps=1, progress=False)
    with pytest.raises(AttnkitError, match="no target prompt"):
        rf_edit(pipe, inv, [])
    with pytest.raises(AttnkitError, match="FlowInversion"):
        rf_generate(pipe, object())
    with pytest.raises(AttnkitError, match="latent channels"):
        rf_generate(pipes["flux"], type(inv)(**{**inv.__dict__, "latents": torch.zeros(2, 3, 16, 16)}))


def test_save_and_load_round_trip(pipes, picture, tmp_path):
    pipe = pipes["flux"]
    inv = rf_invert(pipe, picture, PROMPT, steps=2, solver="rf-solver", progress=False)
    inv.save(tmp_path / "inv")
    with pytest.raises(AttnkitError, match="already holds an inversion"):
        inv.save(tmp_path / "inv")
    back = FlowInversion.load(tmp_path / "inv")
    assert torch.equal(back.latents, inv.latents) and back.sigmas == inv.sigmas and back.solver == "rf-solver"
    assert back.crop == inv.crop and back.evaluations == inv.evaluations and back.image.size == inv.image.size
    assert torch.equal(rf_reconstruct(pipe, back, progress=False).latents,
                       rf_reconstruct(pipe, inv, progress=False).latents)
    with pytest.raises(AttnkitError, match="not an attnkit inversion folder"):
        FlowInversion.load(tmp_path)

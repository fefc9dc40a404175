"""FlowEdit on tiny MM-DiT pipelines: the update rule against an explicit oracle, defaults, bad input."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

from attnkit.engine import AttnkitError
from attnkit.flow_edit import flow_edit, paper_n_max
from attnkit.flow_inversion import FlowVelocity, schedule
from attnkit.inversion import encode_image
from attnkit.testing import tiny_pipeline

torch.set_num_threads(1)
SOURCE, TARGET = "a red circle on a white background", "a blue circle on a white background"


@pytest.fixture(scope="module")
def pipes():
    return {"sd3": tiny_pipeline("sd3"), "flux": tiny_pipeline("flux")}


@pytest.fixture(scope="module")
def picture() -> Image.Image:
    rng = np.random.default_rng(1)
    return Image.fromarray((rng.random((32, 32, 3)) * 255).astype(np.uint8))


@pytest.mark.parametrize("kind", ["sd3", "flux"])
def test_same_prompt_and_guidance_leaves_the_image_alone(pipes, picture, kind):
    """z_tar = z_src while the edit has not moved, so v_tar − v_src = 0 at every step: the source comes back."""
    pipe = pipes[kind]
    out = flow_edit(pipe, picture, SOURCE, SOURCE, steps=4, source_guidance=2.0, target_guidance=2.0,
                    progress=False)
    assert torch.allclose(out.latents, encode_image(pipe, picture).cpu(), atol=1e-6)


@pytest.mark.parametrize("kind", ["sd3", "flux"])
def test_update_matches_an_explicit_oracle(pipes, picture, kind):
    pipe = pipes[kind]
    steps, n_max, seed = 4, 3, 5
    out = flow_edit(pipe, picture, SOURCE, TARGET, steps=steps, n_max=n_max, source_guidance=1.5,
                    target_guidance=3.0, seed=seed, progress=False)
    # the paper's loop written out: fresh noise per step from one CPU generator
    sigmas = schedule(pipe, steps, 32, 32)
    src = FlowVelocity(pipe, [SOURCE], 1.5, 32, 32)
    tar = FlowVelocity(pipe, [TARGET], 3.0, 32, 32)
    x_src = encode_image(pipe, picture)
    z = x_src.clone()
    generator = torch.Generator("cpu").manual_seed(seed)
    for i in range(steps - n_max, steps):
        noise = torch.randn(x_src.shape, generator=generator)
        z_src = (1 - sigmas[i]) * x_src + sigmas[i] * noise
        z_tar = z + z_src - x_src
        z = z + (sigmas[i + 1] - sigmas[i]) * (tar(z_tar, sigmas[i]) - src(z_src, sigmas[i]))
    assert torch.allclose(out.latents, z, atol=1e-4)
    assert out.evaluations == n_max  # one transformer pass (source and target rows together) per step
    assert out.image.size == (32, 32) and out.settings["n_max"] == n_max


def test_n_min_ends_with_plain_target_sampling(pipes, picture):
    pipe = pipes["flux"]
    out = flow_edit(pipe, picture, SOURCE, TARGET, steps=4, n_max=3, n_min=1, progress=False)
    assert out.evaluations == 3 and out.record()["n_min"] == 1


def test_paper_defaults_carry_over_to_the_step_count():
    assert paper_n_max("sd3", 50) == 33 and paper_n_max("flux", 28) == 24
    assert paper_n_max("sd3", 25) == 16 and paper_n_max("flux", 14) == 12 and paper_n_max("sd3", 1) == 1


def test_hooks_removed_and_bad_input(pipes, picture):
    pipe = pipes["sd3"]
    before = dict(pipe.transformer.attn_processors)
    with pytest.raises(AttnkitError, match="n_min=2 must be below n_max=2"):
        flow_edit(pipe, picture, SOURCE, TARGET, steps=4, n_max=2, n_min=2)
    with pytest.raises(AttnkitError, match="n_max=9"):
        flow_edit(pipe, picture, SOURCE, TARGET, steps=4, n_max=9)
    with pytest.raises(AttnkitError, match="n_avg"):
        flow_edit(pipe, picture, SOURCE, TARGET, steps=4, n_avg=0)
    with pytest.raises(AttnkitError, match="attnkit.invert"):
        flow_edit(tiny_pipeline("sd"), picture, SOURCE, TARGET)
    flow_edit(pipe, picture, SOURCE, TARGET, steps=2, progress=False)
    assert all(a is b for a, b in zip(pipe.transformer.attn_processors.values(), before.values(), strict=True))

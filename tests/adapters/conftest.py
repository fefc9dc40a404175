"""Tiny random MM-DiT pipelines (built once per session) and a sampling helper for the adapter tests."""

import pytest
import torch

from attnkit import control
from attnkit.testing import tiny_pipeline

PROMPTS = ["a red cat wearing sunglasses", "a blue circle"]


@pytest.fixture(scope="session")
def sd3_pipe():
    return tiny_pipeline("sd3")


@pytest.fixture(scope="session")
def flux_pipe():
    return tiny_pipeline("flux")


@pytest.fixture(params=["sd3", "flux"])
def mmdit(request, sd3_pipe, flux_pipe):
    """Each MM-DiT family in turn."""
    return sd3_pipe if request.param == "sd3" else flux_pipe


def sample(pipe, *controllers, steps=2, prompts=PROMPTS, output_type="np", **kwargs):
    """The pipeline's own call (fixed generator), inside attnkit.control when controllers are given."""
    generator = torch.Generator("cpu").manual_seed(0)
    call = dict(num_inference_steps=steps, generator=generator, output_type=output_type, **kwargs)
    if not controllers:
        return pipe(prompts, **call).images
    with control(pipe, *controllers) as ctl:
        return pipe(prompts, callback_on_step_end=ctl.callback, **call).images


@pytest.fixture
def run():
    return sample

"""A sampling helper for the adapter tests (the tiny MM-DiT pipelines are tests/conftest.py's)."""

import pytest
import torch

from attnkit import control

PROMPTS = ["a red cat wearing sunglasses", "a blue circle"]


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

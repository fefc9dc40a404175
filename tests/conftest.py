"""Shared test set-up: one torch thread (the CI machine has two cores; more threads thrash), and the tiny random
MM-DiT pipelines that the adapter, controller and method tests run on (built once per test module, so that a
module that leaves one modified cannot pass the change on)."""

import pytest
import torch

from attnkit.testing import tiny_pipeline

torch.set_num_threads(1)


@pytest.fixture(scope="module")
def sd3_pipe():
    return tiny_pipeline("sd3")


@pytest.fixture(scope="module")
def flux_pipe():
    return tiny_pipeline("flux")


@pytest.fixture(params=["sd3", "flux"])
def mmdit(request, sd3_pipe, flux_pipe):
    """Each MM-DiT family in turn."""
    return sd3_pipe if request.param == "sd3" else flux_pipe

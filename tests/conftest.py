"""Shared test set-up: one torch thread (the CI machine has two cores; more threads thrash)."""

import torch

torch.set_num_threads(1)

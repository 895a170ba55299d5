"""Test set-up: run the Triton kernels in the interpreter when there is no GPU, and poison outputs.

TRITON_INTERPRET must be set before any kernel module is imported, so it is set here, at collection.
"""
import os

import torch

if not torch.cuda.is_available():
    os.environ["TRITON_INTERPRET"] = "1"

import pytest  # noqa: E402

from nodeprune_kernels.utils.alloc import poisoned  # noqa: E402

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


@pytest.fixture(autouse=True)
def _poison_outputs():
    """Every kernel output starts NaN-filled, so unwritten elements fail the comparisons."""
    with poisoned():
        yield


@pytest.fixture
def device():
    return DEVICE

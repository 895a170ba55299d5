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


@pytest.fixture(params=["triton", "native"], ids=["triton", "native"])
def fused(request):
    """The fused backend a test runs: the Triton kernels (the interpreter without a GPU) or the native C++
    CPU kernels."""
    return request.param


@pytest.fixture
def device(request):
    """DEVICE, except "cpu" for a test on the native backend (CPU only): one that uses ``fused`` and has it
    "native", or one parametrized over ``backend`` with "native"."""
    for name in ("fused", "backend"):
        if name in request.fixturenames and request.getfixturevalue(name) == "native":
            return "cpu"
    return DEVICE

"""Shared test helpers."""
import torch

from nodeprune_kernels.utils.testing import TOL
from nodeprune_kernels.utils.testing import rel_err as _rel_err


def rel_err(out: torch.Tensor, ref: torch.Tensor) -> float:
    assert out.shape == ref.shape, (out.shape, ref.shape)
    assert torch.isfinite(out).all(), "non-finite values (an unwritten, NaN-poisoned element?)"
    return _rel_err(out, ref)


# A gate gradient is one reduction over every token and feature of its group, with cancellation: in fp32
# its relative error reaches a few 1e-5 for a single layer or block gate (seen: 3.4e-5 over 1296 terms).
GATE_GRAD_TOL = {**TOL, torch.float32: 1e-4}


def assert_close(out, ref, dtype, what="", tols=TOL):
    tol = tols.get(dtype, 1e-6)
    err = rel_err(out, ref)
    assert err <= tol, f"{what}: relative error {err:.3g} > {tol:g}"

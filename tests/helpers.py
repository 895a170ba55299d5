"""Shared test helpers."""
import torch

from nodeprune_kernels.utils.testing import TOL
from nodeprune_kernels.utils.testing import rel_err as _rel_err


def rel_err(out: torch.Tensor, ref: torch.Tensor) -> float:
    assert out.shape == ref.shape, (out.shape, ref.shape)
    assert torch.isfinite(out).all(), "non-finite values (an unwritten, NaN-poisoned element?)"
    return _rel_err(out, ref)


def assert_close(out, ref, dtype, what=""):
    tol = TOL.get(dtype, 1e-6)
    err = rel_err(out, ref)
    assert err <= tol, f"{what}: relative error {err:.3g} > {tol:g}"

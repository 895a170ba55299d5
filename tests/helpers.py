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


def to64(t):
    """A float64 detached copy (None stays None), for the references."""
    return None if t is None else t.detach().double()


def gates64(stack):
    """A gate stack with float64 leaf copies of its log_alphas."""
    from nodeprune_kernels import Gate

    return [Gate(to64(g.log_alpha).requires_grad_(), g.group, g.offset) for g in stack]


def assert_output_and_grads(y, y_ref, leaves, leaves64, dtype, names, y_eager=None):
    """y against its float64 reference, then the gradient of each leaf for one random dy.

    A gradient that is exactly zero in the reference (a gate clamped shut or open) must be exactly zero.
    ``y_eager``: the same op computed eagerly in ``dtype`` from the same leaves. When given, a gradient may
    also be as far from float64 as twice the eager one is: a gate gradient sums over every token and unit,
    and in 16-bit the rounding of intermediates (the MLP's pre-activations) is part of the op itself.
    """
    assert y.dtype == dtype and y.shape == y_ref.shape
    assert_close(y, y_ref, dtype, "output")
    dy = torch.randn_like(y)
    grads = torch.autograd.grad(y, leaves, dy)
    grads_ref = torch.autograd.grad(y_ref, leaves64, dy.double())
    grads_eager = torch.autograd.grad(y_eager, leaves, dy) if y_eager is not None else [None] * len(leaves)
    for name, g, g_ref, g_eager in zip(names, grads, grads_ref, grads_eager):
        assert g.shape == g_ref.shape, name
        if g_ref.abs().max() == 0:
            assert torch.all(g == 0), name
            continue
        tols = GATE_GRAD_TOL if "log_alpha" in name else TOL
        if g_eager is not None:
            tols = {dtype: max(tols[dtype], 2 * rel_err(g_eager, g_ref))}
        assert_close(g, g_ref, dtype, name, tols=tols)

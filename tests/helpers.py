"""Shared test helpers."""
import torch

# relative-norm tolerances against a float64 reference, by input dtype
TOL = {torch.float32: 2e-5, torch.float16: 3e-3, torch.bfloat16: 2e-2}


def rel_err(out: torch.Tensor, ref: torch.Tensor) -> float:
    out, ref = out.detach().double().cpu(), ref.detach().double().cpu()
    assert out.shape == ref.shape, (out.shape, ref.shape)
    assert torch.isfinite(out).all(), "non-finite values (an unwritten, NaN-poisoned element?)"
    return float((out - ref).norm() / ref.norm().clamp_min(1e-30))


def assert_close(out, ref, dtype, what=""):
    tol = TOL.get(dtype, 1e-6)
    err = rel_err(out, ref)
    assert err <= tol, f"{what}: relative error {err:.3g} > {tol:g}"

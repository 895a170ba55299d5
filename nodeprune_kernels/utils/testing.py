"""Comparison helpers shared by the test suite and the self-check."""
from __future__ import annotations

import torch

# relative-norm tolerances of a kernel against a float64 reference, by input dtype
TOL = {torch.float32: 2e-5, torch.float16: 3e-3, torch.bfloat16: 2e-2}


def rel_err(out: torch.Tensor, ref: torch.Tensor) -> float:
    """||out - ref|| / ||ref|| in float64; inf when ``out`` has a non-finite value (e.g. an unwritten,
    NaN-poisoned element)."""
    out, ref = out.detach().double().cpu(), ref.detach().double().cpu()
    if not torch.isfinite(out).all():
        return float("inf")
    return float((out - ref).norm() / ref.norm().clamp_min(1e-30))

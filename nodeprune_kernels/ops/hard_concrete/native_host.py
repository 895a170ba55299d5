"""Hard-concrete gates on the native CPU kernels (csrc/gates.cpp): the host wrappers the custom ops call."""
from __future__ import annotations

import torch

from ...utils import native
from ...utils.alloc import empty


def uniform(seed: int, offset: int, n: int, device) -> torch.Tensor:
    """The gate noise u of indices offset .. offset + n - 1 (float32), the same bits as the Triton kernel."""
    out = empty((n,), dtype=torch.float32, device=device)
    native.load().uniform(out, seed, offset)
    return out


def forward(log_alpha, seed: int, offset: int, training: bool) -> torch.Tensor:
    """z of every element of log_alpha (any shape and strides), contiguous, log_alpha's dtype."""
    la = log_alpha.contiguous()
    z = empty(la.shape, dtype=la.dtype, device=la.device)
    native.load().hard_concrete_forward(la, z, seed, offset, training)
    return z


def backward(log_alpha, dz, seed: int, offset: int, training: bool) -> torch.Tensor:
    """d log_alpha for the incoming dz; the noise u is regenerated from (seed, offset + i)."""
    la = log_alpha.contiguous()
    dla = empty(la.shape, dtype=la.dtype, device=la.device)
    native.load().hard_concrete_backward(la, dz.contiguous(), dla, seed, offset, training)
    return dla

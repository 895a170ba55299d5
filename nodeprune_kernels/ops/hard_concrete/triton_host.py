"""Hard-concrete gates on the Triton kernels: the host wrappers the custom ops call (function.py)."""
from __future__ import annotations

import torch
import triton

from ...utils.alloc import empty
from ...utils.launch import launch
from .kernels import _hard_concrete_bwd_kernel, _hard_concrete_fwd_kernel, _uniform_kernel

_BLOCK = 1024


def _grid(n):
    return (triton.cdiv(max(n, 1), _BLOCK),)


def uniform(seed: int, offset: int, n: int, device) -> torch.Tensor:
    """The gate noise u of indices offset .. offset + n - 1, drawn by the Triton kernel (float32)."""
    out = empty((n,), dtype=torch.float32, device=device)
    launch(_uniform_kernel, _grid(n), out_ptr=out, n=n, seed=seed, offset=offset, BLOCK=_BLOCK)
    return out


def forward(log_alpha, seed: int, offset: int, training: bool) -> torch.Tensor:
    """z of every element of log_alpha (any shape and strides), contiguous, log_alpha's dtype."""
    la = log_alpha.contiguous()
    z = empty(la.shape, dtype=la.dtype, device=la.device)
    n = la.numel()
    launch(_hard_concrete_fwd_kernel, _grid(n), la_ptr=la, z_ptr=z, n=n, seed=seed, offset=offset,
           TRAINING=training, BLOCK=_BLOCK)
    return z


def backward(log_alpha, dz, seed: int, offset: int, training: bool) -> torch.Tensor:
    """d log_alpha for the incoming dz; the noise u is regenerated from (seed, offset + i)."""
    la = log_alpha.contiguous()
    dz = dz.contiguous()
    dla = empty(la.shape, dtype=la.dtype, device=la.device)
    n = la.numel()
    launch(_hard_concrete_bwd_kernel, _grid(n), la_ptr=la, dz_ptr=dz, dla_ptr=dla, n=n, seed=seed, offset=offset,
           TRAINING=training, BLOCK=_BLOCK)
    return dla

"""Autograd Function and host wrappers around the hard-concrete Triton kernels."""
from __future__ import annotations

import torch
import triton

from ...utils.alloc import empty
from ...utils.launch import launch
from .kernels import _hard_concrete_bwd_kernel, _hard_concrete_fwd_kernel, _uniform_kernel

_BLOCK = 1024


def _grid(n):
    return (triton.cdiv(max(n, 1), _BLOCK),)


def uniform_triton(seed: int, offset: int, n: int, device) -> torch.Tensor:
    """The gate noise u of indices offset .. offset + n - 1, drawn by the Triton kernel (float32)."""
    out = empty((n,), dtype=torch.float32, device=device)
    launch(_uniform_kernel, _grid(n), out_ptr=out, n=n, seed=seed, offset=offset, BLOCK=_BLOCK)
    return out


class HardConcreteFunction(torch.autograd.Function):
    """z = hard_concrete(log_alpha); saves only log_alpha, regenerates u in the backward."""

    @staticmethod
    def forward(ctx, log_alpha, seed: int, offset: int, training: bool):
        la = log_alpha.contiguous()
        z = empty(la.shape, dtype=la.dtype, device=la.device)
        n = la.numel()
        launch(_hard_concrete_fwd_kernel, _grid(n), la_ptr=la, z_ptr=z, n=n, seed=seed, offset=offset,
               TRAINING=training, BLOCK=_BLOCK)
        ctx.save_for_backward(la)
        ctx.seed, ctx.offset, ctx.training = seed, offset, training
        return z.view(log_alpha.shape)

    @staticmethod
    def backward(ctx, dz):
        (la,) = ctx.saved_tensors
        dz = dz.contiguous()
        dla = empty(la.shape, dtype=la.dtype, device=la.device)
        n = la.numel()
        launch(_hard_concrete_bwd_kernel, _grid(n), la_ptr=la, dz_ptr=dz, dla_ptr=dla, n=n, seed=ctx.seed,
               offset=ctx.offset, TRAINING=ctx.training, BLOCK=_BLOCK)
        return dla, None, None, None

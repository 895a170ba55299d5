"""Hard-concrete gates and their noise on the Triton kernels: host wrappers, custom ops, autograd formula.

``nodeprune::hard_concrete`` (z), ``nodeprune::hard_concrete_backward`` (d log_alpha) and
``nodeprune::gate_noise`` (u), called by :func:`nodeprune_kernels.hard_concrete` and
:func:`nodeprune_kernels.gate_noise`, eagerly and under ``torch.compile`` alike (ops/custom_ops.py).
"""
from __future__ import annotations

import torch
import triton

from ...utils.alloc import empty
from ...utils.launch import launch
from ..custom_ops import check_finite, op_name
from .kernels import _hard_concrete_bwd_kernel, _hard_concrete_fwd_kernel, _uniform_kernel

_BLOCK = 1024


def _grid(n):
    return (triton.cdiv(max(n, 1), _BLOCK),)


# ---------------------------------------------------------------------------------------------------------
# host wrappers


def uniform_triton(seed: int, offset: int, n: int, device) -> torch.Tensor:
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


# ---------------------------------------------------------------------------------------------------------
# custom ops and autograd: z saves only log_alpha


@torch.library.custom_op(op_name("gate_noise"), mutates_args=())
def gate_noise_op(n: int, seed: int, offset: int, device: torch.device) -> torch.Tensor:
    """u of gates offset .. offset + n - 1 (float32 [n]); arguments validated by gate_noise."""
    return uniform_triton(seed, offset, n, device)


@gate_noise_op.register_fake
def _(n, seed, offset, device):
    return torch.empty((n,), dtype=torch.float32, device=device)


@torch.library.custom_op(op_name("hard_concrete"), mutates_args=())
def hard_concrete_op(log_alpha: torch.Tensor, seed: int, offset: int, training: bool) -> torch.Tensor:
    """z = hard_concrete(log_alpha), log_alpha's shape and dtype; arguments validated by hard_concrete."""
    check_finite("hard_concrete", [log_alpha])
    return forward(log_alpha, seed, offset, training)


@hard_concrete_op.register_fake
def _(log_alpha, seed, offset, training):
    return log_alpha.new_empty(log_alpha.shape)


@torch.library.custom_op(op_name("hard_concrete_backward"), mutates_args=())
def hard_concrete_backward_op(log_alpha: torch.Tensor, dz: torch.Tensor, seed: int, offset: int,
                              training: bool) -> torch.Tensor:
    """d log_alpha of hard_concrete for the incoming dz."""
    return backward(log_alpha, dz, seed, offset, training)


@hard_concrete_backward_op.register_fake
def _(log_alpha, dz, seed, offset, training):
    return log_alpha.new_empty(log_alpha.shape)


def _setup_context(ctx, inputs, output):
    log_alpha, ctx.seed, ctx.offset, ctx.training = inputs
    ctx.save_for_backward(log_alpha)


def _backward(ctx, dz):
    (log_alpha,) = ctx.saved_tensors
    return hard_concrete_backward_op(log_alpha, dz, ctx.seed, ctx.offset, ctx.training), None, None, None


hard_concrete_op.register_autograd(_backward, setup_context=_setup_context)

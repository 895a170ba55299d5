"""Hard-concrete gates as torch custom ops, on the Triton or the native kernels.

``nodeprune::hard_concrete`` (z), ``nodeprune::hard_concrete_backward`` (d log_alpha) and
``nodeprune::gate_noise`` (u), called by :func:`nodeprune_kernels.hard_concrete` and
:func:`nodeprune_kernels.gate_noise`, eagerly and under ``torch.compile`` alike (ops/custom_ops.py). The
``impl`` argument names the host wrappers that run them: triton_host.py or native_host.py.
"""
from __future__ import annotations

import torch

from ..custom_ops import check_finite, host, op_name


@torch.library.custom_op(op_name("gate_noise"), mutates_args=())
def gate_noise_op(n: int, seed: int, offset: int, device: torch.device, impl: str) -> torch.Tensor:
    """u of gates offset .. offset + n - 1 (float32 [n]); arguments validated by gate_noise."""
    return host(__package__, impl).uniform(seed, offset, n, device)


@gate_noise_op.register_fake
def _(n, seed, offset, device, impl):
    return torch.empty((n,), dtype=torch.float32, device=device)


@torch.library.custom_op(op_name("hard_concrete"), mutates_args=())
def hard_concrete_op(log_alpha: torch.Tensor, seed: int, offset: int, training: bool, impl: str) -> torch.Tensor:
    """z = hard_concrete(log_alpha), log_alpha's shape and dtype; arguments validated by hard_concrete."""
    check_finite("hard_concrete", [log_alpha])
    return host(__package__, impl).forward(log_alpha, seed, offset, training)


@hard_concrete_op.register_fake
def _(log_alpha, seed, offset, training, impl):
    return log_alpha.new_empty(log_alpha.shape)


@torch.library.custom_op(op_name("hard_concrete_backward"), mutates_args=())
def hard_concrete_backward_op(log_alpha: torch.Tensor, dz: torch.Tensor, seed: int, offset: int,
                              training: bool, impl: str) -> torch.Tensor:
    """d log_alpha of hard_concrete for the incoming dz."""
    return host(__package__, impl).backward(log_alpha, dz, seed, offset, training)


@hard_concrete_backward_op.register_fake
def _(log_alpha, dz, seed, offset, training, impl):
    return log_alpha.new_empty(log_alpha.shape)


# autograd: z saves only log_alpha; the noise is regenerated in the backward


def _setup_context(ctx, inputs, output):
    log_alpha, *ctx.args = inputs  # seed, offset, training, impl
    ctx.save_for_backward(log_alpha)


def _backward(ctx, dz):
    (log_alpha,) = ctx.saved_tensors
    return hard_concrete_backward_op(log_alpha, dz, *ctx.args), None, None, None, None


hard_concrete_op.register_autograd(_backward, setup_context=_setup_context)

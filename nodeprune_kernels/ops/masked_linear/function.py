"""The fused masked linear as torch custom ops and their autograd formula (Triton or native kernels).

``nodeprune::masked_linear`` computes y' and ``nodeprune::masked_linear_backward`` dx and the gates'
d log_alpha, each through the host wrappers ``forward`` / ``backward`` of triton_host.py (the gated GEMM)
or native_host.py (csrc row passes around ATen GEMMs), as the op's ``impl`` argument says.
:func:`nodeprune_kernels.masked_linear` and :func:`nodeprune_kernels.masked_attn_out_proj` validate their
arguments and call the first; eagerly and under ``torch.compile`` alike (ops/custom_ops.py).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch

from ..custom_ops import check_finite, host, input_grads, op_name, split_grads
from ..gate_stack import StackSpec
from ..slow_path import reference_param_grads
from .reference import masked_linear_reference


@dataclass(frozen=True)
class Spec(StackSpec):
    """Everything about a masked_linear call that is not a tensor."""

    n_in: int
    n_out: int
    out_in: bool  # weight is [out, in] (nn.Linear); else [in, out] (GPT-2 Conv1D)
    feature_dims: int = 1  # x is [..., K] (1) or [..., H, D] with K = H * D (2: attention outputs)


def _spec(x, weight, in_groups, in_offsets, out_groups, out_offsets, seed, training, out_in, feature_dims) -> Spec:
    """The Spec of a custom op's arguments."""
    return Spec(n_in=x.shape[x.dim() - feature_dims:].numel(), n_out=weight.shape[0 if out_in else 1], out_in=out_in,
                feature_dims=feature_dims,
                **Spec.fields(in_groups, in_offsets, out_groups, out_offsets, seed, training))


# ---------------------------------------------------------------------------------------------------------
# custom ops


@torch.library.custom_op(op_name("masked_linear"), mutates_args=())
def masked_linear_op(x: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor],
                     x_ablate: Optional[torch.Tensor], y_ablate: Optional[torch.Tensor], log_alphas: list[torch.Tensor],
                     in_groups: list[int], in_offsets: list[int], out_groups: list[int], out_offsets: list[int],
                     seed: int, training: bool, out_in: bool, feature_dims: int, impl: str) -> torch.Tensor:
    """y' of masked_linear (feature_dims=1) or masked_attn_out_proj (2), for arguments validated there.

    The gate stacks: ``log_alphas`` holds the input levels' then the output levels' log_alpha, the int lists
    their groups and offsets (:func:`nodeprune_kernels.ops.gate_stack.stack_args`).
    """
    check_finite("masked_linear", log_alphas)
    spec = _spec(x, weight, in_groups, in_offsets, out_groups, out_offsets, seed, training, out_in, feature_dims)
    return host(__package__, impl).forward(x, weight, bias, x_ablate, y_ablate, log_alphas, spec)


@masked_linear_op.register_fake
def _(x, weight, bias, x_ablate, y_ablate, log_alphas, in_groups, in_offsets, out_groups, out_offsets, seed,
      training, out_in, feature_dims, impl):
    return x.new_empty((*x.shape[:x.dim() - feature_dims], weight.shape[0 if out_in else 1]))


@torch.library.custom_op(op_name("masked_linear_backward"), mutates_args=())
def masked_linear_backward_op(dy: torch.Tensor, x: torch.Tensor, weight: torch.Tensor,
                              x_ablate: Optional[torch.Tensor], log_alphas: list[torch.Tensor], in_groups: list[int],
                              in_offsets: list[int], out_groups: list[int], out_offsets: list[int], seed: int,
                              training: bool, out_in: bool, feature_dims: int, impl: str, need_dx: bool,
                              need_log_alphas: list[bool]) -> list[torch.Tensor]:
    """[dx if need_dx] + [d log_alpha of each level whose need_log_alphas flag is set] of masked_linear."""
    spec = _spec(x, weight, in_groups, in_offsets, out_groups, out_offsets, seed, training, out_in, feature_dims)
    return host(__package__, impl).backward(dy, x, weight, x_ablate, log_alphas, spec, need_dx, need_log_alphas)


@masked_linear_backward_op.register_fake
def _(dy, x, weight, x_ablate, log_alphas, in_groups, in_offsets, out_groups, out_offsets, seed, training, out_in,
      feature_dims, impl, need_dx, need_log_alphas):
    return ([x.new_empty(x.shape)] if need_dx else []) + [la.new_empty(la.shape)
                                                          for la, n in zip(log_alphas, need_log_alphas) if n]


# ---------------------------------------------------------------------------------------------------------
# autograd: saves x (a reference to the caller's tensor, strided views included), x_c, the weight and bias
# and the log_alphas; everything else is recomputed in the backward


def _setup_context(ctx, inputs, output):
    x, weight, bias, x_ablate, y_ablate, las, *stack = inputs
    ctx.stack = stack  # in_groups, in_offsets, out_groups, out_offsets, seed, training, out_in, feature_dims, impl
    ctx.has_y_ablate = y_ablate is not None
    ctx.save_for_backward(x, weight, bias, x_ablate, *las)


def _backward(ctx, dy):
    x, weight, bias, x_ablate, *las = ctx.saved_tensors
    need = ctx.needs_input_grad  # per input; need[5] is the list of the log_alphas' flags
    need_las = list(need[5])
    result = masked_linear_backward_op(dy, x, weight, x_ablate, las, *ctx.stack, need[0], need_las)
    dx, dlas = split_grads(result, need[0], need_las)
    grads = {0: dx, 5: dlas}
    if need[1] or need[2]:
        spec = _spec(x, weight, *ctx.stack[:-1])
        grads[1], grads[2] = _parameter_grads(spec, x, weight, bias, x_ablate, ctx.has_y_ablate, las, dy, need[1],
                                              need[2])
    return input_grads(need, grads)


masked_linear_op.register_autograd(_backward, setup_context=_setup_context)


def _parameter_grads(spec, x, weight, bias, x_ablate, has_y_ablate, las, dy, need_w, need_b):
    """Weight and bias gradients through the reference (see ops/slow_path.py)."""
    flat = (lambda t: t if t is None or spec.feature_dims == 1 or t.dim() < 2 else t.flatten(-2))

    def run(in_gates, out_gates, w, b):
        return masked_linear_reference(
            flat(x.detach()), w, b, in_gates=in_gates, out_gates=out_gates, x_ablate=flat(x_ablate),
            y_ablate=torch.zeros((), dtype=x.dtype, device=x.device) if has_y_ablate else None,
            seed=spec.seed, training=spec.training, weight_layout="out_in" if spec.out_in else "in_out")

    return reference_param_grads("masked_linear", spec, las, (weight, bias), (need_w, need_b), dy, run)

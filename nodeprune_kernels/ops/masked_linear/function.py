"""The fused masked linear (Triton backend): host wrapper, custom ops and autograd formula.

``nodeprune::masked_linear`` computes y' and ``nodeprune::masked_linear_backward`` dx and the gates'
d log_alpha, each through the host wrappers :func:`forward` / :func:`backward` that launch the gated GEMM.
:func:`nodeprune_kernels.masked_linear` and :func:`nodeprune_kernels.masked_attn_out_proj` validate their
arguments and call the first; eagerly and under ``torch.compile`` alike (ops/custom_ops.py).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch
import torch.nn.functional as F

from ...utils.alloc import empty
from ..custom_ops import check_finite, input_grads, op_name, split_grads
from ..gate_stack import StackSpec
from ..gated_gemm import choose_split, gated_matmul, level_grads, tensor_operand, vector_operand, weight_operand
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


def _ablation_operand(t, spec: Spec, M, split):
    """x_c as an operand: a vector over the features (mean) or a tensor of x's shape (interchange)."""
    if t is None:
        return None
    if t.dim() <= spec.feature_dims:
        return vector_operand(t)
    return tensor_operand(t, M, spec.n_in, split)


# ---------------------------------------------------------------------------------------------------------
# host wrappers


def forward(x, weight, bias, x_ablate, y_ablate, las, spec: Spec) -> torch.Tensor:
    """y' = y_c + z_out * (((x - x_c) * z_in) W^T), [..., N] in x's dtype.

    x is read through strides (:func:`choose_split`), so an attention output [B, H, S, D].transpose(1, 2)
    is not copied.
    """
    K, N = spec.n_in, spec.n_out
    in_levels, out_levels = spec.levels(las)
    lead = x.shape[:x.dim() - spec.feature_dims]
    M = x.numel() // K if K else lead.numel()
    split = choose_split(x, spec.feature_dims)
    if y_ablate is not None:
        yc = vector_operand(y_ablate) if y_ablate.dim() == 1 else tensor_operand(y_ablate, M, N)
    elif x_ablate is not None:
        w_oi = weight if spec.out_in else weight.t()
        x_c = x_ablate.reshape(*x_ablate.shape[:x_ablate.dim() - spec.feature_dims], K)
        y_c = F.linear(x_c, w_oi, bias)
        yc = vector_operand(y_c) if y_c.dim() == 1 else tensor_operand(y_c, M, N)
    elif bias is not None:
        yc = vector_operand(bias)
    else:
        yc = None
    y = empty((*lead, N), dtype=x.dtype, device=x.device)
    gated_matmul(tensor_operand(x, M, K, split), weight_operand(weight, spec.out_in, "KN"), M, K, N,
                 seed=spec.seed, training=spec.training, a_split=split,
                 ac=_ablation_operand(x_ablate, spec, M, split), r_levels=in_levels, c_levels=out_levels,
                 out=y.view(M, N), yc=yc)
    return y


def backward(dy, x, weight, x_ablate, las, spec: Spec, need_dx: bool, need_las) -> list:
    """[dx if ``need_dx``] + [d log_alpha of each level whose ``need_las`` flag is set], recomputing what
    the forward did not save."""
    K, N = spec.n_in, spec.n_out
    in_levels, out_levels = spec.levels(las)
    n_lvl_in = len(in_levels)
    need_in, need_out = need_las[:n_lvl_in], need_las[n_lvl_in:]
    M = dy.numel() // N if N else x.numel() // max(K, 1)
    split = choose_split(x, spec.feature_dims)
    x_op = tensor_operand(x, M, K, split)
    xc_op = _ablation_operand(x_ablate, spec, M, split)
    dy_op = tensor_operand(dy, M, N)
    kw = dict(seed=spec.seed, training=spec.training)
    dx, grads_in, grads_out = None, [None] * n_lvl_in, [None] * len(out_levels)

    if need_dx or any(need_in):
        # P = (dy * z_out) W; dx = P * z_in; per-feature sums of P * (x - x_c) for the input gates
        dx = empty(x.shape, dtype=x.dtype, device=x.device) if need_dx else None
        part = gated_matmul(dy_op, weight_operand(weight, spec.out_in, "NK"), M, N, K, r_levels=out_levels,
                            c_levels=in_levels, out=dx.view(M, K) if need_dx else None,
                            e=x_op if any(need_in) else None, ec=xc_op if any(need_in) else None, e_split=split,
                            **kw)
        if any(need_in):
            grads_in = level_grads(part.sum(0), in_levels, need_in, **kw)

    if any(need_out):
        # recompute Q = ((x - x_c) * z_in) W^T instead of saving it; per-feature sums of dy * Q
        part = gated_matmul(x_op, weight_operand(weight, spec.out_in, "KN"), M, K, N, a_split=split, ac=xc_op,
                            r_levels=in_levels, e=dy_op, **kw)
        grads_out = level_grads(part.sum(0), out_levels, need_out, **kw)
    return ([dx] if need_dx else []) + [g for g, n in zip(grads_in + grads_out, need_las) if n]


# ---------------------------------------------------------------------------------------------------------
# custom ops


@torch.library.custom_op(op_name("masked_linear"), mutates_args=())
def masked_linear_op(x: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor],
                     x_ablate: Optional[torch.Tensor], y_ablate: Optional[torch.Tensor], log_alphas: list[torch.Tensor],
                     in_groups: list[int], in_offsets: list[int], out_groups: list[int], out_offsets: list[int],
                     seed: int, training: bool, out_in: bool, feature_dims: int) -> torch.Tensor:
    """y' of masked_linear (feature_dims=1) or masked_attn_out_proj (2), for arguments validated there.

    The gate stacks: ``log_alphas`` holds the input levels' then the output levels' log_alpha, the int lists
    their groups and offsets (:func:`nodeprune_kernels.ops.gate_stack.stack_args`).
    """
    check_finite("masked_linear", log_alphas)
    spec = _spec(x, weight, in_groups, in_offsets, out_groups, out_offsets, seed, training, out_in, feature_dims)
    return forward(x, weight, bias, x_ablate, y_ablate, log_alphas, spec)


@masked_linear_op.register_fake
def _(x, weight, bias, x_ablate, y_ablate, log_alphas, in_groups, in_offsets, out_groups, out_offsets, seed,
      training, out_in, feature_dims):
    return x.new_empty((*x.shape[:x.dim() - feature_dims], weight.shape[0 if out_in else 1]))


@torch.library.custom_op(op_name("masked_linear_backward"), mutates_args=())
def masked_linear_backward_op(dy: torch.Tensor, x: torch.Tensor, weight: torch.Tensor,
                              x_ablate: Optional[torch.Tensor], log_alphas: list[torch.Tensor], in_groups: list[int],
                              in_offsets: list[int], out_groups: list[int], out_offsets: list[int], seed: int,
                              training: bool, out_in: bool, feature_dims: int, need_dx: bool,
                              need_log_alphas: list[bool]) -> list[torch.Tensor]:
    """[dx if need_dx] + [d log_alpha of each level whose need_log_alphas flag is set] of masked_linear."""
    spec = _spec(x, weight, in_groups, in_offsets, out_groups, out_offsets, seed, training, out_in, feature_dims)
    return backward(dy, x, weight, x_ablate, log_alphas, spec, need_dx, need_log_alphas)


@masked_linear_backward_op.register_fake
def _(dy, x, weight, x_ablate, log_alphas, in_groups, in_offsets, out_groups, out_offsets, seed, training, out_in,
      feature_dims, need_dx, need_log_alphas):
    return ([x.new_empty(x.shape)] if need_dx else []) + [la.new_empty(la.shape)
                                                          for la, n in zip(log_alphas, need_log_alphas) if n]


# ---------------------------------------------------------------------------------------------------------
# autograd: saves x (a reference to the caller's tensor, strided views included), x_c, the weight and bias
# and the log_alphas; everything else is recomputed in the backward


def _setup_context(ctx, inputs, output):
    x, weight, bias, x_ablate, y_ablate, las, *stack = inputs
    ctx.stack = stack  # in_groups, in_offsets, out_groups, out_offsets, seed, training, out_in, feature_dims
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
        spec = _spec(x, weight, *ctx.stack)
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

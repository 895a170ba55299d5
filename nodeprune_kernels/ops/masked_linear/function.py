"""Host wrapper and autograd Function of the fused masked linear (Triton backend)."""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from ...utils.alloc import empty
from ..gate_stack import StackSpec
from ..gated_gemm import (Split, choose_split, gated_matmul, level_grads, tensor_operand,
                          vector_operand, weight_operand)
from ..slow_path import reference_param_grads
from .reference import masked_linear_reference


@dataclass(frozen=True)
class Spec(StackSpec):
    """Everything about a masked_linear call that is not a tensor."""

    n_in: int
    n_out: int
    out_in: bool  # weight is [out, in] (nn.Linear); else [in, out] (GPT-2 Conv1D)
    has_y_ablate: bool
    feature_dims: int = 1  # x is [..., K] (1) or [..., H, D] with K = H * D (2: attention outputs)


def _ablation_operand(t, spec: Spec, M, split):
    """x_c as an operand: a vector over the features (mean) or a tensor of x's shape (interchange)."""
    if t is None:
        return None
    if t.dim() <= spec.feature_dims:
        return vector_operand(t)
    return tensor_operand(t, M, spec.n_in, split)


class MaskedLinearFunction(torch.autograd.Function):
    """y' = y_c + z_out * (((x - x_c) * z_in) W^T); saves x (and x_c), the weight and the log_alphas.

    x is read through strides (:func:`choose_split`), so an attention output [B, H, S, D].transpose(1, 2)
    is neither copied nor saved twice: the saved tensor is the one the attention kernel already keeps.
    """

    @staticmethod
    def forward(ctx, x, weight, bias, x_ablate, y_ablate, spec: Spec, *log_alphas):
        K, N = spec.n_in, spec.n_out
        in_levels, out_levels = spec.levels(log_alphas)
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
        y = empty((M, N), dtype=x.dtype, device=x.device)
        gated_matmul(tensor_operand(x, M, K, split), weight_operand(weight, spec.out_in, "KN"), M, K, N,
                     seed=spec.seed, training=spec.training, a_split=split,
                     ac=_ablation_operand(x_ablate, spec, M, split), r_levels=in_levels, c_levels=out_levels,
                     out=y, yc=yc)
        ctx.spec = spec
        ctx.save_for_backward(x, weight, bias, x_ablate, *log_alphas)
        return y.view(*lead, N)

    @staticmethod
    def backward(ctx, dy):
        spec: Spec = ctx.spec
        x, weight, bias, x_ablate, *las = ctx.saved_tensors
        K, N = spec.n_in, spec.n_out
        in_levels, out_levels = spec.levels(las)
        n_lvl_in = len(in_levels)
        need = ctx.needs_input_grad
        need_dx = need[0]
        need_in = need[6:6 + n_lvl_in]
        need_out = need[6 + n_lvl_in:]
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

        dw = db = None
        if need[1] or need[2]:
            dw, db = _parameter_grads(spec, x, weight, bias, x_ablate, las, dy, need[1], need[2])
        return (dx, dw, db, None, None, None, *grads_in, *grads_out)


def _parameter_grads(spec, x, weight, bias, x_ablate, las, dy, need_w, need_b):
    """Weight and bias gradients through the reference (see ops/slow_path.py)."""
    flat = (lambda t: t if t is None or spec.feature_dims == 1 or t.dim() < 2 else t.flatten(-2))

    def run(in_gates, out_gates, w, b):
        return masked_linear_reference(
            flat(x.detach()), w, b, in_gates=in_gates, out_gates=out_gates, x_ablate=flat(x_ablate),
            y_ablate=torch.zeros((), dtype=x.dtype, device=x.device) if spec.has_y_ablate else None,
            seed=spec.seed, training=spec.training, weight_layout="out_in" if spec.out_in else "in_out")

    return reference_param_grads("masked_linear", spec, las, (weight, bias), (need_w, need_b), dy, run)

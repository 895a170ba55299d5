"""The masked linear on the Triton kernels: the host wrappers the custom ops call (function.py).

Each GEMM of the forward and the backward is one launch of the gated GEMM (ops/gated_gemm), which samples
the gates inside the kernel and reads x through its strides.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from ...utils.alloc import empty
from ..gated_gemm import choose_split, gated_matmul, level_grads, tensor_operand, vector_operand, weight_operand


def _ablation_operand(t, spec, M, split):
    """x_c as an operand: a vector over the features (mean) or a tensor of x's shape (interchange)."""
    if t is None:
        return None
    if t.dim() <= spec.feature_dims:
        return vector_operand(t)
    return tensor_operand(t, M, spec.n_in, split)


def forward(x, weight, bias, x_ablate, y_ablate, las, spec) -> torch.Tensor:
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


def backward(dy, x, weight, x_ablate, las, spec, need_dx: bool, need_las) -> list:
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

"""The masked linear on the Triton kernels: the host wrappers the custom ops call (function.py).

Each call samples its two gate stacks once into per-feature vectors (:func:`feature_gates`); each GEMM of
the forward and the backward is one launch of the gated GEMM (ops/gated_gemm) whose K loop is a plain
matmul: the reduction side's gates are folded into a transient copy of the weight, the ablation is
subtracted from A beforehand (a transient x - x_c), and the other side's gates, y_c and the gate sums are
its epilogue. x is read through its strides.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from ...utils.alloc import empty
from ..gated_gemm import (choose_split, fold_weight, gated_matmul, level_grads, stack_gates, tensor_operand,
                          transient_dtype, vector_operand, weight_operand)


def _ablation_operand(t, spec, M, split):
    """x_c as an operand: a vector over the features (mean) or a tensor of x's shape (interchange)."""
    if t is None:
        return None
    if t.dim() <= spec.feature_dims:
        return vector_operand(t)
    return tensor_operand(t, M, spec.n_in, split)


def _delta(x, x_ablate, spec, M):
    """(x - x_c as a [M, K] operand, its split): x itself, read in place, under zero ablation; otherwise a
    transient in x's dtype."""
    if x_ablate is None:
        split = choose_split(x, spec.feature_dims)
        return tensor_operand(x, M, spec.n_in, split), split
    xa = x_ablate.reshape(x.shape[x.dim() - spec.feature_dims:]) if x_ablate.dim() <= spec.feature_dims else x_ablate
    dt = transient_dtype(x.dtype)
    d = x.to(dt) - xa.to(dt)
    split = choose_split(d, spec.feature_dims)
    return tensor_operand(d, M, spec.n_in, split), split


def forward(x, weight, bias, x_ablate, y_ablate, las, spec) -> torch.Tensor:
    """y' = y_c + z_out * ((x - x_c) (W diag(z_in))^T), [..., N] in x's dtype."""
    K, N = spec.n_in, spec.n_out
    z_in, z_out, _, _ = stack_gates(spec, las, spec.n_in, spec.n_out, x.device)
    lead = x.shape[:x.dim() - spec.feature_dims]
    M = x.numel() // K if K else lead.numel()
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
    a, split = _delta(x, x_ablate, spec, M)
    w_in = fold_weight(weight, z_in, out_in=spec.out_in, side="in")
    gated_matmul(a, weight_operand(w_in, spec.out_in, "KN"), M, K, N, a_split=split, zc=z_out, out=y.view(M, N),
                 yc=yc)
    return y


def backward(dy, x, weight, x_ablate, las, spec, need_dx: bool, need_las) -> list:
    """[dx if ``need_dx``] + [d log_alpha of each level whose ``need_las`` flag is set], recomputing what
    the forward did not save."""
    K, N = spec.n_in, spec.n_out
    z_in, z_out, in_levels, out_levels = stack_gates(spec, las, spec.n_in, spec.n_out, dy.device)
    n_lvl_in = len(in_levels)
    need_in, need_out = need_las[:n_lvl_in], need_las[n_lvl_in:]
    M = dy.numel() // N if N else x.numel() // max(K, 1)
    split = choose_split(x, spec.feature_dims)
    dy_op = tensor_operand(dy, M, N)
    kw = dict(seed=spec.seed, training=spec.training)
    dx, grads_in, grads_out = None, [None] * n_lvl_in, [None] * len(out_levels)

    if need_dx or any(need_in):
        # P = dy (diag(z_out) W); dx = P * z_in; per-feature sums of P * (x - x_c) for the input gates
        dx = empty(x.shape, dtype=x.dtype, device=x.device) if need_dx else None
        w_out = fold_weight(weight, z_out, out_in=spec.out_in, side="out")
        part = gated_matmul(dy_op, weight_operand(w_out, spec.out_in, "NK"), M, N, K, zc=z_in,
                            out=dx.view(M, K) if need_dx else None,
                            e=tensor_operand(x, M, K, split) if any(need_in) else None,
                            ec=_ablation_operand(x_ablate, spec, M, split) if any(need_in) else None, e_split=split)
        if any(need_in):
            grads_in = level_grads(part.sum(0), in_levels, need_in, **kw)

    if any(need_out):
        # recompute Q = (x - x_c) (W diag(z_in))^T instead of saving it; per-feature sums of dy * Q
        a, a_split = _delta(x, x_ablate, spec, M)
        w_in = fold_weight(weight, z_in, out_in=spec.out_in, side="in")
        part = gated_matmul(a, weight_operand(w_in, spec.out_in, "KN"), M, K, N, a_split=a_split, e=dy_op)
        grads_out = level_grads(part.sum(0), out_levels, need_out, **kw)
    return ([dx] if need_dx else []) + [g for g, n in zip(grads_in + grads_out, need_las) if n]

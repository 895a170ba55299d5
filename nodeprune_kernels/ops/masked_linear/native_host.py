"""The masked linear on the native CPU kernels: the host wrappers the custom ops call (function.py).

Forward: A = (x - x_c) * z_in (one row pass), y = A W^T (ATen GEMM), y = y * z_out + y_c in place (one row
pass); A is a temporary, so only x (and x_c) is saved, as on the Triton path.
Backward (in float32 for 16-bit inputs, :func:`native_rows.widen`): P = (dy * z_out) W, then one pass writes
dx = P * z_in over P itself and sums P * (x - x_c) per input feature; the output gates' sums recompute
Q = A W^T and sum dy * Q per output feature.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from ...utils.alloc import empty
from .. import native_rows as rows


def _w_kn(weight, spec):
    """W as [K, N], a view (x W^T)."""
    return weight.t() if spec.out_in else weight


def _w_nk(weight, spec):
    """W as [N, K], a view (dy W)."""
    return weight if spec.out_in else weight.t()


def _ablation(t, spec):
    """x_c as a row operand: absent, a vector over the features (mean) or a tensor of x's shape."""
    if t is None:
        return rows.NONE
    return rows.vector(t) if t.dim() <= spec.feature_dims else rows.tensor(t, spec.feature_dims)


def _masked_input(x, x_ablate, z_in, spec, M):
    """(x - x_c) * z_in as [M, K]; x itself (a view where possible) when there is nothing to apply."""
    if z_in is None and x_ablate is None:
        return x.reshape(M, spec.n_in)
    return rows.gated_rows(rows.tensor(x, spec.feature_dims), _ablation(x_ablate, spec), z_in, M, spec.n_in, x)


def forward(x, weight, bias, x_ablate, y_ablate, las, spec) -> torch.Tensor:
    """y' = y_c + z_out * (((x - x_c) * z_in) W^T), [..., N] in x's dtype."""
    K, N = spec.n_in, spec.n_out
    in_levels, out_levels = spec.levels(las)
    kw = dict(seed=spec.seed, training=spec.training)
    lead = x.shape[:x.dim() - spec.feature_dims]
    M = lead.numel()
    z_in, z_out = rows.feature_gates(in_levels, K, x, **kw), rows.feature_gates(out_levels, N, x, **kw)
    if y_ablate is not None:
        yc = rows.vector(y_ablate) if y_ablate.dim() == 1 else rows.tensor(y_ablate)
    elif x_ablate is not None:
        y_c = F.linear(x_ablate.reshape(*x_ablate.shape[:x_ablate.dim() - spec.feature_dims], K), _w_nk(weight, spec),
                       bias)
        yc = rows.vector(y_c) if y_c.dim() == 1 else rows.tensor(y_c)
    else:
        yc = rows.vector(bias) if bias is not None else rows.NONE
    y = empty((*lead, N), dtype=x.dtype, device=x.device)
    torch.mm(_masked_input(x, x_ablate, z_in, spec, M), _w_kn(weight, spec), out=y.view(M, N))
    rows.scale_add(y.view(M, N), z_out, yc, M, N)
    return y


def backward(dy, x, weight, x_ablate, las, spec, need_dx: bool, need_las) -> list:
    """[dx if ``need_dx``] + [d log_alpha of each level whose ``need_las`` flag is set]."""
    out_dtype = x.dtype
    dy, x, weight, x_ablate = rows.widen(dy, x, weight, x_ablate)
    K, N = spec.n_in, spec.n_out
    in_levels, out_levels = spec.levels(las)
    n_lvl_in = len(in_levels)
    need_in, need_out = need_las[:n_lvl_in], need_las[n_lvl_in:]
    kw = dict(seed=spec.seed, training=spec.training)
    M = dy.numel() // N if N else x.numel() // max(K, 1)
    z_in, z_out = rows.feature_gates(in_levels, K, x, **kw), rows.feature_gates(out_levels, N, x, **kw)
    dx, grads_in, grads_out = None, [None] * n_lvl_in, [None] * len(out_levels)

    if need_dx or any(need_in):
        # P = (dy * z_out) W; dx = P * z_in written over P; per-feature sums of P * (x - x_c)
        p = rows.gated_matmul(dy, z_out, _w_nk(weight, spec), M, N)
        sums = rows.backward_rows(rows.tensor(p), z_in, rows.tensor(x, spec.feature_dims), _ablation(x_ablate, spec),
                                  M, K, out1=p if need_dx else None, colsum=any(need_in))
        dx = p.view(x.shape).to(out_dtype) if need_dx else None
        if any(need_in):
            grads_in = rows.level_grads(sums, in_levels, need_in, **kw)

    if any(need_out):
        # recompute Q = ((x - x_c) * z_in) W^T instead of saving it; per-feature sums of dy * Q
        q = torch.mm(_masked_input(x, x_ablate, z_in, spec, M), _w_kn(weight, spec))
        sums = rows.backward_rows(rows.tensor(q), None, rows.tensor(dy), rows.NONE, M, N, colsum=True)
        grads_out = rows.level_grads(sums, out_levels, need_out, **kw)
    return ([dx] if need_dx else []) + [g for g, n in zip(grads_in + grads_out, need_las) if n]

"""The masked MLP on the native CPU kernels: the host wrappers the custom ops call (function.py).

Forward: pre (and lin) by ATen GEMMs and saved; one row pass builds A = (act(pre) * lin - h_c) * z_in, the
down projection is an ATen GEMM, and one more pass applies z_out and adds y_c. A is a temporary: the saved
tensors are those of the Triton path.
Backward (in float32 for 16-bit inputs, :func:`native_rows.widen`): P = (dy * z_out) W_down; one pass rebuilds h from pre and lin and writes d pre over P and d lin,
and sums P * (h - h_c) per hidden unit; dx = d pre W_pre + d lin W_up. The output gates' sums recompute
Q = A W_down^T and sum dy * Q per output feature.
"""
from __future__ import annotations

import torch

from ...utils.alloc import empty
from .. import native_rows as rows
from .function import corrupted_hidden, pre_lin, project
from .reference import ACT_IDS


def _oi(weight, spec):
    """A weight as [out, in] (a view)."""
    return weight if spec.out_in else weight.t()


def _hidden(pre, lin, spec, M):
    return rows.hidden(pre.reshape(M, spec.d_ff), None if lin is None else lin.reshape(M, spec.d_ff),
                       ACT_IDS[spec.activation])


def _hidden_ablation(hidden_ablate, pre_lin_c, h_cached, spec, M):
    """h_c as a row operand: cached [..., d_ff], rebuilt from the corrupted (pre, lin), a [d_ff] mean, a
    per-token tensor, or absent (zero ablation)."""
    if h_cached is not None:
        return rows.tensor(h_cached)
    if pre_lin_c is not None:
        return _hidden(*pre_lin_c, spec, M)
    if hidden_ablate is not None:
        return rows.vector(hidden_ablate) if hidden_ablate.dim() == 1 else rows.tensor(hidden_ablate)
    return rows.NONE


def forward(x, up_w, down_w, gate_w, up_b, gate_b, down_b, hidden_ablate, x_corrupt, las, spec):
    """(y' [..., d_model], pre, lin or None, h_c or None), as the Triton host's forward."""
    D, Fh = spec.d_model, spec.d_ff
    in_levels, out_levels = spec.levels(las)
    kw = dict(seed=spec.seed, training=spec.training)
    M = x.shape[:-1].numel()
    pre, lin = pre_lin(x, up_w, gate_w, up_b, gate_b, spec)
    z_in, z_out = rows.feature_gates(in_levels, Fh, pre, **kw), rows.feature_gates(out_levels, D, pre, **kw)

    pre_lin_c, h_cached = corrupted_hidden(x_corrupt, up_w, gate_w, up_b, gate_b, spec)
    ablation = _hidden_ablation(hidden_ablate, pre_lin_c, h_cached, spec, M)
    if x_corrupt is not None:  # y_c = h_c W_down^T + b_down, per token
        h_c = h_cached.reshape(M, Fh) if h_cached is not None else rows.gated_rows(ablation, rows.NONE, None, M, Fh,
                                                                                   pre)
        yc = rows.tensor(project(h_c, down_w, down_b, spec.out_in))
        del h_c
    elif hidden_ablate is not None:
        y_c = project(hidden_ablate, down_w, down_b, spec.out_in)
        yc = rows.vector(y_c) if y_c.dim() == 1 else rows.tensor(y_c)
    else:
        yc = rows.vector(down_b) if down_b is not None else rows.NONE

    a = rows.gated_rows(_hidden(pre, lin, spec, M), ablation, z_in, M, Fh, pre)
    y = empty(x.shape, dtype=x.dtype, device=x.device)
    torch.mm(a, _oi(down_w, spec).t(), out=y.view(M, D))
    del a
    rows.scale_add(y.view(M, D), z_out, yc, M, D)
    return y, pre, lin, h_cached


def backward(dy, pre, lin, up_w, down_w, gate_w, up_b, gate_b, hidden_ablate, x_corrupt, h_cached, las, spec,
             need_dx: bool, need_las) -> list:
    """[dx if ``need_dx``] + [d log_alpha of each level whose ``need_las`` flag is set], h rebuilt from pre
    and lin."""
    out_dtype = pre.dtype
    dy, pre, lin, up_w, down_w, gate_w, up_b, gate_b, hidden_ablate, x_corrupt, h_cached = rows.widen(
        dy, pre, lin, up_w, down_w, gate_w, up_b, gate_b, hidden_ablate, x_corrupt, h_cached)
    D, Fh = spec.d_model, spec.d_ff
    in_levels, out_levels = spec.levels(las)
    n_lvl_in = len(in_levels)
    need_in, need_out = need_las[:n_lvl_in], need_las[n_lvl_in:]
    kw = dict(seed=spec.seed, training=spec.training)
    M = dy.shape[:-1].numel()
    z_in, z_out = rows.feature_gates(in_levels, Fh, pre, **kw), rows.feature_gates(out_levels, D, pre, **kw)
    h = _hidden(pre, lin, spec, M)

    ablation = rows.NONE  # h_c: rebuilt from the corrupted input (two GEMMs) unless cached in the forward
    if any(need_las):
        pre_lin_c = pre_lin(x_corrupt, up_w, gate_w, up_b, gate_b, spec) if x_corrupt is not None else None
        ablation = _hidden_ablation(hidden_ablate, pre_lin_c, h_cached, spec, M)

    dx, grads_in, grads_out = None, [None] * n_lvl_in, [None] * len(out_levels)
    if need_dx or any(need_in):
        # P = (dy * z_out) W_down; dh = P * z_in -> d pre (over P), d lin; per-unit sums of P * (h - h_c)
        p = rows.gated_matmul(dy, z_out, _oi(down_w, spec), M, D)
        d_lin = empty((M, Fh), dtype=pre.dtype, device=pre.device) if need_dx and lin is not None else None
        sums = rows.backward_rows(rows.tensor(p), z_in, h, ablation, M, Fh, out_kind=1 if need_dx else 0,
                                  out1=p if need_dx else None, out2=d_lin, colsum=any(need_in))
        if any(need_in):
            grads_in = rows.level_grads(sums, in_levels, need_in, **kw)
        if need_dx:
            dx = empty(dy.shape, dtype=pre.dtype, device=pre.device)
            torch.mm(p, _oi(up_w if gate_w is None else gate_w, spec), out=dx.view(M, D))
            if d_lin is not None:
                dx.view(M, D).addmm_(d_lin, _oi(up_w, spec))
            dx = dx.to(out_dtype)

    if any(need_out):
        # recompute Q = ((h - h_c) * z_in) W_down^T; per-feature sums of dy * Q
        q = torch.mm(rows.gated_rows(h, ablation, z_in, M, Fh, pre), _oi(down_w, spec).t())
        sums = rows.backward_rows(rows.tensor(q), None, rows.tensor(dy), rows.NONE, M, D, colsum=True)
        grads_out = rows.level_grads(sums, out_levels, need_out, **kw)
    return ([dx] if need_dx else []) + [g for g, n in zip(grads_in + grads_out, need_las) if n]

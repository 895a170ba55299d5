"""The masked MLP on the Triton kernels: the host wrappers the custom ops call (function.py).

Forward: the up (and gate) projections are ordinary GEMMs; one elementwise pass writes h - h_c
(h = act(pre) * lin) as a transient, and the down projection runs on the gated GEMM with a plain K loop
(the hidden-unit gates folded into a transient copy of the down weight, the output gates and y_c in the
epilogue). Backward: one gated GEMM against the down weight (the output gates folded in) gives dh and, in
its epilogue, d pre, d lin and the hidden-unit gate sums (h rebuilt there from the saved pre-activations);
a second recomputes the masked product from a rebuilt h - h_c for the output-gate sums;
dx = d pre W_pre + d lin W_lin by ordinary GEMMs. Only pre and lin are saved.
"""
from __future__ import annotations

import torch

from ...utils.alloc import empty
from ..gated_gemm import (fold_weight, gated_matmul, hidden_delta, hidden_operand, level_grads, stack_gates,
                          tensor_operand, vector_operand, weight_operand)
from .function import corrupted_hidden, pre_lin, project, rows
from .reference import ACT_IDS


def _hidden_ablation(hidden_ablate, pre_lin_c, h_cached, M, Fh):
    """h_c as an operand: cached [..., d_ff], rebuilt from the corrupted (pre, lin), a [d_ff] mean, a per-token
    tensor, or None (zero ablation)."""
    if h_cached is not None:
        return tensor_operand(h_cached, M, Fh)
    if pre_lin_c is not None:
        return hidden_operand(*(rows(t, Fh) for t in pre_lin_c))
    if hidden_ablate is not None:
        return vector_operand(hidden_ablate) if hidden_ablate.dim() == 1 else tensor_operand(hidden_ablate, M, Fh)
    return None


def forward(x, up_w, down_w, gate_w, up_b, gate_b, down_b, hidden_ablate, x_corrupt, las, spec):
    """(y' [..., d_model], pre, lin or None, h_c or None): y' and what the backward keeps, pre and lin
    [..., d_ff] (lin for a gated MLP only), and the corrupted hidden units when ``cache_corrupt_hidden``."""
    D, Fh = spec.d_model, spec.d_ff
    z_in, z_out, _, _ = stack_gates(spec, las, spec.d_ff, spec.d_model, x.device)
    act = dict(act=ACT_IDS[spec.activation], glu=gate_w is not None)
    pre, lin = pre_lin(x, up_w, gate_w, up_b, gate_b, spec)
    M = x.shape[:-1].numel()

    pre_lin_c, h_cached = corrupted_hidden(x_corrupt, up_w, gate_w, up_b, gate_b, spec)
    ac = _hidden_ablation(hidden_ablate, pre_lin_c, h_cached, M, Fh)
    if x_corrupt is not None:
        # y_c = h_c W_down^T + b_down, h_c written once (transient) or read from the cache
        h_c = h_cached.reshape(M, Fh) if h_cached is not None else hidden_delta(*(rows(t, Fh) for t in pre_lin_c),
                                                                                None, **act)
        yc = tensor_operand(project(h_c.to(down_w.dtype), down_w, down_b, spec.out_in), M, D)
    elif hidden_ablate is not None:
        y_c = project(hidden_ablate, down_w, down_b, spec.out_in)
        yc = vector_operand(y_c) if y_c.dim() == 1 else tensor_operand(y_c, M, D)
    else:
        yc = vector_operand(down_b) if down_b is not None else None

    y = empty(x.shape, dtype=x.dtype, device=x.device)
    delta = hidden_delta(rows(pre, Fh), rows(lin, Fh), ac, **act)
    w_in = fold_weight(down_w, z_in, out_in=spec.out_in, side="in")
    gated_matmul(tensor_operand(delta, M, Fh), weight_operand(w_in, spec.out_in, "KN"), M, Fh, D, zc=z_out,
                 out=y.view(M, D), yc=yc)
    return y, pre, lin, h_cached


def backward(dy, pre, lin, up_w, down_w, gate_w, up_b, gate_b, hidden_ablate, x_corrupt, h_cached, las,
             spec, need_dx: bool, need_las) -> list:
    """[dx if ``need_dx``] + [d log_alpha of each level whose ``need_las`` flag is set], with h rebuilt from
    the saved pre-activations."""
    D, Fh = spec.d_model, spec.d_ff
    z_in, z_out, in_levels, out_levels = stack_gates(spec, las, spec.d_ff, spec.d_model, dy.device)
    n_lvl_in = len(in_levels)
    need_in, need_out = need_las[:n_lvl_in], need_las[n_lvl_in:]
    act = dict(act=ACT_IDS[spec.activation], glu=gate_w is not None)
    kw = dict(seed=spec.seed, training=spec.training)
    M = dy.shape[:-1].numel()
    h_op = hidden_operand(rows(pre, Fh), rows(lin, Fh))
    dy_op = tensor_operand(dy, M, D)

    ablation = None  # h_c: rebuilt from the corrupted input (two GEMMs) unless cached in the forward
    if any(need_las):
        pre_lin_c = pre_lin(x_corrupt, up_w, gate_w, up_b, gate_b, spec) if x_corrupt is not None else None
        ablation = _hidden_ablation(hidden_ablate, pre_lin_c, h_cached, M, Fh)

    dx, grads_in, grads_out = None, [None] * n_lvl_in, [None] * len(out_levels)
    if need_dx or any(need_in):
        # P = dy (diag(z_out) W_down); dh = P * z_in -> d pre, d lin; per-unit sums of P * (h - h_c)
        d_pre = empty((M, Fh), dtype=pre.dtype, device=pre.device) if need_dx else None
        d_lin = empty((M, Fh), dtype=pre.dtype, device=pre.device) if need_dx and lin is not None else None
        w_out = fold_weight(down_w, z_out, out_in=spec.out_in, side="out")
        part = gated_matmul(dy_op, weight_operand(w_out, spec.out_in, "NK"), M, D, Fh, zc=z_in, out=d_pre,
                            out2=d_lin, e=h_op, ec=ablation, out_kind=1 if need_dx else 0, colsum=any(need_in),
                            **act)
        if any(need_in):
            grads_in = level_grads(part.sum(0), in_levels, need_in, **kw)
        if need_dx:
            w_pre = up_w if gate_w is None else gate_w
            oi = (lambda w: w) if spec.out_in else (lambda w: w.t())  # [d_ff, d_model] views
            dx = empty(dy.shape, dtype=pre.dtype, device=pre.device)
            torch.mm(d_pre, oi(w_pre), out=dx.view(M, D))
            if d_lin is not None:
                dx.view(M, D).addmm_(d_lin, oi(up_w))

    if any(need_out):
        # recompute Q = (h - h_c) (W_down diag(z_in))^T from a transient h - h_c; per-feature sums of dy * Q
        delta = hidden_delta(rows(pre, Fh), rows(lin, Fh), ablation, **act)
        w_in = fold_weight(down_w, z_in, out_in=spec.out_in, side="in")
        part = gated_matmul(tensor_operand(delta, M, Fh), weight_operand(w_in, spec.out_in, "KN"), M, Fh, D,
                            e=dy_op)
        grads_out = level_grads(part.sum(0), out_levels, need_out, **kw)
    return ([dx] if need_dx else []) + [g for g, n in zip(grads_in + grads_out, need_las) if n]

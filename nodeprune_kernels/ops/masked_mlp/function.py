"""Host wrapper and autograd Function of the fused masked MLP (Triton backend).

Forward: the up (and gate) projections are ordinary GEMMs; the down projection runs on the gated GEMM with
the hidden units h = act(pre) * lin built in its prologue, so h never reaches global memory. Saved: pre and
lin only (the pre-activation alone for a non-gated MLP), plus the ablation input and the gate parameters.
Backward: one gated GEMM against the down weight gives dh and, in its epilogue, d pre, d lin and the
hidden-unit gate sums; a second recomputes the masked product for the output-gate sums; dx = d pre W_pre +
d lin W_lin by ordinary GEMMs.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from ...utils.alloc import empty
from ..gate_stack import StackSpec
from ..gated_gemm import (gated_matmul, hidden_operand, level_grads, tensor_operand, vector_operand,
                          weight_operand)
from ..gated_gemm.kernels import ACT_GELU, ACT_GELU_TANH, ACT_RELU, ACT_SILU
from ..slow_path import reference_param_grads
from .reference import ACTIVATIONS, masked_mlp_reference

ACT_IDS = {"silu": ACT_SILU, "gelu": ACT_GELU, "gelu_tanh": ACT_GELU_TANH, "relu": ACT_RELU}


@dataclass(frozen=True)
class Spec(StackSpec):
    """Everything about a masked_mlp call that is not a tensor."""

    d_model: int
    d_ff: int
    activation: str  # canonical name
    out_in: bool
    cache_corrupt_hidden: bool
    save_input: bool  # a weight or bias requires grad: keep x for the (slow) reference backward


def _project(x, weight, bias, out_in):
    return F.linear(x, weight if out_in else weight.t(), bias)


def _pre_lin(x, up_w, gate_w, up_b, gate_b, spec: Spec):
    """[M, d_ff] pre-activations (x W_gate^T or, non-gated, x W_up^T) and the linear factor (gated only)."""
    if gate_w is None:
        return _project(x, up_w, up_b, spec.out_in).reshape(-1, spec.d_ff), None
    pre = _project(x, gate_w, gate_b, spec.out_in).reshape(-1, spec.d_ff)
    return pre, _project(x, up_w, up_b, spec.out_in).reshape(-1, spec.d_ff)


def _hidden_eager(pre, lin, spec: Spec):
    h = ACTIVATIONS[spec.activation](pre.float())
    return (h if lin is None else h * lin.float()).to(pre.dtype)


def _hidden_ablation(hidden_ablate, pre_lin_c, h_cached, M, Fh):
    """h_c as an operand: cached [M, d_ff], rebuilt from the corrupted (pre, lin), a [d_ff] mean, a per-token
    tensor, or None (zero ablation)."""
    if h_cached is not None:
        return tensor_operand(h_cached, M, Fh)
    if pre_lin_c is not None:
        return hidden_operand(*pre_lin_c)
    if hidden_ablate is not None:
        return vector_operand(hidden_ablate) if hidden_ablate.dim() == 1 else tensor_operand(hidden_ablate, M, Fh)
    return None


class MaskedMLPFunction(torch.autograd.Function):
    """y' = y_c + z_out * (((h - h_c) * z_in) W_down^T) with h rebuilt from the saved pre-activations."""

    @staticmethod
    def forward(ctx, x, up_w, down_w, gate_w, up_b, gate_b, down_b, hidden_ablate, x_corrupt, spec: Spec,
                *log_alphas):
        D, Fh = spec.d_model, spec.d_ff
        in_levels, out_levels = spec.levels(log_alphas)
        act = dict(act=ACT_IDS[spec.activation], glu=gate_w is not None, seed=spec.seed, training=spec.training)
        pre, lin = _pre_lin(x, up_w, gate_w, up_b, gate_b, spec)
        M = pre.shape[0]
        down_kn = weight_operand(down_w, spec.out_in, "KN")

        h_cached = pre_lin_c = None
        if x_corrupt is not None:
            pre_lin_c = _pre_lin(x_corrupt, up_w, gate_w, up_b, gate_b, spec)
            if spec.cache_corrupt_hidden:
                h_cached, pre_lin_c = _hidden_eager(*pre_lin_c, spec), None
        ac = _hidden_ablation(hidden_ablate, pre_lin_c, h_cached, M, Fh)
        if x_corrupt is not None:
            # y_c = h_c W_down^T + b_down, with h_c built in the prologue (or read from the cache)
            y_c = empty((M, D), dtype=x.dtype, device=x.device)
            gated_matmul(ac, down_kn, M, Fh, D, out=y_c,
                         yc=vector_operand(down_b) if down_b is not None else None, **act)
            yc = tensor_operand(y_c, M, D)
        elif hidden_ablate is not None:
            y_c = _project(hidden_ablate, down_w, down_b, spec.out_in)
            yc = vector_operand(y_c) if y_c.dim() == 1 else tensor_operand(y_c, M, D)
        else:
            yc = vector_operand(down_b) if down_b is not None else None

        y = empty((M, D), dtype=x.dtype, device=x.device)
        gated_matmul(hidden_operand(pre, lin), down_kn, M, Fh, D, ac=ac, r_levels=in_levels, c_levels=out_levels,
                     out=y, yc=yc, **act)
        ctx.spec = spec
        ctx.save_for_backward(x if spec.save_input else None, pre, lin, up_w, down_w, gate_w, up_b, gate_b, down_b,
                              hidden_ablate, None if spec.cache_corrupt_hidden else x_corrupt, h_cached, *log_alphas)
        return y.view(*x.shape[:-1], D)

    @staticmethod
    def backward(ctx, dy):
        spec: Spec = ctx.spec
        x, pre, lin, up_w, down_w, gate_w, up_b, gate_b, down_b, hidden_ablate, x_corrupt, h_cached, *las = \
            ctx.saved_tensors
        D, Fh = spec.d_model, spec.d_ff
        in_levels, out_levels = spec.levels(las)
        n_lvl_in = len(in_levels)
        need = ctx.needs_input_grad
        need_dx, need_in, need_out = need[0], need[10:10 + n_lvl_in], need[10 + n_lvl_in:]
        act = dict(act=ACT_IDS[spec.activation], glu=gate_w is not None, seed=spec.seed, training=spec.training)
        M = pre.shape[0]
        h_op = hidden_operand(pre, lin)
        dy_op = tensor_operand(dy, M, D)

        ablation = None  # h_c: rebuilt from the corrupted input (two GEMMs) unless cached in the forward
        if any(need_in) or any(need_out):
            pre_lin_c = _pre_lin(x_corrupt, up_w, gate_w, up_b, gate_b, spec) if x_corrupt is not None else None
            ablation = _hidden_ablation(hidden_ablate, pre_lin_c, h_cached, M, Fh)

        dx, grads_in, grads_out = None, [None] * n_lvl_in, [None] * len(out_levels)
        if need_dx or any(need_in):
            # P = (dy * z_out) W_down; dh = P * z_in -> d pre, d lin; per-unit sums of P * (h - h_c)
            d_pre = empty((M, Fh), dtype=pre.dtype, device=pre.device) if need_dx else None
            d_lin = empty((M, Fh), dtype=pre.dtype, device=pre.device) if need_dx and lin is not None else None
            part = gated_matmul(dy_op, weight_operand(down_w, spec.out_in, "NK"), M, D, Fh, r_levels=out_levels,
                                c_levels=in_levels, out=d_pre, out2=d_lin, e=h_op, ec=ablation,
                                out_kind=1 if need_dx else 0, colsum=any(need_in), **act)
            if any(need_in):
                grads_in = level_grads(part.sum(0), in_levels, need_in, seed=spec.seed, training=spec.training)
            if need_dx:
                w_pre = up_w if gate_w is None else gate_w
                oi = (lambda w: w) if spec.out_in else (lambda w: w.t())  # [d_ff, d_model] views
                dx = d_pre @ oi(w_pre)
                if d_lin is not None:
                    dx.addmm_(d_lin, oi(up_w))
                dx = dx.view(*dy.shape[:-1], D)

        if any(need_out):
            # recompute Q = ((h - h_c) * z_in) W_down^T; per-feature sums of dy * Q
            part = gated_matmul(h_op, weight_operand(down_w, spec.out_in, "KN"), M, Fh, D, ac=ablation,
                                r_levels=in_levels, e=dy_op, **act)
            grads_out = level_grads(part.sum(0), out_levels, need_out, seed=spec.seed, training=spec.training)

        params = [None] * 6
        if any(need[1:7]):
            params = _parameter_grads(spec, x, (up_w, down_w, gate_w, up_b, gate_b, down_b), need[1:7],
                                      hidden_ablate, x_corrupt, h_cached, las, dy)
        return (dx, *params, None, None, None, *grads_in, *grads_out)


def _parameter_grads(spec: Spec, x, params, need, hidden_ablate, x_corrupt, h_cached, las, dy):
    """Weight and bias gradients through the reference (see ops/slow_path.py)."""

    def run(in_gates, out_gates, up_w, down_w, gate_w, up_b, gate_b, down_b):
        return masked_mlp_reference(
            x.detach(), up_w, down_w, gate_weight=gate_w, up_bias=up_b, gate_bias=gate_b, down_bias=down_b,
            activation=spec.activation, in_gates=in_gates, out_gates=out_gates,
            hidden_ablate=h_cached if h_cached is not None else hidden_ablate, x_corrupt=x_corrupt, seed=spec.seed,
            training=spec.training, weight_layout="out_in" if spec.out_in else "in_out")

    return reference_param_grads("masked_mlp", spec, las, params, need, dy, run)

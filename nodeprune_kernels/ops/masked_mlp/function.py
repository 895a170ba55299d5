"""The fused masked MLP (Triton backend): host wrapper, custom ops and autograd formula.

Forward: the up (and gate) projections are ordinary GEMMs; the down projection runs on the gated GEMM with
the hidden units h = act(pre) * lin built in its prologue, so h never reaches global memory. Saved: pre and
lin only (the pre-activation alone for a non-gated MLP), plus the ablation input and the gate parameters.
Backward: one gated GEMM against the down weight gives dh and, in its epilogue, d pre, d lin and the
hidden-unit gate sums; a second recomputes the masked product for the output-gate sums; dx = d pre W_pre +
d lin W_lin by ordinary GEMMs.

``nodeprune::masked_mlp`` runs :func:`forward` and returns y' with the tensors the backward needs (pre,
lin, the cached h_c); ``nodeprune::masked_mlp_backward`` runs :func:`backward`.
:func:`nodeprune_kernels.masked_mlp` validates its arguments and calls the first; eagerly and under
``torch.compile`` alike (ops/custom_ops.py).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch
import torch.nn.functional as F

from ...utils.alloc import empty
from ..custom_ops import check_finite, input_grads, op_name, split_grads
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


def _spec(up_w, in_groups, in_offsets, out_groups, out_offsets, seed, training, activation, out_in,
          cache_corrupt_hidden) -> Spec:
    """The Spec of a custom op's arguments."""
    d_ff, d_model = up_w.shape if out_in else up_w.shape[::-1]
    return Spec(d_model=d_model, d_ff=d_ff, activation=activation, out_in=out_in,
                cache_corrupt_hidden=cache_corrupt_hidden,
                **Spec.fields(in_groups, in_offsets, out_groups, out_offsets, seed, training))


def _project(x, weight, bias, out_in):
    return F.linear(x, weight if out_in else weight.t(), bias)


def _pre_lin(x, up_w, gate_w, up_b, gate_b, spec: Spec):
    """[..., d_ff] pre-activations (x W_gate^T or, non-gated, x W_up^T) and the linear factor (gated only)."""
    if gate_w is None:
        return _project(x, up_w, up_b, spec.out_in).contiguous(), None
    pre = _project(x, gate_w, gate_b, spec.out_in).contiguous()
    return pre, _project(x, up_w, up_b, spec.out_in).contiguous()


def _rows(t, n):
    """A [..., n] tensor (or None) as [M, n] rows."""
    return None if t is None else t.reshape(-1, n)


def _hidden_eager(pre, lin, spec: Spec):
    h = ACTIVATIONS[spec.activation](pre.float())
    return (h if lin is None else h * lin.float()).to(pre.dtype)


def _hidden_ablation(hidden_ablate, pre_lin_c, h_cached, M, Fh):
    """h_c as an operand: cached [..., d_ff], rebuilt from the corrupted (pre, lin), a [d_ff] mean, a per-token
    tensor, or None (zero ablation)."""
    if h_cached is not None:
        return tensor_operand(h_cached, M, Fh)
    if pre_lin_c is not None:
        return hidden_operand(*(_rows(t, Fh) for t in pre_lin_c))
    if hidden_ablate is not None:
        return vector_operand(hidden_ablate) if hidden_ablate.dim() == 1 else tensor_operand(hidden_ablate, M, Fh)
    return None


# ---------------------------------------------------------------------------------------------------------
# host wrappers


def forward(x, up_w, down_w, gate_w, up_b, gate_b, down_b, hidden_ablate, x_corrupt, las, spec: Spec):
    """(y' [..., d_model], pre, lin or None, h_c or None): y' and what the backward keeps, pre and lin
    [..., d_ff] (lin for a gated MLP only), and the corrupted hidden units when ``cache_corrupt_hidden``."""
    D, Fh = spec.d_model, spec.d_ff
    in_levels, out_levels = spec.levels(las)
    act = dict(act=ACT_IDS[spec.activation], glu=gate_w is not None, seed=spec.seed, training=spec.training)
    pre, lin = _pre_lin(x, up_w, gate_w, up_b, gate_b, spec)
    M = x.shape[:-1].numel()
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

    y = empty(x.shape, dtype=x.dtype, device=x.device)
    gated_matmul(hidden_operand(_rows(pre, Fh), _rows(lin, Fh)), down_kn, M, Fh, D, ac=ac, r_levels=in_levels,
                 c_levels=out_levels, out=y.view(M, D), yc=yc, **act)
    return y, pre, lin, h_cached


def backward(dy, pre, lin, up_w, down_w, gate_w, up_b, gate_b, hidden_ablate, x_corrupt, h_cached, las,
             spec: Spec, need_dx: bool, need_las) -> list:
    """[dx if ``need_dx``] + [d log_alpha of each level whose ``need_las`` flag is set], with h rebuilt from
    the saved pre-activations."""
    D, Fh = spec.d_model, spec.d_ff
    in_levels, out_levels = spec.levels(las)
    n_lvl_in = len(in_levels)
    need_in, need_out = need_las[:n_lvl_in], need_las[n_lvl_in:]
    act = dict(act=ACT_IDS[spec.activation], glu=gate_w is not None, seed=spec.seed, training=spec.training)
    M = dy.shape[:-1].numel()
    h_op = hidden_operand(_rows(pre, Fh), _rows(lin, Fh))
    dy_op = tensor_operand(dy, M, D)

    ablation = None  # h_c: rebuilt from the corrupted input (two GEMMs) unless cached in the forward
    if any(need_las):
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
            dx = empty(dy.shape, dtype=pre.dtype, device=pre.device)
            torch.mm(d_pre, oi(w_pre), out=dx.view(M, D))
            if d_lin is not None:
                dx.view(M, D).addmm_(d_lin, oi(up_w))

    if any(need_out):
        # recompute Q = ((h - h_c) * z_in) W_down^T; per-feature sums of dy * Q
        part = gated_matmul(h_op, weight_operand(down_w, spec.out_in, "KN"), M, Fh, D, ac=ablation,
                            r_levels=in_levels, e=dy_op, **act)
        grads_out = level_grads(part.sum(0), out_levels, need_out, seed=spec.seed, training=spec.training)
    return ([dx] if need_dx else []) + [g for g, n in zip(grads_in + grads_out, need_las) if n]


# ---------------------------------------------------------------------------------------------------------
# custom ops


@torch.library.custom_op(op_name("masked_mlp"), mutates_args=())
def masked_mlp_op(x: torch.Tensor, up_weight: torch.Tensor, down_weight: torch.Tensor,
                  gate_weight: Optional[torch.Tensor], up_bias: Optional[torch.Tensor],
                  gate_bias: Optional[torch.Tensor], down_bias: Optional[torch.Tensor],
                  hidden_ablate: Optional[torch.Tensor], x_corrupt: Optional[torch.Tensor],
                  log_alphas: list[torch.Tensor], in_groups: list[int], in_offsets: list[int], out_groups: list[int],
                  out_offsets: list[int], seed: int, training: bool, activation: str, out_in: bool,
                  cache_corrupt_hidden: bool) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """(y', pre, lin, h_c) of masked_mlp, for arguments validated there (``activation`` canonical).

    pre and lin are the [..., d_ff] pre-activations the backward keeps, h_c the corrupted hidden units
    when ``cache_corrupt_hidden``; lin (non-gated MLP) and h_c (not cached) are empty tensors when absent.
    The gate stacks are passed as in ``nodeprune::masked_linear``.
    """
    check_finite("masked_mlp", log_alphas)
    spec = _spec(up_weight, in_groups, in_offsets, out_groups, out_offsets, seed, training, activation, out_in,
                 cache_corrupt_hidden)
    y, pre, lin, h_cached = forward(x, up_weight, down_weight, gate_weight, up_bias, gate_bias, down_bias,
                                    hidden_ablate, x_corrupt, log_alphas, spec)
    return (y, pre, pre.new_empty(0) if lin is None else lin,  # outputs may not alias: two empty tensors
            pre.new_empty(0) if h_cached is None else h_cached)


@masked_mlp_op.register_fake
def _(x, up_weight, down_weight, gate_weight, up_bias, gate_bias, down_bias, hidden_ablate, x_corrupt, log_alphas,
      in_groups, in_offsets, out_groups, out_offsets, seed, training, activation, out_in, cache_corrupt_hidden):
    hidden = (*x.shape[:-1], up_weight.shape[0 if out_in else 1])
    lin = x.new_empty(hidden if gate_weight is not None else 0)
    h_cached = x.new_empty(hidden if x_corrupt is not None and cache_corrupt_hidden else 0)
    return x.new_empty(x.shape), x.new_empty(hidden), lin, h_cached


@torch.library.custom_op(op_name("masked_mlp_backward"), mutates_args=())
def masked_mlp_backward_op(dy: torch.Tensor, pre: torch.Tensor, lin: Optional[torch.Tensor], up_weight: torch.Tensor,
                           down_weight: torch.Tensor, gate_weight: Optional[torch.Tensor],
                           up_bias: Optional[torch.Tensor], gate_bias: Optional[torch.Tensor],
                           hidden_ablate: Optional[torch.Tensor], x_corrupt: Optional[torch.Tensor],
                           h_cached: Optional[torch.Tensor], log_alphas: list[torch.Tensor], in_groups: list[int],
                           in_offsets: list[int], out_groups: list[int], out_offsets: list[int], seed: int,
                           training: bool, activation: str, out_in: bool, cache_corrupt_hidden: bool, need_dx: bool,
                           need_log_alphas: list[bool]) -> list[torch.Tensor]:
    """[dx if need_dx] + [d log_alpha of each level whose need_log_alphas flag is set] of masked_mlp."""
    spec = _spec(up_weight, in_groups, in_offsets, out_groups, out_offsets, seed, training, activation, out_in,
                 cache_corrupt_hidden)
    return backward(dy, pre, lin, up_weight, down_weight, gate_weight, up_bias, gate_bias, hidden_ablate, x_corrupt,
                    h_cached, log_alphas, spec, need_dx, need_log_alphas)


@masked_mlp_backward_op.register_fake
def _(dy, pre, lin, up_weight, down_weight, gate_weight, up_bias, gate_bias, hidden_ablate, x_corrupt, h_cached,
      log_alphas, in_groups, in_offsets, out_groups, out_offsets, seed, training, activation, out_in,
      cache_corrupt_hidden, need_dx, need_log_alphas):
    return ([dy.new_empty(dy.shape)] if need_dx else []) + [la.new_empty(la.shape)
                                                            for la, n in zip(log_alphas, need_log_alphas) if n]


# ---------------------------------------------------------------------------------------------------------
# autograd: saves pre and lin (the op's extra outputs), the ablation input (the [d_ff] mean, the corrupted
# input, or the cached h_c), the weights and biases and the log_alphas; x only when a weight or bias
# requires grad (the reference backward needs it)


def _setup_context(ctx, inputs, output):
    x, up_w, down_w, gate_w, up_b, gate_b, down_b, hidden_ablate, x_corrupt, las, *stack = inputs
    _, pre, lin, h_cached = output
    ctx.mark_non_differentiable(pre, lin, h_cached)
    ctx.set_materialize_grads(False)  # no zero tensors for the gradients of pre, lin and h_c
    ctx.stack = stack  # in_groups, in_offsets, out_groups, out_offsets, seed, training, activation, out_in, cache
    cached = x_corrupt is not None and stack[-1]
    save_input = any(ctx.needs_input_grad[1:7])  # a weight or bias requires grad
    ctx.save_for_backward(x if save_input else None, pre, lin if gate_w is not None else None, up_w, down_w, gate_w,
                          up_b, gate_b, down_b, hidden_ablate, None if cached else x_corrupt,
                          h_cached if cached else None, *las)


def _backward(ctx, dy, *_):
    need = ctx.needs_input_grad  # per input; need[9] is the list of the log_alphas' flags
    if dy is None:
        return input_grads(need, {})
    x, pre, lin, up_w, down_w, gate_w, up_b, gate_b, down_b, hidden_ablate, x_corrupt, h_cached, *las = \
        ctx.saved_tensors
    need_las = list(need[9])
    result = masked_mlp_backward_op(dy, pre, lin, up_w, down_w, gate_w, up_b, gate_b, hidden_ablate, x_corrupt,
                                    h_cached, las, *ctx.stack, need[0], need_las)
    dx, dlas = split_grads(result, need[0], need_las)
    grads = {0: dx, 9: dlas}
    if any(need[1:7]):
        spec = _spec(up_w, *ctx.stack)
        params = _parameter_grads(spec, x, (up_w, down_w, gate_w, up_b, gate_b, down_b), need[1:7], hidden_ablate,
                                  x_corrupt, h_cached, las, dy)
        grads.update(zip(range(1, 7), params))
    return input_grads(need, grads)


masked_mlp_op.register_autograd(_backward, setup_context=_setup_context)


def _parameter_grads(spec: Spec, x, params, need, hidden_ablate, x_corrupt, h_cached, las, dy):
    """Weight and bias gradients through the reference (see ops/slow_path.py)."""

    def run(in_gates, out_gates, up_w, down_w, gate_w, up_b, gate_b, down_b):
        return masked_mlp_reference(
            x.detach(), up_w, down_w, gate_weight=gate_w, up_bias=up_b, gate_bias=gate_b, down_bias=down_b,
            activation=spec.activation, in_gates=in_gates, out_gates=out_gates,
            hidden_ablate=h_cached if h_cached is not None else hidden_ablate, x_corrupt=x_corrupt, seed=spec.seed,
            training=spec.training, weight_layout="out_in" if spec.out_in else "in_out")

    return reference_param_grads("masked_mlp", spec, las, params, need, dy, run)

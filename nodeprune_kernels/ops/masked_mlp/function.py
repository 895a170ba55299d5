"""The fused masked MLP as torch custom ops and their autograd formula (Triton or native kernels).

Saved for backward: pre and lin only (the pre-activation alone for a non-gated MLP), plus the ablation input
and the gate parameters; the hidden units h, h - h_c and the masked product are rebuilt in the backward.

``nodeprune::masked_mlp`` runs the host wrapper ``forward`` of triton_host.py (the gated GEMM on a transient
h - h_c) or native_host.py (csrc row passes around ATen GEMMs), as its ``impl`` argument says, and
returns y' with the tensors the backward needs (pre, lin, the cached h_c); ``nodeprune::masked_mlp_backward``
runs ``backward``.
:func:`nodeprune_kernels.masked_mlp` validates its arguments and calls the first; eagerly and under
``torch.compile`` alike (ops/custom_ops.py).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch
import torch.nn.functional as F

from ..custom_ops import check_finite, host, input_grads, op_name, split_grads
from ..gate_stack import StackSpec
from ..slow_path import reference_param_grads
from .reference import ACTIVATIONS, masked_mlp_reference


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


# helpers both host modules use


def project(x, weight, bias, out_in):
    """x W^T + b for a weight in either layout."""
    return F.linear(x, weight if out_in else weight.t(), bias)


def pre_lin(x, up_w, gate_w, up_b, gate_b, spec: Spec):
    """[..., d_ff] pre-activations (x W_gate^T or, non-gated, x W_up^T) and the linear factor (gated only)."""
    if gate_w is None:
        return project(x, up_w, up_b, spec.out_in).contiguous(), None
    pre = project(x, gate_w, gate_b, spec.out_in).contiguous()
    return pre, project(x, up_w, up_b, spec.out_in).contiguous()


def rows(t, n):
    """A [..., n] tensor (or None) as [M, n] rows."""
    return None if t is None else t.reshape(-1, n)


def corrupted_hidden(x_corrupt, up_w, gate_w, up_b, gate_b, spec: Spec):
    """The forward's interchange ablation from the corrupted MLP input: ((pre_c, lin_c), None) to rebuild
    h_c in the kernels' elementwise passes, or (None, h_c) computed once when ``cache_corrupt_hidden``; (None, None) without
    ``x_corrupt``."""
    if x_corrupt is None:
        return None, None
    pre_c, lin_c = pre_lin(x_corrupt, up_w, gate_w, up_b, gate_b, spec)
    if not spec.cache_corrupt_hidden:
        return (pre_c, lin_c), None
    h = ACTIVATIONS[spec.activation](pre_c.float())
    return None, (h if lin_c is None else h * lin_c.float()).to(pre_c.dtype)


# ---------------------------------------------------------------------------------------------------------
# custom ops


@torch.library.custom_op(op_name("masked_mlp"), mutates_args=())
def masked_mlp_op(x: torch.Tensor, up_weight: torch.Tensor, down_weight: torch.Tensor,
                  gate_weight: Optional[torch.Tensor], up_bias: Optional[torch.Tensor],
                  gate_bias: Optional[torch.Tensor], down_bias: Optional[torch.Tensor],
                  hidden_ablate: Optional[torch.Tensor], x_corrupt: Optional[torch.Tensor],
                  log_alphas: list[torch.Tensor], in_groups: list[int], in_offsets: list[int], out_groups: list[int],
                  out_offsets: list[int], seed: int, training: bool, activation: str, out_in: bool,
                  cache_corrupt_hidden: bool, impl: str) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """(y', pre, lin, h_c) of masked_mlp, for arguments validated there (``activation`` canonical).

    pre and lin are the [..., d_ff] pre-activations the backward keeps, h_c the corrupted hidden units
    when ``cache_corrupt_hidden``; lin (non-gated MLP) and h_c (not cached) are empty tensors when absent.
    The gate stacks are passed as in ``nodeprune::masked_linear``.
    """
    check_finite("masked_mlp", log_alphas)
    spec = _spec(up_weight, in_groups, in_offsets, out_groups, out_offsets, seed, training, activation, out_in,
                 cache_corrupt_hidden)
    y, pre, lin, h_cached = host(__package__, impl).forward(x, up_weight, down_weight, gate_weight, up_bias,
                                                            gate_bias, down_bias, hidden_ablate, x_corrupt,
                                                            log_alphas, spec)
    return (y, pre, pre.new_empty(0) if lin is None else lin,  # outputs may not alias: two empty tensors
            pre.new_empty(0) if h_cached is None else h_cached)


@masked_mlp_op.register_fake
def _(x, up_weight, down_weight, gate_weight, up_bias, gate_bias, down_bias, hidden_ablate, x_corrupt, log_alphas,
      in_groups, in_offsets, out_groups, out_offsets, seed, training, activation, out_in, cache_corrupt_hidden, impl):
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
                           training: bool, activation: str, out_in: bool, cache_corrupt_hidden: bool, impl: str,
                           need_dx: bool, need_log_alphas: list[bool]) -> list[torch.Tensor]:
    """[dx if need_dx] + [d log_alpha of each level whose need_log_alphas flag is set] of masked_mlp."""
    spec = _spec(up_weight, in_groups, in_offsets, out_groups, out_offsets, seed, training, activation, out_in,
                 cache_corrupt_hidden)
    return host(__package__, impl).backward(dy, pre, lin, up_weight, down_weight, gate_weight, up_bias, gate_bias,
                                            hidden_ablate, x_corrupt, h_cached, log_alphas, spec, need_dx,
                                            need_log_alphas)


@masked_mlp_backward_op.register_fake
def _(dy, pre, lin, up_weight, down_weight, gate_weight, up_bias, gate_bias, hidden_ablate, x_corrupt, h_cached,
      log_alphas, in_groups, in_offsets, out_groups, out_offsets, seed, training, activation, out_in,
      cache_corrupt_hidden, impl, need_dx, need_log_alphas):
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
    ctx.stack = stack  # in_groups, in_offsets, out_groups, out_offsets, seed, training, activation, out_in, cache,
    # impl
    cached = x_corrupt is not None and stack[-2]
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
        spec = _spec(up_w, *ctx.stack[:-1])
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

"""The masked linear: a linear layer whose input and output features carry hard-concrete gate stacks."""
from __future__ import annotations

import math
from typing import Sequence

import torch

from ...utils.amp import autocast_inputs
from ...utils.backend import resolve_backend
from ...utils.checks import check_constant, check_kernel_dtype, check_like, check_seed_offset, check_shape
from ..gate_stack import Gate, as_gates, stack_args
from .reference import masked_linear_reference

__all__ = ["masked_linear", "Gate", "masked_linear_reference"]

WEIGHT_LAYOUTS = ("out_in", "in_out")


def masked_linear(
    x: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None = None,
    *,
    in_gates: Sequence[Gate] = (),
    out_gates: Sequence[Gate] = (),
    x_ablate: torch.Tensor | None = None,
    y_ablate: torch.Tensor | None = None,
    seed: int = 0,
    training: bool = True,
    weight_layout: str = "out_in",
    backend: str = "auto",
) -> torch.Tensor:
    """A linear layer with gated input and output features and an ablation value.

    Computes ``y' = y_c + z_out * (((x - x_c) * z_in) W^T)`` with ``y_c = x_c W^T + b``: a closed input
    feature (z_in = 0) is replaced by its ablation value x_c, a closed output feature by y_c. Under zero
    ablation, closing a gate is exactly zeroing the matching weight column (input) or row (output).

    Args:
        x: [..., K] float32, float16 or bfloat16 (float64 too on the native and reference backends); any
            leading dimensions, any strides (read in place where the layout allows, e.g. two non-mergeable
            leading dimensions).
        weight: [N, K] (``weight_layout="out_in"``, nn.Linear) or [K, N] (``"in_out"``, GPT-2 Conv1D),
            x's dtype and device. Never copied to change layout.
        bias: [N] or None, x's dtype. Only used to form y_c when ``y_ablate`` is None.
        in_gates: gate stack on the K input features: a sequence of up to 4 ``Gate(log_alpha, group,
            offset)``; log_alpha is 1-D (any float dtype, finite) with ``numel * group == K``. The gate of
            feature j is the product over levels of level l's gate ``j // group_l``, whose Philox index is
            ``offset_l + j // group_l``.
        out_gates: the same for the N output features.
        x_ablate: x_c. None (zero ablation), [K] (mean ablation) or x's shape (interchange ablation).
            A constant: it must not require grad.
        y_ablate: optional precomputed y_c: [N] or [..., N] matching x's leading dimensions. When None it is
            ``x_ablate W^T + bias`` (or ``bias`` under zero ablation).
        seed: Philox key of this step's gate sample, int in [0, 2**63).
        training: sample the gates (True) or use the deterministic gates (False).
        weight_layout: "out_in" or "in_out".
        backend: "auto", "triton", "native" or "reference" (:mod:`nodeprune_kernels.utils.backend`).

    Returns:
        y': [..., N] in x's dtype (fp32 accumulation on Triton; on native the GEMM is ATen's in x's dtype). Differentiable with respect to x and every
        log_alpha; the fused backward saves only x (and x_c), and recomputes the rest. A weight or bias
        that requires grad gets a correct gradient through a slower reference path (warned once).

    torch.compile: on the Triton and native backends the op is the custom op ``nodeprune::masked_linear`` (backward:
    ``nodeprune::masked_linear_backward``), so a compiled function calling it needs no graph break
    (``fullgraph=True``) in the forward or the backward, and saves what the eager op saves. The reference
    weight and bias gradients are traced into the compiled backward too (supported, not a fallback). The
    non-finite check of the log_alphas, a data-dependent branch, runs inside the op when the graph runs.

    Under ``torch.autocast`` the op runs in the autocast dtype, as ``F.linear`` does (x, weight, bias and the
    ablation values are cast; the gates stay float32).
    """
    return masked_projection("masked_linear", x, weight, bias, feature_dims=1, in_gates=in_gates,
                             out_gates=out_gates, x_ablate=x_ablate, y_ablate=y_ablate, seed=seed, training=training,
                             weight_layout=weight_layout, backend=backend)


def masked_projection(op, x, weight, bias, *, feature_dims, in_gates, out_gates, x_ablate, y_ablate, seed,
                      training, weight_layout, backend):
    """Validate and dispatch a masked linear whose input features are x's last ``feature_dims`` dims.

    The Triton and native backends call the custom op ``nodeprune::masked_linear`` with the gate stacks as a list of
    log_alphas and lists of groups and offsets (ops/custom_ops.py); the reference backend is plain PyTorch.
    """
    if not isinstance(x, torch.Tensor) or not isinstance(weight, torch.Tensor):
        raise TypeError(f"{op}: x and weight must be tensors")
    t, no_autocast = autocast_inputs(dict(x=x, weight=weight, bias=bias, x_ablate=x_ablate, y_ablate=y_ablate))
    with no_autocast:
        return _masked_projection(op, **t, feature_dims=feature_dims, in_gates=in_gates, out_gates=out_gates,
                                  seed=seed, training=training, weight_layout=weight_layout, backend=backend)


def _masked_projection(op, x, weight, bias, x_ablate, y_ablate, *, feature_dims, in_gates, out_gates, seed,
                       training, weight_layout, backend):
    if weight_layout not in WEIGHT_LAYOUTS:
        raise ValueError(f"unknown weight_layout {weight_layout!r}; choose 'out_in' ([out, in], nn.Linear) or "
                         "'in_out' ([in, out], GPT-2 Conv1D)")
    if x.dim() < feature_dims:
        what = "its last is the input features" if feature_dims == 1 else "its last two are heads and head dims"
        raise ValueError(f"{op}: x must have at least {feature_dims} dimension(s) ({what}), got shape "
                         f"{list(x.shape)}")
    if weight.dim() != 2:
        raise ValueError(f"{op}: weight must be 2-D, got shape {tuple(weight.shape)}")
    features = tuple(x.shape[x.dim() - feature_dims:])
    lead = tuple(x.shape[:x.dim() - feature_dims])
    K = math.prod(features)
    N, K_w = weight.shape if weight_layout == "out_in" else weight.shape[::-1]
    if K_w != K:
        expect = "[N, %d]" % K if weight_layout == "out_in" else "[%d, N]" % K
        raise ValueError(f"{op}: x has {K} input features but weight has shape {tuple(weight.shape)}; "
                         f"with weight_layout={weight_layout!r} it must be {expect}")
    if not x.is_floating_point():
        raise TypeError(f"{op}: x must be floating point, got {x.dtype}")
    check_like(op, x, weight=weight, bias=bias, x_ablate=x_ablate, y_ablate=y_ablate)
    check_shape(op, "bias", bias, (N,))
    means = [(K,)] if feature_dims == 1 else [(K,), features]
    if x_ablate is not None and tuple(x_ablate.shape) not in [*means, tuple(x.shape)]:
        raise ValueError(f"{op}: x_ablate must be {' or '.join(str(list(m)) for m in means)} (mean) or x's shape "
                         f"{list(x.shape)} (interchange), got {list(x_ablate.shape)}")
    if y_ablate is not None and tuple(y_ablate.shape) not in ((N,), (*lead, N)):
        raise ValueError(f"{op}: y_ablate must be [{N}] or {[*lead, N]}, got {list(y_ablate.shape)}")
    check_constant(op, x_ablate=x_ablate, y_ablate=y_ablate)
    check_seed_offset(seed, 0, 1)
    in_gates = as_gates(in_gates, "in_gates", K, x.device, seed)
    out_gates = as_gates(out_gates, "out_gates", N, x.device, seed)

    impl = resolve_backend(backend, x.device)
    if impl == "reference":
        flat = (lambda t: t if t is None or feature_dims == 1 or t.dim() < 2 else t.flatten(-2))
        return masked_linear_reference(flat(x), weight, bias, in_gates=in_gates, out_gates=out_gates,
                                       x_ablate=flat(x_ablate), y_ablate=y_ablate, seed=seed, training=training,
                                       weight_layout=weight_layout)
    check_kernel_dtype(op, impl, x.dtype)
    from .function import masked_linear_op

    return masked_linear_op(x, weight, bias, x_ablate, y_ablate, *stack_args(in_gates, out_gates), seed,
                            bool(training), weight_layout == "out_in", feature_dims, impl)

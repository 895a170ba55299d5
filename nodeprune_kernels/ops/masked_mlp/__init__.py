"""The masked MLP: gated hidden units and output features, fused into the down projection."""
from __future__ import annotations

from typing import Sequence

import torch

from ...utils.amp import autocast_inputs
from ...utils.backend import resolve_backend
from ...utils.checks import check_constant, check_kernel_dtype, check_like, check_seed_offset, check_shape
from ..gate_stack import Gate, as_gates, stack_args
from .reference import ACTIVATIONS, ALIASES, canonical_activation, masked_mlp_reference

__all__ = ["masked_mlp", "masked_mlp_reference", "ACTIVATIONS", "ALIASES"]



def masked_mlp(
    x: torch.Tensor,
    up_weight: torch.Tensor,
    down_weight: torch.Tensor,
    *,
    gate_weight: torch.Tensor | None = None,
    up_bias: torch.Tensor | None = None,
    gate_bias: torch.Tensor | None = None,
    down_bias: torch.Tensor | None = None,
    activation: str = "silu",
    in_gates: Sequence[Gate] = (),
    out_gates: Sequence[Gate] = (),
    hidden_ablate: torch.Tensor | None = None,
    x_corrupt: torch.Tensor | None = None,
    cache_corrupt_hidden: bool = False,
    seed: int = 0,
    training: bool = True,
    weight_layout: str = "out_in",
    backend: str = "auto",
) -> torch.Tensor:
    """An MLP block with gated hidden units (mlp_neuron, mlp, layer) and gated output features (mlp_out).

    With h the hidden units (``act(x W_gate^T + b_gate) * (x W_up^T + b_up)`` when ``gate_weight`` is given:
    SwiGLU, GeGLU; else ``act(x W_up^T + b_up)``: GPT-2, GPT-NeoX) it computes
    ``y' = y_c + z_out * (((h - h_c) * z_in) W_down^T)`` with ``y_c = h_c W_down^T + b_down``. A closed
    hidden unit is replaced by its ablation value h_c, a closed output feature by y_c; under zero ablation
    closing a gate is exactly zeroing the matching column or row of W_down.

    Memory: the fused backward saves the pre-activations only (gate and up projections of a gated MLP,
    the pre-activation of a non-gated one): h, h - h_c and the masked product are rebuilt in registers.

    Args:
        x: [..., d_model] float32, float16 or bfloat16 (float64 too on the native and reference backends),
            the MLP's input.
        up_weight: [d_ff, d_model] (``weight_layout="out_in"``, nn.Linear) or [d_model, d_ff] (``"in_out"``,
            GPT-2 Conv1D c_fc). For a non-gated MLP this is the first (c_fc / dense_h_to_4h) projection.
        down_weight: [d_model, d_ff] ("out_in") or [d_ff, d_model] ("in_out").
        gate_weight: like up_weight, or None for a non-gated MLP.
        up_bias, gate_bias: [d_ff] or None. down_bias: [d_model] or None. All tensors share x's dtype and
            device.
        activation: "silu" (SwiGLU), "gelu" (exact), "gelu_tanh" (tanh approximation) or "relu"; Hugging
            Face's names "swish", "gelu_new", "gelu_pytorch_tanh" and "gelu_fast" are accepted too.
        in_gates: gate stack on the d_ff hidden units (see :func:`nodeprune_kernels.masked_linear`), e.g.
            ``[Gate(layer_la, d_ff, i), Gate(mlp_la, d_ff, j), Gate(neuron_la, 1, k)]``.
        out_gates: gate stack on the d_model output features (mlp_out).
        hidden_ablate: h_c given directly: [d_ff] (mean ablation: the hidden units' mean over a reference
            set) or [..., d_ff] like h (interchange with the corrupted hidden units already at hand).
        x_corrupt: interchange ablation from the corrupted run's MLP input, x's shape: h_c is rebuilt from it
            (in the forward and again in the backward), so only this d_model vector per token is saved.
        cache_corrupt_hidden: with ``x_corrupt``, build h_c once in the forward and save it instead
            (d_ff values per token more memory, two GEMMs less in the backward). For when memory is
            plentiful and speed matters more.
        seed: Philox key of this step's gate sample, int in [0, 2**63).
        training: sample the gates (True) or use the deterministic gates (False).
        weight_layout: "out_in" or "in_out", for all three weights.
        backend: "auto", "triton", "native" or "reference" (:mod:`nodeprune_kernels.utils.backend`).

    Returns:
        y': [..., d_model] in x's dtype. Differentiable with respect to x and every log_alpha (weights
        that require grad get a correct gradient through the slower reference path, warned once).

    torch.compile: on the Triton and native backends the op is the custom op ``nodeprune::masked_mlp`` (backward:
    ``nodeprune::masked_mlp_backward``), so a compiled function calling it needs no graph break
    (``fullgraph=True``) in the forward or the backward, and saves what the eager op saves. The reference
    weight and bias gradients are traced into the compiled backward too (supported, not a fallback). The
    non-finite check of the log_alphas runs inside the op when the graph runs.

    Under ``torch.autocast`` the op runs in the autocast dtype, as ``F.linear`` does (x, the weights, biases
    and ablation values are cast; the gates stay float32).
    """
    t, no_autocast = autocast_inputs(dict(x=x, up_weight=up_weight, down_weight=down_weight, gate_weight=gate_weight,
                                          up_bias=up_bias, gate_bias=gate_bias, down_bias=down_bias,
                                          hidden_ablate=hidden_ablate, x_corrupt=x_corrupt))
    with no_autocast:
        return _masked_mlp(**t, activation=activation, in_gates=in_gates, out_gates=out_gates,
                           cache_corrupt_hidden=cache_corrupt_hidden, seed=seed, training=training,
                           weight_layout=weight_layout, backend=backend)


def _masked_mlp(x, up_weight, down_weight, *, gate_weight, up_bias, gate_bias, down_bias, activation, in_gates,
                out_gates, hidden_ablate, x_corrupt, cache_corrupt_hidden, seed, training, weight_layout, backend):
    op = "masked_mlp"
    if not all(isinstance(t, torch.Tensor) for t in (x, up_weight, down_weight)):
        raise TypeError(f"{op}: x, up_weight and down_weight must be tensors")
    if weight_layout not in ("out_in", "in_out"):
        raise ValueError(f"unknown weight_layout {weight_layout!r}; choose 'out_in' ([out, in], nn.Linear) or "
                         "'in_out' ([in, out], GPT-2 Conv1D)")
    activation = canonical_activation(activation)
    if x.dim() < 1 or not x.is_floating_point():
        raise TypeError(f"{op}: x must be a floating-point tensor [..., d_model], got {x.dtype} {list(x.shape)}")
    check_like(op, x, up_weight=up_weight, down_weight=down_weight, gate_weight=gate_weight, up_bias=up_bias,
               gate_bias=gate_bias, down_bias=down_bias, hidden_ablate=hidden_ablate, x_corrupt=x_corrupt)
    for name, w in (("up_weight", up_weight), ("down_weight", down_weight), ("gate_weight", gate_weight)):
        if w is not None and w.dim() != 2:
            raise ValueError(f"{op}: {name} must be 2-D, got shape {list(w.shape)}")
    d_model = x.shape[-1]
    out_in = weight_layout == "out_in"
    d_ff = up_weight.shape[0] if out_in else up_weight.shape[1]
    proj, down = ((d_ff, d_model), (d_model, d_ff)) if out_in else ((d_model, d_ff), (d_ff, d_model))
    where = f"for x with d_model={d_model} and d_ff={d_ff} (from up_weight), weight_layout={weight_layout!r}"
    for name, w, shape in (("up_weight", up_weight, proj), ("gate_weight", gate_weight, proj),
                           ("down_weight", down_weight, down)):
        if w is not None and tuple(w.shape) != shape:
            raise ValueError(f"{op}: {name} has shape {list(w.shape)}; {where} it must be {list(shape)}")
    check_shape(op, "up_bias", up_bias, (d_ff,))
    check_shape(op, "gate_bias", gate_bias, (d_ff,))
    check_shape(op, "down_bias", down_bias, (d_model,))
    if gate_bias is not None and gate_weight is None:
        raise ValueError(f"{op}: gate_bias without gate_weight; a non-gated MLP has only up_bias and down_bias")
    if hidden_ablate is not None and x_corrupt is not None:
        raise ValueError(f"{op}: give either hidden_ablate (h_c itself) or x_corrupt (h_c rebuilt from the "
                         "corrupted input), not both")
    check_shape(op, "hidden_ablate", hidden_ablate, (d_ff,), (*x.shape[:-1], d_ff))
    check_shape(op, "x_corrupt", x_corrupt, x.shape)
    check_constant(op, hidden_ablate=hidden_ablate, x_corrupt=x_corrupt)
    if cache_corrupt_hidden and x_corrupt is None:
        raise ValueError(f"{op}: cache_corrupt_hidden=True caches the hidden units rebuilt from x_corrupt; it "
                         "needs x_corrupt (interchange ablation)")
    check_seed_offset(seed, 0, 1)
    in_gates = as_gates(in_gates, "in_gates", d_ff, x.device, seed)
    out_gates = as_gates(out_gates, "out_gates", d_model, x.device, seed)

    weights = dict(gate_weight=gate_weight, up_bias=up_bias, gate_bias=gate_bias, down_bias=down_bias,
                   activation=activation, weight_layout=weight_layout)
    impl = resolve_backend(backend, x.device)
    if impl == "reference":
        return masked_mlp_reference(x, up_weight, down_weight, in_gates=in_gates, out_gates=out_gates,
                                    hidden_ablate=hidden_ablate, x_corrupt=x_corrupt, seed=seed, training=training,
                                    **weights)
    check_kernel_dtype(op, impl, x.dtype)
    from .function import masked_mlp_op

    y, *_ = masked_mlp_op(x, up_weight, down_weight, gate_weight, up_bias, gate_bias, down_bias, hidden_ablate,
                          x_corrupt, *stack_args(in_gates, out_gates), seed, bool(training), activation, out_in,
                          bool(cache_corrupt_hidden), impl)
    return y

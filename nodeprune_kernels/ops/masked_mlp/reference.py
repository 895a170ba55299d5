"""Plain-PyTorch masked MLP: the truth the fused kernels are tested against.

    h = act(x W_gate^T + b_gate) * (x W_up^T + b_up)       (gated: SwiGLU, GeGLU)
    h = act(x W_up^T + b_up)                               (non-gated: GPT-2, GPT-NeoX)
    y' = y_c + z_out * (((h - h_c) * z_in) W_down^T),      y_c = h_c W_down^T + b_down

The hidden units carry the input gates (layer, mlp block, mlp_neuron), the output features the output gates
(mlp_out). h_c is zero, a mean over a reference set, or the hidden units of the corrupted input.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from ..masked_linear.reference import masked_linear_reference

ACTIVATIONS = {
    "silu": F.silu,
    "gelu": F.gelu,
    "gelu_tanh": lambda t: F.gelu(t, approximate="tanh"),
    "relu": F.relu,
}
# the kernels' activation ids (ops/gated_gemm/kernels.py ACT_*, csrc/masked_rows.cpp enum Act)
ACT_IDS = {"silu": 1, "gelu": 2, "gelu_tanh": 3, "relu": 4}
# Hugging Face config names (hidden_act / hidden_activation) of the same functions
ALIASES = {"swish": "silu", "gelu_new": "gelu_tanh", "gelu_pytorch_tanh": "gelu_tanh", "gelu_fast": "gelu_tanh"}


def canonical_activation(name: str) -> str:
    """The activation's canonical name; raises ValueError listing the supported names."""
    key = ALIASES.get(name, name) if isinstance(name, str) else None
    if key not in ACTIVATIONS:
        raise ValueError(f"unknown MLP activation {name!r}; supported: {', '.join(ACTIVATIONS)} (and the Hugging "
                         f"Face names {', '.join(ALIASES)})")
    return key


def _linear(x, weight, bias, weight_layout):
    return F.linear(x, weight if weight_layout == "out_in" else weight.t(), bias)


def mlp_hidden_reference(x, up_weight, *, gate_weight=None, up_bias=None, gate_bias=None, activation="silu",
                         weight_layout="out_in"):
    """The hidden units h [..., d_ff] of the MLP input x [..., d_model]."""
    act = ACTIVATIONS[canonical_activation(activation)]
    if gate_weight is None:
        return act(_linear(x, up_weight, up_bias, weight_layout))
    return act(_linear(x, gate_weight, gate_bias, weight_layout)) * _linear(x, up_weight, up_bias, weight_layout)


def masked_mlp_reference(x, up_weight, down_weight, *, gate_weight=None, up_bias=None, gate_bias=None,
                         down_bias=None, activation="silu", in_gates=(), out_gates=(), hidden_ablate=None,
                         x_corrupt=None, cache_corrupt_hidden=False, seed=0, training=True,
                         weight_layout="out_in"):
    """Same contract as :func:`nodeprune_kernels.masked_mlp`, written the obvious way (computes in x's dtype)."""
    hidden = dict(gate_weight=gate_weight, up_bias=up_bias, gate_bias=gate_bias, activation=activation,
                  weight_layout=weight_layout)
    h = mlp_hidden_reference(x, up_weight, **hidden)
    h_c = hidden_ablate
    if x_corrupt is not None:
        with torch.no_grad():
            h_c = mlp_hidden_reference(x_corrupt, up_weight, **hidden)
    return masked_linear_reference(h, down_weight, down_bias, in_gates=in_gates, out_gates=out_gates, x_ablate=h_c,
                                   seed=seed, training=training, weight_layout=weight_layout)

"""Plain-PyTorch masked linear: the truth the fused kernels are tested against.

    y' = y_c + z_out * (((x - x_c) * z_in) W^T),   y_c = x_c W^T + b

with z_in / z_out the product over the levels of a gate stack, each level's gate broadcast over
contiguous groups of features (docs/design.md, section 4). Autograd differentiates everything here.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from ..gate_stack import MAX_LEVELS, Gate, feature_gates_reference  # noqa: F401  (re-exported)


def masked_linear_reference(x, weight, bias=None, *, in_gates=(), out_gates=(), x_ablate=None, y_ablate=None,
                            seed=0, training=True, weight_layout="out_in"):
    """Same contract as :func:`nodeprune_kernels.masked_linear`, written the obvious way.

    Computes in the inputs' dtype; the gates in log_alpha's dtype, then cast to it.
    """
    w = weight if weight_layout == "out_in" else weight.t()  # [N, K] view
    n_out, n_in = w.shape
    z_in = feature_gates_reference(in_gates, n_in, seed, training)
    z_out = feature_gates_reference(out_gates, n_out, seed, training)
    delta = x if x_ablate is None else x - x_ablate
    if z_in is not None:
        delta = delta * z_in.to(x.dtype)
    y = F.linear(delta, w)
    if z_out is not None:
        y = y * z_out.to(x.dtype)
    if y_ablate is not None:
        y_c = y_ablate
    elif x_ablate is not None:
        y_c = F.linear(x_ablate, w, bias)
    else:
        y_c = bias
    return y if y_c is None else y + y_c

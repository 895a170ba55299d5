"""Plain-PyTorch masked attention output projection: the masked linear on the heads' concatenated outputs."""
from __future__ import annotations

from ..masked_linear.reference import masked_linear_reference


def masked_attn_out_proj_reference(attn_output, weight, bias=None, *, in_gates=(), out_gates=(), x_ablate=None,
                                   y_ablate=None, seed=0, training=True, weight_layout="out_in"):
    """Same contract as :func:`nodeprune_kernels.masked_attn_out_proj` (x [..., H, D] flattened to [..., H*D])."""
    flat = (lambda t: t if t is None or t.dim() < 2 else t.flatten(-2))
    return masked_linear_reference(flat(attn_output), weight, bias, in_gates=in_gates, out_gates=out_gates,
                                   x_ablate=flat(x_ablate), y_ablate=y_ablate, seed=seed, training=training,
                                   weight_layout=weight_layout)

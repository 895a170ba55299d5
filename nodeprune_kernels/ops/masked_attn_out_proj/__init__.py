"""The masked attention output projection: per-head and per-attention-neuron gates on o_proj's input."""
from __future__ import annotations

from typing import Sequence

import torch

from ..gate_stack import Gate
from ..masked_linear import masked_projection
from .reference import masked_attn_out_proj_reference

__all__ = ["masked_attn_out_proj", "masked_attn_out_proj_reference"]


def masked_attn_out_proj(
    attn_output: torch.Tensor,
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
    """The attention output projection with gated heads and attention neurons, read in the attention's layout.

    Computes the masked linear ``y' = y_c + z_out * (((x - x_c) * z_in) W^T)`` of
    :func:`nodeprune_kernels.masked_linear` on x = the attention output with its H heads of D value
    dimensions as the K = H * D input features (feature ``h * D + d``). The tensor is read through its
    strides, so the output of an attention kernel goes in as it lies, e.g. SDPA's [B, H, S, D] as
    ``out.transpose(1, 2)``, with no copy; the backward saves a reference to it, which is the same storage
    the attention kernel keeps for its own backward, so the gates add no saved activations.

    The nested gates of one layer's attention are one ``in_gates`` stack (docs/design.md, section 3), for example
    ``[Gate(layer_la, H * D, layer_index), Gate(attn_la, H * D, block_index), Gate(head_la, D, head_offset),
    Gate(neuron_la, 1, neuron_offset)]`` with head_la of shape [H] and neuron_la of shape [H * D]. With
    grouped-query attention the output still has one slice per query head: H is the number of query heads,
    and each query head gets its own gate whichever key/value head it reads.

    Args:
        attn_output: [..., H, D] float32, float16 or bfloat16, any strides (e.g. [B, S, H, D] or a
            transposed view of [B, H, S, D]).
        weight: [N, H * D] (``weight_layout="out_in"``, nn.Linear) or [H * D, N] (``"in_out"``, Conv1D).
        bias: [N] or None.
        in_gates / out_gates: gate stacks over the H * D input and N output features (see masked_linear).
        x_ablate: None (zero), [H, D] or [H * D] (mean ablation), or attn_output's shape (interchange: the
            corrupted run's attention output, any strides). Must not require grad.
        y_ablate: optional precomputed y_c: [N] or [..., N].
        seed, training, weight_layout, backend: as for masked_linear.

    Returns:
        [..., N] in attn_output's dtype: the projection of every token, leading dimensions kept.

    torch.compile: the custom op ``nodeprune::masked_linear`` as for masked_linear; a transposed view made
    inside the compiled function reaches it as a view, uncopied, and is saved as such.
    """
    return masked_projection("masked_attn_out_proj", attn_output, weight, bias, feature_dims=2, in_gates=in_gates,
                             out_gates=out_gates, x_ablate=x_ablate, y_ablate=y_ablate, seed=seed, training=training,
                             weight_layout=weight_layout, backend=backend)

"""Mixed precision: the masked ops follow autocast's rule for linear layers.

Under ``torch.autocast(device_type, dtype)`` a linear layer runs in the autocast dtype whatever its inputs'
and weights' dtypes (fp32 weights, bf16 activations is the usual mix). The masked ops do the same: their
floating-point tensors (input, weights, biases, ablation values) are cast to the autocast dtype, as
``F.linear`` casts them, and the op then runs with autocast off, so nothing inside it is cast twice. The
gates' log_alphas are not cast: gates are always computed in float32.
"""
from __future__ import annotations

import contextlib

import torch


def autocast_inputs(tensors: dict) -> tuple[dict, contextlib.AbstractContextManager]:
    """(``tensors`` cast to the autocast dtype when autocast is on for the device of ``tensors["x"]``, a
    context that turns it off for the op's body); the tensors unchanged and a null context otherwise (also
    when x is not a tensor: the op's own checks then say so). None entries stay None."""
    x = tensors["x"]
    if not isinstance(x, torch.Tensor) or not torch.is_autocast_enabled(x.device.type):
        return tensors, contextlib.nullcontext()
    dtype = torch.get_autocast_dtype(x.device.type)
    cast = {k: t.to(dtype) if isinstance(t, torch.Tensor) and t.is_floating_point() else t
            for k, t in tensors.items()}
    return cast, torch.autocast(x.device.type, enabled=False)

"""Weight and bias gradients of the fused ops, through their plain-PyTorch references.

Node pruning trains only the gates, so the fused backward passes compute no weight gradients. A weight or
bias that requires grad still gets a correct one here: the reference is re-run under autograd in the
backward (slower, and it materialises what the fused path never stores), with a one-time warning.
Under torch.compile AOTAutograd traces this reference backward into the compiled backward graph like the
rest of the op's autograd formula (ops/custom_ops.py), so it works there too.
"""
from __future__ import annotations

import torch

from ..utils.backend import warn_once


def reference_param_grads(op: str, spec, las, params, need, dy, run_reference):
    """Gradients of ``params`` (None where not needed) for the incoming ``dy``.

    ``spec`` is the op's :class:`StackSpec`; ``run_reference(in_gates, out_gates, *params)`` recomputes the op's output from detached gates and the given parameter leaves.
    """
    warn_once(
        f"{op}_weight_grad",
        f"{op}: a weight or bias requires grad, so its gradient is computed by the plain-PyTorch reference in "
        "the backward (slower, more memory). Freeze the weights (requires_grad_(False)) for the fused path; "
        "node pruning trains only the gates.",
    )
    in_gates, out_gates = spec.gates(las)
    with torch.enable_grad():
        ps = [p if p is None else p.detach().requires_grad_(bool(n)) for p, n in zip(params, need)]
        y = run_reference(in_gates, out_gates, *ps)
        wanted = [p for p in ps if p is not None and p.requires_grad]
        grads = iter(torch.autograd.grad(y, wanted, dy, allow_unused=True))
    out = []
    for p in ps:
        g = next(grads) if p is not None and p.requires_grad else None
        out.append(torch.zeros_like(p) if g is None and p is not None and p.requires_grad else g)
    return out

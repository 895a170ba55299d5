"""Host side of the native CPU kernels' row passes (csrc/masked_rows.cpp) and gate stacks (csrc/gates.cpp).

The native ops run each masked projection as ATen GEMMs (BLAS) between three C++ passes over [M, C] rows
(see masked_rows.cpp): :func:`gated_rows` builds the GEMM operand (A - A_c) * z, :func:`backward_rows`
scales the backward GEMM's output by the input gates (or runs the MLP's activation backward) and sums the
gate gradients in the same sweep, and :func:`scale_add` is the forward GEMM's epilogue. Operands are
described by :func:`vector`, :func:`tensor` and :func:`hidden` (``NONE`` when absent) and read where they lie.
The ops' native_host.py modules call these, as their triton_host.py modules call ops/gated_gemm.
"""
from __future__ import annotations

import torch

from ..utils import native
from ..utils.alloc import empty

BLOCK_ROWS = 32  # rows per column-sum block (csrc/masked_rows.cpp: kBlockRows)
NONE = (0, None, None, 1, 0)


def vector(v: torch.Tensor):
    """A vector over the columns, the same for every row (mean ablation, a bias)."""
    return (1, v.reshape(-1).contiguous(), None, 1, 0)


def tensor(t: torch.Tensor, col_dims: int = 1):
    """A tensor of any strides whose last ``col_dims`` dims are the columns and the rest the rows."""
    return (2, t, None, col_dims, 0)


def hidden(pre: torch.Tensor, lin: torch.Tensor | None, act: int):
    """The MLP's hidden units act(pre) * lin (or act(pre)) of [M, F] pre-activations, built row by row."""
    pre = pre.contiguous()
    return (3, pre, None if lin is None else lin.contiguous(), 1, act)


def gate_dtype(dtype: torch.dtype) -> torch.dtype:
    """The dtype the row passes compute in, and the gates with them: float64 for float64, else float32."""
    return torch.float64 if dtype == torch.float64 else torch.float32


def widen(*tensors):
    """float32 copies of float16 / bfloat16 tensors (others, and None, as they are), for the backward.

    The backward's GEMM outputs feed the gate gradients, sums over every token with heavy cancellation: a
    16-bit P would put its rounding into them (seen: a head gate's gradient off by 40% in bfloat16), where the
    Triton kernels keep P in float32 registers. ATen has no 16-bit CPU GEMM with a float32 output, so the
    native backward of a 16-bit op runs in float32 on widened temporaries (nothing more is saved)."""
    return tuple(t.float() if t is not None and t.dtype in (torch.float16, torch.bfloat16) else t for t in tensors)


def feature_gates(levels, n: int, like: torch.Tensor, *, seed: int, training: bool) -> torch.Tensor | None:
    """The per-feature gate ([n], the product over a stack's levels) in the dtype the passes over ``like``
    compute in (:func:`gate_dtype`), or None for an empty stack."""
    if not levels:
        return None
    out = empty((n,), dtype=gate_dtype(like.dtype), device="cpu")
    native.load().feature_gates([la for la, _, _ in levels], [g for _, g, _ in levels], [o for _, _, o in levels],
                                seed, training, out)
    return out


def level_grads(dzf: torch.Tensor, levels, needed, *, seed: int, training: bool) -> list:
    """d log_alpha of each level whose ``needed`` flag is set (None for the others), from per-feature sums."""
    las, groups, offsets = [la for la, _, _ in levels], [g for _, g, _ in levels], [o for _, _, o in levels]
    grads = []
    for target, (la, _, _) in enumerate(levels):
        if not needed[target]:
            grads.append(None)
            continue
        out = empty(la.shape, dtype=la.dtype, device=la.device)
        native.load().level_grad(dzf.contiguous(), las, groups, offsets, seed, training, target, out)
        grads.append(out)
    return grads


def gated_rows(a, ac, z, M: int, C: int, like: torch.Tensor) -> torch.Tensor:
    """(A - A_c) * z as a new contiguous [M, C] tensor of ``like``'s dtype (z None: no gate)."""
    out = empty((M, C), dtype=like.dtype, device="cpu")
    native.load().gated_rows(a, ac, z, out, M, C)
    return out


def gated_matmul(t: torch.Tensor, z, w: torch.Tensor, M: int, C: int) -> torch.Tensor:
    """(t * z) @ w as a new contiguous [M, w.shape[1]] tensor: t is [..., C] (any strides), z a per-column gate
    or None, w a [C, R] matrix (a view of a weight). The gated operand is a temporary."""
    g = t.reshape(M, C) if z is None else gated_rows(tensor(t), NONE, z, M, C, t)
    out = empty((M, w.shape[1]), dtype=t.dtype, device="cpu")
    torch.mm(g, w, out=out)
    return out


def backward_rows(p, z, e, ec, M: int, C: int, *, out_kind: int = 0, out1=None, out2=None,
                  colsum: bool = False) -> torch.Tensor | None:
    """One sweep over the rows of P: writes ``out1`` = P * z (out_kind 0) or the activation backward of
    dh = P * z into ``out1`` (d pre) and ``out2`` (d lin) (out_kind 1, ``e`` hidden); ``out1`` may be P's own
    storage. With ``colsum`` returns the column sums of P * (E - E_c), accumulated in float64."""
    part = None
    if colsum:  # float64: a gate gradient is a sum over every token with cancellation
        part = empty((-(-M // BLOCK_ROWS), C), dtype=torch.float64, device="cpu")
    native.load().backward_rows(p, z, e, ec, out_kind, out1, out2, part, M, C)
    return None if part is None else part.sum(0)


def scale_add(acc: torch.Tensor, z, yc, M: int, C: int) -> None:
    """acc = acc * z + Y_c in place, for the contiguous [M, C] output of a GEMM."""
    native.load().scale_add(acc, z, yc, M, C)

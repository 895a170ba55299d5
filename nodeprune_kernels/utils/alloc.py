"""Output allocation for kernels, with optional NaN poisoning.

Every kernel output is allocated through :func:`empty`. Inside :func:`poisoned` (the test suite turns it
on for every test) floating outputs are NaN-filled first, so an element a kernel forgets to write shows
up as NaN instead of passing by luck.
"""
from __future__ import annotations

import contextlib

import torch

_POISON = [False]


def empty(shape, *, dtype: torch.dtype, device) -> torch.Tensor:
    t = torch.empty(shape, dtype=dtype, device=device)
    if _POISON[0] and t.is_floating_point():
        t.fill_(float("nan"))
    return t


@contextlib.contextmanager
def poisoned(enabled: bool = True):
    """NaN-fill every kernel output allocated inside the block."""
    old = _POISON[0]
    _POISON[0] = enabled
    try:
        yield
    finally:
        _POISON[0] = old

"""Input validation with messages a user can act on."""
from __future__ import annotations

import weakref

import torch

from ..ops.hard_concrete.reference import MAX_INDEX, MAX_SEED

_FINITE_OK: dict = {}


def check_seed_offset(seed, offset, count: int, what: str = "gates") -> None:
    if isinstance(seed, bool) or not isinstance(seed, int) or not 0 <= seed <= MAX_SEED:
        raise ValueError(f"seed must be an int in [0, 2**63), got {seed!r}")
    if isinstance(offset, bool) or not isinstance(offset, int) or offset < 0:
        raise ValueError(f"offset must be a non-negative int, got {offset!r}")
    if offset + count - 1 > MAX_INDEX:
        raise ValueError(
            f"{what}: Philox indices offset + i reach {offset + count - 1}, past the supported 2**31 - 1; "
            "use smaller offsets (each gate needs one index)"
        )


def check_log_alpha(log_alpha, what: str) -> None:
    """log_alpha must be a floating tensor with finite values (checked once per parameter version)."""
    if not isinstance(log_alpha, torch.Tensor):
        raise TypeError(f"{what}: log_alpha must be a torch.Tensor, got {type(log_alpha).__name__}")
    if not log_alpha.is_floating_point():
        raise TypeError(f"{what}: log_alpha must be a floating tensor, got {log_alpha.dtype}")
    base = log_alpha._base if log_alpha._base is not None else log_alpha
    # Cache by object identity and version: a weak reference tells a live tensor from a new one that
    # happens to reuse a freed tensor's address (or id).
    cached = _FINITE_OK.get(id(base))
    if cached is not None and cached[0]() is base and cached[1] == base._version:
        return
    if not bool(torch.isfinite(base.detach()).all()):
        bad = (~torch.isfinite(log_alpha.detach())).nonzero()
        where = f" (first at index {tuple(bad[0].tolist())})" if len(bad) else " (in the tensor it is a view of)"
        raise ValueError(
            f"{what}: log_alpha has non-finite values{where}. A NaN or inf gate parameter usually means the "
            "optimiser diverged: lower the learning rate, clip gradients, or restore the last good checkpoint."
        )
    if len(_FINITE_OK) > 4096:
        _FINITE_OK.clear()
    _FINITE_OK[id(base)] = (weakref.ref(base), base._version)

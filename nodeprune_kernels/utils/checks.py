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
    """log_alpha must be a floating tensor with finite values (checked once per parameter version).

    Under ``torch.compile`` only the type is checked here: the values are data, which a traced graph cannot
    branch on. The fused ops' custom ops check them at run time instead (ops/custom_ops.py); the
    plain-PyTorch reference backend does not, when compiled.
    """
    if not isinstance(log_alpha, torch.Tensor):
        raise TypeError(f"{what}: log_alpha must be a torch.Tensor, got {type(log_alpha).__name__}")
    if not log_alpha.is_floating_point():
        raise TypeError(f"{what}: log_alpha must be a floating tensor, got {log_alpha.dtype}")
    if torch.compiler.is_compiling():
        return
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


def check_like(op: str, x: torch.Tensor, **named) -> None:
    """Each named tensor (None allowed) must be a tensor of x's dtype on x's device."""
    for name, t in named.items():
        if t is None:
            continue
        if not isinstance(t, torch.Tensor):
            raise TypeError(f"{op}: {name} must be a tensor or None, got {type(t).__name__}")
        if t.dtype != x.dtype:
            raise TypeError(f"{op}: {name} is {t.dtype} but x is {x.dtype}; cast them to one dtype")
        if t.device != x.device:
            raise ValueError(f"{op}: {name} is on {t.device} but x is on {x.device}; move them to one device")


def check_constant(op: str, **named) -> None:
    """Ablation values are constants: none of the named tensors may require grad."""
    for name, t in named.items():
        if t is not None and t.requires_grad:
            raise ValueError(f"{op}: {name} requires grad, but ablation values are constants; pass "
                             f"{name}.detach() (corrupted activations come from a no-grad pass)")


def check_shape(op: str, name: str, t, *allowed) -> None:
    """t (None allowed) must have one of the ``allowed`` shapes."""
    if t is not None and tuple(t.shape) not in [tuple(a) for a in allowed]:
        options = " or ".join(str(list(a)) for a in allowed)
        raise ValueError(f"{op}: {name} must have shape {options}, got {list(t.shape)}")


KERNEL_DTYPES = {"triton": (torch.float32, torch.float16, torch.bfloat16),
                 "native": (torch.float32, torch.float64, torch.float16, torch.bfloat16)}


def check_kernel_dtype(op: str, impl: str, dtype: torch.dtype) -> None:
    """The input dtypes a kernel backend computes in (the reference takes any float dtype)."""
    ok = KERNEL_DTYPES[impl]
    if dtype not in ok:
        names = ", ".join(str(d).replace("torch.", "") for d in ok)
        raise TypeError(f"{op} ({impl}): x must be {names}, got {dtype}; use backend='reference' for other dtypes")

"""One place where every Triton kernel of the package is launched.

Going through :func:`launch` lets :func:`record_launches` capture the exact signature, constexprs and
launch options of every kernel an op uses, so :mod:`nodeprune_kernels.compile` can build those same
specialisations for real GPU targets on a machine without a GPU.
"""
from __future__ import annotations

import contextlib
from dataclasses import dataclass, field

import torch

_RECORDERS: list[list] = []

_TRITON_DTYPES = {
    torch.float32: "fp32",
    torch.float16: "fp16",
    torch.bfloat16: "bf16",
    torch.float64: "fp64",
    torch.int64: "i64",
    torch.int32: "i32",
    torch.int8: "i8",
    torch.bool: "i1",
}


@dataclass(frozen=True)
class LaunchRecord:
    """A kernel specialisation: enough to compile it again with ``triton.compile``."""

    module: str
    name: str
    signature: tuple  # ((arg name, triton type or "constexpr"), ...)
    constexprs: tuple  # ((arg name, value), ...)
    aligned: tuple  # names of pointer / int args divisible by 16
    num_warps: int
    num_stages: int
    extra: dict = field(default_factory=dict, compare=False, hash=False)


def _describe(kernel, args: dict) -> LaunchRecord:
    fn = getattr(kernel, "fn", kernel)
    signature, constexprs, aligned = [], [], []
    for p in kernel.params:
        v = args[p.name]
        if p.is_constexpr:
            signature.append((p.name, "constexpr"))
            constexprs.append((p.name, v))
        elif isinstance(v, torch.Tensor):
            signature.append((p.name, "*" + _TRITON_DTYPES[v.dtype]))
            if v.data_ptr() % 16 == 0:
                aligned.append(p.name)
        elif isinstance(v, bool):
            signature.append((p.name, "i1"))
        elif isinstance(v, int):
            signature.append((p.name, "i32" if -(2**31) <= v < 2**31 else "i64"))
            if v % 16 == 0:
                aligned.append(p.name)
        elif isinstance(v, float):
            signature.append((p.name, "fp32"))
        else:
            raise TypeError(f"cannot describe argument {p.name}={v!r} of {fn.__name__}")
    return LaunchRecord(fn.__module__, fn.__name__, tuple(signature), tuple(constexprs), tuple(aligned), 0, 0)


def launch(kernel, grid, *, num_warps: int = 4, num_stages: int = 2, **args):
    """Launch ``kernel[grid](**args)`` and record the specialisation for any active recorder."""
    if _RECORDERS:
        rec = _describe(kernel, args)
        rec = LaunchRecord(**{**rec.__dict__, "num_warps": num_warps, "num_stages": num_stages})
        for r in _RECORDERS:
            r.append(rec)
    kernel[grid](**args, num_warps=num_warps, num_stages=num_stages)


@contextlib.contextmanager
def record_launches():
    """Collect the :class:`LaunchRecord` of every kernel launched inside the ``with`` block."""
    records: list[LaunchRecord] = []
    _RECORDERS.append(records)
    try:
        yield records
    finally:
        _RECORDERS.remove(records)

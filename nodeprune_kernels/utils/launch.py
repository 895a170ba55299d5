"""One place where every Triton kernel of the package is launched.

Going through :func:`launch` lets :func:`record_launches` capture the exact signature, constexprs and
launch options of every kernel an op uses, so :mod:`nodeprune_kernels.compile` can build those same
specialisations for real GPU targets on a machine without a GPU.
"""
from __future__ import annotations

import contextlib
import inspect
from dataclasses import dataclass

import torch

from .backend import interpreting

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


def _specialize(v):
    """(triton type, specialisation) of a runtime argument, as triton's JIT decides it."""
    try:
        from triton._C.libtriton import native_specialize_impl
        from triton.backends.compiler import BaseBackend

        kind, attr = native_specialize_impl(BaseBackend, v, False, True, True)
        return kind, (v if kind == "constexpr" else attr)
    except ImportError:  # older triton: the same rules, written out
        if isinstance(v, torch.Tensor):
            return "*" + _TRITON_DTYPES[v.dtype], "D" if v.data_ptr() % 16 == 0 else ""
        if isinstance(v, bool):
            return "u1", None
        if isinstance(v, int):
            if v == 1:
                return "constexpr", 1
            return ("i32" if -(2**31) <= v < 2**31 else "i64"), "D" if v % 16 == 0 else ""
        if isinstance(v, float):
            return "fp32", None
        raise TypeError(f"cannot describe kernel argument {v!r}")


def _describe(kernel, args: dict, num_warps: int, num_stages: int) -> LaunchRecord:
    fn = getattr(kernel, "fn", kernel)
    signature, constexprs, aligned = [], [], []
    for p in inspect.signature(fn).parameters.values():
        v = args[p.name]
        if "constexpr" in str(p.annotation):
            signature.append((p.name, "constexpr"))
            constexprs.append((p.name, v))
        else:
            kind, attr = _specialize(v)
            if kind == "constexpr":  # triton specialises ints equal to 1 into constants
                signature.append((p.name, "constexpr"))
                constexprs.append((p.name, attr))
                continue
            signature.append((p.name, kind))
            if attr == "D":
                aligned.append(p.name)
    return LaunchRecord(fn.__module__, fn.__name__, tuple(signature), tuple(constexprs), tuple(aligned), num_warps,
                        num_stages)


def launch(kernel, grid, *, num_warps: int = 4, num_stages: int = 2, **args):
    """Launch ``kernel[grid](**args)`` and record the specialisation for any active recorder."""
    if _RECORDERS:
        rec = _describe(kernel, args, num_warps, num_stages)
        for r in _RECORDERS:
            r.append(rec)
    if _DRY_RUN[0]:
        return
    if interpreting() and not any(isinstance(v, torch.Tensor) and v.is_cuda for v in args.values()):
        # the interpreter on CPU tensors: on a thread of its own, from a fixed stack depth (_interpreter_thread)
        _interpreter_thread().submit(kernel[grid], **args, num_warps=num_warps, num_stages=num_stages).result()
        return
    kernel[grid](**args, num_warps=num_warps, num_stages=num_stages)


_POOL: list = []


def _interpreter_thread():
    """One worker thread that runs the Triton interpreter's launches.

    CPython 3.11 keeps its frames in 16 KiB chunks and frees a chunk as soon as its last frame returns: code
    that makes millions of calls (the interpreter does) around a chunk boundary maps and unmaps memory on each
    call, which made the interpreter 2-3 times slower from some caller stack depths (e.g. under pytest,
    inside a custom op's autograd function). On a thread of its own it always runs from the same depth. The
    interpreter reads and writes the tensors' storages only, so the thread's autograd state does not matter.
    """
    if not _POOL:
        from concurrent.futures import ThreadPoolExecutor

        _POOL.append(ThreadPoolExecutor(1, thread_name_prefix="triton-interpreter"))
    return _POOL[0]


_DRY_RUN = [False]


@contextlib.contextmanager
def record_launches(*, gpu_configs: bool = False, execute: bool = True):
    """Collect the :class:`LaunchRecord` of every kernel launched inside the ``with`` block.

    ``gpu_configs=True`` makes the host code choose the block sizes, warps, stages and dot modes it would
    use on a GPU even under the interpreter; ``execute=False`` records without running any kernel (outputs
    are then left unwritten), which is how :mod:`nodeprune_kernels.compile` collects GPU specialisations
    on a machine without one.
    """
    from . import backend

    records: list[LaunchRecord] = []
    old = backend._GPU_CONFIGS[0], _DRY_RUN[0]
    _RECORDERS.append(records)
    backend._GPU_CONFIGS[0], _DRY_RUN[0] = gpu_configs or old[0], (not execute) or old[1]
    try:
        yield records
    finally:
        _RECORDERS.remove(records)
        backend._GPU_CONFIGS[0], _DRY_RUN[0] = old

"""Which implementation runs an op.

``backend="auto"`` picks the Triton kernels for CUDA tensors, the Triton interpreter for CPU tensors when
``TRITON_INTERPRET=1`` was set before nodeprune_kernels was imported, and the plain-PyTorch reference
otherwise. ``"triton"`` and ``"reference"`` force one of them.
"""
from __future__ import annotations

import importlib.util
import os
import warnings

import torch

BACKENDS = ("auto", "triton", "reference")

# triton is a Linux-only dependency. Look for it without importing it: triton reads TRITON_INTERPRET when
# it is first imported, so importing nodeprune_kernels must not import triton.
HAS_TRITON = importlib.util.find_spec("triton") is not None


def interpreting() -> bool:
    """True when Triton kernels run in Triton's CPU interpreter (``TRITON_INTERPRET=1``)."""
    return os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


_GPU_CONFIGS = [False]


def interpreter_configs() -> bool:
    """True when launch configurations should suit the interpreter (few, large tiles; fp32 dots).

    False on a GPU, and also under the interpreter while :func:`nodeprune_kernels.utils.launch.record_launches`
    records the GPU configurations for compilation.
    """
    return interpreting() and not _GPU_CONFIGS[0]


def resolve_backend(backend: str, device: torch.device) -> str:
    """Map a user's ``backend`` argument to ``"triton"`` or ``"reference"`` for tensors on ``device``."""
    if backend not in BACKENDS:
        raise ValueError(f"unknown backend {backend!r}; choose one of {', '.join(map(repr, BACKENDS))}")
    if backend == "reference":
        return "reference"
    if backend == "auto":
        if HAS_TRITON and (device.type == "cuda" or (device.type == "cpu" and interpreting())):
            return "triton"
        return "reference"
    if not HAS_TRITON:
        raise RuntimeError(
            "backend='triton' needs the triton package: `pip install triton` (Linux), or use backend='auto' "
            "or 'reference'."
        )
    if device.type == "cpu" and not interpreting():
        raise RuntimeError(
            "backend='triton' got CPU tensors, and Triton kernels need a CUDA GPU. Move the tensors to a CUDA "
            "device, use backend='auto' or 'reference' on CPU, or set TRITON_INTERPRET=1 before importing "
            "nodeprune_kernels to run the kernels in Triton's (slow) interpreter."
        )
    if device.type not in ("cpu", "cuda"):
        raise RuntimeError(
            f"backend='triton' supports CUDA tensors only, got a tensor on {device.type!r}; use "
            "backend='reference' there."
        )
    return "triton"


_WARNED: set[str] = set()


def warn_once(key: str, message: str, category=UserWarning) -> None:
    """Emit ``message`` once per process for ``key``."""
    if key not in _WARNED:
        _WARNED.add(key)
        warnings.warn(message, category, stacklevel=3)

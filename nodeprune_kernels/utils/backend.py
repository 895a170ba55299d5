"""Which implementation runs an op.

- ``"triton"``: the Triton kernels, on CUDA tensors (or on CPU tensors in Triton's slow interpreter when
  ``TRITON_INTERPRET=1`` was set before nodeprune_kernels was imported: a debugging and testing tool).
- ``"native"``: the C++ CPU kernels (nodeprune_kernels/csrc/, built on first use; utils/native.py), on CPU
  tensors.
- ``"reference"``: plain PyTorch, any device and dtype; the truth the others are tested against.
- ``"auto"``: Triton on CUDA; on CPU the interpreter when ``TRITON_INTERPRET=1`` is set, else native when it
  builds, else the reference with a one-time warning that says how to get the native kernels.

Every backend draws the same gates from the same Philox stream, so they are interchangeable mid-run.
"""
from __future__ import annotations

import importlib.util
import os
import warnings

import torch

BACKENDS = ("auto", "triton", "native", "reference")

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
    """Map a user's ``backend`` argument to ``"triton"``, ``"native"`` or ``"reference"`` for tensors on
    ``device``; raises an error that says what to do when the asked-for backend cannot run there."""
    if backend not in BACKENDS:
        raise ValueError(f"unknown backend {backend!r}; choose one of {', '.join(map(repr, BACKENDS))}")
    if backend == "reference":
        return "reference"
    if backend == "auto":
        if HAS_TRITON and (device.type == "cuda" or (device.type == "cpu" and interpreting())):
            return "triton"
        return cpu_backend() if device.type == "cpu" else "reference"
    if backend == "native":
        if device.type != "cpu":
            raise RuntimeError(f"backend='native' runs on CPU tensors, got a tensor on {device.type!r}; use "
                               "backend='triton' (or 'auto') on CUDA, or move the tensors to the CPU")
        from . import native

        if not torch.compiler.is_compiling():  # inside a trace the op itself loads it when it runs
            native.load()  # raises NativeUnavailable with the reason and the fix
        return "native"
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


def cpu_backend() -> str:
    """The best backend for CPU tensors outside the interpreter: "native" when the native kernels build and
    load, else "reference", with a one-time warning that says why and how to fix it."""
    from . import native

    if torch.compiler.is_compiling():  # no build inside a trace: the op builds it when it first runs
        return "reference" if native.known_unavailable() else "native"
    reason = native.unavailable_reason()
    if reason is None:
        return "native"
    warn_once("native_fallback", f"backend='auto' on CPU runs the plain-PyTorch reference because {reason}")
    return "reference"


_WARNED: set[str] = set()


def warn_once(key: str, message: str, category=UserWarning) -> None:
    """Emit ``message`` once per process for ``key``."""
    if key not in _WARNED:
        _WARNED.add(key)
        warnings.warn(message, category, stacklevel=3)

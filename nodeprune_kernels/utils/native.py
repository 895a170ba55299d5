"""Building and loading the native CPU kernels (nodeprune_kernels/csrc/, C++ with ATen and OpenMP).

The extension is found in this order:

1. ``nodeprune_kernels._native``, built ahead of time by ``NODEPRUNE_BUILD_NATIVE=1 pip install
   --no-build-isolation -e .`` (setup.py) against the torch that is installed;
2. compiled on first use by ``torch.utils.cpp_extension.load`` with ninja into a cache directory
   (``$NODEPRUNE_NATIVE_CACHE``, else torch's ``$TORCH_EXTENSIONS_DIR``, else ``~/.cache/torch_extensions``);
   later processes load the cached build in well under a second, and a changed source is rebuilt.

:func:`available` says whether either worked. ``backend="auto"`` uses the native kernels on CPU when they
are available and otherwise falls back to the plain-PyTorch reference with a one-time warning that says why
and how to fix it; ``backend="native"`` raises that message instead.

This file is also read by setup.py (without importing the package), so it imports only the standard library
at the top.
"""
from __future__ import annotations

import os
import shutil
import sys
import threading
from pathlib import Path

CSRC = Path(__file__).resolve().parent.parent / "csrc"
SOURCES = ("gates.cpp", "masked_rows.cpp", "module.cpp")
HEADERS = ("native.h", "philox.h")  # a changed header rebuilds the ahead-of-time build too (setup.py)
NAME = "nodeprune_native"


def compile_args() -> list:
    """C++ flags: optimised, and OpenMP (ATen's parallel_for) where the compiler is GCC or Clang on Linux."""
    args = ["-O3"]
    if sys.platform.startswith("linux"):
        args.append("-fopenmp")
    return args


def link_args() -> list:
    # libgomp.so.1 is the soname torch's own OpenMP runtime has, so the process keeps a single runtime
    return ["-fopenmp"] if sys.platform.startswith("linux") else []


_LOCK = threading.Lock()
_STATE: dict = {}


class NativeUnavailable(RuntimeError):
    """The native CPU kernels could not be built or loaded; the message says why and what to do."""


def _ninja_on_path() -> bool:
    """torch's builder runs ``ninja``; the PyPI package's binary may sit beside python without being on PATH."""
    if shutil.which("ninja"):
        return True
    try:
        import ninja  # type: ignore[import-not-found]

        os.environ["PATH"] = ninja.BIN_DIR + os.pathsep + os.environ.get("PATH", "")
        return shutil.which("ninja") is not None
    except ImportError:
        return False


def _fix_hint(reason: str) -> str:
    return (f"the native CPU kernels are unavailable: {reason}. They are compiled on first use with a C++ "
            "compiler (g++ or clang++; on Debian/Ubuntu `apt install g++`) and ninja (`pip install ninja`); or "
            "build them ahead of time with `NODEPRUNE_BUILD_NATIVE=1 pip install --no-build-isolation -e .`. "
            "Meanwhile backend='reference' works everywhere (slower, and it stores more for backward).")


def _aot_module():
    """``nodeprune_kernels._native`` when setup.py built it for this torch, else None."""
    try:
        from .. import _native  # type: ignore[attr-defined]

        return _native
    except ImportError:  # not built, or built against another torch (undefined symbols)
        return None


def _build():
    module = _aot_module()
    if module is not None:
        return module
    if os.environ.get("NODEPRUNE_NO_NATIVE_BUILD", "0") not in ("", "0"):
        raise NativeUnavailable(_fix_hint("NODEPRUNE_NO_NATIVE_BUILD is set and there is no ahead-of-time build"))
    compiler = os.environ.get("CXX", "c++")
    if shutil.which(compiler) is None:
        raise NativeUnavailable(_fix_hint(f"no C++ compiler ({compiler!r}) on PATH"))
    if not _ninja_on_path():
        raise NativeUnavailable(_fix_hint("ninja is not installed"))
    import torch.utils.cpp_extension as ext

    cache = os.environ.get("NODEPRUNE_NATIVE_CACHE")
    build_dir = None
    if cache:
        build_dir = os.path.join(cache, f"{NAME}_py{sys.version_info[0]}{sys.version_info[1]}")
        os.makedirs(build_dir, exist_ok=True)
    try:
        return ext.load(name=NAME, sources=[str(CSRC / s) for s in SOURCES], extra_cflags=compile_args(),
                        extra_ldflags=link_args(), extra_include_paths=[str(CSRC)],
                        build_directory=build_dir, verbose=os.environ.get("NODEPRUNE_NATIVE_VERBOSE") == "1")
    except Exception as err:  # a compiler or linker error: keep its message, add the fix
        raise NativeUnavailable(_fix_hint(f"building them failed ({type(err).__name__}: "
                                          f"{str(err).strip().splitlines()[-1] if str(err).strip() else err})")) from err


def load():
    """The extension module (building it on first use); raises :class:`NativeUnavailable` with the reason."""
    module = _STATE.get("module")  # lock-free once loaded
    if module is not None:
        return module
    with _LOCK:
        if "module" not in _STATE and "error" not in _STATE:
            try:
                _STATE["module"] = _build()
            except NativeUnavailable as err:
                _STATE["error"] = err
        if "error" in _STATE:
            raise _STATE["error"]
        return _STATE["module"]


def known_unavailable() -> bool:
    """True when an earlier attempt to build or load failed; never builds (safe inside torch.compile traces)."""
    return "error" in _STATE


def available() -> bool:
    """True when the native CPU kernels are built (or can be built now) and load."""
    try:
        load()
        return True
    except NativeUnavailable:
        return False


def unavailable_reason() -> str | None:
    """Why :func:`available` is False (None when it is True)."""
    try:
        load()
        return None
    except NativeUnavailable as err:
        return str(err)


def _reset_for_tests() -> None:
    _STATE.clear()

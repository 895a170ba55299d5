"""Optional ahead-of-time build of the native CPU kernels (nodeprune_kernels/csrc).

Everything else is in pyproject.toml. By default nothing is compiled at install time: the kernels are
built on first use into a cache (nodeprune_kernels/utils/native.py). To build them now, against the torch
already installed (hence no build isolation):

    NODEPRUNE_BUILD_NATIVE=1 pip install --no-build-isolation -e .
    # or, in a checkout: NODEPRUNE_BUILD_NATIVE=1 python setup.py build_ext --inplace

which produces nodeprune_kernels/_native*.so, loaded in preference to the cached build.
"""
import importlib.util
import os
from pathlib import Path

from setuptools import setup


def native_extensions():
    """(ext_modules, cmdclass) for the ahead-of-time build, or empty ones unless NODEPRUNE_BUILD_NATIVE=1."""
    if os.environ.get("NODEPRUNE_BUILD_NATIVE", "0") in ("", "0"):
        return [], {}
    from torch.utils.cpp_extension import BuildExtension, CppExtension

    # the sources and flags the on-first-use build takes, read without importing the package
    spec = importlib.util.spec_from_file_location(
        "_np_native", Path(__file__).parent / "nodeprune_kernels" / "utils" / "native.py")
    native = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(native)
    csrc = os.path.join("nodeprune_kernels", "csrc")
    ext = CppExtension("nodeprune_kernels._native", [os.path.join(csrc, s) for s in native.SOURCES],
                       depends=[os.path.join(csrc, h) for h in native.HEADERS], include_dirs=[os.path.abspath(csrc)], extra_compile_args=native.compile_args(),
                       extra_link_args=native.link_args())
    return [ext], {"build_ext": BuildExtension}


ext_modules, cmdclass = native_extensions()
setup(ext_modules=ext_modules, cmdclass=cmdclass)

"""What the package's torch custom ops (namespace ``nodeprune``) share.

Each fused op is a ``torch.library.custom_op`` with a fake implementation (shapes only) and an autograd
formula (``register_autograd``) whose backward calls a second custom op, so ``torch.compile`` traces the
forward and the backward without graph breaks and AOTAutograd never launches a kernel on fake tensors.
A custom op's schema takes tensors, lists of tensors and plain ints, bools and strings: a gate stack goes
in as its log_alphas (``Tensor[]``) and its groups and offsets (``int[]``), and each op rebuilds its
``Spec`` from them.

The ops are defined in each op's ``function.py``, imported on the first call of a Triton or native backend.
Their ``impl`` argument ("triton" or "native") names the host wrappers that run them, the op's
``triton_host.py`` or ``native_host.py``, with the same functions: the autograd formula, what is saved and
the fake implementation are shared, and only the kernels differ. A host module is imported when first used,
so the native backend never imports triton.
"""
from __future__ import annotations

import importlib

from ..utils.checks import check_log_alpha

NAMESPACE = "nodeprune"


def op_name(name: str) -> str:
    """The qualified name of one of the package's custom ops, e.g. ``nodeprune::masked_linear``."""
    return f"{NAMESPACE}::{name}"


IMPLS = ("triton", "native")


def host(package: str, impl: str):
    """The host-wrapper module of an op's package for ``impl``: ``<package>.triton_host`` or ``.native_host``."""
    if impl not in IMPLS:
        raise ValueError(f"unknown kernel implementation {impl!r}; expected one of {IMPLS}")
    return importlib.import_module(f"{package}.{impl}_host")


def check_finite(op: str, log_alphas) -> None:
    """The non-finite check of the gate parameters, at run time inside an op.

    The public functions check before calling the op, except under ``torch.compile``, which cannot trace a
    data-dependent check (:func:`nodeprune_kernels.utils.checks.check_log_alpha`); eagerly this finds the
    cached result of that first check.
    """
    for i, la in enumerate(log_alphas):
        check_log_alpha(la, op if len(log_alphas) == 1 else f"{op}: log_alphas[{i}]")


def input_grads(needs, grads: dict) -> tuple:
    """A ``register_autograd`` backward's return value: ``grads[i]`` for input i, None for the others.

    ``needs`` is ``ctx.needs_input_grad``, in which autograd nests each list argument it flattened: a list
    of tensors, and an empty list of any kind (an op's ``int[]`` of groups when a stack has no level). Such
    an input must get a list of the same length back.
    """
    return tuple(grads[i] if i in grads else [None] * len(n) if isinstance(n, list) else None
                 for i, n in enumerate(needs))


def split_grads(result, need_first: bool, need_las) -> tuple:
    """(first gradient or None, [d log_alpha or None per level]) from a backward op's list of the
    gradients that were asked for, in order."""
    it = iter(result)
    first = next(it) if need_first else None
    return first, [next(it) if n else None for n in need_las]

"""Gate stacks: the per-feature gates every masked op multiplies from up to four granularities.

Plain PyTorch and free of Triton, so the public ops can validate their arguments without importing it.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import NamedTuple, Sequence

import torch

from ..utils.checks import check_log_alpha, check_seed_offset
from .hard_concrete.reference import hard_concrete_reference

MAX_LEVELS = 4  # gate levels per side that the fused kernels accept (layer, block, head, neuron)


class Gate(NamedTuple):
    """One level of a gate stack.

    ``log_alpha`` is 1-D; its element k gates the contiguous features ``[k * group, (k + 1) * group)``,
    and its Philox index (the source of its noise) is ``offset + k``. A feature's gate is the product
    over the levels of its stack.
    """

    log_alpha: torch.Tensor
    group: int = 1
    offset: int = 0


def feature_gates_reference(gates: Sequence[Gate], n_features: int, seed: int, training: bool,
                            dtype: torch.dtype | None = None) -> torch.Tensor | None:
    """The per-feature gate (product over levels), shape [n_features], or None for an empty stack."""
    z = None
    for g in gates:
        la = g.log_alpha if dtype is None else g.log_alpha.to(dtype)
        zl = hard_concrete_reference(la, seed=seed, offset=g.offset, training=training)
        zl = zl.repeat_interleave(g.group)
        z = zl if z is None else z * zl
    assert z is None or z.numel() == n_features
    return z


def as_gates(gates, side: str, n_features: int, device, seed: int) -> tuple:
    """Validate one side's gate stack against ``n_features`` features; returns a tuple of Gate."""
    if isinstance(gates, Gate) or isinstance(gates, torch.Tensor):
        raise TypeError(f"{side} must be a sequence of Gate levels, e.g. [Gate(log_alpha, group, offset)]")
    out = []
    for i, g in enumerate(gates):
        what = f"{side}[{i}]"
        if not isinstance(g, Gate):
            try:
                g = Gate(*g)
            except TypeError:
                raise TypeError(f"{what} must be a Gate(log_alpha, group, offset), got {type(g).__name__}") from None
        if not isinstance(g.log_alpha, torch.Tensor):
            raise TypeError(f"{what}: log_alpha must be a torch.Tensor, got {type(g.log_alpha).__name__}")
        if g.log_alpha.device != device:
            raise ValueError(f"{what}: log_alpha is on {g.log_alpha.device}, x is on {device}; move them to one "
                             "device")
        check_log_alpha(g.log_alpha, what)
        if g.log_alpha.dim() != 1:
            raise ValueError(f"{what}: log_alpha must be 1-D, got shape {tuple(g.log_alpha.shape)}")
        if isinstance(g.group, bool) or not isinstance(g.group, int) or g.group < 1:
            raise ValueError(f"{what}: group must be a positive int, got {g.group!r}")
        if g.log_alpha.numel() * g.group != n_features:
            raise ValueError(
                f"{what}: {g.log_alpha.numel()} gates x group {g.group} = {g.log_alpha.numel() * g.group} "
                f"features, but the layer has {n_features} {side.split('_')[0]}put features; the groups "
                "must tile the feature dimension exactly"
            )
        check_seed_offset(seed, g.offset, g.log_alpha.numel(), what)
        out.append(g)
    if len(out) > MAX_LEVELS:
        raise ValueError(f"{side} has {len(out)} levels; at most {MAX_LEVELS} are supported (layer, block, head, "
                         "neuron). Multiply extra levels into one log_alpha first.")
    return tuple(out)


@dataclass(frozen=True)
class StackSpec:
    """The non-tensor half of an op's two gate stacks (their log_alphas travel as the op's ``Tensor[]``)."""

    in_groups: tuple
    in_offsets: tuple
    out_groups: tuple
    out_offsets: tuple
    seed: int
    training: bool

    @staticmethod
    def fields(in_groups, in_offsets, out_groups, out_offsets, seed, training) -> dict:
        """Keyword arguments of a StackSpec (or subclass) from a custom op's arguments (see :func:`stack_args`)."""
        return dict(in_groups=tuple(in_groups), in_offsets=tuple(in_offsets), out_groups=tuple(out_groups),
                    out_offsets=tuple(out_offsets), seed=seed, training=bool(training))

    def levels(self, las):
        """(input levels, output levels) as (contiguous log_alpha, group, offset) for the kernels."""
        n = len(self.in_groups)
        return ([(la.contiguous(), g, o) for la, g, o in zip(las[:n], self.in_groups, self.in_offsets)],
                [(la.contiguous(), g, o) for la, g, o in zip(las[n:], self.out_groups, self.out_offsets)])

    def gates(self, las):
        """(input stack, output stack) as Gate lists of detached log_alphas, for the references."""
        return tuple([Gate(la.detach(), g, o) for la, g, o in lv] for lv in self.levels(las))


def stack_args(in_gates, out_gates) -> tuple:
    """Validated stacks as custom-op arguments: (log_alphas, in_groups, in_offsets, out_groups, out_offsets),
    the log_alphas of both stacks in one list (input levels first), the rest lists of ints."""
    return ([g.log_alpha for g in (*in_gates, *out_gates)], [g.group for g in in_gates],
            [g.offset for g in in_gates], [g.group for g in out_gates], [g.offset for g in out_gates])

"""Sparsity pressure on the gates: a fixed penalty per granularity, or a target with Lagrange multipliers.

The expected sparsity of a granularity is one minus the mean probability that its gates are non-zero,
``s_g = 1 - mean(expected_l0(log_alpha_g))`` (docs/design.md, section 8): a number in [0, 1] whatever the
granularity's size, so penalties and targets mean the same at every granularity.

* ``"penalty"`` (the paper's form): ``sum_g lambda_g * mean(expected_l0_g)``, fixed lambdas.
* ``"target"`` (CoFi, Edge Pruning): ``sum_g lambda1_g * (s_g - t_g) + lambda2_g * (s_g - t_g)**2``; the
  lambdas are trained by gradient *ascent* on the same loss, so they grow until the expected sparsity meets
  the target. The target ramps linearly from 0 to ``t_g`` over the warm-up steps.
"""
from __future__ import annotations

import torch
from torch import nn

SPARSITY_MODES = ("penalty", "target")


def per_granularity(value, granularities, what: str) -> dict:
    """A float, or a dict over (a subset of) the granularities, as a dict over all of them."""
    if isinstance(value, dict):
        unknown = set(value) - set(granularities)
        if unknown:
            raise ValueError(f"{what} given for {sorted(unknown)}, which are not gated in this run "
                             f"(gated: {', '.join(granularities)})")
        missing = [g for g in granularities if g not in value]
        if missing:
            raise ValueError(f"{what} missing for {', '.join(missing)}: give one per gated granularity, or a "
                             "single number for all")
        return {g: float(value[g]) for g in granularities}
    return {g: float(value) for g in granularities}


def expected_sparsity(masks) -> dict:
    """{granularity: 1 - mean expected L0} (differentiable scalars)."""
    return {g: 1.0 - l0.mean() for g, l0 in masks.expected_l0().items()}


class Sparsity(nn.Module):
    """The sparsity term of the loss. ``forward(masks, step)`` returns (loss term, {g: expected sparsity}).

    In target mode the module holds the Lagrange multipliers (``lambda1``, ``lambda2``, one per gated
    granularity) as parameters; give them to an optimizer with ``maximize=True`` (see :meth:`optimizer`).
    """

    def __init__(self, granularities, mode: str = "penalty", lambdas=1.0, targets=0.5, warmup_steps: int = 0):
        super().__init__()
        if mode not in SPARSITY_MODES:
            raise ValueError(f"unknown sparsity mode {mode!r}; choose one of {', '.join(SPARSITY_MODES)}")
        self.mode, self.granularities = mode, tuple(granularities)
        self.warmup_steps = int(warmup_steps)
        if mode == "penalty":
            self.lambdas = per_granularity(lambdas, self.granularities, "lambdas")
            if any(v < 0 for v in self.lambdas.values()):
                raise ValueError(f"penalty lambdas must be >= 0, got {self.lambdas}")
        else:
            self.targets = per_granularity(targets, self.granularities, "targets")
            bad = {g: t for g, t in self.targets.items() if not 0.0 <= t < 1.0}
            if bad:
                raise ValueError(f"target sparsities must be in [0, 1), got {bad}")
            n = len(self.granularities)
            self.lambda1 = nn.Parameter(torch.zeros(n))
            self.lambda2 = nn.Parameter(torch.zeros(n))

    def target_at(self, step: int) -> dict:
        """The (warmed-up) targets at ``step``."""
        ramp = 1.0 if self.warmup_steps <= 0 else min(1.0, step / self.warmup_steps)
        return {g: t * ramp for g, t in self.targets.items()}

    def forward(self, masks, step: int):
        s = expected_sparsity(masks)
        if self.mode == "penalty":
            return sum(self.lambdas[g] * (1.0 - s[g]) for g in self.granularities), s
        target = self.target_at(step)
        dev = next(iter(s.values())).device
        gap = torch.stack([s[g] - target[g] for g in self.granularities])
        l1, l2 = self.lambda1.to(dev), self.lambda2.to(dev)
        return (l1 * gap + l2 * gap * gap).sum(), s

    def optimizer(self, lr: float):
        """Gradient ascent on the Lagrange multipliers (None in penalty mode)."""
        if self.mode == "penalty":
            return None
        return torch.optim.SGD(self.parameters(), lr=lr, maximize=True)

    def state(self) -> dict:
        """Readable values for logs: lambdas (and targets)."""
        if self.mode == "penalty":
            return {f"lambda/{g}": v for g, v in self.lambdas.items()}
        out = {}
        for i, g in enumerate(self.granularities):
            out[f"lambda1/{g}"] = float(self.lambda1[i].detach())
            out[f"lambda2/{g}"] = float(self.lambda2[i].detach())
        return out

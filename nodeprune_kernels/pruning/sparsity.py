"""Sparsity pressure on the gates: a fixed penalty per granularity, or targets that the gates are held to.

The expected sparsity of a granularity is one minus the mean probability that its gates are non-zero,
``s_g = 1 - mean(expected_l0(log_alpha_g))``: a number in [0, 1] whatever the granularity's size, so
penalties and targets mean the same at every granularity.

* ``"penalty"`` (the paper's form): ``sum_g lambda_g * mean(expected_l0_g)``, fixed lambdas.
* ``"target"``: each granularity's expected sparsity is held to its target ``t_g``, which ramps linearly from 0
  over the warm-up steps. The loss gets the Lagrangian term of CoFi and Edge Pruning,
  ``sum_g lambda1_g * (s_g - t_g) + lambda2_g * (s_g - t_g)**2``, whose gradient on the gates is a price on
  each gate: a gate closes where its share of the objective is worth less than the price. Two updates of
  the multipliers:

  - ``"projection"`` (the default): after every optimizer step, the multipliers take one Adam ascent step
    (at ``lambda_lr``) on the gap that step left, ``s_g - t_g``, and then each granularity's log_alphas are
    shifted by one constant, found by bisection, so that ``s_g`` equals the target (during the warm-up: is
    at least it, so the ramp never opens gates the objective closed). The price sorts the gates, the shift
    (which keeps their order) meets the target at every step, whatever the objective's scale. Targets
    below 0.001 are held at 0.001 (no finite shift opens every gate for certain).
  - ``"lagrangian"``: the multipliers trained by plain gradient ascent (SGD at ``lambda_lr``) on the same
    loss, nothing else. How close it ends to the targets depends on that rate and on the objective's scale
    (docs/sparsity.md has measurements).
* ``"budget"``: as sparse as the training KL allows, at most ``kl_budget``: the targets are one pressure
  ``p`` in [0, 1] times the ``targets`` (the most each granularity may be pruned, so their proportions), held
  by the projection update, and ``p`` is adapted online. After every step, with the exponential moving
  average ``K`` (decay ``BUDGET_EMA``) of the step's KL (each step's clipped at ``BUDGET_CLIP`` times the
  budget, so one gate sample that happens to close a vital node moves it a bounded step),
  ``p += BUDGET_RATE * clamp(((1 - tol) budget - K) / budget, -1, 1)`` unless ``K`` is already in
  ``[(1 - 2 tol) budget, budget]`` (``tol`` = ``BUDGET_TOLERANCE``), so the KL settles at or just below the
  budget; a run whose ``K`` ends above ``(1 + tol) budget`` missed it. Pressure rises while the circuit is more faithful than asked and falls when it is
  less; the projection makes every change of ``p`` felt at the next step, both ways.
* ``"path"``: as ``"target"``, with targets that rise geometrically in the kept fraction,
  ``1 - t_g(step) = (1 - T_g) ** (step / ramp_steps)``, from 0 to the maximum ``T_g``: the run passes every
  circuit size between, and :mod:`.path` cuts a circuit at each size of a grid on the way.
"""
from __future__ import annotations

import math

import torch
from torch import nn

from ..ops.hard_concrete.reference import expected_l0_reference

SPARSITY_MODES = ("penalty", "target", "path", "budget")
TARGET_UPDATES = ("projection", "lagrangian")
PROJECTION_FLOOR = 1e-3  # the smallest sparsity the projection holds a granularity to
_BISECTION_STEPS = 40  # the bracket (~100 wide) narrowed 2**40-fold: below float32 resolution
BUDGET_EMA = 0.9  # decay of the KL's moving average in budget mode
BUDGET_TOLERANCE = 0.1  # relative: the pressure rests while the moving-average KL is in [0.8, 1] x budget
BUDGET_RATE = 0.02  # the budget's pressure moves at most this much per step
BUDGET_CLIP = 2.0  # a step's KL enters the moving average at most at this multiple of the budget


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


@torch.no_grad()
def shift_to_sparsity(log_alpha: torch.Tensor, target: float, at_least: bool = False) -> torch.Tensor:
    """Shift ``log_alpha`` (in place) by the one constant that makes ``1 - mean(expected_l0)`` equal
    ``target``; with ``at_least``, only downwards (if the sparsity is below the target: gates are only
    closed). Returns the shift (a 0-dim tensor on log_alpha's device).

    ``1 - mean(expected_l0(log_alpha + c))`` falls monotonically in ``c``, so bisection finds ``c``, on a
    bracket wide enough to take every gate past saturation either way, without host syncs (the bracket stays
    a tensor). ``target`` must be in (0, 1).
    """
    la = log_alpha.detach().float()
    reach = la.abs().max() + 40.0  # past it, expected_l0 is 0 or 1 to float32 precision for every gate
    lo, hi = -reach, reach.clone()
    for _ in range(_BISECTION_STEPS):
        mid = (lo + hi) / 2
        too_sparse = 1.0 - expected_l0_reference(la + mid).mean() > target
        lo, hi = torch.where(too_sparse, mid, lo), torch.where(too_sparse, hi, mid)
    shift = (lo + hi) / 2
    if at_least:
        shift = shift.clamp(max=0.0)
    log_alpha.add_(shift.to(log_alpha.dtype))
    return shift


class Sparsity(nn.Module):
    """The sparsity term of the loss. ``forward(masks, step)`` returns (loss term, {g: expected sparsity});
    :meth:`after_step` updates the multipliers (and projects) after each optimizer step of the gates.

    In target, path and budget modes the module holds the Lagrange multipliers (``lambda1``, ``lambda2``, one per
    gated granularity) as parameters, stepped by :meth:`optimizer`'s optimizer (ascent, ``maximize=True``).
    ``warmup_steps``: the steps over which the targets rise (linearly in ``"target"`` mode, geometrically in
    the kept fraction in ``"path"`` mode).
    """

    def __init__(self, granularities, mode: str = "penalty", lambdas=1.0, targets=0.5, warmup_steps: int = 0,
                 update: str = "projection", kl_budget: float | None = None):
        super().__init__()
        if mode not in SPARSITY_MODES:
            raise ValueError(f"unknown sparsity mode {mode!r}; choose one of {', '.join(SPARSITY_MODES)}")
        if update not in TARGET_UPDATES:
            raise ValueError(f"unknown target update {update!r}; choose one of {', '.join(TARGET_UPDATES)}")
        self.mode, self.granularities, self.update = mode, tuple(granularities), update
        self.warmup_steps = int(warmup_steps)
        if mode == "penalty":
            self.lambdas = per_granularity(lambdas, self.granularities, "lambdas")
            if any(v < 0 for v in self.lambdas.values()):
                raise ValueError(f"penalty lambdas must be >= 0, got {self.lambdas}")
            return
        if mode == "budget":
            if kl_budget is None or not float(kl_budget) > 0:
                raise ValueError(f"sparsity='budget' needs kl_budget > 0 (the largest training KL the circuit may "
                                 f"have, e.g. 0.05), got {kl_budget}")
            if update != "projection":
                raise ValueError("sparsity='budget' moves its targets every step and needs target_update="
                                 "'projection' to follow them")
            self.kl_budget = float(kl_budget)
            self.register_buffer("pressure", torch.tensor(0.0, dtype=torch.float64))
            self.register_buffer("kl_average", torch.tensor(float("nan"), dtype=torch.float64))
        self.targets = per_granularity(targets, self.granularities, "targets")
        bad = {g: t for g, t in self.targets.items() if not 0.0 <= t < 1.0}
        if bad:
            raise ValueError(f"target sparsities must be in [0, 1), got {bad}")
        n = len(self.granularities)
        self.lambda1 = nn.Parameter(torch.zeros(n))
        self.lambda2 = nn.Parameter(torch.zeros(n))

    def ramp(self, step: int) -> float:
        """How far the targets have risen at ``step``: 0 at step 0, 1 from ``warmup_steps`` on (budget mode:
        always 1, its targets follow the pressure both ways instead)."""
        if self.mode == "budget" or self.warmup_steps <= 0:
            return 1.0
        return min(1.0, step / self.warmup_steps)

    def target_at(self, step: int) -> dict:
        """The targets at ``step`` (ramped up over the warm-up; budget mode: scaled by the pressure)."""
        r = float(self.pressure) if self.mode == "budget" else self.ramp(step)
        if self.mode == "path":
            return {g: 1.0 - (1.0 - t) ** r for g, t in self.targets.items()}
        return {g: t * r for g, t in self.targets.items()}

    def _gap(self, s: dict, step: int) -> torch.Tensor:
        target = self.target_at(step)
        return torch.stack([s[g] - target[g] for g in self.granularities])

    def forward(self, masks, step: int):
        s = expected_sparsity(masks)
        if self.mode == "penalty":
            return sum(self.lambdas[g] * (1.0 - s[g]) for g in self.granularities), s
        gap = self._gap(s, step)
        l1, l2 = self.lambda1.to(gap.device), self.lambda2.to(gap.device)
        return (l1 * gap + l2 * gap * gap).sum(), s

    def observe_kl(self, kl: float) -> None:
        """Budget mode: fold one step's training KL into the moving average and adapt the pressure."""
        kl = min(kl, BUDGET_CLIP * self.kl_budget)  # a rare sample closing a vital node moves it a bounded step
        avg = kl if math.isnan(float(self.kl_average)) else BUDGET_EMA * float(self.kl_average) + (1 - BUDGET_EMA) * kl
        self.kl_average.fill_(avg)
        error = (self.kl_budget * (1 - BUDGET_TOLERANCE) - avg) / self.kl_budget  # aim inside [0.8, 1] x budget
        if abs(error) > BUDGET_TOLERANCE:
            self.pressure.fill_(min(1.0, max(0.0, float(self.pressure) + BUDGET_RATE * max(-1.0, min(1.0, error)))))

    def budget_missed(self) -> bool:
        """Budget mode: the moving-average KL ends above the budget by more than the tolerance."""
        return float(self.kl_average) > self.kl_budget * (1 + BUDGET_TOLERANCE)

    def after_step(self, masks, step: int, lambda_opt, objective: float | None = None) -> None:
        """After the gates' optimizer step; ``step`` is the step the gates are used at next. Lagrangian: one
        ascent step of the multipliers on the loss's gradient. Projection: one ascent step on the gap the
        gates' step left (below the ramping target only, while it ramps), then :meth:`project`. Budget:
        first :meth:`observe_kl` of ``objective`` (the step's KL), then as projection, to exact targets."""
        if self.mode == "budget":
            self.observe_kl(float(objective))
        if self.mode == "penalty":
            return
        if self.update == "lagrangian":
            lambda_opt.step()
            return
        with torch.no_grad():
            gap = self._gap(expected_sparsity(masks), step).to(self.lambda1.device)
            if self.ramp(step) < 1.0:
                gap = gap.clamp(max=0.0)
        self.lambda1.grad, self.lambda2.grad = gap.clone(), gap * gap
        lambda_opt.step()
        self.project(masks, step)

    def project(self, masks, step: int) -> None:
        """Shift each granularity's log_alphas onto its target at ``step`` (at least ``PROJECTION_FLOOR``): at
        least the target while it ramps up, exactly it afterwards. Nothing with the Lagrangian update, or in
        penalty mode."""
        if self.mode == "penalty" or self.update == "lagrangian":
            return
        ramping = self.ramp(step) < 1.0
        for g, t in self.target_at(step).items():
            shift_to_sparsity(masks.log_alpha[g], max(t, PROJECTION_FLOOR), at_least=ramping)

    def optimizer(self, lr: float):
        """The multipliers' ascent: Adam for the projection update (a step of about ``lr`` whatever the
        gap's scale), SGD for the Lagrangian's; None in penalty mode."""
        if self.mode == "penalty":
            return None
        kind = torch.optim.Adam if self.update == "projection" else torch.optim.SGD
        return kind(self.parameters(), lr=lr, maximize=True)

    def state(self) -> dict:
        """Readable values for logs: lambdas (or multipliers)."""
        if self.mode == "penalty":
            return {f"lambda/{g}": v for g, v in self.lambdas.items()}
        out = {}
        if self.mode == "budget":
            out = {"budget/pressure": float(self.pressure), "budget/kl_average": float(self.kl_average)}
        for i, g in enumerate(self.granularities):
            out[f"lambda1/{g}"] = float(self.lambda1[i].detach())
            out[f"lambda2/{g}"] = float(self.lambda2[i].detach())
        return out

"""What the circuit is trained to match: the objectives and the task metrics, read at the task's positions.

Every function takes logits already gathered at the marked positions ([P, V], P = marked positions in the
batch) and returns a *sum* over those positions, so a caller can normalise by a global count (several
ranks, several micro-batches) and get the mean.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from ..tasks.base import TaskData

OBJECTIVES = ("kl", "logit_diff", "ce")


def check_objective(objective: str, data: TaskData | None = None) -> None:
    if objective not in OBJECTIVES:
        raise ValueError(f"unknown objective {objective!r}; choose one of {', '.join(OBJECTIVES)}")
    if objective == "logit_diff" and data is not None and not data.has_distractors():
        raise ValueError(f"objective 'logit_diff' needs a distractor token at every position, and task "
                         f"{data.name!r} lacks some; use objective 'kl' or 'ce', or give every row a distractor")


def gather_positions(logits: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
    """[B, T, V] logits -> [P, V] float32 logits at the marked positions ([B, T] bool)."""
    return logits[positions].float()


def kl_sum(full_logp: torch.Tensor, logits: torch.Tensor) -> torch.Tensor:
    """sum over positions of KL(full || circuit); ``full_logp`` are the full model's log-probabilities."""
    logp = torch.log_softmax(logits.float(), dim=-1)
    return F.kl_div(logp, full_logp, log_target=True, reduction="sum")


def logit_diff(logits: torch.Tensor, target: torch.Tensor, distractor: torch.Tensor) -> torch.Tensor:
    """[P] logit of the target minus logit of the distractor (0 where there is no distractor)."""
    t = logits.gather(-1, target[:, None]).squeeze(-1)
    has = distractor >= 0
    d = logits.gather(-1, distractor.clamp_min(0)[:, None]).squeeze(-1)
    return torch.where(has, t - d, torch.zeros_like(t))


def objective_sum(objective: str, logits: torch.Tensor, full_logits: torch.Tensor, target: torch.Tensor,
                  distractor: torch.Tensor) -> torch.Tensor:
    """The objective summed over the P positions.

    kl: KL(full model || circuit) of the next-token distributions (the default; docs/design.md, section 8).
    logit_diff: squared difference between the circuit's and the full model's logit difference (target minus
        distractor): the circuit keeps the task behaviour at the full model's strength.
    ce: cross-entropy of the circuit on the target tokens.
    """
    if objective == "kl":
        return kl_sum(torch.log_softmax(full_logits.float(), -1), logits)
    if objective == "logit_diff":
        return (logit_diff(logits, target, distractor) - logit_diff(full_logits.float(), target, distractor)).pow(2).sum()
    if objective == "ce":
        return F.cross_entropy(logits.float(), target, reduction="sum")
    check_objective(objective)


def prob_diff(logits: torch.Tensor, good: torch.Tensor, bad: torch.Tensor) -> torch.Tensor:
    """[N] probability mass on the ``good`` tokens minus on the ``bad`` ones ([N, K] token sets, NONE padded),
    from [N, V] logits (one position per example)."""
    p = torch.softmax(logits.float(), -1)

    def mass(s):
        return (p.gather(-1, s.clamp_min(0)) * (s >= 0)).sum(-1)

    return mass(good) - mass(bad)


@torch.no_grad()
def metric_sums(logits: torch.Tensor, full_logits: torch.Tensor, target: torch.Tensor,
                distractor: torch.Tensor) -> dict:
    """Sums over the P positions of the evaluation metrics of a circuit against the full model.

    kl; accuracy of the circuit and of the full model (target beats the distractor where there is one, else
    the target is the argmax); logit difference of both (positions with a distractor); exact match of the
    circuit's argmax with the full model's. Divide by ``count`` / ``count_ld``.
    """
    logits, full_logits = logits.float(), full_logits.float()
    has = distractor >= 0

    def accuracy(lg):
        ld = logit_diff(lg, target, distractor)
        return torch.where(has, ld > 0, lg.argmax(-1) == target).sum()

    return {"kl": kl_sum(torch.log_softmax(full_logits, -1), logits).clamp_min(0),  # rounding, not a KL
            "accuracy": accuracy(logits), "full_accuracy": accuracy(full_logits),
            "logit_diff": logit_diff(logits, target, distractor).sum(),
            "full_logit_diff": logit_diff(full_logits, target, distractor).sum(),
            "exact_match": (logits.argmax(-1) == full_logits.argmax(-1)).sum(),
            "count": torch.tensor(float(target.numel())), "count_ld": has.sum()}


__all__ = ["OBJECTIVES", "check_objective", "gather_positions", "objective_sum", "metric_sums", "prob_diff",
           "logit_diff"]

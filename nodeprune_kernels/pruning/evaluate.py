"""Evaluating a binary circuit against the full model on held-out examples, and the faithfulness curve."""
from __future__ import annotations

import contextlib

import torch

from ..model.circuit import Circuit
from ..tasks.base import TaskData
from .objectives import gather_positions, metric_sums, prob_diff


def ablation_context(masks, data: TaskData, index):
    """The context a forward pass on ``data``'s examples at ``index`` runs in: with interchange ablation the
    paired corrupted prompts are what closed nodes take their values from."""
    if masks.ablation == "interchange":
        return masks.interchange(**data.model_inputs(index, corrupted=True))
    return contextlib.nullcontext()


def batch_inputs(data: TaskData, index, device) -> dict:
    return {k: v.to(device) for k, v in data.model_inputs(index).items()}


def estimate_means(masks, data: TaskData, batch_size: int) -> None:
    """Mean ablation: the masks' per-layer means over ``data``'s examples (``masks.estimate_means``)."""
    device = masks._device
    masks.estimate_means(batch_inputs(data, torch.arange(s, min(s + batch_size, len(data))), device)
                         for s in range(0, len(data), batch_size))


def last_positions(positions: torch.Tensor) -> torch.Tensor:
    """[B] the last marked position of each example."""
    T = positions.shape[1]
    return (positions * torch.arange(1, T + 1, device=positions.device)).argmax(1)


@torch.no_grad()
def evaluate_circuit(model, masks, data: TaskData, circuit: Circuit | None, batch_size: int = 16) -> dict:
    """Metrics of a circuit on ``data`` against the full model (the same model with every gate open).

    ``circuit`` None evaluates the masks' current gates in their current mode. Returns means over the
    marked positions: ``kl``, ``accuracy`` and ``full_accuracy``, ``logit_diff`` and ``full_logit_diff``
    (positions with a distractor; absent if none has one), ``exact_match`` (argmax agrees with the full
    model), ``prob_diff`` and ``full_prob_diff`` when the task has answer sets, and ``n_examples``.
    """
    device = masks._device
    sums: dict = {}
    pd = {"prob_diff": 0.0, "full_prob_diff": 0.0}
    use = masks.use_circuit(circuit) if circuit is not None else contextlib.nullcontext()
    with use:
        for start in range(0, len(data), batch_size):
            index = torch.arange(start, min(start + batch_size, len(data)))
            inputs = batch_inputs(data, index, device)
            pos = data.positions[index].to(device)
            with masks.all_open():
                full = model(**inputs).logits
            with ablation_context(masks, data, index):
                logits = model(**inputs).logits
            target, distractor = data.target[index].to(device)[pos], data.distractor[index].to(device)[pos]
            for k, v in metric_sums(gather_positions(logits, pos), gather_positions(full, pos), target,
                                    distractor).items():
                sums[k] = sums.get(k, 0.0) + float(v)
            if data.good is not None:
                rows = torch.arange(len(index), device=device)
                last = last_positions(pos)
                good, bad = data.good[index].to(device), data.bad[index].to(device)
                pd["prob_diff"] += float(prob_diff(logits[rows, last], good, bad).sum())
                pd["full_prob_diff"] += float(prob_diff(full[rows, last], good, bad).sum())
    n, n_ld = sums.pop("count"), sums.pop("count_ld")
    out = {k: sums[k] / n for k in ("kl", "accuracy", "full_accuracy", "exact_match")}
    if n_ld:
        out.update(logit_diff=sums["logit_diff"] / n_ld, full_logit_diff=sums["full_logit_diff"] / n_ld)
    if data.good is not None:
        out.update({k: v / len(data) for k, v in pd.items()})
    out["n_examples"] = len(data)
    return out


def circuit_above(masks, tau: float) -> Circuit:
    """The circuit of the gates whose log_alpha exceeds ``tau`` (a threshold on log_alpha, so it orders
    gates even where the deterministic gates are saturated at 0 or 1)."""
    model = masks._model()
    kept = {g: (la.detach() > tau).cpu() for g, la in masks.log_alpha.items()}
    return Circuit(kept, masks.dims, None, getattr(getattr(model, "config", None), "model_type", None))


def nodes_kept(circuit: Circuit) -> float:
    """Fraction of the gated nodes the circuit keeps (all gated granularities together)."""
    full = circuit.full()
    kept = sum(int(full[g].sum()) for g in circuit.kept)
    total = sum(full[g].numel() for g in circuit.kept)
    return kept / total


@torch.no_grad()
def faithfulness_curve(model, masks, data: TaskData, points: int = 9, batch_size: int = 16) -> list:
    """Faithfulness against sparsity: circuits cut at ``points`` thresholds on log_alpha (from keeping every
    gate to keeping only the strongest, at quantiles of the log_alpha values), each evaluated on ``data``.

    Returns a list of dicts: ``tau``, ``nodes_kept`` (fraction of gated nodes), ``kept/<granularity>``
    fractions, and the :func:`evaluate_circuit` metrics.
    """
    values = torch.cat([la.detach().float().flatten().cpu() for la in masks.log_alpha.values()])
    qs = torch.linspace(0, 1, points + 1)[:-1]
    taus = sorted(set([float(values.min()) - 1.0] + [float(torch.quantile(values, q)) for q in qs[1:]]))
    curve = []
    for tau in taus:
        c = circuit_above(masks, tau)
        point = {"tau": tau, "nodes_kept": nodes_kept(c)}
        point.update({f"kept/{g}": f for g, (_, _, f) in c.counts().items()})
        point.update(evaluate_circuit(model, masks, data, c, batch_size))
        curve.append(point)
    return curve

"""The field's circuit metrics for any ranking of nodes (MIB circuit localisation, Mueller et al. 2025).

A ranking is a score per node, shaped like the log_alphas: a pruning run's log_alphas, or attribution scores
(:class:`~nodeprune_kernels.NodeScores`). At each circuit size k of a grid (by default MIB's 0.1% ... 100% of
the nodes) the circuit C_k keeps the ``int(k * N)`` highest-ranked nodes, N the gated nodes of all gated
granularities together, **every gate counting as one node** whatever its granularity (a layer gate weighs
as much as one neuron's). C_k is then made consistent like every Circuit (a kept neuron of a closed block
goes), so ``nodes_kept`` can fall short of ``int(k * N)``. On held-out examples, with everything outside C
ablated by the run's ablation:

* faithfulness ``f(C) = (m(C) - m(empty)) / (m(full) - m(empty))`` with m the logit difference (where the
  task has a distractor at every position), and the KL form ``f_kl(C) = 1 - KL(C) / KL(empty)``;
* CPR = the integral of f over k and CMD = the integral of |1 - f|, trapezoids on a linear axis of k (as MIB
  computes them), and the same for the KL form;
* necessity: the faithfulness of the model with C_k ablated (every node kept but C_k's), low when C_k is
  needed.

:func:`jaccard` compares two circuits (stability across seeds).
"""
from __future__ import annotations

import contextlib

import torch

from ..model.circuit import Circuit
from ..tasks.base import TaskData
from .evaluate import evaluate_circuit, nodes_kept
from .path import areas, faithfulness

MIB_SIZES = (0.001, 0.002, 0.005, 0.01, 0.02, 0.05, 0.1, 0.2, 0.5, 1.0)


def top_nodes(ranking: dict, dims, n: int, model_type: str | None = None) -> Circuit:
    """The consistent circuit of the ``n`` highest-ranked nodes over every granularity of ``ranking``
    ({granularity: tensor like its log_alpha}; ties: granularities in ``ranking``'s order, then lower index)."""
    flat = torch.cat([r.detach().flatten().double().cpu() for r in ranking.values()])
    if not 0 <= n <= flat.numel():
        raise ValueError(f"n must be in [0, {flat.numel()}] (the ranked nodes), got {n}")
    keep = torch.zeros(flat.numel(), dtype=torch.bool)
    keep[torch.argsort(-flat, stable=True)[:n]] = True
    kept, start = {}, 0
    for g, r in ranking.items():
        kept[g] = keep[start:start + r.numel()].view(r.shape)
        start += r.numel()
    return Circuit(kept, dims, None, model_type)


def complement(circuit: Circuit) -> Circuit:
    """Every gated node but the circuit's (the model with the circuit ablated), made consistent."""
    return Circuit({g: ~k for g, k in circuit.kept.items()}, circuit.dims, None, circuit.model_type)


def jaccard(a: Circuit, b: Circuit) -> float:
    """|A and B| / |A or B| over the nodes of the granularities both gate (1.0 when both are empty)."""
    common = [g for g in a.kept if g in b.kept]
    if not common:
        raise ValueError("the two circuits gate no granularity in common")
    inter = sum(int((a.kept[g] & b.kept[g]).sum()) for g in common)
    union = sum(int((a.kept[g] | b.kept[g]).sum()) for g in common)
    return inter / union if union else 1.0


@torch.no_grad()
def ranking_table(model, masks, data: TaskData, ranking: dict, sizes=MIB_SIZES, batch_size: int = 16,
                  absolute: bool = False) -> dict:
    """The size-vs-faithfulness table of a ranking on ``data`` with the patched ``model`` (its ``masks``).

    ``absolute``: rank by |score| (for signed attribution scores; MIB's CMD convention). Returns ``metric``
    ("logit_diff" or "kl": the faithfulness reported as ``faithfulness``), ``empty`` (the empty circuit's
    metrics), ``points`` (per size: ``size``, ``n_nodes`` asked, ``nodes_kept`` (fraction after
    consistency), the circuit's held-out metrics, ``faithfulness``, ``faithfulness_kl``, ``necessity``,
    ``necessity_kl``), ``cpr``, ``cmd``, ``cpr_kl``, ``cmd_kl``.
    """
    if set(ranking) != set(masks.log_alpha):
        raise ValueError(f"the ranking covers {sorted(ranking)}, the model's gates {sorted(masks.log_alpha)}")
    sizes = sorted(float(k) for k in sizes)
    if not sizes or sizes[0] < 0 or sizes[-1] > 1:
        raise ValueError(f"sizes are fractions of the nodes in [0, 1], got {sizes}")
    ranking = {g: (ranking[g].abs() if absolute else ranking[g]) for g in masks.log_alpha}
    model_type = getattr(getattr(model, "config", None), "model_type", None)
    total = sum(r.numel() for r in ranking.values())
    empty_c = Circuit({g: torch.zeros(r.shape, dtype=torch.bool) for g, r in ranking.items()}, masks.dims, None,
                      model_type)
    empty = evaluate_circuit(model, masks, data, empty_c, batch_size)
    metric = "logit_diff" if "logit_diff" in empty else "kl"
    points = []
    for k in sizes:
        n = int(k * total)
        c = top_nodes(ranking, masks.dims, n, model_type)
        m = evaluate_circuit(model, masks, data, c, batch_size)
        rest = evaluate_circuit(model, masks, data, complement(c), batch_size)
        point = {"size": k, "n_nodes": n, "nodes_kept": nodes_kept(c), **m,
                 "faithfulness": faithfulness(m, empty, metric), "faithfulness_kl": faithfulness(m, empty, "kl"),
                 "necessity": faithfulness(rest, empty, metric), "necessity_kl": faithfulness(rest, empty, "kl")}
        points.append(point)
    out = {"metric": metric, "empty": empty, "points": points}
    for suffix, key in (("", "faithfulness"), ("_kl", "faithfulness_kl")):
        cpr, cmd = areas([p["size"] for p in points], [p[key] for p in points])
        out.update({f"cpr{suffix}": cpr, f"cmd{suffix}": cmd})
    return out


def signed_and_absolute(model, masks, data: TaskData, scores: dict, batch_size: int = 16) -> dict:
    """MIB's convention for signed scores (attribution): ``{"signed": table, "absolute": table}``, CPR read
    from the signed ranking's :func:`ranking_table` and CMD from the absolute one's."""
    return {"signed": ranking_table(model, masks, data, scores, batch_size=batch_size),
            "absolute": ranking_table(model, masks, data, scores, batch_size=batch_size, absolute=True)}


def table_lines(table: dict) -> list:
    """A printable size-vs-faithfulness table."""
    lines = [f"faithfulness by circuit size (held-out; f on {table['metric']}; every gate one node):",
             f"{'size':>7} {'nodes':>7} {'kept':>7} {'f':>7} {'f_kl':>7} {'necess.':>8}"]

    def fmt(v):
        return "-" if v is None else f"{v:.3f}"

    for p in table["points"]:
        lines.append(f"{100 * p['size']:>6g}% {p['n_nodes']:>7} {100 * p['nodes_kept']:>6.1f}% "
                     f"{fmt(p['faithfulness']):>7} {fmt(p['faithfulness_kl']):>7} {fmt(p['necessity']):>8}")
    lines.append(f"CPR {fmt(table['cpr'])}  CMD {fmt(table['cmd'])}  (KL form: CPR {fmt(table['cpr_kl'])}  CMD "
                 f"{fmt(table['cmd_kl'])})")
    return lines


@contextlib.contextmanager
def gated(model, config, train: TaskData):
    """``model`` patched with ``config``'s granularities, ablation and backend, in evaluation mode (means
    estimated on ``train`` for mean ablation), restored on exit. Yields the NodeMasks."""
    from ..model.patch import apply_node_pruning, remove_node_pruning
    from .evaluate import estimate_means

    was_training = model.training
    model.eval()
    masks = apply_node_pruning(model, config.granularities, config.ablation, config.backend, config.seed)
    try:
        if config.ablation == "mean":
            estimate_means(masks, train, config.batch_size)
        yield masks.eval()
    finally:
        remove_node_pruning(model)
        model.train(was_training)


def evaluate_ranking(model, task, ranking, *, config=None, tokenizer=None, sizes=MIB_SIZES,
                     absolute: bool | None = None, **options) -> dict:
    """MIB's size-vs-faithfulness table, CPR and CMD of a ranking, on the task's held-out examples.

    Args:
        model: a causal LM of a supported family, not patched (restored on return).
        task: as for :func:`~nodeprune_kernels.prune`.
        ranking: :class:`~nodeprune_kernels.NodeScores`, a :class:`~nodeprune_kernels.PruningResult` (its
            log_alphas) or {granularity: tensor like its log_alpha}; the granularities gated are its own.
        config: a PruneConfig for the ablation, backend, batch size, split (``options`` override it).
        sizes: fractions of the nodes (default MIB's grid).
        absolute: rank by |score| (default: True for NodeScores, whose scores are signed; False otherwise).

    Returns:
        :func:`ranking_table`'s dict.
    """
    from .attribution import NodeScores
    from .config import PruneConfig
    from .run import PruningResult, resolve_task

    if isinstance(ranking, NodeScores):
        absolute = True if absolute is None else absolute
        options.setdefault("ablation", ranking.ablation)
        ranking = ranking.scores
    elif isinstance(ranking, PruningResult):
        options.setdefault("ablation", ranking.config.ablation)
        ranking = ranking.log_alpha
    if not isinstance(ranking, dict):
        raise TypeError(f"ranking must be NodeScores, a PruningResult or a dict of tensors, got "
                        f"{type(ranking).__name__}")
    config = (config or PruneConfig()).replace(granularities=tuple(ranking), **options)
    data = resolve_task(task, tokenizer, config, model.config.vocab_size)
    train, held_out = data.split(config.n_eval, seed=config.seed)
    with gated(model, config, train) as masks:
        return ranking_table(model, masks, held_out, ranking, sizes, config.batch_size, bool(absolute))

"""The size path: one run that passes every circuit size, with a circuit cut at each size of a grid.

In ``sparsity="path"`` mode the targets rise over the run (:mod:`.sparsity`), so the expected fraction of the
gated nodes kept, ``f = sum_g sum(expected_l0_g) / sum_g N_g`` (all gated granularities together, as
``evaluate.nodes_kept`` counts a circuit), falls from about 1 to ``1 - max target``. When ``f`` falls to a
grid size ``p`` (or below), the circuit of that size is cut:

* ``int(p * N)`` nodes in all (MIB's count, rounded down; N the gated nodes), shared out over the gated
  granularities in proportion to each one's expected kept count at that step (largest remainders, none over
  its node count);
* each granularity's share chosen by the gates' ranking (``NodeMasks.circuit(size=...)``) *inside the
  previous, larger path circuit*, so the path's circuits are nested, and made consistent like every circuit.
  Where the share cannot all be kept inside the previous circuit, fewer are kept (``nodes_kept`` says how
  many).

At the end every circuit is scored on the held-out examples (:func:`evaluate_circuit`), with MIB's
faithfulness ``f(C) = (m(C) - m(empty)) / (m(full) - m(empty))`` (``m``: the logit difference where the task
has distractors, else minus the KL, so ``f = 1 - KL(C) / KL(empty)``; the KL form is also given as
``faithfulness_kl``), and its areas over the sizes reached (:func:`areas`: CPR and CMD, and ``cpr_kl``,
``cmd_kl``). The run directory keeps ``circuits/size_<p>pct.json``, ``path.json`` and
``path.png``.
"""
from __future__ import annotations

import math
from pathlib import Path

import torch

from ..model.circuit import Circuit
from .evaluate import evaluate_circuit, nodes_kept

PATH_JSON = "path.json"
CIRCUITS_DIR = "circuits"
_CROSS = 1e-6  # relative slack when comparing the expected kept fraction with a grid size (float rounding)


def circuit_name(size: float) -> str:
    """The file of the path circuit of ``size`` (a fraction): ``size_0.1pct.json`` for 0.001."""
    return f"size_{100 * size:g}pct.json"


def expected_kept(masks) -> dict:
    """{granularity: expected number of kept nodes, sum of expected_l0} (floats)."""
    with torch.no_grad():
        return {g: float(l0.sum()) for g, l0 in masks.expected_l0().items()}


def share(total: int, weights: dict, caps: dict) -> dict:
    """``total`` split into ints over ``weights``' keys in proportion to them, none above its cap (the excess
    goes to the others), the remainders rounded by largest fraction. ``total`` <= sum of the caps."""
    out = dict.fromkeys(weights, 0.0)
    free, left = [g for g in weights if caps[g] > 0], float(total)
    while free and left > 1e-9:  # proportional shares; a capped key is fixed and the rest shared again
        w = sum(max(weights[g], 0.0) for g in free)
        part = {g: left * (max(weights[g], 0.0) / w if w > 0 else 1.0 / len(free)) for g in free}
        over = [g for g in free if out[g] + part[g] >= caps[g]]
        if not over:
            for g in free:
                out[g] += part[g]
            break
        for g in over:
            left -= caps[g] - out[g]
            out[g] = float(caps[g])
            free.remove(g)
    n = {g: min(caps[g], int(math.floor(v + 1e-9))) for g, v in out.items()}
    room = sorted((g for g in weights if n[g] < caps[g]), key=lambda g: -(out[g] - n[g]))
    for g in room[:max(0, total - sum(n.values()))]:
        n[g] += 1
    return n


class SizePath:
    """The path's circuits, cut as the run passes each grid size; saved in checkpoints (:meth:`state`).

    ``sizes``: fractions of the gated nodes kept, descending.
    """

    def __init__(self, sizes):
        self.sizes = tuple(sorted(sizes, reverse=True))
        self.cut: dict = {}  # size -> (step, Circuit)

    def update(self, masks, step: int) -> None:
        """Cut the circuit of every grid size the gates have reached at ``step`` and not yet cut."""
        todo = [p for p in self.sizes if p not in self.cut]
        if not todo:
            return
        kept = expected_kept(masks)
        caps = {g: masks.log_alpha[g].numel() for g in kept}
        total = sum(caps.values())
        f = sum(kept.values()) / total
        for p in todo:  # descending: each inside the one before
            if f > p * (1.0 + _CROSS):
                break
            n = share(int(p * total + 1e-9), kept, caps)
            within = self.cut[min(self.cut)][1] if self.cut else None
            self.cut[p] = (step, masks.circuit(size=n, within=within, strict=False))

    def not_reached(self) -> list:
        return [p for p in self.sizes if p not in self.cut]

    def state(self) -> list:
        """JSON-friendly: one {size, step, circuit (Circuit.to_dict)} per circuit cut so far."""
        return [{"size": p, "step": s, "circuit": c.to_dict()} for p, (s, c) in sorted(self.cut.items(),
                                                                                      reverse=True)]

    def load_state(self, state: list) -> None:
        self.cut = {float(e["size"]): (int(e["step"]), Circuit.from_dict(e["circuit"], "checkpoint path circuit"))
                    for e in state}

    @torch.no_grad()
    def evaluate(self, model, masks, data, batch_size: int) -> dict:
        """Score every path circuit (and the empty circuit) on ``data``: the size-vs-faithfulness table
        (``metric``, ``empty``, ``points``, ``cpr``, ``cmd``, ``cpr_kl``, ``cmd_kl``, ``not_reached``)."""
        empty_kept = {g: torch.zeros(la.shape, dtype=torch.bool) for g, la in masks.log_alpha.items()}
        model_type = getattr(getattr(model, "config", None), "model_type", None)
        empty = evaluate_circuit(model, masks, data, Circuit(empty_kept, masks.dims, None, model_type), batch_size)
        metric = "logit_diff" if "logit_diff" in empty else "kl"
        points = []
        for p, (step, c) in sorted(self.cut.items()):
            m = evaluate_circuit(model, masks, data, c, batch_size)
            point = {"size": p, "step": step, "nodes_kept": nodes_kept(c)}
            point.update({f"n/{g}": k for g, (k, _, _) in c.counts().items() if g in c.kept})
            point.update(m)
            point.update(faithfulness=faithfulness(m, empty, metric), faithfulness_kl=faithfulness(m, empty, "kl"))
            points.append(point)
        table = {"metric": metric, "empty": empty, "points": points, "not_reached": self.not_reached()}
        for suffix, key in (("", "faithfulness"), ("_kl", "faithfulness_kl")):
            cpr, cmd = areas([p["size"] for p in points], [p[key] for p in points])
            table.update({f"cpr{suffix}": cpr, f"cmd{suffix}": cmd})
        return table

    def write(self, run_dir: Path, table: dict) -> None:
        """circuits/size_<p>pct.json for every circuit, path.json (the table) and path.png."""
        from .outputs import _atomic, write_json

        folder = Path(run_dir) / CIRCUITS_DIR
        folder.mkdir(parents=True, exist_ok=True)
        for p, (_, c) in self.cut.items():
            _atomic(folder / circuit_name(p), lambda f, c=c: c.to_json(f))
        write_json(Path(run_dir) / PATH_JSON, table)


def faithfulness(m: dict, empty: dict, metric: str) -> float | None:
    """MIB's normalised faithfulness of a circuit's metrics ``m`` against the empty circuit's and the full
    model's: ``(m(C) - m(empty)) / (m(full) - m(empty))`` for the logit difference; for the KL (whose full
    model value is 0) ``1 - KL(C) / KL(empty)``. None where the empty circuit matches the full model."""
    if metric == "logit_diff":
        span = m["full_logit_diff"] - empty["logit_diff"]
        return None if abs(span) < 1e-12 else (m["logit_diff"] - empty["logit_diff"]) / span + 0.0  # no -0.0
    return None if empty["kl"] < 1e-12 else 1.0 - m["kl"] / empty["kl"]


def areas(sizes: list, faith: list) -> tuple:
    """(CPR, CMD) as MIB integrates them: trapezoids over the circuit sizes (fractions, on a linear axis,
    ascending) of the faithfulness ``f`` and of ``|1 - f|``. (None, None) with fewer than two points or any
    undefined faithfulness. Over MIB's full grid the sizes span [0.001, 1]."""
    pts = sorted(zip(sizes, faith))
    if len(pts) < 2 or any(f is None for _, f in pts):
        return None, None
    cpr = cmd = 0.0
    for (x0, f0), (x1, f1) in zip(pts, pts[1:]):
        cpr += (x1 - x0) * (f0 + f1) / 2
        cmd += (x1 - x0) * (abs(1 - f0) + abs(1 - f1)) / 2
    return cpr, cmd

"""Attribution over nodes: a fast first answer from gradients with respect to the gates.

Every node of every granularity has a gate z (1: the node as in the full model, 0: ablated). The masked ops
already reduce, in their backward, the per-node sums that give the derivative of any metric m with respect
to each gate, so one forward and one backward per batch scores every node at once:

* ``atp`` (attribution patching at node level; Nanda, Kramar et al. 2024): ``score = dm/dz`` at z = 1, the
  first-order estimate of what the metric loses when that node alone is closed.
* ``ig`` (integrated gradients along a common path): every gate set to the same value a, from 0 to 1;
  ``score = integral over a of dm/dz`` by the trapezoid rule over ``ig_steps`` points. The scores of all
  gated nodes sum to ``m(full) - m(empty)`` (completeness) up to the quadrature error, and saturating
  effects that AtP misses are seen.

The metric is ``"logit_diff"`` (the logit of the target minus that of the distractor, mean over the task's
positions) or ``"kl"``, used as ``m = -KL(full model || gated model)`` so that, for both, a positive score
means the node helps the model do what the full model does. The KL is at its minimum where every gate is
open, so its gradient there is zero: AtP with ``"kl"`` is refused; IG integrates away from that point and
supports it.

Gradients are taken with the deterministic (evaluation) gates. A gate is set to a value a by its log_alpha
(``z = clamp(sigmoid(log_alpha) * 1.2 - 0.1, 0, 1)``), and dm/dz is the log_alpha gradient divided by
dz/dlog_alpha; the path's ends are taken ``EDGE`` inside [0, 1], where the clamp still passes gradients.
"""
from __future__ import annotations

import json
import math
import os
from dataclasses import dataclass, field
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from ..model.circuit import Circuit
from ..model.families import ModelDims
from ..model.masks import gate_shapes
from ..ops.hard_concrete.reference import GAMMA, STRETCH
from ..tasks.base import TaskData
from .config import PruneConfig
from .evaluate import ablation_context, batch_inputs
from .objectives import kl_sum, logit_diff

METHODS = ("atp", "ig")
METRICS = ("kl", "logit_diff")
DEFAULT_METRIC = {"atp": "logit_diff", "ig": "kl"}
EDGE = 1e-5  # the path's ends, inside [0, 1] (at exactly 0 or 1 the gate's clamp may block the gradient)
SCORES_FORMAT = 1
INIT_SPREAD = 2.0  # init="attribution": the weakest node starts this much below init_log_alpha


def gate_log_alpha(z: float) -> float:
    """The log_alpha whose deterministic gate is ``z`` (0 < z < 1)."""
    s = (z - GAMMA) / STRETCH
    return math.log(s / (1.0 - s))


def gate_slope(z: float) -> float:
    """dz / dlog_alpha of the deterministic gate at value ``z`` (0 < z < 1)."""
    s = (z - GAMMA) / STRETCH
    return STRETCH * s * (1.0 - s)


def ig_points(steps: int) -> list:
    """[(gate value, trapezoid weight)] of ``steps`` points over [0, 1], the ends moved ``EDGE`` inside."""
    if steps < 2:
        raise ValueError(f"ig_steps must be at least 2 (the trapezoid rule needs both ends), got {steps}")
    h = 1.0 / (steps - 1)
    return [(min(max(i * h, EDGE), 1.0 - EDGE), h / 2 if i in (0, steps - 1) else h) for i in range(steps)]


def check_method(method: str, metric: str | None, data: TaskData | None = None) -> str:
    """The metric the run uses (``metric`` or the method's default), after checking the combination."""
    if method not in METHODS:
        raise ValueError(f"unknown attribution method {method!r}; choose one of {', '.join(METHODS)}")
    metric = DEFAULT_METRIC[method] if metric is None else metric
    if metric not in METRICS:
        raise ValueError(f"unknown attribution metric {metric!r}; choose one of {', '.join(METRICS)}")
    if method == "atp" and metric == "kl":
        raise ValueError("attribution method 'atp' cannot use metric 'kl': the KL to the full model is at its "
                         "minimum with every gate open, so its gradient there is zero and every score would be 0. "
                         "Use metric='logit_diff' with 'atp', or method='ig' (which integrates over the gate "
                         "value and supports 'kl')")
    if metric == "logit_diff" and data is not None and not data.has_distractors():
        raise ValueError(f"metric 'logit_diff' needs a distractor token at every position, and task {data.name!r} "
                         "lacks some; use method='ig' with metric='kl', or give every row a distractor")
    return metric


@dataclass
class NodeScores:
    """Attribution scores of every node, shaped like the log_alphas.

    Attributes:
        scores: {granularity: float32 tensor} ([L] for layer / attn / mlp, [L, H] head, [L, H*D]
            attn_neuron, [L, d_ff] mlp_neuron, [L, d_model] mlp_out); signed: positive = the node helps.
        dims: the model's sizes.
        method, metric, ablation: how they were computed.
        model_type: the model's ``config.model_type``.
        info: ``m_full`` and ``m_empty`` (the metric with every gate open / closed; IG only), ``n_examples``,
            ``ig_steps``.
    """

    scores: dict
    dims: ModelDims
    method: str
    metric: str
    ablation: str
    model_type: str | None = None
    info: dict = field(default_factory=dict)

    def signed(self) -> dict:
        return {g: s.clone() for g, s in self.scores.items()}

    def absolute(self) -> dict:
        return {g: s.abs() for g, s in self.scores.items()}

    def total(self) -> float:
        """The sum of every node's signed score (for IG: about ``m_full - m_empty``)."""
        return float(sum(s.double().sum() for s in self.scores.values()))

    def circuit(self, size: "int | dict | None" = None, fraction: "float | dict | None" = None,
                by: str = "abs") -> Circuit:
        """The top nodes by score, per granularity, as a consistent :class:`Circuit`.

        Give ``size`` (a count per granularity: one int for all, or a dict) or ``fraction`` (of each
        granularity's nodes kept). ``by``: "abs" ranks by |score| (the field's usual choice), "signed" by
        the signed score (only nodes that help). Ties keep the lower index.
        """
        if by not in ("abs", "signed"):
            raise ValueError(f"by must be 'abs' or 'signed', got {by!r}")
        ranking = self.absolute() if by == "abs" else self.signed()
        return Circuit.from_ranking(ranking, self.dims, size=size, fraction=fraction, model_type=self.model_type)

    def to_log_alpha(self, init_log_alpha: float = 3.0, spread: float = INIT_SPREAD) -> dict:
        """Initial log_alphas from the ranking (``prune(..., init="attribution")``): within each
        granularity, the node of rank quantile r (1 = the largest |score|, 0 = the smallest; ties share
        their mean rank) starts at ``init_log_alpha - spread * (1 - r)``. Every gate starts about as open as
        with a constant init (the sparsity term closes them as the run goes), but in the order of the
        scores, so the weakest nodes are the first to close."""
        out = {}
        for g, s in self.absolute().items():
            flat = s.flatten().double()
            n = flat.numel()
            order = torch.argsort(torch.argsort(flat, stable=True), stable=True).double()
            # ties: the mean rank of equal values
            uniq, inverse = torch.unique(flat, return_inverse=True)
            mean_rank = torch.zeros(len(uniq), dtype=torch.float64).index_add_(0, inverse, order)
            mean_rank /= torch.bincount(inverse, minlength=len(uniq)).double()
            r = mean_rank[inverse] / max(n - 1, 1) if n > 1 else torch.ones(1, dtype=torch.float64)
            out[g] = (init_log_alpha - spread * (1 - r)).float().view(s.shape)
        return out

    # ----------------------------------------------------------------------------------- files
    def save(self, path: "str | os.PathLike") -> Path:
        """Write the scores as safetensors (float32 per granularity), the rest as JSON metadata."""
        path = Path(path)
        meta = {"format": SCORES_FORMAT, "dims": self.dims.to_dict(), "method": self.method, "metric": self.metric,
                "ablation": self.ablation, "model_type": self.model_type, "info": self.info}
        tensors = {g: s.detach().float().cpu().contiguous() for g, s in self.scores.items()}
        save_file(tensors, str(path), metadata={"nodeprune_scores": json.dumps(meta)})
        return path

    @classmethod
    def load(cls, path: "str | os.PathLike") -> "NodeScores":
        """Read a file written by :meth:`save`; a file of another kind is an error naming it."""
        from safetensors import safe_open

        path = Path(path)
        try:
            with safe_open(str(path), "pt") as f:
                raw = (f.metadata() or {}).get("nodeprune_scores")
            tensors = load_file(str(path))
        except Exception as e:  # safetensors' own error types for missing, truncated or foreign files
            raise ValueError(f"{path} is not a readable safetensors file ({e})") from None
        if raw is None:
            raise ValueError(f"{path} holds no attribution scores (no 'nodeprune_scores' metadata): it was not "
                             "written by NodeScores.save")
        meta = json.loads(raw)
        if meta.get("format") != SCORES_FORMAT:
            raise ValueError(f"{path}: scores format {meta.get('format')!r} is not {SCORES_FORMAT}")
        dims = ModelDims(**meta["dims"])
        shapes = gate_shapes(dims)
        for g, t in tensors.items():
            if g not in shapes or tuple(t.shape) != shapes[g]:
                raise ValueError(f"{path}: scores {g!r} of shape {tuple(t.shape)} do not fit the recorded sizes")
        return cls(tensors, dims, meta["method"], meta["metric"], meta["ablation"], meta["model_type"],
                   meta.get("info", {}))


# --------------------------------------------------------------------------------------------- run
def attribute(model, task, *, method: str = "atp", metric: str | None = None, ig_steps: int = 8,
              config: PruneConfig | None = None, tokenizer=None, progress: bool = True, **options) -> NodeScores:
    """Score every node of ``model`` for ``task`` by attribution patching (``atp``) or integrated gradients
    (``ig``), on the task's training examples (the held-out split of :func:`prune` is left out).

    Args:
        model: a Hugging Face causal LM of a supported family, not patched; restored on return.
        task: as for :func:`prune` (a task name, a .jsonl path, a Task or TaskData).
        method: "atp" (one forward and backward per batch) or "ig" (``ig_steps`` of them).
        metric: "logit_diff" or "kl" (None: "logit_diff" for atp, "kl" for ig; atp with kl is refused).
        ig_steps: points of the trapezoid rule over the common gate value in [0, 1] (ig only; >= 2).
        config: a :class:`PruneConfig` for what the two share (granularities, ablation, backend,
            batch_size, seed, n_examples, n_eval, task_options, dtype); keyword ``options`` override it.
        tokenizer: for tasks made of text.
        progress: a tqdm bar over the batches.

    Returns:
        :class:`NodeScores`.
    """
    from .run import prepare  # run.py imports this module for init="attribution"

    config, data = prepare(model, task, config, options, tokenizer, "attribute")
    metric = check_method(method, metric, data)
    points = [(1.0 - EDGE, 1.0)] if method == "atp" else ig_points(ig_steps)
    train, _ = data.split(config.n_eval, seed=config.seed)

    from .metrics import gated

    with gated(model, config, train) as masks:
        sums = {g: torch.zeros_like(la, dtype=torch.float64) for g, la in masks.log_alpha.items()}
        ends = {"m_full": 0.0, "m_empty": 0.0}
        n_positions = int(train.positions.sum())
        batches = [torch.arange(s, min(s + config.batch_size, len(train))) for s in range(0, len(train),
                                                                                         config.batch_size)]
        from tqdm.auto import tqdm

        for index in tqdm(batches, desc=f"attribution ({method})", unit="batch", disable=not progress):
            _score_batch(model, masks, train, index, metric, points, n_positions, sums, ends)
        dims = masks.dims
    scores = {g: s.float().cpu() for g, s in sums.items()}
    info = {"n_examples": len(train)}
    if method == "ig":
        info.update(ends, ig_steps=ig_steps)
    return NodeScores(scores, dims, method, metric, config.ablation, model.config.model_type, info)


def _score_batch(model, masks, data: TaskData, index, metric: str, points: list, n_positions: int, sums: dict,
                 ends: dict) -> None:
    """Add one batch's weighted dm/dz over the path ``points`` to ``sums`` (m normalised by the positions of
    the whole data, so the batches add up to the mean)."""
    device = masks._device
    inputs = batch_inputs(data, index, device)
    pos = data.positions[index].to(device)
    target, distractor = data.target[index].to(device)[pos], data.distractor[index].to(device)[pos]
    with torch.no_grad(), masks.all_open():
        full = _at(model(**inputs).logits, pos)
    full_logp = torch.log_softmax(full, -1)
    for z, weight in points:
        with torch.no_grad():
            for la in masks.log_alpha.values():
                la.fill_(gate_log_alpha(z))
                la.grad = None
        with ablation_context(masks, data, index):
            logits = _at(model(**inputs).logits, pos)
            if metric == "logit_diff":
                m = logit_diff(logits, target, distractor).sum() / n_positions
            else:
                m = -kl_sum(full_logp, logits) / n_positions
            m.backward()
        for g, la in masks.log_alpha.items():
            if la.grad is not None:
                sums[g] += la.grad.double() * (weight / gate_slope(z))
        if len(points) > 1 and z in (points[0][0], points[-1][0]):
            ends["m_empty" if z == points[0][0] else "m_full"] += float(m.detach())


def _at(logits: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
    """[P, V] logits at the marked positions, in float32 or the model's wider dtype (float64 stays)."""
    out = logits[positions]
    return out.to(torch.promote_types(out.dtype, torch.float32))


# --------------------------------------------------------------------------------------- run directory
SCORES_FILE = "scores.safetensors"


def attribute_run(model, task, run_dir, *, method: str = "atp", metric: str | None = None, ig_steps: int = 8,
                  fraction: float = 0.1, config: PruneConfig | None = None, tokenizer=None,
                  progress: bool = True) -> str:
    """``nodeprune attribute``: score the nodes, cut the top ``fraction`` of every granularity's nodes by
    |score|, evaluate that circuit on the held-out examples and write the run directory:

        <run_dir>/config.json         the PruneConfig, the attribution options, the task and data fingerprint
        <run_dir>/scores.safetensors  the NodeScores (NodeScores.load)
        <run_dir>/circuit.json        the top-``fraction`` circuit (Circuit.from_json)
        <run_dir>/metrics.json        that circuit's held-out metrics (as prune's), ``mib/cpr`` and ``mib/cmd``,
                                      and MIB's size-vs-faithfulness tables of the signed and the absolute
                                      ranking (:func:`~nodeprune_kernels.pruning.metrics.ranking_table`)

    Returns a printable summary.
    """
    from . import outputs
    from .evaluate import evaluate_circuit
    from .metrics import gated, signed_and_absolute, table_lines
    from .run import fingerprint, resolve_task

    config = config or PruneConfig()
    if not 0.0 <= fraction <= 1.0:
        raise ValueError(f"fraction must be in [0, 1], got {fraction}")
    data = resolve_task(task, tokenizer, config, model.config.vocab_size)
    scores = attribute(model, data, method=method, metric=metric, ig_steps=ig_steps, config=config,
                       progress=progress)
    circuit = scores.circuit(fraction=fraction)
    train, held_out = data.split(config.n_eval, seed=config.seed)

    with gated(model, config, train) as masks:
        metrics = evaluate_circuit(model, masks, held_out, circuit, config.batch_size)
        mib = signed_and_absolute(model, masks, held_out, scores.scores, config.batch_size)
    metrics.update({"mib/cpr": mib["signed"]["cpr"], "mib/cmd": mib["absolute"]["cmd"]})
    metrics.update({f"kept/{g}": f for g, (_, _, f) in circuit.counts().items()})

    run_dir = Path(run_dir)
    meta = {"task": data.name, "data": fingerprint(data), "n_train": len(train), "n_eval": len(held_out),
            "attribution": {"method": scores.method, "metric": scores.metric, "ig_steps": ig_steps,
                            "fraction": fraction}}
    outputs.write_config(run_dir, config, meta)
    scores.save(run_dir / SCORES_FILE)
    circuit.to_json(run_dir / "circuit.json")
    outputs.write_json(run_dir / "metrics.json", {"metrics": metrics, "attribution": scores.info, "mib": mib})
    lines = [f"{scores.method} scores ({scores.metric}) of {sum(s.numel() for s in scores.scores.values())} nodes "
             f"on {len(train)} examples", f"top {fraction:g} of each granularity:", circuit.summary(), "",
             f"held-out ({metrics['n_examples']} examples): KL {metrics['kl']:.4f}  accuracy "
             f"{metrics['accuracy']:.3f} (full model {metrics['full_accuracy']:.3f})", "",
             *table_lines(mib["absolute"]),
             f"written to {run_dir}: {SCORES_FILE}, circuit.json, metrics.json, config.json"]
    return "\n".join(lines)

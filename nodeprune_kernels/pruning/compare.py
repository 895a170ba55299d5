"""Coarse against fine: the method's central finding as a report users can run.

Prune the same model and task twice, once with block and head granularities only (``COARSE``) and once with
every granularity, then count per layer how many of the neurons inside the coarse circuit's kept heads and
MLP blocks the fine circuit drops, next to each circuit's held-out KL.

The claim is about equal faithfulness, so by default both runs hold the same training KL: ``sparsity=
"budget"`` with one ``kl_budget`` (the config's, else ``DEFAULT_BUDGET``), each as sparse as that budget
allows. ``hold="targets"`` runs each granularity set with its own targets instead; the circuits are then not
equally faithful, and the report says so.
"""
from __future__ import annotations

from pathlib import Path

from ..model.circuit import Circuit
from ..model.masks import GRANULARITIES
from .config import COARSE, PruneConfig
from .sparsity import BUDGET_TOLERANCE

DEFAULT_BUDGET = 0.1  # the KL both runs of a comparison are held to when the config names none
HOLDS = ("budget", "targets")
from .outputs import write_json


def neuron_overlap(coarse: Circuit, fine: Circuit) -> dict:
    """Per layer: attention and MLP neurons the coarse circuit keeps (all neurons of its kept heads and
    blocks), the fine circuit keeps, and the coarse-kept ones the fine circuit drops.

    Returns {"layers": [{"layer", "<kind>/coarse", "<kind>/fine", "<kind>/dropped"} for kind in attn_neuron,
    mlp_neuron], "totals": sums over layers}.
    """
    coarse.check_dims(fine.dims)
    c, f = coarse.full(), fine.full()
    rows = []
    for layer in range(coarse.dims.n_layers):
        row = {"layer": layer}
        for kind in ("attn_neuron", "mlp_neuron"):
            row[f"{kind}/coarse"] = int(c[kind][layer].sum())
            row[f"{kind}/fine"] = int(f[kind][layer].sum())
            row[f"{kind}/dropped"] = int((c[kind][layer] & ~f[kind][layer]).sum())
        rows.append(row)
    return {"layers": rows, "totals": {k: sum(r[k] for r in rows) for k in rows[0] if k != "layer"}}


def format_comparison(cmp: dict) -> str:
    """The comparison as a text table."""
    def pct(r, kind):
        n = r[f"{kind}/coarse"]
        return f"{100 * r[f'{kind}/dropped'] / n:6.1f}%" if n else "      -"

    lines = ["neurons inside the coarse circuit's kept heads and MLP blocks that the fine circuit drops:",
             f"{'layer':>5} | {'attn kept':>9} {'dropped':>8} {'':>7} | {'mlp kept':>9} {'dropped':>8} {'':>7}"]
    for r in cmp["layers"] + [dict(cmp["totals"], layer="all")]:
        lines.append(f"{r['layer']:>5} | {r['attn_neuron/coarse']:>9} {r['attn_neuron/dropped']:>8} "
                     f"{pct(r, 'attn_neuron')} | {r['mlp_neuron/coarse']:>9} {r['mlp_neuron/dropped']:>8} "
                     f"{pct(r, 'mlp_neuron')}")
    if "kl_coarse" in cmp:
        lines.append(f"held-out KL to the full model: coarse circuit {cmp['kl_coarse']:.4f}, fine circuit "
                     f"{cmp['kl_fine']:.4f}")
    if cmp.get("hold") == "budget":
        lines.append(f"both runs held to the training KL budget {cmp['kl_budget']:g} (moving average at the end: "
                     f"coarse {cmp['train_kl_coarse']:.4f}, fine {cmp['train_kl_fine']:.4f}): "
                     + ("equally faithful within the budget's tolerance" if cmp["equally_faithful"] else
                        "NOT equally faithful: a run missed the budget (give more steps)"))
    elif cmp.get("hold") == "targets":
        lines.append("each run with its own targets: the two circuits are not held to the same faithfulness "
                     "(compare their KLs above; hold='budget' holds both to one KL)")
    return "\n".join(lines)


def _only(value, granularities):
    return {g: v for g, v in value.items() if g in granularities} if isinstance(value, dict) else value


def compare_coarse_fine(model, task, config: PruneConfig | None = None, *, tokenizer=None, run_dir=None,
                        progress: bool = True, hold: str = "budget", **options) -> dict:
    """Run the coarse and the fine pruning of ``model`` on ``task`` (same options otherwise; see
    :func:`nodeprune_kernels.prune`) and compare them. With ``run_dir`` the runs go to ``run_dir/coarse`` and
    ``run_dir/fine`` and the comparison to ``run_dir/comparison.json``.

    ``hold="budget"`` (the default): both runs under ``sparsity="budget"`` with the same ``kl_budget`` (the
    config's, else ``DEFAULT_BUDGET``; ``targets`` are the caps); ``hold="targets"``: the config's sparsity
    as it is, each run with its own targets.

    Returns the :func:`neuron_overlap` dict plus ``hold``, ``kl_coarse``, ``kl_fine`` (held-out), for the
    budget ``kl_budget``, ``train_kl_coarse``, ``train_kl_fine`` (the runs' final moving-average training KL)
    and ``equally_faithful`` (neither missed the budget), and the two PruningResults (``coarse``, ``fine``;
    not in the JSON).
    """
    from .run import prune

    if hold not in HOLDS:
        raise ValueError(f"unknown hold {hold!r}; choose one of {', '.join(HOLDS)}")
    config = (config or PruneConfig()).replace(**options)
    if hold == "budget":
        config = config.replace(sparsity="budget", kl_budget=config.kl_budget or DEFAULT_BUDGET)
    results = {}
    for name, grans in (("coarse", COARSE), ("fine", GRANULARITIES)):
        cfg = config.replace(granularities=grans, lambdas=_only(config.lambdas, grans),
                             targets=_only(config.targets, grans))
        sub = Path(run_dir) / name if run_dir is not None else None
        results[name] = prune(model, task, cfg, tokenizer=tokenizer, run_dir=sub, progress=progress)
    cmp = neuron_overlap(results["coarse"].circuit, results["fine"].circuit)
    cmp.update(hold=hold, kl_coarse=results["coarse"].metrics["kl"], kl_fine=results["fine"].metrics["kl"])
    if hold == "budget":
        train = {k: r.metrics["budget/kl_average"] for k, r in results.items()}
        cmp.update(kl_budget=config.kl_budget, train_kl_coarse=train["coarse"], train_kl_fine=train["fine"],
                   budget_tolerance=BUDGET_TOLERANCE,
                   equally_faithful=not any(r.metrics["budget_missed"] for r in results.values()))
    if run_dir is not None:
        write_json(Path(run_dir) / "comparison.json", cmp)
    return dict(cmp, coarse=results["coarse"], fine=results["fine"])


def compare_methods(model, task, config: PruneConfig | None = None, *, tokenizer=None, run_dir=None,
                    progress: bool = True, ig_steps: int = 8, **options) -> dict:
    """Pruning against attribution on one task: one pruning run, AtP (where the task has distractors) and IG,
    each ranking scored by MIB's measures on the same held-out examples (:mod:`.metrics`; attribution: CPR of
    the signed ranking, CMD of the absolute one, as MIB does).

    Returns {"rows": [{"method", "cpr", "cmd", "cpr_kl", "cmd_kl", "seconds"}], "tables": {method: table}};
    with ``run_dir`` the pruning run goes to ``run_dir/pruning`` and the comparison to
    ``run_dir/methods.json``.
    """
    import time

    from .attribution import attribute
    from .metrics import gated, signed_and_absolute
    from .run import prepare, prune

    config, data = prepare(model, task, config, options, tokenizer, "compare_methods")
    train, held_out = data.split(config.n_eval, seed=config.seed)
    has_distractors = data.has_distractors()
    rows, tables = [], {}
    t0 = time.perf_counter()
    result = prune(model, data, config, run_dir=Path(run_dir) / "pruning" if run_dir is not None else None,
                   progress=progress)
    tables["pruning"] = result.extra["mib"]
    rows.append({"method": "pruning", **{k: result.metrics[f"mib/{k}"] for k in ("cpr", "cmd", "cpr_kl", "cmd_kl")},
                 "seconds": time.perf_counter() - t0})
    methods = ([("atp", "logit_diff")] if has_distractors else []) + [("ig", "logit_diff" if has_distractors else "kl")]
    for method, metric in methods:
        t0 = time.perf_counter()
        scores = attribute(model, data, method=method, metric=metric, ig_steps=ig_steps, config=config,
                           progress=progress)
        seconds = time.perf_counter() - t0
        with gated(model, config, train) as masks:  # both rankings on one patched model
            tables[method] = signed_and_absolute(model, masks, held_out, scores.scores, config.batch_size)
        signed, absolute = tables[method]["signed"], tables[method]["absolute"]
        rows.append({"method": method, "cpr": signed["cpr"], "cmd": absolute["cmd"], "cpr_kl": signed["cpr_kl"],
                     "cmd_kl": absolute["cmd_kl"], "seconds": seconds})
    out = {"rows": rows, "tables": tables, "metric": tables["pruning"]["metric"]}
    if run_dir is not None:
        write_json(Path(run_dir) / "methods.json", out)
    return dict(out, pruning=result)


def format_methods(cmp: dict) -> str:
    """:func:`compare_methods` as a text table."""
    def fmt(v):
        return "-" if v is None else f"{v:.3f}"

    lines = [f"pruning against attribution (held-out; MIB's CPR / CMD on {cmp['metric']}, and their KL forms):",
             f"{'method':>8} {'CPR':>7} {'CMD':>7} {'CPR_kl':>7} {'CMD_kl':>7} {'seconds':>8}"]
    for r in cmp["rows"]:
        lines.append(f"{r['method']:>8} {fmt(r['cpr']):>7} {fmt(r['cmd']):>7} {fmt(r['cpr_kl']):>7} "
                     f"{fmt(r['cmd_kl']):>7} {r['seconds']:>8.1f}")
    return "\n".join(lines)

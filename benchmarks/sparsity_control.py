"""Sparsity control (issue 19): do target runs end on their targets, are their circuits still good, and how do
the size path's circuits compare with separate target runs?

    python benchmarks/sparsity_control.py targets                     # results/sparsity_targets_<device>.csv
    python benchmarks/sparsity_control.py targets --update lagrangian # the Lagrangian alone (the old default)
    python benchmarks/sparsity_control.py quality                     # results/sparsity_quality_<device>.csv
    python benchmarks/sparsity_control.py path                        # results/sparsity_path_<device>.csv

Every run: the induction task, zero ablation, the default step count and options otherwise, on the shipped demo
model (a trained 2-layer Llama) and on tiny random models of two families (tests/tiny_models.py: Llama, GPT-2),
on the CPU backend (the native kernels). CPU-sized: about 10 s a run on 2 cores.

* ``targets``: gates ``head,mlp_neuron`` and all seven granularities, one target for every granularity in
  {0.25, 0.5, 0.75, 0.875, 0.95}; per run the final expected sparsity of each granularity and the largest
  miss (a target is met within 0.05).
* ``quality``: heads only, each target cut at its exact size (``circuit_size``), against every circuit of
  that many heads (all C(8, k) of them): the run's held-out KL over the best one's.
* ``path``: the demo model, gates ``head,mlp_neuron``: ``sparsity="path"`` runs of 300 and 1500 steps
  (``--path-steps``), then for each of their circuits a separate (300-step) target run at that circuit's
  per-granularity sizes (targets ``1 - n_g / N_g``, cut at exactly ``n_g``); both circuits' held-out KL.
"""
from __future__ import annotations

import argparse
import itertools
import os
import sys
import time

import torch

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)
sys.path.insert(0, os.path.join(HERE, "..", "tests"))  # tiny_models.py

from common import device_slug, env_row, write_csv  # noqa: E402

GATES = {"head,mlp_neuron": ("head", "mlp_neuron"),
         "all": ("layer", "attn", "head", "attn_neuron", "mlp", "mlp_neuron", "mlp_out")}
TARGETS = (0.25, 0.5, 0.75, 0.875, 0.95)
MODELS = ("demo", "llama", "gpt2")


def load(name: str):
    """(model, induction task options) for the demo model or a tiny model of a family."""
    from nodeprune_kernels.demo import BOS, DEMO_PREFIX_LEN, load_demo_model

    if name == "demo":
        return load_demo_model(), {"prefix_len": DEMO_PREFIX_LEN, "lo": 1, "bos_token_id": BOS}
    from tiny_models import tiny_model

    return tiny_model(name), {"prefix_len": 6, "lo": 3}


def config(task_options: dict, **options):
    from nodeprune_kernels.pruning.config import PruneConfig
    from nodeprune_kernels.utils.backend import cpu_backend

    return PruneConfig(ablation="zero", backend=cpu_backend(), task_options=task_options, curve_points=1,
                       **options)


def run(name: str, **options):
    """One prune of model ``name`` on induction; returns (result, seconds)."""
    from nodeprune_kernels.pruning.run import prune

    model, task_options = load(name)
    t0 = time.perf_counter()
    result = prune(model, "induction", config(task_options, **options), progress=False)
    return result, time.perf_counter() - t0


def targets_table(args) -> list:
    rows = []
    for name, (gates_name, gates), t in itertools.product(args.models, GATES.items(), TARGETS):
        res, secs = run(name, granularities=gates, targets=t, target_update=args.update,
                        **({"lambda_lr": args.lambda_lr} if args.lambda_lr is not None else {}))
        final = {g: res.metrics[f"sparsity/{g}"] for g in gates}
        miss = max(abs(v - t) for v in final.values())
        row = {**env_row(), "model": name, "gates": gates_name, "update": args.update,
               "lambda_lr": res.config.lambda_lr, "steps": res.config.steps, "target": t,
               "max_miss": round(miss, 4), "met": miss <= res.config.target_tolerance,
               "kl": round(res.metrics["kl"], 4), "seconds": round(secs, 1)}
        row.update({f"sparsity/{g}": round(v, 4) for g, v in final.items()})
        rows.append(row)
        print(f"{name:5} {gates_name:15} t={t:<5} miss {miss:.3f} {'met' if row['met'] else 'MISSED'}  "
              f"kl {row['kl']:.4f}  {secs:.0f}s", flush=True)
    return rows


@torch.no_grad()
def best_head_circuits(name: str, k_values) -> dict:
    """{k: (best KL, median KL)} over every circuit of k heads (heads-only gates), held-out examples."""
    import nodeprune_kernels as npk
    from nodeprune_kernels.pruning.evaluate import evaluate_circuit
    from nodeprune_kernels.pruning.run import resolve_task

    model, task_options = load(name)
    cfg = config(task_options, granularities=("head",))
    data = resolve_task("induction", None, cfg, model.config.vocab_size)
    _, held_out = data.split(cfg.n_eval, seed=cfg.seed)
    masks = npk.apply_node_pruning(model, ("head",), ablation="zero", backend=cfg.backend).eval()
    L, H = masks.log_alpha["head"].shape
    out = {}
    for k in sorted(set(k_values)):
        kls = []
        for heads in itertools.combinations(range(L * H), k):
            kept = torch.zeros(L * H, dtype=torch.bool)
            kept[list(heads)] = True
            kls.append(evaluate_circuit(model, masks, held_out, npk.Circuit({"head": kept.view(L, H)}, masks.dims),
                                        cfg.batch_size)["kl"])
        kls.sort()
        out[k] = (kls[0], kls[len(kls) // 2])
    npk.remove_node_pruning(model)
    return out


def quality_table(args) -> list:
    rows = []
    for name in args.models:
        n_heads = 8  # every model here has 2 layers x 4 heads
        ks = {t: round((1 - t) * n_heads) for t in (0.25, 0.5, 0.625, 0.75, 0.875)}
        best = best_head_circuits(name, ks.values())
        for t, k in ks.items():
            res, secs = run(name, granularities=("head",), targets=t, circuit_size={"head": k},
                            target_update=args.update,
                            **({"lambda_lr": args.lambda_lr} if args.lambda_lr is not None else {}))
            kl = res.metrics["kl"]
            row = {**env_row(), "model": name, "update": args.update, "lambda_lr": res.config.lambda_lr,
                   "target": t, "heads": k, "final_sparsity": round(res.metrics["sparsity/head"], 4),
                   "kl": round(kl, 4), "best_kl": round(best[k][0], 4), "median_kl": round(best[k][1], 4),
                   "kl_over_best": round(kl / max(best[k][0], 1e-12), 3), "seconds": round(secs, 1)}
            rows.append(row)
            print(f"{name:5} t={t:<5} {k} heads: KL {kl:.4f}, best {best[k][0]:.4f} ({row['kl_over_best']:.2f}x), "
                  f"median {best[k][1]:.4f}", flush=True)
    return rows


def path_table(args) -> list:
    from nodeprune_kernels.pruning.config import PruneConfig

    gates = GATES["head,mlp_neuron"]
    target_runs: dict = {}  # per-granularity sizes -> (held-out KL, seconds) of a separate target run
    rows = []
    for path_steps in args.path_steps:
        res, secs = run("demo", granularities=gates, sparsity="path", steps=path_steps)
        print(f"path run, {path_steps} steps: {secs:.0f}s; CPR {res.path['cpr']}  CMD {res.path['cmd']} "
              f"({res.path['metric']})", flush=True)
        by_size = {p["size"]: p for p in res.path["points"]}
        for size, circuit in sorted(res.extra["path_circuits"].items(), reverse=True):
            counts = circuit.counts()
            n = {g: counts[g][0] for g in gates}
            point = by_size[size]
            key = tuple(n.values())
            if key not in target_runs:
                target_runs[key] = (point["kl"], 0.0)  # the full and the empty circuit need no run
                if 0 < sum(n.values()) < sum(counts[g][1] for g in gates):
                    targets = {g: min(0.999, 1 - n[g] / counts[g][1]) for g in gates}
                    other, t_secs = run("demo", granularities=gates, targets=targets, circuit_size=n)
                    target_runs[key] = (other.metrics["kl"], t_secs)
            target_kl, t_secs = target_runs[key]
            rows.append({**env_row(), "model": "demo", "gates": "head,mlp_neuron", "path_steps": path_steps,
                         "target_steps": PruneConfig().steps, "size": size,
                         "step": point["step"], "nodes_kept": round(point["nodes_kept"], 4),
                         **{f"n/{g}": v for g, v in n.items()}, "path_kl": round(point["kl"], 4),
                         "target_run_kl": round(target_kl, 4),
                         "path_over_target": round(point["kl"] / target_kl, 3) if target_kl > 1e-9 else None,
                         "faithfulness": point["faithfulness"], "path_cpr": res.path["cpr"],
                         "path_cmd": res.path["cmd"], "path_seconds": round(secs, 1),
                         "target_seconds": round(t_secs, 1)})
            print(f"{100 * size:>5g}%: {n}  path KL {point['kl']:.4f}  target run KL {target_kl:.4f}", flush=True)
    return rows


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("table", choices=["targets", "quality", "path"])
    ap.add_argument("--update", default="projection", choices=["projection", "lagrangian"])
    ap.add_argument("--lambda-lr", type=float, default=None, help="default: PruneConfig's")
    ap.add_argument("--models", default=",".join(MODELS), help="comma-separated: demo, and tiny families")
    ap.add_argument("--path-steps", default="300,1500", help="path: the path runs' step counts (the target runs "
                    "have the default 300)")
    ap.add_argument("--out", default=None, help="CSV path (default: benchmarks/results/sparsity_<table>_...)")
    args = ap.parse_args()
    args.models = tuple(args.models.split(","))
    args.path_steps = tuple(int(x) for x in args.path_steps.split(","))
    torch.set_num_threads(min(2, torch.get_num_threads()))
    rows = {"targets": targets_table, "quality": quality_table, "path": path_table}[args.table](args)
    suffix = ("" if args.update == "projection" else f"_{args.update}") + (
        "" if args.lambda_lr is None else f"_lr{args.lambda_lr:g}")
    path = write_csv(rows, f"sparsity_{args.table}{suffix}_{device_slug()}.csv", args.out)
    print("wrote", path)


if __name__ == "__main__":
    main()

"""MIB's circuit metrics on the demo model: pruning against AtP and IG, their cost, and pruning's stability.

The shipped demo model (2-layer Llama trained on induction), the induction task with a distractor at every
position (the corrupted prompt's token there, so the logit difference is defined), the demo's zero ablation
and targets, every granularity gated. For each method: CPR (signed ranking) and CMD (absolute ranking for
attribution; the log_alphas for pruning) over MIB's ten sizes on the held-out examples; seconds; bytes saved
for backward per token in one forward of the gated model (attribution runs the deterministic gates,
pruning samples them); and the Jaccard overlap of the pruning circuits of two seeds.

    python benchmarks/mib_demo.py [--steps 800] [--out benchmarks/results]

Writes ``mib_demo_<device>.csv``.
"""
from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from attribution_quality import task_data  # noqa: E402
from common import device_slug, env_row, write_csv  # noqa: E402

from nodeprune_kernels import apply_node_pruning, attribute, prune, remove_node_pruning  # noqa: E402
from nodeprune_kernels.demo import demo_config, load_demo_model  # noqa: E402
from nodeprune_kernels.pruning.metrics import evaluate_ranking, jaccard  # noqa: E402


def saved_bytes_per_token(model, data, config, training: bool) -> float:
    """Bytes the autograd graph keeps for backward (distinct storages) in one gated forward, per token."""
    masks = apply_node_pruning(model, config.granularities, config.ablation, config.backend, config.seed)
    masks.train(training)
    seen = {}

    def pack(t):
        seen[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
        return t

    ids = data.input_ids[:16]
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        model(input_ids=ids).logits.sum()
    remove_node_pruning(model)
    return sum(seen.values()) / ids.numel()


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--steps", type=int, default=800)
    ap.add_argument("--ig-steps", type=int, default=16)
    ap.add_argument("--out", default=str(Path(__file__).resolve().parent / "results"))
    args = ap.parse_args(argv)

    model = load_demo_model()
    data = task_data(model, 256)
    config = demo_config(args.steps)
    rows, circuits = [], {}
    for seed in (0, 1):
        t0 = time.perf_counter()
        r = prune(model, data, config.replace(seed=seed), progress=False)
        secs = time.perf_counter() - t0
        circuits[seed] = r.circuit
        if seed == 0:
            rows.append({"method": f"pruning ({args.steps} steps)", "cpr": r.metrics["mib/cpr"],
                         "cmd": r.metrics["mib/cmd"], "seconds": secs, "seconds_per_pass": secs / args.steps,
                         "saved_bytes_per_token": saved_bytes_per_token(model, data, config, True),
                         "held_out_kl": r.metrics["kl"]})
    stability = jaccard(circuits[0], circuits[1])
    for method, metric, steps in (("atp", "logit_diff", 1), ("ig", "logit_diff", args.ig_steps)):
        t0 = time.perf_counter()
        scores = attribute(model, data, method=method, metric=metric, ig_steps=args.ig_steps, config=config,
                           progress=False)
        secs = time.perf_counter() - t0
        signed = evaluate_ranking(model, data, scores, config=config, absolute=False)
        absolute = evaluate_ranking(model, data, scores, config=config, absolute=True)
        batches = -(-scores.info["n_examples"] // config.batch_size)
        rows.append({"method": method if method == "atp" else f"ig ({steps} steps)", "cpr": signed["cpr"],
                     "cmd": absolute["cmd"], "seconds": secs, "seconds_per_pass": secs / (batches * steps),
                     "saved_bytes_per_token": saved_bytes_per_token(model, data, config, False),
                     "held_out_kl": None})
    env = env_row()
    for r in rows:
        r.update(jaccard_seeds_0_1=round(stability, 4) if r["method"].startswith("pruning") else None, **env)
    path = write_csv(rows, "", out=str(Path(args.out) / f"mib_demo_{device_slug()}.csv"))
    print(f"{'method':>22} {'CPR':>7} {'CMD':>7} {'seconds':>8} {'s/pass':>8} {'saved B/token':>13}")
    for r in rows:
        print(f"{r['method']:>22} {r['cpr']:>7.3f} {r['cmd']:>7.3f} {r['seconds']:>8.1f} {r['seconds_per_pass']:>8.4f} "
              f"{r['saved_bytes_per_token']:>13,.0f}")
    print(f"pruning circuits of seeds 0 and 1: Jaccard {stability:.3f} -> {path}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

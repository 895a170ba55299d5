"""How well attribution ranks nodes: AtP and IG against exact one-at-a-time patching, on the demo model.

The shipped demo model (a 2-layer Llama trained on induction), the induction task with interchange ablation
(the corrupted prompt repeats fresh tokens), the metric the logit difference between the induction answer
and the token the corrupted prompt has there. For every node of the chosen granularities the exact effect
is ``m(full) - m(that node closed, every other gate open)``; the script reports, per granularity, Spearman's
rank correlation (and Pearson's) of the AtP and IG scores with it, and the time each took.

    python benchmarks/attribution_quality.py [--ig-steps 16] [--n 64] [--out benchmarks/results]

Writes ``attribution_quality_<device>.csv``.
"""
from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import device_slug, env_row, write_csv  # noqa: E402

from nodeprune_kernels import apply_node_pruning, attribute, remove_node_pruning  # noqa: E402
from nodeprune_kernels.demo import load_demo_model  # noqa: E402
from nodeprune_kernels.pruning.objectives import logit_diff  # noqa: E402
from nodeprune_kernels.tasks import get_task  # noqa: E402

GRANULARITIES = ("layer", "attn", "head", "mlp", "mlp_neuron")


def spearman(a: torch.Tensor, b: torch.Tensor) -> float:
    """Spearman's rank correlation of two 1-D tensors (ties broken by position)."""
    ra = torch.argsort(torch.argsort(a.double())).double()
    rb = torch.argsort(torch.argsort(b.double())).double()
    ra, rb = ra - ra.mean(), rb - rb.mean()
    return float((ra * rb).sum() / (ra.norm() * rb.norm()))


def pearson(a: torch.Tensor, b: torch.Tensor) -> float:
    return float(torch.corrcoef(torch.stack([a.double(), b.double()]))[0, 1])


def task_data(model, n: int):
    data = get_task("induction", prefix_len=12, bos_token_id=0, lo=1).build(n=n, seed=0,
                                                                           vocab_size=model.config.vocab_size)
    shifted = torch.roll(data.corrupt_ids, -1, dims=1)  # the corrupted prompt's next token
    data.distractor = torch.where(data.positions, shifted, data.distractor)
    return data


@torch.no_grad()
def exact_effects(model, data, granularities, backend: str) -> dict:
    """{granularity: [nodes] m(full) - m(node closed)} on ``data``'s training split, as attribute uses it."""
    train, _ = data.split(None, seed=0)
    masks = apply_node_pruning(model, granularities, "interchange", backend).eval()
    pos = train.positions
    inputs = train.model_inputs()
    corrupted = train.model_inputs(corrupted=True)

    def metric():
        with masks.interchange(**corrupted):
            logits = model(**inputs).logits[pos].float()
        return float(logit_diff(logits, train.target[pos], train.distractor[pos]).mean())

    for la in masks.log_alpha.values():
        la.fill_(30.0)
    full = metric()
    out = {}
    for g in granularities:
        la = masks.log_alpha[g]
        effects = torch.zeros(la.numel(), dtype=torch.float64)
        for i in range(la.numel()):
            la.view(-1)[i] = -30.0
            effects[i] = full - metric()
            la.view(-1)[i] = 30.0
        out[g] = effects
    remove_node_pruning(model)
    return out


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--ig-steps", type=int, default=16)
    ap.add_argument("--n", type=int, default=64, help="examples (a quarter is held out, as prune does)")
    ap.add_argument("--backend", default="auto")
    ap.add_argument("--out", default=str(Path(__file__).resolve().parent / "results"))
    args = ap.parse_args(argv)

    model = load_demo_model()
    data = task_data(model, args.n)
    opts = dict(granularities=GRANULARITIES, ablation="interchange", backend=args.backend, progress=False,
                batch_size=32)
    t0 = time.perf_counter()
    atp = attribute(model, data, method="atp", metric="logit_diff", **opts)
    t_atp = time.perf_counter() - t0
    t0 = time.perf_counter()
    ig = attribute(model, data, method="ig", metric="logit_diff", ig_steps=args.ig_steps, **opts)
    t_ig = time.perf_counter() - t0
    t0 = time.perf_counter()
    exact = exact_effects(model, data, GRANULARITIES, args.backend)
    t_exact = time.perf_counter() - t0

    env = env_row()
    rows = []
    for g in GRANULARITIES:
        e = exact[g]
        rows.append({"granularity": g, "nodes": e.numel(), "spearman_atp": round(spearman(atp.scores[g].flatten(), e), 4),
                     "spearman_ig": round(spearman(ig.scores[g].flatten(), e), 4),
                     "pearson_atp": round(pearson(atp.scores[g].flatten(), e), 4),
                     "pearson_ig": round(pearson(ig.scores[g].flatten(), e), 4), "ig_steps": args.ig_steps,
                     "seconds_atp": round(t_atp, 2), "seconds_ig": round(t_ig, 2),
                     "seconds_exact": round(t_exact, 2), **env})
    path = write_csv(rows, "", out=str(Path(args.out) / f"attribution_quality_{device_slug()}.csv"))
    for r in rows:
        print(f"{r['granularity']:>11} ({r['nodes']:>3} nodes): Spearman AtP {r['spearman_atp']:+.3f}  "
              f"IG {r['spearman_ig']:+.3f}   Pearson AtP {r['pearson_atp']:+.3f}  IG {r['pearson_ig']:+.3f}")
    print(f"AtP {t_atp:.1f} s, IG ({args.ig_steps} steps) {t_ig:.1f} s, exact one-at-a-time {t_exact:.1f} s -> {path}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

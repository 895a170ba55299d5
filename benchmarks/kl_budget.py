"""sparsity="budget" on the demo model: the training KL each budget ends at, and how sparse the circuit gets.

The shipped demo model on induction, the demo's zero ablation and its targets as the caps, every
granularity gated; one run per budget.

    python benchmarks/kl_budget.py [--budgets 0.02,0.05,0.1,0.2] [--steps 300] [--out benchmarks/results]

Writes ``kl_budget_<device>.csv``: per budget the final moving-average training KL, the pressure, whether the
budget was missed, the held-out KL of the circuit and the kept fraction of every granularity.
"""
from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import device_slug, env_row, write_csv  # noqa: E402

from nodeprune_kernels import prune  # noqa: E402
from nodeprune_kernels.demo import DEMO_TARGETS, demo_config, load_demo_model  # noqa: E402


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--budgets", default="0.02,0.05,0.1,0.2")
    ap.add_argument("--steps", type=int, default=300)
    ap.add_argument("--out", default=str(Path(__file__).resolve().parent / "results"))
    args = ap.parse_args(argv)
    rows = []
    for budget in (float(b) for b in args.budgets.split(",")):
        cfg = demo_config(args.steps).replace(sparsity="budget", kl_budget=budget, targets=DEMO_TARGETS)
        t0 = time.perf_counter()
        m = prune(load_demo_model(), "induction", cfg, progress=False).metrics
        row = {"kl_budget": budget, "steps": args.steps, "train_kl_average": round(m["budget/kl_average"], 4),
               "pressure": round(m["budget/pressure"], 3), "budget_missed": m["budget_missed"],
               "held_out_kl": round(m["kl"], 4), "seconds": round(time.perf_counter() - t0, 1)}
        row.update({k: round(v, 3) for k, v in m.items() if k.startswith("kept/")})
        rows.append(dict(row, **env_row()))
        print(f"budget {budget:<5g} train KL {row['train_kl_average']:.4f}  pressure {row['pressure']:.2f}  "
              f"held-out KL {row['held_out_kl']:.4f}  kept heads {row['kept/head']:.2f}  attn neurons "
              f"{row['kept/attn_neuron']:.2f}  mlp neurons {row['kept/mlp_neuron']:.2f}", flush=True)
    path = write_csv(rows, "", out=str(Path(args.out) / f"kl_budget_{device_slug()}.csv"))
    print(f"-> {path}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

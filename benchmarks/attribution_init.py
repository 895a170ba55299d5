"""Does ``init="attribution"`` reach the same circuit quality in fewer steps? The demo model, both inits.

The shipped demo model on induction with the demo's config (zero ablation, its targets), run for each step
count with ``init="constant"`` and ``init="attribution"``; the held-out KL and argmax agreement of each
final circuit. (The induction task has no distractors, so the attribution is IG on the KL.)

    python benchmarks/attribution_init.py [--steps 100,200,400] [--out benchmarks/results]

Writes ``attribution_init_<device>.csv``.
"""
from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import device_slug, env_row, write_csv  # noqa: E402

from nodeprune_kernels import prune  # noqa: E402
from nodeprune_kernels.demo import demo_config, load_demo_model  # noqa: E402


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--steps", default="100,200,400")
    ap.add_argument("--out", default=str(Path(__file__).resolve().parent / "results"))
    args = ap.parse_args(argv)
    rows = []
    for steps in (int(s) for s in args.steps.split(",")):
        for init in ("constant", "attribution"):
            t0 = time.perf_counter()
            m = prune(load_demo_model(), "induction", demo_config(steps).replace(init=init), progress=False).metrics
            rows.append(dict({"steps": steps, "init": init, "held_out_kl": round(m["kl"], 4),
                              "exact_match": round(m["exact_match"], 3), "seconds": round(time.perf_counter() - t0, 1)},
                             **env_row()))
            print(f"{steps:>4} steps, init {init:<11}: held-out KL {m['kl']:.4f}  argmax match {m['exact_match']:.3f}",
                  flush=True)
    path = write_csv(rows, "", out=str(Path(args.out) / f"attribution_init_{device_slug()}.csv"))
    print(f"-> {path}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

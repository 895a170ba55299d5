"""What every benchmark script shares: the environment columns of a CSV row and the CSV writer."""
from __future__ import annotations

import csv
import datetime
import os
import platform

import torch

RESULTS = os.path.join(os.path.dirname(os.path.abspath(__file__)), "results")


def env_row() -> dict:
    """device name, torch and triton versions, date: the first columns of every result row."""
    import triton

    device = torch.cuda.get_device_name() if torch.cuda.is_available() else platform.processor() or "cpu"
    return {"device": device, "torch": torch.__version__, "triton": triton.__version__,
            "date": datetime.date.today().isoformat()}


def write_csv(rows: list[dict], name: str, out: str | None = None) -> str:
    """Write ``rows`` (dicts with the same keys, or a superset of the first row's) to results/``name``."""
    path = out or os.path.join(RESULTS, name)
    os.makedirs(os.path.dirname(path), exist_ok=True)
    fields = list(dict.fromkeys(k for r in rows for k in r))
    with open(path, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=fields)
        writer.writeheader()
        writer.writerows(rows)
    return path


def parse_args(description: str, gpu_needs: str):
    """The benchmarks' shared options: (args, dtype, device). Without a GPU only ``--saved-only`` runs, with
    the kernels in Triton's interpreter; otherwise the script exits saying what ``gpu_needs`` a GPU for."""
    import argparse
    import sys

    ap = argparse.ArgumentParser(description=description)
    ap.add_argument("--saved-only", action="store_true", help="only the exact saved-bytes table (any device)")
    ap.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float16", "float32"])
    ap.add_argument("--out", default=None, help="CSV path (default: benchmarks/results/<name>.csv)")
    args = ap.parse_args()
    if not torch.cuda.is_available():
        if not args.saved_only:
            sys.exit(f"no CUDA GPU: {gpu_needs} need one. Run with --saved-only for the exact saved-bytes table.")
        os.environ.setdefault("TRITON_INTERPRET", "1")
    return args, getattr(torch, args.dtype), "cuda" if torch.cuda.is_available() else "cpu"

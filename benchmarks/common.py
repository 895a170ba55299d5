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

"""What every benchmark script shares: the environment columns of a CSV row and the CSV writer."""
from __future__ import annotations

import csv
import datetime
import os
import platform
import subprocess

import torch

RESULTS = os.path.join(os.path.dirname(os.path.abspath(__file__)), "results")


def cpu_name() -> str:
    """The CPU model from /proc/cpuinfo (``platform.processor()`` is often empty on Linux)."""
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine() or "cpu"


def device_slug(name: str | None = None) -> str:
    """A file-name part for a device: "NVIDIA H100 80GB HBM3" -> "h100-80gb-hbm3", "NVIDIA H200" -> "h200";
    "cpu" without a GPU (or for name "cpu")."""
    import re

    if name is None:
        name = torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu"
    name = re.sub(r"^(nvidia|amd)\s+", "", name.strip(), flags=re.I)
    return re.sub(r"[^a-z0-9]+", "-", name.lower()).strip("-") or "device"


def git_commit() -> str:
    """The library's commit, with ``-dirty`` when nodeprune_kernels/ has uncommitted changes."""
    here = os.path.dirname(os.path.abspath(__file__))
    try:
        sha = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=here, capture_output=True, text=True,
                             check=True).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "--", "../nodeprune_kernels"], cwd=here,
                               capture_output=True, text=True).stdout.strip()
        return sha + ("-dirty" if dirty else "")
    except (OSError, subprocess.CalledProcessError):
        return "unknown"


def storage_key(t: torch.Tensor):
    """What identifies a tensor's memory: two views of one storage have the same key."""
    return (t.device.type, t.device.index, t.untyped_storage().data_ptr())


def env_row() -> dict:
    """device name, versions, commit and date: the first columns of every result row."""
    import transformers

    try:
        import triton
        triton_version = triton.__version__
    except ImportError:
        triton_version = ""
    cuda = torch.cuda.is_available()
    return {"device": torch.cuda.get_device_name() if cuda else cpu_name(),
            "device_memory_gib": round(torch.cuda.get_device_properties(0).total_memory / 2**30, 1) if cuda else "",
            "cpu_threads": torch.get_num_threads(), "torch": torch.__version__, "triton": triton_version,
            "transformers": transformers.__version__, "commit": git_commit(),
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

"""Plots of bench_pruning_step.py's CSVs: memory and time against tokens, one line per mode.

    python benchmarks/plot_pruning_step.py                      # every results/pruning_step_*.csv and saved_bytes_*.csv
    python benchmarks/plot_pruning_step.py results/pruning_step_cpu.csv

pruning_step_<device>.csv -> pruning_step_<device>_<model>.png: columns zero / interchange ablation; rows saved
bytes per token, step peak bytes per token (GPU rows only), median step time, tokens per second; the x axis is
the batch x sequence points in order of tokens. saved_bytes_<dtype>_<device>.csv -> the same name .png: saved
bytes per token of every mode, one group of bars per model shape (log scale).
"""
from __future__ import annotations

import csv
import glob
import os
import sys

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

RESULTS = os.path.join(os.path.dirname(os.path.abspath(__file__)), "results")
STYLE = {  # (mode, granularities) -> label, color, line style
    ("floor", "-"): ("floor (unmasked)", "black", "-"),
    ("eager", "all"): ("eager, all granularities", "tab:red", "-"),
    ("eager", "coarse"): ("eager, coarse", "tab:red", "--"),
    ("fused", "all"): ("fused, all granularities", "tab:blue", "-"),
    ("fused", "coarse"): ("fused, coarse", "tab:blue", "--"),
    ("edge", "edges"): ("edge pruning", "tab:green", "-"),
}


def read(path):
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


def num(v):
    return float(v) if v not in (None, "") else None


def plot_step(path):
    rows = read(path)
    out = []
    for model in dict.fromkeys(r["model"] for r in rows):
        mr = [r for r in rows if r["model"] == model]
        pts = sorted({(int(r["batch"]), int(r["seq"])) for r in mr}, key=lambda p: (p[0] * p[1], p[1]))
        metrics = [("saved_bytes_per_token", "saved for backward\n(bytes / token)", True),
                   ("step_peak_bytes_per_token", "step peak over resident\n(bytes / token)", True),
                   ("median_ms", "median step time (ms)", True),
                   ("tokens_per_s", "tokens / s", True)]
        metrics = [m for m in metrics if any(num(r.get(m[0])) for r in mr)]
        ablations = ["zero", "interchange"]
        fig, axes = plt.subplots(len(metrics), 2, figsize=(11, 3 * len(metrics)), squeeze=False, sharex=True)
        for col, abl in enumerate(ablations):
            for row_i, (metric, label, logy) in enumerate(metrics):
                ax = axes[row_i][col]
                for (mode, grans), (name, color, ls) in STYLE.items():
                    sel = {(int(r["batch"]), int(r["seq"])): num(r.get(metric)) for r in mr
                           if r["mode"] == mode and r["granularities"] == grans and r["ablation"] in (abl, "-")}
                    xs = [i for i, p in enumerate(pts) if sel.get(p) is not None]
                    if xs:
                        ax.plot(xs, [sel[pts[i]] for i in xs], ls, color=color, marker="o", label=name)
                if logy:
                    ax.set_yscale("log")
                ax.grid(True, alpha=0.3)
                if col == 0:
                    ax.set_ylabel(label)
                if row_i == 0:
                    ax.set_title(f"{abl} ablation")
                ax.set_xticks(range(len(pts)), [f"{b}x{s}" for b, s in pts])
        for ax in axes[-1]:
            ax.set_xlabel("batch x sequence (in order of tokens)")
        axes[0][0].legend(fontsize=8)
        dev, dtype = mr[0]["device"], mr[0]["dtype"]
        fig.suptitle(f"one pruning step, {model}, {dtype}, {dev}")
        fig.tight_layout()
        png = path[:-4] + f"_{model}.png"
        fig.savefig(png, dpi=110)
        plt.close(fig)
        out.append(png)
    return out


def plot_saved(path):
    """One panel per model: its largest batch x seq, the whole-model count where there is one."""
    everything, rows = read(path), []
    for model in dict.fromkeys(r["model"] for r in everything):
        mr = [r for r in everything if r["model"] == model]
        tokens = max(int(r["tokens"]) for r in mr)
        mr = [r for r in mr if int(r["tokens"]) == tokens]
        measured = [r for r in mr if r.get("method", "measured").startswith("measured")]
        rows += measured or mr
    models = list(dict.fromkeys(r["model"] for r in rows))
    fig, axes = plt.subplots(1, len(models), figsize=(4.5 * len(models), 4), squeeze=False)
    for ax, model in zip(axes[0], models):
        mr = [r for r in rows if r["model"] == model]
        labels = [f"{r['mode']} {r['ablation']} {r['granularities']}".replace(" - -", "") for r in mr]
        colors = [STYLE.get((r["mode"], r["granularities"]), ("", "gray", ""))[1] for r in mr]
        ax.barh(range(len(mr)), [float(r["saved_bytes_per_token"]) for r in mr], color=colors)
        ax.set_yticks(range(len(mr)), labels, fontsize=8)
        ax.invert_yaxis()
        ax.set_xscale("log")
        ax.set_xlabel("bytes saved for backward / token")
        ax.set_title(f"{model}, {mr[0]['batch']}x{mr[0]['seq']}, {mr[0]['dtype']}\n{mr[0].get('method', 'measured')}",
                     fontsize=9)
        ax.grid(True, axis="x", alpha=0.3)
    fig.tight_layout()
    png = path[:-4] + ".png"
    fig.savefig(png, dpi=110)
    plt.close(fig)
    return [png]


def main(paths=None):
    paths = paths or sys.argv[1:] or sorted(glob.glob(os.path.join(RESULTS, "pruning_step_*.csv"))
                                            + glob.glob(os.path.join(RESULTS, "saved_bytes_*.csv")))
    if not paths:
        raise SystemExit(f"no CSVs to plot in {RESULTS}: run benchmarks/bench_pruning_step.py first")
    written = []
    for p in paths:
        name = os.path.basename(p)
        if name.startswith("pruning_step"):
            written += plot_step(p)
        elif name.startswith("saved_bytes") and "method" in (read(p) or [{}])[0]:
            written += plot_saved(p)
    for w in written:
        print("wrote", w)
    return written


if __name__ == "__main__":
    main()

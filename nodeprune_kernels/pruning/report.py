"""Reading a run: the summary table, the plots, and the coarse-against-fine comparison."""
from __future__ import annotations

import json
from pathlib import Path

from ..model.circuit import Circuit


def _plt():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def plot_training(history: list, path) -> None:
    """The objective and each granularity's expected sparsity (with its target) over the steps."""
    plt = _plt()
    steps = [h["step"] for h in history]
    fig, (a, b) = plt.subplots(1, 2, figsize=(10, 3.6))
    a.plot(steps, [h["objective"] for h in history])
    a.set(xlabel="step", ylabel="objective", title="objective (training batches)")
    a.set_yscale("log" if all(h["objective"] > 0 for h in history) else "linear")
    grans = [k.split("/", 1)[1] for k in history[0] if k.startswith("sparsity/") and k != "sparsity/mean"]
    for i, g in enumerate(grans):
        line, = b.plot(steps, [h[f"sparsity/{g}"] for h in history], label=g)
        if f"target/{g}" in history[0]:
            b.plot(steps, [h[f"target/{g}"] for h in history], ls=":", color=line.get_color())
    b.set(xlabel="step", ylabel="expected sparsity", ylim=(-0.02, 1.02), title="sparsity (dotted: target)")
    b.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def plot_circuit(circuit: Circuit, path) -> None:
    """Per layer: which heads are kept (a layer x head grid), and the kept fraction of each neuron level."""
    plt = _plt()
    full = circuit.full()
    L = circuit.dims.n_layers
    fig, (a, b) = plt.subplots(1, 2, figsize=(10, 0.35 * L + 2.2), gridspec_kw={"width_ratios": [1, 1.4]})
    a.imshow(full["head"].float().numpy(), cmap="Greens", vmin=0, vmax=1, aspect="auto")
    a.set(xlabel="head", ylabel="layer", title="kept heads", xticks=range(circuit.dims.n_heads),
          yticks=range(L))
    width = 0.27
    for i, g in enumerate(("attn_neuron", "mlp_neuron", "mlp_out")):
        frac = full[g].float().mean(1).numpy()
        b.barh([layer + (i - 1) * width for layer in range(L)], frac, height=width, label=g)
    b.set(xlabel="kept fraction", xlim=(0, 1), title="kept neurons per layer")
    b.set_yticks(range(L))
    b.invert_yaxis()
    b.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def plot_curve(curve: list, path, chosen: float | None = None) -> None:
    """KL and accuracy of circuits cut at several thresholds, against the fraction of nodes kept."""
    plt = _plt()
    pts = sorted(curve, key=lambda p: p["nodes_kept"])
    x = [p["nodes_kept"] for p in pts]
    fig, a = plt.subplots(figsize=(5.5, 3.6))
    a.plot(x, [p["kl"] for p in pts], "o-", label="KL to the full model")
    a.set(xlabel="fraction of gated nodes kept", ylabel="KL", title="faithfulness against sparsity")
    b = a.twinx()
    b.plot(x, [p["accuracy"] for p in pts], "s--", color="tab:orange", label="accuracy")
    b.set(ylabel="accuracy", ylim=(-0.02, 1.02))
    if chosen is not None:
        a.axvline(chosen, color="gray", ls=":", label="the circuit")
    fig.legend(fontsize=7, loc="center right", bbox_to_anchor=(0.86, 0.55))
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def plot_mib(table: dict, path) -> None:
    """MIB's faithfulness and necessity of the ranking's top-k circuits against k (log axis), CPR/CMD in the
    title (``metrics.ranking_table``'s dict)."""
    plt = _plt()
    pts = [p for p in table["points"] if p["size"] > 0]
    fig, a = plt.subplots(figsize=(5.5, 3.6))
    for key, style, label in (("faithfulness", "o-", f"faithfulness ({table['metric']})"),
                              ("faithfulness_kl", "s--", "faithfulness (KL form)"),
                              ("necessity", "^:", "necessity (the circuit ablated)")):
        xy = [(p["size"], p[key]) for p in pts if p[key] is not None]
        if xy:
            a.plot(*zip(*xy), style, label=label)
    a.set_xscale("log")

    def fmt(v):
        return "-" if v is None else f"{v:.3f}"

    a.set(xlabel="fraction of nodes kept (top-k of the ranking)", ylabel="f",
          title=f"MIB: CPR {fmt(table['cpr'])}, CMD {fmt(table['cmd'])}")
    a.axhline(1.0, color="gray", lw=0.5)
    a.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def run_file(run_dir: Path, name: str) -> Path:
    """``run_dir / name``, which a finished run holds: raises FileNotFoundError saying what to do if it is missing."""
    path = run_dir / name
    if not path.exists():
        raise FileNotFoundError(f"{run_dir} is not a complete pruning run: no {name} (copy the whole run "
                                "directory, or rerun the command that wrote it)")
    return path


def read_run(run_dir) -> dict:
    """A finished run directory's circuit, metrics, curve, history and config."""
    run_dir = Path(run_dir)
    if not (run_dir / "circuit.json").exists():
        hint = (" (it has a checkpoint: the run did not finish; rerun the same command to resume it)"
                if (run_dir / "checkpoint.pt").exists() else "")
        raise FileNotFoundError(f"{run_dir} is not a finished pruning run: no circuit.json{hint}")
    files = {}
    for name in ("metrics.json", "history.json", "config.json"):
        path = run_file(run_dir, name)
        try:
            files[name] = json.loads(path.read_text())
        except json.JSONDecodeError as e:
            raise ValueError(f"{path} is not valid JSON ({e}); rerun the command that wrote it") from None
    m = files["metrics.json"]
    missing = [k for k in ("metrics", "curve") if not isinstance(m, dict) or k not in m]
    if missing:
        raise ValueError(f"{run_dir / 'metrics.json'} has no {' or '.join(missing)}: not written by nodeprune prune")
    return {"circuit": Circuit.from_json(run_dir / "circuit.json"), "metrics": m["metrics"], "curve": m["curve"],
            "history": files["history.json"], "config": files["config.json"], "path": _read_path(run_dir),
            "mib": m.get("mib")}


def _read_path(run_dir: Path) -> dict | None:
    """A size-path run's table (path.json), or None for other runs."""
    from .path import PATH_JSON

    path = run_dir / PATH_JSON
    if not path.exists():
        return None
    try:
        table = json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise ValueError(f"{path} is not valid JSON ({e}); rerun the command that wrote it") from None
    if not isinstance(table, dict) or not isinstance(table.get("points"), list):
        raise ValueError(f"{path} has no 'points': not written by a sparsity='path' run")
    return table


def plot_path(table: dict, path) -> None:
    """The size path: each grid circuit's faithfulness and KL against its size (log scale)."""
    plt = _plt()
    pts = sorted(table["points"], key=lambda p: p["size"])
    x = [100 * p["size"] for p in pts]
    fig, a = plt.subplots(figsize=(5.5, 3.6))
    a.plot(x, [p["faithfulness"] if p["faithfulness"] is not None else float("nan") for p in pts], "o-",
           label=f"faithfulness ({table['metric']})")
    a.axhline(1.0, color="gray", ls=":")
    a.set(xscale="log", xlabel="circuit size (% of gated nodes)", ylabel="faithfulness",
          title="the size path (held-out)")
    b = a.twinx()
    b.plot(x, [p["kl"] for p in pts], "s--", color="tab:red", label="KL to the full model")
    b.set(ylabel="KL")
    fig.legend(fontsize=7, loc="upper left", bbox_to_anchor=(0.14, 0.86))
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def plot_run(run_dir) -> list:
    """Draw training.png, circuit.png, curve.png (and path.png, mib.png where the run has them) into a finished
    run directory; returns the paths."""
    from .evaluate import nodes_kept

    run_dir = Path(run_dir)
    run = read_run(run_dir)
    paths = []
    if run["history"]:
        plot_training(run["history"], run_dir / "training.png")
        paths.append(run_dir / "training.png")
    plot_circuit(run["circuit"], run_dir / "circuit.png")
    plot_curve(run["curve"], run_dir / "curve.png", nodes_kept(run["circuit"]))
    paths += [run_dir / "circuit.png", run_dir / "curve.png"]
    if run["path"] is not None and run["path"]["points"]:
        plot_path(run["path"], run_dir / "path.png")
        paths.append(run_dir / "path.png")
    if run["mib"]:
        plot_mib(run["mib"], run_dir / "mib.png")
        paths.append(run_dir / "mib.png")
    return paths


def show(run_dir) -> str:
    """The text report of a finished run (what ``nodeprune show`` prints)."""
    from .metrics import table_lines
    from .run import PruningResult

    run = read_run(run_dir)
    cfg = run["config"]
    head = (f"run {run_dir}: task {cfg.get('task')} ({cfg.get('n_train')} train / {cfg.get('n_eval')} held-out "
            f"examples), ablation {cfg['config']['ablation']}, objective {cfg['config']['objective']}, "
            f"{cfg['config']['steps']} steps")
    res = PruningResult(run["circuit"], run["metrics"], run["curve"], run["history"], {}, None, path=run["path"])
    curve = ["", "faithfulness curve (held-out):", f"{'nodes kept':>10} {'KL':>9} {'accuracy':>9}"]
    for p in sorted(run["curve"], key=lambda p: -p["nodes_kept"]):
        curve.append(f"{100 * p['nodes_kept']:>9.1f}% {p['kl']:>9.4f} {p['accuracy']:>9.3f}")
    mib = ["", *table_lines(run["mib"])] if run["mib"] else []
    return "\n".join([head, res.summary()] + curve + mib)

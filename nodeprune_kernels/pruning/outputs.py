"""The run directory: what a pruning run writes, and how a killed run picks up where it stopped.

    <run_dir>/config.json        the PruneConfig and what the run was on (task, data fingerprint, sizes)
    <run_dir>/checkpoint.pt      step, gates, optimizer and Lagrange-multiplier state, history (resume)
    <run_dir>/gates.safetensors  log_alpha per granularity (float32), the latest
    <run_dir>/circuit.json       the binary circuit (Circuit.to_json)
    <run_dir>/metrics.json       held-out metrics, kept fractions, the faithfulness curve, MIB's table (``mib``:
                                 faithfulness, necessity, CPR/CMD of the log_alpha ranking), final sparsity against
                                 the targets (sparsity/<g>, target/<g>, target_tolerance, targets_missed)
    <run_dir>/circuits/size_<p>pct.json, path.json, path.png
                                 sparsity="path" runs: the circuit cut at each size (p in percent of the gated
                                 nodes, e.g. size_0.1pct.json), the size-vs-faithfulness table (pruning.path)
    <run_dir>/history.json       the training log
    <run_dir>/*.png              plots (nodeprune_kernels.pruning.report)
    <run_dir>/circuit.html       the interactive circuit viewer, one self-contained page (pruning.viewer)

Files are written to a temporary name and renamed, so a kill never leaves half a checkpoint.
"""
from __future__ import annotations

import json
import os
import warnings
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from .config import PruneConfig

CHECKPOINT = "checkpoint.pt"
CHECKPOINT_FORMAT = 2  # 2: gate noise keyed by (seed, step) in separate Philox key words


def _atomic(path: Path, write) -> None:
    tmp = path.with_name(path.name + ".tmp")
    write(tmp)
    os.replace(tmp, path)


def write_json(path: Path, obj) -> None:
    _atomic(Path(path), lambda p: Path(p).write_text(json.dumps(obj, indent=2) + "\n"))


def write_config(run_dir: Path, config: PruneConfig, meta: dict) -> None:
    run_dir.mkdir(parents=True, exist_ok=True)
    write_json(run_dir / "config.json", {"config": config.to_dict(), **meta})


def save_gates(path: Path, log_alpha: dict, dims) -> None:
    """log_alpha per granularity (float32) as safetensors, the model's sizes in the metadata."""
    tensors = {g: la.detach().float().cpu().contiguous() for g, la in log_alpha.items()}
    _atomic(Path(path), lambda p: save_file(tensors, str(p), metadata={"dims": json.dumps(dims.to_dict())}))


def load_gates(path) -> dict:
    """{granularity: log_alpha} from a run's gates.safetensors."""
    return load_file(str(path))


def save_checkpoint(run_dir: Path, step: int, masks, opt, sparsity, lambda_opt, history: list,
                    config: PruneConfig, meta: dict, path: list | None = None) -> None:
    """``path``: a size-path run's circuits so far (``SizePath.state``)."""
    run_dir.mkdir(parents=True, exist_ok=True)
    state = {"format": CHECKPOINT_FORMAT, "step": step, "masks_step": masks.step,
             "log_alpha": {g: la.detach().cpu() for g, la in masks.log_alpha.items()},
             "optimizer": opt.state_dict(), "sparsity": sparsity.state_dict(),
             "lambda_optimizer": lambda_opt.state_dict() if lambda_opt is not None else None,
             "history": history, "config": config.to_dict(), "meta": meta, "path": path}
    _atomic(run_dir / CHECKPOINT, lambda p: torch.save(state, p))
    save_gates(run_dir / "gates.safetensors", masks.log_alpha, masks.dims)


def load_checkpoint(run_dir: Path, config: PruneConfig, meta: dict) -> dict | None:
    """The run directory's checkpoint if there is one, after checking it is this run's."""
    path = Path(run_dir) / CHECKPOINT
    if not path.exists():
        return None
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # a truncated or foreign file: say what to do (never "weights_only=False")
        raise ValueError(f"{path} is not a readable pruning checkpoint ({type(e).__name__}); delete it to start "
                         "the run afresh, or use another run directory") from None
    if not isinstance(state, dict) or state.get("format") != CHECKPOINT_FORMAT:
        found = state.get("format") if isinstance(state, dict) else type(state).__name__
        raise ValueError(f"{path}: checkpoint format {found!r}, this version writes {CHECKPOINT_FORMAT} (format 1 "
                         "runs drew their gate noise from another key and cannot be resumed exactly); delete it to "
                         "start the run afresh, or use another run directory")
    missing = [k for k in ("config", "meta", "step", "log_alpha", "masks_step", "optimizer", "sparsity", "history")
               if k not in state]
    if missing:
        raise ValueError(f"{path}: checkpoint lacks {', '.join(missing)}; delete it to start the run afresh")
    saved = PruneConfig.from_dict(state["config"]).to_dict()
    # every backend draws the same gates, so a run may resume on another one (e.g. native after reference)
    diff = {k: (saved[k], v) for k, v in config.to_dict().items() if saved.get(k) != v and k != "backend"}
    if diff:
        raise ValueError(f"{run_dir} holds a run with other options ({', '.join(f'{k}: {a!r} there, {b!r} now' for k, (a, b) in diff.items())}); "
                         "use another run directory, or the same options to resume it")
    for k in ("task", "data"):
        if state["meta"].get(k) != meta.get(k):
            raise ValueError(f"{run_dir} holds a run on other data ({k}: {state['meta'].get(k)!r} there, "
                             f"{meta.get(k)!r} now); use another run directory")
    return state


def restore(state: dict, masks, opt, sparsity, lambda_opt) -> tuple:
    """Load a checkpoint into the live objects; returns (step, history)."""
    with torch.no_grad():
        for g, la in masks.log_alpha.items():
            la.copy_(state["log_alpha"][g].to(la.device))
    masks.step = int(state["masks_step"])
    opt.load_state_dict(state["optimizer"])
    sparsity.load_state_dict(state["sparsity"])
    if lambda_opt is not None:
        lambda_opt.load_state_dict(state["lambda_optimizer"])
    return int(state["step"]), list(state["history"])


def write_results(run_dir: Path, result) -> None:
    """circuit.json, metrics.json (with the curve), history.json, gates.safetensors, the plots and circuit.html."""
    run_dir.mkdir(parents=True, exist_ok=True)
    _atomic(run_dir / "circuit.json", lambda p: result.circuit.to_json(p))
    write_json(run_dir / "metrics.json", {"metrics": result.metrics, "curve": result.curve,
                                          "mib": result.extra.get("mib")})
    write_json(run_dir / "history.json", result.history)
    save_gates(run_dir / "gates.safetensors", result.log_alpha, result.circuit.dims)
    try:
        from .report import plot_run

        plot_run(run_dir)
    except Exception as e:  # plots are a convenience; the results above are written
        warnings.warn(f"could not draw the run's plots ({type(e).__name__}: {e}); `nodeprune show {run_dir}` "
                      "retries", stacklevel=2)
    try:
        from .viewer import write_html

        write_html(run_dir)
    except Exception as e:  # the page is a convenience too: warn, keep the run
        warnings.warn(f"could not write {run_dir / 'circuit.html'} ({type(e).__name__}: {e}); `nodeprune show "
                      f"{run_dir} --html` retries", stacklevel=2)

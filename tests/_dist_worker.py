"""The training runs of tests/test_distributed.py: run by torchrun (FSDP2, one share of the batch per rank)
and, the same functions, in the test process itself (one process, the whole batch).

    python -m torch.distributed.run --standalone --nproc_per_node 2 tests/_dist_worker.py OUT_DIR [FAMILY]

writes OUT_DIR/rank{r}.pt: per run, the gate samples of every step, the step-1 gradients, the final
log_alpha, shard_batch's shares, and the logits difference after remove_node_pruning.

    python -m torch.distributed.run --standalone --nproc_per_node 2 tests/_dist_worker.py prune OUT_DIR

runs the whole pruning run (``prune``, :data:`PRUNE`) twice: OUT_DIR/whole straight through, OUT_DIR/resumed
stopped after step STOP_AFTER (its step-4 checkpoint written) and resumed by a second ``prune`` call; writes
OUT_DIR/prune_rank{r}.pt: each run's returned log_alpha, history, circuit and metrics, the training steps its
last ``prune`` call ran, whether the model was sharded, and every file this rank created, renamed or opened
for writing under OUT_DIR.

    python -m torch.distributed.run --standalone --nproc_per_node 2 tests/_dist_worker.py killable RUN [slow]

runs the same ``prune`` into the directory RUN, resuming its checkpoint if it has one, and prints the steps
each rank trained; with ``slow``, every step after the step-4 checkpoint sleeps :data:`SLOW_S` seconds, so
that the test can kill the run there.
"""
from __future__ import annotations

import contextlib
import os
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from tiny_models import tiny_batch, tiny_model  # noqa: E402

from nodeprune_kernels import apply_node_pruning, remove_node_pruning  # noqa: E402
from nodeprune_kernels.model.families import family_of  # noqa: E402
from nodeprune_kernels.ops.gate_stack import feature_gates_reference  # noqa: E402
from nodeprune_kernels.pruning import distributed as D  # noqa: E402

STEPS = 3
SEQ = 7
# (ablation, global batch size, shard before patching): batch 3 splits unevenly over 2 ranks (2 + 1)
RUNS = {"zero": ("zero", 4, True), "interchange": ("interchange", 3, False)}


def gate_sample(masks) -> torch.Tensor:
    """Every gate value the patched ops use at the current step (all layers, both sides), as one vector."""
    seed, d = masks.sample_seed, masks.dims
    K = d.n_heads * d.head_dim
    parts = []
    for layer in range(d.n_layers):
        hidden, out = masks.mlp_gates(layer)
        parts += [feature_gates_reference(masks.attn_gates(layer), K, seed, True),
                  feature_gates_reference(hidden, d.d_ff, seed, True),
                  feature_gates_reference(out, d.d_model, seed, True)]
    return torch.cat(parts).detach()


def train(run: str, family: str = "llama") -> dict:
    """STEPS Adam steps on the gates; distributed when torch.distributed is initialised, else one process."""
    ablation, batch, shard_first = RUNS[run]
    rank, world = D.dist_info()
    model = tiny_model(family)
    V = model.config.vocab_size
    ids = tiny_batch(vocab=V, batch=batch, seq=SEQ, seed=1)
    corrupt = tiny_batch(vocab=V, batch=batch, seq=SEQ, seed=2)
    targets = tiny_batch(vocab=V, batch=batch, seq=SEQ, seed=3)
    with torch.no_grad():
        logits_before = model(ids).logits
    if world > 1 and shard_first:
        D.shard_model(model, family_of(model))
    masks = apply_node_pruning(model, ablation=ablation, backend="reference", seed=0)
    if world > 1 and not shard_first:
        D.shard_model(model, family_of(model))
    with torch.no_grad():  # gates of all kinds, open and closed; another start on rank 1 that broadcast_gates fixes
        g = torch.Generator().manual_seed(10 + rank)
        for p in masks.parameters():
            p.copy_(torch.randn(p.shape, generator=g) * 1.5 + 0.5)
    D.broadcast_gates(masks)
    w = family_of(model).out_proj(family_of(model).decoder_layers(model)[0]).weight
    sharded = type(w).__name__ == "DTensor" and w.to_local().numel() * world == w.numel()
    opt = torch.optim.Adam(masks.parameters(), lr=0.1)
    mine = D.shard_batch(torch.arange(batch))
    samples, steps, grads1 = [], [], None
    for step in range(STEPS):
        interchange = ablation == "interchange"
        with masks.interchange(input_ids=corrupt[mine]) if interchange else contextlib.nullcontext():
            logits = model(ids[mine]).logits
            samples.append(gate_sample(masks))
            steps.append(masks.step)
            n = D.global_count(targets[mine].numel())
            loss = torch.nn.functional.cross_entropy(logits.flatten(0, 1).float(), targets[mine].flatten(),
                                                     reduction="sum") / n
            loss.backward()
        D.sync_gate_grads(masks)
        if step == 0:
            grads1 = {k: p.grad.clone() for k, p in masks.log_alpha.items()}
        opt.step()
        opt.zero_grad()
    remove_node_pruning(model)
    with torch.no_grad():
        restored = (model(ids).logits - logits_before).abs().max().item()
    frozen = [n for n, p in model.named_parameters() if not p.requires_grad]
    return dict(samples=torch.stack(samples), steps=steps, grads1=grads1, shares=mine, sharded=sharded,
                log_alpha={k: p.detach().clone() for k, p in masks.log_alpha.items()}, restored=restored,
                frozen_after_remove=frozen)


# the pruning run of tests/test_distributed.py: interchange ablation and target sparsity (the defaults, so the
# Lagrange multipliers' gradients are all-reduced too), a batch of 5 (3 + 2 over two ranks), 6 steps
PRUNE = dict(steps=6, batch_size=5, n_eval=8, log_every=1, checkpoint_every=4, curve_points=2, backend="reference")
STOP_AFTER = 5  # the interrupted run: stopped after step 5, its last checkpoint at step 4


def prune_config():
    from nodeprune_kernels.pruning.config import PruneConfig

    return PruneConfig(**PRUNE)


def run_prune(run_dir, stop_after: int | None = None) -> dict:
    """``prune`` of the tiny llama on the tests' induction data, writing ``run_dir``; ``stop_after``: a
    KeyboardInterrupt on every rank after that many steps (a killed run), then resumed from ``run_dir``."""
    from test_pruning import induction_data

    from nodeprune_kernels.pruning import run as run_mod

    model = tiny_model("llama")
    if stop_after is not None:
        real = run_mod._train_step

        def stopping(*args, **kwargs):
            if args[7] >= stop_after:  # step (0-based): steps 0 .. stop_after-1 ran
                raise KeyboardInterrupt
            return real(*args, **kwargs)

        run_mod._train_step = stopping
        try:
            run_mod.prune(model, induction_data(), prune_config(), run_dir=run_dir, progress=False)
            raise AssertionError("the interrupted run was not interrupted")
        except KeyboardInterrupt:
            pass
        finally:
            run_mod._train_step = real
        if D.dist_info()[1] > 1:
            torch.distributed.barrier()  # rank 0's checkpoint is on disk before any rank reads it
        model = tiny_model("llama")
    real, ran = run_mod._train_step, []

    def counting(*args, **kwargs):
        ran.append(args[7])
        return real(*args, **kwargs)

    run_mod._train_step = counting
    try:
        res = run_mod.prune(model, induction_data(), prune_config(), run_dir=run_dir, progress=False)
    finally:
        run_mod._train_step = real
    w = family_of(model).out_proj(family_of(model).decoder_layers(model)[0]).weight
    return dict(log_alpha=res.log_alpha, history=res.history, circuit=res.circuit.to_dict(), metrics=res.metrics,
                sharded=type(w).__name__ == "DTensor", steps_run=ran)


def _record_writes(root: str) -> list:
    """Every path under ``root`` this process creates, renames, removes or opens for writing (audit hooks:
    Python's open, os.open, os.mkdir, os.rename / os.replace, os.remove)."""
    root = os.path.realpath(root)
    seen: list = []

    def under(path) -> bool:
        try:
            return os.path.realpath(os.fsdecode(path)).startswith(root + os.sep)
        except (TypeError, ValueError):
            return False

    def hook(event, args):
        if event == "open":
            path, mode, flags = args
            writing = (any(c in mode for c in "wax+") if isinstance(mode, str)
                       else bool(flags & (os.O_WRONLY | os.O_RDWR | os.O_CREAT | os.O_APPEND | os.O_TRUNC)))
            paths = [path] if writing else []
        elif event in ("os.mkdir", "os.remove", "os.rmdir"):
            paths = [args[0]]
        elif event == "os.rename":
            paths = [args[0], args[1]]
        else:
            return
        seen.extend(os.path.relpath(os.path.realpath(os.fsdecode(p)), root) for p in paths
                    if isinstance(p, (str, bytes, os.PathLike)) and under(p))

    sys.addaudithook(hook)
    return seen


def main_prune(out_dir: str) -> None:
    assert D.init_from_env(), "run me with torchrun"
    rank, world = D.dist_info()
    writes = _record_writes(out_dir)
    result = {"world": world, "whole": run_prune(os.path.join(out_dir, "whole")),
              "resumed": run_prune(os.path.join(out_dir, "resumed"), stop_after=STOP_AFTER)}
    result["writes"] = sorted(set(writes))
    torch.distributed.barrier()
    torch.save(result, os.path.join(out_dir, f"prune_rank{rank}.pt"))
    torch.distributed.destroy_process_group()


SLOW_S = 1.5  # the killed run's steps 5 and 6 each take this long


def main_killable(run_dir: str, slow: str | None = None) -> None:
    assert D.init_from_env(), "run me with torchrun"
    from test_pruning import induction_data

    from nodeprune_kernels.pruning import run as run_mod

    real, ran = run_mod._train_step, []

    def train_step(*args, **kwargs):
        ran.append(args[7])  # the step (0-based)
        out = real(*args, **kwargs)
        if slow and args[7] >= PRUNE["checkpoint_every"]:
            time.sleep(SLOW_S)
        return out

    run_mod._train_step = train_step
    run_mod.prune(tiny_model("llama"), induction_data(), prune_config(), run_dir=run_dir, progress=False)
    print(f"rank {D.dist_info()[0]} trained steps {ran}", flush=True)
    torch.distributed.destroy_process_group()


def main(out_dir: str, family: str = "llama") -> None:
    assert D.init_from_env(), "run me with torchrun"
    rank, world = D.dist_info()
    result = {run: train(run, family) for run in RUNS}
    result["shares"] = {n: D.shard_batch(torch.arange(n)) for n in (2, 5, 6)}
    try:
        D.shard_batch(torch.arange(1))
    except ValueError as e:
        result["too_small"] = str(e)
    torch.save(result, os.path.join(out_dir, f"rank{rank}.pt"))
    torch.distributed.destroy_process_group()


if __name__ == "__main__":
    if sys.argv[1] == "prune":
        main_prune(*sys.argv[2:])
    elif sys.argv[1] == "killable":
        main_killable(*sys.argv[2:])
    else:
        main(*sys.argv[1:])

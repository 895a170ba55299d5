"""The training runs of tests/test_distributed.py: run by torchrun (FSDP2, one share of the batch per rank)
and, the same functions, in the test process itself (one process, the whole batch).

    python -m torch.distributed.run --standalone --nproc_per_node 2 tests/_dist_worker.py OUT_DIR [FAMILY]

writes OUT_DIR/rank{r}.pt: per run, the gate samples of every step, the step-1 gradients, the final
log_alpha, shard_batch's shares, and the logits difference after remove_node_pruning.
"""
from __future__ import annotations

import contextlib
import os
import sys

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
    main(*sys.argv[1:])

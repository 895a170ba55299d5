"""Scale-out for a model that outgrows one GPU: FSDP2-sharded frozen weights, replicated gates.

Under ``torchrun`` every rank holds a shard of the (frozen) model weights, all-gathered layer by layer by
FSDP2 (``fully_shard``), and a full copy of the gates (``NodeMasks.log_alpha``, a few MB even for large
models). Each rank runs its share of every batch (:func:`shard_batch`); the gate gradients are summed over
the ranks (:func:`sync_gate_grads`) before the optimizer step, which then runs identically everywhere.

The gate sample of a step is keyed by ``(masks.seed, masks.step)`` and shared by the whole batch, so the
ranks draw the same gates as long as they start from the same log_alpha (:func:`broadcast_gates`), use the
same seed, and run the same number of training forward passes (one per step each; every rank must run
every step, also because FSDP's all-gathers are collective).

A training step::

    init_from_env()
    model = AutoModelForCausalLM.from_pretrained(...)
    shard_model(model, family_of(model))         # shard, then patch (see shard_model)
    masks = apply_node_pruning(model, ...)
    broadcast_gates(masks)
    opt = torch.optim.Adam(masks.parameters(), lr=...)
    for batch_index in batches:                  # the same global batch on every rank
        mine = shard_batch(batch_index)
        n = global_count(<this rank's number of loss terms>)
        loss = <sum of this rank's loss terms> / n
        loss.backward()
        sync_gate_grads(masks)
        opt.step(); opt.zero_grad()

Without torch.distributed initialised every function is the single-process identity, so the same script
runs on one device unchanged.
"""
from __future__ import annotations

import os

import torch
import torch.distributed as dist
from torch import nn

from ..model.patch import unpatched

__all__ = ["dist_info", "init_from_env", "shard_model", "broadcast_gates", "sync_gate_grads", "global_count",
           "shard_batch", "all_reduce_sum"]

_TORCHRUN_ENV = ("RANK", "WORLD_SIZE", "MASTER_ADDR")


def _fully_shard():
    """FSDP2's ``fully_shard`` (``torch.distributed.fsdp`` since torch 2.6, ``_composable.fsdp`` before)."""
    try:
        from torch.distributed.fsdp import fully_shard
    except ImportError:
        try:
            from torch.distributed._composable.fsdp import fully_shard
        except ImportError:
            raise ImportError(f"shard_model needs FSDP2 (torch.distributed.fsdp.fully_shard, torch >= 2.4); this "
                              f"is torch {torch.__version__}") from None
    return fully_shard


def _active() -> bool:
    return dist.is_available() and dist.is_initialized()


def _device_type() -> str:
    """The device type of the tensors the default process group communicates: cuda under nccl, else cpu."""
    return "cuda" if "nccl" in str(dist.get_backend()) else "cpu"


def dist_info() -> tuple[int, int]:
    """(rank, world_size) of the default process group; (0, 1) when torch.distributed is not initialised."""
    if not _active():
        return 0, 1
    return dist.get_rank(), dist.get_world_size()


def init_from_env(backend: str | None = None) -> bool:
    """Initialise the default process group when launched by torchrun; returns whether this run is distributed.

    Launched by torchrun (RANK, WORLD_SIZE and MASTER_ADDR in the environment) and not yet initialised: the
    process group is initialised from the environment with ``backend`` (default: "nccl" when CUDA is
    available, else "gloo"); with CUDA, the device is set to ``cuda:LOCAL_RANK`` first. Already initialised:
    nothing is done. Not under torchrun: returns False (a single-process run).
    """
    if _active():
        return True
    if not all(k in os.environ for k in _TORCHRUN_ENV):
        return False
    if not dist.is_available():
        raise RuntimeError("launched by torchrun, but this torch build has no torch.distributed")
    cuda = torch.cuda.is_available()
    if cuda:
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", 0)))
    dist.init_process_group(backend=backend or ("nccl" if cuda else "gloo"))
    return True


def shard_model(model: nn.Module, family, **fsdp_kwargs) -> nn.Module:
    """Shard a causal LM's weights over the ranks with FSDP2 (``fully_shard``); returns the model.

    The FSDP units: every decoder layer (``family.decoder_layers(model)``; ``family`` is ``masks.family`` or
    ``nodeprune_kernels.model.families.family_of(model)``), then the base model (``model.base_model``: the
    embeddings and the final norm) and the output embedding (the LM head) as two roots. The base model is a
    root rather than the whole causal LM because ``masks.interchange`` and ``masks.estimate_means`` run
    ``model.base_model`` by itself, which must all-gather its own weights. With tied input/output embeddings
    the LM head gets its own sharded copy of the embedding matrix (one more 1/world_size shard per rank).
    Parameters outside the base model and the LM head (none in the supported families) stay replicated.
    Extra keyword arguments go to every ``fully_shard`` call (e.g. ``mp_policy``, ``reshard_after_forward``).
    The model must be on this rank's device (``cuda:LOCAL_RANK`` under nccl, the CPU under gloo) and
    torch.distributed initialised (:func:`init_from_env`).

    Order with ``apply_node_pruning``: either. FSDP2 hooks the decoder layers and the roots, not the
    attention / o_proj / MLP instances that node pruning patches, and it all-gathers a layer's weights before
    the layer runs, so the patched forwards read unsharded weights; requires_grad flags set on the sharded
    parameters (freezing, and ``remove_node_pruning``'s restoring) reach the unsharded ones at every
    all-gather. A patched model is sharded with its patching taken off and put back
    (``nodeprune_kernels.model.patch.unpatched``), so that the flags ``remove_node_pruning`` restores are those
    of the sharded parameters (with tied embeddings the LM head's copy is a parameter of its own).
    """
    if not _active():
        raise RuntimeError("shard_model needs torch.distributed initialised: launch with torchrun and call "
                           "nodeprune_kernels.pruning.distributed.init_from_env() first")
    fully_shard = _fully_shard()
    if _is_sharded(model):
        raise RuntimeError("this model is already sharded (fully_shard was applied to it or its modules); shard "
                           "it once")
    devices = {p.device.type for p in model.parameters()}
    want = _device_type()
    if devices != {want}:
        raise ValueError(f"the model's parameters are on {sorted(devices)}, but the {dist.get_backend()} process "
                         f"group shards {want} tensors: move the model to "
                         f"{'cuda:LOCAL_RANK' if want == 'cuda' else 'the CPU'} before shard_model")
    if "mesh" not in fsdp_kwargs:
        from torch.distributed.device_mesh import init_device_mesh

        fsdp_kwargs["mesh"] = init_device_mesh(want, (dist.get_world_size(),))
    base = getattr(model, "base_model", model)  # what masks._run_base runs
    head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    with unpatched(model):
        for layer in family.decoder_layers(model):
            fully_shard(layer, **fsdp_kwargs)
        fully_shard(base, **fsdp_kwargs)
        if base is not model and head is not None and any(True for _ in head.parameters()):
            fully_shard(head, **fsdp_kwargs)
    return model


def _is_sharded(model: nn.Module) -> bool:
    try:
        from torch.distributed.fsdp import FSDPModule
    except ImportError:
        try:
            from torch.distributed._composable.fsdp import FSDPModule
        except ImportError:
            return False
    return any(isinstance(m, FSDPModule) for m in model.modules())


def broadcast_gates(masks: nn.Module) -> None:
    """Make every rank's gates equal rank 0's (log_alpha, and the step counter and seed that key the gate
    sample). Call after ``apply_node_pruning`` and after resuming from a checkpoint. No-op single-process."""
    if not _active():
        return
    with torch.no_grad():
        for p in masks.parameters():
            dist.broadcast(p.data, src=0)
    meta = torch.tensor([masks.step, masks.seed], dtype=torch.int64, device=_param_device(masks))
    dist.broadcast(meta, src=0)
    masks.step, masks.seed = int(meta[0]), int(meta[1])


def sync_gate_grads(masks: nn.Module) -> None:
    """All-reduce (SUM) the gradients of the gates over the ranks, in place; call after ``backward()``.

    The sum is the full-batch gradient only if every rank's loss is already normalised by the GLOBAL count of
    loss terms (tokens, examples): ``loss = local_sum / global_count(local_count)``, not a local mean. Terms
    that do not depend on the data (e.g. a sparsity penalty on the gates) must be added on one rank only, or
    divided by the world size. A gate without a gradient on every rank is left alone; one with a gradient on
    only some ranks is an error (the collectives would not match). No-op single-process.
    """
    if not _active():
        return
    params = list(masks.parameters())
    has = torch.tensor([p.grad is not None for p in params], dtype=torch.int64, device=_param_device(masks))
    agree = has.clone()
    dist.all_reduce(agree)
    world = dist.get_world_size()
    if bool(((agree != 0) & (agree != world)).any()):
        raise RuntimeError("some ranks have gate gradients that others lack: every rank must run the same forward "
                           "and backward each step (the same granularities, at least one example each)")
    grads = [p.grad for p in params if p.grad is not None]
    if not grads:
        return
    flat = torch.cat([g.reshape(-1) for g in grads])
    dist.all_reduce(flat)
    for g, part in zip(grads, flat.split([g.numel() for g in grads])):
        g.copy_(part.view_as(g))


def all_reduce_sum(t: torch.Tensor) -> torch.Tensor:
    """The sum of ``t`` over the ranks (a new tensor; ``t`` itself is unchanged). Single-process: a copy."""
    out = t.detach().clone()
    if _active():
        dist.all_reduce(out)
    return out


def broadcast_object(box: list) -> None:
    """Rank 0's picklable objects in ``box`` replace every other rank's, in place (a no-op in one process)."""
    if _active():
        dist.broadcast_object_list(box, src=0)


def global_count(local_count) -> torch.Tensor:
    """The sum over the ranks of this rank's count of loss terms: the denominator of each rank's loss, so that
    :func:`sync_gate_grads`' sum is the full-batch gradient.

    ``local_count``: an int, or a tensor that is summed first (e.g. an attention mask, or per-token weights).
    Returns a 0-dim tensor, int64 for integer counts (dividing a float loss by it keeps the loss's dtype), else
    float64; on the current CUDA device under nccl, else on the CPU.
    """
    if isinstance(local_count, torch.Tensor):
        t = local_count.detach().sum()
        t = t.to(torch.float64 if t.is_floating_point() else torch.int64)
    else:
        t = torch.tensor(local_count, dtype=torch.int64)
    if _active() and _device_type() == "cuda":
        t = t.to(torch.device("cuda", torch.cuda.current_device()))
    return all_reduce_sum(t)


def shard_batch(index: torch.Tensor) -> torch.Tensor:
    """This rank's share of a batch of example indices: a contiguous slice, the sizes as equal as possible.

    With n examples over W ranks the first ``n % W`` ranks get ``n // W + 1``, the others ``n // W``. Every
    rank must run every step (FSDP's all-gathers and the gradient all-reduce are collective), so a batch
    smaller than the world size is an error. Single-process: the whole batch.
    """
    index = torch.as_tensor(index)
    if index.dim() != 1:
        raise ValueError(f"shard_batch takes a 1-D tensor of example indices, got shape {tuple(index.shape)}")
    rank, world = dist_info()
    n = index.numel()
    if n < world:
        raise ValueError(f"a batch of {n} examples cannot give each of the {world} ranks one: every rank must run "
                         f"every step; use a batch size of at least {world}")
    base, extra = divmod(n, world)
    start = rank * base + min(rank, extra)
    return index[start:start + base + (1 if rank < extra else 0)]


def _param_device(masks: nn.Module) -> torch.device:
    return next(masks.parameters()).device

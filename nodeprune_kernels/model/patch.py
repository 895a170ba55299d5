"""Swapping the masked ops into a Hugging Face model's own instances, and taking them out again.

Three modules per decoder layer get an instance-level ``forward`` (the classes are never touched, nothing
is copied from HF's modeling files):

- the attention output projection: its input, as [..., H, d_head], goes through
  :func:`masked_attn_out_proj`, which saves a reference to it for the backward.
- the attention module: its own forward runs under :class:`_ContiguousCapture`, which remembers the
  strided attention-kernel output behind HF's ``attn_output.transpose(1, 2).contiguous()``. Where the
  kernel's output layout makes that a copy (e.g. SDPA on GPT-NeoX's fused-QKV views, eager attention), the
  o_proj gets the kernel's output itself, read through its strides: the op saves the tensor SDPA keeps
  anyway and the copy is freed at once. Where the output is already [B, S, H, D] in memory (SDPA's flash
  kernels on q/k/v views of separate projections), there is no copy to avoid.
- the MLP: one :func:`masked_mlp` call from the MLP's input (the hidden units never reach memory).

A forward pre-hook on the model advances the gate sample once per training forward pass (so layers that
gradient checkpointing recomputes during the backward see the same gates). ``remove_node_pruning``
restores every patched attribute and each parameter's requires_grad.
"""
from __future__ import annotations

import contextlib
import functools
import weakref
from dataclasses import dataclass, field

import torch
from torch import nn
from torch.overrides import TorchFunctionMode

from ..ops import masked_attn_out_proj, masked_mlp
from ..ops.masked_mlp.reference import mlp_hidden_reference
from ..utils.backend import BACKENDS
from .families import Family, activation_of, family_of, model_dims
from .masks import GRANULARITIES, NodeMasks

_MISSING = object()
_APPLIED: "weakref.WeakKeyDictionary[nn.Module, _Patch]" = weakref.WeakKeyDictionary()


@dataclass
class _Patch:
    """What apply_node_pruning does to a model, so that it can be undone (and redone: :func:`unpatched`)."""

    masks: NodeMasks
    freeze: bool
    forwards: list = field(default_factory=list)  # (module, its patched forward)
    previous: list = field(default_factory=list)  # (module, its instance forward before, or _MISSING)
    requires_grad: dict = field(default_factory=dict)
    hook: object = None

    def install(self, model: nn.Module) -> None:
        self.previous = [(module, module.__dict__.get("forward", _MISSING)) for module, _ in self.forwards]
        for module, fn in self.forwards:
            module.forward = fn
        if self.freeze:
            self.requires_grad = {name: p.requires_grad for name, p in model.named_parameters()}
            for p in model.parameters():
                p.requires_grad_(False)
        self.hook = model.register_forward_pre_hook(self.masks._advance)
        for module in (model, *(m for m, _ in self.forwards)):
            module.__dict__["__deepcopy__"] = _refuse_deepcopy

    def uninstall(self, model: nn.Module) -> None:
        for module, old in reversed(self.previous):
            if old is _MISSING:
                module.__dict__.pop("forward", None)
            else:
                module.forward = old
        self.hook.remove()
        for module in (model, *(m for m, _ in self.forwards)):
            module.__dict__.pop("__deepcopy__", None)
        params = dict(model.named_parameters())
        for name, flag in self.requires_grad.items():
            params[name].requires_grad_(flag)
        self.previous, self.requires_grad, self.hook = [], {}, None


def _refuse_deepcopy(memo):
    """``copy.deepcopy`` of a patched model (or of one of its patched modules): refused, since the copy's
    gates and interchange state would still be the original's."""
    raise TypeError("copy.deepcopy of a model patched for node pruning is not supported (the copy would share "
                    "the original's gates and interchange state): call nodeprune_kernels.remove_node_pruning(model), "
                    "copy it, then apply_node_pruning to each copy; or copy inside "
                    "`with nodeprune_kernels.model.patch.unpatched(model):`")


def _original(module: nn.Module, *args, **kwargs):
    return type(module).forward(module, *args, **kwargs)


class _ContiguousCapture(TorchFunctionMode):
    """Remembers the last ``t.contiguous()`` that copied: (t, the copy)."""

    def __init__(self):
        super().__init__()
        self.last = None

    def __torch_function__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        if func is torch.Tensor.contiguous and out is not args[0]:
            self.last = (args[0], out)
        return out


class _Site:
    """What a layer's patched attention and o_proj share: the capture of the running attention forward."""

    def __init__(self, layer: int):
        self.layer = layer
        self.capture: _ContiguousCapture | None = None

    def strided_source(self, x: torch.Tensor, head_dim: int) -> torch.Tensor:
        """x as [..., H, head_dim]: the attention kernel's output itself when x is only its copy."""
        last = self.capture.last if self.capture is not None else None
        if last is not None:
            src, copy = last
            if (copy.data_ptr() == x.data_ptr() and copy.numel() == x.numel() and src.dim() >= 2
                    and src.shape[-1] == head_dim and src.shape[:-2] == x.shape[:-1]):
                return src
        return x.unflatten(-1, (-1, head_dim))


def _attention_forward(site: _Site, module: nn.Module, *args, **kwargs):
    if torch.compiler.is_compiling():  # the compiler plans memory itself; keep its graph free of the mode
        return _original(module, *args, **kwargs)
    prev = site.capture
    with _ContiguousCapture() as site.capture:
        try:
            return _original(module, *args, **kwargs)
        finally:
            site.capture = prev


def _attn_out_forward(masks: NodeMasks, site: _Site, module: nn.Module, weight_layout: str, x: torch.Tensor):
    layer = site.layer
    xv = site.strided_source(x, masks.dims.head_dim)
    if masks._bypass:
        if masks._recorder is not None:
            masks._recorder("attn", layer, xv)
        return _original(module, x)
    gates = masks.attn_gates(layer)
    if not gates:
        return _original(module, x)
    return masked_attn_out_proj(xv, module.weight, module.bias, in_gates=gates,
                                x_ablate=masks.attn_ablation(layer, xv), seed=masks.sample_seed,
                                training=masks._sampling(), weight_layout=weight_layout, backend=masks.backend)


def _mlp_forward(masks: NodeMasks, layer: int, module: nn.Module, family: Family, activation: str,
                 x: torch.Tensor):
    if masks._bypass:
        if masks._recorder is not None:
            if masks._token_weight is not None:  # mean estimation: the hidden units
                weights = family.mlp_weights(module)
                h = mlp_hidden_reference(x, weights["up_weight"], gate_weight=weights["gate_weight"],
                                         up_bias=weights["up_bias"], gate_bias=weights["gate_bias"],
                                         activation=activation, weight_layout=family.weight_layout)
                masks._recorder("mlp", layer, h)
            else:  # interchange: the MLP input, from which the op rebuilds the hidden units
                masks._recorder("mlp", layer, x)
        return _original(module, x)
    in_gates, out_gates = masks.mlp_gates(layer)
    if not in_gates and not out_gates:
        return _original(module, x)
    y = masked_mlp(x, **family.mlp_weights(module), activation=activation, in_gates=in_gates, out_gates=out_gates,
                   **masks.mlp_ablation(layer, x), seed=masks.sample_seed, training=masks._sampling(),
                   weight_layout=family.weight_layout, backend=masks.backend)
    if family.mlp_dropout:
        y = getattr(module, family.mlp_dropout)(y)
    return y


def apply_node_pruning(model: nn.Module, granularities=GRANULARITIES, ablation: str = "zero",
                       backend: str = "auto", seed: int = 0, *, init_log_alpha: float = 3.0, freeze: bool = True,
                       cache_corrupt_hidden: bool = False) -> NodeMasks:
    """Patch a loaded Hugging Face causal LM in place for node pruning; returns the gates.

    Args:
        model: a causal LM of a supported family (``nodeprune_kernels.SUPPORTED_MODEL_TYPES``), any dtype
            and device. Its attention output projections and MLPs are patched on the instances.
        granularities: any of "layer", "attn", "head", "attn_neuron", "mlp", "mlp_neuron", "mlp_out"
            (default: all).
        ablation: what a closed node's input becomes: "zero", "mean" (call ``masks.estimate_means`` first)
            or "interchange" (run inside ``with masks.interchange(**corrupted_inputs):``).
        backend: "auto" (Triton kernels on CUDA; on CPU the native C++ kernels, or the PyTorch reference with
            a warning when they cannot be built), "triton", "native" or "reference".
        seed: the run's seed; gate samples are keyed by (seed, step, gate index).
        init_log_alpha: the initial log_alpha of every gate (3.0: deterministic gates all 1).
        freeze: set requires_grad=False on the model's parameters (restored by ``remove_node_pruning``);
            frozen weights keep the fused backward free of weight gradients.
        cache_corrupt_hidden: with interchange ablation, save the corrupted hidden units for the backward
            instead of rebuilding them (d_ff more values per token; faster).

    Returns:
        The :class:`NodeMasks` that owns the log_alpha parameters; it is in training mode (sampled gates).
    """
    if model in _APPLIED:
        raise RuntimeError("node pruning is already applied to this model; call "
                           "nodeprune_kernels.remove_node_pruning(model) first")
    if backend not in BACKENDS:
        raise ValueError(f"unknown backend {backend!r}; choose one of {', '.join(map(repr, BACKENDS))}")
    family = family_of(model)
    try:
        family.decoder_layers(model)
    except AttributeError:
        raise TypeError(f"{type(model).__name__} is not a causal LM with an LM head (its decoder layers are not at "
                        f"model.{family.layers}); pass the *ForCausalLM model itself, e.g. "
                        "AutoModelForCausalLM.from_pretrained(...), not its base model") from None
    dims = model_dims(model, family)
    activation = activation_of(model.config)
    masks = NodeMasks(model, family, dims, granularities, ablation=ablation, backend=backend, seed=seed,
                      init_log_alpha=init_log_alpha, cache_corrupt_hidden=cache_corrupt_hidden)
    state = _Patch(masks, freeze)
    for layer_idx, layer in enumerate(family.decoder_layers(model)):
        attn, o_proj, mlp = family.attention(layer), family.out_proj(layer), family.mlp_module(layer)
        site = _Site(layer_idx)
        state.forwards += [
            (attn, functools.partial(_attention_forward, site, attn)),
            (o_proj, functools.partial(_attn_out_forward, masks, site, o_proj, family.weight_layout)),
            (mlp, functools.partial(_mlp_forward, masks, layer_idx, mlp, family, activation))]
    state.install(model)
    _APPLIED[model] = state
    return masks.train()


def remove_node_pruning(model: nn.Module) -> NodeMasks:
    """Undo :func:`apply_node_pruning`: the original modules and requires_grad flags come back exactly.

    Returns the (now detached) NodeMasks, whose log_alphas and circuits stay usable.
    """
    state = _APPLIED.pop(model, None)
    if state is None:
        raise RuntimeError("node pruning is not applied to this model (nothing to remove)")
    state.uninstall(model)
    return state.masks


@contextlib.contextmanager
def unpatched(model: nn.Module):
    """Inside the block the model is as it was before :func:`apply_node_pruning` (original forwards, no
    gate-sample hook, original requires_grad flags); the patching comes back on exit. A no-op for an
    unpatched model. ``materialize`` copies a patched model through it."""
    state = _APPLIED.get(model)
    if state is None:
        yield model
        return
    state.uninstall(model)
    try:
        yield model
    finally:
        state.install(model)


def node_masks(model: nn.Module) -> NodeMasks:
    """The NodeMasks of a patched model."""
    state = _APPLIED.get(model)
    if state is None:
        raise RuntimeError("node pruning is not applied to this model; call apply_node_pruning(model) first")
    return state.masks


def is_patched(model: nn.Module) -> bool:
    return model in _APPLIED

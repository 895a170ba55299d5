"""Cutting a circuit out of a model: a physically smaller copy whose logits are the circuit's.

``materialize(model, circuit)`` deep-copies a Hugging Face causal LM and removes what the circuit closes, so
that the copy computes, with ordinary HF modules and no gates, what the patched model computes inside
``with masks.use_circuit(circuit):`` under zero ablation (closing a gate is exactly zeroing the weight
columns or rows it acts on; biases are never removed):

- closed query heads lose their q rows and o_proj input columns; a key/value head goes when all of its query
  heads are closed. HF's ``repeat_kv`` needs the same number of query heads per kv head, so each kept kv
  group keeps as many query heads as the fullest group, filling with closed heads whose o_proj columns are
  zeroed. A fully closed attention block keeps one head (and its kv head) with zeroed o_proj columns: HF's
  reshapes cannot take 0 heads, and the block's output is exactly the o_proj bias.
- closed attention neurons (single value dims of a kept head) cannot go under HF's fixed head_dim: their
  o_proj columns are zeroed.
- per-head q/k norm weights (Cohere's use_qk_norm, [H, head_dim]) keep the kept heads' rows. Where the q/k
  norm spans all heads (OLMo-2's RMSNorm over [H * head_dim]), removing a head would change every other
  head's queries and keys, so no head is removed: closed heads keep their q/k/v rows and get zeroed o_proj
  columns (``Family.qk_norm``).
- closed MLP hidden units are removed (up / gate rows, both halves of a fused gate_up, down columns); a
  fully closed MLP has 0 hidden units (its output is the down bias; GPT-2's Conv1D cannot take 0 inputs, so
  there it keeps one unit with a zeroed down column). Closed mlp_out features zero their down-projection rows.
"""
from __future__ import annotations

import copy
import warnings

import torch
from torch import nn

from .circuit import Circuit
from .families import Family, ModelDims, family_of, model_dims
from .patch import is_patched, node_masks, unpatched

# Per-layer attributes of HF attention modules that hold head counts (set when the module has them as ints).
_HEAD_ATTRS = ("num_heads", "num_attention_heads", "num_key_value_heads", "num_key_value_groups", "split_size")


def count_parameters(model: nn.Module) -> int:
    """The number of parameters of a model, tied (shared) parameters counted once."""
    return sum(p.numel() for p in model.parameters())


@torch.no_grad()
def materialize(model: nn.Module, circuit: Circuit, *, verbose: bool = True) -> nn.Module:
    """A new, physically smaller copy of ``model`` that computes the circuit (zero ablation).

    Args:
        model: a causal LM of a supported family, patched by ``apply_node_pruning`` or not; it is left
            unchanged (the copy is made from its original, unpatched modules, without the gates).
        circuit: a :class:`Circuit` of this model (e.g. ``masks.circuit()``).
        verbose: print the one-line report "materialized: N params (was M, X% smaller)".

    Returns:
        The new model (same class, dtype and device), with ordinary HF modules: its logits equal the patched
        model's in ``masks.eval()`` inside ``with masks.use_circuit(circuit):`` under zero ablation. The
        closed query/key/value heads and MLP hidden units are removed; closed attention neurons, the filler
        heads that grouped-query attention needs and mlp_out features are zeroed weights (so are closed heads
        where a q/k norm spans all heads, OLMo-2: there no head is removed). Its parameter
        counts are in ``new.nodeprune_params = (new_count, old_count)``; ``new.config.nodeprune_circuit``
        holds ``circuit.to_dict()`` and ``new.config.nodeprune_layers`` the per-layer sizes
        ``{"num_attention_heads", "num_key_value_heads", "intermediate_size"}``. Global config sizes are
        updated only where they stay true for every layer (the intermediate size when every layer keeps the
        same number of hidden units; the head counts likewise, when the config states head_dim explicitly);
        otherwise they keep the original model's values (``new.config.nodeprune_base_sizes`` records the
        original values of the config fields it may change). Per-layer head counts are set on the attention
        modules (``num_key_value_groups``, GPT-2's ``num_heads`` / ``split_size``, ...); where a family's
        forward reads them from the config (Phi-3), that attention module gets its own shallow copy of the
        config (so a later ``set_attn_implementation`` does not reach it).

        Saving: :func:`nodeprune_kernels.save_pruned` / :func:`~nodeprune_kernels.load_pruned` work for every
        result. ``new.save_pretrained`` works where the config describes every layer's shapes (a model of
        that class built from ``new.config`` has the same parameter shapes, e.g. every layer keeps the same
        number of hidden units and heads); otherwise it raises, since ``from_pretrained`` could not rebuild
        the model.

    Raises:
        TypeError: ``circuit`` is not a Circuit.
        ValueError: the circuit was found on a model of another type or other sizes.
    """
    family = family_of(model)
    if not isinstance(circuit, Circuit):
        raise TypeError(f"materialize needs a nodeprune_kernels.Circuit (e.g. masks.circuit()), got "
                        f"{type(circuit).__name__}")
    model_type = model.config.model_type
    if circuit.model_type is not None and circuit.model_type != model_type:
        raise ValueError(f"this circuit was found on a {circuit.model_type} model, not on this {model_type} model")
    dims = model_dims(model, family)
    circuit.check_dims(dims)
    _warn_on_other_ablation(model)
    kept = circuit.full()

    old_count = count_parameters(model)
    new = _unpatched_copy(model)
    sizes = []
    for i, layer in enumerate(family.decoder_layers(new)):
        heads, kv_heads = _cut_attention(family, layer, i, kept, dims)
        d_ff = _cut_mlp(family, layer, i, kept, dims)
        sizes.append({"num_attention_heads": heads, "num_key_value_heads": kv_heads, "intermediate_size": d_ff})
    mismatched = _update_config(new, family, dims, sizes, circuit)
    if mismatched:
        _refuse_save_pretrained(new, mismatched)

    new_count = count_parameters(new)
    new.nodeprune_params = (new_count, old_count)
    if verbose:
        print(report(new_count, old_count))
    return new


def report(new_count: int, old_count: int) -> str:
    """The one-line size report of :func:`materialize`."""
    smaller = 100.0 * (old_count - new_count) / old_count if old_count else 0.0
    return f"materialized: {new_count:,} params (was {old_count:,}, {smaller:.1f}% smaller)"


# --------------------------------------------------------------------------------------- the copy
def _warn_on_other_ablation(model: nn.Module) -> None:
    if is_patched(model) and node_masks(model).ablation != "zero":
        warnings.warn(f"this model's node pruning uses ablation={node_masks(model).ablation!r}; the materialized "
                      "model computes the circuit under zero ablation (closed nodes contribute nothing, biases "
                      "kept)", stacklevel=3)


def _unpatched_copy(model: nn.Module) -> nn.Module:
    """A deep copy of ``model`` as it was before ``apply_node_pruning``: no gates, no patched forwards, no
    gate-sample hook, the original requires_grad flags."""
    with unpatched(model):
        return copy.deepcopy(model)


# ------------------------------------------------------------------------------------- the surgery
def _choose_heads(head_kept: torch.Tensor, n_heads: int, n_kv: int) -> tuple:
    """(query heads, kv heads) to keep in one layer, both ascending.

    Every kept kv group keeps the same number of query heads (the most any group has open), filled with
    closed heads of the group; a fully closed block keeps query head 0 and kv head 0.
    """
    n_rep = n_heads // n_kv
    counts = head_kept.view(n_kv, n_rep).sum(1)
    m = int(counts.max())
    if m == 0:
        return [0], [0]
    q, kv = [], []
    for g in range(n_kv):
        if counts[g] == 0:
            continue
        members = range(g * n_rep, (g + 1) * n_rep)
        open_ = [h for h in members if head_kept[h]]
        fill = [h for h in members if not head_kept[h]][:m - len(open_)]
        q += sorted(open_ + fill)
        kv.append(g)
    return q, kv


def _span(blocks, size: int) -> torch.Tensor:
    """Indices of the given blocks of ``size`` consecutive features."""
    if not blocks:
        return torch.zeros(0, dtype=torch.long)
    return (torch.as_tensor(blocks, dtype=torch.long)[:, None] * size + torch.arange(size)).flatten()


def _cut_attention(family: Family, layer: nn.Module, i: int, kept: dict, dims: ModelDims) -> tuple:
    attn = family.attention(layer)
    H, KV, D = dims.n_heads, dims.n_kv_heads, dims.head_dim
    if family.qkv in ("gpt2", "neox") and KV != H:
        raise NotImplementedError(f"{family.name}: grouped-query attention is not expected in a fused "
                                  f"{family.qkv} qkv projection")
    if family.qk_norm == "spans_heads":  # a q/k norm over all heads: removing one changes the others
        q_heads, kv_heads = list(range(H)), list(range(KV))
    else:
        q_heads, kv_heads = _choose_heads(kept["head"][i], H, KV)
    q_idx, kv_idx = _span(q_heads, D), _span(kv_heads, D)
    layout = family.weight_layout

    o_zero = ~kept["attn_neuron"][i][q_idx]  # closed neurons, filler heads, or a closed block's one head
    setattr(attn, family.o_proj, _resized(family.out_proj(layer), layout, cols=q_idx, zero_cols=o_zero))
    if family.qkv == "separate":
        for name, idx in (("q_proj", q_idx), ("k_proj", kv_idx), ("v_proj", kv_idx)):
            setattr(attn, name, _resized(getattr(attn, name), layout, rows=idx))
    elif family.qkv == "phi3":  # rows [q (H*D); k (KV*D); v (KV*D)]
        rows = torch.cat([q_idx, H * D + kv_idx, (H + KV) * D + kv_idx])
        attn.qkv_proj = _resized(attn.qkv_proj, layout, rows=rows)
    elif family.qkv == "gpt2":  # Conv1D outputs [q | k | v], each H*D
        rows = torch.cat([q_idx, H * D + q_idx, 2 * H * D + q_idx])
        attn.c_attn = _resized(attn.c_attn, layout, rows=rows)
    elif family.qkv == "neox":  # output rows per head [q, k, v] (H, 3, D)
        attn.query_key_value = _resized(attn.query_key_value, layout, rows=_span(q_heads, 3 * D))
    else:
        raise NotImplementedError(f"materialize: unknown qkv layout {family.qkv!r} of family {family.name}")
    if family.qk_norm == "per_head":
        for name, heads, n in (("q_norm", q_heads, H), ("k_norm", kv_heads, KV)):
            _keep_norm_rows(family, attn, name, heads, n)

    h, kv = len(q_heads), len(kv_heads)
    values = {"num_heads": h, "num_attention_heads": h, "num_key_value_heads": kv, "num_key_value_groups": h // kv,
              "split_size": h * D}
    for name in _HEAD_ATTRS:
        if isinstance(getattr(attn, name, None), int) and not isinstance(getattr(attn, name), bool):
            setattr(attn, name, values[name])
    return h, kv


def _keep_norm_rows(family: Family, attn: nn.Module, name: str, heads: list, n: int) -> None:
    """Keep the rows ``heads`` of the attention's per-head norm ``name`` (weight [n, D], and a bias of the same
    shape if it has one); nothing to do when the attention has no such norm (e.g. Cohere without
    use_qk_norm)."""
    norm = getattr(attn, name, None)
    if norm is None:
        return
    idx = torch.as_tensor(heads, dtype=torch.long, device=norm.weight.device)
    for pname in ("weight", "bias"):
        p = getattr(norm, pname, None)
        if p is None:
            continue
        if p.dim() != 2 or p.shape[0] != n:
            raise NotImplementedError(f"materialize: {family.name}'s {name}.{pname} has shape {tuple(p.shape)}, not "
                                      f"one row per head ({n}, head_dim); this family's per-head norms are not "
                                      "laid out as expected")
        setattr(norm, pname, nn.Parameter(p.index_select(0, idx), requires_grad=p.requires_grad))


def _cut_mlp(family: Family, layer: nn.Module, i: int, kept: dict, dims: ModelDims) -> int:
    mlp = family.mlp_module(layer)
    units = kept["mlp_neuron"][i].nonzero().flatten()
    zero_cols = None
    layout = family.weight_layout
    if units.numel() == 0 and layout == "in_out":
        # HF's Conv1D cannot take 0 input features (x.view(-1, 0)): keep one unit, its down column zeroed
        units, zero_cols = torch.zeros(1, dtype=torch.long), torch.ones(1, dtype=torch.bool)
    up_rows = torch.cat([units, dims.d_ff + units]) if family.fused_gate_up else units  # [gate; up]
    setattr(mlp, family.up, _resized(getattr(mlp, family.up), layout, rows=up_rows))
    if family.gate:
        setattr(mlp, family.gate, _resized(getattr(mlp, family.gate), layout, rows=units))
    setattr(mlp, family.down, _resized(getattr(mlp, family.down), layout, cols=units,
                                       zero_rows=~kept["mlp_out"][i], zero_cols=zero_cols))
    n = int(units.numel())
    if isinstance(getattr(mlp, "intermediate_size", None), int):
        mlp.intermediate_size = n
    return n


def _resized(module: nn.Module, layout: str, rows=None, cols=None, zero_rows=None, zero_cols=None) -> nn.Module:
    """A new linear like ``module`` keeping output features ``rows`` and input features ``cols`` (index
    tensors; None keeps all), with the weights of the ``zero_rows`` outputs / ``zero_cols`` inputs (bool over
    the kept ones) zeroed. The bias follows ``rows`` and is never zeroed."""
    w = module.weight if layout == "out_in" else module.weight.t()  # [out, in]
    b = module.bias
    dev = w.device
    if rows is not None:
        w = w.index_select(0, rows.to(dev))
    if cols is not None:
        w = w.index_select(1, cols.to(dev))
    if rows is None and cols is None:
        w = w.clone()
    if b is not None:
        b = b.index_select(0, rows.to(dev)) if rows is not None else b.clone()
    if zero_rows is not None:
        w[zero_rows.to(dev)] = 0
    if zero_cols is not None:
        w[:, zero_cols.to(dev)] = 0
    if layout != "out_in":
        w = w.t()
    return _linear_like(module, w.contiguous(), b)


def _linear_like(old: nn.Module, weight: torch.Tensor, bias) -> nn.Module:
    """A module of ``old``'s class holding ``weight`` (in that class's layout) and ``bias``, built without
    initialising anything."""
    flags = dict(requires_grad=old.weight.requires_grad)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # "Initializing zero-element tensors is a no-op"
        if type(old) is nn.Linear:
            new = nn.Linear(weight.shape[1], weight.shape[0], bias=bias is not None, device="meta")
        elif _is_conv1d(old):
            with torch.device("meta"):
                new = type(old)(weight.shape[1], weight.shape[0])  # Conv1D(nf, nx), weight [nx, nf]
        else:
            raise NotImplementedError(f"materialize: cannot resize a {type(old).__name__} (plain nn.Linear and "
                                      "HF Conv1D only; quantized or adapter-wrapped layers are not supported)")
    new.weight = nn.Parameter(weight, **flags)
    new.bias = nn.Parameter(bias, requires_grad=old.bias.requires_grad) if bias is not None else None
    new.train(old.training)
    return new


def _is_conv1d(module: nn.Module) -> bool:
    try:
        from transformers.pytorch_utils import Conv1D
    except ImportError:  # pragma: no cover
        return type(module).__name__ == "Conv1D"
    return type(module) is Conv1D


# ------------------------------------------------------------------------------------------ config
def _update_config(model: nn.Module, family: Family, dims: ModelDims, sizes: list, circuit: Circuit) -> list:
    """Record the circuit and per-layer sizes in ``model.config`` and adopt the global sizes that stay true;
    returns the final config's :func:`hf_layout_mismatches` (each meta-device build made once)."""
    config = model.config
    ff_name = "n_inner" if hasattr(config, "n_inner") else "intermediate_size"
    if not hasattr(config, "nodeprune_base_sizes"):  # materializing a materialized model keeps the first base
        config.nodeprune_base_sizes = {name: getattr(config, name) for name in
                                       (ff_name, "num_attention_heads", "num_key_value_heads")
                                       if hasattr(config, name)}
    config.nodeprune_circuit = circuit.to_dict()
    config.nodeprune_layers = sizes

    d_ffs = {s["intermediate_size"] for s in sizes}
    if len(d_ffs) == 1 and hasattr(config, ff_name):
        setattr(config, ff_name, d_ffs.pop())

    mismatched = _layout_mismatches(model, config)
    heads = {(s["num_attention_heads"], s["num_key_value_heads"]) for s in sizes}
    if len(heads) == 1:  # adopt the uniform head counts where a model built from the config then has these shapes
        h, kv = heads.pop()
        trial = copy.copy(config)
        trial.num_attention_heads = h
        if hasattr(config, "num_key_value_heads"):
            trial.num_key_value_heads = kv
        if getattr(config, "head_dim", None) is None:  # the head size is otherwise hidden_size // heads
            trial.head_dim = dims.head_dim
        with_trial = _layout_mismatches(model, trial)
        if set(with_trial) < set(mismatched):
            for name in ("num_attention_heads", "num_key_value_heads", "head_dim"):
                if hasattr(trial, name):
                    setattr(config, name, getattr(trial, name))
            mismatched = with_trial

    if family.qkv == "phi3":  # Phi-3's attention forward reads config.num_attention_heads
        for layer, s in zip(family.decoder_layers(model), sizes):
            attn = family.attention(layer)
            if attn.config.num_attention_heads != s["num_attention_heads"]:
                attn.config = copy.copy(attn.config)
                attn.config.num_attention_heads = s["num_attention_heads"]
                attn.config.num_key_value_heads = s["num_key_value_heads"]
    return mismatched


def hf_layout_mismatches(model: nn.Module) -> list:
    """The state-dict entries of ``model`` whose shapes differ from those of a model of the same class built
    from ``model.config`` (on the meta device, nothing allocated): empty when ``from_pretrained`` can rebuild
    it."""
    return _layout_mismatches(model, model.config)


def _layout_mismatches(model: nn.Module, config) -> list:
    names = list(model.state_dict())
    try:
        with torch.device("meta"), warnings.catch_warnings():
            warnings.simplefilter("ignore")
            skeleton = type(model)(copy.deepcopy(config))
    except Exception:  # a config the class refuses (e.g. sizes that do not divide) describes nothing
        return names
    expected = {k: tuple(v.shape) for k, v in skeleton.state_dict().items()}
    return [k for k, v in model.state_dict().items() if expected.get(k) != tuple(v.shape)]


def _refuse_save_pretrained(model: nn.Module, mismatched: list) -> None:
    """Shadow ``model.save_pretrained`` (on this instance only) with an error: its config cannot describe
    its per-layer shapes, so ``from_pretrained`` would fail on (or silently re-initialise) the saved files."""
    message = (f"this materialized model has per-layer sizes that its config cannot describe ({len(mismatched)} "
               f"weights differ from what from_pretrained would build, e.g. {mismatched[0]}); save it with "
               "nodeprune_kernels.save_pruned(model, directory) and load it with "
               "nodeprune_kernels.load_pruned(directory)")

    def save_pretrained(*args, **kwargs):
        raise ValueError(message)

    model.save_pretrained = save_pretrained

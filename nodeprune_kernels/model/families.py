"""Where the gated sites live in each supported Hugging Face model family.

A :class:`Family` names, for one architecture, the decoder layers, the attention output projection and
the MLP's projections, so that the patching code (``patch.py``) and ``materialize`` never hard-code a model.
The registry is keyed by ``config.model_type``. Adding a family is adding one entry here (and a tiny config
to the family tests).
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from ..ops.masked_mlp import canonical_activation


QK_NORMS = (None, "per_head", "spans_heads")


@dataclass(frozen=True)
class Family:
    """The module layout of one model family.

    ``layers``: dotted path from the causal LM to the ModuleList of decoder layers. Inside a layer:
    ``attn`` the attention module, ``o_proj`` its output projection (the attention's child), ``mlp`` the MLP
    module, and in the MLP ``up`` / ``gate`` / ``down`` the projections (``gate`` None for a non-gated MLP;
    with ``fused_gate_up`` the ``up`` projection holds [gate; up] stacked on its output dimension, Phi-3).
    ``weight_layout`` is "out_in" (nn.Linear) or "in_out" (GPT-2 Conv1D). ``qkv`` says how the query, key
    and value projections are stored, for ``materialize``: "separate" (q_proj, k_proj, v_proj), "gpt2"
    (c_attn = [q; k; v] in Conv1D layout), "neox" (query_key_value, per head [q, k, v]) or "phi3"
    (qkv_proj = [q; k; v]). ``mlp_dropout``: an MLP child applied to the MLP's output, which the patched MLP
    applies after the masked op (GPT-2, GPT-J: "dropout"). ``parallel_residual``: attention and MLP read the
    same layer input (GPT-NeoX, Phi, GPT-J, Cohere); informational, since the gated sites are the same.

    ``qk_norm`` says how a normalisation of the queries and keys inside the attention depends on the heads,
    for ``materialize`` (gating is exact either way: a gate acts on the o_proj input, after the norms):

    - None: there is none, or it normalises each head's D features with one weight shared by all heads
      (Qwen3, Gemma-3, Phi's ``qk_layernorm``): removing a head leaves the other heads' queries and keys as
      they were.
    - "per_head": the attention's ``q_norm`` / ``k_norm`` normalise each head's D features with a weight of
      one row per head, [H, D] / [KV, D] (Cohere's ``use_qk_norm``): ``materialize`` keeps the kept heads'
      rows.
    - "spans_heads": ``q_norm`` / ``k_norm`` normalise the whole [H * D] / [KV * D] projection (OLMo-2's
      RMSNorm), so every head's queries and keys depend on all heads' values: no head can be removed without
      changing the others, and ``materialize`` keeps every head (closed ones with zeroed o_proj columns).
    """

    name: str
    model_types: tuple
    layers: str
    attn: str = "self_attn"
    o_proj: str = "o_proj"
    mlp: str = "mlp"
    up: str = "up_proj"
    gate: str | None = "gate_proj"
    down: str = "down_proj"
    fused_gate_up: bool = False
    weight_layout: str = "out_in"
    qkv: str = "separate"
    mlp_dropout: str | None = None
    parallel_residual: bool = False
    qk_norm: str | None = None

    def __post_init__(self):
        if self.qk_norm not in QK_NORMS:
            raise ValueError(f"Family {self.name!r}: qk_norm must be one of {QK_NORMS}, not {self.qk_norm!r}")

    def decoder_layers(self, model: nn.Module) -> nn.ModuleList:
        obj = model
        for part in self.layers.split("."):
            obj = getattr(obj, part)
        return obj

    def attention(self, layer: nn.Module) -> nn.Module:
        return getattr(layer, self.attn)

    def out_proj(self, layer: nn.Module) -> nn.Module:
        return getattr(self.attention(layer), self.o_proj)

    def mlp_module(self, layer: nn.Module) -> nn.Module:
        return getattr(layer, self.mlp)

    def mlp_weights(self, mlp: nn.Module) -> dict:
        """The keyword arguments of :func:`masked_mlp` that hold the MLP's weights and biases."""
        up, down = getattr(mlp, self.up), getattr(mlp, self.down)
        if self.fused_gate_up:
            gate_w, up_w = up.weight.chunk(2, dim=0)
            gate_b, up_b = up.bias.chunk(2, dim=0) if up.bias is not None else (None, None)
        else:
            gate = getattr(mlp, self.gate) if self.gate else None
            up_w, up_b = up.weight, up.bias
            gate_w, gate_b = (gate.weight, gate.bias) if gate is not None else (None, None)
        return dict(up_weight=up_w, down_weight=down.weight, gate_weight=gate_w, up_bias=up_b, gate_bias=gate_b,
                    down_bias=down.bias)

    def head_dim(self, attn: nn.Module, config) -> int:
        for name in ("head_dim", "head_size"):
            d = getattr(attn, name, None)
            if isinstance(d, int):
                return d
        return config.hidden_size // config.num_attention_heads


def activation_of(config) -> str:
    """The MLP activation named by a config, in the masked ops' canonical spelling."""
    for name in ("hidden_activation", "hidden_act", "activation_function"):
        act = getattr(config, name, None)
        if isinstance(act, str):
            return canonical_activation(act)
    raise ValueError(f"{type(config).__name__} names no MLP activation (hidden_act / hidden_activation / "
                     "activation_function)")


_LLAMA_LIKE = dict(layers="model.layers")
FAMILIES = [
    Family("llama", ("llama",), **_LLAMA_LIKE),
    Family("mistral", ("mistral",), **_LLAMA_LIKE),
    Family("qwen2", ("qwen2",), **_LLAMA_LIKE),
    Family("qwen3", ("qwen3",), **_LLAMA_LIKE),
    Family("gemma", ("gemma", "gemma2", "gemma3_text"), **_LLAMA_LIKE),
    Family("phi3", ("phi3",), layers="model.layers", up="gate_up_proj", gate=None, fused_gate_up=True, qkv="phi3"),
    Family("gpt2", ("gpt2",), layers="transformer.h", attn="attn", o_proj="c_proj", up="c_fc", gate=None,
           down="c_proj", weight_layout="in_out", qkv="gpt2", mlp_dropout="dropout"),
    Family("gpt_neox", ("gpt_neox",), layers="gpt_neox.layers", attn="attention", o_proj="dense",
           up="dense_h_to_4h", gate=None, down="dense_4h_to_h", qkv="neox", parallel_residual=True),
    # OLMo-2 normalises the attention and MLP outputs before the residual add, which takes out their scale:
    # a layer / attn / mlp gate (all it does is scale a block) moves the output only through the norm's eps,
    # so those gates learn from the loss mostly when sampled near 0; closing them is exact all the same.
    Family("olmo2", ("olmo2",), qk_norm="spans_heads", **_LLAMA_LIKE),
    Family("phi", ("phi",), layers="model.layers", o_proj="dense", up="fc1", gate=None, down="fc2",
           parallel_residual=True),
    Family("gptj", ("gptj",), layers="transformer.h", attn="attn", o_proj="out_proj", up="fc_in", gate=None,
           down="fc_out", mlp_dropout="dropout", parallel_residual=True),
    Family("cohere", ("cohere",), parallel_residual=True, qk_norm="per_head", **_LLAMA_LIKE),
]
REGISTRY = {mt: fam for fam in FAMILIES for mt in fam.model_types}


def family_of(model: nn.Module) -> Family:
    """The Family of a loaded Hugging Face causal LM; a clear error for an unsupported one."""
    config = getattr(model, "config", None)
    model_type = getattr(config, "model_type", None)
    if model_type not in REGISTRY:
        raise NotImplementedError(
            f"node pruning does not support model_type {model_type!r} ({type(model).__name__}) yet. Supported: "
            f"{', '.join(sorted(REGISTRY))}. Adding a family is one entry in nodeprune_kernels/model/families.py; "
            "please open an issue with the model name.")
    return REGISTRY[model_type]


@dataclass(frozen=True)
class ModelDims:
    """The per-layer sizes the gates are laid out by (identical across layers)."""

    n_layers: int
    n_heads: int
    n_kv_heads: int
    head_dim: int
    d_model: int
    d_ff: int

    def to_dict(self) -> dict:
        return dict(self.__dict__)


def model_dims(model: nn.Module, family: Family) -> ModelDims:
    """Read the sizes from the model's modules (not only its config), checking every layer agrees."""
    config = model.config
    layers = family.decoder_layers(model)
    seen = set()
    for layer in layers:
        attn, o = family.attention(layer), family.out_proj(layer)
        w = o.weight
        k_in = w.shape[1] if family.weight_layout == "out_in" else w.shape[0]
        d_model = w.shape[0] if family.weight_layout == "out_in" else w.shape[1]
        D = family.head_dim(attn, config)
        weights = family.mlp_weights(family.mlp_module(layer))
        dw = weights["down_weight"]
        d_ff = dw.shape[1] if family.weight_layout == "out_in" else dw.shape[0]
        seen.add((k_in // D, D, d_model, d_ff))
    if len(seen) != 1:
        raise ValueError(f"the layers of this {config.model_type} model differ in size ({sorted(seen)}); node "
                         "pruning lays gates out as [layers, ...] and needs identical layers")
    H, D, d_model, d_ff = seen.pop()
    n_kv = getattr(config, "num_key_value_heads", None) or H
    return ModelDims(n_layers=len(layers), n_heads=H, n_kv_heads=n_kv, head_dim=D, d_model=d_model, d_ff=d_ff)


def first_param(model: nn.Module) -> torch.Tensor:
    return next(model.parameters())

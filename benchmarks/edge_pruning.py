"""Edge pruning (Bhaskar et al. 2024, "Finding Transformer Circuits with Edge Pruning") as a plain-PyTorch baseline.

It lives in ``benchmarks/`` only so that its memory and step time can be measured next to node pruning; it is
not part of the package. It runs the frozen weights of a Hugging Face ``GPT2LMHeadModel`` or
``LlamaForCausalLM`` (read, never copied or modified) over a *disentangled residual stream*:

* Writers, in order: the embedding (token + position for GPT-2, token for Llama), then per layer every
  attention head (its output times its slice of the output projection, W_o[:, h*D:(h+1)*D]^T; the
  output-projection bias, if any, is folded in split evenly, b_o / H per head, as the authors' code does), then
  the MLP block. The stream is one tensor ``[w, B, S, d_model]``, a slice per writer, grown layer by layer
  by concatenating the new writers.
* Readers, in order: per layer the q input of every head, the k and v inputs of every key/value head
  (grouped-query attention), the MLP input; then the final read (final norm + LM head). Each reader gets
  ``sum_w z[w, r] * clean_w`` (+ ``(1 - z[w, r]) * corrupt_w`` under interchange ablation) over the writers
  before it, and applies the layer's norm to its own input; one SDPA call per layer runs all heads at once.
* Gates: one hard-concrete ``log_alpha`` per (writer, reader) pair in a float32 ``[n_writers, n_readers]``
  parameter; pairs that are not edges (the writer is not before the reader) are masked to 0, so they get
  exactly zero gradient.

Memory, and why: every reader input is a learned mixture of all earlier writers, so backward needs every
writer separately rather than their sum. Each layer's einsums save the stream as it was (``w_l`` writers for
the attention readers, ``w_l + H`` for the MLP reader; ``w_l = 1 + l (H + 1)``) and the norms save one input
per reader (``H + 2 KV`` per layer), so the saved bytes per token grow as ``~ L^2 H d`` where an ordinary
forward saves a few vectors of d_model per layer for its residual stream. GPT-2 small, float32, measured with
``SavedTensorBytes``: the stream terms are 2041 vectors of d_model per token, the norm inputs 445, and the
whole forward saves ~2730 (8.4 MB per token) under zero ablation; interchange adds the corrupted stream
``[W, B, S, d]`` (157 more, ~8.9 MB per token), saved once since the closed edges' gradient needs it. The
authors' code keeps a fixed-size ``[W, B, S, d]`` stream updated by addition each layer, so it saves a
full-size stream where this one saves only the ``w_l`` writers that exist so far (about half as much).

Other differences from the authors' code: the embedding is one writer (their GPT-2 code has it ungated by
default or as two writers, token and position, with ``with_embedding_nodes``; their Llama code has one); no
node (writer) masks, which in their code save each layer's head and MLP writes once more (H + 1 vectors per
layer, ~156 per token for GPT-2 small, ~6%); the deterministic gate is
``clamp(sigmoid(a) (zeta - gamma) + gamma, 0, 1)`` rather than their top-k rounding of the expected count.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

BETA, GAMMA, ZETA, EPS = 2.0 / 3.0, -0.1, 1.1, 1e-6
SUPPORTED = "transformers.GPT2LMHeadModel or transformers.LlamaForCausalLM"


def _family(model, config_ok: bool = False) -> str:
    """"gpt2" or "llama" for a supported model (or, with ``config_ok``, its config); ValueError otherwise."""
    import transformers as tf

    if isinstance(model, tf.GPT2LMHeadModel):
        return "gpt2"
    if isinstance(model, tf.LlamaForCausalLM):
        return "llama"
    if config_ok and isinstance(model, tf.PretrainedConfig) and model.model_type in ("gpt2", "llama"):
        return model.model_type
    raise ValueError(f"edge pruning supports {SUPPORTED}{' or their configs' if config_ok else ''}, "
                     f"not {type(model).__name__}")


def _sizes(config, family: str):
    """(layers, query heads, key/value heads, d_model, head_dim)."""
    L, H, d = config.num_hidden_layers, config.num_attention_heads, config.hidden_size
    kv = H if family == "gpt2" else (getattr(config, "num_key_value_heads", None) or H)
    return L, H, kv, d, getattr(config, "head_dim", None) or d // H


def _edge_mask(L: int, H: int, KV: int) -> torch.Tensor:
    """Bool ``[W, R]``: True where writer w comes before reader r. W = 1 + L (H + 1), R = L (H + 2 KV + 1) + 1."""
    mask = torch.zeros(1 + L * (H + 1), L * (H + 2 * KV + 1) + 1, dtype=torch.bool)
    for layer in range(L):
        w, r = 1 + layer * (H + 1), layer * (H + 2 * KV + 1)
        mask[:w, r:r + H + 2 * KV] = True  # q, k, v readers see the writers of earlier layers
        mask[:w + H, r + H + 2 * KV] = True  # the MLP reader also sees this layer's heads
    mask[:, -1] = True  # the final read sees every writer
    return mask


def edge_counts(model) -> dict:
    """``{"writers", "readers", "edges"}`` of a GPT-2 or Llama model or config, without building the stream.

    GPT-2 small (12 layers, 12 heads): 157 writers, 445 readers, 32491 edges. For comparison, the authors'
    ``get_num_*`` in ``modeling_fpt2.py`` give 156 writers and 32046 edges by default (embeddings added to
    every reader ungated, not a writer) and 158 writers and 32936 edges with ``with_embedding_nodes`` (token
    and position embeddings as two writers); the readers are 445 in every variant.
    """
    config = getattr(model, "config", model)
    L, H, KV, _, _ = _sizes(config, _family(model, config_ok=True))
    mask = _edge_mask(L, H, KV)
    return {"writers": mask.shape[0], "readers": mask.shape[1], "edges": int(mask.sum())}


def hard_concrete(log_alpha: torch.Tensor, u: torch.Tensor | None = None) -> torch.Tensor:
    """Hard-concrete gate (Louizos et al.): sampled with noise ``u`` in (0, 1), deterministic when ``u`` is None."""
    if u is None:
        s = torch.sigmoid(log_alpha)
    else:
        s = torch.sigmoid((torch.log(u) - torch.log(1 - u) + log_alpha) / BETA)
    return (s * (ZETA - GAMMA) + GAMMA).clamp(0.0, 1.0)


class EdgePruning(torch.nn.Module):
    """Edge pruning over a frozen GPT-2 or Llama causal LM, on a disentangled residual stream.

    ``forward(input_ids [B, S]) -> logits [B, S, vocab]``. The stream is ``[w, B, S, d_model]`` (writers
    first); the gates ``z = gates()`` are ``[n_writers, n_readers]``, sampled in training mode and deterministic
    in eval mode, zero off the edges. Writer order: embedding, then per layer heads 0..H-1 and the MLP. Reader
    order: per layer q of heads 0..H-1, k then v of key/value heads 0..KV-1, the MLP; then the final read.
    GPT-2 small: 157 writers, 445 readers (37 per layer + 1), 32491 edges (see ``edge_counts``).

    The model is kept as a plain attribute, not a submodule: ``log_alpha`` is this module's only parameter, and
    ``.to()`` on this module does not move the model. Interchange ablation needs ``set_corrupted(ids)`` first,
    with ids of the same shape as the clean ones.
    """

    def __init__(self, model, ablation: str = "zero", init_log_alpha: float = 3.0):
        super().__init__()
        self.family = _family(model)
        if ablation not in ("zero", "interchange"):
            raise ValueError(f"ablation must be 'zero' or 'interchange', not {ablation!r}")
        self.ablation = ablation
        object.__setattr__(self, "model", model)  # not registered: its weights are not ours to train
        self.n_layers, self.n_heads, self.n_kv, self.d_model, self.head_dim = _sizes(model.config, self.family)
        mask = _edge_mask(self.n_layers, self.n_heads, self.n_kv)
        self.n_writers, self.n_readers = mask.shape
        self.n_edges = int(mask.sum())
        device = next(model.parameters()).device
        self.register_buffer("edge_mask", mask.to(device), persistent=False)
        self.log_alpha = torch.nn.Parameter(torch.full(mask.shape, float(init_log_alpha), device=device))
        self._corrupted = None

    def gates(self) -> torch.Tensor:
        """z ``[n_writers, n_readers]`` float32: sampled (torch's RNG) in training mode, else deterministic."""
        u = torch.empty_like(self.log_alpha).uniform_(EPS, 1 - EPS) if self.training else None
        return hard_concrete(self.log_alpha, u) * self.edge_mask

    @torch.no_grad()
    def set_corrupted(self, input_ids: torch.Tensor) -> None:
        """Run ``input_ids`` with every edge open and keep its writer stream ``[W, B, S, d]`` for interchange."""
        _, self._corrupted = self._run(input_ids, self.edge_mask.float(), None)

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        corrupted = None
        if self.ablation == "interchange":
            corrupted = self._corrupted
            if corrupted is None or tuple(corrupted.shape[1:3]) != tuple(input_ids.shape):
                raise RuntimeError("interchange ablation: call set_corrupted(ids) with ids of this shape first")
        return self._run(input_ids, self.gates(), corrupted)[0]

    # -- the disentangled forward ---------------------------------------------------------------------------

    def _run(self, input_ids, z, corrupted):
        """(logits, stream [W, B, S, d]) with gates ``z`` and, under interchange, the corrupted stream."""
        m, L, H, KV = self.model, self.n_layers, self.n_heads, self.n_kv
        pos = torch.arange(input_ids.shape[1], device=input_ids.device)[None]
        if self.family == "gpt2":
            emb, rope = m.transformer.wte(input_ids) + m.transformer.wpe(pos), None
        else:
            emb = m.model.embed_tokens(input_ids)
            rope = m.model.rotary_emb(emb, pos)
        z = z.to(emb.dtype)

        def read(stream, zr):  # [w, B, S, d], [w, r] -> [r, B, S, d]
            x = torch.einsum("wbsd,wr->rbsd", stream, zr)
            if corrupted is not None:
                x = x + torch.einsum("wbsd,wr->rbsd", corrupted[:stream.shape[0]], 1 - zr)
            return x

        stream = emb[None]
        for layer in range(L):
            w, r = stream.shape[0], layer * (H + 2 * KV + 1)
            heads = self._attention(layer, read(stream, z[:w, r:r + H + 2 * KV]), rope)
            stream = torch.cat([stream, heads])
            mlp_out = self._mlp(layer, read(stream, z[:w + H, r + H + 2 * KV, None])[0])
            stream = torch.cat([stream, mlp_out[None]])
        x = read(stream, z[:, -1:])[0]
        final_norm = m.transformer.ln_f if self.family == "gpt2" else m.model.norm
        return m.lm_head(final_norm(x)), stream

    def _attention(self, layer, x, rope):
        """Per-reader inputs ``[H + 2 KV, B, S, d]`` -> the heads' writes ``[H, B, S, d]``."""
        H, KV, D, d = self.n_heads, self.n_kv, self.head_dim, self.d_model
        if self.family == "gpt2":
            block = self.model.transformer.h[layer]
            n, att = block.ln_1(x), block.attn
            w = att.c_attn.weight.view(d, 3, H, D)  # Conv1D: [in, out], out = (q | k | v) x heads
            b = att.c_attn.bias.view(3, 1, H, 1, D)
            q, k, v = (torch.einsum("hbsd,dhe->bhse", n[i * H:(i + 1) * H], w[:, i]) + b[i] for i in range(3))
            scale = D ** -0.5 if att.scale_attn_weights else 1.0
            if att.scale_attn_by_inverse_layer_idx:
                scale /= float(layer + 1)
            wo, bo = att.c_proj.weight.view(H, D, d), att.c_proj.bias
            o_eq = "bhse,hed->hbsd"
        else:
            from transformers.models.llama.modeling_llama import apply_rotary_pos_emb

            dec = self.model.model.layers[layer]
            n, att = dec.input_layernorm(x), dec.self_attn
            parts = ((att.q_proj, n[:H], H), (att.k_proj, n[H:H + KV], KV), (att.v_proj, n[H + KV:], KV))
            q, k, v = (self._head_proj(p, xi, nh) for p, xi, nh in parts)
            q, k = apply_rotary_pos_emb(q, k, *rope)
            scale = att.scaling
            wo, bo = att.o_proj.weight.view(d, H, D), att.o_proj.bias  # nn.Linear: [out, in]
            o_eq = "bhse,dhe->hbsd"
        o = F.scaled_dot_product_attention(q, k, v, is_causal=True, scale=scale, enable_gqa=KV != H)
        heads = torch.einsum(o_eq, o, wo)  # head h's slice of the output projection
        return heads if bo is None else heads + bo / H

    def _head_proj(self, linear, x, nh):
        """nn.Linear ``[nh * D, d]`` applied per head to its own input ``[nh, B, S, d]`` -> ``[B, nh, S, D]``."""
        y = torch.einsum("hbsd,hed->bhse", x, linear.weight.view(nh, self.head_dim, self.d_model))
        return y if linear.bias is None else y + linear.bias.view(1, nh, 1, self.head_dim)

    def _mlp(self, layer, x):
        """The MLP reader's input ``[B, S, d]`` -> the MLP's write ``[B, S, d]`` (dropout never applied)."""
        if self.family == "gpt2":
            block = self.model.transformer.h[layer]
            mlp = block.mlp
            return mlp.c_proj(mlp.act(mlp.c_fc(block.ln_2(x))))
        dec = self.model.model.layers[layer]
        mlp, n = dec.mlp, dec.post_attention_layernorm(x)
        return mlp.down_proj(mlp.act_fn(mlp.gate_proj(n)) * mlp.up_proj(n))

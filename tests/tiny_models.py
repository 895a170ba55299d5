"""Tiny randomly initialised causal LMs of every supported family, built from configs (no hub access)."""
from __future__ import annotations

import inspect

import torch
import transformers as tf

COMMON = dict(vocab_size=61, hidden_size=32, intermediate_size=40, num_hidden_layers=2, num_attention_heads=4,
              max_position_embeddings=64, bos_token_id=1, eos_token_id=2)

# family -> (config class, causal LM class, config kwargs). GQA (2 key/value heads for 4 query heads) where
# the family has it; Gemma-2 runs eager attention (its logit soft-capping is not an SDPA feature).
TINY = {
    "llama": ("LlamaConfig", "LlamaForCausalLM", dict(num_key_value_heads=2, mlp_bias=True, attention_bias=True)),
    "mistral": ("MistralConfig", "MistralForCausalLM", dict(num_key_value_heads=2, sliding_window=4)),
    "qwen2": ("Qwen2Config", "Qwen2ForCausalLM", dict(num_key_value_heads=2)),
    "qwen3": ("Qwen3Config", "Qwen3ForCausalLM", dict(num_key_value_heads=2, head_dim=8)),
    "gemma2": ("Gemma2Config", "Gemma2ForCausalLM", dict(num_key_value_heads=2, head_dim=8,
                                                         attn_implementation="eager")),
    "gemma3_text": ("Gemma3TextConfig", "Gemma3ForCausalLM", dict(num_key_value_heads=2, head_dim=8,
                                                                  sliding_window=4)),
    "phi3": ("Phi3Config", "Phi3ForCausalLM", dict(num_key_value_heads=2, pad_token_id=0)),
    "gpt2": ("GPT2Config", "GPT2LMHeadModel", dict(n_embd=32, n_layer=2, n_head=4, n_positions=64, n_inner=40,
                                                   resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0)),
    "gpt_neox": ("GPTNeoXConfig", "GPTNeoXForCausalLM", dict(rotary_pct=0.5, use_parallel_residual=True,
                                                             hidden_act="gelu", attention_bias=True)),
    # OLMo-2: q/k RMSNorms over all heads' features, norms after the attention and the MLP
    "olmo2": ("Olmo2Config", "Olmo2ForCausalLM", dict(num_key_value_heads=2)),
    # Phi-2: parallel attention and MLP on one LayerNorm, half the head dims rotary, per-head q/k LayerNorms
    "phi": ("PhiConfig", "PhiForCausalLM", dict(num_key_value_heads=2, partial_rotary_factor=0.5,
                                                qk_layernorm=True, resid_pdrop=0.0, embd_pdrop=0.0)),
    # GPT-J: parallel residual, rotary on 4 of each head's 8 dims, no GQA
    "gptj": ("GPTJConfig", "GPTJForCausalLM", dict(n_inner=40, rotary_dim=4, resid_pdrop=0.0, embd_pdrop=0.0,
                                                   attn_pdrop=0.0)),
    # Cohere / Command-R: parallel residual, bias-free LayerNorms, q/k LayerNorms with per-head weights,
    # scaled logits
    "cohere": ("CohereConfig", "CohereForCausalLM", dict(num_key_value_heads=2, use_qk_norm=True,
                                                         logit_scale=0.5)),
}
FAMILY_NAMES = tuple(TINY)

# A size of the model -> the keywords config classes spell it with (the first one a family's config takes is used).
SIZE_KEYWORDS = {"layers": ("num_hidden_layers", "n_layer"), "heads": ("num_attention_heads", "n_head"),
                 "kv_heads": ("num_key_value_heads",), "head_dim": ("head_dim",),
                 "hidden": ("hidden_size", "n_embd"), "intermediate": ("intermediate_size", "n_inner")}


def size_keywords(family: str) -> dict:
    """{size: the keyword that sets it} for the sizes of SIZE_KEYWORDS that ``family``'s config class takes
    (a family without "kv_heads" has no grouped-query attention; one without "head_dim" has
    head_dim = hidden // heads)."""
    params = inspect.signature(getattr(tf, TINY[family][0]).__init__).parameters
    return {size: next(k for k in names if k in params) for size, names in SIZE_KEYWORDS.items()
            if any(k in params for k in names)}


def _with_sizes(family: str, kwargs: dict, sizes: dict) -> dict:
    """The config kwargs with the given sizes (keys of SIZE_KEYWORDS) replacing every spelling of them."""
    if not sizes:
        return kwargs
    keywords = size_keywords(family)
    if set(sizes) - set(keywords):
        raise ValueError(f"the {family} config takes the sizes {sorted(keywords)}, not "
                         f"{sorted(set(sizes) - set(keywords))}")
    spellings = {k for size in sizes for k in SIZE_KEYWORDS[size]}
    out = {k: v for k, v in kwargs.items() if k not in spellings}
    return dict(out, **{keywords[size]: v for size, v in sizes.items()})


def tiny_model(family: str, dtype=torch.float32, seed: int = 0, device="cpu", **sizes):
    """A 2-layer model of ``family`` with random weights of a useful scale (biases and norms too).

    ``sizes``: other sizes (layers, heads, kv_heads, head_dim, hidden, intermediate; those of
    :func:`size_keywords`), replacing the defaults (2, 4, 2 or 4, 8, 32, 40)."""
    cfg_name, model_name, extra = TINY[family]
    kwargs = dict(COMMON, **extra)
    if family == "gpt2":
        kwargs = {k: v for k, v in kwargs.items() if k not in ("hidden_size", "num_hidden_layers",
                                                                "num_attention_heads", "intermediate_size",
                                                                "max_position_embeddings")}
    if family == "gptj":  # its MLP width is n_inner
        kwargs.pop("intermediate_size")
    kwargs = _with_sizes(family, kwargs, sizes)
    attn = kwargs.pop("attn_implementation", "sdpa")
    config = getattr(tf, cfg_name)(**kwargs)
    config._attn_implementation = attn
    torch.manual_seed(seed)
    model = getattr(tf, model_name)(config)
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            noise = torch.randn(p.shape, generator=g)
            if "norm" in name or ".ln_" in name or "layernorm" in name:
                p.copy_(1.0 + 0.1 * noise if "gemma" not in family else 0.1 * noise)
            else:
                p.copy_(0.2 * noise)
    return model.to(device=device, dtype=dtype).eval()


def tiny_batch(vocab=61, batch=2, seq=7, seed=1, device="cpu"):
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, vocab, (batch, seq), generator=g).to(device)

"""The edge-pruning baseline of benchmarks/edge_pruning.py: exactness against the Hugging Face models, ablations,
gate gradients, edge counts, errors. Tiny models only (the whole file runs in seconds)."""
import os
import sys

import pytest
import torch
import torch.nn.functional as F
import transformers as tf

sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "benchmarks"))
from edge_pruning import EdgePruning, edge_counts  # noqa: E402
from tiny_models import tiny_batch, tiny_model  # noqa: E402

FAMILIES = ["gpt2", "llama", "llama_nobias"]  # tiny Llama: 4 query heads, 2 key/value heads
TOL = {torch.float32: dict(atol=1e-4, rtol=1e-4), torch.float64: dict(atol=1e-10, rtol=1e-10)}


def _model(family, dtype=torch.float64):
    if family == "llama_nobias":
        cfg = tf.LlamaConfig(vocab_size=61, hidden_size=32, intermediate_size=40, num_hidden_layers=2,
                             num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64)
        cfg._attn_implementation = "sdpa"
        torch.manual_seed(3)
        model = tf.LlamaForCausalLM(cfg).to(dtype).eval()
        with torch.no_grad():
            for p in model.parameters():
                p.add_(0.2 * torch.randn_like(p))  # the default init is too small to test anything
    else:
        model = tiny_model(family, dtype=dtype)
    model.requires_grad_(False)
    return model


def _ids(seed=1):
    return tiny_batch(seq=9, seed=seed)


def _lm(model, family):
    """(embedding of ids, final norm, decoder layers) of the HF model."""
    if family == "gpt2":
        t = model.transformer
        return (lambda ids: t.wte(ids) + t.wpe(torch.arange(ids.shape[1])[None])), t.ln_f, t.h
    return model.model.embed_tokens, model.model.norm, model.model.layers


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=["f32", "f64"])
@pytest.mark.parametrize("family", FAMILIES)
def test_all_edges_open_is_the_model(family, dtype):
    model = _model(family, dtype)
    ep = EdgePruning(model).eval()  # init_log_alpha 3: the deterministic gate is exactly 1
    assert torch.equal(ep.gates(), ep.edge_mask.float())
    ids = _ids()
    torch.testing.assert_close(ep(ids), model(ids).logits, **TOL[dtype])
    assert [n for n, _ in ep.named_parameters()] == ["log_alpha"]


@pytest.mark.parametrize("family", FAMILIES)
def test_all_edges_closed(family):
    model = _model(family)
    ids, corrupt = _ids(), _ids(seed=7)
    # interchange: every reader reads the corrupted stream, so the output is the corrupted input's logits
    ep = EdgePruning(model, "interchange", init_log_alpha=-10.0).eval()
    assert not ep.gates().any()
    ep.set_corrupted(corrupt)
    torch.testing.assert_close(ep(ids), model(corrupt).logits, **TOL[torch.float64])
    # zero: every reader reads 0, so the output is the final norm + LM head of a zero vector at every position
    ep = EdgePruning(model, "zero", init_log_alpha=-10.0).eval()
    _, final_norm, _ = _lm(model, family)
    zero = torch.zeros(*ids.shape, model.config.hidden_size, dtype=torch.float64)
    torch.testing.assert_close(ep(ids), model.lm_head(final_norm(zero)), **TOL[torch.float64])


@pytest.mark.parametrize("family", FAMILIES)
def test_one_closed_edge_by_hand(family):
    """Close the edge (layer-0 MLP -> layer-1 k input of key/value head 1) under interchange and redo it by
    hand with hooks on the HF model: that head's key is computed from its input with the clean MLP-0 output
    replaced by the corrupted one; everything else is the clean run."""
    model = _model(family)
    emb, _, layers = _lm(model, family)
    H, KV, d = 4, (4 if family == "gpt2" else 2), model.config.hidden_size
    D, j = d // H, 1
    ids, corrupt = _ids(), _ids(seed=7)
    ep = EdgePruning(model, "interchange").eval()
    writer, reader = 1 + H, (H + 2 * KV + 1) + H + j  # MLP of layer 0; k of kv-head j in layer 1
    assert ep.edge_mask[writer, reader] and not ep.edge_mask[writer + 1, reader]
    with torch.no_grad():
        ep.log_alpha[writer, reader] = -10.0
    ep.set_corrupted(corrupt)
    got = ep(ids)

    mlp0, seen = {}, {}
    h = layers[0].mlp.register_forward_hook(lambda m, i, o: mlp0.__setitem__("c", o))
    model(corrupt)
    h.remove()
    if family == "gpt2":
        norm, proj, lo = layers[1].ln_1, layers[1].attn.c_attn, d + j * D  # fused qkv, Conv1D [in, out]

        def key(x):
            return x @ proj.weight[:, lo:lo + D] + proj.bias[lo:lo + D]
    else:
        norm, proj, lo = layers[1].input_layernorm, layers[1].self_attn.k_proj, j * D

        def key(x):
            b = None if proj.bias is None else proj.bias[lo:lo + D]
            return F.linear(x, proj.weight[lo:lo + D], b)

    def patch(m, i, out):
        out = out.clone()
        out[..., lo:lo + D] = key(norm(seen["x"] - mlp0["clean"] + mlp0["c"]))
        return out

    hooks = [layers[0].mlp.register_forward_hook(lambda m, i, o: mlp0.__setitem__("clean", o)),
             norm.register_forward_pre_hook(lambda m, i: seen.__setitem__("x", i[0])),
             proj.register_forward_hook(patch)]
    want = model(ids).logits
    for h in hooks:
        h.remove()
    torch.testing.assert_close(got, want, **TOL[torch.float64])
    assert (got - model(ids).logits).abs().max() > 1e-3  # the edge mattered


@pytest.mark.parametrize("family", ["gpt2", "llama"])
def test_gate_gradients(family):
    model = _model(family, torch.float32)
    ids, corrupt = _ids(), _ids(seed=7)
    weights = torch.randn(*ids.shape, model.config.vocab_size, generator=torch.Generator().manual_seed(0))
    # eval, zero ablation, gates at 0.5: every real edge gets a gradient, the non-edges exactly none
    ep = EdgePruning(model, "zero", init_log_alpha=0.0).eval()
    (ep(ids) * weights).sum().backward()
    g, mask = ep.log_alpha.grad, ep.edge_mask
    assert (g[mask] != 0).all() and (g[~mask] == 0).all()
    # training, interchange: the same for the sampled gates, except those clamped at 0 or 1 (zero gradient).
    # The final read's gates are held at 1: a writer whose only edge (to the final read) samples 0 passes its
    # corrupted value, so no gradient would reach the edges into it, rightly.
    ep = EdgePruning(model, "interchange", init_log_alpha=0.0).train()
    with torch.no_grad():
        ep.log_alpha[:, -1] = 20.0
    ep.set_corrupted(corrupt)
    torch.manual_seed(11)
    (ep(ids) * weights).sum().backward()
    torch.manual_seed(11)
    z = ep.gates()  # the same draw as in the forward
    g, inside = ep.log_alpha.grad, (z > 0) & (z < 1)
    assert inside.sum() > ep.n_edges // 2 and not inside[~mask].any()
    assert (g[inside] != 0).all() and (g[~inside] == 0).all()
    assert all(p.grad is None for p in model.parameters())


def _closed_form(L, H, KV):
    writers = 1 + L * (H + 1)
    readers = L * (H + 2 * KV + 1) + 1
    edges = sum((H + 2 * KV) * (1 + l * (H + 1)) + (1 + l * (H + 1) + H) for l in range(L)) + writers
    return {"writers": writers, "readers": readers, "edges": edges}


def test_edge_counts():
    counts = edge_counts(tf.GPT2Config(n_layer=12, n_embd=768, n_head=12))
    print("GPT-2 small:", counts)
    # 157 writers (1 embedding + 12 x (12 heads + MLP)), 445 readers (12 x (3 x 12 + 1) + final), 32491 edges.
    # The authors' modeling_fpt2.get_num_* count 445 readers in every variant, but 156 writers / 32046 edges by
    # default (embeddings added ungated, not a writer) and 158 writers / 32936 edges with with_embedding_nodes
    # (token and position embeddings as two writers); here the embedding is one writer, as in their Llama code.
    assert counts == _closed_form(12, 12, 12) == {"writers": 157, "readers": 445, "edges": 32491}
    assert edge_counts(tf.LlamaConfig(num_hidden_layers=3, num_attention_heads=8, num_key_value_heads=2)) \
        == _closed_form(3, 8, 2)
    for family in FAMILIES:
        model = _model(family, torch.float32)
        ep = EdgePruning(model)
        kv = 4 if family == "gpt2" else 2
        assert edge_counts(model) == _closed_form(2, 4, kv) == {
            "writers": ep.n_writers, "readers": ep.n_readers, "edges": ep.n_edges}
        assert ep.n_edges == int(ep.edge_mask.sum()) and ep.log_alpha.dtype == torch.float32


def test_errors():
    gpt2 = _model("gpt2", torch.float32)
    with pytest.raises(ValueError, match="GPT2LMHeadModel or transformers.LlamaForCausalLM"):
        EdgePruning(gpt2.transformer)  # a GPT2Model, not the LM
    with pytest.raises(ValueError, match="LlamaForCausalLM"):
        edge_counts(tf.BertConfig())
    with pytest.raises(ValueError, match="'zero' or 'interchange'"):
        EdgePruning(gpt2, ablation="mean")
    ep = EdgePruning(gpt2, "interchange")
    with pytest.raises(RuntimeError, match="set_corrupted"):
        ep(_ids())
    ep.set_corrupted(_ids(seed=7)[:, :5])
    with pytest.raises(RuntimeError, match="set_corrupted"):
        ep(_ids())

"""materialize: a physically smaller copy of a model whose logits are the circuit's (zero ablation)."""
import dataclasses

import pytest
import torch
from tiny_models import FAMILY_NAMES, tiny_batch, tiny_model

from nodeprune_kernels import Circuit, NodeMasks, apply_node_pruning, materialize, remove_node_pruning
from nodeprune_kernels.model import is_patched
from nodeprune_kernels.model.families import family_of
from nodeprune_kernels.model.materialize import count_parameters

CLOSED, OPEN = -30.0, 30.0
CASES = ("partial", "blocks", "layer")
# tiny models: L=2, H=4 heads of D=8 (2 kv heads for the GQA families), d_model=32, d_ff=40
D, H, D_MODEL, D_FF = 8, 4, 32, 40


def close(masks, case):
    """Set every log_alpha open, then close the nodes of ``case``."""
    la = masks.log_alpha
    with torch.no_grad():
        for p in la.values():
            p.fill_(OPEN)
        if case == "partial":
            la["head"][0, 1] = CLOSED  # GQA: its kv group keeps head 0 open, so head 1 stays as a zeroed filler
            la["head"][1, [2, 3]] = CLOSED  # one whole kv group of layer 1 (kv head 1 goes with GQA)
            la["attn_neuron"][0, [3, 17]] = CLOSED
            la["attn_neuron"][1, 5] = CLOSED
            la["mlp_neuron"][0, [0, 7, 39]] = CLOSED
            la["mlp_neuron"][1, [1, 2, 3, 20]] = CLOSED
            la["mlp_out"][0, 4] = CLOSED
            la["mlp_out"][1, [10, 31]] = CLOSED
        elif case == "blocks":
            la["attn"][0] = CLOSED
            la["mlp"][1] = CLOSED
            la["mlp_out"][0, 0] = CLOSED
        elif case == "layer":
            la["layer"][1] = CLOSED
            la["head"][0, :] = CLOSED  # every head closed: layer 0's attention block is closed by implication
            la["mlp_neuron"][0, 5:] = CLOSED


def patched(family, case, **kwargs):
    model = tiny_model(family)
    masks = apply_node_pruning(model, backend="reference", **kwargs)
    close(masks, case)
    return model, masks.eval()


def logits(model, ids, masks=None, circuit=None):
    with torch.no_grad():
        if circuit is not None:
            with masks.use_circuit(circuit):
                return model(ids).logits
        if masks is not None:
            with masks.all_open():
                return model(ids).logits
        return model(ids).logits


def assert_logits_close(out, ref):
    assert out.shape == ref.shape
    err = (out - ref).abs().max().item()
    assert err <= 1e-5 * ref.abs().max().item(), f"max abs error {err:.3g} (logit scale {ref.abs().max():.3g})"


@pytest.mark.parametrize("case", CASES)
@pytest.mark.parametrize("family", FAMILY_NAMES)
def test_materialized_logits_equal_the_circuit(family, case, monkeypatch):
    model, masks = patched(family, case)
    ids = tiny_batch()
    circuit = masks.circuit()
    ref = logits(model, ids, masks, circuit)
    full = logits(model, ids, masks)
    assert (ref - full).abs().max() > 1e-2 * ref.abs().max()  # the circuit is not the whole model
    before = {k: v.clone() for k, v in model.state_dict().items()}

    monkeypatch.setattr(NodeMasks, "__deepcopy__", lambda self, memo: pytest.fail("the gates were copied"),
                        raising=False)
    small = materialize(model, circuit, verbose=False)
    monkeypatch.undo()
    assert_logits_close(logits(small, ids), ref)

    new, old = small.nodeprune_params
    assert new == count_parameters(small) and old == count_parameters(model) and new < old
    assert small.config.nodeprune_circuit == circuit.to_dict()
    assert type(small) is type(model)

    # the input model: same weights, still patched and gated, its gates untouched
    after = model.state_dict()
    assert before.keys() == after.keys() and all(torch.equal(before[k], after[k]) for k in before)
    assert is_patched(model)
    assert torch.equal(logits(model, ids, masks, circuit), ref)
    assert torch.equal(logits(model, ids, masks), full)

    # the copy: plain HF modules, no gates, its own storage
    assert not is_patched(small)
    assert not [n for n, m in small.named_modules() if "forward" in m.__dict__]
    assert all(p.requires_grad for p in small.parameters())  # the original flags, not the patch's freeze
    model_ptrs = {p.data_ptr() for p in model.parameters()}
    assert not [n for n, p in small.named_parameters() if p.data_ptr() in model_ptrs]
    masks.train()
    step = masks.step
    with torch.no_grad():
        small(ids)
    assert masks.step == step  # the gate-sample hook stayed with the patched model


# Parameters removed, by hand. Per removed query head: its D q rows (+bias) and D o_proj input columns; per
# removed kv head: D k rows and D v rows (+bias); per removed hidden unit: its gate and up rows (+bias) and its
# down column. The down / o_proj biases stay. "partial" removes query head 1 of layer 0 only without GQA (with
# GQA it stays as a filler), query heads 2, 3 and kv head 1 of layer 1, and 3 + 4 hidden units. Cohere's
# per-head q/k norms lose D weights per removed head; OLMo-2 (q/k norms over all heads) removes no head.
def _removed(family, case):
    attn_bias = family in ("llama", "gpt2", "gpt_neox", "phi")  # the tiny llama has attention_bias and mlp_bias
    mlp_bias = family in ("llama", "gpt2", "gpt_neox", "phi", "gptj")
    gated = family not in ("gpt2", "gpt_neox", "phi", "gptj")  # gate + up rows per unit (Phi-3's fused gate_up too)
    row = D_MODEL + attn_bias  # one q/k/v output row
    norm = D if family == "cohere" else 0  # a head's row of q_norm / k_norm
    q_head = D * row + D * D_MODEL + norm  # q rows + o_proj columns
    kv_head = 2 * D * row + norm
    unit = (2 if gated else 1) * (D_MODEL + mlp_bias) + D_MODEL
    gqa = family not in ("gpt2", "gpt_neox", "gptj")
    if family == "olmo2":
        q_head = kv_head = 0
    if case == "partial":
        heads = 2 * q_head + kv_head if gqa else 3 * (q_head + kv_head)
        return heads + 7 * unit
    if case == "blocks":  # layer 0's attention keeps one head (and one kv head); layer 1's MLP has no units
        heads = 3 * q_head + kv_head if gqa else 3 * (q_head + kv_head)
        units = D_FF if family != "gpt2" else D_FF - 1  # GPT-2's Conv1D keeps one zeroed unit
        return heads + units * unit
    raise ValueError(case)


@pytest.mark.parametrize("case", ["partial", "blocks"])
@pytest.mark.parametrize("family", ["llama", "phi3", "gpt2", "gpt_neox", "olmo2", "phi", "gptj", "cohere"])
def test_parameter_count_by_hand(family, case):
    model, masks = patched(family, case)
    small = materialize(model, masks.circuit(), verbose=False)
    new, old = small.nodeprune_params
    assert old - new == _removed(family, case)
    if (family, case) == ("llama", "partial"):
        assert (new, old) == (16050, 18304)


def test_llama_structure():
    model, masks = patched("llama", "partial")
    small = materialize(model, masks.circuit(), verbose=False)
    fam = family_of(small)
    (l0, l1) = fam.decoder_layers(small)
    a0, a1 = l0.self_attn, l1.self_attn
    # layer 0: 4 query heads (head 1 closed but kept as its group's filler), its o_proj columns zeroed
    assert (a0.q_proj.out_features, a0.k_proj.out_features, a0.o_proj.in_features) == (32, 16, 32)
    assert a0.num_key_value_groups == 2
    w0 = a0.o_proj.weight
    assert torch.all(w0[:, 8:16] == 0) and torch.all(w0[:, [3, 17]] == 0)
    assert torch.count_nonzero(w0.abs().sum(0)) == 32 - 8 - 2
    # layer 1: query heads 0, 1 and kv head 0
    assert (a1.q_proj.out_features, a1.k_proj.out_features, a1.v_proj.out_features) == (16, 8, 8)
    assert (a1.o_proj.in_features, a1.num_key_value_groups) == (16, 2)
    orig = fam.decoder_layers(model)[1].self_attn
    assert torch.equal(a1.q_proj.weight, orig.q_proj.weight[:16]) and torch.equal(a1.k_proj.bias, orig.k_proj.bias[:8])
    assert torch.equal(a1.o_proj.bias, orig.o_proj.bias)
    # MLP: 37 and 36 units; closed mlp_out rows zeroed, the down bias kept
    m0, m1 = l0.mlp, l1.mlp
    assert (m0.up_proj.out_features, m0.gate_proj.out_features, m0.down_proj.in_features) == (37, 37, 37)
    assert (m1.down_proj.in_features, m1.intermediate_size) == (36, 36)
    assert torch.all(m1.down_proj.weight[[10, 31]] == 0) and torch.all(m1.down_proj.bias[[10, 31]] != 0)
    # the layers differ, so the global sizes stay the original model's; the per-layer ones are recorded
    assert (small.config.num_attention_heads, small.config.num_key_value_heads) == (4, 2)
    assert small.config.intermediate_size == 40
    assert small.config.nodeprune_layers == [
        {"num_attention_heads": 4, "num_key_value_heads": 2, "intermediate_size": 37},
        {"num_attention_heads": 2, "num_key_value_heads": 1, "intermediate_size": 36}]


def test_gpt2_and_phi3_attributes():
    model, masks = patched("gpt2", "partial")
    small = materialize(model, masks.circuit(), verbose=False)
    a0 = small.transformer.h[0].attn
    assert (a0.num_heads, a0.split_size, a0.c_attn.nf, a0.c_attn.weight.shape[1], a0.c_proj.nx) == (3, 24, 72, 72, 24)
    assert small.transformer.h[1].attn.num_heads == 2

    model, masks = patched("phi3", "partial")
    small = materialize(model, masks.circuit(), verbose=False)
    a0, a1 = (layer.self_attn for layer in small.model.layers)
    assert a0.config is small.config and small.config.num_attention_heads == 4  # layer 0 keeps 4 (a filler)
    assert a1.config is not small.config and (a1.config.num_attention_heads, a1.num_key_value_heads) == (2, 1)
    assert a1.qkv_proj.out_features == 16 + 8 + 8


def test_olmo2_keeps_every_head_and_zeroes_the_closed_ones():
    """OLMo-2's q_norm / k_norm are RMSNorms over all heads' features at once: the heads' mean square sets every
    head's scale, so cutting a head out would change the others. materialize keeps all heads and zeroes the
    closed heads' o_proj columns."""
    model, masks = patched("olmo2", "partial")
    small = materialize(model, masks.circuit(), verbose=False)
    for layer, closed in zip(small.model.layers, ([1], [2, 3])):
        a = layer.self_attn
        assert (a.q_proj.out_features, a.k_proj.out_features, a.v_proj.out_features) == (H * D, 2 * D, 2 * D)
        assert (a.q_norm.weight.numel(), a.k_norm.weight.numel(), a.num_key_value_groups) == (H * D, 2 * D, 2)
        for h in closed:
            assert torch.all(a.o_proj.weight[:, h * D:(h + 1) * D] == 0)
    assert small.config.nodeprune_layers[1]["num_attention_heads"] == H

    # why: the queries of the heads kept, computed without the closed heads, are not what the model computes
    attn = model.model.layers[1].self_attn
    x = torch.randn(3, D_MODEL)
    with torch.no_grad():
        q = attn.q_norm(attn.q_proj(x))[:, :2 * D]
        q_alone = torch.nn.functional.rms_norm(attn.q_proj(x)[:, :2 * D], (2 * D,), attn.q_norm.weight[:2 * D],
                                               attn.q_norm.variance_epsilon)
    assert not torch.allclose(q, q_alone, atol=1e-3)


def test_cohere_keeps_the_per_head_norm_rows_of_its_kept_heads():
    model, masks = patched("cohere", "partial")
    small = materialize(model, masks.circuit(), verbose=False)
    orig, cut = model.model.layers[1].self_attn, small.model.layers[1].self_attn  # layer 1 keeps heads 0, 1
    assert cut.q_norm.weight.shape == (2, D) and torch.equal(cut.q_norm.weight, orig.q_norm.weight[:2])
    assert cut.k_norm.weight.shape == (1, D) and torch.equal(cut.k_norm.weight, orig.k_norm.weight[:1])
    assert small.model.layers[0].self_attn.q_norm.weight.shape == (H, D)  # layer 0: head 1 stays as a filler

    model = tiny_model("cohere")  # without use_qk_norm (Command-R v01) there is no norm to cut
    for layer in model.model.layers:
        layer.self_attn.use_qk_norm = False
        del layer.self_attn.q_norm, layer.self_attn.k_norm
    masks = apply_node_pruning(model, backend="reference")
    close(masks, "partial")
    circuit, ids = masks.eval().circuit(), tiny_batch()
    assert_logits_close(logits(materialize(model, circuit, verbose=False), ids), logits(model, ids, masks, circuit))


def test_a_per_head_norm_of_another_layout_is_refused(monkeypatch):
    """A family registered with per-head q/k norms whose norm weights are not one row per head: an error
    naming the norm, not a silently wrong cut (here OLMo-2's norms, which span all heads)."""
    import nodeprune_kernels.model.families as families

    model, masks = patched("olmo2", "partial")
    wrong = dataclasses.replace(families.REGISTRY["olmo2"], qk_norm="per_head")
    monkeypatch.setitem(families.REGISTRY, "olmo2", wrong)
    with pytest.raises(NotImplementedError, match=r"olmo2's q_norm.weight has shape \(32,\), not one row per head"):
        materialize(model, masks.circuit(), verbose=False)


def test_an_unknown_qk_norm_kind_is_refused():
    from nodeprune_kernels.model.families import Family

    with pytest.raises(ValueError, match="qk_norm must be one of"):
        Family("mine", ("mine",), layers="model.layers", qk_norm="full")


def test_unpatched_model():
    model, masks = patched("qwen2", "partial")
    ids = tiny_batch()
    circuit = masks.circuit()
    ref = logits(model, ids, masks, circuit)
    remove_node_pruning(model)
    full = logits(model, ids)
    small = materialize(model, circuit, verbose=False)
    assert_logits_close(logits(small, ids), ref)
    assert torch.equal(logits(model, ids), full)


def test_uniform_pruning_updates_config_and_reloads(tmp_path):
    model, masks = patched("llama", "partial")
    with torch.no_grad():
        for p in masks.log_alpha.values():
            p.fill_(OPEN)
        masks.log_alpha["head"][:, 2:] = CLOSED
        masks.log_alpha["mlp_neuron"][:, :5] = CLOSED
    ids = tiny_batch()
    circuit = masks.circuit()
    ref = logits(model, ids, masks, circuit)
    small = materialize(model, circuit, verbose=False)
    c = small.config
    assert (c.num_attention_heads, c.num_key_value_heads, c.intermediate_size) == (2, 1, 35)
    assert model.config.num_attention_heads == 4
    small.save_pretrained(tmp_path)
    again = type(small).from_pretrained(tmp_path)
    assert_logits_close(logits(again, ids), ref)


def test_report(capsys):
    model, masks = patched("llama", "partial")
    materialize(model, masks.circuit())
    assert capsys.readouterr().out.strip() == "materialized: 16,050 params (was 18,304, 12.3% smaller)"


def test_mean_ablation_warns():
    model, masks = patched("llama", "partial", ablation="mean")
    with pytest.warns(UserWarning, match="zero ablation"):
        materialize(model, masks.circuit(), verbose=False)


def test_bad_inputs():
    model, masks = patched("llama", "partial")
    circuit = masks.circuit()
    other = dataclasses.replace(circuit.dims, n_layers=3)
    kept = {"layer": torch.ones(3, dtype=torch.bool)}
    with pytest.raises(ValueError, match="sizes"):
        materialize(model, Circuit(kept, other, model_type="llama"), verbose=False)
    gemma, gmasks = patched("gemma2", "partial")  # the same sizes, another model type
    with pytest.raises(ValueError, match="gemma2"):
        materialize(model, gmasks.circuit(), verbose=False)
    with pytest.raises(TypeError, match="Circuit"):
        materialize(model, circuit.to_dict(), verbose=False)

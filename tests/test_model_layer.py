"""Semantics of node pruning on every supported family (tiny models built from configs).

The truth is always the unpatched Hugging Face model: with weights zeroed by hand (zero ablation), or with
forward hooks that patch the same sites from a corrupted run or with means (interchange, mean ablation).
"""
import copy

import pytest
import torch

import nodeprune_kernels as npk
from nodeprune_kernels.model.families import REGISTRY, family_of
from tiny_models import FAMILY_NAMES, tiny_batch, tiny_model

from helpers import assert_close

L, H, D, F, E = 2, 4, 8, 40, 32
ALL = npk.GRANULARITIES

# Two scenarios of closed nodes: {granularity: [(layer, index), ...]} (index None for per-layer gates)
SCENARIOS = {
    "fine": {"head": [(0, 1)], "attn_neuron": [(0, 3), (0, 17), (1, 30)], "mlp_neuron": [(0, 0), (0, 5), (1, 39)],
             "mlp_out": [(0, 2), (1, 31)], "attn": [(1, None)]},
    "coarse": {"layer": [(1, None)], "mlp": [(0, None)], "head": [(0, 3)]},
}


def close_nodes(masks, scenario):
    """Every gate deterministic-open except the scenario's, which are closed."""
    with torch.no_grad():
        for g, la in masks.log_alpha.items():
            la.fill_(30.0)
            for layer, idx in SCENARIOS[scenario].get(g, []):
                if idx is None:
                    la[layer] = -30.0
                else:
                    la[layer, idx] = -30.0
    masks.eval()


def closed_sites(scenario):
    """Per layer: closed o_proj input features [H*D], down-projection inputs [F] and outputs [E]."""
    s = SCENARIOS[scenario]
    attn = torch.zeros(L, H * D, dtype=torch.bool)
    hid = torch.zeros(L, F, dtype=torch.bool)
    out = torch.zeros(L, E, dtype=torch.bool)
    for layer, _ in s.get("layer", []):
        attn[layer] = hid[layer] = True
    for layer, _ in s.get("attn", []):
        attn[layer] = True
    for layer, _ in s.get("mlp", []):
        hid[layer] = True
    for layer, h in s.get("head", []):
        attn[layer, h * D:(h + 1) * D] = True
    for layer, j in s.get("attn_neuron", []):
        attn[layer, j] = True
    for layer, j in s.get("mlp_neuron", []):
        hid[layer, j] = True
    for layer, i in s.get("mlp_out", []):
        out[layer, i] = True
    return attn, hid, out


def sites(model):
    fam = family_of(model)
    for layer in fam.decoder_layers(model):
        yield fam, fam.out_proj(layer), getattr(fam.mlp_module(layer), fam.down)


def logits(model, ids, **kw):
    with torch.no_grad():
        return model(ids, **kw).logits


@pytest.fixture(params=FAMILY_NAMES)
def family(request):
    return request.param


def test_all_open_and_removal_restore_the_model_exactly(family):
    model = tiny_model(family)
    ids = tiny_batch()
    ref = logits(model, ids)
    flags = {n: p.requires_grad for n, p in model.named_parameters()}
    masks = npk.apply_node_pruning(model, backend="reference")
    assert set(masks.log_alpha) == set(ALL)
    assert {g: tuple(t.shape) for g, t in masks.log_alpha.items()} == {
        "layer": (L,), "attn": (L,), "head": (L, H), "attn_neuron": (L, H * D), "mlp": (L,), "mlp_neuron": (L, F),
        "mlp_out": (L, E)}
    assert not any(p.requires_grad for p in model.parameters())
    with masks.all_open():
        assert torch.equal(logits(model, ids), ref)
    masks.eval()  # init_log_alpha=3: every deterministic gate is exactly 1
    assert_close(logits(model, ids), ref, torch.float32, "eval, all gates 1")
    npk.remove_node_pruning(model)
    assert torch.equal(logits(model, ids), ref)
    assert {n: p.requires_grad for n, p in model.named_parameters()} == flags
    for _, o, down in sites(model):
        assert "forward" not in o.__dict__ and "forward" not in down.__dict__


@pytest.mark.parametrize("scenario", list(SCENARIOS))
def test_zero_ablation_is_zeroing_weights(family, scenario):
    model = tiny_model(family)
    ids = tiny_batch()
    zeroed = copy.deepcopy(model)
    attn, hid, out = closed_sites(scenario)
    with torch.no_grad():
        for layer, (fam, o, down) in enumerate(sites(zeroed)):
            in_out = fam.weight_layout == "in_out"
            if in_out:
                o.weight[attn[layer]] = 0
                down.weight[hid[layer]] = 0
                down.weight[:, out[layer]] = 0
            else:
                o.weight[:, attn[layer]] = 0
                down.weight[:, hid[layer]] = 0
                down.weight[out[layer]] = 0
    ref = logits(zeroed, ids)
    assert not torch.allclose(ref, logits(model, ids), atol=1e-3)  # the scenario changes the output
    masks = npk.apply_node_pruning(model, backend="reference")
    close_nodes(masks, scenario)
    assert_close(logits(model, ids), ref, torch.float32, f"{family} {scenario}")
    with masks.use_circuit(masks.circuit()):
        assert_close(logits(model, ids), ref, torch.float32, f"{family} {scenario} circuit")


def _patch_hooks(model, closed, attn_values, hid_values, out_values):
    """Forward hooks on the unpatched model: closed sites take the given values ([layer] -> tensor)."""
    attn, hid, out = closed
    handles = []
    for layer, (_, o, down) in enumerate(sites(model)):
        def pre(vals, mask):
            def hook(_, args):
                x = args[0].clone()
                x[..., mask] = vals.to(x.dtype).expand_as(x)[..., mask]
                return (x,)
            return hook

        def post(vals, mask):
            def hook(_, args, y):
                y = y.clone()
                y[..., mask] = vals.to(y.dtype).expand_as(y)[..., mask]
                return y
            return hook

        handles.append(o.register_forward_pre_hook(pre(attn_values[layer], attn[layer])))
        handles.append(down.register_forward_pre_hook(pre(hid_values[layer], hid[layer])))
        handles.append(down.register_forward_hook(post(out_values[layer], out[layer])))
    return handles


def _capture(model, ids, weights=None):
    """o_proj inputs, down inputs and down outputs of the unpatched model, per layer."""
    got = {"attn": [], "hid": [], "out": []}
    handles = []
    for _, o, down in sites(model):
        handles.append(o.register_forward_pre_hook(lambda _, a: got["attn"].append(a[0].detach())))
        handles.append(down.register_forward_pre_hook(lambda _, a: got["hid"].append(a[0].detach())))
        handles.append(down.register_forward_hook(lambda _, a, y: got["out"].append(y.detach())))
    logits(model, ids)
    for h in handles:
        h.remove()
    return got


@pytest.mark.parametrize("scenario", list(SCENARIOS))
def test_interchange_ablation_is_patching_from_the_corrupted_run(family, scenario):
    model = tiny_model(family)
    ids, corrupt = tiny_batch(seed=1), tiny_batch(seed=2)
    c = _capture(model, corrupt)
    handles = _patch_hooks(model, closed_sites(scenario), c["attn"], c["hid"], c["out"])
    ref = logits(model, ids)
    for h in handles:
        h.remove()
    masks = npk.apply_node_pruning(model, ablation="interchange", backend="reference")
    close_nodes(masks, scenario)
    with masks.interchange(input_ids=corrupt):
        got = logits(model, ids)
    assert_close(got, ref, torch.float32, f"{family} {scenario}")
    with pytest.raises(RuntimeError, match="masks.interchange"):
        logits(model, ids)
    with pytest.raises(ValueError, match="same batch size and length"):
        with masks.interchange(input_ids=corrupt[:, :5]):
            logits(model, ids)


def test_mean_ablation_is_patching_with_means(family):
    model = tiny_model(family)
    ids = tiny_batch(seed=1)
    ref_ids = [tiny_batch(seed=s, seq=6) for s in (3, 4)]
    mask = torch.ones(2, 6, dtype=torch.long)
    mask[1, :2] = 0  # left padding in the second batch's second row: left out of the means
    batches = [{"input_ids": ref_ids[0]}, {"input_ids": ref_ids[1], "attention_mask": mask}]
    caps = [_capture(model, b["input_ids"], None) for b in batches]
    w = [torch.ones(2, 6), mask.float()]
    # the patched model is run on the same masked batch: capture with the mask too
    caps[1] = {k: v for k, v in caps[1].items()}
    got_masked = {"attn": [], "hid": [], "out": []}
    handles = []
    for _, o, down in sites(model):
        handles.append(o.register_forward_pre_hook(lambda _, a: got_masked["attn"].append(a[0].detach())))
        handles.append(down.register_forward_pre_hook(lambda _, a: got_masked["hid"].append(a[0].detach())))
    with torch.no_grad():
        model(ref_ids[1], attention_mask=mask)
    for h in handles:
        h.remove()
    caps[1] = got_masked

    def mean(kind, layer):
        num = sum((c[kind][layer].double() * wt[..., None]).sum((0, 1)) for c, wt in zip(caps, w))
        return num / sum(wt.sum() for wt in w)

    attn_mu = [mean("attn", layer) for layer in range(L)]
    hid_mu = [mean("hid", layer) for layer in range(L)]
    out_mu = []
    for layer, (fam, _, down) in enumerate(sites(model)):
        out_mu.append(down(hid_mu[layer].float()))  # y_c = mu W^T + b
    handles = _patch_hooks(model, closed_sites("fine"), attn_mu, hid_mu, out_mu)
    ref = logits(model, ids)
    for h in handles:
        h.remove()
    masks = npk.apply_node_pruning(model, ablation="mean", backend="reference")
    close_nodes(masks, "fine")
    with pytest.raises(RuntimeError, match="estimate_means"):
        logits(model, ids)
    means = masks.estimate_means(batches)
    assert_close(means["attn"], torch.stack(attn_mu).float(), torch.float32, "attention means")
    assert_close(means["mlp"], torch.stack(hid_mu).float(), torch.float32, "hidden means")
    assert_close(logits(model, ids), ref, torch.float32, family)


@pytest.mark.parametrize("family", [f for f in FAMILY_NAMES if REGISTRY[f].mlp_dropout])  # TINY: by model_type
def test_the_mlp_dropout_follows_the_masked_mlp(family):
    """GPT-2 and GPT-J apply a dropout inside the MLP, after its down projection: the patched MLP applies it
    too. With p=1 it drops the whole MLP output, so the MLP's contribution must vanish in training mode."""
    model = tiny_model(family)
    ids = tiny_batch()
    fam = family_of(model)
    eval_logits = logits(model, ids)
    for layer in fam.decoder_layers(model):
        getattr(fam.mlp_module(layer), fam.mlp_dropout).p = 1.0
    model.train()
    ref = logits(model, ids)
    assert not torch.allclose(ref, eval_logits, atol=1e-3)
    masks = npk.apply_node_pruning(model, ["mlp_neuron"], backend="reference")
    masks.eval()  # deterministic gates, all exactly 1
    assert_close(logits(model, ids), ref, torch.float32, family)


def test_gate_keys_of_distinct_seed_and_step_never_collide():
    """The Philox key holds the run's seed and the step in separate words: seed s at step k + 1 must not draw
    what seed s + 1 draws at step k (it did when the key was seed + step)."""
    from nodeprune_kernels.model.masks import MAX_RUN_SEED, step_seed
    from nodeprune_kernels.ops.hard_concrete.reference import gate_uniform

    pairs = [(s, k) for s in (0, 1, 2, 7, MAX_RUN_SEED - 1) for k in (0, 1, 2, 3, 2**32 - 1)]
    keys = [step_seed(s, k) for s, k in pairs]
    assert len(set(keys)) == len(pairs)
    assert all(0 <= key < 2**63 for key in keys)
    index = torch.arange(64)
    assert not torch.equal(gate_uniform(step_seed(0, 1), index), gate_uniform(step_seed(1, 0), index))


def test_run_seed_out_of_range_is_refused():
    model = tiny_model("llama")
    with pytest.raises(ValueError, match=r"2\*\*31"):
        npk.apply_node_pruning(model, ["head"], seed=2**31)
    assert not npk.is_patched(model)


def test_a_base_model_is_refused_with_what_to_pass():
    model = tiny_model("llama")
    with pytest.raises(TypeError, match="pass the \\*ForCausalLM model itself"):
        npk.apply_node_pruning(model.model)
    assert not npk.is_patched(model.model)


def test_deepcopy_of_a_patched_model_is_refused_and_both_stay_usable():
    model = tiny_model("llama")
    ids = tiny_batch()
    with torch.no_grad():
        before = model(ids).logits
    masks = npk.apply_node_pruning(model, ["head"], backend="reference")
    with pytest.raises(TypeError, match="remove_node_pruning"):
        copy.deepcopy(model)
    with pytest.raises(TypeError, match="remove_node_pruning"):
        copy.deepcopy(model.model.layers[0].self_attn)  # a patched module alone, too
    masks.eval()
    with torch.no_grad(), masks.all_open():
        torch.testing.assert_close(model(ids).logits, before)
    npk.remove_node_pruning(model)
    clone = copy.deepcopy(model)  # unpatched: copies as usual
    with torch.no_grad():
        torch.testing.assert_close(clone(ids).logits, before)
        torch.testing.assert_close(model(ids).logits, before)


@pytest.mark.parametrize("backend", ["reference", "native", "triton"])
@pytest.mark.parametrize("family", ["llama", "gpt2"])
def test_autocast_mixed_precision(family, backend):
    """fp32 weights under bf16 autocast, as most people train: the patched model runs in bf16 like the
    unpatched one (all gates open: the same logits up to bf16 rounding), and the gates get finite gradients."""
    model = tiny_model(family)
    ids = tiny_batch()
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        before = model(ids).logits.float()
    masks = npk.apply_node_pruning(model, backend=backend, init_log_alpha=10.0)
    masks.eval()
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        after = model(ids).logits.float()
    assert_close(after, before, torch.bfloat16, "open gates under autocast")
    masks.train()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        loss = model(ids).logits.float().logsumexp(-1).mean()
    loss.backward()
    grads = [la.grad for la in masks.log_alpha.values()]
    assert all(g is not None and torch.isfinite(g).all() for g in grads)
    npk.remove_node_pruning(model)

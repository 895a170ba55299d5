"""Attribution (AtP and IG over the gates): derivatives, completeness, exactness, files and errors."""
import json
import math

import pytest
import torch
import transformers as tf
from test_cli import model_dir  # noqa: F401 (a fixture)
from tiny_models import tiny_model

from nodeprune_kernels import apply_node_pruning, remove_node_pruning
from nodeprune_kernels.pruning.attribution import (EDGE, NodeScores, attribute, gate_log_alpha, gate_slope,
                                                   ig_points)
from nodeprune_kernels.pruning.objectives import kl_sum, logit_diff
from nodeprune_kernels.tasks.base import TaskData

OPTS = dict(backend="reference", progress=False, batch_size=8, n_eval=2, seed=0)


def task_data(n=8, T=6, vocab=61, seed=3, distractor=True):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(3, vocab, (n, T), generator=g)
    corrupt = ids.clone()
    corrupt[:, 1] = torch.randint(3, vocab, (n,), generator=g)
    positions = torch.zeros(n, T, dtype=torch.bool)
    positions[:, -1] = True
    target = torch.full((n, T), -1)
    target[:, -1] = torch.randint(3, vocab, (n,), generator=g)
    dis = torch.full((n, T), -1)
    if distractor:
        dis[:, -1] = (target[:, -1] + 1 + torch.randint(0, vocab - 4, (n,), generator=g)) % vocab
    return TaskData("toy", ids, corrupt, torch.ones(n, T, dtype=torch.long), positions, target, dis,
                    torch.zeros(n, dtype=torch.bool), meta={"vocab_size": vocab})


def metric(model, masks, data, metric_name, values):
    """The attribution metric on ``data`` with the gates at ``values`` ({g: tensor of gate values})."""
    with torch.no_grad():
        for g, la in masks.log_alpha.items():
            la.copy_(values[g].clone().apply_(lambda z: 30.0 if z >= 1 else -30.0 if z <= 0 else gate_log_alpha(z)))
        inputs = {"input_ids": data.input_ids, "attention_mask": data.attention_mask}
        pos = data.positions
        with masks.all_open():
            full = model(**inputs).logits[pos]
        ctx = masks.interchange(input_ids=data.corrupt_ids, attention_mask=data.attention_mask) \
            if masks.ablation == "interchange" else torch.no_grad()
        with ctx:
            logits = model(**inputs).logits[pos]
        n = int(pos.sum())
        if metric_name == "logit_diff":
            return float(logit_diff(logits, data.target[pos], data.distractor[pos]).sum()) / n
        return -float(kl_sum(torch.log_softmax(full, -1), logits)) / n


def gated(model, granularities, ablation):
    masks = apply_node_pruning(model, granularities, ablation, backend="reference").eval()
    return masks, {g: torch.full_like(la, 1 - EDGE, dtype=torch.float64) for g, la in masks.log_alpha.items()}


@pytest.mark.parametrize("ablation", ["zero", "interchange"])
def test_atp_is_the_derivative_of_the_metric(ablation):
    """AtP of every granularity equals the finite difference of the metric in that one gate (GPT-2 in
    float64: its LayerNorm keeps the dtype, where Llama's RMSNorm computes in float32 and adds noise)."""
    model = tiny_model("gpt2", dtype=torch.float64)
    data = task_data()
    scores = attribute(model, data, method="atp", ablation=ablation, **OPTS)
    train, _ = data.split(2, seed=0)
    masks, ones = gated(model, scores.scores.keys(), ablation)
    h = 1e-3
    for g, node in [("layer", (1,)), ("attn", (0,)), ("head", (1, 2)), ("attn_neuron", (0, 5)), ("mlp", (1,)),
                    ("mlp_neuron", (0, 7)), ("mlp_out", (1, 4))]:
        values = []
        for k in range(3):  # the gate at 1 - EDGE - k h, the others open
            at = dict(ones)
            at[g] = ones[g].clone()
            at[g][node] -= k * h
            values.append(metric(model, masks, train, "logit_diff", at))
        fd = (3 * values[0] - 4 * values[1] + values[2]) / (2 * h)  # one-sided, second order (z <= 1)
        assert scores.scores[g][node].item() == pytest.approx(fd, rel=2e-3, abs=1e-6), g
    remove_node_pruning(model)
    assert max(float(s.abs().max()) for s in scores.scores.values()) > 1e-3  # not vacuous


def one_layer_model():
    config = tf.GPT2Config(vocab_size=61, n_embd=32, n_layer=1, n_head=4, n_positions=64, n_inner=40,
                           resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0)
    torch.manual_seed(0)
    model = tf.GPT2LMHeadModel(config)
    with torch.no_grad():
        for name, p in model.named_parameters():
            p.copy_(torch.randn(p.shape) * (0.1 if "ln_" in name else 0.3) + (1.0 if "ln_" in name and "weight" in name else 0.0))
    return model.double().eval()


@pytest.mark.parametrize("granularity", ["attn", "mlp"])
def test_ig_of_a_single_gate_is_the_exact_effect_of_closing_it(granularity):
    """With one gated node the common path is that node's own: IG with many steps = m(open) - m(closed)."""
    model = one_layer_model()
    data = task_data()
    s = attribute(model, data, method="ig", metric="kl", ig_steps=65, granularities=(granularity,),
                  ablation="interchange", **OPTS)
    train, _ = data.split(2, seed=0)
    masks, ones = gated(model, (granularity,), "interchange")
    def at(z):
        return metric(model, masks, train, "kl", {granularity: torch.full((1,), z, dtype=torch.float64)})

    exact = at(1.0) - at(0.0)  # gates exactly open and exactly closed
    remove_node_pruning(model)
    assert abs(exact) > 1e-3
    assert s.scores[granularity].item() == pytest.approx(exact, rel=1e-3)
    assert s.info["m_full"] - s.info["m_empty"] == pytest.approx(exact, rel=1e-3)


def test_ig_completeness_over_every_granularity():
    model = tiny_model("gpt2", dtype=torch.float64)
    s = attribute(model, task_data(), method="ig", metric="logit_diff", ig_steps=33, ablation="interchange", **OPTS)
    assert abs(s.info["m_full"] - s.info["m_empty"]) > 1e-2
    assert s.total() == pytest.approx(s.info["m_full"] - s.info["m_empty"], rel=2e-2)


def test_backends_agree():
    model = tiny_model("gpt2")
    data = task_data()
    ref = attribute(model, data, method="atp", ablation="interchange", **OPTS)
    nat = attribute(model, data, method="atp", ablation="interchange", **dict(OPTS, backend="native"))
    for g in ref.scores:
        torch.testing.assert_close(nat.scores[g], ref.scores[g], rtol=1e-3, atol=1e-5)


def test_the_model_is_restored():
    model = tiny_model("qwen2")
    before = {k: v.clone() for k, v in model.state_dict().items()}
    model.train()
    attribute(model, task_data(), method="atp", ablation="zero", **OPTS)
    assert model.training and not hasattr(model, "nodeprune_masks")
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())


def test_points_and_slopes():
    pts = ig_points(5)
    assert [p for p, _ in pts] == [EDGE, 0.25, 0.5, 0.75, 1 - EDGE] and sum(w for _, w in pts) == pytest.approx(1.0)
    for z in (EDGE, 0.3, 1 - EDGE):
        la = gate_log_alpha(z)
        s = 1 / (1 + math.exp(-la))
        assert s * 1.2 - 0.1 == pytest.approx(z, abs=1e-12)
        eps = 1e-6
        num = ((1 / (1 + math.exp(-la - eps))) - (1 / (1 + math.exp(-la + eps)))) * 1.2 / (2 * eps)
        assert gate_slope(z) == pytest.approx(num, rel=1e-6)
    with pytest.raises(ValueError, match="at least 2"):
        ig_points(1)


def test_combinations_that_cannot_work_are_refused():
    model = tiny_model("llama")
    with pytest.raises(ValueError, match="gradient there is zero"):
        attribute(model, task_data(), method="atp", metric="kl", **OPTS)
    with pytest.raises(ValueError, match="needs a distractor"):
        attribute(model, task_data(distractor=False), method="atp", **OPTS)
    with pytest.raises(ValueError, match="unknown attribution method"):
        attribute(model, task_data(), method="eap", **OPTS)
    with pytest.raises(ValueError, match="unknown attribution metric"):
        attribute(model, task_data(), method="ig", metric="ce", **OPTS)
    # IG with KL needs no distractor
    attribute(model, task_data(distractor=False), method="ig", ig_steps=2, **OPTS)


def test_scores_circuits_files_and_init(tmp_path):
    model = tiny_model("llama")
    s = attribute(model, task_data(), method="atp", ablation="zero", **OPTS)
    c = s.circuit(size={"head": 3, "mlp_neuron": 10})
    counts = c.counts()
    assert counts["head"][0] <= 3 and counts["mlp_neuron"][0] <= 10
    top = torch.argsort(-s.scores["head"].abs().flatten(), stable=True)[:counts["head"][0]]
    assert bool(c.kept["head"].flatten()[top].all())
    assert s.circuit(fraction=1.0).counts()["mlp_neuron"][0] == 80
    with pytest.raises(ValueError, match="exactly one of"):
        s.circuit()
    with pytest.raises(ValueError, match="not ranked"):
        s.circuit(size={"bogus": 1})

    path = s.save(tmp_path / "scores.safetensors")
    again = NodeScores.load(path)
    assert again.method == "atp" and again.dims == s.dims and again.info == s.info
    assert all(torch.equal(again.scores[g], s.scores[g]) for g in s.scores)
    (tmp_path / "junk.safetensors").write_bytes(b"junk")
    with pytest.raises(ValueError, match="not a readable safetensors"):
        NodeScores.load(tmp_path / "junk.safetensors")
    from safetensors.torch import save_file
    save_file({"x": torch.zeros(1)}, str(tmp_path / "other.safetensors"))
    with pytest.raises(ValueError, match="holds no attribution scores"):
        NodeScores.load(tmp_path / "other.safetensors")

    la = s.to_log_alpha(3.0)
    for g, v in la.items():
        flat, sc = v.flatten(), s.scores[g].abs().flatten()
        assert float(flat[sc.argmax()]) == pytest.approx(3.0) and float(flat[sc.argmin()]) == pytest.approx(1.0)
        assert torch.equal(torch.argsort(flat, stable=True), torch.argsort(sc, stable=True))  # the scores' order
        assert v.shape == s.scores[g].shape


def test_nodeprune_attribute_writes_a_run(model_dir, tmp_path, capsys):
    from test_cli import ARGS

    from nodeprune_kernels import Circuit
    from nodeprune_kernels.cli import main

    out = tmp_path / "attr"
    assert main(["attribute", "--model", str(model_dir), "--task", "ioi", "--out", str(out), "--fraction", "0.25"]
                + ARGS) == 0
    printed = capsys.readouterr().out
    assert "atp scores (logit_diff)" in printed and "held-out (6 examples)" in printed
    cfg = json.loads((out / "config.json").read_text())
    assert cfg["attribution"] == {"method": "atp", "metric": "logit_diff", "ig_steps": 8, "fraction": 0.25}
    scores = NodeScores.load(out / "scores.safetensors")
    circuit = Circuit.from_json(out / "circuit.json")
    assert circuit == scores.circuit(fraction=0.25)
    metrics = json.loads((out / "metrics.json").read_text())["metrics"]
    assert metrics["kept/head"] <= 0.25 and 0 <= metrics["kl"]


@pytest.mark.parametrize("extra, message", [
    (["--method", "atp", "--metric", "kl"], "gradient there is zero"),
    (["--method", "ig", "--ig-steps", "1"], "at least 2"),
    (["--fraction", "1.5"], "--fraction must be in [0, 1]"),
])
def test_nodeprune_attribute_errors_before_loading(extra, message, capsys):
    from nodeprune_kernels.cli import main

    with pytest.raises(SystemExit):
        main(["attribute", "--model", "not-a-model", "--task", "ioi", "--out", "o"] + extra)
    assert message in capsys.readouterr().err

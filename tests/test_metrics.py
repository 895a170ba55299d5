"""MIB circuit metrics for a ranking: the cut, faithfulness, CPR/CMD and necessity against hand computations."""
import pytest
import torch
from test_attribution import task_data
from test_cli import model_dir  # noqa: F401 (a fixture)
from tiny_models import tiny_model

from nodeprune_kernels import Circuit, apply_node_pruning, remove_node_pruning
from nodeprune_kernels.model.families import ModelDims
from nodeprune_kernels.pruning.metrics import complement, jaccard, ranking_table, top_nodes

DIMS = ModelDims(n_layers=2, n_heads=2, n_kv_heads=2, head_dim=2, d_model=4, d_ff=3)


def test_top_nodes_counts_every_gate_as_one_node():
    ranking = {"head": torch.tensor([[0.9, 0.1], [0.5, 0.7]]), "mlp_neuron": torch.tensor([[0.8, 0.2, 0.6],
                                                                                          [0.0, 0.3, 0.95]])}
    c = top_nodes(ranking, DIMS, 4)  # 0.95, 0.9, 0.8, 0.7
    assert c.kept["head"].tolist() == [[True, False], [False, True]]
    assert c.kept["mlp_neuron"].tolist() == [[True, False, False], [False, False, True]]
    assert top_nodes(ranking, DIMS, 0).counts()["head"][0] == 0
    with pytest.raises(ValueError, match=r"n must be in \[0, 10\]"):
        top_nodes(ranking, DIMS, 11)


def test_complement_and_jaccard():
    a = Circuit({"head": torch.tensor([[True, False], [True, True]])}, DIMS)
    b = Circuit({"head": torch.tensor([[True, True], [False, True]])}, DIMS)
    assert complement(a).kept["head"].tolist() == [[False, True], [False, False]]
    assert jaccard(a, b) == pytest.approx(2 / 4)
    assert jaccard(a, a) == 1.0
    with pytest.raises(ValueError, match="no granularity in common"):
        jaccard(a, Circuit({"mlp": torch.tensor([True, True])}, DIMS))


def test_the_table_by_hand():
    model = tiny_model("gpt2")
    data = task_data()
    masks = apply_node_pruning(model, ("head", "mlp"), "zero", backend="reference").eval()
    g = torch.Generator().manual_seed(0)
    ranking = {k: torch.randn(la.shape, generator=g) for k, la in masks.log_alpha.items()}
    sizes = (0.0, 0.25, 0.5, 1.0)
    t = ranking_table(model, masks, data, ranking, sizes, batch_size=8)
    remove_node_pruning(model)
    pts = t["points"]
    assert [p["n_nodes"] for p in pts] == [0, 2, 5, 10]  # int(k * 10): 8 heads + 2 MLPs
    assert t["metric"] == "logit_diff"
    full, empty = pts[-1]["full_logit_diff"], t["empty"]["logit_diff"]
    for p in pts:  # f = (m(C) - m(empty)) / (m(full) - m(empty)); the KL form 1 - KL(C) / KL(empty)
        assert p["faithfulness"] == pytest.approx((p["logit_diff"] - empty) / (full - empty))
        assert p["faithfulness_kl"] == pytest.approx(1 - p["kl"] / t["empty"]["kl"])
    assert pts[0]["faithfulness"] == pytest.approx(0.0, abs=1e-6) and pts[-1]["faithfulness"] == pytest.approx(1.0, abs=1e-4)
    assert pts[-1]["necessity"] == pytest.approx(0.0, abs=1e-6) and pts[0]["necessity"] == pytest.approx(1.0, abs=1e-4)
    f = [p["faithfulness"] for p in pts]
    cpr = 0.25 * (f[0] + f[1]) / 2 + 0.25 * (f[1] + f[2]) / 2 + 0.5 * (f[2] + f[3]) / 2
    cmd = 0.25 * (abs(1 - f[0]) + abs(1 - f[1])) / 2 + 0.25 * (abs(1 - f[1]) + abs(1 - f[2])) / 2 \
        + 0.5 * (abs(1 - f[2]) + abs(1 - f[3])) / 2
    assert t["cpr"] == pytest.approx(cpr) and t["cmd"] == pytest.approx(cmd)
    assert 0.0 < pts[2]["nodes_kept"] <= 0.5


def test_a_ranking_of_other_gates_is_refused():
    model = tiny_model("gpt2")
    masks = apply_node_pruning(model, ("head",), "zero", backend="reference").eval()
    with pytest.raises(ValueError, match="the ranking covers"):
        ranking_table(model, masks, task_data(), {"mlp": torch.zeros(2)})
    remove_node_pruning(model)


def test_a_pruning_run_reports_mib_metrics_of_its_log_alphas(tmp_path):
    import json

    from test_pruning import FAST, induction_data

    from nodeprune_kernels import prune
    from nodeprune_kernels.pruning.report import show

    r = prune(tiny_model("llama"), induction_data(), run_dir=tmp_path, progress=False,
              **dict(FAST, granularities=("head", "mlp_neuron"), ablation="zero"))
    table = r.extra["mib"]
    assert [p["size"] for p in table["points"]] == [0.001, 0.002, 0.005, 0.01, 0.02, 0.05, 0.1, 0.2, 0.5, 1.0]
    assert r.metrics["mib/cpr"] == table["cpr"] and r.metrics["mib/cmd"] == table["cmd"]
    assert table["points"][-1]["faithfulness"] == pytest.approx(1.0, abs=1e-4)
    saved = json.loads((tmp_path / "metrics.json").read_text())["mib"]
    assert saved["cpr"] == pytest.approx(table["cpr"]) and len(saved["points"]) == 10
    text = show(tmp_path)
    assert "CPR" in text and "faithfulness by circuit size" in text and "MIB (the log_alpha ranking" in r.summary()
    assert (tmp_path / "mib.png").exists()


def test_pruning_against_attribution(tmp_path, model_dir, capsys):
    import json

    from test_cli import ARGS

    from nodeprune_kernels.cli import main

    out = tmp_path / "methods"
    assert main(["compare", "--versus", "attribution", "--model", str(model_dir), "--task", "ioi", "--out", str(out),
                 "--granularities", "head,mlp"] + ARGS) == 0
    printed = capsys.readouterr().out
    assert "pruning against attribution" in printed
    saved = json.loads((out / "methods.json").read_text())
    assert [r["method"] for r in saved["rows"]] == ["pruning", "atp", "ig"]  # ioi has distractors: AtP too
    assert all(r["cpr"] is not None and r["cmd"] is not None for r in saved["rows"])
    assert (out / "pruning" / "metrics.json").exists()

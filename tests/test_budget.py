"""sparsity="budget" (as sparse as a KL budget allows) and init="attribution"."""
import math

import pytest
import torch
from test_pruning import FAST, induction_data
from tiny_models import tiny_model

from nodeprune_kernels.demo import DEMO_TARGETS, demo_config, load_demo_model
from nodeprune_kernels.pruning import run as run_mod
from nodeprune_kernels.pruning.config import PruneConfig
from nodeprune_kernels.pruning.outputs import load_gates
from nodeprune_kernels.pruning.run import prune
from nodeprune_kernels.pruning.sparsity import BUDGET_CLIP, BUDGET_EMA, BUDGET_RATE, BUDGET_TOLERANCE, Sparsity


def budget(b=0.1):
    return Sparsity(("head", "mlp"), "budget", targets={"head": 0.5, "mlp": 0.8}, kl_budget=b)


def test_the_pressure_follows_the_kl_by_hand():
    s = budget(0.1)
    aim = 0.1 * (1 - BUDGET_TOLERANCE)  # the set point: 0.09, at rest in [0.08, 0.1]
    assert float(s.pressure) == 0.0 and s.target_at(0) == {"head": 0.0, "mlp": 0.0}
    s.observe_kl(0.02)  # first value: the average itself; error (0.09 - 0.02) / 0.1 = 0.7
    assert float(s.kl_average) == pytest.approx(0.02)
    assert float(s.pressure) == pytest.approx(BUDGET_RATE * (aim - 0.02) / 0.1)
    p = float(s.pressure)
    s.observe_kl(0.105)  # average 0.9 * 0.02 + 0.1 * 0.105 = 0.0285: still below
    avg = BUDGET_EMA * 0.02 + (1 - BUDGET_EMA) * 0.105
    assert float(s.kl_average) == pytest.approx(avg)
    assert float(s.pressure) == pytest.approx(p + BUDGET_RATE * (aim - avg) / 0.1)
    for at_rest in (0.081, 0.099):
        s.kl_average.fill_(at_rest)
        p = float(s.pressure)
        s.observe_kl(at_rest)  # inside the band: no change
        assert float(s.pressure) == p
    s.kl_average.fill_(0.1)
    s.observe_kl(50.0)  # clipped at BUDGET_CLIP * budget; the error clamps at -1
    avg = BUDGET_EMA * 0.1 + (1 - BUDGET_EMA) * BUDGET_CLIP * 0.1
    assert float(s.kl_average) == pytest.approx(avg)
    assert float(s.pressure) == pytest.approx(max(0.0, p - BUDGET_RATE * min(1.0, (avg - aim) / 0.1)))
    s.pressure.fill_(0.5)
    assert s.target_at(7) == {"head": 0.25, "mlp": 0.4}
    assert s.budget_missed() == (float(s.kl_average) > 0.1 * (1 + BUDGET_TOLERANCE))


@pytest.mark.parametrize("kwargs, match", [
    (dict(sparsity="budget"), "needs kl_budget > 0"),
    (dict(sparsity="budget", kl_budget=-1.0), "needs kl_budget > 0"),
    (dict(kl_budget=0.1), "kl_budget is used by sparsity='budget' only"),
    (dict(sparsity="budget", kl_budget=0.1, objective="ce"), "needs objective 'kl'"),
    (dict(sparsity="budget", kl_budget=0.1, target_update="lagrangian"), "needs target_update='projection'"),
    (dict(init="scores"), "unknown init 'scores'"),
])
def test_config_errors(kwargs, match):
    with pytest.raises(ValueError, match=match):
        PruneConfig(**kwargs)


@pytest.fixture(scope="module")
def budget_runs():
    """The demo model under a tight and a loose KL budget (its own caps, zero ablation)."""
    out = {}
    for b in (0.05, 0.2):
        cfg = demo_config(240).replace(sparsity="budget", kl_budget=b, targets=DEMO_TARGETS, n_examples=96, n_eval=32)
        out[b] = prune(load_demo_model(), "induction", cfg, progress=False)
    return out


def test_the_training_kl_is_held_at_the_budget(budget_runs):
    r = budget_runs[0.05]
    m = r.metrics
    assert m["kl_budget"] == 0.05 and not m["budget_missed"]
    assert m["budget/kl_average"] <= 0.05 * (1 + BUDGET_TOLERANCE)
    assert m["budget/kl_average"] >= 0.05 * 0.5 or m["budget/pressure"] == 1.0  # not far below: pressure used
    assert all("budget/pressure" in h and "budget/kl_average" in h for h in r.history)


def test_a_looser_budget_gives_a_sparser_circuit(budget_runs):
    tight, loose = budget_runs[0.05], budget_runs[0.2]
    assert loose.metrics["budget/pressure"] > tight.metrics["budget/pressure"]
    kept = {k: sum(r.metrics[f"kept/{g}"] for g in ("head", "attn_neuron", "mlp_neuron")) for k, r in
            ((0.05, tight), (0.2, loose))}
    assert kept[0.2] < kept[0.05]


def test_a_budget_that_cannot_be_met_is_said(tmp_path):
    cfg = PruneConfig(**FAST, sparsity="budget", kl_budget=1e-6, targets=0.5, granularities=("head", "mlp"))
    with pytest.warns(UserWarning, match="KL BUDGET MISSED"):
        r = prune(tiny_model("llama"), induction_data(), cfg, progress=False)
    assert r.metrics["budget_missed"] and r.metrics["budget/kl_average"] > 1e-6 * (1 + BUDGET_TOLERANCE)
    assert r.metrics["budget/pressure"] < 0.1  # it rises only on the steps whose sampled gates all stay open
    assert "KL BUDGET MISSED" in r.summary()


def test_a_budget_run_resumes_exactly(tmp_path, monkeypatch):
    cfg = PruneConfig(**FAST, sparsity="budget", kl_budget=0.5, targets=0.5, granularities=("head", "mlp_neuron"))
    real = run_mod._train_step

    def killed(*args):
        if args[7] == 9:
            raise KeyboardInterrupt
        return real(*args)

    monkeypatch.setattr(run_mod, "_train_step", killed)
    with pytest.raises(KeyboardInterrupt):
        prune(tiny_model("llama"), induction_data(), cfg, run_dir=tmp_path / "killed", progress=False)
    monkeypatch.setattr(run_mod, "_train_step", real)
    resumed = prune(tiny_model("llama"), induction_data(), cfg, run_dir=tmp_path / "killed", progress=False)
    whole = prune(tiny_model("llama"), induction_data(), cfg, run_dir=tmp_path / "whole", progress=False)
    assert resumed.history == whole.history and resumed.metrics == whole.metrics
    a, b = load_gates(tmp_path / "killed" / "gates.safetensors"), load_gates(tmp_path / "whole" / "gates.safetensors")
    assert all(torch.equal(a[g], b[g]) for g in a)


def test_init_from_attribution_starts_from_the_ranking(monkeypatch):
    from nodeprune_kernels.pruning import attribution

    seen = {}
    real = attribution.attribute

    def spy(*args, **kwargs):
        seen.update(method=kwargs["method"], metric=kwargs["metric"])
        seen["scores"] = real(*args, **kwargs)
        return seen["scores"]

    monkeypatch.setattr(attribution, "attribute", spy)
    starts = {}
    real_step = run_mod._train_step

    def first(model, masks, *args):
        if not starts:
            starts.update({g: la.detach().clone() for g, la in masks.log_alpha.items()})
        return real_step(model, masks, *args)

    monkeypatch.setattr(run_mod, "_train_step", first)
    cfg = PruneConfig(**dict(FAST, steps=2), init="attribution", granularities=("head", "mlp_neuron"),
                      sparsity="penalty", lambdas=0.0)
    prune(tiny_model("llama"), induction_data(), cfg, progress=False)
    assert seen["method"] == "atp" and seen["metric"] == "logit_diff"  # the data has distractors everywhere
    expected = seen["scores"].to_log_alpha(cfg.init_log_alpha)
    for g in expected:
        assert torch.equal(starts[g], expected[g]), g
    assert math.isclose(float(starts["head"].max()), 3.0) and math.isclose(float(starts["head"].min()), 1.0)


def test_coarse_against_fine_at_one_kl_budget(tmp_path):
    from nodeprune_kernels.pruning.compare import compare_coarse_fine, format_comparison

    cfg = demo_config(160).replace(sparsity="budget", kl_budget=0.1, targets=DEMO_TARGETS, n_examples=64, n_eval=16)
    cmp = compare_coarse_fine(load_demo_model(), "induction", cfg, progress=False, run_dir=tmp_path)
    assert cmp["hold"] == "budget" and cmp["kl_budget"] == 0.1
    for name in ("coarse", "fine"):  # both held to the one budget: equally faithful within its tolerance
        assert cmp[name].config.sparsity == "budget" and cmp[name].config.kl_budget == 0.1
        assert cmp[f"train_kl_{name}"] <= 0.1 * (1 + BUDGET_TOLERANCE)
    assert cmp["equally_faithful"]
    text = format_comparison(cmp)
    assert "both runs held to the training KL budget 0.1" in text and "equally faithful" in text
    dropped = cmp["totals"]["attn_neuron/dropped"] + cmp["totals"]["mlp_neuron/dropped"]
    assert dropped > 0  # the fine circuit drops neurons of the coarse circuit's heads and blocks


def test_compare_with_own_targets_says_they_are_not_equally_faithful():
    from nodeprune_kernels.pruning.compare import compare_coarse_fine, format_comparison

    cfg = PruneConfig(**dict(FAST, steps=2))
    cmp = compare_coarse_fine(tiny_model("llama"), induction_data(), cfg, progress=False, hold="targets")
    assert cmp["hold"] == "targets" and "not held to the same faithfulness" in format_comparison(cmp)
    with pytest.raises(ValueError, match="unknown hold"):
        compare_coarse_fine(tiny_model("llama"), induction_data(), cfg, progress=False, hold="kl")

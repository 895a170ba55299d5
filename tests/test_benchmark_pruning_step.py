"""The pruning-step benchmark (benchmarks/bench_pruning_step.py) measures what it says: a smoke run of every
mode on tiny models, exact saved-byte accounting it reports, its layer extrapolation and its fit search."""
import math
import os
import sys

import pytest
import torch

sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "benchmarks"))
import bench_pruning_step as bps  # noqa: E402


@pytest.fixture(scope="module")
def quick_rows(tmp_path_factory):
    out = tmp_path_factory.mktemp("bench") / "pruning_step_cpu.csv"
    rows = bps.main(["--quick", "--repeats", "1", "--warmup", "0", "--out", str(out)])
    assert out.exists()
    return rows


def test_every_mode_ablation_and_granularity_has_a_row(quick_rows):
    got = {(r["model"], r["mode"], r["ablation"], r["granularities"]) for r in quick_rows}
    want = {(m, *c) for m in ("tiny-gpt2", "tiny-llama")
            for c in bps.cases_for(("floor", "eager", "fused", "edge"), ("zero", "interchange"), ("all", "coarse"))}
    assert got == want and len(quick_rows) == len(want) == 2 * 11
    for r in quick_rows:
        assert r["saved_bytes_per_token"] > 0 and r["median_ms"] > 0 and math.isfinite(r["loss_step1"])
        assert r["backend"] == {"eager": "reference", "fused": "native"}.get(r["mode"], "")


def test_ratios_are_against_the_right_rows(quick_rows):
    by = {(r["model"], r["mode"], r["ablation"], r["granularities"]): r for r in quick_rows}
    for (model, mode, abl, grans), r in by.items():
        floor = by[(model, "floor", "-", "-")]
        if mode == "floor":
            assert r["saved_vs_floor"] == "" and r["saved_vs_edge"] == ""
            continue
        assert r["saved_vs_floor"] == round(r["saved_bytes_per_token"] / floor["saved_bytes_per_token"], 4)
        if mode == "edge":
            assert r["saved_vs_eager"] == "" and r["saved_vs_edge"] == ""
        else:
            eager, edge = by[(model, "eager", abl, grans)], by[(model, "edge", abl, "edges")]
            want = round(r["median_ms"] / eager["median_ms"], 4) if mode == "fused" else ""  # not against itself
            assert r["time_vs_eager"] == want
            assert r["saved_vs_edge"] == round(r["saved_bytes_per_token"] / edge["saved_bytes_per_token"], 4)


def test_fused_saves_less_than_eager_and_edge_pruning(quick_rows):
    """The ordering the benchmark exists to show, on exact byte counts."""
    by = {(r["model"], r["mode"], r["ablation"], r["granularities"]): r["saved_bytes_per_token"] for r in quick_rows}
    for model in ("tiny-gpt2", "tiny-llama"):
        for abl in ("zero", "interchange"):
            for grans in ("all", "coarse"):
                assert by[(model, "fused", abl, grans)] < by[(model, "eager", abl, grans)]
                assert by[(model, "eager", abl, grans)] < by[(model, "edge", abl, "edges")]


def test_sequential_runs_and_edge_limit_skip_only_edge_pruning():
    """The GPU's one-case-at-a-time path, run on the CPU, and the edge-pruning token limit."""
    rows = bps.main(["--quick", "--models", "tiny-llama", "--sequential", "--repeats", "1", "--warmup", "0",
                     "--edge-max-tokens", "63"])
    assert len(rows) == 9 and not any(r["mode"] == "edge" for r in rows)
    assert all(r["median_ms"] > 0 and r["saved_bytes_per_token"] > 0 for r in rows)


def test_case_steps_reach_every_gate_and_restore_the_model():
    cfg = bps.model_config("tiny-llama")
    model = bps.build_model(cfg, torch.float32, "cpu")
    ids, corrupt = bps.make_batch(cfg, 2, 8, "cpu")
    full = bps.full_logprobs(model, ids)
    forwards = {m: m.forward for m in model.modules()}
    for mode, grans in (("eager", "all"), ("fused", "coarse"), ("edge", "edges")):
        with bps.Case(model, ids, corrupt, full, mode, "interchange", grans) as case:
            logits, wrt = case.forward()
            grads = torch.autograd.grad(bps.last_position_kl(logits, full), wrt)
            assert len(wrt) > 0 and all(torch.isfinite(g).all() for g in grads)
            assert any(g.abs().sum() > 0 for g in grads)
    assert {m: m.forward for m in model.modules()} == forwards
    assert not any(p.requires_grad for p in model.parameters())


def test_layer_and_batch_extrapolation_is_exact():
    """--saved-only carries counts from 2-5 layers and batches 1, 2 to the full depth and batch: on a tiny
    Llama that must equal a 7-layer count (linear for node pruning, quadratic for edge pruning) and a
    batch-3 count."""
    cases = [("floor", "-", "-"), ("fused", "interchange", "all"), ("eager", "zero", "all"), ("edge", "zero", "edges")]
    counts = bps.count_models("tiny-llama", (2, 3, 4, 5, 7), cases, 16, torch.float32, "cpu", batches=(1, 2, 3))
    for case in cases:
        c = {n: counts[case][n][1]["saved_bytes"] for n in counts[case]}
        assert bps.extrapolate(c, 7) == c[7], case
        # and linear in the batch: batch 3 from batches 1 and 2
        for n in (2, 7):
            assert bps.at_batch(counts[case][n], 3) == counts[case][n][3]["saved_bytes"], (case, n)
            assert bps.at_batch(counts[case][n], 3, "loss_saved_bytes") == counts[case][n][3]["loss_saved_bytes"]
    edge = {n: counts[cases[3]][n][1]["saved_bytes"] for n in (2, 3, 4)}
    assert edge[4] - 2 * edge[3] + edge[2] > 0  # edge pruning's bytes do grow quadratically
    with pytest.raises(SystemExit, match="not quadratic"):
        bps.extrapolate({2: 10, 3: 20, 4: 40, 5: 100}, 7)


@pytest.mark.parametrize("limit", [0, 1, 2, 5, 37, 64, 100])
def test_largest_fitting_finds_the_limit_in_few_trials(limit):
    tried = []

    def fits(n):
        tried.append(n)
        return n <= limit

    assert bps.largest_fitting(fits, cap=100) == limit
    assert len(tried) <= 2 * math.ceil(math.log2(101)) + 1


def test_saved_only_rows(tmp_path):
    rows = bps.main(["--saved-only", "--quick", "--models", "tiny-gpt2", "--out", str(tmp_path / "s.csv")])
    assert {(r["batch"], r["seq"]) for r in rows} == {(1, 32), (3, 32)} and len(rows) == 22
    assert all(r["method"] == "measured" + ("" if r["batch"] == 1 else " (batch 1, 2)") for r in rows)
    assert all(r["saved_bytes_per_token"] > 0 for r in rows)


def test_bad_points_and_models_say_what_to_do():
    with pytest.raises(SystemExit, match="BATCHxSEQ"):
        bps.main(["--quick", "--points", "32-64"])
    with pytest.raises(SystemExit, match="unknown model shape"):
        bps.model_config("gpt5")
    if not torch.cuda.is_available():
        with pytest.raises(SystemExit, match="needs a CUDA GPU"):
            bps.main(["--fit", "--quick"])

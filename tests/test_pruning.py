"""The pruning run: objectives, sparsity terms, the loop, evaluation, the run directory, resume and NaN stops.

Runs use the PyTorch reference backend on tiny models (the kernels' agreement with it is tested elsewhere).
"""
import json
import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

import nodeprune_kernels as npk
from nodeprune_kernels.pruning import objectives as obj
from nodeprune_kernels.pruning import run as run_mod
from nodeprune_kernels.pruning.compare import format_comparison, neuron_overlap
from nodeprune_kernels.pruning.config import PruneConfig
from nodeprune_kernels.pruning.evaluate import evaluate_circuit
from nodeprune_kernels.pruning.outputs import load_gates
from nodeprune_kernels.pruning.report import show
from nodeprune_kernels.pruning.run import NonFiniteLossError, batch_index, prune
from nodeprune_kernels.pruning.sparsity import Sparsity
from nodeprune_kernels.tasks.base import TaskData
from tiny_models import tiny_model

FAST = dict(steps=12, batch_size=8, n_eval=8, log_every=2, checkpoint_every=4, curve_points=3, backend="reference")


def induction_data(n=32, P=6, vocab=61, seed=0) -> TaskData:
    """Random prefixes repeated once; the repeated half's next tokens are the targets."""
    g = torch.Generator().manual_seed(seed)
    prefix = torch.randint(3, vocab, (n, P), generator=g)
    ids = torch.cat([prefix, prefix], 1)
    corrupt = torch.cat([prefix, torch.randint(3, vocab, (n, P), generator=g)], 1)
    pos = torch.zeros(n, 2 * P, dtype=torch.bool)
    pos[:, P:-1] = True
    target = torch.full((n, 2 * P), -1)
    target[:, P:-1] = ids[:, P + 1:]
    distractor = torch.full((n, 2 * P), -1)
    distractor[:, P:-1] = corrupt[:, P + 1:]
    return TaskData("induction-test", ids, corrupt, torch.ones_like(ids), pos, target, distractor,
                    torch.zeros(n, dtype=torch.bool))


# ------------------------------------------------------------------------------------------ objectives
def test_objectives_against_formulas():
    g = torch.Generator().manual_seed(0)
    logits, full = torch.randn(5, 11, generator=g), torch.randn(5, 11, generator=g)
    target, distractor = torch.tensor([1, 2, 3, 4, 5]), torch.tensor([0, -1, 7, 7, 1])
    p, q = full.softmax(-1), logits.softmax(-1)
    kl = (p * (p.log() - q.log())).sum()
    torch.testing.assert_close(obj.objective_sum("kl", logits, full, target, distractor), kl)
    ld = logits.gather(1, target[:, None])[:, 0] - logits.gather(1, distractor.clamp_min(0)[:, None])[:, 0]
    ld_full = full.gather(1, target[:, None])[:, 0] - full.gather(1, distractor.clamp_min(0)[:, None])[:, 0]
    has = distractor >= 0
    torch.testing.assert_close(obj.objective_sum("logit_diff", logits, full, target, distractor),
                               ((ld - ld_full)[has] ** 2).sum())
    torch.testing.assert_close(obj.objective_sum("ce", logits, full, target, distractor),
                               F.cross_entropy(logits, target, reduction="sum"))
    m = obj.metric_sums(logits, full, target, distractor)
    acc = torch.where(has, ld > 0, logits.argmax(-1) == target).sum()
    assert m["accuracy"] == acc and m["count"] == 5 and m["count_ld"] == 4
    assert m["exact_match"] == (logits.argmax(-1) == full.argmax(-1)).sum()
    good, bad = torch.tensor([[1, 2, -1]] * 5), torch.tensor([[3, -1, -1]] * 5)
    torch.testing.assert_close(obj.prob_diff(logits, good, bad), q[:, 1] + q[:, 2] - q[:, 3])
    with pytest.raises(ValueError, match="unknown objective"):
        obj.check_objective("mse")


# ------------------------------------------------------------------------------------------ sparsity
def _masks():
    model = tiny_model("llama")
    masks = npk.apply_node_pruning(model, ("head", "mlp_neuron"), backend="reference")
    with torch.no_grad():
        masks.log_alpha["head"].normal_(generator=torch.Generator().manual_seed(1))
    return model, masks


def test_penalty_is_lambda_times_mean_expected_l0():
    model, masks = _masks()
    term, s = Sparsity(masks.granularities, "penalty", {"head": 2.0, "mlp_neuron": 0.5})(masks, 0)
    l0 = masks.expected_l0()
    torch.testing.assert_close(term, 2.0 * l0["head"].mean() + 0.5 * l0["mlp_neuron"].mean())
    torch.testing.assert_close(s["head"], 1 - l0["head"].mean())
    npk.remove_node_pruning(model)


def test_lagrangian_ascends_towards_the_target_with_warmup():
    model, masks = _masks()
    sp = Sparsity(masks.granularities, "target", targets=0.6, warmup_steps=10, update="lagrangian")
    assert sp.target_at(0) == {"head": 0.0, "mlp_neuron": 0.0} and sp.target_at(5)["head"] == pytest.approx(0.3)
    assert sp.target_at(50)["mlp_neuron"] == pytest.approx(0.6)
    opt = sp.optimizer(0.1)
    term, s = sp(masks, 20)
    term.backward()
    gap = torch.stack([s[g] - 0.6 for g in masks.granularities]).detach()
    torch.testing.assert_close(sp.lambda1.grad, gap)      # d term / d lambda1 = (s - t)
    opt.step()
    torch.testing.assert_close(sp.lambda1.detach(), 0.1 * gap)  # ascent: lambda1 moves with the gap
    # the gates are pushed towards the target: with lambda1 = 0.1 * gap < 0 (s < t), sparser is cheaper
    masks.zero_grad()
    sp(masks, 20)[0].backward()
    assert (masks.log_alpha["head"].grad > 0).all()  # raising log_alpha (denser) costs
    npk.remove_node_pruning(model)


@pytest.mark.parametrize("kwargs, match", [
    (dict(sparsity="penalty", lambdas={"head": 1.0}), "missing for"),
    (dict(targets={"head": 0.5, "nope": 1}), "not gated"),
    (dict(targets=1.0), r"in \[0, 1\)"),
    (dict(ablation="resample"), "unknown ablation"),
    (dict(granularities=("neuron",)), "unknown granularity"),
    (dict(steps=0), "steps must be"),
    (dict(steps=2.5), "steps must be an int"),
    (dict(batch_size=True), "batch_size must be an int"),
    (dict(init_std=-1.0), "init_std is a standard deviation"),
    (dict(init_std=float("nan")), "init_std is a standard deviation"),
    (dict(init_log_alpha=float("inf")), "init_log_alpha must be finite"),
    (dict(seed=-1), r"seed must be an int in \[0, 2\*\*31\)"),
    (dict(seed=2**31), r"seed must be an int in \[0, 2\*\*31\)"),
    (dict(dtype="fp8"), "unknown dtype"),
])
def test_config_errors(kwargs, match):
    with pytest.raises(ValueError, match=match):
        PruneConfig(**kwargs)


def test_config_round_trip():
    c = PruneConfig(granularities=("head", "mlp"), targets={"head": 0.5, "mlp": 0.2}, task_options={"a": 1})
    assert PruneConfig.from_dict(json.loads(json.dumps(c.to_dict()))) == c
    with pytest.raises(ValueError, match="unknown PruneConfig option"):
        PruneConfig.from_dict({"stpes": 3})


def test_batches_are_a_function_of_the_step():
    a = [batch_index(s, 20, 6, 3) for s in range(9)]
    assert all(torch.equal(x, y) for x, y in zip(a, [batch_index(s, 20, 6, 3) for s in range(9)]))
    first_epoch = torch.cat(a[:3])
    assert len(set(first_epoch.tolist())) == 18  # an epoch draws without replacement
    assert not torch.equal(torch.cat(a[3:6]), first_epoch)
    assert torch.equal(batch_index(5, 4, 8, 0), torch.arange(4))


# ------------------------------------------------------------------------------------------ the loop
@pytest.mark.parametrize("ablation", ["zero", "mean", "interchange"])
def test_prune_writes_a_run(tmp_path, ablation):
    model = tiny_model("llama")
    before = {k: v.clone() for k, v in model.state_dict().items()}
    res = prune(model, induction_data(), PruneConfig(ablation=ablation, **FAST), run_dir=tmp_path, progress=False)
    assert not npk.is_patched(model) and not model.training
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())
    assert all(p.requires_grad for p in model.parameters())  # restored as they were
    for name in ("config.json", "checkpoint.pt", "gates.safetensors", "circuit.json", "metrics.json",
                 "history.json", "training.png", "circuit.png", "curve.png", "circuit.html"):
        assert (tmp_path / name).is_file(), name
    assert npk.Circuit.from_json(str(tmp_path / "circuit.json")) == res.circuit
    gates = load_gates(tmp_path / "gates.safetensors")
    assert all(torch.equal(gates[g], res.log_alpha[g]) for g in res.log_alpha)
    assert [h["step"] for h in res.history] == list(range(2, 13, 2))
    m = res.metrics
    assert m["n_examples"] == 8 and 0 <= m["kl"] and 0 <= m["accuracy"] <= 1 and "logit_diff" in m
    assert res.curve[0]["nodes_kept"] == 1.0 and res.curve[0]["kl"] == pytest.approx(0, abs=1e-5)
    assert "held-out (8 examples)" in show(tmp_path)


def test_evaluation_matches_a_hand_computed_circuit_run():
    """evaluate_circuit's KL is the KL between the full model and the circuit run through use_circuit."""
    model = tiny_model("llama")
    data = induction_data(n=6)
    masks = npk.apply_node_pruning(model, ("head",), ablation="interchange", backend="reference")
    kept = torch.ones(2, 4, dtype=torch.bool)
    kept[1, :3] = False
    circuit = npk.Circuit({"head": kept}, masks.dims)
    masks.eval()
    m = evaluate_circuit(model, masks, data, circuit, batch_size=4)
    with torch.no_grad():
        with masks.all_open():
            full = model(**data.model_inputs()).logits
        with masks.use_circuit(circuit), masks.interchange(**data.model_inputs(corrupted=True)):
            circ = model(**data.model_inputs()).logits
    p, q = full[data.positions].log_softmax(-1), circ[data.positions].log_softmax(-1)
    kl = (p.exp() * (p - q)).sum(-1).mean()
    assert m["kl"] == pytest.approx(float(kl), rel=1e-5) and m["kl"] > 1e-3
    assert m["exact_match"] == pytest.approx(float((circ[data.positions].argmax(-1) ==
                                                    full[data.positions].argmax(-1)).float().mean()))
    npk.remove_node_pruning(model)


def test_a_target_run_reaches_its_sparsity():
    model = tiny_model("llama")
    res = prune(model, induction_data(), PruneConfig(ablation="zero", granularities=("head", "mlp_neuron"),
                targets=0.5, warmup=0.3, lambda_lr=0.5, lr=0.2, **dict(FAST, steps=60)), progress=False)
    last = res.history[-1]
    assert abs(last["sparsity/head"] - 0.5) < 0.15 and abs(last["sparsity/mlp_neuron"] - 0.5) < 0.15, last


def test_a_penalty_closes_gates_and_no_penalty_keeps_them():
    sparsities = []
    for lam in (0.0, 5.0):
        res = prune(tiny_model("llama"), induction_data(), PruneConfig(
            ablation="zero", sparsity="penalty", lambdas=lam, lr=0.3, **dict(FAST, steps=30)), progress=False)
        sparsities.append(res.history[-1]["sparsity/mean"])
    assert sparsities[0] < 0.05 < 0.3 < sparsities[1], sparsities


def test_gradient_checkpointing_changes_nothing():
    outs, calls = [], []
    for ckpt in (False, True):
        model = tiny_model("llama")
        n = []
        # a pre-hook inside the checkpoint (the recomputation stops early, inside the MLP, before forward hooks)
        model.model.layers[0].mlp.register_forward_pre_hook(lambda *a: n.append(1))
        res = prune(model, induction_data(), PruneConfig(gradient_checkpointing=ckpt, init_log_alpha=0.5,
                                                         **dict(FAST, steps=4)),
                    progress=False)
        outs.append(res.log_alpha)
        calls.append(len(n))
    assert calls[1] == calls[0] + 4  # one recomputation per training step
    for g in outs[0]:
        torch.testing.assert_close(outs[1][g], outs[0][g], rtol=1e-5, atol=1e-6)


def test_gradient_checkpointing_the_user_enabled_stays_enabled():
    """prune restores the model: a model that had checkpointing on (with its own options) keeps it."""
    model = tiny_model("llama")
    model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": True})
    funcs = {n: m._gradient_checkpointing_func for n, m in model.named_modules()
             if getattr(m, "gradient_checkpointing", False)}
    assert funcs
    prune(model, induction_data(), PruneConfig(gradient_checkpointing=True, **dict(FAST, steps=2)), progress=False)
    after = {n: m._gradient_checkpointing_func for n, m in model.named_modules()
             if getattr(m, "gradient_checkpointing", False)}
    assert after == funcs  # still on, with the user's function (use_reentrant=True), not prune's
    off = tiny_model("llama")
    prune(off, induction_data(), PruneConfig(gradient_checkpointing=True, **dict(FAST, steps=2)), progress=False)
    assert not any(getattr(m, "gradient_checkpointing", False) for m in off.modules())


def test_prune_errors(tmp_path):
    model = tiny_model("llama")
    data = induction_data()
    with pytest.raises(ValueError, match="vocabulary has 61"):
        bad = induction_data(vocab=100)
        prune(model, bad, PruneConfig(**FAST), progress=False)
    no_distractor = induction_data()
    no_distractor.distractor.fill_(-1)
    with pytest.raises(ValueError, match="needs a distractor"):
        prune(model, no_distractor, PruneConfig(objective="logit_diff", **FAST), progress=False)
    prune(model, data, PruneConfig(**dict(FAST, steps=2)), run_dir=tmp_path, progress=False)
    with pytest.raises(ValueError, match="other options.*steps"):
        prune(model, data, PruneConfig(**dict(FAST, steps=3)), run_dir=tmp_path, progress=False)
    with pytest.raises(ValueError, match="other data"):
        prune(model, induction_data(seed=5), PruneConfig(**dict(FAST, steps=2)), run_dir=tmp_path, progress=False)
    npk.apply_node_pruning(model)
    with pytest.raises(RuntimeError, match="remove_node_pruning"):
        prune(model, data, PruneConfig(**FAST), progress=False)
    npk.remove_node_pruning(model)
    assert not npk.is_patched(model)


def test_resume_refuses_changed_data_and_junk_and_allows_another_backend(tmp_path):
    model = tiny_model("llama")
    data = induction_data()
    cfg = PruneConfig(**dict(FAST, steps=2))
    prune(model, data, cfg, run_dir=tmp_path, progress=False)
    other_distractor = induction_data()
    other_distractor.distractor[0, other_distractor.distractor[0] >= 0] += 1
    other_split = induction_data()
    other_split.is_eval[:3] = True
    for changed in (other_distractor, other_split):
        with pytest.raises(ValueError, match="other data"):
            prune(model, changed, cfg, run_dir=tmp_path, progress=False)
    # the same gates on every backend: a run may resume on another one
    prune(model, data, cfg.replace(backend="triton"), run_dir=tmp_path, progress=False)
    (tmp_path / "checkpoint.pt").write_bytes(b"not a checkpoint")
    with pytest.raises(ValueError, match="not a readable pruning checkpoint.*delete it"):
        prune(model, data, cfg, run_dir=tmp_path, progress=False)
    torch.save({"format": 1}, tmp_path / "checkpoint.pt")
    with pytest.raises(ValueError, match="checkpoint format 1"):
        prune(model, data, cfg, run_dir=tmp_path, progress=False)
    torch.save({"format": 2, "config": cfg.to_dict()}, tmp_path / "checkpoint.pt")
    with pytest.raises(ValueError, match="checkpoint lacks meta, step, log_alpha"):
        prune(model, data, cfg, run_dir=tmp_path, progress=False)
    assert not npk.is_patched(model)


def test_nan_loss_stops_and_keeps_the_last_good_checkpoint(tmp_path, monkeypatch):
    real = obj.objective_sum
    calls = []

    def poisoned(*args):
        calls.append(1)
        out = real(*args)
        return out * float("nan") if len(calls) == 7 else out

    monkeypatch.setattr(run_mod, "objective_sum", poisoned)
    model = tiny_model("llama")
    cfg = PruneConfig(**FAST)
    with pytest.raises(NonFiniteLossError, match=f"step 7.*last good checkpoint is in {tmp_path}"):
        prune(model, induction_data(), cfg, run_dir=tmp_path, progress=False)
    assert not npk.is_patched(model)
    state = torch.load(tmp_path / "checkpoint.pt", weights_only=True)
    assert state["step"] == 4
    gates = load_gates(tmp_path / "gates.safetensors")
    assert all(torch.isfinite(t).all() and torch.equal(t, state["log_alpha"][g]) for g, t in gates.items())
    monkeypatch.setattr(run_mod, "objective_sum", real)
    resumed = prune(model, induction_data(), cfg, run_dir=tmp_path, progress=False)
    fresh = prune(tiny_model("llama"), induction_data(), cfg, progress=False)
    assert all(torch.equal(resumed.log_alpha[g], fresh.log_alpha[g]) for g in fresh.log_alpha)


RUNNER = textwrap.dedent("""
    import sys, time, torch
    sys.path.insert(0, {tests!r})
    torch.set_num_threads(1)
    from tiny_models import tiny_model
    from test_pruning import induction_data, FAST
    from nodeprune_kernels.pruning import run as run_mod
    from nodeprune_kernels.pruning.config import PruneConfig
    if len(sys.argv) > 2:  # slow down after the first checkpoint so the parent can kill us mid-run
        real = run_mod._train_step
        def slow(*a, **k):
            out = real(*a, **k)
            if a[7] >= 4:
                time.sleep(1.0)
            return out
        run_mod._train_step = slow
    cfg = PruneConfig(**dict(FAST, steps=16))
    run_mod.prune(tiny_model("llama"), induction_data(), cfg, run_dir=sys.argv[1], progress=False)
""")


def test_a_killed_run_resumes_with_nothing_lost(tmp_path):
    script = tmp_path / "runner.py"
    script.write_text(RUNNER.format(tests=str(Path(__file__).parent)))
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(Path(__file__).parents[1]),
                                                       os.environ.get("PYTHONPATH", "")]))
    env.pop("TRITON_INTERPRET", None)
    killed, whole = tmp_path / "killed", tmp_path / "whole"
    proc = subprocess.Popen([sys.executable, str(script), str(killed), "slow"], env=env)
    deadline = time.time() + 120
    while time.time() < deadline and not (killed / "checkpoint.pt").exists():
        time.sleep(0.1)
    time.sleep(1.5)  # into the slow steps after the step-4 checkpoint
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    state = torch.load(killed / "checkpoint.pt", weights_only=True)
    assert 4 <= state["step"] < 16 and not (killed / "circuit.json").exists()
    subprocess.run([sys.executable, str(script), str(killed)], env=env, check=True, timeout=300)
    subprocess.run([sys.executable, str(script), str(whole)], env=env, check=True, timeout=300)
    a, b = load_gates(killed / "gates.safetensors"), load_gates(whole / "gates.safetensors")
    assert a.keys() == b.keys() and all(torch.equal(a[g], b[g]) for g in a)
    ha = json.loads((killed / "history.json").read_text())
    assert ha == json.loads((whole / "history.json").read_text()) and len(ha) == 8


# ------------------------------------------------------------------------------------------ compare
def test_neuron_overlap_counts():
    model = tiny_model("llama")
    masks = npk.apply_node_pruning(model, backend="reference")
    npk.remove_node_pruning(model)
    d = masks.dims
    heads = torch.ones(2, 4, dtype=torch.bool)
    heads[0, 1] = False
    coarse = npk.Circuit({"head": heads, "mlp": torch.tensor([True, False])}, d)
    an = torch.ones(2, 32, dtype=torch.bool)
    an[0, :3] = False       # 3 neurons of head 0 (kept by coarse)
    an[0, 8:10] = False     # 2 neurons of head 1 (already closed by coarse)
    mn = torch.ones(2, 40, dtype=torch.bool)
    mn[0, :5] = False
    mn[1, :7] = False       # layer 1's MLP is closed in coarse: nothing to drop there
    fine = npk.Circuit({"attn_neuron": an, "mlp_neuron": mn}, d)
    cmp = neuron_overlap(coarse, fine)
    l0, l1 = cmp["layers"]
    assert (l0["attn_neuron/coarse"], l0["attn_neuron/dropped"]) == (24, 3)
    assert (l0["mlp_neuron/coarse"], l0["mlp_neuron/dropped"]) == (40, 5)
    assert (l1["mlp_neuron/coarse"], l1["mlp_neuron/dropped"]) == (0, 0)
    assert cmp["totals"]["attn_neuron/dropped"] == 3
    assert "12.5%" in format_comparison(cmp)  # 3 of layer 0's 24

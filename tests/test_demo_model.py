"""The demo model shipped in the package: it loads offline, does induction, and its mechanism is measurable."""
import importlib.util
import json
from pathlib import Path

import pytest
import torch
import transformers

import nodeprune_kernels as npk
from nodeprune_kernels import demo
from nodeprune_kernels.model.families import family_of, model_dims
from nodeprune_kernels.model.patch import is_patched

ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="module")
def model():
    return demo.load_demo_model()


@pytest.fixture(scope="module")
def scores(model):
    return demo.head_scores(model)


@pytest.fixture(scope="module")
def mechanism(model):
    return demo.known_mechanism(model)


def _circuit(model, kept_heads):
    return npk.Circuit({"head": kept_heads}, model_dims(model, family_of(model)))


def test_shipped_files():
    names = sorted(p.name for p in demo.DEMO_MODEL_DIR.iterdir())
    assert "config.json" in names and "model.safetensors" in names and "training.json" in names
    assert sum(p.stat().st_size for p in demo.DEMO_MODEL_DIR.iterdir()) < 2 * 2 ** 20


def test_loads_offline(model, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    m = demo.load_demo_model()
    assert isinstance(m, transformers.LlamaForCausalLM) and not m.training
    assert m.config._attn_implementation == "sdpa"
    assert m.config.num_hidden_layers == 2 and m.config.num_attention_heads == 4
    assert next(m.parameters()).dtype == torch.float32
    assert demo.load_demo_model(dtype=torch.bfloat16).lm_head.weight.dtype == torch.bfloat16


@pytest.mark.parametrize("prefix_len", [8, 16, 24])
def test_does_induction(model, prefix_len):
    first, second = demo.induction_losses(model, n=64, prefix_len=prefix_len, seed=prefix_len + 100)
    assert first > 2.5, first      # unpredictable random tokens: about log(63 - t)
    assert second < 0.3, second    # the repeated half, by induction


def test_induction_batch():
    ids = demo.induction_batch(5, 10, 64, torch.Generator().manual_seed(0))
    assert ids.shape == (5, 21) and (ids[:, 0] == demo.BOS).all()
    assert torch.equal(ids[:, 1:11], ids[:, 11:])
    assert ((ids[:, 1:] >= 1) & (ids[:, 1:] < 64)).all()
    assert all(len(set(row[1:11].tolist())) == 10 for row in ids)  # distinct tokens
    with pytest.raises(ValueError):
        demo.induction_batch(1, 64, 64)


def test_attention_patterns_are_causal_distributions(model):
    ids = demo.induction_batch(3, 8, 64, torch.Generator().manual_seed(1))
    A = demo.attention_patterns(model, ids)
    assert A.shape == (2, 3, 4, 17, 17)
    torch.testing.assert_close(A.sum(-1), torch.ones(2, 3, 4, 17))
    assert float(A.triu(1).abs().max()) == 0.0
    assert model.config._attn_implementation == "sdpa"  # restored


def test_head_scores_find_the_mechanism(model, scores, mechanism):
    for role in ("prev_token", "induction"):
        assert scores[role].shape == (2, 4) and scores[role].dtype == torch.float32
    # a previous-token head in layer 0, an induction head in layer 1
    assert float(scores["prev_token"][0].max()) > demo.MECHANISM_THRESHOLD
    assert float(scores["induction"][1].max()) > demo.MECHANISM_THRESHOLD
    # and not the other way round: layer 0 cannot do induction, layer 1 is no previous-token layer
    assert float(scores["induction"][0].max()) < 0.2
    assert float(scores["prev_token"][1].max()) < 0.2
    assert mechanism["prev_token"] and all(l == 0 for l, _ in mechanism["prev_token"])
    assert mechanism["induction"] and all(l == 1 for l, _ in mechanism["induction"])
    for role in ("prev_token", "induction"):
        for l, h in mechanism[role]:
            assert float(scores[role][l, h]) > demo.MECHANISM_THRESHOLD


def test_scores_match_training_record(scores):
    record = json.loads((demo.DEMO_MODEL_DIR / "training.json").read_text())
    assert set(record["head_scores"]) == set(scores) == {"prev_token", "induction", "current_token"}
    for role in scores:
        torch.testing.assert_close(scores[role], torch.tensor(record["head_scores"][role]), atol=2e-3, rtol=0)


def test_head_scores_on_a_patched_model(scores):
    m = demo.load_demo_model()
    masks = npk.apply_node_pruning(m, granularities=("head",), seed=0)
    with torch.no_grad():
        masks.log_alpha["head"].fill_(-5.0)  # every head closed: a patched forward would see no attention
    try:
        patched = demo.head_scores(m)
        assert is_patched(m)
        assert m.config._attn_implementation == "sdpa"
    finally:
        npk.remove_node_pruning(m)
    for role in scores:
        torch.testing.assert_close(patched[role], scores[role])


def test_mechanism_is_causal(model, mechanism):
    """Zero-ablating every head but the mechanism's (the best previous-token, current-token and induction head)
    keeps induction; ablating the previous-token or the current-token heads of layer 0 breaks it."""
    assert mechanism["current_token"] and all(l == 0 for l, _ in mechanism["current_token"])
    minimal = torch.zeros(2, 4, dtype=torch.bool)
    for role in ("prev_token", "current_token", "induction"):
        minimal[mechanism[role][0]] = True
    assert demo.ablated_induction_losses(model, minimal, n=32)[1] < 0.3
    for role in ("prev_token", "current_token"):
        kept = torch.ones(2, 4, dtype=torch.bool)
        for head in mechanism[role]:
            kept[head] = False
        assert demo.ablated_induction_losses(model, kept, n=32)[1] > 1.0, role
    no_layer1 = torch.ones(2, 4, dtype=torch.bool)
    no_layer1[1] = False
    assert demo.ablated_induction_losses(model, no_layer1, n=32)[1] > 2.5
    torch.testing.assert_close(demo.ablated_induction_losses(model, torch.ones(2, 4, dtype=torch.bool)),
                               demo.induction_losses(model))


def test_random_model_has_no_mechanism():
    """Negative control: the same architecture untrained has no induction and no induction head."""
    torch.manual_seed(0)
    config = transformers.AutoConfig.from_pretrained(demo.DEMO_MODEL_DIR)
    config._attn_implementation = "sdpa"
    m = transformers.LlamaForCausalLM(config).eval()
    first, second = demo.induction_losses(m, n=16)
    assert second > 2.5
    s = demo.head_scores(m, n=16)
    assert float(s["induction"][1].max()) < demo.MECHANISM_THRESHOLD
    assert float(s["prev_token"][0].max()) < demo.MECHANISM_THRESHOLD


def test_check_mechanism(model, mechanism):
    all_heads = torch.ones(2, 4, dtype=torch.bool)
    ok, msg = demo.check_mechanism(_circuit(model, all_heads), model, mechanism)
    assert ok, msg
    assert demo.check_mechanism(_circuit(model, all_heads), model)[0]  # measuring the mechanism itself

    no_induction = all_heads.clone()
    for l, h in mechanism["induction"]:
        no_induction[l, h] = False
    ok, msg = demo.check_mechanism(_circuit(model, no_induction), model, mechanism)
    assert not ok
    assert "MISS induction" in msg and f"L{mechanism['induction'][0][0]}H{mechanism['induction'][0][1]}" in msg

    no_prev = all_heads.clone()
    for l, h in mechanism["prev_token"]:
        no_prev[l, h] = False
    ok, msg = demo.check_mechanism(_circuit(model, no_prev), model, mechanism)
    assert not ok and "MISS previous-token" in msg

    # the minimal circuit: one previous-token head and one induction head
    minimal = torch.zeros(2, 4, dtype=torch.bool)
    minimal[mechanism["prev_token"][0]] = True
    minimal[mechanism["induction"][0]] = True
    ok, msg = demo.check_mechanism(_circuit(model, minimal), model, mechanism)
    assert ok, msg
    assert "info current-token heads: kept none" in msg  # reported, not required

    # a circuit whose layer 1 is closed as a whole (the implied heads count as dropped)
    circuit = npk.Circuit({"layer": torch.tensor([True, False]), "head": all_heads},
                          model_dims(model, family_of(model)))
    assert not demo.check_mechanism(circuit, model, mechanism)[0]


def test_training_recipe_is_recorded(model):
    record = json.loads((demo.DEMO_MODEL_DIR / "training.json").read_text())
    script = ROOT / record["script"]
    assert script.is_file()
    spec = importlib.util.spec_from_file_location("train_demo_model", script)
    train = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(train)
    # the script's recipe is the one recorded, and the shipped model is the one it describes
    assert record["config"] == train.CONFIG
    assert (record["seed"], record["steps"], record["batch"], record["lr"]) == (train.SEED, train.STEPS,
                                                                                train.BATCH, train.LR)
    assert record["prefix_len"] == [train.PREFIX_MIN, train.PREFIX_MAX]
    for key, value in train.CONFIG.items():
        assert getattr(model.config, key) == value, key
    assert record["parameters"] == sum(p.numel() for p in model.parameters())
    assert record["final_repeated_half_loss"] < train.TARGET_LOSS
    assert record["final_first_half_loss"] > 2.5


def test_nodeprune_demo_finds_the_mechanism(tmp_path, capsys):
    """The README's main command: prune the shipped model and check the circuit (about 30 s on 2 cores)."""
    from nodeprune_kernels.cli import main

    assert main(["demo", "--out", str(tmp_path)]) == 0
    out = capsys.readouterr().out
    assert "demo passed" in out and "ok   previous-token heads: kept L0H1" in out
    assert (tmp_path / "circuit.json").exists()

"""Circuit: consistency both ways, counts, JSON round trip, summary, the CoFi-style cut."""
import json

import pytest
import torch

import nodeprune_kernels as npk
from nodeprune_kernels.model.families import ModelDims
from tiny_models import tiny_model

DIMS = ModelDims(n_layers=2, n_heads=4, n_kv_heads=2, head_dim=8, d_model=32, d_ff=40)


def ones(*shape):
    return torch.ones(*shape, dtype=torch.bool)


def test_children_of_a_closed_parent_are_closed():
    layer = torch.tensor([True, False])
    head = ones(2, 4)
    head[0, 2] = False
    c = npk.Circuit({"layer": layer, "head": head, "attn_neuron": ones(2, 32), "mlp_neuron": ones(2, 40)}, DIMS)
    full = c.full()
    assert not full["attn"][1] and not full["mlp"][1] and not full["head"][1].any()
    assert not c.kept["attn_neuron"][1].any() and not c.kept["mlp_neuron"][1].any()
    assert not c.kept["attn_neuron"][0, 16:24].any() and c.kept["attn_neuron"][0, :16].all()
    assert full["mlp_out"][0].all()


def test_a_parent_whose_children_are_all_closed_is_closed():
    neuron = ones(2, 32)
    neuron[0, 8:16] = False  # all of head 1's value dims in layer 0
    mlp_neuron = ones(2, 40)
    mlp_neuron[1] = False
    head = ones(2, 4)
    head[1] = False  # every head of layer 1
    c = npk.Circuit({"attn_neuron": neuron, "mlp_neuron": mlp_neuron, "head": head, "layer": ones(2)}, DIMS)
    full = c.full()
    assert full["head"][0].tolist() == [True, False, True, True]
    assert not full["mlp"][1] and not full["attn"][1]
    assert c.kept["layer"].tolist() == [True, False]  # both blocks of layer 1 closed
    counts = c.counts()
    assert counts["layer"] == (1, 2, 0.5)
    assert counts["head"][:2] == (3, 8)


def test_json_round_trip_and_summary(tmp_path):
    g = torch.Generator().manual_seed(0)
    kept = {"head": torch.rand(2, 4, generator=g) > 0.3, "mlp_neuron": torch.rand(2, 40, generator=g) > 0.5,
            "mlp_out": torch.rand(2, 32, generator=g) > 0.2}
    c = npk.Circuit(kept, DIMS, threshold=0.5, model_type="llama")
    again = npk.Circuit.from_json(c.to_json())
    assert again == c and again.threshold == 0.5 and again.model_type == "llama"
    path = tmp_path / "circuit.json"
    c.to_json(path, indent=1)
    assert npk.Circuit.from_json(str(path)) == c
    assert npk.Circuit.from_json(path) == c  # a pathlib.Path too
    text = c.summary()
    k, n, _ = c.counts()["mlp_neuron"]
    assert f"{'mlp_neuron':<12} {k:>8} {n:>8}" in text and "attn*" in text
    assert text.count("\n") == 2 + 7 + 1 + 1 + DIMS.n_layers - 1


def test_bad_circuits_are_refused():
    with pytest.raises(ValueError, match="head must have shape \\[2, 4\\]"):
        npk.Circuit({"head": ones(2, 5)}, DIMS)
    with pytest.raises(ValueError, match="unknown granularity"):
        npk.Circuit({"neurons": ones(2, 40)}, DIMS)
    with pytest.raises(ValueError, match="unknown circuit format"):
        npk.Circuit.from_dict({"format": 99})
    model = tiny_model("gpt2")
    masks = npk.apply_node_pruning(model, backend="reference")
    other = npk.Circuit({"head": ones(3, 4)}, ModelDims(3, 4, 4, 8, 32, 40))
    with pytest.raises(ValueError, match="found on a model with sizes"):
        with masks.use_circuit(other):
            pass
    with pytest.raises(ValueError, match="unknown circuit method"):
        masks.circuit(method="topk")


def test_circuit_from_masks_threshold_and_expected_zeros():
    model = tiny_model("llama")
    masks = npk.apply_node_pruning(model, granularities=["head", "mlp_neuron"], backend="reference")
    with torch.no_grad():
        masks.log_alpha["head"].copy_(torch.tensor([[5.0, -5.0, 0.0, -0.5], [5.0, 5.0, 5.0, -5.0]]))
        masks.log_alpha["mlp_neuron"].fill_(5.0)
        masks.log_alpha["mlp_neuron"][0, :10] = -5.0
    c = masks.circuit(threshold=0.5)
    # deterministic gate: clamp(sigmoid(a) * 1.2 - 0.1, 0, 1); > 0.5 for a > 0
    assert c.kept["head"].tolist() == [[True, False, False, False], [True, True, True, False]]
    assert int(c.kept["mlp_neuron"].sum()) == 70 and c.model_type == "llama"
    cz = masks.circuit(method="expected_zeros")
    l0 = masks.expected_l0()
    n_closed = int(round(float((1 - l0["head"].detach()).sum())))
    assert int((~cz.kept["head"]).sum()) == n_closed
    # the closed heads are the ones with the smallest log_alpha
    la = masks.log_alpha["head"].detach().flatten()
    assert set(torch.argsort(la)[:n_closed].tolist()) == set((~cz.kept["head"]).flatten().nonzero().flatten().tolist())


def _circuit_dict():
    g = torch.Generator().manual_seed(1)
    kept = {"layer": torch.tensor([True, False]), "head": torch.rand(2, 4, generator=g) > 0.3,
            "mlp_neuron": torch.rand(2, 40, generator=g) > 0.5}
    return npk.Circuit(kept, DIMS, threshold=0.5, model_type="llama")


@pytest.mark.parametrize("edit, message", [
    (lambda d: d["kept"]["head"].pop(), r"kept\['head'\] must have one row per layer \(2\), got 1"),
    (lambda d: d["kept"]["head"][0].append(-1), r"kept\['head'\]\[0\] has indices \[-1\] outside \[0, 4\)"),
    (lambda d: d["kept"]["head"][1].append(4), r"kept\['head'\]\[1\] has indices \[4\] outside \[0, 4\)"),
    (lambda d: d["kept"]["head"].__setitem__(0, [True, False, True, True]), r"kept\['head'\]\[0\] must be a list "
     r"of kept indices \(ints\)"),
    (lambda d: d["kept"]["head"][0].extend([0, 0]), r"kept\['head'\]\[0\] repeats an index"),
    (lambda d: d["kept"].__setitem__("layer", [True, False]), r"kept\['layer'\] must be a list of kept indices"),
    (lambda d: d["kept"].__setitem__("heads", [[0]]), r"kept\['heads'\]: unknown granularity"),
    (lambda d: d.pop("dims"), "'dims' must be an object"),
    (lambda d: d["dims"].pop("n_layers"), "'dims' is not a model's sizes"),
])
def test_malformed_circuit_files_name_the_key(tmp_path, edit, message):
    d = json.loads(_circuit_dict().to_json())
    edit(d)
    path = tmp_path / "c.json"
    path.write_text(json.dumps(d))
    with pytest.raises(ValueError, match=message) as e:
        npk.Circuit.from_json(path)
    assert str(path) in str(e.value)


def test_circuit_format_2_round_trip_and_format_1_still_read():
    c = _circuit_dict()
    d = c.to_dict()
    assert d["format"] == 2 and d["kept"]["layer"] == [0]  # indices for every granularity
    assert npk.Circuit.from_dict(d) == c
    old = dict(d, format=1, kept=dict(d["kept"], layer=[True, False]))
    assert npk.Circuit.from_dict(old) == c
    with pytest.raises(ValueError, match="not valid JSON"):
        npk.Circuit.from_json("{broken")

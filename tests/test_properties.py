"""Property tests with generated inputs (hypothesis): malformed circuit files are rejected with an error naming
the key, any interleaving of the model layer's entry points leaves an unpatched model's logits exactly as
they were, and ``materialize`` computes any circuit of any tiny model of every family."""
import json
import math

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import nodeprune_kernels as npk
from nodeprune_kernels.model.families import ModelDims
from nodeprune_kernels.model.masks import GRANULARITIES, gate_shapes
from test_materialize import assert_logits_close, logits
from tiny_models import FAMILY_NAMES, size_keywords, tiny_batch, tiny_model

DIMS = ModelDims(n_layers=2, n_heads=4, n_kv_heads=2, head_dim=8, d_model=32, d_ff=40)
SIZES = {"head": 4, "attn_neuron": 32, "mlp_neuron": 40, "mlp_out": 32}


def _valid():
    kept = {"layer": torch.tensor([True, True]), "head": torch.tensor([[1, 0, 1, 1], [0, 1, 1, 0]], dtype=torch.bool),
            "mlp_neuron": torch.rand(2, 40, generator=torch.Generator().manual_seed(0)) > 0.5}
    return json.loads(npk.Circuit(kept, DIMS, threshold=0.5, model_type="llama").to_json())


BAD_ROWS = st.one_of(
    st.lists(st.integers(min_value=-50, max_value=-1), min_size=1, max_size=3),        # negative indices
    st.lists(st.integers(min_value=41, max_value=500), min_size=1, max_size=3),        # out of range
    st.lists(st.booleans(), min_size=1, max_size=5),                                   # booleans, not indices
    st.lists(st.floats(allow_nan=True), min_size=1, max_size=3),                       # not ints
    st.text(max_size=5), st.integers(), st.none(),                                     # not a list at all
)


@settings(max_examples=60, deadline=None)
@given(granularity=st.sampled_from(["head", "mlp_neuron"]), layer=st.integers(0, 1), row=BAD_ROWS)
def test_a_malformed_row_is_rejected_naming_its_key(granularity, layer, row):
    d = _valid()
    d["kept"][granularity][layer] = row
    if isinstance(row, list) and all(isinstance(i, int) and not isinstance(i, bool) for i in row) and \
            all(0 <= i < SIZES[granularity] for i in row):
        return  # a valid row after all (e.g. small positive ints for mlp_neuron)
    with pytest.raises(ValueError, match=rf"kept\['{granularity}'\]\[{layer}\]"):
        npk.Circuit.from_dict(d, source="generated.json")


@settings(max_examples=30, deadline=None)
@given(n_rows=st.integers(0, 5).filter(lambda n: n != 2))
def test_a_wrong_number_of_layer_rows_is_rejected(n_rows):
    d = _valid()
    d["kept"]["head"] = [[0]] * n_rows
    with pytest.raises(ValueError, match=r"kept\['head'\] must have one row per layer \(2\)"):
        npk.Circuit.from_dict(d)


ACTIONS = ["apply", "remove", "all_open", "use_circuit", "interchange", "train_forward", "eval_forward"]


@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(actions=st.lists(st.sampled_from(ACTIONS), max_size=8), family=st.sampled_from(["llama", "gpt2"]))
def test_any_interleaving_leaves_the_unpatched_model_exact(actions, family):
    torch.manual_seed(0)
    model = tiny_model(family)
    ids, corrupt = tiny_batch(), tiny_batch(seed=2)
    with torch.no_grad():
        before = model(ids).logits.clone()
    masks = None
    with torch.no_grad():
        for a in actions:
            patched = npk.is_patched(model)
            if a == "apply" and not patched:
                masks = npk.apply_node_pruning(model, ["head", "mlp_neuron"], "interchange", backend="reference")
            elif a == "remove" and patched:
                npk.remove_node_pruning(model)
            elif not patched or a in ("apply", "remove"):
                continue
            elif a == "all_open":
                with masks.all_open():
                    torch.testing.assert_close(model(ids).logits, before, rtol=0, atol=0)
            elif a == "use_circuit":
                with masks.interchange(input_ids=corrupt), masks.use_circuit(masks.circuit(threshold=0.5)):
                    model(ids)
            elif a == "interchange":
                with masks.interchange(input_ids=corrupt):
                    model(ids)
            else:  # a gated forward (interchange ablation needs its corrupted batch), sampling or not
                masks.train(a == "train_forward")
                with masks.interchange(input_ids=corrupt):
                    model(ids)
        if npk.is_patched(model):
            npk.remove_node_pruning(model)
        torch.testing.assert_close(model(ids).logits, before, rtol=0, atol=0)


# ------------------------------------------------------------------------------------------ materialize
@st.composite
def tiny_sizes(draw, family):
    """(tiny_model size kwargs, the ModelDims they give) for ``family``: 1-3 layers, 1-4 heads, kv heads any
    divisor of the heads where the family has grouped-query attention, head_dim 4 or 8, hidden 2, 4 or 8 per
    head (head_dim per head where the config has no head_dim of its own), any MLP width up to 24."""
    free = size_keywords(family)
    layers, heads, head_dim = draw(st.integers(1, 3)), draw(st.integers(1, 4)), draw(st.sampled_from([4, 8]))
    kv = draw(st.sampled_from([k for k in range(1, heads + 1) if heads % k == 0])) if "kv_heads" in free else heads
    # a multiple of the heads (configs check that, even with their own head_dim), not always heads * head_dim
    hidden = heads * (draw(st.sampled_from([2, 4, 8])) if "head_dim" in free else head_dim)
    sizes = dict(layers=layers, heads=heads, kv_heads=kv, head_dim=head_dim, hidden=hidden,
                 intermediate=draw(st.integers(1, 24)))
    dims = ModelDims(n_layers=layers, n_heads=heads, n_kv_heads=kv, head_dim=head_dim, d_model=hidden,
                     d_ff=sizes["intermediate"])
    return {k: v for k, v in sizes.items() if k in free}, dims


@st.composite
def circuits(draw, dims, model_type):
    """A Circuit of a random non-empty set of granularities, each node kept or not at random (made consistent
    by Circuit)."""
    shapes = gate_shapes(dims)
    gated = draw(st.sets(st.sampled_from(GRANULARITIES), min_size=1))
    kept = {}
    for g in (g for g in GRANULARITIES if g in gated):
        n = math.prod(shapes[g])
        bits = draw(st.lists(st.booleans(), min_size=n, max_size=n))
        kept[g] = torch.tensor(bits, dtype=torch.bool).view(shapes[g])
    return npk.Circuit(kept, dims, model_type=model_type)


@pytest.mark.parametrize("family", FAMILY_NAMES)
@settings(max_examples=10, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(data=st.data())
def test_materialize_computes_any_circuit_of_any_tiny_model(family, data):
    sizes, dims = data.draw(tiny_sizes(family), label="sizes")
    model = tiny_model(family, **sizes)
    masks = npk.apply_node_pruning(model, backend="reference").eval()
    assert masks.dims == dims  # the config took the sizes
    circuit = data.draw(circuits(dims, model.config.model_type), label="circuit")
    ids = tiny_batch(vocab=model.config.vocab_size)
    ref = logits(model, ids, masks, circuit)  # the patched model inside use_circuit, zero ablation
    small = npk.materialize(model, circuit, verbose=False)
    assert_logits_close(logits(small, ids), ref)

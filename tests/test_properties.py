"""Property tests with generated inputs (hypothesis): malformed circuit files are rejected with an error naming
the key, any interleaving of the model layer's entry points leaves an unpatched model's logits exactly as
they were, ``materialize`` computes any circuit of any tiny model of every family, and a JSONL task file with a
malformed row is rejected with an error naming the file, the line and the key."""
import json
import math
import re

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import nodeprune_kernels as npk
from nodeprune_kernels.model.families import ModelDims
from nodeprune_kernels.model.masks import GRANULARITIES, gate_shapes
from nodeprune_kernels.tasks import JsonlTask
from nodeprune_kernels.tasks.jsonl import OPTIONAL, REQUIRED
from test_materialize import assert_logits_close, logits
from test_tasks import _words, all_task_texts, word_level
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


# ------------------------------------------------------------------------------------------ JSONL task files
KEYS = REQUIRED + OPTIONAL
NOT_A_STRING = st.one_of(st.integers(), st.floats(), st.booleans(), st.lists(st.integers(), max_size=2),
                         st.dictionaries(st.text(max_size=3), st.integers(), max_size=2))
PARSE_FAULTS = ("missing key", "wrong type", "unknown key", "unknown split", "empty prompt", "repeated key",
                "broken JSON", "not an object", "not UTF-8", "lone surrogate", "huge number", "deep nesting")
BUILD_FAULTS = ("lengths differ", "answer without tokens")


@pytest.fixture(scope="module")
def word():
    return word_level(_words(all_task_texts()))


@st.composite
def jsonl_row(draw, words):
    """A valid row: prompts of one-token words (as many in each), answers of one word, optional keys or not."""
    n = draw(st.integers(1, 5))
    prompt = st.lists(st.sampled_from(words), min_size=n, max_size=n).map(" ".join)
    row = {"clean": draw(prompt), "corrupted": draw(prompt), "target": " " + draw(st.sampled_from(words))}
    if draw(st.booleans()):
        row["distractor"] = draw(st.one_of(st.none(), st.sampled_from(words).map(" ".join)))
    if draw(st.booleans()):
        row["split"] = draw(st.sampled_from(["train", "eval", None]))
    return row


def _spoil(draw, fault, row, words):
    """(the line's bytes, a fragment the error must contain) for ``row`` spoilt by ``fault``."""
    row = dict(row)
    strings = [k for k, v in row.items() if isinstance(v, str)]
    if fault == "missing key":
        key = draw(st.sampled_from(REQUIRED))
        del row[key]
        return json.dumps(row).encode(), f"missing key '{key}'"
    if fault == "wrong type":
        key = draw(st.sampled_from(KEYS))
        row[key] = draw(NOT_A_STRING if key not in REQUIRED else st.one_of(NOT_A_STRING, st.none()))
        return json.dumps(row).encode(), f"'{key}' must be a string"
    if fault == "unknown key":
        key = draw(st.text(max_size=6).filter(lambda k: k not in KEYS))
        row[key] = draw(st.text(max_size=3))
        return json.dumps(row).encode(), f"unknown key(s) {key!r}"
    if fault == "unknown split":
        row["split"] = draw(st.text(max_size=6).filter(lambda s: s not in ("train", "eval")))
        return json.dumps(row).encode(), "split must be one of train, eval"
    if fault == "empty prompt":
        key = draw(st.sampled_from(["clean", "corrupted"]))
        row[key] = draw(st.text(alphabet=" \t\n\u00a0\u2003", max_size=3))
        return json.dumps(row).encode(), f"the {key} prompt is empty"
    if fault == "repeated key":
        key = draw(st.sampled_from(sorted(row)))
        return f'{json.dumps(row)[:-1]}, "{key}": {json.dumps(draw(st.sampled_from(words)))}}}'.encode(), \
            f"key '{key}' appears more than once"
    if fault == "broken JSON":
        text = json.dumps(row)
        return text[:draw(st.integers(1, len(text) - 1))].encode(), "invalid JSON"
    if fault == "not an object":
        value = draw(st.one_of(st.lists(st.text(max_size=3), max_size=3), st.integers(), st.floats(), st.booleans(),
                               st.none(), st.text(max_size=5)))
        return json.dumps(value).encode(), "expected a JSON object"
    if fault == "not UTF-8":
        key = draw(st.sampled_from(strings))
        head, tail = json.dumps(row).encode().split(f'"{key}": "'.encode(), 1)
        bad = draw(st.sampled_from([b"\xff", b"\xc3", b"\x80", b"\xed\xa0\x80", b"\xf0\x9f\x98"]))
        return head + f'"{key}": "'.encode() + bad + tail, "not UTF-8 text"
    if fault == "lone surrogate":
        key = draw(st.sampled_from(strings))
        row[key] += chr(draw(st.integers(0xD800, 0xDFFF)))
        return json.dumps(row).encode(), f"'{key}' is not valid Unicode text"  # written as a \udxxx escape
    if fault == "huge number":
        key = draw(st.sampled_from(KEYS))
        row[key] = "PLACEHOLDER"
        return json.dumps(row).replace('"PLACEHOLDER"', "7" * 5000).encode(), f"'{key}' must be a string"
    if fault == "deep nesting":
        key = draw(st.sampled_from(KEYS))
        row[key] = "PLACEHOLDER"
        return json.dumps(row).replace('"PLACEHOLDER"', "[" * 5000 + "]" * 5000).encode(), "nested too deeply"
    if fault == "lengths differ":
        row["corrupted"] += " " + draw(st.sampled_from(words))
        return json.dumps(row).encode(), "the clean prompt is"
    if fault == "answer without tokens":
        key = draw(st.sampled_from(["target", "distractor"]))
        row[key] = draw(st.sampled_from(["", " ", "  "]))
        return json.dumps(row).encode(), f"the {key} {row[key]!r} tokenizes to nothing"
    raise AssertionError(fault)


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(data=st.data(), fault=st.sampled_from(PARSE_FAULTS + BUILD_FAULTS))
def test_a_malformed_jsonl_row_is_rejected_naming_file_line_and_key(tmp_path_factory, word, data, fault):
    words = sorted(w for w in word.get_vocab() if w.isascii() and w.isalpha())
    rows = data.draw(st.lists(jsonl_row(words), max_size=3), label="valid rows")
    spoilt, fragment = _spoil(data.draw, fault, data.draw(jsonl_row(words)), words)
    lines = [json.dumps(r).encode() for r in rows] + [spoilt]
    for _ in range(data.draw(st.integers(0, 3))):  # blank lines count too
        lines.insert(data.draw(st.integers(0, len(lines) - 1)), data.draw(st.sampled_from([b"", b"  ", b"\t"])))
    line = lines.index(spoilt) + 1
    eol = data.draw(st.sampled_from([b"\n", b"\r\n"]))
    path = tmp_path_factory.mktemp("jsonl") / "rows.jsonl"
    path.write_bytes(data.draw(st.sampled_from([b"", b"\xef\xbb\xbf"])) + eol.join(lines) + eol)  # a BOM or not
    with pytest.raises(ValueError) as e:
        JsonlTask(path).build(word)
    message = str(e.value)
    assert type(e.value) is ValueError, message  # not a UnicodeDecodeError, JSONDecodeError, ...
    assert message.startswith(f"{path}:{line}: ") and fragment in message, message


@settings(max_examples=20, deadline=None)
@given(blank=st.lists(st.sampled_from(["", " ", "\t", "\u00a0"]), max_size=4), eol=st.sampled_from(["\n", "\r\n"]),
       bom=st.booleans())
def test_a_jsonl_file_without_rows_is_rejected_naming_it(tmp_path_factory, blank, eol, bom):
    path = tmp_path_factory.mktemp("jsonl") / "blank.jsonl"
    path.write_text(("\ufeff" if bom else "") + eol.join(blank), encoding="utf-8")
    with pytest.raises(ValueError, match=re.escape(f"{path}: no examples")):
        JsonlTask(path)

"""save_pruned / load_pruned: cut-out models saved as safetensors + JSON, reloaded exactly, for every family."""
import json

import pytest
import torch
import transformers
from test_materialize import CASES, close
from tiny_models import FAMILY_NAMES, tiny_batch, tiny_model

from nodeprune_kernels import apply_node_pruning, load_pruned, materialize, save_pruned
from nodeprune_kernels.model.saving import BUFFERS_FILE, META_FILE, WEIGHTS_FILE


def cut(family, case, dtype=torch.float32):
    model = tiny_model(family, dtype=dtype)
    masks = apply_node_pruning(model, backend="reference")
    close(masks, case)
    return materialize(model, masks.eval().circuit(), verbose=False)


def uniform_cut(family, heads=True):
    """Every layer closes the same heads (a whole kv group with GQA; with ``heads``) and the same number of
    hidden units. Returns the cut-out model and the circuit's logits on tiny_batch()."""
    model = tiny_model(family)
    masks = apply_node_pruning(model, backend="reference")
    with torch.no_grad():
        for p in masks.log_alpha.values():
            p.fill_(30.0)
        if heads:
            masks.log_alpha["head"][:, 2:] = -30.0
        masks.log_alpha["mlp_neuron"][:, :8] = -30.0
    circuit = masks.eval().circuit()
    with torch.no_grad(), masks.use_circuit(circuit):
        ref = model(tiny_batch()).logits
    return materialize(model, circuit, verbose=False), ref


def generate(model, ids):
    with torch.no_grad():
        return model.generate(ids, max_new_tokens=5, do_sample=False, pad_token_id=0)


@pytest.mark.parametrize("case", CASES)
@pytest.mark.parametrize("family", FAMILY_NAMES)
def test_reloaded_logits_and_generate_are_identical(family, case, tmp_path):
    small = cut(family, case)
    save_pruned(small, tmp_path)
    ids = tiny_batch()
    loaded = load_pruned(tmp_path)
    assert type(loaded) is type(small) and not loaded.training
    assert loaded.config.nodeprune_layers == small.config.nodeprune_layers
    assert {k: v.shape for k, v in loaded.state_dict().items()} == {k: v.shape for k, v in small.state_dict().items()}
    with torch.no_grad():
        assert torch.equal(loaded(ids).logits, small(ids).logits)
    assert torch.equal(generate(loaded, ids[:1]), generate(small, ids[:1]))


@pytest.mark.parametrize("family", ["llama", "gpt2", "gemma2"])
def test_tied_and_buffers_come_back_as_saved(family, tmp_path):
    small = cut(family, "partial")
    save_pruned(small, tmp_path)
    meta = json.loads((tmp_path / META_FILE).read_text())
    loaded = load_pruned(tmp_path)
    tied = bool(getattr(small.config, "tie_word_embeddings", False))
    assert bool(meta["tied"]) == tied
    if tied:  # one tensor, not two equal copies
        assert loaded.get_output_embeddings().weight is loaded.get_input_embeddings().weight
    for (n, b), (n2, b2) in zip(small.named_buffers(), loaded.named_buffers()):
        assert n == n2 and torch.equal(b, b2)


def test_dtype_and_device_arguments(tmp_path):
    small = cut("llama", "partial", dtype=torch.bfloat16)
    save_pruned(small, tmp_path)
    assert load_pruned(tmp_path).dtype == torch.bfloat16  # as saved
    assert load_pruned(tmp_path, dtype=torch.float32).dtype == torch.float32


@pytest.mark.parametrize("family", FAMILY_NAMES)
def test_save_pretrained_works_exactly_where_the_config_describes_the_shapes(family, tmp_path):
    """A uniform cut loads with from_pretrained too (and says so); a non-uniform one refuses save_pretrained
    instead of writing files that from_pretrained cannot read."""
    small, ref = uniform_cut(family)
    ids = tiny_batch()
    with torch.no_grad():  # the config materialize adopted computes the circuit
        torch.testing.assert_close(small(ids).logits, ref, rtol=1e-5, atol=1e-5)
    save_pruned(small, tmp_path / "np")
    meta = json.loads((tmp_path / "np" / META_FILE).read_text())
    if meta["hf_compatible"]:
        small.save_pretrained(tmp_path / "hf")
        for d in ("hf", "np"):
            hf = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / d,
                                                                   attn_implementation=small.config._attn_implementation)
            with torch.no_grad():
                torch.testing.assert_close(hf(ids).logits, small(ids).logits, rtol=0, atol=0)
    else:
        with pytest.raises(ValueError, match="save_pruned"):
            small.save_pretrained(tmp_path / "hf")
    non_uniform = cut(family, "partial")
    with pytest.raises(ValueError, match="save_pruned"):
        non_uniform.save_pretrained(tmp_path / "hf2")


@pytest.mark.parametrize("family, heads", [("llama", True), ("qwen2", True), ("mistral", True), ("phi3", True),
                                           ("gemma2", True), ("gpt_neox", False), ("gpt2", False)])
def test_uniform_cuts_are_hf_compatible(family, heads, tmp_path):
    """The check above must not pass vacuously. Families whose attention takes its head size from the config
    (head_dim) stay compatible after a uniform head cut; those that take it as hidden_size // heads (GPT-2,
    GPT-NeoX) only after a uniform MLP cut."""
    small, _ = uniform_cut(family, heads=heads)
    save_pruned(small, tmp_path)
    assert json.loads((tmp_path / META_FILE).read_text())["hf_compatible"]


def test_nothing_in_the_directory_is_a_pickle(tmp_path):
    save_pruned(cut("gpt2", "layer"), tmp_path)
    names = sorted(p.name for p in tmp_path.iterdir())
    assert names == sorted(["config.json", "generation_config.json", META_FILE, WEIGHTS_FILE, BUFFERS_FILE])
    for p in tmp_path.iterdir():
        assert not p.read_bytes().startswith(b"\x80"), p  # the pickle protocol marker


def test_errors_a_user_can_act_on(tmp_path):
    model = tiny_model("llama")
    with pytest.raises(ValueError, match="not made by nodeprune_kernels.materialize"):
        save_pruned(model, tmp_path / "a")
    apply_node_pruning(model, backend="reference")
    with pytest.raises(ValueError, match="call materialize first"):
        save_pruned(model, tmp_path / "a")
    with pytest.raises(TypeError, match="Hugging Face causal LM"):
        save_pruned(torch.nn.Linear(2, 2), tmp_path / "a")
    with pytest.raises(FileNotFoundError, match="not written by nodeprune_kernels.save_pruned"):
        load_pruned(tmp_path / "nothing")

    small = cut("llama", "partial")
    d = save_pruned(small, tmp_path / "ok")
    meta = json.loads((d / META_FILE).read_text())
    (d / META_FILE).write_text(json.dumps(dict(meta, format=99)))
    with pytest.raises(ValueError, match="format 99"):
        load_pruned(d)
    (d / META_FILE).write_text("{")
    with pytest.raises(ValueError, match="not valid JSON"):
        load_pruned(d)
    (d / META_FILE).write_text(json.dumps(dict(meta, tied=[])))
    with pytest.raises(ValueError, match="'tied' is missing or not a dict"):
        load_pruned(d)
    (d / META_FILE).write_text(json.dumps(meta))
    (d / WEIGHTS_FILE).write_bytes(b"junk")
    with pytest.raises(ValueError, match="not a readable safetensors file"):
        load_pruned(d)

    other = save_pruned(cut("llama", "blocks"), tmp_path / "other")  # weights of another circuit
    (d / WEIGHTS_FILE).write_bytes((other / WEIGHTS_FILE).read_bytes())
    with pytest.raises(ValueError, match="shapes differ from the recorded circuit's"):
        load_pruned(d)
    save_pruned(small, d)
    (d / BUFFERS_FILE).unlink()
    with pytest.raises(FileNotFoundError, match=BUFFERS_FILE):
        load_pruned(d)

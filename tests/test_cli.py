"""The ``nodeprune`` command line on a tiny model saved to disk with its own tokenizer."""
import json

import pytest
import torch
import transformers as tf

from nodeprune_kernels.cli import main
from test_tasks import _words, all_task_texts, word_level

ARGS = ["--device", "cpu", "--backend", "reference", "--steps", "4", "--batch-size", "6", "--n-examples", "24",
        "--n-eval", "6", "--log-every", "2", "--curve-points", "2", "--no-progress"]


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    """A 2-layer Llama with a word-level tokenizer that covers every task's words, saved like a hub model."""
    path = tmp_path_factory.mktemp("tiny-llama")
    tok = word_level(_words(all_task_texts()))
    config = tf.LlamaConfig(vocab_size=len(tok), hidden_size=32, intermediate_size=40, num_hidden_layers=2,
                            num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
                            bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id,
                            pad_token_id=tok.pad_token_id)
    torch.manual_seed(0)
    tf.LlamaForCausalLM(config).save_pretrained(path)
    tok.save_pretrained(path)
    return path


@pytest.mark.parametrize("task, extra", [("ioi", []), ("greater_than", ["--ablation", "mean"]),
                                         ("induction", ["--task-options", "prefix_len=5",
                                                        "--granularities", "head,mlp_neuron"])])
def test_prune_then_show(model_dir, tmp_path, capsys, task, extra):
    out = tmp_path / "run"
    assert main(["prune", "--model", str(model_dir), "--task", task, "--out", str(out)] + ARGS + extra) == 0
    printed = capsys.readouterr().out
    assert "held-out (6 examples)" in printed and f"written to {out}" in printed
    cfg = json.loads((out / "config.json").read_text())
    assert cfg["config"]["steps"] == 4 and cfg["task"] == task and cfg["n_eval"] == 6
    if task == "greater_than":
        assert "probability difference" in printed
    assert main(["show", str(out)]) == 0
    shown = capsys.readouterr().out
    assert "faithfulness curve" in shown and "curve.png" in shown


def test_compare(model_dir, tmp_path, capsys):
    out = tmp_path / "cmp"
    assert main(["compare", "--model", str(model_dir), "--task", "ioi", "--out", str(out)] + ARGS) == 0
    printed = capsys.readouterr().out
    assert "that the fine circuit drops" in printed and "coarse circuit" in printed
    cmp = json.loads((out / "comparison.json").read_text())
    assert len(cmp["layers"]) == 2 and (out / "coarse" / "circuit.json").exists()
    coarse = json.loads((out / "coarse" / "config.json").read_text())["config"]["granularities"]
    assert coarse == ["layer", "attn", "head", "mlp"]


def test_jsonl_task_from_the_command_line(model_dir, tmp_path, capsys):
    rows = [{"clean": f"When {a} and {b} went to the store , {b} gave a drink to",
             "corrupted": f"When {c} and {d} went to the store , {d} gave a drink to",
             "target": f" {a}", "distractor": f" {b}", "split": "eval" if i % 4 == 0 else "train"}
            for i, (a, b, c, d) in enumerate([("Mary", "John", "Anna", "Paul"), ("John", "Mary", "Paul", "Anna")] * 8)]
    path = tmp_path / "mine.jsonl"
    path.write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    out = tmp_path / "run"
    assert main(["prune", "--model", str(model_dir), "--task", str(path), "--out", str(out),
                 "--objective", "logit_diff"] + ARGS) == 0
    assert "held-out (4 examples)" in capsys.readouterr().out  # the rows marked eval


@pytest.mark.parametrize("argv, message", [
    (["prune", "--model", "M", "--task", "ioi", "--out", "o", "--targets", "2"], "in [0, 1)"),
    (["prune", "--model", "M", "--task", "ioi", "--out", "o", "--targets", "head=0.5"], "targets missing for layer"),
    (["prune", "--model", "M", "--task", "ioi", "--out", "o", "--granularities", "heads"], "unknown granularity"),
    (["show", "/nonexistent/run"], "not a finished pruning run"),
    (["demo", "--steps", "0"], "steps must be an int >= 1"),
    (["prune", "--model", "M", "--task", "induction", "--out", "o", "--task-options", "prefix_len"],
     "--task-options takes name=value pairs"),
    (["prune", "--model", "M", "--task", "induction", "--out", "o", "--task-options", "nope=3"],
     "task 'induction' has no option 'nope'"),
    (["prune", "--model", "M", "--task", "induction", "--out", "o", "--task-options", "prefix_len=1"],
     "prefix_len must be an int >= 2"),
    (["prune", "--model", "M", "--task", "ioi", "--out", "o", "--init-std", "-1"], "init_std is a standard deviation"),
])
def test_errors(argv, message, capsys):
    with pytest.raises(SystemExit):
        main(argv)
    assert message in capsys.readouterr().err


def test_unknown_task_and_missing_tokenizer(model_dir, tmp_path, capsys):
    with pytest.raises(SystemExit):
        main(["prune", "--model", str(model_dir), "--task", "iio", "--out", str(tmp_path / "a")] + ARGS)
    assert "unknown task 'iio'" in capsys.readouterr().err
    with pytest.raises(SystemExit, match="could not load model"):
        main(["prune", "--model", str(tmp_path / "nothing"), "--task", "ioi", "--out", str(tmp_path / "b")] + ARGS)


def test_show_on_incomplete_runs_and_without_plotting(model_dir, tmp_path, capsys, monkeypatch):
    out = tmp_path / "run"
    assert main(["prune", "--model", str(model_dir), "--task", "ioi", "--out", str(out)] + ARGS) == 0
    capsys.readouterr()
    import nodeprune_kernels.pruning.report as report

    def no_plots(_):
        raise ImportError("No module named 'matplotlib'")

    monkeypatch.setattr(report, "plot_run", no_plots)
    assert main(["show", str(out)]) == 0  # the report, without its plots
    captured = capsys.readouterr()
    assert "faithfulness curve" in captured.out and "install matplotlib" in captured.err
    (out / "metrics.json").write_text("{not json")
    with pytest.raises(SystemExit):
        main(["show", str(out)])
    assert "metrics.json is not valid JSON" in capsys.readouterr().err
    (out / "metrics.json").unlink()
    with pytest.raises(SystemExit):
        main(["show", str(out)])
    assert "no metrics.json" in capsys.readouterr().err

"""scripts/gpu_check.py (``make gpu-check``, the one prepared GPU proof) cannot rot: its CPU smoke mode runs every
step it can on tiny shapes, and what it reads from the benchmarks' CSVs is checked on made-up rows."""
import csv
import importlib.util
import os
import subprocess
import sys

import pytest
import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SCRIPT = os.path.join(ROOT, "scripts", "gpu_check.py")


def _load():
    spec = importlib.util.spec_from_file_location("gpu_check", SCRIPT)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


gc = _load()


def _env(**extra):
    env = dict(os.environ, TRITON_INTERPRET="1", **extra)
    env["PYTHONPATH"] = ROOT + (os.pathsep + env["PYTHONPATH"] if env.get("PYTHONPATH") else "")
    return env


def _rows(path):
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


@pytest.fixture(scope="module")
def small_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("gpu_check")
    p = subprocess.run([sys.executable, SCRIPT, "--small", "--out", str(out)], cwd=ROOT, env=_env(),
                       capture_output=True, text=True, timeout=170)
    return out, p


def test_small_mode_runs_every_step_and_passes(small_run):
    out, p = small_run
    assert p.returncode == 0, p.stdout[-4000:] + p.stderr[-4000:]
    text = (out / "gpu_check_summary_cpu.txt").read_text()
    assert text in p.stdout  # the table printed at the end is the one written
    for step in ("1 tests", "2 selfcheck", "3 ops", "4 pruning tiny 2x32", "5 fit llama-3-8b"):
        assert step in text
    lines = {ln.split()[0] + " " + ln.split()[1]: ln for ln in text.splitlines() if ln[:1].isdigit()}
    assert " pass " in lines["1 tests"] and "passed" in lines["1 tests"]
    assert " pass " in lines["3 ops"] and " done " in lines["4 pruning"]
    assert " skipped " in lines["2 selfcheck"] and " skipped " in lines["5 fit"]
    for target in ("masked_linear fwd >= 90% of F.linear", "fused MLP fwd+bwd >= 1.5x eager",
                   "pruning step <= 1.15x floor (tiny-gpt2 2x32)", "pruning step <= 1.15x floor (tiny-llama 2x32)"):
        assert target in text
    assert "correctness: passed" in text
    assert (out / "gpu_check_cpu.log").exists()


def test_small_mode_csvs_have_sane_columns(small_run):
    out, _ = small_run
    ops = _rows(out / "gpu_check_ops_cpu.csv")
    assert {"device", "torch", "commit", "op", "shape", "phase", "impl", "median_ms", "tflops"} <= set(ops[0])
    assert {(r["op"], r["phase"]) for r in ops} == {(op, ph) for op in ("masked_linear", "masked_mlp")
                                                   for ph in ("fwd", "fwd+bwd")}
    assert all(float(r["median_ms"]) > 0 for r in ops)
    fused = [r for r in ops if r["impl"].endswith("fused")]
    assert fused and all(r["check_ok"] == "True" and float(r["check_err"]) < 1e-3 for r in fused)
    assert all(float(r["throughput_vs_F.linear"]) > 0 for r in fused if r["op"] == "masked_linear")
    assert all(float(r["speedup_vs_eager"]) > 0 for r in fused if r["op"] == "masked_mlp")

    step = _rows(out / "gpu_check_pruning_step_tiny_cpu.csv")
    assert {(r["model"], r["mode"]) for r in step} == {(m, mode) for m in ("tiny-gpt2", "tiny-llama")
                                                      for mode in ("floor", "eager", "fused", "edge")}
    for r in step:
        assert float(r["median_ms"]) > 0 and float(r["saved_bytes_per_token"]) > 0
        assert r["backend"] == {"eager": "reference", "fused": "triton"}.get(r["mode"], "")
        assert r["mode"] == "floor" or float(r["time_vs_floor"]) > 0


def test_without_a_gpu_the_full_mode_says_what_to_do(tmp_path):
    if torch.cuda.is_available():
        pytest.skip("a GPU is visible: the full mode would run")
    p = subprocess.run([sys.executable, SCRIPT, "--out", str(tmp_path)], cwd=ROOT, env=_env(), capture_output=True,
                       text=True, timeout=120)
    assert p.returncode != 0
    assert "no CUDA GPU: run with --small for the CPU smoke mode, or run on a GPU machine" in p.stderr


def test_headlines_read_the_gpu_csvs(tmp_path):
    """The GPU-only readings (peak memory, out-of-memory rows, the fit) on rows shaped like the benchmarks'."""
    step = [dict(model="llama-3-8b", mode="floor", ablation="-", granularities="-", batch="8", seq="1024",
                 median_ms="100.0", peak_allocated_bytes="1000", time_vs_floor=""),
            dict(model="llama-3-8b", mode="eager", ablation="zero", granularities="all", batch="8", seq="1024",
                 median_ms="150.0", peak_allocated_bytes="1500", time_vs_floor="1.5"),
            dict(model="llama-3-8b", mode="fused", ablation="zero", granularities="all", batch="8", seq="1024",
                 median_ms="110.0", peak_allocated_bytes="900", time_vs_floor="1.1"),
            dict(model="llama-3-8b", mode="edge", ablation="zero", granularities="edges", batch="8", seq="1024",
                 out_of_memory="True")]
    h = gc.prune_headlines(step)["llama-3-8b"]
    assert h["fused"] == 1.1 and h["eager"] == 1.5 and h["edge"] == "oom" and h["point"] == "8x1024"
    assert h["fused_peak"] == 0.9
    assert "fused 1.10x, peak 0.90x" in h["text"] and "edge out of memory" in h["text"]

    fit = [dict(model="codellama-13b", mode="fused", seq="1024", max_batch="21", fit_cap_batch="512"),
           dict(model="codellama-13b", mode="edge", seq="1024", max_batch="0", fit_cap_batch="512")]
    f = gc.fit_headlines(fit)
    assert f["fused"]["max_batch"] == 21 and f["edge"]["max_batch"] == 0
    assert f["fused"]["text"] == "fused 21 x 1024"

    class Args:
        small = False

    st = gc.Step("5 fit codellama-13b x1024")
    st.status, st.headlines = "done", f
    text, code = gc.summary({"device": "X"}, [st], Args, 1.0)
    assert "codellama-13b    fused 21 x 1024, edge 0 x 1024" in text and code == 0
    st.status = "timeout"
    assert gc.summary({"device": "X"}, [st], Args, 1.0)[1] == 2  # a benchmark step, not correctness


def test_codellama_13b_shape():
    sys.path.insert(0, os.path.join(ROOT, "benchmarks"))
    import bench_pruning_step as bps

    cfg = bps.model_config("codellama-13b")
    assert (cfg.num_hidden_layers, cfg.hidden_size, cfg.num_attention_heads, cfg.num_key_value_heads, cfg.head_dim,
            cfg.intermediate_size, cfg.vocab_size) == (40, 5120, 40, 40, 128, 13824, 32016)
    with torch.device("meta"):
        from transformers import AutoModelForCausalLM

        n = sum(p.numel() for p in AutoModelForCausalLM.from_config(cfg).parameters())
    assert 12.9e9 < n < 13.1e9

"""Smoke test of the micro-benchmarks (benchmarks/micro): every case runs once, unmeasured, at 64 tokens.

The benchmarks run in a subprocess: they must not see this suite's conftest (TRITON_INTERPRET=1 without a
GPU, NaN-poisoned outputs), and pytest collects a directory's conftest only once per session. Each case
still checks its fused output and gradients against the reference backend, so this also catches a fused
kernel that went wrong at the benchmark shapes. If the native extension cannot be built the native cases
fail (not skip), and so does this test.
"""
import os
import re
import subprocess
import sys
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent

# cases that run: hard_concrete 2 (reference, fused) + masked_linear gpt2 6 (zero / interchange x reference,
# fused, F.linear) + masked_attn_out_proj gpt2 3 + masked_mlp gpt2 and llama 12 = 23; the Llama-sized
# masked_linear (6) and masked_attn_out_proj (3) are skipped on the CPU and run on CUDA.
RUN_CPU, SKIPPED_CPU = 23, 9


def test_micro_benchmarks_run():
    env = {k: v for k, v in os.environ.items() if not k.startswith("NODEPRUNE_BENCH_")}
    env.pop("TRITON_INTERPRET", None)  # set by tests/conftest.py without a GPU; not wanted by the benchmarks
    env["NODEPRUNE_BENCH_TOKENS"] = "64"
    cmd = [sys.executable, "-m", "pytest", "benchmarks/micro", "--benchmark-disable", "-q", "-p", "no:cacheprovider",
           "-o", "addopts="]
    proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    out = proc.stdout + proc.stderr
    assert proc.returncode == 0, f"{' '.join(cmd)} exited {proc.returncode}:\n{out[-6000:]}"
    summary = out.strip().splitlines()[-1]
    counts = {word: int(n) for n, word in re.findall(r"(\d+) (passed|skipped|failed|errors?|deselected)", summary)}
    cuda = torch.cuda.is_available()
    expected = {"passed": RUN_CPU + SKIPPED_CPU} if cuda else {"passed": RUN_CPU, "skipped": SKIPPED_CPU}
    assert counts == expected, f"expected {expected} in the summary, got {summary!r}"

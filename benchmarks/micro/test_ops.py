"""Micro-benchmarks of every op: one forward + backward per call, reference against fused (and a baseline).

Run (from the repository root; on a GPU machine name the file micro_cuda.json):

    python -m pytest benchmarks/micro --benchmark-only --benchmark-group-by=group \
        --benchmark-columns=median,iqr,ops --benchmark-json=benchmarks/results/micro_cpu.json

Each benchmark times one call of ``step()``: the op's forward, then ``torch.autograd.grad`` of its output
against a fixed random ``dy`` with respect to the gates' log_alphas and the input x (hard_concrete: the
log_alphas only), and on CUDA a ``torch.cuda.synchronize()``. Weights are frozen (no weight gradients, as in
a pruning run). Implementations (the ``impl`` parameter):

- ``reference``: the ops' plain-PyTorch backend, i.e. the masked layer written eagerly, as with hooks;
- ``fused``: the Triton kernels on CUDA, the native C++ kernels on the CPU (checked once against the
  reference before timing: a benchmark of a wrong kernel is worthless);
- ``baseline``: the same layer unmasked, in plain PyTorch (``F.linear``; the frozen MLP), forward and
  backward to x: the floor the masked op's cost is stated against.

Reference, fused and baseline of one case share a benchmark group (``--benchmark-group-by=group``), named
``op shape tokens ablation``; ``extra_info`` in the JSON records the shapes, dtype, device name, backend and
``flops`` (the nominal GEMM flops of the unmasked forward + backward to x, the same for every implementation
of a group, so ``flops / median`` compares throughputs) or ``bytes`` (hard_concrete).

Sizes: ``NODEPRUNE_BENCH_TOKENS`` tokens per call (default 8192 on CUDA in bfloat16, 512 on the CPU in
float32). The Llama-sized shapes (4096-wide; MLP d_ff 14336) run on CUDA only unless
``NODEPRUNE_BENCH_LARGE=1``; on the CPU the Llama-style MLP is shrunk to d_model 1024, d_ff 3584 instead. See
benchmarks/micro/conftest.py for the switches. On a CPU shared with other work prefix the command with
``NODEPRUNE_BENCH_THREADS=1``: with more threads than free cores every parallel region waits for a descheduled
thread, and the small ops then time the scheduler (benchmarks/results/micro_cpu.json was taken so, on a 2-core
machine shared with other jobs; ``extra_info["threads"]`` says). ``--benchmark-disable`` runs every case
once, unmeasured (tests/test_micro_benchmarks.py does so with 64 tokens).
"""
from __future__ import annotations

from dataclasses import dataclass

import pytest
import torch
import torch.nn.functional as F

from nodeprune_kernels import hard_concrete, masked_attn_out_proj, masked_linear, masked_mlp

ABLATIONS = ["zero", "interchange"]


def linear(x, w, b, layout):
    """F.linear with a weight in either layout ("in_out": GPT-2's Conv1D, read transposed, not copied)."""
    return F.linear(x, w if layout == "out_in" else w.t(), b)


# ---------------------------------------------------------------------------------------------------- hard_concrete

HC_GATES = 4096  # about one GPT-2-small layer's gates (12 heads, 768 attention neurons, 3072 MLP neurons, ...)


@pytest.mark.parametrize("impl", ["reference", "fused"])
def test_hard_concrete(measure, cfg, impl):
    """Sampled gates z = hard_concrete(log_alpha) of HC_GATES gates, and d z / d log_alpha."""
    la = (torch.randn(HC_GATES, generator=cfg.generator("hc")) * 1.5 + 1.0).to(cfg.device).requires_grad_()

    def masked(backend):
        return hard_concrete(la, seed=7, training=True, backend=backend)

    # float32 log_alpha: read in forward and backward, z written, dz read, d log_alpha written
    measure(f"hard_concrete n{HC_GATES}", masked, [la],
            info=dict(shape=[HC_GATES], gate_dtype="float32", bytes=5 * 4 * HC_GATES))


# ---------------------------------------------------------------------------------------------------- masked_linear

@dataclass(frozen=True)
class LinearShape:
    name: str
    k: int
    n: int
    bias: bool
    large: bool


LINEARS = {s.name: s for s in (LinearShape("gpt2", 768, 768, True, False),
                               LinearShape("llama", 4096, 4096, False, True))}


@pytest.mark.parametrize("impl", ["reference", "fused", "baseline"])
@pytest.mark.parametrize("ablation", ABLATIONS)
@pytest.mark.parametrize("shape", list(LINEARS))
def test_masked_linear(measure, cfg, shape, ablation, impl):
    """masked_linear of x [tokens, K] -> [tokens, N] (nn.Linear layout) with input gates (a layer gate over all
    K features and one gate per input neuron) and one gate per output feature; zero ablation, or interchange
    ablation from another random x. Baseline: F.linear(x, w, b), forward and backward to x."""
    s = LINEARS[shape]
    if s.large:
        cfg.require_large(f"masked_linear {shape}")
    gen = cfg.generator("masked_linear", shape, ablation)
    T = cfg.tokens
    w = cfg.weight(s.n, s.k, "out_in", gen)
    b = cfg.randn(s.n, gen=gen, scale=0.02) if s.bias else None
    x = cfg.randn(T, s.k, gen=gen).requires_grad_()
    x_ablate = cfg.randn(T, s.k, gen=gen) if ablation == "interchange" else None
    in_gates, offset = cfg.gates([(1, s.k), (s.k, 1)], gen)
    out_gates, _ = cfg.gates([(s.n, 1)], gen, offset)
    leaves = [x] + [g.log_alpha for g in in_gates + out_gates]

    def masked(backend):
        return masked_linear(x, w, b, in_gates=in_gates, out_gates=out_gates, x_ablate=x_ablate, seed=3,
                             backend=backend)

    measure(f"masked_linear {shape} {s.k}->{s.n} x{T} {ablation}", masked, leaves,
            baseline=lambda: F.linear(x, w, b), baseline_leaves=[x],
            info=dict(shape=dict(x=[T, s.k], weight=[s.n, s.k], bias=s.bias, layout="out_in"), ablation=ablation,
                      gates="in: layer + neuron, out: neuron", flops=4 * T * s.k * s.n))


# -------------------------------------------------------------------------------------------- masked_attn_out_proj

@dataclass(frozen=True)
class AttnShape:
    name: str
    heads: int
    head_dim: int
    n: int
    layout: str
    bias: bool
    large: bool


ATTNS = {s.name: s for s in (AttnShape("gpt2", 12, 64, 768, "in_out", True, False),
                             AttnShape("llama", 32, 128, 4096, "out_in", False, True))}


@pytest.mark.parametrize("impl", ["reference", "fused", "baseline"])
@pytest.mark.parametrize("shape", list(ATTNS))
def test_masked_attn_out_proj(measure, cfg, shape, impl):
    """masked_attn_out_proj of SDPA's output o [B, H, S, D] read as o.transpose(1, 2) (no copy), with one gate
    per head and one per attention neuron, zero ablation; gradients to log_alpha and to o. Baseline: the
    unmasked o_proj as Hugging Face models run it, F.linear(o.transpose(1, 2).reshape(B, S, H * D), w, b)."""
    s = ATTNS[shape]
    if s.large:
        cfg.require_large(f"masked_attn_out_proj {shape}")
    seq = min(cfg.tokens, 1024 if cfg.cuda else 256)
    batch = max(1, cfg.tokens // seq)
    K = s.heads * s.head_dim
    gen = cfg.generator("masked_attn_out_proj", shape)
    w = cfg.weight(s.n, K, s.layout, gen)
    b = cfg.randn(s.n, gen=gen, scale=0.02) if s.bias else None
    o = cfg.randn(batch, s.heads, seq, s.head_dim, gen=gen).requires_grad_()  # SDPA's layout
    in_gates, _ = cfg.gates([(s.heads, s.head_dim), (K, 1)], gen)
    leaves = [o] + [g.log_alpha for g in in_gates]

    def masked(backend):
        return masked_attn_out_proj(o.transpose(1, 2), w, b, in_gates=in_gates, seed=5, weight_layout=s.layout,
                                    backend=backend)

    def baseline():
        return linear(o.transpose(1, 2).reshape(batch, seq, K), w, b, s.layout)

    T = batch * seq
    measure(f"masked_attn_out_proj {shape} {s.heads}x{s.head_dim}->{s.n} x{T} zero", masked, leaves,
            baseline=baseline, baseline_leaves=[o],
            info=dict(shape=dict(o=[batch, s.heads, seq, s.head_dim], weight=list(w.shape), bias=s.bias,
                                 layout=s.layout), tokens=T, ablation="zero", gates="in: head + neuron",
                      flops=4 * T * K * s.n))


# ------------------------------------------------------------------------------------------------------- masked_mlp

@dataclass(frozen=True)
class MlpShape:
    name: str
    d: int
    d_ff: int
    activation: str
    gated: bool
    layout: str
    bias: bool


GPT2_MLP = MlpShape("gpt2", 768, 3072, "gelu_tanh", False, "in_out", True)
LLAMA_MLP = MlpShape("llama", 4096, 14336, "silu", True, "out_in", False)
LLAMA_MLP_CPU = MlpShape("llama", 1024, 3584, "silu", True, "out_in", False)  # same ratio, 1/4 the width


@pytest.mark.parametrize("impl", ["reference", "fused", "baseline"])
@pytest.mark.parametrize("ablation", ABLATIONS)
@pytest.mark.parametrize("shape", ["gpt2", "llama"])
def test_masked_mlp(measure, cfg, shape, ablation, impl):
    """masked_mlp of x [tokens, d]: GPT-2 style (gelu_tanh, Conv1D [in, out] weights, biases) or Llama style
    (SwiGLU: silu with gate_weight, nn.Linear weights, no biases), one gate per hidden unit and one per output
    feature; zero ablation, or interchange ablation with h_c rebuilt from x_corrupt (another random x).
    Baseline: the frozen MLP in plain PyTorch, no gates, forward and backward to x."""
    s = GPT2_MLP if shape == "gpt2" else LLAMA_MLP if cfg.large else LLAMA_MLP_CPU
    T = cfg.tokens
    gen = cfg.generator("masked_mlp", shape, ablation)
    up = cfg.weight(s.d_ff, s.d, s.layout, gen)
    gate = cfg.weight(s.d_ff, s.d, s.layout, gen) if s.gated else None
    down = cfg.weight(s.d, s.d_ff, s.layout, gen)
    b_up = cfg.randn(s.d_ff, gen=gen, scale=0.02) if s.bias else None
    b_down = cfg.randn(s.d, gen=gen, scale=0.02) if s.bias else None
    x = cfg.randn(T, s.d, gen=gen).requires_grad_()
    x_corrupt = cfg.randn(T, s.d, gen=gen) if ablation == "interchange" else None
    in_gates, offset = cfg.gates([(s.d_ff, 1)], gen)
    out_gates, _ = cfg.gates([(s.d, 1)], gen, offset)
    leaves = [x] + [g.log_alpha for g in in_gates + out_gates]
    act = {"silu": F.silu, "gelu_tanh": lambda t: F.gelu(t, approximate="tanh")}[s.activation]

    def masked(backend):
        return masked_mlp(x, up, down, gate_weight=gate, up_bias=b_up, down_bias=b_down, activation=s.activation,
                          in_gates=in_gates, out_gates=out_gates, x_corrupt=x_corrupt, seed=9,
                          weight_layout=s.layout, backend=backend)

    def baseline():
        u = linear(x, up, b_up, s.layout)
        h = act(linear(x, gate, None, s.layout)) * u if s.gated else act(u)
        return linear(h, down, b_down, s.layout)

    n_proj = 3 if s.gated else 2
    measure(f"masked_mlp {shape} {s.d}x{s.d_ff} x{T} {ablation}", masked, leaves,
            baseline=baseline, baseline_leaves=[x],
            info=dict(shape=dict(x=[T, s.d], d_ff=s.d_ff, activation=s.activation, gated=s.gated, bias=s.bias,
                                 layout=s.layout), ablation=ablation, gates="in: hidden neuron, out: mlp_out",
                      flops=4 * T * s.d * s.d_ff * n_proj))

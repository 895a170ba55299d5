"""Memory (and on a GPU, time) of one transformer layer: unmasked frozen, eager masked, fused masked.

CPU (exact saved bytes per token, device independent):   python benchmarks/bench_masked_layer.py --saved-only
GPU (also peak memory and forward+backward time):        python benchmarks/bench_masked_layer.py

One Llama-style layer (Llama-3-8B: d_model 4096, 32 query / 8 key-value heads of 128, SwiGLU d_ff 14336,
RMSNorm) and one GPT-2-style layer (GPT-2 small: d_model 768, 12 heads of 64, gelu_new d_ff 3072, Conv1D
weights, LayerNorm, biases), all weights frozen, gates at every granularity (layer, attn, head,
attn_neuron, mlp, mlp_neuron, mlp_out). Modes:
- frozen: the unmasked layer computed the ordinary way (the floor);
- eager: the masked layer written in plain PyTorch, as one would with hooks (the ops' reference backend);
- fused: the package's kernels (on the CPU the kernels are not run for the byte count: what autograd saves
  does not depend on the values, so the launches are recorded and skipped).
Each with zero ablation and interchange ablation (the corrupted attention output and MLP input from a
no-grad pass of the corrupted tokens). Results: benchmarks/results/ as CSV with device, versions, date.
"""
from __future__ import annotations

import contextlib
import os
import sys
from dataclasses import dataclass

import torch
import torch.nn.functional as F

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from common import env_row, parse_args, write_csv  # noqa: E402


@dataclass(frozen=True)
class LayerShape:
    name: str
    d_model: int
    n_heads: int
    n_kv_heads: int
    head_dim: int
    d_ff: int
    gated: bool
    activation: str
    weight_layout: str  # "out_in" (nn.Linear) or "in_out" (GPT-2 Conv1D)
    bias: bool


LLAMA = LayerShape("llama-3-8b layer", 4096, 32, 8, 128, 14336, True, "silu", "out_in", False)
GPT2 = LayerShape("gpt2-small layer", 768, 12, 12, 64, 3072, False, "gelu_tanh", "in_out", True)


def make_layer(s: LayerShape, device, dtype):
    """Frozen weights (dict) and the gate parameters of every granularity (dict of float32 leaves)."""
    g = torch.Generator(device="cpu").manual_seed(0)

    def w(n_out, n_in):
        t = torch.randn(n_out, n_in, generator=g) / n_in**0.5
        return (t if s.weight_layout == "out_in" else t.t().contiguous()).to(device, dtype)

    def b(n):
        return (torch.randn(n, generator=g) * 0.02).to(device, dtype) if s.bias else None

    q, kv = s.n_heads * s.head_dim, s.n_kv_heads * s.head_dim
    p = dict(wq=w(q, s.d_model), wk=w(kv, s.d_model), wv=w(kv, s.d_model), wo=w(s.d_model, q), bq=b(q), bk=b(kv),
             bv=b(kv), bo=b(s.d_model), up=w(s.d_ff, s.d_model), gate=w(s.d_ff, s.d_model) if s.gated else None,
             down=w(s.d_model, s.d_ff), b_up=b(s.d_ff), b_down=b(s.d_model))
    sizes = dict(layer=1, attn=1, head=s.n_heads, attn_neuron=q, mlp=1, mlp_neuron=s.d_ff, mlp_out=s.d_model)
    gates = {k: (torch.randn(n, generator=g) + 2.0).to(device).requires_grad_() for k, n in sizes.items()}
    return p, gates


def _lin(x, w, b, s: LayerShape):
    return F.linear(x, w if s.weight_layout == "out_in" else w.t(), b)


def _norm(x, s: LayerShape):
    return F.layer_norm(x, x.shape[-1:]) if s.bias else F.rms_norm(x, x.shape[-1:])


def _attend(x, p, s: LayerShape):
    """SDPA's output [B, H, S, D] (key/value heads repeated for grouped-query attention)."""
    B, S, _ = x.shape
    rep = s.n_heads // s.n_kv_heads
    q = _lin(x, p["wq"], p["bq"], s).view(B, S, s.n_heads, s.head_dim).transpose(1, 2)
    k = _lin(x, p["wk"], p["bk"], s).view(B, S, s.n_kv_heads, s.head_dim).transpose(1, 2).repeat_interleave(rep, 1)
    v = _lin(x, p["wv"], p["bv"], s).view(B, S, s.n_kv_heads, s.head_dim).transpose(1, 2).repeat_interleave(rep, 1)
    return F.scaled_dot_product_attention(q, k, v, is_causal=True)


def _mlp_frozen(h, p, s: LayerShape):
    from nodeprune_kernels.ops.masked_mlp.reference import mlp_hidden_reference

    hid = mlp_hidden_reference(h, p["up"], gate_weight=p["gate"], up_bias=p["b_up"], activation=s.activation,
                               weight_layout=s.weight_layout)
    return _lin(hid, p["down"], p["b_down"], s)


def corrupted_sites(x_corrupt, p, s: LayerShape):
    """The interchange values of one layer: its attention output (SDPA layout) and its MLP input."""
    with torch.no_grad():
        o = _attend(_norm(x_corrupt, s), p, s)
        x2 = x_corrupt + _lin(o.transpose(1, 2).reshape(*x_corrupt.shape[:2], -1), p["wo"], p["bo"], s)
        return o.transpose(1, 2), _norm(x2, s)


def layer_forward(x, p, gates, s: LayerShape, mode: str, corrupt=None, seed=0):
    """One pre-norm layer. mode: "frozen" (no gates), "eager" (reference backend) or "fused" (triton)."""
    from nodeprune_kernels import Gate, masked_attn_out_proj, masked_mlp

    B, S, _ = x.shape
    o = _attend(_norm(x, s), p, s)
    if mode == "frozen":
        x = x + _lin(o.transpose(1, 2).reshape(B, S, -1), p["wo"], p["bo"], s)
        return x + _mlp_frozen(_norm(x, s), p, s)
    backend = "reference" if mode == "eager" else "triton"
    L = s.n_heads * s.head_dim
    offs = {}
    for k, v in gates.items():  # one global Philox index range per granularity
        offs[k] = sum(t.numel() for t in list(gates.values())[:list(gates).index(k)])
    attn_gates = [Gate(gates["layer"], L, offs["layer"]), Gate(gates["attn"], L, offs["attn"]),
                  Gate(gates["head"], s.head_dim, offs["head"]), Gate(gates["attn_neuron"], 1, offs["attn_neuron"])]
    x = x + masked_attn_out_proj(o.transpose(1, 2), p["wo"], p["bo"], in_gates=attn_gates,
                                 x_ablate=None if corrupt is None else corrupt[0], seed=seed,
                                 weight_layout=s.weight_layout, backend=backend)
    mlp_gates = [Gate(gates["layer"], s.d_ff, offs["layer"]), Gate(gates["mlp"], s.d_ff, offs["mlp"]),
                 Gate(gates["mlp_neuron"], 1, offs["mlp_neuron"])]
    y = masked_mlp(_norm(x, s), p["up"], p["down"], gate_weight=p["gate"], up_bias=p["b_up"], down_bias=p["b_down"],
                   activation=s.activation, in_gates=mlp_gates, out_gates=[Gate(gates["mlp_out"], 1, offs["mlp_out"])],
                   x_corrupt=None if corrupt is None else corrupt[1], seed=seed, weight_layout=s.weight_layout,
                   backend=backend)
    return x + y


def _cases(x_c, p, s: LayerShape):
    """(ablation, corrupted sites, mode) of every measurement: the frozen floor once, then each ablation
    with the eager and the fused masked layer."""
    yield "-", None, "frozen"
    for ablation in ("zero", "interchange"):
        corrupt = corrupted_sites(x_c, p, s) if ablation == "interchange" else None
        for mode in ("eager", "fused"):
            yield ablation, corrupt, mode


def saved_bytes_rows(s: LayerShape, dtype, device, batch=1, seq=64):
    from nodeprune_kernels.utils.launch import record_launches
    from nodeprune_kernels.utils.memory import SavedTensorBytes

    p, gates = make_layer(s, device, dtype)
    params = [t for t in p.values() if t is not None]
    gen = torch.Generator(device="cpu").manual_seed(1)
    x = torch.randn(batch, seq, s.d_model, generator=gen).to(device, dtype).requires_grad_()
    x_c = torch.randn(batch, seq, s.d_model, generator=gen).to(device, dtype)
    rows = []
    for ablation, corrupt, mode in _cases(x_c, p, s):
        dry = mode == "fused" and device == "cpu"
        ctx = record_launches(gpu_configs=True, execute=False) if dry else contextlib.nullcontext()
        with ctx, SavedTensorBytes(ignore=params) as saved:
            layer_forward(x, p, gates, s, mode, corrupt)
        rows.append({"layer": s.name, "dtype": str(dtype).replace("torch.", ""), "tokens": batch * seq,
                     "ablation": ablation, "mode": mode,
                     "saved_bytes_per_token": saved.bytes / (batch * seq)})
    return rows


def gpu_rows(s: LayerShape, dtype, tokens=8192, seq=1024):
    """Peak memory above the inputs and weights, and forward+backward time, of each mode (CUDA)."""
    import triton.testing

    p, gates = make_layer(s, "cuda", dtype)
    x = torch.randn(tokens // seq, seq, s.d_model, device="cuda", dtype=dtype, requires_grad=True)
    x_c = torch.randn_like(x).detach()
    rows = []
    for ablation, corrupt, mode in _cases(x_c, p, s):
        leaves = [x] + ([] if mode == "frozen" else list(gates.values()))

        def step():
            y = layer_forward(x, p, gates, s, mode, corrupt)
            return torch.autograd.grad(y.float().square().mean(), leaves)

        step()
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
        step()
        torch.cuda.synchronize()
        peak = torch.cuda.max_memory_allocated() - base
        med, lo, hi = triton.testing.do_bench(step, warmup=5, rep=50, quantiles=[0.5, 0.2, 0.8])
        rows.append({"layer": s.name, "dtype": str(dtype).replace("torch.", ""), "tokens": tokens,
                     "ablation": ablation, "mode": mode,
                     "peak_mib_above_inputs": peak / 2**20, "ms_median": med, "ms_p20": lo, "ms_p80": hi})
        print(f"{s.name:<18} {rows[-1]['ablation']:<12} {mode:<7} peak {peak / 2**20:9.1f} MiB  {med:8.2f} ms")
    return rows


def main():
    args, dtype, device = parse_args(__doc__.splitlines()[0], "peak memory and time")
    cuda = device == "cuda"
    base = env_row()
    rows = [{**base, **r} for s in (LLAMA, GPT2) for r in saved_bytes_rows(s, dtype, device)]
    for r in rows:
        print(f"{r['layer']:<18} {r['ablation']:<12} {r['mode']:<7} {r['saved_bytes_per_token']:10.0f} B/token")
    print("wrote", write_csv(rows, "saved_bytes_masked_layer.csv" if not cuda else
                             f"saved_bytes_masked_layer_{base['device'].replace(' ', '_')}.csv", args.out))
    if cuda and not args.saved_only:
        rows = [{**base, **r} for r in gpu_rows(LLAMA, dtype)]
        print("wrote", write_csv(rows, f"masked_layer_{base['device'].replace(' ', '_')}.csv"))


if __name__ == "__main__":
    main()

"""Micro-benchmark of masked_linear against F.linear, and its saved-for-backward bytes.

GPU (timings):   python benchmarks/bench_masked_linear.py
CPU (bytes only, exact and device independent):   python benchmarks/bench_masked_linear.py --saved-only

Timings are medians of triton.testing.do_bench (CUDA events) with 20th/80th percentiles. Forward is
compared with F.linear; the backward (dx and every gate gradient) with the plain dx GEMM dy @ W, which is
all a frozen F.linear's backward does. Results go to benchmarks/results/ as CSV with the device name,
versions and date.
"""
from __future__ import annotations

import os
import sys

import torch
import torch.nn.functional as F

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from common import env_row, parse_args, write_csv  # noqa: E402

SHAPES = [  # (tokens, d_in, d_out): Llama-3-8B o_proj / down_proj, GPT-2 small c_proj / mlp c_proj
    (8192, 4096, 4096),
    (8192, 14336, 4096),
    (2048, 768, 768),
    (2048, 3072, 768),
]


def make_case(M, K, N, dtype, device, heads=32):
    from nodeprune_kernels import Gate

    x = torch.randn(M, K, device=device, dtype=dtype, requires_grad=True)
    w = torch.randn(N, K, device=device, dtype=dtype) / K**0.5
    heads = heads if K % heads == 0 else 1
    las = [torch.randn(n, device=device, requires_grad=True) for n in (1, heads, K, N)]
    in_gates = [Gate(las[0], K, 0), Gate(las[1], K // heads, 1), Gate(las[2], 1, 1 + heads)]
    out_gates = [Gate(las[3], 1, 1 + heads + K)]
    return x, w, las, in_gates, out_gates


def saved_bytes_per_token(M, K, N, dtype, device):
    from nodeprune_kernels import masked_linear
    from nodeprune_kernels.utils.memory import SavedTensorBytes

    x, w, las, in_gates, out_gates = make_case(M, K, N, dtype, device)
    out = {}
    with SavedTensorBytes(ignore=[w]) as s:
        F.linear(x, w)
    out["F.linear (frozen)"] = s.bytes / M
    for backend in ("triton", "reference"):
        with SavedTensorBytes(ignore=[w]) as s:
            masked_linear(x, w, in_gates=in_gates, out_gates=out_gates, backend=backend)
        out[f"masked_linear ({'fused' if backend == 'triton' else 'eager reference'})"] = s.bytes / M
    return out


def main():
    args, dtype, device = parse_args(__doc__.splitlines()[0], "timings")
    base = env_row()
    rows = []
    if args.saved_only:
        for M, K, N in [(64, 768, 768), (64, 3072, 768), (64, 4096, 4096)]:
            for mode, b in saved_bytes_per_token(M, K, N, dtype, device).items():
                rows.append({**base, "dtype": args.dtype, "tokens": M, "d_in": K, "d_out": N, "mode": mode,
                             "saved_bytes_per_token": b})
        name = "saved_bytes_masked_linear.csv"
    else:
        import triton.testing

        from nodeprune_kernels import masked_linear

        for M, K, N in SHAPES:
            x, w, las, in_gates, out_gates = make_case(M, K, N, dtype, device)
            dy = torch.randn(M, N, device=device, dtype=dtype)
            y = masked_linear(x, w, in_gates=in_gates, out_gates=out_gates)
            cases = {
                ("forward", "F.linear"): lambda: F.linear(x, w),
                ("forward", "masked_linear"): lambda: masked_linear(x, w, in_gates=in_gates, out_gates=out_gates),
                ("backward", "dx GEMM (dy @ W)"): lambda: dy @ w,
                ("backward", "masked_linear (dx + gates)"): lambda: torch.autograd.grad(y, [x, *las], dy,
                                                                                         retain_graph=True),
            }
            flops = 2 * M * K * N
            for (phase, mode), fn in cases.items():
                med, lo, hi = triton.testing.do_bench(fn, warmup=50, rep=300, quantiles=[0.5, 0.2, 0.8])
                rows.append({**base, "dtype": args.dtype, "tokens": M, "d_in": K, "d_out": N, "phase": phase,
                             "mode": mode, "ms_median": med, "ms_p20": lo, "ms_p80": hi,
                             "tflops_equiv": flops / med / 1e9})
                print(f"{M}x{K}x{N} {phase:<8} {mode:<28} {med:8.3f} ms  {flops / med / 1e9:7.1f} TFLOP/s")
        name = f"masked_linear_{base['device'].replace(' ', '_')}.csv"
    out = write_csv(rows, name, args.out)
    for r in rows if args.saved_only else []:
        print(f"{r['tokens']}x{r['d_in']}x{r['d_out']} {r['mode']:<32} {r['saved_bytes_per_token']:10.1f} B/token")
    print(f"wrote {out}")


if __name__ == "__main__":
    main()

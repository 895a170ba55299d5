"""Self-check: every op on small random inputs against its float64 reference, in a short table.

Runs the Triton kernels on the GPU when there is one, else in Triton's interpreter on the CPU. Prints the
largest relative error of each output and gradient, the bytes saved for backward per token (fused against
the eager reference), and then the GPU build report of every kernel (registers, spills, shared memory,
wgmma) from :mod:`nodeprune_kernels.compile`.
"""
from __future__ import annotations

import torch

from .ops import Gate, gate_noise, hard_concrete, masked_linear
from .ops.hard_concrete.reference import hard_concrete_reference
from .ops.masked_linear.reference import masked_linear_reference
from .utils.memory import SavedTensorBytes
from .utils.testing import TOL
from .utils.testing import rel_err as _rel


def _masked_linear_case(dtype, ablation, device, tokens=(4, 24), d_in=96, d_out=80, heads=4):
    g = torch.Generator(device="cpu").manual_seed(0)

    def rnd(*shape, scale=1.0):
        return (torch.randn(*shape, generator=g) * scale).to(device)

    x = rnd(*tokens, d_in).to(dtype).requires_grad_()
    w = rnd(d_out, d_in, scale=d_in**-0.5).to(dtype)
    b = rnd(d_out).to(dtype)
    x_ablate = {"zero": None, "mean": rnd(d_in).to(dtype), "interchange": rnd(*tokens, d_in).to(dtype)}[ablation]
    las = [(rnd(n, scale=1.5) + 0.5).requires_grad_() for n in (1, heads, d_in, d_out)]
    in_gates = [Gate(las[0], d_in), Gate(las[1], d_in // heads, 1), Gate(las[2], 1, 1 + heads)]
    out_gates = [Gate(las[3], 1, 1 + heads + d_in)]
    kw = dict(in_gates=in_gates, out_gates=out_gates, x_ablate=x_ablate, seed=1234)
    with SavedTensorBytes(ignore=[w, b]) as saved:
        y = masked_linear(x, w, b, backend="triton", **kw)
    with SavedTensorBytes(ignore=[w, b]) as saved_ref:
        masked_linear(x, w, b, backend="reference", **kw)
    dy = torch.randn(y.shape, generator=g).to(device=device, dtype=dtype)
    grads = torch.autograd.grad(y, [x, *las], dy)
    x64 = x.detach().double().requires_grad_()
    las64 = [la.detach().double().requires_grad_() for la in las]
    gates64 = [Gate(l64, gt.group, gt.offset) for l64, gt in zip(las64, in_gates + out_gates)]
    y64 = masked_linear_reference(x64, w.double(), b.double(), in_gates=gates64[:3], out_gates=gates64[3:],
                                  x_ablate=None if x_ablate is None else x_ablate.double(), seed=1234)
    grads64 = torch.autograd.grad(y64, [x64, *las64], dy.double())
    n_tok = x.numel() // d_in
    return {
        "op": "masked_linear", "case": f"{ablation}, 4+1 gate levels", "dtype": str(dtype).replace("torch.", ""),
        "out": _rel(y, y64), "grad": max(_rel(a, r) for a, r in zip(grads, grads64)), "tol": TOL[dtype],
        "saved": saved.bytes / n_tok, "saved_ref": saved_ref.bytes / n_tok,
    }


def _hard_concrete_case(training, device):
    la = (torch.randn(1000) * 2).to(device).requires_grad_()
    z = hard_concrete(la, seed=7, offset=3, training=training, backend="triton")
    z64 = hard_concrete_reference(la.detach().double().requires_grad_(), seed=7, offset=3, training=training)
    dz = torch.randn(1000).to(device)
    (g,) = torch.autograd.grad(z, la, dz)
    la64 = la.detach().double().requires_grad_()
    (g64,) = torch.autograd.grad(hard_concrete_reference(la64, seed=7, offset=3, training=training), la64,
                                 dz.double())
    return {"op": "hard_concrete", "case": "training" if training else "deterministic", "dtype": "float32",
            "out": _rel(z, z64), "grad": _rel(g, g64), "tol": 1e-6, "saved": None, "saved_ref": None}


def _philox_case(device):
    bad = 0
    for seed, offset in ((0, 0), (1, 17), (2**40 + 3, 2**30)):
        a = gate_noise(4096, seed=seed, offset=offset, device=device, backend="triton")
        r = gate_noise(4096, seed=seed, offset=offset, device=device, backend="reference")
        bad += int((a.view(torch.int32) != r.view(torch.int32)).sum())
    return {"op": "philox noise", "case": "bit-exact, 3 seeds", "dtype": "float32", "out": float(bad),
            "grad": 0.0, "tol": 0.0, "saved": None, "saved_ref": None}


def run(device: str | None = None, compile_kernels: bool = True, printer=print) -> bool:
    """Run the checks and print the tables; returns True when every check is within tolerance."""
    from .utils.backend import interpreting

    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    where = "Triton interpreter (CPU)" if interpreting() and device == "cpu" else f"Triton on {device}"
    if device == "cuda":
        where += f" ({torch.cuda.get_device_name()})"
    printer(f"nodeprune-kernels self-check: kernels run in {where}; references in float64\n")
    rows = [_philox_case(device), _hard_concrete_case(True, device), _hard_concrete_case(False, device)]
    dtypes = (torch.float32, torch.bfloat16) if device == "cpu" else (torch.float32, torch.float16, torch.bfloat16)
    for dtype in dtypes:
        for ablation in ("zero", "mean", "interchange"):
            rows.append(_masked_linear_case(dtype, ablation, device))
    head = f"{'op':<14} {'case':<30} {'dtype':<9} {'out err':>9} {'grad err':>9} {'tol':>7} " \
           f"{'saved B/tok':>11} {'eager B/tok':>11}  ok"
    printer(head)
    printer("-" * len(head))
    ok_all = True
    for r in rows:
        ok = r["out"] <= r["tol"] and r["grad"] <= r["tol"]
        ok_all &= ok
        saved = "" if r["saved"] is None else f"{r['saved']:.0f}"
        saved_ref = "" if r["saved_ref"] is None else f"{r['saved_ref']:.0f}"
        printer(f"{r['op']:<14} {r['case']:<30} {r['dtype']:<9} {r['out']:>9.2e} {r['grad']:>9.2e} "
                f"{r['tol']:>7.0e} {saved:>11} {saved_ref:>11}  {'yes' if ok else 'NO'}")
    printer("\nerrors: relative norm error against float64; grad err is the largest over dx and every "
            "log_alpha.\nsaved: bytes per token saved for backward (weights excluded); fused keeps x (and x_c).")
    if compile_kernels:
        from .compile import compile_records, format_table, standard_records

        printer("\nGPU builds of every kernel specialisation (triton.compile for sm_90 / sm_80, read by ptxas):\n")
        printer(format_table(compile_records(standard_records())))
    printer("\nself-check " + ("passed" if ok_all else "FAILED"))
    return ok_all

"""Self-check: every op on small random inputs against its float64 reference, in a short table.

Runs the Triton kernels on the GPU when there is one; on the CPU the native C++ kernels and the Triton
kernels in Triton's interpreter (the command line sets TRITON_INTERPRET=1 there). Prints the
largest relative error of each output and gradient, the bytes saved for backward per token (fused against
the eager reference), and then the GPU build report of every kernel (registers, spills, shared memory,
wgmma) from :mod:`nodeprune_kernels.compile`.
"""
from __future__ import annotations

import torch

from .ops import Gate, gate_noise, hard_concrete, masked_attn_out_proj, masked_linear, masked_mlp
from .ops.hard_concrete.reference import hard_concrete_reference
from .ops.masked_attn_out_proj.reference import masked_attn_out_proj_reference
from .ops.masked_linear.reference import masked_linear_reference
from .ops.masked_mlp.reference import masked_mlp_reference
from .utils.memory import SavedTensorBytes
from .utils.testing import TOL
from .utils.testing import rel_err as _rel


def _measure(fused, op, case, dtype, run, leaves, run64, leaves64, n_tok, ignore):
    """One table row: ``run(backend)`` computes the op from ``leaves`` on the ``fused`` backend (and the
    eager reference, for its saved bytes); ``run64()`` the float64 reference."""
    with SavedTensorBytes(ignore=ignore) as saved:
        y = run(fused)
    with SavedTensorBytes(ignore=ignore) as saved_ref:
        run("reference")
    dy = torch.randn(y.shape, generator=torch.Generator(device="cpu").manual_seed(1)).to(y.device, dtype)
    grads = torch.autograd.grad(y, leaves, dy)
    y64 = run64()
    grads64 = torch.autograd.grad(y64, leaves64, dy.double())
    return {
        "backend": fused, "op": op, "case": case, "dtype": str(dtype).replace("torch.", ""), "out": _rel(y, y64),
        "grad": max(_rel(a, r) for a, r in zip(grads, grads64)), "tol": TOL[dtype],
        "saved": saved.bytes / n_tok, "saved_ref": saved_ref.bytes / n_tok,
    }


def _randn(device, seed=0):
    g = torch.Generator(device="cpu").manual_seed(seed)
    return lambda *shape, scale=1.0, dtype=torch.float32: (torch.randn(*shape, generator=g) * scale).to(device, dtype)


def _as64(gates, las64):
    return [Gate(l64, gt.group, gt.offset) for l64, gt in zip(las64, gates)]


def _masked_linear_case(fused, dtype, ablation, device, tokens=(4, 24), d_in=96, d_out=80, heads=4):
    rnd = _randn(device)
    x = rnd(*tokens, d_in, dtype=dtype).requires_grad_()
    w = rnd(d_out, d_in, scale=d_in**-0.5, dtype=dtype)
    b = rnd(d_out, dtype=dtype)
    x_ablate = {"zero": None, "mean": rnd(d_in, dtype=dtype), "interchange": rnd(*tokens, d_in, dtype=dtype)}[ablation]
    las = [(rnd(n, scale=1.5) + 0.5).requires_grad_() for n in (1, heads, d_in, d_out)]
    gates = [Gate(las[0], d_in), Gate(las[1], d_in // heads, 1), Gate(las[2], 1, 1 + heads),
             Gate(las[3], 1, 1 + heads + d_in)]
    x64 = x.detach().double().requires_grad_()
    las64 = [la.detach().double().requires_grad_() for la in las]
    g64 = _as64(gates, las64)
    return _measure(
        fused, "masked_linear", f"{ablation}, 4+1 gate levels", dtype,
        lambda be: masked_linear(x, w, b, in_gates=gates[:3], out_gates=gates[3:], x_ablate=x_ablate, seed=1234,
                                 backend=be),
        [x, *las],
        lambda: masked_linear_reference(x64, w.double(), b.double(), in_gates=g64[:3], out_gates=g64[3:],
                                        x_ablate=None if x_ablate is None else x_ablate.double(), seed=1234),
        [x64, *las64], x.numel() // d_in, [w, b])


def _masked_attn_case(fused, dtype, device, batch=2, seq=24, heads=4, head_dim=24, d_out=80):
    """The attention output as SDPA leaves it, [B, H, S, D].transpose(1, 2), interchange ablation."""
    rnd = _randn(device, 1)
    o = rnd(batch, heads, seq, head_dim, dtype=dtype).requires_grad_()
    o_c = rnd(batch, heads, seq, head_dim, dtype=dtype).transpose(1, 2)
    K = heads * head_dim
    w = rnd(d_out, K, scale=K**-0.5, dtype=dtype)
    las = [(rnd(n, scale=1.5) + 1.0).requires_grad_() for n in (1, heads, K)]
    gates = [Gate(las[0], K), Gate(las[1], head_dim, 1), Gate(las[2], 1, 1 + heads)]
    o64 = o.detach().double().requires_grad_()
    las64 = [la.detach().double().requires_grad_() for la in las]
    return _measure(
        fused, "masked_attn_o", "interchange, SDPA layout", dtype,
        lambda be: masked_attn_out_proj(o.transpose(1, 2), w, in_gates=gates, x_ablate=o_c, seed=7, backend=be),
        [o, *las],
        lambda: masked_attn_out_proj_reference(o64.transpose(1, 2), w.double(), in_gates=_as64(gates, las64),
                                               x_ablate=o_c.double(), seed=7),
        [o64, *las64], batch * seq, [w])


def _masked_mlp_case(fused, dtype, ablation, gated, device, tokens=(4, 24), d_model=80, d_ff=96):
    rnd = _randn(device, 2)
    x = rnd(*tokens, d_model, dtype=dtype).requires_grad_()
    weights = dict(up_weight=rnd(d_ff, d_model, scale=d_model**-0.5, dtype=dtype),
                   down_weight=rnd(d_model, d_ff, scale=d_ff**-0.5, dtype=dtype),
                   gate_weight=rnd(d_ff, d_model, scale=d_model**-0.5, dtype=dtype) if gated else None,
                   down_bias=rnd(d_model, scale=0.1, dtype=dtype))
    abl = {"zero": {}, "mean": dict(hidden_ablate=rnd(d_ff, dtype=dtype)),
           "interchange": dict(x_corrupt=rnd(*tokens, d_model, dtype=dtype))}[ablation]
    act = "silu" if gated else "gelu_tanh"
    las = [(rnd(n, scale=1.5) + 1.0).requires_grad_() for n in (1, d_ff, d_model)]
    gates = [Gate(las[0], d_ff), Gate(las[1], 1, 1), Gate(las[2], 1, 1 + d_ff)]
    x64 = x.detach().double().requires_grad_()
    las64 = [la.detach().double().requires_grad_() for la in las]
    g64 = _as64(gates, las64)
    w64 = {k: None if v is None else v.double() for k, v in weights.items()}
    abl64 = {k: v.double() for k, v in abl.items()}
    return _measure(
        fused, "masked_mlp", f"{ablation}, {'SwiGLU' if gated else 'gelu_new'}", dtype,
        lambda be: masked_mlp(x, **weights, activation=act, in_gates=gates[:2], out_gates=gates[2:], seed=5,
                              backend=be, **abl),
        [x, *las],
        lambda: masked_mlp_reference(x64, **w64, activation=act, in_gates=g64[:2], out_gates=g64[2:], seed=5,
                                     **abl64),
        [x64, *las64], x.numel() // d_model, [w for w in weights.values() if w is not None])


def _hard_concrete_case(fused, training, device):
    la = (torch.randn(1000) * 2).to(device).requires_grad_()
    z = hard_concrete(la, seed=7, offset=3, training=training, backend=fused)
    z64 = hard_concrete_reference(la.detach().double().requires_grad_(), seed=7, offset=3, training=training)
    dz = torch.randn(1000).to(device)
    (g,) = torch.autograd.grad(z, la, dz)
    la64 = la.detach().double().requires_grad_()
    (g64,) = torch.autograd.grad(hard_concrete_reference(la64, seed=7, offset=3, training=training), la64,
                                 dz.double())
    return {"backend": fused, "op": "hard_concrete", "case": "training" if training else "deterministic",
            "dtype": "float32",
            "out": _rel(z, z64), "grad": _rel(g, g64), "tol": 1e-6, "saved": None, "saved_ref": None}


def _philox_case(fused, device):
    bad = 0
    for seed, offset in ((0, 0), (1, 17), (2**40 + 3, 2**30)):
        a = gate_noise(4096, seed=seed, offset=offset, device=device, backend=fused)
        r = gate_noise(4096, seed=seed, offset=offset, device=device, backend="reference")
        bad += int((a.view(torch.int32) != r.view(torch.int32)).sum())
    return {"backend": fused, "op": "philox noise", "case": "bit-exact, 3 seeds", "dtype": "float32",
            "out": float(bad),
            "grad": 0.0, "tol": 0.0, "saved": None, "saved_ref": None}


def run(device: str | None = None, compile_kernels: bool = True, printer=print) -> bool:
    """Run the checks and print the tables; returns True when every check is within tolerance.

    On CUDA the Triton kernels are checked; on the CPU the native kernels, and the Triton kernels in the
    interpreter when ``TRITON_INTERPRET=1`` is set.
    """
    from .utils import native
    from .utils.backend import interpreting

    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    backends = ["triton"] if device == "cuda" or interpreting() else []
    where = [f"Triton on {device} ({torch.cuda.get_device_name()})" if device == "cuda"
             else "Triton in its interpreter (CPU)"] if backends else []
    if device == "cpu":
        reason = native.unavailable_reason()
        if reason is None:
            backends.append("native")
            where.append("the native C++ kernels (CPU)")
        else:
            printer(f"native backend skipped: {reason}\n")
    printer(f"nodeprune-kernels self-check: {' and '.join(where)}; references in float64\n")
    rows = []
    for fused in backends:
        rows += [_philox_case(fused, device), _hard_concrete_case(fused, True, device),
                 _hard_concrete_case(fused, False, device)]
        dtypes = (torch.float32, torch.bfloat16) if device == "cpu" else (torch.float32, torch.float16,
                                                                           torch.bfloat16)
        for dtype in dtypes:
            for ablation in ("zero", "mean", "interchange"):
                rows.append(_masked_linear_case(fused, dtype, ablation, device))
            rows.append(_masked_attn_case(fused, dtype, device))
            for ablation in ("zero", "mean", "interchange"):
                rows.append(_masked_mlp_case(fused, dtype, ablation, True, device))
            rows.append(_masked_mlp_case(fused, dtype, "interchange", False, device))
    head = f"{'backend':<8} {'op':<14} {'case':<30} {'dtype':<9} {'out err':>9} {'grad err':>9} {'tol':>7} " \
           f"{'saved B/tok':>11} {'eager B/tok':>11}  ok"
    printer(head)
    printer("-" * len(head))
    ok_all = True
    for r in rows:
        ok = r["out"] <= r["tol"] and r["grad"] <= r["tol"]
        ok_all &= ok
        saved = "" if r["saved"] is None else f"{r['saved']:.0f}"
        saved_ref = "" if r["saved_ref"] is None else f"{r['saved_ref']:.0f}"
        printer(f"{r['backend']:<8} {r['op']:<14} {r['case']:<30} {r['dtype']:<9} {r['out']:>9.2e} {r['grad']:>9.2e} "
                f"{r['tol']:>7.0e} {saved:>11} {saved_ref:>11}  {'yes' if ok else 'NO'}")
    printer("\nerrors: relative norm error against float64; grad err is the largest over dx and every "
            "log_alpha.\nsaved: bytes per token saved for backward (weights excluded): the fused linears keep their "
             "input (and x_c),\nthe fused MLP its pre-activations (and the corrupted input), plus the gates.")
    if compile_kernels:
        from .compile import compile_records, format_table, standard_records

        printer("\nGPU builds of every kernel specialisation (triton.compile for sm_90 / sm_80, read by ptxas):\n")
        printer(format_table(compile_records(standard_records())))
    printer("\nself-check " + ("passed" if ok_all else "FAILED"))
    return ok_all

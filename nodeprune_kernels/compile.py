"""Compile the package's Triton kernels for real GPU targets, on any machine (no GPU needed).

The Triton interpreter compiles nothing, so errors only the GPU compiler sees would pass it. This module
builds every kernel specialisation an op launches (captured by
:func:`nodeprune_kernels.utils.launch.record_launches`) with ``triton.compile`` for sm_90 and sm_80, and
reads the results with the ptxas that ships with triton: registers, spills, shared memory, and whether the
matrix products use wgmma (Hopper) or mma.sync (Ampere).

Compilation runs in a subprocess without ``TRITON_INTERPRET``, because kernels defined under the
interpreter cannot be compiled. Command line: ``python -m nodeprune_kernels.compile`` compiles the
standard set of launches of every op and prints the table.
"""
from __future__ import annotations

import importlib
import json
import os
import re
import subprocess
import sys
import tempfile
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict

ARCHS = (90, 80)


def _ptxas_path(arch: int) -> str:
    """The ptxas triton itself uses for ``arch`` (it ships more than one)."""
    try:
        from triton.backends.nvidia.compiler import get_ptxas

        return get_ptxas(arch).path
    except ImportError:  # older triton: one ptxas
        from triton.backends.nvidia.compiler import _path_to_binary

        return _path_to_binary("ptxas")[0]


def _compile_one(rec: dict, arch: int) -> dict:
    import triton
    from triton.backends.compiler import GPUTarget

    module = importlib.import_module(rec["module"])
    kernel = getattr(module, rec["name"])
    signature = dict(rec["signature"])
    constexprs = {k: v for k, v in rec["constexprs"]}
    names = [p.name for p in kernel.params]
    attrs = {(names.index(n),): [["tt.divisibility", 16]] for n in rec["aligned"]}
    src = triton.compiler.ASTSource(fn=kernel, signature=signature, constexprs=constexprs, attrs=attrs)
    options = {"num_warps": rec["num_warps"], "num_stages": rec["num_stages"], "enable_fp_fusion": True}
    compiled = triton.compile(src, target=GPUTarget("cuda", arch, 32), options=options)
    ptx = compiled.asm["ptx"]
    sm = f"sm_{arch}a" if arch >= 90 else f"sm_{arch}"
    with tempfile.TemporaryDirectory() as d:
        path = os.path.join(d, "k.ptx")
        with open(path, "w") as f:
            f.write(ptx)
        log = subprocess.run([_ptxas_path(arch), f"-arch={sm}", "-v", path, "-o", os.path.join(d, "k.cubin")],
                             capture_output=True, text=True)
        if log.returncode != 0:
            raise RuntimeError(f"ptxas failed on {rec['name']} for {sm}: {log.stderr[-3000:]}")
        log = log.stderr

    def grab(pattern):
        m = re.search(pattern, log)
        return int(m.group(1)) if m else 0

    return {
        "kernel": rec["name"],
        "arch": f"sm_{arch}",
        "dtypes": sorted({v[1:] for _, v in rec["signature"] if v.startswith("*")} - {"i64", "i32"}),
        "constexprs": {k: v for k, v in rec["constexprs"]},
        "num_warps": rec["num_warps"],
        "num_stages": rec["num_stages"],
        "registers": grab(r"Used (\d+) registers"),
        "spill_stores": grab(r"(\d+) bytes spill stores"),
        "spill_loads": grab(r"(\d+) bytes spill loads"),
        "shared_bytes": int(compiled.metadata.shared),
        "wgmma": "wgmma.mma_async" in ptx,
        "mma_sync": "mma.sync" in ptx,
        "has_dot": "tt.dot" in compiled.asm["ttir"],
    }


def compile_records(records, archs=ARCHS, jobs: int | None = None) -> list[dict]:
    """Compile each distinct record for each arch in clean subprocesses (``jobs`` at a time, default one
    per CPU); returns one dict per build, in the order of the records."""
    unique = list(dict.fromkeys(records))
    jobs = max(1, min(jobs or os.cpu_count() or 1, len(unique)))
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    chunks = [unique[i::jobs] for i in range(jobs)]

    def run(chunk):
        payload = json.dumps({"records": [asdict(r) for r in chunk], "archs": list(archs)})
        proc = subprocess.run([sys.executable, "-m", "nodeprune_kernels.compile", "--worker"], input=payload,
                              capture_output=True, text=True, env=env)
        if proc.returncode != 0:
            raise RuntimeError(f"GPU compilation failed:\n{proc.stderr[-6000:]}")
        return json.loads(proc.stdout.strip().splitlines()[-1])

    with ThreadPoolExecutor(jobs) as pool:
        results = list(pool.map(run, chunks))
    per_record = {}
    for chunk, rows in zip(chunks, results):
        for i, rec in enumerate(chunk):
            per_record[rec] = rows[i * len(archs):(i + 1) * len(archs)]
    return [row for rec in unique for row in per_record[rec]]


def standard_records():
    """Launch records of every op for the dtypes and shapes a model run uses, with GPU configurations.

    Must run where kernels can be launched: on a GPU, or under ``TRITON_INTERPRET=1``. Nothing is executed.
    """
    import torch

    from .ops import Gate, hard_concrete, masked_attn_out_proj, masked_linear, masked_mlp
    from .utils.launch import record_launches

    dev = "cuda" if torch.cuda.is_available() and os.environ.get("TRITON_INTERPRET", "0") == "0" else "cpu"
    K, N, H, FF = 64, 48, 4, 96
    with record_launches(gpu_configs=True, execute=False) as records:
        la = torch.zeros(7, device=dev, requires_grad=True)
        for training in (True, False):
            hard_concrete(la, seed=1, training=training, backend="triton").sum().backward()
        for dtype in (torch.float32, torch.float16, torch.bfloat16):
            x = torch.zeros(2, 5, K, dtype=dtype, device=dev, requires_grad=True)
            w = torch.zeros(N, K, dtype=dtype, device=dev)
            b = torch.zeros(N, dtype=dtype, device=dev)
            lv = [torch.zeros(n, device=dev, requires_grad=True) for n in (1, H, K, N)]
            gates = dict(in_gates=[Gate(lv[0], K), Gate(lv[1], K // H), Gate(lv[2], 1)], out_gates=[Gate(lv[3], 1, 500)])
            ablations = [None, torch.zeros(K, dtype=dtype, device=dev), torch.zeros_like(x).detach()]
            for x_ablate in ablations if dtype == torch.bfloat16 else ablations[:1]:
                y = masked_linear(x, w, b, x_ablate=x_ablate, seed=3, backend="triton", **gates)
                y.float().sum().backward()
            # the attention output as SDPA leaves it, [B, H, S, D] read through a transpose (split operands)
            o = torch.zeros(2, H, 5, K // H, dtype=dtype, device=dev, requires_grad=True)
            masked_attn_out_proj(o.transpose(1, 2), w, seed=3, backend="triton", **gates).float().sum().backward()
            # the MLP: gated and not, each activation, each ablation (bf16), hidden-unit and output gates
            xm = torch.zeros(2, 5, N, dtype=dtype, device=dev, requires_grad=True)
            up, gw, down = (torch.zeros(FF, N, dtype=dtype, device=dev), torch.zeros(FF, N, dtype=dtype, device=dev),
                            torch.zeros(N, FF, dtype=dtype, device=dev))
            lm = [torch.zeros(n, device=dev, requires_grad=True) for n in (1, FF, N)]
            mgates = dict(in_gates=[Gate(lm[0], FF), Gate(lm[1], 1, 1)], out_gates=[Gate(lm[2], 1, 200)])
            mlps = [("silu", gw), ("gelu", gw), ("gelu_tanh", gw), ("gelu_tanh", None), ("gelu", None),
                    ("relu", None)]
            for act, gate_w in mlps if dtype == torch.bfloat16 else mlps[:1] + mlps[3:4]:
                masked_mlp(xm, up, down, gate_weight=gate_w, activation=act, seed=3, backend="triton",
                           **mgates).float().sum().backward()
            if dtype == torch.bfloat16:
                corrupt = torch.zeros_like(xm).detach()
                for gate_w in (gw, None):
                    for abl in (dict(hidden_ablate=torch.zeros(FF, dtype=dtype, device=dev)),
                                dict(x_corrupt=corrupt), dict(x_corrupt=corrupt, cache_corrupt_hidden=True)):
                        masked_mlp(xm, up, down, gate_weight=gate_w, seed=3, backend="triton", **abl,
                                   **mgates).float().sum().backward()
    return records


def role(r) -> str:
    """What a gated-matmul build is used for, from its constexprs (forward, dx, output-gate recompute)."""
    c = r["constexprs"]
    if r["kernel"] == "_gated_matmul_kernel":
        if c["OUT_KIND"] == 1:
            name = "mlp dh" + ("+dz_in" if c["COLSUM"] else "")
        elif c["A_HIDDEN"]:
            name = "mlp dz_out" if c["COLSUM"] else "mlp fwd"
        else:
            name = "dx+dz_in" if c["STORE_OUT"] and c["COLSUM"] else "dz_out" if c["COLSUM"] else "forward"
        if any(k not in c for k in ("A_M1", "A_R1", "E_M1", "E_C1")):  # a split size, not the constant 1
            name += " split"
        ablation = {0: "", 1: " mean", 2: " interch.", 3: " rebuild"}[c["AC_MODE"] or c["EC_MODE"]]
        if c["A_HIDDEN"] or c["E_HIDDEN"]:
            name += {1: " silu", 2: " gelu", 3: " gelu_t", 4: " relu"}[c["ACT"]] + (" glu" if c["GLU"] else "")
        return name + ablation
    if r["kernel"] == "_gate_level_grad_kernel":
        return f"level {c['TARGET']}/{c['N_LEVELS']}"
    return ("train" if c.get("TRAINING") else "eval") if "TRAINING" in c else ""


def format_table(rows) -> str:
    head = f"{'kernel':<26} {'role':<30} {'arch':<6} {'dtypes':<10} {'tile':<10} {'warps':>5} {'stages':>6} " \
           f"{'regs':>5} {'spill':>6} {'smem':>7} {'mma':<9}"
    lines = [head, "-" * len(head)]
    for r in rows:
        mma = "wgmma" if r["wgmma"] else "mma.sync" if r["mma_sync"] else ("FMA" if r["has_dot"] else "-")
        c = r["constexprs"]
        tile = "x".join(str(c[k]) for k in ("BLOCK_M", "BLOCK_C", "BLOCK_R", "BLOCK_G", "BLOCK_F", "BLOCK") if k in c)
        lines.append(f"{r['kernel']:<26} {role(r):<30} {r['arch']:<6} {','.join(r['dtypes']):<10} {tile:<10} "
                     f"{r['num_warps']:>5} "
                     f"{r['num_stages']:>6} {r['registers']:>5} {r['spill_stores'] + r['spill_loads']:>6} "
                     f"{r['shared_bytes']:>7} {mma:<9}")
    return "\n".join(lines)


def _worker():
    job = json.loads(sys.stdin.read())
    out = [_compile_one(rec, arch) for rec in job["records"] for arch in job["archs"]]
    sys.stdout.write(json.dumps(out) + "\n")


def main(argv=None):
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["--worker"]:
        return _worker()
    import torch

    if not torch.cuda.is_available():
        os.environ.setdefault("TRITON_INTERPRET", "1")
    print(format_table(compile_records(standard_records())))


if __name__ == "__main__":
    main()

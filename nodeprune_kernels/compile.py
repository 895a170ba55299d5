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


def compile_records(records, archs=ARCHS) -> list[dict]:
    """Compile each distinct record for each arch in a clean subprocess; returns one dict per build."""
    unique = list(dict.fromkeys(records))
    payload = json.dumps({"records": [asdict(r) for r in unique], "archs": list(archs)})
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    proc = subprocess.run([sys.executable, "-m", "nodeprune_kernels.compile", "--worker"], input=payload,
                          capture_output=True, text=True, env=env)
    if proc.returncode != 0:
        raise RuntimeError(f"GPU compilation failed:\n{proc.stderr[-6000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def standard_records():
    """Launch records of every op for the dtypes and shapes a model run uses, with GPU configurations.

    Must run where kernels can be launched: on a GPU, or under ``TRITON_INTERPRET=1``. Nothing is executed.
    """
    import torch

    from .ops import Gate, hard_concrete, masked_linear
    from .utils.launch import record_launches

    dev = "cuda" if torch.cuda.is_available() and os.environ.get("TRITON_INTERPRET", "0") == "0" else "cpu"
    K, N, H = 64, 48, 4
    with record_launches(gpu_configs=True, execute=False) as records:
        la = torch.zeros(7, device=dev, requires_grad=True)
        for training in (True, False):
            hard_concrete(la, seed=1, training=training, backend="triton").sum().backward()
        for dtype in (torch.float32, torch.float16, torch.bfloat16):
            x = torch.zeros(2, 5, K, dtype=dtype, device=dev, requires_grad=True)
            w = torch.zeros(N, K, dtype=dtype, device=dev)
            b = torch.zeros(N, dtype=dtype, device=dev)
            lv = [torch.zeros(n, device=dev, requires_grad=True) for n in (1, H, K, N)]
            ablations = [None, torch.zeros(K, dtype=dtype, device=dev), torch.zeros_like(x).detach()]
            for x_ablate in ablations if dtype == torch.bfloat16 else ablations[:1]:
                y = masked_linear(x, w, b, in_gates=[Gate(lv[0], K), Gate(lv[1], K // H), Gate(lv[2], 1)],
                                  out_gates=[Gate(lv[3], 1, 500)], x_ablate=x_ablate, seed=3, backend="triton")
                y.float().sum().backward()
    return records


def role(r) -> str:
    """What a gated-matmul build is used for, from its constexprs (forward, dx, output-gate recompute)."""
    c = r["constexprs"]
    if r["kernel"] == "_gated_matmul_kernel":
        name = "dx+dz_in" if c["STORE_OUT"] and c["COLSUM"] else "dz_out" if c["COLSUM"] else "forward"
        ablation = {0: "", 1: " mean", 2: " interch."}[c["AC_MODE"] or c["EC_MODE"]]
        return name + ablation
    if r["kernel"] == "_gate_level_grad_kernel":
        return f"level {c['TARGET']}/{c['N_LEVELS']}"
    return ("train" if c.get("TRAINING") else "eval") if "TRAINING" in c else ""


def format_table(rows) -> str:
    head = f"{'kernel':<26} {'role':<17} {'arch':<6} {'dtypes':<10} {'tile':<10} {'warps':>5} {'stages':>6} " \
           f"{'regs':>5} {'spill':>6} {'smem':>7} {'mma':<9}"
    lines = [head, "-" * len(head)]
    for r in rows:
        mma = "wgmma" if r["wgmma"] else "mma.sync" if r["mma_sync"] else ("FMA" if r["has_dot"] else "-")
        c = r["constexprs"]
        tile = "x".join(str(c[k]) for k in ("BLOCK_M", "BLOCK_C", "BLOCK_R", "BLOCK_G", "BLOCK_F", "BLOCK") if k in c)
        lines.append(f"{r['kernel']:<26} {role(r):<17} {r['arch']:<6} {','.join(r['dtypes']):<10} {tile:<10} "
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

"""Compile the package's Triton kernels for real GPU targets, on any machine (no GPU needed).

The Triton interpreter compiles nothing, so errors only the GPU compiler sees would pass it. This module
builds every kernel specialisation an op launches (captured by
:func:`nodeprune_kernels.utils.launch.record_launches`) with ``triton.compile`` for sm_90 and sm_80, and
reads the results with the ptxas that ships with triton: registers, spills, shared memory, and whether the
matrix products use wgmma (Hopper) or mma.sync (Ampere).

Compilation runs in a subprocess without ``TRITON_INTERPRET``, because kernels defined under the
interpreter cannot be compiled. Command line: ``python -m nodeprune_kernels.compile`` compiles the
standard set of launches of every op and prints the table.

Static performance report (``python -m nodeprune_kernels.compile --report [--arch 80] [--json]``). For each
GEMM build the cubin's SASS (disassembled with the ``nvdisasm`` that ships with triton) is searched for the
K loop: a backward branch closes a loop [target, branch]; the K loop is the innermost loop whose body holds
the MMA instructions (HGMMA on sm_90, HMMA on sm_80), else, for an fp32 FMA dot, the largest loop holding
FFMA. Its instruction count, from the target label to the back-edge branch inclusive, is the SASS
instructions per thread per K step (``loop_instructions``; a static count: an inner loop is counted once).
Triton does not unroll these loops, but the count is divided by the unroll factor should it ever do so:
the MMA work in the body (m*n*k of each HGMMA times the warp groups, of each HMMA times the warps, one
multiply-add per FFMA and thread) over one BLOCK_M x BLOCK_C x BLOCK_R step, rounded (``loop_unroll``). The
same loop of the Triton tutorial's matmul (:mod:`nodeprune_kernels.utils.plain_matmul`) built with the same
tiles, warps, stages, operand dtype, dot precision and operand contiguity is ``baseline_loop_instructions``
(one build per distinct configuration and arch, cached); ``ratio`` is the first over the second.
``loop_mufu`` counts the MUFU instructions in the K loop and ``samples_gates`` says whether any is an
LG2, EX2 or RCP (the log, exp and division of hard-concrete sampling; the Philox rounds are plain integer
work, so the MUFU test is the robust tell). ``wgmma_operand`` is "SS" when wgmma reads A from shared
memory (a 64-bit descriptor in the PTX), "RS" when from registers (a register list). ``rebuilds_hidden``
is the build's ``A_HIDDEN`` constexpr (the MLP's hidden units rebuilt inside the K loop), false if absent.

Against another triton (the GPU machines run 3.6) from a side virtualenv, no GPU needed::

    python3 -m venv /tmp/venv36
    /tmp/venv36/bin/pip install torch==2.13.0 numpy safetensors
    /tmp/venv36/bin/pip install --no-deps triton==3.6.0
    PYTHONPATH=/work/main /tmp/venv36/bin/python -m nodeprune_kernels.compile --report

(from the repository root; recording and compiling need only torch, triton, numpy and safetensors).
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


def _nvdisasm_path(arch: int) -> str:
    """The nvdisasm shipped next to triton's ptxas."""
    try:
        from triton import knobs

        return knobs.nvidia.nvdisasm.path
    except (ImportError, AttributeError):
        path = os.path.join(os.path.dirname(_ptxas_path(arch)), "nvdisasm")
        if os.path.exists(path):
            return path
        from triton.backends.nvidia.compiler import _path_to_binary

        return _path_to_binary("nvdisasm")[0]


def _build(rec: dict, arch: int):
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
    return triton.compile(src, target=GPUTarget("cuda", arch, 32), options=options)


_SASS_LINE = re.compile(r"^\s*/\*([0-9a-fA-F]+)\*/\s*(.*?)\s*;")
_LABEL = re.compile(r"^\s*(\.L\w+):")


def parse_sass(text: str) -> tuple[list, dict]:
    """nvdisasm (or cuobjdump -sass) text -> ([(address, opcode, operands), ...], {label: address})."""
    instrs, labels, pending = [], {}, []
    for line in text.splitlines():
        m = _LABEL.match(line)
        if m:
            pending.append(m.group(1))
            continue
        m = _SASS_LINE.match(line)
        if not m or not m.group(2):
            continue
        addr, body = int(m.group(1), 16), m.group(2)
        body = re.sub(r"^@!?U?P\w+\s+", "", body)  # the guard predicate
        op, _, operands = body.partition(" ")
        instrs.append((addr, op, operands.strip()))
        for name in pending:
            labels[name] = addr
        pending = []
    return instrs, labels


def _mma_work(op: str) -> tuple[int, str] | None:
    """(m*n*k of one instruction, unit) for an MMA / FMA opcode: unit "wg" (per warp group), "warp" or
    "thread"; None for anything else."""
    m = re.match(r"HGMMA\.(\d+)x(\d+)x(\d+)", op)
    if m:
        return int(m.group(1)) * int(m.group(2)) * int(m.group(3)), "wg"
    m = re.match(r"HMMA\.(16)(8)(\d+)", op)
    if m:
        return 16 * 8 * int(m.group(3)), "warp"
    if op.split(".")[0] == "FFMA":
        return 1, "thread"
    return None


def k_loop(sass: str, num_warps: int, step: int | None = None) -> dict | None:
    """The K loop of a GEMM's SASS: the innermost loop (a backward branch to its target) holding HGMMA or
    HMMA, else the largest one holding FFMA. ``step`` = BLOCK_M * BLOCK_N * BLOCK_K, for the unroll
    factor. Returns None when there is no such loop."""
    instrs, labels = parse_sass(sass)
    index = {addr: i for i, (addr, _, _) in enumerate(instrs)}
    loops = {}  # target index -> last back-edge index
    for i, (addr, op, operands) in enumerate(instrs):
        if op.split(".")[0] != "BRA":
            continue
        m = re.search(r"`?\(?(\.L\w+)\)?", operands)
        target = labels.get(m.group(1)) if m else None
        if target is None:
            m = re.search(r"0x([0-9a-fA-F]+)", operands)
            target = int(m.group(1), 16) if m else None
        if target is None or target >= addr or target not in index:
            continue
        t = index[target]
        loops[t] = max(loops.get(t, i), i)
    spans = list(loops.items())

    def ops(span):
        return [instrs[j][1] for j in range(span[0], span[1] + 1)]

    tensor = [sp for sp in spans if any(o.startswith(("HGMMA", "HMMA")) for o in ops(sp))]
    if tensor:
        t, e = min(tensor, key=lambda sp: sp[1] - sp[0])
    else:
        fma = [sp for sp in spans if any(o.split(".")[0] == "FFMA" for o in ops(sp))]
        if not fma:
            return None
        t, e = max(fma, key=lambda sp: sp[1] - sp[0])
    body = ops((t, e))
    tensor_ops = any(o.startswith(("HGMMA", "HMMA")) for o in body)
    work = 0
    for o in body:
        w = _mma_work(o)
        if w and (w[1] != "thread" or not tensor_ops):
            work += w[0] * {"wg": max(1, num_warps // 4), "warp": num_warps, "thread": 32 * num_warps}[w[1]]
    unroll = 1
    if step:
        # an exact multiple for tensor-core MMAs; FFMA loops may hold a few scaling FFMAs besides the dot's
        unroll = max(1, round(work / step) if tensor_ops else int(work / step + 0.25))
    mufu = [o for o in body if o.startswith("MUFU")]
    return {
        "loop_instructions": (e - t + 1) // unroll,
        "loop_unroll": unroll,
        "loop_mma": sum(1 for o in body if o.startswith(("HGMMA", "HMMA"))) // unroll,
        "loop_ffma": sum(1 for o in body if o.split(".")[0] == "FFMA") // unroll,
        "loop_mufu": len(mufu) // unroll,
        "samples_gates": any(o.split(".")[1:2] in (["LG2"], ["EX2"], ["RCP"]) for o in mufu),
    }


def wgmma_operand(ptx: str) -> str | None:
    """"SS" when every wgmma reads A from shared memory (a descriptor), "RS" when from registers (a
    register list), "SS+RS" for a mix; None without wgmma."""
    kinds = set()
    for m in re.finditer(r"wgmma\.mma_async\S*\s+\{[^}]*\}\s*,\s*(\S)", ptx):
        kinds.add("RS" if m.group(1) == "{" else "SS")
    return "+".join(sorted(kinds, reverse=True)) or None


def tile_of(constexprs: dict) -> tuple | None:
    """(BLOCK_M, BLOCK_N, BLOCK_K) of a GEMM build, from BLOCK_M, BLOCK_C or BLOCK_N, BLOCK_R or BLOCK_K."""
    bm = constexprs.get("BLOCK_M")
    bn = constexprs.get("BLOCK_C", constexprs.get("BLOCK_N"))
    bk = constexprs.get("BLOCK_R", constexprs.get("BLOCK_K"))
    return (bm, bn, bk) if all(isinstance(v, int) for v in (bm, bn, bk)) else None


def _compile_one(rec: dict, arch: int, loop: bool = True) -> dict:
    """Build ``rec`` for ``arch`` and read it: ptxas -v, the PTX and, with ``loop``, the K loop's SASS."""
    compiled = _build(rec, arch)
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
        has_dot = "tt.dot" in compiled.asm["ttir"]
        found = None
        if has_dot and loop:
            cubin = os.path.join(d, "triton.cubin")
            with open(cubin, "wb") as f:
                f.write(compiled.asm["cubin"])
            sass = subprocess.run([_nvdisasm_path(arch), "-c", cubin], capture_output=True, text=True)
            if sass.returncode != 0:
                raise RuntimeError(f"nvdisasm failed on {rec['name']} for {sm}: {sass.stderr[-3000:]}")
            tile = tile_of(dict(rec["constexprs"]))
            found = k_loop(sass.stdout, rec["num_warps"], tile[0] * tile[1] * tile[2] if tile else None)

    def grab(pattern):
        m = re.search(pattern, log)
        return int(m.group(1)) if m else 0

    constexprs = {k: v for k, v in rec["constexprs"]}
    return {
        "kernel": rec["name"],
        "arch": f"sm_{arch}",
        "dtypes": sorted({v[1:] for _, v in rec["signature"] if v.startswith("*")} - {"i64", "i32"}),
        "constexprs": constexprs,
        "num_warps": rec["num_warps"],
        "num_stages": rec["num_stages"],
        "registers": grab(r"Used (\d+) registers"),
        "spill_stores": grab(r"(\d+) bytes spill stores"),
        "spill_loads": grab(r"(\d+) bytes spill loads"),
        "shared_bytes": int(compiled.metadata.shared),
        "wgmma": "wgmma.mma_async" in ptx,
        "mma_sync": "mma.sync" in ptx,
        "has_dot": has_dot,
        "wgmma_operand": wgmma_operand(ptx),
        "rebuilds_hidden": bool(constexprs.get("A_HIDDEN", 0)),
        **(found or {"loop_instructions": None, "loop_unroll": None, "loop_mma": None, "loop_ffma": None,
                    "loop_mufu": None, "samples_gates": None}),
    }


def plain_matmul_record(dtype: str = "bf16", block_m: int = 128, block_n: int = 128, block_k: int = 64,
                        num_warps: int = 8, num_stages: int = 3, *, a_contig: str = "k", b_contig: str = "n",
                        dot_fp32: bool | None = None, input_precision: str = "ieee",
                        kernel: str = "_plain_matmul_kernel"):
    """A launch record of the tutorial matmul (or, with ``kernel="_log_scaled_matmul_kernel"``, of the
    negative control) of :mod:`nodeprune_kernels.utils.plain_matmul`. ``a_contig`` / ``b_contig``: the
    unit-stride dimension of A [M, K] ("m" or "k") and of B [K, N] ("k" or "n"), "" for none; unit strides
    are constants, as triton specialises them."""
    from .utils.launch import LaunchRecord

    log_scaled = kernel == "_log_scaled_matmul_kernel"
    unit = {"stride_am": a_contig == "m", "stride_ak": a_contig == "k", "stride_bk": b_contig == "k",
            "stride_bn": b_contig == "n", "stride_cm": False, "stride_cn": True}
    ptrs = [("a_ptr", f"*{dtype}"), ("b_ptr", f"*{dtype}"), ("c_ptr", f"*{dtype}")]
    if log_scaled:
        ptrs.append(("u_ptr", "*fp32"))
    signature, constexprs = list(ptrs) + [("M", "i32"), ("N", "i32"), ("K", "i32")], []
    for name, one in unit.items():
        signature.append((name, "constexpr" if one else "i32"))
        if one:
            constexprs.append((name, 1))
    tail = {"BLOCK_M": block_m, "BLOCK_N": block_n, "BLOCK_K": block_k, "GROUP_M": 8}
    if not log_scaled:
        tail = {"DOT_FP32": dtype == "fp32" if dot_fp32 is None else dot_fp32,
                "INPUT_PRECISION": input_precision, **tail}
    for name, v in tail.items():
        signature.append((name, "constexpr"))
        constexprs.append((name, v))
    aligned = tuple(n for n, t in signature if t != "constexpr")
    return LaunchRecord("nodeprune_kernels.utils.plain_matmul", kernel, tuple(signature), tuple(constexprs),
                        aligned, num_warps, num_stages)


def baseline_record(rec):
    """The plain-matmul record measuring ``rec`` (same tiles, warps, stages, A dtype, dot precision and
    operand contiguity), or None for a record without BLOCK_M / BLOCK_C|N / BLOCK_R|K constexprs."""
    c = dict(rec.constexprs)
    tile = tile_of(c)
    if tile is None:
        return None
    sig = dict(rec.signature)
    ptrs = [t for t in sig.values() if t.startswith("*")]
    dtype = sig.get("a_ptr", ptrs[0] if ptrs else "*fp32")[1:]

    def unit(*names):
        return any(c.get(n) == 1 and sig.get(n) == "constexpr" for n in names)

    # the gated kernel's A column r sits at (r // A_R1) * stride_ar + (r % A_R1) * stride_ar1
    a_k = "stride_ar1" if c.get("A_R1", 1) != 1 and "stride_ar1" in sig else "stride_ar" if "stride_ar" in sig \
        else "stride_ak"
    a_contig = "k" if unit(a_k) else "m" if unit("stride_am") and c.get("A_M1", 1) == 1 else ""
    b_contig = "k" if unit("stride_br", "stride_bk") else "n" if unit("stride_bc", "stride_bn") else ""
    dot_fp32 = bool(c.get("DOT_FP32", dtype == "fp32"))
    precision = str(c.get("INPUT_PRECISION", "tf32")) if dot_fp32 else "ieee"  # unused by 16-bit dots
    return plain_matmul_record(dtype, *tile, rec.num_warps, rec.num_stages, a_contig=a_contig, b_contig=b_contig,
                               dot_fp32=dot_fp32, input_precision=precision)


_BASELINES: dict = {}  # (baseline record, arch) -> its build, across compile_records calls


def compile_records(records, archs=ARCHS, jobs: int | None = None, baselines: bool = True,
                    loop_archs=None) -> list[dict]:
    """Compile each distinct record for each arch in clean subprocesses (``jobs`` at a time, default one
    per CPU); returns one dict per build, in the order of the records.

    The K loops of the GEMM builds for ``loop_archs`` (default: every arch) are read from their SASS (one
    nvdisasm run per build, about 0.3 s); with ``baselines`` each of them also gets
    ``baseline_loop_instructions`` and ``ratio`` from a plain matmul of its configuration (see
    :func:`baseline_record`), compiled in the same pool, once per configuration and arch and cached for the
    process."""
    unique = list(dict.fromkeys(records))
    loop_archs = tuple(archs if loop_archs is None else (a for a in archs if a in loop_archs))
    base_of = {r: baseline_record(r) for r in unique} if baselines and loop_archs else {}
    tasks = [(r, a, a in loop_archs) for r in unique for a in archs]
    tasks += [(b, a, True) for b in dict.fromkeys(v for v in base_of.values() if v is not None) if b not in unique
              for a in loop_archs if (b, a) not in _BASELINES]
    jobs = max(1, min(jobs or os.cpu_count() or 1, len(tasks)))
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    chunks = [tasks[i::jobs] for i in range(jobs)]

    def run(chunk):
        payload = json.dumps({"tasks": [(asdict(r), a, loop) for r, a, loop in chunk]})
        proc = subprocess.run([sys.executable, "-m", "nodeprune_kernels.compile", "--worker"], input=payload,
                              capture_output=True, text=True, env=env)
        if proc.returncode != 0:
            raise RuntimeError(f"GPU compilation failed:\n{proc.stderr[-6000:]}")
        return json.loads(proc.stdout.strip().splitlines()[-1])

    with ThreadPoolExecutor(jobs) as pool:
        results = list(pool.map(run, chunks))
    built = {}
    for chunk, rows in zip(chunks, results):
        for (rec, a, loop), row in zip(chunk, rows):
            built[(rec, a)] = row
            if loop and (rec not in unique or rec in base_of.values()):
                _BASELINES[(rec, a)] = row
    out = []
    for rec in unique:
        for a in archs:
            row = built[(rec, a)]
            base = _BASELINES.get((base_of.get(rec), a))
            n0 = base["loop_instructions"] if base else None
            n = row["loop_instructions"]
            row["baseline_loop_instructions"] = n0
            row["ratio"] = round(n / n0, 2) if n and n0 else None
            out.append(row)
    return out


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
    """What a gated-matmul build is used for, from its constexprs (forward, dx, output-gate recompute);
    "" where the constexprs are not the ones it knows."""
    c = r["constexprs"]
    try:
        acts = {1: " silu", 2: " gelu", 3: " gelu_t", 4: " relu"}
        modes = {0: "", 1: " mean", 2: " interch.", 3: " rebuild"}
        if r["kernel"] == "_gated_matmul_kernel":
            if c.get("OUT_KIND") == 1:
                name = "mlp dh" + ("+dz_in" if c.get("COLSUM") else "")
            else:
                name = "dx+dz_in" if c.get("STORE_OUT") and c.get("COLSUM") else "dz_out" if c.get("COLSUM") \
                    else "forward"
            # a split size, not the constant 1 (A's column split is a constexpr, so its value tells)
            if c.get("A_R1", 1) != 1 or any(k not in c for k in ("A_M1", "E_M1", "E_C1")):
                name += " split"
            if c.get("E_HIDDEN"):
                name += acts.get(c.get("ACT"), "") + (" glu" if c.get("GLU") else "")
            return name + modes.get(c.get("EC_MODE", 0), "")
        if r["kernel"] == "_hidden_kernel":
            return "h - h_c" + acts.get(c.get("ACT"), "") + (" glu" if c.get("GLU") else "") + \
                modes.get(c.get("HC_MODE", 0), "")
        if r["kernel"] == "_fold_kernel":
            return "fold rows" if c.get("Z_ON_ROWS") else "fold cols"
        if r["kernel"] == "_gate_level_grad_kernel":
            return f"level {c.get('TARGET', '?')}/{c.get('N_LEVELS', '?')}"
        return ("train" if c.get("TRAINING") else "eval") if "TRAINING" in c else ""
    except (TypeError, AttributeError):
        return ""


def _tile(c) -> str:
    return "x".join(str(c[k]) for k in ("BLOCK_M", "BLOCK_C", "BLOCK_N", "BLOCK_R", "BLOCK_K", "BLOCK_G",
                                        "BLOCK_F", "BLOCK") if k in c)


def format_table(rows) -> str:
    head = f"{'kernel':<26} {'role':<30} {'arch':<6} {'dtypes':<10} {'tile':<10} {'warps':>5} {'stages':>6} " \
           f"{'regs':>5} {'spill':>6} {'smem':>7} {'mma':<9}"
    lines = [head, "-" * len(head)]
    for r in rows:
        mma = "wgmma" if r["wgmma"] else "mma.sync" if r["mma_sync"] else ("FMA" if r["has_dot"] else "-")
        lines.append(f"{r['kernel']:<26} {role(r):<30} {r['arch']:<6} {','.join(r['dtypes']):<10} "
                     f"{_tile(r['constexprs']):<10} {r['num_warps']:>5} "
                     f"{r['num_stages']:>6} {r['registers']:>5} {r['spill_stores'] + r['spill_loads']:>6} "
                     f"{r['shared_bytes']:>7} {mma:<9}")
    return "\n".join(lines)


REPORT_KEYS = ("kernel", "role", "arch", "dtypes", "constexprs", "num_warps", "num_stages", "loop_instructions",
               "baseline_loop_instructions", "ratio", "loop_unroll", "loop_mma", "loop_ffma", "loop_mufu",
               "samples_gates", "rebuilds_hidden", "registers", "spills", "spill_stores", "spill_loads",
               "shared_bytes", "wgmma_operand")


def report_rows(rows) -> list[dict]:
    """The report's view of builds: one JSON-ready dict per build, GEMMs and the rest."""
    return [{k: (role(r) if k == "role" else r["spill_stores"] + r["spill_loads"] if k == "spills" else r.get(k))
             for k in REPORT_KEYS} for r in rows]


def format_report(rows) -> str:
    """The static performance table of the GEMM builds (those with a K loop)."""
    head = f"{'kernel':<22} {'role':<30} {'dtype':<5} {'tile':<11} {'w/s':<4} {'loop':>5} {'base':>5} " \
           f"{'ratio':>6} {'mufu':>5} {'hidden':<6} {'regs':>4} {'spill':>5} {'smem':>6} {'wgmma':<5}"
    lines = [head, "-" * len(head)]
    for r in report_rows(rows):
        if r["loop_instructions"] is None:
            continue
        dtype = next((d for d in r["dtypes"] if d in ("bf16", "fp16")), "fp32")
        lines.append(f"{r['kernel']:<22} {r['role']:<30} {dtype:<5} {_tile(r['constexprs']):<11} "
                     f"{r['num_warps']}/{r['num_stages']:<2} {r['loop_instructions']:>5} "
                     f"{r['baseline_loop_instructions'] if r['baseline_loop_instructions'] is not None else '-':>5} "
                     f"{r['ratio'] if r['ratio'] is not None else '-':>6} {r['loop_mufu']:>5} "
                     f"{str(r['rebuilds_hidden']).lower():<6} {r['registers']:>4} {r['spills']:>5} "
                     f"{r['shared_bytes']:>6} {r['wgmma_operand'] or '-':<5}")
    return "\n".join(lines)


def _worker():
    job = json.loads(sys.stdin.read())
    out = [_compile_one(rec, arch, loop) for rec, arch, loop in job["tasks"]]
    sys.stdout.write(json.dumps(out) + "\n")


def main(argv=None):
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["--worker"]:
        return _worker()
    import argparse

    import torch

    parser = argparse.ArgumentParser(prog="python -m nodeprune_kernels.compile", description=__doc__.split("\n")[0])
    parser.add_argument("--report", action="store_true", help="static performance report of the GEMM builds")
    parser.add_argument("--json", action="store_true", help="the report as a JSON list, one object per build")
    parser.add_argument("--arch", type=int, choices=ARCHS, default=None,
                        help="the target: the report's (default 90), the table's (default both)")
    args = parser.parse_args(argv)
    if not torch.cuda.is_available():
        os.environ.setdefault("TRITON_INTERPRET", "1")
    if not (args.report or args.json):
        archs = (args.arch,) if args.arch else ARCHS
        print(format_table(compile_records(standard_records(), archs=archs, baselines=False, loop_archs=())))
        return
    rows = compile_records(standard_records(), archs=(args.arch or 90,))
    if args.json:
        print(json.dumps(report_rows(rows), indent=1))
    else:
        print(format_report(rows))


if __name__ == "__main__":
    main()

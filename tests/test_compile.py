"""Every kernel specialisation the ops launch must compile for real GPUs (sm_90 and sm_80), spill-free.

The interpreter compiles nothing; this catches what only the GPU compiler rejects. Runs on the CPU.
"""
import pytest

from nodeprune_kernels.compile import (ARCHS, compile_records, format_report, plain_matmul_record, report_rows, role,
                                       standard_records)

# the report's measuring sticks: the tutorial matmul, and a matmul that computes log / exp in its K loop
CONTROLS = [plain_matmul_record("bf16", 128, 128, 64, num_warps=8, num_stages=3),
            plain_matmul_record("bf16", 128, 128, 64, num_warps=8, num_stages=3, kernel="_log_scaled_matmul_kernel")]


@pytest.fixture(scope="module")
def compiled():
    """One pool of compiles: every recorded specialisation, the plain-matmul baselines, the controls."""
    records = list(dict.fromkeys(standard_records()))
    rows = compile_records(records + CONTROLS, archs=ARCHS, loop_archs=(90,))  # the K loops of sm_90 only
    n = len(records) * len(ARCHS)
    return records, rows[:n], rows[n:]


@pytest.fixture(scope="module")
def builds(compiled):
    return compiled[0], compiled[1]


@pytest.fixture(scope="module")
def gemms90(builds):
    """The sm_90 builds with a K loop."""
    rows = [r for r in builds[1] if r["arch"] == "sm_90" and r["loop_instructions"] is not None]
    assert rows
    return rows


def test_every_kernel_compiles_for_each_arch(builds):
    records, rows = builds
    assert len(rows) == len(records) * len(ARCHS)
    kernels = {r["kernel"] for r in rows}
    assert kernels == {"_hard_concrete_fwd_kernel", "_hard_concrete_bwd_kernel", "_gated_matmul_kernel",
                       "_gate_level_grad_kernel", "_feature_gates_kernel", "_fold_kernel", "_hidden_kernel"}
    # forward, dx and dz_out GEMMs for each of fp32, fp16, bf16, and the mean / interchange variants
    assert sum(r.name == "_gated_matmul_kernel" for r in records) >= 3 * 3 + 2 * 3
    roles = {(role(r), r["arch"]) for r in rows}
    for arch in ("sm_90", "sm_80"):
        # the attention output read through SDPA's transpose; the linear's three GEMMs with each ablation
        assert {("forward split", arch), ("dx+dz_in split", arch), ("dz_out split", arch)} <= roles
        assert {(f"dx+dz_in{m}", arch) for m in ("", " mean", " interch.")} <= roles
        assert {("fold rows", arch), ("fold cols", arch), ("train", arch), ("eval", arch)} <= roles
        # every activation of the MLP: the transient h - h_c and the activation backward's GEMM
        for act in ("silu glu", "gelu glu", "gelu_t glu", "gelu_t", "gelu", "relu"):
            assert {(f"h - h_c {act}", arch), (f"mlp dh+dz_in {act}", arch)} <= roles
        # interchange with h_c rebuilt from the corrupted input, before the forward GEMM and in the epilogue
        assert {(f"h - h_c {a} rebuild", arch) for a in ("silu glu", "silu")} <= roles
        assert {(f"mlp dh+dz_in {a}{m}", arch) for a in ("silu glu", "silu")
                for m in (" mean", " interch.", " rebuild")} <= roles


def test_no_register_spills(builds):
    _, rows = builds
    spilled = [(r["kernel"], r["arch"], r["constexprs"]) for r in rows if r["spill_stores"] or r["spill_loads"]]
    assert not spilled


def test_tensor_core_instructions(builds):
    """16-bit GEMMs use wgmma on sm_90 and mma.sync on sm_80."""
    _, rows = builds
    gemm16 = [r for r in rows if r["kernel"] == "_gated_matmul_kernel" and set(r["dtypes"]) & {"bf16", "fp16"}]
    assert gemm16
    for r in gemm16:
        assert r["wgmma"] if r["arch"] == "sm_90" else r["mma_sync"], (r["arch"], r["constexprs"])


def test_shared_memory_fits(builds):
    """Dynamic shared memory within the per-block limits: 227 KiB on H100, 163 KiB on A100."""
    _, rows = builds
    limit = {"sm_90": 227 * 1024, "sm_80": 163 * 1024}
    assert all(r["shared_bytes"] <= limit[r["arch"]] for r in rows)


def _where(r):
    return r["kernel"], role(r), r["dtypes"], r["constexprs"]


def test_k_loop_does_not_sample_gates(gemms90):
    """No MUFU (log, exp, reciprocal: the hard-concrete sampling) in a GEMM's K loop on sm_90, except where
    the MLP's hidden units are rebuilt inside the loop (their activation needs them)."""
    sampling = [(_where(r), r["loop_mufu"]) for r in gemms90 if r["loop_mufu"] and not r["rebuilds_hidden"]]
    assert not sampling


def test_k_loop_close_to_plain_matmul(gemms90):
    """A K step costs at most 1.5x the SASS instructions of the tutorial matmul's with the same tiles, warps,
    stages, dtype and operand contiguity (3x where hidden units are rebuilt in the loop)."""
    for r in gemms90:
        assert r["baseline_loop_instructions"], _where(r)
    slow = [(_where(r), r["loop_instructions"], r["baseline_loop_instructions"]) for r in gemms90
            if r["loop_instructions"] > (3.0 if r["rebuilds_hidden"] else 1.5) * r["baseline_loop_instructions"]]
    assert not slow


def test_report_measures(compiled):
    """The measuring works: the plain matmul (bf16 128x128x64, 8 warps, 3 stages) has a sane sm_90 K loop
    reading both wgmma operands from shared memory, and the control that computes log / exp in its K loop is
    flagged and fails the 1.5x bound."""
    plain, bad = ({r["kernel"]: r for r in compiled[2] if r["arch"] == "sm_90"}[k]
                  for k in ("_plain_matmul_kernel", "_log_scaled_matmul_kernel"))
    assert 40 <= plain["loop_instructions"] <= 200
    assert plain["wgmma_operand"] == "SS" and plain["loop_mma"] >= 1 and plain["loop_unroll"] == 1
    assert plain["loop_mufu"] == 0 and not plain["samples_gates"] and plain["ratio"] == 1.0
    assert bad["samples_gates"] and bad["loop_mufu"] > 0
    assert bad["baseline_loop_instructions"] == plain["loop_instructions"]
    assert bad["loop_instructions"] > 1.5 * bad["baseline_loop_instructions"]


def test_report_rows(builds):
    """Every build has a report row (non-GEMMs with no loop), and the table prints."""
    _, rows = builds
    report = report_rows(rows)
    assert len(report) == len(rows)
    keys = {"kernel", "role", "arch", "dtypes", "constexprs", "loop_instructions", "baseline_loop_instructions",
            "ratio", "rebuilds_hidden", "registers", "spills", "wgmma_operand", "samples_gates", "loop_mufu"}
    assert all(keys <= set(r) for r in report)
    assert all(r["loop_instructions"] is None for r in report if not r["kernel"].endswith("matmul_kernel")
               or r["arch"] != "sm_90")
    assert len(format_report(rows).splitlines()) == 2 + sum(r["loop_instructions"] is not None for r in report)

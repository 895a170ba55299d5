"""Every kernel specialisation the ops launch must compile for real GPUs (sm_90 and sm_80), spill-free.

The interpreter compiles nothing; this catches what only the GPU compiler rejects. Runs on the CPU.
"""
import pytest

from nodeprune_kernels.compile import ARCHS, compile_records, role, standard_records


@pytest.fixture(scope="module")
def builds():
    records = standard_records()
    return list(dict.fromkeys(records)), compile_records(records, archs=ARCHS)


def test_every_kernel_compiles_for_each_arch(builds):
    records, rows = builds
    assert len(rows) == len(records) * len(ARCHS)
    kernels = {r["kernel"] for r in rows}
    assert kernels == {"_hard_concrete_fwd_kernel", "_hard_concrete_bwd_kernel", "_gated_matmul_kernel",
                       "_gate_level_grad_kernel"}
    # forward, dx and dz_out GEMMs for each of fp32, fp16, bf16, and the mean / interchange variants
    assert sum(r.name == "_gated_matmul_kernel" for r in records) >= 3 * 3 + 2 * 3
    roles = {(role(r), r["arch"]) for r in rows}
    for arch in ("sm_90", "sm_80"):
        # the attention output read through SDPA's transpose, and every activation of the MLP's three GEMMs
        assert {("forward split", arch), ("dx+dz_in split", arch), ("dz_out split", arch)} <= roles
        for act in ("silu glu", "gelu glu", "gelu_t glu", "gelu_t", "gelu", "relu"):
            assert {(f"mlp fwd {act}", arch), (f"mlp dh+dz_in {act}", arch), (f"mlp dz_out {act}", arch)} <= roles
        # interchange with h_c rebuilt from the corrupted input, in the prologue and in the epilogue
        assert {(f"mlp fwd {a} rebuild", arch) for a in ("silu glu", "silu")} <= roles
        assert (f"mlp dh+dz_in silu glu rebuild", arch) in roles


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

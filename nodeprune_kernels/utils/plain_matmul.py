"""Measuring sticks for :mod:`nodeprune_kernels.compile`'s static performance report (not product ops).

``_plain_matmul_kernel`` is the Triton tutorial's matmul (grouped tile order, masked loads of an A tile
and a B tile, ``acc = tl.dot(a, b, acc)``); the report compiles it with the tiles, warps, stages, operand
dtype and operand contiguity of each gated GEMM build and compares the instruction counts of the two K
loops. ``_log_scaled_matmul_kernel`` is a deliberately bad one: it computes ``exp(log(.))`` of a per-K
vector inside the K loop and scales A with it, the way a kernel that samples gates per K step would, so
the tests can check that the report flags what it should.
"""
import triton
import triton.language as tl

from ..ops.gated_gemm.kernels import grouped_tile


@triton.jit
def _tile_pointers(a_ptr, b_ptr, pid_m, pid_n, M, N, stride_am, stride_ak, stride_bk, stride_bn,
                   BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
    """The first K step's A and B tile pointers of tile (pid_m, pid_n), and the K offsets."""
    offs_am = (pid_m * BLOCK_M + tl.arange(0, BLOCK_M)) % M
    offs_bn = (pid_n * BLOCK_N + tl.arange(0, BLOCK_N)) % N
    offs_k = tl.arange(0, BLOCK_K)
    return (a_ptr + (offs_am[:, None] * stride_am + offs_k[None, :] * stride_ak),
            b_ptr + (offs_k[:, None] * stride_bk + offs_bn[None, :] * stride_bn), offs_k)


@triton.jit
def _store_tile(c_ptr, acc, pid_m, pid_n, M, N, stride_cm, stride_cn, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
    offs_cm = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_cn = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    c_mask = (offs_cm[:, None] < M) & (offs_cn[None, :] < N)
    tl.store(c_ptr + stride_cm * offs_cm[:, None] + stride_cn * offs_cn[None, :], acc.to(c_ptr.dtype.element_ty),
             mask=c_mask)


@triton.jit
def _plain_matmul_kernel(a_ptr, b_ptr, c_ptr, M, N, K, stride_am, stride_ak, stride_bk, stride_bn,
                         stride_cm, stride_cn, DOT_FP32: tl.constexpr, INPUT_PRECISION: tl.constexpr,
                         BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
                         GROUP_M: tl.constexpr):
    pid_m, pid_n = grouped_tile(tl.program_id(0), M, N, BLOCK_M, BLOCK_N, GROUP_M)
    a_ptrs, b_ptrs, offs_k = _tile_pointers(a_ptr, b_ptr, pid_m, pid_n, M, N, stride_am, stride_ak, stride_bk,
                                            stride_bn, BLOCK_M, BLOCK_N, BLOCK_K)
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for k in range(0, tl.cdiv(K, BLOCK_K)):
        a = tl.load(a_ptrs, mask=offs_k[None, :] < K - k * BLOCK_K, other=0.0)
        b = tl.load(b_ptrs, mask=offs_k[:, None] < K - k * BLOCK_K, other=0.0)
        if DOT_FP32:
            acc = tl.dot(a.to(tl.float32), b.to(tl.float32), acc, input_precision=INPUT_PRECISION)
        else:
            acc = tl.dot(a, b, acc)
        a_ptrs += BLOCK_K * stride_ak
        b_ptrs += BLOCK_K * stride_bk
    _store_tile(c_ptr, acc, pid_m, pid_n, M, N, stride_cm, stride_cn, BLOCK_M, BLOCK_N)


@triton.jit
def _log_scaled_matmul_kernel(a_ptr, b_ptr, c_ptr, u_ptr, M, N, K, stride_am, stride_ak, stride_bk, stride_bn,
                              stride_cm, stride_cn, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
                              BLOCK_K: tl.constexpr, GROUP_M: tl.constexpr):
    """The plain matmul, plus a per-K scale sigmoid-like(log u) computed in the loop (a negative control)."""
    pid_m, pid_n = grouped_tile(tl.program_id(0), M, N, BLOCK_M, BLOCK_N, GROUP_M)
    a_ptrs, b_ptrs, offs_k = _tile_pointers(a_ptr, b_ptr, pid_m, pid_n, M, N, stride_am, stride_ak, stride_bk,
                                            stride_bn, BLOCK_M, BLOCK_N, BLOCK_K)
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for k in range(0, tl.cdiv(K, BLOCK_K)):
        k_mask = offs_k < K - k * BLOCK_K
        a = tl.load(a_ptrs, mask=k_mask[None, :], other=0.0)
        b = tl.load(b_ptrs, mask=k_mask[:, None], other=0.0)
        u = tl.load(u_ptr + k * BLOCK_K + offs_k, mask=k_mask, other=0.5)
        s = tl.log(u) - tl.log(1.0 - u)
        z = 1.0 / (1.0 + tl.exp(-s))
        a = (a.to(tl.float32) * z[None, :]).to(a_ptr.dtype.element_ty)
        acc = tl.dot(a, b, acc)
        a_ptrs += BLOCK_K * stride_ak
        b_ptrs += BLOCK_K * stride_bk
    _store_tile(c_ptr, acc, pid_m, pid_n, M, N, stride_cm, stride_cn, BLOCK_M, BLOCK_N)

"""Triton kernels of the masked linear.

One gated GEMM kernel serves the forward and both halves of the backward:

    acc[m, c] = sum_r ((A[m, r] - A_c[m, r]) * zR[r]) * B[r, c]
    out[m, c] = acc[m, c] * zC[c] + Y_c[m, c]                       (STORE_OUT)
    part[pid_m, c] = sum_{m in tile} acc[m, c] * (E[m, c] - E_c[m, c])   (COLSUM)

zR and zC are gate stacks (up to four levels each) sampled inside the kernel from (seed, index), so no
gate or noise tensor is ever read or written. A_c, Y_c, E_c may be absent (mode 0), vectors over the
columns (mode 1) or [M, cols] tensors (mode 2).

- forward:           A = x, A_c = x_c, zR = z_in, B = W^T, zC = z_out, Y_c = y_c        -> y'
- dx and dz_in:      A = dy, zR = z_out, B = W, zC = z_in, E = x, E_c = x_c           -> dx, sum_t P * delta
- dz_out:            A = x, A_c = x_c, zR = z_in, B = W^T, E = dy                       -> sum_t dy * (delta z_in W^T)

A second, small kernel turns the per-feature sums into the gradient of each level's log_alpha.
"""
import triton
import triton.language as tl

from ..hard_concrete.kernels import gate_grad, gate_value
from .reference import MAX_LEVELS  # noqa: F401  (the kernels take up to this many levels per side)


@triton.jit
def _level_gate(cols, mask, seed, la_ptr, group, offset, TRAINING: tl.constexpr):
    idx = cols // group
    a = tl.load(la_ptr + idx, mask=mask, other=0.0)
    return gate_value(a, seed, offset + idx, TRAINING)


@triton.jit
def _gate_product(cols, mask, seed, la0, g0, o0, la1, g1, o1, la2, g2, o2, la3, g3, o3,
                  N_LEVELS: tl.constexpr, SKIP: tl.constexpr, TRAINING: tl.constexpr):
    """Product over the levels of a stack (except level SKIP) of the gates of features ``cols``."""
    z = tl.full(cols.shape, 1.0, tl.float32)
    if N_LEVELS > 0 and SKIP != 0:
        z = z * _level_gate(cols, mask, seed, la0, g0, o0, TRAINING)
    if N_LEVELS > 1 and SKIP != 1:
        z = z * _level_gate(cols, mask, seed, la1, g1, o1, TRAINING)
    if N_LEVELS > 2 and SKIP != 2:
        z = z * _level_gate(cols, mask, seed, la2, g2, o2, TRAINING)
    if N_LEVELS > 3 and SKIP != 3:
        z = z * _level_gate(cols, mask, seed, la3, g3, o3, TRAINING)
    return z


@triton.jit
def _load_side(ptr, rows, cols, stride_m, stride_c, row_mask, col_mask, MODE: tl.constexpr):
    """float32 tile of an operand that is a vector over cols (MODE 1, broadcast) or a [M, C] tensor (MODE 2)."""
    if MODE == 1:
        v = tl.load(ptr + cols * stride_c, mask=col_mask, other=0.0)
        return v.to(tl.float32)[None, :]
    else:
        v = tl.load(ptr + rows[:, None] * stride_m + cols[None, :] * stride_c,
                    mask=row_mask[:, None] & col_mask[None, :], other=0.0)
        return v.to(tl.float32)


@triton.jit
def _gated_matmul_kernel(
    a_ptr, ac_ptr, b_ptr, out_ptr, yc_ptr, e_ptr, ec_ptr, part_ptr,
    M, R, C,
    stride_am, stride_ar, stride_acm, stride_acr,
    stride_br, stride_bc,
    stride_om, stride_oc, stride_ycm, stride_ycc,
    stride_em, stride_ec, stride_ecm, stride_ecc,
    seed,
    ra0, rg0, ro0, ra1, rg1, ro1, ra2, rg2, ro2, ra3, rg3, ro3,
    ca0, cg0, co0, ca1, cg1, co1, ca2, cg2, co2, ca3, cg3, co3,
    R_LEVELS: tl.constexpr, C_LEVELS: tl.constexpr,
    AC_MODE: tl.constexpr, STORE_OUT: tl.constexpr, YC_MODE: tl.constexpr,
    COLSUM: tl.constexpr, EC_MODE: tl.constexpr,
    TRAINING: tl.constexpr, DOT_FP32: tl.constexpr, INPUT_PRECISION: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_C: tl.constexpr, BLOCK_R: tl.constexpr, GROUP_M: tl.constexpr,
):
    # grouped tile order for L2 reuse of B
    pid = tl.program_id(0)
    num_pid_m = tl.cdiv(M, BLOCK_M)
    num_pid_c = tl.cdiv(C, BLOCK_C)
    num_pid_in_group = GROUP_M * num_pid_c
    group_id = pid // num_pid_in_group
    first_pid_m = group_id * GROUP_M
    group_size_m = tl.minimum(num_pid_m - first_pid_m, GROUP_M)
    pid_m = first_pid_m + ((pid % num_pid_in_group) % group_size_m)
    pid_c = (pid % num_pid_in_group) // group_size_m

    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_c = pid_c * BLOCK_C + tl.arange(0, BLOCK_C)
    m_mask = offs_m < M
    c_mask = offs_c < C
    rows = offs_m.to(tl.int64)

    acc = tl.zeros((BLOCK_M, BLOCK_C), dtype=tl.float32)
    for r0 in range(0, R, BLOCK_R):
        offs_r = r0 + tl.arange(0, BLOCK_R)
        r_mask = offs_r < R
        a_mask = m_mask[:, None] & r_mask[None, :]
        a = tl.load(a_ptr + rows[:, None] * stride_am + offs_r[None, :] * stride_ar, mask=a_mask, other=0.0)
        if AC_MODE != 0:
            a = a.to(tl.float32) - _load_side(ac_ptr, rows, offs_r, stride_acm, stride_acr, m_mask, r_mask, AC_MODE)
        if R_LEVELS > 0:
            zr = _gate_product(offs_r, r_mask, seed, ra0, rg0, ro0, ra1, rg1, ro1, ra2, rg2, ro2, ra3, rg3, ro3,
                               R_LEVELS, -1, TRAINING)
            a = a.to(tl.float32) * zr[None, :]
        b = tl.load(b_ptr + offs_r[:, None] * stride_br + offs_c[None, :] * stride_bc,
                    mask=r_mask[:, None] & c_mask[None, :], other=0.0)
        if DOT_FP32:
            acc = tl.dot(a.to(tl.float32), b.to(tl.float32), acc, input_precision=INPUT_PRECISION)
        else:
            acc = tl.dot(a.to(b.dtype), b, acc)

    tile_mask = m_mask[:, None] & c_mask[None, :]
    if COLSUM:
        e = tl.load(e_ptr + rows[:, None] * stride_em + offs_c[None, :] * stride_ec, mask=tile_mask, other=0.0)
        e = e.to(tl.float32)
        if EC_MODE != 0:
            e = e - _load_side(ec_ptr, rows, offs_c, stride_ecm, stride_ecc, m_mask, c_mask, EC_MODE)
        part = tl.sum(acc * e, axis=0)
        tl.store(part_ptr + pid_m * C + offs_c, part, mask=c_mask)
    if STORE_OUT:
        out = acc
        if C_LEVELS > 0:
            zc = _gate_product(offs_c, c_mask, seed, ca0, cg0, co0, ca1, cg1, co1, ca2, cg2, co2, ca3, cg3, co3,
                               C_LEVELS, -1, TRAINING)
            out = out * zc[None, :]
        if YC_MODE != 0:
            out = out + _load_side(yc_ptr, rows, offs_c, stride_ycm, stride_ycc, m_mask, c_mask, YC_MODE)
        tl.store(out_ptr + rows[:, None] * stride_om + offs_c[None, :] * stride_oc,
                 out.to(out_ptr.dtype.element_ty), mask=tile_mask)


@triton.jit
def _gate_level_grad_kernel(
    dzf_ptr, dla_ptr, F, seed,
    a0, g0, o0, a1, g1, o1, a2, g2, o2, a3, g3, o3,
    N_LEVELS: tl.constexpr, TARGET: tl.constexpr, TRAINING: tl.constexpr,
    BLOCK_G: tl.constexpr, BLOCK_F: tl.constexpr,
):
    """dlog_alpha of level TARGET: sum over each gate's features of dzf * (other levels' gates), * dz/da."""
    if TARGET == 0:
        la_t = a0
        g_t = g0
        o_t = o0
    elif TARGET == 1:
        la_t = a1
        g_t = g1
        o_t = o1
    elif TARGET == 2:
        la_t = a2
        g_t = g2
        o_t = o2
    else:
        la_t = a3
        g_t = g3
        o_t = o3
    n_gates = F // g_t
    gates = tl.program_id(0) * BLOCK_G + tl.arange(0, BLOCK_G)
    g_mask = gates < n_gates
    acc = tl.zeros((BLOCK_G,), dtype=tl.float32)
    for f0 in range(0, g_t, BLOCK_F):
        f = f0 + tl.arange(0, BLOCK_F)
        cols = gates[:, None] * g_t + f[None, :]
        mask = g_mask[:, None] & (f < g_t)[None, :]
        d = tl.load(dzf_ptr + cols, mask=mask, other=0.0)
        if N_LEVELS > 1:
            d = d * _gate_product(cols, mask, seed, a0, g0, o0, a1, g1, o1, a2, g2, o2, a3, g3, o3,
                                  N_LEVELS, TARGET, TRAINING)
        acc += tl.sum(d, axis=1)
    a = tl.load(la_t + gates, mask=g_mask, other=0.0)
    dla = acc * gate_grad(a, seed, o_t + gates, TRAINING)
    tl.store(dla_ptr + gates, dla.to(dla_ptr.dtype.element_ty), mask=g_mask)

"""Triton kernels of the gated GEMM that every masked projection runs on.

The gates are sampled once per op call, before any GEMM, into float32 per-feature vectors
(``_feature_gates_kernel``: z[f] = the product of the stack's levels). The GEMM's K loop is then a plain
matmul (no sampling, no scaling, no ablation in it): the host folds the reduction side's gates into the
weight (``_fold_kernel``, an O(weights) transient) and subtracts the ablation from A beforehand (a transient
A - A_c, or the MLP's h - h_c written by ``_hidden_kernel``). Everything else is the epilogue:

    acc[m, c] = sum_r A[m, r] * B[r, c]                                         (B: W with zR folded in)
    out[m, c] = acc[m, c] * zC[c] + Y_c[m, c]                                  (STORE_OUT, OUT_KIND 0)
    part[pid_m, c] = sum_{m in tile} acc[m, c] * (E[m, c] - E_c[m, c])         (COLSUM)

Operands. A, E and E_c are read through "split" strides, so a tensor such as an attention output
[B, H, S, D].transpose(1, 2) is read where it lies: element (m, c) sits at
``(m // M1) * s_m + (m % M1) * s_m1 + (c // C1) * s_c + (c % C1) * s_c1`` (M1 = C1 = 1 for a plain
matrix, which Triton specialises away; A's column split is a constexpr, so the loop divides by a constant).
An ablation operand (E_c, Y_c) is absent (mode 0), a vector over the columns (mode 1), a tensor (mode 2) or,
for E_c, a hidden activation rebuilt from its pre-activations (mode 3).

Hidden units (the MLP). With E_HIDDEN the epilogue's E is built in registers from the MLP's saved
pre-activations: h = act(pre) * lin (GLU) or act(pre). OUT_KIND 1 turns the epilogue into the MLP's
activation backward: with d = acc * zC and (pre, lin) the E operand's, it writes d * lin * act'(pre) (or
d * act'(pre)) to ``out`` and d * act(pre) to ``out2``.

- linear forward:    A = x - x_c, B = diag(z_in) W^T, zC = z_out, Y_c = y_c             -> y'
- linear dx, dz_in:  A = dy, B = diag(z_out) W, zC = z_in, E = x, E_c = x_c             -> dx, sum_t P delta
- linear dz_out:     A = x - x_c, B = diag(z_in) W^T, E = dy                            -> sum_t dy (delta z_in W^T)
- MLP: the same with x replaced by h (A from ``_hidden_kernel``, E rebuilt in the epilogue) and dx by
  (d pre, d lin) (OUT_KIND 1).

A second, small kernel turns the per-feature sums into the gradient of each level's log_alpha.
"""
import triton
import triton.language as tl

from ..hard_concrete.kernels import gate_grad, gate_value

from ..gate_stack import MAX_LEVELS  # noqa: F401  (the kernels take up to this many levels per side)

# activation ids (constexpr ACT): ACT_IDS in ops/masked_mlp/reference.py, shared with csrc/masked_rows.cpp:
# 1 silu, 2 gelu, 3 gelu_tanh, 4 relu
# gelu_tanh(x) = 0.5 x (1 + tanh(z)) = x * sigmoid(2 z), z = sqrt(2 / pi) (x + 0.044715 x^3). The constants
# are written as literals in the jit functions (a constexpr global times a tensor trips the interpreter):
# 1.5957691216057308 = 2 sqrt(2 / pi), 0.0713548162726009 = 2 sqrt(2 / pi) * 0.044715,
# 0.7071067811865476 = 1 / sqrt(2), 0.3989422804014327 = 1 / sqrt(2 pi).


@triton.jit
def _act(x, ACT: tl.constexpr):
    """act(x) in float32 (no libdevice tanh: the tanh form is written with a sigmoid)."""
    if ACT == 1:
        return x * tl.sigmoid(x)
    elif ACT == 2:
        return 0.5 * x * (1.0 + tl.erf(x * 0.7071067811865476))
    elif ACT == 3:
        return x * tl.sigmoid(x * (1.5957691216057308 + 0.0713548162726009 * x * x))
    else:
        return tl.maximum(x, 0.0)


@triton.jit
def _act_grad(x, ACT: tl.constexpr):
    """(act(x), act'(x)) in float32."""
    if ACT == 1:
        s = tl.sigmoid(x)
        return x * s, s * (1.0 + x * (1.0 - s))
    elif ACT == 2:
        cdf = 0.5 * (1.0 + tl.erf(x * 0.7071067811865476))
        return x * cdf, cdf + x * 0.3989422804014327 * tl.exp(-0.5 * x * x)
    elif ACT == 3:
        s = tl.sigmoid(x * (1.5957691216057308 + 0.0713548162726009 * x * x))
        return x * s, s + x * s * (1.0 - s) * (1.5957691216057308 + 3.0 * 0.0713548162726009 * x * x)
    else:
        return tl.maximum(x, 0.0), tl.where(x > 0.0, 1.0, 0.0)


@triton.jit
def _hidden(pre_ptr, lin_ptr, offs, mask, ACT: tl.constexpr, GLU: tl.constexpr):
    """h = act(pre) * lin (GLU) or act(pre), float32, from the tile at ``offs``."""
    h = _act(tl.load(pre_ptr + offs, mask=mask, other=0.0).to(tl.float32), ACT)
    if GLU:
        h = h * tl.load(lin_ptr + offs, mask=mask, other=0.0).to(tl.float32)
    return h


@triton.jit
def _split(idx, inner, s_outer, s_inner):
    """Memory offset of logical index ``idx`` of a dimension stored as (idx // inner, idx % inner)."""
    return (idx // inner) * s_outer + (idx % inner) * s_inner


@triton.jit
def _ablation(ptr, uptr, row_off, col_off, cols, s_vec, mask, col_mask, MODE: tl.constexpr, ACT: tl.constexpr,
              GLU: tl.constexpr):
    """float32 tile of an ablation operand: a vector over cols (MODE 1, broadcast over rows), a tensor
    (MODE 2) or a hidden activation rebuilt from pre-activations (MODE 3)."""
    if MODE == 1:
        return tl.load(ptr + cols * s_vec, mask=col_mask, other=0.0).to(tl.float32)[None, :]
    elif MODE == 2:
        return tl.load(ptr + row_off[:, None] + col_off[None, :], mask=mask, other=0.0).to(tl.float32)
    else:
        return _hidden(ptr, uptr, row_off[:, None] + col_off[None, :], mask, ACT, GLU)


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
def grouped_tile(pid, M, C, BLOCK_M: tl.constexpr, BLOCK_C: tl.constexpr, GROUP_M: tl.constexpr):
    """(pid_m, pid_c) of program ``pid`` in the grouped tile order (GROUP_M row tiles share a column tile
    while it is in L2)."""
    num_pid_m = tl.cdiv(M, BLOCK_M)
    num_pid_c = tl.cdiv(C, BLOCK_C)
    num_pid_in_group = GROUP_M * num_pid_c
    first_pid_m = (pid // num_pid_in_group) * GROUP_M
    group_size_m = tl.minimum(num_pid_m - first_pid_m, GROUP_M)
    return first_pid_m + ((pid % num_pid_in_group) % group_size_m), (pid % num_pid_in_group) // group_size_m


@triton.jit
def _feature_gates_kernel(z_ptr, F, seed, a0, g0, o0, a1, g1, o1, a2, g2, o2, a3, g3, o3,
                          N_LEVELS: tl.constexpr, TRAINING: tl.constexpr, BLOCK: tl.constexpr):
    """z[f] = product over the stack's levels of the gate of feature f (float32): the one place a GEMM's
    gates are sampled, once per op call, before any GEMM runs."""
    cols = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    mask = cols < F
    z = _gate_product(cols, mask, seed, a0, g0, o0, a1, g1, o1, a2, g2, o2, a3, g3, o3, N_LEVELS, -1, TRAINING)
    tl.store(z_ptr + cols, z, mask=mask)


@triton.jit
def _fold_kernel(w_ptr, z_ptr, out_ptr, ROWS, COLS, stride_wr, stride_wc, Z_ON_ROWS: tl.constexpr,
                 BLOCK_ROWS: tl.constexpr, BLOCK_COLS: tl.constexpr):
    """out = W * z broadcast over W's rows (Z_ON_ROWS: z[r] scales row r) or columns, in W's dtype and
    layout: a weight with one side's gates folded in, an O(weights) transient the GEMM reads as plain B."""
    r = tl.program_id(0) * BLOCK_ROWS + tl.arange(0, BLOCK_ROWS)
    c = tl.program_id(1) * BLOCK_COLS + tl.arange(0, BLOCK_COLS)
    rm = r < ROWS
    cm = c < COLS
    mask = rm[:, None] & cm[None, :]
    offs = r.to(tl.int64)[:, None] * stride_wr + c[None, :] * stride_wc
    w = tl.load(w_ptr + offs, mask=mask, other=0.0).to(tl.float32)
    if Z_ON_ROWS:
        w = w * tl.load(z_ptr + r, mask=rm, other=0.0)[:, None]
    else:
        w = w * tl.load(z_ptr + c, mask=cm, other=0.0)[None, :]
    tl.store(out_ptr + offs, w.to(out_ptr.dtype.element_ty), mask=mask)


@triton.jit
def _hidden_kernel(pre_ptr, lin_ptr, hc_ptr, hcu_ptr, out_ptr, M, F, stride_m, stride_hcm, stride_hcf,
                   HC_MODE: tl.constexpr, ACT: tl.constexpr, GLU: tl.constexpr,
                   BLOCK_M: tl.constexpr, BLOCK_F: tl.constexpr):
    """out = h - h_c with h = act(pre) * lin (GLU) or act(pre), [M, F] rows of stride ``stride_m`` (pre, lin
    and out alike): the MLP's hidden units, written once as a transient so the down projection is a plain
    GEMM. h_c: absent (HC_MODE 0), a [F] vector (1), a tensor (2) or rebuilt from (hc, hcu) like h (3)."""
    rows = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    cols = tl.program_id(1) * BLOCK_F + tl.arange(0, BLOCK_F)
    rm = rows < M
    cm = cols < F
    mask = rm[:, None] & cm[None, :]
    offs = rows.to(tl.int64)[:, None] * stride_m + cols[None, :]
    h = _hidden(pre_ptr, lin_ptr, offs, mask, ACT, GLU)
    if HC_MODE != 0:
        h = h - _ablation(hc_ptr, hcu_ptr, rows.to(tl.int64) * stride_hcm, cols * stride_hcf, cols, stride_hcf,
                          mask, cm, HC_MODE, ACT, GLU)
    tl.store(out_ptr + offs, h.to(out_ptr.dtype.element_ty), mask=mask)


@triton.jit
def _gated_matmul_kernel(
    a_ptr, b_ptr, zc_ptr, out_ptr, out2_ptr, yc_ptr, e_ptr, eu_ptr, ec_ptr, ecu_ptr, part_ptr,
    M, R, C,
    A_M1, stride_am, stride_am1, stride_ar, stride_ar1,
    stride_br, stride_bc,
    stride_om, stride_oc, stride_ycm, stride_ycc,
    E_M1, E_C1, stride_em, stride_em1, stride_ec, stride_ec1,
    stride_ecm, stride_ecm1, stride_ecc, stride_ecc1,
    A_R1: tl.constexpr, C_GATE: tl.constexpr, E_HIDDEN: tl.constexpr, EC_MODE: tl.constexpr,
    ACT: tl.constexpr, GLU: tl.constexpr,
    STORE_OUT: tl.constexpr, OUT_KIND: tl.constexpr, YC_MODE: tl.constexpr, COLSUM: tl.constexpr,
    DOT_FP32: tl.constexpr, INPUT_PRECISION: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_C: tl.constexpr, BLOCK_R: tl.constexpr, GROUP_M: tl.constexpr,
):
    pid_m, pid_c = grouped_tile(tl.program_id(0), M, C, BLOCK_M, BLOCK_C, GROUP_M)

    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_c = pid_c * BLOCK_C + tl.arange(0, BLOCK_C)
    m_mask = offs_m < M
    c_mask = offs_c < C
    rows = offs_m.to(tl.int64)
    a_rows = _split(rows, A_M1, stride_am, stride_am1)

    # the K loop is a plain matmul: every gate and ablation of the R side is folded into A or B by the host
    acc = tl.zeros((BLOCK_M, BLOCK_C), dtype=tl.float32)
    for r0 in range(0, R, BLOCK_R):
        offs_r = r0 + tl.arange(0, BLOCK_R)
        r_mask = offs_r < R
        a = tl.load(a_ptr + a_rows[:, None] + _split(offs_r, A_R1, stride_ar, stride_ar1)[None, :],
                    mask=m_mask[:, None] & r_mask[None, :], other=0.0)
        b = tl.load(b_ptr + offs_r[:, None] * stride_br + offs_c[None, :] * stride_bc,
                    mask=r_mask[:, None] & c_mask[None, :], other=0.0)
        if DOT_FP32:
            acc = tl.dot(a.to(tl.float32), b.to(tl.float32), acc, input_precision=INPUT_PRECISION)
        else:
            acc = tl.dot(a, b, acc)

    tile_mask = m_mask[:, None] & c_mask[None, :]
    out_offs = rows[:, None] * stride_om + offs_c[None, :] * stride_oc
    if COLSUM or OUT_KIND == 1:
        e_offs = _split(rows, E_M1, stride_em, stride_em1)[:, None] + _split(offs_c, E_C1, stride_ec, stride_ec1)[None, :]
    if OUT_KIND == 1:
        # the MLP's activation backward, fused with the hidden-gate column sums
        pre = tl.load(e_ptr + e_offs, mask=tile_mask, other=0.0).to(tl.float32)
        act, dact = _act_grad(pre, ACT)
        if GLU:
            lin = tl.load(eu_ptr + e_offs, mask=tile_mask, other=0.0).to(tl.float32)
            e = act * lin
        else:
            e = act
    elif COLSUM:
        if E_HIDDEN:
            e = _hidden(e_ptr, eu_ptr, e_offs, tile_mask, ACT, GLU)
        else:
            e = tl.load(e_ptr + e_offs, mask=tile_mask, other=0.0).to(tl.float32)
    if COLSUM:
        if EC_MODE != 0:
            e = e - _ablation(ec_ptr, ecu_ptr, _split(rows, E_M1, stride_ecm, stride_ecm1),
                              _split(offs_c, E_C1, stride_ecc, stride_ecc1), offs_c, stride_ecc, tile_mask, c_mask,
                              EC_MODE, ACT, GLU)
        part = tl.sum(acc * e, axis=0)
        tl.store(part_ptr + pid_m * C + offs_c, part, mask=c_mask)
    if STORE_OUT:
        out = acc
        if C_GATE:
            out = out * tl.load(zc_ptr + offs_c, mask=c_mask, other=0.0)[None, :]
        if OUT_KIND == 1:
            if GLU:
                tl.store(out_ptr + out_offs, (out * lin * dact).to(out_ptr.dtype.element_ty), mask=tile_mask)
                tl.store(out2_ptr + out_offs, (out * act).to(out2_ptr.dtype.element_ty), mask=tile_mask)
            else:
                tl.store(out_ptr + out_offs, (out * dact).to(out_ptr.dtype.element_ty), mask=tile_mask)
        else:
            if YC_MODE == 1:
                out = out + tl.load(yc_ptr + offs_c * stride_ycc, mask=c_mask, other=0.0).to(tl.float32)[None, :]
            elif YC_MODE == 2:
                out = out + tl.load(yc_ptr + rows[:, None] * stride_ycm + offs_c[None, :] * stride_ycc,
                                    mask=tile_mask, other=0.0).to(tl.float32)
            tl.store(out_ptr + out_offs, out.to(out_ptr.dtype.element_ty), mask=tile_mask)


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

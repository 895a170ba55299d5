"""Host side of the gated GEMM: operand descriptions, tile configurations and launches.

The ops (masked_linear, masked_attn_out_proj, masked_mlp) describe their tensors as :class:`Operand` and
call :func:`gated_matmul` for each GEMM of their forward and backward, then :func:`level_grads` to turn
per-feature sums into each gate level's d log_alpha.
"""
from __future__ import annotations

import itertools
import math
from typing import NamedTuple

import torch
import triton

from ...utils.alloc import empty
from ...utils.backend import interpreter_configs
from ...utils.launch import launch
from .kernels import MAX_LEVELS, _gate_level_grad_kernel, _gated_matmul_kernel

VECTOR, TENSOR, HIDDEN = 1, 2, 3  # operand modes (kernels.py)


class Operand(NamedTuple):
    """A [M, cols] operand: element (m, c) at ``(m // m1) * s_m + (m % m1) * s_m1 + (c // c1) * s_c +
    (c % c1) * s_c1`` elements from ``t``'s data pointer (the split sizes m1, c1 belong to the GEMM call).
    A VECTOR has s_m = s_m1 = 0 and its column stride in s_c; a HIDDEN operand is act(t) * u (or act(t))."""

    t: torch.Tensor
    s_m: int
    s_m1: int
    s_c: int
    s_c1: int
    mode: int = TENSOR
    u: torch.Tensor | None = None


class Split(NamedTuple):
    """How a [..., cols] tensor is indexed as [M, C]: m1 rows and c1 columns form the inner dimension."""

    m1: int = 1
    c1: int = 1


def choose_split(t: torch.Tensor, n_col_dims: int) -> Split:
    """The simplest split through which ``t`` ([*lead, *cols], n_col_dims = 1 or 2) can be read without a copy.

    Leading dims are merged into at most two row dimensions, the column dims into at most two; a layout
    such as an attention output [B, H, S, D].transpose(1, 2) needs both splits. Returns Split() (a plain
    matrix) when no split works, and :func:`tensor_operand` then copies.
    """
    lead, cols = t.shape[:t.dim() - n_col_dims], t.shape[t.dim() - n_col_dims:]
    m_options = [1] + [math.prod(lead[i:]) for i in range(len(lead) - 1, 0, -1)]
    c_options = [1] + ([cols[-1]] if n_col_dims == 2 else [])
    M, C = math.prod(lead), math.prod(cols)
    for m1, c1 in itertools.product(dict.fromkeys(m_options), c_options):
        try:
            t.view(M // max(m1, 1), max(m1, 1), C // c1, c1)
            return Split(m1, c1)
        except RuntimeError:
            continue
    return Split()


def tensor_operand(t: torch.Tensor, M: int, C: int, split: Split = Split()) -> Operand:
    """``t`` (M * C elements, logically [M, C]) read through ``split``; copied only if it cannot be viewed."""
    m1, c1 = max(split.m1, 1), split.c1
    try:
        v = t.view(M // m1 if M else 0, m1, C // c1, c1)
    except RuntimeError:
        v = t.reshape(M // m1 if M else 0, m1, C // c1, c1)
    return Operand(v, v.stride(0), v.stride(1), v.stride(2), v.stride(3))


def vector_operand(v: torch.Tensor) -> Operand:
    """A vector over the columns, broadcast over rows."""
    v = v.reshape(-1)
    return Operand(v, 0, 0, v.stride(0), 0, VECTOR)


def hidden_operand(pre: torch.Tensor, lin: torch.Tensor | None) -> Operand:
    """The hidden units act(pre) * lin (or act(pre)) of [M, F] pre-activations, built inside the kernel."""
    if lin is not None and lin.stride() != pre.stride():
        lin = lin.contiguous()
        pre = pre.contiguous()
    return Operand(pre, pre.stride(0), 0, pre.stride(1), 0, HIDDEN, lin)


def weight_operand(weight: torch.Tensor, out_in: bool, shape: str):
    """(W, row stride, column stride) reading W as [K, N] (``shape="KN"``, for x W^T) or [N, K] ("NK")."""
    s_out, s_in = (weight.stride(0), weight.stride(1)) if out_in else (weight.stride(1), weight.stride(0))
    return (weight, s_in, s_out) if shape == "KN" else (weight, s_out, s_in)


def _level_kwargs(prefix, levels, dummy):
    kw = {}
    for i in range(MAX_LEVELS):
        la, g, o = levels[i] if i < len(levels) else (dummy, 1, 0)
        kw[f"{prefix}a{i}"], kw[f"{prefix}g{i}"], kw[f"{prefix}o{i}"] = la, g, o
    return kw


def _pow2(n, lo, hi):
    return max(lo, min(hi, triton.next_power_of_2(max(int(n), 1))))


def gemm_config(dtype, M, R, C, heavy_prologue=False, epilogue=0):
    """Tile sizes, warps and stages. Chosen so that no build spills registers on sm_90 or sm_80 and shared
    memory fits both (checked by tests/test_compile.py); not yet tuned on a GPU (DESIGN.md: autotune there,
    one config here).

    ``heavy_prologue``: the A tile is built from several tensors (the MLP's hidden units, act(g) * u, or
    h - h_c): a K step of 32, two stages. The activation is recomputed once per C tile, d_model / BLOCK_C
    times per hidden unit: the price of never writing h, to be weighed against wider tiles on a GPU.
    ``epilogue``: 0 a plain store, 1 gating sums, 2 the MLP's activation backward with a second tensor or
    an ablation (narrowest tiles)."""
    if interpreter_configs():  # every program instance costs ~ms there: few, large tiles
        return dict(BLOCK_M=_pow2(M, 16, 64), BLOCK_C=_pow2(C, 16, 64), BLOCK_R=_pow2(R, 16, 64), GROUP_M=8,
                    num_warps=4, num_stages=1)
    if dtype == torch.float32:  # fp32 dots run on FMA units unless tf32 is allowed
        return dict(BLOCK_M=64, BLOCK_C=64, BLOCK_R=16, GROUP_M=8, num_warps=4, num_stages=3)
    if heavy_prologue:  # two stages: deeper pipelines made ptxas cap these builds at 128 registers and spill
        return dict(BLOCK_M=128, BLOCK_C=(128, 64, 32)[epilogue], BLOCK_R=32, GROUP_M=8, num_warps=8, num_stages=2)
    return dict(BLOCK_M=128, BLOCK_C=(128, 64, 32)[epilogue], BLOCK_R=64, GROUP_M=8, num_warps=8, num_stages=3)


def _dot_mode(dtype):
    """(DOT_FP32, INPUT_PRECISION): the interpreter cannot run 16-bit tl.dot, so it computes in fp32."""
    if interpreter_configs():
        return True, "ieee"
    if dtype == torch.float32:
        return True, "tf32" if torch.backends.cuda.matmul.allow_tf32 else "ieee"
    return False, "ieee"


def gated_matmul(a: Operand, b, M: int, R: int, C: int, *, seed: int, training: bool, a_split=Split(),
                 e_split=Split(), ac: Operand | None = None, r_levels=(), c_levels=(), out=None, out2=None,
                 yc: Operand | None = None, e: Operand | None = None, ec: Operand | None = None, act: int = 0,
                 glu: bool = False, out_kind: int = 0, colsum: bool | None = None):
    """Launch the gated GEMM (kernels.py). ``b`` is a :func:`weight_operand` triple; ``out``/``out2`` are
    [M, C] tensors to write (``out2``: d lin of OUT_KIND 1).

    ``colsum`` (default: ``e`` is given) asks for the column sums of acc * (E - E_c); OUT_KIND 1 reads its
    pre-activations from ``e`` whether or not it also sums. Returns the partial sums
    [cdiv(M, BLOCK_M), C] (float32) when ``colsum``, else None.
    """
    dtype = b[0].dtype
    colsum = e is not None if colsum is None else colsum
    # the MLP's A tile from two tensors (g, u) or with a tensor ablation: registers for the activation
    heavy_prologue = a.mode == HIDDEN and (a.u is not None or (ac is not None and ac.mode != VECTOR))
    if out_kind == 1:
        epilogue = 2 if e.u is not None or ec is not None else 1
    else:
        epilogue = 1 if e is not None and (c_levels or ec is not None) else 0
    cfg = gemm_config(dtype, M, R, C, heavy_prologue, epilogue)
    dot_fp32, precision = _dot_mode(dtype)
    part = None
    if colsum:
        part = empty((triton.cdiv(M, cfg["BLOCK_M"]), C), dtype=torch.float32, device=b[0].device)
    if M == 0:
        return part
    dummy = b[0]
    none = Operand(dummy, 0, 0, 0, 0, 0)
    ac_, yc_, e_, ec_ = (t if t is not None else none for t in (ac, yc, e, ec))
    grid = (triton.cdiv(M, cfg["BLOCK_M"]) * triton.cdiv(C, cfg["BLOCK_C"]),)
    launch(
        _gated_matmul_kernel, grid,
        a_ptr=a.t, au_ptr=a.u if a.u is not None else dummy, ac_ptr=ac_.t,
        acu_ptr=ac_.u if ac_.u is not None else dummy, b_ptr=b[0],
        out_ptr=out if out is not None else dummy, out2_ptr=out2 if out2 is not None else dummy, yc_ptr=yc_.t,
        e_ptr=e_.t, eu_ptr=e_.u if e_.u is not None else dummy, ec_ptr=ec_.t,
        ecu_ptr=ec_.u if ec_.u is not None else dummy, part_ptr=part if part is not None else dummy,
        M=M, R=R, C=C,
        A_M1=a_split.m1, A_R1=a_split.c1, stride_am=a.s_m, stride_am1=a.s_m1, stride_ar=a.s_c, stride_ar1=a.s_c1,
        stride_acm=ac_.s_m, stride_acm1=ac_.s_m1, stride_acr=ac_.s_c, stride_acr1=ac_.s_c1,
        stride_br=b[1], stride_bc=b[2],
        stride_om=out.stride(0) if out is not None else 0, stride_oc=out.stride(1) if out is not None else 0,
        stride_ycm=yc_.s_m, stride_ycc=yc_.s_c,
        E_M1=e_split.m1, E_C1=e_split.c1, stride_em=e_.s_m, stride_em1=e_.s_m1, stride_ec=e_.s_c,
        stride_ec1=e_.s_c1,
        stride_ecm=ec_.s_m, stride_ecm1=ec_.s_m1, stride_ecc=ec_.s_c, stride_ecc1=ec_.s_c1,
        seed=seed,
        **_level_kwargs("r", r_levels, dummy), **_level_kwargs("c", c_levels, dummy),
        R_LEVELS=len(r_levels), C_LEVELS=len(c_levels),
        A_HIDDEN=a.mode == HIDDEN, AC_MODE=ac_.mode, E_HIDDEN=e_.mode == HIDDEN, EC_MODE=ec_.mode,
        ACT=act, GLU=glu,
        STORE_OUT=out is not None, OUT_KIND=out_kind, YC_MODE=yc_.mode, COLSUM=colsum,
        TRAINING=training, DOT_FP32=dot_fp32, INPUT_PRECISION=precision,
        **cfg,
    )
    return part


def level_grads(dzf, levels, needed, *, seed, training):
    """d log_alpha of each level whose ``needed`` flag is set, from the per-feature sums ``dzf`` [F]."""
    grads = []
    n_features = dzf.numel()
    for target, (la, group, _) in enumerate(levels):
        if not needed[target]:
            grads.append(None)
            continue
        dla = empty(la.shape, dtype=la.dtype, device=la.device)
        block_f = _pow2(group, 1, 128)
        block_g = _pow2(la.numel(), 1, max(1, (4096 if interpreter_configs() else 1024) // block_f))
        launch(_gate_level_grad_kernel, (triton.cdiv(la.numel(), block_g),),
               dzf_ptr=dzf, dla_ptr=dla, F=n_features, seed=seed, **_level_kwargs("", levels, la),
               N_LEVELS=len(levels), TARGET=target, TRAINING=training, BLOCK_G=block_g, BLOCK_F=block_f,
               num_warps=4, num_stages=1)
        grads.append(dla)
    return grads

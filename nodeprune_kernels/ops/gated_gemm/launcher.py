"""Host side of the gated GEMM: operand descriptions, tile configurations and launches.

The ops (masked_linear, masked_attn_out_proj, masked_mlp) sample each gate stack once per call into a
per-feature vector (:func:`feature_gates`), fold the reduction side's vector into the weight
(:func:`fold_weight`), describe their tensors as :class:`Operand` and call :func:`gated_matmul` for each GEMM
of their forward and backward (a plain K loop, the rest in the epilogue), then :func:`level_grads` to turn
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
from .kernels import (MAX_LEVELS, _feature_gates_kernel, _fold_kernel, _gate_level_grad_kernel, _gated_matmul_kernel,
                      _hidden_kernel)

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
    """The hidden units act(pre) * lin (or act(pre)) of [M, F] pre-activations, rebuilt where they are read
    (a GEMM's epilogue, or :func:`hidden_delta`)."""
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


def gemm_config(dtype, M, R, C, epilogue=0):
    """Tile sizes, warps and stages. The K loop is a plain matmul whatever the op, so one 16-bit tiling
    (128 x 128 x 64, 8 warps, 3 stages) serves every launch but the heaviest epilogue (the MLP's activation
    backward with a second tensor or an ablation), which narrows the output tile to 64 so it does not spill.
    Chosen so that no build spills registers on sm_90 or sm_80 and shared memory fits both (checked by
    tests/test_compile.py); not yet tuned on a GPU (autotune there; the interpreter takes one config).
    ``epilogue``: 0 a plain store, 1 gating sums, 2 the MLP's activation backward."""
    if interpreter_configs():  # every program instance costs ~ms there: few, large tiles
        return dict(BLOCK_M=_pow2(M, 16, 64), BLOCK_C=_pow2(C, 16, 64), BLOCK_R=_pow2(R, 16, 64), GROUP_M=8,
                    num_warps=4, num_stages=1)
    if dtype == torch.float32:  # fp32 dots run on FMA units unless tf32 is allowed
        return dict(BLOCK_M=64, BLOCK_C=64, BLOCK_R=16, GROUP_M=8, num_warps=4, num_stages=3)
    return dict(BLOCK_M=128, BLOCK_C=(128, 128, 64)[epilogue], BLOCK_R=64, GROUP_M=8, num_warps=8, num_stages=3)


def _dot_mode(dtype):
    """(DOT_FP32, INPUT_PRECISION): the interpreter cannot run 16-bit tl.dot, so it computes in fp32."""
    if interpreter_configs():
        return True, "ieee"
    if dtype == torch.float32:
        return True, "tf32" if torch.backends.cuda.matmul.allow_tf32 else "ieee"
    return False, "ieee"


def transient_dtype(dtype: torch.dtype) -> torch.dtype:
    """The dtype of the transients a GEMM reads (a folded weight, x - x_c, h - h_c): the operands' own on a
    GPU (a 16-bit GEMM), float32 under the interpreter, whose dots run in float32 anyway (:func:`_dot_mode`)
    and would otherwise add a rounding that no 16-bit kernel of the interpreter has."""
    return torch.float32 if interpreter_configs() else dtype


def feature_gates(levels, n_features: int, device, *, seed: int, training: bool) -> torch.Tensor | None:
    """The per-feature gate vector z [n_features] (float32, the product over ``levels``), sampled in one
    small launch; None for an empty stack. The GEMMs read this vector and never sample."""
    if not levels:
        return None
    z = empty((n_features,), dtype=torch.float32, device=device)
    if n_features == 0:
        return z
    block = _pow2(n_features, 16, 4096 if interpreter_configs() else 1024)
    launch(_feature_gates_kernel, (triton.cdiv(n_features, block),), z_ptr=z, F=n_features, seed=seed,
           **_level_kwargs("", levels, levels[0][0]), N_LEVELS=len(levels), TRAINING=training, BLOCK=block,
           num_warps=4, num_stages=1)
    return z


def stack_gates(spec, las, n_in: int, n_out: int, device) -> tuple:
    """(z_in [n_in], z_out [n_out], input levels, output levels) of an op's two gate stacks (a
    :class:`~nodeprune_kernels.ops.gate_stack.StackSpec` and its log_alphas): each stack sampled once by
    :func:`feature_gates` (None for an empty one), with the levels :func:`level_grads` needs."""
    in_levels, out_levels = spec.levels(las)
    kw = dict(seed=spec.seed, training=spec.training)
    return (feature_gates(in_levels, n_in, device, **kw), feature_gates(out_levels, n_out, device, **kw),
            in_levels, out_levels)


def fold_weight(weight: torch.Tensor, z: torch.Tensor | None, *, out_in: bool, side: str) -> torch.Tensor:
    """W with the gate vector ``z`` folded into its input (``side="in"``) or output (``"out"``) features, in
    W's dtype (:func:`transient_dtype`) and layout: a transient of W's size that a GEMM reads as a plain operand. W itself when z is
    None."""
    if z is None:
        return weight
    w = weight.contiguous()
    on_rows = (side == "out") == out_in  # [N, K] rows are outputs; [K, N] rows are inputs
    out = empty(w.shape, dtype=transient_dtype(w.dtype), device=w.device)
    rows_, cols_ = w.shape
    if w.numel() == 0:
        return out
    br, bc = (_pow2(rows_, 16, 128), _pow2(cols_, 16, 128)) if interpreter_configs() else (32, 128)
    launch(_fold_kernel, (triton.cdiv(rows_, br), triton.cdiv(cols_, bc)), w_ptr=w, z_ptr=z, out_ptr=out,
           ROWS=rows_, COLS=cols_, stride_wr=w.stride(0), stride_wc=w.stride(1), Z_ON_ROWS=on_rows,
           BLOCK_ROWS=br, BLOCK_COLS=bc, num_warps=4, num_stages=1)
    return out


def hidden_delta(pre: torch.Tensor, lin: torch.Tensor | None, ablation: Operand | None, *, act: int,
                 glu: bool) -> torch.Tensor:
    """h - h_c as an [M, F] tensor in pre's dtype, h = act(pre) * lin (or act(pre)) from [M, F] rows, in one
    pass; ``ablation`` is h_c as an operand (vector, tensor or HIDDEN) or None. A transient: written for the
    GEMM that reads it, never saved."""
    pre = pre.contiguous()
    if lin is not None:
        lin = lin.contiguous()
    M, F_ = pre.shape
    out = empty((M, F_), dtype=transient_dtype(pre.dtype), device=pre.device)
    if out.numel() == 0:
        return out
    hc = ablation if ablation is not None else Operand(pre, 0, 0, 0, 0, 0)
    if hc.mode == HIDDEN and (hc.t.stride(0) != F_ or hc.t.stride(1) != 1):
        hc = hidden_operand(hc.t.contiguous(), hc.u.contiguous() if hc.u is not None else None)
    bm, bf = (_pow2(M, 16, 64), _pow2(F_, 16, 256)) if interpreter_configs() else (16, 256)
    launch(_hidden_kernel, (triton.cdiv(M, bm), triton.cdiv(F_, bf)), pre_ptr=pre,
           lin_ptr=lin if lin is not None else pre, hc_ptr=hc.t, hcu_ptr=hc.u if hc.u is not None else pre,
           out_ptr=out, M=M, F=F_, stride_m=pre.stride(0), stride_hcm=hc.s_m, stride_hcf=hc.s_c, HC_MODE=hc.mode,
           ACT=act, GLU=glu, BLOCK_M=bm, BLOCK_F=bf, num_warps=4, num_stages=1)
    return out


def gated_matmul(a: Operand, b, M: int, R: int, C: int, *, a_split=Split(), e_split=Split(),
                 zc: torch.Tensor | None = None, out=None, out2=None, yc: Operand | None = None,
                 e: Operand | None = None, ec: Operand | None = None, act: int = 0, glu: bool = False,
                 out_kind: int = 0, colsum: bool | None = None):
    """Launch the gated GEMM (kernels.py): ``acc = A B`` with a plain K loop, then the epilogue. ``a`` is a
    TENSOR operand (any ablation already subtracted); ``b`` is a :func:`weight_operand` triple of a weight
    with the R side's gates folded in (:func:`fold_weight`); ``zc`` the [C] float32 output-side gate vector
    or None; ``out``/``out2`` are [M, C] tensors to write (``out2``: d lin of OUT_KIND 1).

    ``colsum`` (default: ``e`` is given) asks for the column sums of acc * (E - E_c); OUT_KIND 1 reads its
    pre-activations from ``e`` whether or not it also sums. Returns the partial sums
    [cdiv(M, BLOCK_M), C] (float32) when ``colsum``, else None.
    """
    dtype = b[0].dtype
    colsum = e is not None if colsum is None else colsum
    if out_kind == 1:  # the activation backward's tiles (act, act', lin, h_c) need the narrow tile
        epilogue = 2
    else:
        epilogue = 1 if e is not None and (zc is not None or ec is not None) else 0
    cfg = gemm_config(dtype, M, R, C, epilogue)
    dot_fp32, precision = _dot_mode(dtype)
    part = None
    if colsum:
        part = empty((triton.cdiv(M, cfg["BLOCK_M"]), C), dtype=torch.float32, device=b[0].device)
    if M == 0:
        return part
    dummy = b[0]
    none = Operand(dummy, 0, 0, 0, 0, 0)
    yc_, e_, ec_ = (t if t is not None else none for t in (yc, e, ec))
    grid = (triton.cdiv(M, cfg["BLOCK_M"]) * triton.cdiv(C, cfg["BLOCK_C"]),)
    launch(
        _gated_matmul_kernel, grid,
        a_ptr=a.t, b_ptr=b[0], zc_ptr=zc if zc is not None else dummy,
        out_ptr=out if out is not None else dummy, out2_ptr=out2 if out2 is not None else dummy, yc_ptr=yc_.t,
        e_ptr=e_.t, eu_ptr=e_.u if e_.u is not None else dummy, ec_ptr=ec_.t,
        ecu_ptr=ec_.u if ec_.u is not None else dummy, part_ptr=part if part is not None else dummy,
        M=M, R=R, C=C,
        A_M1=a_split.m1, stride_am=a.s_m, stride_am1=a.s_m1, stride_ar=a.s_c, stride_ar1=a.s_c1,
        stride_br=b[1], stride_bc=b[2],
        stride_om=out.stride(0) if out is not None else 0, stride_oc=out.stride(1) if out is not None else 0,
        stride_ycm=yc_.s_m, stride_ycc=yc_.s_c,
        E_M1=e_split.m1, E_C1=e_split.c1, stride_em=e_.s_m, stride_em1=e_.s_m1, stride_ec=e_.s_c,
        stride_ec1=e_.s_c1,
        stride_ecm=ec_.s_m, stride_ecm1=ec_.s_m1, stride_ecc=ec_.s_c, stride_ecc1=ec_.s_c1,
        A_R1=a_split.c1, C_GATE=zc is not None, E_HIDDEN=e_.mode == HIDDEN, EC_MODE=ec_.mode,
        ACT=act, GLU=glu,
        STORE_OUT=out is not None, OUT_KIND=out_kind, YC_MODE=yc_.mode, COLSUM=colsum,
        DOT_FP32=dot_fp32, INPUT_PRECISION=precision,
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

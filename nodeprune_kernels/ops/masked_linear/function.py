"""Host wrappers and the autograd Function of the fused masked linear (Triton backend)."""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
import triton

from ...utils.alloc import empty
from ...utils.backend import interpreter_configs, warn_once
from ...utils.launch import launch
from .kernels import MAX_LEVELS, _gate_level_grad_kernel, _gated_matmul_kernel
from .reference import Gate, masked_linear_reference


@dataclass(frozen=True)
class Spec:
    """Everything about a masked_linear call that is not a tensor."""

    n_in: int
    n_out: int
    in_groups: tuple
    in_offsets: tuple
    out_groups: tuple
    out_offsets: tuple
    seed: int
    training: bool
    out_in: bool  # weight is [out, in] (nn.Linear); else [in, out] (GPT-2 Conv1D)
    has_y_ablate: bool


def _rows(t, n):
    """(tensor, row stride, column stride) of a [n] vector (row stride 0) or a [..., n] tensor."""
    if t is None:
        return None
    if t.dim() == 1:
        return (t, 0, t.stride(0))
    t2 = t.reshape(-1, n)
    return (t2, t2.stride(0), t2.stride(1))


def _mode(side):
    """0: absent, 1: a vector over the columns, 2: a [M, cols] tensor (see ``_rows``)."""
    return 0 if side is None else (1 if side[1] == 0 and side[0].dim() == 1 else 2)


def _weight_as(weight, out_in: bool, shape: str):
    """(W, row stride, column stride) reading W as [K, N] (``shape="KN"``, for x W^T) or [N, K] ("NK")."""
    s_out, s_in = (weight.stride(0), weight.stride(1)) if out_in else (weight.stride(1), weight.stride(0))
    return (weight, s_in, s_out) if shape == "KN" else (weight, s_out, s_in)


def _levels(las, groups, offsets):
    return [(la.contiguous(), g, o) for la, g, o in zip(las, groups, offsets)]


def _level_kwargs(prefix, levels, dummy):
    kw = {}
    for i in range(MAX_LEVELS):
        la, g, o = levels[i] if i < len(levels) else (dummy, 1, 0)
        kw[f"{prefix}a{i}"], kw[f"{prefix}g{i}"], kw[f"{prefix}o{i}"] = la, g, o
    return kw


def _pow2(n, lo, hi):
    return max(lo, min(hi, triton.next_power_of_2(max(int(n), 1))))


def _gemm_config(dtype, M, R, C, heavy_epilogue=False):
    """Tile sizes, warps and stages. Chosen so that no build spills registers on sm_90 or sm_80 (checked by
    tests/test_compile.py); not yet tuned on a GPU (DESIGN.md: autotune there, one config here)."""
    if interpreter_configs():  # every program instance costs ~ms there: few, large tiles
        return dict(BLOCK_M=_pow2(M, 16, 64), BLOCK_C=_pow2(C, 16, 64), BLOCK_R=_pow2(R, 16, 64), GROUP_M=8,
                    num_warps=4, num_stages=1)
    if dtype == torch.float32:  # fp32 dots run on FMA units unless tf32 is allowed
        return dict(BLOCK_M=64, BLOCK_C=64, BLOCK_R=16, GROUP_M=8, num_warps=4, num_stages=3)
    # gating and a column reduction in the epilogue need registers: narrower tiles there
    return dict(BLOCK_M=128, BLOCK_C=64 if heavy_epilogue else 128, BLOCK_R=64, GROUP_M=8, num_warps=8,
                num_stages=3)


def _dot_mode(dtype):
    """(DOT_FP32, INPUT_PRECISION): the interpreter cannot run 16-bit tl.dot, so it computes in fp32."""
    if interpreter_configs():
        return True, "ieee"
    if dtype == torch.float32:
        return True, "tf32" if torch.backends.cuda.matmul.allow_tf32 else "ieee"
    return False, "ieee"


def gated_matmul(a, b, M, R, C, *, seed, training, ac=None, r_levels=(), c_levels=(), out=None, yc=None,
                 e=None, ec=None):
    """Launch the gated GEMM (see kernels.py). a/ac/yc/e/ec are ``_rows`` triples, b is (W, s_r, s_c).

    Writes ``out`` when given; returns the column-sum partials [cdiv(M, BLOCK_M), C] (float32) when ``e``
    is given, else None.
    """
    cfg = _gemm_config(a[0].dtype, M, R, C, heavy_epilogue=bool(c_levels) and e is not None)
    dot_fp32, precision = _dot_mode(a[0].dtype)
    part = None
    if e is not None:
        part = empty((triton.cdiv(M, cfg["BLOCK_M"]), C), dtype=torch.float32, device=a[0].device)
    if M == 0:
        return part
    dummy = a[0]
    none = (dummy, 0, 0)
    ac_, yc_, e_, ec_ = (t if t is not None else none for t in (ac, yc, e, ec))
    grid = (triton.cdiv(M, cfg["BLOCK_M"]) * triton.cdiv(C, cfg["BLOCK_C"]),)
    launch(
        _gated_matmul_kernel, grid,
        a_ptr=a[0], ac_ptr=ac_[0], b_ptr=b[0], out_ptr=out if out is not None else dummy, yc_ptr=yc_[0],
        e_ptr=e_[0], ec_ptr=ec_[0], part_ptr=part if part is not None else dummy,
        M=M, R=R, C=C,
        stride_am=a[1], stride_ar=a[2], stride_acm=ac_[1], stride_acr=ac_[2],
        stride_br=b[1], stride_bc=b[2],
        stride_om=out.stride(0) if out is not None else 0, stride_oc=out.stride(1) if out is not None else 0,
        stride_ycm=yc_[1], stride_ycc=yc_[2],
        stride_em=e_[1], stride_ec=e_[2], stride_ecm=ec_[1], stride_ecc=ec_[2],
        seed=seed,
        **_level_kwargs("r", r_levels, dummy), **_level_kwargs("c", c_levels, dummy),
        R_LEVELS=len(r_levels), C_LEVELS=len(c_levels),
        AC_MODE=_mode(ac), STORE_OUT=out is not None, YC_MODE=_mode(yc),
        COLSUM=e is not None, EC_MODE=_mode(ec),
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


class MaskedLinearFunction(torch.autograd.Function):
    """y' = y_c + z_out * (((x - x_c) * z_in) W^T); saves x (and x_c), the weight and the log_alphas."""

    @staticmethod
    def forward(ctx, x, weight, bias, x_ablate, y_ablate, spec: Spec, *log_alphas):
        K, N = spec.n_in, spec.n_out
        n_lvl_in = len(spec.in_groups)
        in_levels = _levels(log_alphas[:n_lvl_in], spec.in_groups, spec.in_offsets)
        out_levels = _levels(log_alphas[n_lvl_in:], spec.out_groups, spec.out_offsets)
        x2 = x.reshape(-1, K)
        M = x2.shape[0]
        if y_ablate is not None:
            yc = _rows(y_ablate, N)
        elif x_ablate is not None:
            w_oi = weight if spec.out_in else weight.t()
            yc = _rows(F.linear(x_ablate, w_oi, bias), N)
        elif bias is not None:
            yc = _rows(bias, N)
        else:
            yc = None
        y = empty((M, N), dtype=x.dtype, device=x.device)
        gated_matmul((x2, x2.stride(0), x2.stride(1)), _weight_as(weight, spec.out_in, "KN"), M, K, N,
                     seed=spec.seed, training=spec.training, ac=_rows(x_ablate, K), r_levels=in_levels,
                     c_levels=out_levels, out=y, yc=yc)
        ctx.spec = spec
        ctx.save_for_backward(x, weight, bias, x_ablate, *log_alphas)
        return y.view(*x.shape[:-1], N)

    @staticmethod
    def backward(ctx, dy):
        spec: Spec = ctx.spec
        x, weight, bias, x_ablate, *las = ctx.saved_tensors
        K, N = spec.n_in, spec.n_out
        n_lvl_in = len(spec.in_groups)
        in_levels = _levels(las[:n_lvl_in], spec.in_groups, spec.in_offsets)
        out_levels = _levels(las[n_lvl_in:], spec.out_groups, spec.out_offsets)
        need = ctx.needs_input_grad
        need_dx = need[0]
        need_in = need[6:6 + n_lvl_in]
        need_out = need[6 + n_lvl_in:]
        x2 = x.reshape(-1, K)
        dy2 = dy.reshape(-1, N)
        M = x2.shape[0]
        kw = dict(seed=spec.seed, training=spec.training)
        dx, grads_in, grads_out = None, [None] * n_lvl_in, [None] * len(out_levels)

        if need_dx or any(need_in):
            # P = (dy * z_out) W; dx = P * z_in; per-feature sums of P * (x - x_c) for the input gates
            dx2 = empty((M, K), dtype=x.dtype, device=x.device) if need_dx else None
            part = gated_matmul((dy2, dy2.stride(0), dy2.stride(1)), _weight_as(weight, spec.out_in, "NK"), M, N, K,
                                r_levels=out_levels, c_levels=in_levels, out=dx2,
                                e=(x2, x2.stride(0), x2.stride(1)) if any(need_in) else None,
                                ec=_rows(x_ablate, K) if any(need_in) else None, **kw)
            if any(need_in):
                grads_in = level_grads(part.sum(0), in_levels, need_in, **kw)
            if need_dx:
                dx = dx2.view(x.shape)

        if any(need_out):
            # recompute Q = ((x - x_c) * z_in) W^T instead of saving it; per-feature sums of dy * Q
            part = gated_matmul((x2, x2.stride(0), x2.stride(1)), _weight_as(weight, spec.out_in, "KN"), M, K, N,
                                ac=_rows(x_ablate, K), r_levels=in_levels, e=(dy2, dy2.stride(0), dy2.stride(1)),
                                **kw)
            grads_out = level_grads(part.sum(0), out_levels, need_out, **kw)

        dw = db = None
        if need[1] or need[2]:
            dw, db = _parameter_grads(spec, x, weight, bias, x_ablate, las, dy, need[1], need[2])
        return (dx, dw, db, None, None, None, *grads_in, *grads_out)


def _parameter_grads(spec, x, weight, bias, x_ablate, las, dy, need_w, need_b):
    """Weight and bias gradients through the reference (slow, materialises activations; warned once)."""
    warn_once(
        "masked_linear_weight_grad",
        "masked_linear: the weight or bias requires grad, so its gradient is computed by the plain-PyTorch "
        "reference in the backward (slower, more memory). Freeze the weights (requires_grad_(False)) for "
        "the fused path; node pruning trains only the gates.",
    )
    n_lvl_in = len(spec.in_groups)
    in_gates = [Gate(la.detach(), g, o) for la, g, o in zip(las[:n_lvl_in], spec.in_groups, spec.in_offsets)]
    out_gates = [Gate(la.detach(), g, o) for la, g, o in zip(las[n_lvl_in:], spec.out_groups, spec.out_offsets)]
    with torch.enable_grad():
        w = weight.detach().requires_grad_(need_w)
        b = bias.detach().requires_grad_(need_b) if bias is not None else None
        y = masked_linear_reference(
            x.detach(), w, b, in_gates=in_gates, out_gates=out_gates, x_ablate=x_ablate,
            y_ablate=torch.zeros((), dtype=x.dtype, device=x.device) if spec.has_y_ablate else None,
            seed=spec.seed, training=spec.training, weight_layout="out_in" if spec.out_in else "in_out")
        wanted = [t for t in (w, b) if t is not None and t.requires_grad]
        grads = list(torch.autograd.grad(y, wanted, dy, allow_unused=True))
    dw = grads.pop(0) if need_w else None
    db = grads.pop(0) if need_b and b is not None else None
    if need_b and db is None and b is not None:
        db = torch.zeros_like(bias)
    return dw, db

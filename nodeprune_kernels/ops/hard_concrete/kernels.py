"""Triton kernels and device helpers for hard-concrete gates.

The ``@triton.jit`` helpers here (``gate_value``, ``gate_grad``) are also called by the gated GEMM's small
kernels that sample a gate stack into a per-feature vector once per op call and turn per-feature sums into
log_alpha gradients; no GEMM loop samples.
"""
import triton
import triton.language as tl

from .reference import EPS, GAMMA, INV_BETA, STRETCH

_EPS = tl.constexpr(EPS)
_GAMMA = tl.constexpr(GAMMA)
_INV_BETA = tl.constexpr(INV_BETA)
_STRETCH = tl.constexpr(STRETCH)


@triton.jit
def gate_uniform(seed, index):
    """u in [eps, 1 - eps]: tl.rand(seed, index) clamped (float32)."""
    r = tl.rand(seed, index)
    return tl.minimum(tl.maximum(r, _EPS), 1.0 - _EPS)


@triton.jit
def _stretched_sigmoid(log_alpha, seed, index, TRAINING: tl.constexpr):
    a = log_alpha.to(tl.float32)
    if TRAINING:
        u = gate_uniform(seed, index)
        x = (tl.log(u) - tl.log(1.0 - u) + a) * _INV_BETA
    else:
        x = a
    return 1.0 / (1.0 + tl.exp(-x))


@triton.jit
def gate_value(log_alpha, seed, index, TRAINING: tl.constexpr):
    """Hard-concrete gate z (float32) of log_alpha at global gate ``index``."""
    s = _stretched_sigmoid(log_alpha, seed, index, TRAINING)
    return tl.minimum(tl.maximum(s * _STRETCH + _GAMMA, 0.0), 1.0)


@triton.jit
def gate_grad(log_alpha, seed, index, TRAINING: tl.constexpr):
    """dz / dlog_alpha (float32) of the gate at global ``index``; zero where the clamp is active."""
    s = _stretched_sigmoid(log_alpha, seed, index, TRAINING)
    y = s * _STRETCH + _GAMMA
    scale = _STRETCH * _INV_BETA if TRAINING else _STRETCH
    return tl.where((y > 0.0) & (y < 1.0), scale * s * (1.0 - s), 0.0)


@triton.jit
def _uniform_kernel(out_ptr, n, seed, offset, BLOCK: tl.constexpr):
    idx = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    mask = idx < n
    tl.store(out_ptr + idx, gate_uniform(seed, offset + idx), mask=mask)


@triton.jit
def _hard_concrete_fwd_kernel(la_ptr, z_ptr, n, seed, offset, TRAINING: tl.constexpr, BLOCK: tl.constexpr):
    idx = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    mask = idx < n
    a = tl.load(la_ptr + idx, mask=mask, other=0.0)
    z = gate_value(a, seed, offset + idx, TRAINING)
    tl.store(z_ptr + idx, z.to(z_ptr.dtype.element_ty), mask=mask)


@triton.jit
def _hard_concrete_bwd_kernel(
    la_ptr, dz_ptr, dla_ptr, n, seed, offset, TRAINING: tl.constexpr, BLOCK: tl.constexpr
):
    idx = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    mask = idx < n
    a = tl.load(la_ptr + idx, mask=mask, other=0.0)
    dz = tl.load(dz_ptr + idx, mask=mask, other=0.0).to(tl.float32)
    dla = dz * gate_grad(a, seed, offset + idx, TRAINING)
    tl.store(dla_ptr + idx, dla.to(dla_ptr.dtype.element_ty), mask=mask)

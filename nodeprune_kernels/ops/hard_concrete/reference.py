"""Plain-PyTorch hard-concrete gates: the truth the kernels are tested against.

Hard-concrete distribution (Louizos, Welling, Kingma 2018) with beta = 2/3, gamma = -0.1, zeta = 1.1.
The uniform draw of gate i is Philox4x32-10 of (seed, offset + i), computed here with exact integer
arithmetic so that it equals Triton's ``tl.rand(seed, offset + i)`` bit for bit, then clamped to
[eps, 1 - eps]. Nothing random is ever stored: any backward or backend regenerates the same draw.
"""
from __future__ import annotations

import math

import torch

BETA = 2.0 / 3.0
GAMMA = -0.1
ZETA = 1.1
EPS = 1e-6
INV_BETA = 1.5  # 1 / BETA, exact in binary floating point
STRETCH = ZETA - GAMMA  # 1.2
L0_SHIFT = BETA * math.log(-GAMMA / ZETA)  # expected_l0 = sigmoid(log_alpha - L0_SHIFT)

# Philox4x32-10 constants (Salmon et al. 2011), as used by triton.language.random
_ROUND_A = 0xD2511F53
_ROUND_B = 0xCD9E8D57
_KEY_A = 0x9E3779B9
_KEY_B = 0xBB67AE85
_MASK32 = 0xFFFFFFFF
_UNIFORM_SCALE = 4.6566127342e-10  # triton's int32 -> [0, 1) scale

MAX_SEED = 2**63 - 1
MAX_INDEX = 2**31 - 1  # offsets + gate indices are int32 inside the kernels


def _mulhilo32(a: int, b: torch.Tensor):
    """(hi, lo) 32-bit halves of a * b for a uint32 constant and a uint32-valued int64 tensor, exactly."""
    a_hi, a_lo = a >> 16, a & 0xFFFF
    b_hi, b_lo = b >> 16, b & 0xFFFF
    lo_full = a_lo * b_lo  # < 2**32
    mid = a_hi * b_lo + a_lo * b_hi  # < 2**33
    low = lo_full + ((mid & 0xFFFF) << 16)  # < 2**33
    hi = (a_hi * b_hi + (mid >> 16) + (low >> 32)) & _MASK32
    return hi, low & _MASK32


def philox_uint32(seed: int, index: torch.Tensor) -> torch.Tensor:
    """First 32-bit output of Philox4x32-10 with counter (index, 0, 0, 0) and key (seed_lo, seed_hi).

    ``index`` is an integer tensor of values in [0, 2**31); returns an int64 tensor of uint32 values.
    """
    c0 = index.to(torch.int64) & _MASK32
    c1 = torch.zeros_like(c0)
    c2 = torch.zeros_like(c0)
    c3 = torch.zeros_like(c0)
    k0, k1 = seed & _MASK32, (seed >> 32) & _MASK32
    for _ in range(10):
        hi_b, lo_b = _mulhilo32(_ROUND_B, c2)
        hi_a, lo_a = _mulhilo32(_ROUND_A, c0)
        c0, c2, c1, c3 = hi_b ^ c1 ^ k0, hi_a ^ c3 ^ k1, lo_b, lo_a
        k0 = (k0 + _KEY_A) & _MASK32
        k1 = (k1 + _KEY_B) & _MASK32
    return c0


def philox_uniform(seed: int, index: torch.Tensor) -> torch.Tensor:
    """float32 in [0, 1): exactly ``tl.rand(seed, index)``."""
    x = philox_uint32(seed, index)
    x = torch.where(x >= 2**31, x - 2**32, x)  # bitcast to int32
    x = torch.where(x < 0, -x - 1, x)  # ~x
    return x.to(torch.float32) * torch.tensor(_UNIFORM_SCALE, dtype=torch.float32, device=x.device)


def gate_uniform(seed: int, index: torch.Tensor) -> torch.Tensor:
    """The hard-concrete noise u in [eps, 1 - eps] (float32) of the gates at global ``index``."""
    return philox_uniform(seed, index).clamp(EPS, 1.0 - EPS)


def hard_concrete_reference(log_alpha: torch.Tensor, seed: int = 0, offset: int = 0, training: bool = True):
    """z with log_alpha's shape, differentiable with respect to log_alpha by autograd.

    Computed in log_alpha's dtype (float32 or float64); the noise u is float32, as in the kernels.
    """
    if training:
        index = offset + torch.arange(log_alpha.numel(), device=log_alpha.device).view(log_alpha.shape)
        u = gate_uniform(seed, index).to(log_alpha.dtype)
        s = torch.sigmoid((torch.log(u) - torch.log(1 - u) + log_alpha) * INV_BETA)
    else:
        s = torch.sigmoid(log_alpha)
    return (s * STRETCH + GAMMA).clamp(0.0, 1.0)


def expected_l0_reference(log_alpha: torch.Tensor) -> torch.Tensor:
    """Probability that each gate is non-zero: sigmoid(log_alpha - beta * log(-gamma / zeta))."""
    return torch.sigmoid(log_alpha - L0_SHIFT)

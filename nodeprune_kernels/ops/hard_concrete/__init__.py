"""Hard-concrete gates: sampled (training) and deterministic (evaluation), and the expected L0."""
from __future__ import annotations

import torch

from ...utils.backend import resolve_backend
from ...utils.checks import check_log_alpha, check_seed_offset
from .reference import (
    BETA,
    EPS,
    GAMMA,
    ZETA,
    expected_l0_reference,
    gate_uniform,
    hard_concrete_reference,
)

__all__ = ["hard_concrete", "expected_l0", "gate_noise", "BETA", "GAMMA", "ZETA", "EPS"]


def hard_concrete(log_alpha: torch.Tensor, *, seed: int, offset: int = 0, training: bool = True,
                  backend: str = "auto") -> torch.Tensor:
    """Hard-concrete gates z in [0, 1], one per element of ``log_alpha``.

    Args:
        log_alpha: float tensor of any shape (float32 recommended; float16/bfloat16/float64 accepted),
            on CPU or CUDA. Element i (in row-major order) is gate ``offset + i``.
        seed: int in [0, 2**63): the Philox key. Use one seed per training step.
        offset: the global Philox index of element 0; ``offset + log_alpha.numel()`` must stay below 2**31.
        training: True samples z = clamp(sigmoid((log u - log(1-u) + log_alpha) / beta) * (zeta - gamma)
            + gamma, 0, 1) with u = clamp(tl.rand(seed, offset + i), eps, 1 - eps); False gives the
            deterministic gate clamp(sigmoid(log_alpha) * (zeta - gamma) + gamma, 0, 1).
        backend: "auto", "triton", "native" or "reference" (see :mod:`nodeprune_kernels.utils.backend`).

    Returns:
        z, same shape and dtype as ``log_alpha``, differentiable with respect to it. Nothing of the
        noise is stored: the backward regenerates u from (seed, offset + i).

    torch.compile: on the Triton and native backends this is the custom op ``nodeprune::hard_concrete`` (backward:
    ``nodeprune::hard_concrete_backward``): no graph break; the non-finite check runs inside the op.
    """
    check_log_alpha(log_alpha, "hard_concrete")
    check_seed_offset(seed, offset, log_alpha.numel())
    impl = resolve_backend(backend, log_alpha.device)
    if impl == "reference":
        return hard_concrete_reference(log_alpha, seed=seed, offset=offset, training=training)
    from .function import hard_concrete_op

    return hard_concrete_op(log_alpha, seed, offset, bool(training), impl)


def expected_l0(log_alpha: torch.Tensor) -> torch.Tensor:
    """Probability that each gate is non-zero, sigmoid(log_alpha - beta * log(-gamma / zeta)).

    Same shape and dtype as ``log_alpha``; differentiable. Summed, it is the expected number of open gates
    (the L0 penalty of the pruning run).
    """
    check_log_alpha(log_alpha, "expected_l0")
    return expected_l0_reference(log_alpha)


def gate_noise(n: int, *, seed: int, offset: int = 0, device="cpu", backend: str = "auto") -> torch.Tensor:
    """The uniform noise u (float32, shape [n]) of gates offset .. offset + n - 1.

    Every backend returns identical bits; this is the Philox stream every kernel draws its gates from.
    On the Triton and native backends it is the custom op ``nodeprune::gate_noise`` (no graph break under
    torch.compile).
    """
    check_seed_offset(seed, offset, n)
    device = torch.device(device)
    impl = resolve_backend(backend, device)
    if impl == "reference":
        return gate_uniform(seed, offset + torch.arange(n, device=device))
    from .function import gate_noise_op

    return gate_noise_op(n, seed, offset, device, impl)

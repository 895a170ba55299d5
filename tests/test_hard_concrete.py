import math

import pytest
import torch

from nodeprune_kernels import expected_l0, gate_noise, hard_concrete
from nodeprune_kernels.ops.hard_concrete.reference import (
    EPS,
    GAMMA,
    ZETA,
    hard_concrete_reference,
    philox_uint32,
)
from nodeprune_kernels.utils.alloc import empty

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


def test_outputs_are_poisoned_in_tests():
    assert torch.isnan(empty((4,), dtype=torch.float32, device="cpu")).all()


SEEDS = [0, 1, 12345, 2**31 + 7, 2**32, 2**40 + 5, 2**62 + 3, 2**63 - 1]
OFFSETS = [0, 1, 977, 2**31 - 3000, 2**31 - 2500]  # the last: gate 2**31 - 1, the highest there is


@pytest.mark.parametrize("seed", SEEDS)
@pytest.mark.parametrize("offset", OFFSETS)
def test_philox_bit_exact(seed, offset, fused, device):
    n = 2500
    u_kernel = gate_noise(n, seed=seed, offset=offset, device=device, backend=fused)
    u_ref = gate_noise(n, seed=seed, offset=offset, device=device, backend="reference")
    assert u_kernel.dtype == torch.float32 and u_kernel.shape == (n,)
    assert torch.equal(u_kernel.view(torch.int32), u_ref.view(torch.int32))


@pytest.mark.parametrize("seed", SEEDS)
@pytest.mark.parametrize("offset", OFFSETS)
def test_native_noise_equals_the_triton_kernel(seed, offset):
    """The native Philox stream is the Triton kernel's, bit for bit (and so the reference's)."""
    n = 2500
    u_native = gate_noise(n, seed=seed, offset=offset, device="cpu", backend="native")
    u_triton = gate_noise(n, seed=seed, offset=offset, device=DEVICE, backend="triton").cpu()
    u_ref = gate_noise(n, seed=seed, offset=offset, device="cpu", backend="reference")
    assert torch.equal(u_native.view(torch.int32), u_triton.view(torch.int32))
    assert torch.equal(u_native.view(torch.int32), u_ref.view(torch.int32))


@pytest.mark.parametrize("training", [True, False])
@pytest.mark.parametrize("seed", [3, 2**32 + 1, 2**63 - 1])
def test_native_gates_equal_the_triton_kernel(training, seed):
    """The same z from the native and the Triton kernels, and the same d log_alpha, up to float32 rounding."""
    torch.manual_seed(1)
    la = (torch.randn(3000) * 3).requires_grad_()
    la_t = la.detach().to(DEVICE).requires_grad_()
    offset = 2**31 - la.numel()
    z_native = hard_concrete(la, seed=seed, offset=offset, training=training, backend="native")
    z_triton = hard_concrete(la_t, seed=seed, offset=offset, training=training, backend="triton")
    torch.testing.assert_close(z_native, z_triton.detach().cpu(), atol=1e-6, rtol=0)
    dz = torch.randn_like(z_native)
    (g_native,) = torch.autograd.grad(z_native, la, dz)
    (g_triton,) = torch.autograd.grad(z_triton, la_t, dz.to(DEVICE))
    torch.testing.assert_close(g_native, g_triton.cpu(), atol=2e-5, rtol=1e-5)


@pytest.mark.parametrize("training", [True, False])
@pytest.mark.parametrize("seed", [0, 11, 2**33 + 9])
def test_native_hard_concrete_float32_within_1e_6(training, seed):
    """Native z of float32 log_alphas against the float64 reference: within 1e-6, every element."""
    torch.manual_seed(seed % 1000)
    la = torch.cat([torch.randn(5000) * 3, torch.linspace(-12, 12, 997)]).requires_grad_()
    z = hard_concrete(la, seed=seed, offset=7, training=training, backend="native")
    z_ref = hard_concrete_reference(la.detach().double(), seed=seed, offset=7, training=training)
    assert z.dtype == torch.float32
    torch.testing.assert_close(z.double(), z_ref, atol=1e-6, rtol=0)


def test_philox_reference_known_answer():
    # Philox4x32-10 known-answer test (Salmon et al. 2011, Random123 kat_vectors): counter 0, key 0
    assert philox_uint32(0, torch.tensor([0])).item() == 0x6627E8D5


def test_noise_is_uniform_and_clamped():
    u = gate_noise(20000, seed=3, backend="reference")
    assert u.min() >= EPS and u.max() <= 1 - EPS
    assert abs(u.mean().item() - 0.5) < 0.01
    assert abs(u.var().item() - 1 / 12) < 0.003
    assert not torch.equal(u, gate_noise(20000, seed=4, backend="reference"))


@pytest.mark.parametrize("training", [True, False])
@pytest.mark.parametrize("shape", [(1,), (7,), (3, 5), (1030,)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_hard_concrete_matches_reference(training, shape, dtype, fused, device):
    torch.manual_seed(0)
    la = (torch.randn(shape, dtype=dtype, device=device) * 2).requires_grad_()
    z = hard_concrete(la, seed=11, offset=5, training=training, backend=fused)
    z_ref = hard_concrete_reference(la.double(), seed=11, offset=5, training=training)
    assert z.shape == la.shape and z.dtype == dtype
    torch.testing.assert_close(z.double(), z_ref, atol=2e-6, rtol=0)
    dz = torch.randn_like(z)
    (g,) = torch.autograd.grad(z, la, dz)
    (g_ref,) = torch.autograd.grad(z_ref, la, dz.double())
    torch.testing.assert_close(g.double(), g_ref.double(), atol=2e-5, rtol=1e-5)


def test_hard_concrete_non_contiguous(fused, device):
    base = torch.randn(6, 8, device=device)
    la = base[:, ::2].requires_grad_()
    z = hard_concrete(la, seed=2, backend=fused)
    torch.testing.assert_close(z, hard_concrete_reference(la.detach().contiguous(), seed=2), atol=1e-6, rtol=0)


def test_deterministic_gate_formula_and_seed_independence():
    la = torch.linspace(-6, 6, 101, dtype=torch.float64)
    z = hard_concrete(la, seed=1, training=False, backend="reference")
    expect = (torch.sigmoid(la) * (ZETA - GAMMA) + GAMMA).clamp(0, 1)
    torch.testing.assert_close(z, expect)
    torch.testing.assert_close(z, hard_concrete(la, seed=99, training=False, backend="reference"))
    assert z[0] == 0 and z[-1] == 1


def test_gate_index_is_global():
    """Gate k of a call at offset o draws the same noise as a call of that gate alone at offset o + k."""
    la = torch.randn(9)
    z_all = hard_concrete(la, seed=7, offset=100, backend="reference")
    for k in range(9):
        z_k = hard_concrete(la[k:k + 1], seed=7, offset=100 + k, backend="reference")
        assert torch.equal(z_all[k:k + 1], z_k)


def test_samples_follow_hard_concrete_distribution():
    la = torch.full((20000,), 0.3, dtype=torch.float64)
    z = hard_concrete(la, seed=5, backend="reference")
    p_nonzero = (z > 0).double().mean().item()
    assert abs(p_nonzero - expected_l0(la[:1]).item()) < 0.01


def test_expected_l0():
    la = torch.randn(50, dtype=torch.float64, requires_grad=True)
    l0 = expected_l0(la)
    torch.testing.assert_close(l0, torch.sigmoid(la - (2 / 3) * math.log(0.1 / 1.1)))
    assert torch.autograd.gradcheck(expected_l0, (la,))


def test_reference_gradcheck():
    la = torch.randn(40, dtype=torch.float64, requires_grad=True)
    for training in (True, False):
        assert torch.autograd.gradcheck(lambda a: hard_concrete_reference(a, seed=3, training=training), (la,))


@pytest.mark.parametrize("backend", ["triton", "native", "reference"])
def test_bad_inputs(backend, device):
    la = torch.zeros(4, device=device)
    with pytest.raises(ValueError, match="non-finite"):
        hard_concrete(torch.tensor([0.0, float("nan")], device=device), seed=0, backend=backend)
    with pytest.raises(ValueError, match="seed"):
        hard_concrete(la, seed=-1, backend=backend)
    with pytest.raises(ValueError, match="seed"):
        hard_concrete(la, seed=1.5, backend=backend)
    with pytest.raises(ValueError, match="2\\*\\*31"):
        hard_concrete(la, seed=0, offset=2**31 - 2, backend=backend)
    with pytest.raises(TypeError, match="floating"):
        hard_concrete(torch.zeros(3, dtype=torch.int64, device=device), seed=0, backend=backend)


def test_unknown_backend_and_missing_gpu(monkeypatch):
    with pytest.raises(ValueError, match="unknown backend"):
        hard_concrete(torch.zeros(3), seed=0, backend="cuda")
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    with pytest.raises(RuntimeError, match="CUDA"):
        hard_concrete(torch.zeros(3), seed=0, backend="triton")
    # auto on CPU without the interpreter: the native kernels (the reference where they cannot be built), same gates
    torch.testing.assert_close(hard_concrete(torch.zeros(3), seed=0), hard_concrete_reference(torch.zeros(3)))


def test_finite_check_is_not_fooled_by_reused_memory():
    """A new non-finite log_alpha must be caught even where a checked finite one lived before."""
    for _ in range(50):
        la = torch.zeros(64)
        hard_concrete(la, seed=0, backend="reference")
        del la
        with pytest.raises(ValueError, match="non-finite"):
            hard_concrete(torch.full((64,), float("inf")), seed=0, backend="reference")


def test_finite_check_sees_in_place_updates():
    la = torch.zeros(8)
    hard_concrete(la, seed=0, backend="reference")
    la[3] = float("nan")  # bumps the version counter, as an optimizer step does
    with pytest.raises(ValueError, match="index \\(3,\\)"):
        hard_concrete(la, seed=0, backend="reference")

"""The gated GEMM's small kernels against plain PyTorch: the per-feature gate vectors (the only place a
GEMM's gates are sampled), the folded weights the K loop reads, and the MLP's transient h - h_c.

Outputs are NaN-poisoned (conftest), so an element a kernel leaves unwritten fails the comparison.
"""
import pytest
import torch

from nodeprune_kernels.ops.gate_stack import feature_gates_reference
from nodeprune_kernels.ops.gated_gemm import (feature_gates, fold_weight, hidden_delta, hidden_operand,
                                              tensor_operand, vector_operand)
from nodeprune_kernels.ops.masked_mlp.reference import ACT_IDS, ACTIVATIONS
from nodeprune_kernels.ops import Gate

from conftest import DEVICE


@pytest.mark.parametrize("training", [True, False])
@pytest.mark.parametrize("n_levels", [1, 2, 4])
def test_feature_gates_match_the_reference(training, n_levels):
    F_ = 96
    groups = [96, 24, 4, 1][4 - n_levels:]
    torch.manual_seed(0)
    gates = [Gate(torch.randn(F_ // g, device=DEVICE) * 2, g, 17 * i + 3) for i, g in enumerate(groups)]
    z = feature_gates([(g.log_alpha, g.group, g.offset) for g in gates], F_, DEVICE, seed=2**40 + 9,
                      training=training)
    ref = feature_gates_reference(gates, F_, seed=2**40 + 9, training=training)
    assert z.dtype == torch.float32 and z.shape == (F_,)
    torch.testing.assert_close(z, ref, rtol=1e-6, atol=1e-7)


def test_no_levels_is_no_vector():
    assert feature_gates([], 10, DEVICE, seed=0, training=True) is None


@pytest.mark.parametrize("out_in", [True, False])
@pytest.mark.parametrize("side", ["in", "out"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_fold_weight(out_in, side, dtype):
    N, K = 40, 72
    torch.manual_seed(1)
    w = torch.randn((N, K) if out_in else (K, N), device=DEVICE).to(dtype)
    z = torch.rand(K if side == "in" else N, device=DEVICE)
    out = fold_weight(w, z, out_in=out_in, side=side)
    w_oi = (w if out_in else w.t()).float()
    ref = w_oi * (z[None, :] if side == "in" else z[:, None])
    got = (out if out_in else out.t()).float()
    assert out.shape == w.shape
    torch.testing.assert_close(got, ref, rtol=1e-2 if dtype == torch.bfloat16 else 1e-6, atol=1e-6)
    assert fold_weight(w, None, out_in=out_in, side=side) is w


@pytest.mark.parametrize("activation", ["silu", "gelu", "gelu_tanh", "relu"])
@pytest.mark.parametrize("glu", [True, False])
@pytest.mark.parametrize("mode", ["none", "vector", "tensor", "rebuilt"])
def test_hidden_delta(activation, glu, mode):
    M, F_ = 37, 100
    torch.manual_seed(2)
    pre, lin = torch.randn(M, F_, device=DEVICE), torch.randn(M, F_, device=DEVICE) if glu else None
    pre_c, lin_c = torch.randn(M, F_, device=DEVICE), torch.randn(M, F_, device=DEVICE) if glu else None
    act = ACTIVATIONS[activation]
    h = act(pre) * lin if glu else act(pre)
    if mode == "none":
        ablation, h_c = None, 0.0
    elif mode == "vector":
        h_c = torch.randn(F_, device=DEVICE)
        ablation = vector_operand(h_c)
    elif mode == "tensor":
        h_c = torch.randn(M, F_, device=DEVICE)
        ablation = tensor_operand(h_c, M, F_)
    else:
        h_c = act(pre_c) * lin_c if glu else act(pre_c)
        ablation = hidden_operand(pre_c, lin_c)
    out = hidden_delta(pre, lin, ablation, act=ACT_IDS[activation], glu=glu)
    torch.testing.assert_close(out.float(), h - h_c, rtol=1e-5, atol=1e-5)


def test_hidden_delta_reads_strided_rows():
    """pre and lin as column slices of one wider tensor (non-contiguous rows)."""
    torch.manual_seed(3)
    both = torch.randn(9, 2 * 48, device=DEVICE)
    pre, lin = both[:, :48], both[:, 48:]
    out = hidden_delta(pre, lin, None, act=ACT_IDS["silu"], glu=True)
    torch.testing.assert_close(out.float(), torch.nn.functional.silu(pre) * lin, rtol=1e-5, atol=1e-5)

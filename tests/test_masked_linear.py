import warnings
import zlib

import pytest
import torch
import torch.nn.functional as F

from helpers import assert_output_and_grads, gates64, rel_err, to64
from nodeprune_kernels import Gate, masked_linear
from nodeprune_kernels.ops.masked_linear.reference import masked_linear_reference
from nodeprune_kernels.utils.memory import SavedTensorBytes

DTYPES = [torch.float32, torch.float16, torch.bfloat16]
K, N, H = 72, 40, 6  # odd feature sizes: not multiples of any block size


def make_gates(spec, n_in, n_out, device, scale=1.5):
    """Gate stacks from a spec string: 'L' layer, 'B' block, 'H' head, 'n' neuron levels; 'o' output."""
    levels_in = {"L": (1, n_in), "B": (1, n_in), "H": (H, n_in // H), "n": (n_in, 1)}
    in_gates, out_gates, offset = [], [], 0
    for c in spec:
        n, group = (n_out, 1) if c == "o" else levels_in[c]
        la = (torch.randn(n, device=device) * scale + 0.5).requires_grad_()
        (out_gates if c == "o" else in_gates).append(Gate(la, group, offset))
        offset += n
    return in_gates, out_gates


def make_inputs(dtype, device, lead=(2, 9), layout="out_in", ablation="zero", bias=True, noncontig=False):
    x_full = torch.randn(*lead, 2 * K if noncontig else K, device=device).to(dtype)
    x = (x_full[..., ::2] if noncontig else x_full).requires_grad_()
    w = torch.randn(N, K, device=device) / K**0.5
    w = (w if layout == "out_in" else w.t().contiguous()).to(dtype)
    b = torch.randn(N, device=device).to(dtype) if bias else None
    x_ablate = {"zero": None, "mean": torch.randn(K, device=device).to(dtype),
                "interchange": torch.randn(*lead, K, device=device).to(dtype)}[ablation]
    return x, w, b, x_ablate


def check_against_reference(x, w, b, in_gates, out_gates, x_ablate, layout, fused, training=True, seed=123,
                            y_ablate=None):
    kw = dict(x_ablate=x_ablate, y_ablate=y_ablate, seed=seed, training=training, weight_layout=layout)
    y = masked_linear(x, w, b, in_gates=in_gates, out_gates=out_gates, backend=fused, **kw)
    assert y.shape == (*x.shape[:-1], N)
    g64 = [gates64(in_gates), gates64(out_gates)]
    x64 = to64(x).requires_grad_()
    kw64 = dict(kw, x_ablate=to64(x_ablate), y_ablate=to64(y_ablate))
    y_ref = masked_linear_reference(x64, to64(w), to64(b), in_gates=g64[0], out_gates=g64[1], **kw64)
    leaves = [x] + [g.log_alpha for g in in_gates + out_gates]
    leaves64 = [x64] + [g.log_alpha for g in g64[0] + g64[1]]
    names = ["dx"] + [f"d log_alpha[{i}]" for i in range(len(leaves) - 1)]
    assert_output_and_grads(y, y_ref, leaves, leaves64, x.dtype, names)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("ablation", ["zero", "mean", "interchange"])
@pytest.mark.parametrize("gates", ["n", "o", "LBHn", "BHo", "LBHno"])
def test_matches_reference(dtype, ablation, gates, fused, device):
    torch.manual_seed(zlib.crc32(f"{dtype}-{ablation}-{gates}".encode()))  # same data every run
    x, w, b, x_ablate = make_inputs(dtype, device, ablation=ablation)
    in_gates, out_gates = make_gates(gates, K, N, device)
    check_against_reference(x, w, b, in_gates, out_gates, x_ablate, "out_in", fused)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("layout", ["out_in", "in_out"])
@pytest.mark.parametrize("noncontig", [False, True])
@pytest.mark.parametrize("training", [True, False])
def test_layouts_strides_and_modes(dtype, layout, noncontig, training, fused, device):
    torch.manual_seed(1)
    x, w, b, x_ablate = make_inputs(dtype, device, lead=(3, 5), layout=layout, ablation="interchange",
                                    noncontig=noncontig, bias=not training)
    in_gates, out_gates = make_gates("Hno", K, N, device)
    check_against_reference(x, w, b, in_gates, out_gates, x_ablate, layout, fused, training=training)


@pytest.mark.parametrize("lead", [(), (1,), (130,), (2, 1, 3)])
def test_leading_dims(lead, fused, device):
    torch.manual_seed(2)
    x, w, b, x_ablate = make_inputs(torch.float32, device, lead=lead, ablation="mean")
    in_gates, out_gates = make_gates("Bno", K, N, device)
    check_against_reference(x, w, b, in_gates, out_gates, x_ablate, "out_in", fused)


def test_transposed_input(fused, device):
    torch.manual_seed(3)
    x = torch.randn(K, 7, 3, device=device).permute(2, 1, 0).requires_grad_()  # [3, 7, K], stride 1 on no dim
    w = torch.randn(N, K, device=device) / K**0.5
    in_gates, out_gates = make_gates("Hn", K, N, device)
    check_against_reference(x, w, None, in_gates, out_gates, None, "out_in", fused)


def test_y_ablate(fused, device):
    torch.manual_seed(4)
    x, w, b, x_ablate = make_inputs(torch.float32, device, ablation="interchange")
    y_ablate = torch.randn(*x.shape[:-1], N, device=device)
    in_gates, out_gates = make_gates("no", K, N, device)
    check_against_reference(x, w, b, in_gates, out_gates, x_ablate, "out_in", fused, y_ablate=y_ablate)


def test_no_gates_is_linear(fused, device):
    x, w, b, _ = make_inputs(torch.float32, device)
    y = masked_linear(x, w, b, backend=fused)
    assert rel_err(y, F.linear(x.double(), w.double(), b.double())) < 2e-6


def test_empty_batch(fused, device):
    x = torch.randn(0, K, device=device, requires_grad=True)
    w = torch.randn(N, K, device=device)
    in_gates, out_gates = make_gates("no", K, N, device)
    y = masked_linear(x, w, in_gates=in_gates, out_gates=out_gates, backend=fused)
    assert y.shape == (0, N)
    grads = torch.autograd.grad(y.sum(), [x, in_gates[0].log_alpha, out_gates[0].log_alpha])
    assert grads[0].shape == (0, K) and all(torch.all(g == 0) for g in grads[1:])


@pytest.mark.parametrize("layout", ["out_in", "in_out"])
def test_closed_gates_zero_weight_columns_and_rows(layout, fused, device):
    """Zero ablation, deterministic gates: closing a gate equals zeroing the weight's column / row."""
    torch.manual_seed(5)
    x, w, b, _ = make_inputs(torch.float32, device, layout=layout)
    w_oi = (w if layout == "out_in" else w.t()).clone()
    head = torch.full((H,), 20.0, device=device)
    head[2] = -20.0
    neuron = torch.full((K,), 20.0, device=device)
    neuron[[0, 5, 71]] = -20.0
    out = torch.full((N,), 20.0, device=device)
    out[[3, 39]] = -20.0
    y = masked_linear(x, w, b, in_gates=[Gate(head, K // H), Gate(neuron, 1, H)], out_gates=[Gate(out, 1)],
                      training=False, weight_layout=layout, backend=fused)
    w_oi[:, 2 * (K // H):3 * (K // H)] = 0
    w_oi[:, [0, 5, 71]] = 0
    w_oi[[3, 39], :] = 0
    torch.testing.assert_close(y, F.linear(x, w_oi, b), atol=1e-5, rtol=1e-5)


def test_backends_draw_identical_gates(device):
    """With a weight of ones and zero ablation, y reveals the sampled gates: all backends agree."""
    la_in = torch.randn(K, device=device)
    x = torch.ones(1, K, device=device)
    w = torch.eye(K, device=device)
    for seed in (0, 7, 2**32, 2**40, 2**63 - 1):
        for offset in (33, 2**31 - K):
            ys = {be: masked_linear(x.to(dev), w.to(dev), in_gates=[Gate(la_in.to(dev), 1, offset)], seed=seed,
                                    backend=be).cpu()
                  for be, dev in (("triton", device), ("native", "cpu"), ("reference", device))}
            torch.testing.assert_close(ys["triton"], ys["reference"], atol=1e-6, rtol=0)
            torch.testing.assert_close(ys["native"], ys["reference"], atol=1e-6, rtol=0)
            torch.testing.assert_close(ys["native"], ys["triton"], atol=1e-6, rtol=0)


def test_weight_and_bias_grad_slow_path(fused, device):
    torch.manual_seed(6)
    for layout in ("out_in", "in_out"):
        x, w, b, x_ablate = make_inputs(torch.float32, device, layout=layout, ablation="mean")
        w.requires_grad_()
        b.requires_grad_()
        in_gates, out_gates = make_gates("Hno", K, N, device)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            y = masked_linear(x, w, b, in_gates=in_gates, out_gates=out_gates, x_ablate=x_ablate,
                              weight_layout=layout, seed=3, backend=fused)
        y_ref = masked_linear_reference(x, w, b, in_gates=in_gates, out_gates=out_gates, x_ablate=x_ablate,
                                        weight_layout=layout, seed=3)
        dy = torch.randn_like(y)
        g = torch.autograd.grad(y, [w, b, x], dy)
        g_ref = torch.autograd.grad(y_ref, [w, b, x], dy)
        for a, r in zip(g, g_ref):
            assert rel_err(a, r) < 2e-5


def test_reference_gradcheck():
    torch.manual_seed(7)
    x = torch.randn(3, 12, dtype=torch.float64, requires_grad=True)
    w = torch.randn(5, 12, dtype=torch.float64, requires_grad=True)
    b = torch.randn(5, dtype=torch.float64, requires_grad=True)
    xc = torch.randn(3, 12, dtype=torch.float64)
    la = [torch.randn(n, dtype=torch.float64, requires_grad=True) for n in (3, 12, 5)]

    def f(x, w, b, l0, l1, l2):
        return masked_linear_reference(x, w, b, in_gates=[Gate(l0, 4), Gate(l1, 1, 3)], out_gates=[Gate(l2, 1, 15)],
                                       x_ablate=xc, seed=2)

    assert torch.autograd.gradcheck(f, (x, w, b, *la))


@pytest.mark.parametrize("ablation", ["zero", "mean", "interchange"])
def test_saved_bytes(ablation, fused, device):
    """Saved for backward: x (plus x_c for interchange) plus the gate parameters, nothing of token size else."""
    x, w, b, x_ablate = make_inputs(torch.bfloat16, device, lead=(4, 33), ablation=ablation)
    in_gates, out_gates = make_gates("LBHno", K, N, device)
    las = [g.log_alpha for g in in_gates + out_gates]
    with SavedTensorBytes(ignore=[w, b]) as saved:
        masked_linear(x, w, b, in_gates=in_gates, out_gates=out_gates, x_ablate=x_ablate, backend=fused)
    gate_bytes = sum(la.untyped_storage().nbytes() for la in las)
    expect = x.untyped_storage().nbytes() + gate_bytes
    if ablation == "interchange":
        expect += x_ablate.untyped_storage().nbytes()
    elif ablation == "mean":
        expect += x_ablate.untyped_storage().nbytes()  # one [K] vector
    assert saved.bytes == expect, saved.tensors
    if ablation == "interchange":
        return  # the eager reference saves x - x_c and the product instead; the fused path keeps x and x_c
    # the eager reference, as a user would write it, stores more
    with SavedTensorBytes(ignore=[w, b]) as saved_ref:
        masked_linear(x, w, b, in_gates=in_gates, out_gates=out_gates, x_ablate=x_ablate, backend="reference")
    assert saved_ref.bytes > saved.bytes


def test_frozen_linear_baseline_saves_nothing_but_weight(device):
    """The baseline the budget is measured against: a frozen nn.Linear saves no activation."""
    x = torch.randn(4, 33, K, device=device, requires_grad=True)
    lin = torch.nn.Linear(K, N, device=device).requires_grad_(False)
    with SavedTensorBytes(ignore=[lin.weight, lin.bias]) as saved:
        lin(x)
    assert saved.bytes == 0


@pytest.mark.parametrize("backend", ["triton", "native", "reference"])
def test_bad_inputs_get_clear_errors(backend, device):
    x = torch.randn(3, K, device=device)
    w = torch.randn(N, K, device=device)
    la_n = torch.zeros(K, device=device)

    def call(**kw):
        args = dict(x=x, weight=w, backend=backend)
        args.update(kw)
        return masked_linear(args.pop("x"), args.pop("weight"), args.pop("bias", None), **args)

    with pytest.raises(ValueError, match="tile the feature dimension"):
        call(in_gates=[Gate(torch.zeros(5, device=device), 10)])
    with pytest.raises(ValueError, match="tile the feature dimension"):
        call(out_gates=[Gate(la_n, 1)])  # K gates on N outputs
    with pytest.raises(TypeError, match="float16 but x is torch.float32"):
        call(weight=w.half())
    with pytest.raises(TypeError, match="x_ablate is torch.bfloat16"):
        call(x_ablate=torch.zeros(K, dtype=torch.bfloat16, device=device))
    with pytest.raises(ValueError, match="is on meta"):
        call(in_gates=[Gate(torch.zeros(K, device="meta"), 1)])
    with pytest.raises(ValueError, match="is on meta"):
        call(bias=torch.zeros(N, device="meta"))
    with pytest.raises(ValueError, match="weight has shape"):
        call(weight=torch.randn(N, K + 1, device=device))
    with pytest.raises(ValueError, match="weight has shape"):
        call(weight=w, weight_layout="in_out")
    with pytest.raises(ValueError, match="unknown weight_layout"):
        call(weight_layout="transposed")
    with pytest.raises(ValueError, match="non-finite"):
        call(in_gates=[Gate(torch.tensor([float("inf")] * K, device=device), 1)])
    with pytest.raises(ValueError, match="at most 4"):
        call(in_gates=[Gate(torch.zeros(1, device=device), K)] * 5)
    with pytest.raises(ValueError, match="requires grad"):
        call(x_ablate=torch.zeros(K, device=device, requires_grad=True))
    with pytest.raises(ValueError, match="x_ablate must be"):
        call(x_ablate=torch.zeros(2, K, device=device))
    with pytest.raises(ValueError, match="y_ablate must be"):
        call(y_ablate=torch.zeros(K, device=device))
    with pytest.raises(ValueError, match="bias must have shape"):
        call(bias=torch.zeros(K, device=device))
    with pytest.raises(ValueError, match="1-D"):
        call(in_gates=[Gate(torch.zeros(1, K, device=device), 1)])
    with pytest.raises(ValueError, match="group"):
        call(in_gates=[Gate(la_n, 0)])
    with pytest.raises(TypeError, match="sequence of Gate"):
        call(in_gates=Gate(la_n, 1))
    with pytest.raises(ValueError, match="seed"):
        call(seed=-3)


def test_triton_rejects_float64_and_cpu_without_interpreter(monkeypatch, device):
    x = torch.randn(3, K, dtype=torch.float64, device=device)
    w = torch.randn(N, K, dtype=torch.float64, device=device)
    with pytest.raises(TypeError, match="backend='reference'"):
        masked_linear(x, w, backend="triton")
    if device == "cpu":
        monkeypatch.setenv("TRITON_INTERPRET", "0")
        with pytest.raises(RuntimeError, match="CUDA"):
            masked_linear(x.float(), w.float(), backend="triton")


@pytest.mark.parametrize("la_dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("layout", ["out_in", "in_out"])
@pytest.mark.parametrize("training", [True, False])
def test_native_float64(la_dtype, layout, training):
    """float64 runs on the native kernels (Triton refuses it): output and gradients against the reference."""
    torch.manual_seed(zlib.crc32(f"{la_dtype}-{layout}-{training}".encode()))
    x, w, b, x_ablate = make_inputs(torch.float64, "cpu", lead=(3, 5), layout=layout, ablation="interchange",
                                    noncontig=True)
    in_gates, out_gates = make_gates("LBHno", K, N, "cpu")
    cast = (lambda gs: [Gate(g.log_alpha.detach().to(la_dtype).requires_grad_(), g.group, g.offset) for g in gs])
    in_gates, out_gates = cast(in_gates), cast(out_gates)
    check_against_reference(x, w, b, in_gates, out_gates, x_ablate, layout, "native", training=training)
    with pytest.raises(TypeError, match="backend='reference'"):
        masked_linear(x, w, b, in_gates=in_gates, out_gates=out_gates, x_ablate=x_ablate, weight_layout=layout,
                      backend="triton")


def test_autocast_follows_f_linear(fused, device):
    """fp32 x and weight under bf16 autocast: computed and returned in bf16, as F.linear is."""
    torch.manual_seed(9)
    x = torch.randn(3, K, device=device, requires_grad=True)
    w = torch.randn(N, K, device=device) / K**0.5
    in_gates, out_gates = make_gates("Hno", K, N, device)
    with torch.autocast(torch.device(device).type, dtype=torch.bfloat16):
        y = masked_linear(x, w, in_gates=in_gates, out_gates=out_gates, training=False, backend=fused)
        y_ref = masked_linear(x.detach().bfloat16(), w.bfloat16(), in_gates=in_gates, out_gates=out_gates,
                              training=False, backend="reference")
        assert F.linear(x, w).dtype == torch.bfloat16
    assert y.dtype == torch.bfloat16
    assert rel_err(y.float(), y_ref.float()) < 0.02
    y.float().sum().backward()
    assert x.grad.dtype == torch.float32 and torch.isfinite(x.grad).all()

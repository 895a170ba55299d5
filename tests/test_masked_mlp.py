import warnings
import zlib

import pytest
import torch
import torch.nn.functional as F

from helpers import assert_output_and_grads, gates64, rel_err, to64
from nodeprune_kernels import Gate, masked_mlp
from nodeprune_kernels.ops.masked_mlp import masked_mlp_reference
from nodeprune_kernels.utils.memory import SavedTensorBytes

DTYPES = [torch.float32, torch.float16, torch.bfloat16]
D, FF, NB = 40, 72, 8  # odd sizes: d_model, d_ff, blocks of hidden units (group 9) for a mid level
# (activation, gated): SwiGLU (Llama, Mistral, Qwen), GeGLU tanh (Gemma) and exact, GPT-2, GPT-NeoX, ReLU
MLPS = [("silu", True), ("gelu_tanh", True), ("gelu", True), ("gelu_tanh", False), ("gelu", False),
        ("relu", False)]
ABLATIONS = ["zero", "mean", "interchange", "interchange_cached", "hidden"]


def make_mlp(dtype, device, gated=True, layout="out_in", bias=True):
    def w(n_out, n_in):
        t = torch.randn(n_out, n_in, device=device) / n_in**0.5
        return (t if layout == "out_in" else t.t().contiguous()).to(dtype)

    def v(n):
        return (torch.randn(n, device=device) * 0.1).to(dtype) if bias else None

    return dict(up_weight=w(FF, D), down_weight=w(D, FF), gate_weight=w(FF, D) if gated else None, up_bias=v(FF),
                gate_bias=v(FF) if gated else None, down_bias=v(D))


def make_gates(spec, device, scale=1.5):
    """'L' layer, 'B' mlp block, 'b' a mid level (blocks of 9 units), 'n' mlp_neuron, 'o' mlp_out.

    log_alpha ~ N(1, 1.5^2): most gates open or in between, so that a block gate's gradient (a sum over all
    units and tokens) is not mostly cancellation, which no fp32 sum could resolve to 1e-4."""
    levels = {"L": (1, FF), "B": (1, FF), "b": (NB, FF // NB), "n": (FF, 1), "o": (D, 1)}
    in_gates, out_gates, offset = [], [], 0
    for c in spec:
        n, group = levels[c]
        la = (torch.randn(n, device=device) * scale + 1.0).requires_grad_()
        (out_gates if c == "o" else in_gates).append(Gate(la, group, offset))
        offset += n
    return in_gates, out_gates


def ablation_kwargs(ablation, x, dtype, device):
    lead = x.shape[:-1]
    if ablation == "mean":
        return dict(hidden_ablate=torch.randn(FF, device=device).to(dtype))
    if ablation == "hidden":
        return dict(hidden_ablate=torch.randn(*lead, FF, device=device).to(dtype))
    if ablation.startswith("interchange"):
        return dict(x_corrupt=torch.randn(*lead, D, device=device).to(dtype),
                    cache_corrupt_hidden=ablation.endswith("cached"))
    return {}


def check_against_reference(x, mlp, activation, in_gates, out_gates, abl, fused, layout="out_in", training=True,
                            seed=11):
    kw = dict(activation=activation, seed=seed, training=training, weight_layout=layout, **abl)
    y = masked_mlp(x, **mlp, in_gates=in_gates, out_gates=out_gates, backend=fused, **kw)
    assert y.shape == x.shape
    g64 = [gates64(in_gates), gates64(out_gates)]
    x64 = to64(x).requires_grad_()
    kw64 = {k: to64(v) if isinstance(v, torch.Tensor) else v for k, v in kw.items()}
    mlp64 = {k: to64(v) for k, v in mlp.items()}
    y_ref = masked_mlp_reference(x64, **mlp64, in_gates=g64[0], out_gates=g64[1], **kw64)
    leaves = [x] + [g.log_alpha for g in in_gates + out_gates]
    leaves64 = [x64] + [g.log_alpha for g in g64[0] + g64[1]]
    names = ["dx"] + [f"d log_alpha[{i}]" for i in range(len(leaves) - 1)]
    y_eager = None
    if x.dtype in (torch.float16, torch.bfloat16):  # 16-bit: also allow what eager PyTorch itself gets (x2)
        y_eager = masked_mlp_reference(x, **mlp, in_gates=in_gates, out_gates=out_gates, **kw)
    assert_output_and_grads(y, y_ref, leaves, leaves64, x.dtype, names, y_eager=y_eager)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("activation,gated", MLPS)
@pytest.mark.parametrize("ablation", ABLATIONS)
def test_matches_reference(dtype, activation, gated, ablation, fused, device):
    torch.manual_seed(zlib.crc32(f"{dtype}-{activation}-{gated}-{ablation}".encode()))
    x = torch.randn(2, 9, D, device=device).to(dtype).requires_grad_()
    mlp = make_mlp(dtype, device, gated)
    in_gates, out_gates = make_gates("LBbno", device)
    check_against_reference(x, mlp, activation, in_gates, out_gates, ablation_kwargs(ablation, x, dtype, device),
                            fused)


@pytest.mark.parametrize("gates", ["L", "B", "b", "n", "o", "no"])
@pytest.mark.parametrize("ablation", ["zero", "interchange"])
def test_each_gate_level_alone(gates, ablation, fused, device):
    torch.manual_seed(zlib.crc32(f"{gates}-{ablation}".encode()))
    x = torch.randn(3, 7, D, device=device).requires_grad_()
    mlp = make_mlp(torch.float32, device)
    in_gates, out_gates = make_gates(gates, device)
    check_against_reference(x, mlp, "silu", in_gates, out_gates,
                            ablation_kwargs(ablation, x, torch.float32, device), fused)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("layout", ["out_in", "in_out"])
@pytest.mark.parametrize("training", [True, False])
def test_layouts_strides_and_modes(dtype, layout, training, fused, device):
    """Conv1D ([in, out]) weights, a non-contiguous input, no biases, deterministic gates."""
    torch.manual_seed(zlib.crc32(f"{dtype}-{layout}-{training}".encode()))
    x = torch.randn(3, 5, 2 * D, device=device).to(dtype)[..., ::2].requires_grad_()
    mlp = make_mlp(dtype, device, gated=layout == "out_in", layout=layout, bias=training)
    in_gates, out_gates = make_gates("bno", device)
    abl = ablation_kwargs("interchange", x, dtype, device)
    abl["x_corrupt"] = abl["x_corrupt"].transpose(0, 1).contiguous().transpose(0, 1)  # strided corrupted input
    check_against_reference(x, mlp, "gelu_tanh", in_gates, out_gates, abl, fused, layout=layout, training=training)


@pytest.mark.parametrize("lead", [(), (1,), (130,), (2, 1, 3)])
def test_leading_dims(lead, fused, device):
    """Including 130 tokens: several row tiles, whose partial gate sums are reduced."""
    torch.manual_seed(2)
    x = torch.randn(*lead, D, device=device).requires_grad_()
    in_gates, out_gates = make_gates("Bno", device)
    check_against_reference(x, make_mlp(torch.float32, device), "silu", in_gates, out_gates,
                            ablation_kwargs("mean", x, torch.float32, device), fused)


def test_empty_batch(fused, device):
    x = torch.randn(0, D, device=device, requires_grad=True)
    in_gates, out_gates = make_gates("no", device)
    y = masked_mlp(x, **make_mlp(torch.float32, device), in_gates=in_gates, out_gates=out_gates, backend=fused)
    assert y.shape == (0, D)
    grads = torch.autograd.grad(y.sum(), [x, in_gates[0].log_alpha, out_gates[0].log_alpha])
    assert grads[0].shape == (0, D) and all(torch.all(g == 0) for g in grads[1:])


def eager_mlp(x, p, activation):
    """The unmasked MLP computed the ordinary way (nn.Linear-style weights)."""
    act = {"silu": F.silu, "gelu": F.gelu, "gelu_tanh": lambda t: F.gelu(t, approximate="tanh"), "relu": F.relu}
    if p["gate_weight"] is None:
        h = act[activation](F.linear(x, p["up_weight"], p["up_bias"]))
    else:
        h = act[activation](F.linear(x, p["gate_weight"], p["gate_bias"])) * F.linear(x, p["up_weight"], p["up_bias"])
    return F.linear(h, p["down_weight"], p["down_bias"])


@pytest.mark.parametrize("activation,gated", [("silu", True), ("gelu_tanh", False)])
def test_open_gates_equal_the_unmasked_mlp(activation, gated, fused, device):
    torch.manual_seed(3)
    x = torch.randn(4, 6, D, device=device)
    mlp = make_mlp(torch.float32, device, gated)
    open_ = [Gate(torch.full((FF,), 20.0, device=device), 1)]
    y = masked_mlp(x, **mlp, activation=activation, in_gates=open_, training=False, backend=fused)
    torch.testing.assert_close(y, eager_mlp(x, mlp, activation), atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("activation,gated", [("silu", True), ("gelu", False)])
def test_closed_gates_zero_down_weight_columns_and_rows(activation, gated, fused, device):
    """Zero ablation, deterministic gates: a closed unit or block is a zeroed column of W_down, a closed
    output feature a zeroed row (the bias stays)."""
    torch.manual_seed(4)
    x = torch.randn(4, 6, D, device=device)
    mlp = make_mlp(torch.float32, device, gated)
    block = torch.full((NB,), 20.0, device=device)
    block[3] = -20.0
    unit = torch.full((FF,), 20.0, device=device)
    unit[[0, 10, 71]] = -20.0
    out = torch.full((D,), 20.0, device=device)
    out[[1, 39]] = -20.0
    y = masked_mlp(x, **mlp, activation=activation, in_gates=[Gate(block, FF // NB), Gate(unit, 1, NB)],
                   out_gates=[Gate(out, 1)], training=False, backend=fused)
    cut = dict(mlp, down_weight=mlp["down_weight"].clone())
    cut["down_weight"][:, 3 * (FF // NB):4 * (FF // NB)] = 0
    cut["down_weight"][:, [0, 10, 71]] = 0
    cut["down_weight"][[1, 39], :] = 0
    torch.testing.assert_close(y, eager_mlp(x, cut, activation), atol=1e-5, rtol=1e-5)


def test_closed_block_under_interchange_gives_the_corrupted_output(fused, device):
    torch.manual_seed(5)
    x, xc = torch.randn(2, 5, D, device=device), torch.randn(2, 5, D, device=device)
    mlp = make_mlp(torch.float32, device)
    closed = [Gate(torch.full((1,), -20.0, device=device), FF)]
    y = masked_mlp(x, **mlp, in_gates=closed, x_corrupt=xc, training=False, backend=fused)
    torch.testing.assert_close(y, eager_mlp(xc, mlp, "silu"), atol=1e-5, rtol=1e-5)


def on_cpu(gates):
    return [Gate(g.log_alpha.cpu(), g.group, g.offset) for g in gates]


def test_backends_draw_identical_gates(device):
    torch.manual_seed(6)
    x = torch.randn(5, D, device=device)
    mlp = make_mlp(torch.float32, device)
    in_gates, out_gates = make_gates("bno", device)
    for seed in (0, 9, 2**40):
        ys = [masked_mlp(x, **mlp, in_gates=in_gates, out_gates=out_gates, seed=seed, backend=be)
              for be in ("triton", "reference")]
        assert rel_err(ys[0], ys[1].double()) < 1e-5
        mlp_cpu = {k: None if v is None else v.cpu() for k, v in mlp.items()}
        y_native = masked_mlp(x.cpu(), **mlp_cpu, in_gates=on_cpu(in_gates), out_gates=on_cpu(out_gates), seed=seed,
                              backend="native")
        assert rel_err(y_native, ys[1].cpu().double()) < 1e-5
        assert rel_err(y_native, ys[0].cpu().double()) < 1e-5


def test_weight_and_bias_grads_slow_path(fused, device):
    torch.manual_seed(7)
    x = torch.randn(3, 4, D, device=device, requires_grad=True)
    mlp = make_mlp(torch.float32, device)
    for name in ("up_weight", "gate_bias", "down_weight", "down_bias"):
        mlp[name].requires_grad_()
    in_gates, out_gates = make_gates("bno", device)
    kw = dict(in_gates=in_gates, out_gates=out_gates, x_corrupt=torch.randn(3, 4, D, device=device), seed=3)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        y = masked_mlp(x, **mlp, backend=fused, **kw)
    y_ref = masked_mlp_reference(x, **mlp, **kw)
    leaves = [x] + [mlp[n] for n in ("up_weight", "gate_bias", "down_weight", "down_bias")]
    dy = torch.randn_like(y)
    for a, r in zip(torch.autograd.grad(y, leaves, dy), torch.autograd.grad(y_ref, leaves, dy)):
        assert rel_err(a, r) < 2e-5


def test_reference_gradcheck():
    torch.manual_seed(8)
    x = torch.randn(3, 6, dtype=torch.float64, requires_grad=True)
    p = {k: (torch.randn(*s, dtype=torch.float64) * 0.5) for k, s in
         (("up_weight", (8, 6)), ("gate_weight", (8, 6)), ("down_weight", (6, 8)))}
    xc = torch.randn(3, 6, dtype=torch.float64)
    la = [torch.randn(n, dtype=torch.float64, requires_grad=True) for n in (2, 8, 6)]

    def f(x, l0, l1, l2):
        return masked_mlp_reference(x, **p, activation="gelu_tanh", in_gates=[Gate(l0, 4), Gate(l1, 1, 2)],
                                    out_gates=[Gate(l2, 1, 10)], x_corrupt=xc, seed=2)

    assert torch.autograd.gradcheck(f, (x, *la))


# ---------------------------------------------------------------------------------------------------------
# Memory: what the fused MLP saves for backward, exactly, against the unmasked frozen MLP


def _saved(fn, ignore):
    with SavedTensorBytes(ignore=ignore) as saved:
        fn()
    return saved


@pytest.mark.parametrize("activation,gated", [("silu", True), ("gelu_tanh", False)])
@pytest.mark.parametrize("ablation", ["zero", "mean", "interchange", "interchange_cached"])
def test_saved_bytes(activation, gated, ablation, fused, device):
    """Gated: g and u only; non-gated: the pre-activation only; plus the ablation input (a [d_ff] mean, or
    the corrupted d_model input; d_ff more with the cache) and the gate parameters."""
    dtype, lead = torch.bfloat16, (4, 33)
    M, item = 4 * 33, 2
    x = torch.randn(*lead, D, device=device).to(dtype).requires_grad_()
    mlp = make_mlp(dtype, device, gated)
    params = [p for p in mlp.values() if p is not None]
    in_gates, out_gates = make_gates("LBbno", device)
    las = [g.log_alpha for g in in_gates + out_gates]
    abl = ablation_kwargs(ablation, x, dtype, device)
    saved = _saved(lambda: masked_mlp(x, **mlp, activation=activation, in_gates=in_gates, out_gates=out_gates,
                                      backend=fused, **abl), params)
    frozen = _saved(lambda: eager_mlp(x, mlp, activation), params)
    gate_bytes = sum(la.untyped_storage().nbytes() for la in las)
    per_token = (2 if gated else 1) * FF * item
    assert frozen.bytes >= M * per_token  # the ordinary MLP keeps at least the pre-activations too
    extra = {"zero": 0, "mean": FF * item, "interchange": M * D * item,
             "interchange_cached": M * FF * item}[ablation]
    assert saved.bytes == M * per_token + extra + gate_bytes, saved.tensors
    if ablation in ("zero", "mean"):
        assert saved.bytes <= frozen.bytes + extra + gate_bytes
    # the eager masked MLP (the reference, as written with hooks) keeps more
    eager = _saved(lambda: masked_mlp(x, **mlp, activation=activation, in_gates=in_gates, out_gates=out_gates,
                                      backend="reference", **abl), params)
    assert eager.bytes > saved.bytes


# ---------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("backend", ["triton", "native", "reference"])
def test_bad_inputs_get_clear_errors(backend, device):
    x = torch.randn(3, D, device=device)
    mlp = make_mlp(torch.float32, device)

    def call(**kw):
        args = dict(mlp, backend=backend)
        args.update(kw)
        return masked_mlp(args.pop("x", x), args.pop("up_weight"), args.pop("down_weight"), **args)

    with pytest.raises(ValueError, match="unknown MLP activation 'tanh'.*silu"):
        call(activation="tanh")
    with pytest.raises(ValueError, match="down_weight has shape"):
        call(down_weight=mlp["down_weight"].t())
    with pytest.raises(ValueError, match="gate_weight has shape"):
        call(gate_weight=mlp["gate_weight"][:, :-1])
    with pytest.raises(ValueError, match="up_weight has shape|down_weight has shape"):
        call(x=torch.randn(3, D + 1, device=device))
    with pytest.raises(TypeError, match="up_bias is torch.float16"):
        call(up_bias=mlp["up_bias"].half())
    with pytest.raises(ValueError, match="down_bias must have shape"):
        call(down_bias=torch.zeros(FF, device=device))
    with pytest.raises(ValueError, match="gate_bias without gate_weight"):
        call(gate_weight=None)
    with pytest.raises(ValueError, match="not both"):
        call(hidden_ablate=torch.zeros(FF, device=device), x_corrupt=torch.zeros_like(x))
    with pytest.raises(ValueError, match="hidden_ablate must have shape"):
        call(hidden_ablate=torch.zeros(D, device=device))
    with pytest.raises(ValueError, match="x_corrupt must have shape"):
        call(x_corrupt=torch.zeros(2, D, device=device))
    with pytest.raises(ValueError, match="requires grad"):
        call(x_corrupt=torch.zeros_like(x, requires_grad=True))
    with pytest.raises(ValueError, match="needs x_corrupt"):
        call(cache_corrupt_hidden=True)
    with pytest.raises(ValueError, match="tile the feature dimension"):
        call(in_gates=[Gate(torch.zeros(D, device=device), 1)])  # d_model gates on d_ff units
    with pytest.raises(ValueError, match="tile the feature dimension"):
        call(out_gates=[Gate(torch.zeros(FF, device=device), 1)])
    with pytest.raises(ValueError, match="unknown weight_layout"):
        call(weight_layout="KN")
    with pytest.raises(ValueError, match="2-D"):
        call(up_weight=mlp["up_weight"][None])


def test_activation_aliases_are_the_same_function(fused, device):
    x = torch.randn(2, D, device=device)
    mlp = make_mlp(torch.float32, device, gated=False)
    ys = [masked_mlp(x, **mlp, activation=a, backend=fused) for a in ("gelu_new", "gelu_pytorch_tanh")]
    torch.testing.assert_close(ys[0], ys[1])
    torch.testing.assert_close(ys[0], eager_mlp(x, mlp, "gelu_tanh"), atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("activation,gated", MLPS)
@pytest.mark.parametrize("ablation", ["zero", "interchange_cached", "hidden"])
def test_native_float64(activation, gated, ablation):
    """float64 runs on the native kernels (Triton refuses it): output and gradients against the reference."""
    torch.manual_seed(zlib.crc32(f"f64-{activation}-{gated}-{ablation}".encode()))
    x = torch.randn(2, 9, D, dtype=torch.float64).requires_grad_()
    mlp = make_mlp(torch.float64, "cpu", gated)
    in_gates, out_gates = make_gates("LBbno", "cpu")
    abl = ablation_kwargs(ablation, x, torch.float64, "cpu")
    check_against_reference(x, mlp, activation, in_gates, out_gates, abl, "native")
    with pytest.raises(TypeError, match="backend='reference'"):
        masked_mlp(x, **mlp, activation=activation, in_gates=in_gates, out_gates=out_gates, backend="triton", **abl)

"""The fused ops under torch.compile: one graph (fullgraph=True), forward and backward, equal to eager.

On the Triton and native backends (the ``fused`` fixture: every test runs on both) every public op is a torch
custom op (namespace ``nodeprune``) whose backward is a second custom op, so dynamo traces a call without a
graph break and AOTAutograd traces the backward on fake tensors without launching a kernel. Compiled with
backend="aot_eager" and compared with the same calls made eagerly; on Triton the launch recorder shows that
the compiled forward and backward ran the fused kernels (on native, that no Triton kernel ran). Tiny
shapes: in the interpreter every program instance costs ~1.7 ms.
"""
import os
import subprocess
import sys
import warnings

import pytest
import torch
from torch._dynamo.backends.debugging import aot_eager, boxed_nop

from helpers import rel_err
from nodeprune_kernels import Gate, gate_noise, hard_concrete, masked_attn_out_proj, masked_linear, masked_mlp
from nodeprune_kernels.utils.launch import record_launches
from nodeprune_kernels.utils.memory import SavedTensorBytes

GEMM, LEVEL_GRAD = "_gated_matmul_kernel", "_gate_level_grad_kernel"


@pytest.fixture(autouse=True)
def _fresh_dynamo():
    torch._dynamo.reset()
    yield
    torch._dynamo.reset()


def randn(*shape, device, scale=1.0, grad=False):
    return (torch.randn(*shape, device=device) * scale).requires_grad_(grad)


def gate_params(*sizes, device):
    """log_alphas ~ N(0.5, 0.5^2): no deterministic gate is clamped (|log_alpha| < 2.4), so with
    ``training=False`` every level has a non-zero gradient."""
    return [randn(n, device=device, scale=0.5).add(0.5).requires_grad_() for n in sizes]


def check_compiled(fn, leaves, fused, calls=((),), fwd_kernel=GEMM, bwd_kernels=(GEMM, LEVEL_GRAD), tol=0.0):
    """``fn(*leaves, *extra)`` for each ``extra`` in ``calls``, compiled (fullgraph, aot_eager), against the
    same call made eagerly (``fn``'s backend is ``fused``): the output and the gradient of every leaf for one
    random dy. ``tol``: relative
    and absolute tolerance (0: the same kernels on the same inputs give the same bits).

    Also against ``fn(..., backend="reference")`` (plain PyTorch, float32), so that a wrong op fails here
    too; and each leaf's gradient must be non-zero in at least one call (a sampled gate may be clamped,
    and then its gradient is zero)."""
    compiled = torch.compile(fn, fullgraph=True, backend="aot_eager")
    nonzero = [False] * len(leaves)
    for extra in calls:
        with record_launches() as fwd:
            y = compiled(*leaves, *extra)
        dy = torch.randn_like(y)
        with record_launches() as bwd:
            grads = torch.autograd.grad(y, leaves, dy)
        if fused == "triton":
            assert fwd_kernel in {r.name for r in fwd}, "the compiled forward did not run the fused kernels"
            assert set(bwd_kernels) <= {r.name for r in bwd}, "the compiled backward did not run the fused kernels"
        else:  # the native kernels launch nothing through the Triton launcher
            assert not fwd and not bwd, f"Triton kernels ran on the native backend: {fwd + bwd}"
        y_eager = fn(*leaves, *extra)
        grads_eager = torch.autograd.grad(y_eager, leaves, dy)
        y_ref = fn(*leaves, *extra, backend="reference")
        grads_ref = torch.autograd.grad(y_ref, leaves, dy)
        torch.testing.assert_close(y, y_eager, rtol=tol, atol=tol)
        assert rel_err(y, y_ref) < 1e-5
        for i, (g, g_eager, g_ref) in enumerate(zip(grads, grads_eager, grads_ref)):
            torch.testing.assert_close(g, g_eager, rtol=tol, atol=tol, msg=lambda m: f"gradient of leaf {i}: {m}")
            assert rel_err(g, g_ref) < 1e-4, f"gradient of leaf {i} against the reference"
            nonzero[i] |= bool(g_ref.abs().sum() > 0)
    assert all(nonzero), f"a zero gradient in every call would hide a wrong one: {nonzero}"


# ---------------------------------------------------------------------------------------------------------
# masked_linear, masked_attn_out_proj


K, N, H = 12, 10, 3


@pytest.mark.parametrize("ablation,layout", [("mean", "out_in"), ("interchange", "in_out")])
def test_masked_linear(ablation, layout, fused, device):
    torch.manual_seed(0)
    x = randn(2, 3, K, device=device, grad=True)
    w = randn(N, K, device=device, scale=K**-0.5)
    w = w if layout == "out_in" else w.t().contiguous()
    b = randn(N, device=device)
    x_ablate = randn(K, device=device) if ablation == "mean" else randn(2, 3, K, device=device)
    las = gate_params(1, H, K, N, device=device)

    def fn(x, l_layer, l_head, l_neuron, l_out, seed, training, backend=fused):
        in_gates = [Gate(l_layer, K), Gate(l_head, K // H, 1), Gate(l_neuron, 1, 1 + H)]
        y = masked_linear(x, w, b, in_gates=in_gates, out_gates=[Gate(l_out, 1, 1 + H + K)], x_ablate=x_ablate,
                          seed=seed, training=training, weight_layout=layout, backend=backend)
        return y * 2.0  # an op after the custom op: its backward feeds the custom op's backward

    # a second seed recompiles with the seed as a dynamic int (SymInt), up to 2**63 - 1
    check_compiled(fn, [x, *las], fused, calls=[(5, True), (2**63 - 1, True), (0, False)])


def test_masked_linear_without_gates(fused, device):
    """Empty gate stacks: empty lists of log_alphas, groups and offsets in the custom op's arguments."""
    torch.manual_seed(1)
    x = randn(4, K, device=device, grad=True)
    w = randn(N, K, device=device)
    y_ablate = randn(4, N, device=device)

    def fn(x, backend=fused):
        return masked_linear(x, w, y_ablate=y_ablate, backend=backend)

    check_compiled(fn, [x], fused, bwd_kernels=(GEMM,))


def test_masked_attn_out_proj_reads_the_transposed_attention_output(fused, device):
    """SDPA's [B, H, S, D] output goes in as .transpose(1, 2) inside the compiled function, uncopied."""
    torch.manual_seed(2)
    B, S, HD = 2, 3, 4
    o = randn(B, H, S, HD, device=device, grad=True)
    o_corrupt = randn(B, H, S, HD, device=device).transpose(1, 2)
    w = randn(N, H * HD, device=device, scale=(H * HD) ** -0.5)
    b = randn(N, device=device)
    las = gate_params(H, H * HD, N, device=device)

    def fn(o, l_head, l_neuron, l_out, training, backend=fused):
        return masked_attn_out_proj(o.transpose(1, 2), w, b, in_gates=[Gate(l_head, HD), Gate(l_neuron, 1, H)],
                                    out_gates=[Gate(l_out, 1, H + H * HD)], x_ablate=o_corrupt, seed=9,
                                    training=training, backend=backend)

    check_compiled(fn, [o, *las], fused, calls=[(True,), (False,)])


# ---------------------------------------------------------------------------------------------------------
# masked_mlp


D, FF = 8, 12


@pytest.mark.parametrize("ablation", ["zero", "interchange", "interchange_cached"])
def test_masked_mlp_silu_gated(ablation, fused, device):
    torch.manual_seed(3)
    x = randn(2, 3, D, device=device, grad=True)
    up, gate = randn(FF, D, device=device, scale=D**-0.5), randn(FF, D, device=device, scale=D**-0.5)
    down, down_b = randn(D, FF, device=device, scale=FF**-0.5), randn(D, device=device, scale=0.1)
    abl = {} if ablation == "zero" else dict(x_corrupt=randn(2, 3, D, device=device),
                                            cache_corrupt_hidden=ablation.endswith("cached"))
    las = gate_params(3, FF, D, device=device)

    def fn(x, l_block, l_unit, l_out, seed, training, backend=fused):
        return masked_mlp(x, up, down, gate_weight=gate, down_bias=down_b, activation="silu",
                          in_gates=[Gate(l_block, FF // 3), Gate(l_unit, 1, 3)], out_gates=[Gate(l_out, 1, 3 + FF)],
                          seed=seed, training=training, backend=backend, **abl)

    check_compiled(fn, [x, *las], fused, calls=[(7, True), (8, True), (7, False)])


def test_masked_mlp_non_gated_mean_ablation(fused, device):
    torch.manual_seed(4)
    x = randn(5, D, device=device, grad=True)
    up, down = randn(D, FF, device=device), randn(FF, D, device=device)  # GPT-2 Conv1D layout
    mean = randn(FF, device=device)
    (la,) = gate_params(FF, device=device)

    def fn(x, la, backend=fused):
        return masked_mlp(x, up, down, up_bias=mean, activation="gelu_new", in_gates=[Gate(la, 1)],
                          hidden_ablate=mean, weight_layout="in_out", training=False, backend=backend)

    check_compiled(fn, [x, la], fused)


# ---------------------------------------------------------------------------------------------------------
# hard_concrete, gate_noise


@pytest.mark.parametrize("training", [True, False])
def test_hard_concrete_and_gate_noise(training, fused, device):
    torch.manual_seed(5)
    la = randn(3, 7, device=device, scale=2.0, grad=True)

    def fn(la, seed, backend=fused):
        z = hard_concrete(la, seed=seed, offset=11, training=training, backend=backend)
        return z * (1.0 + gate_noise(la.numel(), seed=seed, offset=11, device=la.device, backend=backend).view(3, 7))

    check_compiled(fn, [la], fused, calls=[(1,), (2**40 + 3,)], fwd_kernel="_hard_concrete_fwd_kernel",
                   bwd_kernels=("_hard_concrete_bwd_kernel",))


# ---------------------------------------------------------------------------------------------------------
# weight gradients, non-finite gates, the graphs, import


def test_weight_and_bias_grads_are_traced_into_the_backward(fused, device):
    """Weights that require grad: the slow reference path of the backward is traced too (no fallback)."""
    torch.manual_seed(6)
    x = randn(2, 3, K, device=device, grad=True)
    w, b = randn(N, K, device=device, grad=True), randn(N, device=device, grad=True)
    up, down = randn(FF, K, device=device, grad=True), randn(K, FF, device=device)
    down_b = randn(K, device=device, grad=True)
    la, lm = randn(K, device=device, grad=True), randn(FF, device=device, grad=True)

    def fn(x, w, b, up, down_b, la, lm, seed, backend=fused):
        h = masked_linear(x, w, b, in_gates=[Gate(la, 1)], seed=seed, backend=backend)
        return masked_mlp(h.sum(-1, keepdim=True) * x, up, down, down_bias=down_b, activation="gelu",
                          in_gates=[Gate(lm, 1)], seed=seed, backend=backend)

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the slow path's one-time warning
        check_compiled(fn, [x, w, b, up, down_b, la, lm], fused, calls=[(2,), (3,)], tol=1e-5)


def test_non_finite_log_alpha_is_caught_at_run_time(fused, device):
    """A compiled graph cannot branch on values: the custom op checks the gate parameters when it runs."""
    x, w = randn(3, K, device=device), randn(N, K, device=device)
    compiled = torch.compile(lambda x, la: masked_linear(x, w, in_gates=[Gate(la, 1)], backend=fused),
                             fullgraph=True, backend="aot_eager")
    la = randn(K, device=device)
    compiled(x, la)
    la[4] = float("nan")
    with pytest.raises(ValueError, match="non-finite"):
        compiled(x, la)
    with pytest.raises(ValueError, match="non-finite"):
        torch.compile(lambda la: hard_concrete(la, seed=0, backend=fused), fullgraph=True,
                      backend="aot_eager")(la)


def test_compiled_saves_what_eager_saves(fused, device):
    """Saved for backward under torch.compile: the same bytes as eagerly. The attention output projection
    keeps a reference to the attention output (no copy); the MLP its pre-activations and the corrupted input."""
    torch.manual_seed(8)
    o = randn(2, H, 5, 4, device=device, grad=True)
    w = randn(N, H * 4, device=device)
    x, x_corrupt = randn(4, 5, D, device=device, grad=True), randn(4, 5, D, device=device)
    up, gate, down = randn(FF, D, device=device), randn(FF, D, device=device), randn(D, FF, device=device)
    l_head, l_unit = randn(H, device=device, grad=True), randn(FF, device=device, grad=True)

    def attn(o, l_head):
        return masked_attn_out_proj(o.transpose(1, 2), w, in_gates=[Gate(l_head, 4)], backend=fused)

    def mlp(x, l_unit):
        return masked_mlp(x, up, down, gate_weight=gate, in_gates=[Gate(l_unit, 1)], x_corrupt=x_corrupt,
                          backend=fused)

    for fn, args, ignore, expect in (
            (attn, (o, l_head), [w, o], l_head.nbytes),  # o itself is not counted: nothing else of token size
            (mlp, (x, l_unit), [up, gate, down], 2 * 4 * 5 * FF * 4 + x_corrupt.nbytes + l_unit.nbytes)):
        compiled = torch.compile(fn, fullgraph=True, backend="aot_eager")
        compiled(*args)
        for f in (fn, compiled):
            with SavedTensorBytes(ignore=ignore) as saved:
                y = f(*args)
            assert saved.bytes == expect, (fn.__name__, f is compiled, saved.tensors)
            y.sum().backward()


def recording_aot_eager(graphs):
    """aot_eager itself, keeping its forward and backward graphs in ``graphs["fw"]``, ``graphs["bw"]``."""
    def backend(gm, example_inputs):
        def keep(kind):
            def compiler(g, inputs):
                graphs[kind].append(g)
                return boxed_nop(g, inputs)
            return compiler
        return aot_eager(gm, example_inputs, fw_compiler=keep("fw"), bw_compiler=keep("bw"))
    return backend


def _ops(graph_modules):
    """The ops called in the graphs, as "namespace.name.overload"."""
    return [str(n.target) for gm in graph_modules for n in gm.graph.nodes
            if n.op == "call_function" and isinstance(n.target, torch._ops.OpOverload)]


def test_graphs_hold_the_custom_ops_and_no_copy_of_the_attention_output(fused, device):
    torch.manual_seed(7)
    o = randn(2, H, 3, 4, device=device, grad=True)
    w = randn(N, H * 4, device=device)
    x, up, down = randn(2, D, device=device, grad=True), randn(FF, D, device=device), randn(D, FF, device=device)
    l_head, l_unit = randn(H, device=device, grad=True), randn(FF, device=device, grad=True)

    def fn(o, x, l_head, l_unit):
        y = masked_attn_out_proj(o.transpose(1, 2), w, in_gates=[Gate(l_head, 4)], backend=fused)
        z = masked_mlp(x, up, down, gate_weight=up, in_gates=[Gate(l_unit, 1)], backend=fused)
        return y.sum() + z.sum() * hard_concrete(l_head, seed=1, backend=fused).sum()

    graphs = {"fw": [], "bw": []}
    torch.compile(fn, fullgraph=True, backend=recording_aot_eager(graphs))(o, x, l_head, l_unit).backward()
    fw, bw = _ops(graphs["fw"]), _ops(graphs["bw"])
    for op in ("masked_linear", "masked_mlp", "hard_concrete"):
        assert fw.count(f"nodeprune.{op}.default") == 1, fw
        assert bw.count(f"nodeprune.{op}_backward.default") == 1, bw
        assert f"nodeprune.{op}.default" not in bw, "the backward recomputes a forward op"
    copies = [t for t in fw if t.split(".")[1] in ("clone", "contiguous", "_to_copy", "copy", "copy_")]
    assert not copies, f"the forward copies a tensor: {copies}"


def test_import_leaves_triton_alone_and_a_first_call_may_be_compiled(fused, device):
    """Importing the package must not import triton (it reads TRITON_INTERPRET then); the custom ops are
    registered when a compiled function first calls an op."""
    code = (
        "import sys, torch, nodeprune_kernels as nk\n"
        "assert 'triton' not in sys.modules\n"
        f"la = torch.zeros(5, device='{device}', requires_grad=True)\n"
        f"f = torch.compile(lambda la: nk.hard_concrete(la, seed=1, backend='{fused}'), fullgraph=True, "
        "backend='aot_eager')\n"
        "f(la).sum().backward()\n"
        "assert la.grad is not None\n"
        # (on native, torch's own custom-op dispatch imports torch._dynamo, which imports triton when installed)
        + ("assert 'triton' in sys.modules\n" if fused == "triton" else "")
    )
    env = dict(os.environ, TRITON_INTERPRET="1" if device == "cpu" else "0")
    proc = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]


# ---------------------------------------------------------------------------------------------------------
# torch.library.opcheck: schema, fake implementation, autograd registration, AOT dispatch (dynamic shapes)


def _opcheck_cases(device, impl):
    torch.manual_seed(8)
    ops = torch.ops.nodeprune
    g = dict(device=device)
    x, w, b = randn(2, 3, K, **g, grad=True), randn(N, K, **g), randn(N, **g)
    las = [randn(n, **g, grad=True) for n in (H, K, N)]
    stack = [[K // H, 1], [0, H], [1], [H + K]]
    o = randn(2, H, 3, 4, **g, grad=True).transpose(1, 2)
    xm, up, down, gate = randn(2, D, **g, grad=True), randn(FF, D, **g), randn(D, FF, **g), randn(FF, D, **g)
    lm = [randn(n, **g, grad=True) for n in (FF, D)]
    mstack = [[1], [0], [1], [FF]]
    la = randn(2, 3, **g, grad=True)
    nograd = (lambda ts: [t.detach() for t in ts])
    return {
        "masked_linear": (ops.masked_linear.default,
                          (x, w, b, randn(K, **g), None, las, *stack, 3, True, True, 1, impl)),
        "masked_linear no gates": (ops.masked_linear.default,
                                   (x, w, None, None, randn(2, 3, N, **g), [], [], [], [], [], 0, False, True, 1,
                                    impl)),
        "masked_attn_out_proj": (ops.masked_linear.default,
                                 (o, w, None, o.detach() * 0.5, None, las[:2], [4, 1], [0, H], [], [], 3, True, True,
                                  2, impl)),
        "masked_linear_backward": (ops.masked_linear_backward.default,
                                   (randn(2, 3, N, **g), x.detach(), w, None, nograd(las), *stack, 3, True, True, 1,
                                    impl, True, [True, False, True])),
        "masked_mlp": (ops.masked_mlp.default,
                       (xm, up, down, gate, None, None, randn(D, **g), None, randn(2, D, **g), lm, *mstack, 4, True,
                        "silu", True, False, impl)),
        "masked_mlp cached": (ops.masked_mlp.default,
                              (xm, up, down, None, randn(FF, **g), None, None, None, randn(2, D, **g), lm, *mstack, 4,
                               False, "gelu_tanh", True, True, impl)),
        "masked_mlp_backward": (ops.masked_mlp_backward.default,
                                (randn(2, D, **g), randn(2, FF, **g), randn(2, FF, **g), up, down, gate, None, None,
                                 None, randn(2, D, **g), None, nograd(lm), *mstack, 4, True, "silu", True, False, impl,
                                 True, [True, True])),
        "hard_concrete": (ops.hard_concrete.default, (la, 3, 5, True, impl)),
        "hard_concrete_backward": (ops.hard_concrete_backward.default,
                                   (la.detach(), randn(2, 3, **g), 3, 5, False, impl)),
        "gate_noise": (ops.gate_noise.default, (6, 2**40, 7, torch.device(device), impl)),
    }


OPCHECK_CASES = ["masked_linear", "masked_linear no gates", "masked_attn_out_proj", "masked_linear_backward",
                 "masked_mlp", "masked_mlp cached", "masked_mlp_backward", "hard_concrete", "hard_concrete_backward",
                 "gate_noise"]


@pytest.mark.parametrize("case", OPCHECK_CASES)
def test_opcheck(case, fused, device):
    import nodeprune_kernels.ops.hard_concrete.function  # noqa: F401  (registers the custom ops)
    import nodeprune_kernels.ops.masked_linear.function  # noqa: F401
    import nodeprune_kernels.ops.masked_mlp.function  # noqa: F401

    op, args = _opcheck_cases(device, fused)[case]
    torch.library.opcheck(op, args)

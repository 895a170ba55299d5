"""The native CPU backend's build, loading and selection: what ``backend="auto"`` picks, the fallback when it
cannot be built, the ahead-of-time build, and thread-count independence. (Its numerics are tested with the
Triton kernels' tests, which run on both fused backends.)"""
import importlib.util
import os
import subprocess
import sys
import warnings
from pathlib import Path

import pytest
import torch

import nodeprune_kernels as npk
from nodeprune_kernels import Gate, masked_linear, masked_mlp
from nodeprune_kernels.ops.hard_concrete.reference import gate_uniform
from nodeprune_kernels.utils import backend as backend_mod
from nodeprune_kernels.utils import native

ROOT = Path(__file__).resolve().parent.parent
CPU = torch.device("cpu")


@pytest.fixture
def no_native(monkeypatch):
    """The native kernels as on a machine without a compiler (restored afterwards)."""
    saved = dict(native._STATE)
    native._reset_for_tests()
    monkeypatch.setenv("CXX", "no-such-compiler-npk")
    monkeypatch.setattr(native, "_aot_module", lambda: None)
    monkeypatch.setattr(backend_mod, "_WARNED", set())
    yield
    native._STATE.clear()
    native._STATE.update(saved)


def test_auto_picks_native_on_cpu_and_triton_in_the_interpreter(monkeypatch):
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    assert backend_mod.resolve_backend("auto", CPU) == "native"
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    assert backend_mod.resolve_backend("auto", CPU) == "triton"
    assert backend_mod.resolve_backend("native", CPU) == "native"


def test_native_on_a_cuda_tensor_says_what_to_do():
    with pytest.raises(RuntimeError, match="backend='native' runs on CPU tensors.*backend='triton'"):
        backend_mod.resolve_backend("native", torch.device("cuda"))


def test_without_a_compiler_auto_falls_back_with_one_warning(no_native, monkeypatch):
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    with pytest.warns(UserWarning, match="runs the plain-PyTorch reference because the native CPU kernels are "
                                         "unavailable: no C\\+\\+ compiler.*apt install g\\+\\+.*pip install ninja"):
        assert backend_mod.resolve_backend("auto", CPU) == "reference"
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # once per process
        x = torch.randn(3, 8)
        y = masked_linear(x, torch.randn(4, 8), in_gates=[Gate(torch.zeros(8), 1)], backend="auto")
        assert y.shape == (3, 4)
    with pytest.raises(native.NativeUnavailable, match="no C\\+\\+ compiler.*backend='reference' works everywhere"):
        masked_linear(x, torch.randn(4, 8), backend="native")
    assert not native.available() and "NODEPRUNE_BUILD_NATIVE=1" in native.unavailable_reason()


def test_a_failing_build_keeps_the_compiler_error(no_native, monkeypatch):
    import torch.utils.cpp_extension as ext

    monkeypatch.setenv("CXX", "c++")

    def broken(**kw):
        raise RuntimeError("Error building extension 'nodeprune_native'\nmasked_rows.cpp:1: error: boom")

    monkeypatch.setattr(ext, "load", broken)
    with pytest.raises(native.NativeUnavailable, match="building them failed .*error: boom"):
        native.load()


def test_threads_do_not_change_results():
    """Column sums are taken per fixed block of rows and added in order: bit-identical for any thread count."""
    g = torch.Generator().manual_seed(0)
    x = torch.randn(4, 300, 96, generator=g, requires_grad=True)
    up, gw, down = (torch.randn(*s, generator=g) * 0.1 for s in ((200, 96), (200, 96), (96, 200)))
    las = [torch.randn(n, generator=g).requires_grad_() for n in (200, 96)]

    def step():
        y = masked_mlp(x, up, down, gate_weight=gw, in_gates=[Gate(las[0], 1)], out_gates=[Gate(las[1], 1, 200)],
                       seed=3, backend="native")
        return [y.detach(), *torch.autograd.grad(y.square().sum(), [x, *las])]

    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        one = step()
        torch.set_num_threads(max(2, threads))
        many = step()
    finally:
        torch.set_num_threads(threads)
    for a, b in zip(one, many):
        assert torch.equal(a, b)


def test_native_pruning_matches_reference():
    """A whole pruning step on the native backend draws the reference's gates and gets its gradients."""
    from tiny_models import tiny_batch, tiny_model

    grads = {}
    for backend in ("reference", "native"):
        model = tiny_model("gpt2")
        masks = npk.apply_node_pruning(model, ablation="mean", backend=backend, seed=4)
        masks.estimate_means([{"input_ids": tiny_batch(seed=9)}])
        model(tiny_batch()).logits.square().mean().backward()
        grads[backend] = torch.cat([la.grad.flatten() for la in masks.log_alpha.values()])
    err = (grads["native"] - grads["reference"]).norm() / grads["reference"].norm()
    assert err < 1e-4, err


def test_ahead_of_time_build(tmp_path, monkeypatch):
    """``NODEPRUNE_BUILD_NATIVE=1 python setup.py build_ext`` builds nodeprune_kernels._native, which the
    loader prefers to the on-first-use build."""
    env = dict(os.environ, NODEPRUNE_BUILD_NATIVE="1", MAX_JOBS="2")
    proc = subprocess.run([sys.executable, "setup.py", "-q", "build_ext", "--build-lib", str(tmp_path / "lib"),
                           "--build-temp", str(tmp_path / "tmp")], cwd=ROOT, env=env, capture_output=True, text=True)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    (so,) = (tmp_path / "lib" / "nodeprune_kernels").glob("_native*.so")
    spec = importlib.util.spec_from_file_location("_native", so)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    out = torch.empty(1000)
    module.uniform(out, 2**40 + 5, 77)
    assert torch.equal(out, gate_uniform(2**40 + 5, 77 + torch.arange(1000)))

    saved = dict(native._STATE)
    native._reset_for_tests()
    monkeypatch.setattr(native, "_aot_module", lambda: module)
    try:
        assert native.load() is module
    finally:
        native._STATE.clear()
        native._STATE.update(saved)

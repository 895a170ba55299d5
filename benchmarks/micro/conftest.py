"""Shared set-up of the micro-benchmarks in benchmarks/micro/test_ops.py (how to run them: its docstring).

What this provides:

- ``cfg`` (session): the device, dtype, token count and size switches, read once from the environment:

  ``NODEPRUNE_BENCH_DEVICE``  ``cuda`` or ``cpu`` (default: ``cuda`` when a GPU is visible, else ``cpu``);
  ``NODEPRUNE_BENCH_TOKENS``  tokens per call (default 8192 on CUDA, 512 on CPU);
  ``NODEPRUNE_BENCH_LARGE``   ``1``: the Llama-sized shapes on the CPU too (default: on CUDA only);
  ``NODEPRUNE_BENCH_THREADS`` torch.set_num_threads for the run (default: torch's own choice). On a CPU shared
                              with other work, 1 gives steadier numbers: a parallel region waits for its
                              slowest thread, and a thread that lost its core costs a scheduler tick (ms).

  bfloat16 on CUDA, float32 on the CPU. ``cfg`` also builds the inputs: seeded generators, frozen tensors and
  weights, gate stacks.
- ``backend``: the backend an ``impl`` parameter ("reference", "fused" or "baseline") stands for. "fused" is
  the Triton kernels on CUDA and the native C++ kernels on the CPU. The Triton kernels are never run in
  Triton's interpreter here: a benchmark that asks for them without a GPU is skipped, with the reason. If the
  native extension cannot be built or loaded, the native cases fail (NativeUnavailable says why), they do not
  skip.
- ``measure``: times one forward + backward of the op (or of the unmasked baseline) with pytest-benchmark,
  after checking once that the fused output and gradients match the reference backend's.

This conftest is deliberately not tests/conftest.py, which sets TRITON_INTERPRET=1 without a GPU and fills
kernel outputs with NaN: pytest only reads conftest files in the directories of the paths it collects and
their parents, and benchmarks/micro shares no directory with tests/ below the repository root, which has no
conftest. (Collected in one run, ``pytest tests benchmarks/micro``, each conftest still governs its own
directory only; tests/conftest.py's TRITON_INTERPRET=1 is process-wide, but harmless here: "fused" on the CPU
is the native backend, named explicitly. Still, run the benchmarks on their own.)
"""
from __future__ import annotations

import os
import sys
import zlib
from dataclasses import dataclass

import pytest
import torch

from nodeprune_kernels import Gate

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from common import cpu_name  # noqa: E402  (benchmarks/common.py)
from nodeprune_kernels.utils.testing import rel_err

IMPLS = ("reference", "fused", "baseline")


@dataclass(frozen=True)
class Settings:
    device: str
    dtype: torch.dtype
    tokens: int
    large: bool  # the Llama-sized shapes are benchmarked
    device_name: str

    @property
    def cuda(self) -> bool:
        return self.device == "cuda"

    @property
    def fused(self) -> str:
        """The backend name of "fused" on this device."""
        return "triton" if self.cuda else "native"

    @staticmethod
    def generator(*key) -> torch.Generator:
        """A CPU generator seeded from ``key``: the same inputs for every implementation of a case."""
        return torch.Generator().manual_seed(zlib.crc32(repr(key).encode()))

    def randn(self, *shape, gen: torch.Generator, scale: float = 1.0) -> torch.Tensor:
        """A frozen N(0, scale^2) tensor on the device, in the benchmark dtype."""
        return (torch.randn(*shape, generator=gen) * scale).to(self.device, self.dtype)

    def weight(self, n_out: int, n_in: int, layout: str, gen: torch.Generator) -> torch.Tensor:
        """A frozen [n_out, n_in] ("out_in") or [n_in, n_out] ("in_out") weight, unit-variance outputs."""
        w = torch.randn(n_out, n_in, generator=gen) / n_in**0.5
        return (w if layout == "out_in" else w.t().contiguous()).to(self.device, self.dtype)

    def gates(self, levels, gen: torch.Generator, offset: int = 0):
        """(gates, next offset): one Gate per ``(n_gates, group)`` level, float32 log_alpha leaves requiring
        grad (N(1, 1.5^2): most gates open or in between, some clamped), on consecutive Philox ranges."""
        gates = []
        for n, group in levels:
            la = (torch.randn(n, generator=gen) * 1.5 + 1.0).to(self.device).requires_grad_()
            gates.append(Gate(la, group, offset))
            offset += n
        return gates, offset

    def require_large(self, what: str) -> None:
        """Skip a Llama-sized case unless those are benchmarked here."""
        if not self.large:
            pytest.skip(f"{what}: Llama-sized shapes run on CUDA, or on the CPU with NODEPRUNE_BENCH_LARGE=1")


def _flag(name: str) -> bool:
    return os.environ.get(name, "0").strip().lower() not in ("", "0", "false", "no")


def read_settings() -> Settings:
    device = os.environ.get("NODEPRUNE_BENCH_DEVICE") or ("cuda" if torch.cuda.is_available() else "cpu")
    if device not in ("cuda", "cpu"):
        raise pytest.UsageError(f"NODEPRUNE_BENCH_DEVICE must be 'cuda' or 'cpu', got {device!r}")
    cuda = device == "cuda"
    tokens = int(os.environ.get("NODEPRUNE_BENCH_TOKENS") or (8192 if cuda else 512))
    if tokens < 1:
        raise pytest.UsageError(f"NODEPRUNE_BENCH_TOKENS must be positive, got {tokens}")
    name = torch.cuda.get_device_name() if cuda and torch.cuda.is_available() else cpu_name()
    return Settings(device=device, dtype=torch.bfloat16 if cuda else torch.float32, tokens=tokens,
                    large=cuda or _flag("NODEPRUNE_BENCH_LARGE"), device_name=name)


@pytest.fixture(scope="session")
def cfg() -> Settings:
    threads = os.environ.get("NODEPRUNE_BENCH_THREADS")
    if threads:
        torch.set_num_threads(int(threads))
    return read_settings()


@pytest.fixture
def backend(request, cfg) -> str:
    """The backend string of the test's ``impl`` parameter: "reference", "triton"/"native", or "baseline"."""
    impl = request.getfixturevalue("impl")
    assert impl in IMPLS, impl
    if impl == "reference" or impl == "baseline":
        if cfg.cuda and not torch.cuda.is_available():
            pytest.skip("NODEPRUNE_BENCH_DEVICE=cuda but no CUDA GPU is visible")
        return impl
    if cfg.fused == "triton" and not torch.cuda.is_available():
        pytest.skip("the fused Triton kernels need a CUDA GPU (they are not benchmarked in Triton's interpreter); "
                    "without one the fused cases run the native CPU kernels: unset NODEPRUNE_BENCH_DEVICE")
    return cfg.fused


def _sync(cfg: Settings):
    return torch.cuda.synchronize if cfg.cuda else (lambda: None)


# fused against reference, same inputs and dtype: loose, to catch a wrong kernel (errors of order 1), not to
# grade rounding (the test suite does that against float64)
CHECK_TOL = {torch.float32: 1e-3, torch.bfloat16: 1e-1, torch.float16: 2e-2}


@pytest.fixture
def measure(benchmark, cfg, backend, request):
    """``measure(group, masked, leaves, *, baseline=None, baseline_leaves=(), info=None)`` benchmarks the test's
    implementation:

    - "reference" / "fused": ``y = masked(backend)`` and ``torch.autograd.grad(y, leaves, dy)``;
    - "baseline": ``y = baseline()`` and ``torch.autograd.grad(y, baseline_leaves, dy)``;

    with a fixed random ``dy`` (autograd.grad: no .grad accumulates between rounds) and, on CUDA, a
    synchronize before the timed call returns. "fused" is first checked once against "reference" (output and
    every gradient, loose tolerance), then every implementation runs once untimed (Triton compilation, the
    native build, allocator warm-up) before pytest-benchmark times it. ``group`` names the comparison group
    (reference, fused and baseline of one case share it); ``info`` goes into ``benchmark.extra_info`` with
    the device, dtype and implementation.
    """
    impl = request.getfixturevalue("impl")

    def run(group, masked, leaves, *, baseline=None, baseline_leaves=(), info=None):
        if impl == "baseline":
            assert baseline is not None, f"{group}: no baseline for this op"
            forward, wrt = baseline, list(baseline_leaves)
        else:
            forward, wrt = (lambda: masked(backend)), list(leaves)
        sync = _sync(cfg)
        y0 = forward()  # the first call (Triton compiles here); only its shape is kept, not its graph
        dy = torch.randn(y0.shape, generator=Settings.generator(group, "dy")).to(y0.device, y0.dtype)
        del y0

        def step():
            y = forward()
            grads = torch.autograd.grad(y, wrt, dy)
            sync()
            return y, grads

        if impl == "fused":
            _check_against_reference(group, step(), masked, leaves, dy)
        elif not benchmark.disabled:
            step()  # the untimed first call
        benchmark.group = group
        label = {"fused": f"fused ({backend})", "reference": "reference (eager masked)"}.get(impl, "baseline")
        benchmark.extra_info.update(dict(
            implementation=label, backend=backend, device=cfg.device, device_name=cfg.device_name,
            dtype=str(cfg.dtype).removeprefix("torch."), tokens=cfg.tokens, torch=torch.__version__,
            threads=torch.get_num_threads()), **(info or {}))
        benchmark(step)

    return run


def _check_against_reference(group, fused_result, masked, leaves, dy):
    y, grads = fused_result
    y_ref = masked("reference")
    grads_ref = torch.autograd.grad(y_ref, leaves, dy)
    tol = CHECK_TOL[y.dtype]
    names = ["output"] + [f"grad[{i}] ({tuple(t.shape)})" for i, t in enumerate(leaves)]
    for name, out, ref in zip(names, (y, *grads), (y_ref, *grads_ref)):
        assert out.shape == ref.shape, f"{group}: {name} shape {tuple(out.shape)} != {tuple(ref.shape)}"
        if ref.abs().max() == 0:
            assert torch.all(out == 0), f"{group}: {name} should be zero (every gate clamped)"
            continue
        err = rel_err(out, ref)
        assert err <= tol, f"{group}: fused {name} differs from the reference by {err:.3g} (> {tol:g})"

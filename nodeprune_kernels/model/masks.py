"""NodeMasks: the gates of a patched model, their modes, and the ablation values closed nodes take.

One log_alpha tensor per granularity (docs/design.md, sections 1 and 3), every gate with one global Philox
index (granularity, layer, position), laid out in the fixed order of ``GRANULARITIES`` over all
granularities, so a gate draws the same noise whichever other granularities are enabled, on every backend.
"""
from __future__ import annotations

import contextlib
import weakref
from typing import Iterable

import torch
from torch import nn

from ..ops.gate_stack import Gate
from ..ops.hard_concrete.reference import expected_l0_reference, hard_concrete_reference
from .families import Family, ModelDims

GRANULARITIES = ("layer", "attn", "head", "attn_neuron", "mlp", "mlp_neuron", "mlp_out")
ABLATIONS = ("zero", "mean", "interchange")
_CLOSED, _OPEN = -30.0, 30.0  # log_alphas whose deterministic gates are exactly 0 and 1


def check_granularities(granularities) -> tuple:
    """Validated granularities in canonical order."""
    if isinstance(granularities, str):
        granularities = (granularities,)
    granularities = tuple(granularities)
    unknown = [g for g in granularities if g not in GRANULARITIES]
    if unknown:
        raise ValueError(f"unknown granularit{'y' if len(unknown) == 1 else 'ies'} {', '.join(map(repr, unknown))}; "
                         f"choose from {', '.join(GRANULARITIES)}")
    if not granularities:
        raise ValueError(f"give at least one granularity from {', '.join(GRANULARITIES)}")
    return tuple(g for g in GRANULARITIES if g in granularities)


def gate_shapes(dims: ModelDims) -> dict:
    """The log_alpha shape of every granularity."""
    L, H, D = dims.n_layers, dims.n_heads, dims.head_dim
    return {"layer": (L,), "attn": (L,), "head": (L, H), "attn_neuron": (L, H * D), "mlp": (L,),
            "mlp_neuron": (L, dims.d_ff), "mlp_out": (L, dims.d_model)}


def gate_offsets(dims: ModelDims) -> dict:
    """The global Philox index of the first gate of every granularity."""
    out, total = {}, 0
    for name, shape in gate_shapes(dims).items():
        out[name] = total
        total += int(torch.Size(shape).numel())
    return out


MAX_RUN_SEED = 2**31  # run seeds are in [0, MAX_RUN_SEED); steps in [0, MAX_STEPS)
MAX_STEPS = 2**32


def check_run_seed(seed) -> None:
    """A run's seed must be an int in [0, MAX_RUN_SEED): :func:`step_seed` puts it in the Philox key's high
    32-bit word."""
    if isinstance(seed, bool) or not isinstance(seed, int) or not 0 <= seed < MAX_RUN_SEED:
        raise ValueError(f"seed must be an int in [0, 2**31) (the gate noise's Philox key holds the seed and the "
                         f"step, 32 bits each), got {seed!r}")


def step_seed(seed: int, step: int) -> int:
    """The Philox key of training step ``step`` of a run seeded ``seed``: ``seed * 2**32 + step``.

    Philox4x32 has a 64-bit key (two 32-bit words) and the gate's global index is its counter, so the key's
    low word holds the step and its high word the run's seed: distinct (seed, step) pairs never share a key,
    hence never share noise (a plain ``seed + step`` made seed s at step k + 1 draw exactly what seed s + 1
    drew at step k). The arithmetic keeps the key a symbolic int under ``torch.compile``, so a new step does
    not recompile (see :class:`NodeMasks`).
    """
    return seed * MAX_STEPS + step


class NodeMasks(nn.Module):
    """The gates of a model patched by :func:`nodeprune_kernels.apply_node_pruning`.

    Attributes:
        log_alpha: ParameterDict keyed by granularity (float32, on the model's device): layer [L], attn [L],
            head [L, H], attn_neuron [L, H*d_head], mlp [L], mlp_neuron [L, d_ff], mlp_out [L, d_model].
            Only the enabled granularities are present.
        dims: the model's sizes (:class:`ModelDims`).
        ablation: "zero", "mean" or "interchange" — what a closed node's input is replaced with.
        seed: the run's seed; :func:`step_seed` (seed, step) keys the gate sample of step ``step``.
        step: training forward passes so far (the model's top-level forward advances it in training mode).

    Modes: ``masks.train()`` samples gates (a fresh sample per forward pass, shared by the batch);
    ``masks.eval()`` uses the deterministic gates. ``masks.all_open()`` and ``masks.use_circuit(circuit)``
    are context managers that run the original model, or a binary circuit. The masks module is not a child
    of the model: ``model.eval()`` does not change its mode, and ``model.parameters()`` does not include
    the gates (give ``masks.parameters()`` to the optimizer).

    torch.compile: the patched model compiles with ``fullgraph=True`` (the fused ops are torch custom ops).
    In training mode the step is an int attribute of this module, which Dynamo specialises on unless
    ``torch._dynamo.config.allow_unspec_int_on_nn_module = True``: set it (or wrap the compiled calls in
    ``torch._dynamo.config.patch(allow_unspec_int_on_nn_module=True)``) so that a new gate sample does
    not recompile the model.
    """

    def __init__(self, model: nn.Module, family: Family, dims: ModelDims, granularities: Iterable[str],
                 ablation: str = "zero", backend: str = "auto", seed: int = 0, init_log_alpha: float = 3.0,
                 cache_corrupt_hidden: bool = False):
        super().__init__()
        if ablation not in ABLATIONS:
            raise ValueError(f"unknown ablation {ablation!r}; choose one of {', '.join(ABLATIONS)}")
        check_run_seed(seed)
        self.granularities = check_granularities(granularities)
        self.dims, self.family, self.ablation, self.backend = dims, family, ablation, backend
        self.seed, self.step = seed, 0
        self.cache_corrupt_hidden = bool(cache_corrupt_hidden)
        device = next(model.parameters()).device
        shapes = gate_shapes(dims)
        self.log_alpha = nn.ParameterDict({
            g: nn.Parameter(torch.full(shapes[g], float(init_log_alpha), dtype=torch.float32, device=device))
            for g in self.granularities})
        self.offsets = gate_offsets(dims)
        self._model = weakref.ref(model)
        self._bypass = False  # run the original modules (all gates open; recording passes)
        self._circuit_la: dict | None = None
        self._recorder = None  # a callable(kind, layer, tensor) during recording passes
        self._token_weight: torch.Tensor | None = None
        self._corrupt: dict | None = None  # interchange: {"attn": [per layer], "mlp": [per layer]}
        self.means: dict | None = None  # mean ablation: {"attn": [L, H*D], "mlp": [L, d_ff]} float32

    # ----------------------------------------------------------------------------------------- gates
    @property
    def sample_seed(self) -> int:
        """The Philox key of the current gate sample."""
        return step_seed(self.seed, self.step)

    @property
    def _device(self) -> torch.device:
        return next(iter(self.log_alpha.values())).device

    def _advance(self, *_):
        """Forward pre-hook of the model: a fresh gate sample per training forward pass."""
        if self._sampling() and not self._bypass:
            self.step += 1

    def _la(self, name: str) -> torch.Tensor | None:
        if self._circuit_la is not None:
            return self._circuit_la.get(name)
        return self.log_alpha[name] if name in self.log_alpha else None

    def _sampling(self) -> bool:
        return self.training and self._circuit_la is None

    def _stack(self, layer: int, levels) -> list:
        """Gate levels (name, group, per-layer size) present at ``layer``, as a list of Gate."""
        out = []
        for name, group, size in levels:
            la = self._la(name)
            if la is None:
                continue
            row = la[layer:layer + 1] if la.dim() == 1 else la[layer]
            out.append(Gate(row, group, self.offsets[name] + layer * size))
        return out

    def attn_gates(self, layer: int) -> list:
        """The o_proj input stack: layer, attn (group H*D), head (group D), attn_neuron (group 1)."""
        K, D = self.dims.n_heads * self.dims.head_dim, self.dims.head_dim
        return self._stack(layer, (("layer", K, 1), ("attn", K, 1), ("head", D, self.dims.n_heads),
                                   ("attn_neuron", 1, K)))

    def mlp_gates(self, layer: int) -> tuple:
        """(hidden-unit stack: layer, mlp, mlp_neuron; output-feature stack: mlp_out)."""
        F_ = self.dims.d_ff
        return (self._stack(layer, (("layer", F_, 1), ("mlp", F_, 1), ("mlp_neuron", 1, F_))),
                self._stack(layer, (("mlp_out", 1, self.dims.d_model),)))

    @torch.no_grad()
    def deterministic_gates(self) -> dict:
        """Every granularity's deterministic (evaluation) gate values, float32 tensors like log_alpha."""
        return {g: hard_concrete_reference(la.detach(), seed=0, training=False) for g, la in self.log_alpha.items()}

    def expected_l0(self) -> dict:
        """Every granularity's probability of a non-zero gate (differentiable), like log_alpha."""
        return {g: expected_l0_reference(la) for g, la in self.log_alpha.items()}

    # ------------------------------------------------------------------------------------ contexts
    @contextlib.contextmanager
    def all_open(self):
        """Run the original, unmasked model inside the block (every gate open, no ablation)."""
        prev, self._bypass = self._bypass, True
        try:
            yield self
        finally:
            self._bypass = prev

    @contextlib.contextmanager
    def use_circuit(self, circuit):
        """Run a binary circuit inside the block: kept nodes' gates are 1, the others 0 (with this
        masks' ablation). ``circuit`` is a :class:`Circuit` of this model."""
        circuit.check_dims(self.dims)
        la = {g: torch.where(kept, _OPEN, _CLOSED).to(self._device) for g, kept in circuit.kept.items()}
        prev, self._circuit_la = self._circuit_la, la
        try:
            yield self
        finally:
            self._circuit_la = prev

    def circuit(self, threshold: float = 0.5, method: str = "threshold", *, size=None, fraction=None, within=None,
                strict: bool = True):
        """The binary circuit of the current gates (see :meth:`Circuit.from_masks`): cut at ``threshold`` by
        ``method``, or of an exact size, ``size={"head": 12, "mlp_neuron": 500}`` (nodes kept) or
        ``fraction=0.1`` (of every gated granularity; or a dict), by the gates' ranking."""
        from .circuit import Circuit

        return Circuit.from_masks(self, threshold=threshold, method=method, size=size, fraction=fraction,
                                  within=within, strict=strict)

    # ------------------------------------------------------------------------------------ ablation
    def _model_or_raise(self) -> nn.Module:
        model = self._model()
        if model is None:
            raise RuntimeError("the model these masks belong to no longer exists")
        return model

    @contextlib.contextmanager
    def _recording(self, recorder, token_weight=None):
        prev = (self._bypass, self._recorder, self._token_weight)
        self._bypass, self._recorder, self._token_weight = True, recorder, token_weight
        try:
            yield
        finally:
            self._bypass, self._recorder, self._token_weight = prev

    @staticmethod
    def _run_base(model, inputs: dict):
        base = getattr(model, "base_model", model)
        return base(**inputs, use_cache=False)

    @contextlib.contextmanager
    def interchange(self, **corrupted_inputs):
        """Interchange ablation: closed nodes take their values from a run on ``corrupted_inputs``.

        On entry the unmasked model runs once on the corrupted batch (the keyword arguments of the model's
        forward, e.g. ``input_ids=..., attention_mask=...``), without grad, and keeps per layer the attention
        output (H*d_head values per token) and the MLP input (d_model values per token): the interchange
        budget of docs/design.md, section 7. Forward passes inside the block then use them; the clean batch
        must have the same shape. With gradient checkpointing, call ``backward()`` inside the block too
        (recomputed layers need the corrupted values).
        """
        if self.ablation != "interchange":
            raise RuntimeError(f"masks.interchange(...) needs ablation='interchange'; these masks use "
                               f"{self.ablation!r} (set masks.ablation = 'interchange' or apply with it)")
        model = self._model_or_raise()
        L = self.dims.n_layers
        cache = {"attn": [None] * L, "mlp": [None] * L}

        def record(kind, layer, t):
            cache[kind][layer] = t.detach()

        with torch.no_grad(), self._recording(record):
            self._run_base(model, corrupted_inputs)
        prev, self._corrupt = self._corrupt, cache
        try:
            yield self
        finally:
            self._corrupt = prev

    @torch.no_grad()
    def estimate_means(self, batches, max_batches: int | None = None) -> dict:
        """Mean ablation values: per-site means of the unmasked model over ``batches``.

        ``batches`` yields dicts of model inputs (``input_ids`` and optionally ``attention_mask``; padding
        tokens, where attention_mask is 0, are left out of the means). Stores and returns
        ``{"attn": [L, H*d_head], "mlp": [L, d_ff]}`` (float32): the mean attention output (the o_proj input)
        and the mean MLP hidden units (the down projection input). ``ablation="mean"`` uses them.
        """
        model = self._model_or_raise()
        L, K, F_ = self.dims.n_layers, self.dims.n_heads * self.dims.head_dim, self.dims.d_ff
        device = self._device
        sums = {"attn": torch.zeros(L, K, dtype=torch.float64, device=device),
                "mlp": torch.zeros(L, F_, dtype=torch.float64, device=device)}
        count = torch.zeros((), dtype=torch.float64, device=device)

        def record(kind, layer, t):
            w = self._token_weight
            t = t.reshape(*t.shape[:2], -1).double() if t.dim() > 2 else t.double()
            sums[kind][layer] += (t * w[..., None]).reshape(-1, t.shape[-1]).sum(0)

        n = 0
        for batch in batches:
            if max_batches is not None and n >= max_batches:
                break
            if not isinstance(batch, dict) or "input_ids" not in batch:
                raise TypeError("estimate_means expects batches of model inputs: dicts with 'input_ids' (and "
                                "optionally 'attention_mask')")
            ids = batch["input_ids"]
            mask = batch.get("attention_mask")
            w = (mask if mask is not None else torch.ones_like(ids)).to(device=device, dtype=torch.float64)
            count += w.sum()
            with self._recording(record, w):
                self._run_base(model, batch)
            n += 1
        if n == 0 or count.item() == 0:
            raise ValueError("estimate_means got no tokens: give at least one batch with unmasked tokens")
        self.means = {k: (v / count).float() for k, v in sums.items()}
        return self.means

    def attn_ablation(self, layer: int, x: torch.Tensor) -> torch.Tensor | None:
        """The o_proj input's ablation value for this layer: None, a [H*D] mean, or the corrupted run's."""
        if self.ablation == "zero":
            return None
        if self.ablation == "mean":
            return self._mean("attn", layer, x.dtype)
        return self._corrupted("attn", layer, x)

    def mlp_ablation(self, layer: int, x: torch.Tensor) -> dict:
        """The masked_mlp ablation arguments for this layer's MLP input x."""
        if self.ablation == "zero":
            return {}
        if self.ablation == "mean":
            return {"hidden_ablate": self._mean("mlp", layer, x.dtype)}
        return {"x_corrupt": self._corrupted("mlp", layer, x), "cache_corrupt_hidden": self.cache_corrupt_hidden}

    def _mean(self, kind, layer, dtype):
        if self.means is None:
            raise RuntimeError("ablation='mean' needs the means: call masks.estimate_means(batches) first")
        return self.means[kind][layer].to(dtype)

    def _corrupted(self, kind, layer, x):
        if self._corrupt is None:
            raise RuntimeError("ablation='interchange': run the model inside `with masks.interchange(**corrupted_"
                               "inputs):`, which gives the corrupted batch the closed nodes take their values from")
        c = self._corrupt[kind][layer]
        if c is None or c.shape != x.shape:
            raise ValueError(f"interchange ablation: the clean batch gives layer {layer}'s {kind} input shape "
                             f"{list(x.shape)}, the corrupted batch {None if c is None else list(c.shape)}; pair "
                             "clean and corrupted prompts with the same batch size and length")
        return c.to(x.dtype)

    def extra_repr(self) -> str:
        return (f"granularities={self.granularities}, ablation={self.ablation!r}, seed={self.seed}, step={self.step}, "
                f"backend={self.backend!r}")

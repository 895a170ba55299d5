"""The binary circuit a pruning run finds: which nodes are kept, made consistent, readable and portable."""
from __future__ import annotations

import json
import os
from dataclasses import dataclass

import torch

from .families import ModelDims
from .masks import GRANULARITIES, check_granularities, gate_shapes

CIRCUIT_FORMAT = 2  # 2: every granularity as kept indices; 1 (still read): 1-D granularities as booleans
_METHODS = ("threshold", "expected_zeros")


@dataclass
class Circuit:
    """Kept nodes per granularity and layer.

    Attributes:
        kept: {granularity: bool tensor (CPU)} for the gated granularities, shaped like the log_alphas
            (layer [L], attn [L], head [L, H], attn_neuron [L, H*d_head], mlp [L], mlp_neuron [L, d_ff],
            mlp_out [L, d_model]). True means kept.
        dims: the model's sizes.
        threshold: the deterministic-gate threshold it was cut at (None if not from a threshold).
        model_type: the model's ``config.model_type``, for a check when it is used.

    A Circuit is always consistent both ways: a closed parent closes its children (layer > attn > head >
    attn_neuron; layer > mlp > mlp_neuron and mlp_out) and a parent whose children are all closed is closed.
    :meth:`full` gives every granularity, the implied ones included.
    """

    kept: dict
    dims: ModelDims
    threshold: float | None = None
    model_type: str | None = None

    def __post_init__(self):
        shapes = gate_shapes(self.dims)
        check_granularities(tuple(self.kept))
        for g, t in list(self.kept.items()):
            t = torch.as_tensor(t).to(device="cpu", dtype=torch.bool)
            if tuple(t.shape) != shapes[g]:
                raise ValueError(f"circuit: {g} must have shape {list(shapes[g])} for this model, got {list(t.shape)}")
            self.kept[g] = t
        full = _consistent(self.kept, self.dims)
        self.kept = {g: full[g] for g in GRANULARITIES if g in self.kept}

    # ----------------------------------------------------------------------------------- building
    @classmethod
    def from_masks(cls, masks, threshold: float = 0.5, method: str = "threshold") -> "Circuit":
        """The circuit of a NodeMasks' gates.

        ``method="threshold"``: a node is kept when its deterministic gate exceeds ``threshold``.
        ``method="expected_zeros"`` (CoFi): per granularity, the round(sum of 1 - expected L0) nodes with the
        smallest log_alpha are closed, the rest kept.
        """
        if method not in _METHODS:
            raise ValueError(f"unknown circuit method {method!r}; choose one of {', '.join(_METHODS)}")
        if not 0.0 <= threshold < 1.0:
            raise ValueError(f"threshold must be in [0, 1), got {threshold}")
        if method == "threshold":
            kept = {g: (z > threshold).cpu() for g, z in masks.deterministic_gates().items()}
        else:
            kept = {}
            with torch.no_grad():
                for g, l0 in masks.expected_l0().items():
                    la = masks.log_alpha[g].detach().flatten().cpu()
                    n_zero = int(round(float((1 - l0.detach()).sum())))
                    keep = torch.ones(la.numel(), dtype=torch.bool)
                    keep[torch.argsort(la, stable=True)[:n_zero]] = False
                    kept[g] = keep.view(masks.log_alpha[g].shape)
            threshold = None
        model = masks._model()
        model_type = getattr(getattr(model, "config", None), "model_type", None)
        return cls(kept, masks.dims, threshold, model_type)

    def full(self) -> dict:
        """Every granularity's kept nodes, the ones implied by the gated granularities included."""
        return _consistent(self.kept, self.dims)

    def check_dims(self, dims: ModelDims) -> None:
        if dims != self.dims:
            raise ValueError(f"this circuit was found on a model with sizes {self.dims.to_dict()}, not "
                             f"{dims.to_dict()}")

    # ----------------------------------------------------------------------------------- reading
    def counts(self) -> dict:
        """{granularity: (kept, total, fraction kept)} over every granularity (implied ones included)."""
        out = {}
        for g, t in self.full().items():
            k, n = int(t.sum()), t.numel()
            out[g] = (k, n, k / n if n else 0.0)
        return out

    def summary(self) -> str:
        """A readable table: totals per granularity, then what each layer keeps."""
        d = self.dims
        lines = [f"circuit of a {self.model_type or 'model'} with {d.n_layers} layers "
                 f"(threshold {self.threshold}); gated: {', '.join(self.kept)}",
                 f"{'granularity':<12} {'kept':>8} {'total':>8} {'kept %':>7}"]
        for g, (k, n, f) in self.counts().items():
            lines.append(f"{g + ('' if g in self.kept else '*'):<12} {k:>8} {n:>8} {100 * f:>6.1f}%")
        lines.append("(* implied by the gated granularities)")
        full = self.full()

        def frac(g, layer):
            return f"{int(full[g][layer].sum())}/{full[g][layer].numel()}"

        lines.append(f"{'layer':>5} {'attn':>4} {'heads':>9} {'attn_neur':>11} {'mlp':>4} {'mlp_neur':>11} "
                     f"{'mlp_out':>11}  kept heads")
        for layer in range(d.n_layers):
            heads = full["head"][layer]
            names = ",".join(str(int(i)) for i in heads.nonzero().flatten()) or "-"
            lines.append(f"{layer:>5} {'yes' if full['attn'][layer] else 'no':>4} {frac('head', layer):>9} "
                         f"{frac('attn_neuron', layer):>11} {'yes' if full['mlp'][layer] else 'no':>4} "
                         f"{frac('mlp_neuron', layer):>11} {frac('mlp_out', layer):>11}  {names}")
        return "\n".join(lines)

    __str__ = summary

    # ----------------------------------------------------------------------------------- JSON
    def to_dict(self) -> dict:
        """Format 2: ``kept[g]`` lists the kept indices: of the layers for a per-layer granularity (layer, attn,
        mlp), else per layer the kept indices within it."""
        kept = {}
        for g, t in self.kept.items():
            kept[g] = t.nonzero().flatten().tolist() if t.dim() == 1 else [row.nonzero().flatten().tolist()
                                                                         for row in t]
        return {"format": CIRCUIT_FORMAT, "model_type": self.model_type, "threshold": self.threshold,
                "dims": self.dims.to_dict(), "kept": kept}

    def to_json(self, path=None, indent: int | None = None) -> str:
        """The circuit as JSON (:meth:`to_dict`); written to ``path`` too when given."""
        text = json.dumps(self.to_dict(), indent=indent)
        if path is not None:
            with open(path, "w") as f:
                f.write(text)
        return text

    @classmethod
    def from_dict(cls, data: dict, source: str = "circuit") -> "Circuit":
        """Read format 2 (or 1); every malformed entry is an error naming its key and what is wrong."""
        if not isinstance(data, dict):
            raise ValueError(f"{source}: expected a JSON object, got {type(data).__name__}")
        fmt = data.get("format")
        if fmt not in (1, CIRCUIT_FORMAT):
            raise ValueError(f"{source}: unknown circuit format {fmt!r} (this version reads formats 1 and "
                             f"{CIRCUIT_FORMAT})")
        for key in ("dims", "kept"):
            if not isinstance(data.get(key), dict):
                raise ValueError(f"{source}: '{key}' must be an object, got {data.get(key)!r:.60}")
        try:
            dims = ModelDims(**data["dims"])
        except TypeError as e:
            raise ValueError(f"{source}: 'dims' is not a model's sizes ({e})") from None
        shapes = gate_shapes(dims)

        def indices(v, size, where):
            if not isinstance(v, list) or not all(isinstance(i, int) and not isinstance(i, bool) for i in v):
                raise ValueError(f"{source}: {where} must be a list of kept indices (ints), got {v!r:.60}")
            bad = [i for i in v if not 0 <= i < size]
            if bad:
                raise ValueError(f"{source}: {where} has indices {bad[:5]} outside [0, {size})")
            if len(set(v)) != len(v):
                raise ValueError(f"{source}: {where} repeats an index")
            t = torch.zeros(size, dtype=torch.bool)
            t[torch.tensor(v, dtype=torch.long)] = True
            return t

        kept = {}
        for g, v in data["kept"].items():
            try:
                check_granularities((g,))
            except ValueError as e:
                raise ValueError(f"{source}: kept[{g!r}]: {e}") from None
            L = dims.n_layers
            if len(shapes[g]) == 1:
                if fmt == 1:  # booleans per layer
                    if not isinstance(v, list) or len(v) != L or not all(isinstance(b, bool) for b in v):
                        raise ValueError(f"{source}: kept[{g!r}] must be {L} booleans (format 1), got {v!r:.60}")
                    kept[g] = torch.tensor(v, dtype=torch.bool)
                else:
                    kept[g] = indices(v, L, f"kept[{g!r}]")
            else:
                if not isinstance(v, list) or len(v) != L:
                    raise ValueError(f"{source}: kept[{g!r}] must have one row per layer ({L}), got "
                                     f"{len(v) if isinstance(v, list) else type(v).__name__}")
                kept[g] = torch.stack([indices(row, shapes[g][1], f"kept[{g!r}][{layer}]")
                                       for layer, row in enumerate(v)])
        return cls(kept, dims, data.get("threshold"), data.get("model_type"))

    @classmethod
    def from_json(cls, text_or_path: "str | os.PathLike") -> "Circuit":
        """Read a circuit from JSON text or from a file path (a str or a ``pathlib.Path``)."""
        text, source = text_or_path, "circuit JSON"
        if isinstance(text_or_path, os.PathLike) or not text_or_path.lstrip().startswith("{"):
            source = str(text_or_path)
            with open(text_or_path) as f:
                text = f.read()
        try:
            data = json.loads(text)
        except json.JSONDecodeError as e:
            raise ValueError(f"{source}: not valid JSON ({e})") from None
        return cls.from_dict(data, source)

    def __eq__(self, other) -> bool:
        return (isinstance(other, Circuit) and self.dims == other.dims and self.kept.keys() == other.kept.keys()
                and all(torch.equal(self.kept[g], other.kept[g]) for g in self.kept))


def _consistent(kept: dict, dims: ModelDims) -> dict:
    """All granularities, consistent both ways (missing ones start all kept)."""
    L, H, D = dims.n_layers, dims.n_heads, dims.head_dim
    shapes = gate_shapes(dims)
    k = {g: kept[g].clone() if g in kept else torch.ones(shapes[g], dtype=torch.bool) for g in GRANULARITIES}
    # bottom-up: a parent whose children are all closed is closed
    k["head"] &= k["attn_neuron"].view(L, H, D).any(-1)
    k["attn"] &= k["head"].any(-1)
    k["mlp"] &= k["mlp_neuron"].any(-1) & k["mlp_out"].any(-1)
    k["layer"] &= k["attn"] | k["mlp"]
    # top-down: a closed parent closes its children
    k["attn"] &= k["layer"]
    k["mlp"] &= k["layer"]
    k["head"] &= k["attn"][:, None]
    k["attn_neuron"] &= k["head"].repeat_interleave(D, dim=1)
    k["mlp_neuron"] &= k["mlp"][:, None]
    k["mlp_out"] &= k["mlp"][:, None]
    return k

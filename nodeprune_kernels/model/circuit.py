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
    def from_masks(cls, masks, threshold: float = 0.5, method: str = "threshold", *, size=None, fraction=None,
                   within: "Circuit | None" = None, strict: bool = True) -> "Circuit":
        """The circuit of a NodeMasks' gates.

        ``method="threshold"``: a node is kept when its deterministic gate exceeds ``threshold``.
        ``method="expected_zeros"`` (CoFi): per granularity, the round(sum of 1 - expected L0) nodes with the
        smallest log_alpha are closed, the rest kept.

        A circuit of an exact size: ``size`` ({granularity: nodes kept}, ints) and ``fraction``
        ({granularity: fraction kept}, or one float for every gated granularity; ``round(fraction * nodes)``
        nodes) keep that many nodes of the granularities they name, chosen by log_alpha (the gates' ranking,
        as ``expected_zeros`` does with its count); the other gated granularities are cut by ``method``.
        The granularities are cut coarse to fine, each among the nodes its coarser cut leaves open, and a kept
        node of a gated coarser granularity first gets the best of its children, so making the circuit
        consistent closes none of the counted nodes: ``counts()`` gives exactly the sizes asked for.
        ``within``: a circuit of the same model that the cut stays inside (for nested circuits).

        Raises:
            ValueError: a size larger than the nodes left open (by the coarser cuts or ``within``), or sizes
                that cannot all hold in one consistent circuit (fewer kept children than kept parents); with
                ``strict=False`` the cut keeps as close to the sizes as it can instead.
        """
        if method not in _METHODS:
            raise ValueError(f"unknown circuit method {method!r}; choose one of {', '.join(_METHODS)}")
        if not 0.0 <= threshold < 1.0:
            raise ValueError(f"threshold must be in [0, 1), got {threshold}")
        sizes = sizes_asked(masks.log_alpha, size, fraction)
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
        if sizes or within is not None:
            if within is not None:
                within.check_dims(masks.dims)
            log_alpha = {g: la.detach().float().cpu() for g, la in masks.log_alpha.items()}
            kept = cut_to_size(log_alpha, masks.dims, sizes, kept, within, strict)
        if sizes or method != "threshold":
            threshold = None
        model = masks._model()
        model_type = getattr(getattr(model, "config", None), "model_type", None)
        return cls(kept, masks.dims, threshold, model_type)

    @classmethod
    def from_ranking(cls, ranking: dict, dims: ModelDims, size: "dict | None" = None,
                     fraction: "float | dict | None" = None, model_type: str | None = None) -> "Circuit":
        """The top nodes of a ranking, per granularity, made consistent.

        Args:
            ranking: {granularity: tensor shaped like its log_alpha}; larger values rank higher (ties: the
                lower flat index first).
            dims: the model's sizes.
            size: {granularity: number of nodes to keep}; or ``fraction``: one fraction of every
                granularity's nodes, or a dict of them (rounded to the nearest count). Granularities of
                ``ranking`` that neither names keep every node. Give exactly one of the two.
            model_type: recorded in the circuit.

        The cut is made per granularity before the consistency rules, which can only close more (a kept
        head in a closed attention block goes); ``counts()`` gives the final sizes.
        """
        if (size is None) == (fraction is None):
            raise ValueError("give exactly one of size= (nodes kept per granularity) or fraction= (a fraction of "
                             "each granularity's nodes)")
        shapes = gate_shapes(dims)
        check_granularities(tuple(ranking))
        if fraction is not None and not isinstance(fraction, dict):
            fraction = {g: fraction for g in ranking}
        wanted = size if size is not None else fraction
        if not isinstance(wanted, dict):
            raise TypeError(f"size must be a dict {{granularity: count}}, got {type(wanted).__name__}")
        unknown = sorted(set(wanted) - set(ranking))
        if unknown:
            raise ValueError(f"size/fraction given for {unknown}, which are not ranked (ranked: {', '.join(ranking)})")
        kept = {}
        for g, r in ranking.items():
            n = int(torch.Size(shapes[g]).numel())
            if tuple(r.shape) != shapes[g]:
                raise ValueError(f"ranking {g} has shape {list(r.shape)}, the model's gates {list(shapes[g])}")
            if g not in wanted:
                kept[g] = torch.ones(shapes[g], dtype=torch.bool)
                continue
            v = wanted[g]
            if size is not None:
                if isinstance(v, bool) or not isinstance(v, int) or not 0 <= v <= n:
                    raise ValueError(f"size[{g!r}] must be an int in [0, {n}], got {v!r}")
                k = v
            else:
                if not 0.0 <= float(v) <= 1.0:
                    raise ValueError(f"fraction[{g!r}] must be in [0, 1], got {v!r}")
                k = int(round(float(v) * n))
            order = torch.argsort(-r.detach().flatten().double().cpu(), stable=True)
            keep = torch.zeros(n, dtype=torch.bool)
            keep[order[:k]] = True
            kept[g] = keep.view(shapes[g])
        return cls(kept, dims, None, model_type)

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


# --------------------------------------------------------------------------------------------- exact sizes
# A kept node needs a kept child at each finer gated granularity (the bottom-up rule of _consistent): for a
# child granularity, the coarser levels its nodes keep alive, nearest first.
_PARENTS = {"head": ("attn",), "attn_neuron": ("head", "attn"), "mlp_neuron": ("mlp",), "mlp_out": ("mlp",)}


def sizes_asked(log_alpha: dict, size=None, fraction=None) -> dict:
    """{granularity: nodes to keep} from ``size`` (ints per granularity) and ``fraction`` (a float for every
    gated granularity, or floats per granularity), checked against the gated granularities' node counts."""
    gated = tuple(g for g in GRANULARITIES if g in log_alpha)
    out = {}
    for name, given in (("size", size), ("fraction", fraction)):
        if given is None:
            continue
        if not isinstance(given, dict):
            if name == "size":
                raise ValueError("size must be a dict {granularity: nodes kept}, e.g. size={'head': 12}; for the "
                                 "same share of every granularity use fraction=0.1")
            given = {g: given for g in gated}
        for g, v in given.items():
            if g not in log_alpha:
                raise ValueError(f"{name} given for {g!r}, which is not gated here (gated: {', '.join(gated)})")
            if g in out:
                raise ValueError(f"{g!r} is given in both size and fraction; give it once")
            n = log_alpha[g].numel()
            if name == "size":
                if isinstance(v, bool) or not isinstance(v, int) or not 0 <= v <= n:
                    raise ValueError(f"size[{g!r}] must be an int in [0, {n}] (the {g} nodes kept), got {v!r}")
                out[g] = v
            else:
                if isinstance(v, bool) or not isinstance(v, (int, float)) or not 0.0 <= v <= 1.0:
                    raise ValueError(f"fraction[{g!r}] must be a number in [0, 1] (the share of {g} nodes kept), "
                                     f"got {v!r}")
                out[g] = int(round(float(v) * n))
    return out


def _group_of(g: str, parent: str, dims: ModelDims, shape) -> torch.Tensor:
    """The flat index, in the parent's log_alpha, of the parent of each node of ``g`` (flattened)."""
    L, X = shape
    layer = torch.arange(L)[:, None].expand(L, X)
    if parent == "head":  # attn_neuron k of layer l belongs to head (l, k // head_dim)
        return (layer * dims.n_heads + torch.arange(X)[None, :] // dims.head_dim).flatten()
    return layer.flatten()


def _protecting_parent(g: str, gated) -> str | None:
    """The nearest coarser level whose kept nodes ``g``'s cut must leave a child each: a gated parent, or the
    MLP block when its other child granularity is gated (closing a block's every neuron closes its outputs)."""
    for parent in _PARENTS.get(g, ()):
        sibling = {"mlp_neuron": "mlp_out", "mlp_out": "mlp_neuron"}.get(g)
        if parent in gated or (parent == "mlp" and sibling in gated):
            return parent
    return None


def cut_to_size(log_alpha: dict, dims: ModelDims, sizes: dict, base: dict, within: "Circuit | None" = None,
                strict: bool = True) -> dict:
    """Kept nodes with exactly ``sizes[g]`` nodes of each named granularity, chosen by log_alpha.

    ``log_alpha``: {granularity: float tensor, gate shape} of every gated granularity; ``base``: {granularity:
    bool tensor} the cut of the granularities not in ``sizes`` (e.g. a threshold cut); ``within``: a circuit the
    result stays inside. Granularities are cut coarse to fine (layer, attn, head, attn_neuron, mlp, mlp_neuron,
    mlp_out), each among the nodes that the consistent cut so far leaves open; a sized granularity keeps the
    best child of every kept node of its protecting parent (:func:`_protecting_parent`) first, then the
    highest log_alphas of the rest (ties: the lower index). Returns {granularity: bool tensor} of the gated
    granularities, consistent. ``strict``: raise when a size cannot hold (see :meth:`Circuit.from_masks`);
    otherwise keep as many as can be kept.
    """
    gated = tuple(g for g in GRANULARITIES if g in log_alpha)
    inside = within.full() if within is not None else None
    state = {}
    for g in gated:
        k = torch.ones(log_alpha[g].shape, dtype=torch.bool) if g in sizes else base[g].clone()
        state[g] = k & inside[g] if inside is not None else k
    problems = []
    for g in (g for g in gated if g in sizes):
        full = _consistent(state, dims)
        shape = log_alpha[g].shape
        open_ = full[g].flatten()
        n = sizes[g]
        if n > int(open_.sum()):
            problems.append(f"{g}: {n} asked, but only {int(open_.sum())} of its nodes are left open by the coarser "
                            "granularities' cut" + (" and `within`" if within is not None else ""))
            n = int(open_.sum())
        la = log_alpha[g].flatten()
        order = torch.sort(la, descending=True, stable=True).indices
        order = order[open_[order]]  # the open nodes, best first
        chosen = torch.zeros(la.numel(), dtype=torch.bool)
        parent = _protecting_parent(g, gated)
        if parent is not None and len(shape) == 2:
            group = _group_of(g, parent, dims, shape)[order]
            alive = full[parent].flatten()[group]
            # the first (best) open child of every kept parent, best first
            first = torch.full((int(group.max()) + 1 if group.numel() else 0,), order.numel(), dtype=torch.long)
            first.scatter_reduce_(0, group, torch.arange(order.numel()), reduce="amin")
            pos = torch.zeros(order.numel(), dtype=torch.bool)
            pos[first[first < order.numel()]] = True
            reserved = order[pos & alive]
            chosen[reserved[:n]] = True
        rest = order[~chosen[order]]
        chosen[rest[:max(0, n - int(chosen.sum()))]] = True
        state[g] = chosen.view(shape)
    full = _consistent(state, dims)
    for g in sizes:
        kept = int(full[g].sum())
        if kept != sizes[g] and not any(p.startswith(f"{g}:") for p in problems):
            problems.append(f"{g}: {sizes[g]} asked, {kept} kept once the circuit is consistent (a kept {g} node "
                            "needs a kept node under it at each finer gated granularity: ask for more of those, or "
                            f"fewer {g} nodes)")
    if problems and strict:
        raise ValueError("circuit size: " + "; ".join(problems))
    return {g: full[g] for g in gated}

"""PruneConfig: every option of a pruning run, validated, and saved with the run."""
from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field

from ..model.masks import ABLATIONS, GRANULARITIES, check_granularities, check_run_seed
from ..utils.backend import BACKENDS
from .metrics import MIB_SIZES  # the circuit sizes MIB scores: the path's default grid
from .objectives import check_objective
from .sparsity import SPARSITY_MODES, TARGET_UPDATES, Sparsity

COARSE = ("layer", "attn", "head", "mlp")  # block and head granularities only
# Target sparsities when none are given: a starting point that keeps whole layers and most blocks and prunes
# harder the finer the granularity. Set ``targets`` for your model and task.
DEFAULT_TARGETS = {"layer": 0.0, "attn": 0.25, "head": 0.5, "attn_neuron": 0.75, "mlp": 0.25, "mlp_neuron": 0.9,
                   "mlp_out": 0.5}
INITS = ("constant", "attribution")
DTYPES = ("auto", "float32", "bfloat16", "float16")
DEFAULT_WARMUP = {"penalty": 0.5, "target": 0.5, "path": 0.9, "budget": 0.0}  # warmup=None: the fraction of the steps, per mode


@dataclass
class PruneConfig:
    """Options of :func:`nodeprune_kernels.prune` (and of ``nodeprune prune``; same names with dashes).

    Gates: ``granularities`` (default all seven), ``ablation`` ("interchange" by default: closed nodes take
    their values from the paired corrupted prompt; "mean" estimates the means on the training examples;
    "zero"), ``init_log_alpha`` and ``init_std`` (log_alpha starts at N(init_log_alpha, init_std²); 3.0 means
    every deterministic gate starts open), ``seed`` (gate noise, data order and the train/eval split).

    Objective: ``objective`` "kl" (KL from the full model at the task's positions), "logit_diff" or "ce".

    Sparsity: ``sparsity="penalty"`` adds ``lambdas`` (one number, or a dict per granularity) times each
    granularity's mean expected L0; ``sparsity="target"`` holds each granularity's expected sparsity to
    ``targets`` (one number, a dict, or None for ``DEFAULT_TARGETS``), the targets ramping up linearly over
    ``warmup`` (a fraction of ``steps``; None: 0.5), by ``target_update`` "projection" (the log_alphas shifted
    after each step) or "lagrangian" (multipliers trained at ``lambda_lr``). A final expected sparsity more
    than ``target_tolerance`` from its target is reported (a warning, ``summary()``, metrics.json).
    ``sparsity="path"``: the targets rise from 0 to ``targets`` (None: ``1 - min(path_sizes)`` for every
    gated granularity) over ``warmup`` (None: 0.9), geometrically in the kept fraction, and a circuit is cut
    at each size of ``path_sizes`` (fractions of the gated nodes kept; MIB's ten by default) as the run
    passes it (docs/sparsity.md); it passes its large sizes early, so give it several times a target run's
    ``steps``. ``sparsity="budget"``: as small a circuit as keeps the training KL at or
    below ``kl_budget``: the targets are one pressure in [0, 1], adapted each step from the KL, times
    ``targets`` (the most each granularity may be pruned; None: ``DEFAULT_TARGETS``), held by the projection
    (objective "kl").

    Optimisation: ``steps``, ``batch_size``, ``lr`` (AdamW on log_alpha, no weight decay). ``init``:
    "constant" (log_alpha as above) or "attribution": each log_alpha starts from its node's attribution rank
    (``NodeScores.to_log_alpha``; AtP on the logit difference where the task has distractors, else IG on
    the KL; docs/attribution.md).

    Data: ``n_examples`` generated (tasks from a file use all their rows), ``n_eval`` held out (a count, a
    fraction, or None: min(64, a quarter of the examples); a file's ``split`` column wins; the count used is in
    config.json), ``task_options`` for the task's generator.

    Circuit and evaluation: ``threshold`` on the deterministic gates (``circuit_method`` "threshold" or
    CoFi's "expected_zeros"), or ``circuit_size``: an exact size by the gates' ranking (a dict per
    granularity of ints, nodes kept, or floats, fractions kept; one float for every gated granularity; the
    granularities it leaves out are cut by ``circuit_method``); ``curve_points`` points of the
    faithfulness-versus-sparsity curve.

    Runtime: ``backend`` ("auto", "triton", "native", "reference"), ``dtype`` of the model ("auto" keeps it),
    ``gradient_checkpointing``, ``log_every``, ``checkpoint_every`` (steps; also at the end).
    """

    granularities: tuple = GRANULARITIES
    ablation: str = "interchange"
    objective: str = "kl"
    sparsity: str = "target"
    lambdas: float | dict = 1.0
    targets: float | dict | None = None
    target_update: str = "projection"
    lambda_lr: float = 0.05
    warmup: float | None = None
    target_tolerance: float = 0.05
    kl_budget: float | None = None
    path_sizes: tuple = MIB_SIZES
    steps: int = 300
    batch_size: int = 16
    lr: float = 0.1
    init_log_alpha: float = 3.0
    init_std: float = 0.0
    init: str = "constant"
    seed: int = 0
    n_examples: int = 256
    n_eval: int | float | None = None
    task_options: dict = field(default_factory=dict)
    threshold: float = 0.5
    circuit_method: str = "threshold"
    circuit_size: float | dict | None = None
    curve_points: int = 9
    backend: str = "auto"
    dtype: str = "auto"
    gradient_checkpointing: bool = False
    log_every: int = 10
    checkpoint_every: int = 50

    def __post_init__(self):
        self.granularities = check_granularities(self.granularities)
        if self.ablation not in ABLATIONS:
            raise ValueError(f"unknown ablation {self.ablation!r}; choose one of {', '.join(ABLATIONS)}")
        check_objective(self.objective)
        if self.sparsity not in SPARSITY_MODES:
            raise ValueError(f"unknown sparsity {self.sparsity!r}; choose one of {', '.join(SPARSITY_MODES)}")
        if self.target_update not in TARGET_UPDATES:
            raise ValueError(f"unknown target_update {self.target_update!r}; choose one of {', '.join(TARGET_UPDATES)}")
        self.path_sizes = check_path_sizes(self.path_sizes)
        if self.sparsity == "budget" and self.objective != "kl":
            raise ValueError(f"sparsity='budget' holds the training KL to kl_budget, so it needs objective 'kl', "
                             f"not {self.objective!r}")
        if self.kl_budget is not None and self.sparsity != "budget":
            raise ValueError(f"kl_budget is used by sparsity='budget' only (this run's sparsity is "
                             f"{self.sparsity!r}); set sparsity='budget' or drop kl_budget")
        if self.init not in INITS:
            raise ValueError(f"unknown init {self.init!r}; choose one of {', '.join(INITS)}")
        self.sparsity_term()  # validates lambdas / targets
        if self.backend not in BACKENDS:
            raise ValueError(f"unknown backend {self.backend!r}; choose one of {', '.join(BACKENDS)}")
        if self.dtype not in DTYPES:
            raise ValueError(f"unknown dtype {self.dtype!r}; choose one of {', '.join(DTYPES)}")
        if self.circuit_method not in ("threshold", "expected_zeros"):
            raise ValueError(f"unknown circuit_method {self.circuit_method!r}; choose threshold or expected_zeros")
        for name in ("steps", "batch_size", "n_examples", "log_every", "checkpoint_every", "curve_points"):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, int) or v < 1:
                raise ValueError(f"{name} must be an int >= 1, got {v!r}")
        check_run_seed(self.seed)
        if not math.isfinite(float(self.init_log_alpha)):
            raise ValueError(f"init_log_alpha must be finite, got {self.init_log_alpha}")
        if not (math.isfinite(float(self.init_std)) and float(self.init_std) >= 0):
            raise ValueError(f"init_std is a standard deviation: finite and >= 0, got {self.init_std}")
        for name in ("lr", "lambda_lr"):
            if not float(getattr(self, name)) > 0:
                raise ValueError(f"{name} must be > 0, got {getattr(self, name)}")
        if self.warmup is not None and not 0.0 <= self.warmup <= 1.0:
            raise ValueError(f"warmup is a fraction of the steps, in [0, 1] (or None: the mode's default); got "
                             f"{self.warmup}")
        if not 0.0 < float(self.target_tolerance) < 1.0:
            raise ValueError(f"target_tolerance is a sparsity difference, in (0, 1); got {self.target_tolerance}")
        check_circuit_size(self.circuit_size, self.granularities)
        if not 0.0 <= self.threshold < 1.0:
            raise ValueError(f"threshold must be in [0, 1), got {self.threshold}")

    def warmup_steps(self) -> int:
        """The steps over which the targets rise: ``warmup`` (or the mode's default) times ``steps``."""
        warmup = DEFAULT_WARMUP[self.sparsity] if self.warmup is None else self.warmup
        return round(warmup * self.steps)

    def sparsity_term(self, warmup_steps: int = 0) -> Sparsity:
        """The run's :class:`Sparsity` (``targets=None``: ``DEFAULT_TARGETS`` of the gated granularities; in
        path mode ``1 - min(path_sizes)`` for each)."""
        targets = self.targets
        if targets is None and self.sparsity == "path":
            targets = 1.0 - min(self.path_sizes)
        elif targets is None:
            targets = {g: DEFAULT_TARGETS[g] for g in self.granularities}
        return Sparsity(self.granularities, self.sparsity, self.lambdas, targets, warmup_steps, self.target_update,
                        kl_budget=self.kl_budget)

    def circuit_size_kwargs(self) -> dict:
        """``circuit_size`` as the ``size`` / ``fraction`` arguments of ``NodeMasks.circuit``."""
        c = self.circuit_size
        if c is None:
            return {}
        if not isinstance(c, dict):
            return {"fraction": float(c)}
        return {"size": {g: v for g, v in c.items() if isinstance(v, int)} or None,
                "fraction": {g: v for g, v in c.items() if isinstance(v, float)} or None}

    def to_dict(self) -> dict:
        d = dataclasses.asdict(self)
        d["granularities"] = list(self.granularities)
        d["path_sizes"] = list(self.path_sizes)
        return d

    @classmethod
    def from_dict(cls, d: dict) -> "PruneConfig":
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = set(d) - names
        if unknown:
            raise ValueError(f"unknown PruneConfig option(s) {sorted(unknown)}; known: {sorted(names)}")
        d = dict(d)
        for name in ("granularities", "path_sizes"):
            if name in d:
                d[name] = tuple(d[name])
        return cls(**d)

    def replace(self, **changes) -> "PruneConfig":
        return dataclasses.replace(self, **changes)


def check_path_sizes(sizes) -> tuple:
    """The path's grid: fractions of the gated nodes kept, each in (0, 1], distinct; returned descending."""
    try:
        sizes = tuple(float(x) for x in sizes)
    except (TypeError, ValueError):
        raise ValueError(f"path_sizes must be a list of fractions of the nodes kept, e.g. [0.01, 0.1, 1], got "
                         f"{sizes!r}") from None
    if not sizes or any(not 0.0 < x <= 1.0 for x in sizes) or len(set(sizes)) != len(sizes):
        raise ValueError(f"path_sizes must be distinct fractions in (0, 1] of the gated nodes kept, got {list(sizes)}")
    return tuple(sorted(sizes, reverse=True))


def check_circuit_size(value, granularities) -> None:
    """``circuit_size``: None, a float in [0, 1] (every gated granularity), or {gated granularity: int count
    >= 0 or float fraction in [0, 1]}. Counts are checked against the model's sizes when it is patched."""
    if value is None:
        return
    if not isinstance(value, dict):
        if isinstance(value, bool) or not isinstance(value, float) or not 0.0 <= value <= 1.0:
            raise ValueError(f"circuit_size must be a fraction in [0, 1] for every gated granularity, or a dict "
                             f"{{granularity: count (int) or fraction (float)}}, got {value!r}")
        return
    for g, v in value.items():
        if g not in granularities:
            raise ValueError(f"circuit_size given for {g!r}, which is not gated in this run (gated: "
                             f"{', '.join(granularities)})")
        ok = (isinstance(v, int) and not isinstance(v, bool) and v >= 0) or (isinstance(v, float) and 0.0 <= v <= 1.0)
        if not ok:
            raise ValueError(f"circuit_size[{g!r}] must be a count of nodes (an int >= 0) or a fraction of them (a "
                             f"float in [0, 1]), got {v!r}")

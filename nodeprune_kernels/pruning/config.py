"""PruneConfig: every option of a pruning run, validated, and saved with the run."""
from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field

from ..model.masks import ABLATIONS, GRANULARITIES, check_granularities, check_run_seed
from ..utils.backend import BACKENDS
from .objectives import check_objective
from .sparsity import SPARSITY_MODES, Sparsity

COARSE = ("layer", "attn", "head", "mlp")  # block and head granularities only
# Target sparsities when none are given: a starting point that keeps whole layers and most blocks and prunes
# harder the finer the granularity. Set ``targets`` for your model and task.
DEFAULT_TARGETS = {"layer": 0.0, "attn": 0.25, "head": 0.5, "attn_neuron": 0.75, "mlp": 0.25, "mlp_neuron": 0.9,
                   "mlp_out": 0.5}
DTYPES = ("auto", "float32", "bfloat16", "float16")


@dataclass
class PruneConfig:
    """Options of :func:`nodeprune_kernels.prune` (and of ``nodeprune prune``; same names with dashes).

    Gates: ``granularities`` (default all seven), ``ablation`` ("interchange" by default: closed nodes take
    their values from the paired corrupted prompt; "mean" estimates the means on the training examples;
    "zero"), ``init_log_alpha`` and ``init_std`` (log_alpha starts at N(init_log_alpha, init_std²); 3.0 means
    every deterministic gate starts open), ``seed`` (gate noise, data order and the train/eval split).

    Objective: ``objective`` "kl" (KL from the full model at the task's positions), "logit_diff" or "ce".

    Sparsity: ``sparsity="penalty"`` adds ``lambdas`` (one number, or a dict per granularity) times each
    granularity's mean expected L0; ``sparsity="target"`` pulls each granularity's expected sparsity to
    ``targets`` (one number, a dict, or None for ``DEFAULT_TARGETS``) with Lagrange multipliers trained at ``lambda_lr``, the targets
    ramping up linearly over ``warmup`` (a fraction of ``steps``).

    Optimisation: ``steps``, ``batch_size``, ``lr`` (AdamW on log_alpha, no weight decay).

    Data: ``n_examples`` generated (tasks from a file use all their rows), ``n_eval`` held out (a count, a
    fraction, or None: min(64, a quarter of the examples); a file's ``split`` column wins; the count used is in
    config.json), ``task_options`` for the task's generator.

    Circuit and evaluation: ``threshold`` on the deterministic gates (``circuit_method`` "threshold" or
    CoFi's "expected_zeros"), ``curve_points`` points of the faithfulness-versus-sparsity curve.

    Runtime: ``backend`` ("auto", "triton", "native", "reference"), ``dtype`` of the model ("auto" keeps it),
    ``gradient_checkpointing``, ``log_every``, ``checkpoint_every`` (steps; also at the end).
    """

    granularities: tuple = GRANULARITIES
    ablation: str = "interchange"
    objective: str = "kl"
    sparsity: str = "target"
    lambdas: float | dict = 1.0
    targets: float | dict | None = None
    lambda_lr: float = 0.05
    warmup: float = 0.5
    steps: int = 300
    batch_size: int = 16
    lr: float = 0.1
    init_log_alpha: float = 3.0
    init_std: float = 0.0
    seed: int = 0
    n_examples: int = 256
    n_eval: int | float | None = None
    task_options: dict = field(default_factory=dict)
    threshold: float = 0.5
    circuit_method: str = "threshold"
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
        if not 0.0 <= self.warmup <= 1.0:
            raise ValueError(f"warmup is a fraction of the steps, in [0, 1]; got {self.warmup}")
        if not 0.0 <= self.threshold < 1.0:
            raise ValueError(f"threshold must be in [0, 1), got {self.threshold}")

    def sparsity_term(self, warmup_steps: int = 0) -> Sparsity:
        """The run's :class:`Sparsity` (``targets=None``: ``DEFAULT_TARGETS`` of the gated granularities)."""
        targets = self.targets
        if targets is None:
            targets = {g: DEFAULT_TARGETS[g] for g in self.granularities}
        return Sparsity(self.granularities, self.sparsity, self.lambdas, targets, warmup_steps)

    def to_dict(self) -> dict:
        d = dataclasses.asdict(self)
        d["granularities"] = list(self.granularities)
        return d

    @classmethod
    def from_dict(cls, d: dict) -> "PruneConfig":
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = set(d) - names
        if unknown:
            raise ValueError(f"unknown PruneConfig option(s) {sorted(unknown)}; known: {sorted(names)}")
        d = dict(d)
        if "granularities" in d:
            d["granularities"] = tuple(d["granularities"])
        return cls(**d)

    def replace(self, **changes) -> "PruneConfig":
        return dataclasses.replace(self, **changes)

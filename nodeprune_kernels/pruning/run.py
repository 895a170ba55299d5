"""The pruning run: gates on a model, trained on a task, cut into a circuit, evaluated and written out.

Layering: this module drives the model layer (``apply_node_pruning``, ``NodeMasks``) with a task's data
(``nodeprune_kernels.tasks``), an objective (``objectives``) and a sparsity term (``sparsity``); ``outputs``
writes the run directory, ``evaluate`` scores circuits.
"""
from __future__ import annotations

import contextlib
import hashlib
import math
import warnings
from dataclasses import dataclass, field
from pathlib import Path

import torch

from ..model.circuit import Circuit
from ..model.patch import apply_node_pruning, is_patched, remove_node_pruning
from ..tasks.base import TaskData
from . import distributed as dist
from . import outputs
from .config import PruneConfig
from .evaluate import ablation_context, batch_inputs, estimate_means, evaluate_circuit, faithfulness_curve
from .objectives import check_objective, gather_positions, objective_sum
from .metrics import ranking_table
from .path import SizePath
from .sparsity import expected_sparsity


class NonFiniteLossError(RuntimeError):
    """The loss became NaN or infinite; the run stopped and its last good checkpoint was kept."""


@dataclass
class PruningResult:
    """What :func:`prune` returns.

    Attributes:
        circuit: the binary circuit (deterministic gates above ``config.threshold``).
        metrics: the circuit on the held-out examples against the full model (``evaluate_circuit``), plus
            ``kept/<granularity>`` fractions and the final training values.
        curve: the faithfulness-versus-sparsity curve (``faithfulness_curve``) on the held-out examples.
        history: training log, one dict every ``log_every`` steps (step, loss, objective, sparsities).
        log_alpha: the trained gate parameters {granularity: float32 tensor on CPU}.
        config: the run's :class:`PruneConfig`.
        run_dir: where the run was written (None if nowhere).
        path: in ``sparsity="path"`` runs, the size-vs-faithfulness table (``SizePath.evaluate``: ``points``
            per grid size with the circuit's held-out metrics and faithfulness, ``cpr``, ``cmd``, ``metric``,
            ``not_reached``); the circuits themselves are ``extra["path_circuits"]`` {size: Circuit}.
    """

    circuit: Circuit
    metrics: dict
    curve: list
    history: list
    log_alpha: dict
    config: PruneConfig
    run_dir: Path | None = None
    extra: dict = field(default_factory=dict)
    path: dict | None = None

    def summary(self) -> str:
        m = self.metrics
        lines = [self.circuit.summary(), "",
                 f"held-out ({m['n_examples']} examples): KL {m['kl']:.4f}  accuracy {m['accuracy']:.3f} "
                 f"(full model {m['full_accuracy']:.3f})  argmax match {m['exact_match']:.3f}"]
        if "logit_diff" in m:
            lines.append(f"logit difference {m['logit_diff']:.3f} (full model {m['full_logit_diff']:.3f})")
        if "prob_diff" in m:
            lines.append(f"probability difference {m['prob_diff']:.3f} (full model {m['full_prob_diff']:.3f})")
        if m.get("mib/cpr") is not None:
            lines.append(f"MIB (the log_alpha ranking, held-out): CPR {m['mib/cpr']:.3f}  CMD {m['mib/cmd']:.3f}")
        lines += missed_lines(m)
        if self.path is not None:
            lines += ["", *path_lines(self.path)]
        return "\n".join(lines)


def missed_targets(final: dict, targets: dict, tolerance: float) -> list:
    """The granularities whose final expected sparsity is more than ``tolerance`` from their target."""
    return [g for g, t in targets.items() if abs(final[g] - t) > tolerance]


def missed_lines(metrics: dict) -> list:
    """One line per missed target (``metrics["targets_missed"]``), or the missed KL budget
    (``metrics["budget_missed"]``), saying what to do; none if all were met."""
    if metrics.get("budget_missed"):
        return [f"KL BUDGET MISSED: the training KL ends at {metrics['budget/kl_average']:.4f} (moving average), "
                f"above the budget {metrics['kl_budget']:g}; give more steps, or loosen the budget"]
    missed = metrics.get("targets_missed") or []
    tol = metrics.get("target_tolerance")
    return [f"TARGET MISSED: {g} ends at expected sparsity {metrics[f'sparsity/{g}']:.3f}, its target is "
            f"{metrics[f'target/{g}']:.3f} (tolerance {tol}); the circuit is not the size asked for. Use the "
            "default target_update='projection', or raise lambda_lr / steps; circuit_size= cuts an exact size"
            for g in missed]


def path_lines(path: dict) -> list:
    """The size path's table: per grid size, the step it was cut at, the nodes kept, KL and faithfulness."""
    lines = [f"size path (held-out; faithfulness on {path['metric']}):",
             f"{'size':>8} {'step':>6} {'nodes kept':>10} {'KL':>9} {'faithful':>9}"]
    for p in sorted(path["points"], key=lambda p: -p["size"]):
        f = "-" if p["faithfulness"] is None else f"{p['faithfulness']:.3f}"
        lines.append(f"{100 * p['size']:>7g}% {p['step']:>6} {100 * p['nodes_kept']:>9.2f}% {p['kl']:>9.4f} {f:>9}")
    if path.get("cpr") is not None:
        lines.append(f"CPR {path['cpr']:.4f}  CMD {path['cmd']:.4f} (areas over the sizes reached)")
    if path.get("not_reached"):
        lines.append("NOT REACHED: sizes " + ", ".join(f"{100 * p:g}%" for p in path["not_reached"])
                     + " (raise the targets: the run's maximum sparsity stops short of them)")
    return lines


# --------------------------------------------------------------------------------------------- data
def resolve_task(task, tokenizer, config: PruneConfig, vocab_size: int) -> TaskData:
    """A task name, a JSONL path, a ``Task`` or ready ``TaskData`` -> TaskData, checked against the model."""
    if not isinstance(task, TaskData):
        task = _build_task(task, tokenizer, config, vocab_size)
    biggest = max(int(task.input_ids.max()), int(task.corrupt_ids.max()), int(task.target.max()))
    if biggest >= vocab_size:
        raise ValueError(f"task {task.name!r} has token id {biggest}, but the model's vocabulary has {vocab_size} "
                         "tokens: was it built with another model's tokenizer?")
    return task


def prepare(model, task, config: PruneConfig | None, options: dict, tokenizer, caller: str) -> tuple:
    """(config with ``options`` applied, the task's data) for a run of ``caller`` (prune, attribute) on an
    unpatched ``model``, converted to the config's dtype."""
    config = (config or PruneConfig()).replace(**options) if options else (config or PruneConfig())
    if is_patched(model):
        raise RuntimeError(f"{caller}() patches the model itself: call nodeprune_kernels.remove_node_pruning(model) "
                           "first")
    if config.dtype != "auto":
        model.to(getattr(torch, config.dtype))
    return config, resolve_task(task, tokenizer, config, model.config.vocab_size)


def _build_task(task, tokenizer, config: PruneConfig, vocab_size: int) -> TaskData:
    from ..tasks import Task, get_task

    if isinstance(task, (str, Path)):
        task = get_task(str(task), **config.task_options)
    if isinstance(task, Task):
        if task.needs_tokenizer and tokenizer is None:
            raise ValueError(f"task {task.name!r} needs a tokenizer: pass tokenizer=... (the command line loads "
                             "the model's own), or use a task without one such as 'induction'")
        from ..tasks import JsonlTask

        n = None if isinstance(task, JsonlTask) else config.n_examples  # a file gives all its rows
        task = task.build(tokenizer=tokenizer, n=n, seed=config.seed, vocab_size=vocab_size)
    if not isinstance(task, TaskData):
        raise TypeError(f"task must be a task name, a .jsonl path, a Task or TaskData, got {type(task).__name__}")
    return task


def fingerprint(data: TaskData) -> str:
    """A hash of every tensor the run reads (the task's options are compared as part of the config)."""
    h = hashlib.sha1()
    for name in ("input_ids", "corrupt_ids", "attention_mask", "positions", "target", "distractor", "is_eval",
                 "good", "bad"):
        t = getattr(data, name)
        h.update(name.encode())
        if t is not None:
            h.update(str(tuple(t.shape)).encode() + str(t.dtype).encode())
            h.update(t.detach().cpu().contiguous().numpy().tobytes())
    return h.hexdigest()[:16]


def batch_index(step: int, n: int, batch_size: int, seed: int) -> torch.Tensor:
    """The examples of training step ``step`` (0-based): a function of the step alone, so a resumed run
    sees the same batches. Epochs are seeded permutations; the last partial batch of an epoch is dropped."""
    if n <= batch_size:
        return torch.arange(n)
    per_epoch = n // batch_size
    epoch, b = divmod(step, per_epoch)
    perm = torch.randperm(n, generator=torch.Generator().manual_seed(seed * 1_000_003 + epoch))
    return perm[b * batch_size:(b + 1) * batch_size].sort().values


# --------------------------------------------------------------------------------------------- model
@contextlib.contextmanager
def _checkpointing(model, layers, enabled: bool):
    """Gradient checkpointing of the decoder layers without dropout: HF checkpoints a layer only when the
    layer is in training mode, so only the layers' own ``training`` flags are set (not their children's:
    dropout stays off). Restored on exit, the user's own checkpointing (and its options) included."""
    if not enabled:
        yield
        return
    if not getattr(model, "supports_gradient_checkpointing", False):
        raise ValueError(f"{type(model).__name__} does not support gradient checkpointing; drop the option")
    # transformers 5.23 renamed the switch (activation_checkpointing_*); 5.17 has only the old name
    if hasattr(model, "activation_checkpointing_enable"):
        enable, disable = model.activation_checkpointing_enable, model.activation_checkpointing_disable
    else:
        enable, disable = model.gradient_checkpointing_enable, model.gradient_checkpointing_disable
    before = {m: (m.gradient_checkpointing, m.__dict__.get("_gradient_checkpointing_func"))
              for m in model.modules() if hasattr(m, "gradient_checkpointing")}
    enable({"use_reentrant": False})
    flags = [layer.training for layer in layers]
    for layer in layers:
        layer.training = True
    try:
        yield
    finally:
        for layer, f in zip(layers, flags):
            layer.training = f
        disable()
        for m, (on, func) in before.items():  # the state the user left, not just "off"
            m.gradient_checkpointing = on
            if func is not None:
                m._gradient_checkpointing_func = func


def _load_on_rank0(run_dir: Path, config: PruneConfig, meta: dict, rank: int, world: int):
    """The run directory's checkpoint, read by rank 0 and sent to the others (whose filesystem may not see
    it); an error reading it is raised on every rank, so none waits on the others."""
    if world == 1:
        return outputs.load_checkpoint(run_dir, config, meta)
    state, error = None, None
    if rank == 0:
        try:
            state = outputs.load_checkpoint(run_dir, config, meta)
        except Exception as e:  # any failure: every rank must raise, or the others wait forever
            error = e
    box = [state, None if error is None else (type(error), str(error))]
    dist.broadcast_object(box)
    if error is not None:
        raise error
    if box[1] is not None:
        kind, message = box[1]
        try:
            forwarded = kind(message)
        except Exception:  # an exception type that cannot be built from its message alone
            forwarded = RuntimeError(f"{kind.__name__}: {message}")
        raise forwarded
    return box[0]


def _attribution_init(model, data: TaskData, config: PruneConfig):
    """``init="attribution"``: the NodeScores the gates start from (AtP on the logit difference where every
    position has a distractor, else IG with 8 steps on the KL), on the run's training split."""
    from .attribution import attribute

    method, metric = ("atp", "logit_diff") if data.has_distractors() else ("ig", "kl")
    return attribute(model, data, method=method, metric=metric, config=config, progress=False)


def _init_gates(masks, config: PruneConfig, scores=None) -> None:
    """log_alpha from the attribution ranking (``scores``, a NodeScores) if given, then the init_std noise."""
    if scores is not None:
        with torch.no_grad():
            for g, la in scores.to_log_alpha(config.init_log_alpha).items():
                masks.log_alpha[g].copy_(la.to(masks.log_alpha[g].device))
    if config.init_std > 0:
        g = torch.Generator().manual_seed(config.seed)
        with torch.no_grad():
            for la in masks.log_alpha.values():
                la.add_(torch.randn(la.shape, generator=g).to(la.device) * config.init_std)


# --------------------------------------------------------------------------------------------- loop
def prune(model, task, config: PruneConfig | None = None, *, tokenizer=None, run_dir=None, resume: bool = True,
          progress: bool = True, keep_patched: bool = False, **options) -> PruningResult:
    """Find the circuit of ``model`` for ``task``: train hard-concrete gates, cut, evaluate, write.

    Args:
        model: a Hugging Face causal LM of a supported family, not yet patched; on any device. It is
            patched for the run and restored afterwards (``keep_patched=True`` leaves the gates on; get them
            with ``nodeprune_kernels.node_masks(model)``). A ``dtype`` option converts it in place.
        task: "ioi", "greater_than", "gender_pronoun", "induction", a path to a ``.jsonl`` file, a
            ``nodeprune_kernels.tasks.Task`` or a ready ``TaskData``.
        config: a :class:`PruneConfig`; keyword ``options`` override its fields (``prune(m, "ioi",
            steps=100)``).
        tokenizer: the model's tokenizer, for tasks made of text.
        run_dir: a directory to write the run to (config, checkpoints, circuit, metrics, gates, plots).
            A run directory holding a checkpoint of the same config and data resumes from it
            (``resume=False`` refuses instead).
        progress: a tqdm bar with the live objective and sparsity.

    Returns:
        :class:`PruningResult`.

    Raises:
        NonFiniteLossError: the loss became NaN or infinite (the last good checkpoint stays in run_dir).
    """
    config, data = prepare(model, task, config, options, tokenizer, "prune")
    rank, world = dist.dist_info()
    check_objective(config.objective, data)
    train, held_out = data.split(config.n_eval, seed=config.seed)
    meta = {"task": data.name, "data": fingerprint(data), "n_train": len(train), "n_eval": len(held_out)}
    run_dir = Path(run_dir) if run_dir is not None else None
    state = _load_on_rank0(run_dir, config, meta, rank, world) if run_dir is not None else None
    writes = run_dir if rank == 0 else None  # only rank 0 writes the run directory
    if state is not None and not resume:
        raise FileExistsError(f"{run_dir} already holds a run; resume it (resume=True) or choose another directory")

    scores = _attribution_init(model, data, config) if config.init == "attribution" and state is None else None
    was_training = model.training
    model.eval()
    masks = apply_node_pruning(model, config.granularities, config.ablation, config.backend, config.seed,
                               init_log_alpha=config.init_log_alpha)
    try:
        _init_gates(masks, config, scores)
        if world > 1:
            dist.shard_model(model, masks.family)
        if config.ablation == "mean":
            estimate_means(masks, train, config.batch_size)
        sparsity = config.sparsity_term(config.warmup_steps()).to(masks._device)
        opt = torch.optim.AdamW(masks.parameters(), lr=config.lr, weight_decay=0.0)
        lambda_opt = sparsity.optimizer(config.lambda_lr)
        check_sizes(config, masks)
        path = SizePath(config.path_sizes) if config.sparsity == "path" else None
        history, start = [], 0
        if state is not None:
            start, history = outputs.restore(state, masks, opt, sparsity, lambda_opt)
            if path is not None:
                path.load_state(state.get("path") or [])
        else:
            sparsity.project(masks, 0)
        if world > 1:
            dist.broadcast_gates(masks)
        if writes is not None:
            outputs.write_config(writes, config, meta)

        bar = _progress(progress and rank == 0, start, config.steps)
        with _checkpointing(model, masks.family.decoder_layers(model), config.gradient_checkpointing):
            for step in range(start, config.steps):
                if path is not None:
                    path.update(masks, step)  # the gates the step starts from
                logs = _train_step(model, masks, train, sparsity, opt, lambda_opt, config, step, world)
                if not math.isfinite(logs["loss"]):
                    raise NonFiniteLossError(_nan_message(step, logs, run_dir))
                if (step + 1) % config.log_every == 0 or step + 1 == config.steps:
                    history.append(logs)
                bar.update(1)
                bar.set_postfix({config.objective: f"{logs['objective']:.4f}",
                                 "sparsity": f"{logs['sparsity/mean']:.3f}"}, refresh=False)
                if writes is not None and ((step + 1) % config.checkpoint_every == 0 or step + 1 == config.steps):
                    outputs.save_checkpoint(writes, step + 1, masks, opt, sparsity, lambda_opt, history, config,
                                            meta, path=path.state() if path is not None else None)
        bar.close()
        if path is not None:
            path.update(masks, config.steps)  # the final gates

        masks.eval()
        circuit = masks.circuit(config.threshold, config.circuit_method, strict=False,
                                **config.circuit_size_kwargs())
        metrics = evaluate_circuit(model, masks, held_out, circuit, config.batch_size)
        metrics.update({f"kept/{g}": f for g, (_, _, f) in circuit.counts().items()})
        if history:
            metrics.update({f"train/{k}": v for k, v in history[-1].items() if k != "step"})
        notes = _end_of_run_checks(masks, sparsity, config, circuit, metrics)
        curve = faithfulness_curve(model, masks, held_out, config.curve_points, config.batch_size)
        log_alpha = {g: la.detach().float().cpu().clone() for g, la in masks.log_alpha.items()}
        mib = ranking_table(model, masks, held_out, log_alpha, batch_size=config.batch_size)
        metrics.update({f"mib/{k}": mib[k] for k in ("cpr", "cmd", "cpr_kl", "cmd_kl")})
        table = path.evaluate(model, masks, held_out, config.batch_size) if path is not None else None
        if table is not None:
            metrics.update({"path/cpr": table["cpr"], "path/cmd": table["cmd"]})
            if table["not_reached"]:
                notes.append(path_lines(table)[-1])
        result = PruningResult(circuit, metrics, curve, history, log_alpha, config, run_dir, {"meta": meta, "mib": mib},
                               table)
        if path is not None:
            result.extra["path_circuits"] = {p: c for p, (_, c) in path.cut.items()}
        if rank == 0:
            for note in notes:
                warnings.warn(note, stacklevel=2)
        if writes is not None and path is not None:
            path.write(writes, table)
        if writes is not None:
            outputs.write_results(writes, result)
        return result
    finally:
        if not keep_patched:
            remove_node_pruning(model)
        model.train(was_training)


def _train_step(model, masks, train: TaskData, sparsity, opt, lambda_opt, config: PruneConfig, step: int,
                world: int) -> dict:
    """One optimisation step on the examples of ``step`` (this rank's share of them)."""
    device = masks._device
    index = batch_index(step, len(train), config.batch_size, config.seed)
    n_positions = int(train.positions[index].sum())  # the whole batch's, the same on every rank
    local = dist.shard_batch(index) if world > 1 else index
    inputs = batch_inputs(train, local, device)
    pos = train.positions[local].to(device)
    opt.zero_grad(set_to_none=True)
    if lambda_opt is not None:
        lambda_opt.zero_grad(set_to_none=True)
    with torch.no_grad(), masks.all_open():
        full = gather_positions(model(**inputs).logits, pos)
    with ablation_context(masks, train, local):
        logits = gather_positions(model(**inputs).logits, pos)
        target, distractor = train.target[local].to(device)[pos], train.distractor[local].to(device)[pos]
        objective = objective_sum(config.objective, logits, full, target, distractor) / n_positions
        penalty, s = sparsity(masks, step)
        loss = objective + penalty / world
        loss.backward()
    values = torch.stack([objective.detach(), penalty.detach() / world]).float()
    if world > 1:
        dist.sync_gate_grads(masks)
        for p in sparsity.parameters():
            if p.grad is not None:
                p.grad.copy_(dist.all_reduce_sum(p.grad))
        values = dist.all_reduce_sum(values)
    objective_v, penalty_v = (float(v) for v in values)
    if math.isfinite(objective_v + penalty_v):
        opt.step()
        sparsity.after_step(masks, step + 1, lambda_opt, objective_v)  # multipliers, projection, budget
    logs = {"step": step + 1, "loss": objective_v + penalty_v, "objective": objective_v}
    logs.update({f"sparsity/{g}": float(v.detach()) for g, v in s.items()})
    logs["sparsity/mean"] = sum(logs[f"sparsity/{g}"] for g in s) / len(s)
    if sparsity.mode == "target":
        logs.update({f"target/{g}": v for g, v in sparsity.target_at(step).items()})
    logs.update(sparsity.state())
    return logs


def check_sizes(config: PruneConfig, masks) -> None:
    """``circuit_size`` counts against the model's node counts, before any step is trained."""
    from ..model.circuit import sizes_asked

    sizes_asked(masks.log_alpha, **config.circuit_size_kwargs())


def _end_of_run_checks(masks, sparsity, config: PruneConfig, circuit, metrics: dict) -> list:
    """Record the final expected sparsity against the targets in ``metrics`` (``sparsity/<g>``, ``target/<g>``,
    ``target_tolerance``, ``targets_missed``) and return the warnings to give: missed targets, and a
    ``circuit_size`` that the consistent cut could not keep exactly."""
    notes = []
    with torch.no_grad():
        final = {g: float(v) for g, v in expected_sparsity(masks).items()}
    metrics.update({f"sparsity/{g}": v for g, v in final.items()})
    if sparsity.mode == "budget":
        metrics.update({"kl_budget": sparsity.kl_budget, "budget/kl_average": float(sparsity.kl_average),
                        "budget/pressure": float(sparsity.pressure), "budget_missed": sparsity.budget_missed()})
        notes += missed_lines(metrics)
    elif sparsity.mode != "penalty":
        targets = sparsity.target_at(config.steps)
        metrics.update({f"target/{g}": t for g, t in targets.items()})
        metrics["target_tolerance"] = config.target_tolerance
        metrics["targets_missed"] = missed_targets(final, targets, config.target_tolerance)
        notes += missed_lines(metrics)
    kw = config.circuit_size_kwargs()
    if kw:
        from ..model.circuit import sizes_asked

        asked = sizes_asked(masks.log_alpha, **kw)
        counts = circuit.counts()
        off = {g: (n, counts[g][0]) for g, n in asked.items() if counts[g][0] != n}
        if off:
            notes.append("circuit_size: " + "; ".join(f"{g}: {n} asked, {k} kept" for g, (n, k) in off.items())
                         + " (the sizes cannot all hold in one consistent circuit: a kept node needs kept nodes "
                           "under it at each finer gated granularity)")
    return notes


def _nan_message(step: int, logs: dict, run_dir) -> str:
    kept = (f"the last good checkpoint is in {run_dir} (rerun the same command to resume from it)"
            if run_dir is not None else "nothing was saved (give run_dir= to keep checkpoints)")
    return (f"the loss became {logs['loss']} at step {step + 1} (objective {logs['objective']}); the gates were "
            f"not updated and the run stopped. {kept}. Usual causes: a learning rate too high for the lambdas "
            "or gates (lower lr / lambda_lr), a float16 model overflowing (use dtype='bfloat16' or "
            "'float32'), or a model whose own logits are not finite on this task's prompts.")


def _progress(enabled: bool, start: int, total: int):
    from tqdm.auto import tqdm

    return tqdm(total=total, initial=start, desc="pruning", unit="step", dynamic_ncols=True, mininterval=0.5,
                disable=not enabled)

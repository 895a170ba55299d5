"""The ``nodeprune`` command line: prune, show, compare, demo, selfcheck.

The options of ``prune`` and ``compare`` are PruneConfig's fields with dashes (``--batch-size``), generated
from the dataclass so the two cannot drift apart.
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import os
import sys

from .model.masks import ABLATIONS, GRANULARITIES
from .pruning.config import COARSE, DEFAULT_TARGETS, DTYPES, INITS, PruneConfig
from .pruning.objectives import OBJECTIVES
from .pruning.sparsity import SPARSITY_MODES, TARGET_UPDATES
from .utils.backend import BACKENDS

_HELP = {
    "granularities": "comma-separated granularities, or 'all' / 'coarse' (layer,attn,head,mlp)",
    "lambdas": "penalty per granularity (sparsity=penalty): one number, or g=v,g=v",
    "targets": "target sparsity per granularity (sparsity=target): one number, or g=v,g=v; default: "
               + ",".join(f"{g}={t}" for g, t in DEFAULT_TARGETS.items()),
    "task_options": "an option of the task generator, k=v (repeatable), e.g. prefix_len=12",
    "n_eval": "held-out examples: a count, or a fraction such as 0.2",
    "warmup": "fraction of the steps over which the targets ramp up (default: 0.5; 0.9 with --sparsity path)",
    "target_update": "how targets are held: projection (log_alphas shifted after each step) or lagrangian",
    "target_tolerance": "a final expected sparsity further than this from its target is reported",
    "kl_budget": "--sparsity budget: the largest training KL the circuit may have (e.g. 0.05)",
    "init": "constant (init_log_alpha for every gate) or attribution (each gate from its node's attribution rank)",
    "path_sizes": "--sparsity path: the circuit sizes to cut at, comma-separated fractions of the gated nodes",
    "circuit_size": "an exact circuit size by the gates' ranking: g=count (int) or g=fraction (float), comma-"
                    "separated (e.g. head=12,mlp_neuron=0.05), or one fraction for every gated granularity",
    "lr": "AdamW learning rate of log_alpha",
    "lambda_lr": "learning rate of the Lagrange multipliers",
    "init_log_alpha": "initial log_alpha (3: every gate open)",
    "threshold": "deterministic-gate threshold of the circuit",
    "checkpoint_every": "steps between checkpoints",
}
_CHOICES = {"ablation": ABLATIONS, "objective": OBJECTIVES, "sparsity": SPARSITY_MODES, "backend": BACKENDS,
            "dtype": DTYPES, "circuit_method": ("threshold", "expected_zeros"), "target_update": TARGET_UPDATES,
            "init": INITS}


def _granularities(text: str) -> tuple:
    if text == "all":
        return GRANULARITIES
    if text == "coarse":
        return COARSE
    return tuple(g.strip() for g in text.split(",") if g.strip())


def _scalar(text: str):
    try:
        return json.loads(text)
    except json.JSONDecodeError:
        return text


def _per_granularity(text: str):
    if "=" not in text:
        return float(text)
    out = {}
    for part in text.split(","):
        g, _, v = part.partition("=")
        out[g.strip()] = float(v)
    return out


def _n_eval(text: str):
    return float(text) if "." in text else int(text)


def _circuit_size(text: str):
    """``0.1`` (every gated granularity), or ``head=12,mlp_neuron=0.05``: ints count nodes, floats are
    fractions (the number's own type, as JSON reads it)."""
    if "=" not in text:
        return float(text)
    out = {}
    for part in text.split(","):
        g, _, v = part.partition("=")
        try:
            out[g.strip()] = json.loads(v)
        except json.JSONDecodeError:
            raise argparse.ArgumentTypeError(f"{part!r}: the value must be a count (12) or a fraction (0.05)") from None
    return out


def _fractions(text: str) -> tuple:
    return tuple(float(x) for x in text.split(",") if x.strip())


def add_config_options(parser: argparse.ArgumentParser) -> None:
    """One option per PruneConfig field."""
    defaults = PruneConfig()
    group = parser.add_argument_group("pruning options (PruneConfig)")
    for f in dataclasses.fields(PruneConfig):
        flag = "--" + f.name.replace("_", "-")
        default = getattr(defaults, f.name)
        kw = {"dest": f.name, "default": None}
        if f.name == "granularities":
            kw["type"] = _granularities
        elif f.name in ("lambdas", "targets"):
            kw["type"] = _per_granularity
        elif f.name == "task_options":
            kw.update(action="append", metavar="K=V")
        elif f.name == "n_eval":
            kw["type"] = _n_eval
        elif f.name in ("warmup", "kl_budget"):
            kw["type"] = float
        elif f.name == "circuit_size":
            kw["type"] = _circuit_size
        elif f.name == "path_sizes":
            kw["type"] = _fractions
        elif isinstance(default, bool):
            kw["action"] = argparse.BooleanOptionalAction
        else:
            kw["type"] = type(default)
        if f.name in _CHOICES:
            kw["choices"] = _CHOICES[f.name]
        shown = ",".join(map(str, default)) if f.name in ("granularities", "path_sizes") else default
        kw["help"] = _HELP.get(f.name, "") + ("" if shown is None else f" (default: {shown})")
        group.add_argument(flag, **kw)


def config_from_args(args) -> PruneConfig:
    values = {}
    for f in dataclasses.fields(PruneConfig):
        v = getattr(args, f.name)
        if v is None:
            continue
        if f.name == "task_options":
            bad = [item for item in v if "=" not in item or not item.split("=", 1)[0]]
            if bad:
                raise ValueError(f"--task-options takes name=value pairs, got {', '.join(map(repr, bad))} "
                                 "(e.g. --task-options prefix_len=12)")
            v = {k: _scalar(val) for k, _, val in (item.partition("=") for item in v)}
        values[f.name] = v
    return PruneConfig(**values)


def load_model(name: str, dtype: str = "auto", device: str = "auto"):
    """(model, tokenizer or None) from a hub id, a local directory, or "demo" (the shipped model)."""
    import torch
    import transformers

    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    elif device.startswith("cuda") and not torch.cuda.is_available():
        raise SystemExit("--device cuda: torch sees no CUDA GPU here; use --device cpu (the PyTorch reference "
                         "backend) or install a CUDA build of torch")
    if name == "demo":
        from .demo import load_demo_model

        return load_demo_model(device=device), None
    kwargs = {} if dtype == "auto" else {"dtype": getattr(torch, dtype)}
    try:
        model = transformers.AutoModelForCausalLM.from_pretrained(name, **kwargs)
    except OSError as e:
        raise SystemExit(f"could not load model {name!r}: {e}") from e
    try:
        tokenizer = transformers.AutoTokenizer.from_pretrained(name)
    except (OSError, ValueError, TypeError):
        tokenizer = None  # tasks made of text then say they need one
    return model.to(device).eval(), tokenizer


def _common(p: argparse.ArgumentParser, out_required: bool = True) -> None:
    p.add_argument("--model", required=True, help="a hub id, a local model directory, or 'demo'")
    p.add_argument("--task", required=True, help="ioi, greater_than, gender_pronoun, induction, or a .jsonl file")
    p.add_argument("--out", required=out_required, help="the run directory (a killed run resumes from it)")
    p.add_argument("--device", default="auto", help="cuda, cpu or auto (default)")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    add_config_options(p)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="nodeprune", description="Multi-granular node pruning: circuits of "
                                     "Hugging Face causal LMs.")
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("prune", help="find a model's circuit for a task")
    _common(p)
    p = sub.add_parser("compare", help="coarse (blocks, heads) against fine (every granularity) on one task, "
                       "both held to one KL budget")
    _common(p)
    p.add_argument("--versus", choices=["fine", "attribution"], default="fine",
                   help="fine (default): coarse against fine granularities; attribution: the pruning run against "
                        "AtP and IG, by MIB's CPR / CMD")
    p.add_argument("--hold", choices=["budget", "targets"], default="budget",
                   help="budget (default): both runs under --sparsity budget with one --kl-budget (default 0.1), "
                        "equally faithful; targets: each run with its own targets")
    p = sub.add_parser("attribute", help="score every node by attribution patching (atp) or integrated "
                       "gradients (ig): a fast first answer")
    _common(p)
    p.add_argument("--method", choices=["atp", "ig"], default="atp", help="atp: one forward and backward per "
                   "batch; ig: --ig-steps of them (default: atp)")
    p.add_argument("--metric", choices=["logit_diff", "kl"], default=None,
                   help="default: logit_diff for atp, kl for ig (atp cannot use kl)")
    p.add_argument("--ig-steps", type=int, default=8, help="trapezoid points over the gate value (default: 8)")
    p.add_argument("--fraction", type=float, default=0.1,
                   help="circuit.json keeps this fraction of every granularity's nodes by |score| (default: 0.1)")
    p = sub.add_parser("show", help="print a finished run's circuit and metrics, redraw its plots")
    p.add_argument("run_dir")
    p.add_argument("--html", action="store_true", help="also write RUN_DIR/circuit.html, the interactive circuit "
                   "viewer (one self-contained page), and print its path")
    p = sub.add_parser("demo", help="prune the shipped induction model and check its circuit (~1 min on CPU)")
    p.add_argument("--out", default=None, help="also write the run here")
    p.add_argument("--steps", type=int, default=None, help="training steps (default: the demo's)")
    p = sub.add_parser("selfcheck", help="run every op against its reference and report the GPU builds")
    p.add_argument("--no-compile", action="store_true", help="skip compiling the kernels for sm_90 / sm_80")
    p.add_argument("--device", choices=["cpu", "cuda"], default=None,
                   help="where the kernels run (default: cuda if available, else the CPU: the native kernels and "
                        "Triton's interpreter)")
    args = parser.parse_args(argv)

    if args.command == "selfcheck":
        import torch

        device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
        if device == "cpu":
            os.environ["TRITON_INTERPRET"] = "1"  # before the first kernel module is imported
        elif not torch.cuda.is_available():
            parser.error("--device cuda: no CUDA GPU is visible to torch; drop --device to use the CPU")
        from .selfcheck import run

        return 0 if run(device, compile_kernels=not args.no_compile) else 1
    if args.command == "show":
        from .pruning.report import plot_run, show

        try:
            print(show(args.run_dir))
        except (FileNotFoundError, ValueError) as e:
            parser.error(str(e))
        try:
            print("plots:", ", ".join(str(p) for p in plot_run(args.run_dir)))
        except ImportError as e:  # as prune does: the report stands without its plots
            print(f"plots not drawn ({e}); install matplotlib to draw them", file=sys.stderr)
        if args.html:
            from .pruning.viewer import write_html

            try:
                print("viewer:", write_html(args.run_dir))
            except (FileNotFoundError, ValueError) as e:
                parser.error(str(e))
        return 0
    if args.command == "demo":
        from .demo import demo_config, run_demo

        try:
            demo_config(args.steps)  # validates --steps before anything is loaded
        except ValueError as e:
            parser.error(str(e))
        return 0 if run_demo(run_dir=args.out, steps=args.steps) else 1

    if args.command == "compare" and args.versus == "fine" and args.hold == "budget":  # both runs held to one KL (compare_coarse_fine)
        from .pruning.compare import DEFAULT_BUDGET

        args.sparsity = "budget"
        args.kl_budget = DEFAULT_BUDGET if args.kl_budget is None else args.kl_budget
    try:
        config = config_from_args(args)
        if args.command == "attribute":  # before any model loads
            from .pruning.attribution import check_method, ig_points

            check_method(args.method, args.metric)
            if args.method == "ig":
                ig_points(args.ig_steps)
            if not 0.0 <= args.fraction <= 1.0:
                raise ValueError(f"--fraction must be in [0, 1], got {args.fraction}")
    except ValueError as e:
        parser.error(str(e))
    from .pruning import distributed as dist

    started = dist.init_from_env()  # under torchrun: one process per GPU, weights sharded with FSDP2
    try:
        try:
            from .tasks import get_task

            task = get_task(args.task, **config.task_options)  # unknown tasks, bad options: before any model loads
        except (ValueError, KeyError) as e:
            parser.error(str(e).strip("'\""))
        _prune_or_compare(args, task, config, dist.dist_info()[0])
    finally:
        if started:
            import torch.distributed

            torch.distributed.destroy_process_group()
    return 0


def _prune_or_compare(args, task, config: PruneConfig, rank: int) -> None:
    model, tokenizer = load_model(args.model, config.dtype, args.device)
    progress = not args.no_progress
    if args.command == "attribute":
        from .pruning.attribution import attribute_run

        summary = attribute_run(model, task, args.out, method=args.method, metric=args.metric,
                                ig_steps=args.ig_steps, fraction=args.fraction, config=config, tokenizer=tokenizer,
                                progress=progress)
        if rank == 0:
            print(summary)
        return
    if args.command == "prune":
        from .pruning.run import prune

        result = prune(model, task, config, tokenizer=tokenizer, run_dir=args.out, progress=progress)
        if rank == 0:
            print(result.summary())
            print(f"\nwritten to {args.out}: circuit.json, metrics.json, gates.safetensors, plots, circuit.html "
                  f"(`nodeprune show {args.out}`)")
        return
    from .pruning.compare import compare_coarse_fine, compare_methods, format_comparison, format_methods

    if args.versus == "attribution":
        cmp = compare_methods(model, task, config, tokenizer=tokenizer, run_dir=args.out, progress=progress)
        if rank == 0:
            print(format_methods(cmp))
        return

    cmp = compare_coarse_fine(model, task, config, tokenizer=tokenizer, run_dir=args.out, progress=progress,
                              hold=args.hold)
    if rank == 0:
        print(format_comparison(cmp))

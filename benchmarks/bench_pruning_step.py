"""One pruning step, four ways: the unmasked floor, eager node pruning, fused node pruning, edge pruning.

    python benchmarks/bench_pruning_step.py                # the sweep on this machine's device -> results/
    python benchmarks/bench_pruning_step.py --quick        # tiny GPT-2 and Llama, seconds: a smoke run
    python benchmarks/bench_pruning_step.py --saved-only   # exact saved bytes per token of the three shapes
    python benchmarks/bench_pruning_step.py --fit          # GPU: the largest batch that fits, per mode
    python benchmarks/plot_pruning_step.py                 # plots from the CSVs

One step is what a pruning run does per batch: the forward pass of the clean batch, the loss, the backward to
the trainable gates. Weights are frozen (requires_grad False), random (seed 0), built from configs: GPT-2 small
(12 layers, d 768, 12 heads, vocab 50257), the Llama-3.2-1B shape (16 layers, d 2048, 32 query / 8 key-value
heads of 64, SwiGLU d_ff 8192, vocab 128256, tied) and the Llama-3-8B shape (32 layers, d 4096, 32/8 heads of
128, d_ff 14336, vocab 128256); on request (``--models codellama-13b``, for --fit) the CodeLlama-13B shape (40
layers, d 5120, 40 heads of 128 without grouped-query attention, d_ff 13824, vocab 32016). bfloat16 on a GPU,
float32 on the CPU (``--dtype``). The loss is the pruning run's: KL(full || masked) of the next-token
distribution at one task position per sequence (the last), against the full model's log-probabilities computed
once per batch without grad (not timed).

Modes, each on the same model and inputs:
- floor: the unmasked frozen model, forward from input embeddings that require grad, backward to them;
- eager: ``apply_node_pruning(..., backend="reference")``, node pruning written in plain PyTorch;
- fused: ``apply_node_pruning(..., backend=<triton on CUDA, native on CPU>)``, the package's kernels;
- edge: ``benchmarks/edge_pruning.py``, Edge Pruning's disentangled residual stream, backward to its edge gates.
Ablations: zero, and interchange against a corrupted batch of other random ids (its no-grad pass runs once
per batch, before the timing, as in a run: ``masks.interchange`` / ``EdgePruning.set_corrupted``).
Granularities of the node modes: all seven (layer, attn, head, attn_neuron, mlp, mlp_neuron, mlp_out) or
coarse (layer, attn, head, mlp), i.e. neurons on and off; edge pruning has one granularity, edges.
log_alpha is drawn from N(0.5, 0.5^2) so that the sampled gates spread over (0, 1), some clamped at 0 or 1.

Figures per row:
- saved_bytes_per_token: the bytes autograd saves for backward during the forward, each storage once
  (``SavedTensorBytes``), frozen weights and gate parameters excluded (resident anyway), divided by the
  batch's tokens. Exact and device independent. The loss's own saved bytes are in loss_saved_bytes_per_token
  (the same in every mode).
- median_ms / min_ms over --repeats timed steps after --warmup untimed ones (CUDA events on a GPU; on a CPU
  time.perf_counter, and the cases take turns, one step each per round, so that load from other processes
  hits all alike: CPU times are for comparing rows of one file, nothing more); tokens_per_s from the median.
- GPU only: peak_allocated_bytes during one step (torch.cuda.max_memory_allocated, everything resident
  included) and step_peak_bytes_per_token (that peak minus what was allocated before the step, per token).
- ratios to the floor, to eager node pruning (same ablation and granularities) and to edge pruning (same
  ablation) of the same model, batch and sequence.

--saved-only counts the bytes without timing, at every --saved-points batch x seq (default 1x64 and the
papers' 32x64). Edge pruning at 32 x 64 would need 17 GB of saved tensors on GPT-2 small in float32, so the
counts are taken at batch 1 and 2 and carried to batch B as c1 + (B - 1)(c2 - c1): everything saved is per
token or per step (gates), so this is exact. The Llama shapes are counted on truncated copies (2, 3, 4 and 5
layers, full width and vocabulary): every layer but the first saves the same for node pruning, and edge
pruning's layer l saves a + b*l (its stream grows), so the bytes are a quadratic in the layer count; the fit
through 2, 3 and 4 layers must predict the 5-layer count exactly (checked; the tests check it against a
7-layer count too). ``--full`` also counts the whole model. The ``method`` column says how each row was got.

--fit (GPU): for each mode, the largest batch at --fit-seq whose step runs without running out of memory
(doubling, then bisection), one step per trial.
"""
from __future__ import annotations

import argparse
import contextlib
import functools
import gc
import os
import statistics
import sys
import time

import torch
import torch.nn.functional as F

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from common import device_slug, env_row, write_csv  # noqa: E402

ALL = ("layer", "attn", "head", "attn_neuron", "mlp", "mlp_neuron", "mlp_out")
COARSE = ("layer", "attn", "head", "mlp")
GRANULARITIES = {"all": ALL, "coarse": COARSE}


# ----------------------------------------------------------------------------------------------- the models

def model_config(name: str, n_layers: int | None = None):
    """The transformers config of a benchmark shape; ``n_layers`` truncates it (same width and vocabulary)."""
    from transformers import GPT2Config, LlamaConfig

    llama = dict(num_attention_heads=32, num_key_value_heads=8, rms_norm_eps=1e-5, hidden_act="silu",
                 attention_bias=False, mlp_bias=False, bos_token_id=128000, eos_token_id=128001)
    shapes = {
        "gpt2-small": lambda: GPT2Config(n_layer=12, n_embd=768, n_head=12, vocab_size=50257, n_positions=1024),
        "llama-3.2-1b": lambda: LlamaConfig(vocab_size=128256, hidden_size=2048, intermediate_size=8192,
                                            num_hidden_layers=16, head_dim=64, tie_word_embeddings=True,
                                            max_position_embeddings=131072, **llama),
        "llama-3-8b": lambda: LlamaConfig(vocab_size=128256, hidden_size=4096, intermediate_size=14336,
                                          num_hidden_layers=32, head_dim=128, tie_word_embeddings=False,
                                          max_position_embeddings=8192, **llama),
        "codellama-13b": lambda: LlamaConfig(vocab_size=32016, hidden_size=5120, intermediate_size=13824,
                                             num_hidden_layers=40, head_dim=128, tie_word_embeddings=False,
                                             max_position_embeddings=16384,
                                             **{**llama, "num_attention_heads": 40, "num_key_value_heads": 40,
                                                "bos_token_id": 1, "eos_token_id": 2}),
        "tiny-gpt2": lambda: GPT2Config(n_layer=2, n_embd=64, n_head=4, vocab_size=512, n_positions=256,
                                        bos_token_id=0, eos_token_id=0),
        "tiny-llama": lambda: LlamaConfig(vocab_size=512, hidden_size=64, intermediate_size=128,
                                          num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                                          head_dim=16, max_position_embeddings=256, bos_token_id=0,
                                          eos_token_id=0),
    }
    if name not in shapes:
        raise SystemExit(f"unknown model shape {name!r}; choose from {', '.join(shapes)}")
    cfg = shapes[name]()
    if n_layers is not None:
        setattr(cfg, "n_layer" if cfg.model_type == "gpt2" else "num_hidden_layers", n_layers)
    return cfg


def n_layers_of(cfg) -> int:
    return cfg.n_layer if cfg.model_type == "gpt2" else cfg.num_hidden_layers


def build_model(cfg, dtype, device):
    """Random weights (seed 0) in ``dtype`` on ``device``, eval mode, every weight frozen."""
    from transformers import AutoModelForCausalLM

    torch.manual_seed(0)
    cfg._attn_implementation = "sdpa"
    with torch.device(device):
        model = AutoModelForCausalLM.from_config(cfg, dtype=dtype)
    model.eval().requires_grad_(False)
    return model


# ------------------------------------------------------------------------------------------------ the steps

def last_position_kl(logits: torch.Tensor, full_logp: torch.Tensor) -> torch.Tensor:
    """KL(full || model) at the last position of every sequence, averaged over sequences (float32)."""
    logp = torch.log_softmax(logits[:, -1].float(), -1)
    return F.kl_div(logp, full_logp, log_target=True, reduction="sum") / logits.shape[0]


def scramble(params, seed=0):
    """log_alpha ~ N(0.5, 0.5^2): gates spread over (0, 1) as in the middle of a run."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in params:
            p.copy_((torch.randn(p.shape, generator=g) * 0.5 + 0.5).to(p))


class Case:
    """One mode on one model and batch: ``with Case(...) as case: case.step()``.

    Enter patches the model (node modes) or builds the edge-pruning wrapper, and runs the corrupted pass for
    interchange ablation; exit restores the model. ``step(saved)`` runs one pruning step.
    """

    def __init__(self, model, ids, corrupt, full_logp, mode, ablation="-", grans="-"):
        self.model, self.ids, self.corrupt, self.full_logp = model, ids, corrupt, full_logp
        self.mode, self.ablation, self.grans = mode, ablation, grans
        self.backend = backend_of(mode, ids.device.type)
        self.masks = self.edge = None
        self._stack = contextlib.ExitStack()

    def __enter__(self):
        import nodeprune_kernels as npk

        with contextlib.ExitStack() as stack:
            if self.mode in ("eager", "fused"):
                self.masks = npk.apply_node_pruning(self.model, GRANULARITIES[self.grans], ablation=self.ablation,
                                                    backend=self.backend, seed=0)
                stack.callback(npk.remove_node_pruning, self.model)
                scramble(self.masks.log_alpha[k] for k in sorted(self.masks.log_alpha))
                self.masks.train()
                if self.ablation == "interchange":
                    stack.enter_context(self.masks.interchange(input_ids=self.corrupt))
            elif self.mode == "edge":
                from edge_pruning import EdgePruning

                self.edge = EdgePruning(self.model, ablation=self.ablation).train()
                scramble(self.edge.parameters())
                if self.ablation == "interchange":
                    self.edge.set_corrupted(self.corrupt)
            elif self.mode != "floor":
                raise ValueError(f"unknown mode {self.mode!r}")
            self._stack = stack.pop_all()
        return self

    def __exit__(self, *exc):
        self.masks = self.edge = None
        return self._stack.__exit__(*exc)

    def gates(self) -> list[torch.Tensor]:
        if self.masks is not None:
            return list(self.masks.log_alpha.values())
        return list(self.edge.parameters()) if self.edge is not None else []

    def forward(self):
        if self.mode == "floor":
            emb = self.model.get_input_embeddings()(self.ids).detach().requires_grad_()
            return self.model(inputs_embeds=emb, use_cache=False).logits, [emb]
        if self.edge is not None:
            return self.edge(self.ids), self.gates()
        return self.model(input_ids=self.ids, use_cache=False).logits, self.gates()

    def step(self, saved: list | None = None):
        """One step. With ``saved`` (a list), append the SavedTensorBytes of the forward (frozen weights and
        gate parameters not counted: they are resident anyway) and of the loss."""
        from nodeprune_kernels.utils.memory import SavedTensorBytes

        if saved is None:
            logits, wrt = self.forward()
            loss = last_position_kl(logits, self.full_logp)
        else:
            with SavedTensorBytes(ignore=[*self.model.parameters(), *self.gates()]) as fwd:
                logits, wrt = self.forward()
            with SavedTensorBytes(ignore=[logits]) as lss:
                loss = last_position_kl(logits, self.full_logp)
            saved += [fwd, lss]
        del logits
        torch.autograd.grad(loss, wrt)
        return loss.detach()


def cases_for(modes, ablations, granularities):
    """(mode, ablation, granularities) of every row, floor first."""
    out = [("floor", "-", "-")] if "floor" in modes else []
    for ablation in ablations:
        for mode in ("eager", "fused"):
            if mode in modes:
                out += [(mode, ablation, g) for g in granularities]
        if "edge" in modes:
            out.append(("edge", ablation, "edges"))
    return out


def make_batch(cfg, batch, seq, device):
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(0, cfg.vocab_size, (batch, seq), generator=g).to(device)
    corrupt = torch.randint(0, cfg.vocab_size, (batch, seq), generator=g).to(device)
    return ids, corrupt


@torch.no_grad()
def full_logprobs(model, ids):
    return torch.log_softmax(model(input_ids=ids, use_cache=False).logits[:, -1].float(), -1)


def count_saved(case, tokens: int) -> dict:
    """The byte columns of one case, from one step (its first)."""
    saved = []
    loss = case.step(saved)
    fwd, lss = saved
    act = fwd.bytes
    return {"saved_bytes": act, "saved_bytes_per_token": round(act / tokens, 2), "loss_saved_bytes": lss.bytes,
            "loss_saved_bytes_per_token": round(lss.bytes / tokens, 2), "loss_step1": round(float(loss), 6)}


class Timer:
    """Wall time of a step: CUDA events on a GPU, perf_counter on the CPU."""

    def __init__(self, cuda: bool):
        self.cuda = cuda

    def __call__(self, fn) -> float:
        if self.cuda:
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            fn()
            end.record()
            end.synchronize()
            return start.elapsed_time(end)
        t0 = time.perf_counter()
        fn()
        return (time.perf_counter() - t0) * 1e3


# ------------------------------------------------------------------------------------------------ the sweep

def run_point(model, cfg, model_name, batch, seq, cases, args, base) -> list[dict]:
    """Every case at one (batch, seq): saved bytes, GPU peak memory, timed steps.

    On a GPU (or with --sequential) the cases run one after the other, each alone in memory (its peak is its own), and a case that
    runs out of memory gets a row saying so. On the CPU every case is set up first, on its own shell of the
    model, and the timed steps take turns (one step of every case per round): load from other processes then
    slows every case alike. Edge pruning above --edge-max-tokens is skipped (CPU default 1024 tokens: it
    saves about 8 MB per token on GPT-2 small in float32).
    """
    device = next(model.parameters()).device
    cuda = device.type == "cuda"
    ids, corrupt = make_batch(cfg, batch, seq, device)
    tokens = batch * seq
    full_logp = full_logprobs(model, ids)
    timer = Timer(cuda)
    common = {**base, "model": model_name, "n_layers": n_layers_of(cfg), "dtype": str(model.dtype)[6:],
              "batch": batch, "seq": seq, "tokens": tokens}

    def measure(case):
        row = {**common, "mode": case.mode, "backend": case.backend, "ablation": case.ablation,
               "granularities": case.grans, **count_saved(case, tokens)}
        if cuda:
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
            before = torch.cuda.memory_allocated()
            case.step()
            torch.cuda.synchronize()
            peak = torch.cuda.max_memory_allocated()
            row.update(peak_allocated_bytes=peak, step_peak_bytes_per_token=round((peak - before) / tokens, 1))
        for _ in range(args.warmup):
            case.step()
        print(f"  {case.mode:<5} {case.ablation:<11} {case.grans:<6} {row['saved_bytes_per_token']:12.1f} B/token "
              "saved" + (f", step peak {row['step_peak_bytes_per_token']:.0f} B/token" if cuda else ""), flush=True)
        return row

    def finish(row, times):
        med = statistics.median(times)
        row.update(repeats=args.repeats, warmup=args.warmup, median_ms=round(med, 3), min_ms=round(min(times), 3),
                   tokens_per_s=round(tokens / (med / 1e3), 1))
        return row

    limit = args.edge_max_tokens if args.edge_max_tokens is not None else (None if cuda else 1024)
    todo = []
    for spec in cases:
        if spec[0] == "edge" and limit is not None and tokens > limit:
            print(f"  edge  {spec[1]:<11} skipped: {tokens} tokens > --edge-max-tokens {limit}", flush=True)
        else:
            todo.append(spec)
    rows = []
    if cuda or args.sequential:
        for spec in todo:
            try:
                with Case(model, ids, corrupt, full_logp, *spec) as case:
                    row = measure(case)
                    rows.append(finish(row, [timer(case.step) for _ in range(args.repeats)]))
            except torch.cuda.OutOfMemoryError:
                print(f"  {' '.join(spec)}: out of memory at {batch} x {seq}", flush=True)
                rows.append({**common, "mode": spec[0], "ablation": spec[1], "granularities": spec[2],
                             "out_of_memory": True})
            case = None
            gc.collect()
            if cuda:
                torch.cuda.empty_cache()
        return rows
    with contextlib.ExitStack() as stack:
        live = []
        for spec in todo:
            case = stack.enter_context(Case(shell_of(model), ids, corrupt, full_logp, *spec))
            live.append((case, measure(case), []))
        for _ in range(args.repeats):
            for case, _, times in live:
                times.append(timer(case.step))
    return [finish(row, times) for _, row, times in live]


def shell_of(model):
    """A copy of the model's modules sharing its weights and buffers: each case patches its own shell."""
    import copy

    return copy.deepcopy(model, memo={id(t): t for t in (*model.parameters(), *model.buffers())})


def add_ratios(rows: list[dict]) -> list[dict]:
    """saved_vs_* and time_vs_* columns against the floor, eager (same ablation and granularities) and edge
    (same ablation) rows of the same model, dtype, batch and sequence."""
    def key(r, **kw):
        return tuple({**r, **kw}[k] for k in ("model", "dtype", "batch", "seq", "mode", "ablation", "granularities"))

    index = {key(r): r for r in rows}
    for r in rows:
        refs = {"floor": index.get(key(r, mode="floor", ablation="-", granularities="-")),
                "eager": index.get(key(r, mode="eager")) if r["mode"] != "edge" else None,
                "edge": index.get(key(r, mode="edge", granularities="edges")) if r["mode"] != "floor" else None}
        for name, ref in refs.items():
            for col, what in (("saved", "saved_bytes_per_token"), ("time", "median_ms")):
                ok = ref is not None and ref is not r and ref.get(what) not in (None, "", 0) and what in r
                r[f"{col}_vs_{name}"] = round(r[what] / ref[what], 4) if ok else ""
    return rows


FIRST = ["device", "model", "dtype", "mode", "backend", "ablation", "granularities", "batch", "seq", "tokens",
         "saved_bytes_per_token", "median_ms", "tokens_per_s", "peak_allocated_bytes", "step_peak_bytes_per_token",
         "saved_vs_floor", "saved_vs_eager", "saved_vs_edge", "time_vs_floor", "time_vs_eager", "time_vs_edge"]


def ordered(rows):
    return [{**{k: r.get(k, "") for k in FIRST}, **r} for r in rows]


def sweep(args, dtype, device):
    base = env_row()
    modes = args.modes.split(",")
    cases = cases_for(modes, args.ablations.split(","), args.granularities.split(","))
    rows = []
    for model_name in args.models.split(","):
        cfg = model_config(model_name)
        model = build_model(cfg, dtype, device)
        for point in points(args, model_name):
            batch, seq = point
            print(f"{model_name} batch {batch} seq {seq}", flush=True)
            rows += run_point(model, cfg, model_name, batch, seq, cases, args, base)
        del model
        gc.collect()
        if device == "cuda":
            torch.cuda.empty_cache()
    return ordered(add_ratios(rows))


DEFAULT_POINTS = {  # (batch, seq): the edge-pruning papers' 32 x 64 on GPT-2 small, then batch and seq sweeps
    "cuda": {"gpt2-small": "32x64,8x64,128x64,8x256,8x1024,32x1024",
             "llama-3.2-1b": "32x64,8x256,8x1024,32x1024", "llama-3-8b": "8x64,8x256,8x1024,16x1024"},
    "cpu": {"gpt2-small": "32x64,8x64,8x256"},
}


def parse_points(spec: str, option: str = "--points") -> list[tuple[int, int]]:
    """"32x64,8x256" -> [(32, 64), (8, 256)]; SystemExit naming ``option`` otherwise."""
    try:
        pts = [tuple(int(v) for v in p.split("x")) for p in spec.split(",")]
    except ValueError:
        pts = []
    if not pts or any(len(p) != 2 or min(p) < 1 for p in pts):
        raise SystemExit(f"{option} takes BATCHxSEQ[,BATCHxSEQ...], e.g. 32x64,8x256; got {spec!r}")
    return pts


def points(args, model_name):
    return parse_points(args.points or DEFAULT_POINTS["cuda" if args.cuda else "cpu"].get(model_name, "8x64"))


# ------------------------------------------------------------------------------------- exact saved bytes only

def saved_only(args, dtype, device):
    """Saved bytes per token of every case at every --saved-points batch x seq, without timing.

    Counted at batch 1 and 2 of each sequence length and taken to batch B as c1 + (B - 1)(c2 - c1) (what is
    saved is per token or per step, so it is linear in the batch); GPT-2 small on the whole model, the Llama
    shapes on 2-5 layers taken to their depth by ``extrapolate`` (``--full`` counts them whole as well).
    """
    base = env_row()
    rows = []
    points = parse_points(args.saved_points, "--saved-points")
    cases = cases_for(args.modes.split(","), args.ablations.split(","), args.granularities.split(","))
    for model_name in args.models.split(","):
        cfg = model_config(model_name)
        L = n_layers_of(cfg)
        methods = ["extrapolated"] if L > 5 and cfg.model_type == "llama" else []
        if not methods or args.full:
            methods.insert(0, "measured")
        for method in methods:
            depths = (L,) if method == "measured" else (2, 3, 4, 5)
            for seq in sorted({s for _, s in points}):
                counts = count_models(model_name, depths, cases, seq, dtype, device)
                for batch in [b for b, s in points if s == seq]:
                    for case in cases:
                        c = {n: at_batch(counts[case][n], batch) for n in depths}
                        if method == "measured":
                            total = c[L]
                        else:
                            total = extrapolate(c, L, f"{model_name} {' '.join(case)}")
                        loss = at_batch(counts[case][depths[0]], batch, "loss_saved_bytes")
                        mode, ablation, grans = case
                        tokens = batch * seq
                        rows.append({**base, "model": model_name, "n_layers": L, "dtype": str(dtype)[6:],
                                     "mode": mode, "backend": backend_of(mode, device), "ablation": ablation,
                                     "granularities": grans, "batch": batch, "seq": seq, "tokens": tokens,
                                     "saved_bytes_per_token": round(total / tokens, 2),
                                     "loss_saved_bytes_per_token": round(loss / tokens, 2),
                                     "method": method + ("" if method == "measured" else " (2-5 layers)")
                                     + ("" if batch in (1, 2) else " (batch 1, 2)")})
                        print(f"{model_name:<13} {method:<12} {batch:>3}x{seq:<5} {mode:<5} {ablation:<11} "
                              f"{grans:<6} {total / tokens:14.1f} B/token", flush=True)
    return ordered(add_ratios(rows))


def at_batch(counts: dict, batch: int, key: str = "saved_bytes") -> int:
    """The count at ``batch`` from the counts at batch 1 and 2 (``{1: row, 2: row}``), linear in the batch."""
    c1, c2 = counts[1][key], counts[2][key]
    return c1 + (batch - 1) * (c2 - c1)


FUSED_BACKEND = "auto"  # --fused-backend: "auto" is the native kernels on a CPU, Triton on a GPU


def backend_of(mode, device) -> str:
    fused = FUSED_BACKEND if FUSED_BACKEND != "auto" else "native" if str(device) == "cpu" else "triton"
    return {"eager": "reference", "fused": fused}.get(mode, "")


def extrapolate(counts: dict[int, int], n_layers: int, what: str = "") -> int:
    """The count at ``n_layers`` from the counts at 2, 3, 4 and 5 layers: the quadratic through 2, 3 and 4
    layers, which must give the 5-layer count exactly (else SystemExit: the model must be counted whole)."""
    c2, c3, c4 = counts[2], counts[3], counts[4]
    d1, d2 = c3 - c2, c4 - 2 * c3 + c2

    def predict(n):
        return c2 + (n - 2) * d1 + (n - 2) * (n - 3) // 2 * d2

    if predict(5) != counts[5]:
        raise SystemExit(f"{what}: the saved bytes are not quadratic in the layer count "
                         f"({[counts[n] for n in (2, 3, 4, 5)]}); count the full model (--full)")
    return predict(n_layers)


def count_models(model_name, layer_counts, cases, seq, dtype, device, batches=(1, 2)) -> dict:
    """{case: {n_layers: {batch: count_saved row}}} at batch x ``seq`` for each of ``batches``."""
    out = {case: {n: {} for n in layer_counts} for case in cases}
    for n in layer_counts:
        cfg = model_config(model_name, n)
        model = build_model(cfg, dtype, device)
        for batch in batches:
            ids, corrupt = make_batch(cfg, batch, seq, device)
            full_logp = full_logprobs(model, ids)
            for case in cases:
                with Case(model, ids, corrupt, full_logp, *case) as c:
                    out[case][n][batch] = count_saved(c, batch * seq)
        del model
        gc.collect()
    return out


# -------------------------------------------------------------------------------------- largest batch that fits

def largest_fitting(fits, cap: int) -> int:
    """The largest n in [1, cap] with ``fits(n)``, assuming fits is monotone (0 if fits(1) is False):
    doubling from 1, then bisection between the last n that fitted and the first that did not."""
    lo, hi = 0, 1
    while hi <= cap and fits(hi):
        lo, hi = hi, hi * 2
    hi = min(hi, cap + 1)
    while hi - lo > 1:
        mid = (lo + hi) // 2
        lo, hi = (mid, hi) if fits(mid) else (lo, mid)
    return lo


def step_fits(model, cfg, case_spec, batch, seq) -> bool:
    """Whether one step of ``case_spec`` at batch x seq runs without running out of GPU memory."""
    device = next(model.parameters()).device
    try:
        ids, corrupt = make_batch(cfg, batch, seq, device)
        full_logp = full_logprobs(model, ids)
        with Case(model, ids, corrupt, full_logp, *case_spec) as case:
            case.step()
        torch.cuda.synchronize()
        ok = True
    except torch.cuda.OutOfMemoryError:
        ok = False
    ids = corrupt = full_logp = case = None
    gc.collect()
    torch.cuda.empty_cache()
    print(f"  {' '.join(case_spec)} batch {batch} x {seq}: {'fits' if ok else 'out of memory'}", flush=True)
    return ok


def fit(args, dtype, device):
    if device != "cuda":
        raise SystemExit("--fit measures the GPU's memory: it needs a CUDA GPU")
    base, rows = env_row(), []
    cases = cases_for(args.modes.split(","), args.ablations.split(","), args.granularities.split(","))
    for model_name in args.models.split(","):
        cfg = model_config(model_name)
        model = build_model(cfg, dtype, device)
        seq = args.fit_seq

        for case_spec in cases:
            fits = functools.partial(step_fits, model, cfg, case_spec, seq=seq)
            batch = largest_fitting(fits, args.fit_cap)
            mode, ablation, grans = case_spec
            rows.append({**base, "model": model_name, "dtype": str(dtype)[6:], "mode": mode, "ablation": ablation,
                         "granularities": grans, "seq": seq, "max_batch": batch, "max_tokens": batch * seq,
                         "fit_cap_batch": args.fit_cap})
        del model
        gc.collect()
        torch.cuda.empty_cache()
    return rows


# ----------------------------------------------------------------------------------------------------- main

def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__)
    ap.add_argument("--models", default=None, help="comma list of gpt2-small, llama-3.2-1b, llama-3-8b, "
                                                   "codellama-13b, tiny-gpt2, tiny-llama (default: the first three "
                                                   "on a GPU, gpt2-small on a CPU)")
    ap.add_argument("--points", default=None, help="BATCHxSEQ,... for every model (default: per model and device)")
    ap.add_argument("--modes", default="floor,eager,fused,edge")
    ap.add_argument("--ablations", default="zero,interchange")
    ap.add_argument("--granularities", default="all,coarse", help="node modes: all (neurons on), coarse (off)")
    ap.add_argument("--dtype", default=None, choices=["bfloat16", "float16", "float32"],
                    help="default bfloat16 on a GPU, float32 on a CPU")
    ap.add_argument("--repeats", type=int, default=None, help="timed steps per row (default 20 GPU, 3 CPU)")
    ap.add_argument("--warmup", type=int, default=None, help="untimed steps per row (default 3 GPU, 1 CPU)")
    ap.add_argument("--quick", action="store_true", help="tiny GPT-2 and Llama, 2 x 32 tokens: a smoke run")
    ap.add_argument("--threads", type=int, default=None, help="torch.set_num_threads (CPU; default torch's)")
    ap.add_argument("--sequential", action="store_true", help="one case after the other (default on a GPU) "
                                                              "instead of interleaved timed steps")
    ap.add_argument("--edge-max-tokens", type=int, default=None,
                    help="skip edge pruning above this many tokens per batch (default: CPU 1024, GPU no limit)")
    ap.add_argument("--saved-only", action="store_true", help="exact saved bytes only (no timing), any device")
    ap.add_argument("--saved-points", default="1x64,32x64", help="--saved-only: BATCHxSEQ,... (default 1x64,32x64)")
    ap.add_argument("--full", action="store_true", help="--saved-only: count the 8B shape on the full model too")
    ap.add_argument("--fit", action="store_true", help="GPU: the largest batch at --fit-seq per mode")
    ap.add_argument("--fit-seq", type=int, default=1024)
    ap.add_argument("--fit-cap", type=int, default=4096, help="--fit: the largest batch tried")
    ap.add_argument("--fused-backend", default="auto", choices=["auto", "triton", "native"],
                    help="the fused mode's kernels (default: Triton on a GPU, native on a CPU; triton on a CPU runs "
                         "Triton's interpreter, a smoke test)")
    ap.add_argument("--out", default=None, help="CSV path (default: results/<kind>_<device>.csv; --quick writes "
                                                "nothing unless --out is given)")
    args = ap.parse_args(argv)
    args.cuda = torch.cuda.is_available()
    global FUSED_BACKEND
    FUSED_BACKEND = args.fused_backend
    if args.fused_backend == "triton" and not args.cuda:
        os.environ.setdefault("TRITON_INTERPRET", "1")  # read when the kernels are first imported
    if args.threads:
        torch.set_num_threads(args.threads)
    device = "cuda" if args.cuda else "cpu"
    dtype = getattr(torch, args.dtype or ("bfloat16" if args.cuda else "float32"))
    if args.quick:
        args.models = args.models or "tiny-gpt2,tiny-llama"
        args.points = args.points or "2x32"
        args.saved_points = "1x32,3x32" if args.saved_points == "1x64,32x64" else args.saved_points
    args.models = args.models or ("gpt2-small,llama-3.2-1b,llama-3-8b" if args.cuda or args.saved_only
                                  else "gpt2-small")
    args.repeats = args.repeats or (20 if args.cuda else (2 if args.quick else 3))
    args.warmup = args.warmup if args.warmup is not None else (3 if args.cuda else 1)
    t0 = time.perf_counter()
    if args.saved_only:
        kind, rows = f"saved_bytes_{str(dtype)[6:]}", saved_only(args, dtype, device)
    elif args.fit:
        kind, rows = "max_fit", fit(args, dtype, device)
    else:
        kind, rows = "pruning_step", sweep(args, dtype, device)
    if not args.quick or args.out:
        print("wrote", write_csv(rows, f"{kind}_{device_slug()}.csv", args.out))
    print(f"total {time.perf_counter() - t0:.0f} s")
    return rows


if __name__ == "__main__":
    main()

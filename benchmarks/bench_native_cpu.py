"""CPU pruning-step time and saved bytes of a GPT-2-small model: native C++ kernels against the PyTorch reference.

    python benchmarks/bench_native_cpu.py             # GPT-2 small, batch 8 x seq 64 -> results/native_cpu.csv
    python benchmarks/bench_native_cpu.py --quick     # a tiny GPT-2 for a smoke run (< 30 s), not written by default
    python benchmarks/bench_native_cpu.py --profile   # also the top ops of one native step (torch.profiler)

The model: GPT2Config(n_layer=12, n_embd=768, n_head=12, vocab_size=50257), random weights (seed 0), float32,
eval mode (no dropout), every weight frozen with requires_grad_(False). One pruning step is: the forward pass
of the clean batch, the loss, the backward. The loss is KL(full model || masked model) of the next-token
distributions at every position (sum over positions / tokens), against the full model's log-probabilities
computed once, without grad, before the timing (as a pruning run does per batch; that pass is not timed).
Modes:
- floor: the unpatched frozen model, forward from input embeddings that require grad and backward to them
  (every layer's backward runs; no gates). HF computes GPT-2's gelu_new as separate tensor ops, each saving a
  d_ff tensor, so this floor saves more than the masked modes, whose MLPs use one fused tanh-GELU; the masked
  modes also skip layer 0's attention backward (nothing below the first gate needs a gradient);
- reference / native: ``apply_node_pruning(model, granularities, ablation, backend)``, backward to the gates
  (``log_alpha.grad``). log_alpha is drawn from N(0.5, 0.5^2) (seed 0) so that sampled gates take values
  across (0, 1), some clamped, as in the middle of a run; a fresh gate sample every step.
Ablations: zero, and interchange with the corrupted batch other random ids: ``with masks.interchange(
input_ids=corrupt)`` is entered once before the timing (its no-grad pass of the corrupted batch is the same for
both backends; its time is the column interchange_setup_ms, not in the step time). Granularities: all seven
(layer, attn, head, attn_neuron, mlp, mlp_neuron, mlp_out) and coarse (layer, attn, head, mlp).

Every case runs on its own shell of the model (modules copied, frozen weights shared), all patched at once.
After each case's untimed steps (the byte count, then --warmup) the --repeats timed steps take turns, one step
of every case per round, so that load from other processes slows every case alike.

Figures per row: median and min step time (time.perf_counter) over the timed steps, tokens/s from the median,
and the exact bytes saved for backward per token (SavedTensorBytes, in the untimed first step) by the model's
forward: frozen weights and log_alpha excluded (resident anyway; the bytes of frozen weights autograd does keep
a reference to, e.g. for the input gradient of a linear layer, are in weight_bytes_referenced), and the loss's
own saved tensors (the log-softmax of the logits, the same in every mode) in loss_saved_bytes_per_token. Native
rows also give the relative error of their log_alpha gradient (all granularities as one vector) against the
reference's for the same gate sample (step 1, same seed); masked rows their time and saved-bytes ratios to the
reference row of the same ablation and granularities. The CSV has the CPU model (/proc/cpuinfo), cores,
threads, versions, date, the library's commit, and the 1-minute load average at the start and the end (other
processes on a shared machine slow the steps: compare min_ms too).
"""
from __future__ import annotations

import argparse
import contextlib
import copy
import datetime
import os
import statistics
import sys
import time

import torch
import torch.nn.functional as F

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from common import cpu_name, git_commit, storage_key, write_csv  # noqa: E402

ALL = ("layer", "attn", "head", "attn_neuron", "mlp", "mlp_neuron", "mlp_out")
COARSE = ("layer", "attn", "head", "mlp")


def env_row() -> dict:
    import transformers

    return {"device": cpu_name(), "cores": os.cpu_count(), "threads": torch.get_num_threads(),
            "torch": torch.__version__, "transformers": transformers.__version__, "commit": git_commit(),
            "date": datetime.date.today().isoformat()}


def make_model(quick: bool):
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(0)
    if quick:
        cfg = GPT2Config(n_layer=2, n_embd=64, n_head=4, vocab_size=1000, n_positions=128,
                         bos_token_id=999, eos_token_id=999)
    else:
        cfg = GPT2Config(n_layer=12, n_embd=768, n_head=12, vocab_size=50257)
    model = GPT2LMHeadModel(cfg).float().eval()
    model.requires_grad_(False)
    return model, cfg


def kl_loss(logits: torch.Tensor, full_logp: torch.Tensor) -> torch.Tensor:
    """KL(full || model), summed over positions and vocabulary, divided by the number of positions."""
    logp = torch.log_softmax(logits.float(), -1)
    return F.kl_div(logp, full_logp, log_target=True, reduction="sum") / logits[..., 0].numel()


def scramble(masks, seed=0):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name in sorted(masks.log_alpha):
            la = masks.log_alpha[name]
            la.copy_(torch.randn(la.shape, generator=g) * 0.5 + 0.5)


class Case:
    """One row: a step function, what it differentiates, and its setup/teardown."""

    def __init__(self, model, ids, full_logp, mode, ablation="-", grans=(), corrupt=None):
        self.model, self.ids, self.full_logp = model, ids, full_logp
        self.mode, self.ablation, self.grans, self.corrupt = mode, ablation, grans, corrupt
        self.masks = None
        self.setup_ms = None

    def __enter__(self):
        import nodeprune_kernels as npk

        if self.mode != "floor":
            self.masks = npk.apply_node_pruning(self.model, granularities=self.grans, ablation=self.ablation,
                                                backend=self.mode, seed=0)
            scramble(self.masks)
            self.masks.train()
        self._ctx = None
        if self.ablation == "interchange":
            t0 = time.perf_counter()
            self._ctx = self.masks.interchange(input_ids=self.corrupt)
            self._ctx.__enter__()
            self.setup_ms = (time.perf_counter() - t0) * 1e3
        return self

    def __exit__(self, *exc):
        import nodeprune_kernels as npk

        if self._ctx is not None:
            self._ctx.__exit__(*exc)
        if self.masks is not None:
            npk.remove_node_pruning(self.model)

    def forward(self):
        if self.mode == "floor":
            emb = self.model.transformer.wte(self.ids).detach().requires_grad_()
            return self.model(inputs_embeds=emb, use_cache=False).logits, emb
        return self.model(input_ids=self.ids, use_cache=False).logits, None

    def step(self, saved=None):
        """One step; with ``saved`` (a list) it appends the SavedTensorBytes of the forward and of the loss."""
        from nodeprune_kernels.utils.memory import SavedTensorBytes

        if self.masks is not None:
            self.masks.zero_grad(set_to_none=True)
        if saved is None:
            logits, emb = self.forward()
            loss = kl_loss(logits, self.full_logp)
        else:
            with SavedTensorBytes() as fwd:
                logits, emb = self.forward()
            with SavedTensorBytes(ignore=[logits]) as lss:
                loss = kl_loss(logits, self.full_logp)
            saved += [fwd, lss]
        if emb is not None:
            torch.autograd.grad(loss, [emb])
        else:
            loss.backward()
        return loss.detach()

    def grads(self):
        return {g: la.grad.detach().clone() for g, la in self.masks.log_alpha.items()}


def run(args):
    model, cfg = make_model(args.quick)
    params = {storage_key(p) for p in model.parameters()}
    gen = torch.Generator().manual_seed(1)
    ids = torch.randint(0, cfg.vocab_size, (args.batch, args.seq), generator=gen)
    corrupt = torch.randint(0, cfg.vocab_size, (args.batch, args.seq), generator=gen)
    tokens = args.batch * args.seq
    with torch.no_grad():
        full_logp = torch.log_softmax(model(input_ids=ids, use_cache=False).logits.float(), -1)

    cases = [("floor", "-", "-")]
    for grans_name in ("all", "coarse"):
        for ablation in ("zero", "interchange"):
            for mode in ("reference", "native"):
                cases.append((mode, ablation, grans_name))
    gran_sets = {"all": ALL, "coarse": COARSE, "-": ()}
    base = env_row()
    rows, ref_grads = [], {}
    load0 = os.getloadavg()[0]
    with contextlib.ExitStack() as stack:
        # every case on its own shell of the model (modules copied, the frozen weights shared), all patched
        # at once, so that the timed steps can take turns (see below)
        live = []
        for mode, ablation, grans_name in cases:
            shell = copy.deepcopy(model, memo={id(t): t for t in (*model.parameters(), *model.buffers())})
            case = stack.enter_context(Case(shell, ids, full_logp, mode, ablation, gran_sets[grans_name], corrupt))
            saved = []
            loss1 = case.step(saved)  # step 1: the byte count, and the gradients compared across backends
            fwd, lss = saved
            masks_keys = set() if case.masks is None else {storage_key(la) for la in case.masks.log_alpha.values()}
            act_bytes = sum(n for k, n in fwd._seen.items() if k not in params and k not in masks_keys)
            row = {**base, "mode": mode, "ablation": ablation, "granularities": grans_name,
                   "batch": args.batch, "seq": args.seq, "dtype": "float32",
                   "loss": "kl_to_full_logits_all_positions",
                   "saved_bytes_per_token": round(act_bytes / tokens, 2),
                   "weight_bytes_referenced": sum(n for k, n in fwd._seen.items() if k in params),
                   "loss_saved_bytes_per_token": round(lss.bytes / tokens, 2),
                   "interchange_setup_ms": round(case.setup_ms, 2) if case.setup_ms is not None else "",
                   "loss_step1": round(float(loss1), 6), "grad_rel_err_vs_reference": ""}
            key = (ablation, grans_name)
            if mode == "reference":
                ref_grads[key] = case.grads()
            elif mode == "native":
                g_n, g_r = case.grads(), ref_grads[key]
                vn = torch.cat([g_n[k].double().flatten() for k in sorted(g_n)])
                vr = torch.cat([g_r[k].double().flatten() for k in sorted(g_r)])
                row["grad_rel_err_vs_reference"] = float((vn - vr).norm() / vr.norm().clamp_min(1e-300))
            for _ in range(args.warmup):
                case.step()
            live.append((case, row, []))
            print(f"{mode:<9} {ablation:<11} {grans_name:<6} set up: {row['saved_bytes_per_token']:10.1f} B/token "
                  f"saved" + (f", grad rel err vs reference {row['grad_rel_err_vs_reference']:.2e}"
                              if mode == "native" else ""), flush=True)
        # the timed steps take turns, one step of every case per round: load from other processes (a shared
        # machine) then slows every case alike instead of whichever case ran while it lasted
        for r in range(args.repeats):
            t_round = time.perf_counter()
            for case, _, times in live:
                t0 = time.perf_counter()
                case.step()
                times.append(time.perf_counter() - t0)
            print(f"round {r + 1}/{args.repeats}: {time.perf_counter() - t_round:.1f} s, "
                  f"load {os.getloadavg()[0]:.2f}", flush=True)
    load1 = os.getloadavg()[0]
    ref_rows = {}
    for case, row, times in live:
        med, lo = statistics.median(times) * 1e3, min(times) * 1e3
        row.update({"repeats": args.repeats, "warmup": args.warmup, "median_ms": round(med, 2),
                    "min_ms": round(lo, 2), "tokens_per_s": round(tokens / (med / 1e3), 1),
                    "loadavg_1min_start": round(load0, 2), "loadavg_1min_end": round(load1, 2)})
        key = (row["ablation"], row["granularities"])
        if row["mode"] == "reference":
            ref_rows[key] = row
        if row["mode"] == "floor":
            row["time_vs_reference"] = row["saved_vs_reference"] = ""
        else:
            ref = ref_rows[key]
            row["time_vs_reference"] = round(med / ref["median_ms"], 4)
            row["saved_vs_reference"] = round(row["saved_bytes_per_token"] / ref["saved_bytes_per_token"], 4)
        rows.append(row)
    first = ["device", "cores", "threads", "torch", "transformers", "commit", "date", "mode", "ablation",
             "granularities", "batch", "seq", "median_ms", "min_ms", "tokens_per_s", "saved_bytes_per_token",
             "time_vs_reference", "saved_vs_reference", "grad_rel_err_vs_reference"]
    rows = [{**{k: r[k] for k in first}, **r} for r in rows]
    print(f"\n{'mode':<9} {'ablation':<11} {'grans':<6} {'median ms':>10} {'min ms':>10} {'tokens/s':>9} "
          f"{'saved B/token':>14} {'time/ref':>9} {'saved/ref':>9}")
    for r in rows:
        print(f"{r['mode']:<9} {r['ablation']:<11} {r['granularities']:<6} {r['median_ms']:10.1f} {r['min_ms']:10.1f} "
              f"{r['tokens_per_s']:9.1f} {r['saved_bytes_per_token']:14.1f} {r['time_vs_reference']!s:>9} "
              f"{r['saved_vs_reference']!s:>9}")
    if args.profile:
        profile(model, ids, full_logp)
    return rows


def profile(model, ids, full_logp, top=20):
    from torch.profiler import ProfilerActivity, profile as prof

    with Case(model, ids, full_logp, "native", "zero", ALL) as case:
        case.step()
        with prof(activities=[ProfilerActivity.CPU]) as p:
            case.step()
    print(p.key_averages().table(sort_by="self_cpu_time_total", row_limit=top))


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--seq", type=int, default=64)
    ap.add_argument("--repeats", type=int, default=None, help="timed steps per row (default 8; --quick 3)")
    ap.add_argument("--warmup", type=int, default=1, help="untimed steps before the timing (after the byte count)")
    ap.add_argument("--quick", action="store_true", help="a tiny GPT-2 (2 layers, d 64, vocab 1000): a smoke run")
    ap.add_argument("--threads", type=int, default=None, help="torch.set_num_threads (default: torch's)")
    ap.add_argument("--profile", action="store_true", help="print the top ops of one native step")
    ap.add_argument("--out", default=None, help="CSV path (default: benchmarks/results/native_cpu.csv; with "
                                                "--quick nothing is written unless --out is given)")
    args = ap.parse_args()
    if args.repeats is None:
        args.repeats = 3 if args.quick else 8
    if args.threads:
        torch.set_num_threads(args.threads)
    t0 = time.perf_counter()
    rows = run(args)
    if not args.quick or args.out:
        print("wrote", write_csv(rows, "native_cpu.csv", args.out))
    print(f"total {time.perf_counter() - t0:.0f} s")


if __name__ == "__main__":
    main()

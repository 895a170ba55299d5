"""The demo model shipped in the package: a 2-layer Llama trained on induction, and its known mechanism.

``nodeprune demo`` prunes this model on an induction task; this module loads the model, measures which heads
implement the mechanism (a previous-token head in layer 0 that an induction head in layer 1 composes with),
and checks a found :class:`~nodeprune_kernels.Circuit` against it.

The data format (shared by the training script ``scripts/train_demo_model.py``, the scores and the tests):
``[BOS=0, x_1 .. x_P, x_1 .. x_P]`` where ``x`` are P *distinct* tokens drawn from ``[1, vocab)``. The logits
at position t predict token t+1; in the repeated half (positions P+1 .. 2P-1 predicting P+2 .. 2P) the next
token is the one that followed the earlier occurrence of the current token, which is what induction does.
"""
from __future__ import annotations

import contextlib
from pathlib import Path

import torch

DEMO_MODEL_DIR = Path(__file__).resolve().parent / "demo_model"
BOS = 0
MECHANISM_THRESHOLD = 0.5  # a head belongs to the mechanism when its mean score clears this


def load_demo_model(dtype=torch.float32, device="cpu"):
    """The shipped demo model (a ``transformers.LlamaForCausalLM``), SDPA attention, in eval mode. Offline."""
    import transformers

    if not (DEMO_MODEL_DIR / "model.safetensors").is_file():
        raise FileNotFoundError(f"the demo model is missing from {DEMO_MODEL_DIR} (a package-data install problem; "
                                "rebuild it with scripts/train_demo_model.py)")
    from transformers.utils import logging as hf_logging

    bar = hf_logging.is_progress_bar_enabled()
    hf_logging.disable_progress_bar()  # a 90k-parameter model needs no "Loading weights" bar
    try:
        model = transformers.LlamaForCausalLM.from_pretrained(DEMO_MODEL_DIR, dtype=dtype, local_files_only=True,
                                                              attn_implementation="sdpa")
    finally:
        if bar:
            hf_logging.enable_progress_bar()
    return model.to(device).eval()


# --------------------------------------------------------------------------------------------- data
def induction_batch(n: int, prefix_len: int, vocab_size: int, generator: torch.Generator | None = None,
                    ) -> torch.Tensor:
    """``n`` sequences ``[BOS, x_1..x_P, x_1..x_P]`` ([n, 1 + 2P] long), the P tokens distinct, in [1, vocab)."""
    if not 1 <= prefix_len <= vocab_size - 1:
        raise ValueError(f"prefix_len must be in [1, {vocab_size - 1}] for a vocabulary of {vocab_size}")
    prefix = torch.rand(n, vocab_size - 1, generator=generator).argsort(dim=1)[:, :prefix_len] + 1
    bos = torch.full((n, 1), BOS, dtype=torch.long)
    return torch.cat([bos, prefix, prefix], dim=1)


def half_losses(logits: torch.Tensor, ids: torch.Tensor, prefix_len: int) -> tuple[float, float]:
    """Mean next-token loss (nats) over the first half (predicting x_1..x_P) and over the predictable part of
    the repeated half (predicting its tokens 2..P, from positions P+1 .. 2P-1)."""
    P = prefix_len
    logp = torch.log_softmax(logits.float(), dim=-1)
    nll = -logp[:, :-1].gather(-1, ids[:, 1:, None]).squeeze(-1)  # nll[:, t] for the prediction at position t
    return float(nll[:, :P].mean()), float(nll[:, P + 1:2 * P].mean())


@torch.no_grad()
def induction_losses(model, n: int = 64, prefix_len: int = 16, seed: int = 0) -> tuple[float, float]:
    """(first-half loss, repeated-half loss) of ``model`` on fresh repeated sequences."""
    ids = induction_batch(n, prefix_len, model.config.vocab_size, torch.Generator().manual_seed(seed))
    device = next(model.parameters()).device
    logits = model(ids.to(device)).logits
    return half_losses(logits.cpu(), ids, prefix_len)


@torch.no_grad()
def ablated_induction_losses(model, kept_heads: torch.Tensor, n: int = 64, prefix_len: int = 16,
                             seed: int = 0) -> tuple[float, float]:
    """:func:`induction_losses` with every head not in ``kept_heads`` (bool [L, H]) zero-ablated: its slice of
    the attention output projection's input is set to 0. A check of a circuit's heads that needs none of the
    pruning machinery; a patched model is measured unpatched."""
    from .model.families import family_of, model_dims
    from .model.patch import unpatched

    family = family_of(model)
    D = model_dims(model, family).head_dim
    kept_heads = torch.as_tensor(kept_heads, dtype=torch.bool)
    handles = []
    for i, layer in enumerate(family.decoder_layers(model)):
        closed = (~kept_heads[i]).nonzero().flatten().tolist()
        if not closed:
            continue

        def pre(module, args, closed=closed):
            x = args[0].unflatten(-1, (-1, D)).clone()
            x[..., closed, :] = 0
            return (x.flatten(-2),) + tuple(args[1:])
        handles.append(family.out_proj(layer).register_forward_pre_hook(pre))
    try:
        with unpatched(model):
            return induction_losses(model, n=n, prefix_len=prefix_len, seed=seed)
    finally:
        for h in handles:
            h.remove()


# --------------------------------------------------------------------------------------------- scores
@contextlib.contextmanager
def _eager_attention(model):
    """The model runs eager attention (which returns the attention weights) inside the block."""
    old = model.config._attn_implementation
    if old == "eager":
        yield
        return
    model.set_attn_implementation("eager")
    try:
        yield
    finally:
        model.set_attn_implementation(old)


@torch.no_grad()
def attention_patterns(model, input_ids: torch.Tensor) -> torch.Tensor:
    """Every head's attention weights on ``input_ids``: [L, B, H, T, T] float32 (CPU).

    Runs the model with eager attention (switched temporarily, then restored) and reads the weights that the
    attention modules return through forward hooks, so it does not depend on ``output_attentions``. A model
    patched by :func:`nodeprune_kernels.apply_node_pruning` is measured unpatched (its original weights and
    attention, not a gate sample): the patch is taken out for the call and put back.
    """
    from .model.families import family_of
    from .model.patch import unpatched

    family = family_of(model)
    layers = family.decoder_layers(model)
    found: dict = {}
    handles = []
    for i, layer in enumerate(layers):
        def hook(module, args, output, i=i):
            found[i] = output[1]
        handles.append(family.attention(layer).register_forward_hook(hook))
    was_training = model.training
    try:
        with unpatched(model), _eager_attention(model):
            model.eval()
            device = next(model.parameters()).device
            model(input_ids.to(device), use_cache=False)
    finally:
        for h in handles:
            h.remove()
        model.train(was_training)
    missing = [i for i in range(len(layers)) if found.get(i) is None]
    if missing:
        raise RuntimeError(f"no attention weights came back from layers {missing} (eager attention must return them)")
    return torch.stack([found[i].float().cpu() for i in range(len(layers))])


def head_scores(model, n: int = 64, prefix_len: int = 16, seed: int = 0) -> dict:
    """Per-head mechanism scores on ``n`` fresh repeated sequences of ``prefix_len`` distinct tokens.

    Returns ``{"prev_token": [L, H], "induction": [L, H], "current_token": [L, H]}`` (float32): over the
    positions t of the repeated half (P+1 .. 2P), the mean attention weight from t to t-1 (the previous token),
    to t-P+1 (the token after the earlier occurrence of the current token) and to t itself. A perfect
    previous-token / induction / current-token head scores 1.
    """
    ids = induction_batch(n, prefix_len, model.config.vocab_size, torch.Generator().manual_seed(seed))
    A = attention_patterns(model, ids)  # [L, B, H, T, T]
    P = prefix_len
    t = torch.arange(P + 1, 2 * P + 1)
    prev = A[..., t, t - 1].mean(dim=(1, 3))
    induction = A[..., t, t - P + 1].mean(dim=(1, 3))
    current = A[..., t, t].mean(dim=(1, 3))
    return {"prev_token": prev, "induction": induction, "current_token": current}


def known_mechanism(model, threshold: float = MECHANISM_THRESHOLD, **score_kwargs) -> dict:
    """The heads of the induction mechanism, from :func:`head_scores`.

    ``{"prev_token": [(0, h), ...], "induction": [(1, h), ...], "current_token": [(0, h), ...]}``: the
    layer-0 heads whose previous-token score exceeds ``threshold`` and the layer-1 heads whose induction score
    does (a 2-layer induction circuit needs its previous-token head before its induction head). If no head of
    these two roles clears the threshold the role holds its single best head, so they are never empty. Sorted
    by score, best first.

    ``current_token`` (informational, may be empty): the layer-0 heads that attend to the current token itself
    above ``threshold``. In the shipped model one such head (L0H2) is needed too: ablating it (zero or mean)
    breaks induction as surely as ablating the previous-token head, so a faithful circuit keeps it, but
    :func:`check_mechanism` only reports it.
    """
    scores = head_scores(model, **score_kwargs)
    out = {}
    for role, layer in (("prev_token", 0), ("induction", 1), ("current_token", 0)):
        s = scores[role][layer]
        order = torch.argsort(s, descending=True, stable=True).tolist()
        heads = [(layer, h) for h in order if float(s[h]) > threshold]
        out[role] = heads or ([] if role == "current_token" else [(layer, order[0])])
    return out


def check_mechanism(circuit, model, mechanism: dict | None = None) -> tuple[bool, str]:
    """Whether ``circuit`` keeps the induction mechanism of ``model``: at least one of its previous-token
    heads (layer 0) and at least one of its induction heads (layer 1), per :func:`known_mechanism` (or the
    ``mechanism`` given). Returns (ok, a readable account of which mechanism heads are kept and dropped)."""
    mechanism = mechanism if mechanism is not None else known_mechanism(model)
    kept = circuit.full()["head"]
    ok = True
    lines = []

    def fmt(hs):
        return ", ".join(f"L{l}H{h}" for l, h in hs) or "none"

    for role, name in (("prev_token", "previous-token"), ("induction", "induction"),
                       ("current_token", "current-token")):
        heads = mechanism.get(role) or []
        if role == "current_token" and not heads:
            continue
        keep = [(l, h) for l, h in heads if bool(kept[l, h])]
        drop = [(l, h) for l, h in heads if not bool(kept[l, h])]
        if role == "current_token":  # informational: not part of the verdict
            mark = "info"
        else:
            ok &= bool(keep)
            mark = "ok  " if keep else "MISS"
        lines.append(f"{mark} {name} heads: kept {fmt(keep)}; dropped {fmt(drop)}")
    verdict = ("the circuit keeps the induction mechanism (a previous-token head in layer 0 and an induction "
               "head in layer 1)" if ok else "the circuit misses part of the induction mechanism")
    return ok, "\n".join([verdict] + lines)


# --------------------------------------------------------------------------------------------- the demo
# The demo's run: zero ablation (the induction task's corrupted prompts share the first half with the clean
# ones, so interchange ablation cannot see the previous-token head, which writes at first-half positions), and
# targets that keep both layers and prune heads and neurons. ~12 s of training on 2 CPU cores (native kernels).
DEMO_TARGETS = {"layer": 0.0, "attn": 0.0, "head": 0.5, "attn_neuron": 0.6, "mlp": 0.5, "mlp_neuron": 0.8,
                "mlp_out": 0.6}
DEMO_PREFIX_LEN = 12


def demo_config(steps: int | None = None):
    """The demo's PruneConfig; the model is on the CPU, so the native kernels run it (the reference when they
    cannot be built, with a warning that says why)."""
    from .pruning.config import PruneConfig
    from .utils.backend import cpu_backend

    return PruneConfig(ablation="zero", targets=DEMO_TARGETS, lambda_lr=0.1, steps=800 if steps is None else steps,
                       batch_size=16,
                       n_examples=256, n_eval=64, backend=cpu_backend(),
                       task_options={"prefix_len": DEMO_PREFIX_LEN, "lo": 1, "bos_token_id": BOS})


def run_demo(run_dir=None, steps: int | None = None, progress: bool = True) -> bool:
    """``nodeprune demo``: prune the shipped model on induction, print the circuit, and check it.

    Passes when the circuit keeps a previous-token head in layer 0 and an induction head in layer 1
    (:func:`check_mechanism`), closes at least a third of the heads, and matches the full model's argmax on at
    least 90% of the held-out positions. Returns whether it passed.
    """
    from .pruning.run import prune

    model = load_demo_model()
    mechanism = known_mechanism(model)
    print("demo model: a 2-layer Llama trained on repeated random sequences (scripts/train_demo_model.py)")
    print("its mechanism, from attention patterns: previous-token head(s) "
          + ", ".join(f"L{l}H{h}" for l, h in mechanism["prev_token"]) + "; induction head(s) "
          + ", ".join(f"L{l}H{h}" for l, h in mechanism["induction"]) + "\n")
    result = prune(model, "induction", demo_config(steps), run_dir=run_dir, progress=progress)
    print(result.summary() + "\n")
    ok, message = check_mechanism(result.circuit, model, mechanism)
    heads = result.circuit.full()["head"]
    sparse = int(heads.sum()) <= (2 * heads.numel()) // 3
    faithful = result.metrics["exact_match"] >= 0.9
    print(message)
    print(f"{'ok  ' if sparse else 'MISS'} sparse: {int(heads.sum())} of {heads.numel()} heads kept")
    print(f"{'ok  ' if faithful else 'MISS'} faithful: the circuit's argmax matches the full model's on "
          f"{100 * result.metrics['exact_match']:.1f}% of held-out positions")
    passed = ok and sparse and faithful
    print("\ndemo " + ("passed" if passed else "FAILED") + (f"; the run is in {run_dir}" if run_dir else ""))
    return passed

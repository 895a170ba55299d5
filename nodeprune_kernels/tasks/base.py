"""What a task is: paired clean and corrupted prompts, tokenized, with the positions the objective reads.

Every task (the generators and the JSONL reader) produces a :class:`TaskData`; the pruning run only ever
sees that. Conventions (N examples, T tokens, right-padded; clean and corrupted prompts of one example
tokenize to the same length, so one ``attention_mask`` serves both):

* the logits at position t predict token t+1; ``positions[i, t]`` marks where the objective and the metrics
  read the logits (for a prompt whose answer is its next token, the prompt's last position);
* ``target[i, t]`` is the correct next token there and ``distractor[i, t]`` the competing one (the token a
  corrupted prompt points to, e.g. the subject's name in IOI); -1 where there is none;
* ``good`` / ``bad`` (optional, [N, K], -1 padded): sets of answer tokens read at each example's last
  marked position, for a probability difference (greater-than: years after the start year, and the others).
"""
from __future__ import annotations

from dataclasses import dataclass, field, fields

import torch

DEFAULT_N_EVAL = 64  # held-out examples when n_eval is None (at most a quarter of the examples)
NONE = -1  # no target / distractor / set member here


@dataclass
class TaskData:
    name: str
    input_ids: torch.Tensor        # [N, T] long
    corrupt_ids: torch.Tensor      # [N, T] long
    attention_mask: torch.Tensor   # [N, T] long, 1 for real tokens
    positions: torch.Tensor        # [N, T] bool
    target: torch.Tensor           # [N, T] long, NONE outside positions
    distractor: torch.Tensor       # [N, T] long, NONE where there is none
    is_eval: torch.Tensor          # [N] bool: held out for evaluation (JSONL split; generators: none)
    good: torch.Tensor | None = None  # [N, K] long, NONE padded
    bad: torch.Tensor | None = None   # [N, K] long, NONE padded
    meta: dict = field(default_factory=dict)  # e.g. {"vocab_size": ..., "source": path}

    def __post_init__(self):
        N, T = self.input_ids.shape
        for f in ("corrupt_ids", "attention_mask", "positions", "target", "distractor"):
            if tuple(getattr(self, f).shape) != (N, T):
                raise ValueError(f"TaskData {self.name!r}: {f} has shape {list(getattr(self, f).shape)}, "
                                 f"input_ids {[N, T]}")
        if tuple(self.is_eval.shape) != (N,):
            raise ValueError(f"TaskData {self.name!r}: is_eval must have shape [{N}]")
        if not bool(self.positions.any(1).all()):
            raise ValueError(f"TaskData {self.name!r}: every example needs at least one marked position")
        if bool((self.target[self.positions] < 0).any()):
            raise ValueError(f"TaskData {self.name!r}: every marked position needs a target token")

    def __len__(self) -> int:
        return self.input_ids.shape[0]

    def has_distractors(self) -> bool:
        """Whether every marked position has a distractor token (what the logit difference needs)."""
        return bool((self.distractor[self.positions] >= 0).all())

    def subset(self, index) -> "TaskData":
        """The examples at ``index`` (a LongTensor, slice or bool mask), padding trimmed to the longest."""
        kw = {}
        for f in fields(self):
            v = getattr(self, f.name)
            kw[f.name] = v[index] if isinstance(v, torch.Tensor) else v
        T = int(kw["attention_mask"].sum(1).max()) if len(kw["attention_mask"]) else 0
        T = max(T, int(kw["positions"].nonzero()[:, 1].max()) + 1 if kw["positions"].any() else 0)
        for f in ("input_ids", "corrupt_ids", "attention_mask", "positions", "target", "distractor"):
            kw[f] = kw[f][:, :T]
        return TaskData(**kw)

    def split(self, n_eval: int | float | None = 0.2, seed: int = 0) -> tuple:
        """(train, eval): the examples marked ``is_eval`` if any are, else a seeded random ``n_eval``
        (a count, a fraction of the examples, or None: min(64, a quarter of them), at least 1)."""
        N = len(self)
        if bool(self.is_eval.any()):
            if bool(self.is_eval.all()):
                raise ValueError(f"task {self.name!r}: all {N} examples are marked for evaluation (split \"eval\"), "
                                 "so none is left to train on; mark some rows \"train\" or drop the split field")
            return self.subset(~self.is_eval), self.subset(self.is_eval)
        if n_eval is None:
            n_eval = max(1, min(DEFAULT_N_EVAL, N // 4))
        k = int(round(n_eval * N)) if isinstance(n_eval, float) else int(n_eval)
        if not 0 < k < N:
            raise ValueError(f"task {self.name!r}: cannot hold out {n_eval} of {N} examples for evaluation")
        perm = torch.randperm(N, generator=torch.Generator().manual_seed(seed))
        return self.subset(perm[k:].sort().values), self.subset(perm[:k].sort().values)

    def model_inputs(self, index=None, corrupted: bool = False) -> dict:
        """Keyword arguments of a causal LM's forward for the examples at ``index`` (all by default)."""
        ids = self.corrupt_ids if corrupted else self.input_ids
        if index is not None:
            ids, mask = ids[index], self.attention_mask[index]
        else:
            mask = self.attention_mask
        return {"input_ids": ids, "attention_mask": mask}

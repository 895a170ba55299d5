"""Induction (Olsson et al. 2022): a random token sequence repeated once; in the repeat, each next token
can be read off the first copy ("... A B ... A" -> B).

    clean:    [BOS] t_0 ... t_{P-1} t_0 ... t_{P-1}
    corrupt:  [BOS] t_0 ... t_{P-1} u_0 ... u_{P-1}      (u fresh tokens: nothing to copy)

The P prefix tokens of an example are distinct and the P fresh ones are distinct from them and from each
other, so each marked position has one token to copy. Positions: every t of the repeat whose next token is
in the repeat, t in [o+P, o+2P-2] with o = 1 with a BOS and 0 without; target: the next token
(``t_{t+1-o-P}``); no distractor. No tokenizer needed: ids are drawn from [lo, vocab_size), without the
tokenizer's special tokens and the BOS when a tokenizer is given.
"""
from __future__ import annotations

import torch

from .base import NONE, TaskData
from .common import DEFAULT_N, Example, Task, check_n, pack, pad_token_id


class InductionTask(Task):
    """Repeated random tokens.

    Options: ``prefix_len`` (P, default 16, at least 2), ``lo`` (smallest token id drawn, default 0),
    ``bos_token_id`` (default None: no BOS).
    """

    name = "induction"
    needs_tokenizer = False

    def __init__(self, prefix_len: int = 16, lo: int = 0, bos_token_id: int | None = None):
        for opt, v, least in (("prefix_len", prefix_len, 2), ("lo", lo, 0)):
            if isinstance(v, bool) or not isinstance(v, int) or v < least:
                raise ValueError(f"task 'induction': {opt} must be an int >= {least}, got {v!r}")
        if bos_token_id is not None and (isinstance(bos_token_id, bool) or not isinstance(bos_token_id, int)
                                         or bos_token_id < 0):
            raise ValueError(f"task 'induction': bos_token_id must be a token id or None, got {bos_token_id!r}")
        self.prefix_len, self.lo, self.bos_token_id = prefix_len, lo, bos_token_id

    def build(self, tokenizer=None, n: int | None = DEFAULT_N, seed: int = 0,
              vocab_size: int | None = None) -> TaskData:
        """``vocab_size``: the ids drawn are below it and below ``len(tokenizer)``; one of the two is
        required."""
        n, P = check_n(n, self.name), self.prefix_len
        pool = self._pool(tokenizer, vocab_size)
        g = torch.Generator().manual_seed(seed)
        bos = [] if self.bos_token_id is None else [self.bos_token_id]
        o = len(bos)
        positions = list(range(o + P, o + 2 * P - 1))
        examples = []
        for _ in range(n):
            draw = pool[torch.randperm(len(pool), generator=g)[:2 * P]].tolist()
            prefix, fresh = draw[:P], draw[P:]
            clean = bos + prefix + prefix
            examples.append(Example(clean, bos + prefix + fresh, positions, [clean[t + 1] for t in positions],
                                    [NONE] * len(positions)))
        return pack(self.name, examples, pad_token_id(tokenizer),
                    vocab_size=len(tokenizer) if vocab_size is None else vocab_size,
                    meta={"options": dict(vars(self))})

    def _pool(self, tokenizer, vocab_size: int | None) -> torch.Tensor:
        """The token ids to draw from: [lo, V) without special tokens and the BOS, V = min(vocab_size,
        len(tokenizer)) of those given."""
        sizes = [v for v in (vocab_size, None if tokenizer is None else len(tokenizer)) if v is not None]
        if not sizes:
            raise ValueError("task 'induction' needs vocab_size (or a tokenizer) to draw token ids")
        keep = torch.zeros(min(sizes), dtype=torch.bool)
        keep[self.lo:] = True
        special = [] if tokenizer is None else list(tokenizer.all_special_ids)
        for i in special + ([] if self.bos_token_id is None else [self.bos_token_id]):
            if i < len(keep):
                keep[i] = False
        pool = keep.nonzero().flatten()
        if len(pool) < 2 * self.prefix_len:
            raise ValueError(f"task 'induction': only {len(pool)} token ids to draw from in [{self.lo}, "
                             f"{min(sizes)}), need 2 * prefix_len = {2 * self.prefix_len}")
        return pool

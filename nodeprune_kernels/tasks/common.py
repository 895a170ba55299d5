"""What the tasks share: the :class:`Task` base class, the tokenization conventions, packing into a TaskData.

Tokenization conventions (every task that takes a tokenizer):

* a prompt is encoded with ``add_special_tokens`` (default True, the tokenizer's own default: its
  post-processor decides, e.g. a BOS for Llama, nothing for GPT-2), the same way for the clean and the
  corrupted prompt; a tokenizer that appends special tokens at the end (an EOS after the prompt) is refused,
  since the objective reads the prompt's last position;
* an answer (" Mary", "32") is the first token it adds after the prompt: the tokens of
  ``prompt + answer`` past those of ``prompt``, both encoded without special tokens (where the tokenizer
  merges the answer into the prompt's last token, so that those are not a prefix, the answer encoded alone
  without special tokens). For GPT-2 style byte-level BPE and word-level tokenizers this is simply the first
  token of " Mary" encoded alone; it differs where a tokenizer marks the start of a text (Llama 2's
  SentencePiece: "32" alone is "▁ 3 2", after "the year 17" it adds "3 2"). Multi-token answers use their
  first token;
* padding is on the right with ``tokenizer.pad_token_id``, else ``eos_token_id``, else 0; the
  ``attention_mask`` marks the real tokens.
"""
from __future__ import annotations

import random
from dataclasses import dataclass
from typing import Callable, Sequence

import torch

from .base import NONE, TaskData

DEFAULT_N = 256    # examples a generator makes when n is None
MAX_REJECTS = 100  # draws a generator may reject (clean and corrupted lengths differ) per example asked for

# First names for the generators (IOI uses both lists, the pronoun task their genders).
MALE_NAMES = (
    "John", "James", "David", "Michael", "Daniel", "Paul", "Mark", "Peter", "Thomas", "George",
    "Robert", "Steven", "Andrew", "Richard", "Brian", "Kevin", "Eric", "Adam", "Frank", "Henry",
)
FEMALE_NAMES = (
    "Mary", "Anna", "Laura", "Sarah", "Emma", "Lisa", "Kate", "Alice", "Rachel", "Julia",
    "Helen", "Grace", "Claire", "Sophie", "Nancy", "Amy", "Jessica", "Linda", "Karen", "Rose",
)


class Task:
    """A task: a recipe for a :class:`TaskData` (paired clean and corrupted prompts, tokenized).

    Subclasses set ``name`` and ``needs_tokenizer`` and implement :meth:`build`; options are constructor
    keyword arguments (``get_task(name, **options)`` passes them on).
    """

    name: str = "task"
    needs_tokenizer: bool = True

    def build(self, tokenizer=None, n: int | None = DEFAULT_N, seed: int = 0,
              vocab_size: int | None = None) -> TaskData:
        """``n`` examples (generators: ``None`` means :data:`DEFAULT_N`), deterministic in ``seed``.

        ``vocab_size``: the model's vocabulary size, recorded in ``meta["vocab_size"]`` (default: the
        tokenizer's ``len``); a token id at or past it is an error.
        """
        raise NotImplementedError

    def __repr__(self) -> str:
        opts = ", ".join(f"{k}={v!r}" for k, v in vars(self).items() if not k.startswith("_"))
        return f"{type(self).__name__}({opts})"


@dataclass
class Example:
    """One tokenized example: clean and corrupted ids of equal length, the positions the objective reads
    (logits at t predict token t+1) with their target and distractor tokens, optional answer sets."""

    clean: list[int]
    corrupt: list[int]
    positions: list[int]
    target: list[int]
    distractor: list[int]
    good: Sequence[int] = ()
    bad: Sequence[int] = ()
    is_eval: bool = False

    @classmethod
    def at_end(cls, clean: list[int], corrupt: list[int], target: int, distractor: int = NONE,
               **kw) -> "Example":
        """An example whose answer is the prompt's next token: one position, the prompt's last."""
        return cls(clean, corrupt, [len(clean) - 1], [target], [distractor], **kw)


def check_n(n: int | None, task: str) -> int:
    """The number of examples a generator makes: ``n``, or :data:`DEFAULT_N` for None."""
    if n is None:
        return DEFAULT_N
    if isinstance(n, bool) or not isinstance(n, int) or n < 1:
        raise ValueError(f"task {task!r}: n must be a positive int (or None for {DEFAULT_N}), got {n!r}")
    return n


def pack(name: str, examples: Sequence[Example], pad_id: int, vocab_size: int | None = None,
         meta: dict | None = None) -> TaskData:
    """Right-pad the examples into a :class:`TaskData` (N = len(examples), T = the longest prompt).

    Every tensor is a CPU tensor: ids, mask, target, distractor long [N, T]; positions bool [N, T];
    is_eval bool [N]; good / bad long [N, K] (K the largest set, -1 padded) when any example has a set.
    """
    N = len(examples)
    if N == 0:
        raise ValueError(f"task {name!r}: no examples")
    T = max(len(ex.clean) for ex in examples)
    ids = torch.full((N, T), pad_id, dtype=torch.long)
    corrupt = torch.full((N, T), pad_id, dtype=torch.long)
    mask = torch.zeros(N, T, dtype=torch.long)
    positions = torch.zeros(N, T, dtype=torch.bool)
    target = torch.full((N, T), NONE, dtype=torch.long)
    distractor = torch.full((N, T), NONE, dtype=torch.long)
    for i, ex in enumerate(examples):
        L = len(ex.clean)
        if len(ex.corrupt) != L:
            raise ValueError(f"task {name!r}, example {i}: clean and corrupted prompts have {L} and "
                             f"{len(ex.corrupt)} tokens")
        ids[i, :L] = torch.tensor(ex.clean, dtype=torch.long)
        corrupt[i, :L] = torch.tensor(ex.corrupt, dtype=torch.long)
        mask[i, :L] = 1
        pos = torch.tensor(ex.positions, dtype=torch.long)
        positions[i, pos] = True
        target[i, pos] = torch.tensor(ex.target, dtype=torch.long)
        distractor[i, pos] = torch.tensor(ex.distractor, dtype=torch.long)
    good = _sets([ex.good for ex in examples])
    bad = _sets([ex.bad for ex in examples])
    meta = dict(meta or {})
    if vocab_size is not None:
        top = max(int(t.max()) for t in (ids, corrupt, target, distractor, good, bad) if t is not None)
        if top >= vocab_size:
            raise ValueError(f"task {name!r}: token id {top} is out of the vocabulary (vocab_size {vocab_size}); "
                             f"does the tokenizer belong to the model?")
        meta["vocab_size"] = int(vocab_size)
    return TaskData(name=name, input_ids=ids, corrupt_ids=corrupt, attention_mask=mask, positions=positions,
                    target=target, distractor=distractor,
                    is_eval=torch.tensor([ex.is_eval for ex in examples], dtype=torch.bool),
                    good=good, bad=bad, meta=meta)


def _sets(rows: list[Sequence[int]]) -> torch.Tensor | None:
    """[N, K] long, NONE padded; None when every row is empty."""
    K = max(len(r) for r in rows)
    if K == 0:
        return None
    out = torch.full((len(rows), K), NONE, dtype=torch.long)
    for i, r in enumerate(rows):
        out[i, :len(r)] = torch.tensor(list(r), dtype=torch.long)
    return out


def pad_token_id(tokenizer) -> int:
    """The padding id: the tokenizer's pad token, else its EOS, else 0 (also without a tokenizer)."""
    ids = () if tokenizer is None else (tokenizer.pad_token_id, tokenizer.eos_token_id)
    return next((i for i in ids if i is not None), 0)


def sample_examples(task: str, n: int, rng: random.Random,
                    draw: Callable[[random.Random, int], Example]) -> list[Example]:
    """``n`` examples from ``draw(rng, i)``, redrawing example i while its clean and corrupted prompts
    tokenize to different lengths (a ValueError after :data:`MAX_REJECTS` rejections per example)."""
    out, rejects = [], 0
    while len(out) < n:
        ex = draw(rng, len(out))
        if len(ex.clean) == len(ex.corrupt):
            out.append(ex)
            continue
        rejects += 1
        if rejects > MAX_REJECTS * n:
            raise ValueError(f"task {task!r}: {rejects} draws had clean and corrupted prompts of different "
                             f"token lengths; this tokenizer does not suit the task")
    return out


class Encoder:
    """A tokenizer (any ``transformers.PreTrainedTokenizerBase``) with the conventions of the module doc."""

    def __init__(self, tokenizer, add_special_tokens: bool = True, task: str = "task"):
        if tokenizer is None:
            raise ValueError(f"task {task!r} needs a tokenizer")
        self.tokenizer = tokenizer
        self.add_special_tokens = bool(add_special_tokens)
        self.task = task
        self.pad_id = pad_token_id(tokenizer)
        if self.add_special_tokens:
            plain, full = self.ids("x"), self.prompt("x")
            if full[len(full) - len(plain):] != plain:
                raise ValueError(f"task {task!r}: this tokenizer adds special tokens after the text "
                                 f"({full} for {plain}); pass add_special_tokens=False")

    def ids(self, text: str) -> list[int]:
        """``text``'s token ids without special tokens."""
        return self.tokenizer.encode(text, add_special_tokens=False)

    def prompt(self, text: str) -> list[int]:
        """A prompt's token ids, with special tokens if ``add_special_tokens``."""
        return self.tokenizer.encode(text, add_special_tokens=self.add_special_tokens)

    def continuation(self, prefix: str, text: str) -> list[int]:
        """The token ids ``text`` adds after ``prefix`` (no special tokens): ``ids(prefix + text)`` past
        ``ids(prefix)`` when those are its start, else ``ids(text)`` (the tokenizer merged across)."""
        head, full = self.ids(prefix), self.ids(prefix + text)
        if full[:len(head)] == head:
            return full[len(head):]
        return self.ids(text)

    def answer(self, prompt: str, answer: str) -> int:
        """The first token of ``answer`` after ``prompt``; a ValueError if it adds no token."""
        ids = self.continuation(prompt, answer)
        if not ids:
            raise ValueError(f"task {self.task!r}: the answer {answer!r} tokenizes to nothing")
        return ids[0]

    def single_tokens(self, words: Sequence[str], what: str, minimum: int) -> list[str]:
        """The ``words`` that are one known token after a space, mid-sentence (a ValueError if fewer than
        ``minimum``)."""
        unk = self.tokenizer.unk_token_id
        kept = [w for w in words if len(ids := self.continuation("The", " " + w)) == 1 and ids[0] != unk]
        if len(kept) < minimum:
            raise ValueError(f"task {self.task!r}: this tokenizer keeps only {len(kept)} of the {len(words)} "
                             f"{what} as one token ({kept}); the task needs at least {minimum}")
        return kept


class PromptTask(Task):
    """A generator of prompts whose answer is the next token (IOI, greater-than, gendered pronouns).

    Subclasses implement :meth:`sampler`. Option ``add_special_tokens`` (default True: the tokenizer's own
    convention) is used for the clean and the corrupted prompts alike.
    """

    needs_tokenizer = True

    def __init__(self, add_special_tokens: bool = True):
        self.add_special_tokens = add_special_tokens

    def sampler(self, enc: Encoder) -> Callable[[random.Random, int], Example]:
        """Prepare what depends on the tokenizer (usable names, answer tokens) and return
        ``draw(rng, i) -> Example`` for example i."""
        raise NotImplementedError

    def build(self, tokenizer=None, n: int | None = DEFAULT_N, seed: int = 0,
              vocab_size: int | None = None) -> TaskData:
        enc = Encoder(tokenizer, self.add_special_tokens, self.name)
        n = check_n(n, self.name)
        examples = sample_examples(self.name, n, random.Random(seed), self.sampler(enc))
        return pack(self.name, examples, enc.pad_id,
                    vocab_size=len(tokenizer) if vocab_size is None else vocab_size,
                    meta={"options": dict(vars(self))})

"""Greater-than (Hanna et al. 2023, "How does GPT-2 compute greater-than?").

    "The war lasted from the year 1732 to the year 17"  ->  a two-digit year after 32

Start years 17YY with YY in 02..98; the corrupted prompt starts in 1701, where every later year is right.
Position: the prompt's last token; target: the token of YY+1, distractor: of YY-1; ``good``: the tokens of
the years YY+1..99, ``bad``: of 00..YY (a probability difference, Hanna et al.'s metric).

Tokenization: the prompt is encoded in three pieces, "The war lasted from the year 17" (with special
tokens), the two digits "32", " to the year 17", so the century and the two-digit suffix are separate tokens
whatever the tokenizer does with "1732" (GPT-2 sometimes merges "173"; Llama 3 splits digits in threes). A
year's token is the first token its two digits add after " to the year 17". Where every two-digit suffix is
one token (GPT-2, Llama 3, a word-level vocabulary) the sets are exactly the years above / up to YY. Where
some are not (digits split one by one), a year stands for its first token, and a token shared by years on
both sides of YY (the "3" of 30..39 for YY = 32) is in neither set; start years whose YY+1 and YY-1 do not
get a token in their own set (or get the same token), or whose digits tokenize to another length than "01",
are not used.
"""
from __future__ import annotations

import random

from .common import Encoder, Example, PromptTask

NOUNS = (
    "war", "expedition", "drought", "siege", "festival", "reign", "famine", "voyage", "treaty", "truce",
    "rebellion", "plague", "dynasty", "trial", "strike", "boom", "occupation", "alliance", "lease",
    "partnership", "blockade", "crusade", "revival", "embargo",
)
HEAD = "The {noun} lasted from the year {century}"  # then the two digits of the start year
TAIL = " to the year {century}"
FIRST_YY, LAST_YY = 2, 98
CORRUPT_YY = 1
MIN_YEARS = 5


class GreaterThanTask(PromptTask):
    """Greater-than: "The <noun> lasted from the year <C>YY to the year <C>", corrupted with YY = 01.

    Options: ``century`` (default 17, two digits), ``add_special_tokens`` (default True).
    """

    name = "greater_than"

    def __init__(self, century: int = 17, add_special_tokens: bool = True):
        super().__init__(add_special_tokens)
        if isinstance(century, bool) or not isinstance(century, int) or not 10 <= century <= 99:
            raise ValueError(f"task 'greater_than': century must be a two-digit int, got {century!r}")
        self.century = century

    def sampler(self, enc: Encoder):
        c = self.century
        tail = TAIL.format(century=c)
        suffix = [enc.continuation(tail, f"{yy:02d}") for yy in range(100)]
        if any(not s for s in suffix):
            raise ValueError(f"task {self.name!r}: a two-digit year tokenizes to nothing after {tail!r}")
        token = [s[0] for s in suffix]
        sets = {yy: _good_bad(token, yy) for yy in range(FIRST_YY, LAST_YY + 1)}
        years = [yy for yy, (good, bad) in sets.items()
                 if len(suffix[yy]) == len(suffix[CORRUPT_YY]) and token[yy + 1] in good
                 and token[yy - 1] in bad]
        if len(years) < MIN_YEARS:
            raise ValueError(f"task {self.name!r}: this tokenizer leaves only {len(years)} usable start years "
                             f"(need {MIN_YEARS}); see the module doc")

        def draw(rng: random.Random, i: int) -> Example:
            noun, yy = rng.choice(NOUNS), rng.choice(years)
            head = enc.prompt(HEAD.format(noun=noun, century=c))
            clean = head + suffix[yy] + enc.continuation(f"{c}{yy:02d}", tail)
            corrupt = head + suffix[CORRUPT_YY] + enc.continuation(f"{c}{CORRUPT_YY:02d}", tail)
            good, bad = sets[yy]
            return Example.at_end(clean, corrupt, token[yy + 1], token[yy - 1], good=good, bad=bad)

        return draw


def _good_bad(token: list[int], yy: int) -> tuple[list[int], list[int]]:
    """(good, bad): the tokens of years after ``yy`` and of years up to it, a token shared across in
    neither; each sorted, without repeats."""
    after = {token[y] for y in range(yy + 1, 100)}
    upto = {token[y] for y in range(yy + 1)}
    return sorted(after - upto), sorted(upto - after)

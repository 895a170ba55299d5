"""Indirect object identification (Wang et al. 2022, "Interpretability in the Wild").

A prompt introduces two people and has one of them (the subject S) give something to the other (the
indirect object IO); the model should name the IO next:

    "When Mary and John went to the store, John gave a drink to"  ->  " Mary"  (IO), not " John" (S)

Orders: ABBA (the IO is named first: "Mary and John ..., John ...") and BABA ("John and Mary ..., John ...").
Corrupted prompt (the ABC distribution): the same template, place and object with its three name slots
filled by three other, distinct names, so nothing in it points to the IO. Only names that are one token
(after a space) in the tokenizer are used, so the two prompts have the same length.

Position: the prompt's last token; target: the first token of " <IO>", distractor: of " <S>".
"""
from __future__ import annotations

import random

from .common import FEMALE_NAMES, MALE_NAMES, Encoder, Example, PromptTask

# {X} and {Y}: the two people introduced (ABBA: X = IO, Y = S; BABA: X = S, Y = IO); {S}: the giver.
TEMPLATES = (
    "When {X} and {Y} went to the {place}, {S} gave a {object} to",
    "After {X} and {Y} arrived at the {place}, {S} handed a {object} to",
    "Then, {X} and {Y} were working at the {place}. {S} decided to give a {object} to",
    "While {X} and {Y} were waiting at the {place}, {S} passed a {object} to",
    "Yesterday {X} and {Y} met at the {place}, and {S} brought a {object} for",
    "Once {X} and {Y} had left the {place}, {S} sent a {object} to",
    "At the {place}, {X} and {Y} talked for hours. Later, {S} offered a {object} to",
    "Since {X} and {Y} both lived near the {place}, {S} lent a {object} to",
)
ORDERS = ("ABBA", "BABA")
NAMES = tuple(n for pair in zip(FEMALE_NAMES, MALE_NAMES) for n in pair)
PLACES = (
    "store", "garden", "station", "library", "market", "park", "museum", "bakery", "river", "school",
    "hospital", "beach", "cinema", "office", "harbor", "stadium",
)
OBJECTS = (  # consonant-initial, after "a"
    "drink", "book", "letter", "basket", "ticket", "necklace", "kite", "pencil", "sandwich", "ball",
    "gift", "camera", "ring", "map", "bottle", "hat",
)
MIN_NAMES = 5  # two names and three others for the ABC prompt


class IOITask(PromptTask):
    """Indirect object identification: clean ABBA/BABA prompts, corrupted ABC prompts.

    Options: ``orders`` (a subset of ``("ABBA", "BABA")``, default both, drawn uniformly),
    ``add_special_tokens`` (default True).
    """

    name = "ioi"

    def __init__(self, orders: tuple[str, ...] = ORDERS, add_special_tokens: bool = True):
        super().__init__(add_special_tokens)
        orders = (orders,) if isinstance(orders, str) else tuple(orders)
        if not orders or any(o not in ORDERS for o in orders):
            raise ValueError(f"task 'ioi': orders must be a non-empty subset of {ORDERS}, got {orders!r}")
        self.orders = orders

    def sampler(self, enc: Encoder):
        names = enc.single_tokens(NAMES, "names", MIN_NAMES)

        def draw(rng: random.Random, i: int) -> Example:
            template, place, obj = rng.choice(TEMPLATES), rng.choice(PLACES), rng.choice(OBJECTS)
            io, s, c1, c2, c3 = rng.sample(names, 5)
            x, y = (io, s) if rng.choice(self.orders) == "ABBA" else (s, io)
            clean = template.format(X=x, Y=y, S=s, place=place, object=obj)
            corrupt = template.format(X=c1, Y=c2, S=c3, place=place, object=obj)
            return Example.at_end(enc.prompt(clean), enc.prompt(corrupt),
                                  enc.answer(clean, " " + io), enc.answer(clean, " " + s))

        return draw

"""Gendered pronouns (after Mathwin et al. 2023 and Chaudhary & Geiger 2024): a tag question whose pronoun
must agree with the gender a first name suggests.

    "So Mary is such a good friend, isn't"  ->  " she"  (distractor " he")

Corrupted prompt: the same sentence with a name of the other gender, so it points to the other pronoun.
Only names that are one token (after a space) in the tokenizer are used, so the two prompts have the same
length. Examples alternate male and female names (example 0 male), so the pronouns are balanced.
Position: the prompt's last token; target: the first token of " he" / " she", distractor: the other one.
"""
from __future__ import annotations

import random

from .common import FEMALE_NAMES, MALE_NAMES, Encoder, Example, PromptTask

TEMPLATES = (
    "So {name} is such a good {role}, isn't",
    "Well, {name} really is a wonderful {role}, isn't",
    "Honestly, {name} has always been a great {role}, hasn't",
    "I think {name} would make a fine {role}, wouldn't",
    "Everyone says {name} was a brilliant {role}, wasn't",
    "After all these years {name} is still a loyal {role}, isn't",
)
ROLES = (
    "friend", "neighbor", "teacher", "doctor", "cook", "student", "driver", "writer", "painter", "colleague",
    "player", "singer", "lawyer", "pilot", "baker", "coach", "partner", "musician", "gardener", "volunteer",
)
PRONOUNS = {"male": " he", "female": " she"}
MIN_NAMES = 3  # per gender


class GenderPronounTask(PromptTask):
    """Gendered pronouns: "So <Name> is such a good <role>, isn't" -> " he" / " she".

    Options: ``add_special_tokens`` (default True).
    """

    name = "gender_pronoun"

    def sampler(self, enc: Encoder):
        names = {"male": enc.single_tokens(MALE_NAMES, "male names", MIN_NAMES),
                 "female": enc.single_tokens(FEMALE_NAMES, "female names", MIN_NAMES)}

        def draw(rng: random.Random, i: int) -> Example:
            gender, other = ("male", "female") if i % 2 == 0 else ("female", "male")
            template, role = rng.choice(TEMPLATES), rng.choice(ROLES)
            clean = template.format(name=rng.choice(names[gender]), role=role)
            corrupt = template.format(name=rng.choice(names[other]), role=role)
            target, distractor = enc.answer(clean, PRONOUNS[gender]), enc.answer(clean, PRONOUNS[other])
            if target == distractor:
                raise ValueError(f"task {self.name!r}: ' he' and ' she' start with the same token in this "
                                 f"tokenizer")
            return Example.at_end(enc.prompt(clean), enc.prompt(corrupt), target, distractor)

        return draw

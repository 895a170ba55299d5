"""Tasks for the pruning run: paired clean and corrupted prompts, tokenized into a :class:`TaskData`.

    task = get_task("ioi")                       # or "greater_than", "gender_pronoun", "induction"
    task = get_task("my_task.jsonl")             # your own prompts (format: nodeprune_kernels.tasks.jsonl)
    data = task.build(tokenizer, n=256, seed=0)  # same seed, same TaskData

Generators (``TASK_NAMES``) make ``n`` examples from ``seed``, all with ``is_eval`` False (the run splits
them); a JSONL file gives its rows, ``is_eval`` from their ``split``. Options are keyword arguments of
:func:`get_task`: ``add_special_tokens`` for every task that takes a tokenizer, ``orders`` for IOI,
``century`` for greater-than, ``prefix_len``, ``lo``, ``bos_token_id`` for induction.
"""
from __future__ import annotations

import inspect
from pathlib import Path

from .base import NONE, TaskData
from .common import Task
from .gender_pronoun import GenderPronounTask
from .greater_than import GreaterThanTask
from .induction import InductionTask
from .ioi import IOITask
from .jsonl import JsonlTask

TASKS = {cls.name: cls for cls in (IOITask, GreaterThanTask, GenderPronounTask, InductionTask)}
TASK_NAMES = tuple(TASKS)


def get_task(name_or_path: str | Path, **options) -> Task:
    """The task registered as ``name_or_path`` (one of :data:`TASK_NAMES`; '-' reads as '_'), or the
    JSONL file at that path (a path ending in .jsonl, or any existing file), with ``options``."""
    key = str(name_or_path).replace("-", "_")
    if key in TASKS:
        cls, args = TASKS[key], ()
    elif str(name_or_path).endswith(".jsonl") or Path(name_or_path).is_file():
        cls, args = JsonlTask, (name_or_path,)
    else:
        raise ValueError(f"unknown task {str(name_or_path)!r}: the tasks are {', '.join(TASK_NAMES)}, or give "
                         f"the path of a .jsonl file")
    accepted = [p for p in inspect.signature(cls).parameters if p != "path"]
    unknown = sorted(set(options) - set(accepted))
    if unknown:
        raise ValueError(f"task {key!r} has no option {', '.join(map(repr, unknown))}; its options are "
                         f"{', '.join(accepted) or 'none'}")
    return cls(*args, **options)


__all__ = ["TaskData", "Task", "NONE", "get_task", "TASK_NAMES", "TASKS", "IOITask", "GreaterThanTask",
           "GenderPronounTask", "InductionTask", "JsonlTask"]

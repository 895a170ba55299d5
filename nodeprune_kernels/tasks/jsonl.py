"""A task from a JSONL file: one example per line, your own prompts.

Each non-blank line is a JSON object with the keys

* ``clean`` (string): the prompt, e.g. ``"When Mary and John went to the store, John gave a drink to"``;
* ``corrupted`` (string): the corrupted prompt; it must tokenize to as many tokens as ``clean``;
* ``target`` (string): the correct answer as it continues the prompt, with its leading space: ``" Mary"``;
* ``distractor`` (string, optional): the competing answer, ``" John"``;
* ``split`` (optional): ``"train"`` or ``"eval"`` (held out for evaluation); without any ``"eval"`` row the
  run holds out a random part.

The objective reads the prompt's last position. An answer counts by its first token (as it continues the
clean prompt, see :mod:`.common`): for a multi-token answer, only the first token is the target. Any other
key, a key given twice, a missing or non-string value, a string that is not valid Unicode (a lone surrogate
escape), an empty prompt, prompts of different token lengths, an answer that tokenizes to nothing, or a line
that is not UTF-8 or not JSON is a ValueError that names the file and the line (``path:line: ...``) and,
where one key is at fault, the key. The file is UTF-8, with or without a byte order mark.
"""
from __future__ import annotations

import json
import sys
from dataclasses import dataclass
from pathlib import Path

from .base import NONE, TaskData
from .common import Encoder, Example, Task, pack

REQUIRED = ("clean", "corrupted", "target")
OPTIONAL = ("distractor", "split")
SPLITS = {"train": False, "eval": True}  # split -> is_eval


@dataclass
class Row:
    """One parsed line (``line``: 1-based)."""

    line: int
    clean: str
    corrupted: str
    target: str
    distractor: str | None = None
    split: str | None = None


class JsonlTask(Task):
    """The examples of a JSONL file (read and checked when constructed, tokenized by :meth:`build`).

    Options: ``add_special_tokens`` (default True). The task's name is the file's stem.
    """

    needs_tokenizer = True

    def __init__(self, path: str | Path, add_special_tokens: bool = True):
        self.path = Path(path)
        self.name = self.path.stem
        self.add_special_tokens = add_special_tokens
        self._rows = read_rows(self.path)

    def build(self, tokenizer=None, n: int | None = None, seed: int = 0,
              vocab_size: int | None = None) -> TaskData:
        """The first ``n`` rows (all for None, or when the file has fewer); ``seed`` is not used."""
        if n is not None and (isinstance(n, bool) or not isinstance(n, int) or n < 1):
            raise ValueError(f"task {self.name!r}: n must be a positive int or None, got {n!r}")
        enc = Encoder(tokenizer, self.add_special_tokens, self.name)
        examples = [self._example(enc, row) for row in self._rows[:n]]
        return pack(self.name, examples, enc.pad_id,
                    vocab_size=len(tokenizer) if vocab_size is None else vocab_size,
                    meta={"source": str(self.path), "options": {"add_special_tokens": self.add_special_tokens}})

    def _example(self, enc: Encoder, row: Row) -> Example:
        where = f"{self.path}:{row.line}"
        for key in ("clean", "corrupted"):
            if not enc.ids(getattr(row, key)):
                raise ValueError(f"{where}: the {key} prompt tokenizes to nothing")
        clean, corrupt = enc.prompt(row.clean), enc.prompt(row.corrupted)
        if len(clean) != len(corrupt):
            raise ValueError(f"{where}: the clean prompt is {len(clean)} tokens and the corrupted prompt "
                             f"{len(corrupt)}; they must be the same length")
        answers = []
        for key in ("target", "distractor"):
            text = getattr(row, key)
            ids = [NONE] if text is None else enc.continuation(row.clean, text)
            if not ids:
                raise ValueError(f"{where}: the {key} {text!r} tokenizes to nothing")
            answers.append(ids[0])
        return Example.at_end(clean, corrupt, *answers, is_eval=SPLITS[row.split or "train"])


def read_rows(path: Path) -> list[Row]:
    """The rows of a JSONL file, each checked (keys, types, non-empty prompts, split)."""
    if not path.is_file():
        raise FileNotFoundError(f"task file {path} does not exist")
    rows = []
    # utf-8-sig: a leading byte order mark is skipped; surrogateescape: a byte that is not UTF-8 is read as
    # U+DC80..U+DCFF, so that the error can name its line (_parse)
    with open(path, encoding="utf-8-sig", errors="surrogateescape") as f:
        for line, text in enumerate(f, 1):
            if text.strip():
                rows.append(_parse(text, path, line))
    if not rows:
        raise ValueError(f"{path}: no examples (every line is blank)")
    return rows


def _parse(text: str, path: Path, line: int) -> Row:
    """One non-blank line as a :class:`Row`; a ValueError naming ``path:line`` if it is not a valid row."""
    where = f"{path}:{line}"
    i = next((i for i, c in enumerate(text) if "\udc80" <= c <= "\udcff"), None)  # a byte read by surrogateescape
    if i is not None:
        raise ValueError(f"{where}: not UTF-8 text (byte 0x{ord(text[i]) - 0xDC00:02x} at column {i + 1}); save "
                         "the file as UTF-8")
    try:
        obj = json.loads(text, object_pairs_hook=_object, parse_int=_number)
    except _RepeatedKey as e:
        raise ValueError(f"{where}: key {e.key!r} appears more than once") from None
    except json.JSONDecodeError as e:
        raise ValueError(f"{where}: invalid JSON ({e.msg}, column {e.colno})") from None
    except RecursionError:
        raise ValueError(f"{where}: invalid JSON (nested too deeply to read)") from None
    if not isinstance(obj, dict):
        raise ValueError(f"{where}: expected a JSON object, got {_json_type(obj)}")
    unknown = sorted(set(obj) - set(REQUIRED) - set(OPTIONAL))
    if unknown:
        raise ValueError(f"{where}: unknown key(s) {', '.join(map(repr, unknown))}; the keys are "
                         f"{', '.join(REQUIRED + OPTIONAL)}")
    for key in REQUIRED + OPTIONAL:
        if key in REQUIRED and key not in obj:
            raise ValueError(f"{where}: missing key {key!r}")
        value = obj.get(key)
        if not isinstance(value, str) and not (key in OPTIONAL and value is None):
            raise ValueError(f"{where}: {key!r} must be a string, got {_json_type(value)}")
        if isinstance(value, str):
            try:
                value.encode("utf-8")
            except UnicodeEncodeError as e:
                raise ValueError(f"{where}: {key!r} is not valid Unicode text (a lone surrogate "
                                 f"\\u{ord(value[e.start]):04x} at character {e.start + 1})") from None
    for key in ("clean", "corrupted"):
        if not obj[key].strip():
            raise ValueError(f"{where}: the {key} prompt is empty")
    if obj.get("split") is not None and obj["split"] not in SPLITS:
        raise ValueError(f"{where}: split must be one of {', '.join(SPLITS)}, got {obj['split']!r}")
    return Row(line=line, **obj)


class _RepeatedKey(Exception):
    def __init__(self, key: str):
        super().__init__(key)
        self.key = key


def _object(pairs: list) -> dict:
    """json's object_pairs_hook: the object as a dict, a key given twice refused (json keeps the last)."""
    obj = {}
    for key, value in pairs:
        if key in obj:
            raise _RepeatedKey(key)
        obj[key] = value
    return obj


def _number(digits: str):
    """json's parse_int: an int, except that one with more digits than Python converts
    (``sys.get_int_max_str_digits()``, 4300 by default) is read as a float, so that the row is refused for
    its type and not for Python's limit."""
    limit = sys.get_int_max_str_digits()
    return int(digits) if not limit or len(digits.lstrip("-")) <= limit else float(digits)


def _json_type(value) -> str:
    """What a parsed JSON value is, in JSON's terms."""
    names = {dict: "an object", list: "an array", str: "a string", bool: "a boolean", int: "a number",
             float: "a number", type(None): "null"}
    return names.get(type(value), type(value).__name__)

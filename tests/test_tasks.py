"""The task generators and the JSONL reader, with tokenizers built here (no hub):

* ``word``: word-level (Whitespace pre-tokenizer) over every word the tasks use, with a Llama-like BOS;
* ``bpe``: GPT-2-like byte-level BPE trained on a small corpus of the tasks' sentences in which only some
  names occur, so the other names are several tokens and the generators must leave them out;
* ``digits``: word-level with digits split one by one (the greater-than fallback).
"""
import json
import re

import pytest
import torch
from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers, processors, trainers
from transformers import PreTrainedTokenizerFast

from nodeprune_kernels.tasks import (NONE, TASK_NAMES, GenderPronounTask, GreaterThanTask, InductionTask,
                                     IOITask, JsonlTask, TaskData, get_task)
from nodeprune_kernels.tasks import gender_pronoun, greater_than, ioi
from nodeprune_kernels.tasks.common import FEMALE_NAMES, MALE_NAMES
from nodeprune_kernels.tasks.greater_than import _good_bad

PROMPT_TASKS = ("ioi", "greater_than", "gender_pronoun")
SPECIALS = ["[UNK]", "[PAD]", "<s>", "</s>"]
N = 48


def _words(texts):
    ws = pre_tokenizers.Whitespace()
    return {w for t in texts for w, _ in ws.pre_tokenize_str(t)}


def all_task_texts():
    """Every string the generators put into a prompt or an answer."""
    return [*ioi.TEMPLATES, *ioi.NAMES, *ioi.PLACES, *ioi.OBJECTS, *gender_pronoun.TEMPLATES,
            *gender_pronoun.ROLES, *gender_pronoun.PRONOUNS.values(), *greater_than.NOUNS, greater_than.HEAD,
            greater_than.TAIL, "17", *(f"{y:02d}" for y in range(100))]


def word_level(words, bos=True, eos=False, digits=False):
    vocab = {w: i for i, w in enumerate(SPECIALS + sorted(set(words) - set(SPECIALS)))}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    if digits:
        tok.pre_tokenizer = pre_tokenizers.Sequence([pre_tokenizers.Whitespace(),
                                                     pre_tokenizers.Digits(individual_digits=True)])
    single = " ".join((["<s>"] if bos else []) + ["$A"] + (["</s>"] if eos else []))
    tok.post_processor = processors.TemplateProcessing(single=single, special_tokens=[("<s>", 2), ("</s>", 3)])
    return PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="[UNK]", pad_token="[PAD]", bos_token="<s>",
                                   eos_token="</s>")


FREQUENT = MALE_NAMES[:6] + FEMALE_NAMES[:6]  # the only names in the BPE corpus


def bpe_corpus():
    out = []
    for k, template in enumerate(ioi.TEMPLATES * 30):
        a, b = FREQUENT[k % 12], FREQUENT[(5 * k + 1) % 12]
        out.append(template.format(X=a, Y=b, S=b, place=ioi.PLACES[k % 16], object=ioi.OBJECTS[k % 16]) + " " + a)
    for k, template in enumerate(gender_pronoun.TEMPLATES * 40):
        name = FREQUENT[k % 12]
        pronoun = " he" if name in MALE_NAMES else " she"
        out.append(template.format(name=name, role=gender_pronoun.ROLES[k % 20]) + pronoun + ".")
    for yy in range(100):
        out.append(f"The {greater_than.NOUNS[yy % 24]} lasted from the year 17{yy:02d} to the year "
                   f"17{min(99, yy + 7):02d}.")
    out += ["-".join(f"{yy}" for yy in range(40, 60))] * 30  # these become one token, the others two
    return out


@pytest.fixture(scope="module")
def word():
    return word_level(_words(all_task_texts()))


@pytest.fixture(scope="module")
def bpe():
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=700, special_tokens=["<|endoftext|>"], show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(bpe_corpus(), trainer)
    return PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<|endoftext|>")  # pads with EOS


@pytest.fixture(scope="module", params=["word", "bpe"])
def tokenizer(request):
    return request.getfixturevalue(request.param)


def lengths(data):
    return data.attention_mask.sum(1).tolist()


def prompt_text(tok, data, i, corrupted=False):
    ids = (data.corrupt_ids if corrupted else data.input_ids)[i, :lengths(data)[i]]
    return tok.decode(ids, skip_special_tokens=True)


def next_token(tok, prompt, answer):
    """The first token the answer adds after the prompt (the tasks' documented convention): the prompt and
    the answer encoded as one text, or the answer alone where the tokenizer merges across them."""
    head, full = tok.encode(prompt, add_special_tokens=False), tok.encode(prompt + answer, add_special_tokens=False)
    if full[:len(head)] == head:
        return full[len(head)]
    return tok.encode(answer, add_special_tokens=False)[0]


def assert_same(a: TaskData, b: TaskData):
    for f in ("input_ids", "corrupt_ids", "attention_mask", "positions", "target", "distractor", "is_eval",
              "good", "bad"):
        x, y = getattr(a, f), getattr(b, f)
        assert (x is None) == (y is None) and (x is None or torch.equal(x, y)), f


# --------------------------------------------------------------------------------------------------------------
# get_task


def test_get_task_names_and_paths(tmp_path):
    assert TASK_NAMES == ("ioi", "greater_than", "gender_pronoun", "induction")
    for name, cls in zip(TASK_NAMES, (IOITask, GreaterThanTask, GenderPronounTask, InductionTask)):
        task = get_task(name)
        assert type(task) is cls and task.name == name
        assert task.needs_tokenizer == (name != "induction")
    assert isinstance(get_task("greater-than"), GreaterThanTask)
    assert get_task("induction", prefix_len=5, bos_token_id=1).prefix_len == 5
    path = tmp_path / "mine.txt"  # an existing file works whatever its suffix
    path.write_text(json.dumps({"clean": "a", "corrupted": "b", "target": " c"}) + "\n")
    task = get_task(str(path))
    assert isinstance(task, JsonlTask) and task.name == "mine" and task.needs_tokenizer


def test_get_task_errors(tmp_path):
    with pytest.raises(ValueError) as e:
        get_task("iio")
    assert all(name in str(e.value) for name in TASK_NAMES) and ".jsonl" in str(e.value)
    with pytest.raises(ValueError, match="no option 'prefix'.*prefix_len"):
        get_task("induction", prefix=3)
    with pytest.raises(FileNotFoundError, match="missing.jsonl"):
        get_task(str(tmp_path / "missing.jsonl"))
    with pytest.raises(ValueError, match="orders"):
        get_task("ioi", orders=("ABAB",))
    with pytest.raises(ValueError, match="century"):
        get_task("greater_than", century=1700)


# --------------------------------------------------------------------------------------------------------------
# invariants of every prompt generator


@pytest.mark.parametrize("name", PROMPT_TASKS)
def test_prompt_task_invariants(name, tokenizer, word):
    data = get_task(name).build(tokenizer, n=N, seed=3)
    N_, T = data.input_ids.shape
    assert N_ == len(data) == N and data.name == name and data.meta["vocab_size"] == len(tokenizer)
    for t in (data.input_ids, data.corrupt_ids, data.attention_mask, data.target, data.distractor):
        assert t.dtype == torch.long and t.device.type == "cpu"
    assert data.positions.dtype == torch.bool and not data.is_eval.any()
    L = torch.tensor(lengths(data))
    assert int(L.max()) == T
    real = data.attention_mask.bool()
    assert torch.equal(real, torch.arange(T) < L[:, None])                      # right padding
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    assert (data.input_ids[~real] == pad).all() and (data.corrupt_ids[~real] == pad).all()
    # one position per example, the prompt's last token, with a target and a different distractor
    assert torch.equal(data.positions.nonzero()[:, 1], L - 1)
    assert (data.target[data.positions] >= 0).all() and (data.target[~data.positions] == NONE).all()
    assert (data.distractor[data.positions] != data.target[data.positions]).all()
    assert not torch.equal(data.input_ids, data.corrupt_ids)
    if tokenizer is word:
        assert (data.input_ids[:, 0] == tokenizer.bos_token_id).all()
        assert (data.input_ids != tokenizer.unk_token_id).all() and (data.corrupt_ids != tokenizer.unk_token_id).all()
    # deterministic in the seed; another seed gives other examples
    assert_same(data, get_task(name).build(tokenizer, n=N, seed=3))
    assert get_task(name).build(tokenizer, n=N, seed=4).input_ids.tolist() != data.input_ids.tolist()
    # n=None: the default number of examples; a model vocabulary smaller than the ids is caught
    assert len(get_task(name).build(tokenizer, n=None)) == 256
    with pytest.raises(ValueError, match="vocab"):
        get_task(name).build(tokenizer, n=4, vocab_size=10)


@pytest.mark.parametrize("name", PROMPT_TASKS)
def test_add_special_tokens_option(name, word):
    with_bos = get_task(name).build(word, n=8, seed=1)
    without = get_task(name, add_special_tokens=False).build(word, n=8, seed=1)
    assert torch.equal(torch.tensor(lengths(with_bos)), torch.tensor(lengths(without)) + 1)
    assert torch.equal(with_bos.input_ids[:, 1:], without.input_ids)
    assert torch.equal(with_bos.target[with_bos.positions], without.target[without.positions])
    eos_after = word_level(_words(all_task_texts()), eos=True)
    with pytest.raises(ValueError, match="add_special_tokens=False"):
        get_task(name).build(eos_after, n=4)
    get_task(name, add_special_tokens=False).build(eos_after, n=4)


def test_too_few_single_token_names():
    no_names = word_level(_words(all_task_texts()) - set(ioi.NAMES) | set(ioi.NAMES[:4]))
    for name in ("ioi", "gender_pronoun"):
        with pytest.raises(ValueError, match="names as one token"):
            get_task(name).build(no_names, n=4)


# --------------------------------------------------------------------------------------------------------------
# IOI

NAME_RE = re.compile(r"\b(" + "|".join(ioi.NAMES) + r")\b")


def test_ioi(tokenizer, bpe):
    data = get_task("ioi").build(tokenizer, n=N, seed=0)
    orders, usable = set(), set()
    for i in range(N):
        clean, corrupt = prompt_text(tokenizer, data, i), prompt_text(tokenizer, data, i, corrupted=True)
        names = NAME_RE.findall(clean)
        assert len(names) == 3
        io = next(n for n in names if names.count(n) == 1)
        s = next(n for n in names if names.count(n) == 2)
        assert names[2] == s
        orders.add("ABBA" if names[0] == io else "BABA")
        pos = lengths(data)[i] - 1
        assert data.target[i, pos] == next_token(tokenizer, clean, " " + io)
        assert data.distractor[i, pos] == next_token(tokenizer, clean, " " + s)
        # ABC: the same sentence, three other distinct names
        others = NAME_RE.findall(corrupt)
        assert len(set(others)) == 3 and not set(others) & {io, s}
        assert NAME_RE.sub("#", clean) == NAME_RE.sub("#", corrupt)
        # the ids differ exactly at the name tokens
        diff = (data.input_ids[i] != data.corrupt_ids[i]).nonzero().flatten().tolist()
        assert len(diff) == 3 and tokenizer.decode(data.input_ids[i, diff]).split() == names
        usable.update(names + others)
    assert orders == {"ABBA", "BABA"}
    if tokenizer is bpe:  # the byte-level BPE splits the names it did not see; they are left out
        assert usable <= set(FREQUENT)
        assert any(len(bpe.encode(" " + n)) > 1 for n in ioi.NAMES)
    assert get_task("ioi", orders="ABBA").build(tokenizer, n=4).input_ids.shape[0] == 4


# --------------------------------------------------------------------------------------------------------------
# greater-than

GT_RE = re.compile(r"The (\w+) lasted from the year 17 ?(\d\d) to the year 17")  # word-level: "17 32"


def test_greater_than(tokenizer, word, bpe):
    data = get_task("greater_than").build(tokenizer, n=N, seed=0)
    year_token = [next_token(tokenizer, " to the year 17", f"{y:02d}") for y in range(100)]
    if tokenizer is bpe:  # some two-digit suffixes are one token, the others two: the first-token fallback
        assert {len(bpe.encode(f"{y:02d}")) for y in range(100)} == {1, 2}
    for i in range(N):
        clean, corrupt = prompt_text(tokenizer, data, i), prompt_text(tokenizer, data, i, corrupted=True)
        noun, yy = GT_RE.fullmatch(clean).groups()
        yy = int(yy)
        assert noun in greater_than.NOUNS and 2 <= yy <= 98
        assert GT_RE.fullmatch(corrupt).groups() == (noun, "01")
        pos = lengths(data)[i] - 1
        target, distractor = int(data.target[i, pos]), int(data.distractor[i, pos])
        good = set(data.good[i][data.good[i] >= 0].tolist())
        bad = set(data.bad[i][data.bad[i] >= 0].tolist())
        assert not good & bad and target in good and distractor in bad
        assert target == year_token[yy + 1] and distractor == year_token[yy - 1]
        if tokenizer is word:  # every two-digit suffix is one token: the sets are exact
            assert good == set(year_token[yy + 1:]) and bad == set(year_token[:yy + 1])
            assert len(good) + len(bad) == 100
        # clean and corrupted differ in the start year's digits only
        diff = (data.input_ids[i] != data.corrupt_ids[i]).nonzero().flatten().tolist()
        assert diff and tokenizer.decode(data.corrupt_ids[i, diff[0]:diff[-1] + 1]).strip() in ("01", "1")


def digit_tokenizer(style):
    """Word-level with digits split one by one; "sentencepiece": Llama-2 style, a "▁" before the text (so
    "32" alone is "▁ 3 2", while after " to the year 17" it adds "3 2")."""
    if style == "word":
        return word_level(_words(all_task_texts()) | set("0123456789"), digits=True)
    pre = pre_tokenizers.Sequence([pre_tokenizers.Metaspace(prepend_scheme="always"),
                                   pre_tokenizers.Digits(individual_digits=True)])
    texts = [greater_than.HEAD.format(noun=noun, century=17) for noun in greater_than.NOUNS]
    words = {w for t in texts + [greater_than.TAIL, "0123456789"] for w, _ in pre.pre_tokenize_str(t)}
    tok = Tokenizer(models.WordLevel({w: i for i, w in enumerate(SPECIALS + sorted(words))}, unk_token="[UNK]"))
    tok.pre_tokenizer = pre
    tok = PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="[UNK]", pad_token="[PAD]")
    assert tok.encode("32") == tok.convert_tokens_to_ids(["▁", "3", "2"])
    return tok


@pytest.mark.parametrize("style", ["word", "sentencepiece"])
def test_greater_than_digit_tokenizers(style):
    """Digits one by one: a year stands for its tens digit, read in context (not the "▁" of "32" alone), and
    only YY = x9 separate YY+1 from YY-1."""
    tok = digit_tokenizer(style)
    data = get_task("greater_than").build(tok, n=N, seed=0)
    assert (data.input_ids != tok.unk_token_id).all()
    digit = {tok.convert_tokens_to_ids(str(d)): d for d in range(10)}
    for i in range(N):
        pos = lengths(data)[i] - 1
        digits = [digit[t] for t in data.input_ids[i, :pos + 1].tolist() if t in digit]  # 1 7 Y Y 1 7
        assert len(digits) == 6
        yy = 10 * digits[2] + digits[3]
        assert yy % 10 == 9
        assert digit[int(data.target[i, pos])] == yy // 10 + 1 and digit[int(data.distractor[i, pos])] == yy // 10
        good = {digit[t] for t in data.good[i].tolist() if t >= 0}
        bad = {digit[t] for t in data.bad[i].tolist() if t >= 0}
        assert good == set(range(yy // 10 + 1, 10)) and bad == set(range(yy // 10 + 1))


def test_good_bad_sets():
    exact = list(range(100, 200))                # one token per year
    good, bad = _good_bad(exact, 41)
    assert good == list(range(142, 200)) and bad == list(range(100, 142))
    tens = [y // 10 for y in range(100)]         # first token = tens digit: the shared one is in neither
    assert _good_bad(tens, 32) == ([4, 5, 6, 7, 8, 9], [0, 1, 2])


# --------------------------------------------------------------------------------------------------------------
# gendered pronouns


def test_gender_pronoun(tokenizer):
    data = get_task("gender_pronoun").build(tokenizer, n=N, seed=0)
    name_re = re.compile(r"\b(" + "|".join(MALE_NAMES + FEMALE_NAMES) + r")\b")
    males = 0
    for i in range(N):
        clean, corrupt = prompt_text(tokenizer, data, i), prompt_text(tokenizer, data, i, corrupted=True)
        (name,), (other,) = name_re.findall(clean), name_re.findall(corrupt)
        male = name in MALE_NAMES
        males += male
        assert (other in MALE_NAMES) != male
        assert name_re.sub("#", clean) == name_re.sub("#", corrupt)
        pos = lengths(data)[i] - 1
        he, she = next_token(tokenizer, clean, " he"), next_token(tokenizer, clean, " she")
        assert (int(data.target[i, pos]), int(data.distractor[i, pos])) == ((he, she) if male else (she, he))
        diff = (data.input_ids[i] != data.corrupt_ids[i]).nonzero().flatten().tolist()
        assert len(diff) == 1 and tokenizer.decode(data.input_ids[i, diff]).strip() == name
    assert males == N // 2


# --------------------------------------------------------------------------------------------------------------
# induction


@pytest.mark.parametrize("bos", [None, 7])
def test_induction(bos):
    P, V, lo = 6, 50, 10
    data = get_task("induction", prefix_len=P, lo=lo, bos_token_id=bos).build(n=N, seed=0, vocab_size=V)
    o = 0 if bos is None else 1
    assert data.input_ids.shape == (N, o + 2 * P) and data.attention_mask.all()
    assert data.meta["vocab_size"] == V and data.distractor.eq(NONE).all() and data.good is None
    if bos is not None:
        assert (data.input_ids[:, 0] == bos).all() and (data.corrupt_ids[:, 0] == bos).all()
    first, second = data.input_ids[:, o:o + P], data.input_ids[:, o + P:]
    assert torch.equal(first, second)
    marked = data.positions.nonzero()
    assert torch.equal(marked[:, 1], torch.arange(o + P, o + 2 * P - 1).repeat(N))
    # the target at t is token t+1, i.e. the first copy's token t+1-P
    assert torch.equal(data.target[:, o + P:o + 2 * P - 1], first[:, 1:])
    assert torch.equal(data.target[:, o + P:o + 2 * P - 1], data.input_ids[:, o + P + 1:])
    assert (data.target[:, :o + P] == NONE).all() and (data.target[:, -1] == NONE).all()
    # corrupted: same prefix, fresh second half (no token of the prefix, no repeats)
    assert torch.equal(data.corrupt_ids[:, :o + P], data.input_ids[:, :o + P])
    for i in range(N):
        prefix, fresh = set(first[i].tolist()), set(data.corrupt_ids[i, o + P:].tolist())
        assert len(prefix) == len(fresh) == P and not prefix & fresh
    ids = torch.cat([data.input_ids[:, o:], data.corrupt_ids[:, o:]])
    assert ids.min() >= lo and ids.max() < V and (ids != (-1 if bos is None else bos)).all()
    assert_same(data, get_task("induction", prefix_len=P, lo=lo, bos_token_id=bos).build(n=N, seed=0, vocab_size=V))
    other = get_task("induction", prefix_len=P, lo=lo, bos_token_id=bos).build(n=N, seed=1, vocab_size=V)
    assert not torch.equal(other.input_ids, data.input_ids)


def test_induction_tokenizer_and_errors(word):
    data = get_task("induction", prefix_len=8).build(word, n=16, seed=0)
    assert data.meta["vocab_size"] == len(word)
    ids = torch.cat([data.input_ids, data.corrupt_ids])
    assert ids.max() < len(word) and not torch.isin(ids, torch.tensor(word.all_special_ids)).any()
    assert get_task("induction", prefix_len=8).build(word, n=4, vocab_size=30).input_ids.max() < 30
    with pytest.raises(ValueError, match="vocab_size"):
        get_task("induction").build(n=4)
    with pytest.raises(ValueError, match="only 10 token ids"):
        get_task("induction", prefix_len=8, lo=90).build(n=4, vocab_size=100)
    with pytest.raises(ValueError, match="prefix_len"):
        get_task("induction", prefix_len=1)


# --------------------------------------------------------------------------------------------------------------
# JSONL

ROWS = [
    {"clean": "When Mary and John went to the store , John gave a drink to",
     "corrupted": "When Anna and Paul went to the store , Kate gave a drink to",
     "target": " Mary", "distractor": " John", "split": "train"},
    {"clean": "So Mary is such a good friend , isn ' t", "corrupted": "So John is such a good friend , isn ' t",
     "target": " she", "split": "eval"},
    {"clean": "The war lasted from the year 17 32 to the year",
     "corrupted": "The war lasted from the year 17 01 to the year", "target": " 17 33"},
]


def write_jsonl(path, rows):
    path.write_text("\n".join(r if isinstance(r, str) else json.dumps(r) for r in rows) + "\n")
    return path


def test_jsonl(tmp_path, word):
    path = write_jsonl(tmp_path / "mine.jsonl", [ROWS[0], "", "   ", ROWS[1], ROWS[2]])
    task = get_task(str(path))
    data = task.build(word)
    assert data.name == "mine" and data.meta["source"] == str(path) and len(data) == 3
    assert data.is_eval.tolist() == [False, True, False]
    ids = word.convert_tokens_to_ids
    for i, row in enumerate(ROWS):
        L = lengths(data)[i]
        assert data.input_ids[i, :L].tolist() == word.encode(row["clean"])
        assert data.corrupt_ids[i, :L].tolist() == word.encode(row["corrupted"])
        assert data.positions[i].nonzero().flatten().tolist() == [L - 1]
    assert data.target[data.positions].tolist() == [ids("Mary"), ids("she"), ids("17")]  # first token of " 17 33"
    assert data.distractor[data.positions].tolist() == [ids("John"), NONE, NONE]
    train, held = data.split()
    assert len(train) == 2 and len(held) == 1
    assert len(task.build(word, n=2)) == 2 and len(task.build(word, n=10)) == 3
    assert len(get_task(str(path), add_special_tokens=False).build(word).input_ids[0]) == lengths(data)[0] - 1


def test_jsonl_split_only_eval_rows_and_small_files(tmp_path, word):
    only_eval = write_jsonl(tmp_path / "eval.jsonl", [ROWS[1], dict(ROWS[0], split="eval")])
    with pytest.raises(ValueError, match="all 2 examples are marked for evaluation.*mark some rows"):
        get_task(str(only_eval)).build(word).split(None)
    # no split field, few rows: the default hold-out adapts (a quarter, at most 64) instead of failing
    rows = [{k: v for k, v in r.items() if k != "split"} for r in ROWS] * 7  # 21 rows
    small = get_task(str(write_jsonl(tmp_path / "small.jsonl", rows))).build(word)
    train, held = small.split(None)
    assert (len(train), len(held)) == (16, 5)
    with pytest.raises(ValueError, match="cannot hold out 64 of 21"):
        small.split(64)  # an explicit count is taken as asked


BAD_ROWS = [
    ('{"clean": "a b", "corrupted": "a c", "target": " d"', "invalid JSON"),
    ('["a", "b"]', "expected a JSON object"),
    ({"clean": "to", "corrupted": "to"}, "missing key 'target'"),
    ({"clean": "to", "corrupted": "to", "target": 3}, "'target' must be a string"),
    ({"clean": "to", "corrupted": "to", "target": " Mary", "distractor": [" John"]}, "'distractor' must be a string"),
    ({"clean": "to", "corrupted": "to", "target": " Mary", "spilt": "eval"}, "unknown key.*'spilt'"),
    ({"clean": "  ", "corrupted": "to", "target": " Mary"}, "clean prompt is empty"),
    ({"clean": "to", "corrupted": "", "target": " Mary"}, "corrupted prompt is empty"),
    ({"clean": "gave a drink to", "corrupted": "gave to", "target": " Mary"},
     "clean prompt is 5 tokens and the corrupted prompt 3; they must"),  # with the BOS
    ({"clean": "gave to", "corrupted": "gave to", "target": " "}, "target ' ' tokenizes to nothing"),
    ({"clean": "gave to", "corrupted": "gave to", "target": " Mary", "distractor": ""}, "distractor '' tokenizes"),
    ({"clean": "to", "corrupted": "to", "target": " Mary", "split": "test"}, "split must be one of train, eval"),
]


@pytest.mark.parametrize("row,message", BAD_ROWS)
def test_jsonl_errors_name_file_and_line(tmp_path, word, row, message):
    path = write_jsonl(tmp_path / "bad.jsonl", [ROWS[1], "", row, ROWS[0]])  # the bad row is on line 3
    with pytest.raises(ValueError, match=re.escape(f"{path}:3: ") + ".*" + message):
        get_task(str(path)).build(word)


def test_jsonl_prompt_tokenizing_to_nothing_and_empty_file(tmp_path):
    tok = word_level(_words(all_task_texts()))
    tok.backend_tokenizer.normalizer = normalizers.Replace("#", "")  # "###" is text but no token
    path = write_jsonl(tmp_path / "hash.jsonl", [ROWS[0], {"clean": "to", "corrupted": "###", "target": " Mary"}])
    with pytest.raises(ValueError, match=re.escape(f"{path}:2: the corrupted prompt tokenizes to nothing")):
        get_task(str(path)).build(tok)
    path = write_jsonl(tmp_path / "empty.jsonl", ["", "  "])
    with pytest.raises(ValueError, match=re.escape(str(path)) + ": no examples"):
        get_task(str(path))
    with pytest.raises(ValueError, match="needs a tokenizer"):
        get_task(str(write_jsonl(tmp_path / "ok.jsonl", [ROWS[0]]))).build(None)

"""Data layer: label masks of every JSONL shape, packing, determinism, sources, and every user error."""

import json
import re
import string

import pytest
import torch
from tokenizers import Tokenizer as RustTokenizer
from tokenizers import decoders, models, pre_tokenizers, trainers

from fuyou.data import IGNORE_INDEX, build_dataset, check_vocab
from fuyou.errors import DataError
from fuyou.synthetic import TASKS, generate_examples
from fuyou.tokenizer import ByteTokenizer, load_tokenizer

TOKENIZER = ByteTokenizer()
BOS, EOS, PAD = TOKENIZER.bos_id, TOKENIZER.eos_id, TOKENIZER.pad_id


def write_jsonl(path, records):
    path.write_text("".join(json.dumps(record) + "\n" for record in records))
    return path


def only_row(path, seq_len=40):
    """The single unpacked row of a one-record file, as (input_ids [S], labels [S]) lists."""
    dataset = build_dataset(source=str(path), tokenizer=TOKENIZER, seq_len=seq_len, seed=0, pack=False)
    batch = next(dataset.batches(1))
    return batch.input_ids[0].tolist(), batch.labels[0].tolist()


def targets(labels):
    """{position: label} of the positions that carry loss."""
    return {position: label for position, label in enumerate(labels) if label != IGNORE_INDEX}


def test_text_record_trains_every_token_after_bos(tmp_path):
    input_ids, labels = only_row(write_jsonl(tmp_path / "d.jsonl", [{"text": "ab"}]), seq_len=6)
    assert input_ids == [BOS, 97, 98, EOS, PAD, PAD]
    assert labels == [97, 98, EOS, -100, -100, -100]


def test_prompt_completion_trains_completion_and_eos_only(tmp_path):
    input_ids, labels = only_row(write_jsonl(tmp_path / "d.jsonl", [{"prompt": "ab", "completion": "cd", "id": 7}]))
    assert input_ids[:6] == [BOS, 97, 98, 99, 100, EOS]
    # Position 2 holds the last prompt token "b"; it predicts the first completion token "c".
    assert targets(labels) == {2: 99, 3: 100, 4: EOS}


def test_messages_train_assistant_turns_only(tmp_path):
    messages = [
        {"role": "system", "content": "s"},
        {"role": "user", "content": "q"},
        {"role": "assistant", "content": "a"},
        {"role": "user", "content": "r"},
        {"role": "assistant", "content": "bc"},
    ]
    input_ids, labels = only_row(write_jsonl(tmp_path / "d.jsonl", [{"messages": messages}]), seq_len=64)
    first = "System:\ns\nUser:\nq\nAssistant:\n"
    second = "User:\nr\nAssistant:\n"
    expected = [BOS, *first.encode(), ord("a"), EOS, *second.encode(), ord("b"), ord("c"), EOS]
    assert input_ids[: len(expected)] == expected
    a_at = 1 + len(first)  # position of "a" in the row
    b_at = a_at + 2 + len(second)
    # Each target sits one position before its token: labels[t] is the token at t + 1.
    assert targets(labels) == {a_at - 1: ord("a"), a_at: EOS, b_at - 1: ord("b"), b_at: ord("c"), b_at + 1: EOS}


def test_packed_rows_are_shifted_by_one_and_cover_every_transition_once(tmp_path):
    documents = ["first document here", "second one", "a third, somewhat longer document " * 3]
    (tmp_path / "d.txt").write_text("\n\n".join(documents) + "\n")
    documents = [document.strip() for document in documents]
    seq_len = 16
    dataset = build_dataset(source=str(tmp_path / "d.txt"), tokenizer=TOKENIZER, seq_len=seq_len, seed=3)
    assert dataset.num_examples == 3
    assert dataset.num_tokens == sum(len(document) + 2 for document in documents)  # + BOS + EOS each
    batch = next(dataset.batches(dataset.num_rows))  # exactly one epoch
    assert batch.input_ids.shape == batch.labels.shape == (dataset.num_rows, seq_len)
    assert batch.input_ids.dtype == batch.labels.dtype == torch.int64
    has_loss = batch.labels[:, :-1] != IGNORE_INDEX
    assert torch.equal(batch.labels[:, :-1][has_loss], batch.input_ids[:, 1:][has_loss])
    # Every token but the BOSes (never predicted) is a target exactly once: none lost at row cuts.
    assert batch.num_target_tokens == dataset.num_tokens - dataset.num_examples


def test_hf_tokenizer_dataset_masks_prompt_tokens(tmp_path):
    tokenizer = RustTokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    alphabet = pre_tokenizers.ByteLevel.alphabet()
    trainer = trainers.BpeTrainer(vocab_size=280, special_tokens=["</s>"], initial_alphabet=alphabet)
    tokenizer.train_from_iterator(["what is two plus two? four", "what is one plus one? two"] * 10, trainer)
    tokenizer.save(str(tmp_path / "tokenizer.json"))
    hf = load_tokenizer(str(tmp_path))
    path = write_jsonl(tmp_path / "d.jsonl", [{"prompt": "what is two plus two?", "completion": " four"}])
    dataset = build_dataset(source=str(path), tokenizer=hf, seq_len=32, seed=0, pack=False)
    labels = next(dataset.batches(1)).labels[0]
    assert labels[labels != IGNORE_INDEX].tolist() == [*hf.encode(" four"), hf.eos_id]


def test_packing_keeps_prompt_masks(tmp_path):
    records = [{"prompt": f"question {i}? ", "completion": "answer" * i} for i in range(1, 6)]
    path = write_jsonl(tmp_path / "d.jsonl", records)
    dataset = build_dataset(source=str(path), tokenizer=TOKENIZER, seq_len=8, seed=0)
    batch = next(dataset.batches(dataset.num_rows))
    assert batch.num_target_tokens == sum(len(record["completion"]) + 1 for record in records)
    target_ids = set(batch.labels[batch.labels != IGNORE_INDEX].tolist())
    assert target_ids == set(b"answer") | {EOS}


def test_unpacked_rows_truncate_with_a_warning(tmp_path):
    path = write_jsonl(tmp_path / "d.jsonl", [{"text": "x" * 50}, {"text": "short"}])
    with pytest.warns(UserWarning, match="1 of 2 examples are longer than seq_len"):
        dataset = build_dataset(source=str(path), tokenizer=TOKENIZER, seq_len=10, seed=0, pack=False)
    assert dataset.num_rows == 2
    batch = next(dataset.batches(2))
    assert batch.input_ids.shape == (2, 10)
    # "short": s h o r t EOS after BOS; the long one: the 10 x's that fit after BOS, no EOS.
    assert sorted((batch.labels != IGNORE_INDEX).sum(dim=1).tolist()) == [6, 10]


def first_batches(source, seed, num_batches=3, **kwargs):
    dataset = build_dataset(source=source, tokenizer=TOKENIZER, seq_len=32, seed=seed, **kwargs)
    batches = dataset.batches(4)
    return [next(batches) for _ in range(num_batches)]


@pytest.mark.parametrize("source", ["synthetic", "random", "file"])
def test_same_seed_same_batches_other_seed_other_batches(tmp_path, source):
    if source == "file":
        source = str(write_jsonl(tmp_path / "d.jsonl", [{"text": f"document number {i}"} for i in range(40)]))
    kwargs = {"num_synthetic_examples": 500} if source == "synthetic" else {}
    same = zip(first_batches(source, 1, **kwargs), first_batches(source, 1, **kwargs))
    assert all(torch.equal(a.input_ids, b.input_ids) and torch.equal(a.labels, b.labels) for a, b in same)
    other = zip(first_batches(source, 1, **kwargs), first_batches(source, 2, **kwargs))
    assert not all(torch.equal(a.input_ids, b.input_ids) for a, b in other)


def test_batches_cycle_epochs_even_when_smaller_than_a_batch(tmp_path):
    path = write_jsonl(tmp_path / "d.jsonl", [{"text": "one"}, {"text": "two"}])
    dataset = build_dataset(source=str(path), tokenizer=TOKENIZER, seq_len=16, seed=0, pack=False)
    batches = dataset.batches(3)
    rows = torch.cat([next(batches).input_ids for _ in range(4)])  # 12 rows = 6 epochs of 2
    for epoch in rows.split(2):
        assert sorted(TOKENIZER.decode(row.tolist()) for row in epoch) == ["one", "two"]


def test_random_source_in_range_all_targets():
    dataset = build_dataset(source="random", tokenizer=TOKENIZER, seq_len=64, seed=0)
    batch = next(dataset.batches(8))
    assert batch.input_ids.shape == (8, 64)
    assert 0 <= int(batch.input_ids.min()) and int(batch.input_ids.max()) < TOKENIZER.vocab_size
    assert batch.num_target_tokens == 8 * 64
    assert torch.equal(batch.labels[:, :-1], batch.input_ids[:, 1:])


def test_text_file_and_directory(tmp_path):
    (tmp_path / "one.txt").write_text("para one\nstill one\n\n  \n\npara two\n\n\n")
    dataset = build_dataset(source=str(tmp_path / "one.txt"), tokenizer=TOKENIZER, seq_len=8, seed=0)
    assert dataset.num_examples == 2
    assert dataset.num_tokens == len("para one\nstill one") + len("para two") + 4
    (tmp_path / "sub").mkdir()
    (tmp_path / "sub" / "two.txt").write_text("another\n\nfile")
    (tmp_path / "ignored.md").write_text("not text")
    dataset = build_dataset(source=str(tmp_path), tokenizer=TOKENIZER, seq_len=8, seed=0, format="text")
    assert dataset.num_examples == 2  # one document per file, blank lines inside it kept


def solve(example):
    """The completion a synthetic example should have, re-derived from its prompt."""
    prompt, completion = example.prompt, example.completion
    if example.task in ("add", "subtract"):
        a, operator, b = re.fullmatch(r"(\d+)([+-])(\d+)=", prompt).groups()
        return str(int(a) + int(b) if operator == "+" else int(a) - int(b))
    if example.task == "alphabet":
        first = ord(re.fullmatch(r"alphabet from ([a-z]): ", prompt)[1]) - ord("a")
        return string.ascii_lowercase[first : first + len(completion)]
    if example.task == "count":
        start = int(re.fullmatch(r"count from (\d+): ", prompt)[1])
        return " ".join(str(start + offset) for offset in range(1, len(completion.split()) + 1))
    word = re.fullmatch(rf"{example.task}: ([a-z]+) -> ", prompt)[1]
    return {"reverse": word[::-1], "upper": word.upper(), "copy": word, "sort": "".join(sorted(word))}[example.task]


def test_synthetic_examples_are_correct_and_diverse():
    examples = generate_examples(3000, seed=0)
    assert {example.task for example in examples} == set(TASKS)
    # alphabet (~100 possible) and count (~400) repeat; the other tasks almost never do.
    assert len({example.text for example in examples}) > 0.8 * len(examples)
    for task in TASKS:
        assert len({example.text for example in examples if example.task == task}) >= 50, task
    assert generate_examples(50, seed=0) == examples[:50]
    assert generate_examples(50, seed=1) != examples[:50]
    for example in examples:
        assert "\n" not in example.text and example.completion
        assert example.completion == solve(example), example


def test_synthetic_dataset_masks_prompts():
    dataset = build_dataset(source="synthetic", tokenizer=TOKENIZER, seq_len=64, seed=0, num_synthetic_examples=200)
    assert dataset.num_examples == 200
    batch = next(dataset.batches(8))
    assert 0 < batch.num_target_tokens < batch.labels.numel() // 2
    assert batch.to("cpu").num_target_tokens == batch.num_target_tokens


def test_check_vocab_is_exported_for_the_trainer():
    with pytest.raises(DataError, match="tokenizer has 259 ids but the model's vocabulary has 128"):
        check_vocab(TOKENIZER, 128)


GOOD = json.dumps({"text": "fine"})
EACH_LINE_NEEDS = 'each line needs exactly one of "text", "prompt"+"completion" or "messages"'
# (bad line, the start of the message it must raise); the bad line is line 3 of the file.
JSONL_ERRORS = [
    ('{"text": "a",}', "not valid JSON (Expecting property name enclosed in double quotes at column"),
    ("[1, 2]", "expected a JSON object, got array"),
    ('{"body": "x"}', f"has keys ['body']; {EACH_LINE_NEEDS}"),
    ('{"text": "x", "messages": []}', f"has text and messages; {EACH_LINE_NEEDS}"),
    ('{"text": 5}', '"text" must be a string, got number'),
    ('{"prompt": "p"}', 'has "prompt" or "completion" but not both; add "completion"'),
    ('{"prompt": "p", "completion": null}', '"completion" must be a string, got null'),
    ('{"messages": "hi"}', '"messages" must be a non-empty array of {"role", "content"} objects, got string'),
    ('{"messages": []}', '"messages" must be a non-empty array of {"role", "content"} objects, got an empty array'),
    ('{"messages": ["hi"]}', 'messages[0] must be an object with "role" and "content", got string'),
    ('{"messages": [{"content": "x"}]}', 'messages[0] has no "role"'),
    ('{"messages": [{"role": "bot", "content": "x"}]}', "messages[0].role is 'bot'; use one of system, user,"),
    ('{"messages": [{"role": "assistant", "content": ["x"]}]}', "messages[0].content must be a string, got array"),
    ('{"messages": [{"role": "user", "content": "x"}]}', "conversation has no assistant message"),
]


@pytest.mark.parametrize("bad_line, message", JSONL_ERRORS)
def test_jsonl_errors_name_file_and_line(tmp_path, bad_line, message):
    # Line 2 is blank, so the bad line is line 3 of the file: blank lines count towards the number.
    path = tmp_path / "d.jsonl"
    path.write_text(f"{GOOD}\n\n{bad_line}\n{GOOD}\n")
    with pytest.raises(DataError) as error:
        build_dataset(source=str(path), tokenizer=TOKENIZER, seq_len=16, seed=0)
    assert str(error.value).startswith(f"{path}:3: {message}")
    assert "\n" not in str(error.value)


def test_source_errors(tmp_path):
    def build(source, **kwargs):
        return build_dataset(source=str(source), tokenizer=TOKENIZER, seq_len=16, seed=0, **kwargs)

    with pytest.raises(DataError, match="'.*missing.jsonl' is neither 'synthetic', 'random' nor an existing"):
        build(tmp_path / "missing.jsonl")
    (tmp_path / "empty.jsonl").write_text("\n  \n")
    with pytest.raises(DataError, match=r"empty.jsonl: no examples in it \(empty, or only blank lines\)"):
        build(tmp_path / "empty.jsonl")
    (tmp_path / "empty.txt").write_text("")
    with pytest.raises(DataError, match="empty.txt: no examples in it"):
        build(tmp_path / "empty.txt")
    (tmp_path / "latin1.txt").write_bytes("ok\nline two\ncaf\xe9\n".encode("latin-1"))
    with pytest.raises(DataError, match=r"latin1.txt:3: not UTF-8 text \(invalid continuation byte\); re-encode"):
        build(tmp_path / "latin1.txt")
    (tmp_path / "data.csv").write_text("a,b\n")
    with pytest.raises(DataError, match=r"data.csv: cannot tell its format from the suffix '.csv'"):
        build(tmp_path / "data.csv")
    assert build(tmp_path / "data.csv", format="text").num_examples == 1
    with pytest.raises(DataError, match="data format 'csv' is not one of auto, text, jsonl"):
        build(tmp_path / "data.csv", format="csv")
    (tmp_path / "dir").mkdir()
    with pytest.raises(DataError, match="dir is a directory without .txt files"):
        build(tmp_path / "dir")
    with pytest.raises(DataError, match="dir is a directory; the jsonl format reads one .jsonl file"):
        build(tmp_path / "dir", format="jsonl")
    with pytest.raises(DataError, match="seq_len must be at least 1, got 0"):
        build_dataset(source="random", tokenizer=TOKENIZER, seq_len=0, seed=0)
    with pytest.raises(DataError, match="batch size must be at least 1, got 0"):
        next(build_dataset(source="random", tokenizer=TOKENIZER, seq_len=8, seed=0).batches(0))
    with pytest.warns(UserWarning, match="data format 'jsonl' is ignored for the 'random' source"):
        build_dataset(source="random", tokenizer=TOKENIZER, seq_len=8, seed=0, format="jsonl")

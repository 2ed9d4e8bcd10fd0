"""Tokenizers: byte round trips, a tiny trained BPE tokenizer.json, special-token discovery, errors."""

import json

import pytest
from tokenizers import Tokenizer as RustTokenizer
from tokenizers import decoders, models, pre_tokenizers, processors, trainers

from fuyou.errors import DataError
from fuyou.tokenizer import ByteTokenizer, HFTokenizer, check_vocab, load_tokenizer

CORPUS = ["the quick brown fox jumps over the lazy dog", "hello world, hello tokenizer", "12+30=42"] * 20


def train_bpe(directory, special_tokens=("<unk>", "<s>", "</s>", "<pad>"), bos_template=False):
    """A tiny byte-level BPE saved as directory/tokenizer.json; returns the file path."""
    tokenizer = RustTokenizer(models.BPE(unk_token="<unk>" if "<unk>" in special_tokens else None))
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=300, special_tokens=list(special_tokens), initial_alphabet=pre_tokenizers.ByteLevel.alphabet()
    )
    tokenizer.train_from_iterator(CORPUS, trainer)
    if bos_template:
        # Like Llama's tokenizer.json: the post-processor adds <s>, which encode must not do.
        tokenizer.post_processor = processors.TemplateProcessing(
            single="<s> $A", special_tokens=[("<s>", tokenizer.token_to_id("<s>"))]
        )
    path = directory / "tokenizer.json"
    tokenizer.save(str(path))
    return path


def test_byte_round_trip_ascii_and_unicode():
    tokenizer = load_tokenizer("byte")
    for text in ["hello world", "héllo wörld — 你好 🙂", "", "line\nbreak\ttab"]:
        ids = tokenizer.encode(text)
        assert all(0 <= i < 256 for i in ids)
        assert tokenizer.decode(ids) == text
    assert tokenizer.encode_batch(["ab", "é"]) == [[97, 98], [0xC3, 0xA9]]


def test_byte_specials_fit_tiny_vocab_and_are_dropped_by_decode():
    tokenizer = ByteTokenizer()
    specials = {tokenizer.pad_id, tokenizer.bos_id, tokenizer.eos_id}
    assert len(specials) == 3 and min(specials) >= 256 and max(specials) < tokenizer.vocab_size
    assert tokenizer.vocab_size == 259 <= 512
    # 400: an id a vocab-512 model can sample but the tokenizer never produces.
    assert tokenizer.decode([tokenizer.bos_id, 104, 105, tokenizer.eos_id, 400, tokenizer.pad_id]) == "hi"


def test_hf_tokenizer_from_trained_tokenizer_json(tmp_path):
    path = train_bpe(tmp_path, bos_template=True)
    raw = RustTokenizer.from_file(str(path))
    for spec in (str(path), str(tmp_path)):
        tokenizer = load_tokenizer(spec)
        assert isinstance(tokenizer, HFTokenizer)
        assert tokenizer.vocab_size == raw.get_vocab_size()
        assert tokenizer.eos_id == raw.token_to_id("</s>")
        assert tokenizer.bos_id == raw.token_to_id("<s>")
        assert tokenizer.pad_id == raw.token_to_id("<pad>")
        text = "hello quick fox, 12+30=42"
        ids = tokenizer.encode(text)
        assert tokenizer.bos_id not in ids  # the post-processor's BOS is not added
        assert all(0 <= i < tokenizer.vocab_size for i in ids)
        assert tokenizer.decode(ids) == text
        assert tokenizer.decode([tokenizer.bos_id, *ids, tokenizer.eos_id]) == text
        assert tokenizer.encode_batch([text, "hello"]) == [ids, tokenizer.encode("hello")]


def test_hf_tokenizer_without_pad_or_bos_uses_eos_as_pad(tmp_path):
    path = train_bpe(tmp_path, special_tokens=("<|endoftext|>",))
    tokenizer = HFTokenizer(path)
    assert tokenizer.eos_id == tokenizer.pad_id == RustTokenizer.from_file(str(path)).token_to_id("<|endoftext|>")
    assert tokenizer.bos_id is None


def test_hf_tokenizer_config_names_special_tokens(tmp_path):
    path = train_bpe(tmp_path, special_tokens=("<unk>", "<s>", "</s>", "<pad>", "<|end|>"))
    config = {"eos_token": {"content": "<|end|>", "special": True}, "bos_token": None, "pad_token": "<unk>"}
    (tmp_path / "tokenizer_config.json").write_text(json.dumps(config))
    tokenizer = load_tokenizer(str(tmp_path))
    raw = RustTokenizer.from_file(str(path))
    assert tokenizer.eos_id == raw.token_to_id("<|end|>")
    assert tokenizer.pad_id == raw.token_to_id("<unk>")
    assert tokenizer.bos_id is None

    (tmp_path / "tokenizer_config.json").write_text(json.dumps({"eos_token": "<|missing|>"}))
    with pytest.raises(DataError, match=r"tokenizer_config.json: names special token '<\|missing\|>'"):
        load_tokenizer(str(tmp_path))


def test_hf_tokenizer_without_eos_says_what_to_add(tmp_path):
    path = train_bpe(tmp_path, special_tokens=("<unk>",))
    with pytest.raises(DataError, match=r"found no end-of-sequence token \(looked for </s>, <\|endoftext\|>") as error:
        HFTokenizer(path)
    assert "\n" not in str(error.value)


def test_load_tokenizer_errors(tmp_path):
    with pytest.raises(DataError, match="neither 'byte' nor an existing tokenizer.json"):
        load_tokenizer(str(tmp_path / "nope.json"))
    with pytest.raises(DataError, match="directory without a tokenizer.json"):
        load_tokenizer(str(tmp_path))
    (tmp_path / "tokenizer.model").write_bytes(b"\x00")
    with pytest.raises(DataError, match="tokenizer.model but no tokenizer.json; convert it"):
        load_tokenizer(str(tmp_path))
    broken = tmp_path / "broken.json"
    broken.write_text("{not json")
    with pytest.raises(DataError, match="broken.json: not a loadable tokenizer.json") as error:
        load_tokenizer(str(broken))
    assert "\n" not in str(error.value)


def test_check_vocab():
    check_vocab(ByteTokenizer(), 512)
    check_vocab(ByteTokenizer(), 259)
    with pytest.raises(DataError) as error:
        check_vocab(ByteTokenizer(), 256)
    assert str(error.value) == (
        "tokenizer has 259 ids but the model's vocabulary has 256; "
        "use a tokenizer that matches the model or set model.vocab_size >= 259"
    )

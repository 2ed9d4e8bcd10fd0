"""Tokenizers: the built-in byte tokenizer and a wrapper around a Hugging Face `tokenizer.json`.

Both implement the `Tokenizer` protocol, which is all the data layer and the trainer rely on.
`encode` never adds special tokens: the data layer decides where BOS and EOS go (see `fuyou.data`),
so a tokenizer's own post-processor (which would add a BOS to every prompt and completion piece
separately) is bypassed.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Protocol, Sequence

from fuyou.errors import DataError

# Special tokens looked for, in order, when a tokenizer.json does not come with a tokenizer_config.json
# naming them. The lists cover the Llama 2/3, Mistral, Qwen, GPT-2/NeoX and Gemma families.
EOS_CANDIDATES = ("</s>", "<|endoftext|>", "<|end_of_text|>", "<eos>", "<|eot_id|>", "<|im_end|>")
BOS_CANDIDATES = ("<s>", "<|begin_of_text|>", "<bos>")
PAD_CANDIDATES = ("<pad>", "<|pad|>", "[PAD]", "<|finetune_right_pad_id|>")


class Tokenizer(Protocol):
    """What the data layer and trainer need from a tokenizer.

    Attributes:
        vocab_size: Number of ids; every id `encode` returns is in `[0, vocab_size)`.
        eos_id: End-of-sequence id, appended after every example.
        pad_id: Id that fills unpacked rows; those positions always carry label -100.
        bos_id: Id prepended to every example, or None for tokenizers that use no BOS (Qwen, GPT-2).
    """

    vocab_size: int
    eos_id: int
    pad_id: int
    bos_id: int | None

    def encode(self, text: str) -> list[int]:
        """Token ids of `text`, without any special tokens."""
        ...

    def encode_batch(self, texts: Sequence[str]) -> list[list[int]]:
        """`[encode(text) for text in texts]`, possibly faster (the HF tokenizer runs it in parallel)."""
        ...

    def decode(self, ids: Sequence[int]) -> str:
        """Text of `ids`; special ids and ids outside the vocabulary are dropped."""
        ...


class ByteTokenizer:
    """Byte-level tokenizer needing no files: ids 0..255 are the UTF-8 bytes, then three specials.

    The vocabulary (259 ids) fits the tiny model presets (vocabulary 512); ids 259..511 of such a
    model are simply never produced.
    """

    pad_id = 256
    bos_id = 257
    eos_id = 258
    vocab_size = 259

    def encode(self, text: str) -> list[int]:
        """UTF-8 bytes of `text` as ids in [0, 256)."""
        return list(text.encode("utf-8"))

    def encode_batch(self, texts: Sequence[str]) -> list[list[int]]:
        """`[encode(text) for text in texts]`."""
        return [list(text.encode("utf-8")) for text in texts]

    def decode(self, ids: Sequence[int]) -> str:
        """Text of the byte ids in `ids`; specials and unused ids of a padded model vocabulary are
        dropped, and a sequence cut mid-character decodes to U+FFFD rather than failing."""
        return bytes(i for i in ids if 0 <= i < 256).decode("utf-8", errors="replace")


class HFTokenizer:
    """A Hugging Face `tokenizers` tokenizer loaded from a `tokenizer.json`.

    Special tokens come from a `tokenizer_config.json` beside the file when it names them
    (`eos_token`, `bos_token`, `pad_token`, `add_bos_token`), otherwise from the first of
    `EOS_CANDIDATES` / `BOS_CANDIDATES` / `PAD_CANDIDATES` present in the vocabulary. Without a pad
    token, EOS doubles as pad: padded positions carry label -100 and, under a causal mask, come after
    every real token, so the pad id never changes the loss.

    Args:
        path: The `tokenizer.json` file.

    Raises:
        DataError: The file does not load, or no end-of-sequence token can be found.
    """

    def __init__(self, path: str | Path) -> None:
        from tokenizers import Tokenizer as RustTokenizer

        self.path = Path(path)
        try:
            self._tokenizer = RustTokenizer.from_file(str(self.path))
        except Exception as error:  # the Rust side raises a bare Exception for any malformed file
            first_line = str(error).splitlines()[0] if str(error) else type(error).__name__
            raise DataError(f"{self.path}: not a loadable tokenizer.json ({first_line})") from None
        vocab = self._tokenizer.get_vocab(with_added_tokens=True)
        # max id + 1 rather than len(vocab): a few tokenizer.json files have holes in their id range.
        self.vocab_size = max(vocab.values()) + 1
        config = self._read_config()

        eos_id = self._find(config.get("eos_token"), EOS_CANDIDATES)
        if eos_id is None:
            raise DataError(
                f"{self.path}: found no end-of-sequence token (looked for {', '.join(EOS_CANDIDATES)}); "
                "add one as a special token, or name it as eos_token in a tokenizer_config.json beside it"
            )
        self.eos_id: int = eos_id
        pad_id = self._find(config.get("pad_token"), PAD_CANDIDATES)
        self.pad_id: int = eos_id if pad_id is None else pad_id
        if config.get("add_bos_token") is False or ("bos_token" in config and config["bos_token"] is None):
            self.bos_id: int | None = None
        else:
            self.bos_id = self._find(config.get("bos_token"), BOS_CANDIDATES)

    def _read_config(self) -> dict:
        """The special-token fields of `tokenizer_config.json` beside the file, or {} if absent."""
        config_path = self.path.with_name("tokenizer_config.json")
        if not config_path.is_file():
            return {}
        try:
            config = json.loads(config_path.read_text(encoding="utf-8"))
        except (json.JSONDecodeError, UnicodeDecodeError) as error:
            raise DataError(f"{config_path}: not valid JSON ({error}); fix or delete it") from None
        if not isinstance(config, dict):
            raise DataError(f"{config_path}: expected a JSON object; fix or delete it")
        # Fields are either a token string or an AddedToken dict {"content": "</s>", ...}.
        return {
            key: value["content"] if isinstance(value, dict) else value
            for key, value in config.items()
            if key in ("eos_token", "bos_token", "pad_token", "add_bos_token")
        }

    def _find(self, named: str | None, candidates: Sequence[str]) -> int | None:
        """Id of the token named by the config if any, else of the first candidate present."""
        if named is not None:
            token_id = self._tokenizer.token_to_id(named)
            if token_id is None:
                raise DataError(
                    f"{self.path.with_name('tokenizer_config.json')}: names special token {named!r}, "
                    f"which is not in {self.path.name}; fix the config or the tokenizer"
                )
            return token_id
        for token in candidates:
            token_id = self._tokenizer.token_to_id(token)
            if token_id is not None:
                return token_id
        return None

    def encode(self, text: str) -> list[int]:
        """Token ids of `text`, without the special tokens the tokenizer's post-processor would add."""
        return self._tokenizer.encode(text, add_special_tokens=False).ids

    def encode_batch(self, texts: Sequence[str]) -> list[list[int]]:
        """`[encode(text) for text in texts]`, run in parallel by the Rust tokenizer."""
        return [encoding.ids for encoding in self._tokenizer.encode_batch(list(texts), add_special_tokens=False)]

    def decode(self, ids: Sequence[int]) -> str:
        """Text of `ids`; special tokens and ids outside the vocabulary are dropped."""
        return self._tokenizer.decode([i for i in ids if 0 <= i < self.vocab_size], skip_special_tokens=True)


def load_tokenizer(spec: str) -> Tokenizer:
    """Build the tokenizer a config names.

    Args:
        spec: "byte" for `ByteTokenizer`; or the path of a `tokenizer.json`, or of a directory holding
            one (a Hugging Face model directory), for `HFTokenizer`.

    Returns:
        The tokenizer.

    Raises:
        DataError: `spec` is neither "byte" nor a usable tokenizer.json file or directory.
    """
    if spec == "byte":
        return ByteTokenizer()
    path = Path(spec).expanduser()
    if path.is_dir():
        if (path / "tokenizer.json").is_file():
            return HFTokenizer(path / "tokenizer.json")
        if (path / "tokenizer.model").is_file():
            raise DataError(
                f"{path} has a sentencepiece tokenizer.model but no tokenizer.json; convert it with "
                f"transformers: AutoTokenizer.from_pretrained('{path}').save_pretrained('{path}')"
            )
        raise DataError(f"{path} is a directory without a tokenizer.json; point the tokenizer at one, or use 'byte'")
    if path.is_file():
        return HFTokenizer(path)
    raise DataError(f"tokenizer {spec!r} is neither 'byte' nor an existing tokenizer.json or directory holding one")


def check_vocab(tokenizer: Tokenizer, model_vocab_size: int) -> None:
    """Fail before training if the tokenizer can produce ids the model's embedding does not have.

    Args:
        tokenizer: The tokenizer feeding the model.
        model_vocab_size: Rows of the model's embedding table.

    Raises:
        DataError: `tokenizer.vocab_size > model_vocab_size`.
    """
    if tokenizer.vocab_size > model_vocab_size:
        raise DataError(
            f"tokenizer has {tokenizer.vocab_size} ids but the model's vocabulary has {model_vocab_size}; "
            f"use a tokenizer that matches the model or set model.vocab_size >= {tokenizer.vocab_size}"
        )

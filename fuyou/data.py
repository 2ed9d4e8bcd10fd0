"""Datasets: turn a data source into an endless, deterministic stream of `Batch`es of token rows.

Legend: B batch size, S `seq_len`, L = S + 1 tokens per row, N rows.

    source --read+validate--> examples (pieces of text, each with a loss flag)
           --tokenize-------> one token stream + target mask (or one padded row per example)
           --cut------------> rows [N, L] --shuffle each epoch--> Batch(input_ids [B, S], labels [B, S])

Sources (`build_dataset(source=...)`):
    "synthetic"  the embedded task mix of `fuyou.synthetic` (the default; no files); loss on answers.
    "random"     uniform random ids in [0, vocab_size), every position a target: for throughput runs.
    a path       a .txt file, a directory of .txt files, or a .jsonl file of {"text"},
                 {"prompt", "completion"} or {"messages"} records, read by `fuyou.data_files`
                 (which documents the shapes, their loss masks and the built-in chat format).

Every example is `[BOS] tokens [EOS]` (BOS only if the tokenizer has one); EOS is a target whenever the
last piece is, so the model learns where a completion stops.

Packing (`pack=True`, the default): examples, shuffled once by `seed`, are concatenated into one stream
and cut into rows of L tokens with stride S, so consecutive rows share one token and every next-token
transition is trained exactly once; the tail row is padded. Packed documents attend across their
boundaries (no block-diagonal mask): a common simplification whose cost is small because the EOS
between documents tells the model a new one starts. `pack=False` puts each example in its own row,
truncated to L tokens or padded with `pad_id`.
"""

from __future__ import annotations

import math
import random
import warnings
from array import array
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator, Sequence

import torch

from fuyou.data_files import EOS_PLACEHOLDER, Piece, read_examples
from fuyou.errors import DataError
from fuyou.synthetic import generate_examples
from fuyou.tokenizer import Tokenizer, check_vocab  # check_vocab re-exported: the trainer's data API

__all__ = ["Batch", "Dataset", "build_dataset", "check_vocab", "IGNORE_INDEX"]

IGNORE_INDEX = -100  # label of positions without loss; the default ignore_index of F.cross_entropy
FORMATS = ("auto", "text", "jsonl")
# The "random" source cycles over this many ids (4 MiB as int32); for throughput their values do not matter.
RANDOM_POOL_TOKENS = 2**20
ENCODE_CHUNK_EXAMPLES = 4096


@dataclass
class Batch:
    """One training batch.

    Attributes:
        input_ids: int64 [B, S] on the CPU.
        labels: int64 [B, S]; `labels[b, t]` is the token that follows `input_ids[b, t]`, or
            IGNORE_INDEX (-100) where there is no loss (prompts, padding).
    """

    input_ids: torch.Tensor
    labels: torch.Tensor

    @property
    def num_target_tokens(self) -> int:
        """Positions that contribute to the loss: the denominator of a per-token mean."""
        return int((self.labels != IGNORE_INDEX).sum())

    def to(self, device: torch.device | str, non_blocking: bool = False) -> Batch:
        """The batch with both tensors moved to `device`."""
        return Batch(
            input_ids=self.input_ids.to(device, non_blocking=non_blocking),
            labels=self.labels.to(device, non_blocking=non_blocking),
        )


@dataclass(frozen=True)
class Dataset:
    """Rows of L = seq_len + 1 tokens with a per-token target mask, served as shuffled batches.

    Built by `build_dataset`, which cuts the rows.

    Attributes:
        rows_NL: int32 [N, L] token ids (int32 halves the memory of a large tokenized corpus).
        target_mask_NL: bool [N, L]; True where the token is a loss target.
        seed: Seed of the per-epoch shuffles.
        num_examples: Examples (documents, records) the rows were cut from; for "random", N.
        num_tokens: Tokens of those examples, BOS and EOS included, padding excluded.
    """

    rows_NL: torch.Tensor
    target_mask_NL: torch.Tensor
    seed: int
    num_examples: int
    num_tokens: int

    def __post_init__(self) -> None:
        assert self.rows_NL.shape == self.target_mask_NL.shape and self.rows_NL.dim() == 2 and len(self.rows_NL)

    @property
    def num_rows(self) -> int:
        """N, the rows one epoch visits."""
        return self.rows_NL.shape[0]

    @property
    def seq_len(self) -> int:
        """S, the length of `input_ids` and `labels` in every batch."""
        return self.rows_NL.shape[1] - 1

    def batches(self, batch_size: int) -> Iterator[Batch]:
        """Yield batches forever, one epoch after another, each epoch in a fresh shuffled order.

        The order depends only on `seed`, so two datasets built alike yield identical batches. A batch
        may straddle two epochs (so a dataset smaller than one batch still works).

        Args:
            batch_size: B, rows per batch.

        Yields:
            Batch with input_ids and labels int64 [B, S] on the CPU.

        Raises:
            DataError: `batch_size` < 1.
        """
        if batch_size < 1:
            raise DataError(f"batch size must be at least 1, got {batch_size}")
        generator = torch.Generator().manual_seed(self.seed)
        pending_rows = torch.empty(0, dtype=torch.int64)
        while True:
            while pending_rows.numel() < batch_size:
                pending_rows = torch.cat([pending_rows, torch.randperm(self.num_rows, generator=generator)])
            row_indices, pending_rows = pending_rows[:batch_size], pending_rows[batch_size:]
            yield self._batch(row_indices)

    def _batch(self, row_indices: torch.Tensor) -> Batch:
        rows_BL = self.rows_NL[row_indices].long()
        target_mask_BL = self.target_mask_NL[row_indices]
        # Labels are the row shifted by one: position t predicts token t+1, with token t+1's mask.
        labels_BS = rows_BL[:, 1:].masked_fill(~target_mask_BL[:, 1:], IGNORE_INDEX)
        return Batch(input_ids=rows_BL[:, :-1].contiguous(), labels=labels_BS.contiguous())


def build_dataset(
    *,
    source: str,
    tokenizer: Tokenizer,
    seq_len: int,
    seed: int,
    format: str = "auto",
    pack: bool = True,
    num_synthetic_examples: int = 20_000,
) -> Dataset:
    """Read, validate and tokenize a whole source up front, so bad data fails before training starts.

    Args:
        source: "synthetic", "random", or a path to a .txt file, a directory of .txt files, or a .jsonl
            file (`fuyou.data_files` documents their shapes).
        tokenizer: Tokenizer for the text; its ids become the rows.
        seq_len: S, tokens per row of `input_ids`.
        seed: Seed of the synthetic task, random ids, packing order and epoch shuffles.
        format: "auto" (from the file suffix), "text" or "jsonl"; ignored for "synthetic" and "random".
        pack: Concatenate examples into full rows (True) or give each its own padded row (False).
        num_synthetic_examples: Examples the "synthetic" source draws.

    Returns:
        The dataset.

    Raises:
        DataError: The source is missing, empty or malformed (the message names file and line), or an
            argument is out of range.
    """
    if seq_len < 1:
        raise DataError(f"seq_len must be at least 1, got {seq_len}")
    if format not in FORMATS:
        raise DataError(f"data format {format!r} is not one of {', '.join(FORMATS)}")
    if source in ("synthetic", "random") and format != "auto":
        warnings.warn(f"data format {format!r} is ignored for the {source!r} source", stacklevel=2)
    if source == "random":
        return _random_dataset(tokenizer.vocab_size, seq_len, seed)
    if source == "synthetic":
        examples = [
            [Piece(example.prompt, False), Piece(example.completion, True)]
            for example in generate_examples(num_synthetic_examples, seed)
        ]
    else:
        examples = read_examples(Path(source).expanduser(), source, format)
    token_arrays, mask_arrays = _tokenize(examples, tokenizer)
    if pack:
        return _packed(token_arrays, mask_arrays, seq_len, seed, tokenizer.pad_id)
    return _unpacked(token_arrays, mask_arrays, seq_len, seed, tokenizer.pad_id)


def _tokenize(examples: Sequence[list[Piece]], tokenizer: Tokenizer) -> tuple[list[array], list[array]]:
    """Token ids and target flags of every example: `[BOS] pieces [EOS]`.

    Returns:
        (token_arrays, mask_arrays): per example an int32 array of ids and an int8 array of target
        flags of the same length (arrays, not lists: 5 bytes a token instead of about 40).
    """
    token_arrays, mask_arrays = [], []
    # Chunks of examples bound the memory of the tokenizer's intermediate results.
    for start in range(0, len(examples), ENCODE_CHUNK_EXAMPLES):
        chunk = examples[start : start + ENCODE_CHUNK_EXAMPLES]
        texts = [piece.content for example in chunk for piece in example if isinstance(piece.content, str)]
        encoded = iter(tokenizer.encode_batch(texts))
        for example in chunk:
            tokens = [] if tokenizer.bos_id is None else [tokenizer.bos_id]
            mask = [False] * len(tokens)  # BOS is never predicted: nothing precedes it
            for piece in example:
                piece_tokens = next(encoded) if isinstance(piece.content, str) else [tokenizer.eos_id]
                tokens += piece_tokens
                mask += [piece.is_target] * len(piece_tokens)
            if example[-1].content != EOS_PLACEHOLDER:
                tokens.append(tokenizer.eos_id)
                mask.append(example[-1].is_target)
            token_arrays.append(array("i", tokens))
            mask_arrays.append(array("b", mask))
    return token_arrays, mask_arrays


def _packed(token_arrays: list[array], mask_arrays: list[array], seq_len: int, seed: int, pad_id: int) -> Dataset:
    """Examples shuffled by `seed`, concatenated, and cut into rows of L tokens with stride S."""
    order = list(range(len(token_arrays)))
    # Shuffled before packing so that a file sorted by topic or length does not give homogeneous rows.
    random.Random(seed).shuffle(order)
    stream, stream_mask = array("i"), array("b")
    for index in order:
        stream.extend(token_arrays[index])
        stream_mask.extend(mask_arrays[index])
    num_tokens = len(stream)
    # Row r covers stream[r*S : r*S + L]; enough rows to give every transition, the tail row padded.
    num_rows = max(1, math.ceil((num_tokens - 1) / seq_len))
    num_padding = num_rows * seq_len + 1 - num_tokens
    stream.extend([pad_id] * num_padding)
    stream_mask.extend([False] * num_padding)
    tokens = torch.frombuffer(stream, dtype=torch.int32).clone()
    mask = torch.frombuffer(stream_mask, dtype=torch.int8).bool()
    return Dataset(
        rows_NL=tokens.unfold(0, seq_len + 1, seq_len),
        target_mask_NL=mask.unfold(0, seq_len + 1, seq_len),
        seed=seed,
        num_examples=len(token_arrays),
        num_tokens=num_tokens,
    )


def _unpacked(token_arrays: list[array], mask_arrays: list[array], seq_len: int, seed: int, pad_id: int) -> Dataset:
    """One row per example, truncated to L tokens or padded with `pad_id` (never a target)."""
    row_len = seq_len + 1
    rows_NL = torch.full((len(token_arrays), row_len), pad_id, dtype=torch.int32)
    target_mask_NL = torch.zeros((len(token_arrays), row_len), dtype=torch.bool)
    num_truncated = 0
    for row, (tokens, mask) in enumerate(zip(token_arrays, mask_arrays)):
        num_truncated += len(tokens) > row_len
        length = min(len(tokens), row_len)
        rows_NL[row, :length] = torch.frombuffer(tokens, dtype=torch.int32)[:length]
        target_mask_NL[row, :length] = torch.frombuffer(mask, dtype=torch.int8)[:length].bool()
    if num_truncated:
        warnings.warn(
            f"{num_truncated} of {len(token_arrays)} examples are longer than seq_len + 1 = {row_len} tokens "
            "and were truncated; raise seq_len or pack them",
            stacklevel=3,
        )
    return Dataset(
        rows_NL=rows_NL,
        target_mask_NL=target_mask_NL,
        seed=seed,
        num_examples=len(token_arrays),
        num_tokens=sum(len(tokens) for tokens in token_arrays),
    )


def _random_dataset(vocab_size: int, seq_len: int, seed: int) -> Dataset:
    """Rows of uniform random ids in [0, vocab_size), every position a target."""
    num_rows = max(8, math.ceil(RANDOM_POOL_TOKENS / (seq_len + 1)))
    generator = torch.Generator().manual_seed(seed)
    rows_NL = torch.randint(0, vocab_size, (num_rows, seq_len + 1), generator=generator, dtype=torch.int32)
    return Dataset(
        rows_NL=rows_NL,
        target_mask_NL=torch.ones_like(rows_NL, dtype=torch.bool),
        seed=seed,
        num_examples=num_rows,
        num_tokens=rows_NL.numel(),
    )

"""Batches the tests share (imported by test modules: pytest puts this directory on sys.path)."""

import torch

from fuyou.data import Batch


def fixed_batches(seed, count, vocab_size, batch_size=4, seq_len=32):
    """`count` batches of uniform random ids, each labelled with the next id, from one seeded generator."""
    generator = torch.Generator().manual_seed(seed)
    batches = []
    for _ in range(count):
        ids = torch.randint(0, vocab_size, (batch_size, seq_len + 1), generator=generator)
        batches.append(Batch(input_ids=ids[:, :-1].contiguous(), labels=ids[:, 1:].contiguous()))
    return batches

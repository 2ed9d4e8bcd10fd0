"""The embedded synthetic task: a mix of small, learnable prompt -> completion problems.

It lets `fuyou` train out of the box (no files, no downloads) and gives a loss that visibly falls
within a hundred steps on a tiny model, so a broken runtime shows up as a flat curve. Each example is
one line, a prompt and the completion the model must learn to produce:

    17+25=42                    add        two numbers in [0, 100)
    63-18=45                    subtract   a >= b, so answers stay non-negative
    reverse: kqzt -> tzqk       reverse    a random lowercase word of 3-8 letters
    upper: kqzt -> KQZT         upper
    copy: kqzt -> kqzt          copy
    sort: kqzt -> kqtz          sort       letters in alphabetical order
    alphabet from k: klmno      alphabet   3-8 letters, stopping at z
    count from 37: 38 39 40     count      3-6 numbers

The data layer puts loss on the completion (and the EOS after it) only, so the loss measures how well
the model solves the tasks, not how well it predicts random prompt operands. The mix is graded so the
loss keeps falling for a long while. Measured on a 2-layer, hidden-128 model (byte tokenizer, AdamW lr
1e-3, batch 8 x 128 tokens): the answer loss drops from 6.4 to about 3.0 in 100 steps (answer formats,
digits, letters) and 1.5 by step 1200; alphabet and count, which need mostly the previous token, reach
~0.4; copy, upper, reverse and sort need attention back to the prompt word and only start falling after
a few hundred steps; two-digit arithmetic learns its format fast and its digits slowly.
"""

from __future__ import annotations

import random
import string
from dataclasses import dataclass
from typing import Callable

MAX_OPERAND = 100  # operands are in [0, MAX_OPERAND)
MIN_WORD_LETTERS = 3
MAX_WORD_LETTERS = 8


@dataclass(frozen=True)
class SyntheticExample:
    """One problem of the task mix.

    Attributes:
        task: Name of the task, one of `TASKS`.
        prompt: The question, e.g. "17+25=" (no loss on it).
        completion: The answer, e.g. "42" (the loss target).
    """

    task: str
    prompt: str
    completion: str

    @property
    def text(self) -> str:
        """The example as one line, prompt then completion."""
        return self.prompt + self.completion


def _word(rng: random.Random) -> str:
    """A random lowercase word of MIN_WORD_LETTERS..MAX_WORD_LETTERS letters."""
    num_letters = rng.randint(MIN_WORD_LETTERS, MAX_WORD_LETTERS)
    return "".join(rng.choice(string.ascii_lowercase) for _ in range(num_letters))


def _add(rng: random.Random) -> tuple[str, str]:
    a, b = rng.randrange(MAX_OPERAND), rng.randrange(MAX_OPERAND)
    return f"{a}+{b}=", str(a + b)


def _subtract(rng: random.Random) -> tuple[str, str]:
    a, b = rng.randrange(MAX_OPERAND), rng.randrange(MAX_OPERAND)
    a, b = max(a, b), min(a, b)
    return f"{a}-{b}=", str(a - b)


def _reverse(rng: random.Random) -> tuple[str, str]:
    word = _word(rng)
    return f"reverse: {word} -> ", word[::-1]


def _upper(rng: random.Random) -> tuple[str, str]:
    word = _word(rng)
    return f"upper: {word} -> ", word.upper()


def _copy(rng: random.Random) -> tuple[str, str]:
    word = _word(rng)
    return f"copy: {word} -> ", word


def _alphabet(rng: random.Random) -> tuple[str, str]:
    first = rng.randrange(26 - MIN_WORD_LETTERS)
    num_letters = min(rng.randint(MIN_WORD_LETTERS, MAX_WORD_LETTERS), 26 - first)
    return f"alphabet from {string.ascii_lowercase[first]}: ", string.ascii_lowercase[first : first + num_letters]


def _count(rng: random.Random) -> tuple[str, str]:
    start = rng.randrange(MAX_OPERAND)
    return f"count from {start}: ", " ".join(str(start + offset) for offset in range(1, rng.randint(3, 6) + 1))


def _sort(rng: random.Random) -> tuple[str, str]:
    word = _word(rng)
    return f"sort: {word} -> ", "".join(sorted(word))


TASKS: dict[str, Callable[[random.Random], tuple[str, str]]] = {
    "add": _add,
    "subtract": _subtract,
    "reverse": _reverse,
    "upper": _upper,
    "copy": _copy,
    "sort": _sort,
    "alphabet": _alphabet,
    "count": _count,
}


def generate_examples(num_examples: int, seed: int) -> list[SyntheticExample]:
    """Draw examples from the task mix, each task equally likely.

    Args:
        num_examples: How many examples to draw.
        seed: Seed of the generator; the same seed always gives the same list.

    Returns:
        `num_examples` examples.
    """
    # A private Random so that callers' use of the global `random` state changes nothing here.
    rng = random.Random(seed)
    task_names = list(TASKS)
    examples = []
    for _ in range(num_examples):
        task = rng.choice(task_names)
        prompt, completion = TASKS[task](rng)
        examples.append(SyntheticExample(task=task, prompt=prompt, completion=completion))
    return examples

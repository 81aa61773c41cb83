"""The demo's bundled task: sort a short list of numbers, asked and answered in a short sentence.

    prompt    "Sort these numbers from smallest to largest: 42, 7, 19, 88, 3."
    response  "In order: 3, 7, 19, 42, 88."

A small model learns it only partly by SFT, and teacher forcing flatters it: given the right prefix,
the next number is just the smallest one left above the last, but in free-running generation one
skipped or repeated number shifts everything after it. The checker grades the numbers position by
position, so both the exact answers and the near misses show.
"""

from __future__ import annotations

import json
import math
import random
import re
from pathlib import Path

from spin_fast.files import write_atomically

PROMPTS = (
    "Sort these numbers from smallest to largest: {}.",
    "Put these numbers in increasing order: {}.",
    "Please sort the list {} in ascending order.",
)
RESPONSE = "In order: {}."
NUMBER = re.compile(r"\d+")


def make_example(rng: random.Random, min_items: int = 4, max_items: int = 7, max_value: int = 99) -> dict:
    """One (prompt, response) row: distinct numbers in [0, max_value], shuffled, and their sorted list."""
    numbers = rng.sample(range(max_value + 1), rng.randint(min_items, max_items))
    prompt = rng.choice(PROMPTS).format(", ".join(map(str, numbers)))
    return {"prompt": prompt, "response": RESPONSE.format(", ".join(map(str, sorted(numbers))))}


def distinct_lists(min_items: int, max_items: int, max_value: int) -> int:
    """How many different sorted answers the task has: sets of min_items to max_items numbers in [0, max_value]."""
    return sum(math.comb(max_value + 1, k) for k in range(min_items, max_items + 1))


def make_splits(n_train: int, n_eval: int, seed: int = 0, min_items: int = 4, max_items: int = 7,
                max_value: int = 99) -> tuple[list[dict], list[dict]]:
    """Training and held-out rows from one seeded stream; no held-out list of numbers occurs in training."""
    rng = random.Random(seed)
    sizes = dict(min_items=min_items, max_items=max_items, max_value=max_value)
    train = [make_example(rng, **sizes) for _ in range(n_train)]
    seen = {tuple(sorted(numbers(row["response"]))) for row in train}
    lists = distinct_lists(min_items, max_items, max_value)
    if lists - len(seen) < n_eval:  # the loop below would never end
        raise ValueError(f"the task has {lists} lists of {min_items} to {max_items} distinct numbers up to "
                         f"{max_value}, the training rows take {len(seen)}: fewer than n_eval={n_eval} are left for "
                         "the held-out set (raise max_value or max_items, or lower n_train or n_eval)")
    held_out: list[dict] = []
    while len(held_out) < n_eval:
        row = make_example(rng, **sizes)
        key = tuple(sorted(numbers(row["response"])))
        if key not in seen:
            seen.add(key)
            held_out.append(row)
    return train, held_out


def write_jsonl(path: str | Path, rows: list[dict]) -> Path:
    """Rows in the `prompt`/`response` schema that spin_fast.data reads; written whole or not at all."""
    write_atomically(path, "".join(json.dumps(row) + "\n" for row in rows))
    return Path(path)


def numbers(text: str) -> list[int]:
    return [int(n) for n in NUMBER.findall(text)]


def score(prompt: str, response: str, reference: str) -> float:
    """The share of positions, out of the longer list, where the response has the reference's number:
    1.0 only for the exact sorted list; a skipped number costs every position after it."""
    got, want = numbers(response), numbers(reference)
    if not want:
        raise ValueError(f"reference {reference!r} holds no numbers: it cannot grade a sorting answer")
    return sum(a == b for a, b in zip(got, want)) / max(len(got), len(want))

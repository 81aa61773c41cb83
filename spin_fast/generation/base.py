"""The engine interface shared by the transformers and vLLM engines."""

from __future__ import annotations

import bisect
import math
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, replace
from typing import Protocol

import torch

# Iteration t samples from seeds in [seed + t * SEEDS_PER_ITERATION, seed + (t + 1) * SEEDS_PER_ITERATION): the
# engines add each prompt's index (times n) to the seed, so with a stride of 1 prompt i + 1 of iteration t would
# draw the same random numbers as prompt i of iteration t + 1. The generators take them through generator_seed.
SEEDS_PER_ITERATION = 2**32


def generator_seed(seed: int) -> int:
    """The seed a request's generator is given, in [0, 2**32): a torch CPU generator (mt19937: the transformers
    engine's on CPU, the vLLM CPU build's) keeps a seed's low 32 bits alone, so iteration t's seeds, t * 2**32 above
    iteration 0's, drew iteration 0's numbers for every prompt. The high half is folded into the low one times an
    odd constant: seeds that differ in one half only stay apart, and prompt i of iteration t shares numbers with
    another prompt of iteration t + d (d <= 20) only 1.4e8 prompts away or more. Below 2**32 a seed is kept as is."""
    return (seed + (seed >> 32) * 0x9E3779B9) % 2**32


@dataclass(frozen=True)
class SamplingConfig:
    """How the opponent samples (the paper: temperature 1.0, top_p 1.0, 256 new tokens)."""

    temperature: float = 1.0  # 0: greedy
    top_p: float = 1.0
    top_k: int = 0  # 0: off
    max_new_tokens: int = 256
    seed: int = 0
    n: int = 1  # completions per prompt

    def __post_init__(self) -> None:
        if not 0 <= self.temperature < math.inf:  # NaN fails too
            raise ValueError(f"temperature must be a finite number >= 0 (0: greedy), got {self.temperature}")
        if not 0 < self.top_p <= 1:
            raise ValueError(f"top_p must be in (0, 1], got {self.top_p}")
        if self.top_k < 0:
            raise ValueError(f"top_k must be >= 0 (0: off), got {self.top_k}")
        for name in ("max_new_tokens", "n"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        if self.seed < 0:  # of any size: generator_seed folds it, with the offsets added, into what torch takes
            raise ValueError(f"seed must be >= 0, got {self.seed}")

    def for_iteration(self, t: int) -> SamplingConfig:
        """The sampling of SPIN iteration t: seeds no other iteration uses."""
        return replace(self, seed=self.seed + t * SEEDS_PER_ITERATION)


def request_cost(prompt: Sequence[int], sampling: SamplingConfig) -> int:
    """The most tokens a prompt's request holds by its end, its completions' included: what the ranks' shares of
    the prompts are balanced by (by prompt length alone, a rank of many short prompts decodes the most tokens)."""
    return len(prompt) + sampling.n * sampling.max_new_tokens


@dataclass(frozen=True)
class Completion:
    """One generated response: its token ids (without the final EOS), and whether EOS ended it."""

    token_ids: tuple[int, ...]
    finished: bool


def before_stop_text(token_ids: Sequence[int], tokenizer, stop_strings: Sequence[str]) -> int | None:
    """How many of `token_ids` come before the first of `stop_strings` in their text (the tokens it spans are dropped,
    as a stop token is), else None: an answer ends where a turn end that no token holds begins."""
    found = _before_stop(token_ids, tokenizer, stop_strings)
    return None if found is None else found[0]


def _before_stop(token_ids: Sequence[int], tokenizer, stop_strings: Sequence[str]) -> tuple[int, str] | None:
    """before_stop_text's count, and the text before the stop text."""
    text = tokenizer.decode(list(token_ids))
    at = min((found for stop in stop_strings if (found := text.find(stop)) >= 0), default=None)
    if at is None:
        return None
    decoded = lambda n: tokenizer.decode(list(token_ids[:n]))  # noqa: E731
    # The fewest tokens whose text holds it (a longer prefix still does), then back over the tokens that spell it to
    # the most whose text ends at or before it. Prefixes' texts are not bisected by length: they do not grow with
    # every token (a character cut between byte tokens decodes to one U+FFFD per byte).
    n = bisect.bisect_left(range(len(token_ids) + 1), True,
                           key=lambda n: any(stop in decoded(n) for stop in stop_strings))
    while n > 0 and len(decoded(n)) > at:
        n -= 1
    return n, text[:at]


def answer_before_stop_text(token_ids: Sequence[int], tokenizer, stop_strings: Sequence[str]
                            ) -> tuple[int, ...] | None:
    """The answer's ids before the first of `stop_strings` (before_stop_text), else None. Where the token the stop
    text begins in holds the answer's last characters too (a byte-level BPE merges '.<|' of 'Air.<|im_end|>'), those
    characters are encoded again after the tokens kept, as a real response cut at the same text is: else the answer
    lost them. Where they merge with the kept tokens' end ("Don'" + "t" is "Don" + "'t"), the last kept tokens are
    encoded again with them (up to 7, then the whole answer). Never longer than the ids written (a lone byte token
    decodes to U+FFFD, 3 bytes): a prompt was checked to fit with max_new_tokens."""
    found = _before_stop(token_ids, tokenizer, stop_strings)
    if found is None:
        return None
    n, answer = found
    cut = None
    for m in range(n, max(n - 8, 0), -1):
        head = tokenizer.decode(list(token_ids[:m]))
        if head == answer:
            return tuple(token_ids[:m])
        if not answer.startswith(head):  # a prefix that decodes otherwise (a character cut between byte tokens)
            continue
        before, through = (tokenizer.encode(t, add_special_tokens=False) for t in (head, answer))
        if through[: len(before)] == before:
            cut = (*token_ids[:m], *(int(i) for i in through[len(before):]))
            break
    if cut is None:
        cut = tuple(int(i) for i in tokenizer.encode(answer, add_special_tokens=False))
    return cut if len(cut) <= len(token_ids) else tuple(token_ids[:n])


class Engine(Protocol):
    def generate(self, prompts: Sequence[Sequence[int]], sampling: SamplingConfig,
                 indices: Sequence[int] | None = None) -> list[list[Completion]]:
        """n completions for each prompt (token ids through the chat template: answered_prompt_ids), in prompt order.
        indices: each prompt's position in the whole prompt set (default 0, 1, ...), which its sampling seed
        derives from where the engine seeds per prompt: a rank that generates a share of the prompts then
        samples what one process would."""

    def load_weights(self, weights: Iterable[tuple[str, torch.Tensor]]) -> None:
        """Replace the model's weights in memory (Hugging Face parameter names)."""

    def close(self) -> None:
        """Free the engine (processes, memory)."""

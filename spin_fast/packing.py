"""Padding-free packing: groups of sequences -> one concatenated row per micro-batch (DESIGN.md, decision 3).

A group is the set of sequences that must share a micro-batch: a SPIN pair (real response, generated
response, same prompt) is a group of 2, a plain SFT example a group of 1. Micro-batches are cut by a
token budget. Sequence ids follow the layout of spin_kernels.fused_linear_spin_loss: with G groups of
k sequences, sequence j of group g has id j * G + g (for pairs: real -> g, generated -> G + g).
"""

from __future__ import annotations

import dataclasses
from collections import abc
from dataclasses import dataclass

import torch

IGNORE_INDEX = -100  # targets without loss, spin_kernels' default ignore_index
NO_SEQUENCE = -1  # sequence id of tokens without loss: the kernels accept any id there


@dataclass(frozen=True)
class Sequence:
    """One training sequence: prompt token ids, then response token ids (ending with EOS)."""

    prompt_ids: tuple[int, ...]
    response_ids: tuple[int, ...]

    def __post_init__(self) -> None:
        # Lists would make the frozen dataclass unhashable and let callers mutate it behind our back.
        object.__setattr__(self, "prompt_ids", tuple(self.prompt_ids))
        object.__setattr__(self, "response_ids", tuple(self.response_ids))
        # An empty prompt would leave the first response token with no position predicting it,
        # so the sequence would silently carry one loss token fewer than its response length.
        if not self.prompt_ids:
            raise ValueError("Sequence.prompt_ids is empty: at least one prompt token (e.g. BOS) is required")
        if not self.response_ids:
            raise ValueError("Sequence.response_ids is empty: a response has at least its EOS token")
        for name, ids in (("prompt_ids", self.prompt_ids), ("response_ids", self.response_ids)):
            if min(ids) < 0:
                raise ValueError(f"Sequence.{name} holds a negative token id ({min(ids)})")

    @property
    def length(self) -> int:
        """Number of tokens, prompt and response together."""
        return len(self.prompt_ids) + len(self.response_ids)


@dataclass
class MicroBatch:
    """One packed row: sequences concatenated without padding, plus what attention and the loss need."""

    input_ids: torch.Tensor  # [T] int64
    position_ids: torch.Tensor  # [T] int64, 0..len-1 within each sequence
    targets: torch.Tensor  # [T] int64, next token where it is a response token, else -100
    sequence_ids: torch.Tensor  # [T] int64, j * G + g on loss tokens, -1 elsewhere
    cu_seqlens: torch.Tensor  # [S + 1] int32, sequence boundaries (varlen FlashAttention)
    max_seqlen: int
    group_indices: torch.Tensor  # [G] int64, indices of the groups in the caller's list
    group_size: int  # k, sequences per group

    @property
    def n_tokens(self) -> int:
        """Tokens in the row (all real: there is no padding)."""
        return self.input_ids.numel()

    def to(self, device: torch.device | str) -> MicroBatch:
        """A copy with every tensor on `device`."""
        moved = {
            field.name: getattr(self, field.name).to(device)
            for field in dataclasses.fields(self)
            if isinstance(getattr(self, field.name), torch.Tensor)
        }
        return dataclasses.replace(self, **moved)


def _group_lengths(groups: abc.Sequence[abc.Sequence[Sequence]]) -> tuple[int, list[int]]:
    """The common group size k and each group's token count; ValueError on a ragged or empty group."""
    group_size = len(groups[0])
    lengths = []
    for index, group in enumerate(groups):
        if not group:
            raise ValueError(f"group {index} is empty: a group holds k >= 1 sequences")
        if len(group) != group_size:
            raise ValueError(
                f"group {index} has {len(group)} sequences, expected {group_size} like group 0 "
                "(all groups must have the same size k)"
            )
        lengths.append(sum(sequence.length for sequence in group))
    return group_size, lengths


def _check_order(order: abc.Sequence[int], n_groups: int) -> list[int]:
    """`order` as a list, required to be a permutation of range(n_groups): no group dropped or repeated."""
    order = [int(index) for index in order]
    if sorted(order) != list(range(n_groups)):
        raise ValueError(f"order must be a permutation of range({n_groups}) (each group exactly once)")
    return order


def _build(groups: abc.Sequence[abc.Sequence[Sequence]], group_indices: list[int], group_size: int) -> MicroBatch:
    """Lays out the chosen groups in sequence-id order: id 0, 1, ..., k * G - 1."""
    n_groups = len(group_indices)
    input_ids: list[int] = []
    position_ids: list[int] = []
    targets: list[int] = []
    sequence_ids: list[int] = []
    cu_seqlens = [0]
    for j in range(group_size):
        for g, index in enumerate(group_indices):
            sequence = groups[index][j]
            n_prompt, n_response = len(sequence.prompt_ids), len(sequence.response_ids)
            input_ids += sequence.prompt_ids
            input_ids += sequence.response_ids
            position_ids += range(sequence.length)
            # Position p predicts token p + 1: the last prompt token predicts the first response token,
            # and the last token (EOS) predicts nothing inside this sequence.
            targets += [IGNORE_INDEX] * (n_prompt - 1)
            targets += sequence.response_ids
            targets.append(IGNORE_INDEX)
            sequence_id = j * n_groups + g
            sequence_ids += [NO_SEQUENCE] * (n_prompt - 1)
            sequence_ids += [sequence_id] * n_response
            sequence_ids.append(NO_SEQUENCE)
            cu_seqlens.append(cu_seqlens[-1] + sequence.length)
    lengths = [end - start for start, end in zip(cu_seqlens, cu_seqlens[1:])]
    return MicroBatch(
        input_ids=torch.tensor(input_ids, dtype=torch.int64),
        position_ids=torch.tensor(position_ids, dtype=torch.int64),
        targets=torch.tensor(targets, dtype=torch.int64),
        sequence_ids=torch.tensor(sequence_ids, dtype=torch.int64),
        cu_seqlens=torch.tensor(cu_seqlens, dtype=torch.int32),
        max_seqlen=max(lengths),
        group_indices=torch.tensor(group_indices, dtype=torch.int64),
        group_size=group_size,
    )


def pack_groups(
    groups: abc.Sequence[abc.Sequence[Sequence]],
    token_budget: int,
    *,
    order: abc.Sequence[int] | None = None,
) -> list[MicroBatch]:
    """Greedily packs whole groups, walked in `order` (default 0..n-1), into rows of at most token_budget tokens.

    A group joins the current micro-batch if it fits, else starts a new one; a group never spans two.
    """
    if token_budget < 1:
        raise ValueError(f"token_budget must be >= 1, got {token_budget}")
    if not groups:
        return []
    group_size, lengths = _group_lengths(groups)
    order = list(range(len(groups))) if order is None else _check_order(order, len(groups))
    # First pass decides the cut on lengths alone, so a too-long group fails before any tensor is built.
    chunks: list[list[int]] = []
    used = token_budget  # forces a new micro-batch for the first group
    for index in order:
        length = lengths[index]
        if length > token_budget:
            raise ValueError(
                f"group {index} has {length} tokens, more than token_budget={token_budget}: "
                "raise the budget or truncate the group"
            )
        if used + length > token_budget:
            chunks.append([])
            used = 0
        chunks[-1].append(index)
        used += length
    return [_build(groups, chunk, group_size) for chunk in chunks]


def packing_efficiency(batches: abc.Sequence[MicroBatch], token_budget: int) -> float:
    """Real tokens / (number of micro-batches * token_budget); 0.0 for no batches."""
    if token_budget < 1:
        raise ValueError(f"token_budget must be >= 1, got {token_budget}")
    if not batches:
        return 0.0
    return sum(batch.n_tokens for batch in batches) / (len(batches) * token_budget)

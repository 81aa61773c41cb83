"""Padding-free packing: groups of sequences -> one concatenated row per micro-batch (no pad token computed).

A group is the set of sequences that must share a micro-batch: a SPIN pair (real response, generated
response, same prompt) is a group of 2, a plain SFT example a group of 1. Micro-batches are cut by a
token budget. Sequence ids follow the layout of spin_kernels.fused_linear_spin_loss: with G groups of
k sequences, sequence j of group g has id j * G + g (for pairs: real -> g, generated -> G + g).

With share_prompts, a group whose sequences have one prompt holds it once: [prompt, response 1, response 2],
each response's positions continuing from the prompt's end, so the body computes the prompt once for the
pair (a prompt does not see its responses). Attention runs on the row expanded into whole sequences and each
row token keeps one result; the prompt's last token predicts the first token of every response.
"""

from __future__ import annotations

import dataclasses
from array import array
from collections import abc
from dataclasses import dataclass

import torch


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
    """One packed row: the groups' tokens concatenated without padding, plus what attention and the loss need.

    The loss tensors (hidden_index, targets, sequence_ids) hold the M loss tokens only: response tokens,
    EOS included, each predicted by the row position hidden_index points at.
    """

    input_ids: torch.Tensor  # [T] int64
    position_ids: torch.Tensor  # [T] int64, 0..len-1 along each sequence (a response after its shared prompt)
    hidden_index: torch.Tensor  # [M] int64, the row position that predicts each target
    targets: torch.Tensor  # [M] int64, the response tokens
    sequence_ids: torch.Tensor  # [M] int64, j * G + g
    cu_seqlens: torch.Tensor  # [S + 1] int32, boundaries of the whole sequences (varlen FlashAttention)
    max_seqlen: int
    n_sequence_tokens: int  # tokens of the whole sequences: T plus each prompt shared beyond its first use
    group_indices: torch.Tensor  # [G] int64, indices of the groups in the caller's list
    group_size: int  # k, sequences per group
    # With shared prompts (None otherwise): the row position of each token of the whole sequences laid end to
    # end [S tokens], and for each row token the place in that layout whose attention output it keeps [T].
    expand_index: torch.Tensor | None = None
    collapse_index: torch.Tensor | None = None

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


def shares_prompt(group: abc.Sequence[Sequence]) -> bool:
    """Whether the group's sequences (two or more) all have one prompt, which a shared layout holds once."""
    return len(group) > 1 and all(sequence.prompt_ids == group[0].prompt_ids for sequence in group)


def group_tokens(group: abc.Sequence[Sequence], share_prompts: bool) -> int:
    """The tokens a group takes in a row: each sequence whole, or a shared prompt once."""
    whole = sum(sequence.length for sequence in group)
    if share_prompts and shares_prompt(group):
        return whole - (len(group) - 1) * len(group[0].prompt_ids)
    return whole


def item_name(what: str, index: int, names: abc.Sequence[str] | None = None) -> str:
    """An item as an error names it: its name in `names` (a data row's file and line), else `what` and its index, said
    to count from 0: a bare "item 3", read as counted from 1, sends the user to the row before."""
    return names[index] if names else f"{what} {index} (counted from 0)"


def check_fits(groups: abc.Sequence[abc.Sequence[Sequence]], share_prompts: bool, budget: int, setting: str, what: str,
               advice: str = "", names: abc.Sequence[str] | None = None) -> None:
    """Every group fits a row of `budget` tokens, laid out as pack_groups lays it out, or a ValueError names the
    setting and the longest group (`what` and its index, or its name in `names`: a data row's file and line, which
    an index into a folder's rows or past skipped rows does not give): callers check before the work that would meet
    the budget midway."""
    tokens = [group_tokens(group, share_prompts) for group in groups]
    longest = max(range(len(tokens)), key=tokens.__getitem__, default=None)
    if longest is not None and tokens[longest] > budget:
        raise ValueError(f"{setting}={budget}: {item_name(what, longest, names)} takes {tokens[longest]} tokens: "
                         f"raise {setting}{advice}")


def _group_lengths(groups: abc.Sequence[abc.Sequence[Sequence]], share_prompts: bool) -> tuple[int, list[int]]:
    """The common group size k and each group's row tokens; ValueError on a ragged or empty group."""
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
        lengths.append(group_tokens(group, share_prompts))
    return group_size, lengths


def _check_order(order: abc.Sequence[int], n_groups: int) -> list[int]:
    """`order` as a list, required to be a permutation of range(n_groups): no group dropped or repeated."""
    order = [int(index) for index in order]
    if sorted(order) != list(range(n_groups)):
        raise ValueError(f"order must be a permutation of range({n_groups}) (each group exactly once)")
    return order


def _build(groups: abc.Sequence[abc.Sequence[Sequence]], group_indices: list[int], group_size: int,
           share_prompts: bool) -> MicroBatch:
    """Lays out the chosen groups one after the other, each group's sequences in order (ids g, G + g, ...).

    The loop copies the token ids and notes where each piece (a prompt or a response) goes; the index tensors
    are made from those pieces by torch, not a Python int at a time: a step packs 100k+ tokens."""
    n_groups = len(group_indices)
    input_ids = array("q")  # typed: a tensor is made from it without a Python int per token
    row_pieces: list[tuple[int, int, int]] = []  # (first position id, place in the whole sequences, length)
    whole_pieces: list[tuple[int, int]] = []  # (row start, length): the whole sequences end to end
    responses: list[tuple[int, int, int]] = []  # (row start, length, row of the last prompt token)
    sequence_ids: list[int] = []
    cu_seqlens = [0]
    for g, index in enumerate(group_indices):
        group = groups[index]
        shared = share_prompts and shares_prompt(group)
        for j, sequence in enumerate(group):
            n_prompt, n_response = len(sequence.prompt_ids), len(sequence.response_ids)
            if j == 0 or not shared:
                prompt_start = len(input_ids)
                input_ids.extend(sequence.prompt_ids)
                row_pieces.append((0, cu_seqlens[-1], n_prompt))
            whole_pieces.append((prompt_start, n_prompt))
            response_start = len(input_ids)
            input_ids.extend(sequence.response_ids)
            row_pieces.append((n_prompt, cu_seqlens[-1] + n_prompt, n_response))
            whole_pieces.append((response_start, n_response))
            responses.append((response_start, n_response, prompt_start + n_prompt - 1))
            sequence_ids.append(j * n_groups + g)
            cu_seqlens.append(cu_seqlens[-1] + sequence.length)
    row = torch.frombuffer(input_ids, dtype=torch.int64)  # keeps the array alive
    positions, places, row_lengths = (torch.tensor(column) for column in zip(*row_pieces))
    response_starts, response_lengths, predictors = (torch.tensor(column) for column in zip(*responses))
    # Position p predicts token p + 1: each response token is predicted by the row position before it, but the
    # first by its prompt's last token, which is elsewhere in the row when the prompt is shared.
    hidden_index = _ranges(response_starts - 1, response_lengths)
    hidden_index[torch.cumsum(response_lengths, 0) - response_lengths] = predictors
    # Nothing shared: the whole sequences are the row itself, and attention needs no gathering.
    identity = cu_seqlens[-1] == len(input_ids)
    return MicroBatch(
        input_ids=row,
        position_ids=_ranges(positions, row_lengths),
        hidden_index=hidden_index,
        targets=row[_ranges(response_starts, response_lengths)],
        sequence_ids=torch.repeat_interleave(torch.tensor(sequence_ids), response_lengths),
        cu_seqlens=torch.tensor(cu_seqlens, dtype=torch.int32),
        max_seqlen=max(sequence.length for index in group_indices for sequence in groups[index]),
        n_sequence_tokens=cu_seqlens[-1],
        group_indices=torch.tensor(group_indices, dtype=torch.int64),
        group_size=group_size,
        expand_index=None if identity else _ranges(*(torch.tensor(column) for column in zip(*whole_pieces))),
        collapse_index=None if identity else _ranges(places, row_lengths),
    )


def _ranges(starts: torch.Tensor, lengths: torch.Tensor) -> torch.Tensor:
    """start, start + 1, ..., start + length - 1 for each (start, length), end to end (lengths >= 1)."""
    offsets = starts - (torch.cumsum(lengths, 0) - lengths)  # each piece's start minus where it lands
    return torch.arange(int(lengths.sum())) + torch.repeat_interleave(offsets, lengths)


def pack_groups(
    groups: abc.Sequence[abc.Sequence[Sequence]],
    token_budget: int,
    *,
    order: abc.Sequence[int] | None = None,
    share_prompts: bool = False,
    first_fit_decreasing: bool = False,
) -> list[MicroBatch]:
    """Greedily packs whole groups, walked in `order` (default 0..n-1), into rows of at most token_budget tokens.

    A group joins the current micro-batch if it fits, else starts a new one; a group never spans two.
    first_fit_decreasing (no `order`): the groups are walked longest first (ties by index) and each joins the
    first micro-batch it fits, so fewer micro-batches: the groups' order in the rows is not kept.
    share_prompts: a group whose sequences have one prompt holds it once (the model's attention must be
    spin_fast.attention's, which follows the expanded layout).
    """
    chunks = pack_indices(groups, token_budget, order=order, share_prompts=share_prompts,
                          first_fit_decreasing=first_fit_decreasing)
    return [micro_batch(groups, chunk, share_prompts=share_prompts) for chunk in chunks]


def micro_batch(groups: abc.Sequence[abc.Sequence[Sequence]], group_indices: abc.Sequence[int], *,
                share_prompts: bool = False) -> MicroBatch:
    """The micro-batch of the groups `group_indices` (a chunk of pack_indices), as pack_groups lays it out: for a
    caller that makes each one as it comes to it, not every one of a large set at once."""
    return _build(groups, list(group_indices), len(groups[0]), share_prompts)


def pack_indices(
    groups: abc.Sequence[abc.Sequence[Sequence]],
    token_budget: int,
    *,
    order: abc.Sequence[int] | None = None,
    share_prompts: bool = False,
    first_fit_decreasing: bool = False,
) -> list[list[int]]:
    """The indices of the groups each micro-batch of pack_groups holds, in its order, with no tensor made: for a
    caller that deals out the micro-batches (evaluation.shared_logprobs) or makes each as it comes to it
    (scoring.model_logprobs: micro_batch)."""
    if token_budget < 1:
        raise ValueError(f"token_budget must be >= 1, got {token_budget}")
    if first_fit_decreasing and order is not None:
        raise ValueError("first_fit_decreasing chooses its own order; give no order with it")
    if not groups:
        return []
    _, lengths = _group_lengths(groups, share_prompts)
    if first_fit_decreasing:
        order = sorted(range(len(groups)), key=lambda index: (-lengths[index], index))
    else:
        order = list(range(len(groups))) if order is None else _check_order(order, len(groups))
    # First pass decides the cut on lengths alone, so a too-long group fails before any tensor is built.
    for index in order:
        if lengths[index] > token_budget:
            raise ValueError(
                f"group {index} has {lengths[index]} tokens, more than token_budget={token_budget}: "
                "raise the budget or truncate the group"
            )
    if first_fit_decreasing:
        chunks = _first_fit(order, lengths, token_budget)
    else:  # next fit looks at the last micro-batch only: the earlier ones stay closed, in the walk's order
        chunks, used = [], 0
        for index in order:
            if not chunks or used + lengths[index] > token_budget:
                chunks.append([])
                used = 0
            chunks[-1].append(index)
            used += lengths[index]
    return chunks


def _first_fit(order: list[int], lengths: list[int], token_budget: int) -> list[list[int]]:
    """Each group, in `order`, into the first chunk with room for it (each length <= token_budget). The first such
    chunk is found down a tree of the chunks' largest room, in log(n) steps: a scan of every chunk for each group
    took minutes for the 200k pairs of a stage scored at once (save_every_prompts 0) or a large held-out set."""
    size = 1
    while size < len(order):
        size *= 2
    # room[size + c]: chunk c's room (the leaves past the last chunk are empty chunks); room[k]: the most of its two
    # children's, so the leftmost leaf with room for a group is found from the root.
    room = [token_budget] * (2 * size)
    chunks: list[list[int]] = []
    for index in order:
        length = lengths[index]
        node = 1
        while node < size:
            node = 2 * node if room[2 * node] >= length else 2 * node + 1
        if node - size == len(chunks):
            chunks.append([])
        chunks[node - size].append(index)
        room[node] -= length
        while node > 1:
            node //= 2
            room[node] = max(room[2 * node], room[2 * node + 1])
    return chunks


def packing_efficiency(batches: abc.Sequence[MicroBatch], token_budget: int) -> float:
    """Real tokens / (number of micro-batches * token_budget); 0.0 for no batches."""
    if token_budget < 1:
        raise ValueError(f"token_budget must be >= 1, got {token_budget}")
    if not batches:
        return 0.0
    return sum(batch.n_tokens for batch in batches) / (len(batches) * token_budget)

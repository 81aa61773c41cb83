"""Opponent scoring: θt's log-probs of every real and generated response, in packed no-grad passes.

They are computed once per iteration and stored with the pairs, so training never holds a second
model: the opponent θt is the policy before this iteration's first step, and its log-probs do not change.
"""

from __future__ import annotations

import contextlib
import json
from collections.abc import Sequence as Seq
from dataclasses import dataclass, fields
from pathlib import Path

import torch

import spin_kernels
from spin_fast import distributed, zero
from spin_fast.data import SharedIds, TokenizedExample
from spin_fast.files import replacing
from spin_fast.model import can_share_prompts, check_head_is_plain, head, head_like, micro_batch_hidden_states
from spin_fast.packing import MicroBatch, Sequence, check_fits, item_name, micro_batch, pack_groups, pack_indices


@dataclass(frozen=True)
class TokenizedPair:
    """A SPIN pair as token ids: shared prompt, human (real) response, opponent's (generated) one."""

    prompt_ids: tuple[int, ...]
    real_ids: tuple[int, ...]
    generated_ids: tuple[int, ...]

    def sequences(self) -> list[Sequence]:
        """The real and the generated sequence. What Sequence refuses (an empty part, a negative id) is named by the
        pair's part (prompt_ids, real_ids, generated_ids): "Sequence.response_ids" does not say which response."""
        sequences = []
        for part in ("real_ids", "generated_ids"):
            try:
                sequences.append(Sequence(self.prompt_ids, getattr(self, part)))
            except ValueError as error:
                message = str(error).replace("Sequence.prompt_ids", "prompt_ids")
                raise ValueError(f"the pair's {message.replace('Sequence.response_ids', part)}") from None
        return sequences

    @classmethod
    def of(cls, example: TokenizedExample) -> TokenizedPair:
        """The pair of a tokenized example that has a generated response (data.tokenize_example)."""
        if example.generated_ids is None:
            raise ValueError("this example has no generated response yet: generate one before scoring")
        return cls(example.prompt_ids, example.response_ids, example.generated_ids)


@dataclass(frozen=True)
class ScoredPair(TokenizedPair):
    """A pair with the opponent's summed log-probs of both responses (EOS included, prompt excluded)."""

    opponent_real: float = 0.0
    opponent_generated: float = 0.0


def check_pairs_fit(pairs: Seq[TokenizedPair], model, token_budget: int, what: str, advice: str = "",
                    names: Seq[str] | None = None) -> None:
    """Each pair (its prompt and both responses, laid out as scoring packs them for `model`) fits token_budget, or
    the error names score_batch_tokens and the pair (`what` and its index, or its name in `names`) before any of
    them is scored."""
    check_fits(pair_sequences(pairs, what, names), can_share_prompts(model), token_budget, "score_batch_tokens",
               what, advice, names)


def pair_sequences(pairs: Seq[TokenizedPair], what: str = "pair",
                   names: Seq[str] | None = None) -> list[list[Sequence]]:
    """Each pair's sequences; a pair with an empty part (or a negative id) is named (`what` and its index, or its name
    in `names`) with the part: a bare "response_ids is empty" leaves the user to search every pair."""
    groups = []
    for index, pair in enumerate(pairs):
        try:
            groups.append(pair.sequences())
        except ValueError as error:
            raise ValueError(f"{item_name(what, index, names)}: {error}") from None
    return groups


@torch.no_grad()
def model_logprobs(model, groups: Seq[Seq[Sequence]], token_budget: int, *, backend: str = "auto",
                   bf16_autocast: bool = False, progress: bool = False) -> torch.Tensor:
    """Summed response log-probs [n_groups, k] of every sequence of every group, in packed passes (a group's
    sequences hold their common prompt once where the model's attention allows: model.can_share_prompts).
    bf16_autocast must be the training's setting (train.bf16_autocast): the opponent's log-probs are then
    the policy's own at step 0, and the SPIN loss starts at log 2.

    A ZeRO-3 partitioned model (deepspeed.zero3_init) is run a layer at a time, every rank in step: a rank
    with fewer micro-batches runs filler passes, so each rank must call this as often as the others."""
    was_training = model.training
    model.eval()
    # A model loaded elsewhere may transform its logits (loading and Trainer check theirs): once per call, not per
    # micro-batch.
    check_head_is_plain(model.config, getattr(model, "name_or_path", "") or type(model).__name__)
    weight, bias = head(model)
    device = weight.device
    # Longest first, each group into the first row it fits: fewer passes than packing in data order (next fit).
    # A chunk of such a packing packed again makes the very same row (evaluation.shared_logprobs relies on it).
    share = can_share_prompts(model)
    chunks = pack_indices(groups, token_budget, share_prompts=share, first_fit_decreasing=True)
    passes = zero.in_step([model], chunks, "scoring micro-batch counts")
    filler = pack_groups([[Sequence((0,), (0,))]], token_budget)[0]  # one token: a pass only to stay in step
    # Filled on the device and copied to the host once: a copy per micro-batch would wait for each pass to end.
    result = torch.zeros(len(groups), len(groups[0]) if groups else 0, dtype=torch.float64, device=device)
    with zero.gathered_per_layer(model) if zero.is_partitioned_model(model) else contextlib.nullcontext():
        for chunk in distributed.progress_bar(passes, "scoring", progress):
            # Made as it comes: every row of a stage scored at once (save_every_prompts 0) would hold its tokens
            # again, in index tensors, before the first pass.
            batch = filler if chunk is None else micro_batch(groups, chunk, share_prompts=share)
            moved = batch.to(device)
            sums = _summed_logprobs(model, moved, weight, bias, backend, bf16_autocast)
            if chunk is not None:
                result[moved.group_indices] = sums.view(batch.group_size, -1).T  # already on the device
    model.train(was_training)
    return result.cpu()


def _summed_logprobs(model, batch: MicroBatch, weight, bias, backend: str, bf16_autocast: bool) -> torch.Tensor:
    """Each sequence's summed response log-prob, in the batch's order [all first ones, all second ones, ...]."""
    hidden = micro_batch_hidden_states(model, batch, bf16_autocast)
    with zero.gathered([weight, bias]):  # the head's weight is read by the kernel, outside the head's forward
        weight, bias = head_like(hidden, weight, bias)
        token_logps = spin_kernels.linear_logprobs(hidden, weight, batch.targets, bias=bias,
                                                   hidden_index=batch.hidden_index, backend=backend)
    sums = torch.zeros(batch.group_size * batch.group_indices.numel(), dtype=torch.float64, device=hidden.device)
    return sums.index_add_(0, batch.sequence_ids, token_logps.double())


def score_pairs(model, pairs: Seq[TokenizedPair], token_budget: int, *, backend: str = "auto",
                bf16_autocast: bool = False, progress: bool = False) -> list[ScoredPair]:
    """The opponent's (this model's) log-probs of each pair's real and generated responses, in the training's
    precision (bf16_autocast: train.bf16_autocast)."""
    scores = model_logprobs(model, pair_sequences(pairs), token_budget, backend=backend,
                            bf16_autocast=bf16_autocast, progress=progress)
    return [
        ScoredPair(p.prompt_ids, p.real_ids, p.generated_ids, float(real), float(generated))
        for p, (real, generated) in zip(pairs, scores.tolist())
    ]


def save_scored_pairs(path: str | Path, pairs: Seq[ScoredPair]) -> None:
    """JSON lines, whole or not at all (spin_fast.files): a reader never sees half a file."""
    names = [field.name for field in fields(ScoredPair)]
    with replacing(path) as out:
        for pair in pairs:  # not dataclasses.asdict, which deep-copies every token id
            out.write(json.dumps({name: getattr(pair, name) for name in names}) + "\n")


def load_scored_pairs(path: str | Path) -> list[ScoredPair]:
    pairs, ids = [], SharedIds()  # a run holds these through its training
    with Path(path).open() as lines:
        for number, line in enumerate(lines, 1):
            try:
                record = json.loads(line)
                pairs.append(ScoredPair(
                    ids(record["prompt_ids"]), ids(record["real_ids"]), ids(record["generated_ids"]),
                    float(record["opponent_real"]), float(record["opponent_generated"]),
                ))
            except (ValueError, KeyError, TypeError) as error:
                raise ValueError(f"{path} line {number}: not a scored pair ({error!r})") from None
    return pairs

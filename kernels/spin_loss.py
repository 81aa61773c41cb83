"""The SPIN loss (DPO's loss with chosen = real, rejected = generated), and its fused head version.

    z = beta * [(log p(y) - log p_opp(y)) - (log p(y') - log p_opp(y'))]
    loss = mean over pairs of log(1 + exp(-z))   ("sigmoid", the paper's and DPO's; with label_smoothing e,
                                                  cDPO's (1 - e) log(1 + exp(-z)) + e log(1 + exp(z)))
                           or max(0, 1 - z)       ("hinge", the paper's other choice)
                           or (z / beta - 1 / (2 beta))^2   ("ipo", Azar et al. 2023: the log-ratio
                              difference regressed onto 1 / (2 beta); on summed log-probs, as the
                              paper writes it, where TRL's DPOTrainer "ipo" averages them over tokens)
    reduction="sum" adds the pairs' losses up; reduction="none" returns each pair's, [P].
"""

from __future__ import annotations

import functools
from typing import NamedTuple

import torch
import torch.nn.functional as F

from ._checks import (
    check_backend,
    check_beta,
    check_defined_pairs,
    check_flag,
    check_ignore_index,
    check_label_smoothing,
    check_linear_inputs,
    check_loss_type,
    check_pair_logps,
    check_reduction,
    check_sequence_inputs,
    read_value_checks_and_counts,
)
from .chunked_spin_loss import ChunkedFusedSpinLoss
from .linear_logprobs import checked_linear_logprobs, loss_rows, resolve_backend, sum_by_sequence, without_autocast


class SpinLossOutput(NamedTuple):
    """loss: the mean over pairs (a scalar), their sum, or each pair's [P], as `reduction` asks. The per-pair
    metrics [P] are detached from the graph."""

    loss: torch.Tensor
    rewards_real: torch.Tensor  # beta * (log p(y) - log p_opp(y))
    rewards_generated: torch.Tensor  # beta * (log p(y') - log p_opp(y'))
    margins: torch.Tensor  # rewards_real - rewards_generated
    accuracy: torch.Tensor  # 1.0 where rewards_real > rewards_generated


class FusedSpinLossOutput(NamedTuple):
    """As SpinLossOutput, plus policy_logps [2P]: summed log-probs of each sequence (their means with
    length_normalize), with grad."""

    loss: torch.Tensor
    policy_logps: torch.Tensor
    rewards_real: torch.Tensor
    rewards_generated: torch.Tensor
    margins: torch.Tensor
    accuracy: torch.Tensor


def pair_losses(policy_real, policy_generated, opponent_real, opponent_generated, *, beta, loss_type,
                label_smoothing=0.0):
    """Per-pair SPIN losses [P] of the log-ratio difference h = (pr - or) - (pg - og)."""
    h = (policy_real - opponent_real) - (policy_generated - opponent_generated)
    if loss_type == "ipo":
        return (h - 1.0 / (2.0 * beta)) ** 2
    z = beta * h
    if loss_type == "hinge":
        return torch.relu(1.0 - z)
    # -logsigmoid, not softplus(-z): softplus cuts to z beyond |z| > 20 and loses float64 digits.
    if label_smoothing:
        return -(1.0 - label_smoothing) * F.logsigmoid(z) - label_smoothing * F.logsigmoid(-z)
    return -F.logsigmoid(z)


def reduce_pairs(losses: torch.Tensor, reduction: str) -> torch.Tensor:
    if reduction == "mean":
        return losses.mean()
    return losses.sum() if reduction == "sum" else losses


def spin_loss(
    policy_real_logps: torch.Tensor,
    policy_generated_logps: torch.Tensor,
    opponent_real_logps: torch.Tensor,
    opponent_generated_logps: torch.Tensor,
    *,
    beta: float = 0.1,
    loss_type: str = "sigmoid",
    label_smoothing: float = 0.0,
    reduction: str = "mean",
) -> SpinLossOutput:
    """SPIN's loss over P pairs from sequence log-probs [P] (sums over response tokens).

    It is DPO's loss with chosen = real and rejected = generated, reference = opponent. label_smoothing (sigmoid
    loss only): cDPO's, the probability that a pair's preference is flipped. reduction: "mean" (over pairs), "sum",
    or "none" (each pair's loss, [P]: to weight pairs, or to keep the hardest). A pair whose opponent log-probs
    leave its loss undefined (both -inf, both inf, or a NaN) is refused with a ValueError naming it.
    """
    check_loss_type(loss_type)
    check_beta(beta)
    check_label_smoothing(label_smoothing, loss_type)
    check_reduction(reduction)
    names = ("policy_real_logps", "policy_generated_logps", "opponent_real_logps", "opponent_generated_logps")
    values = (policy_real_logps, policy_generated_logps, opponent_real_logps, opponent_generated_logps)
    check_pair_logps(names, values)
    # Its one read of the device (a sync on CUDA), left out where torch.compile traces the call or a CUDA graph
    # captures it: a read there is a graph break, or an error under fullgraph=True and in a capture.
    capturing = torch.cuda.is_available() and torch.cuda.is_current_stream_capturing()
    if not (torch.compiler.is_compiling() or capturing):
        check_defined_pairs(opponent_real_logps, opponent_generated_logps, lambda pair: f"opponent_real_logps[{pair}]",
                            lambda pair: f"opponent_generated_logps[{pair}]")
    return unchecked_spin_loss(values, beta, loss_type, label_smoothing, reduction)


def unchecked_spin_loss(values: tuple[torch.Tensor, ...], beta: float, loss_type: str, label_smoothing: float,
                        reduction: str) -> SpinLossOutput:
    """spin_loss on inputs already checked (fused_linear_spin_loss checked its opponent's with its other values)."""
    dtype = functools.reduce(torch.promote_types, (v.dtype for v in values), torch.float32)
    values = tuple(v.to(dtype) for v in values)
    rewards_real = (beta * (values[0] - values[2])).detach()
    rewards_generated = (beta * (values[1] - values[3])).detach()
    return SpinLossOutput(
        loss=reduce_pairs(pair_losses(*values, beta=beta, loss_type=loss_type, label_smoothing=label_smoothing),
                          reduction),
        rewards_real=rewards_real,
        rewards_generated=rewards_generated,
        margins=rewards_real - rewards_generated,
        accuracy=(rewards_real > rewards_generated).to(dtype),
    )


def fused_linear_spin_loss(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    targets: torch.Tensor,
    sequence_ids: torch.Tensor,
    opponent_logps: torch.Tensor,
    *,
    beta: float = 0.1,
    loss_type: str = "sigmoid",
    label_smoothing: float = 0.0,
    reduction: str = "mean",
    length_normalize: bool = False,
    bias: torch.Tensor | None = None,
    ignore_index: int = -100,
    hidden_index: torch.Tensor | None = None,
    backend: str = "auto",
) -> FusedSpinLossOutput:
    """From the hidden states of a packed batch to the SPIN loss in one call.

    hidden [N, H], weight [V, H], targets [N]; sequence_ids [N] puts each token in sequence
    i < P (real response of pair i) or P + i (its generated response); opponent_logps [2P] in the
    same order. Tokens whose target is ignore_index carry no loss and may have any sequence id.
    A sequence with no loss token (all its targets ignored, or none at all) has log-prob 0: P is
    len(opponent_logps) // 2, whatever sequence_ids hold.
    hidden_index [M] (optional): the row of hidden that predicts each target; targets and sequence_ids
    are then [M]. With a prompt shared by a pair's two responses, its last row predicts the first
    token of each. label_smoothing, reduction: as spin_loss's.
    length_normalize: each sequence's log-prob is the mean over its loss tokens, not their sum (SimPO's, TRL's
    DPOTrainer "ipo"); policy_logps are then those means, and opponent_logps must be given as means too.
    """
    check_loss_type(loss_type)
    check_beta(beta)
    check_label_smoothing(label_smoothing, loss_type)
    check_reduction(reduction)
    check_flag("length_normalize", length_normalize)
    check_backend(backend)
    pending = []  # the checks of the inputs' values, read together
    check_linear_inputs(hidden, weight, targets, bias, ignore_index, allow_float64=backend != "triton",
                        hidden_index=hidden_index, pending=pending)
    n_pairs = check_sequence_inputs(sequence_ids, opponent_logps, targets, ignore_index, pending)
    # "auto" resolves without an error; "triton"'s errors (no package, no CUDA) come after the values' checks.
    chunked = reduction != "none" and backend in ("auto", "torch") and resolve_backend(backend, hidden) == "torch"
    # The torch backend cuts its chunks by each pair's loss tokens: counted on the device, read with the checks.
    counts = pair_token_counts(targets, sequence_ids, n_pairs, ignore_index) if chunked else None
    all_kept, tokens_per_pair = read_value_checks_and_counts(pending, targets != ignore_index, counts)
    scale = token_count_inverse(targets, sequence_ids, 2 * n_pairs, ignore_index) if length_normalize else None
    backend = resolve_backend(backend, hidden)
    if chunked:
        # Chunks cut along pairs: the loss gradient is known in the forward, logits computed once. Each pair's own
        # loss (reduction="none") gets a gradient weight that the forward cannot know: it takes the general path.
        kept, rows = loss_rows(targets, ignore_index, hidden_index, all_kept)
        grad_on = torch.is_grad_enabled()
        need = tuple(t is not None and t.requires_grad and grad_on for t in (hidden, weight, bias, opponent_logps))
        with without_autocast(hidden):
            loss, policy_logps = ChunkedFusedSpinLoss.apply(
                hidden, weight, bias, rows, targets[kept], sequence_ids[kept], opponent_logps, scale,
                functools.partial(pair_losses, beta=beta, loss_type=loss_type, label_smoothing=label_smoothing), need,
                tokens_per_pair,
            )
        if reduction == "sum":
            loss = loss * n_pairs
    else:
        token_logps = checked_linear_logprobs(hidden, weight, targets, bias, ignore_index, backend, hidden_index,
                                              all_kept)
        policy_logps = sum_by_sequence(token_logps, targets, sequence_ids, 2 * n_pairs, ignore_index)
        if scale is not None:
            policy_logps = policy_logps * scale.to(policy_logps.dtype)
        loss = None
    opponent = opponent_logps.to(policy_logps.dtype)
    out = unchecked_spin_loss((policy_logps[:n_pairs], policy_logps[n_pairs:], opponent[:n_pairs], opponent[n_pairs:]),
                              beta, loss_type, label_smoothing, reduction)
    return FusedSpinLossOutput(out.loss if loss is None else loss, policy_logps, *out[1:])


def pair_token_counts(targets: torch.Tensor, sequence_ids: torch.Tensor, n_pairs: int,
                      ignore_index: int) -> torch.Tensor:
    """Each pair's loss tokens [P] (both its sequences'), on the device: index_add needs no host read, where
    bincount(...).tolist() was one of its own (and on CUDA bincount reads the ids' max too). An id out of range
    lands in some pair (% P) but is refused by the checks read with the counts."""
    kept = (targets != ignore_index).long()
    return torch.zeros(n_pairs, dtype=torch.int64, device=targets.device).index_add_(0, sequence_ids % n_pairs, kept)


def token_count_inverse(targets: torch.Tensor, sequence_ids: torch.Tensor, n_sequences: int,
                        ignore_index: int) -> torch.Tensor:
    """1 / (loss tokens of each sequence) [n_sequences], float64; 1 for a sequence with none (its log-prob stays 0)."""
    ones = (targets != ignore_index).double()  # each loss token counts 1, as its log-prob counts in the sums
    return 1.0 / sum_by_sequence(ones, targets, sequence_ids, n_sequences, ignore_index).clamp_min(1)


class FusedLinearSPINLoss(torch.nn.Module):
    """nn.Module form of fused_linear_spin_loss, holding beta, loss_type, label_smoothing, reduction,
    length_normalize, ignore_index and backend."""

    def __init__(
        self, beta: float = 0.1, loss_type: str = "sigmoid", ignore_index: int = -100, backend: str = "auto",
        label_smoothing: float = 0.0, reduction: str = "mean", length_normalize: bool = False,
    ):
        super().__init__()
        check_loss_type(loss_type)
        check_beta(beta)
        check_label_smoothing(label_smoothing, loss_type)
        check_reduction(reduction)
        check_flag("length_normalize", length_normalize)
        check_backend(backend)
        check_ignore_index(ignore_index)
        self.beta, self.loss_type, self.ignore_index, self.backend = beta, loss_type, ignore_index, backend
        self.label_smoothing, self.reduction, self.length_normalize = label_smoothing, reduction, length_normalize

    def forward(
        self,
        hidden: torch.Tensor,
        weight: torch.Tensor,
        targets: torch.Tensor,
        sequence_ids: torch.Tensor,
        opponent_logps: torch.Tensor,
        bias: torch.Tensor | None = None,
        hidden_index: torch.Tensor | None = None,
    ) -> FusedSpinLossOutput:
        return fused_linear_spin_loss(
            hidden, weight, targets, sequence_ids, opponent_logps, beta=self.beta, loss_type=self.loss_type,
            label_smoothing=self.label_smoothing, reduction=self.reduction, length_normalize=self.length_normalize,
            bias=bias, ignore_index=self.ignore_index, hidden_index=hidden_index, backend=self.backend,
        )

    def extra_repr(self) -> str:
        return (f"beta={self.beta}, loss_type={self.loss_type!r}, label_smoothing={self.label_smoothing}, "
                f"reduction={self.reduction!r}, length_normalize={self.length_normalize}, "
                f"ignore_index={self.ignore_index}, backend={self.backend!r}")

"""Eager chunked SPIN loss (torch backend): every loss token's logits are computed once, not twice.

A pair's loss depends only on that pair's two sequence log-probs. Chunks are therefore cut along
pairs: once a chunk holds whole pairs, their loss gradient is known in the forward, and the
chunk's logits turn straight into dL/dlogits (6·M·H·V FLOPs in all instead of the 8 of
forward + recomputing backward). The gradients wait in the autograd context (in the inputs' dtype, fp16's in
fp32) and are only scaled by the incoming gradient in the backward. A pair longer than one chunk takes the
two-pass path.
"""

from __future__ import annotations

from collections.abc import Callable

import torch

from ._checks import check_first_order
from .chunked import Grads, Head, chunked_grads, chunked_logprobs, exp_logits_in_place, softmax_grad_in_place

PairLoss = Callable[[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor]


def group_pairs(tokens_per_pair: list[int], budget: int) -> list[tuple[int, int]]:
    """Cut consecutive pairs into groups of at most `budget` tokens: [(first, end), ...].

    A pair over budget forms a group of its own."""
    groups, first, total = [], 0, 0
    for pair, count in enumerate(tokens_per_pair):
        if total and total + count > budget:
            groups.append((first, pair))
            first, total = pair, 0
        total += count
    groups.append((first, len(tokens_per_pair)))
    return groups


class ChunkedFusedSpinLoss(torch.autograd.Function):
    @staticmethod
    def forward(ctx, hidden, weight, bias, rows, targets, sequence_ids, opponent_logps, sequence_scale,
                pair_loss: PairLoss, need_grads: tuple[bool, bool, bool, bool], tokens_per_pair: list[int]):
        """rows, targets, sequence_ids: the loss tokens only. sequence_scale [2P] or None: each sequence's summed
        log-prob is multiplied by it (1 / its token count: an average). need_grads: whether hidden, weight, bias and
        opponent_logps want a gradient (False for all outside grad mode). tokens_per_pair [P]: each pair's loss
        tokens, on the host (read by the caller with its input checks). Returns (mean loss, policy_logps [2P])."""
        head = Head.of(hidden, weight, bias)
        n_pairs = opponent_logps.shape[0] // 2
        opponent = opponent_logps.to(head.dtype)
        ctx.opponent_dtype = opponent_logps.dtype
        order = torch.argsort(sequence_ids % n_pairs, stable=True)  # tokens grouped pair by pair
        rows, targets, sequence_ids = rows[order], targets[order], sequence_ids[order]
        starts = [0]
        for count in tokens_per_pair:
            starts.append(starts[-1] + count)

        policy = torch.zeros(2 * n_pairs, dtype=head.dtype, device=head.weight.device)
        scale = torch.ones_like(policy) if sequence_scale is None else sequence_scale.to(head.dtype)
        lse = torch.empty(rows.shape[0], dtype=head.dtype, device=head.weight.device)
        need_grads, need_opponent = need_grads[:3], need_grads[3]
        grads = Grads.zeros(head, need_grads)
        step, buffer = head.step(), head.buffer(rows.shape[0])
        for first, end in group_pairs(tokens_per_pair, step):
            span = slice(starts[first], starts[end])
            group_rows, group_targets, group_ids = rows[span], targets[span], sequence_ids[span]
            fits = group_rows.shape[0] <= step
            if fits:
                exp_shifted = head.logits(group_rows, buffer)
                logps, lse[span], log_sum = exp_logits_in_place(exp_shifted, group_targets)
            else:
                logps, lse[span] = chunked_logprobs(head, group_rows, group_targets, buffer)
            policy.index_add_(0, group_ids, logps)
            if not any(need_grads):
                continue
            token_grad = (_pair_loss_grad(policy * scale, opponent, first, end, pair_loss) * scale)[group_ids]
            if fits:
                dlogits = softmax_grad_in_place(exp_shifted, log_sum, group_targets, token_grad)
                grads.add(head, group_rows, dlogits)
            else:
                chunked_grads(head, group_rows, group_targets, lse[span], token_grad, grads, buffer)

        policy = policy * scale
        loss = pair_loss(policy[:n_pairs], policy[n_pairs:], opponent[:n_pairs], opponent[n_pairs:]).mean()
        # Held until the backward (a retained graph's, more than once) in the inputs' dtypes: a bf16 model holds
        # half what fp32 sums would take. fp16's keep fp32: its range would flush small gradients to zero before
        # the backward multiplies them by a loss scale (GradScaler's), the very thing the scale is there to save.
        # Saved, not kept on ctx: autograd frees saved tensors after a backward without retain_graph, while ctx
        # lives as long as the output (a caller's `out`, kept to log its metrics, held them into the next step).
        held = grads if hidden.dtype == torch.float16 else Grads(*grads.cast(hidden, weight, bias))
        ctx.save_for_backward(hidden, weight, bias, rows, targets, sequence_ids, lse, scale,
                              held.hidden, held.weight, held.bias)
        ctx.opponent_grad = None
        # An output the caller's loss does not use (the policy log-probs, in training) gets None, not zeros that the
        # backward would have to read from the device to skip.
        ctx.set_materialize_grads(False)
        # need_opponent, not ctx.needs_input_grad[6]: that is True outside grad mode too, where (inference mode) the
        # autograd call below fails. The loss reads the opponent through (pr - or) - (pg - og) only.
        if need_opponent:
            ctx.opponent_grad = -_pair_loss_grad(policy, opponent, 0, n_pairs, pair_loss)
        return loss, policy

    @staticmethod
    def backward(ctx, grad_loss, grad_policy):
        check_first_order()
        hidden, weight, bias, rows, targets, sequence_ids, lse, sequence_scale, *held = ctx.saved_tensors
        scale = 0.0 if grad_loss is None else grad_loss
        grads = Grads(*held).scaled(scale)
        if grad_policy is not None:
            # The sequence log-probs feed another term too (an NLL term, say): its gradient takes the
            # general recomputing path, summed in fp32 (float64 for float64 inputs).
            head = Head.of(hidden, weight, bias)
            grads = grads.to(head.dtype)
            chunked_grads(head, rows, targets, lse, (grad_policy.to(head.dtype) * sequence_scale)[sequence_ids], grads)
        opponent_grad = None if ctx.opponent_grad is None else (ctx.opponent_grad * scale).to(ctx.opponent_dtype)
        return (*grads.cast(hidden, weight, bias), None, None, None, opponent_grad, None, None, None, None)


def _pair_loss_grad(policy, opponent, first, end, pair_loss) -> torch.Tensor:
    """d(mean loss)/d(policy log-probs) [2P], nonzero only for the pairs first..end-1."""
    n_pairs = opponent.shape[0] // 2
    real_idx = torch.arange(first, end, device=policy.device)
    idx = torch.cat([real_idx, real_idx + n_pairs])
    with torch.enable_grad():
        group = policy[idx].detach().requires_grad_()
        k = end - first
        losses = pair_loss(group[:k], group[k:], opponent[idx[:k]], opponent[idx[k:]])
        (grad,) = torch.autograd.grad(losses.sum() / n_pairs, group)
    return torch.zeros_like(policy).index_copy_(0, idx, grad)

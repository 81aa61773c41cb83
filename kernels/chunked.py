"""Chunked PyTorch backend: runs on any device, holds one [chunk, V] block of logits at a time.

The forward keeps only each token's logsumexp; the backward recomputes the logits chunk by chunk
and forms g * (onehot - softmax) in place, so the extra memory is O(chunk x V), never O(N x V).
The helpers below are shared with the eager fused SPIN loss (chunked_spin_loss.py).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ._checks import check_first_order

# Bytes of one chunk's logits buffer, the only [chunk, V] block alive at any time.
CHUNK_BYTES = 64 * 2**20


def chunk_tokens(vocab_size: int, element_size: int) -> int:
    return max(1, CHUNK_BYTES // (vocab_size * element_size))


@dataclass
class Head:
    """The LM head in the compute dtype (fp32, or float64 for float64 inputs), and its inputs."""

    hidden: torch.Tensor  # [N, H] as given
    weight: torch.Tensor  # [V, H] compute dtype
    bias: torch.Tensor | None  # [V] compute dtype

    @classmethod
    def of(cls, hidden: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> Head:
        dtype = torch.float64 if hidden.dtype == torch.float64 else torch.float32
        # One upcast copy of the head for half inputs: O(V x H), the size of its fp32 gradient.
        return cls(hidden, weight.to(dtype), None if bias is None else bias.to(dtype))

    @property
    def dtype(self) -> torch.dtype:
        return self.weight.dtype

    def step(self) -> int:
        return chunk_tokens(self.weight.shape[0], self.weight.element_size())

    def buffer(self, n_rows: int) -> torch.Tensor:
        # One buffer for every chunk: a fresh [chunk, V] allocation per chunk costs page faults.
        return torch.empty(min(n_rows, self.step()), self.weight.shape[0], dtype=self.dtype,
                           device=self.weight.device)

    def logits(self, rows: torch.Tensor, buffer: torch.Tensor) -> torch.Tensor:
        chunk_hidden = self.hidden.index_select(0, rows).to(self.dtype)
        out = buffer[: rows.shape[0]]
        if self.bias is None:
            return torch.matmul(chunk_hidden, self.weight.T, out=out)
        return torch.addmm(self.bias, chunk_hidden, self.weight.T, out=out)


def exp_logits_in_place(logits: torch.Tensor, targets: torch.Tensor) -> tuple[torch.Tensor, ...]:
    """Turns logits into exp(logits - row max) in place.

    Returns the target log-probs, the logsumexp, and log(sum(exp(logits - row max))).
    """
    target_logits = logits.gather(1, targets[:, None]).squeeze(1)
    row_max = logits.amax(dim=1)
    log_sum = logits.sub_(row_max[:, None]).exp_().sum(dim=1).log()
    lse = row_max + log_sum
    return target_logits - lse, lse, log_sum


@dataclass
class Grads:
    """fp32 (or float64) gradient accumulators; None where no gradient is wanted."""

    hidden: torch.Tensor | None
    weight: torch.Tensor | None
    bias: torch.Tensor | None

    @classmethod
    def zeros(cls, head: Head, need: tuple[bool, bool, bool]) -> Grads:
        hidden = torch.zeros_like(head.hidden, dtype=head.dtype) if need[0] else None
        weight = torch.zeros_like(head.weight) if need[1] else None
        bias = torch.zeros_like(head.bias) if need[2] else None
        return cls(hidden, weight, bias)

    def add(self, head: Head, rows: torch.Tensor, dlogits: torch.Tensor) -> None:
        """Accumulate the gradients of a chunk whose dL/dlogits is dlogits [chunk, V]."""
        if self.hidden is not None:
            self.hidden.index_add_(0, rows, dlogits @ head.weight)
        if self.weight is not None:
            self.weight.addmm_(dlogits.T, head.hidden.index_select(0, rows).to(head.dtype))
        if self.bias is not None:
            self.bias += dlogits.sum(0)

    def scaled(self, scale: torch.Tensor | float) -> Grads:
        """New tensors: these stay as they are (a retained graph may run its backward again)."""
        return Grads(*(None if g is None else g * scale for g in (self.hidden, self.weight, self.bias)))

    def to(self, dtype: torch.dtype) -> Grads:
        return Grads(*(None if g is None else g.to(dtype) for g in (self.hidden, self.weight, self.bias)))

    def cast(self, hidden: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> tuple:
        """In the inputs' dtypes, each rounded once."""
        return (
            None if self.hidden is None else self.hidden.to(hidden.dtype),
            None if self.weight is None else self.weight.to(weight.dtype),
            None if self.bias is None else self.bias.to(bias.dtype),
        )


def softmax_grad_in_place(exp_shifted: torch.Tensor, log_sum: torch.Tensor, targets: torch.Tensor,
                          grad: torch.Tensor) -> torch.Tensor:
    """exp(logits - max) (from exp_logits_in_place) -> grad * (onehot - softmax), in the same buffer."""
    exp_shifted.mul_((-grad * torch.exp(-log_sum))[:, None])
    return exp_shifted.scatter_add_(1, targets[:, None], grad[:, None])


def chunked_logprobs(head: Head, rows: torch.Tensor, targets: torch.Tensor,
                     buffer: torch.Tensor | None = None) -> tuple[torch.Tensor, ...]:
    """Target log-probs and logsumexp of the given rows, one chunk at a time (in the caller's `buffer` when given:
    one [chunk, V] block alive, not two)."""
    logps = torch.empty(rows.shape[0], dtype=head.dtype, device=head.weight.device)
    lse = torch.empty_like(logps)
    step, buffer = head.step(), head.buffer(rows.shape[0]) if buffer is None else buffer
    for start in range(0, rows.shape[0], step):
        end = min(start + step, rows.shape[0])
        logits = head.logits(rows[start:end], buffer)
        logps[start:end], lse[start:end], _ = exp_logits_in_place(logits, targets[start:end])
    return logps, lse


def chunked_grads(head: Head, rows: torch.Tensor, targets: torch.Tensor, lse: torch.Tensor,
                  grad: torch.Tensor, grads: Grads, buffer: torch.Tensor | None = None) -> None:
    """Recompute each chunk's logits and add grad * (onehot - softmax) into grads (in `buffer` when given)."""
    step, buffer = head.step(), head.buffer(rows.shape[0]) if buffer is None else buffer
    for start in range(0, rows.shape[0], step):
        end = min(start + step, rows.shape[0])
        dlogits = head.logits(rows[start:end], buffer)
        dlogits.sub_(lse[start:end, None]).exp_().mul_(-grad[start:end, None])
        dlogits.scatter_add_(1, targets[start:end, None], grad[start:end, None])
        grads.add(head, rows[start:end], dlogits)


class ChunkedLinearLogprobs(torch.autograd.Function):
    @staticmethod
    def forward(ctx, hidden, weight, bias, rows, targets):
        logps, lse = chunked_logprobs(Head.of(hidden, weight, bias), rows, targets)
        ctx.save_for_backward(hidden, weight, bias, rows, targets, lse)
        return logps

    @staticmethod
    def backward(ctx, grad_logps):
        check_first_order()
        hidden, weight, bias, rows, targets, lse = ctx.saved_tensors
        head = Head.of(hidden, weight, bias)
        grads = Grads.zeros(head, ctx.needs_input_grad[:3])
        chunked_grads(head, rows, targets, lse, grad_logps.to(head.dtype), grads)
        return (*grads.cast(hidden, weight, bias), None, None)

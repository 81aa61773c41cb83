"""linear_logprobs: per-token log-probs of the targets under a linear head, without [N, V] logits."""

from __future__ import annotations

import numbers
import os

import torch

from ._checks import check_backend, check_linear_inputs, check_sequence_ids, read_value_checks
from .chunked import ChunkedLinearLogprobs
from .reference import reference_linear_logprobs


def resolve_backend(backend: str, hidden: torch.Tensor) -> str:
    """'auto' is triton for CUDA tensors and the chunked torch backend otherwise."""
    check_backend(backend)
    device = hidden.device
    if backend == "auto":
        on_gpu = device.type == "cuda" and hidden.dtype != torch.float64
        return "triton" if on_gpu and _triton_available() else "torch"
    if backend == "triton":
        if not _triton_available():
            raise ValueError("backend='triton' needs the triton package; install it or use backend='torch'")
        if device.type != "cuda" and os.environ.get("TRITON_INTERPRET") != "1":
            raise ValueError(
                f"backend='triton' needs CUDA tensors (got {device}); "
                "set TRITON_INTERPRET=1 to run it on the CPU through the interpreter"
            )
    return backend


def _triton_available() -> bool:
    try:
        import triton  # noqa: F401
    except ImportError:
        return False
    return True


def linear_logprobs(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    targets: torch.Tensor,
    *,
    bias: torch.Tensor | None = None,
    ignore_index: int = -100,
    hidden_index: torch.Tensor | None = None,
    backend: str = "auto",
) -> torch.Tensor:
    """fp32 log softmax(hidden @ weight.T + bias)[targets] per token, 0 where targets == ignore_index.

    hidden [N, H], weight [V, H] (the LM head), targets [N] -> [N]. Differentiable w.r.t. hidden,
    weight and bias. backend: "auto", "triton", "torch" (chunked) or "reference" (full logits).
    Float64 inputs (torch and reference backends) give a float64 result.
    hidden_index [M] (optional): the row of hidden that predicts each target; targets and the result
    are then [M], and a row may predict several targets (a prompt shared by two responses).
    """
    check_backend(backend)
    pending = []
    check_linear_inputs(hidden, weight, targets, bias, ignore_index, allow_float64=backend != "triton",
                        hidden_index=hidden_index, pending=pending)
    all_kept = read_value_checks(pending, targets != ignore_index)
    return checked_linear_logprobs(hidden, weight, targets, bias, ignore_index, resolve_backend(backend, hidden),
                                   hidden_index, all_kept)


def sequence_logprobs(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    targets: torch.Tensor,
    sequence_ids: torch.Tensor,
    n_sequences: int,
    *,
    bias: torch.Tensor | None = None,
    ignore_index: int = -100,
    hidden_index: torch.Tensor | None = None,
    backend: str = "auto",
) -> torch.Tensor:
    """linear_logprobs summed per sequence: [n_sequences], for a loss of one's own (a DPO variant's policy and
    reference log-probs, one call each).

    sequence_ids [N] (or [M] with hidden_index) puts each token in a sequence in [0, n_sequences); tokens whose
    target is ignore_index may carry any id, and a sequence with no loss token has log-prob 0.
    """
    # Every input is checked before the head's forward runs (linear_logprobs' checks, then the sequences').
    check_backend(backend)
    pending = []
    check_linear_inputs(hidden, weight, targets, bias, ignore_index, allow_float64=backend != "triton",
                        hidden_index=hidden_index, pending=pending)
    if isinstance(n_sequences, bool) or not isinstance(n_sequences, numbers.Integral) or n_sequences < 1:
        raise ValueError(f"n_sequences must be an int >= 1, got {n_sequences!r}")
    n_sequences = int(n_sequences)  # a NumPy integer too
    check_sequence_ids(sequence_ids, n_sequences, targets, ignore_index, pending=pending)
    all_kept = read_value_checks(pending, targets != ignore_index)
    token_logps = checked_linear_logprobs(hidden, weight, targets, bias, ignore_index,
                                          resolve_backend(backend, hidden), hidden_index, all_kept)
    return sum_by_sequence(token_logps, targets, sequence_ids, n_sequences, ignore_index)


def sum_by_sequence(token_logps: torch.Tensor, targets: torch.Tensor, sequence_ids: torch.Tensor, n_sequences: int,
                    ignore_index: int) -> torch.Tensor:
    # Ignored tokens have log-prob 0, so sending them to sequence 0 leaves every sum unchanged.
    safe_ids = torch.where(targets != ignore_index, sequence_ids, 0)
    return token_logps.new_zeros(n_sequences).index_add(0, safe_ids, token_logps)


def loss_rows(targets: torch.Tensor, ignore_index: int, hidden_index: torch.Tensor | None,
              all_kept: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    """(positions in targets of the tokens with loss, the hidden row each of them reads). all_kept: every target
    carries loss (read_value_checks says), so that no nonzero (a host read) is needed to find them."""
    if all_kept:
        kept = torch.arange(targets.shape[0], device=targets.device)
    else:
        kept = (targets != ignore_index).nonzero().squeeze(1)
    return kept, kept if hidden_index is None else hidden_index.index_select(0, kept).long()  # int32 taken too


def checked_linear_logprobs(hidden, weight, targets, bias, ignore_index: int, backend: str,
                            hidden_index: torch.Tensor | None = None, all_kept: bool = False) -> torch.Tensor:
    """linear_logprobs on inputs already checked, with a resolved backend name."""
    # Tokens without loss are dropped here, before any backend sees them: they cost nothing. Every backend
    # accumulates the gradient of a row that several targets read.
    kept, rows = loss_rows(targets, ignore_index, hidden_index, all_kept)
    selected_targets = targets.index_select(0, kept)
    with without_autocast(hidden):
        if backend == "reference":
            selected = reference_linear_logprobs(hidden, weight, bias, rows, selected_targets)
        elif backend == "torch":
            selected = ChunkedLinearLogprobs.apply(hidden, weight, bias, rows, selected_targets)
        else:
            from .triton_logprobs import TritonLinearLogprobs

            selected = TritonLinearLogprobs.apply(hidden, weight, bias, rows, selected_targets)
    return selected.new_zeros(targets.shape[0]).index_copy(0, kept, selected)


def without_autocast(hidden: torch.Tensor) -> torch.autocast:
    """The kernels compute in their inputs' dtypes, accumulating in fp32: inside an autocast region, their
    matmuls must not be recast to half precision (cast hidden and weight to choose it)."""
    return torch.autocast(hidden.device.type, enabled=False)

"""The plain formula, full logits and all: the truth the tests compare against, and the naive peer.

Float64 inputs are computed in float64; anything else in float32.
"""

from __future__ import annotations

import torch


def reference_linear_logprobs(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    rows: torch.Tensor,
    targets: torch.Tensor,
) -> torch.Tensor:
    """log softmax(hidden[rows] @ weight.T + bias)[targets] for the M selected rows -> [M]."""
    compute_dtype = torch.float64 if hidden.dtype == torch.float64 else torch.float32
    logits = hidden.index_select(0, rows).to(compute_dtype) @ weight.to(compute_dtype).T
    if bias is not None:
        logits = logits + bias.to(compute_dtype)
    return logits.log_softmax(dim=-1).gather(1, targets.unsqueeze(1)).squeeze(1)

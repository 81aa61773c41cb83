"""Packed-row attention for CUDA machines without the flash_attn package: PyTorch's own varlen
FlashAttention kernel (torch.nn.attention.varlen), registered with transformers as "spin_varlen".

transformers hands every attention layer the packed row's cu_seqlens (passed in by
packed_hidden_states), so sequences attend only to themselves and no [T, T] mask is ever built.
"""

from __future__ import annotations

import torch
from transformers import AttentionInterface
from transformers.masking_utils import AttentionMaskInterface, flash_attention_mask

NAME = "spin_varlen"


def varlen_kernel():
    """PyTorch's varlen FlashAttention (CUDA, fp16/bf16); a function so tests can stand in for it."""
    from torch.nn.attention.varlen import varlen_attn

    return varlen_attn


def torch_varlen_attention(module, query, key, value, attention_mask, scaling=None, dropout=0.0, **kwargs):
    """transformers attention interface: query [1, Hq, T, D], key/value [1, Hkv, T, D] -> ([1, T, Hq, D], None)."""
    if query.shape[0] != 1:
        raise ValueError(f"{NAME} attention takes one packed row, got a batch of {query.shape[0]}")
    if dropout:
        raise ValueError(f"{NAME} attention has no dropout; set the model's attention_dropout to 0")
    cu_seqlens, max_seqlen = kwargs.get("cu_seq_lens_q"), kwargs.get("max_length_q")
    if cu_seqlens is None:
        cu_seqlens, max_seqlen = cu_seqlens_from_positions(kwargs["position_ids"][0])
    window = getattr(module, "sliding_window", None)
    out = varlen_kernel()(
        query[0].transpose(0, 1), key[0].transpose(0, 1), value[0].transpose(0, 1),
        cu_seqlens, cu_seqlens, max_seqlen, max_seqlen, scale=scaling,
        window_size=(window - 1, 0) if window else (-1, 0),  # (-1, 0): causal
        enable_gqa=query.shape[1] != key.shape[1],
    )
    return out[None], None


def cu_seqlens_from_positions(position_ids: torch.Tensor) -> tuple[torch.Tensor, int]:
    """Sequence boundaries of a packed row whose positions restart at 0 for each sequence."""
    starts = (position_ids == 0).nonzero().squeeze(1)
    ends = torch.cat([starts[1:], starts.new_tensor([position_ids.numel()])])
    cu = torch.cat([starts.new_zeros(1), ends]).to(torch.int32)
    return cu, int((ends - starts).max())


def register() -> None:
    AttentionInterface.register(NAME, torch_varlen_attention)
    # Like flash attention, it needs no mask: none is built.
    AttentionMaskInterface.register(NAME, flash_attention_mask)

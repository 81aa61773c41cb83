"""Packed-row attention without a [T, T] mask, registered with transformers as "spin_varlen".

transformers hands every attention layer the packed row's cu_seqlens (passed in by
packed_hidden_states, with a HostBounds that reads them to the host once a forward, for the kernel that
needs them there), so each sequence attends only to itself and its cost is the sum of its
sequences' squared lengths, not the row's squared length:
  CUDA   varlen FlashAttention (fp16/bf16, head dim <= 256): the flash_attn package's when installed, else
         PyTorch's own (torch.nn.attention.varlen)
  else   one causal SDPA call per sequence (the block-diagonal mask of plain SDPA would cost
         T^2 per row: 16x more at 8192 tokens in sequences of 512)
A row whose pairs share their prompts (spin_fast.packing, share_prompts) also passes the expanded layout:
attention runs on the whole sequences gathered from the row (a shared prompt's queries, keys and values
once per response) and each row token keeps its own sequence's output.
"""

from __future__ import annotations

import functools
import inspect

import torch
from transformers import AttentionInterface
from transformers.masking_utils import AttentionMaskInterface, flash_attention_mask

NAME = "spin_varlen"
# The keyword arguments that carry a shared-prompt row's layout (spin_fast.packing.MicroBatch) to every layer.
EXPAND_INDEX, COLLAPSE_INDEX = "spin_expand_index", "spin_collapse_index"
# The keyword argument that carries the row's boundaries on the host (a HostBounds) to every layer.
HOST_BOUNDS = "spin_host_bounds"


# Arguments of a layer's attention call that change its result and that spin_varlen's kernels do not compute:
# refused, never dropped (GPT-OSS's sinks, Gemma 2's soft-capped scores).
UNSUPPORTED = {"s_aux": "attention sinks (s_aux)", "softcap": "attention logit soft-capping (softcap)"}


# FlashAttention's kernels (flash_attn's and PyTorch's copy of them) stop at this head dimension.
FLASH_MAX_HEAD_DIM = 256


def varlen_kernel(device: torch.device, dtype: torch.dtype, head_dim: int):
    """Varlen FlashAttention on CUDA in fp16/bf16 (its only dtypes) up to head dim 256: flash_attn's, else
    PyTorch's; per-sequence SDPA otherwise; a function so tests can stand in for it."""
    if device.type != "cuda" or dtype not in (torch.float16, torch.bfloat16) or head_dim > FLASH_MAX_HEAD_DIM:
        return per_sequence_sdpa
    try:
        from flash_attn import flash_attn_varlen_func
    except ImportError:
        pass
    else:  # its Python wrapper pads a head dim to a multiple of 8
        return adapt_flash_attn(flash_attn_varlen_func)
    try:
        from torch.nn.attention.varlen import varlen_attn
    except ImportError:  # torch < 2.10: SDPA's own FlashAttention, one sequence at a time
        return per_sequence_sdpa
    if head_dim % 8:  # PyTorch's varlen kernel takes multiples of 8 only, and does not pad
        return per_sequence_sdpa
    return adapt_varlen(varlen_attn)


@functools.cache  # every attention layer asks, in every forward
def adapt_varlen(varlen_attn):
    """varlen_attn behind the newest call (scale, window_size, enable_gqa) whatever this torch's version: torch 2.10
    took is_causal instead of window_size and no scale (always 1/sqrt(head_dim)), and torch 2.11 has no
    enable_gqa."""
    accepted = inspect.signature(varlen_attn).parameters
    if "window_size" in accepted and "enable_gqa" in accepted:
        return varlen_attn

    def call(q, k, v, cu_q, cu_k, max_q, max_k, *, scale=None, window_size=(-1, 0), enable_gqa=False,
             host_bounds=None):
        options = {}
        if "window_size" in accepted:
            options["window_size"] = window_size
        elif tuple(window_size) == (-1, 0):
            options["is_causal"] = True
        if "scale" in accepted:
            options["scale"] = scale
        inexpressible = ("window_size" not in options and "is_causal" not in options  # a sliding window
                         or "scale" not in accepted and scale is not None and scale != q.shape[-1] ** -0.5)
        if inexpressible:  # by this torch's kernel
            return per_sequence_sdpa(q, k, v, cu_q, cu_k, max_q, max_k, scale=scale, window_size=window_size,
                                     enable_gqa=enable_gqa, host_bounds=host_bounds)
        if enable_gqa:  # this torch wants one key/value head per query head: share each with its query group
            group = q.shape[1] // k.shape[1]
            k, v = k.repeat_interleave(group, dim=1), v.repeat_interleave(group, dim=1)
        return varlen_attn(q, k, v, cu_q, cu_k, max_q, max_k, **options)

    call.takes_host_bounds = True
    return call


@functools.cache
def adapt_flash_attn(flash_attn_varlen_func):
    """flash_attn's varlen kernel behind varlen_attn's call: it takes grouped key/value heads as they are, and a
    causal sliding window as (left, 0) with causal=True; before flash_attn 2.3 it had no window, and a sliding
    window runs per sequence."""
    has_window = "window_size" in inspect.signature(flash_attn_varlen_func).parameters

    def call(q, k, v, cu_q, cu_k, max_q, max_k, *, scale=None, window_size=(-1, 0), enable_gqa=False,
             host_bounds=None):
        if has_window:
            return flash_attn_varlen_func(q, k, v, cu_q, cu_k, max_q, max_k, softmax_scale=scale, causal=True,
                                          window_size=tuple(window_size))
        if window_size[0] >= 0:
            return per_sequence_sdpa(q, k, v, cu_q, cu_k, max_q, max_k, scale=scale, window_size=window_size,
                                     enable_gqa=enable_gqa, host_bounds=host_bounds)
        return flash_attn_varlen_func(q, k, v, cu_q, cu_k, max_q, max_k, softmax_scale=scale, causal=True)

    call.takes_host_bounds = True
    return call


class HostBounds:
    """A packed row's boundaries (cu_seqlens) on the host, read from the device at most once a forward: made where the
    forward starts (spin_fast.model) and handed to every layer in the attention kwargs, as on CUDA each read waits
    for the GPU. Read on first use, so that FlashAttention, which takes the device tensor, costs no read."""

    def __init__(self, cu_seqlens: torch.Tensor):
        self.cu_seqlens = cu_seqlens
        self._values: list[int] | None = None

    def __call__(self) -> list[int]:
        if self._values is None:
            self._values = self.cu_seqlens.tolist()
        return self._values


def per_sequence_sdpa(q, k, v, cu_q, cu_k, max_q, max_k, *, scale=None, window_size=(-1, 0), enable_gqa=False,
                      host_bounds: HostBounds | None = None):
    """varlen_attn's contract (q, k, v [T, H, D], shared boundaries cu_q) by causal SDPA sequence by sequence;
    host_bounds: cu_q's values read once for all the layers (else read here)."""
    out = torch.empty_like(q)
    bounds = cu_q.tolist() if host_bounds is None else host_bounds()
    for start, end in zip(bounds[:-1], bounds[1:]):
        qs, ks, vs = (t[start:end].transpose(0, 1) for t in (q, k, v))
        mask, causal = None, True
        if window_size[0] >= 0 and end - start > window_size[0] + 1:  # a sliding window that cuts this sequence
            i = torch.arange(end - start, device=q.device)
            mask, causal = (i[:, None] >= i[None, :]) & (i[:, None] - i[None, :] <= window_size[0]), False
        out[start:end] = torch.nn.functional.scaled_dot_product_attention(
            qs, ks, vs, attn_mask=mask, is_causal=causal, scale=scale, enable_gqa=enable_gqa
        ).transpose(0, 1)
    return out


# Kernels of this module's making take host_bounds (for their per-sequence SDPA); FlashAttention's own do not.
per_sequence_sdpa.takes_host_bounds = True


def torch_varlen_attention(module, query, key, value, attention_mask, scaling=None, dropout=0.0, **kwargs):
    """transformers attention interface: query [1, Hq, T, D], key/value [1, Hkv, T, D] -> ([1, T, Hq, D], None)."""
    if query.shape[0] != 1:
        raise ValueError(f"{NAME} attention takes one packed row, got a batch of {query.shape[0]}")
    if dropout:
        raise ValueError(f"{NAME} attention has no dropout, and this model's config sets attention_dropout to "
                         f"{dropout}: set model.attention=sdpa to train with it (SFT; SPIN turns dropout off), or "
                         "set attention_dropout to 0 in the model's config.json")
    if getattr(module, "is_causal", True) is False:  # Gemma's use_bidirectional_attention: later tokens seen too
        raise ValueError(f"{NAME} attention is causal, and this model's attention ({type(module).__name__}) is not "
                         "(use_bidirectional_attention?): its kernels would hide the later tokens each token sees in "
                         "the model, and its log-probs would be wrong; set model.attention to sdpa")
    for name, what in UNSUPPORTED.items():
        if kwargs.get(name) is not None:
            raise ValueError(f"{NAME} attention does not compute {what}, which this model's attention "
                             f"({type(module).__name__}) uses: its log-probs would be wrong; set model.attention "
                             "to eager")
    if query.dtype == torch.float32 and torch.is_autocast_enabled(query.device.type):
        # Under autocast, rotary embeddings (products that autocast leaves alone) hand back fp32 queries and keys
        # beside bf16 values: attention runs in the autocast dtype, as transformers' flash attention does, so that
        # the varlen FlashAttention kernel takes it.
        dtype = torch.get_autocast_dtype(query.device.type)
        query, key, value = (t.to(dtype) for t in (query, key, value))
    cu_seqlens, max_seqlen = kwargs.get("cu_seq_lens_q"), kwargs.get("max_length_q")
    expand, collapse = kwargs.get(EXPAND_INDEX), kwargs.get(COLLAPSE_INDEX)
    if cu_seqlens is None:
        if expand is not None:
            raise ValueError(f"{NAME} attention: a row with shared prompts needs its cu_seq_lens_q")
        if kwargs.get("position_ids") is None:
            raise ValueError(f"{NAME} attention: this model's layers ({type(module).__name__}) pass attention neither "
                             "the packed row's layout nor its positions; set model.attention to sdpa")
        cu_seqlens, max_seqlen = cu_seqlens_from_positions(kwargs["position_ids"][0])
    q, k, v = (t[0].transpose(0, 1) for t in (query, key, value))  # [T, heads, head_dim]
    if expand is not None:  # shared prompts: each sequence whole, a shared prompt once per response
        q, k, v = (t.index_select(0, expand) for t in (q, k, v))
    # Mistral and Qwen2 layers pass their window as an argument (None on full-attention layers).
    window = kwargs.get("sliding_window", getattr(module, "sliding_window", None))
    kernel = varlen_kernel(query.device, query.dtype, query.shape[-1])
    options = {}
    host_bounds = kwargs.get(HOST_BOUNDS)
    if host_bounds is not None and host_bounds.cu_seqlens is cu_seqlens and getattr(kernel, "takes_host_bounds", False):
        options["host_bounds"] = host_bounds  # the boundaries' one read in this forward, shared by the layers
    out = kernel(
        q, k, v, cu_seqlens, cu_seqlens, max_seqlen, max_seqlen, scale=scaling,
        window_size=(window - 1, 0) if window else (-1, 0),  # (-1, 0): causal
        enable_gqa=query.shape[1] != key.shape[1], **options,
    )
    if collapse is not None:  # each row token keeps one result: a shared prompt's from its first sequence
        out = out.index_select(0, collapse)
    return out[None], None


def cu_seqlens_from_positions(position_ids: torch.Tensor) -> tuple[torch.Tensor, int]:
    """Sequence boundaries of a packed row whose positions restart at 0 for each sequence. Positions that jump
    elsewhere (a shared prompt's second response continues from the prompt's end) mean that the model's layers did
    not pass the row's layout (cu_seq_lens_q and the shared-prompt indices) on to attention: refused, as the
    boundaries read from them would let a response attend to the one before it."""
    follows = (position_ids[1:] == position_ids[:-1] + 1) | (position_ids[1:] == 0)
    if position_ids.numel() and (position_ids[0] != 0 or not bool(follows.all())):
        raise ValueError(f"{NAME} attention: the packed row's positions do not restart at 0 for each sequence, and "
                         "this model's layers do not pass the row's layout (cu_seq_lens_q, shared prompts) on to "
                         "attention, so its sequences cannot be told apart; set model.attention to sdpa")
    starts = (position_ids == 0).nonzero().squeeze(1)
    ends = torch.cat([starts[1:], starts.new_tensor([position_ids.numel()])])
    cu = torch.cat([starts.new_zeros(1), ends]).to(torch.int32)
    return cu, int((ends - starts).max())


def register() -> None:
    AttentionInterface.register(NAME, torch_varlen_attention)
    # Like flash attention, it needs no mask: none is built.
    AttentionMaskInterface.register(NAME, flash_attention_mask)

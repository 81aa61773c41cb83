"""Triton backend: target-token log-probs straight from hidden states and the LM head.

Forward: each program takes BLOCK_N tokens and a slice of the vocabulary, computes
[BLOCK_N, BLOCK_V] logits tiles on chip (fp32 accumulation), and keeps a running max and sum of
exponentials plus the target's logit. Slices are merged with one logsumexp over a [splits, M]
buffer, so no [N, V] buffer ever exists. Backward: each program recomputes one logits tile,
forms d = g * (onehot - softmax) and adds d @ W into dhidden and d.T @ h into dweight with fp32
atomics (the Cut Cross-Entropy scheme).

Rows are gathered in the kernel through an index vector, so tokens without loss are never
copied, computed or written.
"""

from __future__ import annotations

import contextlib
import os
from dataclasses import dataclass

import torch
import triton
import triton.language as tl

from ._checks import check_first_order

INTERPRETING = os.environ.get("TRITON_INTERPRET") == "1"


@triton.jit
def _logits_tile(
    hidden_ptr, weight_ptr, bias_ptr, rows, row_mask, cols, col_mask, H,
    stride_hidden, stride_weight,
    HAS_BIAS: tl.constexpr, UPCAST: tl.constexpr, PRECISION: tl.constexpr,
    BLOCK_N: tl.constexpr, BLOCK_V: tl.constexpr, BLOCK_K: tl.constexpr,
):
    """hidden[rows] @ weight[cols].T (+ bias[cols]) as a fp32 [BLOCK_N, BLOCK_V] tile."""
    offs_k = tl.arange(0, BLOCK_K)
    hidden_rows = hidden_ptr + rows[:, None] * stride_hidden
    weight_rows = weight_ptr + cols.to(tl.int64)[:, None] * stride_weight
    acc = tl.zeros((BLOCK_N, BLOCK_V), dtype=tl.float32)
    for k_start in range(0, H, BLOCK_K):
        k = k_start + offs_k
        k_mask = k < H
        h = tl.load(hidden_rows + k[None, :], mask=row_mask[:, None] & k_mask[None, :], other=0.0)
        w = tl.load(weight_rows + k[None, :], mask=col_mask[:, None] & k_mask[None, :], other=0.0)
        if UPCAST:  # the interpreter's half-precision arithmetic is wrong; its loads are fine
            h = h.to(tl.float32)
            w = w.to(tl.float32)
        acc = tl.dot(h, tl.trans(w), acc, input_precision=PRECISION)
    if HAS_BIAS:
        acc += tl.load(bias_ptr + cols, mask=col_mask, other=0.0).to(tl.float32)[None, :]
    return acc


@triton.jit
def _forward_kernel(
    hidden_ptr, weight_ptr, bias_ptr, rows_ptr, targets_ptr, lse_ptr, target_logit_ptr,
    M, V, H, stride_hidden, stride_weight, tiles_per_split,
    HAS_BIAS: tl.constexpr, UPCAST: tl.constexpr, PRECISION: tl.constexpr,
    BLOCK_N: tl.constexpr, BLOCK_V: tl.constexpr, BLOCK_K: tl.constexpr,
):
    pid_n = tl.program_id(0)
    split = tl.program_id(1)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    row_mask = offs_n < M
    rows = tl.load(rows_ptr + offs_n, mask=row_mask, other=0).to(tl.int64)
    targets = tl.load(targets_ptr + offs_n, mask=row_mask, other=-1)
    running_max = tl.full((BLOCK_N,), float("-inf"), dtype=tl.float32)
    running_sum = tl.zeros((BLOCK_N,), dtype=tl.float32)
    target_logit = tl.zeros((BLOCK_N,), dtype=tl.float32)
    first_tile = split * tiles_per_split
    last_tile = tl.minimum(first_tile + tiles_per_split, tl.cdiv(V, BLOCK_V))
    for tile in range(first_tile, last_tile):
        cols = tile * BLOCK_V + tl.arange(0, BLOCK_V)
        col_mask = cols < V
        logits = _logits_tile(
            hidden_ptr, weight_ptr, bias_ptr, rows, row_mask, cols, col_mask, H,
            stride_hidden, stride_weight, HAS_BIAS, UPCAST, PRECISION, BLOCK_N, BLOCK_V, BLOCK_K,
        )
        logits = tl.where(col_mask[None, :], logits, float("-inf"))
        new_max = tl.maximum(running_max, tl.max(logits, axis=1))
        # Every logit so far -inf (a -inf bias masks tokens out): shift by 0, as -inf - -inf would be NaN.
        shift = tl.where(new_max == float("-inf"), 0.0, new_max)
        running_sum = running_sum * tl.exp(running_max - shift) + tl.sum(tl.exp(logits - shift[:, None]), axis=1)
        running_max = new_max
        is_target = cols[None, :] == targets[:, None]
        target_logit += tl.sum(tl.where(is_target, logits, 0.0), axis=1)
    out = split * M + offs_n
    tl.store(lse_ptr + out, running_max + tl.log(running_sum), mask=row_mask)
    tl.store(target_logit_ptr + out, target_logit, mask=row_mask)


@triton.jit
def _backward_kernel(
    hidden_ptr, weight_ptr, bias_ptr, rows_ptr, targets_ptr, lse_ptr, grad_ptr,
    grad_hidden_ptr, grad_weight_ptr, grad_bias_ptr,
    M, V, H, stride_hidden, stride_weight, stride_grad_hidden, stride_grad_weight,
    HAS_BIAS: tl.constexpr, UPCAST: tl.constexpr, PRECISION: tl.constexpr,
    NEED_HIDDEN: tl.constexpr, NEED_WEIGHT: tl.constexpr, NEED_BIAS: tl.constexpr,
    GROUP_N: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_V: tl.constexpr, BLOCK_K: tl.constexpr,
):
    # GROUP_N token blocks walk the vocabulary together, so each weight tile is reused from L2.
    pid = tl.program_id(0)
    n_blocks = tl.cdiv(M, BLOCK_N)
    v_blocks = tl.cdiv(V, BLOCK_V)
    group = pid // (GROUP_N * v_blocks)
    first_n = group * GROUP_N
    group_rows = tl.minimum(n_blocks - first_n, GROUP_N)
    pid_n = first_n + (pid % (GROUP_N * v_blocks)) % group_rows
    pid_v = (pid % (GROUP_N * v_blocks)) // group_rows

    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    row_mask = offs_n < M
    rows = tl.load(rows_ptr + offs_n, mask=row_mask, other=0).to(tl.int64)
    targets = tl.load(targets_ptr + offs_n, mask=row_mask, other=-1)
    lse = tl.load(lse_ptr + offs_n, mask=row_mask, other=0.0)
    grad = tl.load(grad_ptr + offs_n, mask=row_mask, other=0.0)
    cols = pid_v * BLOCK_V + tl.arange(0, BLOCK_V)
    col_mask = cols < V

    logits = _logits_tile(
        hidden_ptr, weight_ptr, bias_ptr, rows, row_mask, cols, col_mask, H,
        stride_hidden, stride_weight, HAS_BIAS, UPCAST, PRECISION, BLOCK_N, BLOCK_V, BLOCK_K,
    )
    softmax = tl.exp(logits - lse[:, None])
    onehot = tl.where(cols[None, :] == targets[:, None], 1.0, 0.0)
    dlogits = grad[:, None] * (onehot - softmax)
    dlogits = tl.where(row_mask[:, None] & col_mask[None, :], dlogits, 0.0)
    # Relaxed atomics: the sums are read only after the kernel ends. The default (acq_rel) puts a GPU-wide
    # barrier and an L1 invalidation beside every add (tests/test_triton_aot.py counts them).
    if NEED_BIAS:
        tl.atomic_add(grad_bias_ptr + cols, tl.sum(dlogits, axis=0), mask=col_mask, sem="relaxed")
    if not UPCAST:  # tensor cores take the inputs' precision; accumulation stays fp32
        dlogits = dlogits.to(hidden_ptr.dtype.element_ty)

    offs_k = tl.arange(0, BLOCK_K)
    for k_start in range(0, H, BLOCK_K):
        k = k_start + offs_k
        k_mask = k < H
        if NEED_HIDDEN:
            w = tl.load(
                weight_ptr + cols.to(tl.int64)[:, None] * stride_weight + k[None, :],
                mask=col_mask[:, None] & k_mask[None, :], other=0.0,
            )
            if UPCAST:
                w = w.to(tl.float32)
            partial = tl.dot(dlogits, w, input_precision=PRECISION)
            tl.atomic_add(
                grad_hidden_ptr + rows[:, None] * stride_grad_hidden + k[None, :], partial,
                mask=row_mask[:, None] & k_mask[None, :], sem="relaxed",
            )
        if NEED_WEIGHT:
            h = tl.load(
                hidden_ptr + rows[:, None] * stride_hidden + k[None, :],
                mask=row_mask[:, None] & k_mask[None, :], other=0.0,
            )
            if UPCAST:
                h = h.to(tl.float32)
            partial = tl.dot(tl.trans(dlogits), h, input_precision=PRECISION)
            tl.atomic_add(
                grad_weight_ptr + cols.to(tl.int64)[:, None] * stride_grad_weight + k[None, :],
                partial, mask=col_mask[:, None] & k_mask[None, :], sem="relaxed",
            )


@dataclass(frozen=True)
class LaunchConfig:
    block_n: int
    block_v: int
    block_k: int
    num_warps: int
    num_stages: int
    group_n: int = 8


# Tile shapes per GPU generation, checked ahead of time (tests/aot_compile.py) to compile with
# no register spills and with tensor-core instructions. fp32 inputs use TF32x3 (three tensor-core
# passes, about fp32 accuracy): the FMA path spills in the backward. Keys: (arch, fp32 inputs).
_CONFIGS = {
    (90, False): (LaunchConfig(128, 128, 64, 8, 3), LaunchConfig(128, 128, 64, 8, 3)),
    (90, True): (LaunchConfig(64, 128, 32, 8, 2), LaunchConfig(64, 64, 32, 4, 2)),
    (80, False): (LaunchConfig(128, 128, 64, 8, 3), LaunchConfig(128, 128, 64, 8, 2)),
    (80, True): (LaunchConfig(64, 64, 32, 4, 3), LaunchConfig(64, 64, 16, 4, 2)),
    # Any other GPU (e.g. sm_86/89/120, about 100 KB of shared memory): small, safe tiles.
    (0, False): (LaunchConfig(64, 64, 64, 4, 2), LaunchConfig(64, 64, 32, 4, 2)),
    (0, True): (LaunchConfig(64, 64, 32, 4, 2), LaunchConfig(64, 64, 16, 4, 2)),
}
_INTERPRETER_CONFIG = LaunchConfig(32, 128, 64, num_warps=4, num_stages=1, group_n=2)


def arch_family(arch: int) -> int:
    """sm_90 and sm_100 share the Hopper tiles, sm_80 has its own, the rest the small ones."""
    return 90 if arch in (90, 100) else 80 if arch == 80 else 0


def launch_configs(dtype: torch.dtype, arch: int) -> tuple[LaunchConfig, LaunchConfig]:
    """(forward, backward) tile shapes for inputs of this dtype on a GPU of this arch (e.g. 90)."""
    if INTERPRETING:  # big blocks run fastest in the interpreter
        return _INTERPRETER_CONFIG, _INTERPRETER_CONFIG
    return _CONFIGS[arch_family(arch), dtype == torch.float32]


def device_arch(device: torch.device) -> int:
    # AMD GPUs (ROCm's torch calls them "cuda"): the small tiles, which their 64 KiB of LDS holds; an MI200 reports
    # (9, 0), Hopper's number, whose tiles need 96 KiB.
    if INTERPRETING or torch.version.hip:
        return 0
    major, minor = torch.cuda.get_device_capability(device)
    return 10 * major + minor


def dot_precision(dtype: torch.dtype) -> str:
    # Plain fp32 dots would run as TF32 (1e-3 relative error); TF32x3 keeps fp32 inputs honest. AMD's Triton takes
    # neither (TF32 on MI300 alone): exact fp32 ("ieee") there; half-precision dots ignore the setting.
    if torch.version.hip:
        return "ieee"
    return "tf32x3" if dtype == torch.float32 else "tf32"


def on_device(device: torch.device):
    """Triton launches on the current CUDA device, not on the inputs': make theirs current (a model spread over
    several GPUs may keep its LM head on another one)."""
    return torch.cuda.device(device) if device.type == "cuda" else contextlib.nullcontext()


def _vocab_splits(n_blocks: int, v_tiles: int, device: torch.device) -> int:
    """Split the vocabulary across programs when there are too few token blocks to fill the GPU."""
    if INTERPRETING:
        return min(v_tiles, 2)  # still exercises the cross-split merge
    programs_wanted = 2 * torch.cuda.get_device_properties(device).multi_processor_count
    return max(1, min(v_tiles, triton.cdiv(programs_wanted, n_blocks)))


class TritonLinearLogprobs(torch.autograd.Function):
    @staticmethod
    def forward(ctx, hidden, weight, bias, rows, targets):
        hidden = hidden if hidden.stride(1) == 1 else hidden.contiguous()
        weight = weight if weight.stride(1) == 1 else weight.contiguous()
        bias = None if bias is None else bias.contiguous()
        n_rows, (vocab_size, hidden_size) = rows.shape[0], weight.shape
        lse = torch.zeros(n_rows, dtype=torch.float32, device=hidden.device)
        logps = torch.zeros(n_rows, dtype=torch.float32, device=hidden.device)
        if n_rows:
            cfg = launch_configs(hidden.dtype, device_arch(hidden.device))[0]
            n_blocks = triton.cdiv(n_rows, cfg.block_n)
            v_tiles = triton.cdiv(vocab_size, cfg.block_v)
            splits = _vocab_splits(n_blocks, v_tiles, hidden.device)
            tiles_per_split = triton.cdiv(v_tiles, splits)
            splits = triton.cdiv(v_tiles, tiles_per_split)
            partial_lse = torch.empty(splits, n_rows, dtype=torch.float32, device=hidden.device)
            partial_target = torch.empty_like(partial_lse)
            with on_device(hidden.device):
                _forward_kernel[(n_blocks, splits)](
                    hidden, weight, bias if bias is not None else weight, rows, targets,
                    partial_lse, partial_target,
                    n_rows, vocab_size, hidden_size, hidden.stride(0), weight.stride(0), tiles_per_split,
                    HAS_BIAS=bias is not None, UPCAST=INTERPRETING, PRECISION=dot_precision(hidden.dtype),
                    BLOCK_N=cfg.block_n, BLOCK_V=cfg.block_v, BLOCK_K=cfg.block_k,
                    num_warps=cfg.num_warps, num_stages=cfg.num_stages,
                )
            lse = torch.logsumexp(partial_lse, dim=0)
            logps = partial_target.sum(0) - lse
        ctx.save_for_backward(hidden, weight, bias, rows, targets, lse)
        return logps

    @staticmethod
    def backward(ctx, grad_logps):
        check_first_order()
        hidden, weight, bias, rows, targets, lse = ctx.saved_tensors
        need_hidden, need_weight, need_bias = ctx.needs_input_grad[:3]
        n_rows, (vocab_size, hidden_size) = rows.shape[0], weight.shape
        device = hidden.device
        grad_hidden = torch.zeros(hidden.shape, dtype=torch.float32, device=device) if need_hidden else None
        grad_weight = torch.zeros(weight.shape, dtype=torch.float32, device=device) if need_weight else None
        grad_bias = torch.zeros(vocab_size, dtype=torch.float32, device=device) if need_bias else None
        if n_rows and (need_hidden or need_weight or need_bias):
            cfg = launch_configs(hidden.dtype, device_arch(device))[1]
            grid = (triton.cdiv(n_rows, cfg.block_n) * triton.cdiv(vocab_size, cfg.block_v),)
            with on_device(device):
                _backward_kernel[grid](
                    hidden, weight, bias if bias is not None else weight, rows, targets, lse,
                    grad_logps.float().contiguous(),
                    grad_hidden if need_hidden else lse, grad_weight if need_weight else lse,
                    grad_bias if need_bias else lse,
                    n_rows, vocab_size, hidden_size, hidden.stride(0), weight.stride(0),
                    hidden_size, hidden_size,
                    HAS_BIAS=bias is not None, UPCAST=INTERPRETING, PRECISION=dot_precision(hidden.dtype),
                    NEED_HIDDEN=need_hidden, NEED_WEIGHT=need_weight, NEED_BIAS=need_bias,
                    GROUP_N=cfg.group_n, BLOCK_N=cfg.block_n, BLOCK_V=cfg.block_v, BLOCK_K=cfg.block_k,
                    num_warps=cfg.num_warps, num_stages=cfg.num_stages,
                )
        return (
            None if grad_hidden is None else grad_hidden.to(hidden.dtype),
            None if grad_weight is None else grad_weight.to(weight.dtype),
            None if grad_bias is None else grad_bias.to(bias.dtype),
            None,
            None,
        )

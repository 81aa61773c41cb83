"""Chunked PyTorch backend: runs on any device, holds one [chunk, V] block of logits at a time.

The forward keeps only each token's logsumexp; the backward recomputes the logits chunk by chunk
and forms g * (onehot - softmax) in place, so the extra memory is O(chunk x V), never O(N x V).
"""

from __future__ import annotations

import torch

# Bytes of one chunk's fp32 logits; the softmax temporaries of a chunk cost about as much again.
CHUNK_BYTES = 64 * 2**20


def chunk_tokens(vocab_size: int, element_size: int) -> int:
    return max(1, CHUNK_BYTES // (vocab_size * element_size))


class ChunkedLinearLogprobs(torch.autograd.Function):
    @staticmethod
    def forward(ctx, hidden, weight, bias, rows, targets):
        compute_dtype = torch.float64 if hidden.dtype == torch.float64 else torch.float32
        # One upcast copy of the head for half inputs: O(V x H), the size of its fp32 gradient.
        weight_c = weight.to(compute_dtype)
        bias_c = None if bias is None else bias.to(compute_dtype)
        n_rows = rows.shape[0]
        lse = torch.empty(n_rows, dtype=compute_dtype, device=hidden.device)
        logps = torch.empty(n_rows, dtype=compute_dtype, device=hidden.device)
        step = chunk_tokens(weight.shape[0], weight_c.element_size())
        for start in range(0, n_rows, step):
            end = min(start + step, n_rows)
            logits = _chunk_logits(hidden, weight_c, bias_c, rows[start:end])
            lse[start:end] = torch.logsumexp(logits, dim=-1)
            target_logits = logits.gather(1, targets[start:end, None]).squeeze(1)
            logps[start:end] = target_logits - lse[start:end]
        ctx.save_for_backward(hidden, weight, bias, rows, targets, lse)
        return logps

    @staticmethod
    def backward(ctx, grad_logps):
        hidden, weight, bias, rows, targets, lse = ctx.saved_tensors
        need_hidden, need_weight, need_bias = ctx.needs_input_grad[:3]
        compute_dtype = lse.dtype
        weight_c = weight.to(compute_dtype)
        bias_c = None if bias is None else bias.to(compute_dtype)
        grad = grad_logps.to(compute_dtype)
        grad_hidden = torch.zeros_like(hidden) if need_hidden else None
        grad_weight = torch.zeros_like(weight_c) if need_weight else None
        grad_bias = torch.zeros_like(bias_c) if need_bias else None
        step = chunk_tokens(weight.shape[0], weight_c.element_size())
        for start in range(0, rows.shape[0], step):
            end = min(start + step, rows.shape[0])
            chunk_rows, g = rows[start:end], grad[start:end]
            # dlogits = g * (onehot - softmax), built in the logits buffer itself.
            dlogits = _chunk_logits(hidden, weight_c, bias_c, chunk_rows)
            dlogits.sub_(lse[start:end, None]).exp_().mul_(-g[:, None])
            dlogits.scatter_add_(1, targets[start:end, None], g[:, None])
            if need_hidden:
                grad_hidden.index_copy_(0, chunk_rows, (dlogits @ weight_c).to(hidden.dtype))
            if need_weight:
                chunk_hidden = hidden.index_select(0, chunk_rows).to(compute_dtype)
                grad_weight.addmm_(dlogits.T, chunk_hidden)
            if need_bias:
                grad_bias += dlogits.sum(0)
        if need_weight:
            grad_weight = grad_weight.to(weight.dtype)
        if need_bias:
            grad_bias = grad_bias.to(bias.dtype)
        return grad_hidden, grad_weight, grad_bias, None, None


def _chunk_logits(hidden, weight_c, bias_c, chunk_rows):
    chunk_hidden = hidden.index_select(0, chunk_rows).to(weight_c.dtype)
    if bias_c is None:
        return chunk_hidden @ weight_c.T
    return torch.addmm(bias_c, chunk_hidden, weight_c.T)

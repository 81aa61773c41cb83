"""linear_logprobs on every backend against the float64 truth: values and every gradient."""

import numpy as np
import pytest
import torch

import spin_kernels
from helpers import TOLERANCE, assert_close, output_dtype, random_packed_batch, truth_token_logprobs
from spin_kernels import chunked

BACKENDS = ["torch", "triton", "reference"]
DTYPES = [torch.float32, torch.bfloat16, torch.float16]


def make_inputs(n, h, v, dtype, bias=True, ignore_fraction=0.3, scale=1.0):
    hidden = (torch.randn(n, h, dtype=torch.float64) * scale).to(dtype).requires_grad_()
    weight = (torch.randn(v, h, dtype=torch.float64) / h**0.5).to(dtype).requires_grad_()
    b = torch.randn(v, dtype=torch.float64).to(dtype).requires_grad_() if bias else None
    targets = torch.randint(0, v, (n,))
    targets[torch.rand(n) < ignore_fraction] = -100
    return hidden, weight, b, targets


def check_against_truth(backend, hidden, weight, bias, targets, dtype, requires=(True, True, True), tol=None,
                        hidden_index=None):
    leaves = [hidden, weight] + ([bias] if bias is not None else [])
    for leaf, needed in zip(leaves, requires):
        leaf.requires_grad_(needed)
    upstream = torch.randn(targets.shape[0], dtype=torch.float64)
    out = spin_kernels.linear_logprobs(hidden, weight, targets, bias=bias, hidden_index=hidden_index,
                                       backend=backend)
    assert out.dtype == torch.float32 and out.shape == targets.shape
    if any(leaf.requires_grad for leaf in leaves):
        (out.double() * upstream).sum().backward()

    truth_leaves = [leaf.detach().double().requires_grad_() for leaf in leaves]
    truth_bias = truth_leaves[2] if bias is not None else None
    truth_hidden = truth_leaves[0] if hidden_index is None else truth_leaves[0][hidden_index]
    truth = truth_token_logprobs(truth_hidden, truth_leaves[1], targets, truth_bias)
    (truth * upstream).sum().backward()
    assert_close(out, truth, output_dtype(dtype), f"{backend} logprobs", tol=tol)
    assert (out[targets == -100] == 0).all()
    for name, leaf, truth_leaf in zip(("hidden", "weight", "bias"), leaves, truth_leaves):
        if leaf.requires_grad:
            assert leaf.grad.dtype == leaf.dtype
            assert_close(leaf.grad, truth_leaf.grad, dtype, f"{backend} d{name}", tol=tol)
        else:
            assert leaf.grad is None


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("shape", [(150, 72, 1009), (37, 40, 515)], ids=lambda s: "x".join(map(str, s)))
@pytest.mark.parametrize("bias", [True, False], ids=["bias", "nobias"])
def test_matches_float64_truth(backend, dtype, shape, bias):
    check_against_truth(backend, *make_inputs(*shape, dtype, bias=bias), dtype)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("requires", [(True, False, False), (False, True, True), (False, False, True)])
def test_gradient_subsets(backend, requires):
    """Only the gradients asked for are computed (frozen head, frozen body)."""
    check_against_truth(backend, *make_inputs(41, 32, 300, torch.float32), torch.float32, requires)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_hidden_index_reads_rows_several_times(backend, dtype, monkeypatch):
    """targets [M] read hidden rows through hidden_index [M], some rows by several targets (a shared prompt's
    last token): values, and gradients summed over the targets that read a row, as float64 autograd gives."""
    monkeypatch.setattr(chunked, "CHUNK_BYTES", 300 * 4 * 11)  # 11 tokens per chunk: duplicates across chunks
    hidden, weight, bias, _ = make_inputs(40, 48, 300, dtype)
    hidden_index = torch.randint(0, 40, (70,))
    targets = torch.randint(0, 300, (70,))
    targets[torch.rand(70) < 0.2] = -100
    check_against_truth(backend, hidden, weight, bias, targets, dtype, hidden_index=hidden_index)
    assert (hidden.grad[torch.isin(torch.arange(40), hidden_index[targets != -100], invert=True)] == 0).all()


@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_a_half_row_read_by_many_targets_sums_its_gradient_in_float32(backend, monkeypatch):
    """A bf16 row read by 400 targets over 37 chunks: its gradient is summed in fp32 and rounded to bf16 once,
    so it is as close to the float64 truth as one rounding (summed in bf16, chunk by chunk, it was 3-7x further)."""
    monkeypatch.setattr(chunked, "CHUNK_BYTES", 300 * 4 * 11)  # 11 tokens per chunk
    hidden, weight, _, _ = make_inputs(4, 64, 300, torch.bfloat16, bias=False)
    hidden_index, targets = torch.zeros(400, dtype=torch.int64), torch.randint(0, 300, (400,))
    spin_kernels.linear_logprobs(hidden, weight, targets, hidden_index=hidden_index, backend=backend).sum().backward()
    truth_hidden = hidden.detach().double().requires_grad_()
    truth_token_logprobs(truth_hidden[hidden_index], weight.detach().double(), targets).sum().backward()
    truth = truth_hidden.grad[0]
    rounded_once = truth.to(torch.bfloat16).double()
    error, rounding = (hidden.grad[0].double() - truth).norm(), (rounded_once - truth).norm()
    assert error <= 1.5 * rounding, f"{error / truth.norm():.2g} against one rounding's {rounding / truth.norm():.2g}"


@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_many_chunks_and_noncontiguous_inputs(backend, monkeypatch):
    monkeypatch.setattr(chunked, "CHUNK_BYTES", 300 * 4 * 7)  # 7 tokens per chunk
    hidden, weight, bias, targets = make_inputs(90, 48, 300, torch.float32)
    hidden_t = hidden.detach().T.contiguous().T.requires_grad_()  # column-major view
    weight_t = weight.detach()[:, :].T.contiguous().T.requires_grad_()
    check_against_truth(backend, hidden_t, weight_t, bias, targets, torch.float32)


def test_a_chunk_smaller_than_one_row_of_logits_holds_one_token(monkeypatch):
    """One row of logits bigger than the chunk's bytes (a vocabulary past 16M in fp32): the torch backend still
    takes one token per chunk, where a chunk of zero tokens would stop it."""
    monkeypatch.setattr(chunked, "CHUNK_BYTES", 300 * 4 - 1)
    check_against_truth("torch", *make_inputs(9, 16, 300, torch.float32), torch.float32)


@pytest.mark.parametrize("backend", BACKENDS)
def test_all_tokens_ignored(backend):
    hidden, weight, bias, targets = make_inputs(19, 32, 200, torch.float32, ignore_fraction=1.0)
    out = spin_kernels.linear_logprobs(hidden, weight, targets, bias=bias, backend=backend)
    out.sum().backward()
    assert (out == 0).all()
    assert (hidden.grad == 0).all() and (weight.grad == 0).all() and (bias.grad == 0).all()


@pytest.mark.parametrize("backend", BACKENDS)
def test_one_token(backend):
    check_against_truth(backend, *make_inputs(1, 24, 77, torch.float32, ignore_fraction=0.0), torch.float32)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_huge_logits_stay_finite(backend, dtype):
    """Logits of magnitude ~1e4: the online max keeps exp() in range, no inf or NaN."""
    hidden, weight, bias, targets = make_inputs(33, 64, 333, dtype, bias=False, scale=1e4 / 3)
    with torch.no_grad():
        logits = hidden.double() @ weight.double().T
    assert logits.abs().max() > 5e3
    # fp32 rounding of logits ~1e4 alone (1e4 * 2^-24 * sqrt(H)) moves the softmax by ~1e-4 relative:
    # the gradients cannot be closer than that to the float64 truth, whatever the kernel.
    check_against_truth(backend, hidden, weight, None, targets, dtype, tol=max(TOLERANCE[dtype], 1e-3))


@pytest.mark.parametrize("backend", BACKENDS)
# Triton's padding rows overflow exp() before their mask drops them; the interpreter's numpy warns of it.
@pytest.mark.filterwarnings("ignore:overflow encountered:RuntimeWarning")
@pytest.mark.filterwarnings("ignore:invalid value encountered:RuntimeWarning")
def test_a_bias_past_exp_range_matches_float64(backend):
    """Every logit offset by a bias of ~100 (log-softmax ignores it; exp(100) overflows fp32). 45 tokens fill no
    block: the Triton backward's padding rows have the bias alone as logits and a logsumexp of 0, so their softmax
    is inf, and inf times their zero gradient a NaN that must be masked out before it reaches dweight and dbias."""
    hidden, weight, bias, targets = make_inputs(45, 32, 300, torch.float32, ignore_fraction=0.0)
    with torch.no_grad():
        bias += 100
    check_against_truth(backend, hidden, weight, bias, targets, torch.float32)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("masked", [256, 2176], ids=["two-tiles", "a-whole-vocab-split"])
# The masked split's log-sum-exp is log(0) = -inf, which the interpreter's numpy warns of.
@pytest.mark.filterwarnings("ignore:divide by zero encountered in log:RuntimeWarning")
def test_a_minus_inf_bias_masks_tokens(backend, masked):
    """A bias of -inf (tokens masked out of the vocabulary) over whole vocab tiles, and over the whole first of the
    interpreter's two vocab splits: their running max stays -inf, and exp(-inf - -inf) must not make a NaN."""
    hidden, weight, bias, targets = make_inputs(40, 64, 4099, torch.float32)
    with torch.no_grad():
        bias[:masked] = float("-inf")
    targets[targets >= 0] = torch.randint(masked, 4099, (int((targets >= 0).sum()),))
    check_against_truth(backend, hidden, weight, bias, targets, torch.float32)


@pytest.mark.parametrize("backend", BACKENDS)
def test_a_large_vocab_matches_float64(backend):
    """Vocabulary far bigger than the tile and not a multiple of any block: values and gradients."""
    hidden, weight, bias, targets = make_inputs(40, 64, 4099, torch.float32)
    check_against_truth(backend, hidden, weight, bias, targets, torch.float32)


def test_float64_is_computed_in_float64():
    hidden, weight, bias, targets = make_inputs(20, 16, 50, torch.float64)
    for backend in ("torch", "reference"):
        out = spin_kernels.linear_logprobs(hidden, weight, targets, bias=bias, backend=backend)
        assert out.dtype == torch.float64
        assert_close(out, truth_token_logprobs(hidden, weight, targets, bias), torch.float64, backend)


@pytest.mark.parametrize("backend", ["torch", "reference"])
def test_float64_gradients_are_computed_in_float64(backend):
    """Every gradient of float64 inputs in float64, to float64's tolerance (the forward's test checks values only)."""
    hidden, weight, bias, targets = make_inputs(20, 16, 50, torch.float64)
    upstream = torch.randn(20, dtype=torch.float64)
    (spin_kernels.linear_logprobs(hidden, weight, targets, bias=bias, backend=backend) * upstream).sum().backward()
    truth_leaves = [leaf.detach().clone().requires_grad_() for leaf in (hidden, weight, bias)]
    (truth_token_logprobs(truth_leaves[0], truth_leaves[1], targets, truth_leaves[2]) * upstream).sum().backward()
    for name, leaf, truth_leaf in zip(("hidden", "weight", "bias"), (hidden, weight, bias), truth_leaves):
        assert leaf.grad.dtype == torch.float64
        assert_close(leaf.grad, truth_leaf.grad, torch.float64, f"{backend} d{name}")


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_sequence_logprobs_sum_each_sequence(backend, dtype):
    """Per-sequence sums against float64 truth, one sequence at a time, and every gradient: what a DPO variant's
    own loss is built on. The last sequence has no token (log-prob 0); prompts carry id -1."""
    hidden, targets, sequence_ids = random_packed_batch(3, 40, 515, dtype)
    hidden.requires_grad_()
    weight = (torch.randn(515, 40, dtype=torch.float64) / 40**0.5).to(dtype).requires_grad_()
    upstream = torch.randn(7, dtype=torch.float64)
    out = spin_kernels.sequence_logprobs(hidden, weight, targets, sequence_ids, 7, backend=backend)
    assert out.shape == (7,) and out[6] == 0
    (out.double() * upstream).sum().backward()

    truth_hidden, truth_weight = (leaf.detach().double().requires_grad_() for leaf in (hidden, weight))
    token = truth_token_logprobs(truth_hidden, truth_weight, targets)
    truth = torch.stack([token[sequence_ids == s].sum() for s in range(7)])
    (truth * upstream).sum().backward()
    assert_close(out, truth, output_dtype(dtype), f"{backend} sequence log-probs")
    assert_close(hidden.grad, truth_hidden.grad, dtype, f"{backend} dhidden")
    assert_close(weight.grad, truth_weight.grad, dtype, f"{backend} dweight")


def test_sequence_logprobs_errors_name_the_argument():
    hidden, targets, sequence_ids = random_packed_batch(2, 8, 30, torch.float32)
    weight = torch.randn(30, 8)
    with pytest.raises(ValueError, match=r"sequence_ids\[\d+\] = 3 is outside \[0, 3\)"):
        spin_kernels.sequence_logprobs(hidden, weight, targets, sequence_ids, 3)
    for bad in (0, 2.0, True):
        with pytest.raises(ValueError, match="n_sequences must be an int >= 1"):
            spin_kernels.sequence_logprobs(hidden, weight, targets, sequence_ids, bad)
    assert torch.equal(spin_kernels.sequence_logprobs(hidden, weight, targets, sequence_ids, np.int64(4)),
                       spin_kernels.sequence_logprobs(hidden, weight, targets, sequence_ids, 4))  # a NumPy count
    with pytest.raises(ValueError, match="sequence_ids must have one entry per token"):
        spin_kernels.sequence_logprobs(hidden, weight, targets, sequence_ids[:-1], 4)


@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_row_strided_views_match_float64_truth(backend):
    """hidden and weight as column slices of wider tensors (row stride > H, column stride 1: used as they are, not
    copied): the gradients land in [N, H] and [V, H] buffers of their own, whose row stride is H."""
    hidden, weight, bias, targets = make_inputs(45, 40, 300, torch.float32)
    wide_hidden = torch.cat([hidden.detach(), torch.randn(45, 9)], 1)
    wide_weight = torch.cat([weight.detach(), torch.randn(300, 5)], 1)
    hidden_view = wide_hidden.requires_grad_()[:, :40]
    weight_view = wide_weight.requires_grad_()[:, :40]
    assert hidden_view.stride() == (49, 1) and weight_view.stride() == (45, 1)
    upstream = torch.randn(45, dtype=torch.float64)
    out = spin_kernels.linear_logprobs(hidden_view, weight_view, targets, bias=bias, backend=backend)
    (out.double() * upstream).sum().backward()
    truth_hidden, truth_weight = (leaf.detach().double().requires_grad_() for leaf in (hidden, weight))
    truth = truth_token_logprobs(truth_hidden, truth_weight, targets, bias.detach().double())
    (truth * upstream).sum().backward()
    assert_close(out, truth, torch.float32, f"{backend} logprobs")
    assert_close(wide_hidden.grad[:, :40], truth_hidden.grad, torch.float32, f"{backend} dhidden")
    assert_close(wide_weight.grad[:, :40], truth_weight.grad, torch.float32, f"{backend} dweight")
    assert (wide_hidden.grad[:, 40:] == 0).all() and (wide_weight.grad[:, 40:] == 0).all()

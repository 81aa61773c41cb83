"""spin_loss and fused_linear_spin_loss against the paper's formula computed in float64."""

import pytest
import torch

import spin_kernels
from helpers import (
    assert_close,
    check_fused_against_truth,
    random_packed_batch,
    truth_pair_losses,
    truth_spin_loss,
    truth_token_logprobs,
)
from spin_kernels import chunked

LOSS_TYPES = ["sigmoid", "hinge", "ipo"]

# The torch backend alone chunks (chunked.CHUNK_BYTES): pairs longer than a chunk (9 tokens) take its recomputing
# path, whole pairs in a chunk (1000) its one-pass path.
BACKEND_CHUNKS = [("torch", 9), ("torch", 1000), ("triton", None), ("reference", None)]



@pytest.mark.parametrize("loss_type", LOSS_TYPES)
@pytest.mark.parametrize("n_pairs", [1, 7])
def test_spin_loss_formula_and_metrics(loss_type, n_pairs):
    logps = [(torch.randn(n_pairs, dtype=torch.float64) * 20 - 60).requires_grad_() for _ in range(4)]
    beta = float(torch.empty(()).uniform_(0.05, 0.5))
    out = spin_kernels.spin_loss(*logps, beta=beta, loss_type=loss_type)
    expected = truth_spin_loss(*[x.tolist() for x in logps], beta, loss_type)
    assert out.loss.item() == pytest.approx(expected, rel=1e-12, abs=1e-12)
    real, generated = beta * (logps[0] - logps[2]), beta * (logps[1] - logps[3])
    assert torch.allclose(out.rewards_real, real) and torch.allclose(out.rewards_generated, generated)
    assert torch.allclose(out.margins, real - generated)
    assert torch.equal(out.accuracy, (real > generated).double())
    assert not out.margins.requires_grad
    # Gradient: d loss / d policy_real = beta * l'(z) / P, l' written out by hand.
    out.loss.backward()
    z = beta * ((logps[0] - logps[2]) - (logps[1] - logps[3])).detach()
    dl_dz = {"sigmoid": -torch.sigmoid(-z), "hinge": -(z < 1).double(),
             "ipo": 2 * (z / beta - 1 / (2 * beta)) / beta}[loss_type]
    assert torch.allclose(logps[0].grad, beta * dl_dz / n_pairs)
    assert torch.allclose(logps[1].grad, -beta * dl_dz / n_pairs)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=str)
def test_half_precision_log_probs_are_computed_in_float32(dtype):
    """Log-probs given in fp16 or bf16 (a half-precision model's sums): loss and metrics in fp32, as float64 computes
    them from the same rounded values, not rounded again to the inputs' 3 or 4 digits at every step."""
    logps = [(torch.randn(7, dtype=torch.float64) * 20 - 60).to(dtype) for _ in range(4)]
    out = spin_kernels.spin_loss(*logps, beta=0.1)
    exact = [x.double() for x in logps]
    assert all(value.dtype == torch.float32 for value in out)
    assert out.loss.item() == pytest.approx(truth_spin_loss(*[x.tolist() for x in exact], 0.1, "sigmoid"), rel=1e-6)
    assert torch.allclose(out.rewards_real.double(), 0.1 * (exact[0] - exact[2]), rtol=1e-6, atol=1e-6)
    assert torch.allclose(out.rewards_generated.double(), 0.1 * (exact[1] - exact[3]), rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("loss_type", LOSS_TYPES)
def test_spin_loss_reductions(loss_type):
    """reduction="none" gives each pair's loss, and its gradient each pair's weight; "sum" their sum."""
    n_pairs, beta = 7, 0.3
    logps = [(torch.randn(n_pairs, dtype=torch.float64) * 20 - 60).requires_grad_() for _ in range(4)]
    expected = torch.tensor(truth_pair_losses(*[x.tolist() for x in logps], beta, loss_type), dtype=torch.float64)
    each = spin_kernels.spin_loss(*logps, beta=beta, loss_type=loss_type, reduction="none")
    total = spin_kernels.spin_loss(*logps, beta=beta, loss_type=loss_type, reduction="sum")
    torch.testing.assert_close(each.loss, expected, rtol=1e-12, atol=1e-12)
    assert total.loss.item() == pytest.approx(float(expected.sum()), rel=1e-12, abs=1e-12)
    weights = torch.rand(n_pairs, dtype=torch.float64)
    (each.loss * weights).sum().backward()
    z = beta * ((logps[0] - logps[2]) - (logps[1] - logps[3])).detach()
    dl_dz = {"sigmoid": -torch.sigmoid(-z), "hinge": -(z < 1).double(),
             "ipo": 2 * (z / beta - 1 / (2 * beta)) / beta}[loss_type]
    torch.testing.assert_close(logps[0].grad, beta * dl_dz * weights, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(logps[3].grad, beta * dl_dz * weights, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("backend, chunk_tokens", BACKEND_CHUNKS)
@pytest.mark.parametrize("reduction", ["sum", "none"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_fused_loss_reductions_match_float64_truth(backend, chunk_tokens, reduction, dtype, monkeypatch):
    """The pairs' summed loss, and each pair's loss weighted at random before the backward, on every path: the
    torch backend's one-pass path (whole pairs in a chunk) holds the mean's gradient from its forward."""
    if chunk_tokens is not None:
        monkeypatch.setattr(chunked, "CHUNK_BYTES", chunk_tokens * 611 * 4)
    check_fused_against_truth(backend, dtype, "sigmoid", n_pairs=5, nll_weight=0.01, reduction=reduction)


@pytest.mark.parametrize("backend, chunk_tokens", BACKEND_CHUNKS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_length_normalized_log_probs_match_float64_truth(backend, chunk_tokens, dtype, monkeypatch):
    """Each sequence's mean log-prob over its tokens, in the loss, the log-probs returned (an NLL term on them) and
    the opponent's gradient, on the torch backend's one-pass and recomputing paths too."""
    if chunk_tokens is not None:
        monkeypatch.setattr(chunked, "CHUNK_BYTES", chunk_tokens * 611 * 4)
    check_fused_against_truth(backend, dtype, "sigmoid", n_pairs=5, nll_weight=0.01, opponent_grad=True,
                              length_normalize=True)


def test_simpo_through_length_normalized_log_probs():
    """SimPO (Meng et al. 2024), -log sigmoid(beta / |y_w| log p(y_w) - beta / |y_l| log p(y_l) - gamma), is the
    sigmoid loss on mean log-probs with opponent log-probs 0 (real) and -gamma / beta (generated), as the README
    writes it; computed here from full float64 logits, one sequence at a time."""
    n_pairs, vocab, hidden_size, beta, gamma = 4, 97, 16, 2.0, 0.5
    hidden, targets, sequence_ids = random_packed_batch(n_pairs, hidden_size, vocab, torch.float64)
    weight = torch.randn(vocab, hidden_size, dtype=torch.float64, requires_grad=True)
    opponent = torch.cat([torch.zeros(n_pairs), torch.full((n_pairs,), -gamma / beta)]).double()
    out = spin_kernels.fused_linear_spin_loss(hidden, weight, targets, sequence_ids, opponent, beta=beta,
                                              length_normalize=True, backend="torch")
    (dweight,) = torch.autograd.grad(out.loss, weight)

    def mean_logp(sequence: int) -> torch.Tensor:
        tokens = (sequence_ids == sequence) & (targets != -100)
        logps = (hidden[tokens] @ weight.T).log_softmax(-1).gather(1, targets[tokens][:, None])
        return logps.sum() / tokens.sum()

    simpo = torch.stack([-torch.nn.functional.logsigmoid(beta * mean_logp(i) - beta * mean_logp(n_pairs + i) - gamma)
                         for i in range(n_pairs)]).mean()
    (truth_dweight,) = torch.autograd.grad(simpo, weight)
    torch.testing.assert_close(out.loss, simpo.detach(), rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(dweight, truth_dweight, rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("loss_type", ["hinge", "ipo"])
def test_fused_loss_per_pair_for_every_loss_type(loss_type):
    check_fused_against_truth("torch", torch.float32, loss_type, n_pairs=4, reduction="none", opponent_grad=True)


@pytest.mark.parametrize("n_pairs", [1, 7])
def test_label_smoothing_is_cdpo(n_pairs):
    """cDPO (Mitchell 2023): each pair's preference flipped with probability e; its gradient written out by hand."""
    logps = [(torch.randn(n_pairs, dtype=torch.float64) * 20 - 60).requires_grad_() for _ in range(4)]
    beta, smoothing = float(torch.empty(()).uniform_(0.05, 0.5)), 0.2
    out = spin_kernels.spin_loss(*logps, beta=beta, label_smoothing=smoothing)
    expected = truth_spin_loss(*[x.tolist() for x in logps], beta, "sigmoid", smoothing)
    assert out.loss.item() == pytest.approx(expected, rel=1e-12, abs=1e-12)
    out.loss.backward()
    z = beta * ((logps[0] - logps[2]) - (logps[1] - logps[3])).detach()
    dl_dz = -(1 - smoothing) * torch.sigmoid(-z) + smoothing * torch.sigmoid(z)
    assert torch.allclose(logps[0].grad, beta * dl_dz / n_pairs, rtol=1e-12, atol=0)
    plain = spin_kernels.spin_loss(*logps, beta=beta, label_smoothing=0.0).loss
    assert plain.item() == pytest.approx(truth_spin_loss(*[x.tolist() for x in logps], beta, "sigmoid"), rel=1e-12)


@pytest.mark.parametrize("backend", ["torch", "triton", "reference"])
def test_fused_loss_with_label_smoothing_matches_float64_truth(backend):
    check_fused_against_truth(backend, torch.float32, "sigmoid", n_pairs=5, nll_weight=0.01, label_smoothing=0.1)


@pytest.mark.parametrize("value, loss_type, message", [
    (0.5, "sigmoid", r"label_smoothing must be a number in \[0, 0.5\), got 0.5"),
    (-0.1, "sigmoid", r"label_smoothing must be a number in \[0, 0.5\), got -0.1"),
    (True, "sigmoid", r"label_smoothing must be a number in \[0, 0.5\), got True"),
    (0.1, "hinge", r"label_smoothing is the sigmoid loss's \(cDPO\), got loss_type='hinge'"),
])
def test_label_smoothing_errors(value, loss_type, message):
    logps = torch.zeros(4)
    with pytest.raises(ValueError, match=message):
        spin_kernels.spin_loss(*logps[:, None], loss_type=loss_type, label_smoothing=value)
    with pytest.raises(ValueError, match=message):
        spin_kernels.FusedLinearSPINLoss(loss_type=loss_type, label_smoothing=value)


def test_spin_loss_is_dpo_loss():
    """With chosen = real and rejected = generated, SPIN's sigmoid loss is DPO's -logsigmoid(beta*h)."""
    pr, pg, orl, og = (torch.randn(5) * 10 for _ in range(4))
    dpo = -torch.nn.functional.logsigmoid(0.1 * ((pr - pg) - (orl - og))).mean()
    assert torch.allclose(spin_kernels.spin_loss(pr, pg, orl, og).loss, dpo)


@pytest.mark.parametrize("backend", ["torch", "triton", "reference"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16], ids=str)
@pytest.mark.parametrize("loss_type", LOSS_TYPES)
@pytest.mark.parametrize("n_pairs", [1, 5])
def test_fused_loss_matches_float64_truth(backend, dtype, loss_type, n_pairs):
    check_fused_against_truth(backend, dtype, loss_type, n_pairs)


@pytest.mark.parametrize("chunk_tokens", [9, 40, 100])
@pytest.mark.parametrize("loss_type", LOSS_TYPES)
def test_torch_backend_pair_chunking(chunk_tokens, loss_type, monkeypatch):
    """Pairs grouped into chunks, and pairs longer than a chunk (two-pass path), give the truth."""
    monkeypatch.setattr(chunked, "CHUNK_BYTES", chunk_tokens * 611 * 4)
    check_fused_against_truth("torch", torch.float32, loss_type, n_pairs=6)


@pytest.mark.parametrize("nll_weight", [0.0, 0.01])
def test_torch_backend_holds_one_logits_block_with_pairs_longer_than_a_chunk(nll_weight, monkeypatch):
    """README: the torch backend holds one [chunk x V] block of logits at a time. Pairs longer than a chunk (the
    usual case at a large vocabulary: 64 MiB holds 130 tokens at V=128256) must not add a second block beside the
    forward's own, and must still give the truth."""
    import weakref

    monkeypatch.setattr(chunked, "CHUNK_BYTES", 9 * 611 * 4)  # 9 tokens per chunk: most pairs are longer
    alive, most = [], [0]
    make_buffer = chunked.Head.buffer

    def counted_buffer(self, n_rows):
        block = make_buffer(self, n_rows)
        alive[:] = [ref for ref in alive if ref() is not None] + [weakref.ref(block)]
        most[0] = max(most[0], len(alive))
        return block

    monkeypatch.setattr(chunked.Head, "buffer", counted_buffer)
    check_fused_against_truth("torch", torch.float32, "sigmoid", n_pairs=5, nll_weight=nll_weight)
    assert most[0] == 1, f"{most[0]} [chunk x V] logits blocks alive at once"


@pytest.mark.parametrize("backend, chunk_tokens", BACKEND_CHUNKS)
@pytest.mark.parametrize("nll_weight", [0.0, 0.01])
def test_hidden_index_shares_rows(backend, chunk_tokens, nll_weight, monkeypatch):
    """Tokens that read one hidden row through hidden_index (a prompt shared by both responses of a pair):
    the row's gradient sums theirs, on the one-pass and the recomputing torch paths."""
    if chunk_tokens is not None:
        monkeypatch.setattr(chunked, "CHUNK_BYTES", chunk_tokens * 611 * 4)
    check_fused_against_truth(backend, torch.float32, "sigmoid", n_pairs=4, nll_weight=nll_weight, shared_rows=True)


@pytest.mark.parametrize("chunk_tokens", [9, 40])
def test_ignored_tokens_may_carry_any_sequence_id(chunk_tokens, monkeypatch):
    """Prompt tokens (ignored) tagged with some sequence's id, not -1: the torch backend cuts its pair chunks by loss
    tokens alone, so loss, log-probs and gradients are the reference backend's on the batch with -1 (float64)."""
    monkeypatch.setattr(chunked, "CHUNK_BYTES", chunk_tokens * 611 * 8)
    hidden, targets, sequence_ids = random_packed_batch(4, 24, 611, torch.float64)
    weight = torch.randn(611, 24, dtype=torch.float64) / 24**0.5
    tagged = torch.where(targets == -100, torch.randint(0, 8, targets.shape), sequence_ids)
    with torch.no_grad():  # opponent log-probs near the policy's: the loss in its interesting range
        policy = spin_kernels.sequence_logprobs(hidden, weight, targets, sequence_ids, 8, backend="reference")
    opponent = policy + torch.randn(8, dtype=torch.float64) * 3
    results = []
    for backend, ids in (("torch", tagged), ("reference", sequence_ids)):
        leaves = [t.clone().requires_grad_() for t in (hidden, weight)]
        out = spin_kernels.fused_linear_spin_loss(*leaves, targets, ids, opponent, backend=backend)
        out.loss.backward()
        results.append((out.loss, out.policy_logps, *(leaf.grad for leaf in leaves)))
    for name, got, want in zip(("loss", "policy_logps", "dhidden", "dweight"), *results):
        assert_close(got, want, torch.float64, name)


@pytest.mark.parametrize("backend, chunk_tokens", BACKEND_CHUNKS[:3])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_gradient_through_policy_logps(backend, chunk_tokens, dtype, monkeypatch):
    """An extra term on the sequence log-probs (an NLL term, say) gets its gradient too (in bf16, added to the
    loss's gradient that the torch backend holds in bf16 from its forward)."""
    if chunk_tokens is not None:
        monkeypatch.setattr(chunked, "CHUNK_BYTES", chunk_tokens * 611 * 4)
    check_fused_against_truth(backend, dtype, "sigmoid", n_pairs=4, nll_weight=0.01)


@pytest.mark.parametrize("backend", ["torch", "triton", "reference"])
@pytest.mark.parametrize("loss_type", LOSS_TYPES)
def test_opponent_logps_that_require_grad_get_it(backend, loss_type):
    check_fused_against_truth(backend, torch.float32, loss_type, n_pairs=3, opponent_grad=True)


@pytest.mark.parametrize("backend", ["torch", "reference"])
def test_fp16_gradients_survive_a_loss_scale(backend):
    """GradScaler multiplies fp16 losses by 2**16 so that small gradients do not flush to zero: the torch backend,
    which holds its gradients from the forward to the backward, must not round them to fp16 before that scale."""
    n_tokens, hidden_size, vocab, n_pairs, scale = 512, 32, 8000, 32, 2.0**16
    hidden = torch.randn(n_tokens, hidden_size).half()
    weight = (torch.randn(vocab, hidden_size) * 0.02).half()
    targets = torch.randint(0, vocab, (n_tokens,))
    sequence_ids = torch.arange(2 * n_pairs).repeat_interleave(n_tokens // (2 * n_pairs))
    opponent = -torch.rand(2 * n_pairs) * 10
    hidden64, weight64 = hidden.double().requires_grad_(), weight.double().requires_grad_()
    token_logps = (hidden64 @ weight64.T).log_softmax(-1).gather(1, targets[:, None])[:, 0]
    policy = torch.zeros(2 * n_pairs, dtype=torch.float64).index_add(0, sequence_ids, token_logps)
    spin_kernels.spin_loss(policy[:n_pairs], policy[n_pairs:], opponent[:n_pairs], opponent[n_pairs:],
                           beta=0.1).loss.backward()
    hidden, weight = hidden.requires_grad_(), weight.requires_grad_()
    out = spin_kernels.fused_linear_spin_loss(hidden, weight, targets, sequence_ids, opponent, beta=0.1,
                                              backend=backend)
    (out.loss * scale).backward()
    for got, truth in ((hidden.grad.double() / scale, hidden64.grad), (weight.grad.double() / scale, weight64.grad)):
        assert ((got - truth).norm() / truth.norm()).item() < 4e-4  # fp16's own rounding: ~2e-4
        # Rounded to fp16 before the scale, 0.6% were flushed to 0 (those under 2**-24 / scale). After it, only a
        # gradient whose scaled value fp16 (its smallest subnormal: 2**-24) or the fp32 sums behind it (terms up to
        # ~100 that cancel: ~1e-5) cannot tell from 0 may be 0; 1e-4 still holds 5 or more of those the old rounding
        # flushed, in each of 30 draws (both backends, both gradients).
        representable = (truth * scale).abs() >= 1e-4
        assert not ((got == 0) & representable).any()


@pytest.mark.parametrize("backend", ["torch", "reference"])  # float64; triton's backward keeps no state
def test_a_retained_graph_gives_the_same_gradients_twice(backend):
    """The torch backend keeps the gradients it computed in the forward: a second backward through a retained
    graph (a term's own gradient taken first, say, to log its norm) must find them as they were."""
    hidden, targets, sequence_ids = random_packed_batch(3, 32, 100, torch.float64)
    leaves = [hidden.requires_grad_(), (torch.randn(100, 32, dtype=torch.float64) / 6).requires_grad_()]
    opponent = -torch.rand(6, dtype=torch.float64) * 9
    out = spin_kernels.fused_linear_spin_loss(*leaves, targets, sequence_ids, opponent, backend=backend)
    nll = -out.policy_logps.sum()
    first = torch.autograd.grad(nll, leaves, retain_graph=True)
    both = torch.autograd.grad(out.loss + nll, leaves, retain_graph=True)
    twice = torch.autograd.grad(2 * out.loss, leaves)
    loss_only = [b - f for b, f in zip(both, first)]
    for got, doubled in zip(loss_only, twice):
        torch.testing.assert_close(2 * got, doubled, rtol=1e-10, atol=1e-12)
    assert all(bool(g.abs().max() > 0) for g in loss_only)


@pytest.mark.parametrize("backend", ["torch", "triton", "reference"])
def test_autocast_leaves_the_kernels_in_their_inputs_dtype(backend):
    """Under torch.autocast (bf16) float32 inputs stay float32: the result and the gradients keep fp32
    accuracy (an autocast matmul inside would round them to bf16's 3 digits)."""
    check_fused_against_truth(backend, torch.float32, "sigmoid", n_pairs=3, autocast=True)
    hidden, targets, _ = random_packed_batch(3, 32, 100, torch.float32)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        logps = spin_kernels.linear_logprobs(hidden, torch.randn(100, 32), targets, backend=backend)
    assert logps.dtype == torch.float32


@pytest.mark.parametrize("reduction", ["mean", "none"])
@pytest.mark.parametrize("backend", ["torch", "triton", "reference"])
def test_no_grad_and_inference_mode_give_the_same_values(backend, reduction):
    """Outside grad mode no gradient is computed, the opponent's included: under inference mode the torch backend's
    one-pass path asked autograd for it and failed (a learnable opponent, as a SimPO margin, evaluated)."""
    hidden, targets, sequence_ids = random_packed_batch(3, 32, 100, torch.float32)
    weight = torch.randn(100, 32, requires_grad=True)
    opponent = (torch.randn(6) - 40).requires_grad_()
    args = (hidden, weight, targets, sequence_ids, opponent)
    with_grad = spin_kernels.fused_linear_spin_loss(*args, backend=backend, reduction=reduction)
    for mode in (torch.no_grad, torch.inference_mode):
        with mode():
            without = spin_kernels.fused_linear_spin_loss(*args, backend=backend, reduction=reduction)
        assert not without.loss.requires_grad
        for a, b in zip(with_grad, without):
            assert torch.allclose(a, b)


def test_module_wrapper_matches_function():
    hidden, targets, sequence_ids = random_packed_batch(3, 32, 100, torch.float32)
    weight = torch.randn(100, 32)
    opponent = torch.randn(6) - 40
    module = spin_kernels.FusedLinearSPINLoss(beta=0.2, loss_type="hinge", backend="torch", reduction="none")
    a = module(hidden, weight, targets, sequence_ids, opponent)
    b = spin_kernels.fused_linear_spin_loss(
        hidden, weight, targets, sequence_ids, opponent, beta=0.2, loss_type="hinge", backend="torch",
        reduction="none",
    )
    for x, y in zip(a, b):
        assert torch.equal(x, y)
    assert a.loss.shape == (3,)
    assert "loss_type='hinge'" in repr(module) and "reduction='none'" in repr(module)


def test_pair_with_no_loss_tokens_counts_zero():
    """A sequence whose tokens are all ignored has log-prob 0 and does not break the loss."""
    hidden = torch.randn(6, 16)
    weight = torch.randn(50, 16)
    targets = torch.tensor([3, 4, -100, -100, 7, 8])
    sequence_ids = torch.tensor([0, 0, 1, 1, 2, 2])  # pairs: (0, 2) and (1, 3); sequence 3 has no tokens
    opponent = torch.randn(4)
    out = spin_kernels.fused_linear_spin_loss(hidden, weight, targets, sequence_ids, opponent)
    assert out.policy_logps[1] == 0 and out.policy_logps[3] == 0
    token = truth_token_logprobs(hidden, weight, targets)
    logps = torch.zeros(4, dtype=torch.float64).index_add(0, sequence_ids, token)
    torch.testing.assert_close(out.policy_logps.double(), logps, rtol=1e-5, atol=1e-5)
    want = truth_spin_loss(logps[:2].tolist(), logps[2:].tolist(), opponent[:2].tolist(), opponent[2:].tolist(),
                           0.1, "sigmoid")
    assert out.loss.item() == pytest.approx(want, rel=1e-5)


@pytest.mark.parametrize("ignore_index", [-1, 0])
@pytest.mark.parametrize("backend", ["torch", "triton", "reference"])
def test_another_ignore_index_masks_its_own_tokens(backend, ignore_index):
    """ignore_index other than -100 (0: a tokenizer's pad id) masks exactly its tokens, in every kernel's log-probs,
    sums and gradients; -100 is then a token no more, and appears nowhere."""
    n_pairs, vocab, hidden_size = 3, 50, 24
    hidden, targets, sequence_ids = random_packed_batch(n_pairs, hidden_size, vocab, torch.float32)
    targets = torch.where(targets == -100, ignore_index, targets.clamp_min(1))  # no target is the ignored id
    weight = torch.randn(vocab, hidden_size, dtype=torch.float64).float() / hidden_size**0.5
    bias = 0.1 * torch.randn(vocab)
    opponent = torch.randn(2 * n_pairs) - 40
    hidden.requires_grad_()
    args = {"bias": bias, "ignore_index": ignore_index, "backend": backend}

    token = spin_kernels.linear_logprobs(hidden, weight, targets, **args)
    sums = spin_kernels.sequence_logprobs(hidden, weight, targets, sequence_ids, 2 * n_pairs, **args)
    out = spin_kernels.fused_linear_spin_loss(hidden, weight, targets, sequence_ids, opponent, **args)
    (dhidden,) = torch.autograd.grad(out.loss + token.sum() + sums.sum(), hidden)

    truth_hidden = hidden.detach().double().requires_grad_()
    truth_token = truth_token_logprobs(truth_hidden, weight, targets, bias, ignore_index=ignore_index)
    truth_sums = torch.stack([truth_token[(sequence_ids == s) & (targets != ignore_index)].sum()
                              for s in range(2 * n_pairs)])
    truth_loss = spin_kernels.spin_loss(truth_sums[:n_pairs], truth_sums[n_pairs:], opponent[:n_pairs].double(),
                                        opponent[n_pairs:].double()).loss
    (truth_dhidden,) = torch.autograd.grad(truth_loss + truth_token.sum() + truth_sums.sum(), truth_hidden)
    assert (token[targets == ignore_index] == 0).all() and (targets == ignore_index).sum() > n_pairs
    torch.testing.assert_close(token.double(), truth_token.detach(), rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(sums.double(), truth_sums.detach(), rtol=1e-5, atol=1e-4)
    torch.testing.assert_close(out.policy_logps.double(), truth_sums.detach(), rtol=1e-5, atol=1e-4)
    torch.testing.assert_close(out.loss.double(), truth_loss.detach(), rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(dhidden.double(), truth_dhidden, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_backward_frees_the_gradients_held_from_the_forward(dtype):
    """The torch backend holds dhidden and dweight from the forward until the backward: once a backward without
    retain_graph has run they must go, though the output (its metrics, to log) stays referenced. Held past it, a
    loop `out = loss(...); out.loss.backward()` keeps the last step's [V, H] and [N, H] sums alive through the next
    step's forward: twice that memory at its peak."""
    import gc

    hidden, targets, sequence_ids = random_packed_batch(3, 13, 101, dtype)
    weight = (torch.randn(101, 13) / 4).to(dtype).requires_grad_()
    hidden.requires_grad_()
    out = spin_kernels.fused_linear_spin_loss(hidden, weight, targets, sequence_ids, -torch.rand(6) * 9,
                                              backend="torch")
    out.loss.backward()
    gc.collect()
    own = {id(t) for t in (hidden, hidden.grad, weight, weight.grad)}
    held = [tuple(o.shape) for o in gc.get_objects() if issubclass(type(o), torch.Tensor) and id(o) not in own
            and tuple(o.shape) in (tuple(hidden.shape), tuple(weight.shape))]
    assert held == [], f"tensors {held} still alive after the backward"
    assert out.margins.shape == (3,)  # the output is still referenced


@pytest.mark.parametrize("backend, chunk_tokens", BACKEND_CHUNKS)
def test_a_pair_whose_opponent_log_probs_are_both_minus_inf_is_refused_by_its_index(backend, chunk_tokens,
                                                                                   monkeypatch):
    """An opponent (DPO's reference) that gives both sequences of a pair probability 0 leaves the pair's log-ratio
    difference undefined (inf - inf): the loss, and every gradient with it, would be NaN. The call refuses it,
    naming the pair, as it does a NaN. One -inf alone is a limit (z = +-inf), and the loss is the float64 truth's."""
    if chunk_tokens is not None:
        monkeypatch.setattr(chunked, "CHUNK_BYTES", chunk_tokens * 50 * 4)
    n_pairs, inf = 3, float("inf")
    hidden, targets, sequence_ids = random_packed_batch(n_pairs, 16, 50, torch.float32)
    weight = torch.randn(50, 16)
    opponent = -torch.rand(2 * n_pairs) * 50
    for pair, real, generated in [(1, -inf, -inf), (2, -3.0, float("nan")), (0, inf, inf)]:
        bad = opponent.clone()
        bad[pair], bad[n_pairs + pair] = real, generated
        with pytest.raises(ValueError, match=rf"pair {pair}: opponent_logps\[{pair}\] = {real} and "
                                             rf"opponent_logps\[{n_pairs + pair}\] = {generated} \(its real and "
                                             r"generated response\) leave its loss undefined"):
            spin_kernels.fused_linear_spin_loss(hidden, weight, targets, sequence_ids, bad, backend=backend)
    one = opponent.clone()
    one[0], one[n_pairs + 2] = -inf, -inf  # pair 0: z = +inf, loss 0; pair 2: z = -inf, loss inf
    out = spin_kernels.fused_linear_spin_loss(hidden, weight, targets, sequence_ids, one, reduction="none",
                                              backend=backend)
    token = truth_token_logprobs(hidden, weight, targets)
    seq = torch.zeros(2 * n_pairs, dtype=torch.float64).index_add(0, torch.where(targets != -100, sequence_ids, 0),
                                                                   token)
    opp = one.double()
    z = 0.1 * ((seq[:n_pairs] - opp[:n_pairs]) - (seq[n_pairs:] - opp[n_pairs:]))
    torch.testing.assert_close(out.loss.double(), torch.nn.functional.softplus(-z), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("loss_type", LOSS_TYPES)
def test_spin_loss_refuses_a_pair_whose_opponent_log_probs_are_both_minus_inf_as_the_fused_loss_does(loss_type):
    """The four-vector entry takes the same pairs as fused_linear_spin_loss: a pair whose opponent log-probs are
    both -inf (or both inf, or one NaN) has no defined loss, refused by its index, not a silent NaN loss. One -inf
    alone is the loss's limit, as the float64 truth computes it."""
    inf, nan = float("inf"), float("nan")
    policy_real, policy_generated = torch.tensor([-5.0, -6.0, -7.0]), torch.tensor([-8.0, -4.0, -9.0])
    opponent = torch.tensor([-5.5, -6.5, -7.5, -8.5, -4.5, -9.5], dtype=torch.float64)
    for pair, real, generated in [(1, -inf, -inf), (2, -3.0, nan), (0, inf, inf)]:
        bad = opponent.clone()
        bad[pair], bad[3 + pair] = real, generated
        with pytest.raises(ValueError, match=rf"pair {pair}: opponent_real_logps\[{pair}\] = {real} and "
                                             rf"opponent_generated_logps\[{pair}\] = {generated} \(its real and "
                                             r"generated response\) leave its loss undefined"):
            spin_kernels.spin_loss(policy_real, policy_generated, bad[:3], bad[3:], loss_type=loss_type)
    one = opponent.clone()
    one[0], one[3 + 2] = -inf, -inf  # pair 0: z = +inf; pair 2: z = -inf
    policy = torch.cat([policy_real, policy_generated]).double().requires_grad_()
    out = spin_kernels.spin_loss(policy[:3], policy[3:], one[:3], one[3:], loss_type=loss_type, reduction="none")
    out.loss.sum().backward()
    # The README's word: the limit's gradients are finite for sigmoid and hinge, NaN for IPO's square.
    assert policy.grad.isfinite().all() == (loss_type != "ipo"), policy.grad
    # Pair 1 is finite (the float64 truth's); pairs 0 and 2 take the loss's limits at z = +inf and -inf.
    (finite,) = truth_pair_losses(policy_real[1:2].tolist(), policy_generated[1:2].tolist(), one[1:2].tolist(),
                                  one[4:5].tolist(), 0.1, loss_type)
    limit_high = inf if loss_type == "ipo" else 0.0
    assert out.loss.tolist() == pytest.approx([limit_high, finite, inf], rel=1e-12)


def test_spin_loss_traces_whole_under_torch_compile():
    """spin_loss's check of the opponent's pairs reads the device: left out where torch.compile traces the call, so
    a DPO loss built on it compiles with fullgraph=True (a read there is an error), and gives its eager value."""
    policy_real, policy_generated = torch.tensor([-5.0, -6.0]), torch.tensor([-8.0, -4.0])
    opponent_real, opponent_generated = torch.tensor([-5.5, -6.5]), torch.tensor([-8.5, -4.5])
    compiled = torch.compile(lambda *logps: spin_kernels.spin_loss(*logps).loss, backend="eager", fullgraph=True)
    logps = (policy_real, policy_generated, opponent_real, opponent_generated)
    assert torch.equal(compiled(*logps), spin_kernels.spin_loss(*logps).loss)


@pytest.mark.parametrize("loss_type", LOSS_TYPES)
def test_a_tie_is_not_counted_accurate(loss_type):
    """accuracy is 1 where rewards_real > rewards_generated, strictly (TRL's): at a SPIN iteration's first step the
    policy is the opponent, every reward is 0, and the accuracy logged must be 0, not 1."""
    policy = torch.randn(6, dtype=torch.float64) * 20 - 60
    tied = spin_kernels.spin_loss(policy[:3], policy[3:], policy[:3].clone(), policy[3:].clone(), loss_type=loss_type)
    assert torch.equal(tied.rewards_real, tied.rewards_generated)
    assert torch.equal(tied.accuracy, torch.zeros(3, dtype=torch.float64))


@pytest.mark.parametrize("backend", ["torch", "triton", "reference"])
def test_length_normalized_pair_with_no_loss_tokens_counts_zero(backend):
    """length_normalize with a sequence whose tokens are all ignored: its mean log-prob is 0 (not 0 / 0), and the
    loss and gradients are the float64 truth's, the empty sequence counting 0."""
    hidden = torch.randn(7, 16, dtype=torch.float64).float().requires_grad_()
    weight = torch.randn(50, 16, dtype=torch.float64).float()
    targets = torch.tensor([3, 4, 9, -100, -100, 7, 8])
    sequence_ids = torch.tensor([0, 0, 0, 1, 1, 2, 2])  # pairs (0, 2) and (1, 3); sequence 3 has no tokens
    opponent = torch.randn(4, dtype=torch.float64).float()
    out = spin_kernels.fused_linear_spin_loss(hidden, weight, targets, sequence_ids, opponent, length_normalize=True,
                                              backend=backend)
    out.loss.backward()
    truth_hidden = hidden.detach().double().requires_grad_()
    token = truth_token_logprobs(truth_hidden, weight.double(), targets)
    logps = torch.stack([token[:3].sum() / 3, torch.zeros((), dtype=torch.float64), token[5:].sum() / 2,
                         torch.zeros((), dtype=torch.float64)])
    z = 0.1 * ((logps[:2] - opponent[:2].double()) - (logps[2:] - opponent[2:].double()))
    loss = -torch.nn.functional.logsigmoid(z).mean()
    loss.backward()
    assert out.policy_logps[1] == 0 and out.policy_logps[3] == 0
    assert_close(out.policy_logps, logps.detach(), torch.float32, "policy_logps")
    assert_close(out.loss, loss.detach(), torch.float32, "loss")
    assert_close(hidden.grad, truth_hidden.grad, torch.float32, "dhidden")

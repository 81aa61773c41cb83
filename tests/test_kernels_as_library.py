"""spin_kernels as an outside user's DPO code would call it (README's padded recipe, TRL's DPOTrainer conventions):
a tiny real Llama's body, its LM head (tied or not), a frozen reference model, prompt and padding labels -100. The
loss and every parameter's gradient against plain PyTorch DPO on full logits in float64; SimPO and IPO on token means
through README's length_normalize recipes likewise."""

import copy

import pytest
import torch
import torch.nn.functional as F

import spin_kernels


def tiny_llamas(tied: bool):
    """A policy and a reference a little away from it."""
    from transformers import LlamaForCausalLM

    from spin_fast.model import tiny_config

    config = tiny_config("llama", vocab_size=97, hidden_size=32, layers=1, heads=1, tie_word_embeddings=tied)
    policy = LlamaForCausalLM(config)
    reference = copy.deepcopy(policy)
    with torch.no_grad():
        for p in reference.parameters():
            p.add_(torch.randn_like(p) * 0.05)
    return policy, reference


def dpo_batch(n_pairs: int, length: int, vocab: int):
    """TRL's layout: n_pairs chosen rows, then their rejected rows; prompt and right padding carry label -100."""
    ids = torch.randint(0, vocab, (2 * n_pairs, length))
    labels = ids.clone()
    labels[:, :3] = -100
    labels[1, length - 3:] = -100
    return ids, labels


def plain_dpo_float64(policy, reference, ids, labels, beta, label_smoothing, loss_type):
    """DPO from full logits in float64: the loss and each parameter's gradient, by name."""
    policy = copy.deepcopy(policy).double()
    shifted = labels[:, 1:]
    mask = shifted != -100

    def sequence_logps(model):
        logps = model(ids).logits[:, :-1].log_softmax(-1)
        return (logps.gather(2, shifted.clamp_min(0)[..., None]).squeeze(2) * mask).sum(-1)

    with torch.no_grad():
        ref = sequence_logps(copy.deepcopy(reference).double())
    pol = sequence_logps(policy)
    n = ids.shape[0] // 2
    h = (pol[:n] - ref[:n]) - (pol[n:] - ref[n:])
    losses = {"sigmoid": lambda: -(1 - label_smoothing) * F.logsigmoid(beta * h)
              - label_smoothing * F.logsigmoid(-beta * h),
              "hinge": lambda: torch.relu(1 - beta * h),
              "ipo": lambda: (h - 1 / (2 * beta)) ** 2}[loss_type]()
    loss = losses.mean()
    loss.backward()
    return loss, {name: p.grad for name, p in policy.named_parameters()}


@pytest.mark.parametrize("backend", ["torch", "triton", "reference"])
@pytest.mark.parametrize("loss_type, label_smoothing, tied", [("sigmoid", 0.0, True), ("sigmoid", 0.2, False),
                                                               ("hinge", 0.0, True), ("ipo", 0.0, False)])
def test_dpo_step_through_the_kernels_is_plain_dpo(backend, loss_type, label_smoothing, tied):
    policy, reference = tiny_llamas(tied)
    ids, labels = dpo_batch(2, 9, policy.config.vocab_size)
    beta = 0.01 if loss_type == "hinge" else 0.1
    truth_loss, truth_grads = plain_dpo_float64(policy, reference, ids, labels, beta, label_smoothing, loss_type)

    # README's recipe: position t predicts token t + 1, row r is sequence r.
    rows, length = ids.shape
    targets = labels[:, 1:].reshape(-1)
    sequence_ids = torch.arange(rows).repeat_interleave(length - 1)
    with torch.no_grad():
        ref_hidden = reference.model(ids).last_hidden_state
        ref_logps = spin_kernels.sequence_logprobs(ref_hidden[:, :-1].reshape(-1, ref_hidden.shape[-1]),
                                                   reference.lm_head.weight, targets, sequence_ids, rows,
                                                   backend=backend)
    hidden = policy.model(ids).last_hidden_state
    out = spin_kernels.fused_linear_spin_loss(
        hidden[:, :-1].reshape(-1, hidden.shape[-1]), policy.lm_head.weight, targets, sequence_ids, ref_logps,
        beta=beta, loss_type=loss_type, label_smoothing=label_smoothing, backend=backend,
    )
    out.loss.backward()

    assert abs(out.loss.item() - truth_loss.item()) <= 1e-5 * (abs(truth_loss.item()) + 1)
    for name, param in policy.named_parameters():
        truth = truth_grads[name]
        error = (param.grad.double() - truth).abs().max().item()
        assert error <= 1e-4 * truth.abs().max().item() + 1e-9, f"d{name}: error {error:.3g}"


def plain_mean_logps_float64(model, ids, labels):
    """Each row's mean log-prob over its loss tokens, from full float64 logits."""
    shifted = labels[:, 1:]
    mask = shifted != -100
    logps = model(ids).logits[:, :-1].log_softmax(-1)
    return (logps.gather(2, shifted.clamp_min(0)[..., None]).squeeze(2) * mask).sum(-1) / mask.sum(-1)


@pytest.mark.parametrize("backend", ["torch", "triton", "reference"])
@pytest.mark.parametrize("variant", ["simpo", "ipo_on_means"])
def test_length_normalized_variants_through_the_kernels_are_their_papers_losses(backend, variant):
    """README's length_normalize recipes on the padded batch (rows of unequal length): SimPO (Meng et al. 2024) with
    no reference, opponent 0 and -gamma / beta; IPO on token means (TRL's DPOTrainer "ipo") with the reference's
    means computed as a user would, sequence_logprobs under inference_mode divided by each row's loss tokens."""
    policy, reference = tiny_llamas(tied=False)
    ids, labels = dpo_batch(2, 9, policy.config.vocab_size)
    n = ids.shape[0] // 2
    beta, gamma = (2.0, 0.5) if variant == "simpo" else (0.1, 0.0)

    truth_policy = copy.deepcopy(policy).double()
    pol = plain_mean_logps_float64(truth_policy, ids, labels)
    if variant == "simpo":
        truth_loss = -F.logsigmoid(beta * pol[:n] - beta * pol[n:] - gamma).mean()
    else:
        with torch.no_grad():
            ref = plain_mean_logps_float64(copy.deepcopy(reference).double(), ids, labels)
        truth_loss = (((pol[:n] - ref[:n]) - (pol[n:] - ref[n:])) - 1 / (2 * beta)).pow(2).mean()
    truth_loss.backward()

    rows, length = ids.shape
    targets = labels[:, 1:].reshape(-1)
    sequence_ids = torch.arange(rows).repeat_interleave(length - 1)
    if variant == "simpo":
        opponent = torch.cat([torch.zeros(n), torch.full((n,), -gamma / beta)])
    else:
        with torch.inference_mode():
            ref_hidden = reference.model(ids).last_hidden_state
            opponent = spin_kernels.sequence_logprobs(ref_hidden[:, :-1].reshape(-1, ref_hidden.shape[-1]),
                                                      reference.lm_head.weight, targets, sequence_ids, rows,
                                                      backend=backend) / (labels[:, 1:] != -100).sum(-1)
    hidden = policy.model(ids).last_hidden_state
    out = spin_kernels.fused_linear_spin_loss(
        hidden[:, :-1].reshape(-1, hidden.shape[-1]), policy.lm_head.weight, targets, sequence_ids, opponent,
        beta=beta, loss_type="sigmoid" if variant == "simpo" else "ipo", length_normalize=True, backend=backend,
    )
    out.loss.backward()

    assert abs(out.loss.item() - truth_loss.item()) <= 1e-5 * (abs(truth_loss.item()) + 1)
    torch.testing.assert_close(out.policy_logps.double(), pol.detach(), rtol=1e-5, atol=1e-5)
    if variant == "simpo":  # README: margins are SimPO's (beta times the mean log-prob difference) minus gamma
        torch.testing.assert_close(out.margins.double(), (beta * (pol[:n] - pol[n:]) - gamma).detach(),
                                   rtol=1e-5, atol=1e-5)
    truth_grads = dict(truth_policy.named_parameters())
    for name, param in policy.named_parameters():
        truth = truth_grads[name].grad
        error = (param.grad.double() - truth).abs().max().item()
        assert error <= 1e-4 * truth.abs().max().item() + 1e-9, f"d{name}: error {error:.3g}"

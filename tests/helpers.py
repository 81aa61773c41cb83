"""Float64 truth written plainly, independent of spin_kernels, dtype-aware comparison, a check of the fused loss
against that truth, a tiny SFT set, the official SPIN code's truncation, an offline Hugging Face Hub cache, and a
folder locked by another process."""

from __future__ import annotations

import contextlib
import math
import shutil
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import torch

import spin_kernels

# A tiny SFT set (prompt, human response) for end-to-end runs.
QA = [("What is two plus two?", "Two plus two is four."), ("What is the capital of France?", "It is Paris."),
      ("How many legs does a spider have?", "A spider has eight legs."), ("Why is the sky blue?", "Scattering."),
      ("Say hello in Spanish.", "Hola."), ("Name a planet.", "Mars.")]

# Relative tolerances by input dtype (DESIGN.md: fp32 ~1e-5, bf16 ~1e-2).
TOLERANCE = {torch.float32: 1e-5, torch.bfloat16: 1e-2, torch.float16: 2e-3, torch.float64: 1e-10}


def output_dtype(dtype: torch.dtype) -> torch.dtype:
    """The dtype whose tolerance a kernel's output values (log-probs, their sums, margins, loss) meet: fp32's for
    bf16 or fp16 inputs, as every backend computes in fp32 from the rounded inputs the float64 truth starts from too
    (products of bf16 or fp16 numbers are exact in fp32). Gradients, cast back to the inputs' dtype, meet its own."""
    return torch.float32 if dtype in (torch.bfloat16, torch.float16) else dtype


def assert_close(actual: torch.Tensor, expected: torch.Tensor, dtype: torch.dtype, what: str,
                 scale: float | None = None, tol: float | None = None) -> None:
    """|actual - expected| <= tol * (|expected| + scale), elementwise, and never NaN.

    scale defaults to max|expected|; pass the magnitude of the inputs for quantities that are
    differences of large numbers (margins), whose error follows the inputs, not the result.
    """
    assert not torch.isnan(actual).any(), f"{what}: NaN"
    assert actual.shape == expected.shape, f"{what}: shape {actual.shape} != {expected.shape}"
    actual, expected = actual.double(), expected.double()
    tol = TOLERANCE[dtype] if tol is None else tol
    scale = expected.abs().max().clamp_min(1e-30) if scale is None else scale
    error = (actual - expected).abs()
    bound = tol * (expected.abs() + scale)
    worst = (error / bound).max().item() if error.numel() else 0.0
    assert worst <= 1.0, f"{what}: error {error.max().item():.3g} exceeds tolerance ({worst:.2f}x, {dtype})"


def truth_token_logprobs(hidden, weight, targets, bias=None, ignore_index=-100) -> torch.Tensor:
    """float64 log softmax(hidden @ weight.T + bias)[targets], 0 at ignored tokens, full logits."""
    logits = hidden.double() @ weight.double().T
    if bias is not None:
        logits = logits + bias.double()
    keep = targets != ignore_index
    safe = torch.where(keep, targets, 0)
    logps = logits.log_softmax(-1).gather(1, safe[:, None]).squeeze(1)
    return torch.where(keep, logps, torch.zeros_like(logps))


def truth_spin_loss(policy_real, policy_generated, opponent_real, opponent_generated, beta, loss_type,
                    label_smoothing=0.0):
    """The per-pair losses, averaged."""
    losses = truth_pair_losses(policy_real, policy_generated, opponent_real, opponent_generated, beta, loss_type,
                               label_smoothing)
    return sum(losses) / len(losses)


def truth_pair_losses(policy_real, policy_generated, opponent_real, opponent_generated, beta, loss_type,
                      label_smoothing=0.0) -> list[float]:
    """The per-pair loss, one pair at a time in Python floats."""
    losses = []
    for pr, pg, orl, og in zip(policy_real, policy_generated, opponent_real, opponent_generated):
        h = (pr - orl) - (pg - og)
        if loss_type == "ipo":
            losses.append((h - 1 / (2 * beta)) ** 2)
        elif loss_type == "sigmoid":  # cDPO: with probability label_smoothing the pair's preference is flipped
            z = beta * h
            losses.append((1 - label_smoothing) * math.log1p(math.exp(-z)) + label_smoothing * math.log1p(math.exp(z)))
        else:
            losses.append(max(0.0, 1.0 - beta * h))
    return losses


def random_packed_batch(n_pairs: int, hidden_size: int, vocab_size: int, dtype: torch.dtype,
                        prompt_fraction: float = 0.35, max_len: int = 23):
    """A packed batch like the trainer's: per pair, prompt (no loss) + real, prompt + generated.

    Returns hidden [N, H], targets [N] (prompts ignored), sequence_ids [N] (-1 on prompts).
    """
    targets, sequence_ids = [], []
    for pair in range(n_pairs):
        for sequence in (pair, n_pairs + pair):
            prompt = int(torch.randint(1, max_len, ()) * prompt_fraction) + 1
            response = int(torch.randint(1, max_len, ()))  # uneven response lengths
            targets += [-100] * prompt + torch.randint(0, vocab_size, (response,)).tolist()
            sequence_ids += [-1] * prompt + [sequence] * response
    hidden = torch.randn(len(targets), hidden_size, dtype=torch.float64).to(dtype)
    return hidden, torch.tensor(targets), torch.tensor(sequence_ids)


def check_fused_against_truth(backend: str, dtype: torch.dtype, loss_type: str, n_pairs: int, nll_weight: float = 0.0,
                              vocab: int = 611, hidden_size: int = 56, device: str = "cpu",
                              shared_rows: bool = False, opponent_grad: bool = False,
                              autocast: bool = False, label_smoothing: float = 0.0, reduction: str = "mean",
                              length_normalize: bool = False) -> None:
    """fused_linear_spin_loss (+ nll_weight * sum of policy log-probs) against float64 autograd.

    shared_rows: the tokens read half as many hidden rows through hidden_index, most rows twice.
    opponent_grad: the opponent's log-probs require grad too, and their gradient is checked.
    autocast: the kernel's forward runs inside a bf16 autocast region (the backward after it, as PyTorch advises).
    reduction "none": the pairs' losses are weighted by random weights before the backward.
    length_normalize: each sequence's log-prob is the mean over its tokens, the opponent's too."""
    batch = random_packed_batch(n_pairs, hidden_size, vocab, dtype)
    hidden, targets, sequence_ids = (t.to(device) for t in batch)
    hidden_index = None
    if shared_rows:
        hidden = hidden[: hidden.shape[0] // 2 + 1]
        hidden_index = torch.randint(0, hidden.shape[0], targets.shape, device=device)
    rows = (lambda h: h) if hidden_index is None else (lambda h: h[hidden_index])
    weight = (torch.randn(vocab, hidden_size, dtype=torch.float64, device=device) / hidden_size**0.5).to(dtype)
    bias = torch.randn(vocab, dtype=torch.float64, device=device).to(dtype) * 0.1
    # Opponent log-probs near the policy's, so the loss sits in its interesting range.
    with torch.no_grad():
        token_truth = truth_token_logprobs(rows(hidden), weight, targets, bias)
        seq_truth = torch.zeros(2 * n_pairs, dtype=torch.float64, device=device).index_add(
            0, torch.where(targets != -100, sequence_ids, 0), token_truth
        )
    tokens = torch.stack([((sequence_ids == s) & (targets != -100)).sum() for s in range(2 * n_pairs)]).double()
    per_sequence = 1 / tokens if length_normalize else torch.ones_like(tokens)
    opponent = (seq_truth + torch.randn(2 * n_pairs, dtype=torch.float64, device=device) * 3) * per_sequence
    # Each margin h = (pr - or) - (pg - og) at least 0.05 from 0, far past rounding: one pair drawn within rounding of
    # it (1 run in ~2000) would leave the accuracy check below nothing to check.
    h = (seq_truth[:n_pairs] * per_sequence[:n_pairs] - opponent[:n_pairs]) - (
        seq_truth[n_pairs:] * per_sequence[n_pairs:] - opponent[n_pairs:])
    opponent[n_pairs:] += torch.where(h.abs() < 0.05, torch.where(h < 0, -0.05, 0.05) - h, 0.0)
    opponent = opponent.float()
    opponent.requires_grad_(opponent_grad)
    beta = 0.1
    weights = torch.rand(n_pairs, dtype=torch.float64, device=device) + 0.5

    def objective(loss: torch.Tensor) -> torch.Tensor:
        return (loss * weights.to(loss.dtype)).sum() if reduction == "none" else loss

    leaves = [t.clone().requires_grad_() for t in (hidden, weight, bias)]
    with torch.autocast(device, dtype=torch.bfloat16, enabled=autocast):
        out = spin_kernels.fused_linear_spin_loss(
            *leaves[:2], targets, sequence_ids, opponent, beta=beta, loss_type=loss_type,
            label_smoothing=label_smoothing, reduction=reduction, length_normalize=length_normalize, bias=leaves[2],
            hidden_index=hidden_index, backend=backend,
        )
    (objective(out.loss) + nll_weight * out.policy_logps.sum()).backward()

    truth_leaves = [t.detach().double().requires_grad_() for t in (hidden, weight, bias)]
    token = truth_token_logprobs(rows(truth_leaves[0]), truth_leaves[1], targets, truth_leaves[2])
    seq = torch.stack([token[(sequence_ids == s) & (targets != -100)].sum() for s in range(2 * n_pairs)])
    seq = seq * per_sequence
    opp = opponent.detach().double().requires_grad_(opponent_grad)
    z = beta * ((seq[:n_pairs] - opp[:n_pairs]) - (seq[n_pairs:] - opp[n_pairs:]))
    softplus = torch.nn.functional.softplus  # cDPO's label smoothing: the flipped pair's loss in part
    loss = {"sigmoid": lambda: (1 - label_smoothing) * softplus(-z) + label_smoothing * softplus(z),
            "hinge": lambda: torch.relu(1 - z),
            "ipo": lambda: (z / beta - 1 / (2 * beta)) ** 2}[loss_type]()
    loss = {"mean": loss.mean(), "sum": loss.sum(), "none": loss}[reduction]
    (objective(loss) + nll_weight * seq.sum()).backward()

    values = output_dtype(dtype)
    assert_close(out.policy_logps, seq.detach(), values, "policy_logps")
    # z is a difference of sums of ~100: its error follows their size. |dl/dz| <= 1 for sigmoid and hinge; IPO's
    # loss moves by 2|z/beta - 1/(2 beta)| / beta per unit of z, and its gradient, linear in z/beta - 1/(2 beta),
    # carries the sums' rounding relative to that gap (the sigmoid's flattens it by beta). Those sums are fp32's
    # whatever the inputs' dtype (products of bf16 or fp16 numbers are exact in fp32, and every backend adds them
    # up in fp32; the truth starts from the same rounded inputs): that part of the bound is fp32's, amplified,
    # and the rest the dtype's (a bf16 backward casts the per-logit gradients to bf16).
    input_scale = beta * float(seq.detach().abs().max())
    gap = (z.detach() / beta - 1 / (2 * beta)).abs().max()
    slope = float(2 * gap / beta) if loss_type == "ipo" else 1.0
    conditioning = float(seq.detach().abs().max() / gap) if loss_type == "ipo" else 0.0
    assert_close(out.margins, z.detach(), values, "margins", scale=input_scale)
    rewards_real = beta * (seq[:n_pairs] - opp[:n_pairs]).detach()
    rewards_generated = beta * (seq[n_pairs:] - opp[n_pairs:]).detach()
    assert_close(out.rewards_real, rewards_real, values, "rewards_real", scale=input_scale)
    assert_close(out.rewards_generated, rewards_generated, values, "rewards_generated", scale=input_scale)
    summed = n_pairs if reduction == "sum" else 1  # a sum carries each pair's rounding
    assert_close(out.loss, loss.detach(), values, "loss", scale=input_scale * slope * summed)
    amplified = 1 + conditioning * TOLERANCE[torch.float32] / TOLERANCE[dtype]
    for name, leaf, truth_leaf in zip(("hidden", "weight", "bias"), leaves, truth_leaves):
        scale = amplified * float(truth_leaf.grad.abs().max()) + 1e-30
        assert_close(leaf.grad, truth_leaf.grad, dtype, f"d{name}", scale=scale)
    if opponent_grad:  # its gradient is minus the policy's, and carries the same rounding
        assert_close(opponent.grad, opp.grad, dtype, "dopponent_logps", scale=scale)
    # Where the margin is clear of rounding, the kernel's accuracy is the truth's.
    clear = (z.detach().abs() > 2 * TOLERANCE[values] * input_scale)
    assert out.accuracy.shape == (n_pairs,) and clear.any()
    assert torch.equal(out.accuracy.double()[clear], (z.detach() > 0).double()[clear])


def offline_hub(monkeypatch, cache: Path):
    """Point huggingface_hub at an empty cache folder that answers alone (offline: nothing is fetched). Returns
    publish(repo_id, revision, folder=None): the cache's layout for a new revision of a Hub model (a snapshot folder
    named after its commit, holding folder's files or an empty config.json, and refs/main naming it); its path."""
    from huggingface_hub import constants

    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(cache))
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)

    def publish(repo_id: str, revision: str, folder: Path | None = None) -> Path:
        repo = cache / f"models--{repo_id.replace('/', '--')}"
        snapshot = repo / "snapshots" / revision
        if folder is None:
            snapshot.mkdir(parents=True)
            (snapshot / "config.json").write_text("{}")
        else:
            shutil.copytree(folder, snapshot)
        (repo / "refs").mkdir(exist_ok=True)
        (repo / "refs" / "main").write_text(revision)
        return snapshot

    return publish


def official_spin_fit(prompt, chosen, rejected, eos, max_length, max_prompt_length, bos=None):
    """The official SPIN code's truncation (spin/alignment/utils.py, tokenize_batch_element), step by step as it
    does it: EOS appended to each response, then the prompt cut (keep_end) if the prompt and the longer response
    exceed max_length, then both responses cut to max_length - max_prompt_length if they still do. With `bos`, a
    prompt that starts with it keeps it when cut (spin-fast's one difference: the official code adds no BOS)."""
    chosen, rejected = [*chosen, eos], [*rejected, eos]
    longer = max(len(chosen), len(rejected))
    if len(prompt) + longer > max_length:
        keeps_bos = bos is not None and prompt[0] == bos and len(prompt) > max_prompt_length
        prompt = [bos, *prompt[len(prompt) - max_prompt_length + 1:]] if keeps_bos else prompt[-max_prompt_length:]
    if len(prompt) + longer > max_length:
        chosen, rejected = chosen[: max_length - max_prompt_length], rejected[: max_length - max_prompt_length]
    return prompt, chosen, rejected


@contextlib.contextmanager
def held_by_another_process(folder: Path, work: str) -> Iterator[int]:
    """Another process doing `work` in `folder` (holding its spin_fast.locking lock) for the block; its pid."""
    code = (f"import sys, time\nfrom spin_fast.locking import exclusive\nwith exclusive({str(folder)!r}, {work!r}):\n"
            "    print('held', flush=True)\n    time.sleep(600)\n")
    holder = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "held"
        yield holder.pid
    finally:
        holder.kill()
        holder.wait()


# ------------------------------------------------------------------------ sampling against the exact distribution
END = "END"  # an answer's end (any stop token): engines drop the token that ended an answer


def wide_tiny_llama(tokenizer):
    """A tiny Llama (head dim 32) for `tokenizer`'s ids, seeded, with wide weights (initializer_range 0.2): its
    logits lie far apart, so greedy choices do not hinge on rounding and sampled distributions are far from flat."""
    from transformers import LlamaForCausalLM

    from spin_fast.model import tiny_config

    config = tiny_config("llama", vocab_size=len(tokenizer), hidden_size=64, heads=2, max_positions=512)
    config.bos_token_id, config.eos_token_id, config.pad_token_id = (
        tokenizer.bos_token_id, tokenizer.eos_token_id, tokenizer.pad_token_id)
    config.initializer_range = 0.2
    torch.manual_seed(0)
    model = LlamaForCausalLM(config).eval()
    model.generation_config.eos_token_id = tokenizer.eos_token_id
    return model


def two_tiny_llamas(tokenizer, tied: bool):
    """Two of wide_tiny_llama's kind (tied head or not), the second the first moved by noise: an engine swapped from
    one to the other answers otherwise."""
    import copy

    from transformers import LlamaForCausalLM

    from spin_fast.model import tiny_config

    config = tiny_config("llama", vocab_size=len(tokenizer), hidden_size=64, heads=2, max_positions=512,
                         tie_word_embeddings=tied)
    config.initializer_range = 0.2  # greedy choices far from rounding
    torch.manual_seed(0)
    first = LlamaForCausalLM(config).eval()
    second = copy.deepcopy(first)
    with torch.no_grad():
        for p in second.parameters():
            p.add_(torch.randn_like(p) * 0.2)
    return first, second


def warped_probs(logits: torch.Tensor, temperature: float, top_k: int, top_p: float) -> torch.Tensor:
    """float64 sampling distribution, written from the definitions HF and vLLM share: logits / T; top-k keeps the
    tokens whose logit is >= the k-th largest; top-p then keeps, in order of decreasing probability, each token
    whose more likely tokens hold less than top_p of the (top-k renormalized) mass."""
    logits = logits.double() / temperature
    if top_k > 0:
        logits = torch.where(logits >= logits.topk(top_k).values[-1], logits, -math.inf)
    probs = logits.softmax(-1)
    if top_p < 1:
        sorted_probs, order = probs.sort(descending=True)
        before = sorted_probs.cumsum(0) - sorted_probs
        keep = torch.zeros_like(probs, dtype=torch.bool)
        keep[order] = before < top_p
        probs = torch.where(keep, probs, 0.0)
        probs = probs / probs.sum()
    return probs


def exact_answer_distribution(model, prompt, stops, temperature=1.0, top_k=0, top_p=1.0, steps=2) -> dict:
    """P(first `steps` (1 or 2) tokens of an answer), in float64 from a float64 copy of the model: keys are
    tuples of tokens, ending with END where a stop token ended the answer."""
    import copy

    model64 = copy.deepcopy(model).double().eval()
    with torch.no_grad():
        first = warped_probs(model64(torch.tensor([list(prompt)])).logits[0, -1], temperature, top_k, top_p)
        truth = {(END,): float(first[list(stops)].sum())}
        going = [a for a in first.nonzero().flatten().tolist() if a not in stops]
        if steps == 1:
            truth.update({(a,): float(first[a]) for a in going})
            return truth
        logits = torch.cat([model64(torch.tensor([[*prompt, a] for a in going[i : i + 256]])).logits[:, -1]
                            for i in range(0, len(going), 256)])
        for a, row in zip(going, logits):
            second = warped_probs(row, temperature, top_k, top_p) * first[a]
            truth[(a, END)] = float(second[list(stops)].sum())
            truth.update({(a, b): float(second[b]) for b in second.nonzero().flatten().tolist() if b not in stops})
    return truth


def answer_key(completion, steps: int) -> tuple:
    """An answer's first `steps` tokens as exact_answer_distribution keys them; checks max_new_tokens' cut: an
    unfinished answer has exactly `steps` tokens, a finished one fewer."""
    ids = tuple(completion.token_ids)
    assert len(ids) == steps if not completion.finished else len(ids) < steps, completion
    return ids + ((END,) if completion.finished else ())


def goodness_of_fit(drawn: list, truth: dict, min_expected: float = 5.0) -> dict:
    """Pearson's chi-square of the drawn keys against the truth, cells expected fewer than min_expected times
    pooled into one (the chi-square approximation holds with 5+ expected per cell); its p-value (chi-square
    survival, gammaincc(df/2, x/2)); and the total-variation distance on those cells with the bound a correct
    sampler stays under with probability >= 1 - 1e-6: E[TV] <= sum_i sqrt(p_i (1 - p_i) / n) / 2 (Jensen), and
    TV moves by at most 1/n per draw, so McDiarmid gives P(TV >= E[TV] + t) <= exp(-2 n t²), t = sqrt(ln(1e6) / 2n).
    Draws outside the truth's support (probability 0) are counted apart: a correct sampler makes none."""
    from collections import Counter

    n, counts = len(drawn), Counter(drawn)
    impossible = sum(c for key, c in counts.items() if truth.get(key, 0.0) == 0.0)
    big = [key for key, p in truth.items() if n * p >= min_expected]
    cells = [(counts.get(key, 0), truth[key]) for key in big]
    cells.append((n - sum(c for c, _ in cells), max(0.0, 1.0 - sum(p for _, p in cells))))
    if cells[-1][1] * n < 1e-9:  # nothing pooled
        cells.pop()
    chi2 = sum((c - n * p) ** 2 / (n * p) for c, p in cells)
    df = len(cells) - 1
    p_value = float(torch.special.gammaincc(torch.tensor(df / 2, dtype=torch.float64),
                                            torch.tensor(chi2 / 2, dtype=torch.float64)))
    tv = 0.5 * sum(abs(c / n - p) for c, p in cells)
    tv_bound = 0.5 * sum(math.sqrt(p * (1 - p) / n) for _, p in cells) + math.sqrt(math.log(1e6) / (2 * n))
    return {"n": n, "cells": len(cells), "chi2": chi2, "df": df, "p_value": p_value, "tv": tv,
            "tv_bound": tv_bound, "impossible": impossible}


def assert_fits(stats: dict, what: str) -> None:
    """A correct sampler fails each check with probability < 1e-6 (the seeds are fixed: the test is repeatable)."""
    assert stats["impossible"] == 0, f"{what}: {stats['impossible']} draws of probability 0: {stats}"
    assert stats["p_value"] > 1e-6, f"{what}: the draws do not follow the distribution: {stats}"
    assert stats["tv"] < stats["tv_bound"], f"{what}: total variation past its bound: {stats}"

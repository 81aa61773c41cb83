"""spin_kernels' losses against TRL's own loss code, in float64.

TRL's code is called as it stands, not copied: `DPOTrainer._compute_loss` (the DPO losses are written inline there
in TRL 1.x, no `dpo_loss` method) with a `types.SimpleNamespace` for `self` and a stand-in model that returns what
TRL's fused LM head returns (per-token log-probs from TRL's `selective_log_softmax`, in float64: TRL's own fused head
computes in fp32, see test_dpo_through_trl_fused_head_fp32 for it); `CPOTrainer.cpo_loss` and
`CPOTrainer.get_batch_logps` (trl.experimental.cpo) likewise. spin_kernels gets the same hidden states and LM head,
in the padded layout of README's DPO example or as a packed, shuffled batch.

Where TRL defines a quantity otherwise than spin_kernels, the test pins the exact relation between the two instead
of equality (see the "differs by definition" tests).
"""

import collections
import types
import warnings

import pytest
import torch
import torch.nn.functional as F

import spin_kernels

with warnings.catch_warnings():
    warnings.simplefilter("ignore")  # TRL warns about the installed vLLM version and about experimental modules
    trl = pytest.importorskip("trl")
    from trl.trainer.dpo_trainer import DPOTrainer
    from trl.trainer.utils import selective_log_softmax

    cpo_trainer = pytest.importorskip("trl.experimental.cpo.cpo_trainer")
    CPOTrainer = cpo_trainer.CPOTrainer

if not hasattr(DPOTrainer, "_compute_loss"):
    pytest.skip(f"TRL {trl.__version__}: DPOTrainer has no _compute_loss (written for TRL 1.x)",
                allow_module_level=True)

F64 = torch.float64
V, H, L = 23, 8, 10  # vocabulary, hidden size, padded row length
RTOL, ATOL = 1e-10, 1e-12
BACKENDS = ["torch", "reference"]  # the float64 backends (triton takes no float64)


def close(actual, expected, rtol=RTOL, atol=ATOL):
    torch.testing.assert_close(torch.as_tensor(actual, dtype=F64), torch.as_tensor(expected, dtype=F64),
                               rtol=rtol, atol=atol)


class TinyModel:
    """A causal LM as DPOTrainer calls it after `add_fused_lm_head`: hidden state of position t is
    embed[id_t] + pos[t], logits are hidden @ weight.T, and `model(..., labels=labels, fused_lm_head=True)` returns
    FusedCausalLMOutput's fields for the shifted labels (0 where the label is -100), in float64."""

    training = False

    def __init__(self):
        self.embed = torch.randn(V, H, dtype=F64)
        self.pos = torch.randn(L, H, dtype=F64)
        self.weight = torch.randn(V, H, dtype=F64) * 0.7

    def hidden(self, input_ids):
        return self.embed[input_ids] + self.pos[: input_ids.shape[-1]]

    def logits(self, input_ids):
        return self.hidden(input_ids) @ self.weight.T

    def __call__(self, input_ids, attention_mask=None, labels=None, fused_lm_head=False, **kwargs):
        assert fused_lm_head and labels is not None
        logits = self.logits(input_ids)[:, :-1]
        labels = labels[:, 1:]
        mask = labels != -100
        log_probs = selective_log_softmax(logits, labels.clamp(min=0)).masked_fill(~mask, 0.0)
        entropy = -(logits.softmax(-1) * logits.log_softmax(-1)).sum(-1).masked_fill(~mask, 0.0)
        return types.SimpleNamespace(
            log_probs=log_probs, entropy=entropy, mean_logits=logits.mean(-1).masked_fill(~mask, 0.0),
            is_top1=(logits.argmax(-1) == labels) & mask, log_sum_sq_probs=None, aux_loss=None, label_mask=mask,
        )


def dpo_batch(n_pairs):
    """DPOTrainer's batch: n_pairs chosen rows, then their rejected rows, right-padded to L; a pair's two rows
    share a prompt of 1 to 3 tokens; each completion has 1 to L - prompt tokens."""
    ids = torch.randint(0, V, (2 * n_pairs, L))
    attention = torch.zeros(2 * n_pairs, L, dtype=torch.long)
    completion = torch.zeros(2 * n_pairs, L, dtype=torch.long)
    for i in range(n_pairs):
        prompt = int(torch.randint(1, 4, ()))
        ids[n_pairs + i, :prompt] = ids[i, :prompt]
        for r in (i, n_pairs + i):
            n = int(torch.randint(1, L - prompt + 1, ()))
            attention[r, : prompt + n] = 1
            completion[r, prompt : prompt + n] = 1
    return ids, attention, completion


def truth_logps(model, ids, completion):
    """Each row's summed log-probs over its completion tokens, and their count, by plain float64 log_softmax."""
    logps = model.logits(ids)[:, :-1].log_softmax(-1).gather(-1, ids[:, 1:, None])[..., 0]
    mask = completion[:, 1:].bool()
    return (logps * mask).sum(1), mask.sum(1).to(F64)


def opponent_near(policy_logps, beta):
    """Reference log-probs near the policy's, so that z = beta * h spreads over a few units around 0 (both
    branches of the hinge, both signs of the margin)."""
    return policy_logps + torch.randn_like(policy_logps) * 2.0 / beta


def trl_dpo(model, ids, attention, completion, ref_chosen, ref_rejected, *, beta, loss_type, label_smoothing=0.0):
    """TRL's DPOTrainer._compute_loss on a padded batch with precomputed reference log-probs: the mean loss over
    the pairs, and the metrics it logs (batch means)."""
    trainer = types.SimpleNamespace(
        model=model, accelerator=types.SimpleNamespace(device=torch.device("cpu"), gather=lambda x: x,
                                                       gather_for_metrics=lambda x: x),
        aux_loss_enabled=False, ld_alpha=None, precompute_ref_logps=True, f_divergence_type="reverse_kl",
        loss_types=[loss_type], loss_weights=[1.0], beta=beta, label_smoothing=label_smoothing, use_weighting=False,
        _metrics={"train": collections.defaultdict(list), "eval": collections.defaultdict(list)},
        _total_train_tokens=0, _tp_size=1, args=types.SimpleNamespace(),
    )
    inputs = {"input_ids": ids, "attention_mask": attention, "completion_mask": completion,
              "ref_chosen_logps": ref_chosen, "ref_rejected_logps": ref_rejected}
    loss = DPOTrainer._compute_loss(trainer, model, inputs, return_outputs=False)
    return loss, {k: v[-1] for k, v in trainer._metrics["eval"].items()}


def trl_dpo_pairs(model, ids, attention, completion, ref, **kw):
    """TRL's DPO loss and metrics of each pair alone (a batch of one pair: TRL returns only the batch mean)."""
    n = ids.shape[0] // 2
    out = []
    for i in range(n):
        rows = [i, n + i]
        out.append(trl_dpo(model, ids[rows], attention[rows], completion[rows], ref[i : i + 1], ref[n + i : n + i + 1],
                           **kw))
    return out


def spin_padded(model, ids, completion, opponent, *, backend, **kw):
    """README's DPO recipe: the padded rows flattened, position t predicting token t + 1, row r is sequence r."""
    labels = ids.masked_fill(completion == 0, -100)
    rows = ids.shape[0]
    return spin_kernels.fused_linear_spin_loss(
        model.hidden(ids)[:, :-1].reshape(-1, H), model.weight, labels[:, 1:].reshape(-1),
        torch.arange(rows).repeat_interleave(L - 1), opponent, backend=backend, **kw,
    )


def spin_packed(model, ids, attention, completion, opponent, *, backend, **kw):
    """The same rows as a packed batch: each row's real tokens only (no padding), rows concatenated, then all
    tokens shuffled; a token's target is its row's next token (-100 on the prompt and on the row's last token)."""
    hidden, targets, seq = [], [], []
    for r in range(ids.shape[0]):
        n = int(attention[r].sum())
        hidden.append(model.hidden(ids[r, :n]))
        target = torch.full((n,), -100, dtype=torch.long)
        target[:-1] = ids[r, 1:n].masked_fill(completion[r, 1:n] == 0, -100)
        targets.append(target)
        seq.append(torch.full((n,), r, dtype=torch.long))
    perm = torch.randperm(sum(len(t) for t in targets))
    return spin_kernels.fused_linear_spin_loss(
        torch.cat(hidden)[perm], model.weight, torch.cat(targets)[perm], torch.cat(seq)[perm], opponent,
        backend=backend, **kw,
    )


def random_beta():
    return float(torch.empty(()).uniform_(0.05, 0.5))


# (1), (3), (6): sigmoid DPO and hinge, per pair and batch mean, and the rewards TRL logs.
@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("loss_type", ["sigmoid", "hinge"])
def test_dpo_loss_and_metrics_match_trl_dpo_trainer(loss_type, backend):
    n, beta = 4, random_beta()
    model = TinyModel()
    ids, attention, completion = dpo_batch(n)
    sums, _ = truth_logps(model, ids, completion)
    ref = opponent_near(sums, beta)

    trl_loss, _ = trl_dpo(model, ids, attention, completion, ref[:n], ref[n:], beta=beta, loss_type=loss_type)
    mean = spin_padded(model, ids, completion, ref, backend=backend, beta=beta, loss_type=loss_type)
    close(mean.loss, trl_loss)

    each = spin_padded(model, ids, completion, ref, backend=backend, beta=beta, loss_type=loss_type,
                       reduction="none")
    close(each.policy_logps, sums)
    for i, (loss, metrics) in enumerate(trl_dpo_pairs(model, ids, attention, completion, ref, beta=beta,
                                                      loss_type=loss_type)):
        close(each.loss[i], loss)
        close(each.rewards_real[i], metrics["rewards/chosen"])
        close(each.rewards_generated[i], metrics["rewards/rejected"])
        close(each.margins[i], metrics["rewards/margins"])
        assert each.accuracy[i].item() == metrics["rewards/accuracies"]
        close(each.policy_logps[i], metrics["logps/chosen"])
        close(each.policy_logps[n + i], metrics["logps/rejected"])


# (4) IPO: TRL's DPOTrainer "ipo" divides each log-ratio by its completion's token count.
@pytest.mark.parametrize("backend", BACKENDS)
def test_ipo_matches_trl_dpo_trainer_ipo_on_token_means(backend):
    """Reproduced twice: fused_linear_spin_loss(length_normalize=True) on a packed, shuffled batch with the
    reference's log-probs given as means, and spin_loss on per-sequence means computed here."""
    n, beta = 4, random_beta()
    model = TinyModel()
    ids, attention, completion = dpo_batch(n)
    sums, counts = truth_logps(model, ids, completion)
    ref = opponent_near(sums, beta * 0.2)  # means: spread the margin over tokens too
    means, ref_means = sums / counts, ref / counts

    trl_loss, _ = trl_dpo(model, ids, attention, completion, ref[:n], ref[n:], beta=beta, loss_type="ipo")
    fused = spin_packed(model, ids, attention, completion, ref_means, backend=backend, beta=beta, loss_type="ipo",
                        length_normalize=True)
    close(fused.loss, trl_loss)
    close(fused.policy_logps, means)

    each = spin_packed(model, ids, attention, completion, ref_means, backend=backend, beta=beta, loss_type="ipo",
                       length_normalize=True, reduction="none")
    on_means = spin_kernels.spin_loss(means[:n], means[n:], ref_means[:n], ref_means[n:], beta=beta,
                                      loss_type="ipo", reduction="none")
    close(on_means.loss, each.loss)
    for i, (loss, metrics) in enumerate(trl_dpo_pairs(model, ids, attention, completion, ref, beta=beta,
                                                      loss_type="ipo")):
        close(each.loss[i], loss)
        # Differs by definition: TRL logs rewards of the summed log-ratios even for "ipo", whose loss uses their
        # means; spin_kernels' rewards are of the log-probs it was given (means here).
        close(each.rewards_real[i] * counts[i], metrics["rewards/chosen"])
        close(each.rewards_generated[i] * counts[n + i], metrics["rewards/rejected"])


# (2) cDPO label smoothing.
@pytest.mark.parametrize("label_smoothing", [0.0, 0.1, 0.3])
def test_cdpo_matches_trl_cpo_loss_reference_free(label_smoothing):
    """CPOTrainer.cpo_loss "sigmoid" is cDPO without a reference: spin_loss with the opponent's log-probs 0."""
    n, beta = 16, random_beta()
    chosen, rejected = torch.randn(n, dtype=F64) * 10 - 40, torch.randn(n, dtype=F64) * 10 - 40
    zeros = torch.zeros(n, dtype=F64)
    trainer = types.SimpleNamespace(alpha=0.0, loss_type="sigmoid", beta=beta, label_smoothing=label_smoothing,
                                    accelerator=types.SimpleNamespace(device=torch.device("cpu")))
    losses, chosen_rewards, rejected_rewards = CPOTrainer.cpo_loss(trainer, chosen, rejected)
    out = spin_kernels.spin_loss(chosen, rejected, zeros, zeros, beta=beta, label_smoothing=label_smoothing,
                                 reduction="none")
    close(out.loss, losses)
    close(out.rewards_real, chosen_rewards)
    close(out.rewards_generated, rejected_rewards)
    close(out.margins, chosen_rewards - rejected_rewards)
    assert torch.equal(out.accuracy, (chosen_rewards > rejected_rewards).to(F64))


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("label_smoothing", [0.1, 0.3])
def test_cdpo_with_reference_matches_trl_aot_on_one_pair(label_smoothing, backend):
    """DPOTrainer's sigmoid has no label smoothing in TRL 1.x; its "aot" loss is cDPO's formula applied to sorted
    log-ratios, and with one pair per batch the sort is the identity: cDPO with a reference, pair by pair."""
    n, beta = 4, random_beta()
    model = TinyModel()
    ids, attention, completion = dpo_batch(n)
    sums, _ = truth_logps(model, ids, completion)
    ref = opponent_near(sums, beta)
    each = spin_padded(model, ids, completion, ref, backend=backend, beta=beta, label_smoothing=label_smoothing,
                       reduction="none")
    for i, (loss, _) in enumerate(trl_dpo_pairs(model, ids, attention, completion, ref, beta=beta,
                                                loss_type="aot", label_smoothing=label_smoothing)):
        close(each.loss[i], loss)


def test_trl_dpo_label_smoothing_differs_by_definition():
    """Differs by definition. TRL 1.x's DPOTrainer "sigmoid" ignores label_smoothing (plain DPO); its "robust"
    (rDPO) is ((1 - e) l(z) - e l(-z)) / (1 - 2e), where spin_kernels' label_smoothing is cDPO's
    (1 - e) l(z) + e l(-z), l(z) = -log sigmoid(z): robust * (1 - 2e) + 2e l(-z) = cDPO."""
    n, beta, eps = 4, random_beta(), 0.2
    model = TinyModel()
    ids, attention, completion = dpo_batch(n)
    sums, _ = truth_logps(model, ids, completion)
    ref = opponent_near(sums, beta)
    plain = spin_kernels.spin_loss(sums[:n], sums[n:], ref[:n], ref[n:], beta=beta, reduction="none")
    cdpo = spin_kernels.spin_loss(sums[:n], sums[n:], ref[:n], ref[n:], beta=beta, label_smoothing=eps,
                                  reduction="none")
    z = plain.margins  # beta * h
    sigmoid = trl_dpo_pairs(model, ids, attention, completion, ref, beta=beta, loss_type="sigmoid",
                            label_smoothing=eps)
    robust = trl_dpo_pairs(model, ids, attention, completion, ref, beta=beta, loss_type="robust",
                           label_smoothing=eps)
    for i in range(n):
        close(sigmoid[i][0], plain.loss[i])
        assert abs(sigmoid[i][0].item() - cdpo.loss[i].item()) > 1e-6
        close(robust[i][0] * (1 - 2 * eps) + 2 * eps * -F.logsigmoid(-z[i]), cdpo.loss[i])


@pytest.mark.parametrize("loss_type", ["sigmoid", "hinge", "ipo"])
def test_cpo_reference_free_losses_match(loss_type):
    """CPOTrainer.cpo_loss (no reference) for each loss type, against spin_loss with the opponent's log-probs 0."""
    n, beta = 16, random_beta()
    chosen = torch.randn(n, dtype=F64) * 3 - 10
    rejected = chosen + torch.randn(n, dtype=F64) * 2 / beta
    zeros = torch.zeros(n, dtype=F64)
    trainer = types.SimpleNamespace(alpha=0.0, loss_type=loss_type, beta=beta, label_smoothing=0.0,
                                    accelerator=types.SimpleNamespace(device=torch.device("cpu")))
    losses, chosen_rewards, rejected_rewards = CPOTrainer.cpo_loss(trainer, chosen, rejected)
    out = spin_kernels.spin_loss(chosen, rejected, zeros, zeros, beta=beta, loss_type=loss_type, reduction="none")
    close(out.loss, losses)
    close(out.rewards_real, chosen_rewards)
    close(out.rewards_generated, rejected_rewards)


# (5) SimPO, and (6) its rewards.
@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("label_smoothing", [0.0, 0.1])
def test_simpo_matches_trl_cpo_simpo(label_smoothing, backend):
    """CPOTrainer's "simpo" on TRL's own per-sequence means (get_batch_logps(average_log_prob=True) on float64
    logits), against the README's recipe: length_normalize=True, sigmoid, opponent 0 for each chosen response and
    -gamma / beta for each rejected one, on a packed, shuffled batch."""
    n, beta, gamma = 4, random_beta(), float(torch.empty(()).uniform_(0.2, 1.5))
    model = TinyModel()
    ids, attention, completion = dpo_batch(n)
    labels = ids.masked_fill(completion == 0, -100)
    means = CPOTrainer.get_batch_logps(model.logits(ids), labels, average_log_prob=True)
    sums, counts = truth_logps(model, ids, completion)
    close(means, sums / counts)
    trainer = types.SimpleNamespace(alpha=0.0, loss_type="simpo", beta=beta, simpo_gamma=gamma,
                                    label_smoothing=label_smoothing,
                                    accelerator=types.SimpleNamespace(device=torch.device("cpu")))
    losses, chosen_rewards, rejected_rewards = CPOTrainer.cpo_loss(trainer, means[:n], means[n:])

    opponent = torch.cat([torch.zeros(n, dtype=F64), torch.full((n,), -gamma / beta, dtype=F64)])
    kw = dict(backend=backend, beta=beta, loss_type="sigmoid", label_smoothing=label_smoothing,
              length_normalize=True)
    each = spin_packed(model, ids, attention, completion, opponent, reduction="none", **kw)
    close(each.loss, losses)
    close(each.policy_logps, means)
    close(spin_packed(model, ids, attention, completion, opponent, **kw).loss, losses.mean())
    close(each.rewards_real, chosen_rewards)
    # Differs by definition: the recipe's opponent carries gamma into spin_kernels' rejected reward
    # (beta * (mean_l + gamma / beta)), where TRL logs beta * mean_l; so spin's margin is TRL's minus gamma, and
    # spin's accuracy counts margins above gamma.
    close(each.rewards_generated, rejected_rewards + gamma)
    close(each.margins, chosen_rewards - rejected_rewards - gamma)
    assert torch.equal(each.accuracy, (chosen_rewards - rejected_rewards > gamma).to(F64))


def test_dpo_through_trl_fused_head_fp32():
    """The real thing end to end, at fp32 accuracy: a tiny Llama (float64) patched with TRL's add_fused_lm_head,
    whose kernel computes in fp32, through DPOTrainer._compute_loss; spin_kernels gets the same backbone's hidden
    states and LM head in float64."""
    transformers = pytest.importorskip("transformers")
    from trl.trainer.utils import add_fused_lm_head

    config = transformers.LlamaConfig(vocab_size=V, hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                                      num_attention_heads=2, num_key_value_heads=2, max_position_embeddings=L)
    llama = transformers.LlamaForCausalLM(config).to(F64).eval()
    add_fused_lm_head(llama, outputs=("log_probs", "entropy", "mean_logits", "is_top1"))
    n, beta = 4, random_beta()
    ids, attention, completion = dpo_batch(n)
    with torch.no_grad():
        hidden = llama.model(input_ids=ids, attention_mask=attention).last_hidden_state
    logps = hidden[:, :-1] @ llama.lm_head.weight.T
    logps = logps.log_softmax(-1).gather(-1, ids[:, 1:, None])[..., 0]
    ref = opponent_near((logps * completion[:, 1:]).sum(1), beta)
    trl_loss, metrics = trl_dpo(llama, ids, attention, completion, ref[:n], ref[n:], beta=beta, loss_type="sigmoid")
    labels = ids.masked_fill(completion == 0, -100)
    out = spin_kernels.fused_linear_spin_loss(
        hidden[:, :-1].reshape(-1, hidden.shape[-1]), llama.lm_head.weight.detach(), labels[:, 1:].reshape(-1),
        torch.arange(2 * n).repeat_interleave(L - 1), ref, beta=beta, backend="torch",
    )
    close(out.loss, trl_loss.detach(), rtol=1e-5, atol=1e-6)
    close(out.margins.mean(), metrics["rewards/margins"], rtol=1e-5, atol=1e-5)
    close(out.policy_logps[:n].mean(), metrics["logps/chosen"], rtol=1e-5, atol=1e-5)

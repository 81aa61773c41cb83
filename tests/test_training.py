"""The training loop against a naive SPIN reference, resume equivalence, SFT mode and failures."""

import copy
import json
import logging
import math
import random
import shutil
from dataclasses import astuple, replace
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
import torch.nn.functional as F
from transformers import AutoModelForCausalLM

from spin_fast import attention as spin_attention
from spin_fast.config import TrainConfig
from spin_fast.model import tiny_config
from spin_fast.packing import Sequence, group_tokens
from spin_fast.scoring import ScoredPair, TokenizedPair, load_scored_pairs, save_scored_pairs, score_pairs
from spin_fast.training import Trainer, TrainingDiverged, epoch_order, step_items

VOCAB, EOS = 300, 2


def make_model(seed=0, attention="sdpa", attention_dropout=0.0):
    """The tiny Llama, with plain SDPA (rows hold every sequence whole) or spin_varlen (pairs share prompts). The
    same `seed` gives the same weights, and the test's own random stream goes on untouched (its pairs stay fresh)."""
    spin_attention.register()
    model_config = tiny_config("llama", vocab_size=VOCAB)
    model_config.attention_dropout = attention_dropout
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return AutoModelForCausalLM.from_config(model_config, attn_implementation=attention)


def random_pairs(n):
    def ids(low, high):
        return tuple(torch.randint(3, VOCAB, (int(torch.randint(low, high, ())),)).tolist())

    return [TokenizedPair(ids(3, 9), ids(1, 9) + (EOS,), ids(1, 9) + (EOS,)) for _ in range(n)]


def config(**overrides):
    base = dict(mode="spin", optimizer="adamw", learning_rate=1e-3, schedule="constant", warmup_ratio=0.0,
                epochs=2, global_batch=4, micro_batch_tokens=48, max_grad_norm=1.0, seed=7, backend="torch",
                progress=False)
    return TrainConfig(**(base | overrides))


# ------------------------------------------------------------------------ the naive reference
def padded_sequence_logps(model, sequences, dtype=torch.float32):
    """Sum of response-token log-probs per sequence: right-padded batch, full logits in `dtype`."""
    longest = max(len(p) + len(r) for p, r in sequences)
    input_ids = torch.zeros(len(sequences), longest, dtype=torch.long)
    attention = torch.zeros_like(input_ids)
    loss_mask = torch.zeros(len(sequences), longest, dtype=torch.bool)
    for row, (prompt, response) in enumerate(sequences):
        tokens = list(prompt) + list(response)
        input_ids[row, : len(tokens)] = torch.tensor(tokens)
        attention[row, : len(tokens)] = 1
        loss_mask[row, len(prompt) : len(tokens)] = True
    logits = model(input_ids=input_ids, attention_mask=attention).logits.to(dtype)
    logps = logits[:, :-1].log_softmax(-1).gather(2, input_ids[:, 1:, None]).squeeze(2)
    return (logps * loss_mask[:, 1:]).sum(1)


def naive_spin_training(model, pairs, cfg, steps, metrics=None):
    """SPIN written plainly: a second model as opponent, padded batches, AdamW, clipping. `metrics`, a list, gets
    each step's loss, mean rewards and margin, accuracy, gradient norm (before clipping) and its least |margin|."""
    opponent = copy.deepcopy(model).eval()
    optimizer = torch.optim.AdamW(model.parameters(), lr=cfg.learning_rate, eps=cfg.optimizer_eps,
                                  weight_decay=cfg.weight_decay)
    for step in range(steps):
        batch = [pairs[i] for i in step_items(len(pairs), cfg, step)]
        sequences = [(p.prompt_ids, p.real_ids) for p in batch] + [(p.prompt_ids, p.generated_ids) for p in batch]
        with torch.no_grad():
            opp = padded_sequence_logps(opponent, sequences)
        policy = padded_sequence_logps(model, sequences)
        n = len(batch)
        z = cfg.beta * ((policy[:n] - opp[:n]) - (policy[n:] - opp[n:]))
        loss = (-(1 - cfg.label_smoothing) * F.logsigmoid(z) - cfg.label_smoothing * F.logsigmoid(-z)).mean()
        optimizer.zero_grad()
        loss.backward()
        grad_norm = torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.max_grad_norm)
        optimizer.step()
        if metrics is not None:
            real, generated = cfg.beta * (policy[:n] - opp[:n]), cfg.beta * (policy[n:] - opp[n:])
            metrics.append({"loss": float(loss), "rewards/real": float(real.mean()),
                            "rewards/generated": float(generated.mean()), "rewards/margins": float(z.mean()),
                            "rewards/accuracies": float((z > 0).double().mean()), "grad_norm": float(grad_norm),
                            "least |margin|": float(z.abs().min())})
    return model


@pytest.mark.parametrize("attention", ["sdpa", "spin_varlen"], ids=["whole-sequences", "shared-prompts"])
def test_matches_naive_reference_spin(tmp_path, attention):
    pairs = random_pairs(6)  # 2 steps per epoch, the second with 2 pairs; micro-batches of <= 48 tokens
    # A large eps keeps Adam's update linear in the gradient, and a large lr makes each update much bigger
    # than the fp32 rounding of the weights: a strict test of the gradients themselves.
    cfg = config(optimizer_eps=1.0, learning_rate=0.1)
    initial = make_model()
    ours = make_model(attention=attention)
    expected = []
    reference = naive_spin_training(make_model(), pairs, cfg, steps=4, metrics=expected)
    scored = score_pairs(ours, pairs, token_budget=64)
    trainer = Trainer(ours, None, cfg, tmp_path, scored)
    assert trainer.share_prompts == (attention == "spin_varlen")
    result = trainer.train()
    assert result.steps == 4 and max(m["micro_batches"] for m in result.history) > 1
    assert_same_updates(ours, reference, initial)
    first = result.history[0]
    assert first["rewards/margins"] == pytest.approx(0.0, abs=1e-6)  # policy == opponent at step 0
    assert first["loss"] == pytest.approx(math.log(2), abs=1e-6)
    # Each step's metrics (the micro-batches' weighted by their pairs): the later steps', when policy and opponent
    # differ, tell a wrong weighting apart. A margin within rounding of 0 may count either way.
    for step, (got, truth) in enumerate(zip(result.history, expected)):
        names = ["loss", "rewards/real", "rewards/generated", "rewards/margins", "grad_norm"]
        for name in names + (["rewards/accuracies"] if truth["least |margin|"] > 1e-4 else []):
            assert got[name] == pytest.approx(truth[name], rel=1e-4, abs=1e-6), (step, name)
    assert expected[-1]["rewards/accuracies"] > 0 and expected[-1]["least |margin|"] > 1e-4


def test_label_smoothing_matches_naive_cdpo(tmp_path):
    pairs = random_pairs(6)
    cfg = config(optimizer_eps=1.0, learning_rate=0.1, label_smoothing=0.3)
    initial, ours = make_model(), make_model()
    reference = naive_spin_training(make_model(), pairs, cfg, steps=4)
    Trainer(ours, None, cfg, tmp_path, score_pairs(ours, pairs, token_budget=64)).train()
    assert_same_updates(ours, reference, initial)
    plain = naive_spin_training(make_model(), pairs, cfg.replace(label_smoothing=0.0), steps=4)
    assert change_gap(plain, reference, initial) > 0.1  # the smoothing changes the training


def assert_same_updates(ours, reference, initial, steps=4):
    """What training changed, parameter by parameter, relative to the change itself. The floor: each update
    rounds the weights to fp32 (half an ulp, 6e-8 relative; independent roundings add up as sqrt(steps)): a norm
    weight near 1 whose gradient happens to be small moves by little more than that rounding."""
    for (name, p), q, p0 in zip(ours.named_parameters(), reference.parameters(), initial.parameters()):
        ours_delta, reference_delta = (p - p0).double(), (q - p0).double()
        assert reference_delta.norm() > 0, name
        error = (ours_delta - reference_delta).norm() / reference_delta.norm()
        rounding = steps**0.5 * 2**-24 * p0.double().norm() / reference_delta.norm()
        assert error < 1e-4 + rounding, (name, error.item(), rounding.item())


def change_gap(ours, reference, initial) -> float:
    """How far what training changed differs from the reference's change, over all weights at once, relative to it."""
    def change(model):
        return torch.cat([(p - p0).detach().flatten() for p, p0 in zip(model.parameters(), initial.parameters())])

    ours_change, reference_change = change(ours).double(), change(reference).double()
    return float((ours_change - reference_change).norm() / reference_change.norm())


def test_shared_prompts_train_like_whole_sequences(tmp_path, monkeypatch):
    """The same run with pairs holding their prompt once and with every sequence whole: the same metrics and
    updates (to fp32 rounding), fewer tokens through the body, and tokens/s counted in whole sequences."""
    from spin_fast import training

    clock = iter(range(10**6))  # every step lasts exactly one second: tokens_per_s counts the step's tokens
    monkeypatch.setattr(training, "time", SimpleNamespace(perf_counter=lambda: float(next(clock))))
    pairs = random_pairs(6)
    scored = score_pairs(make_model(attention="spin_varlen"), pairs, token_budget=64)
    cfg = config(optimizer_eps=1.0, learning_rate=0.1, micro_batch_tokens=1000)
    models, histories = {}, {}
    for share in (False, True):
        models[share] = make_model(attention="spin_varlen")
        trainer = Trainer(models[share], None, cfg.replace(share_prompts=share), tmp_path / str(share), scored)
        histories[share] = trainer.train().history
    assert_same_updates(models[True], models[False], make_model())
    for shared, whole in zip(histories[True], histories[False]):
        for name in ("loss", "rewards/real", "rewards/generated", "rewards/margins", "grad_norm"):
            assert shared[name] == pytest.approx(whole[name], rel=1e-4, abs=1e-5), name
        # One micro-batch per step: the rows hold the step's tokens, a prompt once per pair when shared.
        assert shared["packing_efficiency"] < whole["packing_efficiency"]
    step_pairs = [pairs[i] for i in step_items(len(pairs), cfg, 0)]
    shared_tokens = sum(len(p.prompt_ids) + len(p.real_ids) + len(p.generated_ids) for p in step_pairs)
    assert histories[True][0]["packing_efficiency"] == pytest.approx(shared_tokens / 1000)
    whole_tokens = shared_tokens + sum(len(p.prompt_ids) for p in step_pairs)
    assert histories[True][0]["tokens_per_s"] == histories[False][0]["tokens_per_s"] == whole_tokens


def test_default_optimizer_settings_track_the_reference(tmp_path):
    """AdamW with its default eps: what 4 steps changed, over all weights, is the reference's to 1e-3. Adam
    normalizes each update to about lr, so a weight's change alone says little (reversed gradients move weights
    by as much), but fp32 noise flips the sign of near-zero gradients only: measured 1e-5 here, 2 with every
    gradient reversed."""
    pairs = random_pairs(6)
    cfg = config()
    ours, initial = make_model(), make_model()
    reference = naive_spin_training(make_model(), pairs, cfg, steps=4)
    Trainer(ours, None, cfg, tmp_path, score_pairs(ours, pairs, token_budget=64)).train()
    assert change_gap(ours, reference, initial) < 1e-3


def test_resume_after_a_kill_equals_an_uninterrupted_run(tmp_path, monkeypatch):
    pairs = random_pairs(6)
    scored = score_pairs(make_model(), pairs, token_budget=64)
    cfg = config(save_every=2)
    straight = make_model()
    Trainer(straight, None, cfg, tmp_path / "straight", scored).train()

    trainer = Trainer(make_model(), None, cfg, tmp_path / "killed", scored)
    killed_in_step(4, trainer, monkeypatch)  # checkpoint-2 exists, step 3 is lost
    assert [p.name for p in trainer.checkpoint_dirs()] == ["checkpoint-2"]
    with (tmp_path / "killed" / "metrics.jsonl").open("a") as log:  # as a kill in the middle of a line leaves it
        log.write('{"step": 4, "loss": 0.6')

    # Other training settings would be silently overruled by the checkpoint's optimizer and schedule state.
    with pytest.raises(ValueError, match=r"checkpoint-2: written with other training settings: learning_rate "
                                         r"\(saved 0.001, now 0.5\)"):
        Trainer(make_model(), None, cfg.replace(learning_rate=0.5), tmp_path / "killed", scored).train()
    resumed = make_model(seed=123)  # fresh process, other weights: the checkpoint must restore everything
    result = Trainer(resumed, None, cfg.replace(progress=not cfg.progress), tmp_path / "killed", scored).train()
    assert [m["step"] for m in result.history] == [3, 4]
    saved_seconds = torch.load(tmp_path / "killed" / "checkpoint-2" / "trainer_state.pt", weights_only=False)["seconds"]
    assert 0 < saved_seconds < result.seconds  # the training's time counts the interrupted call's, to its checkpoint
    for p, q in zip(resumed.parameters(), straight.parameters()):
        assert torch.equal(p, q)
    final = AutoModelForCausalLM.from_pretrained(result.final_dir)  # a plain HF checkpoint
    assert all(torch.equal(p, q) for p, q in zip(final.parameters(), straight.parameters()))
    lines = (tmp_path / "killed" / "metrics.jsonl").read_text().splitlines()
    assert [json.loads(line)["step"] for line in lines] == [1, 2, 3, 4]  # step 3 redone, logged once


def test_a_checkpoint_is_on_the_disk_before_its_name_marks_it_complete(tmp_path, monkeypatch):
    """spin_fast.files' rule for every file that marks work done: its data flushed before the rename that names it,
    so a power cut cannot leave checkpoint-N (which resume trusts, and an iteration's manifest names) holding empty
    or cut-short files. The checkpoint's files (weights, trainer state) were never fsynced before os.replace."""
    import os
    from pathlib import Path

    scored = score_pairs(make_model(), random_pairs(4), token_budget=64)
    synced, renamed = [], []
    fsync, replace = os.fsync, os.replace

    def recorded_fsync(fd):
        synced.append(os.readlink(f"/proc/self/fd/{fd}"))
        fsync(fd)

    def recorded_replace(source, target):
        if Path(target).name.startswith("checkpoint-"):
            renamed.append((Path(source), set(synced)))
        replace(source, target)

    monkeypatch.setattr(os, "fsync", recorded_fsync)
    monkeypatch.setattr(os, "replace", recorded_replace)
    Trainer(make_model(), None, config(epochs=1), tmp_path, scored).train()
    assert renamed
    for source, synced_before in renamed:
        for name in ("model.safetensors", "trainer_state.pt"):
            assert str(source / name) in synced_before, f"{source / name} not flushed before its checkpoint's rename"


def test_no_gradients_are_held_between_steps(tmp_path):
    """The gradients, a model-sized buffer, go after each optimizer step: not held between steps, nor after the
    training (the bench's held memory counts weights and optimizer state)."""
    model = make_model()
    trainer = Trainer(model, None, config(epochs=1, global_batch=2), tmp_path, score_pairs(make_model(),
                                                                                          random_pairs(4), 48))
    trainer.train_step()
    assert all(p.grad is None for p in model.parameters())


def test_a_kill_before_the_first_checkpoint_redoes_every_step_and_logs_it_once(tmp_path, monkeypatch):
    scored = score_pairs(make_model(), random_pairs(6), token_budget=64)
    cfg = config(save_every=0)  # a checkpoint at the end only
    trainer = Trainer(make_model(), None, cfg, tmp_path, scored)
    killed_in_step(3, trainer, monkeypatch)
    assert trainer.checkpoint_dirs() == []
    result = Trainer(make_model(), None, cfg, tmp_path, scored).train()
    assert [m["step"] for m in result.history] == [1, 2, 3, 4]
    lines = (tmp_path / "metrics.jsonl").read_text().splitlines()
    assert [json.loads(line)["step"] for line in lines] == [1, 2, 3, 4]


def killed_in_step(step: int, trainer, monkeypatch) -> None:
    """trainer.train(), killed (KeyboardInterrupt) as the given step starts."""
    original_step, calls = Trainer.train_step, []

    def dying_step(self):
        calls.append(1)
        if len(calls) == step:
            raise KeyboardInterrupt
        return original_step(self)

    monkeypatch.setattr(Trainer, "train_step", dying_step)
    with pytest.raises(KeyboardInterrupt):
        trainer.train()
    monkeypatch.setattr(Trainer, "train_step", original_step)


def test_a_checkpoint_resumes_with_smaller_micro_batches_and_gradient_checkpointing(tmp_path, monkeypatch):
    """Out of memory after a checkpoint, a training goes on from it with smaller micro-batches and gradient
    checkpointing: the same steps cut otherwise, so the weights of an uninterrupted run up to rounding."""
    scored = score_pairs(make_model(), random_pairs(12), token_budget=64)
    cfg = config(save_every=1, epochs=1)
    straight = make_model()
    Trainer(straight, None, cfg, tmp_path / "straight", scored).train()
    trainer = Trainer(make_model(), None, cfg, tmp_path / "oom", scored)
    killed_in_step(3, trainer, monkeypatch)
    assert trainer.latest_checkpoint().name == "checkpoint-2"
    smaller = cfg.replace(micro_batch_tokens=34, gradient_checkpointing=True)  # 34: the longest pair's tokens
    resumed = make_model(seed=123)
    result = Trainer(resumed, None, smaller, tmp_path / "oom", scored).train()
    assert [m["step"] for m in result.history] == [3]
    assert result.history[0]["packing_efficiency"] != json.loads(
        (tmp_path / "straight" / "metrics.jsonl").read_text().splitlines()[2])["packing_efficiency"]
    deltas = [(p - q).abs().max().item() for p, q in zip(resumed.parameters(), straight.parameters())]
    assert max(deltas) < 1e-6  # 7e-9 when written


def test_a_checkpoint_cut_short_is_removed(tmp_path):
    """A kill (or a second stop signal) in the middle of writing checkpoint-5 leaves .tmp-checkpoint-5, which a
    resume from an earlier checkpoint may never write again (save_every may differ, or 5 was a stop's step)."""
    scored = score_pairs(make_model(), random_pairs(4), token_budget=64)
    cut_short = tmp_path / ".tmp-checkpoint-5"
    cut_short.mkdir()
    (cut_short / "model.safetensors").write_bytes(b"half a model")
    result = Trainer(make_model(), None, config(), tmp_path, scored).train()
    assert not cut_short.exists() and result.final_dir.name == f"checkpoint-{result.steps}"


def test_sft_mode_loss_is_token_mean_cross_entropy_and_falls(tmp_path):
    model = make_model()
    examples = [Sequence(p.prompt_ids, p.real_ids) for p in random_pairs(4)]
    cfg = config(mode="sft", global_batch=4, epochs=15, learning_rate=3e-3, micro_batch_tokens=24)
    with torch.no_grad():  # HF's own loss on the padded batch: mean CE over response tokens
        hf = padded_sequence_logps(model, [(e.prompt_ids, e.response_ids) for e in examples])
        expected = -hf.sum().item() / sum(len(e.response_ids) for e in examples)
    history = Trainer(model, None, cfg, tmp_path, examples).train().history
    assert history[0]["loss"] == pytest.approx(expected, rel=1e-5)
    assert history[-1]["loss"] < 0.5 * history[0]["loss"]


def test_sft_mode_matches_a_padded_reference(tmp_path):
    """SFT's gradient over micro-batches of uneven token counts: the mean cross-entropy over the step's response
    tokens, as one padded batch gives it (each micro-batch weighted by its tokens, not by its examples)."""
    examples = [Sequence(p.prompt_ids, p.real_ids) for p in random_pairs(6)]
    cfg = config(mode="sft", optimizer_eps=1.0, learning_rate=0.1, micro_batch_tokens=24)
    initial, ours, reference = make_model(), make_model(), make_model()
    optimizer = torch.optim.AdamW(reference.parameters(), lr=cfg.learning_rate, eps=cfg.optimizer_eps,
                                  weight_decay=cfg.weight_decay)
    for step in range(4):
        batch = [examples[i] for i in step_items(len(examples), cfg, step)]
        logps = padded_sequence_logps(reference, [(e.prompt_ids, e.response_ids) for e in batch])
        loss = -logps.sum() / sum(len(e.response_ids) for e in batch)
        optimizer.zero_grad()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(reference.parameters(), cfg.max_grad_norm)
        optimizer.step()
    result = Trainer(ours, None, cfg, tmp_path, examples).train()
    assert result.steps == 4 and max(m["micro_batches"] for m in result.history) > 1
    assert_same_updates(ours, reference, initial)


def test_nan_loss_stops_with_a_clear_message(tmp_path):
    model = make_model()
    scored = score_pairs(model, random_pairs(4), token_budget=64)
    with torch.no_grad():
        model.lm_head.weight[5] = float("nan")  # a model gone bad: every token's logsumexp is nan
    with pytest.raises(TrainingDiverged, match="step 1: the loss is nan"):
        Trainer(model, None, config(), tmp_path, scored).train()


def test_bad_items_are_refused_before_training_names_them(tmp_path):
    """Each item is checked when the trainer is built, named by its index: found at its step, it would end a
    run hours in. The index is said to count from 0, as the too-long item's is: a bare "item 3" read as counted from
    1 sent the user to the row before."""
    model = make_model()
    scored = score_pairs(model, random_pairs(4), token_budget=64)
    long = TokenizedPair((5,) * 30, (6,) * 20, (7,) * 20)
    for items, message in [
        ([], "nothing to train on"),
        ([*scored, Sequence((1,), (2,))],
         r"item 4 \(counted from 0\): mode='spin' trains on ScoredPair items, got Sequence"),
        ([*scored, *score_pairs(model, [long], token_budget=128)],
         r"^train.micro_batch_tokens=48: item 4 \(counted from 0\) takes 100 tokens: raise train.micro_batch_tokens"),
        ([*scored[:2], type(scored[2])(scored[2].prompt_ids + (VOCAB,), *astuple(scored[2])[1:])],
         rf"item 2 \(counted from 0\): token id {VOCAB} is outside the model's vocabulary \[0, {VOCAB}\)"),
        ([*scored[:3], type(scored[3])(*astuple(scored[3])[:3], float("nan"), -1.0)],
         r"item 3 \(counted from 0\): the opponent's log-probs are not finite \(nan, -1.0\)"),
    ]:
        with pytest.raises(ValueError, match=message):
            Trainer(model, None, config(), tmp_path, items)
    assert not list(tmp_path.iterdir())  # nothing written


def test_an_item_with_an_empty_part_or_a_negative_token_id_is_named_by_its_index(tmp_path):
    """A pair with a response (or prompt) of no tokens, or a negative id (a hand-made or edited pairs file), is
    refused naming the item, as the trainer's other checks name theirs: not by Sequence's own words alone."""
    model = make_model()
    scored = score_pairs(model, random_pairs(4), token_budget=64)
    item = r"item 2 \(counted from 0\): the pair's"
    for part, ids, message in [(2, (), rf"{item} generated_ids is empty"), (0, (), rf"{item} prompt_ids is empty"),
                               (1, (7, -3, EOS), rf"{item} real_ids holds a negative token id \(-3\)")]:
        fields = list(astuple(scored[2]))
        fields[part] = ids
        with pytest.raises(ValueError, match=message):
            Trainer(model, None, config(), tmp_path, [*scored[:2], type(scored[2])(*fields), scored[3]])
    assert not list(tmp_path.iterdir())  # nothing written


def test_scoring_names_the_pair_and_the_part_that_is_empty():
    """score_pairs, reward_margins and check_pairs_fit (a run's check before scoring) said only "Sequence.response_ids
    is empty": not which pair, nor whether its real or its generated response. Refused before any model runs."""
    from spin_fast.evaluation import reward_margins
    from spin_fast.scoring import check_pairs_fit

    good = TokenizedPair((1, 2), (3, EOS), (4, EOS))
    for bad, part in [(TokenizedPair((1, 2), (), (4, EOS)), "real_ids is empty"),
                      (TokenizedPair((1, 2), (3, EOS), ()), "generated_ids is empty"),
                      (TokenizedPair((), (3, EOS), (4, EOS)), "prompt_ids is empty")]:
        with pytest.raises(ValueError, match=rf"^pair 1 \(counted from 0\): the pair's {part}"):
            score_pairs(None, [good, bad, good], token_budget=64)
        with pytest.raises(ValueError, match=rf"^pair 1 \(counted from 0\): the pair's {part}"):
            reward_margins(None, None, [good, bad], 0.1, 64)
        with pytest.raises(ValueError, match=rf"^iteration 0's pair 1 \(counted from 0\): the pair's {part}"):
            check_pairs_fit([good, bad], None, 64, "iteration 0's pair")
        with pytest.raises(ValueError, match=rf"^a.jsonl line 2: the pair's {part}"):
            check_pairs_fit([good, bad], None, 64, "pair", names=["a.jsonl line 1", "a.jsonl line 2"])


def test_a_checkpoint_of_other_items_or_not_named_by_step_is_not_resumed(tmp_path):
    scored = score_pairs(make_model(), random_pairs(4), token_budget=64)
    Trainer(make_model(), None, config(epochs=1), tmp_path, scored).train()
    (tmp_path / "checkpoint-best").mkdir()  # a user's copy: not one of the trainer's checkpoints
    shutil.copy(tmp_path / "checkpoint-1" / "trainer_state.pt", tmp_path / "checkpoint-best")
    assert [p.name for p in Trainer(make_model(), None, config(epochs=1), tmp_path, scored).checkpoint_dirs()] == [
        "checkpoint-1"]
    other = score_pairs(make_model(seed=1), random_pairs(4), token_budget=64)  # as many items, other ones
    with pytest.raises(ValueError, match="checkpoint-1: written by a training on other items"):
        Trainer(make_model(), None, config(epochs=1), tmp_path, other).train()
    real = list(scored[1].real_ids)
    real[len(real) // 2] = (real[len(real) // 2] + 1) % VOCAB  # one token deep inside one item
    one_token_off = [scored[0], replace(scored[1], real_ids=tuple(real)), *scored[2:]]
    with pytest.raises(ValueError, match="4 items, as this one, but other tokens"):
        Trainer(make_model(), None, config(epochs=1), tmp_path, one_token_off).train()


def test_an_sft_checkpoint_of_another_starting_model_is_not_resumed(tmp_path, monkeypatch, caplog):
    """SFT items hold no trace of the model (SPIN's opponent log-probs do): the checkpoint names where it started."""
    for seed in (0, 1):
        make_model(seed).save_pretrained(tmp_path / f"model-{seed}")
    examples = [Sequence(p.prompt_ids, p.real_ids) for p in random_pairs(4)]
    cfg = config(mode="sft", epochs=1)

    def sft(seed):
        model = AutoModelForCausalLM.from_pretrained(tmp_path / f"model-{seed}")
        return Trainer(model, None, cfg, tmp_path / "sft", examples).train()

    sft(0)
    with pytest.raises(ValueError, match=rf"checkpoint-1: written by a training that started from "
                                         rf"{tmp_path / 'model-0'}; this one starts from {tmp_path / 'model-1'}"):
        sft(1)
    caplog.set_level("WARNING", logger="spin_fast.training")
    assert sft(0).steps == 1 and not caplog.records  # the same model and code: resumed, silently
    monkeypatch.setattr("spin_fast.training.code_version", lambda: "0.1.0+another")
    sft(0)
    assert "checkpoint-1 was written by spin-fast 0.1.0+" in caplog.text and "this is spin-fast 0.1.0+another" in \
        caplog.text


def test_a_model_whose_generation_config_transformers_would_not_save_trains_to_a_checkpoint_that_keeps_it(tmp_path):
    """Many Hub models ship a generation_config.json that transformers loads with a warning but refuses to save
    (temperature and top_p without do_sample, as Llama 2's first one and its fine-tunes): their training ended with an
    error at its first checkpoint, after its steps, and wrote nothing. The checkpoint keeps that file's settings."""
    from spin_fast.model import load_causal_lm

    make_model().save_pretrained(tmp_path / "model")
    generation = {"bos_token_id": 1, "eos_token_id": [2, 5], "temperature": 0.6, "top_p": 0.9, "max_length": 4096}
    (tmp_path / "model" / "generation_config.json").write_text(json.dumps(generation))
    model = load_causal_lm(tmp_path / "model", attention_impl="sdpa")
    examples = [Sequence(p.prompt_ids, p.real_ids) for p in random_pairs(4)]
    result = Trainer(model, None, config(mode="sft", epochs=1), tmp_path / "sft", examples).train()
    saved = json.loads((result.final_dir / "generation_config.json").read_text())
    assert {k: saved.get(k) for k in generation} == generation
    reloaded = AutoModelForCausalLM.from_pretrained(result.final_dir)
    assert reloaded.generation_config.eos_token_id == [2, 5] and reloaded.generation_config.temperature == 0.6


def test_bad_config_is_refused():
    for kwargs, message in [(dict(optimizer="sgd"), "optimizer must be one of"),
                            (dict(warmup_ratio=1.5), "warmup_ratio must be in"),
                            (dict(epochs=1.5), "setting 'epochs' must be int, got 1.5"),  # built in Python too
                            (dict(share_prompts="no"), "setting 'share_prompts' must be bool"),
                            (dict(max_grad_norm=float("nan")), "max_grad_norm must be a finite number >= 0"),
                            (dict(optimizer_eps=0.0), "optimizer_eps must be a finite number > 0")]:
        with pytest.raises(ValueError, match=message):
            TrainConfig(**kwargs)


def test_gradient_checkpointing_is_switched_on_for_a_model_loaded_elsewhere(tmp_path):
    model = make_model()
    scored = score_pairs(model, random_pairs(4), token_budget=64)
    Trainer(model, None, config(gradient_checkpointing=True, epochs=1), tmp_path, scored)
    assert model.is_gradient_checkpointing


@pytest.mark.parametrize("attention", ["sdpa", "spin_varlen"], ids=["whole-sequences", "shared-prompts"])
def test_scores_are_the_padded_batch_log_probs(attention):
    """The opponent's scores, packed (a pair's prompt held once with spin_varlen), against a padded batch with
    full logits."""
    pairs = random_pairs(7)
    model = make_model(attention=attention).double()  # in float64, each side's rounding is far below the bound
    scored = score_pairs(model, pairs, token_budget=40)
    with torch.no_grad():
        padded = padded_sequence_logps(make_model().double(), [(p.prompt_ids, p.real_ids) for p in pairs] +
                                       [(p.prompt_ids, p.generated_ids) for p in pairs], dtype=torch.float64)
    got = torch.tensor([s.opponent_real for s in scored] + [s.opponent_generated for s in scored], dtype=torch.float64)
    assert torch.allclose(got, padded, rtol=1e-10, atol=1e-10), (got - padded).abs().max()


@pytest.mark.parametrize("attention", ["sdpa", "spin_varlen"], ids=["whole-sequences", "shared-prompts"])
def test_scoring_packs_first_fit_decreasing_in_fewer_passes(attention):
    """Three long pairs, then three short ones, in a 40-token budget: packed in data order (next fit) the short ones
    share a fourth pass; longest first, each into the first row it fits, they join the long ones' rows (3 passes).
    The sums stay the padded batch's in float64."""
    from spin_fast.model import body

    def pair(prompt, response):
        def ids(n):
            return tuple(torch.randint(3, VOCAB, (n - 1,)).tolist()) + (EOS,)
        return TokenizedPair(ids(prompt), ids(response), ids(response))

    pairs = [pair(6, 8) for _ in range(3)] + [pair(3, 2) for _ in range(3)]  # 28 and 10 tokens (22 and 7 shared)
    model = make_model(attention=attention).double()
    passes = []
    body(model).register_forward_hook(lambda module, args, out: passes.append(1))
    scored = score_pairs(model, pairs, token_budget=40)
    assert len(passes) == 3
    with torch.no_grad():
        padded = padded_sequence_logps(make_model().double(), [(p.prompt_ids, p.real_ids) for p in pairs] +
                                       [(p.prompt_ids, p.generated_ids) for p in pairs], dtype=torch.float64)
    got = torch.tensor([s.opponent_real for s in scored] + [s.opponent_generated for s in scored], dtype=torch.float64)
    assert torch.allclose(got, padded, rtol=1e-10, atol=1e-10), (got - padded).abs().max()


def test_a_pair_of_an_example_takes_its_human_response_as_the_real_one():
    from spin_fast.data import TokenizedExample

    pair = TokenizedPair.of(TokenizedExample((1, 2), (3, EOS), (4, 5, EOS)))
    assert pair == TokenizedPair(prompt_ids=(1, 2), real_ids=(3, EOS), generated_ids=(4, 5, EOS))
    with pytest.raises(ValueError, match="no generated response yet"):
        TokenizedPair.of(TokenizedExample((1, 2), (3, EOS), None))


def test_scoring_leaves_the_model_in_the_mode_it_found_it_in():
    """Scoring runs in eval mode (no dropout), then gives the caller's model back as it was: a caller training
    after scoring would otherwise train without its dropout."""
    model = make_model()
    for training in (True, False):
        model.train(training)
        score_pairs(model, random_pairs(2), token_budget=64)
        assert model.training == training


def test_scored_pairs_round_trip(tmp_path):
    scored = score_pairs(make_model(), random_pairs(3), token_budget=40)  # a pair of whole sequences: up to 34 tokens
    save_scored_pairs(tmp_path / "pairs.jsonl", scored)
    assert load_scored_pairs(tmp_path / "pairs.jsonl") == scored
    save_scored_pairs(tmp_path / "one.jsonl", [ScoredPair((1, 2), (3,), (4, 2), -1.5, -2.0)])  # the format runs keep
    assert (tmp_path / "one.jsonl").read_text() == ('{"prompt_ids": [1, 2], "real_ids": [3], "generated_ids": [4, 2], '
                                                    '"opponent_real": -1.5, "opponent_generated": -2.0}\n')
    (tmp_path / "bad.jsonl").write_text('{"prompt_ids": [1]}\n')
    with pytest.raises(ValueError, match="bad.jsonl line 1: not a scored pair"):
        load_scored_pairs(tmp_path / "bad.jsonl")
    line = (tmp_path / "one.jsonl").read_text()
    for bad_ids, named in (("[4, 7.0, -3]", "integers >= 0, got 7.0"), ("[false]", "integers >= 0, got False"),
                           ('"42"', "a list of integers, got a string '42'"), ("[4, -2]", "integers >= 0, got -2")):
        (tmp_path / "bad.jsonl").write_text(line + line.replace("[4, 2]", bad_ids))
        with pytest.raises(ValueError, match=f"bad.jsonl line 2: not a scored pair .*expected {named}"):
            load_scored_pairs(tmp_path / "bad.jsonl")
    (tmp_path / "equal.jsonl").write_text(line + line.replace("[4, 2]", "[4.0, true]"))  # equal to ids seen before
    assert [type(i) for i in load_scored_pairs(tmp_path / "equal.jsonl")[1].generated_ids] == [int, int]


def test_loaded_pairs_hold_one_int_object_per_distinct_token_id(tmp_path):
    """A run holds its pairs through training: their tuples share one int per distinct id (data.SharedIds), 8 bytes a
    token where json's own ints take 36 (ids above 256, which CPython does not share itself)."""
    generator = torch.Generator().manual_seed(0)
    pairs = [ScoredPair(*(tuple(torch.randint(300, 400, (20,), generator=generator).tolist()) for _ in range(3)),
                        -1.5, -2.5) for _ in range(10)]
    save_scored_pairs(tmp_path / "pairs.jsonl", pairs)
    loaded = load_scored_pairs(tmp_path / "pairs.jsonl")
    assert loaded == pairs
    ids = [i for p in loaded for i in (*p.prompt_ids, *p.real_ids, *p.generated_ids)]
    assert len({id(i) for i in ids}) == len(set(ids)) <= 100 < len(ids)


def test_bf16_autocast_steps_track_fp32(tmp_path):
    """Two steps under bf16 autocast change the weights as fp32 does, to bf16's 1e-2 over all weights (measured
    3e-3; 2 with every gradient reversed). eps=1 makes each update proportional to its gradient."""
    pairs = random_pairs(4)
    scored = score_pairs(make_model(), pairs, token_budget=64)
    cfg = config(epochs=2, optimizer_eps=1.0, learning_rate=0.1)
    initial, fp32_model, bf16_model = make_model(), make_model(), make_model()
    fp32 = Trainer(fp32_model, None, cfg, tmp_path / "fp32", scored).train().history
    bf16 = Trainer(bf16_model, None, cfg.replace(bf16_autocast=True), tmp_path / "bf16", scored).train().history
    assert len(fp32) == len(bf16) == 2
    assert change_gap(bf16_model, fp32_model, initial) < 1e-2
    for ours_step, reference_step in zip(bf16, fp32, strict=True):
        assert ours_step["loss"] == pytest.approx(reference_step["loss"], abs=2e-3)
        assert ours_step["grad_norm"] == pytest.approx(reference_step["grad_norm"], rel=2e-2)


@pytest.mark.parametrize("dtype, bound", [("float16", 0.06), ("bfloat16", 0.25)])
def test_low_precision_weights_train_like_fp32(tmp_path, dtype, bound):
    """fp16 or bf16 weights, scored and trained in their own dtype without DeepSpeed, change as fp32 weights do, up
    to the rounding of the weights themselves (measured 0.02 in fp16, 0.1 in bf16; about 2 with every gradient
    reversed; losses 8e-4 apart at most in 12 draws), over two steps large enough (lr 0.1) not to round away."""
    pairs = random_pairs(4)
    cfg = config(epochs=2, optimizer_eps=1.0, learning_rate=0.1)
    initial, fp32_model, model = make_model(), make_model(), make_model().to(getattr(torch, dtype))
    fp32 = Trainer(fp32_model, None, cfg, tmp_path / "fp32", score_pairs(initial, pairs, token_budget=64)).train()
    scored = score_pairs(model, pairs, token_budget=64)
    ours = Trainer(model, None, cfg.replace(dtype=dtype), tmp_path / dtype, scored).train()
    assert next(model.parameters()).dtype == getattr(torch, dtype)
    assert change_gap(model.float(), fp32_model, initial) < bound
    # Scored in its dtype, so policy == opponent at step 0 (up to 1e-5: scoring and training round apart).
    assert ours.history[0]["loss"] == pytest.approx(math.log(2), abs=5e-5)
    for ours_step, reference_step in zip(ours.history, fp32.history, strict=True):
        assert ours_step["loss"] == pytest.approx(reference_step["loss"], abs=5e-3)
        assert ours_step["grad_norm"] == pytest.approx(reference_step["grad_norm"], rel=2e-2)


def test_bf16_autocast_scores_start_the_loss_at_log_2(tmp_path):
    """The opponent is scored in the training's precision, so at step 0 (policy == opponent) the rewards are 0 and
    the loss log 2, up to the rounding of bf16 kernels run with and without gradients (at most 8e-7 over 25 draws).
    Scored in fp32 under a bf16 training, they were off by 8e-6 or more (same draws) even on this tiny model."""
    pairs = random_pairs(1)  # one pair, one step: scoring and training pack the very same row
    scored = score_pairs(make_model(), pairs, token_budget=48, bf16_autocast=True)
    cfg = config(epochs=1, global_batch=1, bf16_autocast=True)
    first = Trainer(make_model(), None, cfg, tmp_path, scored).train().history[0]
    assert first["rewards/real"] == pytest.approx(0.0, abs=4e-6)
    assert first["rewards/generated"] == pytest.approx(0.0, abs=4e-6)
    assert first["loss"] == pytest.approx(math.log(2), abs=1e-6)


@pytest.mark.parametrize("attention", ["sdpa", "spin_varlen"])
def test_spin_trains_without_dropout(tmp_path, attention):
    """As the official SPIN trainer: the policy's log-probs are compared with the opponent's, computed without
    dropout, so a model with attention dropout starts at log 2 too (and spin_varlen, which has none, can train it)."""
    pairs = random_pairs(1)
    scored = score_pairs(make_model(attention=attention, attention_dropout=0.5), pairs, token_budget=48)
    model = make_model(attention=attention, attention_dropout=0.5)
    first = Trainer(model, None, config(epochs=1, global_batch=1), tmp_path, scored).train().history[0]
    # Up to rounding (at most 4e-7 over 20 draws); with dropout on, 0.004 and more.
    assert first["rewards/real"] == pytest.approx(0.0, abs=2e-6)
    assert first["rewards/generated"] == pytest.approx(0.0, abs=2e-6)
    assert model.config.attention_dropout == 0.5  # the saved model keeps its own settings


@pytest.mark.parametrize("family, rates", [("OPT", dict(dropout=0.3, ffn_dim=64, word_embed_proj_dim=32)),
                                           ("Starcoder2", dict(residual_dropout=0.3, embedding_dropout=0.3,
                                                               intermediate_size=64))])
def test_spin_starts_at_log_2_in_models_whose_layers_apply_dropout_themselves(tmp_path, family, rates):
    """OPT (config.dropout, 0.1 in facebook/opt-*) and StarCoder2 call nn.functional.dropout with a rate held on
    the module, not through nn.Dropout: it goes too, or the policy's log-probs at step 0 differ from the
    opponent's (scored in eval mode)."""
    import transformers

    sizes = dict(vocab_size=VOCAB, hidden_size=32, num_hidden_layers=2, num_attention_heads=2)
    if family == "Starcoder2":
        sizes["num_key_value_heads"] = 2
    model_config = getattr(transformers, f"{family}Config")(**sizes, **rates)
    spin_attention.register()
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(model_config, attn_implementation=spin_attention.NAME)
    scored = score_pairs(model, random_pairs(1), token_budget=48, backend="torch")
    first = Trainer(model, None, config(epochs=1, global_batch=1), tmp_path, scored).train().history[0]
    # With the dropout on, 0.009 and more.
    assert first["rewards/real"] == pytest.approx(0.0, abs=2e-6)
    assert first["rewards/generated"] == pytest.approx(0.0, abs=2e-6)
    assert first["loss"] == pytest.approx(math.log(2), abs=1e-6)


def test_official_spin_pair_file_trains_end_to_end(tmp_path):
    """An official SPIN data file (real / generated message lists) -> tokens -> scores -> one step."""
    from spin_fast.data import load_examples, tokenize_example
    from spin_fast.scoring import TokenizedPair
    from spin_fast.tokenizer import build_local_tokenizer

    tokenizer = build_local_tokenizer(vocab_size=300)
    rows = [{"real": [{"role": "user", "content": f"What is {i} plus {i}?"},
                      {"role": "assistant", "content": f"It is {2 * i}."}],
             "generated": [{"role": "user", "content": f"What is {i} plus {i}?"},
                           {"role": "assistant", "content": f"Maybe {i + 1}."}]} for i in range(5)]
    path = tmp_path / "train.jsonl"
    path.write_text("\n".join(json.dumps(r) for r in rows))
    examples = load_examples(path).examples
    pairs = [TokenizedPair.of(tokenize_example(tokenizer, e, max_length=64, max_prompt_length=32)) for e in examples]
    model = make_model()
    scored = score_pairs(model, pairs, token_budget=256)
    history = Trainer(model, tokenizer, config(epochs=1, micro_batch_tokens=256), tmp_path / "run", scored).train()
    assert history.steps == 2 and 0 < history.history[0]["packing_efficiency"] <= 1
    assert (history.final_dir / "tokenizer_config.json").exists()


@pytest.mark.parametrize("schedule", ["linear", "cosine", "constant"])
def test_learning_rate_schedules(schedule):
    from spin_fast.training import lr_factor

    cfg = config(schedule=schedule, warmup_ratio=0.1)
    factors = [lr_factor(step, 100, cfg) for step in range(100)]
    assert factors[:10] == pytest.approx([(s + 1) / 10 for s in range(10)])  # linear warmup over 10% of steps
    assert factors[10] == pytest.approx(1.0)
    tail = {"linear": 1 - 89 / 90, "cosine": 0.5 * (1 + __import__("math").cos(__import__("math").pi * 89 / 90)),
            "constant": 1.0}[schedule]
    assert factors[-1] == pytest.approx(tail)
    assert all(a >= b for a, b in zip(factors[10:], factors[11:]))  # never rises after warmup


def test_the_trainer_steps_at_the_scheduled_learning_rates(tmp_path):
    """What each step logs as its learning rate, and what the optimizer steps with, is lr_factor's schedule."""
    from spin_fast.training import lr_factor

    scored = score_pairs(make_model(), random_pairs(8), token_budget=64)
    cfg = config(schedule="linear", warmup_ratio=0.25, global_batch=2, epochs=2)
    trainer = Trainer(make_model(), None, cfg, tmp_path, scored)
    used = []
    trainer.optimizer.register_step_pre_hook(lambda optimizer, *_: used.append(optimizer.param_groups[0]["lr"]))
    history = trainer.train().history
    scheduled = [cfg.learning_rate * lr_factor(k, 8, cfg) for k in range(8)]
    assert [m["lr"] for m in history] == pytest.approx(scheduled) and used == pytest.approx(scheduled)
    assert scheduled[:2] == pytest.approx([5e-4, 1e-3]) and scheduled[-1] == pytest.approx(1e-3 / 6)


def test_bf16_weights_without_deepspeed_warn_of_lost_updates(tmp_path, caplog):
    """In bf16 an update of lr 5e-7 rounds away on every weight above 5e-7 * 2^8 = 1.3e-4 in size: the warning
    gives that share, which is counted here independently, weight by weight, as the update itself would."""
    scored = score_pairs(make_model(), random_pairs(2), token_budget=64)
    for dtype in (torch.float32, torch.bfloat16):
        caplog.clear()
        model = make_model().to(dtype)
        with caplog.at_level(logging.WARNING, logger="spin_fast.training"):
            Trainer(model, None, config(learning_rate=5e-7), tmp_path / str(dtype), scored)
        warnings = [r.getMessage() for r in caplog.records if "without DeepSpeed" in r.getMessage()]
        if dtype == torch.float32:
            assert not warnings
            continue
        weights = torch.cat([p.detach().flatten() for p in model.parameters()])
        lost = ((weights + 5e-7).to(dtype) == weights).float().mean().item()  # an update of 5e-7 that changes nothing
        assert len(warnings) == 1 and "set train.dtype=float32 with train.bf16_autocast=true" in warnings[0]
        share = float(warnings[0].split("% of them")[0].rsplit(" ", 1)[1])
        assert share == pytest.approx(100 * lost, abs=2.0), (share, lost)


def test_only_the_last_checkpoints_are_kept_in_step_order(tmp_path):
    """keep_checkpoints=3 over 12 steps: checkpoint-10 to -12 stay (in step order, not the names' order, where
    checkpoint-9 sorts after checkpoint-12), and a folder of the user's that looks like one is left alone."""
    (tmp_path / "checkpoint-best").mkdir()
    scored = score_pairs(make_model(), random_pairs(12), token_budget=64)
    cfg = config(global_batch=1, epochs=1, save_every=1, keep_checkpoints=3)
    assert Trainer(make_model(), None, cfg, tmp_path, scored).train().steps == 12
    assert sorted(p.name for p in tmp_path.glob("checkpoint-*")) == [
        "checkpoint-10", "checkpoint-11", "checkpoint-12", "checkpoint-best"]
    # A kill between the last checkpoint's rename and the removal of older ones: started again, it removes them.
    shutil.copytree(tmp_path / "checkpoint-10", tmp_path / "checkpoint-9")
    assert Trainer(make_model(), None, cfg, tmp_path, scored).train().steps == 12
    assert sorted(p.name for p in tmp_path.glob("checkpoint-*")) == [
        "checkpoint-10", "checkpoint-11", "checkpoint-12", "checkpoint-best"]


def test_a_checkpoint_killed_while_being_removed_is_removed_on_resume(tmp_path, monkeypatch):
    """A kill in the middle of removing an old checkpoint (shutil.rmtree, one file after another) leaves
    checkpoint-N without its trainer state but maybe with its weights: no longer a checkpoint to resume or to
    remove, it stayed for good, a model's size on the disk."""
    from spin_fast import training

    scored = score_pairs(make_model(), random_pairs(6), token_budget=64)
    cfg = config(global_batch=1, epochs=1, save_every=1, keep_checkpoints=2)
    rmtree = shutil.rmtree

    def killed_removing(path, ignore_errors=False):
        if (Path(path) / "trainer_state.pt").exists():  # the first old checkpoint removed: checkpoint-1, as rmtree
            (Path(path) / "trainer_state.pt").unlink()  # may leave it, the state file gone, the weights not yet
            raise KeyboardInterrupt
        rmtree(path, ignore_errors=ignore_errors)

    monkeypatch.setattr(training.shutil, "rmtree", killed_removing)
    with pytest.raises(KeyboardInterrupt):
        Trainer(make_model(), None, cfg, tmp_path, scored).train()
    monkeypatch.setattr(training.shutil, "rmtree", rmtree)
    assert list(tmp_path.glob("*checkpoint-1*/model.safetensors"))  # its weights are left
    assert Trainer(make_model(), None, cfg, tmp_path, scored).train().steps == 6
    assert sorted(p.name for p in tmp_path.glob("*checkpoint-*")) == ["checkpoint-5", "checkpoint-6"]


def test_each_epoch_visits_every_item_once_in_its_own_order():
    n_items = int(torch.randint(10, 40, ()))  # 10! orders and more: two epochs alike would be a bug, not chance
    cfg = config(global_batch=int(torch.randint(1, 8, ())), seed=int(torch.randint(0, 2**31, ())))
    per_epoch = -(-n_items // cfg.global_batch)

    def epoch(e, config):
        return [i for k in range(per_epoch) for i in step_items(n_items, config, e * per_epoch + k)]

    epochs = [epoch(e, cfg) for e in range(3)]
    assert all(sorted(order) == list(range(n_items)) for order in epochs)
    assert len({tuple(order) for order in epochs}) == 3  # reshuffled each epoch
    assert epoch(1, cfg.replace(epochs=5)) == epochs[1]  # the order is the seed's, whatever else changes
    assert epoch(0, cfg.replace(seed=cfg.seed + 1)) != epochs[0]


@pytest.mark.parametrize("loss_type,first_loss", [("hinge", 1.0), ("ipo", 25.0)])
def test_other_loss_types_train(tmp_path, loss_type, first_loss):
    """At step 0 the policy is its opponent (z = 0): hinge max(0, 1 - 0) = 1, IPO (0 - 1 / (2 * 0.1))^2 = 25."""
    scored = score_pairs(make_model(), random_pairs(4), token_budget=64)
    history = Trainer(make_model(), None, config(loss_type=loss_type, epochs=2), tmp_path, scored).train().history
    assert history[0]["loss"] == pytest.approx(first_loss, rel=1e-4)
    assert history[-1]["loss"] < history[0]["loss"]


def test_an_epoch_permutes_its_items_once_not_once_a_step(monkeypatch):
    """step_items drew the epoch's whole permutation of n items again at every step: n / global_batch steps an epoch,
    O(n^2 / global_batch) per epoch (400k pairs, the 200k prompts of UltraChat mixed with the previous iteration's:
    6250 permutations of 400k items an epoch, minutes of CPU while the GPUs wait). The order stays the same."""
    n_items, config = 1000, TrainConfig(global_batch=64, epochs=2)
    per_epoch = -(-n_items // config.global_batch)
    expected = [epoch_order(n_items, config.seed, epoch) for epoch in range(2)]
    drawn = []
    real_randperm = torch.randperm
    monkeypatch.setattr(torch, "randperm", lambda n, **kw: drawn.append(n) or real_randperm(n, **kw))
    steps = [step_items(n_items, config, step) for step in range(2 * per_epoch)]
    assert [i for step in steps[:per_epoch] for i in step] == expected[0]
    assert [i for step in steps[per_epoch:] for i in step] == expected[1]
    assert len(drawn) <= 2, f"{len(drawn)} permutations of {n_items} items for {2 * per_epoch} steps of 2 epochs"


def test_a_checkpoint_of_one_optimizer_group_under_weight_decay_is_named_with_why(tmp_path):
    """Older code gave the optimizer one parameter group under train.weight_decay > 0; biases and norm weights now
    have their own, undecayed group. Such a checkpoint is refused naming itself and why, not with torch's bare
    error about the number of parameter groups."""
    scored = score_pairs(make_model(), random_pairs(4), token_budget=64)
    cfg = config(epochs=1, weight_decay=0.1)
    Trainer(make_model(), None, cfg, tmp_path, scored).train()
    state_file = tmp_path / "checkpoint-1" / "trainer_state.pt"
    state = torch.load(state_file, weights_only=False)
    assert len(state["optimizer"]["param_groups"]) == 2
    model = make_model()
    old = torch.optim.AdamW(model.parameters(), lr=cfg.learning_rate, weight_decay=cfg.weight_decay)  # older code's
    model(torch.tensor([[3, 4, 5]])).logits.sum().backward()
    old.step()
    state["optimizer"] = old.state_dict()
    torch.save(state, state_file)
    with pytest.raises(ValueError, match=r"checkpoint-1: written by older spin-fast code with 1 optimizer parameter "
                                         r"group\(s\) under train\.weight_decay=0\.1, where this training has 2: "
                                         r"weight decay now leaves biases and norm weights out"):
        Trainer(make_model(), None, cfg, tmp_path, scored).train()


def test_ranks_pack_a_step_in_few_micro_batches(tmp_path):
    """Every rank runs as many micro-batches as the busiest one, so a step costs world * max(micro-batches of a rank)
    forward and backward passes. On UltraChat-like pairs (seeded lognormal prompt and response lengths, each sequence
    cut to 1024 tokens, prompts shared), 8 ranks and a 4096-token budget, each rank packed its share in the step's
    order, one micro-batch after the other (next fit): 16% more passes than the token bound
    world * ceil(step tokens / (world * budget)), each a full forward and backward. Packing each rank's share
    first-fit decreasing comes within 3%."""
    rng = random.Random(0)

    def length(median, sigma, most):
        return max(1, min(most, int(rng.lognormvariate(math.log(median), sigma))))

    pairs = []
    for _ in range(2048):
        prompt = (3,) * length(120, 0.9, 1023)
        pairs.append(ScoredPair(prompt, (4,) * length(250, 0.7, 1024 - len(prompt)),
                                (5,) * length(250, 0.7, 1024 - len(prompt)), -1.0, -1.0))
    world, budget = 8, 4096
    trainer = Trainer(make_model(attention="spin_varlen"), None, config(global_batch=512, epochs=1,
                                                                           micro_batch_tokens=budget), tmp_path, pairs)
    assert trainer.share_prompts and trainer.steps == 4
    passes = bound = 0
    for step in range(trainer.steps):
        counts, seen = [], []
        for trainer.rank in range(world):
            trainer.world = world
            indices, groups, mine, batches = trainer.rank_share(step)
            counts.append(len(batches))
            assert all(batch.n_tokens <= budget for batch in batches)
            seen += [mine[i] for batch in batches for i in batch.group_indices.tolist()]
        assert sorted(seen) == list(range(len(indices))), "each pair once, on one rank"
        passes += world * max(counts)
        bound += world * math.ceil(sum(group_tokens(g, True) for g in groups) / (world * budget))
    assert passes <= 1.03 * bound, f"{passes} forward and backward passes, {bound} at the token bound"


def test_a_signal_during_a_checkpoint_save_stops_with_that_checkpoint(tmp_path, monkeypatch):
    """SIGTERM while checkpoint-2 (save_every=2) is being written: that checkpoint holds every step so far, so the
    training stops with it. It trained step 3 and wrote checkpoint-3 first: on a 7B model another step and a second
    whole checkpoint (minutes), past the grace a scheduler gives before its SIGKILL."""
    import os
    import signal

    import spin_fast.training
    from spin_fast import stopping

    scored = score_pairs(make_model(), random_pairs(12), token_budget=64)
    real_save = spin_fast.training.save_model

    def signalled_save(*args, **kwargs):
        if not any(tmp_path.glob("checkpoint-*")):  # the first checkpoint's weights are being written
            os.kill(os.getpid(), signal.SIGTERM)
        return real_save(*args, **kwargs)

    monkeypatch.setattr(spin_fast.training, "save_model", signalled_save)
    trainer = Trainer(make_model(), None, config(save_every=2), tmp_path, scored)
    with stopping.signals_handled(), pytest.raises(stopping.Stopped) as stopped:
        trainer.train()
    assert f"after spin training step 2 of 6, saved in {tmp_path / 'checkpoint-2'}" in str(stopped.value)
    assert [p.name for p in trainer.checkpoint_dirs()] == ["checkpoint-2"]
    steps = [json.loads(line)["step"] for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert steps == [1, 2]


def test_an_sft_with_dropout_resumed_in_a_fresh_process_equals_an_uninterrupted_run(tmp_path, monkeypatch):
    """SFT keeps the model's dropout: its draws after a resume come from the checkpoint's random state, not from
    wherever the resuming process's stream stands."""
    sequences = [Sequence(p.prompt_ids, p.real_ids) for p in random_pairs(6)]
    cfg = config(mode="sft", save_every=2)
    straight = make_model(attention_dropout=0.5)
    torch.manual_seed(1)
    Trainer(straight, None, cfg, tmp_path / "straight", sequences).train()
    torch.manual_seed(1)
    killed_in_step(4, Trainer(make_model(attention_dropout=0.5), None, cfg, tmp_path / "killed", sequences),
                   monkeypatch)
    monkeypatch.undo()
    torch.manual_seed(99)  # a fresh process's stream
    resumed = make_model(seed=123, attention_dropout=0.5)
    Trainer(resumed, None, cfg, tmp_path / "killed", sequences).train()
    for p, q in zip(resumed.parameters(), straight.parameters()):
        assert torch.equal(p, q)


def test_a_spin_checkpoint_is_not_resumed_with_another_beta(tmp_path, monkeypatch):
    """beta shapes SPIN's loss: a SPIN training resumed with another one is refused (SFT alone ignores it)."""
    scored = score_pairs(make_model(), random_pairs(6), token_budget=64)
    killed_in_step(4, Trainer(make_model(), None, config(save_every=2), tmp_path, scored), monkeypatch)
    with pytest.raises(ValueError, match=r"checkpoint-2: written with other training settings: beta"):
        Trainer(make_model(), None, config(save_every=2, beta=0.5), tmp_path, scored).train()


def test_scoring_makes_each_micro_batch_as_it_comes_to_it(monkeypatch):
    """A stage scored at once (save_every_prompts 0: 200k pairs) held every micro-batch's index tensors, its tokens
    again, before the first pass: each is made just before its pass now, and the scores are the same."""
    from spin_fast import packing, scoring
    from spin_fast.scoring import model_logprobs

    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(tiny_config("llama", vocab_size=64, hidden_size=32))
    groups = [[Sequence(tuple(torch.randint(1, 64, (int(torch.randint(1, 6, ())),)).tolist()),
                        tuple(torch.randint(1, 64, (int(torch.randint(1, 9, ())),)).tolist())) for _ in range(2)]
              for _ in range(30)]
    budget = 3 * max(group_tokens(g, False) for g in groups)
    expected = model_logprobs(model, groups, budget, backend="torch")
    events = []
    real_build, real_sums = packing._build, scoring._summed_logprobs
    monkeypatch.setattr(packing, "_build", lambda *args: events.append("made") or real_build(*args))
    monkeypatch.setattr(scoring, "_summed_logprobs", lambda *args: events.append("pass") or real_sums(*args))
    assert torch.equal(model_logprobs(model, groups, budget, backend="torch"), expected)
    passes = events.count("pass")
    assert passes > 3 and events == ["made"] + ["made", "pass"] * passes  # the filler, then one made per pass


def test_a_checkpoint_folder_without_its_state_is_refused_before_training_names_it(tmp_path):
    """checkpoint-2 without trainer_state.pt (made by hand, or by code older than the atomic rename) is not a
    checkpoint to resume; the save at step 2 could not rename its own over it ("Directory not empty"), the step's
    work lost. It is refused before any step, named, and left as it is."""
    scored = score_pairs(make_model(), random_pairs(4), token_budget=64)
    incomplete = tmp_path / "checkpoint-2"
    incomplete.mkdir()
    (incomplete / "model.safetensors").write_bytes(b"someone's weights")
    with pytest.raises(ValueError, match=r"checkpoint-2 has no trainer_state\.pt"):
        Trainer(make_model(), None, config(), tmp_path, scored).train()
    assert [p.name for p in incomplete.iterdir()] == ["model.safetensors"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["checkpoint-2"]  # refused before any step: no metrics
    # One a training never writes again (at or before its resumed step, or past its last) is left alone.
    shutil.move(incomplete, tmp_path / "checkpoint-3")
    assert Trainer(make_model(), None, config(), tmp_path, scored).train().final_dir.name == "checkpoint-2"

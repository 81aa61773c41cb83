"""The training loop's conventions against Hugging Face's Trainer (what the official SPIN code trained with) and
TRL's SFTTrainer: warmup and schedules, weight decay groups, optimizer settings, clipping, loss normalization over
micro-batches, epochs. Gradients are compared in float64, where a different weighting shows far above rounding."""

import math

import pytest
import torch
from test_training import config, make_model, random_pairs
from transformers import Trainer as HFTrainer
from transformers import TrainingArguments, get_scheduler

from spin_fast.packing import Sequence
from spin_fast.scoring import score_pairs
from spin_fast.training import Trainer, lr_factor, make_optimizer, total_steps

F64 = torch.float64


def hf_lrs(schedule, steps, warmup_ratio):
    """The learning rate of each of `steps` optimizer steps under HF's Trainer: its warmup steps (a ratio below 1
    is ceil(ratio * steps)) and get_scheduler's schedule, read before each optimizer step as the Trainer steps."""
    warmup = TrainingArguments("unused", warmup_steps=warmup_ratio, report_to=[]).get_warmup_steps(steps)
    optimizer = torch.optim.SGD([torch.zeros(1, requires_grad=True)], lr=1.0)
    scheduler = get_scheduler(schedule, optimizer, num_warmup_steps=warmup, num_training_steps=steps)
    lrs = []
    for _ in range(steps):
        lrs.append(optimizer.param_groups[0]["lr"])
        optimizer.step()
        scheduler.step()
    return warmup, lrs


@pytest.mark.parametrize("schedule,hf_name", [("linear", "linear"), ("cosine", "cosine"),
                                              ("constant", "constant_with_warmup")])
@pytest.mark.parametrize("steps", [7, 15, 25, 30, 101])
def test_schedules_match_hugging_face_after_warmup(schedule, hf_name, steps):
    """The same warmup steps as HF (ceil), the same lr at every step after it (the last one included); in warmup
    HF's lr one step later (the README's documented difference: the first step takes lr / warmup, not 0)."""
    cfg = config(schedule=schedule, warmup_ratio=0.1)
    warmup, hf = hf_lrs(hf_name, steps, cfg.warmup_ratio)
    ours = [lr_factor(step, steps, cfg) for step in range(steps)]
    assert math.ceil(cfg.warmup_ratio * steps) == warmup
    assert hf[0] == 0.0
    for step in range(warmup):
        assert ours[step] == pytest.approx(hf[step + 1] if step + 1 < warmup else 1.0, rel=1e-12), step
    assert ours[warmup:] == pytest.approx(hf[warmup:], rel=1e-12, abs=1e-15)
    assert ours[-1] == pytest.approx(hf[-1], rel=1e-12)


@pytest.mark.parametrize("family", ["llama", "qwen2"])
def test_weight_decay_spares_biases_and_norms_as_hugging_face(family):
    """HF's Trainer (and so the official SPIN code, and TRL's trainers) applies weight decay to every weight but
    biases and LayerNorm / RMSNorm weights: decaying a norm's gain pulls it towards 0, not towards the identity."""
    from transformers import AutoModelForCausalLM

    from spin_fast.model import tiny_config

    model = AutoModelForCausalLM.from_config(tiny_config(family, vocab_size=300))
    optimizer = make_optimizer(model, config(weight_decay=0.1))
    names = {id(p): name for name, p in model.named_parameters()}
    decayed = {names[id(p)] for group in optimizer.param_groups if group["weight_decay"] > 0 for p in group["params"]}
    spared = {names[id(p)] for group in optimizer.param_groups if group["weight_decay"] == 0 for p in group["params"]}
    hf = set(HFTrainer.get_decay_parameter_names(None, model))
    assert decayed == hf
    assert spared == set(names.values()) - hf and any("norm" in name for name in spared)
    if family == "qwen2":
        assert any(name.endswith("bias") for name in spared)
    assert all(group["weight_decay"] == 0.1 for group in optimizer.param_groups if group["weight_decay"] > 0)


@pytest.mark.parametrize("optim,ours", [("rmsprop", "rmsprop"), ("adamw_torch", "adamw")])
def test_optimizer_settings_are_hugging_face_defaults(optim, ours):
    """train.optimizer's optimizer is HF's optim= one, with HF's and torch's defaults for what spin-fast does not
    set (RMSprop: alpha 0.99, momentum 0, not centered; AdamW: betas (0.9, 0.999), eps 1e-8)."""
    model = make_model()
    args = TrainingArguments("unused", optim=optim, learning_rate=5e-7, weight_decay=0.0, report_to=[])
    cls, kwargs = HFTrainer.get_optimizer_cls_and_kwargs(args, model)
    hf = cls(model.parameters(), **kwargs, weight_decay=args.weight_decay)  # HF sets it per group
    mine = make_optimizer(model, config(optimizer=ours, learning_rate=5e-7))
    assert type(mine) is cls
    for group in mine.param_groups:
        settings = {k: v for k, v in group.items() if k != "params"}
        assert settings == {k: v for k, v in hf.param_groups[0].items() if k != "params"}


def step_gradients(model, items, tmp_path, **overrides):
    """The gradients held as the optimizer takes its first step (after clipping), on all `items` in one step."""
    cfg = config(epochs=1, global_batch=len(items), **overrides)
    trainer = Trainer(model, None, cfg, tmp_path, items)
    grads = []
    trainer.optimizer.register_step_pre_hook(
        lambda *_: grads.append([p.grad.detach().clone() for p in model.parameters()]) if not grads else None)
    history = trainer.train().history
    return grads[0], history[0]


def flat(grads):
    return torch.cat([g.flatten() for g in grads])


def gap(grads, reference):
    """The gradients' difference, over all weights at once, relative to the reference's norm."""
    return float((flat(grads) - flat(reference)).norm() / flat(reference).norm())


@pytest.mark.parametrize("attention", ["sdpa", "spin_varlen"], ids=["whole-sequences", "shared-prompts"])
def test_spin_step_is_the_mean_over_pairs_whatever_the_split(tmp_path, attention):
    """One step on 7 pairs, in float64: one micro-batch, or several of uneven pair counts, with prompts shared or
    not: the same gradient, the mean over the pairs. Shared and whole prompts agree to about 1e-7 only, as SDPA and
    eager attention do here (measured 9e-8): not a weighting, which would show at 1e-2."""
    pairs = random_pairs(7)
    scored = score_pairs(make_model(attention=attention).to(F64), pairs, token_budget=64)
    ones = {}
    for share in (False, True) if attention == "spin_varlen" else (False,):
        one, _ = step_gradients(make_model(attention=attention).to(F64), scored, tmp_path / f"{share}-one",
                                micro_batch_tokens=10_000, max_grad_norm=0.0, share_prompts=share)
        ones[share] = one
        for tokens in (48, 64):
            several, metrics = step_gradients(make_model(attention=attention).to(F64), scored,
                                              tmp_path / f"{share}-{tokens}", micro_batch_tokens=tokens,
                                              max_grad_norm=0.0, share_prompts=share)
            assert metrics["micro_batches"] > 1
            assert gap(several, one) < 1e-12, (share, tokens)
    if True in ones:
        assert gap(ones[True], ones[False]) < 1e-6


def test_clipping_is_on_the_global_norm_once_per_step(tmp_path):
    """Clipped as HF clips (torch's clip_grad_norm_ over all parameters), once, after every micro-batch has
    added its share: the accumulated gradient G scaled by max_norm / |G|, and |G| logged as grad_norm."""
    pairs = random_pairs(7)
    scored = score_pairs(make_model().to(F64), pairs, token_budget=64)
    whole, unclipped = step_gradients(make_model().to(F64), scored, tmp_path / "whole", micro_batch_tokens=10_000,
                                      max_grad_norm=0.0)
    norm = flat(whole).norm().item()
    max_norm = norm / 3
    clipped, metrics = step_gradients(make_model().to(F64), scored, tmp_path / "clipped", micro_batch_tokens=48,
                                      max_grad_norm=max_norm)
    assert metrics["micro_batches"] > 2
    assert metrics["grad_norm"] == pytest.approx(norm, rel=1e-9) and unclipped["grad_norm"] == pytest.approx(norm)
    torch.testing.assert_close(flat(clipped), flat(whole) * (max_norm / (norm + 1e-6)), rtol=1e-9, atol=1e-12)


def hf_sft_gradient(model, examples, per_device):
    """HF's Trainer (and TRL's SFTTrainer: sum of the token losses / num_items_in_batch) on the examples, in
    padded micro-batches of `per_device` examples accumulated to one step: the model's own loss with labels -100 on
    the prompt and num_items_in_batch the loss tokens of the whole step, each micro-batch's loss backpropagated
    as it is."""
    labels_of = [[-100] * len(e.prompt_ids) + list(e.response_ids) for e in examples]
    num_items = sum(sum(1 for t in labels[1:] if t != -100) for labels in labels_of)
    model.zero_grad()
    for start in range(0, len(examples), per_device):
        chunk = range(start, min(start + per_device, len(examples)))
        longest = max(examples[i].length for i in chunk)
        ids = torch.zeros(len(chunk), longest, dtype=torch.long)
        attention = torch.zeros_like(ids)
        labels = torch.full_like(ids, -100)
        for row, i in enumerate(chunk):
            tokens = list(examples[i].prompt_ids) + list(examples[i].response_ids)
            ids[row, : len(tokens)] = torch.tensor(tokens)
            attention[row, : len(tokens)] = 1
            labels[row, : len(tokens)] = torch.tensor(labels_of[i])
        model(input_ids=ids, attention_mask=attention, labels=labels, num_items_in_batch=num_items).loss.backward()
    return [p.grad.detach().clone() for p in model.parameters()], num_items


def test_sft_step_is_hugging_face_token_mean_over_the_global_batch(tmp_path):
    """SFT: one step's gradient over micro-batches of uneven token counts is HF's with num_items_in_batch (the
    mean over all the step's response tokens), to HF's loss precision (it takes the logits to fp32); the mean of
    per-micro-batch means (HF without num_items_in_batch) is far from it."""
    examples = [Sequence(p.prompt_ids, p.real_ids) for p in random_pairs(7)]
    hf, num_items = hf_sft_gradient(make_model().to(F64), examples, per_device=2)
    assert num_items == sum(len(e.response_ids) for e in examples)
    ours, metrics = step_gradients(make_model().to(F64), examples, tmp_path, mode="sft", micro_batch_tokens=24,
                                   max_grad_norm=0.0)
    assert metrics["micro_batches"] > 2
    assert gap(ours, hf) < 1e-6
    means = [hf_sft_gradient(make_model().to(F64), examples[k : k + 2], per_device=2)[0] for k in range(0, 7, 2)]
    mean_of_means = [sum(parts) / len(means) for parts in zip(*means)]
    assert gap(mean_of_means, hf) > 1e-2


@pytest.mark.parametrize("n_items,global_batch", [(10, 4), (8, 4), (3, 5)])
def test_a_last_partial_batch_is_kept_as_hugging_face_keeps_it(n_items, global_batch):
    """Steps per epoch: HF's DataLoader with dataloader_drop_last=False (its default) on one process."""
    loader = torch.utils.data.DataLoader(range(n_items), batch_size=global_batch, drop_last=False)
    cfg = config(global_batch=global_batch, epochs=3)
    assert total_steps(n_items, cfg) == 3 * len(loader)

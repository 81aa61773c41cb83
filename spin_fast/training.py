"""The training loop: packed micro-batches -> model body -> fused head + loss, on one process or many.

One optimizer step takes `global_batch` pairs (SPIN) or examples (SFT) in a seeded order, packs
them into micro-batches cut by tokens, and accumulates gradients weighted so that the step's loss
is the mean over its pairs (SPIN) or over its response tokens (SFT), whatever the packing.

On several processes (DeepSpeed ZeRO, spin_fast.zero) the step's pairs are dealt to the ranks by
tokens, each rank packs its share, and the weights are scaled so that DeepSpeed's average over ranks
gives the same gradient as one process on the whole batch: the global batch does not depend on the
world size.
"""

from __future__ import annotations

import contextlib
import functools
import gc
import hashlib
import logging
import math
import os
import random
import re
import shutil
import time
from array import array
from collections.abc import Sequence as Seq
from dataclasses import dataclass, field
from functools import cached_property
from pathlib import Path

import torch
from safetensors.torch import load_file
from tqdm.auto import tqdm
from transformers import GenerationConfig

import spin_kernels
from spin_fast import distributed, stopping
from spin_fast.config import DeepSpeedConfig, TrainConfig
from spin_fast.files import flush_folder, flush_tree
from spin_fast.model import (
    can_share_prompts,
    check_logits_are_the_heads,
    disable_dropout,
    head,
    head_like,
    micro_batch_hidden_states,
)
from spin_fast.packing import MicroBatch, Sequence, check_fits, group_tokens, item_name, pack_groups
from spin_fast.scoring import ScoredPair, pair_sequences
from spin_fast.tracking import MetricsLog, check_trackers
from spin_fast.version import code_version

log = logging.getLogger(__name__)
STATE_FILE = "trainer_state.pt"
# Settings a checkpoint may be resumed with changed: how progress is shown and saved, and how a step is cut to
# fit in memory (after an out-of-memory error), which changes its figures by rounding only; not what is trained.
RESUMABLE_CHANGES = ("progress", "tensorboard", "wandb", "save_every", "keep_checkpoints", "micro_batch_tokens",
                     "gradient_checkpointing")
# Settings SPIN's loss alone reads (SFT packs each example alone, so share_prompts has nothing to share): an SFT
# resumes with them changed, as `spin-fast sft` reads them from a config whose SPIN settings may have been tuned.
SPIN_ONLY = ("beta", "loss_type", "label_smoothing", "share_prompts")


class TrainingDiverged(RuntimeError):
    """The loss became NaN or infinite; the last good checkpoint is kept."""


@dataclass
class TrainResult:
    steps: int
    history: list[dict] = field(default_factory=list)
    final_dir: Path | None = None
    seconds: float = 0.0  # wall time of the whole training, earlier interrupted calls included (to their checkpoint)


def epoch_order(n_items: int, seed: int, epoch: int) -> list[int]:
    """The order in which an epoch visits the items: a permutation seeded by (seed, epoch)."""
    return list(_epoch_order(n_items, seed, epoch))


@functools.lru_cache(maxsize=1)  # drawn once an epoch, not at each of its n_items / global_batch steps
def _epoch_order(n_items: int, seed: int, epoch: int) -> tuple[int, ...]:
    generator = torch.Generator().manual_seed(seed * 100_003 + epoch)
    return tuple(torch.randperm(n_items, generator=generator).tolist())


def step_items(n_items: int, config: TrainConfig, step: int) -> list[int]:
    """Indices of the items that optimizer step `step` (0-based) trains on."""
    per_epoch = math.ceil(n_items / config.global_batch)
    epoch, within = divmod(step, per_epoch)
    order = _epoch_order(n_items, config.seed, epoch)
    return list(order[within * config.global_batch : (within + 1) * config.global_batch])


def total_steps(n_items: int, config: TrainConfig) -> int:
    return config.epochs * math.ceil(n_items / config.global_batch)


# Half the spacing of representable numbers, relative to the number: an update below it rounds away.
HALF_STEP = {torch.bfloat16: 2.0**-8, torch.float16: 2.0**-11}


@torch.no_grad()
def warn_if_updates_are_lost(model: torch.nn.Module, learning_rate: float) -> None:
    """Without DeepSpeed the optimizer updates the weights in their own dtype: in bf16 or fp16 an update of about lr
    (Adam's and RMSprop's size) is lost on every weight whose rounding step is larger. Said with the share of weights
    it hits, as training starts, not after an iteration that changed nothing."""
    params = [p for p in model.parameters() if p.requires_grad]
    dtype = params[0].dtype if params else torch.float32
    if dtype not in HALF_STEP:
        return
    lost = sum(int((p.abs() * HALF_STEP[dtype] > learning_rate).sum()) for p in params)
    share = lost / sum(p.numel() for p in params)
    name = str(dtype).removeprefix("torch.")
    log.warning("training %s weights without DeepSpeed: the optimizer updates them in place, in %s, which rounds away "
                "an update of lr %.3g on %.1f%% of them%s. For fp32 master weights, set train.dtype=float32 with "
                "train.bf16_autocast=true (bf16 compute), or train under DeepSpeed", name, name, learning_rate,
                100 * share, "; fp16 gradients also have no loss scaling here" if dtype == torch.float16 else "")


# Parameters Hugging Face's Trainer (the official SPIN code's, TRL's) keeps out of weight decay, by name: biases and
# LayerNorm / RMSNorm weights, whose decay would pull a norm's gain towards 0 (the names, not the shapes: ZeRO-3
# partitions hide those).
NO_DECAY = re.compile(r"bias|layernorm|rmsnorm|(?:^|\.)norm(?:$|\.)|_norm(?:$|\.)")


def decayed(model: torch.nn.Module) -> set[str]:
    """The names of the parameters that weight decay applies to, as in HF's Trainer.get_decay_parameter_names."""
    layer_norms = {f"{prefix}.{name}" if prefix else name for prefix, module in model.named_modules()
                   if isinstance(module, torch.nn.LayerNorm) for name, _ in module.named_parameters(recurse=False)}
    return {name for name, _ in model.named_parameters()
            if name not in layer_norms and not NO_DECAY.search(name.lower())}


def make_optimizer(model: torch.nn.Module, config: TrainConfig) -> torch.optim.Optimizer:
    params = [p for p in model.parameters() if p.requires_grad]
    if config.weight_decay:
        names = decayed(model)
        trained = [(name, p) for name, p in model.named_parameters() if p.requires_grad]
        groups = [{"params": [p for name, p in trained if name in names]},
                  {"params": [p for name, p in trained if name not in names], "weight_decay": 0.0}]
        params = [group for group in groups if group["params"]]
    if config.optimizer == "rmsprop":
        return torch.optim.RMSprop(params, lr=config.learning_rate, weight_decay=config.weight_decay,
                                   eps=config.optimizer_eps)
    return torch.optim.AdamW(params, lr=config.learning_rate, weight_decay=config.weight_decay,
                             eps=config.optimizer_eps)


def lr_factor(step: int, steps: int, config: TrainConfig) -> float:
    """Multiplier of the learning rate at optimizer step `step`: linear warmup, then the schedule. The warmup's
    first step takes 1 / warmup, not Hugging Face's 0 (an update of nothing)."""
    warmup = math.ceil(config.warmup_ratio * steps)
    if step < warmup:
        return (step + 1) / warmup
    if config.schedule == "constant":
        return 1.0
    progress = (step - warmup) / max(1, steps - warmup)
    if config.schedule == "linear":
        return max(0.0, 1.0 - progress)
    return 0.5 * (1.0 + math.cos(math.pi * progress))


class PackedLoss(torch.nn.Module):
    """One micro-batch's loss: model body -> fused LM head + SPIN (or SFT) loss, never the logits.

    A module, so that under DeepSpeed ZeRO-3 the head's weight, read here and not through the head's own
    forward, is gathered while this forward runs and for its backward.
    """

    # The sums each forward returns besides the loss; a step's metrics are their totals over micro-batches.
    METRICS = {"sft": ("loss", "count"),
               "spin": ("loss", "count", "rewards/real", "rewards/generated", "rewards/margins", "rewards/accuracies")}

    def __init__(self, model: torch.nn.Module, config: TrainConfig):
        super().__init__()
        self.model, self.config = model, config

    def forward(self, batch: MicroBatch, opponent_logps: torch.Tensor | None = None):
        hidden = micro_batch_hidden_states(self.model, batch, self.config.bf16_autocast)
        weight, bias = head_like(hidden, *head(self.model))
        if self.config.mode == "sft":
            token_logps = spin_kernels.linear_logprobs(hidden, weight, batch.targets, bias=bias,
                                                       hidden_index=batch.hidden_index, backend=self.config.backend)
            n_loss = batch.targets.numel()
            loss = -token_logps.sum() / max(n_loss, 1)
            return loss, {"loss": loss.detach() * n_loss, "count": loss.new_full((), n_loss)}
        out = spin_kernels.fused_linear_spin_loss(
            hidden, weight, batch.targets, batch.sequence_ids, opponent_logps, beta=self.config.beta,
            loss_type=self.config.loss_type, label_smoothing=self.config.label_smoothing, bias=bias,
            hidden_index=batch.hidden_index, backend=self.config.backend,
        )
        n = out.margins.numel()
        return out.loss, {
            "loss": out.loss.detach() * n, "count": out.loss.new_full((), n),  # on the device, as the sums are
            "rewards/real": out.rewards_real.sum(), "rewards/generated": out.rewards_generated.sum(),
            "rewards/margins": out.margins.sum(), "rewards/accuracies": out.accuracy.sum(),
        }


def uses_deepspeed(settings: DeepSpeedConfig | None) -> bool:
    """DeepSpeed when asked for, or by default when launched with several processes."""
    if settings is None:
        if distributed.launched_distributed():
            raise ValueError("launched with several processes but no DeepSpeed settings were given: multi-process "
                             "training is DeepSpeed ZeRO (pass deepspeed=DeepSpeedConfig())")
        return False
    if settings.enabled is False and distributed.launched_distributed():
        raise ValueError("launched with several processes but deepspeed.enabled is false: multi-process training "
                         "is DeepSpeed ZeRO; set deepspeed.enabled to true (or null) or launch one process")
    return settings.enabled is True or (settings.enabled is None and distributed.launched_distributed())


MICRO_BATCH_ADVICE = " (a pair's sequences share a micro-batch) or cut the data shorter (data.max_length)"


def checkpoint_step(path: Path) -> int | None:
    """N of a folder named as a training saves step N (checkpoint-N), else None (a user's checkpoint-best,
    checkpoint-010)."""
    n = path.name.removeprefix("checkpoint-")
    return int(n) if n.isascii() and n.isdigit() and str(int(n)) == n and path.name != n else None


def check_items(items: Seq[ScoredPair] | Seq[Sequence], model, config: TrainConfig, what: str = "item",
                advice: str = MICRO_BATCH_ADVICE, fits_checked: bool = False) -> None:
    """Every item up front, named by its index (`what` says what the items are; of several too long, the longest):
    a bad one found at its step would end a run hours in. A run checks its pairs with it before scoring them too
    (with its own `advice` for an item too long). fits_checked: the caller has checked that each item fits
    train.micro_batch_tokens (naming its row), which is not done again."""
    if not items:
        raise ValueError("nothing to train on: the item list is empty")
    expected = ScoredPair if config.mode == "spin" else Sequence
    for index, item in enumerate(items):
        if not isinstance(item, expected):
            raise ValueError(f"{item_name(what, index)}: mode={config.mode!r} trains on {expected.__name__} items, "
                             f"got {type(item).__name__}")
    # A pair's Sequences refuse an empty part or a negative id: named by the item, as the checks below.
    groups = pair_sequences(items, what) if expected is ScoredPair else [[item] for item in items]
    share_prompts = config.share_prompts and can_share_prompts(model)
    if not fits_checked:
        check_fits(groups, share_prompts, config.micro_batch_tokens, "train.micro_batch_tokens", what, advice)
    vocab = model.get_input_embeddings().num_embeddings
    for index, (item, group) in enumerate(zip(items, groups)):
        # Sequence itself refuses an empty part or a negative id (above): the vocabulary's end is left to check.
        highest = max(max(part) for sequence in group for part in (sequence.prompt_ids, sequence.response_ids))
        if highest >= vocab:
            raise ValueError(f"{item_name(what, index)}: token id {highest} is outside the model's vocabulary "
                             f"[0, {vocab}) (a tokenizer larger than the model?)")
        if expected is ScoredPair and not math.isfinite(item.opponent_real + item.opponent_generated):
            raise ValueError(f"{item_name(what, index)}: the opponent's log-probs are not finite "
                             f"({item.opponent_real}, {item.opponent_generated})")


class Trainer:
    """Trains `model` in place on SPIN pairs (with opponent log-probs) or SFT sequences.

    With DeepSpeed (`deepspeed` settings, used by default when launched with several processes) every
    rank constructs a Trainer with the same items; under ZeRO-3 `model` ends partitioned across ranks,
    and the trained weights are in the consolidated checkpoint `train()` returns. `release()` then frees
    the model from DeepSpeed's engine. `name` is the training's in W&B ("<group>/<run>", default: output_dir).
    `fits_checked`: the caller has checked that each item fits train.micro_batch_tokens (check_items).
    """

    def __init__(self, model, tokenizer, config: TrainConfig, output_dir: str | Path,
                 items: Seq[ScoredPair] | Seq[Sequence], deepspeed: DeepSpeedConfig | None = None,
                 name: str | None = None, fits_checked: bool = False):
        self.model, self.tokenizer, self.config, self.items = model, tokenizer, config, list(items)
        self.output_dir = Path(output_dir)
        self.start_model = getattr(model, "name_or_path", "")  # where the weights were loaded from, if from disk
        self.steps = total_steps(len(self.items), config)
        if config.gradient_checkpointing and not model.is_gradient_checkpointing:  # a model not loaded by spin-fast
            model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        if config.mode == "spin":
            disable_dropout(model)
        check_logits_are_the_heads(model, self.start_model or type(model).__name__)  # one loaded elsewhere, too
        self.share_prompts = config.share_prompts and can_share_prompts(model)
        check_items(self.items, model, config, fits_checked=fits_checked)
        self.output_dir.mkdir(parents=True, exist_ok=True)
        self.loss_module = PackedLoss(model, config)
        optimizer = make_optimizer(model, config)
        scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: lr_factor(step, self.steps, config))
        self.engine = None  # the DeepSpeed engine, when training under ZeRO
        self.zero_stage = None  # its ZeRO stage, which lays out the checkpoints' DeepSpeed state
        if uses_deepspeed(deepspeed):
            import deepspeed as ds

            from spin_fast.zero import deepspeed_config

            distributed.init(deepspeed.timeout_minutes)
            ds_config = deepspeed_config(config, deepspeed, distributed.world_size())
            self.zero_stage = ds_config["zero_optimization"]["stage"]
            self.engine, optimizer, _, scheduler = ds.initialize(model=self.loss_module, optimizer=optimizer,
                                                                 lr_scheduler=scheduler, config=ds_config)
            log.info("DeepSpeed ZeRO stage %d on %d processes", ds_config["zero_optimization"]["stage"],
                     distributed.world_size())
        else:
            warn_if_updates_are_lost(model, config.learning_rate)
        self.optimizer, self.scheduler = optimizer, scheduler
        self.rank, self.world = distributed.rank(), distributed.world_size()
        self.step = 0
        self.seconds_before = 0.0  # training time up to the checkpoint this call resumed from
        self.started = time.perf_counter()
        self.device = next(model.parameters()).device
        # Rank 0 keeps the metrics: metrics.jsonl, and TensorBoard or W&B when the config asks.
        if config.tensorboard or config.wandb:  # the same on every rank: all of them take part, or none
            distributed.on_main(lambda: check_trackers(config), "the trackers' check")
        details = {"items": len(self.items), "steps": self.steps, "world_size": self.world}
        self.metrics_log = (MetricsLog(self.output_dir, config, name or str(self.output_dir), details)
                            if self.rank == 0 else None)

    # ------------------------------------------------------------------------------------ loop
    def train(self) -> TrainResult:
        """Run (or resume) to the last step; returns the per-step metrics of this call."""
        if self.rank == 0:  # a checkpoint a kill or a second stop signal cut short: maybe a model's size on disk
            for unfinished in self.output_dir.glob(".tmp-checkpoint-*"):
                shutil.rmtree(unfinished, ignore_errors=True)
        self.resume()
        distributed.on_main(self.refuse_incomplete_checkpoints, "incomplete checkpoints")
        self.started = time.perf_counter()
        result = TrainResult(steps=self.steps)
        self.loss_module.train()
        bar = tqdm(total=self.steps, initial=self.step, desc=f"{self.config.mode} training", unit="step",
                   disable=not self.config.progress or self.rank != 0)
        with stopping.safe_points(f"{self.config.mode} training"), self.closing_metrics_log():
            while self.step < self.steps:
                metrics = self.train_step()
                result.history.append(metrics)
                failure = None
                if self.metrics_log is not None:  # rank 0's
                    try:
                        self.metrics_log.write(metrics)
                    except Exception as error:  # noqa: BLE001 - a full disk: it stops every rank at the safe point
                        failure = error
                bar.update(1)
                bar.set_postfix(loss=f"{metrics['loss']:.4f}", lr=f"{metrics['lr']:.2e}")
                signum = stopping.reached(failure, f"step {self.step}'s metrics")
                due = self.config.save_every and self.step % self.config.save_every == 0 and self.step < self.steps
                if due and not signum:
                    self.save_checkpoint()
                    # A signal during the save stops here: that checkpoint holds every step, none more is trained.
                    signum = stopping.reached()
                if signum:  # a scheduler's warning: this step's checkpoint, then leave
                    bar.close()
                    saved = self.save_checkpoint()
                    raise stopping.Stopped(signum, f"after {self.config.mode} training step {self.step} of "
                                                   f"{self.steps}, saved in {saved}", agreed=True)
            bar.close()
            result.final_dir = self.save_checkpoint()
        result.seconds = self.seconds_so_far()
        return result

    def release(self) -> None:
        """Take the model out of DeepSpeed (its hooks and its optimizer's state go), so that it can be used
        outside this trainer and trained again by another one. Under ZeRO-3 it stays partitioned."""
        if self.engine is not None:
            from spin_fast.zero import release

            release(self.engine)
            self.engine = self.optimizer = self.scheduler = None
            gc.collect()  # the engine's reference cycles hold its optimizer state (GPU memory)
            if torch.cuda.is_available():
                torch.cuda.empty_cache()

    def rank_share(self, step: int) -> tuple[list[int], list, list[int], list[MicroBatch]]:
        """This rank's share of optimizer step `step` (all of it on one process), balanced by tokens: (the step's
        items, their groups, the indices of this rank's groups, its micro-batches)."""
        indices = step_items(len(self.items), self.config, step)
        groups = self.groups(indices)
        mine = distributed.balance([group_tokens(g, self.share_prompts) for g in groups], self.world)[self.rank]
        # First fit decreasing: every rank runs as many micro-batches as the busiest, each a forward and backward;
        # packed in the step's order, one after the other, ranks ran ~16% more of them on UltraChat-like pairs.
        batches = pack_groups([groups[i] for i in mine], self.config.micro_batch_tokens,
                              share_prompts=self.share_prompts, first_fit_decreasing=True)
        return indices, groups, mine, batches

    def train_step(self) -> dict:
        """One optimizer step; its metrics. micro_batches: the forward and backward passes of every rank, a rank's
        fillers included (world * the busiest rank's micro-batches); packing_efficiency: the real micro-batches' row
        tokens / (micro_batches * micro_batch_tokens), the share of the GPU time spent that trained."""
        start = time.perf_counter()
        indices, groups, mine, batches = self.rank_share(self.step)
        weight_of = self.loss_weights(batches, len(indices))
        # ZeRO reduces gradients in every backward, so every rank runs as many micro-batches as the busiest
        # one: the others repeat a micro-batch with weight 0.
        n_batches = max(distributed.all_gather_objects(len(batches), "micro-batch counts"))
        # The filler: this rank's shortest micro-batch (the cheapest pass), else a micro-batch of the step's first pair.
        lightest = min(range(len(batches)), key=lambda i: batches[i].n_tokens, default=0)
        filler = batches[lightest] if batches else pack_groups(groups[:1], 2**62, share_prompts=self.share_prompts)[0]
        names = PackedLoss.METRICS[self.config.mode]
        # Summed where the loss is and read once after the loop: a read per micro-batch (float of a CUDA tensor)
        # would wait for each one's backward before the next could be queued.
        sums = None
        tokens = 0
        if self.engine is None:
            self.optimizer.zero_grad(set_to_none=True)
        # Every micro-batch's inputs go to the device before the first forward: a copy from pageable host memory
        # waits for the GPU to finish what it was given, so a copy per micro-batch would stall each one.
        inputs = [self.micro_batch_inputs(batch, [indices[mine[i]] for i in batch.group_indices.tolist()])
                  for batch in batches] or [self.micro_batch_inputs(filler, [indices[0]])]
        for k in range(n_batches):
            batch = batches[k] if k < len(batches) else filler
            weight = weight_of(batch) if k < len(batches) else 0.0
            loss, metrics = self.micro_batch_loss(*inputs[k if k < len(batches) else lightest])
            if self.engine is not None:
                self.engine.backward(loss * weight, scale_wrt_gas=False)
            else:
                (loss * weight).backward()
            if k < len(batches):
                values = torch.stack([metrics[name].to(torch.float64) for name in names])
                sums = values if sums is None else sums + values
                tokens += batch.n_sequence_tokens  # every sequence whole: comparable with or without sharing
            del loss, metrics  # the graph, with the torch backend's gradient sums, goes before the next forward
        # The whole step's, over the ranks: each rank ran its own share of the micro-batches.
        local = sums.tolist() if sums is not None else [0.0] * len(names)  # the metrics' one read of the device
        row_tokens = float(sum(batch.n_tokens for batch in batches))
        summed = distributed.all_reduce_sum(torch.tensor([*local, row_tokens, float(tokens)]), "step metrics").tolist()
        step_tokens, tokens = summed[len(names):]
        totals = dict(zip(names, summed))
        if not math.isfinite(totals["loss"]):
            raise TrainingDiverged(
                f"step {self.step + 1}: the loss is {totals['loss']}; the last good checkpoint is "
                f"{self.latest_checkpoint() or 'none (no checkpoint written yet)'}"
            )
        lr = self.scheduler.get_last_lr()[0]
        if self.engine is not None:
            self.engine.step()  # clips, steps the optimizer and the schedule, zeroes the gradients
            norm = self.engine.get_global_grad_norm()  # None where DeepSpeed keeps none: ZeRO stage 0 in fp32
            grad_norm = None if norm is None else float(norm)
        else:
            grad_norm = self.clip_gradients()
            self.optimizer.step()
            self.scheduler.step()
            self.optimizer.zero_grad(set_to_none=True)  # a model-sized buffer, not held between steps
        self.step += 1
        elapsed = time.perf_counter() - start
        count = totals.pop("count")
        metrics = {name: value / count for name, value in totals.items()}
        # The GPU time the step took: every rank ran n_batches forward and backward passes, fillers included, each
        # sized for micro_batch_tokens; the real micro-batches' row tokens are the share of it that trained.
        passes = n_batches * self.world
        return {"step": self.step, **metrics, "lr": lr, "grad_norm": grad_norm, "tokens_per_s": tokens / elapsed,
                "micro_batches": passes,
                "packing_efficiency": step_tokens / (passes * self.config.micro_batch_tokens)}

    def groups(self, indices: list[int]) -> list[list[Sequence]]:
        if self.config.mode == "spin":
            return [self.items[i].sequences() for i in indices]
        return [[self.items[i]] for i in indices]

    def loss_weights(self, batches: list[MicroBatch], n_items: int):
        """Each micro-batch's share of the step's loss: its pairs / all pairs (SPIN), its loss tokens / all loss
        tokens (SFT), so accumulation gives the same gradient as one big batch; times the world size, since
        DeepSpeed averages the ranks' gradients."""
        if self.config.mode == "spin":
            return lambda batch: batch.group_indices.numel() / n_items * self.world
        local = sum(b.targets.numel() for b in batches)
        loss_tokens = float(distributed.all_reduce_sum(torch.tensor([local]), "loss tokens")[0])
        return lambda batch: batch.targets.numel() / loss_tokens * self.world

    def micro_batch_inputs(self, batch: MicroBatch, item_indices: list[int]) -> tuple[MicroBatch, torch.Tensor | None]:
        """The micro-batch and its pairs' opponent log-probs (SPIN), on the device."""
        opponent = None
        if self.config.mode == "spin":
            pairs = [self.items[i] for i in item_indices]
            opponent = torch.tensor([p.opponent_real for p in pairs] + [p.opponent_generated for p in pairs],
                                    dtype=torch.float32, device=self.device)
        return batch.to(self.device), opponent

    def micro_batch_loss(self, batch: MicroBatch, opponent: torch.Tensor | None) -> tuple[torch.Tensor, dict]:
        run = self.engine if self.engine is not None else self.loss_module
        return run(batch, opponent)

    def clip_gradients(self) -> float:
        params = [p for p in self.model.parameters() if p.grad is not None]
        max_norm = self.config.max_grad_norm or float("inf")
        return float(torch.nn.utils.clip_grad_norm_(params, max_norm))

    @contextlib.contextmanager
    def closing_metrics_log(self):
        try:
            yield
        finally:  # a stop or an error too: W&B's run is finished, TensorBoard's file flushed
            if self.metrics_log is not None:
                self.metrics_log.close()

    # ----------------------------------------------------------------------------- checkpoints
    def checkpoint_dirs(self) -> list[Path]:
        found = [p for p in self.output_dir.glob("checkpoint-*")
                 if checkpoint_step(p) is not None and (p / STATE_FILE).exists()]  # not a user's checkpoint-best
        return sorted(found, key=checkpoint_step)

    def refuse_incomplete_checkpoints(self) -> None:
        """Rank 0: a checkpoint-N without its state file (made by hand, or by code older than the atomic rename)
        where this training may still save one (a stop saves at any step) is refused before any step: the save would
        find the name taken ("Directory not empty"), that step's work lost. Not removed: it may be someone's."""
        for path in self.output_dir.glob("checkpoint-*"):
            n = checkpoint_step(path)
            if n is not None and self.step < n <= self.steps and not (path / STATE_FILE).exists():
                raise ValueError(
                    f"{path} has no {STATE_FILE}: not a complete checkpoint of this training, and its name is one "
                    f"this training saves to. Remove or rename it, then start again")

    def latest_checkpoint(self) -> Path | None:
        """The last complete checkpoint, as rank 0 sees it (a collective under DeepSpeed): every rank resumes
        from the same one, even where a shared filesystem shows another node a new folder late."""
        dirs = self.checkpoint_dirs() if self.rank == 0 else None
        return distributed.from_main(dirs[-1] if dirs else None, "the latest checkpoint")

    def check_optimizer_groups(self, latest: Path, saved_groups: int | None) -> None:
        """A checkpoint whose optimizer state has another number of parameter groups than this training's (older
        code gave weight decay one group) is refused naming itself and why."""
        if saved_groups is not None and saved_groups != len(self.optimizer.param_groups):
            raise ValueError(
                f"{latest}: written by older spin-fast code with {saved_groups} optimizer parameter group(s) "
                f"under train.weight_decay={self.config.weight_decay}, where this training has "
                f"{len(self.optimizer.param_groups)}: weight decay now leaves biases and norm weights out, in a "
                f"group of their own, so its optimizer state does not fit. Remove the "
                f"checkpoint-* folders in {latest.parent} to start this training again, or resume it with the "
                "spin-fast that wrote it")

    def save_checkpoint(self) -> Path:
        """HF weights + tokenizer (loadable by transformers and vLLM as is) and the trainer state, written to a
        temporary folder and renamed, so a kill never leaves half a checkpoint. Under DeepSpeed, rank 0 writes
        the consolidated HF weights and every rank its shard of the training state (output_dir must then be
        on a filesystem all ranks share)."""
        final = self.output_dir / f"checkpoint-{self.step}"
        # Rank 0 decides, and only it looks the name up before it exists: NFS caches a name's absence.
        if distributed.from_main(self.rank == 0 and (final / STATE_FILE).exists(), "checkpoint written before"):
            # A kill between its rename and the removal of older ones left those: they go now.
            distributed.on_main(self.remove_old_checkpoints, "old checkpoints removed")
            return final
        tmp = self.output_dir / f".tmp-checkpoint-{self.step}"

        def fresh_folder() -> None:  # what a kill left of it goes
            shutil.rmtree(tmp, ignore_errors=True)
            tmp.mkdir(parents=True)

        # Rank 0's file work, and each rank's, is followed by a check that every rank's succeeded: a full disk on one
        # stops them all at once instead of leaving the others in DeepSpeed's next collective until the timeout.
        distributed.on_main(fresh_folder, "checkpoint folder")
        state = {"step": self.step, "config": self.config.to_dict(), "n_items": len(self.items),
                 "world_size": self.world, "zero_stage": self.zero_stage, "seconds": self.seconds_so_far(),
                 "items_digest": self.items_digest, "start_model": self.start_model, "code": code_version()}
        rng = {"torch": torch.get_rng_state(), "python": random.getstate(),
               # This rank's GPU only: a run resumed on nodes with other GPU counts sees other devices.
               "cuda": torch.cuda.get_rng_state(self.device) if self.device.type == "cuda" else None}
        if self.engine is None:
            save_model(self.model, tmp, safe_serialization=True)
            state.update(optimizer=self.optimizer.state_dict(), scheduler=self.scheduler.state_dict(), rng=rng)
        else:
            from spin_fast.zero import full_weights

            # Every rank takes part in the gathers; only rank 0, which writes, keeps the tensors (a whole copy
            # per rank would need the model's size in host memory times the ranks on a node).
            weights = {name: tensor for name, tensor in full_weights(self.model) if self.rank == 0}
            distributed.on_main(lambda: save_model(self.model, tmp, state_dict=weights, safe_serialization=True),
                                "consolidated weights written")
            del weights
            self.engine.save_checkpoint(str(tmp / "deepspeed"), tag="state", save_latest=False)

            def write_rng_and_flush() -> None:  # each rank flushes what it wrote (another node's writes are its own)
                torch.save(rng, tmp / f"rng-rank{self.rank}.pt")
                flush_tree(tmp)

            distributed.on_every_rank(write_rng_and_flush, "checkpoint written")
        distributed.on_main(lambda: self.complete_checkpoint(tmp, final, state), "checkpoint renamed")
        return final

    def complete_checkpoint(self, tmp: Path, final: Path, state: dict) -> None:
        """Rank 0: the tokenizer and the trainer state into the written checkpoint, which it then names final;
        older checkpoints beyond keep_checkpoints go."""
        if self.tokenizer is not None:
            self.tokenizer.save_pretrained(tmp)
        torch.save(state, tmp / STATE_FILE)  # written last: its presence marks a complete checkpoint
        flush_tree(tmp)  # on the disk before its name says complete: a power cut leaves no empty weights behind it
        os.replace(tmp, final)
        flush_folder(self.output_dir)
        self.remove_old_checkpoints()
        log.info("saved %s", final)

    def remove_old_checkpoints(self) -> None:
        """Rank 0: all but the last keep_checkpoints checkpoints."""
        for old in self.checkpoint_dirs()[: -self.config.keep_checkpoints]:
            # Renamed first: a kill midway through rmtree would leave checkpoint-N without its state file (no
            # longer a checkpoint, never removed) but maybe with its weights; a .tmp-checkpoint-* goes at the start.
            doomed = self.output_dir / f".tmp-{old.name}-removed"
            shutil.rmtree(doomed, ignore_errors=True)
            os.replace(old, doomed)
            shutil.rmtree(doomed, ignore_errors=True)

    @cached_property
    def items_digest(self) -> str:  # the items never change: hashed once, not at every checkpoint
        return items_fingerprint(self.items)

    def seconds_so_far(self) -> float:
        return self.seconds_before + time.perf_counter() - self.started

    def resume(self) -> None:
        """Continue from the latest complete checkpoint in output_dir, if there is one."""
        latest = self.latest_checkpoint()
        if self.step:
            return
        if latest is None:  # a kill before the first checkpoint: every step is redone, and logged again
            if self.metrics_log is not None:
                self.metrics_log.forget_after(0)
            return

        def read() -> tuple[dict, dict | None]:  # the state rank 0 wrote, and this rank's random state
            # On the CPU: a checkpoint written on GPUs resumes on a machine without (the optimizer's state goes to
            # its parameters' device as it loads).
            state = torch.load(latest / STATE_FILE, map_location="cpu", weights_only=False)
            # Only a checkpoint of this many DeepSpeed ranks has this rank's file: another is refused below, by name
            # (the check after `written_by`, which this condition must follow).
            same_way = state.get("world_size", 1) == self.world and "optimizer" not in state
            rng = None if self.engine is None or not same_way else torch.load(
                latest / f"rng-rank{self.rank}.pt", map_location="cpu", weights_only=False)
            return state, rng

        # Read on every rank: one that cannot stops them all with its error, not rank 0 in its next collective.
        state, rng = distributed.on_every_rank(read, f"reading {latest}")
        # Checkpoints written before the digest existed are trusted on their item count alone.
        other_count = state["n_items"] != len(self.items)
        if other_count or state.get("items_digest") not in (None, self.items_digest):
            what = (f"{state['n_items']} items; this one has {len(self.items)}" if other_count
                    else f"{len(self.items)} items, as this one, but other tokens or opponent log-probs")
            raise ValueError(f"{latest}: written by a training on other items ({what}): train in a new output "
                             "folder, or give it the same items")
        # SPIN items carry the opponent's log-probs, so the digest tells another starting model apart; SFT items
        # do not (checkpoints written before the starting model was saved are trusted).
        started_from = state.get("start_model")
        if self.config.mode == "sft" and started_from and self.start_model and started_from != self.start_model:
            raise ValueError(f"{latest}: written by a training that started from {started_from}; this one starts "
                             f"from {self.start_model}: train in a new output folder, or start from the same model")
        if state.get("code") != code_version():
            log.warning("%s was written by %s; this is spin-fast %s: the steps done so far stay as that code made "
                        "them", latest, f"spin-fast {state['code']}" if state.get("code") else "an older spin-fast",
                        code_version())
        now = self.config.to_dict()
        ignored = RESUMABLE_CHANGES + (SPIN_ONLY if self.config.mode == "sft" else ())
        changed = [f"{key} (saved {value!r}, now {now.get(key)!r})" for key, value in state["config"].items()
                   if value != now.get(key) and key not in ignored]
        if changed:  # the optimizer, schedule and data order come back from the checkpoint: they would not change
            raise ValueError(f"{latest}: written with other training settings: {'; '.join(changed)}. Resume with "
                             f"the same settings, or train in a new output folder")
        written_by = state.get("world_size", 1)
        if written_by != self.world or (self.engine is None) != ("optimizer" in state):
            how = "without" if "optimizer" in state else "with"
            raise ValueError(f"{latest}: written by {written_by} process(es) {how} DeepSpeed; resume it the same "
                             f"way, or start a new run from its Hugging Face weights")
        # DeepSpeed loads only its own stage's layout (stage 3: a model file per rank), else fails on a bare assert.
        # Checkpoints written before the stage was saved are trusted.
        written_stage = state.get("zero_stage", self.zero_stage)
        if written_stage != self.zero_stage:
            raise ValueError(f"{latest}: written under DeepSpeed ZeRO stage {written_stage}; this training runs ZeRO "
                             f"stage {self.zero_stage}: resume it with deepspeed.zero_stage={written_stage}, or start "
                             "a new run from its Hugging Face weights")
        if self.engine is None:
            weights = {}
            for shard in sorted(latest.glob("*.safetensors")):
                weights.update(load_file(shard))
            missing, unexpected = self.model.load_state_dict(weights, strict=False)
            if unexpected or any(not _is_tied(self.model, name) for name in missing):
                raise ValueError(f"{latest}: weights do not match the model (missing {missing}, "
                                 f"unexpected {unexpected})")
            # Older code gave weight decay one group; torch's own error for it names neither the file nor why.
            self.check_optimizer_groups(latest, len(state["optimizer"]["param_groups"]))
            self.optimizer.load_state_dict(state["optimizer"])
            self.scheduler.load_state_dict(state["scheduler"])
            rng = state["rng"]
        else:
            try:
                self.engine.load_checkpoint(str(latest / "deepspeed"), tag="state", load_optimizer_states=True,
                                            load_lr_scheduler_states=True)
            except Exception:  # ZeRO's error for older code's one group speaks of a parameter-alignment setting
                self.check_optimizer_groups(latest, saved_zero_groups(latest / "deepspeed" / "state", self.rank))
                raise
        torch.set_rng_state(rng["torch"])
        random.setstate(rng["python"])
        cuda_state = rng["cuda"]
        if isinstance(cuda_state, list):  # written before: every visible GPU's state; this rank's is its device's
            index = self.device.index or 0
            cuda_state = cuda_state[index] if index < len(cuda_state) else None
        if cuda_state is not None and self.device.type == "cuda":
            torch.cuda.set_rng_state(cuda_state, self.device)
        self.step = state["step"]
        self.seconds_before = state.get("seconds", 0.0)
        if self.metrics_log is not None:
            self.metrics_log.forget_after(self.step)
        log.info("resumed from %s at step %d of %d", latest, self.step, self.steps)



def saved_zero_groups(folder: Path, rank: int) -> int | None:
    """The number of optimizer parameter groups in a DeepSpeed ZeRO checkpoint's state of `rank`; None: not found."""
    for path in folder.glob(f"*zero_pp_rank_{rank}_mp_rank_*optim_states.pt"):
        # mmap: a large model's shard is many GB, of which the group count alone is read
        saved = torch.load(path, map_location="cpu", weights_only=False, mmap=True).get("optimizer_state_dict", {})
        if "single_partition_of_fp32_groups" in saved:  # ZeRO 1 and 2: one flat partition per group
            return len(saved["single_partition_of_fp32_groups"])
        # ZeRO 3: its base optimizer's groups (its fp32_flat_groups are sub-groups, several a group in large models)
        base = saved.get("optimizer_state_dict")
        if isinstance(base, dict) and "param_groups" in base:
            return len(base["param_groups"])
    return None


def save_model(model, folder: Path, **options) -> None:
    """model.save_pretrained, with the model's generation config written as it was loaded: transformers loads with a
    warning a generation_config.json that its save refuses (temperature or top_p without do_sample, as Llama 2's
    first one and many fine-tunes of it hold), which would end a training at its first checkpoint, its steps lost."""
    generation = model.generation_config if model.can_generate() else None
    try:
        if generation is not None:
            generation.validate(strict=True)
    except ValueError:
        model.generation_config = GenerationConfig()  # a stand-in that save_pretrained accepts, overwritten below
        try:
            model.save_pretrained(folder, **options)
        finally:
            model.generation_config = generation
        generation.to_json_file(Path(folder) / "generation_config.json", use_diff=True, keys_to_pop=["compile_config"])
        return
    model.save_pretrained(folder, **options)


def items_fingerprint(items: Seq[ScoredPair] | Seq[Sequence]) -> str:
    """A digest of what a training run trains on (every token id and opponent log-prob of every item), which
    tells a checkpoint of another run in the same folder apart; about 1 s per 30M tokens."""
    digest = hashlib.blake2b(digest_size=16)
    for item in items:
        for name in ("prompt_ids", "real_ids", "generated_ids", "response_ids"):
            ids = getattr(item, name, None)
            if ids is not None:
                digest.update(len(ids).to_bytes(8, "little"))  # so that [1, 2] + [3] differs from [1] + [2, 3]
                digest.update(array("q", ids).tobytes())
        digest.update(array("d", [getattr(item, "opponent_real", 0.0), getattr(item, "opponent_generated", 0.0)]))
    return digest.hexdigest()


def _is_tied(model, name: str) -> bool:
    """A tied LM head is saved once, under the embedding's name."""
    return name.endswith("lm_head.weight") and model.config.tie_word_embeddings

"""The training loop: packed micro-batches -> model body -> fused head + loss, on one process.

One optimizer step takes `global_batch` pairs (SPIN) or examples (SFT) in a seeded order, packs
them into micro-batches cut by tokens, and accumulates gradients weighted so that the step's loss
is the mean over its pairs (SPIN) or over its response tokens (SFT), whatever the packing.
"""

from __future__ import annotations

import json
import logging
import math
import os
import random
import shutil
import time
from collections.abc import Sequence as Seq
from dataclasses import dataclass, field
from pathlib import Path

import torch
from safetensors.torch import load_file
from tqdm.auto import tqdm

import spin_kernels
from spin_fast.config import TrainConfig
from spin_fast.model import head, packed_hidden_states
from spin_fast.packing import MicroBatch, Sequence, pack_groups, packing_efficiency
from spin_fast.scoring import ScoredPair

log = logging.getLogger(__name__)
STATE_FILE = "trainer_state.pt"


class TrainingDiverged(RuntimeError):
    """The loss became NaN or infinite; the last good checkpoint is kept."""


@dataclass
class TrainResult:
    steps: int
    history: list[dict] = field(default_factory=list)
    final_dir: Path | None = None


def epoch_order(n_items: int, seed: int, epoch: int) -> list[int]:
    """The order in which an epoch visits the items: a permutation seeded by (seed, epoch)."""
    generator = torch.Generator().manual_seed(seed * 100_003 + epoch)
    return torch.randperm(n_items, generator=generator).tolist()


def step_items(n_items: int, config: TrainConfig, step: int) -> list[int]:
    """Indices of the items that optimizer step `step` (0-based) trains on."""
    per_epoch = math.ceil(n_items / config.global_batch)
    epoch, within = divmod(step, per_epoch)
    order = epoch_order(n_items, config.seed, epoch)
    return order[within * config.global_batch : (within + 1) * config.global_batch]


def total_steps(n_items: int, config: TrainConfig) -> int:
    return config.epochs * math.ceil(n_items / config.global_batch)


def make_optimizer(model: torch.nn.Module, config: TrainConfig) -> torch.optim.Optimizer:
    params = [p for p in model.parameters() if p.requires_grad]
    if config.optimizer == "rmsprop":
        return torch.optim.RMSprop(params, lr=config.learning_rate, weight_decay=config.weight_decay,
                                   eps=config.optimizer_eps)
    return torch.optim.AdamW(params, lr=config.learning_rate, weight_decay=config.weight_decay,
                             eps=config.optimizer_eps)


def lr_factor(step: int, steps: int, config: TrainConfig) -> float:
    """Multiplier of the learning rate at optimizer step `step`: linear warmup, then the schedule."""
    warmup = math.ceil(config.warmup_ratio * steps)
    if step < warmup:
        return (step + 1) / warmup
    if config.schedule == "constant":
        return 1.0
    progress = (step - warmup) / max(1, steps - warmup)
    if config.schedule == "linear":
        return max(0.0, 1.0 - progress)
    return 0.5 * (1.0 + math.cos(math.pi * progress))


class Trainer:
    """Trains `model` in place on SPIN pairs (with opponent log-probs) or SFT sequences."""

    def __init__(self, model, tokenizer, config: TrainConfig, output_dir: str | Path,
                 items: Seq[ScoredPair] | Seq[Sequence]):
        if not items:
            raise ValueError("nothing to train on: the item list is empty")
        expected = ScoredPair if config.mode == "spin" else Sequence
        if not isinstance(items[0], expected):
            raise ValueError(f"mode={config.mode!r} trains on {expected.__name__} items, got {type(items[0]).__name__}")
        self.model, self.tokenizer, self.config, self.items = model, tokenizer, config, list(items)
        self.output_dir = Path(output_dir)
        self.output_dir.mkdir(parents=True, exist_ok=True)
        self.steps = total_steps(len(self.items), config)
        self.optimizer = make_optimizer(model, config)
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(
            self.optimizer, lambda step: lr_factor(step, self.steps, config)
        )
        self.step = 0
        self.device = next(model.parameters()).device
        self.writer = None
        if config.tensorboard:
            try:
                from torch.utils.tensorboard import SummaryWriter
            except ImportError:
                raise ValueError("tensorboard=True needs the tensorboard package: pip install tensorboard") from None
            self.writer = SummaryWriter(str(self.output_dir / "tensorboard"))

    # ------------------------------------------------------------------------------------ loop
    def train(self) -> TrainResult:
        """Run (or resume) to the last step; returns the per-step metrics of this call."""
        self.resume()
        result = TrainResult(steps=self.steps)
        self.model.train()
        bar = tqdm(total=self.steps, initial=self.step, desc=f"{self.config.mode} training", unit="step",
                   disable=not self.config.progress)
        while self.step < self.steps:
            metrics = self.train_step()
            result.history.append(metrics)
            self.log(metrics)
            bar.update(1)
            bar.set_postfix(loss=f"{metrics['loss']:.4f}", lr=f"{metrics['lr']:.2e}")
            if self.config.save_every and self.step % self.config.save_every == 0 and self.step < self.steps:
                self.save_checkpoint()
        bar.close()
        result.final_dir = self.save_checkpoint()
        return result

    def train_step(self) -> dict:
        start = time.perf_counter()
        indices = step_items(len(self.items), self.config, self.step)
        batches = pack_groups(self.groups(indices), self.config.micro_batch_tokens)
        weight_of = self.loss_weights(batches, len(indices))
        totals: dict[str, float] = {}
        tokens = 0
        self.optimizer.zero_grad(set_to_none=True)
        for batch in batches:
            batch_indices = [indices[i] for i in batch.group_indices.tolist()]
            batch = batch.to(self.device)
            loss, metrics = self.micro_batch_loss(batch, batch_indices)
            if not torch.isfinite(loss):
                raise TrainingDiverged(
                    f"step {self.step + 1}: the loss is {loss.item()}; the last good checkpoint is "
                    f"{self.latest_checkpoint() or 'none (no checkpoint written yet)'}"
                )
            (loss * weight_of(batch)).backward()
            for name, value in metrics.items():
                totals[name] = totals.get(name, 0.0) + value
            tokens += batch.n_tokens
        grad_norm = self.clip_gradients()
        self.optimizer.step()
        lr = self.scheduler.get_last_lr()[0]
        self.scheduler.step()
        self.step += 1
        elapsed = time.perf_counter() - start
        count = totals.pop("count")
        metrics = {name: value / count for name, value in totals.items()}
        return {"step": self.step, **metrics, "lr": lr, "grad_norm": grad_norm, "tokens_per_s": tokens / elapsed,
                "micro_batches": len(batches),
                "packing_efficiency": packing_efficiency(batches, self.config.micro_batch_tokens)}

    def groups(self, indices: list[int]) -> list[list[Sequence]]:
        if self.config.mode == "spin":
            return [self.items[i].sequences() for i in indices]
        return [[self.items[i]] for i in indices]

    def loss_weights(self, batches: list[MicroBatch], n_items: int):
        """Each micro-batch's share of the step's loss: its pairs / all pairs (SPIN), its loss
        tokens / all loss tokens (SFT), so accumulation gives the same gradient as one big batch."""
        if self.config.mode == "spin":
            return lambda batch: batch.group_indices.numel() / n_items
        loss_tokens = sum(int((b.targets != -100).sum()) for b in batches)
        return lambda batch: int((batch.targets != -100).sum()) / loss_tokens

    def autocast(self):
        return torch.autocast(self.device.type, dtype=torch.bfloat16, enabled=self.config.bf16_autocast)

    def micro_batch_loss(self, batch: MicroBatch, item_indices: list[int]) -> tuple[torch.Tensor, dict]:
        with self.autocast():
            hidden = packed_hidden_states(self.model, batch.input_ids, batch.position_ids, batch.cu_seqlens,
                                          batch.max_seqlen)
        weight, bias = head(self.model)
        if hidden.dtype != weight.dtype:  # autocast: the head runs in the body's precision, as nn.Linear would
            weight = weight.to(hidden.dtype)
            bias = None if bias is None else bias.to(hidden.dtype)
        if self.config.mode == "sft":
            token_logps = spin_kernels.linear_logprobs(hidden, weight, batch.targets, bias=bias,
                                                        backend=self.config.backend)
            n_loss = int((batch.targets != -100).sum())
            loss = -token_logps.sum() / max(n_loss, 1)
            return loss, {"loss": loss.item() * n_loss, "count": n_loss}
        pairs = [self.items[i] for i in item_indices]
        opponent = torch.tensor([p.opponent_real for p in pairs] + [p.opponent_generated for p in pairs],
                                dtype=torch.float32, device=self.device)
        out = spin_kernels.fused_linear_spin_loss(
            hidden, weight, batch.targets, batch.sequence_ids, opponent, beta=self.config.beta,
            loss_type=self.config.loss_type, bias=bias, backend=self.config.backend,
        )
        n = len(pairs)
        return out.loss, {
            "loss": out.loss.item() * n, "count": n,
            "rewards/real": out.rewards_real.sum().item(), "rewards/generated": out.rewards_generated.sum().item(),
            "rewards/margins": out.margins.sum().item(), "rewards/accuracies": out.accuracy.sum().item(),
        }

    def clip_gradients(self) -> float:
        params = [p for p in self.model.parameters() if p.grad is not None]
        max_norm = self.config.max_grad_norm or float("inf")
        return float(torch.nn.utils.clip_grad_norm_(params, max_norm))

    def log(self, metrics: dict) -> None:
        with (self.output_dir / "metrics.jsonl").open("a") as out:
            out.write(json.dumps(metrics) + "\n")
        if self.writer is not None:
            for name, value in metrics.items():
                if name != "step":
                    self.writer.add_scalar(f"train/{name}", value, metrics["step"])

    # ----------------------------------------------------------------------------- checkpoints
    def checkpoint_dirs(self) -> list[Path]:
        found = [p for p in self.output_dir.glob("checkpoint-*") if (p / STATE_FILE).exists()]
        return sorted(found, key=lambda p: int(p.name.split("-")[1]))

    def latest_checkpoint(self) -> Path | None:
        dirs = self.checkpoint_dirs()
        return dirs[-1] if dirs else None

    def save_checkpoint(self) -> Path:
        """HF weights + tokenizer (loadable by transformers and vLLM as is) and the trainer state,
        written to a temporary folder and renamed, so a kill never leaves half a checkpoint."""
        final = self.output_dir / f"checkpoint-{self.step}"
        if (final / STATE_FILE).exists():
            return final
        tmp = self.output_dir / f".tmp-checkpoint-{self.step}"
        shutil.rmtree(tmp, ignore_errors=True)
        self.model.save_pretrained(tmp, safe_serialization=True)
        if self.tokenizer is not None:
            self.tokenizer.save_pretrained(tmp)
        state = {
            "step": self.step,
            "optimizer": self.optimizer.state_dict(),
            "scheduler": self.scheduler.state_dict(),
            "rng": {"torch": torch.get_rng_state(), "python": random.getstate(),
                    "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else None},
            "config": self.config.to_dict(),
            "n_items": len(self.items),
        }
        torch.save(state, tmp / STATE_FILE)
        os.replace(tmp, final)
        for old in self.checkpoint_dirs()[: -self.config.keep_checkpoints]:
            shutil.rmtree(old, ignore_errors=True)
        log.info("saved %s", final)
        return final

    def resume(self) -> None:
        """Continue from the latest complete checkpoint in output_dir, if there is one."""
        latest = self.latest_checkpoint()
        if latest is None or self.step:
            return
        state = torch.load(latest / STATE_FILE, weights_only=False)
        if state["n_items"] != len(self.items):
            raise ValueError(f"{latest}: it trained on {state['n_items']} items, this run has {len(self.items)}")
        weights = {}
        for shard in sorted(latest.glob("*.safetensors")):
            weights.update(load_file(shard))
        missing, unexpected = self.model.load_state_dict(weights, strict=False)
        if unexpected or any(not _is_tied(self.model, name) for name in missing):
            raise ValueError(f"{latest}: weights do not match the model (missing {missing}, unexpected {unexpected})")
        self.optimizer.load_state_dict(state["optimizer"])
        self.scheduler.load_state_dict(state["scheduler"])
        torch.set_rng_state(state["rng"]["torch"])
        random.setstate(state["rng"]["python"])
        if state["rng"]["cuda"] is not None and torch.cuda.is_available():
            torch.cuda.set_rng_state_all(state["rng"]["cuda"])
        self.step = state["step"]
        self.forget_metrics_after(self.step)
        log.info("resumed from %s at step %d of %d", latest, self.step, self.steps)

    def forget_metrics_after(self, step: int) -> None:
        """Drop the log lines of steps the kill interrupted before their checkpoint: they are redone."""
        path = self.output_dir / "metrics.jsonl"
        if path.exists():
            kept = [line for line in path.read_text().splitlines() if json.loads(line)["step"] <= step]
            tmp = path.with_name(path.name + ".tmp")
            tmp.write_text("".join(line + "\n" for line in kept))
            os.replace(tmp, path)


def _is_tied(model, name: str) -> bool:
    """A tied LM head is saved once, under the embedding's name."""
    return name.endswith("lm_head.weight") and model.config.tie_word_embeddings

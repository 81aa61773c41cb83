"""One SPIN (or SFT) training run on a small model and seeded random pairs, on one process or under a launcher.

    python tests/distributed_train.py OUT [--zero-stage 2] [--mode spin] [--die-at-step K] [--device cuda]
    torchrun --nproc_per_node 2 tests/distributed_train.py OUT --zero-stage 3
    torchrun --nproc_per_node 1 tests/distributed_train.py OUT --deepspeed --device cuda

Every process builds the same model and data from fixed seeds; one process trains without DeepSpeed, several
under DeepSpeed ZeRO. --die-at-step K makes the last rank exit abruptly in the middle of step K (after the
checkpoint of step K-1), as a killed node would; --signal-at-step K sends the last rank alone SIGTERM in step K,
as a scheduler stopping the job would; --metrics-fail-at-step K makes rank 0's metrics log fail in step K, as a
full disk would. test_distributed.py compares the checkpoints the runs write.
"""

from __future__ import annotations

import argparse
import errno
import os
import random
import signal

import torch
from transformers import AutoModelForCausalLM

from spin_fast import distributed, stopping, training
from spin_fast.config import DeepSpeedConfig, TrainConfig
from spin_fast.model import tiny_config
from spin_fast.packing import Sequence
from spin_fast.scoring import ScoredPair
from spin_fast.training import Trainer


def random_items(mode: str, n: int, vocab: int, seed: int):
    rng = random.Random(seed)

    def ids(low, high):
        return tuple(rng.randrange(vocab) for _ in range(rng.randint(low, high)))

    if mode == "sft":
        return [Sequence(ids(2, 8), ids(1, 20)) for _ in range(n)]
    return [ScoredPair(ids(2, 8), ids(1, 20), ids(1, 20), -rng.uniform(20, 80), -rng.uniform(20, 80))
            for _ in range(n)]


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("output_dir")
    parser.add_argument("--zero-stage", type=int, default=2)
    parser.add_argument("--mode", default="spin")
    parser.add_argument("--pairs", type=int, default=12)
    parser.add_argument("--tied", action="store_true")
    parser.add_argument("--die-at-step", type=int, default=0)
    parser.add_argument("--signal-at-step", type=int, default=0)
    parser.add_argument("--metrics-fail-at-step", type=int, default=0)
    parser.add_argument("--save-every", type=int, default=1)
    parser.add_argument("--offload", action="store_true", help="optimizer state (and ZeRO-3 parameters) on the CPU")
    parser.add_argument("--deepspeed", action="store_true", help="DeepSpeed even on one process")
    parser.add_argument("--device", default="cpu", help="where a run without DeepSpeed trains (DeepSpeed: its own)")
    parser.add_argument("--dtype", default="float32", help="the parameters' dtype (DeepSpeed: bf16 mode for bfloat16)")
    parser.add_argument("--seed", type=int, default=0, help="of the model's weights, the items and their order")
    parser.add_argument("--weight-decay", type=float, default=0.0)
    parser.add_argument("--one-optimizer-group", action="store_true",
                        help="older spin-fast's optimizer: every parameter in one group, under weight decay too")
    args = parser.parse_args()

    if args.one_optimizer_group:
        training.make_optimizer = lambda model, train: torch.optim.RMSprop(
            model.parameters(), lr=train.learning_rate, weight_decay=train.weight_decay, eps=train.optimizer_eps)
    torch.manual_seed(args.seed)
    config = tiny_config("llama", vocab_size=256, hidden_size=64, layers=2, tie_word_embeddings=args.tied)
    model = AutoModelForCausalLM.from_config(config, dtype=getattr(torch, args.dtype), attn_implementation="sdpa")
    model = model.to(args.device)
    items = random_items(args.mode, args.pairs, config.vocab_size, seed=args.seed + 1)
    # A batch of 8 pairs in micro-batches of ~3 pairs: ranks get uneven numbers of micro-batches.
    # eps 1: RMSprop's update is then about lr * gradient, not its sign, so rounding differences stay small.
    train = TrainConfig(mode=args.mode, learning_rate=0.05, optimizer_eps=1.0, global_batch=8, epochs=2,
                        micro_batch_tokens=96, warmup_ratio=0.25, save_every=args.save_every, keep_checkpoints=10,
                        progress=False, seed=(args.seed + 3) % 2**31, dtype=args.dtype,
                        weight_decay=args.weight_decay)
    deepspeed = DeepSpeedConfig(enabled=True if args.deepspeed else None, zero_stage=args.zero_stage,
                                timeout_minutes=2, offload_optimizer=args.offload,
                                offload_params=args.offload and args.zero_stage == 3)
    trainer = Trainer(model, None, train, args.output_dir, items, deepspeed=deepspeed)
    step = trainer.train_step

    def step_or_end():
        if trainer.rank == trainer.world - 1:
            if trainer.step + 1 == args.die_at_step:
                os._exit(3)
            if trainer.step + 1 == args.signal_at_step:
                os.kill(os.getpid(), signal.SIGTERM)
        return step()

    trainer.train_step = step_or_end
    if trainer.metrics_log is not None and args.metrics_fail_at_step:
        write = trainer.metrics_log.write

        def write_or_fail(metrics):
            if metrics["step"] == args.metrics_fail_at_step:
                raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), "metrics.jsonl")
            write(metrics)

        trainer.metrics_log.write = write_or_fail
    try:
        with stopping.signals_handled():
            trainer.train()
    except stopping.Stopped as stop:
        print(f"rank {trainer.rank}: {stop}")
        distributed.shutdown()
        return stop.exit_status
    if torch.distributed.is_initialized():
        print(f"collective backend: {torch.distributed.get_backend()}")
    distributed.shutdown()
    return 0


if __name__ == "__main__":
    # As spin-fast leaves: the interpreter's teardown sometimes aborted rank 1 after all its work.
    distributed.leave_with(main)

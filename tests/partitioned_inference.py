"""A model loaded under deepspeed.zero3_init: its weights gathered back, and scoring, generation and held-out
log-likelihood on ranks given different amounts of work, against the whole model on every rank; then two trainings
on it, as two iterations run them, after which no DeepSpeed engine may be left alive.

    torchrun --nproc_per_node 2 tests/partitioned_inference.py MODEL_DIR OUT_JSON

Rank 1 scores and answers twice as many groups and prompts of its own as rank 0, so the ranks run
different numbers of micro-batches and generation batches: the partitioned model must pad with fillers, or
the collectives inside its forward passes would pair up wrongly and hang. Rank 0 writes what it measured.
"""

from __future__ import annotations

import gc
import json
import random
import sys
import weakref
from pathlib import Path
from types import SimpleNamespace

import torch

from spin_fast import distributed, zero
from spin_fast.config import load_run_config
from spin_fast.data import TokenizedExample
from spin_fast.evaluation import heldout_loglik, shared_generate
from spin_fast.generation.base import SamplingConfig
from spin_fast.generation.hf_engine import TransformersEngine
from spin_fast.loading import load_policy
from spin_fast.model import body, load_causal_lm
from spin_fast.packing import Sequence
from spin_fast.scoring import ScoredPair, model_logprobs
from spin_fast.training import Trainer
from spin_fast.zero import is_partitioned


def main(model_dir: str, output: str) -> int:
    config = load_run_config(None, ["model.attention=sdpa", "deepspeed.zero_stage=3", "deepspeed.zero3_init=true"])
    partitioned = load_policy(model_dir, config)
    rank, world = distributed.rank(), distributed.world_size()
    whole = load_causal_lm(model_dir, attention_impl="sdpa")
    vocab = whole.config.vocab_size

    local = {name: p.ds_tensor.numel() for name, p in partitioned.named_parameters() if is_partitioned(p)}
    full = {name: p.ds_numel for name, p in partitioned.named_parameters() if is_partitioned(p)}
    rng = random.Random(rank)

    def ids(low: int, high: int) -> tuple[int, ...]:
        return tuple(rng.randrange(3, vocab) for _ in range(rng.randint(low, high)))

    # Gathered back a bucket at a time (1 byte: each weight a bucket of its own; 40 KiB: a few per bucket; the
    # default: one bucket), the partitioned weights are the whole model's, exactly, under their state_dict names.
    reference = whole.state_dict()
    weights_equal = []
    for bucket_bytes in (1, 40 * 1024, zero.BUCKET_BYTES):
        gathered = dict(zero.full_weights(partitioned, bucket_bytes=bucket_bytes))
        weights_equal.append(set(reference) - set(gathered) <= {"lm_head.weight"} and set(gathered) <= set(reference)
                             and all(torch.equal(tensor, reference[name]) for name, tensor in gathered.items()))

    # Scoring: a token budget of one or two groups per micro-batch.
    groups = [[Sequence(ids(2, 6), ids(1, 8)), Sequence(ids(2, 6), ids(1, 8))] for _ in range(3 * (rank + 1))]
    scores = (model_logprobs(partitioned, groups, 28), model_logprobs(whole, groups, 28))

    # The collectives of one forward pass: one per decoder layer, one each for the embedding and the final norm.
    from deepspeed.runtime.zero.partition_parameters import GatheredParameters

    gathers, enter = [], GatheredParameters.__enter__

    def counting_enter(context):
        gathers.append(len(context.params))
        return enter(context)

    GatheredParameters.__enter__ = counting_enter
    try:
        with torch.no_grad(), zero.gathered_per_layer(partitioned):
            body(partitioned)(input_ids=torch.tensor([[3, 4, 5]]), position_ids=torch.tensor([[0, 1, 2]]),
                              use_cache=False)
    finally:
        GatheredParameters.__enter__ = enter

    # Generation: one prompt per batch, greedy.
    prompts = [ids(2, 6) for _ in range(2 * (rank + 1))]
    greedy = SamplingConfig(temperature=0.0, max_new_tokens=6)
    answers = [TransformersEngine(model, eos_token_id=0, batch_size=1, progress=False).generate(prompts, greedy)
               for model in (partitioned, whole)]

    # The same prompts on every rank, the ranks sharing the generation batches.
    tokens = SimpleNamespace(eos_token_id=0, pad_token_id=0)
    every_prompt = [tuple(random.Random(k).randrange(3, vocab) for _ in range(2 + k % 4)) for k in range(5)]
    shared_answers = [shared_generate(model, tokens, every_prompt, greedy, 1, "answers")
                      for model in (partitioned, whole)]

    # Held-out log-likelihood: the ranks share the micro-batches of one list.
    shared = random.Random(7)
    examples = [TokenizedExample(tuple(shared.randrange(3, vocab) for _ in range(4)),
                                 tuple(shared.randrange(3, vocab) for _ in range(1 + k)), None)
                for k in range(5)]
    heldout = [heldout_loglik(model, examples, 10)["loglik_per_token"] for model in (partitioned, whole)]
    report = {"rank": rank, "world": world, "local_numel": sum(local.values()), "full_numel": sum(full.values()),
              "largest_share": max(local[n] / full[n] for n in local),
              "score_diff": float((scores[0] - scores[1]).abs().max()), "n_groups": len(groups),
              "scores_finite": bool(torch.isfinite(scores[0]).all()),
              "answers_equal": answers[0] == answers[1], "n_prompts": len(prompts),
              "shared_answers_equal": shared_answers[0] == shared_answers[1],
              "heldout": heldout, "gathers": gathers, "layers": partitioned.config.num_hidden_layers,
              "full_weights_equal": weights_equal}
    # Two trainings on the partitioned model, as two SPIN iterations run: the first engine, released, is freed.
    pairs = random.Random(11)
    items = [ScoredPair(*[tuple(pairs.randrange(3, vocab) for _ in range(pairs.randint(1, 4))) for _ in range(3)],
                        -10.0, -10.0) for _ in range(4)]
    train = config.train.replace(global_batch=4, micro_batch_tokens=64, backend="torch")
    released = []
    for k in range(2):
        trainer = Trainer(partitioned, None, train, Path(output).parent / f"train-{k}", items,
                          deepspeed=config.deepspeed)
        trainer.train()
        released.append((weakref.ref(trainer.engine), weakref.ref(trainer.engine.optimizer)))
        trainer.release()
        del trainer
    gc.collect()
    report["engines_alive"] = sum(ref() is not None for pair in released for ref in pair)
    report["backward_closures_left"] = sum("pre_bwd_fn" in m.__dict__ for m in partitioned.modules())

    reports = distributed.all_gather_objects(report, "reports")
    if rank == 0:
        with open(output, "w") as out:
            json.dump(reports, out)
    distributed.shutdown()
    return 0


if __name__ == "__main__":  # as the commands end (distributed.leave_with): gloo's teardown may abort a finished rank
    distributed.leave_with(lambda: main(sys.argv[1], sys.argv[2]))

"""Evaluation of a SPIN run on held-out data: how likely the human responses are under each model,
and how each iteration's model separates human from opponent responses (the reward margins).

    log-likelihood   mean log-prob per response token of the held-out human responses
    margins          for θt+1 against its opponent θt, on held-out pairs (human response, θt's own):
                     rewards = beta * (log p_θt+1 - log p_θt), margins = real - generated
    score            with data.checker set: the checker's mean grade of the model's greedy answers,
                     and the share graded 1 (score_perfect); free-running, so a model's early mistakes
                     count here while teacher forcing (the log-likelihood) hides them

Under a launcher (torchrun, the deepspeed launcher) the ranks share the work: each runs its share of the
micro-batches and generation batches that one process would run, cut exactly as one process cuts them
(balanced by tokens), and the results come back in one-process order. Every forward pass is then the one
a single process makes, so the figures equal one process's; rank 0 writes the file.
"""

from __future__ import annotations

import importlib
import json
import os
from collections.abc import Callable
from collections.abc import Sequence as Seq
from pathlib import Path

import torch

from spin_fast import distributed, zero
from spin_fast.config import ConfigError
from spin_fast.data import Example, TokenizedExample
from spin_fast.generation.base import Completion, SamplingConfig
from spin_fast.model import can_share_prompts
from spin_fast.packing import Sequence, group_tokens, pack_groups
from spin_fast.scoring import TokenizedPair, sequence_logprobs


def shared_logprobs(models, groups: Seq[Seq[Sequence]], token_budget: int, backend: str,
                    what: str) -> list[torch.Tensor]:
    """sequence_logprobs of every group under each model, the ranks sharing the micro-batches.

    The micro-batches are one process's (pack_groups cuts consecutive groups, so a batch's groups packed
    again make the very same row): each rank's forward passes are ones a single process makes, and the
    sums are bit for bit one process's. With ZeRO-3 partitioned models every forward pass is a collective,
    so a rank with fewer micro-batches runs fillers."""
    share = all(can_share_prompts(model) for model in models)
    chunks = [batch.group_indices.tolist() for batch in pack_groups(groups, token_budget, share_prompts=share)]
    costs = [sum(group_tokens(groups[i], share) for i in chunk) for chunk in chunks]
    mine = distributed.balance(costs, distributed.world_size())[distributed.rank()]
    local = []
    for c in zero.in_step(models, mine, what):  # None: no groups, a filler pass inside sequence_logprobs
        sums = [sequence_logprobs(model, [groups[i] for i in chunks[c]] if c is not None else [], token_budget,
                                  backend=backend) for model in models]
        if c is not None:
            local.append(sums)
    per_chunk = distributed.gather_in_order(local, mine, len(chunks), what)
    results = [torch.zeros(len(groups), len(groups[0]) if groups else 0, dtype=torch.float64) for _ in models]
    for chunk, sums in zip(chunks, per_chunk):
        for result, chunk_sums in zip(results, sums):
            result[chunk] = chunk_sums
    return results


def shared_generate(model, tokenizer, prompts: Seq[Seq[int]], sampling: SamplingConfig, batch_size: int,
                    what: str) -> list[list[Completion]]:
    """One completion per prompt (engine layout: a list per prompt), the ranks sharing the batches.

    TransformersEngine.batches() gives the batches one process runs. They are dealt out here, each generated
    alone with its prompts' indices in the whole set (which set its seed), so even sampled completions are one
    process's, whatever the number of ranks."""
    from spin_fast.generation.hf_engine import TransformersEngine

    if sampling.n != 1:
        raise ValueError(f"shared_generate makes one completion per prompt, got n={sampling.n}")
    engine = TransformersEngine(model, eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id,
                                batch_size=batch_size, progress=False)
    batches = [[p for p, _ in batch] for batch in engine.batches(prompts)]
    # Cost: the padded tokens of the batch's last decoding step (its longest prompt is its last).
    costs = [len(b) * (len(prompts[b[-1]]) + sampling.max_new_tokens) for b in batches]
    mine = distributed.balance(costs, distributed.world_size())[distributed.rank()]
    local = []
    for b in zero.in_step([model], mine, what):  # None: no prompts, a filler pass inside engine.generate
        batch = batches[b] if b is not None else []
        completions = engine.generate([prompts[i] for i in batch], sampling, indices=batch)
        if b is not None:
            local.append(completions)
    per_batch = distributed.gather_in_order(local, mine, len(batches), what)
    completions: list[list[Completion]] = [[] for _ in prompts]
    for batch, batch_completions in zip(batches, per_batch):
        for index, completion in zip(batch, batch_completions):
            completions[index] = completion
    return completions


def heldout_loglik(model, examples: Seq[TokenizedExample], token_budget: int, backend: str = "auto") -> dict:
    """Mean log-prob per response token, and per response, of the human responses."""
    groups = [[Sequence(e.prompt_ids, e.response_ids)] for e in examples]
    sums = shared_logprobs([model], groups, token_budget, backend, "held-out log-likelihoods")[0][:, 0]
    tokens = sum(len(e.response_ids) for e in examples)
    return {"loglik_per_token": float(sums.sum()) / tokens, "loglik_per_response": float(sums.mean()),
            "responses": len(examples)}


def reward_margins(policy, opponent, pairs: Seq[TokenizedPair], beta: float, token_budget: int,
                   backend: str = "auto") -> dict:
    """SPIN's implicit rewards of the policy against its opponent, averaged over the pairs."""
    groups = [p.sequences() for p in pairs]
    ours, theirs = shared_logprobs([policy, opponent], groups, token_budget, backend, "reward margins")
    rewards = beta * (ours - theirs)  # [pairs, (real, generated)]
    margins = rewards[:, 0] - rewards[:, 1]
    return {"rewards/real": float(rewards[:, 0].mean()), "rewards/generated": float(rewards[:, 1].mean()),
            "rewards/margins": float(margins.mean()), "rewards/accuracies": float((margins > 0).double().mean()),
            "pairs": len(pairs)}


def load_checker(spec: str) -> Callable[[str, str, str], float]:
    """The function that data.checker names ("package.module:function")."""
    module_name, sep, name = spec.partition(":")
    if not sep or not module_name or not name:
        raise ConfigError(f"data.checker {spec!r}: expected 'package.module:function', e.g. 'spin_fast.sorting:score'")
    try:
        module = importlib.import_module(module_name)
    except ImportError as error:
        raise ConfigError(f"data.checker {spec!r}: cannot import module {module_name!r} ({error})") from None
    check = getattr(module, name, None)
    if not callable(check):
        raise ConfigError(f"data.checker {spec!r}: module {module_name!r} has no function {name!r}")
    return check


def greedy_answers(model, tokenizer, examples: Seq[TokenizedExample], max_new_tokens: int,
                   batch_size: int = 16) -> list[str]:
    """The model's greedy (temperature 0) answer to each prompt, decoded without special tokens."""
    completions = shared_generate(model, tokenizer, [e.prompt_ids for e in examples],
                                  SamplingConfig(temperature=0.0, max_new_tokens=max_new_tokens), batch_size,
                                  "greedy answers")
    return [tokenizer.decode(c[0].token_ids, skip_special_tokens=True) for c in completions]


def checker_score(check: Callable[[str, str, str], float], examples: Seq[Example], answers: Seq[str]) -> dict:
    """Mean grade of the answers against the human responses, and the share graded 1 (exactly right)."""
    scores = []
    for example, answer in zip(examples, answers, strict=True):
        prompt = next(m["content"] for m in reversed(example.prompt) if m["role"] == "user")
        value = float(check(prompt, answer, example.response))
        if not 0.0 <= value <= 1.0:  # NaN fails too
            raise ValueError(f"{example.origin}: the checker graded an answer {value}, outside [0, 1]")
        scores.append(value)
    return {"score": sum(scores) / len(scores), "score_perfect": sum(v == 1.0 for v in scores) / len(scores)}


def evaluate_run(selfplay, eval_source: str, output: Path | None = None,
                 baselines: dict[str, str] | None = None) -> list[dict]:
    """Held-out log-likelihood of the SFT model and of every finished iteration, each iteration's
    margins against its opponent on held-out pairs the opponent answers itself, and the checker's
    score when data.checker is set. baselines (name -> model path, e.g. continued SFT) are evaluated
    like iteration 0's model: their margins are against the SFT model, on the SFT model's answers."""
    from transformers import AutoTokenizer

    from spin_fast.selfplay import (
        answered_pairs,
        fetch_model,
        load_policy,
        read_examples,
        read_manifest,
        tokenize_examples,
    )

    config = selfplay.config
    data = config.data
    budget, backend = config.score_batch_tokens, config.train.backend
    check = load_checker(data.checker) if data.checker else None  # a bad path fails before any model loads
    if distributed.launched_distributed():  # before any model loads: on GPUs, each rank takes its own
        distributed.init(config.deepspeed.timeout_minutes)
    with distributed.main_first("the model and data, from the Hub"):
        tokenizer = AutoTokenizer.from_pretrained(config.model.name_or_path)
        fetch_model(config.model.name_or_path)
        raw = read_examples(data, eval_source)  # the checker grades text: keep the rows beside their ids
    examples = tokenize_examples(tokenizer, data, raw)

    def measure(model) -> dict:
        row = heldout_loglik(model, examples, budget, backend)
        if check is not None:
            answers = greedy_answers(model, tokenizer, examples, config.generation.max_new_tokens,
                                     config.generation.batch_size)
            row.update(checker_score(check, raw, answers))  # every rank grades all answers: cheap, and alike
        return row

    def opponent_pairs(opponent, t: int) -> list[TokenizedPair]:
        # θt answers the held-out prompts, as it answered the training prompts in iteration t.
        completions = shared_generate(opponent, tokenizer, [e.prompt_ids for e in examples],
                                      config.for_iteration(t).generation.sampling(), config.generation.batch_size,
                                      f"iteration {t}'s held-out answers")
        return answered_pairs(examples, completions, tokenizer.eos_token_id, data.max_length)

    # The finished iterations as rank 0 sees them: a run still writing its manifests must not make the
    # ranks evaluate different models (and wait forever for each other).
    checkpoints = []
    for t in range(config.iterations if distributed.is_main() else 0):
        manifest = read_manifest(selfplay.run_dir / f"iter-{t}" / "train")
        if manifest is None:
            break
        checkpoints.append(manifest["summary"]["checkpoint"])
    checkpoints = distributed.from_main(checkpoints, "finished iterations")

    rows = []
    opponent = load_policy(config.model.name_or_path, config)
    sft, sft_pairs = (opponent, None) if baselines else (None, None)  # kept only when baselines need it
    rows.append({"model": "sft", **measure(opponent)})
    for t, checkpoint in enumerate(checkpoints):
        pairs = opponent_pairs(opponent, t)
        if t == 0 and sft is not None:
            sft_pairs = pairs
        policy = load_policy(checkpoint, config)
        beta = config.for_iteration(t).train.beta
        rows.append({"model": f"iter-{t}", **measure(policy),
                     **reward_margins(policy, opponent, pairs, beta, budget, backend)})
        opponent = policy
    for name, path in (baselines or {}).items():
        sft_pairs = sft_pairs or opponent_pairs(sft, 0)
        model = load_policy(path, config)
        beta = config.for_iteration(0).train.beta
        rows.append({"model": name, **measure(model), **reward_margins(model, sft, sft_pairs, beta, budget, backend)})
    if output is not None:
        if distributed.is_main():
            tmp = output.with_name(output.name + ".tmp")
            tmp.write_text("".join(json.dumps(row) + "\n" for row in rows))
            os.replace(tmp, output)
        distributed.barrier("evaluation written")  # the file is there when any rank returns
    return rows

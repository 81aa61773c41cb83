"""Evaluation of a SPIN run on held-out data: how likely the human responses are under each model,
and how each iteration's model separates human from opponent responses (the reward margins).

    log-likelihood   mean log-prob per response token of the held-out human responses
    margins          for θt+1 against its opponent θt, on held-out pairs (human response, θt's own):
                     rewards = beta * (log p_θt+1 - log p_θt), margins = real - generated
    score            with data.checker set: the checker's mean grade of the model's greedy answers,
                     and the share graded 1 (score_perfect); free-running, so a model's early mistakes
                     count here while teacher forcing (the log-likelihood) hides them
"""

from __future__ import annotations

import importlib
import json
import os
from collections.abc import Callable
from collections.abc import Sequence as Seq
from pathlib import Path

from spin_fast.config import ConfigError
from spin_fast.data import Example, TokenizedExample
from spin_fast.packing import Sequence
from spin_fast.scoring import TokenizedPair, sequence_logprobs


def heldout_loglik(model, examples: Seq[TokenizedExample], token_budget: int, backend: str = "auto") -> dict:
    """Mean log-prob per response token, and per response, of the human responses."""
    groups = [[Sequence(e.prompt_ids, e.response_ids)] for e in examples]
    sums = sequence_logprobs(model, groups, token_budget, backend=backend)[:, 0]
    tokens = sum(len(e.response_ids) for e in examples)
    return {"loglik_per_token": float(sums.sum()) / tokens, "loglik_per_response": float(sums.mean()),
            "responses": len(examples)}


def reward_margins(policy, opponent, pairs: Seq[TokenizedPair], beta: float, token_budget: int,
                   backend: str = "auto") -> dict:
    """SPIN's implicit rewards of the policy against its opponent, averaged over the pairs."""
    groups = [p.sequences() for p in pairs]
    ours = sequence_logprobs(policy, groups, token_budget, backend=backend)
    theirs = sequence_logprobs(opponent, groups, token_budget, backend=backend)
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
    from spin_fast.generation.base import SamplingConfig
    from spin_fast.generation.hf_engine import TransformersEngine

    engine = TransformersEngine(model, eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id,
                                batch_size=batch_size, progress=False)
    completions = engine.generate([e.prompt_ids for e in examples],
                                  SamplingConfig(temperature=0.0, max_new_tokens=max_new_tokens))
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

    from spin_fast.generation.hf_engine import TransformersEngine
    from spin_fast.selfplay import answered_pairs, load_policy, read_examples, read_manifest, tokenize_examples

    config = selfplay.config
    data = config.data
    budget, backend = config.score_batch_tokens, config.train.backend
    check = load_checker(data.checker) if data.checker else None  # a bad path fails before any model loads
    tokenizer = AutoTokenizer.from_pretrained(config.model.name_or_path)
    raw = read_examples(data, eval_source)  # the checker grades text: keep the rows beside their ids
    examples = tokenize_examples(tokenizer, data, raw)

    def measure(model) -> dict:
        row = heldout_loglik(model, examples, budget, backend)
        if check is not None:
            answers = greedy_answers(model, tokenizer, examples, config.generation.max_new_tokens,
                                     config.generation.batch_size)
            row.update(checker_score(check, raw, answers))
        return row

    def opponent_pairs(opponent, t: int) -> list[TokenizedPair]:
        # θt answers the held-out prompts, as it answered the training prompts in iteration t.
        engine = TransformersEngine(opponent, eos_token_id=tokenizer.eos_token_id,
                                    pad_token_id=tokenizer.pad_token_id, batch_size=config.generation.batch_size,
                                    progress=False)
        completions = engine.generate([e.prompt_ids for e in examples], config.for_iteration(t).generation.sampling())
        return answered_pairs(examples, completions, tokenizer.eos_token_id, data.max_length)

    rows = []
    opponent = load_policy(config.model.name_or_path, config)
    sft, sft_pairs = (opponent, None) if baselines else (None, None)  # kept only when baselines need it
    rows.append({"model": "sft", **measure(opponent)})
    for t in range(config.iterations):
        manifest = read_manifest(selfplay.run_dir / f"iter-{t}" / "train")
        if manifest is None:
            break
        pairs = opponent_pairs(opponent, t)
        if t == 0 and sft is not None:
            sft_pairs = pairs
        policy = load_policy(manifest["summary"]["checkpoint"], config)
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
        tmp = output.with_name(output.name + ".tmp")
        tmp.write_text("".join(json.dumps(row) + "\n" for row in rows))
        os.replace(tmp, output)
    return rows

"""Evaluation of a SPIN run on held-out data: how likely the human responses are under each model,
and how each iteration's model separates human from opponent responses (the reward margins).

    log-likelihood   mean log-prob per response token of the held-out human responses
    margins          for θt+1 against its opponent θt, on held-out pairs (human response, θt's own):
                     rewards = beta * (log p_θt+1 - log p_θt), margins = real - generated
"""

from __future__ import annotations

import json
import os
from collections.abc import Sequence as Seq
from pathlib import Path

from spin_fast.data import TokenizedExample
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


def evaluate_run(selfplay, eval_source: str, output: Path | None = None) -> list[dict]:
    """Held-out log-likelihood of the SFT model and of every finished iteration, and each
    iteration's margins against its opponent, on held-out pairs the opponent answers itself."""
    from transformers import AutoTokenizer

    from spin_fast.generation.hf_engine import TransformersEngine
    from spin_fast.selfplay import answered_pairs, load_policy, read_manifest, tokenized_examples

    config = selfplay.config
    budget, backend = config.score_batch_tokens, config.train.backend
    tokenizer = AutoTokenizer.from_pretrained(config.model.name_or_path)
    examples = tokenized_examples(tokenizer, config.data, eval_source)

    rows = []
    opponent = load_policy(config.model.name_or_path, config)
    rows.append({"model": "sft", **heldout_loglik(opponent, examples, budget, backend)})
    for t in range(config.iterations):
        manifest = read_manifest(selfplay.run_dir / f"iter-{t}" / "train")
        if manifest is None:
            break
        # θt answers the held-out prompts, as it answered the training prompts in iteration t.
        engine = TransformersEngine(opponent, eos_token_id=tokenizer.eos_token_id,
                                    pad_token_id=tokenizer.pad_token_id, progress=False)
        sampling = config.for_iteration(t).generation.sampling()
        completions = engine.generate([e.prompt_ids for e in examples], sampling)
        pairs = answered_pairs(examples, completions, tokenizer.eos_token_id, config.data.max_length)
        policy = load_policy(manifest["summary"]["checkpoint"], config)
        beta = config.for_iteration(t).train.beta
        rows.append({"model": f"iter-{t}", **heldout_loglik(policy, examples, budget, backend),
                     **reward_margins(policy, opponent, pairs, beta, budget, backend)})
        opponent = policy
    if output is not None:
        tmp = output.with_name(output.name + ".tmp")
        tmp.write_text("".join(json.dumps(row) + "\n" for row in rows))
        os.replace(tmp, output)
    return rows

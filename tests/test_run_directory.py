"""spin_fast.run_directory, on its own: what keeps a run directory one experiment across starts."""

import json
import logging

import pytest

import spin_fast.run_directory
from spin_fast.config import load_run_config
from spin_fast.run_directory import RunDirectory, check_shared, record_start
from spin_fast.version import code_version


def directory(tmp_path, *extra):
    return RunDirectory(tmp_path / "run", load_run_config(None, [f"output_dir={tmp_path / 'run'}", "iterations=2",
                                                               *extra]))


def record(digest, examples=4):
    return {"source": "data.jsonl", "examples": examples, "digest": digest, "tokens": "t" + digest}


def test_an_iteration_with_no_work_yet_takes_the_data_as_it_is_now(tmp_path):
    """Iteration 0 has saved work, iteration 1 none: iteration 1's rows may change (and are kept as they are now);
    iteration 0's may not."""
    run = directory(tmp_path)
    run.keep_same_data({"0": record("a"), "1": record("a")})
    (tmp_path / "run" / "iter-0" / "generate" / "parts").mkdir(parents=True)
    (tmp_path / "run" / "iter-0" / "generate" / "parts" / "000000000-000000004.jsonl").write_text("")
    run.keep_same_data({"0": record("a"), "1": record("b", 5)})
    assert json.loads((tmp_path / "run" / "data.json").read_text())["1"] == record("b", 5)
    with pytest.raises(ValueError, match=r"iteration 0's prompts \(data.source data.jsonl: 4 examples\) are not those"):
        run.keep_same_data({"0": record("c"), "1": record("b", 5)})


def test_a_start_after_a_session_line_cut_short_compares_its_code_with_the_last_whole_line(tmp_path, caplog):
    """A start killed as it wrote its line in sessions.jsonl leaves that line cut short, and the next start's line
    follows it: the start after that one compares its code with the last whole line's, not with a line before the
    cut one."""
    path = tmp_path / "run" / "sessions.jsonl"
    path.parent.mkdir(parents=True)
    (tmp_path / "run" / "iter-0" / "generate").mkdir(parents=True)
    (tmp_path / "run" / "iter-0" / "generate" / "manifest.json").write_text("{}")
    path.write_text(json.dumps({"started": "2026-01-01", "code": "0.0.1+older"}) + "\n" + '{"started": "2026-'
                    + "\n" + json.dumps({"started": "2026-01-02", "code": code_version()}) + "\n")
    caplog.set_level(logging.WARNING, logger="spin_fast.run_directory")
    directory(tmp_path).record_session(None)
    assert "was run before" not in caplog.text


def test_a_run_with_only_a_saved_part_is_not_started_again_with_other_settings(tmp_path):
    """A stage's saved part (in parts/, before any manifest) is work made with the saved settings: a start with
    other ones is refused, not taken for a new run (which would mix its pairs with the part's)."""
    run = directory(tmp_path)
    run.claim(None, None, {}, "m")
    (tmp_path / "run" / "iter-0" / "generate" / "parts").mkdir(parents=True)
    (tmp_path / "run" / "iter-0" / "generate" / "parts" / "000000000-000000004.jsonl").write_text("")
    run.unlock()
    with pytest.raises(ValueError, match=r"holds another config, which differs in train.beta"):
        directory(tmp_path, "train.beta=0.2").saved_config()


def test_a_start_removes_the_parts_of_finished_stages_alone_and_rebuilds_the_summary_table(tmp_path):
    """A kill between a stage's manifest and the removal of its parts leaves them (a copy of its output): the next
    start removes them, but a stage without a manifest keeps its saved parts (the work it resumes from). A kill
    between iteration 0's training manifest and the summary table leaves no table: the start writes it."""
    run = tmp_path / "run"
    for stage in ("generate", "score"):
        (run / "iter-0" / stage / "parts").mkdir(parents=True)
        (run / "iter-0" / stage / "parts" / "000000000-000000004.jsonl").write_text("{}\n")
    (run / "iter-0" / "generate" / "manifest.json").write_text("{}")
    (run / "iter-0" / "train").mkdir()
    (run / "iter-0" / "train" / "manifest.json").write_text(json.dumps(
        {"summary": {"iteration": 0, "loss": 0.5, "checkpoint": "/elsewhere/final"}}))
    directory(tmp_path).tidy_what_a_kill_left()
    assert not (run / "iter-0" / "generate" / "parts").exists()
    assert (run / "iter-0" / "score" / "parts" / "000000000-000000004.jsonl").read_text() == "{}\n"
    assert (run / "summary.jsonl").read_text() == '{"iteration": 0, "loss": 0.5, "checkpoint": "/elsewhere/final"}\n'
    assert (run / "summary.md").read_text() == "| iteration | loss |\n|---|---|\n| 0 | 0.5 |\n"


def test_held_out_data_has_work_once_its_iterations_training_is_done(tmp_path):
    """"eval 0" is scored after iteration 0's training: before its manifest, the held-out rows may still change
    (a run killed in iteration 0's scoring); after it, not. An empty parts/ (a stage killed before its first part was
    saved) is no work either."""
    run = directory(tmp_path)
    held_out = {"source": "eval.jsonl", "examples": 2, "digest": "a", "tokens": "ta"}
    run.keep_same_data({"0": record("a"), "eval 0": held_out})
    (tmp_path / "run" / "iter-0" / "generate" / "parts").mkdir(parents=True)
    run.keep_same_data({"0": record("b"), "eval 0": held_out})  # iteration 0 saved no part yet
    (tmp_path / "run" / "iter-0" / "generate" / "manifest.json").write_text("{}")
    (tmp_path / "run" / "iter-0" / "score" / "manifest.json").parent.mkdir()
    (tmp_path / "run" / "iter-0" / "score" / "manifest.json").write_text("{}")
    run.keep_same_data({"0": record("b"), "eval 0": {**held_out, "digest": "c"}})  # not trained yet
    (tmp_path / "run" / "iter-0" / "train").mkdir()
    (tmp_path / "run" / "iter-0" / "train" / "manifest.json").write_text("{}")
    with pytest.raises(ValueError, match=r"iteration 0's held-out data \(data.eval_source eval.jsonl: 2 examples\)"):
        run.keep_same_data({"0": record("b"), "eval 0": {**held_out, "digest": "d"}})


def test_a_start_by_other_code_says_which_finished_work_it_keeps(tmp_path, caplog):
    """The finished stages stay as the older code made them: the user is told which, to start anew if it matters."""
    (tmp_path / "run" / "iter-0" / "generate").mkdir(parents=True)
    (tmp_path / "run" / "iter-0" / "generate" / "manifest.json").write_text("{}")
    older = json.dumps({"started": "2026-01-01", "code": "0.0.1+older"})
    (tmp_path / "run" / "sessions.jsonl").write_text(older + "\n")
    caplog.set_level(logging.WARNING, logger="spin_fast.run_directory")
    directory(tmp_path).record_session(None)
    assert "was run before by spin-fast 0.0.1+older" in caplog.text
    assert "Its finished stages (iter-0/generate) and unfinished work (none)" in caplog.text


def test_a_rank_that_sees_only_an_earlier_starts_line_is_refused(tmp_path, monkeypatch):
    """A node's own disk holding an earlier run's sessions.jsonl (not the file rank 0 writes) lacks this start's
    line: that rank does not share output_dir, though the file is there."""
    monkeypatch.setattr(spin_fast.run_directory, "SHARED_WAIT_S", 0.0)
    monkeypatch.setattr(spin_fast.run_directory.distributed, "is_main", lambda: False)
    path = tmp_path / "run" / "sessions.jsonl"
    path.parent.mkdir()
    path.write_text('{"started": "2026-01-01"}\n')
    with pytest.raises(ValueError, match="sessions.jsonl lacks this start's line after 0 s"):
        check_shared(tmp_path / "run", path, '{"started": "2026-01-02"}')
    check_shared(tmp_path / "run", path, '{"started": "2026-01-01"}')


def test_a_directory_made_before_token_digests_resumes_and_keeps_them_from_now_on(tmp_path):
    """data.json written by a spin-fast that kept no token digest has none to compare: the same rows resume, and the
    digest of the tokens as now is kept for the starts after this one."""
    run = directory(tmp_path)
    (tmp_path / "run" / "iter-0" / "generate" / "parts").mkdir(parents=True)
    (tmp_path / "run" / "iter-0" / "generate" / "parts" / "000000000-000000004.jsonl").write_text("")
    older = {key: value for key, value in record("a").items() if key != "tokens"}
    (tmp_path / "run" / "data.json").write_text(json.dumps({"0": older}))
    run.keep_same_data({"0": record("a")})
    assert json.loads((tmp_path / "run" / "data.json").read_text()) == {"0": record("a")}


def test_overrides_may_change_for_iterations_without_work_and_in_changeable_settings(tmp_path):
    """Iteration 0 has work: its learning rate is fixed, but its micro-batch (CHANGEABLE: rounding at most) may
    shrink after an out-of-memory error; iteration 1 has none, and a run extended to it may set its own rate."""
    directory(tmp_path, "iteration_overrides.0.train.micro_batch_tokens=4096").claim(None, None, {}, "m")
    (tmp_path / "run" / "iter-0" / "generate" / "parts").mkdir(parents=True)
    (tmp_path / "run" / "iter-0" / "generate" / "parts" / "000000000-000000004.jsonl").write_text("")
    assert directory(tmp_path, "iteration_overrides.0.train.micro_batch_tokens=2048",
                     "iteration_overrides.1.train.learning_rate=1e-8").saved_config() is not None
    with pytest.raises(ValueError, match="differs in iteration_overrides"):
        directory(tmp_path, "iteration_overrides.0.train.micro_batch_tokens=4096",
                  "iteration_overrides.0.train.learning_rate=1e-8").saved_config()


def test_eval_refuses_a_run_started_from_another_revision_of_its_model(tmp_path):
    directory(tmp_path, "model.revision=abc").claim(None, None, {}, "m")
    directory(tmp_path, "model.revision=abc").check_model()
    with pytest.raises(ValueError, match="another model: model.revision"):
        directory(tmp_path, "model.revision=def").check_model()


def test_a_start_after_a_line_cut_short_writes_its_own_line_whole(tmp_path):
    """The cut line gets its end of line first: this start's line is a line of its own, which the other ranks find
    (check_shared) and the next start reads."""
    path = tmp_path / "sessions.jsonl"
    path.write_text('{"started": "2026-')
    line = record_start(path, until=None)
    assert path.read_text().splitlines() == ['{"started": "2026-', line]

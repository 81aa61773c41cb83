"""spin_fast.run_directory, on its own: what keeps a run directory one experiment across starts."""

import json
import logging

import pytest

from spin_fast.config import load_run_config
from spin_fast.run_directory import RunDirectory
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

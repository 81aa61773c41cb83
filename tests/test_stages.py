"""spin_fast.stages: a stage's parts, saved as they finish, resume at the first unsaved one, with none lost or done
twice."""

import json
import os
import signal

import pytest

import spin_fast.stages
from spin_fast import stopping
from spin_fast.scoring import ScoredPair, load_scored_pairs
from spin_fast.stages import finish_stage, finished_summaries, in_parts, read_manifest


def make_part(done):
    def make(start, end):
        done.append((start, end))
        rows = [ScoredPair((1,), (i,), (i + 1,), float(i), -float(i)) for i in range(start, end)]
        return rows, {"finished": end - start}
    return make


@pytest.mark.parametrize("write", ["save_scored_pairs", "write_atomically"], ids=["rows", "info"])
def test_a_part_killed_as_it_is_written_is_made_again_and_the_stage_ends_whole(tmp_path, monkeypatch, write):
    """A part's info is written before its rows (which mark it done): a kill while either is written leaves the part
    unsaved, and the next start makes it again and writes the stage whole."""
    output = tmp_path / "generate" / "pairs.jsonl"
    real_write = getattr(spin_fast.stages, write)

    def killed(*args):
        raise KeyboardInterrupt

    done = []
    monkeypatch.setattr(spin_fast.stages, write, killed)
    with pytest.raises(KeyboardInterrupt):
        in_parts(output, 5, 2, make_part(done), "generation")
    monkeypatch.setattr(spin_fast.stages, write, real_write)
    done.clear()
    totals = in_parts(output, 5, 2, make_part(done), "generation")
    assert done == [(0, 2), (2, 4), (4, 5)]
    assert [p.real_ids for p in load_scored_pairs(output)] == [(i,) for i in range(5)]
    assert totals["finished"] == 5


def test_a_stage_resumes_at_its_first_unsaved_part(tmp_path):
    output = tmp_path / "score" / "scored.jsonl"
    done = []

    def dies_in_the_second_part(start, end):
        if start == 2:
            raise KeyboardInterrupt
        return make_part(done)(start, end)

    with pytest.raises(KeyboardInterrupt):
        in_parts(output, 5, 2, dies_in_the_second_part, "scoring")
    assert done == [(0, 2)]
    done.clear()
    totals = in_parts(output, 5, 2, make_part(done), "scoring")
    assert done == [(2, 4), (4, 5)]
    assert [p.real_ids for p in load_scored_pairs(output)] == [(i,) for i in range(5)]
    assert totals["finished"] == 5


def test_a_signal_during_a_part_stops_the_stage_once_that_part_is_saved(tmp_path):
    """A signal while part 1 of 3 is made waits for it to be saved, then stops the stage there: parts 2 and 3 are
    left to the next start, not made while the scheduler's grace time runs out."""
    output = tmp_path / "generate" / "pairs.jsonl"
    done = []

    def signalled_in_the_first_part(start, end):
        if start == 0:
            os.kill(os.getpid(), signal.SIGTERM)
        return make_part(done)(start, end)

    with stopping.signals_handled(), pytest.raises(stopping.Stopped, match="after part 1 of 3 of generation") as stop:
        in_parts(output, 5, 2, signalled_in_the_first_part, "generation")
    assert stop.value.agreed and done == [(0, 2)]
    assert sorted(p.name for p in (tmp_path / "generate" / "parts").glob("*.jsonl")) == ["000000000-000000002.jsonl"]


def test_a_finished_stage_has_its_manifest_and_no_parts(tmp_path):
    """The parts are a copy of the stage's output: once the manifest marks the stage done they are removed."""
    stage = tmp_path / "generate"
    in_parts(stage / "pairs.jsonl", 3, 2, make_part([]), "generation")
    finish_stage(stage, stage="generate")
    assert read_manifest(stage)["stage"] == "generate"
    assert sorted(p.name for p in stage.iterdir()) == ["manifest.json", "pairs.jsonl"]


def test_finished_summaries_find_the_checkpoints_of_a_moved_run_directory_where_it_is_now(tmp_path):
    """Iteration 0's checkpoint was recorded where the run directory was (/old/run): it is now under tmp_path, and
    its summary names it there. Iteration 1's recorded checkpoint is not in the folder: its recorded path stays. The
    summaries stop at the first iteration whose training has no manifest (iteration 2's, though 3 has one)."""
    for t, recorded in ((0, "/old/run/iter-0/train/final"), (1, "/shared/other/final"), (3, "/old/run/x")):
        train = tmp_path / f"iter-{t}" / "train"
        train.mkdir(parents=True)
        (train / "manifest.json").write_text(json.dumps({"summary": {"iteration": t, "checkpoint": recorded}}))
    (tmp_path / "iter-0" / "train" / "final").mkdir()
    moved = str(tmp_path / "iter-0" / "train" / "final")
    assert finished_summaries(tmp_path) == [{"iteration": 0, "checkpoint": moved},
                                            {"iteration": 1, "checkpoint": "/shared/other/final"}]

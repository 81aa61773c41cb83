"""spin_fast.stages: a stage's parts, saved as they finish, resume at the first unsaved one, with none lost or done
twice."""

import pytest

import spin_fast.stages
from spin_fast.scoring import ScoredPair, load_scored_pairs
from spin_fast.stages import in_parts


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

"""The whole-iteration profile's harness end to end on a tiny preset (figures are not checked, only sane)."""

import json
import math

from bench import common, iteration


def test_iteration_profile_tiny(tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(common, "RESULTS_DIR", tmp_path)  # never overwrite the committed results
    assert iteration.main(["--preset", "tiny", "--engine", "transformers"]) == 0
    report = json.loads((tmp_path / "iteration-tiny.json").read_text())
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
    assert "median of iterations 2, 3, 4" in iteration.summary_table(
        {"rows": list(rows.values()), "engine": "TransformersEngine"})

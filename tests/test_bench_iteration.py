"""The whole-iteration profile's harness end to end on a tiny preset (figures are not checked, only sane)."""

import json
import math

from bench import common, iteration


def test_iteration_profile_tiny(tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(common, "RESULTS_DIR", tmp_path)  # never overwrite the committed results
    assert iteration.main(["--preset", "tiny", "--engine", "transformers"]) == 0
    report = json.loads((tmp_path / "iteration-tiny.json").read_text())
    rows = report["rows"]
    for t in (0, 1):
        stages = [r["stage"] for r in rows if r["iteration"] == t]
        assert stages == (["engine_start"] if t == 0 else []) + ["generate", "score", "train", "weight_transfer"]
        assert math.isclose(sum(r["share"] for r in rows if r["iteration"] == t), 1.0)
    assert all(r["seconds"] >= 0 and math.isfinite(r["peak_extra_mib"]) for r in rows)
    assert report["pairs"] == [16, 32]  # iteration 1 also trains on iteration 0's pairs
    assert report["engine"] == "TransformersEngine" and report["machine"]["versions"]["torch"]
    assert "weight_transfer" in capsys.readouterr().out

"""Plots and the summary table are drawn from the committed bench results."""

import re
import shutil
from pathlib import Path

import pytest

from bench import plots

RESULTS = Path(__file__).resolve().parent.parent / "bench" / "results"


def test_every_committed_result_with_a_plotter_gets_a_png(tmp_path):
    for source in RESULTS.glob("*.json"):
        shutil.copy(source, tmp_path)
    written = plots.plot_all(tmp_path)
    names = {p.name for p in written}
    assert {"kernels-cpu.png", "train_step-cpu.png"} <= names
    for path in written:
        assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and path.stat().st_size > 10_000


def test_summary_table_has_every_bench_and_names_what_did_not_run(tmp_path, monkeypatch):
    from bench import common, summary

    for source in RESULTS.glob("*-cpu.json"):
        shutil.copy(source, tmp_path)
    (tmp_path / "generate-cpu.json").unlink()
    monkeypatch.setattr(common, "RESULTS_DIR", tmp_path)
    table = summary.summary_table(["kernels", "train_step", "generate", "scaling", "iteration"], "cpu")
    assert "spin-fast torch" in table and "train step: spin-fast" in table and "ZeRO-3" in table
    assert "Cut Cross-Entropy" in table and "missing:" in table  # a peer that cannot run is reported, not dropped
    assert "no results: bench/results/generate-cpu.json was not written" in table


def test_a_plot_of_a_partial_report_says_so(tmp_path, monkeypatch):
    """check.sh draws the plots of benches cut off by their slot: the PNG must not pass for a whole run."""
    import json

    titles = []
    monkeypatch.setattr(plots, "_save", lambda fig, path: titles.append(fig._suptitle.get_text()) or path)
    report = {"bench": "kernels", "preset": "gpu", "custom": [], "machine": {"device": "cuda"},
              "shape": {"tokens": 16384}, "partial": "written while the bench ran; it stopped before its end",
              "results": [{"vocab": 128256, "job": "spin_head", "method": "naive PyTorch", "median_ms": 100.0,
                           "min_ms": 100.0, "max_ms": 100.0, "runs": 1, "peak_extra_mib": 40.0, "value": 0.7}]}
    (tmp_path / "kernels-gpu.json").write_text(json.dumps(report))
    assert plots.plot_all(tmp_path)
    assert "partial" in titles[0], titles


def test_a_corrupt_or_unexpected_result_file_is_named(tmp_path):
    """A results folder may hold a file cut short (a bench killed while writing elsewhere, a copy) or another
    program's JSON: the error names the file, not only json's "line 1 column 12"."""
    for name, text in [("kernels-cpu.json", '{"bench": "kern'), ("notes.json", "[1, 2]"),
                       ("train_step-cpu.json", '{"bench": "train_step", "preset": "cpu"}')]:
        folder = tmp_path / name
        folder.mkdir()
        (folder / name).write_text(text)
        with pytest.raises(ValueError, match=rf"{re.escape(str(folder / name))}: not a bench report"):
            plots.plot_all(folder)

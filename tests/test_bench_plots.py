"""Plots and the summary table are drawn from the committed bench results."""

import shutil
from pathlib import Path

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

"""Plots are drawn from the committed bench results: valid PNGs, one per bench with a plotter."""

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

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


def test_the_presets_are_those_of_the_committed_results_and_their_comments():
    """The README quotes the committed CPU results as the CPU presets' figures: a preset's shape changed without a
    new run would leave them describing another workload. The GPU presets' token and parameter counts are those their
    comments size bench/gpu/check.sh's slots by."""
    import dataclasses
    import json

    import torch
    from transformers import AutoModelForCausalLM, LlamaConfig

    from bench import generate, iteration, kernels, scaling, train_step

    def shape_of(name):
        return json.loads((RESULTS / f"{name}-cpu.json").read_text())["shape"]

    preset, shape = kernels.PRESETS["cpu"], shape_of("kernels")
    assert {key: shape[key] for key in ("tokens", "hidden", "pairs", "warmup", "repeats")} == {
        key: getattr(preset, key) for key in ("tokens", "hidden", "pairs", "warmup", "repeats")}
    report = json.loads((RESULTS / "kernels-cpu.json").read_text())
    assert sorted({r["vocab"] for r in report["results"]}) == list(preset.vocabs)
    assert shape["dtype"] == str(preset.dtype)
    assert sorted({r["job"] for r in report["results"]}) == sorted(preset.jobs)
    for module in (train_step, scaling, generate):
        preset, shape = module.PRESETS["cpu"], shape_of(module.__name__.split(".")[-1])
        for field in dataclasses.fields(preset):
            if field.name in shape:
                assert str(shape[field.name]) == str(getattr(preset, field.name)), (module.__name__, field.name)
    assert json.loads((RESULTS / "iteration-cpu.json").read_text())["preset"] == dataclasses.asdict(
        iteration.PRESETS["cpu"])

    def parameters(preset):
        config = LlamaConfig(vocab_size=preset.vocab, hidden_size=preset.hidden, intermediate_size=preset.intermediate,
                             num_hidden_layers=preset.layers, num_attention_heads=preset.heads,
                             num_key_value_heads=preset.heads, tie_word_embeddings=False)
        with torch.device("meta"):
            return sum(p.numel() for p in AutoModelForCausalLM.from_config(config).parameters())

    for module, billions in ((train_step, 0.94), (scaling, 0.54)):
        preset = module.PRESETS["gpu"]
        assert train_step.real_tokens(train_step.make_pairs(preset)) == 20746 and preset.pairs == 16
        assert round(parameters(preset) / 1e9, 2) == billions and preset.dtype == torch.bfloat16
    preset = kernels.PRESETS["gpu"]
    assert (preset.vocabs, preset.hidden, preset.tokens, preset.dtype) == ((128256,), 4096, 16384, torch.bfloat16)


def test_each_plot_panel_shows_its_own_figure_at_its_own_place(tmp_path, monkeypatch):
    """Time in the left column, memory in the right, each job in its row and each method's line at its vocabularies;
    the train step's bars its throughput and its peak; the iteration's bars each stage's median with its min-max
    spread, and its peak (none measured: 0). A figure swapped between panels passed the PNG checks."""
    import json

    figures = []  # not written: kept open to read back what each panel shows
    monkeypatch.setattr(plots, "_save", lambda fig, path: figures.append(fig) or path)
    machine = {"device": "cpu"}

    def kernel(vocab, job, method, ms, mib):
        return {"vocab": vocab, "job": job, "method": method, "median_ms": ms, "min_ms": ms, "max_ms": ms,
                "runs": 1, "peak_extra_mib": mib, "value": 0.7}

    reports = {
        "kernels": {"bench": "kernels", "preset": "cpu", "machine": machine, "shape": {"tokens": 256}, "results": [
            kernel(2000, "spin_head", "naive PyTorch", 30.0, 300.0),  # vocabularies out of order: drawn sorted
            kernel(1000, "spin_head", "naive PyTorch", 10.0, 100.0),
            kernel(1000, "logprobs", "naive PyTorch", 5.0, 50.0),
            kernel(1000, "spin_head", "spin-fast torch", 4.0, 8.0),
            {"vocab": 2000, "job": "spin_head", "method": "spin-fast torch", "missing": "no CUDA"}]},
        "train_step": {"bench": "train_step", "preset": "cpu", "machine": machine, "results": [
            {"method": "spin-fast", "tokens_per_s": 900.0, "peak_extra_mib": 40.0},
            {"method": "TRL live", "missing": "no trl"},
            {"method": "TRL precomputed", "tokens_per_s": 300.0, "peak_extra_mib": 120.0}]},
        "iteration": {"bench": "iteration", "preset": {"name": "cpu"}, "engine": "transformers", "machine": machine,
                      "rows": [
                          {"stage": "engine_start", "seconds": 5.0, "min": 5.0, "max": 5.0, "share": None,
                           "peak_extra_mib": None},
                          {"stage": "generate", "seconds": 2.0, "min": 1.5, "max": 3.0, "share": 0.8,
                           "peak_extra_mib": 64.0}]},
    }
    for name, report in reports.items():
        (tmp_path / f"{name}-cpu.json").write_text(json.dumps(report))
    assert len(plots.plot_all(tmp_path)) == 3
    iteration, kernels, train_step = figures  # plot_all goes through the files by name

    def lines(ax):
        return {line.get_label(): line.get_xydata().tolist() for line in ax.get_lines()}

    (logprobs_ms, logprobs_mib), (head_ms, head_mib) = kernels.axes[:2], kernels.axes[2:]
    assert lines(logprobs_ms) == {"naive PyTorch": [[1000, 5.0]]} and lines(logprobs_mib) == {
        "naive PyTorch": [[1000, 50.0]]}
    assert lines(head_ms) == {"naive PyTorch": [[1000, 10.0], [2000, 30.0]], "spin-fast torch": [[1000, 4.0]]}
    assert lines(head_mib) == {"naive PyTorch": [[1000, 100.0], [2000, 300.0]], "spin-fast torch": [[1000, 8.0]]}

    def bars(ax):
        return [patch.get_height() for patch in ax.patches]

    speed, memory = train_step.axes
    assert bars(speed) == [900.0, 300.0] and bars(memory) == [40.0, 120.0]
    assert [t.get_text() for t in speed.get_xticklabels()] == ["spin-fast", "TRL precomputed"]
    seconds, peak = iteration.axes
    assert bars(seconds) == [5.0, 2.0] and bars(peak) == [0.0, 64.0]
    (spread,) = [c for c in seconds.containers if hasattr(c, "lines") and c.lines[2]]
    whiskers = spread.lines[2][0].get_segments()
    assert [(low[1], high[1]) for low, high in whiskers] == [(5.0, 5.0), (1.5, 3.0)]
    for figure in figures:  # kept open by the stand-in for _save
        plots._pyplot().close(figure)

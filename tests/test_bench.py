"""The kernel bench's harness on a tiny preset: every method it runs computes the same loss.

This checks the bench's plumbing and fairness (same batch, same value), not its speed."""

import json

import pytest

from bench import common, kernels


def test_batch_is_realistic():
    preset = kernels.PRESETS["cpu"]
    layout = kernels.sequence_layout(preset, seed=0)
    total = sum(2 * p + r + g for p, r, g in layout)
    prompt_share = sum(2 * p for p, _, _ in layout) / total
    assert abs(total - preset.tokens) < 2 * preset.pairs  # rounding only
    assert 0.25 < prompt_share < 0.42  # prompts carry no loss: about a third of the tokens
    assert len({r for _, r, _ in layout}) > 1  # uneven responses


def test_padded_layout_holds_the_same_tokens():
    batch = kernels.make_batch(kernels.PRESETS["tiny"], vocab=100)
    kept = batch.targets[batch.targets != -100]
    padded_kept = batch.padded_targets[batch.padded_targets != -100]
    assert sorted(kept.tolist()) == sorted(padded_kept.tolist())


@pytest.mark.slow
def test_tiny_bench_runs_and_methods_agree(tmp_path, monkeypatch):
    monkeypatch.setattr(common, "RESULTS_DIR", tmp_path)  # never overwrite the committed results
    methods = ["naive PyTorch", "spin-fast torch", "spin-fast triton", "F.linear_cross_entropy"]
    assert kernels.main(["--preset", "tiny", "--methods", *methods]) == 0
    report = json.loads((tmp_path / "kernels-tiny.json").read_text())
    by_method = {(r["job"], r["method"]): r for r in report["results"]}
    assert "missing" in by_method["spin_head", "spin-fast triton"]  # no CUDA here: reported, not dropped
    for job in kernels.JOBS:
        for method in ("spin-fast torch", "F.linear_cross_entropy"):
            result = by_method[job, method]
            assert result["value_rel_diff"] < 1e-4, result
            assert result["peak_extra_mib"] >= 0 and result["median_ms"] > 0

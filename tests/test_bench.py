"""The kernel bench's harness on a tiny preset: every method it runs computes the same loss.

This checks the bench's plumbing and fairness (same batch, same value), not its speed."""

import contextlib
import json
import os
import re
import signal
import time

import pytest
import torch

from bench import common, kernels, summary


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


def test_simpo_head_agrees_with_liger_and_the_papers_formula():
    """The simpo_head job: spin-fast's recipe (mean log-probs, opponent 0 and -gamma / beta), Liger's own SimPO loss
    on the padded batch and SimPO's formula on naive log-probs give one loss and one head gradient."""
    batch = kernels.make_batch(kernels.PRESETS["tiny"], vocab=500)
    losses, grads = {}, {}
    # Liger compiles its chunk (~25 s on 2 cores). config.patch, not monkeypatch: monkeypatch's undo hid the setting,
    # and every later compile in the process failed ("torch._dynamo.config.disable does not exist").
    with torch._dynamo.config.patch(disable=True):
        for method in ("naive PyTorch", "spin-fast torch", "Liger SimPO loss"):
            batch.weight.grad = None
            loss = kernels.METHODS[method]()["simpo_head"](batch)
            loss.backward()
            losses[method], grads[method] = float(loss), batch.weight.grad.clone()
    for method in ("spin-fast torch", "Liger SimPO loss"):
        assert losses[method] == pytest.approx(losses["naive PyTorch"], rel=1e-5)
        torch.testing.assert_close(grads[method], grads["naive PyTorch"], rtol=1e-4, atol=1e-7)
    assert kernels.unavailable(kernels.PRESETS["tiny"], "spin_head", "Liger SimPO loss")
    assert kernels.unavailable(kernels.PRESETS["tiny"], "simpo_head", "Liger DPO loss")


def test_a_naive_baseline_runs_the_head_on_the_tokens_spin_fast_runs_it_on():
    """naive PyTorch (as torch.compile and F.linear_cross_entropy) gets every token of the batch, prompts included,
    while spin-fast's head drops the ~30% that carry no loss: its time against naive's mixes that with the kernel's
    own speed. The same naive code on the loss tokens alone is measured too, and it computes the same loss and
    gradients with the head's matmul over the loss tokens only."""
    from torch.utils.flop_counter import FlopCounterMode

    preset = kernels.PRESETS["tiny"]
    batch = kernels.make_batch(preset, vocab=500)
    n_tokens, n_loss = batch.targets.numel(), int((batch.targets != -100).sum())
    assert n_loss < 0.8 * n_tokens  # prompts: the tokens the two naive baselines differ by
    flops, losses, grads = {}, {}, {}
    for method in ("naive PyTorch", "naive PyTorch, loss tokens"):
        for leaf in batch.leaves:
            leaf.grad = None
        with FlopCounterMode(display=False) as counter:
            loss = kernels.METHODS[method]()["spin_head"](batch)
        flops[method] = counter.get_total_flops()
        loss.backward()
        losses[method], grads[method] = float(loss), (batch.hidden.grad.clone(), batch.weight.grad.clone())
    head = 2 * preset.hidden * 500  # forward FLOPs of the head per token
    assert flops["naive PyTorch"] == head * n_tokens
    assert flops["naive PyTorch, loss tokens"] == head * n_loss
    assert losses["naive PyTorch, loss tokens"] == pytest.approx(losses["naive PyTorch"], rel=1e-6)
    for got, want in zip(grads["naive PyTorch, loss tokens"], grads["naive PyTorch"]):
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-7)
    # In every preset's run, next to the other methods.
    assert "naive PyTorch, loss tokens" in kernels.PRESETS["gpu"].methods
    assert not kernels.PRESETS["cpu"].methods


def test_a_method_with_the_right_loss_but_wrong_gradients_is_flagged(monkeypatch):
    """The bench compared a method's loss value alone with the baseline's: a method that skips the hidden states'
    gradient (a peer called with inputs that do not require it) computes the same loss, runs faster, and was
    reported as agreeing. Its gradients are compared too, whatever the layout (packed or padded)."""
    monkeypatch.setitem(kernels.METHODS, "naive, no hidden gradient", lambda: kernels.from_logprobs(
        lambda b: kernels.naive_token_logps(b.hidden.detach(), b.weight, b.targets)))
    preset = kernels.PRESETS["tiny"]
    results = []
    for method in ("naive PyTorch", "naive, no hidden gradient", "Liger DPO loss", "spin-fast torch"):
        result = kernels.measure(preset, 300, "spin_head", method)  # Liger's compile: ~10 s on 2 cores
        results.append({**result, "vocab": 300, "job": "spin_head", "method": method, "matmul_tflops": 1.0})
    kernels._add_ratios(results)
    by_method = {r["method"]: r for r in results}
    wrong = by_method["naive, no hidden gradient"]
    assert wrong["value_rel_diff"] < 1e-6  # the loss alone looks right
    assert wrong["grad_rel_diff"] > 0.5
    for method in ("Liger DPO loss", "spin-fast torch"):  # the padded batch's gradients compare with the packed one's
        assert by_method[method]["grad_rel_diff"] < 1e-4, by_method[method]
    table = kernels.summary_table(results)
    assert "DIFFERS" in next(line for line in table.splitlines() if "no hidden gradient" in line)
    assert not any("DIFFERS" in line for line in table.splitlines() if "spin-fast" in line or "Liger" in line)
    headline = dict(summary.kernel_rows({"results": results, "baseline": "naive PyTorch"}))
    assert "DIFFERS" in headline["SPIN head, V=300: naive, no hidden gradient"]
    assert "DIFFERS" not in headline["SPIN head, V=300: spin-fast torch"]


@pytest.mark.slow
def test_tiny_bench_runs_and_methods_agree(tmp_path, monkeypatch):
    monkeypatch.setattr(common, "RESULTS_DIR", tmp_path)  # never overwrite the committed results
    methods = ["naive PyTorch", "spin-fast torch", "spin-fast triton", "F.linear_cross_entropy"]
    assert kernels.main(["--preset", "tiny", "--methods", *methods]) == 0
    # A selection of methods is not the preset's run: its own file, the preset's left alone.
    assert not (tmp_path / "kernels-tiny.json").exists()
    report = json.loads((tmp_path / "kernels-tiny-custom.json").read_text())
    assert report["custom"] == ["--methods", *methods]
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
    # --baseline divides by another method (run first); a baseline peak of a few pages gives no memory ratio.
    assert kernels.main([*argv, "--methods", "naive PyTorch", "spin-fast torch", "--baseline", "spin-fast torch"]) == 0
    shown = capsys.readouterr().out
    report = json.loads((tmp_path / "kernels-tiny-custom.json").read_text())
    assert report["baseline"] == "spin-fast torch" and report["custom"][-2:] == ["--baseline", "spin-fast torch"]
    assert [r["method"] for r in report["results"]] == ["spin-fast torch", "naive PyTorch"]
    base, naive = report["results"]
    assert base["time_vs_baseline"] == 1.0 and naive["time_vs_baseline"] == naive["median_ms"] / base["median_ms"]
    assert ("memory_vs_baseline" in naive) == (base["peak_extra_mib"] >= kernels.MEMORY_FLOOR_MIB)
    assert "x spin-fast torch time" in shown and "/ spin-fast torch's at that vocab and job" in shown
    small = [{"vocab": 1, "job": "logprobs", "method": m, "median_ms": 1.0, "min_ms": 1.0, "max_ms": 1.0,
              "peak_extra_mib": peak, "value": 1.0}
             for m, peak in (("naive PyTorch", 0.0), ("spin-fast torch", 0.5))]
    kernels._add_ratios(small)  # a peak of 0 (all in reused pages) divided nothing
    assert all("memory_vs_baseline" not in r for r in small) and small[1]["time_vs_baseline"] == 1.0
    assert "a few pages" in kernels.summary_table(small)


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
    assert "bench kernels failed" in err and "no results from this run (its error is above)" in out
    # A bench that returns without writing its file (the iteration profile's worker failed) shows no older figures.
    assert out.count("no results from this run") == 2

    def writes(argv):  # as a bench does, in this process and through its workers' environment
        common.write_json("kernels-tiny-custom", {"results_dir": os.environ["SPIN_BENCH_RESULTS"]})
        return 0

    monkeypatch.setenv("SPIN_BENCH_RESULTS", str(tmp_path))  # restored after the test, as common.RESULTS_DIR is
    monkeypatch.setattr(bench_main, "BENCHES", {"kernels": SimpleNamespace(main=writes)})
    elsewhere = tmp_path / "elsewhere"
    assert bench_main.main(["--preset", "tiny", "--out", str(elsewhere), "--only", "kernels", "--tokens", "8"]) == 0
    assert "(no summary: a shape or config of your own" in capsys.readouterr().out
    assert json.loads((elsewhere / "kernels-tiny-custom.json").read_text()) == {"results_dir": str(elsewhere)}


def test_the_summary_follows_the_file_a_bench_wrote_not_its_flags(tmp_path, monkeypatch, capsys):
    """The summary comes after a run that wrote the preset's file, and not after one that wrote its -custom file.
    Decided by the flags given, a failed run of one's own said "the bench's table above has its figures" under its
    error, and --baseline 'naive PyTorch' (the default, written to the preset's file) printed no summary."""
    from types import SimpleNamespace

    import bench.__main__ as bench_main

    monkeypatch.setattr(common, "RESULTS_DIR", tmp_path)
    out = ["--preset", "tiny"]
    assert bench_main.main([*out, "--only", "iteration", "--config", str(tmp_path / "absent.yaml")]) == 2
    shown = capsys.readouterr()
    assert "absent.yaml: No such file or directory" in shown.err
    assert "table above" not in shown.out and "no results from this run (its error is above)" in shown.out

    def baseline_given(argv):  # as kernels.main names its file: the default baseline is the preset's run
        common.write_json("kernels-tiny" + ("" if argv[-1] == kernels.BASELINE else "-custom"),
                          {"bench": "kernels", "baseline": argv[-1], "results": [], "machine": {"device": "cpu"}})
        return 0

    monkeypatch.setattr(bench_main, "BENCHES", {"kernels": SimpleNamespace(main=baseline_given)})
    assert bench_main.main([*out, "--only", "kernels", "--baseline", kernels.BASELINE]) == 0
    assert "summary (tiny preset" in capsys.readouterr().out
    assert bench_main.main([*out, "--only", "kernels", "--baseline", "spin-fast torch"]) == 0
    shown = capsys.readouterr().out
    assert "(no summary: a shape or config of your own" in shown and "summary (tiny preset" not in shown


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
    from bench import generate, iteration, scaling, train_step

    no_cuda = not torch.cuda.is_available()
    for run, argv, message in [
        (bench_main.main, ["--methods", "naive PyTorch"], "a bench's own options go with --only NAME"),
        (bench_main.main, ["--preset", "gpu"] if no_cuda else ["--preset", "x"], "preset"),
        (train_step.main, ["--preset", "tiny", "--methods", "bogus"], "invalid choice: 'bogus'"),
        (train_step.main, ["--preset", "tiny", "--methods"], "expected at least one argument"),
        (kernels.main, ["--preset", "tiny", "--vocabs", "0"], "expected a whole number >= 1, got '0'"),
        # Each bench on its own names a GPU preset without CUDA, not CUDA's assertion from inside a worker.
        *[(bench.main, ["--preset", "gpu"], "--preset gpu needs CUDA") for bench in
          ((kernels, train_step, generate, scaling, iteration) if no_cuda else ())],
        (generate.main, ["--preset", "tiny", "--engine", "transformers"], "--engine is its workers' option"),
        (generate.main, ["--preset", "tiny", "--engines"], "expected at least one argument"),
        (iteration.main, ["--preset", "tiny", "--conf", "x.yaml"], "unrecognized arguments: --conf"),
    ]:
        with pytest.raises(SystemExit) as exit_:
            run(argv)
        assert exit_.value.code == 2 and message in capsys.readouterr().err, argv
    plots = subprocess.run([sys.executable, "-m", "bench.plots", "--help"], capture_output=True, text=True)
    assert plots.returncode == 0 and "results_dir" in plots.stdout  # was taken for a results folder


def test_a_worker_past_its_time_is_one_failed_measurement(tmp_path, monkeypatch):
    """A worker that hangs is ended at its timeout and recorded as failed. The worker sleeps: a real bench's tiny
    measurement could finish within a short timeout on a fast machine (it did once, in CI)."""
    from bench import common

    (tmp_path / "sleeping_worker.py").write_text("import time\ntime.sleep(120)\n")
    monkeypatch.setenv("PYTHONPATH", os.pathsep.join([str(tmp_path), os.environ.get("PYTHONPATH", "")]))
    started = time.monotonic()
    result = common.run_worker("sleeping_worker", [], timeout=1)
    assert result["error"] == ["timed out after 1 s"] and time.monotonic() - started < 60


def test_a_failed_worker_keeps_its_traceback():
    """A worker that fails (on the GPU machine, there is one run to read it from) leaves the error's line for the
    tables and the output before it, traceback included, in its record."""
    from bench import common

    result = common.run_worker("bench.kernels", ["--preset", "tiny", "--vocab", "1000", "--job", "spin_head",
                                                 "--method", "no such method"], timeout=300)
    assert result["error"] == ["KeyError: 'no such method'"]
    assert result["output_tail"][0].startswith("Traceback") and "bench/kernels.py" in "\n".join(result["output_tail"])


@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGKILL])
def test_a_stopped_bench_takes_its_worker_with_it(tmp_path, signum):
    """The worker runs in a session of its own (a timeout ends it with its children), where a SIGTERM sent to the
    bench (timeout, a scheduler) does not reach it: the bench ends it; killed outright, the bench takes it along
    too (the worker's parent-death signal)."""
    import subprocess
    import sys
    import time

    import psutil

    bench = subprocess.Popen([sys.executable, "-m", "bench.kernels", "--preset", "tiny", "--methods", "naive PyTorch"],
                             env={**os.environ, "SPIN_BENCH_RESULTS": str(tmp_path)}, stdout=subprocess.DEVNULL,
                             stderr=subprocess.PIPE, text=True)
    workers: list = []
    try:
        deadline = time.monotonic() + 120
        while not workers and time.monotonic() < deadline and bench.poll() is None:
            time.sleep(0.2)
            workers = _workers_of(bench.pid)
        assert workers, "no worker started"
        bench.send_signal(signum)
        assert bench.wait(timeout=30) == (128 + signum if signum == signal.SIGTERM else -signum), bench.stderr.read()
        alive = _outliving(workers, seconds=10)
        assert not alive, f"{alive} outlived the bench"
    finally:
        bench.kill()
        for worker in workers:
            with contextlib.suppress(psutil.NoSuchProcess):
                worker.kill()


def test_a_worker_whose_bench_died_as_it_started_does_not_run(tmp_path):
    """A bench killed outright between its worker's fork and the worker's parent-death signal (asked for in the
    child, before its exec) would leave the worker running with no one to end it: it sees its parent gone and ends."""
    import subprocess
    import sys

    import psutil

    (tmp_path / "sleeper.py").write_text("import time\ntime.sleep(600)\n")
    pid_file = tmp_path / "worker.pid"
    script = (
        "import os, signal, time\nfrom bench import common\nasked = common.ended_with_its_parent\n"
        "def bench_killed_first(*args):\n    parent = os.getppid()\n"
        f"    open({str(pid_file)!r}, 'w').write(str(os.getpid()))\n"
        "    os.kill(parent, signal.SIGKILL)\n    while os.getppid() == parent:\n        time.sleep(0.01)\n"
        "    asked(*args)\n"
        "common.ended_with_its_parent = bench_killed_first\ncommon.run_worker('sleeper', [])\n")
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(tmp_path), *sys.path])}
    bench = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True, text=True, timeout=60)
    assert bench.returncode == -signal.SIGKILL, bench.stderr
    worker = psutil.Process(int(pid_file.read_text()))
    try:
        assert not _outliving([worker], seconds=5), f"{worker} outlived its bench"
    finally:
        with contextlib.suppress(psutil.NoSuchProcess):
            worker.kill()


def _outliving(processes: list, seconds: float) -> list:
    """Those of `processes` not ended within `seconds`. Not psutil.wait_procs: for a process that is not our child
    it waits until init has reaped the zombie, in init's own time (this machine's, every 2 s; longer under load)."""
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline and not all(map(_ended, processes)):
        time.sleep(0.05)
    return [process for process in processes if not _ended(process)]


def _ended(process) -> bool:
    """Gone, or a zombie: an orphan is reaped by init in its own time (this machine's, every 2 s)."""
    import psutil

    try:
        return process.status() == psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return True


def _workers_of(pid: int) -> list:
    """The bench's worker processes among its children; one that ends as it is looked at (its git, run for the
    machine's record) is none of them."""
    import psutil

    workers = []
    for child in psutil.Process(pid).children():
        with contextlib.suppress(psutil.NoSuchProcess):  # ZombieProcess too: exited, not yet waited on
            if "--worker" in child.cmdline():
                workers.append(child)
    return workers


def test_the_search_for_workers_passes_over_a_child_that_ended():
    """A child of the bench that ends as the search reads its command line (the git of its machine record, exited
    and not yet waited on) is no worker, not the search's error: the flake of the test above under load."""
    import subprocess

    import psutil

    ended = subprocess.Popen(["true"])
    try:
        while psutil.Process(ended.pid).status() != psutil.STATUS_ZOMBIE:
            time.sleep(0.01)
        assert _workers_of(os.getpid()) == []
    finally:
        ended.wait()


def test_a_sigterm_as_a_worker_starts_is_handled_as_any_other(tmp_path):
    """The scheduler's SIGTERM in the moment the worker has started (before the bench waited on it) ends the bench
    by its handler (status 143, its cleanup run), not by the default action (-15, no cleanup); the worker goes too.
    Sent here from within Popen, once the worker runs: the moment a test sending it from outside hit by chance."""
    import subprocess
    import sys

    import psutil

    (tmp_path / "sleeper.py").write_text("import time\ntime.sleep(600)\n")
    script = (
        "import os, signal, subprocess\nfrom bench import common\n"
        "class Signalled(subprocess.Popen):\n    def __init__(self, *args, **kwargs):\n"
        "        super().__init__(*args, **kwargs)\n        print(self.pid, flush=True)\n"
        "        os.kill(os.getpid(), signal.SIGTERM)\n"
        "subprocess.Popen = Signalled\ncommon.run_worker('sleeper', [])\n")
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(tmp_path), *sys.path])}
    bench = subprocess.Popen([sys.executable, "-c", script], env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                             text=True)
    worker = int(bench.stdout.readline() or 0)
    try:
        assert bench.wait(timeout=60) == 128 + signal.SIGTERM, bench.stderr.read()
        assert worker > 0
        with contextlib.suppress(psutil.NoSuchProcess):  # already gone
            assert not _outliving([psutil.Process(worker)], seconds=10), "the worker outlived the bench"
    finally:
        bench.kill()
        if worker > 0:
            with contextlib.suppress(psutil.NoSuchProcess):
                psutil.Process(worker).kill()


def _fake(ms: float, mib: float, value: float = 0.7) -> dict:
    return {"median_ms": ms, "min_ms": ms, "max_ms": ms, "runs": 1, "peak_extra_mib": mib, "value": value,
            "tokens": 256, "loss_tokens": 150, "padded_tokens": 300}


def test_a_kernels_run_cut_off_midway_keeps_its_ratios(tmp_path, monkeypatch):
    """naive runs first "so a run cut off midway still has what its ratios divide by"; check.sh's report then
    summarizes the partial JSON. The partial JSON must carry the ratios of what was measured."""
    monkeypatch.setattr(common, "RESULTS_DIR", tmp_path)
    monkeypatch.setattr(kernels, "matmul_tflops", lambda preset, vocab: 1.0)
    measured = {"naive PyTorch": _fake(100.0, 40.0), "torch.compile": _fake(50.0, 10.0)}

    def run_one(preset, vocab, job, method, shape_argv):
        if method not in measured:
            raise SystemExit(143)  # check.sh's TERM at the end of the bench's slot
        return dict(measured[method])

    monkeypatch.setattr(kernels, "run_one", run_one)
    with pytest.raises(SystemExit):
        kernels.main(["--preset", "tiny"])
    report = json.loads((tmp_path / "kernels-tiny.json").read_text())
    assert "partial" in report
    compiled = next(r for r in report["results"] if r["method"] == "torch.compile")
    assert compiled.get("time_vs_baseline") == pytest.approx(0.5), compiled
    table = summary.summary_table(["kernels"], "tiny")
    assert "time 0.50x, memory 0.25x of naive" in table, table


def test_the_summary_names_a_failed_baseline(tmp_path, monkeypatch):
    """Naive PyTorch out of memory (the GPU preset's ~35 GB of logits): the summary must say so, not drop its row
    and leave every other row at '-x of naive' with no reason."""
    monkeypatch.setattr(common, "RESULTS_DIR", tmp_path)
    results = [{"vocab": 128256, "job": "spin_head", "method": "naive PyTorch",
                "error": ["torch.OutOfMemoryError: CUDA out of memory"]},
               {"vocab": 128256, "job": "spin_head", "method": "spin-fast triton", **_fake(50.0, 10.0)}]
    kernels._add_ratios(results)
    (tmp_path / "kernels-tiny.json").write_text(json.dumps(
        {"bench": "kernels", "preset": "tiny", "baseline": "naive PyTorch", "machine": {"device": "cuda"},
         "results": results}))
    table = summary.summary_table(["kernels"], "tiny")
    assert "out of memory" in table, table


def test_the_matmul_rate_fraction_does_not_depend_on_the_baseline():
    """fraction_of_matmul_rate is the method's own FLOP rate over the device's: it needs no baseline, but is left
    out whenever the baseline has no figures (naive out of memory)."""
    spin = {"vocab": 1000, "job": "spin_head", "method": "spin-fast torch", **_fake(50.0, 10.0),
            "achieved_tflops": 0.5, "matmul_tflops": 2.0}
    results = [{"vocab": 1000, "job": "spin_head", "method": "naive PyTorch", "error": ["OOM"]}, spin]
    kernels._add_ratios(results)
    assert spin.get("fraction_of_matmul_rate") == pytest.approx(0.25), spin


@pytest.mark.slow
def test_without_the_bench_extras_the_peers_are_missing_and_the_summary_still_comes(tmp_path, monkeypatch, capsys):
    """Without `.[bench]` (TRL, Liger-Kernel, matplotlib) the peers are listed as missing and spin-fast still runs;
    the plots, which need matplotlib, were the run's end: ImportError after the benches, and no summary table."""
    import sys

    import bench.__main__ as bench_main

    hidden = tmp_path / "hidden"
    for package in ("trl", "matplotlib"):  # the workers' TRL, and this process's matplotlib
        (hidden / package).mkdir(parents=True)
        (hidden / package / "__init__.py").write_text(f"raise ImportError(\"No module named '{package}'\")\n")
    monkeypatch.setenv("PYTHONPATH", os.pathsep.join([str(hidden), os.environ.get("PYTHONPATH", "")]))
    for name in [m for m in sys.modules if m == "matplotlib" or m.startswith("matplotlib.")]:
        monkeypatch.delitem(sys.modules, name)
    monkeypatch.setitem(sys.modules, "matplotlib", None)  # import matplotlib: ImportError, as when not installed
    monkeypatch.setattr(common, "RESULTS_DIR", tmp_path)
    monkeypatch.setenv("SPIN_BENCH_RESULTS", str(tmp_path))
    assert bench_main.main(["--preset", "tiny", "--only", "train_step"]) == 0
    out, err = capsys.readouterr()
    assert "summary (tiny preset" in out and "matplotlib" in err
    headline = out[out.index("summary (tiny preset"):]
    assert "train step: TRL DPO, live reference" in headline and "missing: trl is not installed" in headline
    assert "train step: spin-fast" in headline and "tokens/s" in headline


def test_a_method_whose_loss_is_nan_is_flagged(monkeypatch):
    """A NaN loss (an fp16 head overflowing, say) made value_rel_diff and grad_rel_diff NaN, and NaN > 1e-2 is False:
    the method was shown agreeing with the baseline, with its time as a headline ratio, and no DIFFERS."""
    monkeypatch.setitem(kernels.METHODS, "naive, NaN", lambda: kernels.from_logprobs(
        lambda b: kernels.naive_token_logps(b.hidden, b.weight, b.targets) * float("nan")))
    preset = kernels.PRESETS["tiny"]
    results = []
    for method in ("naive PyTorch", "naive, NaN"):
        result = kernels.measure(preset, 300, "spin_head", method)
        results.append({**result, "vocab": 300, "job": "spin_head", "method": method, "matmul_tflops": 1.0})
    kernels._add_ratios(results)
    assert results[1]["value"] != results[1]["value"]  # NaN
    assert kernels.disagrees(results[1]) and not kernels.disagrees(results[0])
    assert "DIFFERS" in kernels.summary_table(results).splitlines()[3]
    headline = dict(summary.kernel_rows({"results": results, "baseline": "naive PyTorch"}))
    assert "DIFFERS" in headline["SPIN head, V=300: naive, NaN"]


def test_times_are_summarized_as_their_median_in_milliseconds():
    """summarize: the median (not the mean: one slow run of three would move it), min and max, in ms."""
    assert common.summarize([0.010, 0.001, 0.100]) == {"median_ms": pytest.approx(10.0), "min_ms": pytest.approx(1.0),
                                                      "max_ms": pytest.approx(100.0), "runs": 3}


WARM_UP_PROBE = """
import json
import sys
import torch
from bench import common

cache, grads, calls = [], [], []

def step():  # the first call builds a 32 MiB cache that every call after it keeps (as an optimizer's state)
    calls.append(1)
    if not cache:
        cache.append(torch.ones(8 * 2**20))
    x = torch.ones(4 * 2**20)  # what each call adds: 16 MiB
    if not grads:  # 8 MiB more, made while x lives and held after the call (gradients) until release() frees them
        grads.append(torch.ones(2 * 2**20))
    del x

peak, times = common.memory_then_time(step, torch.device("cpu"), warmup=int(sys.argv[1]), repeats=3,
                                      release=grads.clear)
print(json.dumps({"peak": peak, "calls": len(calls), "runs": len(times)}))
"""


@pytest.mark.parametrize("warmup", [2, 0])
def test_memory_is_measured_after_a_warm_up_and_the_timed_calls_after_another(warmup):
    """memory_then_time: an untimed call first, even with no warm-up asked (the CPU presets': the cache it builds is
    held, not what the measured call adds), release() (the gradients it leaves are the measured call's to make
    again), the measured call, then `warmup` untimed calls and `repeats` timed ones, the warm-ups never among the
    times."""
    import subprocess
    import sys
    from pathlib import Path

    root = Path(__file__).resolve().parent.parent
    env = {**common.worker_env(), "PYTHONPATH": str(root)}
    done = subprocess.run([sys.executable, "-c", WARM_UP_PROBE, str(warmup)], capture_output=True, text=True,
                          env=env, cwd=root, timeout=120)
    assert done.returncode == 0, done.stderr[-2000:]
    result = json.loads(done.stdout.strip().splitlines()[-1])
    assert 23.5 < result["peak"] < 25, result  # the call's 16 MiB and its gradients' 8, not the first call's cache
    assert result["calls"] == max(1, warmup) + 1 + warmup + 3 and result["runs"] == 3, result


def test_each_ratio_divides_by_the_baseline_of_its_own_vocab_and_job():
    """With several vocabularies and jobs, each method is divided by the baseline's figures at its own vocabulary and
    job, and its value compared relative to the baseline's."""
    results = [{"vocab": vocab, "job": job, "method": "naive PyTorch", **_fake(ms, mib, value)}
               for vocab, job, ms, mib, value in [(1000, "spin_head", 100.0, 40.0, 2.0),
                                                  (1000, "logprobs", 10.0, 4.0, 5.0),
                                                  (2000, "spin_head", 400.0, 80.0, 4.0)]]
    ours = [{"vocab": vocab, "job": job, "method": "spin-fast torch", **_fake(ms, mib, value)}
            for vocab, job, ms, mib, value in [(2000, "spin_head", 200.0, 20.0, 3.0),
                                               (1000, "logprobs", 20.0, 1.0, 5.5)]]
    kernels._add_ratios(results + ours)
    head, logprobs = ours
    assert (head["time_vs_baseline"], head["memory_vs_baseline"]) == (pytest.approx(0.5), pytest.approx(0.25))
    assert head["value_rel_diff"] == pytest.approx(0.25)  # |3 - 4| / 4
    assert (logprobs["time_vs_baseline"], logprobs["memory_vs_baseline"]) == (pytest.approx(2.0), pytest.approx(0.25))
    assert logprobs["value_rel_diff"] == pytest.approx(0.1)
    # The table: each ratio under its own header.
    header, _, *rows = kernels.summary_table(ours).splitlines()[:4]
    row = dict(zip(re.split(r"\s{2,}", header), re.split(r"\s{2,}", rows[0])))
    assert (row["x naive time"], row["peak MiB"], row["x naive mem"], row["value vs naive"]) == (
        "0.50", "20", "0.250", "2.5e-01"), row


def test_the_matmul_rate_is_the_products_flops_over_its_median_time(monkeypatch):
    """matmul_tflops: the FLOPs of the [tokens, H] x [H, V] product it times (2 T H V, as torch counts them) over the
    median of its runs."""
    from torch.utils.flop_counter import FlopCounterMode

    preset, counted = kernels.PRESETS["tiny"], []

    def five_runs(step, device, warmup, repeats):
        with FlopCounterMode(display=False) as counter:
            step()  # the real product
        counted.append(counter.get_total_flops())
        return [0.5, 0.1, 0.2, 0.4, 0.3][:repeats]

    monkeypatch.setattr(kernels, "time_runs", five_runs)
    rate = kernels.matmul_tflops(preset, 1000)
    assert counted == [2 * preset.tokens * preset.hidden * 1000]
    assert rate == pytest.approx(counted[0] / 0.3 / 1e12)


def test_a_cell_not_measured_is_a_dash_in_every_table():
    cell = common.cell
    assert cell({"x": 1.236}, "x") == "1.24"
    assert cell({"x": 1536.4}, "x", ".0f") == "1536"
    assert cell({"x": 0.0}, "x", ".1e") == "0.0e+00"  # a zero is measured, not a gap
    assert cell({}, "x") == "-"
    assert cell({"x": None}, "x") == "-"

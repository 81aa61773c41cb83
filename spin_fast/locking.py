"""One process at a time does a kind of work in a folder: two runs in one output_dir would each take the other's
saved parts for their own and overwrite each other's checkpoints and files. The first takes a lock on a file in
the folder (flock: the kernel releases it however the process ends, so no stale lock is left after a kill); a
second is refused at once, told which process holds it. Under a launcher rank 0 takes it for every rank.

A file system without locks (Lustre mounted without `-o flock`) gets a warning and no guard. One whose locks hold
within a node only (Lustre's `localflock`, NFS mounted with `nolock` or `local_lock=flock`) does not see a second
run on another node: nothing here can tell.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import logging
import os
import socket
import sys
from collections.abc import Iterator
from datetime import datetime, timezone
from pathlib import Path

log = logging.getLogger(__name__)


# The lock descriptors this process holds. os.open makes them close-on-exec already (PEP 446), but a child forked
# without exec (vLLM's engine core under the fork start method) would share the lock's open file, and hold the lock
# for as long as it lived after this process's death: the child closes its copies (which leaves ours locked).
_held: set[int] = set()


def _close_held_in_child() -> None:
    for fd in _held:
        os.close(fd)
    _held.clear()


os.register_at_fork(after_in_child=_close_held_in_child)


class InUse(ValueError):
    """Another process does this work in the folder."""


@contextlib.contextmanager
def exclusive(folder: str | Path, work: str) -> Iterator[None]:
    """This process alone does `work` ("run", "sft", "eval", "demo") in `folder` (made if need be) for the block;
    InUse, naming the process that holds it, otherwise."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / f".{work}.lock"
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    _held.add(fd)
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            said = holder(os.pread(fd, 4096, 0))
            raise InUse(f"{folder} is in use by another spin-fast {work}: {said}. Two at once would overwrite each "
                        "other's work: wait for it to end, or use another output_dir") from None
        except OSError as error:  # no locks on this file system
            log.warning("%s: cannot lock %s (%s): a second spin-fast %s started in this folder meanwhile would not "
                        "be refused", folder, path.name, error, work)
        else:
            os.ftruncate(fd, 0)
            os.pwrite(fd, json.dumps(this_process()).encode() + b"\n", 0)
        yield
    finally:
        if fd in _held:  # (a forked child unwinding this block closed its copy at the fork)
            _held.discard(fd)
            os.close(fd)  # releases the lock; the file stays, for the next one to lock


def this_process() -> dict:
    return {"pid": os.getpid(), "host": socket.gethostname(),
            "since": datetime.now(timezone.utc).isoformat(timespec="seconds"), "command": " ".join(sys.argv)}


def holder(recorded: bytes) -> str:
    """The lock's holder, as it recorded itself. On another node, its lock may outlive it: a shared file system
    keeps the lock of a node that went down until its lease ends."""
    try:
        process = json.loads(recorded)
    except ValueError:  # not written yet (it is taking the lock this instant)
        return "a process that has not said which"
    said = f"pid {process['pid']} on {process['host']}, since {process['since']} ({process['command']})"
    if process["host"] != socket.gethostname():
        said += (" [another node: if it went down, the file system releases its lock when the node's lease ends, "
                 "about 90 s on NFSv4, when it is evicted on Lustre]")
    return said

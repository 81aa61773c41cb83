"""One process at a time does a kind of work in a folder: two runs in one output_dir would each take the other's
saved parts for their own and overwrite each other's checkpoints and files. The first takes a lock on a file in
the folder (flock: the kernel releases it however the process ends, so no stale lock is left after a kill); a
second is refused at once, told which process holds it. Under a launcher rank 0 takes it for every rank.

A file system without locks (Lustre mounted without `-o flock`, some NFS setups) gets a warning and no guard.
"""

from __future__ import annotations

import contextlib
import fcntl
import logging
import os
import socket
import sys
from collections.abc import Iterator
from datetime import datetime, timezone
from pathlib import Path

log = logging.getLogger(__name__)


@contextlib.contextmanager
def exclusive(folder: str | Path, work: str) -> Iterator[None]:
    """This process alone does `work` ("run", "sft", "eval", "demo") in `folder` (made if need be) for the block;
    a ValueError naming the process that holds it otherwise."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / f".{work}.lock"
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.pread(fd, 4096, 0).decode(errors="replace").strip() or "a process that has not said which"
            raise ValueError(f"{folder} is in use by another spin-fast {work}: {holder}. Two at once would overwrite "
                             f"each other's work: wait for it to end, or use another output_dir") from None
        except OSError as error:  # no locks on this file system
            log.warning("%s: cannot lock %s (%s): a second spin-fast %s started in this folder meanwhile would not "
                        "be refused", folder, path.name, error, work)
        else:
            os.ftruncate(fd, 0)
            os.pwrite(fd, f"{describe_this_process()}\n".encode(), 0)
        yield
    finally:
        os.close(fd)  # releases the lock; the file stays, for the next one to lock


def describe_this_process() -> str:
    started = datetime.now(timezone.utc).isoformat(timespec="seconds")
    return f"pid {os.getpid()} on {socket.gethostname()}, since {started} ({' '.join(sys.argv)})"

"""One process at a time does a kind of work in a folder (spin_fast.locking), with real processes."""

from __future__ import annotations

import contextlib
import json
import os
import re
import socket

import pytest

from helpers import held_by_another_process
from spin_fast import locking


def test_a_second_process_is_refused_and_told_which_holds_the_folder(tmp_path):
    folder = tmp_path / "out"
    with held_by_another_process(folder, "run") as pid:
        message = (rf"^{re.escape(str(folder))} is in use by another spin-fast run: pid {pid} on "
                   rf"{re.escape(socket.gethostname())}, since \d{{4}}-.*wait for it to end")
        with pytest.raises(ValueError, match=message):
            with locking.exclusive(folder, "run"):
                pass
        with locking.exclusive(folder, "eval"):  # another kind of work goes on beside it
            pass
    # Killed (SIGKILL), the holder leaves no stale lock.
    with locking.exclusive(folder, "run"):
        assert json.loads((folder / ".run.lock").read_text())["pid"] == os.getpid()
    with locking.exclusive(folder, "run"):  # released at the block's end
        pass


def test_a_holder_on_another_node_is_said_to_be_there():
    """A shared file system keeps a dead node's lock until its lease ends: the refusal says so."""
    record = {"pid": 7, "host": "node-that-is-not-this-one", "since": "2026-01-01T00:00:00+00:00", "command": "x"}
    said = locking.holder(json.dumps(record).encode())
    assert said.startswith("pid 7 on node-that-is-not-this-one, since 2026-01-01") and "another node" in said
    assert "another node" not in locking.holder(json.dumps({**record, "host": socket.gethostname()}).encode())
    assert locking.holder(b"") == "a process that has not said which"


def test_a_child_that_outlives_the_holder_does_not_keep_the_lock(tmp_path):
    """A process forked while the lock is held (vLLM's engine core under the fork start method, its default where
    CUDA is not initialised, as on the CPU build) shares the lock's open file: were the descriptor kept in it, the
    lock would stay held after the holder's death for as long as the child lived, and the resume would be refused.
    A child started by exec (subprocess) does not get the descriptor at all."""
    import signal
    import subprocess
    import sys
    import time

    folder = tmp_path / "out"
    code = (f"import multiprocessing, subprocess, sys, time\nfrom spin_fast.locking import exclusive\n"
            f"with exclusive({str(folder)!r}, 'run'):\n"
            "    child = multiprocessing.get_context('fork').Process(target=time.sleep, args=(600,))\n"
            "    child.start()\n"
            "    fds = subprocess.run(['ls', '-l', '/proc/self/fd'], capture_output=True, text=True).stdout\n"
            "    print(child.pid, '.run.lock' in fds, flush=True)\n"
            "    time.sleep(600)\n")
    holder = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, text=True)
    child = None
    try:
        pid, exec_child_has_it = holder.stdout.readline().split()
        child = int(pid)
        assert exec_child_has_it == "False"  # close-on-exec
        holder.send_signal(signal.SIGKILL)  # the holder dies without closing anything; its child lives on
        holder.wait()
        os.kill(child, 0)  # still alive
        time.sleep(0.2)
        with locking.exclusive(folder, "run"):
            pass
    finally:
        holder.kill()
        holder.wait()
        if child is not None:
            with contextlib.suppress(ProcessLookupError):
                os.kill(child, signal.SIGKILL)


def test_the_holder_replaces_a_longer_record_of_the_one_before(tmp_path):
    """The last holder's record may be longer than this one's (a longer command line): it is replaced whole, or a
    second process would read a broken record and could not say which process holds the folder."""
    folder = tmp_path / "out"
    folder.mkdir()
    (folder / ".run.lock").write_text(json.dumps({"pid": 1, "host": "h", "since": "s", "command": "x" * 5000}) + "\n")
    with locking.exclusive(folder, "run"):
        assert json.loads((folder / ".run.lock").read_text())["pid"] == os.getpid()


def test_a_file_system_without_locks_gets_a_warning_and_no_guard(tmp_path, monkeypatch, caplog):
    """Lustre mounted without `-o flock` answers flock with ENOLCK: the work goes on, warned that nothing guards it."""
    import errno
    import logging

    def no_locks(fd, operation):
        raise OSError(errno.ENOLCK, "No locks available")

    monkeypatch.setattr(locking.fcntl, "flock", no_locks)
    caplog.set_level(logging.WARNING, logger="spin_fast.locking")
    ran = False
    with locking.exclusive(tmp_path / "out", "run"):
        ran = True
    assert ran and "cannot lock .run.lock" in caplog.text and "would not be refused" in caplog.text

"""One process at a time does a kind of work in a folder (spin_fast.locking), with real processes."""

from __future__ import annotations

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
        assert f"pid {os.getpid()} on " in (folder / ".run.lock").read_text()
    with locking.exclusive(folder, "run"):  # released at the block's end
        pass

"""Files that are there whole or not at all, even after the machine itself goes down. Each is written under a
temporary name, flushed to the disk and renamed over its final name, and the rename is flushed too: a kill leaves
the old file or the new one, and so does a power cut, which could otherwise leave the new name on disk before
the data it names (an empty manifest that marks a stage done). A file appended to line by line (a log) is read
without the line a kill may have cut short."""

from __future__ import annotations

import contextlib
import json
import os
from collections.abc import Iterator
from pathlib import Path
from typing import IO


@contextlib.contextmanager
def replacing(path: str | Path, mode: str = "w") -> Iterator[IO]:
    """A file opened for writing ("w" text, "wb" bytes) that becomes `path` when the block ends without an error;
    after an error, `path` is as it was."""
    path = Path(path)
    tmp = path.with_name(path.name + ".tmp")
    path.parent.mkdir(parents=True, exist_ok=True)
    try:
        with tmp.open(mode) as out:
            yield out
            out.flush()
            os.fsync(out.fileno())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    with contextlib.suppress(OSError):  # a filesystem that cannot flush a folder still has the renamed file
        folder = os.open(path.parent, os.O_RDONLY)
        try:
            os.fsync(folder)
        finally:
            os.close(folder)


def write_atomically(path: str | Path, text: str) -> None:
    """`path` holding `text`, whole or not at all."""
    with replacing(path) as out:
        out.write(text)


def whole_json_lines(text: str) -> list[dict]:
    """The records of a JSON-lines file that is appended to, without the line a kill may have cut short as it was
    written (which would otherwise stop every later start that reads the file)."""
    records = []
    for line in text.splitlines():
        try:
            records.append(json.loads(line))
        except json.JSONDecodeError:
            continue
    return records

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
    flush_folder(path.parent)


def flush_folder(path: str | Path) -> None:
    """A folder's entries (a rename into it) on the disk."""
    with contextlib.suppress(OSError):  # a filesystem that cannot flush a folder still has the renamed file
        folder = os.open(path, os.O_RDONLY)
        try:
            os.fsync(folder)
        finally:
            os.close(folder)


def flush_tree(folder: str | Path) -> None:
    """Every file under `folder`, and its folders, on the disk: before a rename names the folder complete."""
    for root, _, files in os.walk(folder):
        for name in files:
            fd = os.open(os.path.join(root, name), os.O_RDONLY)
            try:
                os.fsync(fd)
            finally:
                os.close(fd)
        flush_folder(root)


def write_atomically(path: str | Path, text: str) -> None:
    """`path` holding `text`, whole or not at all."""
    with replacing(path) as out:
        out.write(text)


def read_json(path: str | Path):
    """A JSON file's content; a broken one (edited by hand, cut short on a filesystem without atomic renames) is an
    error naming it."""
    try:
        return json.loads(Path(path).read_text())
    except json.JSONDecodeError as error:
        raise ValueError(f"{path}: not valid JSON ({error}); restore it, or remove it to redo the work it "
                         "records") from None


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

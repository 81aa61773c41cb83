"""spin_fast.files: a file is replaced whole or not at all, flushed to the disk before its rename, and the rename
flushed after it."""

import os
from pathlib import Path

import pytest

from spin_fast.files import flush_tree, replacing, write_atomically


def test_a_file_in_a_new_folder_creates_the_folder(tmp_path):
    write_atomically(tmp_path / "runs" / "iter0" / "pairs.jsonl", "{}\n")  # README's API example writes there
    assert (tmp_path / "runs" / "iter0" / "pairs.jsonl").read_text() == "{}\n"


def test_a_file_is_replaced_whole_and_flushed_before_and_after_its_rename(tmp_path, monkeypatch):
    path = tmp_path / "manifest.json"
    path.write_text("old")
    events = []
    fsync, replace = os.fsync, os.replace

    def recorded_fsync(fd):
        events.append(("fsync", Path(os.readlink(f"/proc/self/fd/{fd}")).name))
        fsync(fd)

    def recorded_replace(source, target):
        events.append(("replace", Path(target).name))
        replace(source, target)

    monkeypatch.setattr(os, "fsync", recorded_fsync)
    monkeypatch.setattr(os, "replace", recorded_replace)
    write_atomically(path, "new")
    assert path.read_text() == "new"
    assert events == [("fsync", "manifest.json.tmp"), ("replace", "manifest.json"), ("fsync", tmp_path.name)]

    with pytest.raises(RuntimeError, match="killed"), replacing(path, "wb") as out:
        out.write(b"half of it")
        raise RuntimeError("killed")
    assert path.read_text() == "new" and not (tmp_path / "manifest.json.tmp").exists()


def test_a_broken_record_of_finished_work_is_an_error_naming_its_file(tmp_path):
    """A stage's manifest (or the run's data.json, an evaluation's saved piece) edited by hand into broken JSON: the
    error names the file, not only JSON's line and column."""
    from spin_fast.stages import MANIFEST, read_manifest

    (tmp_path / MANIFEST).write_text('{"steps": 4,')
    with pytest.raises(ValueError, match=rf"^{tmp_path / MANIFEST}: not valid JSON \(Expecting"):
        read_manifest(tmp_path)
    (tmp_path / MANIFEST).write_text('{"steps": 4}')
    assert read_manifest(tmp_path) == {"steps": 4}


def test_every_file_under_a_tree_and_every_folder_of_it_is_flushed(tmp_path, monkeypatch):
    """A checkpoint's folder before its rename: its files' names in a subfolder (deepspeed/) are on the disk too, or a
    power cut could leave checkpoint-N with its weights' data written but no name for them."""
    (tmp_path / "ckpt" / "deepspeed").mkdir(parents=True)
    (tmp_path / "ckpt" / "model.safetensors").write_text("w")
    (tmp_path / "ckpt" / "deepspeed" / "state.pt").write_text("s")
    synced = []
    fsync = os.fsync

    def recorded_fsync(fd):
        synced.append(os.readlink(f"/proc/self/fd/{fd}"))
        fsync(fd)

    monkeypatch.setattr(os, "fsync", recorded_fsync)
    flush_tree(tmp_path / "ckpt")
    ckpt = tmp_path / "ckpt"
    assert sorted(synced) == sorted(map(str, (ckpt, ckpt / "model.safetensors", ckpt / "deepspeed",
                                              ckpt / "deepspeed" / "state.pt")))

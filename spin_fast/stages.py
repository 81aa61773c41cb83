"""A stage's saved work: its rows saved in parts as they finish, then its manifest, which marks it done.

A stage with a manifest is never redone; one killed midway resumes at its first unsaved part. Rank 0 writes;
every rank takes part in the collectives that say what is saved.
"""

from __future__ import annotations

import functools
import hashlib
import json
import logging
import shutil
import time
from pathlib import Path

from spin_fast import distributed, stopping
from spin_fast.config import RunConfig
from spin_fast.files import read_json, replacing, write_atomically
from spin_fast.scoring import ScoredPair, save_scored_pairs
from spin_fast.version import code_version

log = logging.getLogger(__name__)
MANIFEST = "manifest.json"


def config_hash(config: RunConfig) -> str:
    return hashlib.sha256(json.dumps(config.to_dict(), sort_keys=True, default=str).encode()).hexdigest()[:16]


def write_manifest(stage_dir: Path, **fields) -> None:
    """The stage's record, with the code that made it; written last and atomically: it marks the stage done."""
    write_atomically(stage_dir / MANIFEST, json.dumps({**fields, "code": code_version()}, indent=2, default=str) + "\n")


def finish_stage(stage_dir: Path, **fields) -> None:
    """A stage's manifest written (it is done), then its saved parts removed (rank 0)."""
    write_manifest(stage_dir, **fields)
    shutil.rmtree(stage_dir / "parts")


def read_manifest(stage_dir: Path) -> dict | None:
    path = stage_dir / MANIFEST
    return read_json(path) if path.exists() else None


def checkpoint_at(folder: Path, recorded: str) -> str:
    """A checkpoint that a manifest recorded in `folder`, where it is now: a run directory moved or copied since (a
    `~/x` output_dir under another $HOME) holds it in `folder` under its name; the recorded path, if still there, is
    the original's (another account's run, which may go on or be deleted)."""
    here = folder / Path(recorded).name
    return str(here) if here.is_dir() else recorded


def finished_summaries(run_dir: Path) -> list[dict]:
    """The summaries of a run's finished iterations, from 0 up to the first whose training has no manifest."""
    summaries = []
    while (manifest := read_manifest(train_dir := run_dir / f"iter-{len(summaries)}" / "train")) is not None:
        summary = manifest["summary"]
        summaries.append({**summary, "checkpoint": checkpoint_at(train_dir, summary["checkpoint"])})
    return summaries


def shared_manifest(stage_dir: Path) -> dict | None:
    """read_manifest as rank 0 sees it, on every rank (a collective): whether a stage is done is decided once."""
    return distributed.on_main(lambda: read_manifest(stage_dir), f"{stage_dir} manifest")


def in_parts(output: Path, n_items: int, part_size: int, make_part, what: str) -> dict:
    """A stage's rows for items [0, n_items), computed `part_size` items at a time (0: all at once), each part
    saved in output's folder, in parts/, as soon as it is done: a stage killed midway resumes at its first
    unsaved part. At the end rank 0 writes `output`, the parts end to end (the caller removes parts/ once its
    manifest is written).

    Every rank calls this; make_part(start, end) -> (rows, info) runs on every rank (it may be collective) and
    its result counts on rank 0, which saves it. Returns the parts' infos (numbers) summed, with the seconds spent
    on them, this call's and earlier calls'."""
    parts_dir = output.parent / "parts"
    size = part_size or max(n_items, 1)
    parts = [(start, min(start + size, n_items), parts_dir / f"{start:09d}-{min(start + size, n_items):09d}.jsonl")
             for start in range(0, n_items, size)]

    def saved_parts() -> set[Path]:
        parts_dir.mkdir(parents=True, exist_ok=True)
        return set(parts_dir.glob("*.jsonl"))

    saved = distributed.on_main(saved_parts, f"{what}: saved parts")
    with stopping.safe_points(what):
        for number, (start, end, part) in enumerate(parts):
            if part in saved:
                continue
            began = time.perf_counter()
            rows, info = make_part(start, end)
            info = {**info, "seconds": time.perf_counter() - began}
            distributed.on_main(functools.partial(save_part, part, rows, info), f"{what}: part {number + 1} saved")
            if len(parts) > 1:
                log.info("%s: part %d of %d saved (items %d to %d of %d)", what, number + 1, len(parts), start, end,
                         n_items)
            signum = stopping.reached()
            if signum:
                raise stopping.Stopped(signum, f"after part {number + 1} of {len(parts)} of {what}, saved in "
                                               f"{parts_dir}", agreed=True)
    return distributed.on_main(lambda: join_parts(output, [part for _, _, part in parts]), f"{what}: written")


def save_part(part: Path, rows: list[ScoredPair], info: dict) -> None:
    write_atomically(part.with_suffix(".json"), json.dumps(info))  # before the rows: they mark the part done
    save_scored_pairs(part, rows)


def join_parts(output: Path, parts: list[Path]) -> dict:
    """`output` written as the parts end to end (JSON lines); their infos summed."""
    totals: dict = {}
    with replacing(output, "wb") as out:
        for part in parts:
            with part.open("rb") as rows:  # streamed: a stage saved as one part is the whole stage's rows
                shutil.copyfileobj(rows, out)
            for key, value in json.loads(part.with_suffix(".json").read_text()).items():
                totals[key] = totals.get(key, 0) + value
    return totals

"""A SPIN run's directory: what keeps it one experiment across starts, kills and changed settings.

The lock, the config and data the work was made from, θ0's revision, the record of sessions, the tidying after a
kill, and the summary table. Rank 0 alone calls these (SelfPlay runs them through distributed.on_main), but for
sft_revision, which every rank calls (rank 0 reads, the others get its answer), and check_model, which reads alone."""

from __future__ import annotations

import contextlib
import json
import logging
import shutil
import socket
import time
from datetime import datetime, timezone
from pathlib import Path

import yaml

from spin_fast import distributed, locking
from spin_fast.config import (
    ConfigError,
    RunConfig,
    as_written,
    differing_settings,
    expanded_under_another_home,
    flat_settings,
    from_dict,
    home_expanded,
    paths_as_now,
    saved_under_another_home,
)
from spin_fast.data import reads_one_split
from spin_fast.files import read_json, whole_json_lines, write_atomically
from spin_fast.stages import MANIFEST, finished_summaries
from spin_fast.training import RESUMABLE_CHANGES
from spin_fast.version import code_version

log = logging.getLogger(__name__)
SFT_MODEL_FILE = "sft-model.json"
DATA_FILE = "data.json"  # what each iteration's examples were (keep_same_data)
SHARED_WAIT_S = 90.0  # how long another node may take to see rank 0's new file (NFS caches a name's absence a minute)


class RunDirectory:
    """output_dir of a run with settings `config`."""

    def __init__(self, path: Path, config: RunConfig):
        self.path, self.config = path, config
        self._lock: contextlib.ExitStack | None = None  # held by rank 0 while the run runs

    def unlock(self) -> None:
        if self._lock is not None:
            self._lock.close()
            self._lock = None

    def sft_revision(self) -> str | None:
        """The revision the SFT model is fetched at, when it is named by a Hub id, as rank 0 finds it: the commit the
        run started from, kept in run_dir/sft-model.json (so that a run resumed after the model's repository moved
        on goes on with the same θ0, and its evaluation scores that θ0), else model.revision (None: main)."""
        path = self.path / SFT_MODEL_FILE
        return distributed.on_main(lambda: read_json(path)["revision"] if path.exists()
                                   else self.config.model.revision or None, "the SFT model's revision")

    def lock(self) -> None:
        """Rank 0: this process alone works in the run directory until run() ends (spin_fast.locking)."""
        if self._lock is None:
            lock = contextlib.ExitStack()
            lock.enter_context(locking.exclusive(self.path, "run"))
            self._lock = lock

    def claim(self, saved_config: dict | None, until: tuple[int, str] | None, data: dict[str, dict],
              sft_folder: str) -> str:
        """Rank 0, as the run starts: the run directory locked, its data checked, the config saved when it changed,
        θ0's revision, what a kill left tidied, this session recorded (its line in sessions.jsonl, returned)."""
        self.lock()
        self.keep_same_data(data)
        if as_written(saved_config) != as_written(self.config.to_dict()):
            self.path.mkdir(parents=True, exist_ok=True)
            write_atomically(self.path / "config.yaml",
                             yaml.safe_dump(as_written(self.config.to_dict()), sort_keys=False))
        self.keep_sft_revision(sft_folder)
        self.tidy_what_a_kill_left()
        return self.record_session(until)

    def check_shared(self, session: str) -> None:
        """Every rank, once rank 0 has claimed the directory: this rank sees the session line rank 0 just wrote in
        sessions.jsonl (check_shared, below)."""
        check_shared(self.path, self.path / "sessions.jsonl", session)

    def keep_same_data(self, now: dict[str, dict]) -> None:
        """The rows each iteration reads (`now`: their source, number and digest, by iteration, "eval t" for the
        held-out rows scored after iteration t), as the run made its work from them (run_dir/data.json): a data file
        or Hub dataset changed since then is refused, or the resumed run would mix answers to the old rows with
        answers to the new ones (a row added midway shifts every saved part) and train later iterations on other
        data than the earlier ones. An iteration with no work yet takes the data as it is now."""
        path = self.path / DATA_FILE
        saved = read_json(path) if path.exists() else {}
        for key, record in now.items():
            then = saved.get(key)
            # A directory made before token digests were kept has none to compare.
            same_tokens = then is None or then.get("tokens") in (None, record.get("tokens"))
            if then is None or (then["digest"] == record["digest"] and same_tokens) or not self.has_work(key):
                continue
            what = f"iteration {key}'s prompts" if key.isdigit() else f"iteration {key.split()[1]}'s held-out data"
            setting = "data.source" if key.isdigit() else "data.eval_source"
            if then["digest"] == record["digest"]:  # the same rows, other token ids
                raise ValueError(f"{what} ({setting} {record['source']}) are tokenized otherwise than when {self.path} "
                                 "made its work from them: the chat template (model.chat_template's file) or the "
                                 "model's tokenizer changed, or a transformers, tokenizers or spin-fast upgrade "
                                 "tokenizes otherwise (a spin-fast upgrade may end responses with another token; "
                                 "sessions.jsonl names the version that started the run); the run would mix pairs of "
                                 "the two. Put them back as they were (or resume with that version), or use a new "
                                 "output_dir")
            # Sources as written (`~/x`); spin-fast before kept them expanded.
            if home_expanded(then["source"]) == home_expanded(record["source"]) and \
                    reads_one_split(home_expanded(record["source"])):
                # The data may be as it was: spin-fast before the split-aware folder reading read every split's files.
                fix = (f"{record['source']} holds several splits' files, and older spin-fast read every split's files "
                       f"of such a folder, where this code reads data.split's files alone: if the data is as it was, "
                       "resume the run with the spin-fast version that started it (sessions.jsonl names it); if it "
                       "changed, put it back as it was; or use a new output_dir to train on data.split's rows")
            else:
                fix = "Put the data back as it was, or use a new output_dir"
            raise ValueError(f"{what} ({setting} {record['source']}: {record['examples']} examples) are not those "
                             f"{self.path} made its work from ({then['source']}: {then['examples']} examples, "
                             f"other rows): the run would mix answers to the old rows with the new ones. {fix}")
        if now != {key: saved.get(key) for key in now}:
            write_atomically(path, json.dumps({**saved, **now}, indent=1) + "\n")

    def has_work(self, key: str) -> bool:
        """Whether the work of data.json's `key` has begun: iteration t's (any file saved), or for "eval t" the
        held-out score of iteration t (in its training's manifest)."""
        if key.isdigit():
            return any(p.is_file() for p in (self.path / f"iter-{key}").glob("**/*"))
        return (self.path / f"iter-{key.split()[1]}" / "train" / MANIFEST).exists()

    def keep_sft_revision(self, sft_folder: str) -> None:
        """At the run's first start (rank 0): the commit of the Hub model's snapshot it fetched, for sft_revision."""
        path, name = self.path / SFT_MODEL_FILE, self.config.model.name_or_path
        if sft_folder != name and not path.exists():
            write_atomically(path, json.dumps({"name": name, "revision": Path(sft_folder).name}) + "\n")

    def tidy_what_a_kill_left(self) -> None:
        """A kill between a stage's manifest and what follows it leaves the stage done, so nothing would come back
        to finish: remove its parts/ (a copy of its output), and rebuild the summary table (it may lack the
        iteration)."""
        for parts in self.path.glob("iter-*/*/parts"):
            if (parts.parent / MANIFEST).exists():
                shutil.rmtree(parts, ignore_errors=True)
        if (self.path / "iter-0" / "train" / MANIFEST).exists():
            self.write_summary_table()

    def record_session(self, until: tuple[int, str] | None) -> str:
        """Append this start of the run to run_dir/sessions.jsonl (its line, returned); warn when the run's finished
        work was made by other spin-fast code, which it keeps as it is."""
        path = self.path / "sessions.jsonl"
        text = path.read_text() if path.exists() else ""
        sessions = whole_json_lines(text)
        before = sessions[-1]["code"] if sessions else None
        done = sorted(str(p.parent.relative_to(self.path)) for p in self.path.glob(f"iter-*/*/{MANIFEST}"))
        started = [str(p.relative_to(self.path)) for p in self.path.glob("iter-*/*/parts")]
        started += [str(p.relative_to(self.path)) for p in self.path.glob("iter-*/train/checkpoint-*")
                    if not (p.parent / MANIFEST).exists()]
        if before != code_version() and (done or started):
            log.warning("%s was run before by %s; this is spin-fast %s. Its finished stages (%s) and unfinished "
                        "work (%s) stay as that code made them, and the rest is made by this code: for results "
                        "from one code throughout, use a new output_dir", self.path,
                        f"spin-fast {before}" if before else "an older spin-fast (no version recorded)", code_version(),
                        ", ".join(done) or "none", ", ".join(sorted(started)) or "none")
        return record_start(path, text, until=list(until) if until else None)

    def saved_config(self) -> dict | None:
        """The settings the run directory was started with (None for a new run). A run directory belongs to one
        experiment: resuming with other settings is an error naming them, except for those that change no result
        (CHANGEABLE: more or fewer iterations, progress bars, checkpoints, trackers, the collectives' timeout, batch
        sizes) and the overrides of iterations that have saved no work yet."""
        path = self.path / "config.yaml"
        if not path.exists():
            return None
        # The same paths written otherwise compare equal (claim saves them as now written): runs/x/ and ./runs/x,
        # ~/x and the /home/me/x that spin-fast before expand_home saved for it.
        saved, now = read_saved_config(path), self.config.to_dict()
        compared = paths_as_now(saved, now)
        if Path(saved.get("output_dir", "")).expanduser().resolve() == Path(self.config.output_dir).resolve():
            compared["output_dir"] = now["output_dir"]
        differences = differing_settings(self.overrides_with_work(compared), self.overrides_with_work(now),
                                         ignored=CHANGEABLE)
        if differences and not self.holds_work():
            # The run stopped (on an error, say) before any stage saved a part: nothing was made with the saved
            # settings, and the new ones (often the fix its error named) start it afresh.
            log.info("%s: no stage has saved work here yet; the run starts again with the new settings (%s)",
                     self.path, "; ".join(differences))
            for name in ("config.yaml", SFT_MODEL_FILE):
                (self.path / name).unlink(missing_ok=True)
            return None
        home = expanded_under_another_home(saved, now) if differences else None
        if home is not None and not differing_settings(self.overrides_with_work(paths_as_now(compared, now, home)),
                                                       self.overrides_with_work(now), ignored=CHANGEABLE):
            # The same `~/x` settings under another $HOME, nothing else: say so, not "another config"
            raise ValueError(saved_under_another_home(path, home, saved["output_dir"], "use a new output_dir"))
        if differences:
            raise ValueError(f"{path} holds another config, which differs in {'; '.join(differences)}: use a new "
                             f"output_dir, or the same settings")
        return saved

    def overrides_with_work(self, config: dict) -> dict:
        """`config` with the iteration_overrides of iterations that have saved work alone: the others shaped nothing
        yet, and may change (a run extended with lower learning rates for its new iterations). Their CHANGEABLE
        settings are left out too, as at the top level (a smaller train.micro_batch_tokens after an out-of-memory
        error in an iteration that overrides it), and so is a setting an override leaves as it is (its value is the
        run's own: the default, or the file's): the iteration's settings are the same with or without it."""
        run = flat_settings(config)
        overrides = {t: kept for t, changes in config["iteration_overrides"].items()
                     if self.has_work(str(t)) and (kept := {k: v for k, v in changes.items() if k not in CHANGEABLE
                                                            and as_written(v) != as_written(run.get(k))})}
        return {**config, "iteration_overrides": overrides}

    def check_model(self) -> None:
        """For `spin-fast eval`: the model settings must be those the run started with, or its table would score
        another θ0 as the run's, and the run's iterations against another opponent."""
        path = self.path / "config.yaml"
        if not path.exists():  # no run yet: the SFT model's row alone
            return
        now = self.config.to_dict()
        differences = [d for d in differing_settings(paths_as_now(read_saved_config(path), now)["model"], now["model"])
                       if d.split(" ")[0] in ("name_or_path", "revision", "chat_template")]
        if differences:
            raise ValueError(f"{path}: the run was started with another model: model.{'; model.'.join(differences)}"
                             ": evaluate it with its own settings")

    def holds_work(self) -> bool:
        """Whether any stage has saved anything here: a part, an output, a manifest or a checkpoint."""
        return any(path.is_file() for path in self.path.glob("iter-*/**/*"))

    def write_summary_table(self) -> None:
        """summary.jsonl and summary.md, rebuilt from the finished iterations' manifests: all of them, also those
        past `iterations` when the run is started again with fewer."""
        rows = finished_summaries(self.path)
        # Every row's keys: an iteration_overrides data.eval_source gives later rows a column the first lacks.
        columns = list(dict.fromkeys(k for row in rows for k in row if k != "checkpoint"))
        table = ["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
        for row in rows:
            table.append("| " + " | ".join(f"{row.get(c, ''):.4g}" if isinstance(row.get(c), float)
                                           else str(row.get(c, "")) for c in columns) + " |")
        write_atomically(self.path / "summary.jsonl", "".join(json.dumps(r) + "\n" for r in rows))
        write_atomically(self.path / "summary.md", "\n".join(table) + "\n")


def read_saved_config(path: Path) -> dict:
    """A run directory's config.yaml, read as a config: a setting added to spin-fast since is at its default."""
    try:
        return from_dict(RunConfig, yaml.safe_load(path.read_text())).to_dict()
    except (ConfigError, yaml.YAMLError) as error:
        raise ValueError(f"{path} is not a config spin-fast can read ({error}): use a new output_dir") from None


def check_shared(output_dir: Path, path: Path, line: str) -> None:
    """Every rank but 0, once rank 0 has written `line` into `path` in output_dir: this rank sees it. Rank 0 writes
    the stages' files and checkpoints, and every rank reads them (pairs, scores, checkpoints; a checkpoint holds
    every rank's shard of the training state): an output_dir on a node's own disk would otherwise be found only
    after the whole first generation, by an error naming a missing pairs.jsonl on the other nodes, or when a
    training resumes from checkpoints missing those nodes' shards. A new file may reach another node late (NFS):
    it is looked for up to SHARED_WAIT_S."""
    if distributed.is_main():
        return
    # Told before the others' collective times out, with this message rather than the timeout's.
    timeout = distributed.collective_timeout()
    wait = min(SHARED_WAIT_S, timeout.total_seconds() / 2) if timeout else SHARED_WAIT_S
    deadline = time.monotonic() + wait
    while True:
        # mkdir asks the server: it drops a cached absence of the folder, looked up before rank 0 made it.
        with contextlib.suppress(OSError):
            path.parent.mkdir(parents=True, exist_ok=True)
        if path.exists() and line in path.read_text().splitlines():
            return
        if time.monotonic() > deadline:
            raise ValueError(f"output_dir {output_dir}: rank {distributed.rank()} (on {socket.gethostname()}) does "
                             f"not see the files rank 0 writes there ({path.name} lacks this start's line after "
                             f"{wait:g} s): output_dir must be on a filesystem that every node shares")
        time.sleep(1)


def record_start(path: Path, text: str | None = None, **fields) -> str:
    """Rank 0: this start of a command, appended to `path` (its line, returned): when, which code, how many
    processes, and `fields`. What check_shared looks for. `text`: the file as the caller has just read it."""
    path.parent.mkdir(parents=True, exist_ok=True)
    if text is None:
        text = path.read_text() if path.exists() else ""
    line = json.dumps({"started": datetime.now(timezone.utc).isoformat(timespec="seconds"), "code": code_version(),
                       "processes": distributed.world_size(), **fields})
    with path.open("a") as out:
        out.write(("\n" if text and not text.endswith("\n") else "") + line + "\n")
    return line


# Settings a run directory may be resumed with changed: they change no finished stage's result, and the rest's
# by rounding at most (how generation, scoring and training are cut into batches to fit in memory); data.checker
# grades eval's answers only.
CHANGEABLE = ("iterations", "deepspeed.timeout_minutes", "score_batch_tokens", "generation.batch_size",
              "generation.gpu_memory_utilization", "data.checker", *(f"train.{name}" for name in RESUMABLE_CHANGES))

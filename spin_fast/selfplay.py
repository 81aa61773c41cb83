"""The self-play loop: for t = 0..T-1, generate -> score -> train -> new weights into the engine.

Every stage of every iteration writes its output into the run directory and, last, a small
manifest (config hash, inputs, counts, seconds). A stage with a manifest is done and is never
redone, so a run killed at any point and started again with the same command resumes where it
stopped; training resumes from its own checkpoints.

    run_dir/config.yaml            the resolved config
    run_dir/iter-<t>/generate/     pairs.jsonl: prompt, real and generated token ids
    run_dir/iter-<t>/score/        scored.jsonl: the pairs of t and earlier, with θt's log-probs
    run_dir/iter-<t>/<stage>/parts/  generation's and scoring's work so far, save_every_prompts at a time
    run_dir/iter-<t>/train/        checkpoints of θt+1 (Hugging Face folders) and metrics.jsonl
    run_dir/summary.jsonl, .md     one line / table row per finished iteration
    run_dir/tensorboard, wandb/    the summaries as curves, with train.tensorboard / train.wandb (so are the
                                   training steps, in each train/ folder)

Launched with several processes (torchrun, the deepspeed launcher), every rank runs this loop: each
generates for and scores its share of the pairs (gathered into one file, in the order of one process),
training runs under DeepSpeed ZeRO, and the trained weights are gathered bucket by bucket into each
rank's engine. Rank 0 writes the files; the others wait for it. With deepspeed.zero3_init the model is
ZeRO-3 partitioned from its first load on and stays so: no rank ever holds it whole.
"""

from __future__ import annotations

import contextlib
import json
import logging
import shutil
import time
from collections.abc import Sequence as Seq
from dataclasses import asdict
from datetime import datetime, timezone
from pathlib import Path

import yaml

from spin_fast import distributed, locking
from spin_fast.config import ConfigError, DataConfig, RunConfig, as_written, differing_settings, from_dict
from spin_fast.data import Example, TokenizedExample, repeated_rows
from spin_fast.examples import answered_pairs, read_examples, rows_digest, tokenize_examples
from spin_fast.files import whole_json_lines, write_atomically
from spin_fast.generation.base import Engine, request_cost
from spin_fast.generation.choice import check_prompts_fit, default_engine
from spin_fast.loading import fetch_model, load_policy, partitioned
from spin_fast.model import load_tokenizer
from spin_fast.packing import Sequence, check_fits
from spin_fast.scoring import ScoredPair, check_pairs_fit, load_scored_pairs, score_pairs
from spin_fast.stages import (
    MANIFEST,
    config_hash,
    finish_stage,
    finished_summaries,
    in_parts,
    read_manifest,
    shared_manifest,
    write_manifest,
)
from spin_fast.tracking import check_trackers, track_iteration, tracked_name
from spin_fast.training import RESUMABLE_CHANGES, Trainer, check_items, uses_deepspeed
from spin_fast.version import code_version

log = logging.getLogger(__name__)
STAGES = ("generate", "score", "train")
SFT_MODEL_FILE = "sft-model.json"
DATA_FILE = "data.json"  # what each iteration's examples were (_keep_same_data)


def check_output_dir(path: str) -> None:
    """Refused before any work: output_dir naming a file, or under one."""
    for folder in (Path(path), *Path(path).parents):
        if folder.exists():
            if not folder.is_dir():
                raise ValueError(f"output_dir {path!r}: {folder} is a file, not a folder")
            return


class SelfPlay:
    """One SPIN run. The engine is created once, by `make_engine(model, tokenizer, run config, model folder)`, and
    kept for every iteration."""

    def __init__(self, config: RunConfig, make_engine=None):
        if not config.output_dir:
            raise ValueError("output_dir is not set: the run needs a directory for its stages")
        check_output_dir(config.output_dir)
        if not config.model.name_or_path:
            raise ValueError("model.name_or_path is not set: the SFT model to start from")
        if not config.data.source:
            raise ValueError("data.source is not set: the SFT set of (prompt, human response) pairs")
        self.config = config
        self.run_dir = Path(config.output_dir)
        self.make_engine = make_engine or default_engine
        self.engine: Engine | None = None
        self.model = None  # θt; trained in place into θt+1, so it is loaded from disk once per run
        self._read: dict[str, list[Example]] = {}  # read once per run, per data setting
        self._examples: dict[str, list[TokenizedExample]] = {}  # and tokenized once
        self._digests: dict[str, str] = {}  # rows_digest of each, for the ranks' check and data.json
        self._trained: dict[int, str] = {}  # iteration t -> θt+1's checkpoint, as rank 0 recorded it
        self._lock: contextlib.ExitStack | None = None  # the run directory's, held by rank 0 while run() runs
        self.sft_folder = config.model.name_or_path  # θ0; a Hub model's local snapshot once fetched

    @property
    def distributed(self) -> bool:
        """Training under DeepSpeed ZeRO; asked here, not at construction: `spin-fast eval` trains nothing."""
        return uses_deepspeed(self.config.deepspeed)

    @property
    def partitioned(self) -> bool:
        return partitioned(self.config)

    # ------------------------------------------------------------------------------ the loop
    def run(self, until: tuple[int, str] | None = None) -> list[dict]:
        """All iterations, or up to and including stage until=(iteration, "generate"|"score"|"train")."""
        try:
            return self._run(until)
        finally:
            if self._lock is not None:
                self._lock.close()
                self._lock = None

    def _run(self, until: tuple[int, str] | None) -> list[dict]:
        if until is not None and (until[1] not in STAGES or not 0 <= until[0] < self.config.iterations):
            raise ValueError(f"until must be (iteration in [0, {self.config.iterations}), one of {STAGES}), "
                             f"got {until}")
        if self.distributed:
            distributed.init(self.config.deepspeed.timeout_minutes)
            distributed.check_same_on_every_rank(config_hash(self.config), "settings")
        # Every input is read before the run directory is claimed: a typo found here leaves no config behind.
        iterations = range(self.config.iterations if until is None else until[0] + 1)
        if self.config.data.checker:  # eval's alone, but a typo in it is named now, not after the run
            from spin_fast.evaluation import load_checker

            load_checker(self.config.data.checker)
        trainings = [self.config.for_iteration(t).train for t in iterations]
        for t, train in zip(iterations, trainings):
            if train.mode != "spin":  # else refused by the trainer's check of the pairs, after generation
                where = f"iteration_overrides[{t}]: " if self.config.train.mode == "spin" else ""
                raise ConfigError(f"{where}train.mode={train.mode!r}: a run trains on SPIN pairs (mode spin); "
                                  "`spin-fast sft` trains on the human responses")
        # Rank 0 reads the run directory, and logs in to the trackers now rather than when training starts, after
        # generation; what it refuses stops every rank at once. A run directory that exists is locked first: a second
        # run would otherwise tidy away files of the run working there (a new one is made, and locked, only once
        # every input has been read).
        distributed.on_main(lambda: self._lock_run_directory() if self.run_dir.is_dir() else None,
                            "the run directory's lock")
        saved_config = distributed.on_main(self._saved_config, "the run directory's config")
        tracked = [train for train in trainings if train.tensorboard or train.wandb]
        if tracked:  # the same on every rank: all of them take part, or none
            distributed.on_main(lambda: [check_trackers(train) for train in tracked], "the trackers' check")
        revision = self.sft_revision()
        sources = {}  # iteration -> (its data settings, its prompts, their limit); the held-out ones last
        for t in iterations:
            data = self.config.for_iteration(t).data
            sources[t] = (data, data.source, data.max_prompts)
            if data.eval_source:
                sources[f"eval {t}"] = (data, data.eval_source, None)
        with distributed.main_first("the model and data, from the Hub"):
            # First: a missing model is named before its tokenizer fails.
            self.sft_folder = fetch_model(self.config.model.name_or_path, revision=revision)
            tokenizer = load_tokenizer(self.config.model, self.sft_folder)
            for data, source, limit in sources.values():
                self.read(data, source, limit)
        distributed.on_main(lambda: self._warn_held_out_rows_trained_on(sources), "the held-out rows' check")
        examples = {t: self.examples(tokenizer, *sources[t]) for t in sources}  # the ranks share the tokenizing
        fitted = set()  # (source, budget) pairs checked: the iterations mostly share both
        for t, train in zip(iterations, trainings):  # a pair holds at least its prompt and human response: one that
            # cannot fit train.micro_batch_tokens is named now, not by training's check after generation and scoring
            if (_key(*sources[t]), train.micro_batch_tokens) in fitted:
                continue
            fitted.add((_key(*sources[t]), train.micro_batch_tokens))
            check_fits([[Sequence(e.prompt_ids, e.response_ids)] for e in examples[t]], False,
                       train.micro_batch_tokens, "train.micro_batch_tokens", f"{sources[t][1]}: example",
                       " (a pair's sequences share a micro-batch; this example's prompt and human response alone "
                       "do not fit) or cut the data shorter (data.max_length)")
        if any(isinstance(t, str) for t in sources):
            from spin_fast.evaluation import check_examples_fit

            for t, (_, source, _) in sources.items():
                if isinstance(t, str):  # "eval t": scored after iteration t's training
                    check_examples_fit(examples[t], self.config.score_batch_tokens, source)
        # What the run's work is made from, for _keep_same_data: each source's rows, by the digest tokenizing checked.
        data = {str(t): {"source": source, "examples": len(examples[t]), "digest": self._digests[_key(*sources[t])]}
                for t, (_, source, _) in sources.items()}
        self._read.clear()  # the text: from here on the run needs its ids alone
        distributed.on_main(lambda: self._claim_run_directory(saved_config, until, data), "run directory")
        summaries = []
        try:
            for t in iterations:
                stop = until[1] if until is not None and t == until[0] else None
                summary = self.iteration(t, tokenizer, examples[t], stop_after=stop)
                if summary is not None:
                    summaries.append(summary)
        finally:
            if self.engine is not None:
                self.engine.close()
        return summaries

    def iteration(self, t: int, tokenizer, examples: list[TokenizedExample], stop_after: str | None = None):
        """Runs iteration t's stages that are not done yet; returns its summary (None if stopped early)."""
        config = self.config.for_iteration(t)
        iter_dir = self.run_dir / f"iter-{t}"
        train_dir = iter_dir / "train"
        done = shared_manifest(train_dir)
        if done is not None:
            log.info("iteration %d: done before, kept (%s)", t, train_dir)
            self._trained[t] = done["summary"]["checkpoint"]
            return done["summary"]
        if self.model is None:
            self.model = load_policy(self.model_path(t), config)
        model = self.model

        self.generate(t, iter_dir / "generate", model, tokenizer, examples, config)
        if stop_after == "generate":
            return None

        scored = self.score(t, iter_dir / "score", model, config)
        if stop_after == "score":
            return None

        result = self.train(train_dir, model, tokenizer, scored, config)
        times = {"train_s": result.seconds}

        start = time.perf_counter()
        self.transfer_weights(model)
        times["weight_transfer_s"] = time.perf_counter() - start
        if self.distributed and not self.partitioned:
            # ZeRO left `model` sharded: θt+1 continues as a whole model, from the consolidated checkpoint.
            self.model = model = load_policy(str(result.final_dir), config)

        heldout = self.heldout(model, tokenizer, config)  # every rank scores its share

        def summarize() -> dict:  # rank 0, which wrote the stages' manifests and the training log
            stage_times = {"generate_s": read_manifest(iter_dir / "generate")["seconds"],  # every attempt's work,
                           "score_s": read_manifest(iter_dir / "score")["seconds"], **times}  # if resumed
            # The log, not this call's history: a run resumed after its last step has none.
            lines = (train_dir / "metrics.jsonl").read_text().splitlines()
            last = json.loads(lines[-1]) if lines else {}
            summary = {"iteration": t, "pairs": len(scored), "steps": result.steps,
                       **{k: last[k] for k in ("loss", "rewards/real", "rewards/generated", "rewards/margins",
                                               "rewards/accuracies") if k in last},
                       **heldout, **stage_times, "checkpoint": str(result.final_dir)}
            track_iteration(self.run_dir, config.train, summary)  # before the manifest: a kill may redo it, not skip
            write_manifest(train_dir, stage="train", iteration=t, config_hash=config_hash(config),
                           inputs={"model": self.model_path(t), "pairs": str(iter_dir / "score" / "scored.jsonl")},
                           summary=summary)
            self.write_summary_table()
            log.info("iteration %d: %s", t, summary)
            return summary

        summary = distributed.on_main(summarize, f"iteration {t}'s summary")  # once written: the iteration is done
        self._trained[t] = summary["checkpoint"]
        return summary

    def train(self, train_dir: Path, model, tokenizer, scored: list[ScoredPair], config: RunConfig):
        """θt -> θt+1 on the scored pairs (resuming from train_dir's checkpoints)."""
        if hasattr(self.engine, "sleep"):  # a vLLM engine on the training GPU frees its memory meanwhile
            self.engine.sleep()
        trainer = Trainer(model, tokenizer, config.train, train_dir, scored, deepspeed=config.deepspeed,
                          name=tracked_name(self.run_dir, train_dir.parent.name))
        try:
            return trainer.train()
        finally:
            trainer.release()  # θt+1 leaves the DeepSpeed engine: sharded under zero3_init, it goes on as it is

    def transfer_weights(self, model) -> None:
        """θt+1 into the running engine, in memory."""
        if self.engine is None or getattr(self.engine, "model", None) is model:  # it generates with θt+1 itself
            return
        if hasattr(self.engine, "wake_up"):
            self.engine.wake_up()
        self.engine.load_weights(self.trained_weights(model))

    def trained_weights(self, model):
        """θt+1's named tensors for the engine: under ZeRO gathered a bucket at a time on every rank."""
        if not self.distributed:
            return model.state_dict().items()
        from spin_fast.zero import full_weights

        return full_weights(model)

    def write_summary_table(self) -> None:
        """summary.jsonl and summary.md, rebuilt from the finished iterations' manifests: all of them, also those
        past `iterations` when the run is started again with fewer."""
        rows = finished_summaries(self.run_dir)
        # Every row's keys: an iteration_overrides data.eval_source gives later rows a column the first lacks.
        columns = list(dict.fromkeys(k for row in rows for k in row if k != "checkpoint"))
        table = ["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
        for row in rows:
            table.append("| " + " | ".join(f"{row.get(c, ''):.4g}" if isinstance(row.get(c), float)
                                           else str(row.get(c, "")) for c in columns) + " |")
        write_atomically(self.run_dir / "summary.jsonl", "".join(json.dumps(r) + "\n" for r in rows))
        write_atomically(self.run_dir / "summary.md", "\n".join(table) + "\n")

    # -------------------------------------------------------------------------------- stages
    def generate(self, t, stage_dir: Path, model, tokenizer, examples, config) -> None:
        """θt's response to every prompt, paired with the human one, in stage_dir/pairs.jsonl."""
        if shared_manifest(stage_dir) is not None:
            log.info("iteration %d's generation: done before, kept (%s)", t, stage_dir)
            return
        pairs_file = stage_dir / "pairs.jsonl"
        stage_dir.mkdir(parents=True, exist_ok=True)
        sampling = config.generation.sampling().for_iteration(t)
        prompts = [e.answered_prompt_ids for e in examples]
        check_prompts_fit(prompts, sampling.max_new_tokens, self.model_path(t), config, config.data.source)

        def generate_part(start: int, end: int):
            if self.engine is None:  # started at the first prompt left to answer, once per run
                # Under ZeRO the training model ends sharded: no engine may generate with it (None), unless
                # it is sharded from the start (zero3_init), when the transformers engine runs it in step.
                shared = model if self.partitioned or not self.distributed else None
                # The run's settings, not iteration t's: the engine serves every iteration.
                self.engine = self.make_engine(shared, tokenizer, self.config, self.model_path(t))
            part = prompts[start:end]
            completions = distributed.share_work(  # indices in the whole set: they seed sampling
                [request_cost(p, sampling) for p in part],
                lambda mine: self.engine.generate([part[i] for i in mine], sampling,
                                                  indices=[start + i for i in mine]),
                "generated responses")
            pairs = answered_pairs(examples[start:end], completions, tokenizer.eos_token_id, config.data)
            rows = [ScoredPair(p.prompt_ids, p.real_ids, p.generated_ids) for p in pairs]
            return rows, {"finished": sum(c[0].finished for c in completions)}

        totals = in_parts(pairs_file, len(examples), config.save_every_prompts, generate_part,
                          f"iteration {t} generation")
        distributed.on_main(lambda: finish_stage(
            stage_dir, stage="generate", iteration=t, config_hash=config_hash(config),
            inputs={"model": self.model_path(t), "data": config.data.source}, pairs=len(examples),
            finished=totals.get("finished", 0), seconds=totals.get("seconds", 0.0), sampling=asdict(sampling),
            processes=distributed.world_size()), f"iteration {t} generation written")

    def score(self, t, stage_dir: Path, model, config) -> list[ScoredPair]:
        """θt's log-probs of the pairs of iteration t and of the `mix_previous` before it, as generated (their
        pairs.jsonl files)."""
        scored_file = stage_dir / "scored.jsonl"
        if shared_manifest(stage_dir) is None:
            self._score_into(scored_file, t, model, config)  # its pairs are gone before the scored ones are read
        else:
            log.info("iteration %d's scores: done before, kept (%s)", t, stage_dir)
        return load_scored_pairs(scored_file)

    def _score_into(self, scored_file: Path, t: int, model, config: RunConfig) -> None:
        stage_dir = scored_file.parent
        stage_dir.mkdir(parents=True, exist_ok=True)
        sources = {i: self.run_dir / f"iter-{i}" / "generate" / "pairs.jsonl"
                   for i in [t, *range(max(0, t - config.mix_previous), t)]}  # t's pairs first
        mixed = []
        for i, source in sources.items():
            pairs = load_scored_pairs(source)
            check_iteration_pairs(pairs, model, config, i)  # each named by its own iteration
            mixed += pairs

        def score_part(start: int, end: int):
            part = mixed[start:end]

            def opponent_logprobs(mine: list[int]) -> list[tuple[float, float]]:
                scored = score_pairs(model, [part[i] for i in mine], config.score_batch_tokens,
                                     backend=config.train.backend, bf16_autocast=config.train.bf16_autocast,
                                     progress=config.train.progress)
                # The ranks share the log-probs, not the token ids: every rank holds the pairs.
                return [(s.opponent_real, s.opponent_generated) for s in scored]

            scores = distributed.share_work([sum(s.length for s in p.sequences()) for p in part], opponent_logprobs,
                                            "opponent log-probs")
            return [ScoredPair(p.prompt_ids, p.real_ids, p.generated_ids, *s) for p, s in zip(part, scores)], {}

        totals = in_parts(scored_file, len(mixed), config.save_every_prompts, score_part, f"iteration {t} scoring")
        distributed.on_main(lambda: finish_stage(
            stage_dir, stage="score", iteration=t, config_hash=config_hash(config), pairs=len(mixed),
            inputs={"model": self.model_path(t), "pairs": [str(sources[i]) for i in sorted(sources)]},
            seconds=totals.get("seconds", 0.0), processes=distributed.world_size()),
            f"iteration {t} scores written")

    # ------------------------------------------------------------------------------- helpers
    def heldout(self, model, tokenizer, config: RunConfig) -> dict:
        """θt+1's log-likelihood of the held-out human responses, when data.eval_source is set. Under a
        launcher each rank scores its share of the micro-batches (evaluation.shared_logprobs), with fillers
        where the model is partitioned (zero3_init)."""
        if not config.data.eval_source:
            return {}
        from spin_fast.evaluation import heldout_loglik

        examples = self.examples(tokenizer, config.data, config.data.eval_source)
        result = heldout_loglik(model, examples, config.score_batch_tokens, backend=config.train.backend,
                                progress=config.train.progress, bf16_autocast=config.train.bf16_autocast)
        return {"heldout_loglik_per_token": result["loglik_per_token"]}

    def read(self, data: DataConfig, source: str, limit: int | None = None) -> list[Example]:
        """The examples of `source` read with the data settings `data` (an iteration may override them), once."""
        key = _key(data, source, limit)
        if key not in self._read:
            self._read[key] = read_examples(data, source, limit)
            if distributed.is_main() and any(e.generated is not None for e in self._read[key]):
                log.warning("%s: its rows hold generated responses (real/generated pairs), which a SPIN run does not "
                            "use: each iteration's model answers the prompts itself", source)
        return self._read[key]

    def _warn_held_out_rows_trained_on(self, sources: dict) -> None:
        """Says where held-out rows (data.eval_source) are in the training set too: their figures are not held out."""
        said = set()
        for t, (data, eval_source, _) in sources.items():
            if isinstance(t, str) and (data.source, eval_source) not in said:  # "eval t"
                said.add((data.source, eval_source))
                trained = self.read(*sources[int(t.split()[1])])
                both = repeated_rows(self.read(data, eval_source), earlier=trained)
                if both:
                    log.warning("%s: %d of its %d rows are in the training set %s too (the first: %s is %s): the "
                                "held-out figures are not held out for them", eval_source, len(both),
                                len(self.read(data, eval_source)), data.source, both[0][0].origin, both[0][1].origin)

    def examples(self, tokenizer, data: DataConfig, source: str, limit: int | None = None) -> list[TokenizedExample]:
        """The examples of `source` read and tokenized with the data settings `data`, once (every rank calls it:
        they share the tokenizing)."""
        key = _key(data, source, limit)
        if key not in self._examples:
            rows = self.read(data, source, limit)
            self._digests[key] = rows_digest(rows)
            self._examples[key] = tokenize_examples(tokenizer, data, rows, self.config.train.progress,
                                                    self._digests[key])
        return self._examples[key]

    def model_path(self, t: int) -> str:
        """θt: the SFT model (its folder) for t = 0, else the last checkpoint of iteration t-1's training."""
        return self.sft_folder if t == 0 else self._trained[t - 1]

    def sft_revision(self) -> str | None:
        """The revision the SFT model is fetched at, when it is named by a Hub id, as rank 0 finds it: the commit the
        run started from, kept in run_dir/sft-model.json (so that a run resumed after the model's repository moved
        on goes on with the same θ0, and its evaluation scores that θ0), else model.revision (None: main)."""
        path = self.run_dir / SFT_MODEL_FILE
        return distributed.on_main(lambda: json.loads(path.read_text())["revision"] if path.exists()
                                   else self.config.model.revision or None, "the SFT model's revision")

    def _lock_run_directory(self) -> None:
        """Rank 0: this process alone works in the run directory until run() ends (spin_fast.locking)."""
        if self._lock is None:
            lock = contextlib.ExitStack()
            lock.enter_context(locking.exclusive(self.run_dir, "run"))
            self._lock = lock

    def _claim_run_directory(self, saved_config: dict | None, until: tuple[int, str] | None,
                             data: dict[str, dict]) -> None:
        """Rank 0, as the run starts: the run directory locked, its data checked, the config saved when it changed,
        θ0's revision, what a kill left tidied, this session recorded."""
        self._lock_run_directory()
        self._keep_same_data(data)
        if as_written(saved_config) != as_written(self.config.to_dict()):
            self.run_dir.mkdir(parents=True, exist_ok=True)
            write_atomically(self.run_dir / "config.yaml",
                             yaml.safe_dump(as_written(self.config.to_dict()), sort_keys=False))
        self._keep_sft_revision()
        self._tidy_what_a_kill_left()
        self._record_session(until)

    def _keep_same_data(self, now: dict[str, dict]) -> None:
        """The rows each iteration reads (`now`: their source, number and digest, by iteration, "eval t" for the
        held-out rows scored after iteration t), as the run made its work from them (run_dir/data.json): a data file
        or Hub dataset changed since then is refused, or the resumed run would mix answers to the old rows with
        answers to the new ones (a row added midway shifts every saved part) and train later iterations on other
        data than the earlier ones. An iteration with no work yet takes the data as it is now."""
        path = self.run_dir / DATA_FILE
        saved = json.loads(path.read_text()) if path.exists() else {}
        for key, record in now.items():
            then = saved.get(key)
            if then is None or then["digest"] == record["digest"] or not self._has_work(key):
                continue
            what = f"iteration {key}'s prompts" if key.isdigit() else f"iteration {key.split()[1]}'s held-out data"
            setting = "data.source" if key.isdigit() else "data.eval_source"
            raise ValueError(f"{what} ({setting} {record['source']}: {record['examples']} examples) are not those "
                             f"{self.run_dir} made its work from ({then['source']}: {then['examples']} examples, "
                             "other rows): the run would mix answers to the old rows with the new ones. Put the data "
                             "back as it was, or use a new output_dir")
        if now != {key: saved.get(key) for key in now}:
            write_atomically(path, json.dumps({**saved, **now}, indent=1) + "\n")

    def _has_work(self, key: str) -> bool:
        """Whether the work of data.json's `key` has begun: iteration t's (any file saved), or for "eval t" the
        held-out score of iteration t (in its training's manifest)."""
        if key.isdigit():
            return any(p.is_file() for p in (self.run_dir / f"iter-{key}").glob("**/*"))
        return (self.run_dir / f"iter-{key.split()[1]}" / "train" / MANIFEST).exists()

    def _keep_sft_revision(self) -> None:
        """At the run's first start (rank 0): the commit of the Hub model's snapshot it fetched, for sft_revision."""
        path, name = self.run_dir / SFT_MODEL_FILE, self.config.model.name_or_path
        if self.sft_folder != name and not path.exists():
            write_atomically(path, json.dumps({"name": name, "revision": Path(self.sft_folder).name}) + "\n")

    def _tidy_what_a_kill_left(self) -> None:
        """A kill between a stage's manifest and what follows it leaves the stage done, so nothing would come back
        to finish: remove its parts/ (a copy of its output), and rebuild the summary table (it may lack the
        iteration)."""
        for parts in self.run_dir.glob("iter-*/*/parts"):
            if (parts.parent / MANIFEST).exists():
                shutil.rmtree(parts, ignore_errors=True)
        if (self.run_dir / "iter-0" / "train" / MANIFEST).exists():
            self.write_summary_table()

    def _record_session(self, until: tuple[int, str] | None) -> None:
        """Append this start of the run to run_dir/sessions.jsonl; warn when the run's finished work was made
        by other spin-fast code, which it keeps as it is."""
        path = self.run_dir / "sessions.jsonl"
        text = path.read_text() if path.exists() else ""
        sessions = whole_json_lines(text)
        before = sessions[-1]["code"] if sessions else None
        done = sorted(str(p.parent.relative_to(self.run_dir)) for p in self.run_dir.glob(f"iter-*/*/{MANIFEST}"))
        started = [str(p.relative_to(self.run_dir)) for p in self.run_dir.glob("iter-*/*/parts")]
        started += [str(p.relative_to(self.run_dir)) for p in self.run_dir.glob("iter-*/train/checkpoint-*")
                    if not (p.parent / MANIFEST).exists()]
        if before != code_version() and (done or started):
            log.warning("%s was run before by %s; this is spin-fast %s. Its finished stages (%s) and unfinished "
                        "work (%s) stay as that code made them, and the rest is made by this code: for results "
                        "from one code throughout, use a new output_dir", self.run_dir,
                        f"spin-fast {before}" if before else "an older spin-fast (no version recorded)", code_version(),
                        ", ".join(done) or "none", ", ".join(sorted(started)) or "none")
        record = {"started": datetime.now(timezone.utc).isoformat(timespec="seconds"), "code": code_version(),
                  "processes": distributed.world_size(), "until": list(until) if until else None}
        with path.open("a") as out:
            out.write(("\n" if text and not text.endswith("\n") else "") + json.dumps(record) + "\n")

    def _saved_config(self) -> dict | None:
        """The settings the run directory was started with (None for a new run). A run directory belongs to one
        experiment: resuming with other settings is an error naming them, except for those that change no result
        (CHANGEABLE: more or fewer iterations, progress bars, checkpoints, trackers, the collectives' timeout, batch
        sizes) and the overrides of iterations that have saved no work yet."""
        path = self.run_dir / "config.yaml"
        if not path.exists():
            return None
        saved = _read_saved_config(path)
        differences = differing_settings(self._overrides_with_work(saved), self._overrides_with_work(
            self.config.to_dict()), ignored=CHANGEABLE)
        if differences and not self._holds_work():
            # The run stopped (on an error, say) before any stage saved a part: nothing was made with the saved
            # settings, and the new ones (often the fix its error named) start it afresh.
            log.info("%s: no stage has saved work here yet; the run starts again with the new settings (%s)",
                     self.run_dir, "; ".join(differences))
            for name in ("config.yaml", SFT_MODEL_FILE):
                (self.run_dir / name).unlink(missing_ok=True)
            return None
        if differences:
            raise ValueError(f"{path} holds another config, which differs in {'; '.join(differences)}: use a new "
                             f"output_dir, or the same settings")
        return saved

    def _overrides_with_work(self, config: dict) -> dict:
        """`config` with the iteration_overrides of iterations that have saved work alone: the others shaped nothing
        yet, and may change (a run extended with lower learning rates for its new iterations)."""
        overrides = {t: changes for t, changes in config["iteration_overrides"].items() if self._has_work(str(t))}
        return {**config, "iteration_overrides": overrides}

    def check_run_model(self) -> None:
        """For `spin-fast eval`: the model settings must be those the run started with, or its table would score
        another θ0 as the run's, and the run's iterations against another opponent."""
        path = self.run_dir / "config.yaml"
        if not path.exists():  # no run yet: the SFT model's row alone
            return
        differences = [d for d in differing_settings(_read_saved_config(path)["model"], self.config.to_dict()["model"])
                       if d.split(" ")[0] in ("name_or_path", "revision", "chat_template")]
        if differences:
            raise ValueError(f"{path}: the run was started with another model: model.{'; model.'.join(differences)}"
                             ": evaluate it with its own settings")

    def _holds_work(self) -> bool:
        """Whether any stage has saved anything here: a part, an output, a manifest or a checkpoint."""
        return any(path.is_file() for path in self.run_dir.glob("iter-*/**/*"))


def check_iteration_pairs(pairs: Seq[ScoredPair], model, config: RunConfig, t: int) -> None:
    """Before scoring: iteration t's pairs fit score_batch_tokens and pass the training's checks (config: the
    iteration that trains on them), or the error names the setting now rather than after the scoring. Both budgets
    may change when the run resumes; the data settings may not (the pairs are made)."""
    if not pairs:
        return
    what = f"iteration {t}'s pair"
    advice = " (a pair's prompt and both responses go in one micro-batch; the run resumes with the new value)"
    check_pairs_fit(pairs, model, config.score_batch_tokens, what, advice)
    check_items(pairs, model, config.train, what, advice)


def _read_saved_config(path: Path) -> dict:
    """A run directory's config.yaml, read as a config: a setting added to spin-fast since is at its default."""
    try:
        return from_dict(RunConfig, yaml.safe_load(path.read_text())).to_dict()
    except (ConfigError, yaml.YAMLError) as error:
        raise ValueError(f"{path} is not a config spin-fast can read ({error}): use a new output_dir") from None


# Settings a run directory may be resumed with changed: they change no finished stage's result, and the rest's
# by rounding at most (how generation, scoring and training are cut into batches to fit in memory); data.checker
# grades eval's answers only.
CHANGEABLE = ("iterations", "deepspeed.timeout_minutes", "score_batch_tokens", "generation.batch_size",
              "generation.gpu_memory_utilization", "data.checker", *(f"train.{name}" for name in RESUMABLE_CHANGES))


def _key(data: DataConfig, source: str, limit: int | None) -> str:
    """What a source's examples are read and tokenized by: the data settings, the source and the limit."""
    return json.dumps([asdict(data), source, limit], sort_keys=True)

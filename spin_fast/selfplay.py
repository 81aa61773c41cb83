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
    run_dir/data.json, sessions.jsonl, sft-model.json   what keeps the directory one experiment across starts
                                   (spin_fast.run_directory: its lock, saved config and data, θ0's commit)

Launched with several processes (torchrun, the deepspeed launcher), every rank runs this loop: each
generates for and scores its share of the pairs (gathered into one file, in the order of one process),
training runs under DeepSpeed ZeRO, and the trained weights are gathered bucket by bucket into each
rank's engine. Rank 0 writes the files; the others wait for it. With deepspeed.zero3_init the model is
ZeRO-3 partitioned from its first load on and stays so: no rank ever holds it whole.
"""

from __future__ import annotations

import json
import logging
import math
import time
import traceback
from collections.abc import Sequence as Seq
from dataclasses import asdict
from pathlib import Path

import torch

from spin_fast import distributed, stopping
from spin_fast.config import ConfigError, DataConfig, RunConfig, unexpanded_setting
from spin_fast.data import Example, TokenizedExample, response_end, rows_found_in
from spin_fast.examples import (
    answered_pairs,
    check_in_vocabulary,
    read_examples,
    rows_digest,
    tokenize_examples,
    tokens_digest,
)
from spin_fast.generation.base import Engine, request_cost
from spin_fast.generation.choice import (
    check_engine_can_swap,
    check_examples_in_context,
    check_prompts_fit,
    default_engine,
)
from spin_fast.loading import device, fetch_model, load_policy, partitioned
from spin_fast.model import load_tokenizer
from spin_fast.packing import Sequence, check_fits, item_name
from spin_fast.run_directory import RunDirectory
from spin_fast.scoring import ScoredPair, check_pairs_fit, load_scored_pairs, score_pairs
from spin_fast.stages import (
    MANIFEST,
    checkpoint_at,
    config_hash,
    finish_stage,
    in_parts,
    read_manifest,
    shared_manifest,
    write_manifest,
)
from spin_fast.tracking import check_trackers, track_iteration, tracked_name
from spin_fast.training import Trainer, check_items, uses_deepspeed
from spin_fast.zero import deepspeed_config
from spin_kernels.linear_logprobs import resolve_backend

log = logging.getLogger(__name__)
STAGES = ("generate", "score", "train")


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
        self.make_engine = make_engine or self._default_engine
        self._longest_prompt: int | None = None  # of every iteration's prompts, answered whole or cut (run)
        self.engine: Engine | None = None
        self.model = None  # θt; trained in place into θt+1, so it is loaded from disk once per run
        self._read: dict[str, list[Example]] = {}  # read once per run, per data setting
        self._examples: dict[str, list[TokenizedExample]] = {}  # and tokenized once
        self._digests: dict[str, str] = {}  # rows_digest of each, for the ranks' check and data.json
        self._origins: dict[str, list[str]] = {}  # each example's file and line, for errors once the text is gone
        self._trained: dict[int, str] = {}  # iteration t -> θt+1's checkpoint, as rank 0 recorded it
        self.directory = RunDirectory(self.run_dir, config)  # its lock, saved settings and records (rank 0)
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
            self.directory.unlock()

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
            try:  # a head this machine cannot run (triton without CUDA): else refused in scoring, after generation
                resolve_backend(train.backend, torch.empty(0, device=device()))
            except ValueError as error:
                where = f"iteration_overrides[{t}]: " if train.backend != self.config.train.backend else ""
                raise ConfigError(f"{where}train.backend={train.backend!r}: {error}") from None
        if self.distributed:  # a DeepSpeed JSON that contradicts a setting: else refused as training starts, hours in
            for t, train in zip(iterations, trainings):  # as each trains: the section's settings, where none overrides
                try:
                    deepspeed_config(train, self.config.deepspeed, distributed.world_size())
                except ConfigError as error:
                    # gradient_clipping is the one setting of the JSON an iteration may override (train.dtype is
                    # run-wide): the error is the override's only where the section's max_grad_norm gives another
                    # (or none); else it is the JSON's or the section's own, whatever each iteration overrides
                    section = train.replace(max_grad_norm=self.config.train.max_grad_norm)
                    if str(error) == _deepspeed_error(section, self.config.deepspeed):
                        raise
                    raise ConfigError(f"iteration_overrides[{t}]: {error}") from None
        # Rank 0 reads the run directory, and logs in to the trackers now rather than when training starts, after
        # generation; what it refuses stops every rank at once. A run directory that exists is locked first: a second
        # run would otherwise tidy away files of the run working there (a new one is made, and locked, only once
        # every input has been read).
        distributed.on_main(lambda: self.directory.lock() if self.run_dir.is_dir() else None,
                            "the run directory's lock")
        saved_config = distributed.on_main(self.directory.saved_config, "the run directory's config")
        tracked = [train for train in trainings if train.tensorboard or train.wandb]
        if tracked:  # the same on every rank: all of them take part, or none
            distributed.on_main(lambda: [check_trackers(train) for train in tracked], "the trackers' check")
        revision = self.directory.sft_revision()
        sources = {}  # iteration -> (its data settings, its prompts, their limit); the held-out ones last
        for t in iterations:
            data = self.config.for_iteration(t).data
            sources[t] = (data, data.source, data.max_prompts)
            if data.eval_source:
                sources[f"eval {t}"] = (data.held_out(), data.eval_source, None)
        with distributed.main_first("the model and data, from the Hub"):
            # First: a missing model is named before its tokenizer fails.
            self.sft_folder = fetch_model(self.config.model.name_or_path, revision=revision)
            tokenizer = load_tokenizer(self.config.model, self.sft_folder)
            for t, (data, source, limit) in sources.items():  # a missing file is named by the override that gave it
                setting = "data.source" if isinstance(t, int) else "data.eval_source"
                overridden = setting in self.config.iteration_overrides.get(_iteration_of(t), {})
                self.read(data, source, limit, where=f"iteration_overrides[{_iteration_of(t)}]" if overridden else "")
        if self.make_engine == self._default_engine and len(iterations) > 1:  # else no swap (or not this engine's)
            # The engine starts at the first iteration left to generate and takes the weights trained in every
            # iteration from there on but the last: a swap is needed where two or more are left to generate
            left = [t for t in iterations if shared_manifest(self.run_dir / f"iter-{t}" / "generate") is None]
            check_engine_can_swap(
                self.config, self.sft_folder, len(left),
                f", and the engine takes the trained weights of each of the {len(left)} iterations left to generate "
                "but the last", " (or run one iteration per command: spin-fast train CONFIG --iteration t, for t = 0, "
                "1, ..., each starts its engine from that iteration's model)")
        distributed.on_main(lambda: self._warn_held_out_rows_trained_on(sources), "the held-out rows' check")
        examples = {t: self.examples(tokenizer, *sources[t]) for t in sources}  # the ranks share the tokenizing
        first_of = {_key(*sources[t]): t for t in reversed(list(sources))}  # the iterations mostly share a source
        for key, t in first_of.items():  # before the run claims its directory, before any model runs
            check_in_vocabulary(tokenizer, examples[t], self.sft_folder, self.config.model.trust_remote_code,
                                self._origins[key])
            # The human responses are trained on (as SFT's are) or scored (held-out): none may go past the context.
            check_examples_in_context([len(e.prompt_ids) + len(e.response_ids) for e in examples[t]], self.sft_folder,
                                      self.config.for_iteration(_iteration_of(t)), self._origins[key])
        fitted = set()  # (source, budget) pairs checked: the iterations mostly share both
        for t, train in zip(iterations, trainings):  # a pair holds at least its prompt and human response: one that
            # cannot fit train.micro_batch_tokens is named now, not by training's check after generation and scoring
            budget = (_key(*sources[t]), train.micro_batch_tokens)
            if budget in fitted:
                continue
            fitted.add(budget)
            check_fits([[Sequence(e.prompt_ids, e.response_ids)] for e in examples[t]], False,
                       train.micro_batch_tokens, "train.micro_batch_tokens", f"{sources[t][1]}: example",
                       " (a pair's sequences share a micro-batch; this example's prompt and human response alone "
                       "do not fit) or cut the data shorter (data.max_length)",
                       names=self._origins[_key(*sources[t])])
        if any(isinstance(t, str) for t in sources):
            from spin_fast.evaluation import check_examples_fit

            for t, (data, source, limit) in sources.items():
                if isinstance(t, str):  # "eval t": scored after iteration t's training
                    budget = self.config.for_iteration(_iteration_of(t)).score_batch_tokens  # an override's, maybe
                    check_examples_fit(examples[t], budget, source, self._origins[_key(data, source, limit)])
        # What the run's work is made from, for RunDirectory.keep_same_data: each source's rows, by the digest
        # tokenizing checked, and their token ids (the same rows through a changed chat template file differ there).
        tokens = {key: tokens_digest(examples[t]) for key, t in first_of.items()}
        # Each source as written (`~/x`), as config.yaml keeps it: the same under another $HOME.
        data = {str(t): {"source": unexpanded_setting(settings, "source" if isinstance(t, int) else "eval_source"),
                         "examples": len(examples[t]), "digest": self._digests[_key(*sources[t])],
                         "tokens": tokens[_key(*sources[t])]} for t, (settings, _, _) in sources.items()}
        self._read.clear()  # the text: from here on the run needs its ids alone
        self._longest_prompt = max((len(e.answered_prompt_ids) for t in iterations for e in examples[t]), default=0)
        session = distributed.on_main(lambda: self.directory.claim(saved_config, until, data, self.sft_folder),
                                      "run directory")
        distributed.on_every_rank(lambda: self.directory.check_shared(session), "the run directory, on every node")
        summaries = []
        try:
            for t in iterations:
                stop = until[1] if until is not None and t == until[0] else None
                summary = self.iteration(t, tokenizer, examples[t], stop_after=stop, last=t == iterations[-1])
                if summary is not None:
                    summaries.append(summary)
        finally:
            if self.engine is not None:
                engine, self.engine = self.engine, None  # a next run() starts an engine of its own
                engine.close()
        return summaries

    def iteration(self, t: int, tokenizer, examples: list[TokenizedExample], stop_after: str | None = None,
                  last: bool = False):
        """Runs iteration t's stages that are not done yet; returns its summary (None if stopped early). The `last`
        of the run's iterations leaves θt+1 out of the engine: nothing generates with it before the engine closes."""
        config = self.config.for_iteration(t)
        iter_dir = self.run_dir / f"iter-{t}"
        train_dir = iter_dir / "train"
        done = shared_manifest(train_dir)
        if done is not None:
            log.info("iteration %d: done before, kept (%s)", t, train_dir)
            summary = {**done["summary"], "checkpoint": checkpoint_at(train_dir, done["summary"]["checkpoint"])}
            self._trained[t] = summary["checkpoint"]
            return summary
        if self.model is None:
            if t > 0 and not Path(self.model_path(t)).is_dir():  # else transformers takes it for a Hub id
                raise FileNotFoundError(
                    f"{self.model_path(t)}: θ{t}, the checkpoint iteration {t - 1}'s training ended with (as "
                    f"{self.run_dir / f'iter-{t - 1}' / 'train' / MANIFEST} records), is not there (moved or "
                    f"deleted?): put it back to go on from iteration {t}")
            self.model = load_policy(self.model_path(t), config)
        model = self.model

        self.generate(t, iter_dir / "generate", model, tokenizer, examples, config)
        if stop_after == "generate":
            return None

        scored = self.score(t, iter_dir / "score", model, config)
        if stop_after == "score":
            return None

        try:
            result = self.train(train_dir, model, tokenizer, scored, config)
        except BaseException as error:
            # Trained in place part of the way, it is neither θt nor θt+1: a next run() loads θt again (and resumes
            # from the training's checkpoint, if any). The traceback keeps the frames it came through, and so the
            # model (here and in the trainer's frames) while the error is handled: a run() again in the `except`
            # would hold two models. Their locals go; the error's lines stay.
            self.model = model = None
            traceback.clear_frames(error.__traceback__)
            raise
        times = {"train_s": result.seconds}

        start = time.perf_counter()
        if not last:  # a swap that nothing uses costs a copy of the model (and vLLM's CPU build refuses an MoE's)
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
            self.directory.write_summary_table()
            log.info("iteration %d: %s", t, summary)
            return summary

        summary = distributed.on_main(summarize, f"iteration {t}'s summary")  # once written: the iteration is done
        self._trained[t] = summary["checkpoint"]
        return summary

    def _default_engine(self, model, tokenizer, config: RunConfig, model_path: str) -> Engine:
        """default_engine, told the longest prompt it answers: under data.cut_prompt when_too_long, vLLM's context."""
        return default_engine(model, tokenizer, config, model_path, longest_prompt=self._longest_prompt)

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
        check_prompts_fit(prompts, sampling.max_new_tokens, self.model_path(t), config, config.data.source,
                          self._origins[_key(config.data, config.data.source, config.data.max_prompts)],
                          end_tokens=len(response_end(tokenizer)))

        def generate_part(start: int, end: int):
            if self.engine is None:  # started at the first prompt left to answer, once per run
                # Under ZeRO the training model ends sharded: no engine may generate with it (None), unless
                # it is sharded from the start (zero3_init), when the transformers engine runs it in step.
                shared = model if self.partitioned or not self.distributed else None
                # The run's settings, not iteration t's: the engine serves every iteration.
                self.engine = self.make_engine(shared, tokenizer, self.config, self.model_path(t))
                # vLLM takes minutes to start: a signal meanwhile stops the ranks here, before this part's
                # generation (its prompts were not begun: nothing is lost), not at the part's end.
                signum = stopping.reached()
                if signum:
                    raise stopping.Stopped(signum, f"as the generation engine started, before prompts {start} to "
                                                   f"{end} of iteration {t} generation", agreed=True)
            part = prompts[start:end]
            completions = distributed.share_work(  # indices in the whole set: they seed sampling
                [request_cost(p, sampling) for p in part],
                lambda mine: self.engine.generate([part[i] for i in mine], sampling,
                                                  indices=[start + i for i in mine]),
                "generated responses")
            pairs = answered_pairs(examples[start:end], completions, response_end(tokenizer), config.data,
                                   bos=tokenizer.bos_token_id)
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
        return load_shared_pairs(scored_file)

    def _score_into(self, scored_file: Path, t: int, model, config: RunConfig) -> None:
        stage_dir = scored_file.parent
        stage_dir.mkdir(parents=True, exist_ok=True)
        sources = {i: self.run_dir / f"iter-{i}" / "generate" / "pairs.jsonl"
                   for i in [t, *range(max(0, t - config.mix_previous), t)]}  # t's pairs first
        mixed, starts = [], {}  # starts: where each iteration's pairs begin in mixed, to name a pair by its row
        for i, source in sources.items():
            pairs = load_shared_pairs(source)
            check_iteration_pairs(pairs, model, config, i)  # each named by its own iteration
            starts[i] = len(mixed)
            mixed += pairs

        def pair_name(k: int) -> str:
            """mixed[k] as the user finds it: its data file and line, and its place in its iteration."""
            i = [i for i, start in starts.items() if start <= k][-1]  # starts grow in mixed's order
            j, data = k - starts[i], self.config.for_iteration(i).data
            rows = self._origins.get(_key(data, data.source, data.max_prompts), [])
            return f"{rows[j]} (iteration {i}'s pair {j})" if j < len(rows) else item_name(f"iteration {i}'s pair", j)

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
            # Before the part is saved (every rank holds the scores): a NaN saved would stop every training run after
            # at a place no row is named by, and the stage, done, would never be scored again.
            for k, (real, generated) in enumerate(scores):
                if not math.isfinite(real + generated):
                    raise ValueError(
                        f"iteration {t} scoring: {pair_name(start + k)}: the opponent θ{t} ({self.model_path(t)}) "
                        f"gives its responses log-probs that are not finite (real {real}, generated {generated}): its "
                        "weights may hold NaN or inf, or its precision overflow. This part is not saved: a run again "
                        f"scores it again (remove {stage_dir / 'parts'} too if the model is changed, to score every "
                        "pair with the same one)")
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

        examples = self.examples(tokenizer, config.data.held_out(), config.data.eval_source)
        result = heldout_loglik(model, examples, config.score_batch_tokens, backend=config.train.backend,
                                progress=config.train.progress, bf16_autocast=config.train.bf16_autocast)
        return {"heldout_loglik_per_token": result["loglik_per_token"]}

    def read(self, data: DataConfig, source: str, limit: int | None = None, where: str = "") -> list[Example]:
        """The examples of `source` read with the data settings `data` (an iteration may override them: `where`
        names the override, read_examples), once."""
        key = _key(data, source, limit)
        if key not in self._read:
            self._read[key] = read_examples(data, source, limit, where)
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
                held_out = self.read(data, eval_source)
                both = rows_found_in(held_out, self.read(*sources[_iteration_of(t)]))
                if both:
                    log.warning("%s: %d of its %d rows are in the training set %s too (the first: %s is %s): the "
                                "held-out figures are not held out for them", eval_source, len(both), len(held_out),
                                data.source, both[0][0].origin, both[0][1].origin)

    def examples(self, tokenizer, data: DataConfig, source: str, limit: int | None = None) -> list[TokenizedExample]:
        """The examples of `source` read and tokenized with the data settings `data`, once (every rank calls it:
        they share the tokenizing)."""
        key = _key(data, source, limit)
        if key not in self._examples:
            rows = self.read(data, source, limit)
            self._digests[key] = rows_digest(rows)
            self._origins[key] = [row.origin for row in rows]
            self._examples[key] = tokenize_examples(tokenizer, data, rows, self.config.train.progress,
                                                    self._digests[key])
        return self._examples[key]

    def model_path(self, t: int) -> str:
        """θt: the SFT model (its folder) for t = 0, else the last checkpoint of iteration t-1's training."""
        return self.sft_folder if t == 0 else self._trained[t - 1]


def load_shared_pairs(path: Path) -> list[ScoredPair]:
    """The pairs rank 0 wrote, read by every rank: a rank that cannot read them (a node's own view of the shared
    filesystem) stops every rank with its error, not rank 0 in its next collective on a closed connection."""
    return distributed.on_every_rank(lambda: load_scored_pairs(path), f"reading {path}")


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


def _deepspeed_error(train, settings) -> str | None:
    """The message of the ConfigError deepspeed_config raises for these settings; None if it accepts them."""
    try:
        deepspeed_config(train, settings, distributed.world_size())
    except ConfigError as error:
        return str(error)
    return None


def _iteration_of(source_key: int | str) -> int:
    """The iteration of a source's key: t (its training data), or "eval t" (held-out rows scored after t's training)."""
    return source_key if isinstance(source_key, int) else int(source_key.split()[1])


def _key(data: DataConfig, source: str, limit: int | None) -> str:
    """What a source's examples are read and tokenized by: the data settings, the source and the limit."""
    return json.dumps([asdict(data), source, limit], sort_keys=True)

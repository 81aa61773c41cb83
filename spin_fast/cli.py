"""The `spin-fast` command: run a whole SPIN experiment, or one stage of it, from one YAML config."""

from __future__ import annotations

import argparse
import contextlib
import logging
import os
import sys
from collections.abc import Callable
from pathlib import Path

DESCRIPTION = """\
spin-fast trains a language model with SPIN (Self-Play Fine-Tuning): in each iteration the model
(the opponent) answers every prompt of an SFT set, then learns to prefer the human answers to its
own. Everything is set in one YAML file (see configs/); any setting can be changed on the command
line with --set section.key=value, e.g. --set train.learning_rate=1e-7.

commands:
  run        all iterations: generate -> score -> train, resuming where a previous run stopped
  sft        plain supervised fine-tuning on the SFT set (the usual starting point and baseline)
  generate   run up to and including one iteration's generation stage
  score      run up to and including one iteration's scoring stage
  train      run up to and including one iteration's training stage
  eval       held-out log-likelihood of the human responses under the SFT model and every finished
             iteration, each iteration's reward margins against its opponent (data.eval_source), and
             the score of greedy answers by data.checker when it is set; --baseline NAME=MODEL adds
             another model (a folder or Hub id), e.g. continued SFT, to the table
"""


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="spin-fast", description=DESCRIPTION,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    # The deepspeed launcher passes each rank --local_rank first; the rank is read from the environment instead.
    parser.add_argument("--local_rank", "--local-rank", type=int, help=argparse.SUPPRESS)
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging, and an error's traceback")
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    helps = {
        "run": "run every iteration (resumes a stopped run: same command, same output_dir)",
        "sft": "supervised fine-tuning on data.source into output_dir/sft",
        "generate": "stop after the generation stage of --iteration",
        "score": "stop after the scoring stage of --iteration",
        "train": "stop after the training stage of --iteration",
        "eval": "evaluate the SFT model and every finished iteration on data.eval_source (what an earlier eval "
                "saved is kept: only new models are evaluated)",
    }
    for name, text in helps.items():
        sub = commands.add_parser(name, help=text, description=text)
        sub.add_argument("config", type=Path, help="YAML config file (the settings of spin_fast.config.RunConfig)")
        sub.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                         help="override a setting, e.g. --set train.beta=0.2 (repeatable)")
        if name in ("generate", "score", "train"):
            sub.add_argument("--iteration", type=int, default=0, help="which iteration (default 0)")
        if name == "eval":
            sub.add_argument("--baseline", dest="baselines", action="append", default=[], metavar="NAME=MODEL",
                             help="evaluate MODEL too (a model folder or Hub id with the SFT model's tokenizer, e.g. "
                                  "a continued-SFT checkpoint) in a row named NAME, its margins against the SFT model "
                                  "on the SFT model's held-out answers (repeatable)")
        # Also after the command; SUPPRESS: absent there, it leaves the value given before the command.
        sub.add_argument("-v", "--verbose", action="store_true", default=argparse.SUPPRESS, help="debug logging")
    args = parser.parse_args(argv)
    # Under a launcher (torchrun, deepspeed) its rank starts each line; the other ranks would repeat rank 0's
    # progress, so they say only warnings and errors (all, with --verbose).
    launched = int(os.environ.get("WORLD_SIZE", "1")) > 1
    rank = f"[rank {os.environ.get('RANK', '?')}] " if launched else ""
    quiet = launched and os.environ.get("RANK", "0") != "0" and not args.verbose
    logging.basicConfig(level=logging.DEBUG if args.verbose else logging.WARNING if quiet else logging.INFO,
                        format=f"%(asctime)s {rank}%(levelname)s %(name)s: %(message)s")

    from spin_fast import distributed, stopping
    from spin_fast.config import load_run_config

    # What a user can fix: a setting (ConfigError), a data row (DataError), a missing file or model, bad YAML, a
    # start without a launcher, a diverged training. One line says which; --verbose adds the traceback. Anything
    # else is a bug and keeps its traceback.
    with data_warnings_silenced(quiet), stopping.signals_handled():
        try:
            distributed.check_launch()
            status = run_command(args, load_run_config(args.config, args.overrides))
        except (stopping.Stopped, Exception) as ended:  # a stop (SIGTERM, SIGUSR1, Ctrl-C), or an error
            return report_end(ended, user_error_message)
    if status == 0:  # after an error the ranks may not all get here: the process group goes with the process
        distributed.shutdown()
    return status


@contextlib.contextmanager
def data_warnings_silenced(silenced: bool):
    """The data's warnings (skipped rows) are the same on every rank: the quiet ranks keep its errors alone, and give
    the logger its level back at the end (main may run inside a longer process: a test, a notebook)."""
    logger = logging.getLogger("spin_fast.data")
    level = logger.level
    if silenced:
        logger.setLevel(logging.ERROR)
    try:
        yield
    finally:
        logger.setLevel(level)


def user_error_message(error: BaseException) -> str | None:
    """The one line saying an error a user can fix (status 2); None for any other, a bug (its traceback stays)."""
    import yaml

    # A diverged training: the settings' or the data's doing, not a bug (no traceback). Only a training raises
    # it: an error before one (a setting's) does not wait for training's imports.
    training = sys.modules.get("spin_fast.training")
    if training is not None and isinstance(error, training.TrainingDiverged):
        return (f"spin-fast: training diverged at {error}: lower train.learning_rate (or check the data and the "
                "starting model) and train again in a new output_dir")
    return f"spin-fast: {error}" if isinstance(error, (ValueError, OSError, yaml.YAMLError)) else None


def report_end(ended: BaseException, error_message: Callable[[BaseException], str | None]) -> int:
    """The exit status of a command `ended` ended, said in one line: a stop (the work its message names is saved),
    or an error a user can fix (`error_message`'s line, status 2). Any other error, a bug, is raised again with its
    traceback. Inside stopping.signals_handled: whether a signal is pending is known there alone."""
    from spin_fast import stopping

    first = stopping.error_before_signal(ended)  # in flight when the first signal came
    log = logging.getLogger("spin_fast.cli")
    if first is not None:
        log.debug("in flight when the signal came", exc_info=first)
    # An error a user can fix, on its way up when the signal came (a launcher's SIGTERM to the other ranks after one
    # failed on bad input), is the end: resuming would not mend it. Any other exception then in flight (a bug's, one
    # a library was handling in an `except`) leaves the signal a stop. Not an OSError: libraries handle their own (a
    # file probed for and missing) in an `except` too often; a ValueError a library handles in the microseconds a
    # signal lands in is taken for the run's (rare: status 2 where the run could resume).
    message = None if first is None or isinstance(first, OSError) else error_message(first)
    # An error the run raised `from` that one (examples.py's row the chat template failed on, named by its row) is
    # the run's own account of it: its line, where it has one. An error the cleanup raised (no `from`) is not.
    if ended.__cause__ is not None and first is not None and stopping.error_before_signal(ended.__cause__) is first:
        message = error_message(ended) or message
        if message is not None:
            log.debug("the error's traceback", exc_info=ended)
    if message is not None:
        print(message, file=sys.stderr)
        return 2
    if isinstance(ended, stopping.Stopped):
        return report_stop(ended)
    if ended is not first:
        log.debug("the error's traceback", exc_info=ended)
    if stopping.pending():  # sent to the process group, the signal ended helpers too (vLLM's engine core): their
        # end surfaced here as an error, before the next safe point (or before any work: a launcher's signal after
        # another rank failed as the run started, which the stop must point to as the Stopped it hid would)
        return report_stop(stopping.Stopped(stopping.pending(), f"({type(ended).__name__}: {ended})", agreed=False,
                                            begun=stopping.work_begun()))
    message = error_message(ended)
    if message is None:
        raise ended
    print(message, file=sys.stderr)
    return 2


def report_stop(stop) -> int:
    """Say where the run stopped (rank 0 alone when every rank stopped at one safe point); the exit status."""
    from spin_fast import distributed

    # Before any work the signal may be the launcher's, ending this rank after another failed as the run started:
    # that error is the one to fix (resuming would fail again). One process has no other rank to point to.
    others = not stop.begun and distributed.launched_distributed()
    advice = "if another rank failed, its error says why; else " if others else ""
    if distributed.is_main() or not stop.agreed:
        print(f"spin-fast: {stop}; {advice}the same command resumes the run", file=sys.stderr)
    if stop.agreed:  # every rank is here
        distributed.shutdown()
    return stop.exit_status


def run_command(args, config) -> int:
    """The command's work; 0, or 2 after an error it has reported."""
    from spin_fast.loading import library_progress_bars

    library_progress_bars(config.train.progress)
    if args.command == "sft":
        return run_sft(config)
    from spin_fast.selfplay import SelfPlay

    if args.command == "eval":
        return run_eval(SelfPlay(config), parse_baselines(args.baselines))

    until = None if args.command == "run" else (args.iteration, args.command)
    if until is not None and not 0 <= args.iteration < config.iterations:
        raise ValueError(f"--iteration {args.iteration}: the run has iterations 0 to {config.iterations - 1} "
                         f"(iterations: {config.iterations})")
    selfplay = SelfPlay(config)
    summaries = selfplay.run(until=until)
    if os.environ.get("RANK", "0") != "0":
        return 0
    for summary in summaries:
        print_row(summary)
    if until is not None and until[1] != "train":  # a stage with no summary line: where its work is
        print(f"iteration {until[0]}'s {until[1]} stage: done, in {selfplay.run_dir / f'iter-{until[0]}' / until[1]}")
    return 0


def print_row(row: dict) -> None:
    """One line of key=value, floats to 4 significant digits."""
    print(" ".join(f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}" for k, v in row.items()))


def parse_baselines(specs: list[str]) -> dict[str, str]:
    """--baseline NAME=MODEL options as {name: model}."""
    from spin_fast.config import home_expanded

    baselines: dict[str, str] = {}
    for spec in specs:
        name, sep, model = spec.partition("=")
        if not sep or not name or not model:
            raise ValueError(f"--baseline {spec!r}: expected NAME=MODEL, e.g. "
                             "continued-sft=runs/my-sft/sft/checkpoint-400")
        if name in baselines:
            raise ValueError(f"--baseline {spec!r}: {name!r} is named twice")
        baselines[name] = home_expanded(model)  # bash expands csft=~/x but not continued-sft=~/x
    return baselines


def run_eval(selfplay, baselines: dict[str, str]) -> int:
    """Evaluate what the run has finished so far, and the baselines; the table also lands in
    output_dir/eval.jsonl. Under a launcher the ranks share the work and rank 0 writes and prints the table."""
    from spin_fast import distributed, locking
    from spin_fast.evaluation import evaluate_run, parts_folder

    source = selfplay.config.data.eval_source
    if not source:
        print("spin-fast: data.eval_source is not set: eval needs held-out (prompt, response) data", file=sys.stderr)
        return 2
    if distributed.launched_distributed():  # for the lock, which rank 0 takes for every rank
        distributed.init(selfplay.config.deepspeed.timeout_minutes)
    output = selfplay.run_dir / "eval.jsonl"
    with contextlib.ExitStack() as claim:  # (the lock makes the folder: a run not started yet has the SFT row alone)
        distributed.on_main(lambda: claim.enter_context(locking.exclusive(selfplay.run_dir, "eval")), "eval's lock")
        rows = evaluate_run(selfplay, source, output=output, baselines=baselines)
    for row in rows if distributed.is_main() else ():
        print_row(row)
    if selfplay.config.data.checker and distributed.is_main():
        print(f"each model's answers, graded: {parts_folder(output)}/answers-<model>.jsonl")
    return 0


def run_sft(config) -> int:
    """SFT on (prompt, human response) with the same packed machinery; the model lands in output_dir/sft."""
    from spin_fast import distributed, locking
    from spin_fast.examples import check_in_vocabulary, read_examples, tokenize_examples
    from spin_fast.generation.choice import check_examples_in_context
    from spin_fast.loading import fetch_model, load_policy
    from spin_fast.model import load_tokenizer
    from spin_fast.packing import Sequence, check_fits
    from spin_fast.run_directory import check_shared, record_start
    from spin_fast.selfplay import check_output_dir
    from spin_fast.stages import config_hash
    from spin_fast.tracking import tracked_name
    from spin_fast.training import Trainer, uses_deepspeed

    for name, value in (("output_dir", config.output_dir), ("model.name_or_path", config.model.name_or_path),
                        ("data.source", config.data.source)):
        if not value:
            raise ValueError(f"{name} is not set: sft needs the model to start from, its data and an output_dir")
    check_output_dir(config.output_dir)
    if uses_deepspeed(config.deepspeed):  # each rank on its own GPU before the model loads
        distributed.init(config.deepspeed.timeout_minutes)
        distributed.check_same_on_every_rank(config_hash(config), "settings")
    with distributed.main_first("the model and data, from the Hub"):
        # First: a missing model is named before its tokenizer fails.
        folder = fetch_model(config.model.name_or_path, revision=config.model.revision or None)
        tokenizer = load_tokenizer(config.model, folder)
        raw = read_examples(config.data, config.data.source, config.data.max_prompts)
    examples = tokenize_examples(tokenizer, config.data, raw, config.train.progress)  # the ranks share the work
    check_in_vocabulary(tokenizer, examples, folder, config.model.trust_remote_code, [e.origin for e in raw])
    sequences = [Sequence(e.prompt_ids, e.response_ids) for e in examples]
    # Named by its row here (the trainer's own check knows only its index); SFT packs each example whole, alone
    # (no pair shares its micro-batch: SPIN's advice says one does).
    check_fits([[s] for s in sequences], False, config.train.micro_batch_tokens, "train.micro_batch_tokens",
               "example", " or cut the data shorter (data.max_length)", names=[e.origin for e in raw])
    check_examples_in_context([s.length for s in sequences], folder, config, [e.origin for e in raw])
    del raw, examples  # training needs the sequences' ids alone, not the text held to its end
    output_dir = Path(config.output_dir)
    starts = output_dir / "sft" / "sessions.jsonl"  # a line per start: every rank must see rank 0's (check_shared)

    def claim_output_dir(claim: contextlib.ExitStack) -> str:
        claim.enter_context(locking.exclusive(output_dir, "sft"))
        return record_start(starts)

    with contextlib.ExitStack() as claim:
        start = distributed.on_main(lambda: claim_output_dir(claim), "sft's lock")
        # Every rank writes its shard of the checkpoints there, and reads rank 0's files when it resumes.
        distributed.on_every_rank(lambda: check_shared(output_dir, starts, start), "output_dir, on every node")
        model = load_policy(folder, config)
        result = Trainer(model, tokenizer, config.train.replace(mode="sft"), output_dir / "sft", sequences,
                         deepspeed=config.deepspeed, name=tracked_name(config.output_dir, "sft"),
                         fits_checked=True).train()  # named by their rows above
    if os.environ.get("RANK", "0") == "0":
        print(f"sft: {result.steps} steps, model in {result.final_dir}")
    return 0


def entry() -> None:
    """The `spin-fast` program (and `python -m spin_fast.cli`): main's status is the exit status (under a launcher,
    without the interpreter's teardown: distributed.leave_with)."""
    from spin_fast.distributed import leave_with

    leave_with(main)


if __name__ == "__main__":
    entry()

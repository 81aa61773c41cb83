"""Whole-iteration profile: where the wall time and the memory of SPIN iterations go, from a short real run.

A small Llama built from a config, the local tokenizer and the demo's sorting task (spin_fast.sorting) go
through `SelfPlay` for 2 + `timed_iterations` iterations (5 in the CPU and GPU presets) with the default engine
(vLLM when installed, else transformers), as `spin-fast run` would run them. Each stage is wrapped and measured:

  engine_start      creating the generation engine (once per run, in iteration 0; vLLM starts its own processes)
  generate          the opponent answers every prompt (engine start not included)
  score             the opponent's log-probs of the pairs of t and t-1, once, no grad (with reading the pairs and
                    writing and reading back the scored ones, as in a run)
  train             the SPIN training of θt+1, checkpoints included
  weight_transfer   θt+1 into the running engine, in memory
  heldout           θt+1's log-likelihood of the held-out rows, where a config sets data.eval_source (a run
                    scores them in every iteration; the built-in task has none)

One worker process runs the whole run, memory first (as bench.common.memory_then_time does for a step):
iterations 0 and 1 under bench.common.worker_env()'s exact-RSS allocator give each stage's peak memory in the
training process (CUDA allocator peak, or the process's peak RSS reset at the stage's start) and the resident
memory of the engine's own processes (vLLM's engine core and workers), which the training process's figures do not
include; then glibc's ordinary allocator, and each of the iterations from 2 on times every stage once: a stage's
seconds are the median of those iterations (min and max beside it) and its share is its median over the sum of
the stages' medians. Every iteration from 1 on is the steady state (each trains on the pairs of t and t-1, as
many), and iterations 0 and 1 are the timed ones' warm-up; the engine's start is timed once, in iteration 0 (its
processes start with glibc's ordinary allocator). Run: python -m bench.iteration [--preset cpu|gpu].

Your own run: --config run.yaml [--set key=value ...] profiles that config (its model, data, engine and settings)
the same way instead of the built-in task, in a temporary output_dir (yours is not touched, and no W&B run is made)
for as many iterations, into iteration-<preset>-custom.json, its log shown as it runs. It runs in one process, as
`spin-fast run` without torchrun: the model has to fit one device. --set data.max_prompts=N keeps it short; the run
keeps every iteration's model in the temporary folder until it ends (the folder goes then, or on Ctrl-C).

Host memory of the pairs held (held_pairs_memory): every rank holds the iteration's scored pairs from scoring to
the end of training, as load_scored_pairs reads them. The bench writes `held_pairs` pairs of 1,200 tokens (a
200-token prompt and two 500-token responses, ids drawn uniformly from a 32,000-token vocabulary: the fewest ids
shared, the worst case for SharedIds) and reads them back under tracemalloc: bytes held per token, against
the same pairs with an int object per token (json's lists made tuples, as a reader without SharedIds holds them).
tracemalloc counts every byte Python allocates, so one read gives the exact figure. The GPU preset leaves it out
(see Preset.held_pairs).
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import statistics
import sys
import tempfile
import time
import tracemalloc
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

from bench.common import (
    cell,
    format_table,
    machine_info,
    ordinary_allocator,
    ordinary_allocator_for_new_processes,
    peak_extra_memory_mib,
    publish,
    refuse_gpu_preset_without_cuda,
    run_worker,
    save_partial,
    synchronize,
)

STAGES = ("engine_start", "generate", "score", "train", "weight_transfer")
HELDOUT = "heldout"  # a stage of the runs whose config sets data.eval_source alone
MEMORY_ITERATIONS = (0, 1)  # under the exact-RSS allocator the worker starts with
FIRST_TIMED_ITERATION = 2  # this one and those after it are timed, under glibc's ordinary allocator


@dataclass(frozen=True)
class Preset:
    name: str
    hidden: int
    layers: int
    heads: int
    prompts: int
    max_new_tokens: int
    global_batch: int
    micro_batch_tokens: int
    dtype: str
    # Steady iterations timed after the memory ones: each stage's seconds are their median.
    timed_iterations: int
    # Pairs in the host-memory figure (held_pairs_memory). 0 in the GPU preset: the figure is the host's
    # Python objects, the same on any machine, and the GPU machine's minutes are for what only it shows.
    held_pairs: int


PRESETS = {
    # 2 cores: vLLM's start (~30 s) and 5 iterations of ~5-8 s: about 1.5 minutes with the process.
    "cpu": Preset("cpu", hidden=256, layers=4, heads=8, prompts=64, max_new_tokens=32, global_batch=32,
                  micro_batch_tokens=2048, dtype="float32", timed_iterations=3, held_pairs=2000),
    # One H200, slot 85 s in bench/gpu/check.sh: a ~0.34B-parameter Llama in bf16, 256 prompts, 5 iterations. Without
    # vLLM (not on that machine) transformers generates: 4 batches of 64 x 64 decoding steps at ~15 ms (Python-bound)
    # ~4 s an iteration; training 4 then 8 steps of 64 pairs (~8k tokens, ~2e13 FLOP: < 0.1 s of matmuls each, a
    # few tenths of a second with packing and the optimizer) plus a checkpoint (~1.4 GB) each; scoring < 1 s. With the
    # process (~10 s: imports, CUDA context, building and saving the model): about 65 s.
    "gpu": Preset("gpu", hidden=2048, layers=8, heads=16, prompts=256, max_new_tokens=64, global_batch=64,
                  micro_batch_tokens=16384, dtype="bfloat16", timed_iterations=3, held_pairs=0),
    "tiny": Preset("tiny", hidden=64, layers=2, heads=2, prompts=16, max_new_tokens=8, global_batch=8,
                   micro_batch_tokens=512, dtype="float32", timed_iterations=2, held_pairs=20),
}


HELD_PROMPT_TOKENS, HELD_RESPONSE_TOKENS, HELD_VOCAB = 200, 500, 32000


def held_pairs_memory(pairs: int, seed: int = 0) -> dict:
    """Bytes per token of `pairs` scored pairs read as a run holds them (load_scored_pairs), and with an int object
    per token; see the module's docstring."""
    from spin_fast.scoring import ScoredPair, load_scored_pairs, save_scored_pairs

    generator = torch.Generator().manual_seed(seed)

    def ids(length: int) -> tuple[int, ...]:
        return tuple(torch.randint(HELD_VOCAB, (length,), generator=generator).tolist())

    def unshared(path: Path) -> list[ScoredPair]:
        with path.open() as lines:
            return [ScoredPair(tuple(r["prompt_ids"]), tuple(r["real_ids"]), tuple(r["generated_ids"]),
                               r["opponent_real"], r["opponent_generated"]) for r in map(json.loads, lines)]

    def held_bytes(read, path: Path) -> int:
        gc.collect()
        tracemalloc.start()
        try:
            before = tracemalloc.get_traced_memory()[0]
            held = read(path)  # noqa: F841 - held while the memory is counted
            return tracemalloc.get_traced_memory()[0] - before
        finally:
            tracemalloc.stop()

    made = [ScoredPair(ids(HELD_PROMPT_TOKENS), ids(HELD_RESPONSE_TOKENS), ids(HELD_RESPONSE_TOKENS), -1.0, -2.0)
            for _ in range(pairs)]
    tokens = pairs * (HELD_PROMPT_TOKENS + 2 * HELD_RESPONSE_TOKENS)
    distinct = len({i for p in made for part in (p.prompt_ids, p.real_ids, p.generated_ids) for i in part})
    with tempfile.TemporaryDirectory(prefix="spin-bench-held-") as folder:
        path = Path(folder) / "scored.jsonl"
        save_scored_pairs(path, made)
        del made
        shared, plain = held_bytes(load_scored_pairs, path) / tokens, held_bytes(unshared, path) / tokens
    return {"pairs": pairs, "tokens": tokens, "vocab": HELD_VOCAB, "distinct_ids": distinct, "bytes_per_token": shared,
            "bytes_per_token_int_per_token": plain, "memory_vs_int_per_token": shared / plain}


def _descendants(pid: int) -> list[int]:
    found = []
    for task in Path(f"/proc/{pid}/task").glob("*"):
        try:
            children = (task / "children").read_text().split()
        except OSError:
            continue
        for child in map(int, children):
            found += [child, *_descendants(child)]
    return found


def engine_rss_mib() -> float:
    """Peak resident memory (VmHWM) of this process's descendants: the engine's processes."""
    total = 0.0
    for pid in _descendants(os.getpid()):
        try:
            status = Path(f"/proc/{pid}/status").read_text()
        except OSError:
            continue
        for line in status.splitlines():
            if line.startswith("VmHWM:"):
                total += int(line.split()[1]) / 1024
    return total


def profiled_selfplay(config, on_record=None):
    """A SelfPlay whose stages record their peak memory in the memory iterations (selfplay.records["memory"]) and
    their seconds in the timed ones (records["time"]); the engine's start is timed wherever it happens.
    on_record(selfplay), when given, is called after each stage's record."""
    from spin_fast.selfplay import SelfPlay

    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")

    class Profiled(SelfPlay):
        def measured(self, stage: str, call):
            key = f"iter-{self.current}/{stage}"
            timed_here = self.current >= FIRST_TIMED_ITERATION or stage == "engine_start"
            result = []

            def timed():
                start = time.perf_counter()
                result.append(call())
                synchronize(device)
                if timed_here:
                    self.records["time"][key] = time.perf_counter() - start

            if self.current >= FIRST_TIMED_ITERATION:
                gc.collect()
                timed()
            else:  # the timing inside the memory measurement: its set-up (gc, emptying the cache) stays outside
                self.records["memory"][key] = peak_extra_memory_mib(timed, device)
                if stage == "generate":
                    self.records["memory"][f"iter-{self.current}/engine_rss"] = engine_rss_mib()
            if on_record is not None:
                on_record(self)
            return result[0]

        def iteration(self, t, *args, **kwargs):
            self.current = t
            if t == FIRST_TIMED_ITERATION:
                ordinary_allocator()
            # Every timed iteration stands for one of a longer run's steady state, which swaps its weights in: the
            # profile's last one too (a run's last leaves them out, for nothing generates with them)
            return super().iteration(t, *args, **{**kwargs, "last": False})

        def generate(self, *args, **kwargs):
            return self.measured("generate", lambda: super(Profiled, self).generate(*args, **kwargs))

        def score(self, *args, **kwargs):
            return self.measured("score", lambda: super(Profiled, self).score(*args, **kwargs))

        def train(self, *args, **kwargs):
            return self.measured("train", lambda: super(Profiled, self).train(*args, **kwargs))

        def transfer_weights(self, *args, **kwargs):
            return self.measured("weight_transfer", lambda: super(Profiled, self).transfer_weights(*args, **kwargs))

        def heldout(self, model, tokenizer, config):
            if not config.data.eval_source:  # nothing scored: no stage
                return super().heldout(model, tokenizer, config)
            # Part of every iteration of such a run: left out, the other stages' shares would be too large.
            return self.measured(HELDOUT, lambda: super(Profiled, self).heldout(model, tokenizer, config))

    selfplay = Profiled(config)
    selfplay.records = {"time": {}, "memory": {}}
    selfplay.current = 0
    selfplay.engine_name = None  # the engine's class: the run closes and drops the engine at its end

    def make_engine(*args):
        # The run's own default (SelfPlay._default_engine): told the longest prompt, which under data.cut_prompt
        # when_too_long is vLLM's max_model_len, not the model's whole context
        engine = selfplay.measured("engine_start", lambda: selfplay._default_engine(*args))
        selfplay.engine_name = type(engine).__name__
        return engine

    selfplay.make_engine = make_engine
    return selfplay


def builtin_config(preset: Preset, engine: str | None, workdir: Path):
    """The built-in task's RunConfig (a model saved into workdir) and the model's parameters in millions."""
    from transformers import AutoModelForCausalLM

    from spin_fast.config import load_run_config
    from spin_fast.model import tiny_config
    from spin_fast.sorting import make_splits, write_jsonl
    from spin_fast.tokenizer import build_local_tokenizer

    rows, _ = make_splits(preset.prompts, 0, seed=0)
    write_jsonl(workdir / "train.jsonl", rows)
    tokenizer = build_local_tokenizer([r["prompt"] + " " + r["response"] for r in rows], vocab_size=400)
    torch.manual_seed(0)
    model_config = tiny_config("llama", vocab_size=len(tokenizer), hidden_size=preset.hidden, layers=preset.layers,
                               heads=preset.heads)
    model = AutoModelForCausalLM.from_config(model_config)
    parameters_m = sum(p.numel() for p in model.parameters()) / 1e6
    model.save_pretrained(workdir / "model")
    del model  # the run loads θ0 from disk, as `spin-fast run` does
    tokenizer.save_pretrained(workdir / "model")
    config = load_run_config(None, [
        f"model.name_or_path={workdir / 'model'}",
        f"data.source={workdir / 'train.jsonl'}", "data.max_length=96", "data.max_prompt_length=64",
        f"generation.max_new_tokens={preset.max_new_tokens}", "generation.batch_size=64",
        f"generation.engine={engine or 'auto'}",
        f"train.global_batch={preset.global_batch}", f"train.micro_batch_tokens={preset.micro_batch_tokens}",
        "train.epochs=1", f"train.dtype={preset.dtype}", "train.learning_rate=1e-5", "train.progress=false",
        f"score_batch_tokens={4 * preset.micro_batch_tokens}", *profile_settings(preset, workdir),
    ])
    return config, parameters_m


def user_config(preset: Preset, path: str, sets: list[str], engine: str | None, workdir: Path):
    """One's own run config (and --set overrides) as the profile runs it, and the model's parameters in millions
    (counted on the meta device)."""
    from transformers import AutoConfig, AutoModelForCausalLM

    from spin_fast.config import load_run_config

    config = load_run_config(path, [*sets, *profile_settings(preset, workdir),
                                    *([f"generation.engine={engine}"] if engine else [])])
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(AutoConfig.from_pretrained(config.model.name_or_path))
    return config, sum(p.numel() for p in model.parameters()) / 1e6


def profile_settings(preset: Preset, workdir: Path) -> list[str]:
    """What the profile sets in any config: its run in workdir (never one's own output_dir), as many iterations
    as it measures, and no Weights & Biases run (a profile is not one of one's experiments)."""
    return [f"output_dir={workdir / 'run'}", f"iterations={FIRST_TIMED_ITERATION + preset.timed_iterations}",
            "train.wandb=false"]


def custom_argv(config_path: str | None, sets: list[str], engine: str | None) -> list[str]:
    """The options that make a profile other than the preset's own (recorded in its report as "custom"): one's
    config and its settings, another engine; [] for the built-in task as the preset runs it."""
    own = [] if config_path is None else ["--config", config_path, *(item for s in sets for item in ("--set", s))]
    return [*own, *(["--engine", engine] if engine else [])]


def result_name(preset: Preset, custom: list[str]) -> str:
    return f"iteration-{preset.name}{'-custom' if custom else ''}"


def worker(preset: Preset, engine: str | None, workdir: str | None = None, config_path: str | None = None,
           sets: list[str] = ()) -> dict:
    """The profile's result, its run in workdir (a temporary folder of its own when None)."""
    if workdir is None:
        with tempfile.TemporaryDirectory(prefix="spin-bench-iteration-") as folder:  # its checkpoints go with it
            return worker(preset, engine, folder, config_path, sets)
    return profile(preset, engine, config_path, list(sets), Path(workdir))


def profile(preset: Preset, engine: str | None, config_path: str | None, sets: list[str], workdir: Path) -> dict:
    if config_path is None:
        config, parameters_m = builtin_config(preset, engine, workdir)
    else:
        config, parameters_m = user_config(preset, config_path, sets, engine, workdir)
    custom = custom_argv(config_path, sets, engine)
    # The engine's processes start with glibc's ordinary allocator: they are timed too, and only their resident
    # size is read. This process keeps the exact-RSS one it started with until the timed iteration.
    ordinary_allocator_for_new_processes()
    # The pairs' host memory does not depend on the run's config: measured in the built-in task's profile alone.
    builtin_task = config_path is None
    held = held_pairs_memory(preset.held_pairs) if preset.held_pairs and builtin_task else None
    machine = machine_info(torch.device("cuda" if torch.cuda.is_available() else "cpu"))

    def result_of(selfplay, summaries=()) -> dict:
        return {**selfplay.records, "engine": selfplay.engine_name, "pairs": [s["pairs"] for s in summaries],
                "parameters_m": parameters_m, "held_pairs": held, "machine": machine}

    def save_progress(selfplay) -> None:  # a run that a time limit cuts off (bench/gpu/check.sh) keeps its stages
        save_partial(result_name(preset, custom), report_of(preset, result_of(selfplay), custom))

    selfplay = profiled_selfplay(config, on_record=save_progress)
    summaries = selfplay.run()
    return result_of(selfplay, summaries)


def report_of(preset: Preset, result: dict, custom: list[str] = ()) -> dict:
    return {"bench": "iteration", "preset": asdict(preset), "custom": list(custom), **result,
            "rows": profile_rows(result)}


def _iteration_of(key: str) -> int:
    return int(key.split("/")[0].removeprefix("iter-"))


def profile_rows(result: dict) -> list[dict]:
    """The engine's start (once per run), then one row per stage of the steady state: the median of its seconds
    over the timed iterations (min, max and the iterations beside it), its share (its median over the sum of the
    stages' medians) and its peak MiB in the last memory iteration. A run cut off midway has rows for the stages
    it timed, each over the iterations that timed it."""
    time_of, memory_of = result["time"], result.get("memory", {})
    rows = []
    if "iter-0/engine_start" in time_of:
        once = time_of["iter-0/engine_start"]
        rows.append({"stage": "engine_start", "iterations": [0], "seconds": once, "min": once, "max": once,
                     "share": None, "peak_extra_mib": memory_of.get("iter-0/engine_start"), "memory_iteration": 0})
    timed = sorted({_iteration_of(k) for k in time_of if _iteration_of(k) >= FIRST_TIMED_ITERATION})
    samples = {s: {t: time_of[f"iter-{t}/{s}"] for t in timed if f"iter-{t}/{s}" in time_of}
               for s in (*STAGES, HELDOUT)}
    median_of = {s: statistics.median(by_t.values()) for s, by_t in samples.items() if by_t}
    total = sum(median_of.values())
    steady = MEMORY_ITERATIONS[-1]
    for stage, seconds in median_of.items():
        rows.append({"stage": stage, "iterations": list(samples[stage]), "seconds": seconds,
                     "min": min(samples[stage].values()), "max": max(samples[stage].values()),
                     "share": seconds / total, "peak_extra_mib": memory_of.get(f"iter-{steady}/{stage}"),
                     "memory_iteration": steady})
    return rows


def summary_table(result: dict) -> str:
    headers = ["stage", "seconds", "min-max", "share of iteration", "peak extra MiB (trainer)"]
    table = [[r["stage"] + (" (once per run)" if r["share"] is None else ""), f"{r['seconds']:.2f}",
              "-" if r["share"] is None else f"{r['min']:.2f}-{r['max']:.2f}",
              "-" if r["share"] is None else f"{100 * r['share']:.0f}%",
              cell(r, "peak_extra_mib", ".0f")] for r in result["rows"]]
    steady = MEMORY_ITERATIONS[-1]
    timed = sorted({t for r in result["rows"] if r["share"] is not None for t in r["iterations"]})
    which = f"median of iterations {', '.join(map(str, timed))}" if timed else "no timed iteration"
    note = (f"seconds: {which}; memory: iteration {steady} (engine start: iteration 0); "
            f"engine: {result['engine']}")
    engine = result.get("memory", {}).get(f"iter-{steady}/engine_rss")
    if engine:
        note += f", its processes' peak RSS {engine:.0f} MiB (not in the trainer's figures)"
    held = result.get("held_pairs")
    if held:
        note += (f"\nscored pairs held per rank: {held['bytes_per_token']:.1f} bytes a token, "
                 f"{held['bytes_per_token_int_per_token']:.1f} with an int per token "
                 f"({held['pairs']} pairs, {held['tokens']} tokens)")
    return format_table(headers, table) + "\n" + note + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter,
                                     allow_abbrev=False)
    parser.add_argument("--preset", choices=sorted(PRESETS), default=None, help="default: gpu with CUDA, else cpu")
    parser.add_argument("--engine", choices=("auto", "vllm", "transformers"), default=None,
                        help="generation engine (default: vLLM when installed; with --config, the config's); "
                        "given, the profile goes into iteration-<preset>-custom.json")
    parser.add_argument("--config", metavar="FILE", help="profile your own run config (its model, data and "
                        "settings) instead of the built-in task, in a temporary output_dir, for 2 + the preset's "
                        "timed iterations, into iteration-<preset>-custom.json; --set data.max_prompts=N keeps it "
                        "short. One process: no torchrun")
    parser.add_argument("--set", dest="sets", action="append", default=[], metavar="KEY=VALUE",
                        help="override a setting of --config, as spin-fast run --set does")
    parser.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--workdir", help=argparse.SUPPRESS)  # the worker's, made and removed by its parent
    args = parser.parse_args(argv)
    refuse_gpu_preset_without_cuda(parser, args.preset)
    preset = PRESETS[args.preset or ("gpu" if torch.cuda.is_available() else "cpu")]
    if args.sets and args.config is None:
        parser.error("--set changes a setting of --config: give --config FILE too")
    if args.worker:
        print(json.dumps(worker(preset, args.engine, args.workdir, args.config, args.sets)))
        return 0
    if args.workdir is not None:
        parser.error("--workdir is the worker's own option")
    custom = custom_argv(args.config, args.sets, args.engine)
    own_config = args.config is not None
    if own_config:
        from spin_fast.config import ConfigError, load_run_config

        try:  # a bad setting is named here, before a worker starts
            load_run_config(args.config, args.sets)
        except ConfigError as error:
            print(f"iteration profile: {error}", file=sys.stderr)
            return 2
    # One's own config may run for hours: no time limit, and its log (progress bars too) shows as it goes. The
    # run's folder is this process's, so that it goes (checkpoints and all) even when Ctrl-C kills the worker.
    with tempfile.TemporaryDirectory(prefix="spin-bench-iteration-") as workdir:
        result = run_worker("bench.iteration", ["--preset", preset.name, *custom, "--workdir", workdir],
                            timeout=None if own_config else 3600, show_output=own_config)
    if "error" in result:
        print(f"iteration profile failed: {result['error']}", file=sys.stderr)
        print("\n".join(result["output_tail"]), file=sys.stderr)
        return 1
    report = report_of(preset, result, custom)
    publish(result_name(preset, custom), report, summary_table(report))
    return 0


if __name__ == "__main__":
    sys.exit(main())

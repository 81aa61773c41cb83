"""`make demo`: a whole, real SPIN experiment on a small built-in task, on the CPU, with nothing downloaded.

    python -m spin_fast.demo [--config configs/demo.yaml] [--output DIR] [--set key=value ...] [--verbose]

Stages, each resumable (a stage whose manifest exists is done and is skipped on a rerun):

    data/            the sorting task (spin_fast.sorting), train.jsonl and eval.jsonl, from a fixed seed
    base/            a tokenizer trained on the task's text and a randomly initialised small Llama
    sft/             SFT of the base model on the whole training split: the SFT model θ0
    spin/            `iterations` SPIN iterations from θ0 on the first data.max_prompts training prompts
                     (spin_fast.selfplay: generate -> score -> train -> hot-swap)
    continued-sft/   the paper's baseline: SFT from θ0 on the same prompts for as many optimizer steps as
                     SPIN took in all, with SPIN's optimizer settings (only the objective differs)
    eval/            every model on the held-out prompts: the checker's score of greedy answers, the
                     log-likelihood of the human responses, reward margins (spin_fast.evaluation), in
                     eval.jsonl; eval-parts/ keeps each model's graded answers (answers-<model>.jsonl)
    results.md, results.jsonl, training_curves.png, scores.png   the report, rebuilt on every run

The config is a RunConfig YAML plus a `demo:` mapping for what RunConfig does not hold (task and model
size, the SFT stage's settings).
"""

from __future__ import annotations

import argparse
import json
import logging
import shutil
import sys
import time
from dataclasses import dataclass, field, fields, is_dataclass
from pathlib import Path

import yaml

from spin_fast import locking
from spin_fast.config import (
    ConfigError,
    RunConfig,
    TrainConfig,
    build_config,
    differing_settings,
    expanded_under_another_home,
    from_dict,
    paths_as_now,
    read_config_file,
    saved_under_another_home,
    section_settings,
    warn_of_unused_overrides,
)
from spin_fast.files import write_atomically
from spin_fast.sorting import distinct_lists

log = logging.getLogger("spin_fast.demo")
DEFAULT_CONFIG = Path(__file__).resolve().parent.parent / "configs" / "demo.yaml"
STAGES = ("data", "base", "sft", "spin", "continued-sft", "eval")


# ---------------------------------------------------------------------------------------------- settings
@dataclass
class TaskSettings:
    n_train: int = 3000
    n_eval: int = 500
    seed: int = 0
    min_items: int = 4
    max_items: int = 7
    max_value: int = 99

    def __post_init__(self) -> None:
        for name in ("n_train", "n_eval", "min_items", "max_value"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        if not self.min_items <= self.max_items <= self.max_value + 1:  # a list's numbers are distinct, 0..max_value
            raise ValueError(f"the lists' lengths need min_items <= max_items <= max_value + 1, got {self.min_items}, "
                             f"{self.max_items} and {self.max_value}")
        lists = distinct_lists(self.min_items, self.max_items, self.max_value)
        if lists < self.n_train + self.n_eval:  # the held-out lists are ones training does not have
            raise ValueError(f"the task has {lists} distinct lists ({self.min_items} to {self.max_items} numbers up to "
                             f"{self.max_value}), fewer than n_train + n_eval = {self.n_train + self.n_eval}")


@dataclass
class ModelSettings:
    vocab_size: int = 400  # BPE trained on the task's text
    hidden_size: int = 128
    layers: int = 4
    heads: int = 4  # head dim hidden_size / heads: >= 32 for the vLLM CPU build
    seed: int = 0

    def __post_init__(self) -> None:
        for name in ("vocab_size", "hidden_size", "layers", "heads"):
            if not getattr(self, name) >= 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)!r}")
        from spin_fast.tokenizer import SPECIAL_TOKENS

        # The base stage's byte-level BPE needs these: refused here, naming the setting, not after the data stage.
        if self.vocab_size < 256 + len(SPECIAL_TOKENS):
            raise ValueError(f"vocab_size must be at least {256 + len(SPECIAL_TOKENS)} (256 bytes + special tokens), "
                             f"got {self.vocab_size}")
        if self.hidden_size % self.heads or self.hidden_size // self.heads < 32:
            raise ValueError(f"hidden_size / heads must be a whole number >= 32 (vLLM's CPU build refuses smaller "
                             f"heads), got {self.hidden_size} / {self.heads}")


@dataclass
class DemoSettings:
    task: TaskSettings = field(default_factory=TaskSettings)
    model: ModelSettings = field(default_factory=ModelSettings)
    sft: dict = field(default_factory=dict)  # TrainConfig settings of the SFT stage, over the run's `train`
    continued_sft: dict = field(default_factory=dict)  # likewise for the baseline (default: SPIN's own)


# The demo's own settings, where an unknown key's error looks for it (--set n_train=5: demo.task.n_train).
DEMO_SETTINGS = [f"demo.{s.name}" for s in fields(DemoSettings)] + [
    f"demo.{s.name}.{f.name}" for s in fields(DemoSettings) if is_dataclass(s.default_factory)
    for f in fields(s.default_factory)]


def load_demo_config(path: str | Path, overrides: list[str] = (), output: str | None = None
                     ) -> tuple[RunConfig, DemoSettings]:
    """The run's RunConfig and the demo's own settings (its `demo` section) from one YAML file, then key=value
    overrides (`demo.` keys go to the demo's settings); an error names the file's line or the --set option."""
    loaded, text = read_config_file(path)
    return build_config(lambda settings: _demo_configs(settings, output), loaded, overrides, path, text)


def _demo_configs(settings: dict, output: str | None) -> tuple[RunConfig, DemoSettings]:
    demo_data = section_settings(settings.pop("demo", None), "demo")
    if output is not None:
        settings["output_dir"] = output
    run_dir = Path(settings.get("output_dir") or "runs/demo")
    data, model = (section_settings(settings.get(name), name) for name in ("data", "model"))
    # Where the demo puts things; a config may not point them elsewhere.
    settings["data"] = {**data, "source": str(run_dir / "data" / "train.jsonl"),
                        "eval_source": str(run_dir / "data" / "eval.jsonl")}
    settings["model"] = {**model, "name_or_path": str(run_dir / "sft" / "model")}
    settings["output_dir"] = str(run_dir / "spin")
    config = from_dict(RunConfig, settings, places=DEMO_SETTINGS)
    warn_of_unused_overrides(config)
    demo = from_dict(DemoSettings, demo_data, prefix="demo.", places=DEMO_SETTINGS)
    if "epochs" in demo.continued_sft:  # refused, not set to 1 without a word (stage_continued_sft)
        raise ConfigError("demo.continued_sft.epochs: the baseline trains exactly as many optimizer steps as SPIN "
                          "took, in one pass over its prompts repeated to fill them: leave its epochs out",
                          "demo.continued_sft.epochs")
    stage_config(config, demo.sft, "demo.sft")
    stage_config(config, demo.continued_sft, "demo.continued_sft")
    return config, demo


def stage_config(config: RunConfig, changes: dict, name: str) -> TrainConfig:
    """An SFT TrainConfig: the run's `train` with a stage's changes, checked like any setting."""
    if changes.get("mode", "sft") != "sft":  # the SFT stages train on (prompt, response) alone: no pairs to prefer
        raise ConfigError(f"{name}.mode: the {name.removeprefix('demo.')} stage is SFT: leave its mode out, got "
                          f"{changes['mode']!r}", f"{name}.mode")
    return from_dict(TrainConfig, {**config.train.to_dict(), "mode": "sft", **changes}, prefix=f"{name}.",
                     places=DEMO_SETTINGS)


# -------------------------------------------------------------------------------------------- the stages
class Demo:
    def __init__(self, config: RunConfig, demo: DemoSettings):
        self.config, self.demo = config, demo
        self.run_dir = Path(config.output_dir).parent

    def run(self, until: str | None = None) -> list[dict]:
        """Every stage not done yet, then the report; or the stages up to and including `until`."""
        if until is not None and until not in STAGES:
            raise ValueError(f"until must be one of {STAGES}, got {until!r}")
        with locking.exclusive(self.run_dir, "demo"):  # (which makes the folder)
            return self._run_stages(until)

    def _run_stages(self, until: str | None) -> list[dict]:
        self._check_same_settings()
        start = time.perf_counter()
        for number, stage in enumerate(STAGES, 1):
            done = self.manifest(stage)
            if done is not None:
                log.info("[%d/%d] %s: done before (%.0f s), skipped", number, len(STAGES), stage,
                         done["seconds"])
                if stage == until:
                    return []
                continue
            log.info("[%d/%d] %s ...", number, len(STAGES), stage)
            began = time.perf_counter()
            fields = getattr(self, "stage_" + stage.replace("-", "_"))()
            self.write_manifest(stage, seconds=time.perf_counter() - began, **fields)
            if stage == until:
                return []
        rows = self.report()
        log.info("demo finished in %.0f s (this run); results in %s", time.perf_counter() - start, self.run_dir)
        return rows

    # Each stage returns the fields of its manifest, written once its outputs are complete.
    def stage_data(self) -> dict:
        from spin_fast.sorting import make_splits, write_jsonl

        task = self.demo.task
        train, held_out = make_splits(task.n_train, task.n_eval, seed=task.seed, min_items=task.min_items,
                                      max_items=task.max_items, max_value=task.max_value)
        (self.run_dir / "data").mkdir(exist_ok=True)
        write_jsonl(self.config.data.source, train)
        write_jsonl(self.config.data.eval_source, held_out)
        return {"train": len(train), "eval": len(held_out)}

    def stage_base(self) -> dict:
        import torch
        from transformers import AutoModelForCausalLM

        from spin_fast.data import load_examples
        from spin_fast.model import tiny_config
        from spin_fast.tokenizer import build_local_tokenizer

        settings, data, generation = self.demo.model, self.config.data, self.config.generation
        examples = load_examples(data.source).examples
        tokenizer = build_local_tokenizer([e.prompt[-1]["content"] + " " + e.response for e in examples],
                                          vocab_size=settings.vocab_size)
        positions = max(data.max_length, data.max_prompt_length + generation.max_new_tokens)
        model_config = tiny_config("llama", vocab_size=len(tokenizer), hidden_size=settings.hidden_size,
                                   layers=settings.layers, heads=settings.heads, max_positions=positions)
        # The tokenizer's, not Llama's defaults (1, 2: its <|eos|> and <|pad|>), which generate() would stop at.
        model_config.bos_token_id, model_config.eos_token_id = tokenizer.bos_token_id, tokenizer.eos_token_id
        torch.manual_seed(settings.seed)
        model = AutoModelForCausalLM.from_config(model_config)
        model.save_pretrained(self.run_dir / "base")
        tokenizer.save_pretrained(self.run_dir / "base")
        return {"parameters": sum(p.numel() for p in model.parameters()), "vocab_size": len(tokenizer)}

    def stage_sft(self) -> dict:
        """θ0: SFT on the whole training split (SPIN later uses the first data.max_prompts of it)."""
        import torch

        from spin_fast.training import STATE_FILE

        theta0 = Path(self.config.model.name_or_path)
        if (theta0 / STATE_FILE).exists():  # a kill after the rename below: θ0 is trained, and goes back to be found
            step = torch.load(theta0 / STATE_FILE, map_location="cpu", weights_only=False)["step"]
            theta0.rename(self.run_dir / "sft" / f"checkpoint-{step}")
        shutil.rmtree(theta0, ignore_errors=True)  # anything else there is not θ0
        result = self.train_sft(self.run_dir / "base", self.run_dir / "sft",
                                stage_config(self.config, self.demo.sft, "demo.sft"), limit=None)
        # A fixed path for θ0, whatever the step count: the run config points at it.
        result.final_dir.rename(theta0)
        return {"steps": result.steps, "checkpoint": self.config.model.name_or_path}

    def stage_spin(self) -> dict:
        from spin_fast.selfplay import SelfPlay

        summaries = SelfPlay(self.config).run()
        return {"steps": sum(s["steps"] for s in summaries), "iterations": len(summaries)}

    def stage_continued_sft(self) -> dict:
        """The baseline: SFT from θ0 on SPIN's prompts, exactly as many optimizer steps as SPIN took."""
        steps = self.manifest("spin")["steps"]
        config = stage_config(self.config, self.demo.continued_sft, "demo.continued_sft").replace(epochs=1)
        result = self.train_sft(self.config.model.name_or_path, self.run_dir / "continued-sft", config,
                                limit=self.config.data.max_prompts, steps=steps)
        if result.steps != steps:
            raise RuntimeError(f"continued SFT took {result.steps} steps, SPIN {steps}")
        return {"steps": result.steps, "checkpoint": str(result.final_dir)}

    def stage_eval(self) -> dict:
        from spin_fast.evaluation import evaluate_run
        from spin_fast.selfplay import SelfPlay
        from spin_fast.stages import checkpoint_at

        (self.run_dir / "eval").mkdir(exist_ok=True)
        # Where the baseline is now: the directory may have moved since (--output ~/x under another $HOME).
        baseline = checkpoint_at(self.run_dir / "continued-sft", self.manifest("continued-sft")["checkpoint"])
        rows = evaluate_run(SelfPlay(self.config), self.config.data.eval_source,
                            output=self.run_dir / "eval" / "eval.jsonl", baselines={"continued-sft": baseline})
        return {"models": [row["model"] for row in rows]}

    def train_sft(self, model_path, output_dir: Path, config: TrainConfig, limit: int | None,
                  steps: int | None = None):
        """SFT with the packed trainer; with `steps`, on the examples repeated to fill exactly that many
        steps of config.global_batch (one epoch over the repeats, shuffled by the trainer)."""
        from spin_fast.examples import tokenized_examples
        from spin_fast.loading import load_policy
        from spin_fast.model import load_tokenizer
        from spin_fast.packing import Sequence
        from spin_fast.training import Trainer

        # The run's model settings: with model.chat_template, θ0 and the baseline learn the format SPIN's prompts have.
        tokenizer = load_tokenizer(self.config.model, str(model_path))
        examples = tokenized_examples(tokenizer, self.config.data, self.config.data.source, limit)
        sequences = [Sequence(e.prompt_ids, e.response_ids) for e in examples]
        if steps is not None:
            sequences = [sequences[i % len(sequences)] for i in range(steps * config.global_batch)]
        model = load_policy(str(model_path), self.config)
        return Trainer(model, tokenizer, config, output_dir, sequences).train()

    # ------------------------------------------------------------------------------------- manifests
    def manifest(self, stage: str) -> dict | None:
        from spin_fast.stages import read_manifest

        return read_manifest(self.run_dir / stage)

    def write_manifest(self, stage: str, **fields) -> None:
        from spin_fast.stages import write_manifest

        (self.run_dir / stage).mkdir(parents=True, exist_ok=True)
        write_manifest(self.run_dir / stage, stage=stage, **fields)

    def _check_same_settings(self) -> None:
        """One run directory, one experiment: resuming with other settings would mix two."""
        resolved = json.loads(json.dumps({"run": self.config.to_dict(), "demo": _as_dict(self.demo)}, default=str))
        path = self.run_dir / "demo-config.yaml"
        if path.exists():
            saved = yaml.safe_load(path.read_text())
            if isinstance(saved, dict) and isinstance(saved.get("run"), dict):  # ~/x saved expanded before
                saved["run"] = paths_as_now(saved["run"], resolved["run"])
            differences = differing_settings(saved, resolved)
            old_run = saved.get("run") if isinstance(saved, dict) and isinstance(saved.get("run"), dict) else {}
            home = expanded_under_another_home(old_run, resolved["run"]) if differences else None
            if home is not None and not differing_settings(
                    {**saved, "run": paths_as_now(old_run, resolved["run"], home)}, resolved):
                # The same --output ~/x under another $HOME, nothing else: say so, not "other settings"
                raise ConfigError(saved_under_another_home(path, home, str(Path(old_run["output_dir"]).parent),
                                                           "use another --output"))
            if differences:
                raise ConfigError(f"{path} holds other settings, which differ in {'; '.join(differences)}: use "
                                  "another --output, or the same settings")
            return
        write_atomically(path, yaml.safe_dump(resolved, sort_keys=False))

    # ---------------------------------------------------------------------------------------- report
    def report(self) -> list[dict]:
        """The table (printed, results.md, results.jsonl) and the plots, from the stages' outputs."""
        rows = self.result_rows()
        table = results_table(rows)
        seconds = {stage: self.manifest(stage)["seconds"] for stage in STAGES}
        header = (f"SPIN demo: sort {self.demo.task.min_items}-{self.demo.task.max_items} numbers; "
                  f"{self.manifest('base')['parameters'] / 1e6:.2f}M-parameter Llama; "
                  f"{self.manifest('data')['eval']} held-out prompts; SFT {self.manifest('sft')['steps']} steps. "
                  f"Wall time: {sum(seconds.values()):.0f} s in all, of which "
                  + ", ".join(f"{stage} {value:.0f} s" for stage, value in seconds.items() if value >= 0.5))
        (self.run_dir / "results.md").write_text(header + "\n\n" + table + "\n")
        (self.run_dir / "results.jsonl").write_text("".join(json.dumps(row) + "\n" for row in rows))
        self.plots(rows)
        print("\n" + header + "\n\n" + table + "\n")
        print(f"tables and plots: {self.run_dir}/results.md, training_curves.png, scores.png")
        return rows

    def result_rows(self) -> list[dict]:
        evaluated = {row["model"]: row for row in _read_jsonl(self.run_dir / "eval" / "eval.jsonl")}
        summaries = _read_jsonl(Path(self.config.output_dir) / "summary.jsonl")
        rows, steps = [], 0
        stages = [("sft", 0, self.manifest("sft")["seconds"], None)]
        for summary in summaries:
            steps += summary["steps"]
            times = {k.removesuffix("_s"): summary[k]
                     for k in ("generate_s", "score_s", "train_s", "weight_transfer_s")}
            stages.append((f"iter-{summary['iteration']}", steps, sum(times.values()), times))
        stages.append(("continued-sft", self.manifest("continued-sft")["steps"],
                       self.manifest("continued-sft")["seconds"], None))
        for name, steps_after_sft, seconds, times in stages:
            row = {"model": name, "steps_after_sft": steps_after_sft, **evaluated[name], "seconds": seconds}
            if times:
                row["seconds_by_stage"] = times
            rows.append(row)
        return rows

    def plots(self, rows: list[dict]) -> None:
        import matplotlib

        matplotlib.use("Agg")  # files only, no display needed
        import matplotlib.pyplot as plt

        sft = _read_jsonl(self.run_dir / "sft" / "metrics.jsonl")
        continued = _read_jsonl(self.run_dir / "continued-sft" / "metrics.jsonl")
        spin, boundaries = [], []
        for t in range(self.config.iterations):
            metrics = _read_jsonl(Path(self.config.output_dir) / f"iter-{t}" / "train" / "metrics.jsonl")
            offset = len(spin)
            spin += [{**m, "step": offset + m["step"]} for m in metrics]
            boundaries.append(len(spin))

        figure, axes = plt.subplots(2, 2, figsize=(11, 7))
        ax = axes[0, 0]
        ax.plot([m["step"] for m in sft], [m["loss"] for m in sft], lw=0.8, label="SFT")
        ax.plot([len(sft) + m["step"] for m in continued], [m["loss"] for m in continued], lw=0.8,
                label="continued SFT")
        ax.set(title="SFT loss (NLL per response token)", xlabel="optimizer step", yscale="log")
        ax.legend()
        for ax, key, title in ((axes[0, 1], "loss", "SPIN loss"),
                               (axes[1, 0], "rewards/margins", "SPIN reward margin (real - generated)"),
                               (axes[1, 1], "rewards/accuracies", "SPIN accuracy (margin > 0)")):
            ax.plot([m["step"] for m in spin], [m[key] for m in spin], lw=0.8, color="C2")
            for b in boundaries[:-1]:
                ax.axvline(b, color="grey", ls=":", lw=0.8)
            ax.set(title=title, xlabel="optimizer step after SFT (dotted: next iteration)")
        figure.tight_layout()
        figure.savefig(self.run_dir / "training_curves.png", dpi=100)
        plt.close(figure)

        figure, axes = plt.subplots(1, 2, figsize=(11, 4))
        path = [r for r in rows if r["model"] == "sft" or r["model"].startswith("iter-")]
        baseline = next(r for r in rows if r["model"] == "continued-sft")
        for ax, key, title in ((axes[0], "score", "checker score, greedy answers (held-out)"),
                               (axes[1], "loglik_per_token", "log-likelihood per token of held-out answers")):
            if key not in baseline:
                continue
            ax.plot(range(len(path)), [r[key] for r in path], marker="o", color="C2", label="SPIN")
            ax.axhline(path[0][key], color="C0", ls="--", lw=1, label="SFT model")
            ax.axhline(baseline[key], color="C1", ls="--", lw=1, label="continued SFT (same steps)")
            ax.set_xticks(range(len(path)), ["SFT"] + [f"iter {t}" for t in range(len(path) - 1)])
            ax.set(title=title, xlabel="after SPIN iteration")
            ax.legend()
        figure.tight_layout()
        figure.savefig(self.run_dir / "scores.png", dpi=100)
        plt.close(figure)


def results_table(rows: list[dict]) -> str:
    """A markdown table: one row per model."""
    def number(row, key, digits):
        value = row.get(key)
        return "-" if value is None else f"{value:.{digits}f}"

    lines = ["| model | steps after SFT | checker score | exact | held-out log-lik/token | reward margin "
             "| margin > 0 | wall time (s) |", "|---|---:|---:|---:|---:|---:|---:|---:|"]
    for row in rows:
        lines.append(f"| {row['model']} | {row['steps_after_sft']} | {number(row, 'score', 3)} "
                     f"| {number(row, 'score_perfect', 3)} | {number(row, 'loglik_per_token', 4)} "
                     f"| {number(row, 'rewards/margins', 3)} | {number(row, 'rewards/accuracies', 3)} "
                     f"| {row['seconds']:.0f} |")
    return "\n".join(lines)


def _read_jsonl(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def _as_dict(obj) -> dict:
    from dataclasses import asdict

    return asdict(obj)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m spin_fast.demo", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", type=Path, default=DEFAULT_CONFIG, help="demo YAML (default configs/demo.yaml)")
    parser.add_argument("--output", help="run directory (default: the config's output_dir)")
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                        help="override a setting, e.g. --set demo.task.n_train=1000 or --set train.beta=0.2")
    parser.add_argument("--until", choices=STAGES, help="stop after this stage (a rerun goes on from there)")
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging, and an error's traceback")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.DEBUG if args.verbose else logging.INFO,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    try:
        config, demo = load_demo_config(args.config, args.overrides, args.output)
    except (ConfigError, OSError) as error:
        log.debug("the error's traceback", exc_info=True)
        print(f"demo: {error}", file=sys.stderr)
        return 2
    from spin_fast.loading import library_progress_bars

    library_progress_bars(config.train.progress)
    from spin_fast import stopping
    from spin_fast.cli import report_end

    with stopping.signals_handled():  # SIGTERM or Ctrl-C stops at a safe point, as `spin-fast run` does
        try:
            Demo(config, demo).run(until=args.until)
        except (stopping.Stopped, Exception) as ended:  # said as `spin-fast run` says it, in the demo's words
            return report_end(ended, demo_error_message)
    return 0


def demo_error_message(error: BaseException) -> str | None:
    """The line for an error a user can fix, as `spin-fast train` says it: a diverged training (the settings'
    doing), a setting (ConfigError, or a value a stage refuses: train.micro_batch_tokens too small), a data row, a
    folder in use, a missing file. None for a bug."""
    from spin_fast.training import TrainingDiverged

    if isinstance(error, TrainingDiverged):
        return (f"demo: training diverged at {error}: lower that stage's learning rate (demo.sft.learning_rate for "
                "sft/, train.learning_rate for spin/, demo.continued_sft.learning_rate for continued-sft/) and run "
                "again with another --output")
    return f"demo: {error}" if isinstance(error, (ValueError, OSError)) else None


if __name__ == "__main__":  # vLLM's CPU build starts its engine process by re-importing the main module
    sys.exit(main())

"""Evaluation of a SPIN run on held-out data: how likely the human responses are under each model,
and how each iteration's model separates human from opponent responses (the reward margins).

    log-likelihood   mean log-prob per response token of the held-out human responses
    margins          for θt+1 against its opponent θt, on held-out pairs (human response, θt's own):
                     rewards = beta * (log p_θt+1 - log p_θt), margins = real - generated
    score            with data.checker set: the checker's mean grade of the model's greedy answers,
                     and the share graded 1 (score_perfect); free-running, so a model's early mistakes
                     count here while teacher forcing (the log-likelihood) hides them

Under a launcher (torchrun, the deepspeed launcher) the ranks share the work: each runs its share of the
micro-batches and generation batches that one process would run, cut exactly as one process cuts them
(balanced by tokens), and the results come back in one-process order. Every forward pass is then the one
a single process makes, so the figures equal one process's; rank 0 writes the file. With vLLM, each rank's
engine answers its share of the prompts, each prompt seeded by its index in the whole set.
"""

from __future__ import annotations

import contextlib
import hashlib
import importlib
import inspect
import json
import logging
import re
import sys
import time
from collections.abc import Callable
from collections.abc import Sequence as Seq
from dataclasses import asdict
from pathlib import Path

import torch

from spin_fast import distributed, stopping, zero
from spin_fast.config import ConfigError
from spin_fast.data import Example, TokenizedExample, eos_token_id, reads_one_split, response_end, turn_end_text
from spin_fast.examples import answered_pairs, check_in_vocabulary, read_examples, rows_digest, tokenize_examples
from spin_fast.files import read_json, write_atomically
from spin_fast.generation.base import Completion, SamplingConfig, request_cost
from spin_fast.generation.choice import (
    check_engine_can_swap,
    check_examples_in_context,
    check_prompts_fit,
    chosen_engine,
    start_vllm,
    stop_strings,
    vllm_dtype,
)
from spin_fast.loading import fetch_model, load_policy
from spin_fast.model import can_share_prompts, load_tokenizer
from spin_fast.packing import Sequence, check_fits, group_tokens, pack_indices
from spin_fast.scoring import TokenizedPair, check_pairs_fit, model_logprobs, pair_sequences
from spin_fast.stages import config_hash, finished_summaries
from spin_fast.tracking import Trackers, check_trackers, tracked_name

log = logging.getLogger(__name__)


def shared_logprobs(models, groups: Seq[Seq[Sequence]], token_budget: int, backend: str, what: str,
                    progress: bool = False, bf16_autocast: bool = False) -> list[torch.Tensor]:
    """model_logprobs of every group under each model, the ranks sharing the micro-batches.

    The micro-batches are one process's, packed first-fit decreasing as model_logprobs packs: a batch holds its
    groups longest first (ties by index) and fits the budget, so its groups packed again the same way make the
    very same row. Each rank's forward passes are then ones a single process makes, and the sums are bit for bit
    one process's. With ZeRO-3 partitioned models every forward pass is a collective, so a rank with fewer
    micro-batches runs fillers."""
    share = all(can_share_prompts(model) for model in models)
    # The indices alone: each rank packs its chunks again (model_logprobs), and tensors for every chunk of a large
    # set would take a minute to make and to drop.
    chunks = pack_indices(groups, token_budget, share_prompts=share, first_fit_decreasing=True)
    costs = [sum(group_tokens(groups[i], share) for i in chunk) for chunk in chunks]

    def logprobs(c: int | None) -> list[torch.Tensor]:  # None: a filler pass
        return [model_logprobs(model, [groups[i] for i in chunks[c]] if c is not None else [], token_budget,
                               backend=backend, bf16_autocast=bf16_autocast) for model in models]

    per_chunk = distributed.share_work(costs, lambda mine: zero.run_in_step(models, mine, logprobs, what, progress),
                                       what)
    results = [torch.zeros(len(groups), len(groups[0]) if groups else 0, dtype=torch.float64) for _ in models]
    for chunk, sums in zip(chunks, per_chunk):
        for result, chunk_sums in zip(results, sums):
            result[chunk] = chunk_sums
    return results


def shared_generate(model, tokenizer, prompts: Seq[Seq[int]], sampling: SamplingConfig, batch_size: int,
                    what: str, progress: bool = False) -> list[list[Completion]]:
    """One completion per prompt (engine layout: a list per prompt), the ranks sharing the batches.

    TransformersEngine.batches() gives the batches one process runs. They are dealt out here, each generated
    alone with its prompts' indices in the whole set (which set its seed), so even sampled completions are one
    process's, whatever the number of ranks."""
    from spin_fast.generation.hf_engine import TransformersEngine

    if sampling.n != 1:
        raise ValueError(f"shared_generate makes one completion per prompt, got n={sampling.n}")
    engine = TransformersEngine(model, eos_token_id=eos_token_id(tokenizer), stop_token_ids=[tokenizer.eos_token_id],
                                stop_strings=stop_strings(tokenizer), tokenizer=tokenizer,
                                pad_token_id=tokenizer.pad_token_id,
                                batch_size=batch_size, progress=False)
    batches = [[p for p, _ in batch] for batch in engine.batches(prompts)]
    # Cost: the padded tokens of the batch's last decoding step (its longest prompt is its last).
    costs = [len(b) * (len(prompts[b[-1]]) + sampling.max_new_tokens) for b in batches]

    def generate(b: int | None) -> list[list[Completion]]:  # None: a filler pass
        batch = batches[b] if b is not None else []
        return engine.generate([prompts[i] for i in batch], sampling, indices=batch)

    per_batch = distributed.share_work(costs, lambda mine: zero.run_in_step([model], mine, generate, what, progress),
                                       what)
    completions: list[list[Completion]] = [[] for _ in prompts]
    for batch, batch_completions in zip(batches, per_batch):
        for index, completion in zip(batch, batch_completions):
            completions[index] = completion
    return completions


def heldout_loglik(model, examples: Seq[TokenizedExample], token_budget: int, backend: str = "auto",
                   progress: bool = False, bf16_autocast: bool = False) -> dict:
    """Mean log-prob per response token, and per response, of the human responses (bf16_autocast: the
    training's precision, train.bf16_autocast)."""
    groups = [[Sequence(e.prompt_ids, e.response_ids)] for e in examples]
    sums = shared_logprobs([model], groups, token_budget, backend, "held-out log-likelihoods", progress,
                           bf16_autocast)[0][:, 0]
    tokens = sum(len(e.response_ids) for e in examples)
    return {"loglik_per_token": float(sums.sum()) / tokens, "loglik_per_response": float(sums.mean()),
            "responses": len(examples)}


def check_examples_fit(examples: Seq[TokenizedExample], token_budget: int, source: str,
                       names: Seq[str] | None = None) -> None:
    """Each held-out example (its prompt and human response) fits score_batch_tokens: else the error names the
    setting, and the example's row (`names`: each one's), before any model is scored, not packing's budget midway
    (after a run's training)."""
    check_fits([[Sequence(e.prompt_ids, e.response_ids)] for e in examples], False, token_budget,
               "score_batch_tokens", f"{source}: example", names=names)


def reward_margins(policy, opponent, pairs: Seq[TokenizedPair], beta: float, token_budget: int,
                   backend: str = "auto", progress: bool = False, bf16_autocast: bool = False) -> dict:
    """SPIN's implicit rewards of the policy against its opponent, averaged over the pairs, at the training's
    precision (bf16_autocast: train.bf16_autocast), as its loss measured them."""
    groups = pair_sequences(pairs)  # a pair with an empty part named by its index
    ours, theirs = shared_logprobs([policy, opponent], groups, token_budget, backend, "reward margins", progress,
                                   bf16_autocast)
    rewards = beta * (ours - theirs)  # [pairs, (real, generated)]
    margins = rewards[:, 0] - rewards[:, 1]
    return {"rewards/real": float(rewards[:, 0].mean()), "rewards/generated": float(rewards[:, 1].mean()),
            "rewards/margins": float(margins.mean()), "rewards/accuracies": float((margins > 0).double().mean()),
            "pairs": len(pairs)}


def load_checker(spec: str) -> Callable[[str, str, str], float]:
    """The function that data.checker names ("package.module:function")."""
    module_name, sep, name = spec.partition(":")
    if not sep or not module_name or not name:
        raise ConfigError(f"data.checker {spec!r}: expected 'package.module:function', e.g. 'spin_fast.sorting:score'")
    try:
        module = importlib.import_module(module_name)
    except ImportError as error:
        raise ConfigError(f"data.checker {spec!r}: cannot import module {module_name!r} ({error})"
                          f"{_current_folder_hint(module_name, error)}") from None
    check = getattr(module, name, None)
    if not callable(check):
        raise ConfigError(f"data.checker {spec!r}: module {module_name!r} has no function {name!r}")
    try:
        signature = inspect.signature(check)
    except (TypeError, ValueError):  # a builtin with no signature to read: its first call tells
        return check
    try:
        signature.bind("prompt", "answer", "reference")
    except TypeError:
        raise ConfigError(f"data.checker {spec!r}: {name}{signature} cannot be called as "
                          f"{name}(prompt, answer, reference) -> a grade in [0, 1]") from None
    return check


def _current_folder_hint(module_name: str, error: ImportError) -> str:
    """How to import a checker module that lies in the current folder: the `spin-fast` program's sys.path holds its
    own folder, not the current one (as `python -m spin_fast.cli`'s does). Empty where the module itself was found
    (its own import failed) or the current folder is on sys.path."""
    top = module_name.split(".")[0]
    found = [name for name in (f"{top}.py", top) if Path(name).exists()]
    if not found or error.name != top or {"", ".", str(Path.cwd())} & set(sys.path):
        return ""
    return (f"; {found[0]} is in the current folder, which spin-fast does not import from: run with PYTHONPATH=. "
            "(or python -m spin_fast.cli)")


class Answering:
    """The answers of the evaluated models to the held-out prompts. With vLLM (generation.engine, resolved as the
    run resolves it), one engine serves the whole evaluation: started from the first model that answers, it takes
    each next model's weights from its folder in memory, and the ranks each answer their share (one seed per
    prompt, by its index in the whole set). With the transformers engine, each model answers itself, the ranks
    sharing one process's batches (shared_generate)."""

    def __init__(self, config, tokenizer, model_at: Callable[[str], object], folders: dict[str, str],
                 start_folder: str):
        self.config, self.tokenizer, self.model_at, self.folders = config, tokenizer, model_at, folders
        # The SFT model's folder: the engine's config, tokenizer and generation config, whichever model answers first
        # (a baseline may have no tokenizer files, and answers must not depend on what a call had to answer first).
        self.start_folder = start_folder
        self.engine = chosen_engine(config)
        self._vllm = None
        self._serving: str | None = None  # the folder whose weights the vLLM engine holds

    def generate(self, path: str, prompts: Seq[Seq[int]], sampling: SamplingConfig, what: str,
                 names: Seq[str] | None = None, end_tokens: int = 0) -> list[list[Completion]]:
        """One completion per prompt from the model at `path`, in prompt order, on every rank (`names`: each prompt's
        row, which a prompt too long for the model's context is named by; `end_tokens`: what closes an answer that is
        scored, check_prompts_fit)."""
        folder = self.folders.get(path, path)  # a Hub model's local snapshot
        check_prompts_fit(prompts, sampling.max_new_tokens, folder, self.config, what, names, end_tokens)
        if self.engine == "transformers":
            return shared_generate(self.model_at(path), self.tokenizer, prompts, sampling,
                                   self.config.generation.batch_size, what, self.config.train.progress)
        if self._vllm is None:
            # Every call answers the same held-out prompts: the longest bounds the engine's context.
            self._vllm = start_vllm(self.config, self.start_folder, stop_token_ids=[eos_token_id(self.tokenizer)],
                                    stop_strings=stop_strings(self.tokenizer),
                                    longest_prompt=max(map(len, prompts), default=0))
            self._serving = self.start_folder
            # vLLM takes minutes to start: a signal meanwhile stops every rank here, before these prompts are
            # answered (nothing is lost), as the run stops, not once they all are.
            signum = stopping.reached()
            if signum:
                raise stopping.Stopped(signum, f"as the generation engine started, before {what}", agreed=True)
        else:
            self._vllm.wake_up()
        if folder != self._serving:
            log.info("%s: the vLLM engine takes the weights of %s", what, folder)
            self._vllm.load_weights_from(folder)
        self._serving = folder
        log.info("%s (vLLM) ...", what)

        def generate(mine: list[int]) -> list[list[Completion]]:
            completions = self._vllm.generate([prompts[i] for i in mine], sampling, indices=mine)
            # On a GPU the engine sleeps while the models score (their log-likelihoods and margins), as it does
            # while the loop trains: its weights and KV cache would otherwise sit beside two models, and beside the
            # gather's buffers (a no-op on the CPU build).
            self._vllm.sleep()
            return completions

        return distributed.share_work([request_cost(p, sampling) for p in prompts], generate, what)

    def greedy(self, path: str, examples: Seq[TokenizedExample], names: Seq[str] | None = None) -> list[str]:
        """The model's greedy (temperature 0) answer to each prompt, decoded without special tokens."""
        sampling = SamplingConfig(temperature=0.0, max_new_tokens=self.config.generation.max_new_tokens)
        completions = self.generate(path, [e.answered_prompt_ids for e in examples], sampling, "greedy answers",
                                    names)
        return [self.tokenizer.decode(c[0].token_ids, skip_special_tokens=True) for c in completions]

    def close(self) -> None:
        if self._vllm is not None:
            self._vllm.close()


def checker_grades(check: Callable[[str, str, str], float], examples: Seq[Example], answers: Seq[str]) -> list[float]:
    """The checker's grade of each answer against its human response, in [0, 1]."""
    grades = []
    for example, answer in zip(examples, answers, strict=True):
        try:
            grade = float(check(user_prompt(example), answer, example.response))
        except Exception as error:  # noqa: BLE001 - the checker's own, named by its row
            raise ValueError(f"{example.origin}: data.checker failed on this row's answer: "
                             f"{type(error).__name__}: {error}") from error
        if not 0.0 <= grade <= 1.0:  # NaN fails too
            raise ValueError(f"{example.origin}: the checker graded an answer {grade}, outside [0, 1]")
        grades.append(grade)
    return grades


def checker_score(grades: Seq[float]) -> dict:
    """The mean of the checker's grades, and the share graded 1 (exactly right)."""
    return {"score": sum(grades) / len(grades), "score_perfect": sum(g == 1.0 for g in grades) / len(grades)}


def user_prompt(example: Example) -> str:
    return next(m["content"] for m in reversed(example.prompt) if m["role"] == "user")


def path_identity(name: str) -> object:
    """What tells whether a model folder or data file has changed: each file's name, size and modification time.
    A name that is not a local path (a Hub id) stands for itself."""
    path = Path(name)
    if not path.exists():
        return name
    files = [path] if path.is_file() else sorted(p for p in path.rglob("*") if p.is_file())
    return [[p.name if p == path else str(p.relative_to(path)), p.stat().st_size, p.stat().st_mtime_ns]
            for p in files]


def model_identity(name: str, folder: str) -> object:
    """path_identity of a model folder; for a Hub model (`folder` its local snapshot), its id and the revision of
    the snapshot (the commit the folder is named after)."""
    if folder != name:
        return {"hub": name, "revision": Path(folder).name}
    return path_identity(name)


BASELINE_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]*")
# A model's weights are read into a vLLM engine started from the SFT model, which keeps the SFT model's config (RoPE,
# norms, activation, windows...): every key must match but these, which change nothing in its answers.
IGNORED_CONFIG_KEYS = frozenset({"_name_or_path", "transformers_version", "dtype", "torch_dtype", "use_cache",
                                 "initializer_range", "attention_dropout", "hidden_dropout", "embd_pdrop",
                                 "resid_pdrop", "output_attentions", "output_hidden_states", "return_dict",
                                 "pad_token_id", "bos_token_id"})


def check_baseline_names(baselines: dict[str, str]) -> None:
    """A baseline's name names its row and its files in the parts folder: a plain file name, and none of the run's
    own models' names."""
    for name in baselines:
        if not BASELINE_NAME.fullmatch(name):
            raise ConfigError(f"baseline {name!r}: a name of letters, digits, '.', '_' and '-' (it names the row and "
                              "its files)")
        if re.fullmatch(r"sft|iter-\d+|held-out-pairs-\d+|greedy-answers-.*", name):
            raise ConfigError(f"baseline {name!r}: the name of one of the run's own models or files; choose another")


def check_baseline_fits(name: str, folder: str, sft_folder: str, tokenizer, engine: str,
                        trust_remote_code: bool = False) -> None:
    """A baseline is a model folder, evaluated on the token ids of the SFT model's tokenizer: its own tokenizer,
    when it has one, must have the same vocabulary. With vLLM its weights are read into the engine in place of the
    SFT model's, which keeps its config and generation config: the baseline's must be the same (but for the keys
    that change no answer) and stop on the same end-of-sequence ids."""
    config_file = Path(folder) / "config.json"
    if not config_file.exists():
        raise FileNotFoundError(f"baseline {name!r}: {folder} has no config.json: not a model folder")
    if any((Path(folder) / f).exists() for f in ("tokenizer.json", "tokenizer.model", "tokenizer_config.json")):
        from transformers import AutoTokenizer

        ours = tokenizer.get_vocab()
        theirs = AutoTokenizer.from_pretrained(folder, trust_remote_code=trust_remote_code).get_vocab()
        if theirs != ours:
            raise ConfigError(f"baseline {name!r} ({folder}): its tokenizer's vocabulary ({len(theirs)} tokens) is "
                              f"not the SFT model's ({len(ours)} tokens): the held-out data is tokenized once, with "
                              "the SFT model's tokenizer")
    if engine == "vllm":
        ours, theirs = json.loads((Path(sft_folder) / "config.json").read_text()), json.loads(config_file.read_text())
        for key in sorted((ours.keys() | theirs.keys()) - IGNORED_CONFIG_KEYS):
            if ours.get(key) != theirs.get(key):
                raise ConfigError(
                    f"baseline {name!r} ({folder}): {key} {theirs.get(key)!r}, the SFT model's {ours.get(key)!r}: the "
                    "vLLM engine reads each model's weights in place of the SFT model's and keeps its config, so a "
                    "baseline needs its architecture and config (generation.engine=transformers evaluates a baseline "
                    "of another one)")
        # vLLM also stops on the end-of-sequence ids of the starting model's generation config, and only on those.
        stops = [read_json(path).get("eos_token_id") if path.exists() else None
                 for path in (Path(sft_folder) / "generation_config.json", Path(folder) / "generation_config.json")]
        if None not in stops and stops[0] != stops[1]:
            raise ConfigError(f"baseline {name!r} ({folder}): generation_config.json's eos_token_id {stops[1]!r}, the "
                              f"SFT model's {stops[0]!r}: the vLLM engine stops on the SFT model's alone "
                              "(generation.engine=transformers evaluates a baseline that stops on others)")


def source_hash(function: Callable) -> str | None:
    """A hash of the source file that defines `function` (None when it has none): a changed checker grades again."""
    try:
        return hashlib.sha256(Path(inspect.getsourcefile(function) or "").read_bytes()).hexdigest()[:16]
    except (TypeError, OSError):
        return None


def parts_folder(output: Path) -> Path:
    """Where evaluate_run keeps its finished pieces, beside its output file: eval.jsonl -> eval-parts/."""
    return output.with_name(output.stem + "-parts")


class SavedWork:
    """evaluate_run's finished pieces (each model's row, each opponent's held-out answers), saved in `folder` as
    soon as each is done, under a key of everything it depends on (the models' files, the held-out data, the
    settings). Evaluating again, after a stop or once more iterations have finished, computes only what is new or
    changed. Each piece's end is a safe point (spin_fast.stopping). Rank 0 reads and writes; what it finds is
    sent to every rank. folder None: nothing is kept."""

    def __init__(self, folder: Path | None):
        self.folder = folder
        if folder is not None and distributed.is_main():
            folder.mkdir(parents=True, exist_ok=True)

    def get_or_make(self, name: str, key: dict, make: Callable[[], object], what: str):
        """The value saved as `name` under `key`, else make()'s, saved (a JSON value)."""
        key = json.loads(json.dumps(key))  # as it reads back from the file
        found = distributed.on_main(lambda: self._read(name, key, what), f"{what}: saved")
        if found is not None:
            return found["value"]
        log.info("%s ...", what)
        began = time.perf_counter()
        value = make()
        if self.folder is None:
            return value
        distributed.on_main(lambda: self.write(f"{name}.json", json.dumps({"key": key, "value": value})),
                            f"{what}: saved")
        log.info("%s: done in %.0f s, saved in %s", what, time.perf_counter() - began, self.folder)
        signum = stopping.reached()
        if signum:
            raise stopping.Stopped(signum, f"after {what}, saved in {self.folder}", agreed=True)
        return value

    def _read(self, name: str, key: dict, what: str) -> dict | None:
        if self.folder is None or not (self.folder / f"{name}.json").exists():
            return None
        path = self.folder / f"{name}.json"
        saved = read_json(path)
        # Held-out answers saved before score_batch_tokens left their key (it cuts the scoring alone) still match.
        if saved["key"] != key and {k: v for k, v in saved["key"].items() if k != "score_batch_tokens"} != key:
            log.info("%s: saved in %s with other models, data or settings: evaluated again", what, path)
            return None
        log.info("%s: already saved (%s)", what, path)
        return saved

    def write(self, name: str, text: str) -> None:
        """A file of the folder, atomically (rank 0)."""
        if self.folder is not None:
            write_atomically(self.folder / name, text)


def evaluate_run(selfplay, eval_source: str, output: Path | None = None,
                 baselines: dict[str, str] | None = None) -> list[dict]:
    """Held-out log-likelihood of the SFT model and of every finished iteration, each iteration's
    margins against its opponent on held-out pairs the opponent answers itself, and the checker's
    score when data.checker is set. baselines (name -> model folder or Hub id, e.g. continued SFT) are evaluated
    like iteration 0's model: their margins are against the SFT model, on the SFT model's answers.

    With `output` (eval.jsonl), each model's row, its greedy answers (answers-<model>.jsonl, graded) and each
    opponent's held-out answers are saved as they finish in the folder beside it, `<output stem>-parts/`
    (SavedWork): a stopped evaluation resumes there, and evaluating again after more iterations have finished
    evaluates only the new models."""
    evaluation = Evaluation(selfplay, eval_source, output, dict(baselines or {}))
    try:
        with stopping.safe_points("the evaluation") if output is not None else contextlib.nullcontext():
            rows = evaluation.rows()
    finally:
        evaluation.close()
    if output is not None:
        # The file is there when any rank returns.
        distributed.on_main(lambda: write_atomically(output, "".join(json.dumps(row) + "\n" for row in rows)),
                            "evaluation written")
    return rows


class Evaluation:
    """evaluate_run's work: its inputs are read and checked as it is made, before any model loads; rows() gives
    each model's row, computed or read back from the saved work."""

    def __init__(self, selfplay, eval_source: str, output: Path | None, baselines: dict[str, str]):
        config = self.config = selfplay.config
        self.baselines = baselines
        check_baseline_names(baselines)
        self.check = load_checker(config.data.checker) if config.data.checker else None  # fails before any model
        self.checker_code = source_hash(self.check) if self.check is not None else None
        selfplay.directory.check_model()
        if distributed.launched_distributed():  # before any model loads: on GPUs, each rank takes its own
            distributed.init(config.deepspeed.timeout_minutes)
            distributed.check_same_on_every_rank(
                json.dumps([config_hash(config), baselines, eval_source, str(output)]), "settings")
        revision = selfplay.directory.sft_revision()
        with distributed.main_first("the models and data, from the Hub"):
            # Each model named by a Hub id is read from its local snapshot (fetched once, by rank 0 first).
            sft = config.model.name_or_path
            self.folders = {sft: fetch_model(sft, revision=revision)}
            for name, path in baselines.items():
                if path == sft and self.folders[sft] != sft:  # its newest snapshot would replace the run's θ0
                    raise ConfigError(f"baseline {name!r}: {path!r} is the SFT model's Hub id, which here names the "
                                      f"run's θ0 at revision {Path(self.folders[sft]).name} (the row 'sft')")
            self.folders.update({path: fetch_model(path, f"baseline {name!r}") for name, path in baselines.items()})
            self.tokenizer = load_tokenizer(config.model, self.folders[sft])
            self.raw = read_examples(config.data.held_out(), eval_source)  # the checker grades text: kept too
        self.digest = rows_digest(self.raw)  # once: the ranks' check and a Hub dataset's identity both take it
        self.examples = tokenize_examples(self.tokenizer, config.data.held_out(), self.raw, config.train.progress,
                                          self.digest)
        self.names = [e.origin for e in self.raw]  # each held-out row's file and line, which errors name it by
        check_in_vocabulary(self.tokenizer, self.examples, self.folders[sft], config.model.trust_remote_code,
                            self.names)
        check_examples_fit(self.examples, config.score_batch_tokens, eval_source, self.names)
        # Scored (held-out log-likelihood, margins): past the model's context a learned-position model fails there.
        check_examples_in_context([len(e.prompt_ids) + len(e.response_ids) for e in self.examples], self.folders[sft],
                                  config, self.names)
        # The finished iterations as rank 0 sees them: a run still writing its manifests must not make the
        # ranks evaluate different models (and wait forever for each other).
        # Every one, also past config.iterations (a run extended with --set iterations=N, evaluated with its file).
        self.checkpoints = distributed.from_main(
            [s["checkpoint"] for s in finished_summaries(selfplay.run_dir)] if distributed.is_main() else [],
            "finished iterations")
        self.saved = SavedWork(parts_folder(output) if output is not None else None)
        self.answering = Answering(config, self.tokenizer, self.model_at, self.folders, self.folders[sft])
        # The models that answer, each but the SFT model swapped into the engine started from its weights: each
        # row's opponent (its held-out answers), and with a checker each row's model (its greedy ones).
        answering = {self.folders.get(path, path) for _, model, _, opponent in self.planned_rows()
                     for path in [*([opponent[1]] if opponent else []), *([model] if self.check else [])]}
        check_engine_can_swap(config, self.folders[sft], len(answering),
                              f", and the evaluation's engine answers with each of its {len(answering)} models in turn")
        for name, path in baselines.items():  # before any model loads
            check_baseline_fits(name, self.folders[path], self.folders[sft], self.tokenizer, self.answering.engine,
                                config.model.trust_remote_code)
            try:  # its embeddings are given the SFT tokenizer's ids, as θ0's are
                check_in_vocabulary(self.tokenizer, self.examples, self.folders[path], config.model.trust_remote_code,
                                    self.names, setting=None)
                # Scored like θ0 (transformers takes a baseline of any config): its own context and rotary
                # embeddings, or its row would be refused (or silently wrong) only when its turn comes.
                check_examples_in_context([len(e.prompt_ids) + len(e.response_ids) for e in self.examples],
                                          self.folders[path], config, self.names, model_name=path)
            except ValueError as e:
                raise ValueError(f"baseline {name!r}: {e}") from None
        tracked = output is not None and (config.train.tensorboard or config.train.wandb)
        if tracked:  # now, not after the first model
            distributed.on_main(lambda: check_trackers(config.train), "the trackers' check")
        # One W&B run for every evaluation of the run, and the parts folder's TensorBoard, opened at the first row
        # this evaluation computes: they get each row once, when it is computed (a saved row was sent by the
        # evaluation that made it).
        self.trackers = Trackers(self.saved.folder, config.train, tracked_name(selfplay.run_dir, "eval"), {},
                                 prefix="eval", axis="model") if tracked and distributed.is_main() else None
        self.settings = self._settings(eval_source)
        # What the answers depend on: score_batch_tokens cuts the scoring alone (raising it, as the fit checks ask,
        # keeps the answers), and autocast is the scoring's (vLLM's dtype, which follows it, is in "generation").
        self.answer_settings = {k: v for k, v in self.settings.items()
                                if k not in ("score_batch_tokens", "scoring under bf16 autocast")}
        self.identities = distributed.from_main(
            {path: model_identity(path, self.folders.get(path, path)) if distributed.is_main() else None
             for path in [sft, *self.checkpoints, *baselines.values()]}, "the models' files")
        self._loaded: dict[str, object] = {}

    def _source_identity(self, eval_source: str) -> object:
        """What tells the held-out rows apart: a local file or folder's files (path_identity), a Hub dataset's rows.
        A folder of several splits' shards is known by its rows too: older spin-fast read every split's files, this
        code data.split's alone, and the figures older code saved, of every split's rows, were reused under the same
        files."""
        if not Path(eval_source).exists():  # a Hub dataset: a new revision is other data
            return {"dataset": eval_source, "rows": self.digest}
        if reads_one_split(eval_source):
            return {"files": path_identity(eval_source), "rows": self.digest}
        return path_identity(eval_source)

    def _settings(self, eval_source: str) -> dict:
        """What every figure depends on besides the models. Settings that change nothing here (the training set,
        the number of iterations, the trackers) are left out, so that changing them keeps the saved work."""
        config, engine = self.config, self.answering.engine
        return distributed.from_main({
            # A Hub dataset (a name that is no local path) is known by its rows: a new revision is other data.
            "eval_source": self._source_identity(eval_source) if distributed.is_main() else None,
            "data": {k: v for k, v in asdict(config.data.held_out()).items()  # "split": eval_source's
                     if k not in ("source", "max_prompts", "eval_source", "eval_split", "checker")},
            "model": {**{k: v for k, v in asdict(config.model).items() if k != "name_or_path"},
                      "chat_template": config.model.template_text()},  # the template, not the name of its file
            # A turn end that no token holds: responses end with its pieces, where spin-fast before stop strings
            # ended them with EOS (other ids, other figures). Keyed there alone, so that other saved work is kept.
            **({"response end": list(response_end(self.tokenizer))} if turn_end_text(self.tokenizer) else {}),
            "generation": {"engine": engine, "max_new_tokens": config.generation.max_new_tokens,
                           **({"batch_size": config.generation.batch_size} if engine == "transformers" else {}),
                           # vLLM answers in bf16 under autocast: keyed where that is not train.dtype (so that
                           # answers saved before the key are kept)
                           **({"vllm dtype": vllm_dtype(config)}
                              if engine == "vllm" and vllm_dtype(config) != config.train.dtype else {})},
            "score_batch_tokens": config.score_batch_tokens,
            "train": {k: getattr(config.train, k) for k in ("backend", "dtype", "liger_kernels")},
            # Scored at the training's precision; the key only when on, so that fp32 rows saved before it was
            # keyed are kept.
            **({"scoring under bf16 autocast": True} if config.train.bf16_autocast else {}),
        }, "the evaluation's settings")

    def planned_rows(self) -> list[tuple[str, str, int | None, tuple[int, str] | None]]:
        """model_row's arguments for each row: the SFT model's, each finished iteration's (margins against its
        opponent θt) and the baselines' (against θ0)."""
        sft = self.config.model.name_or_path
        opponents = [sft, *self.checkpoints]  # θt, the opponent of iteration t
        return [("sft", sft, 0, None),
                *((f"iter-{t}", path, t + 1, (t, opponents[t])) for t, path in enumerate(self.checkpoints)),
                *((name, path, None, (0, sft)) for name, path in self.baselines.items())]

    def rows(self) -> list[dict]:
        return [self.model_row(*row) for row in self.planned_rows()]

    def close(self) -> None:
        self.answering.close()
        if self.trackers is not None:
            self.trackers.close()

    def model_at(self, path: str):
        """The model at `path`; at most two are kept: an iteration's policy and its opponent."""
        if path not in self._loaded:
            while len(self._loaded) >= 2:
                self._loaded.pop(next(iter(self._loaded)))
            self._loaded[path] = load_policy(self.folders.get(path, path), self.config)
        return self._loaded[path]

    def held_out_pairs(self, t: int, opponent: str) -> list[TokenizedPair]:
        # θt answers the held-out prompts with iteration t's sampling settings. Their seeds are the same in every
        # iteration (not iteration t's training ones): the iterations' margins differ by their models, not by draws.
        sampling = self.config.for_iteration(t).generation.sampling()

        def make():
            end = response_end(self.tokenizer)  # closes each answer, which is scored: it counts in the context
            completions = self.answering.generate(opponent, [e.answered_prompt_ids for e in self.examples], sampling,
                                                  f"iteration {t}'s held-out answers", self.names, len(end))
            pairs = answered_pairs(self.examples, completions, end, self.config.data, bos=self.tokenizer.bos_token_id)
            return [[list(p.prompt_ids), list(p.real_ids), list(p.generated_ids)] for p in pairs]

        key = {"answers of": self.identities[opponent], "sampling": asdict(sampling), **self.answer_settings}
        pairs = self.saved.get_or_make(f"held-out-pairs-{t}", key, make,
                                       f"iteration {t}'s opponent's held-out answers")
        return [TokenizedPair(*(tuple(ids) for ids in pair)) for pair in pairs]

    def greedy_answers(self, name: str, path: str) -> list[str]:
        # Saved apart from the row: another checker grades them again without the model answering again.
        key = {"greedy answers of": self.identities[path], **self.answer_settings}
        return self.saved.get_or_make(f"greedy-answers-{name}", key,
                                      lambda: self.answering.greedy(path, self.examples, self.names),
                                      f"{name}'s greedy answers")

    def grades(self, name: str, answers: list[str]) -> list[float]:
        """The checker's grade of each answer, saved with it in answers-<name>.jsonl (rank 0 alone: a checker may
        call a service, or grade apart per rank)."""
        def grade() -> list[float]:
            grades = checker_grades(self.check, self.raw, answers)
            self.saved.write(f"answers-{name}.jsonl", "".join(
                json.dumps({"prompt": user_prompt(e), "answer": a, "reference": e.response, "grade": g}) + "\n"
                for e, a, g in zip(self.raw, answers, grades)))
            return grades

        return distributed.on_main(grade, f"{name}'s grades")

    def model_row(self, name: str, path: str, x: int | None, opponent: tuple[int, str] | None = None) -> dict:
        """The row of the model at `path`; with opponent (t, its path), its margins against θt on θt's answers.
        x: its place in the run for the trackers (0 the SFT model, t + 1 iteration t's; None a baseline)."""
        config = self.config
        beta = config.for_iteration(opponent[0] if opponent else 0).train.beta
        scoring = {"token_budget": config.score_batch_tokens, "backend": config.train.backend,
                   "progress": config.train.progress, "bf16_autocast": config.train.bf16_autocast}
        computed = []  # this row's, when made in this call

        def make():
            # The opponent's answers first: a vLLM engine still holds its weights from the row before.
            pairs = self.held_out_pairs(*opponent) if opponent is not None else None
            model = self.model_at(path)
            if pairs is not None:  # named before this row's scoring, not by packing's budget after its first parts
                # (every model here is loaded with model.attention: the policy shares prompts as its opponent does)
                # Each pair by its row's file and line: its index is none past a skipped row or in a folder.
                what = f"iteration {opponent[0]}'s held-out pair"
                check_pairs_fit(pairs, model, config.score_batch_tokens, what,
                                names=[f"{what} of {name}" for name in self.names])
            row = {"model": name, **heldout_loglik(model, self.examples, **scoring)}
            if self.check is not None:
                row.update(checker_score(self.grades(name, self.greedy_answers(name, path))))
            if pairs is not None:
                row.update(reward_margins(model, self.model_at(opponent[1]), pairs, beta, **scoring))
            if self.trackers is not None and x is not None:  # before the row is saved: a kill may make it be sent
                self.trackers.log(x, row)  # again, never skipped
            computed.append(name)
            return row

        # Not under "model": settings has that key (the model settings), and would hide the files' identity.
        key = {"evaluated": self.identities[path], "checker": config.data.checker, "checker code": self.checker_code,
               **self.settings}
        if opponent is not None:
            key.update({"opponent": self.identities[opponent[1]], "beta": beta,
                        "sampling": asdict(config.for_iteration(opponent[0]).generation.sampling())})
        row = self.saved.get_or_make(name, key, make, f"{name}'s evaluation")
        # A saved row after a row this evaluation computed again: TensorBoard hides what earlier evaluations sent from
        # the first x this one sent on (purge_step), so it goes to TensorBoard again (W&B has it).
        if self.trackers is not None and x is not None and self.trackers.opened and not computed:
            self.trackers.log(x, row, to_wandb=False)
        return row

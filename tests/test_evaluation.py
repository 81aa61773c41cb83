"""The demo's task and the eval checker hook: hand-checked grades, the split, and clear errors."""

import json
import math
import re
import shutil
import sys

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from helpers import offline_hub
from spin_fast import sorting
from spin_fast.config import ConfigError, load_run_config
from spin_fast.data import Example, load_examples
from spin_fast.evaluation import check_baseline_fits, checker_grades, checker_score, evaluate_run, load_checker
from spin_fast.model import tiny_config
from spin_fast.selfplay import SelfPlay
from spin_fast.tokenizer import build_local_tokenizer

REFERENCE = "In order: 3, 7, 19, 42, 88."


@pytest.mark.parametrize("answer, grade", [
    ("In order: 3, 7, 19, 42, 88.", 1.0),
    ("3 7 19 42 88", 1.0),  # the numbers are graded, not the wording
    ("In order: 3, 7, 42, 88.", 2 / 5),  # a skipped number costs every position after it
    ("In order: 3, 7, 19, 42, 88, 88.", 5 / 6),  # a repeat at the end costs the extra position
    ("In order: 88, 42, 19, 7, 3.", 1 / 5),  # reversed: only the middle one is in place
    ("I cannot sort.", 0.0),
    ("", 0.0),
])
def test_sorting_score_by_hand(answer, grade):
    assert sorting.score("Sort these numbers from smallest to largest: 42, 7, 19, 88, 3.", answer,
                         REFERENCE) == pytest.approx(grade, abs=1e-12)


def test_sorting_score_needs_a_reference_with_numbers():
    with pytest.raises(ValueError, match="holds no numbers"):
        sorting.score("Sort: 1, 2.", "1, 2", "no numbers here")


def test_splits_are_seeded_disjoint_and_loadable(tmp_path):
    train, held_out = sorting.make_splits(200, 50, seed=3)
    assert (train, held_out) == sorting.make_splits(200, 50, seed=3)
    assert train != sorting.make_splits(200, 50, seed=4)[0]
    assert not {tuple(sorting.numbers(r["response"])) for r in held_out} & {
        tuple(sorting.numbers(r["response"])) for r in train}
    for row in train + held_out:
        given = sorting.numbers(row["prompt"])
        assert 4 <= len(given) <= 7 and len(set(given)) == len(given) and max(given) <= 99
        assert sorting.numbers(row["response"]) == sorted(given)  # the reference is right
        assert sorting.score(row["prompt"], row["response"], row["response"]) == 1.0
    path = sorting.write_jsonl(tmp_path / "train.jsonl", train)
    examples = load_examples(path).examples
    assert [(e.prompt[0]["content"], e.response) for e in examples] == [(r["prompt"], r["response"]) for r in train]


def test_held_out_lists_are_distinct_and_the_last_free_one_is_used():
    """Numbers 0 to 2, lists of 1 or 2 of them: {0} {1} {2} {0,1} {0,2} {1,2}, six lists. With no training rows all six
    can be held out, each once; a seventh cannot."""
    import random

    assert sorting.make_example(random.Random(0), 3, 3, 2)["response"] == "In order: 0, 1, 2."  # 2 included
    assert sorting.distinct_lists(1, 2, 2) == 6
    _, held_out = sorting.make_splits(0, 6, min_items=1, max_items=2, max_value=2)
    assert sorted(tuple(sorting.numbers(row["response"])) for row in held_out) == [
        (0,), (0, 1), (0, 2), (1,), (1, 2), (2,)]
    with pytest.raises(ValueError, match="the task has 6 lists .* the training rows take 0: fewer than n_eval=7"):
        sorting.make_splits(0, 7, min_items=1, max_items=2, max_value=2)


def test_checker_score_by_hand():
    examples = [Example(({"role": "user", "content": "Sort: 42, 7, 19, 88, 3."},), REFERENCE, origin="f line 1"),
                Example(({"role": "system", "content": "Be brief."}, {"role": "user", "content": "Sort: 2, 1."}),
                        "In order: 1, 2.", origin="f line 2")]
    got = checker_score(checker_grades(sorting.score, examples, ["In order: 3, 7, 42, 88.", "1, 2"]))
    assert got == pytest.approx({"score": (0.4 + 1.0) / 2, "score_perfect": 0.5}, abs=1e-12)
    seen = []
    checker_grades(lambda prompt, response, reference: seen.append(prompt) or 0.0, examples, ["", ""])
    assert seen == ["Sort: 42, 7, 19, 88, 3.", "Sort: 2, 1."]  # the last user turn is the prompt
    with pytest.raises(ValueError, match=r"f line 1: the checker graded an answer 1.5"):
        checker_grades(lambda *args: 1.5, examples, ["", ""])
    with pytest.raises(ValueError, match="outside"):
        checker_grades(lambda *args: math.nan, examples, ["", ""])


@pytest.mark.parametrize("spec, message", [
    ("spin_fast.sorting", "expected 'package.module:function'"),
    (":score", "expected 'package.module:function'"),
    ("spin_fast.no_such_module:score", "cannot import module 'spin_fast.no_such_module'"),
    ("spin_fast.sorting:no_such_function", "has no function 'no_such_function'"),
    ("spin_fast.sorting:RESPONSE", "has no function 'RESPONSE'"),  # there, but not callable
])
def test_bad_checker_paths_are_clear_errors(spec, message):
    with pytest.raises(ConfigError, match=f"data.checker {spec!r}: .*{message}"):
        load_checker(spec)


def test_a_checker_in_the_current_folder_that_the_command_cannot_import_says_how(tmp_path, monkeypatch):
    """The `spin-fast` program imports from its own folder, not the current one (as `python -m` would): a user's
    mychecker.py beside the config is not found, and the error says how to make it importable."""
    (tmp_path / "mychecker.py").write_text("def grade(prompt, answer, reference):\n    return 1.0\n")
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(sys, "path", [p for p in sys.path if p not in ("", ".", str(tmp_path))])
    with pytest.raises(ConfigError, match=r"cannot import module 'mychecker' .*mychecker\.py is in the current folder, "
                                          r"which spin-fast does not import from: run with PYTHONPATH=\."):
        load_checker("mychecker:grade")
    # Run as `python -m` (the current folder on sys.path), the module is found: its own import's error alone.
    (tmp_path / "mychecker.py").write_text("import no_such_grading_package\n")
    monkeypatch.setattr(sys, "path", [str(tmp_path), *sys.path])
    with pytest.raises(ConfigError) as caught:
        load_checker("mychecker:grade")
    assert "no_such_grading_package" in str(caught.value) and "current folder" not in str(caught.value)


def test_a_checker_that_cannot_take_three_arguments_is_refused_as_it_loads(tmp_path, monkeypatch):
    """Refused before any model answers (it failed at the first grade, after the greedy answers), and a checker's
    own error names the row it failed on."""
    (tmp_path / "my_checkers.py").write_text("def two(answer, reference):\n    return 1.0\n\n"
                                             "def fussy(prompt, answer, reference, *, strict=True):\n"
                                             "    return 1.0 / len(answer)\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    with pytest.raises(ConfigError, match=r"data.checker 'my_checkers:two': two\(answer, reference\) cannot be "
                                          r"called as two\(prompt, answer, reference\)"):
        load_checker("my_checkers:two")
    fussy = load_checker("my_checkers:fussy")  # keyword-only extras are fine
    example = Example(({"role": "user", "content": "Sort: 2, 1."},), "In order: 1, 2.", origin="f line 7")
    with pytest.raises(ValueError, match="f line 7: data.checker failed on this row's answer: ZeroDivisionError"):
        checker_grades(fussy, [example], [""])


def test_checker_setting_loads():
    assert load_checker("spin_fast.sorting:score") is sorting.score


@pytest.fixture(scope="module")
def sorting_run(tmp_path_factory):
    """A tiny random Llama with a tokenizer trained on the task, and a held-out file of the task."""
    path = tmp_path_factory.mktemp("eval")
    train, held_out = sorting.make_splits(40, 6, seed=0)
    tokenizer = build_local_tokenizer([r["prompt"] + " " + r["response"] for r in train], vocab_size=320)
    torch.manual_seed(0)
    AutoModelForCausalLM.from_config(tiny_config("llama", vocab_size=len(tokenizer))).save_pretrained(path / "model")
    tokenizer.save_pretrained(path / "model")
    sorting.write_jsonl(path / "train.jsonl", train)
    sorting.write_jsonl(path / "eval.jsonl", held_out)
    return path


def forbid_loading_models(monkeypatch):
    """Any model loaded by a run or an evaluation from here on fails the test."""
    from spin_fast import evaluation, selfplay
    from spin_fast.generation import choice

    def no_loading(*args, **kwargs):
        raise AssertionError("a model was loaded")

    for module in (evaluation, selfplay, choice):
        monkeypatch.setattr(module, "load_policy", no_loading)


def eval_config(path, out, *extra):
    return load_run_config(None, [
        f"output_dir={out}", f"model.name_or_path={path / 'model'}", f"data.source={path / 'train.jsonl'}",
        f"data.eval_source={path / 'eval.jsonl'}", "data.max_length=64", "data.max_prompt_length=48",
        "generation.engine=transformers", "generation.max_new_tokens=12", "train.backend=torch", *extra])


def test_eval_scores_greedy_answers_with_the_checker(sorting_run, tmp_path, monkeypatch, capsys):
    """The score is the checker's mean over greedy answers, which are recomputed here one prompt at a
    time with transformers' generate (no batching, no padding) and graded by a checker the test writes."""
    (tmp_path / "length_checker.py").write_text(
        "def grade(prompt, response, reference):\n"
        "    return min(1.0, len(response) / len(reference))\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    config = eval_config(sorting_run, tmp_path / "run", "data.checker=length_checker:grade", "train.progress=true")
    rows = evaluate_run(SelfPlay(config), config.data.eval_source)
    assert [r["model"] for r in rows] == ["sft"]  # no iteration has run
    shown = capsys.readouterr().err
    assert "held-out log-likelihoods: 100%" in shown and "greedy answers: 100%" in shown  # the progress bars

    from transformers import AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(sorting_run / "model")
    tokenizer = AutoTokenizer.from_pretrained(sorting_run / "model")
    grades = []
    for line in (sorting_run / "eval.jsonl").read_text().splitlines():
        row = json.loads(line)
        ids = tokenizer.apply_chat_template([{"role": "user", "content": row["prompt"]}], add_generation_prompt=True,
                                            tokenize=True, return_dict=True)["input_ids"]
        with torch.no_grad():
            out = model.generate(torch.tensor([ids]), do_sample=False, max_new_tokens=12,
                                 eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id)
        answer = tokenizer.decode(out[0, len(ids):], skip_special_tokens=True)
        grades.append(min(1.0, len(answer) / len(row["response"])))
    assert rows[0]["score"] == pytest.approx(sum(grades) / len(grades), abs=1e-12)
    assert rows[0]["score_perfect"] == pytest.approx(sum(g == 1.0 for g in grades) / len(grades), abs=1e-12)
    assert 0 < rows[0]["score"] < 1  # the random model's answers have various lengths: a real test

    without = evaluate_run(SelfPlay(eval_config(sorting_run, tmp_path / "run2")), config.data.eval_source)
    assert "score" not in without[0]  # no checker: the rows are as before
    assert without[0]["loglik_per_token"] == pytest.approx(rows[0]["loglik_per_token"], abs=1e-9)


def test_eval_with_a_bad_checker_fails_before_loading_models(sorting_run, tmp_path, capsys):
    config = eval_config(sorting_run, tmp_path / "run", "data.checker=spin_fast.sorting:scroe",
                         "model.name_or_path=/nonexistent/model")
    with pytest.raises(ConfigError, match="data.checker 'spin_fast.sorting:scroe'"):
        evaluate_run(SelfPlay(config), config.data.eval_source)

    from spin_fast.cli import main

    yaml_path = tmp_path / "run.yaml"
    yaml_path.write_text(json.dumps(config.to_dict()))  # JSON is YAML
    assert main(["eval", str(yaml_path)]) == 2
    assert "data.checker 'spin_fast.sorting:scroe'" in capsys.readouterr().err


def test_eval_refuses_a_model_other_than_the_runs(sorting_run, tmp_path):
    """The run's table scores its θ0 and its iterations against their opponents: another model.name_or_path would
    silently score another θ0 under the run's name."""
    import shutil

    import yaml

    config = eval_config(sorting_run, tmp_path / "run")
    (tmp_path / "run").mkdir()
    (tmp_path / "run" / "config.yaml").write_text(yaml.safe_dump(json.loads(json.dumps(config.to_dict()))))
    shutil.copytree(sorting_run / "model", tmp_path / "model2")
    other = eval_config(sorting_run, tmp_path / "run", f"model.name_or_path={tmp_path / 'model2'}")
    with pytest.raises(ValueError, match=r"the run was started with another model: model\.name_or_path \(saved "):
        evaluate_run(SelfPlay(other), other.data.eval_source)
    assert [r["model"] for r in evaluate_run(SelfPlay(config), config.data.eval_source)] == ["sft"]


def test_a_held_out_example_longer_than_score_batch_tokens_is_named_before_any_model_is_scored(sorting_run, tmp_path,
                                                                                                 monkeypatch):
    forbid_loading_models(monkeypatch)
    config = eval_config(sorting_run, tmp_path / "run", "score_batch_tokens=8")
    message = r"^score_batch_tokens=8: .*eval\.jsonl line \d+ takes \d+ tokens"
    with pytest.raises(ValueError, match=message):
        evaluate_run(SelfPlay(config), config.data.eval_source)
    with pytest.raises(ValueError, match=message):  # a run's held-out scoring comes after training: named first
        SelfPlay(config).run()
    assert not (tmp_path / "run" / "config.yaml").exists()


def test_a_held_out_pair_longer_than_score_batch_tokens_is_named_before_its_scoring_and_its_answers_kept(
        sorting_run, tmp_path):
    """The margins' pairs (prompt, human response, the opponent's answer) are known once the opponent has answered:
    one too long is named then, before the row's scoring; the answers stay saved for the rerun with a larger
    score_batch_tokens."""
    _, examples = held_out_examples(sorting_run)
    longest = max(len(e.prompt_ids) + len(e.response_ids) for e in examples)  # each example fits, its pair not
    output, baselines = tmp_path / "run" / "eval.jsonl", {"same": str(sorting_run / "model")}
    config = eval_config(sorting_run, tmp_path / "run", f"score_batch_tokens={longest}")
    message = rf"^score_batch_tokens={longest}: iteration 0's held-out pair of \S+eval\.jsonl line \d+ takes \d+ "
    with pytest.raises(ValueError, match=message):
        evaluate_run(SelfPlay(config), config.data.eval_source, output, baselines)
    answers = tmp_path / "run" / "eval-parts" / "held-out-pairs-0.json"
    saved = json.loads(answers.read_text())
    saved["key"]["score_batch_tokens"] = longest  # as answers were saved before the key left score_batch_tokens
    answers.write_text(json.dumps(saved))
    answered = answers.stat().st_mtime_ns
    config = eval_config(sorting_run, tmp_path / "run")
    rows = evaluate_run(SelfPlay(config), config.data.eval_source, output, baselines)
    assert rows[1]["pairs"] == len(examples) and answers.stat().st_mtime_ns == answered  # not answered again


def held_out_examples(sorting_run):
    from transformers import AutoTokenizer

    from spin_fast.examples import tokenized_examples

    tokenizer = AutoTokenizer.from_pretrained(sorting_run / "model")
    config = eval_config(sorting_run, sorting_run / "unused")
    return tokenizer, tokenized_examples(tokenizer, config.data, str(sorting_run / "eval.jsonl"))


def test_shared_work_on_one_process_is_the_engine_and_scorer_output(sorting_run):
    """On one process the shared helpers run one process's batches themselves: sampled completions equal
    the engine's over all prompts (same batches, same seeds), log-probs equal model_logprobs' bit for bit."""
    from spin_fast.evaluation import shared_generate, shared_logprobs
    from spin_fast.generation.base import SamplingConfig
    from spin_fast.generation.hf_engine import TransformersEngine
    from spin_fast.packing import Sequence
    from spin_fast.scoring import model_logprobs

    tokenizer, examples = held_out_examples(sorting_run)
    model = AutoModelForCausalLM.from_pretrained(sorting_run / "model")
    prompts = [e.prompt_ids for e in examples]
    sampling = SamplingConfig(temperature=1.0, max_new_tokens=6, seed=5)
    engine = TransformersEngine(model, eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id,
                                batch_size=2, progress=False)
    assert shared_generate(model, tokenizer, prompts, sampling, 2, "answers") == engine.generate(prompts, sampling)
    groups = [[Sequence(e.prompt_ids, e.response_ids)] for e in examples]
    budget = 2 * max(s.length for g in groups for s in g)  # a few micro-batches
    assert torch.equal(shared_logprobs([model], groups, budget, "torch", "sums")[0],
                       model_logprobs(model, groups, budget, backend="torch"))


def as_ranks(monkeypatch, call, ranks: int = 2):
    """`call` (one gather inside) as rank 0 of `ranks` would run it, in this one process: a first pass per
    rank records what that rank hands the gather, then rank 0 runs with every rank's share gathered."""
    from spin_fast import distributed

    class Gathered(Exception):
        pass

    shares = []

    def record(obj, what):
        shares.append(obj)
        raise Gathered

    monkeypatch.setattr(distributed, "world_size", lambda: ranks)
    monkeypatch.setattr(distributed, "all_gather_objects", record)
    for r in range(ranks):
        monkeypatch.setattr(distributed, "rank", lambda r=r: r)
        with pytest.raises(Gathered):
            call()
    monkeypatch.setattr(distributed, "rank", lambda: 0)
    monkeypatch.setattr(distributed, "all_gather_objects", lambda obj, what: list(shares))
    return call(), [indices for indices, _ in shares]


def test_ranks_share_the_batches_and_rebuild_one_process_results(sorting_run, monkeypatch):
    """Each of 2 ranks runs a part of the micro-batches and generation batches, none twice; gathered, the
    held-out log-likelihood, the margins and the sampled answers are one process's exactly."""
    from spin_fast.evaluation import heldout_loglik, reward_margins, shared_generate
    from spin_fast.generation.base import SamplingConfig
    from spin_fast.scoring import TokenizedPair

    tokenizer, examples = held_out_examples(sorting_run)
    model = AutoModelForCausalLM.from_pretrained(sorting_run / "model")
    torch.manual_seed(1)
    other = AutoModelForCausalLM.from_config(model.config)
    budget = 2 * max(len(e.prompt_ids) + len(e.response_ids) for e in examples)
    pairs = [TokenizedPair(e.prompt_ids, e.response_ids, e.response_ids[::-1]) for e in examples]
    sampling = SamplingConfig(temperature=1.0, max_new_tokens=6, seed=5)
    calls = {
        "loglik": lambda: heldout_loglik(model, examples, budget, "torch"),
        "margins": lambda: reward_margins(other, model, pairs, 0.1, 2 * budget, "torch"),
        "answers": lambda: shared_generate(model, tokenizer, [e.prompt_ids for e in examples], sampling, 2, "a"),
    }
    alone = {name: call() for name, call in calls.items()}
    for name, call in calls.items():
        shared, shares = as_ranks(monkeypatch, call)
        assert all(shares) and sorted(sum(shares, [])) == list(range(len(sum(shares, [])))), (name, shares)
        assert shared == alone[name], name
        monkeypatch.undo()


def test_a_hub_model_is_known_by_the_revision_of_its_snapshot(tmp_path, monkeypatch):
    """fetch_model gives a Hub model's local snapshot, and the evaluation knows the model by its id and the
    snapshot's revision: a new revision of the same id is evaluated again. A local folder is known by its files."""
    from spin_fast.evaluation import model_identity
    from spin_fast.loading import fetch_model

    publish = offline_hub(monkeypatch, tmp_path / "hub")
    first = publish("org/tiny", "a" * 40)
    assert fetch_model("org/tiny") == str(first)
    second = publish("org/tiny", "b" * 40)
    assert fetch_model("org/tiny") == str(second)
    assert model_identity("org/tiny", str(first)) == {"hub": "org/tiny", "revision": "a" * 40}
    assert model_identity("org/tiny", str(second)) == {"hub": "org/tiny", "revision": "b" * 40}

    folder = tmp_path / "model"
    folder.mkdir()
    (folder / "config.json").write_text("{}")
    (folder / "model.safetensors").write_bytes(b"12345")
    assert fetch_model(str(folder)) == str(folder)
    mtimes = [(folder / name).stat().st_mtime_ns for name in ("config.json", "model.safetensors")]
    assert model_identity(str(folder), str(folder)) == [["config.json", 2, mtimes[0]],
                                                        ["model.safetensors", 5, mtimes[1]]]


def hub_serving(repo, cache, monkeypatch) -> None:
    """A stand-in for the Hub's snapshot_download (this machine has no network) that serves the files of the folder
    `repo` into a snapshot under `cache`, applying allow_patterns as the real one does."""
    import fnmatch

    import huggingface_hub

    def snapshot_download(repo_id, revision=None, allow_patterns=None, local_files_only=False, **kwargs):
        snapshot = cache / ("c" * 40)
        snapshot.mkdir(parents=True, exist_ok=True)
        for path in repo.iterdir():
            if allow_patterns is None or any(fnmatch.fnmatch(path.name, p) for p in allow_patterns):
                shutil.copy(path, snapshot / path.name)
        return str(snapshot)

    monkeypatch.setattr(huggingface_hub, "snapshot_download", snapshot_download)


def test_a_hub_model_with_pytorch_bin_weights_alone_is_fetched_whole(sft_model, tmp_path, monkeypatch):
    """Many Hub models (older ones, most fine-tunes of 2023) hold pytorch_model.bin and no safetensors: fetch_model
    brings it then (only then: a safetensors model's .bin copies stay on the Hub)."""
    from pathlib import Path

    from safetensors.torch import load_file

    from spin_fast.config import RunConfig
    from spin_fast.loading import fetch_model, load_policy

    repo = tmp_path / "remote"  # the Hub repository's files
    repo.mkdir()
    for path in (sft_model / "model").iterdir():
        if path.suffix != ".safetensors":
            shutil.copy(path, repo / path.name)
    weights = load_file(sft_model / "model" / "model.safetensors")
    torch.save(weights, repo / "pytorch_model.bin")

    hub_serving(repo, tmp_path / "cache", monkeypatch)
    folder = fetch_model("org/bin-only")
    loaded = load_policy(folder, RunConfig()).state_dict()
    assert all(torch.equal(loaded[name], tensor) for name, tensor in weights.items())
    shutil.rmtree(tmp_path / "cache")
    (repo / "model.safetensors").write_bytes((sft_model / "model" / "model.safetensors").read_bytes())
    assert not list(Path(fetch_model("org/both")).glob("*.bin"))  # safetensors: the .bin copy stays there


def test_a_hub_model_with_its_chat_template_in_chat_template_jinja_is_fetched_with_it(sft_model, tmp_path,
                                                                                      monkeypatch):
    """transformers (4.47 on, and so spin-fast's own checkpoints) saves a tokenizer's chat template in
    chat_template.jinja, not in tokenizer_config.json: fetched without that file, such a Hub model (a spin-fast SFT
    checkpoint pushed to the Hub, say) would have no template, and the run would stop as if it were a base model."""
    from spin_fast.config import ModelConfig
    from spin_fast.loading import fetch_model
    from spin_fast.model import load_tokenizer

    repo = sft_model / "model"  # its template is in chat_template.jinja alone
    assert (repo / "chat_template.jinja").exists()
    assert "chat_template" not in json.loads((repo / "tokenizer_config.json").read_text())

    hub_serving(repo, tmp_path / "cache", monkeypatch)
    folder = fetch_model("org/sft")
    tokenizer = load_tokenizer(ModelConfig(name_or_path="org/sft"), folder)
    assert tokenizer.chat_template == AutoTokenizer.from_pretrained(repo).chat_template


def test_progress_false_hides_the_libraries_own_bars(monkeypatch):
    """train.progress=false: transformers', the Hub's and datasets' bars (loading weights, downloading) hidden too."""
    import sys

    import datasets
    import huggingface_hub.utils as hub_utils
    from transformers.utils import logging as transformers_logging

    from spin_fast.loading import library_progress_bars

    def shown():
        return (transformers_logging.is_progress_bar_enabled(), not hub_utils.are_progress_bars_disabled(),
                datasets.is_progress_bar_enabled())

    switches = ((transformers_logging.enable_progress_bar, transformers_logging.disable_progress_bar),
                (hub_utils.enable_progress_bars, hub_utils.disable_progress_bars),
                (datasets.enable_progress_bars, datasets.disable_progress_bars))
    # HF_HUB_/HF_DATASETS_DISABLE_PROGRESS_BARS set where the tests run would win over the switches: unset here.
    monkeypatch.setattr(sys.modules["huggingface_hub.utils.tqdm"], "HF_HUB_DISABLE_PROGRESS_BARS", None)
    monkeypatch.setattr(sys.modules["datasets.utils.tqdm"], "HF_DATASETS_DISABLE_PROGRESS_BARS", None)
    before = shown()
    try:
        for enable, _ in switches:  # shown, whatever a test before this one set
            enable()
        library_progress_bars(True)
        assert shown() == (True, True, True)  # true leaves them be
        library_progress_bars(False)
        assert shown() == (False, False, False)
    finally:  # process-wide settings: put back for the tests after this one
        for enabled, (enable, disable) in zip(before, switches):
            (enable if enabled else disable)()


def test_a_cached_commit_is_read_without_asking_the_hub(tmp_path, monkeypatch):
    """A commit (what a resumed run asks for) already in the cache is its snapshot, with no Hub call, whatever the
    network: huggingface_hub 1.x (the GPU image has 1.33) listed a commit's files on the Hub even offline, and failed
    although the snapshot was cached. A commit not in the cache is fetched."""
    from huggingface_hub import HfApi, constants

    from spin_fast.loading import fetch_model

    publish = offline_hub(monkeypatch, tmp_path / "hub")
    first = publish("org/tiny", "a" * 40)
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
    calls = []

    def no_network(self, *args, **kwargs):
        calls.append(kwargs)
        raise OSError("the Hub is out of reach")

    for method in ("list_repo_tree", "repo_info", "model_info"):
        monkeypatch.setattr(HfApi, method, no_network)
    assert fetch_model("org/tiny", revision="a" * 40) == str(first) and not calls
    with pytest.raises(FileNotFoundError, match="the Hub is out of reach"):
        fetch_model("org/tiny", revision="c" * 40)
    assert calls  # an uncached commit goes to the Hub


def test_a_model_that_is_neither_a_folder_nor_on_the_hub_is_named_with_its_setting(tmp_path, monkeypatch):
    from spin_fast.loading import fetch_model

    offline_hub(monkeypatch, tmp_path / "hub")
    with pytest.raises(FileNotFoundError, match=r"^model.name_or_path 'runs/x/checkpoint-9': no such model folder$"):
        fetch_model("runs/x/checkpoint-9")  # a path: never sent to the Hub
    with pytest.raises(FileNotFoundError, match=r"^baseline 'csft' 'org/absent': no such model folder, and not "
                                                r"fetched as a Hub model id \(LocalEntryNotFoundError"):
        fetch_model("org/absent", "baseline 'csft'")


def test_the_hubs_error_of_several_lines_is_said_in_one(monkeypatch):
    """spin-fast says a user's error in one line: the Hub's answer to an unknown or gated repository has four."""
    import huggingface_hub

    from spin_fast.loading import fetch_model

    def not_found(*args, **kwargs):  # huggingface_hub's RepositoryNotFoundError text, as the Hub answers
        raise OSError("404 Client Error. (Request ID: Root=1-abc)\n\nRepository Not Found for url: "
                      "https://huggingface.co/api/models/org/absent.\nPlease make sure you specified the correct "
                      "`repo_id` and `repo_type`.\nIf you are trying to access a private or gated repo, make sure "
                      "you are authenticated.")

    monkeypatch.setattr(huggingface_hub, "snapshot_download", not_found)
    with pytest.raises(FileNotFoundError) as error:
        fetch_model("org/absent")
    assert str(error.value) == (
        "model.name_or_path 'org/absent': no such model folder, and not fetched as a Hub model id (OSError: 404 "
        "Client Error. (Request ID: Root=1-abc) Repository Not Found for url: https://huggingface.co/api/models/"
        "org/absent. Please make sure you specified the correct `repo_id` and `repo_type`. If you are trying to "
        "access a private or gated repo, make sure you are authenticated.)")


def test_a_model_folder_without_its_config_or_tokenizer_is_named_with_its_setting(sorting_run, tmp_path):
    """transformers' own words ("Unrecognized model ... model_type key", "Couldn't instantiate the backend
    tokenizer ... install sentencepiece") name neither the setting nor what the folder lacks."""
    import shutil

    from spin_fast.config import ModelConfig
    from spin_fast.loading import fetch_model
    from spin_fast.model import load_tokenizer

    shutil.copytree(sorting_run / "model", tmp_path / "no-config")
    (tmp_path / "no-config" / "config.json").unlink()
    with pytest.raises(FileNotFoundError, match=r"^model.name_or_path '.*no-config': no config.json in it"):
        fetch_model(str(tmp_path / "no-config"))
    (tmp_path / "no-tokenizer").mkdir()
    shutil.copy(sorting_run / "model" / "config.json", tmp_path / "no-tokenizer")
    folder = fetch_model(str(tmp_path / "no-tokenizer"))
    with pytest.raises(ValueError, match=r"^model.name_or_path '.*no-tokenizer': its tokenizer cannot be loaded from"):
        load_tokenizer(ModelConfig(name_or_path=folder), folder)


def save_model(folder, tokenizer, seed: int, **shape):
    torch.manual_seed(seed)
    AutoModelForCausalLM.from_config(tiny_config("llama", vocab_size=len(tokenizer), **shape)).save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder


def test_a_baseline_named_by_its_hub_id_is_read_from_its_snapshot_and_known_by_its_revision(sorting_run, tmp_path,
                                                                                            monkeypatch):
    """`spin-fast eval --baseline NAME=MODEL` with a Hub id: the model is read from its local snapshot, its row
    equals that of the same model given as a folder, and a new revision is evaluated again (the rest is kept)."""
    from transformers import AutoTokenizer

    from spin_fast.cli import main

    other = save_model(tmp_path / "other", AutoTokenizer.from_pretrained(sorting_run / "model"), seed=1)
    publish = offline_hub(monkeypatch, tmp_path / "hub")
    publish("org/other", "a" * 40, other)
    config = eval_config(sorting_run, tmp_path / "run")
    yaml_path = tmp_path / "run.yaml"
    yaml_path.write_text(json.dumps(config.to_dict()))
    assert main(["eval", str(yaml_path), "--baseline", "other=org/other"]) == 0
    rows = [json.loads(line) for line in (tmp_path / "run" / "eval.jsonl").read_text().splitlines()]
    assert [r["model"] for r in rows] == ["sft", "other"]
    assert rows[1]["loglik_per_token"] != rows[0]["loglik_per_token"]  # another model
    from_folder = evaluate_run(SelfPlay(eval_config(sorting_run, tmp_path / "run2")), config.data.eval_source,
                               baselines={"other": str(other)})
    assert from_folder == rows
    parts = tmp_path / "run" / "eval-parts"
    key = json.loads((parts / "other.json").read_text())["key"]
    assert key["evaluated"] == {"hub": "org/other", "revision": "a" * 40}

    sft_saved = (parts / "sft.json").stat().st_mtime_ns
    publish("org/other", "b" * 40, sorting_run / "model")  # its new revision: the SFT model's weights
    again = evaluate_run(SelfPlay(config), config.data.eval_source, tmp_path / "run" / "eval.jsonl",
                         baselines={"other": "org/other"})
    assert again[1]["loglik_per_token"] == pytest.approx(rows[0]["loglik_per_token"], abs=1e-12)
    assert again[0] == rows[0] and (parts / "sft.json").stat().st_mtime_ns == sft_saved  # kept, not evaluated again


def test_baselines_that_cannot_be_evaluated_are_refused_before_any_model_loads(sorting_run, tmp_path, monkeypatch,
                                                                               capsys):
    from transformers import AutoTokenizer

    from spin_fast.cli import main
    from spin_fast.evaluation import check_baseline_fits

    forbid_loading_models(monkeypatch)
    offline_hub(monkeypatch, tmp_path / "hub")
    tokenizer = AutoTokenizer.from_pretrained(sorting_run / "model")
    config = eval_config(sorting_run, tmp_path / "run")
    other_words = build_local_tokenizer(["a different vocabulary, learned from other text"] * 4, vocab_size=300)
    refused = {
        "iter-0": (ConfigError, "baseline 'iter-0': the name of one of the run's own models or files"),
        "held-out-pairs-0": (ConfigError, "baseline 'held-out-pairs-0': the name of one of the run's own models or"),
        "a/b": (ConfigError, "baseline 'a/b': a name of letters, digits"),
        "gone": (FileNotFoundError, "baseline 'gone' '/nonexistent/checkpoint-9': no such model folder"),
        "words": (ConfigError, r"baseline 'words' .*: its tokenizer's vocabulary \(\d+ tokens\) is not the SFT model's "
                                r"\(320 tokens\)"),
        "empty": (FileNotFoundError, "baseline 'empty' '.*empty': no config.json in it: not a model folder"),
    }
    paths = {"iter-0": str(sorting_run / "model"), "a/b": str(sorting_run / "model"),
             "held-out-pairs-0": str(sorting_run / "model"),
             "gone": "/nonexistent/checkpoint-9", "words": str(save_model(tmp_path / "words", other_words, seed=2)),
             "empty": str((tmp_path / "empty").mkdir() or tmp_path / "empty")}
    for name, (error, message) in refused.items():
        with pytest.raises(error, match=message):
            evaluate_run(SelfPlay(config), config.data.eval_source, baselines={name: paths[name]})

    # With vLLM a baseline's weights go into the engine started from the SFT model: its shapes must be the SFT
    # model's. The transformers engine loads each model whole, of any shape.
    wider = str(save_model(tmp_path / "wider", tokenizer, seed=3, hidden_size=96, heads=3))
    with pytest.raises(ConfigError, match="baseline 'wider' .*: hidden_size 96, the SFT model's 64: the vLLM engine"):
        check_baseline_fits("wider", wider, str(sorting_run / "model"), tokenizer, "vllm")
    check_baseline_fits("wider", wider, str(sorting_run / "model"), tokenizer, "transformers")
    check_baseline_fits("same", str(sorting_run / "model"), str(sorting_run / "model"), tokenizer, "vllm")

    yaml_path = tmp_path / "run.yaml"
    yaml_path.write_text(json.dumps(config.to_dict()))
    for options, message in ((["--baseline", "continued-sft"], "--baseline 'continued-sft': expected NAME=MODEL"),
                             (["--baseline", "a=x", "--baseline", "a=y"], "--baseline 'a=y': 'a' is named twice"),
                             (["--baseline", "csft=runs/x/checkpoint-9"], "baseline 'csft' 'runs/x/checkpoint-9': no "
                                                                          "such model folder")):
        assert main(["eval", str(yaml_path), *options]) == 2
        assert f"spin-fast: {message}" in capsys.readouterr().err
    (tmp_path / "run2.yaml").write_text(json.dumps({**config.to_dict(), "model": {"name_or_path": "runs/x/final"}}))
    assert main(["eval", str(tmp_path / "run2.yaml")]) == 2
    assert "spin-fast: model.name_or_path 'runs/x/final': no such model folder" in capsys.readouterr().err


def test_a_baseline_whose_rope_or_context_cannot_take_data_max_length_is_refused_before_any_model_loads(
        sorting_run, tmp_path, monkeypatch):
    """The run's own model is checked against data.max_length before any work (its context, and Phi-3's longrope,
    which switches a whole packed row's frequencies past original_max_position_embeddings); a baseline (any config
    under the transformers engine) is scored the same way, so it is checked the same way, by its name and path, not
    refused (or scored wrong) only when its turn comes, after the other models' work."""
    import transformers

    tokenizer = AutoTokenizer.from_pretrained(sorting_run / "model")
    rope = dict(rope_type="longrope", rope_theta=10000.0, short_factor=[1.0] * 16, long_factor=[4.0] * 16)
    longrope = transformers.Phi3Config(vocab_size=len(tokenizer), hidden_size=64, intermediate_size=128,
                                       num_hidden_layers=2, num_attention_heads=2, num_key_value_heads=2,
                                       pad_token_id=0, eos_token_id=tokenizer.eos_token_id, max_position_embeddings=256,
                                       original_max_position_embeddings=32, rope_parameters=rope)
    AutoModelForCausalLM.from_config(longrope).save_pretrained(tmp_path / "phi3")
    save_model(tmp_path / "short", tokenizer, seed=4, max_positions=16)
    forbid_loading_models(monkeypatch)
    config = eval_config(sorting_run, tmp_path / "run")  # data.max_length=64
    phi3 = re.escape(str(tmp_path / "phi3"))
    with pytest.raises(ValueError, match=rf"^baseline 'phi3': data.max_length=64: {phi3}'s longrope "
                                         r"rotary embeddings .* past 32 tokens, .* data.max_length to at most 32$"):
        evaluate_run(SelfPlay(config), config.data.eval_source, baselines={"phi3": str(tmp_path / "phi3")})
    with pytest.raises(ValueError, match=r"^baseline 'short': \d+ of \d+ examples are longer than the model's "
                                         r"context of 16 tokens \(max_position_embeddings\), the first .*eval.jsonl"):
        evaluate_run(SelfPlay(config), config.data.eval_source, baselines={"short": str(tmp_path / "short")})


def test_vllm_answers_are_made_again_when_bf16_autocast_changes_the_dtype_they_are_served_in(sorting_run, tmp_path,
                                                                                               monkeypatch):
    """vLLM serves in bf16 under train.bf16_autocast, so the greedy and the opponents' held-out answers depend on it:
    an fp32 engine's saved answers are not a bf16 evaluation's (their key left the autocast out, as the scoring's)."""
    pytest.importorskip("vllm")
    from spin_fast.generation import vllm_engine
    from spin_fast.generation.base import Completion

    started = []

    class EngineThatSaysItsDtype:  # the same model's answers, which show the dtype the engine was started in
        def __init__(self, model_dir, **options):
            self.dtype = options["dtype"]
            started.append(self.dtype)

        def generate(self, prompts, sampling, indices=None):
            return [[Completion((5 if self.dtype == "bfloat16" else 6,) * 3, True)] for _ in prompts]

        def sleep(self):
            pass

        def wake_up(self):
            pass

        def load_weights_from(self, folder):
            pass

        def close(self):
            pass

    monkeypatch.setattr(vllm_engine, "VllmEngine", EngineThatSaysItsDtype)
    output = tmp_path / "run" / "eval.jsonl"
    for autocast in ("false", "true", "true"):  # the third evaluation keeps the second's work
        config = eval_config(sorting_run, tmp_path / "run", "generation.engine=vllm", "generation.max_new_tokens=4",
                             f"train.bf16_autocast={autocast}", "train.progress=false")
        evaluate_run(SelfPlay(config), config.data.eval_source, output, {"same": str(sorting_run / "model")})
    assert started == ["float32", "bfloat16"]


def test_a_hub_dataset_that_changed_is_evaluated_again(sorting_run, tmp_path, monkeypatch):
    """data.eval_source may be a Hub dataset's name (datasets.load_dataset). Its rows are read afresh each time, but
    the saved pieces were keyed by the name alone, and a new revision of the dataset (other rows) reused the figures
    computed on the old one. A name that is no local path is known by its rows."""
    import datasets

    rows = [json.loads(line) for line in (sorting_run / "eval.jsonl").read_text().splitlines()]
    served = {"rows": rows}
    monkeypatch.setattr(datasets, "load_dataset", lambda name, split: datasets.Dataset.from_list(served["rows"]))
    config = eval_config(sorting_run, tmp_path / "run", "data.eval_source=org/held-out", "data.split=test")
    output = tmp_path / "run" / "eval.jsonl"
    first = evaluate_run(SelfPlay(config), "org/held-out", output)
    served["rows"] = rows[:2]  # the dataset's new revision: other rows
    again = evaluate_run(SelfPlay(config), "org/held-out", output)
    fresh = evaluate_run(SelfPlay(eval_config(sorting_run, tmp_path / "fresh", "data.eval_source=org/held-out",
                                              "data.split=test")), "org/held-out", tmp_path / "fresh" / "eval.jsonl")
    assert fresh[0]["responses"] == 2 and first[0]["responses"] == len(rows)
    assert again == fresh


def test_a_baseline_with_the_sft_models_hub_id_is_refused(sorting_run, tmp_path, monkeypatch):
    """The run keeps the commit its θ0 was fetched at (sft-model.json) and eval is to score that θ0. A baseline
    named by the same Hub id (its newest revision: has upstream moved on?) is fetched into the same dict entry,
    and the SFT row then scored the newest revision, with its tokenizer: refused, by name."""
    tokenizer = AutoTokenizer.from_pretrained(sorting_run / "model")
    newer = save_model(tmp_path / "newer", tokenizer, seed=1)
    publish = offline_hub(monkeypatch, tmp_path / "hub")
    publish("org/sft", "a" * 40, sorting_run / "model")
    publish("org/sft", "b" * 40, newer)  # main moved on
    run = tmp_path / "run"
    run.mkdir()
    (run / "sft-model.json").write_text(json.dumps({"name": "org/sft", "revision": "a" * 40}))
    config = eval_config(sorting_run, run, "model.name_or_path=org/sft")
    with pytest.raises(ConfigError, match=r"baseline 'upstream': 'org/sft' is the SFT model's Hub id, which here names "
                                          r"the run's θ0 at revision a{40}"):
        evaluate_run(SelfPlay(config), config.data.eval_source, baselines={"upstream": "org/sft"})


def test_vllm_refuses_a_baseline_whose_config_differs_beyond_the_shapes(sorting_run, tmp_path):
    """With vLLM the baseline's weights are read into the engine started from the SFT model, which keeps the SFT
    model's config: RoPE's base, the norm's epsilon, the activation. A baseline of the same shapes but another
    rope_theta (Mistral-7B v0.1 and v0.2: 1e4 and 1e6, same shapes and vocabulary) would answer with the SFT
    model's rope_theta, while its log-likelihood and margins (transformers, its own config) use its own."""
    tokenizer = AutoTokenizer.from_pretrained(sorting_run / "model")
    for key, value in (("rope_parameters", {"rope_theta": 1e6, "rope_type": "default"}), ("rms_norm_eps", 1e-2),
                       ("hidden_act", "gelu")):
        folder = tmp_path / key
        shutil.copytree(sorting_run / "model", folder)
        config = json.loads((folder / "config.json").read_text())
        config[key] = value
        (folder / "config.json").write_text(json.dumps(config))
        with pytest.raises(ConfigError, match=f"baseline 'other' .*{key}"):
            check_baseline_fits("other", str(folder), str(sorting_run / "model"), tokenizer, "vllm")
    # vLLM stops on the starting model's generation config's end-of-sequence ids alone.
    folder = tmp_path / "other-stops"
    shutil.copytree(sorting_run / "model", folder)
    (folder / "generation_config.json").write_text(json.dumps({"eos_token_id": [2, 5]}))
    if (sorting_run / "model" / "generation_config.json").exists():
        with pytest.raises(ConfigError, match="baseline 'other' .*eos_token_id \\[2, 5\\]"):
            check_baseline_fits("other", str(folder), str(sorting_run / "model"), tokenizer, "vllm")
    for key, value in (("pad_token_id", 7), ("_name_or_path", "elsewhere")):  # change no answer: accepted
        config = json.loads((sorting_run / "model" / "config.json").read_text())
        (folder / "config.json").write_text(json.dumps({**config, key: value}))
        shutil.copy(sorting_run / "model" / "generation_config.json", folder)
        check_baseline_fits("other", str(folder), str(sorting_run / "model"), tokenizer, "vllm")


@pytest.mark.slow
def test_vllm_started_from_a_baseline_without_tokenizer_files(sorting_run, tmp_path, monkeypatch):
    """A baseline folder without tokenizer files is allowed (it is evaluated with the SFT model's tokenizer), and a
    first evaluation serves it by swapping its weights into the engine started from the SFT model. Run again with
    it the only new model, the engine started from the baseline's folder instead (and failed in vLLM, naming
    neither): it starts from the SFT model's, whatever model answers first."""
    pytest.importorskip("vllm")
    from spin_fast.generation import vllm_engine
    from spin_fast.generation.base import Completion

    bare = tmp_path / "bare"
    bare.mkdir()
    for name in ("config.json", "model.safetensors", "generation_config.json"):
        if (sorting_run / "model" / name).exists():
            shutil.copy(sorting_run / "model" / name, bare)
    real = vllm_engine.VllmEngine
    started = []

    class Canned:  # the first evaluation's answers: saved like any engine's
        def __init__(self, model_dir, **options):
            started.append(str(model_dir))

        def generate(self, prompts, sampling, indices=None):
            return [[Completion((5, 6, 7), True)] for _ in prompts]

        def sleep(self):
            pass

        wake_up = close = sleep

        def load_weights_from(self, folder):
            pass

    monkeypatch.setattr(vllm_engine, "VllmEngine", Canned)
    output = tmp_path / "run" / "eval.jsonl"
    config = eval_config(sorting_run, tmp_path / "run", "data.checker=spin_fast.sorting:score",
                         "generation.engine=vllm", "train.progress=false")
    evaluate_run(SelfPlay(config), config.data.eval_source, output, {"same": str(sorting_run / "model")})

    class Recorded(real):
        def __init__(self, model_dir, **options):
            started.append(str(model_dir))
            super().__init__(model_dir, **options)

    monkeypatch.setattr(vllm_engine, "VllmEngine", Recorded)
    rows = evaluate_run(SelfPlay(config), config.data.eval_source, output,
                        {"same": str(sorting_run / "model"), "bare": str(bare)})
    assert [r["model"] for r in rows] == ["sft", "same", "bare"]
    assert started[-1] == str(sorting_run / "model")  # the engine is the SFT model's, whatever model answers first


def test_a_baseline_name_that_is_another_models_answers_file_is_refused(sorting_run, tmp_path):
    """A baseline's row is saved as <name>.json in eval-parts, beside greedy-answers-<model>.json: a baseline named
    greedy-answers-sft overwrites the SFT model's greedy answers with its row, and the next evaluation that needs
    them (another checker) made the SFT model answer again: the name is refused."""
    config = eval_config(sorting_run, tmp_path / "run", "data.checker=spin_fast.sorting:score")
    with pytest.raises(ConfigError, match="baseline 'greedy-answers-sft': the name of one of the run's own"):
        evaluate_run(SelfPlay(config), config.data.eval_source, tmp_path / "run" / "eval.jsonl",
                     {"greedy-answers-sft": str(sorting_run / "model")})


def test_a_held_out_prompt_too_long_to_answer_whole_is_named_by_its_file_and_line(sorting_run, tmp_path):
    """Under data.cut_prompt=when_too_long the held-out prompts are answered whole: one that with its answer exceeds
    the model's context is named by its file and line, as the run names a training prompt, not by an index."""
    held_out = tmp_path / "long.jsonl"
    rows = [("Sort: 2, 1.", "In order: 1, 2."), (" ".join(["Sort: 9, 4, 7."] * 300), "In order: 4, 7, 9.")]
    held_out.write_text("".join(json.dumps({"prompt": q, "response": a}) + "\n" for q, a in rows))
    config = eval_config(sorting_run, tmp_path / "run", f"data.eval_source={held_out}", "data.cut_prompt=when_too_long",
                         "data.checker=spin_fast.sorting:score")
    with pytest.raises(ValueError, match=r"1 of 2 prompts are too long to answer whole, the first \S+long\.jsonl "
                                         r"line 2: \d+ tokens and generation\.max_new_tokens=12 exceed"):
        evaluate_run(SelfPlay(config), config.data.eval_source)


def test_eval_of_a_hub_dataset_digests_its_rows_once(sorting_run, tmp_path, monkeypatch):
    """A Hub dataset is known by its rows' digest, which the ranks' check of the tokenized rows takes too: one pass
    over the held-out text, not two."""
    import datasets

    from spin_fast import evaluation, examples

    rows = [json.loads(line) for line in (sorting_run / "eval.jsonl").read_text().splitlines()]
    monkeypatch.setattr(datasets, "load_dataset", lambda name, split: datasets.Dataset.from_list(rows))
    digests = []
    digest = examples.rows_digest
    for module in (evaluation, examples):
        monkeypatch.setattr(module, "rows_digest", lambda raw: digests.append(len(raw)) or digest(raw))
    config = eval_config(sorting_run, tmp_path / "run", "data.eval_source=org/held-out", "data.split=test")
    assert evaluate_run(SelfPlay(config), "org/held-out")[0]["responses"] == len(rows)
    assert digests == [len(rows)]


def test_the_held_out_rows_are_read_from_data_eval_split(sorting_run, tmp_path):
    """A Hub dataset's folder holds its held-out split beside the training one (ultrachat_200k: test_sft beside
    train_sft): data.eval_split picks the held-out one. Without it data.split serves both, and eval scored the
    training split as held-out data."""
    folder = tmp_path / "data"
    folder.mkdir()
    shutil.copy(sorting_run / "train.jsonl", folder / "train_sft-00000-of-00001.jsonl")
    shutil.copy(sorting_run / "eval.jsonl", folder / "test_sft-00000-of-00001.jsonl")
    held_out = len((sorting_run / "eval.jsonl").read_text().splitlines())
    settings = [f"data.source={folder}", f"data.eval_source={folder}", "data.split=train_sft"]
    config = eval_config(sorting_run, tmp_path / "run", *settings, "data.eval_split=test_sft")
    assert evaluate_run(SelfPlay(config), str(folder))[0]["responses"] == held_out
    config = eval_config(sorting_run, tmp_path / "again", *settings)  # data.split's rows: the training set's 40
    assert evaluate_run(SelfPlay(config), str(folder))[0]["responses"] == 40 != held_out


def test_a_folder_of_splits_saved_whole_by_older_code_is_evaluated_again(sorting_run, tmp_path, monkeypatch):
    """spin-fast before the split-aware folder reading (session 39) read every file of a folder holding a Hub dataset's
    splits side by side; this code reads data.split's alone. The saved figures were keyed by the folder's files, which
    did not change: they were reused, scored on every split's rows, beside new rows scored on one split's."""
    import spin_fast.data
    import spin_fast.evaluation

    folder = tmp_path / "data"
    folder.mkdir()
    shutil.copy(sorting_run / "eval.jsonl", folder / "train-00000-of-00001.jsonl")
    (folder / "test-00000-of-00001.jsonl").write_text(
        "\n".join((sorting_run / "train.jsonl").read_text().splitlines()[:3]))
    output = tmp_path / "run" / "eval.jsonl"
    config = eval_config(sorting_run, tmp_path / "run", f"data.eval_source={folder}")
    with monkeypatch.context() as old_code:  # every file of the folder, as older code read it
        old_code.setattr(spin_fast.data, "_split_files", lambda path, files, *_: files)
        # and keyed its figures by the folder's files alone
        old_code.setattr(spin_fast.evaluation, "reads_one_split", lambda source: False, raising=False)
        assert evaluate_run(SelfPlay(config), str(folder), output)[0]["responses"] == 9
    again = evaluate_run(SelfPlay(config), str(folder), output)
    fresh = evaluate_run(SelfPlay(eval_config(sorting_run, tmp_path / "fresh", f"data.eval_source={folder}")),
                         str(folder), tmp_path / "fresh" / "eval.jsonl")
    assert fresh[0]["responses"] == 6
    assert again == fresh


def test_a_baseline_whose_vocabulary_is_smaller_than_the_held_out_ids_is_refused_before_any_model_loads(
        sorting_run, tmp_path, monkeypatch):
    """A baseline is given the held-out rows as the SFT model's tokenizer tokenizes them. A baseline model whose
    embeddings have fewer rows (a model of the same tokenizer before tokens were added, saved without tokenizer
    files) was not checked, as run, sft and eval check the SFT model: it failed with an IndexError deep in the
    embedding (on a GPU a device-side assert) once its answers began, after the SFT model's row was computed."""
    folder = tmp_path / "small"  # no tokenizer files: config.json and the weights alone
    AutoModelForCausalLM.from_config(tiny_config("llama", vocab_size=100)).save_pretrained(folder)
    forbid_loading_models(monkeypatch)
    config = eval_config(sorting_run, tmp_path / "run")
    with pytest.raises(ValueError, match=rf"^baseline 'small': {sorting_run / 'eval.jsonl'} line \d+: token id \d+ .* "
                                         rf"is outside the model's vocabulary of 100 tokens \(vocab_size in {folder}"):
        evaluate_run(SelfPlay(config), config.data.eval_source, baselines={"small": str(folder)})


def test_eval_rows_equal_a_float64_recomputation_by_hand(sorting_run, tmp_path):
    """The log-likelihoods and a baseline's margins against the SFT model, recomputed here in float64 with plain
    forward passes, one sequence at a time, on the token ids eval scored (the held-out pairs it saved)."""
    from spin_fast.data import response_end

    tokenizer, examples = held_out_examples(sorting_run)
    other = save_model(tmp_path / "other", tokenizer, seed=3)
    output = tmp_path / "run" / "eval.jsonl"
    config = eval_config(sorting_run, tmp_path / "run", "score_batch_tokens=200", "train.beta=0.3")
    rows = evaluate_run(SelfPlay(config), config.data.eval_source, output, {"other": str(other)})
    sft = AutoModelForCausalLM.from_pretrained(sorting_run / "model").double().eval()
    base = AutoModelForCausalLM.from_pretrained(other).double().eval()

    def logprob(model, prompt, response) -> float:
        ids = torch.tensor([[*prompt, *response]])
        with torch.no_grad():
            logps = model(ids).logits[0, :-1].log_softmax(-1)
        return float(logps[len(prompt) - 1:].gather(1, ids[0, len(prompt):, None]).sum())

    assert all(e.response_ids[-len(response_end(tokenizer)):] == response_end(tokenizer) for e in examples)
    tokens = sum(len(e.response_ids) for e in examples)
    for row, model in zip(rows, (sft, base)):
        sums = [logprob(model, e.prompt_ids, e.response_ids) for e in examples]
        assert row["loglik_per_token"] == pytest.approx(sum(sums) / tokens, abs=1e-5)
        assert row["loglik_per_response"] == pytest.approx(sum(sums) / len(sums), abs=1e-4)
        assert row["responses"] == len(examples)
    pairs = json.loads((tmp_path / "run" / "eval-parts" / "held-out-pairs-0.json").read_text())["value"]
    real = [0.3 * (logprob(base, p, r) - logprob(sft, p, r)) for p, r, _ in pairs]
    generated = [0.3 * (logprob(base, p, g) - logprob(sft, p, g)) for p, _, g in pairs]
    margins = [a - b for a, b in zip(real, generated)]
    n = len(pairs)
    assert n == len(examples) and rows[1]["pairs"] == n
    assert rows[1]["rewards/real"] == pytest.approx(sum(real) / n, abs=1e-5)
    assert rows[1]["rewards/generated"] == pytest.approx(sum(generated) / n, abs=1e-5)
    assert rows[1]["rewards/margins"] == pytest.approx(sum(margins) / n, abs=1e-5)
    assert rows[1]["rewards/accuracies"] == sum(m > 0 for m in margins) / n


def test_saved_rows_of_responses_ended_otherwise_are_evaluated_again(tmp_path, monkeypatch):
    """A chat template whose turn end no token holds ('<|im_end|>' split into pieces): spin-fast before stop strings
    ended the held-out responses with the tokenizer's EOS, this code with the turn end's pieces. Rows and answers
    saved by that code are other figures (other token ids): evaluated again, not mixed into the new table."""
    from test_data import chatml_tokenizer

    from spin_fast import data as data_module
    from spin_fast.generation import choice

    train, held_out = sorting.make_splits(20, 4, seed=0)
    corpus = [r["prompt"] + " " + r["response"] + "<|im_end|>\n" for r in train]
    tokenizer = chatml_tokenizer(im_end_added=False, corpus=corpus)
    assert len(tokenizer.encode("<|im_end|>", add_special_tokens=False)) > 1
    save_model(tmp_path / "model", tokenizer, seed=0)
    sorting.write_jsonl(tmp_path / "train.jsonl", train)
    sorting.write_jsonl(tmp_path / "eval.jsonl", held_out)
    baselines = {"other": str(save_model(tmp_path / "other", tokenizer, seed=1))}

    def evaluate(out):
        config = eval_config(tmp_path, tmp_path / out)
        return evaluate_run(SelfPlay(config), config.data.eval_source, tmp_path / out / "eval.jsonl", baselines)

    with monkeypatch.context() as older:  # the older code: no turn end text, responses end with EOS
        older.setattr(data_module, "turn_end_text", lambda tokenizer: None)
        older.setattr(choice, "turn_end_text", lambda tokenizer: None)
        before = evaluate("run")
    again, fresh = evaluate("run"), evaluate("fresh")
    assert before[0]["loglik_per_token"] != fresh[0]["loglik_per_token"]  # other token ids: other figures
    assert again == fresh


def test_models_that_disagree_on_sharing_prompts_score_as_one_process_on_two_ranks(sorting_run, monkeypatch):
    """shared_logprobs of a policy that shares prompts (spin_varlen) and an opponent that cannot (eager): one
    process's micro-batches (cut without sharing, which both can run), and 2 ranks give its sums bit for bit,
    close to each model scored alone."""
    from spin_fast.evaluation import shared_logprobs
    from spin_fast.model import can_share_prompts, load_causal_lm
    from spin_fast.scoring import TokenizedPair, model_logprobs

    _, examples = held_out_examples(sorting_run)
    sharing = load_causal_lm(sorting_run / "model", attention_impl="auto")
    eager = load_causal_lm(sorting_run / "model", attention_impl="eager")
    assert can_share_prompts(sharing) and not can_share_prompts(eager)
    groups = [TokenizedPair(e.prompt_ids, e.response_ids, e.response_ids[::-1]).sequences() for e in examples]
    budget = 2 * max(sum(s.length for s in g) for g in groups)
    alone = shared_logprobs([sharing, eager], groups, budget, "torch", "sums")
    shared, shares = as_ranks(monkeypatch, lambda: shared_logprobs([sharing, eager], groups, budget, "torch", "s"))
    assert all(shares) and all(torch.equal(a, b) for a, b in zip(alone, shared))
    monkeypatch.undo()
    for model, sums in zip((sharing, eager), alone):
        assert torch.allclose(sums, model_logprobs(model, groups, budget, backend="torch"), atol=1e-4)
    assert torch.allclose(alone[0], alone[1], atol=1e-4)  # the same weights


def test_a_held_out_pair_longer_than_score_batch_tokens_is_named_by_its_file_and_line(sorting_run, tmp_path):
    """The held-out pair too long to score is named by its row's file and line, as a held-out example is: its index
    among the pairs is not its line once a bad row is skipped before it (data.skip_invalid)."""
    tokenizer, examples = held_out_examples(sorting_run)
    pair_tokens = [len(e.prompt_ids) + len(e.response_ids) for e in examples]
    longest = max(pair_tokens)
    lines = (sorting_run / "eval.jsonl").read_text().splitlines()
    held_out = tmp_path / "held.jsonl"
    held_out.write_text("\n".join([json.dumps({"prompt": "no response"}), *lines]) + "\n")  # line 1: skipped
    config = eval_config(sorting_run, tmp_path / "run", f"score_batch_tokens={longest}", "data.skip_invalid=true",
                         f"data.eval_source={held_out}")
    with pytest.raises(ValueError) as error:
        evaluate_run(SelfPlay(config), config.data.eval_source, tmp_path / "run" / "eval.jsonl",
                     {"same": str(sorting_run / "model")})
    named = rf"score_batch_tokens={longest}: iteration 0's held-out pair of \S+held\.jsonl line \d+ takes \d+ tokens"
    assert re.match(named, str(error.value))
    line = int(re.search(r"line (\d+)", str(error.value)).group(1))
    assert line >= 2 and json.loads((held_out.read_text().splitlines())[line - 1])["prompt"]  # a real row's line


@pytest.mark.slow
def test_a_signal_while_evals_vllm_engine_starts_stops_before_it_answers(sorting_run, tmp_path, monkeypatch):
    """Starting vLLM takes minutes: a signal meanwhile stopped `spin-fast eval` only once the engine had answered
    every held-out prompt (the SFT model's greedy answers), where `spin-fast run` stops as soon as the engine is up.
    It stops there now, before any answer, and the engine's processes are shut down."""
    pytest.importorskip("vllm")
    import os
    import signal

    import psutil

    from spin_fast import stopping
    from spin_fast.generation import vllm_engine

    real = vllm_engine.VllmEngine
    engines = []

    class Signalled(real):
        def __init__(self, model_dir, **options):
            super().__init__(model_dir, **options)
            engines.append(self)
            os.kill(os.getpid(), signal.SIGTERM)  # handled at once (the main thread), as the engine comes up

    monkeypatch.setattr(vllm_engine, "VllmEngine", Signalled)
    before = {p.pid for p in psutil.Process().children(recursive=True)}
    output = tmp_path / "run" / "eval.jsonl"
    config = eval_config(sorting_run, tmp_path / "run", "data.checker=spin_fast.sorting:score",
                         "generation.engine=vllm", "train.progress=false")
    with stopping.signals_handled(), pytest.raises(stopping.Stopped) as stop:
        evaluate_run(SelfPlay(config), config.data.eval_source, output)
    assert stop.value.agreed, stop.value
    assert "as the generation engine started, before greedy answers" in str(stop.value)
    assert not (tmp_path / "run" / "eval-parts" / "greedy-answers-sft.json").exists()  # nothing answered
    assert len(engines) == 1 and engines[0]._closed

    def resource_tracker(process):  # multiprocessing's: it ends by itself, later
        try:
            return "resource_tracker" in " ".join(process.cmdline())
        except psutil.Error:  # a zombie, ended
            return False

    started = [p for p in psutil.Process().children(recursive=True)
               if p.pid not in before and not resource_tracker(p)]
    _, left = psutil.wait_procs(started, timeout=30)  # shut down: they end within moments
    assert not left, left


def test_shared_logprobs_makes_each_row_once(monkeypatch):
    """shared_logprobs deals out one process's micro-batches by their groups' indices and each is packed again where
    it is scored: the rows' tensors are made there alone, not for the whole set first as well (a minute of tensors
    made and dropped for a large held-out set). The sums stay model_logprobs' bit for bit."""
    from spin_fast import packing
    from spin_fast.evaluation import shared_logprobs
    from spin_fast.packing import Sequence, pack_groups
    from spin_fast.scoring import model_logprobs

    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(tiny_config("llama", vocab_size=64, hidden_size=32))
    groups = [[Sequence(tuple(torch.randint(1, 64, (int(torch.randint(1, 9, ())),)).tolist()),
                        tuple(torch.randint(1, 64, (int(torch.randint(1, 9, ())),)).tolist()))] for _ in range(40)]
    budget = 3 * max(s.length for g in groups for s in g)
    rows = [batch.group_indices.tolist() for batch in pack_groups(groups, budget, first_fit_decreasing=True)]
    built = []
    real_build = packing._build
    monkeypatch.setattr(packing, "_build", lambda chunk_groups, indices, *rest: built.append(len(indices)) or
                        real_build(chunk_groups, indices, *rest))
    sums = shared_logprobs([model], groups, budget, "torch", "sums")[0]
    # Each row once where it is scored, and each scoring call's one-token filler (made, not run, on one process).
    assert sorted(built) == sorted([len(row) for row in rows] + [1] * len(rows))
    assert torch.equal(sums, model_logprobs(model, groups, budget, backend="torch"))


def test_the_checker_is_given_the_users_last_turn_and_grades_below_0_are_refused():
    """A conversation's prompt (data.keep_history) holds several user turns: the checker grades the answer to the
    last one, as the README says."""
    from spin_fast.data import Example
    from spin_fast.evaluation import checker_grades

    example = Example(({"role": "user", "content": "Sort: 2, 1."}, {"role": "assistant", "content": "1, 2"},
                       {"role": "user", "content": "Sort: 9, 8."}), "8, 9", origin="f line 3")
    seen = []
    checker_grades(lambda prompt, answer, reference: seen.append(prompt) or 1.0, [example], ["8, 9"])
    assert seen == ["Sort: 9, 8."]
    with pytest.raises(ValueError, match=r"f line 3: the checker graded an answer -0.5, outside \[0, 1\]"):
        checker_grades(lambda *args: -0.5, [example], [""])


def test_each_iteration_is_scored_against_its_opponent_with_its_own_beta_and_sampling(sorting_run, tmp_path,
                                                                                       monkeypatch):
    """Iteration t's row: its model θt+1's margins against θt (the SFT model for t = 0, iteration t-1's checkpoint
    after), on θt's answers sampled with iteration t's settings, rewards scaled by iteration t's beta: its
    iteration_overrides, not iteration 0's. The rows' wiring alone, on two stand-in checkpoints (no model runs)."""
    from spin_fast import evaluation
    from spin_fast.generation.base import Completion

    sft, checkpoints = str(sorting_run / "model"), [str(tmp_path / "iter-0"), str(tmp_path / "iter-1")]
    monkeypatch.setattr(evaluation, "finished_summaries", lambda run_dir: [{"checkpoint": c} for c in checkpoints])
    monkeypatch.setattr(evaluation.Evaluation, "model_at", lambda self, path: path)  # each model stands as its path
    monkeypatch.setattr(evaluation, "heldout_loglik", lambda model, examples, **scoring: {})
    monkeypatch.setattr(evaluation, "check_pairs_fit", lambda *args, **kwargs: None)
    answered = []

    def generate(self, path, prompts, sampling, what, names=None, end_tokens=0):
        answered.append((path, sampling.temperature))
        return [[Completion((5, 6), True)] for _ in prompts]

    monkeypatch.setattr(evaluation.Answering, "generate", generate)
    monkeypatch.setattr(evaluation, "reward_margins",
                        lambda policy, opponent, pairs, beta, **scoring: {"scored": [policy, opponent, beta]})
    config = eval_config(sorting_run, tmp_path / "run", "iterations=2", "train.beta=0.1", "generation.temperature=0.7",
                         "iteration_overrides.1.train.beta=0.5", "iteration_overrides.1.generation.temperature=0.3")
    rows = evaluate_run(SelfPlay(config), config.data.eval_source)
    assert [(r["model"], r.get("scored")) for r in rows] == [
        ("sft", None), ("iter-0", [checkpoints[0], sft, 0.1]), ("iter-1", [checkpoints[1], checkpoints[0], 0.5])]
    assert answered == [(sft, 0.7), (checkpoints[0], 0.3)]
    # Saved rows: iteration 1's is made again after its settings change (its saved key held them), iteration 0's
    # (its settings unchanged) is read back.
    def evaluated(beta, temperature):
        answered.clear()
        config = eval_config(sorting_run, tmp_path / "run", "iterations=2", "train.beta=0.1",
                             "generation.temperature=0.7", f"iteration_overrides.1.train.beta={beta}",
                             f"iteration_overrides.1.generation.temperature={temperature}")
        return [r.get("scored") for r in evaluate_run(SelfPlay(config), config.data.eval_source, tmp_path / "e.jsonl")]

    assert evaluated(0.5, 0.3)[1:] == [[checkpoints[0], sft, 0.1], [checkpoints[1], checkpoints[0], 0.5]]
    assert evaluated(0.5, 0.2)[2] == [checkpoints[1], checkpoints[0], 0.5] and answered == [(checkpoints[0], 0.2)]
    assert evaluated(0.9, 0.2)[2] == [checkpoints[1], checkpoints[0], 0.9] and answered == []  # its answers kept

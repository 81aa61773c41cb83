"""The demo's task and the eval checker hook: hand-checked grades, the split, and clear errors."""

import json
import math

import pytest
import torch
from transformers import AutoModelForCausalLM

from spin_fast import sorting
from spin_fast.config import ConfigError, load_run_config
from spin_fast.data import Example, load_examples
from spin_fast.evaluation import checker_grades, checker_score, evaluate_run, load_checker
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


def test_checker_score_by_hand():
    examples = [Example(({"role": "user", "content": "Sort: 42, 7, 19, 88, 3."},), REFERENCE, origin="f:0"),
                Example(({"role": "system", "content": "Be brief."}, {"role": "user", "content": "Sort: 2, 1."}),
                        "In order: 1, 2.", origin="f:1")]
    got = checker_score(checker_grades(sorting.score, examples, ["In order: 3, 7, 42, 88.", "1, 2"]))
    assert got == pytest.approx({"score": (0.4 + 1.0) / 2, "score_perfect": 0.5}, abs=1e-12)
    seen = []
    checker_grades(lambda prompt, response, reference: seen.append(prompt) or 0.0, examples, ["", ""])
    assert seen == ["Sort: 42, 7, 19, 88, 3.", "Sort: 2, 1."]  # the last user turn is the prompt
    with pytest.raises(ValueError, match=r"f:0: the checker graded an answer 1.5"):
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


def held_out_examples(sorting_run):
    from transformers import AutoTokenizer

    from spin_fast.selfplay import tokenized_examples

    tokenizer = AutoTokenizer.from_pretrained(sorting_run / "model")
    config = eval_config(sorting_run, sorting_run / "unused")
    return tokenizer, tokenized_examples(tokenizer, config.data, str(sorting_run / "eval.jsonl"))


def test_shared_work_on_one_process_is_the_engine_and_scorer_output(sorting_run):
    """On one process the shared helpers run one process's batches themselves: sampled completions equal
    the engine's over all prompts (same batches, same seeds), log-probs equal sequence_logprobs' bit for bit."""
    from spin_fast.evaluation import shared_generate, shared_logprobs
    from spin_fast.generation.base import SamplingConfig
    from spin_fast.generation.hf_engine import TransformersEngine
    from spin_fast.packing import Sequence
    from spin_fast.scoring import sequence_logprobs

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
                       sequence_logprobs(model, groups, budget, backend="torch"))


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
    from huggingface_hub import constants

    from spin_fast.evaluation import model_identity
    from spin_fast.selfplay import fetch_model

    repo = tmp_path / "hub" / "models--org--tiny"

    def publish(revision):  # the Hub cache's layout: a snapshot folder per commit, refs/main naming the newest
        (repo / "snapshots" / revision).mkdir(parents=True)
        (repo / "snapshots" / revision / "config.json").write_text("{}")
        (repo / "refs").mkdir(exist_ok=True)
        (repo / "refs" / "main").write_text(revision)

    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path / "hub"))
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)  # the cache alone answers
    publish("a" * 40)
    first = fetch_model("org/tiny")
    assert first == str(repo / "snapshots" / ("a" * 40))
    publish("b" * 40)
    second = fetch_model("org/tiny")
    assert model_identity("org/tiny", first) == {"hub": "org/tiny", "revision": "a" * 40}
    assert model_identity("org/tiny", second) == {"hub": "org/tiny", "revision": "b" * 40}

    folder = tmp_path / "model"
    folder.mkdir()
    (folder / "model.safetensors").write_bytes(b"12345")
    assert fetch_model(str(folder)) == str(folder)
    mtime = (folder / "model.safetensors").stat().st_mtime_ns
    assert model_identity(str(folder), str(folder)) == [["model.safetensors", 5, mtime]]

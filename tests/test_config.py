"""Run configs from YAML and --set overrides: every bad key, type and value is named."""

import dataclasses
import shutil

import pytest
import yaml

from spin_fast.config import ConfigError, RunConfig, from_dict, load_run_config


def test_yaml_then_overrides(tmp_path):
    path = tmp_path / "run.yaml"
    path.write_text(
        "output_dir: runs/x\n"
        "model: {name_or_path: my/sft-model}\n"
        "train: {learning_rate: 5.0e-7, beta: 0.1, global_batch: 64}\n"
        "iteration_overrides:\n  1: {train.learning_rate: 1e-7}\n"
    )
    config = load_run_config(path, ["train.learning_rate=2e-7", "data.source=data/train.jsonl", "iterations=4"])
    assert isinstance(config, RunConfig)
    assert config.train.learning_rate == 2e-7 and config.iterations == 4 and config.model.name_or_path == "my/sft-model"
    assert config.data.source == "data/train.jsonl" and config.train.global_batch == 64
    assert config.for_iteration(1).train.learning_rate == 1e-7  # YAML's "1e-7" string becomes a float
    assert config.for_iteration(2).train.learning_rate == 2e-7
    assert load_run_config(None, []).train.optimizer == "rmsprop"  # the paper's defaults


def test_the_kernel_choices_are_the_kernels_own():
    from spin_fast.config import CHOICES
    from spin_kernels import _checks

    assert (CHOICES["backend"], CHOICES["loss_type"]) == (_checks.BACKENDS, _checks.LOSS_TYPES)


@pytest.mark.parametrize("override, message", [
    ("train.learnig_rate=1", "unknown setting 'train.learnig_rate'; did you mean 'train.learning_rate'"),
    ("trian.beta=1", "unknown setting 'trian'; did you mean 'train'"),
    ("train.epochs=two", "setting 'train.epochs' must be int, got 'two'"),
    ("train.optimizer=sgd", "train: optimizer must be one of"),
    ("train=3", "setting 'train' is a section"),
    ("iterations", "expected key=value"),
    ("iterations=0", "iterations must be >= 1"),
    ("data.max_prompt_length=2048", r"max_prompt_length \(2048\) must be >= 1 and below max_length \(1024\)"),
    ("generation.engine=sglang", "engine must be one of"),
    ("generation.top_p=1.5", r"top_p must be in \(0, 1\]"),
    ("generation.batch_size=0", "generation: batch_size must be >= 1, got 0"),
    ("train.learning_rate=.inf", "train: learning_rate must be a finite number > 0, got inf"),
    ("data.max_prompts=0", "data: max_prompts must be >= 1"),
    ("model.attention=flashh", "model: attention must be one of"),
    ("data.schema=chat", "data: schema must be 'auto' or one of"),
    ("data.cut_prompt=sometimes", r"data: cut_prompt must be one of \('always', 'when_too_long'\), got 'sometimes'"),
    ("train.attention=sdpa", r"train: attention: set model.attention instead \(train.attention is unused\)"),
    ("score_batch_tokens=0", "score_batch_tokens must be >= 1"),
    ("train.label_smoothing=0.5", r"train: label_smoothing must be in \[0, 0.5\), got 0.5"),
    ("generation.temperature=.nan", r"generation: temperature must be a finite number >= 0 \(0: greedy\), got nan"),
    ("generation.temperature=.inf", "temperature must be a finite number >= 0"),
    ("train.beta=[1", r"^--set train.beta=\[1, line 1: expected ',' or '\]', but got '<stream end>'"),
    ("deepspeed.config_file=/no/such/ds.json", "deepspeed: config_file '/no/such/ds.json': no such file"),
])
def test_errors_name_the_key(override, message):
    with pytest.raises(ConfigError, match=message):
        load_run_config(None, [override])


def test_paths_in_the_home_folder_are_taken_from_it(tmp_path, monkeypatch):
    """`~/...` is the home folder's, as transformers' TrainingArguments takes its output_dir. Taken as it was written,
    output_dir ~/runs/x was a folder named '~' in the current directory (a run started elsewhere began anew), and
    `--set data.source=~/...`, which bash leaves unexpanded (data.source is no shell variable), was not found."""
    monkeypatch.setenv("HOME", str(tmp_path))
    (tmp_path / "zephyr.jinja").write_text("{{ messages }}")
    (tmp_path / "ds.json").write_text("{}")
    config = load_run_config(None, ["output_dir=~/runs/x", "model.name_or_path=~/models/sft",
                                    "data.source=~/data/train.jsonl", "data.eval_source=~/data/eval.jsonl",
                                    "model.chat_template=~/zephyr.jinja", "deepspeed.config_file=~/ds.json"])
    assert config.output_dir == str(tmp_path / "runs/x")
    assert config.model.name_or_path == str(tmp_path / "models/sft")
    assert (config.data.source, config.data.eval_source) == (str(tmp_path / "data/train.jsonl"),
                                                             str(tmp_path / "data/eval.jsonl"))
    assert config.model.template_text() == "{{ messages }}"
    assert config.deepspeed.config_file == str(tmp_path / "ds.json")
    from spin_fast.cli import parse_baselines

    assert parse_baselines(["continued-sft=~/csft"]) == {"continued-sft": str(tmp_path / "csft")}
    assert load_run_config(None, ["data.source=HuggingFaceH4/ultrachat_200k"]).data.source == \
        "HuggingFaceH4/ultrachat_200k"  # a Hub name stays one


@pytest.mark.parametrize("override, suggestion", [
    ("max_prompts=100", "'data.max_prompts'"),  # not 'save_every_prompts', a setting that does something else
    ("beta=0.2", "'train.beta'"),
    ("train.max_length=2048", "'data.max_length'"),  # TRL's DPOConfig has it beside the learning rate
    ("train.temperature=0.7", "'generation.temperature'"),
    ("seed=1", "'generation.seed' or 'train.seed'"),
    ("train.score_batch_tokens=1024", "'score_batch_tokens'"),
])
def test_a_setting_given_in_the_wrong_section_is_named_where_it_is(override, suggestion):
    """The README: an unknown key's error "suggests the closest valid one". A setting under another section (or none)
    is the likeliest slip, and the closest valid key is that setting where it belongs."""
    with pytest.raises(ConfigError, match=f"did you mean {suggestion}[?]"):
        load_run_config(None, [override])


@pytest.mark.parametrize("overrides, message", [
    ("{2: {train.learning_rat: 1.0e-7}}", r"iteration_overrides\[2\]: .*did you mean 'train.learning_rate'"),
    ("{1: 5}", r"iteration_overrides\[1\]: expected a mapping of settings"),
    ("{3: {train.bta: 0.2}}", r"iteration_overrides\[3\]: unknown setting 'train.bta'"),  # checked, if beyond
    ("{-1: {train.beta: 0.2}}", r"iteration_overrides\[-1\]: the key must be an iteration number"),
    ("{one: {train.beta: 0.2}}", r"iteration_overrides\[one\]: the key must be an iteration number"),
    # A digit int() does not read: "²".isdigit() held, and int("²") failed with no setting named.
    ("{²: {train.beta: 0.2}}", r"iteration_overrides\[²\]: the key must be an iteration number"),
    ("{1: {model.name_or_path: other}}", "model.name_or_path is set for the whole run, not per iteration"),
    # The model and the generation engine are loaded once per run: another value would be silently ignored.
    ("{1: {train: {dtype: bfloat16}}}", r"iteration_overrides\[1\]: train.dtype is set for the whole run"),
    ("{1: {train.bf16_autocast: true}}", "train.bf16_autocast is set for the whole run"),
    ("{1: {train.gradient_checkpointing: true}}", "train.gradient_checkpointing is set for the whole run"),
    ("{1: {deepspeed.zero_stage: 3}}", "deepspeed.zero_stage is set for the whole run"),
    ("{1: {generation.engine: vllm}}", "generation.engine is set for the whole run"),
    ("{1: {generation.batch_size: 4}}", "generation.batch_size is set for the whole run"),
    ("{1: {train.epochs: 0}}", r"iteration_overrides\[1\]: train: epochs must be"),
])
def test_iteration_overrides_are_checked_when_the_config_loads(overrides, message):
    """Every iteration's settings are checked before anything runs, not when the iteration starts."""
    with pytest.raises(ConfigError, match=message):
        load_run_config(None, [f"iteration_overrides={overrides}"])


def test_an_override_beyond_the_last_iteration_is_kept_for_a_longer_run(caplog):
    config = load_run_config(None, ["iterations=2", "iteration_overrides={3: {train.beta: 0.2}}"])
    assert "iteration_overrides[3]: unused while the run has iterations 0 to 1" in caplog.text
    assert load_run_config(None, ["iterations=4", "iteration_overrides={3: {train.beta: 0.2}}"]).for_iteration(
        3).train.beta == 0.2 and config.iteration_overrides == {3: {"train.beta": 0.2}}


def test_a_set_override_of_an_iteration_adds_to_the_files_overrides(tmp_path):
    """--set iteration_overrides.1.train.beta=... beside the file's `1: {...}`: one iteration's overrides, the file's
    kept (YAML's key 1 and --set's "1" were two entries, and the later dropped the other's settings)."""
    path = tmp_path / "run.yaml"
    path.write_text("output_dir: runs/x\niterations: 2\n"
                    "iteration_overrides:\n  1: {train.learning_rate: 1.0e-4, train.warmup_ratio: 0.5}\n")
    config = load_run_config(path, ["iteration_overrides.1.train.beta=0.5"])
    assert config.iteration_overrides == {1: {"train.learning_rate": 1.0e-4, "train.warmup_ratio": 0.5,
                                              "train.beta": 0.5}}
    train = load_run_config(path, ["iteration_overrides.1.train.learning_rate=2.0e-4"]).for_iteration(1).train
    assert (train.learning_rate, train.warmup_ratio) == (2.0e-4, 0.5)  # --set wins where both set a setting
    assert from_dict(RunConfig, config.to_dict()).iteration_overrides == config.iteration_overrides  # as saved


def test_an_iteration_override_error_names_its_line(tmp_path, caplog):
    """In a file, an override's error names the line of the setting (its section's, for a section's own check);
    an override past the last iteration is said once, also when a resumed run reads its saved config."""
    path = tmp_path / "run.yaml"
    head = "output_dir: runs/x\niterations: 2\niteration_overrides:\n"
    for body, line, message in (
            ("  1:\n    train:\n      seed: 2\n      beta: -1\n", 7, r"iteration_overrides\[1\]: train: beta must be"),
            ("  1:\n    train: {seed: 2}\n    model:\n      name_or_path: other\n", 7,
             r"iteration_overrides\[1\]: model.name_or_path is set for the whole run"),
            ("  1: {train: {seed: 2}}\n  first: {train: {seed: 3}}\n", 5,
             r"iteration_overrides\[first\]: the key must be an iteration number"),
            ("  1: {train: {seed: 2}}\n  0: 0.1\n", 5, r"iteration_overrides\[0\]: expected a mapping of settings")):
        path.write_text(head + body)
        with pytest.raises(ConfigError, match=rf"^{path}, line {line}: {message}"):
            load_run_config(path)
    path.write_text(head + "  3: {train: {seed: 2}}\n")
    load_run_config(path)
    from_dict(RunConfig, yaml.safe_load(path.read_text()))  # as a resumed run reads its saved config.yaml
    assert caplog.text.count("iteration_overrides[3]: unused while the run has iterations 0 to 1") == 1


def test_a_nested_iteration_override_changes_only_the_settings_it_names():
    for override in ("iteration_overrides.1.train.learning_rate=1.0e-5",
                     "iteration_overrides={1: {train: {learning_rate: 1.0e-5}}}",
                     "iteration_overrides={'1': {train.learning_rate: 1.0e-5}}"):
        config = load_run_config(None, ["train.global_batch=2", "train.epochs=1", override])
        changed = config.for_iteration(1).train
        assert changed.learning_rate == 1e-5 and (changed.global_batch, changed.epochs) == (2, 1), override
        assert config.for_iteration(0).train.learning_rate == 5e-7


def test_an_empty_section_takes_overrides(tmp_path):
    (tmp_path / "run.yaml").write_text("train:\n")
    assert load_run_config(tmp_path / "run.yaml", ["train.beta=0.2"]).train.beta == 0.2


def test_a_config_file_with_a_key_twice_or_bad_yaml_is_named_with_its_line(tmp_path):
    """yaml.safe_load keeps the last of two `train:` sections: the first one's settings were silently lost."""
    path = tmp_path / "run.yaml"
    path.write_text("train: {learning_rate: 1.0e-4, beta: 0.5}\nmodel: {name_or_path: m}\ntrain: {global_batch: 2}\n")
    with pytest.raises(ConfigError, match=rf"^{path}, line 3: 'train' is given twice \(first on line 1\)$"):
        load_run_config(path)
    path.write_text("train:\n  beta: 0.1\n  beta: 0.2\n")
    with pytest.raises(ConfigError, match="line 3: 'beta' is given twice"):
        load_run_config(path)
    path.write_text("model: {name_or_path: m}\ntrain: {beta: 0.1\n")
    with pytest.raises(ConfigError, match=rf"^{path}, line 3: expected ',' or '}}'"):
        load_run_config(path)
    # YAML's merge keys stay: a merged key set again is an override, not a repeat.
    from spin_fast.config import parse_yaml

    assert parse_yaml("base: &b {beta: 0.3, epochs: 2}\ntrain:\n  <<: *b\n  beta: 0.2\n", "x")["train"] == {
        "beta": 0.2, "epochs": 2}


def test_a_config_file_that_cannot_be_read_is_named_as_such(tmp_path):
    with pytest.raises(ConfigError, match=rf"^config file {tmp_path / 'missing.yaml'}: No such file or directory$"):
        load_run_config(tmp_path / "missing.yaml")
    with pytest.raises(ConfigError, match=rf"^config file {tmp_path}: Is a directory$"):
        load_run_config(tmp_path)
    (tmp_path / "latin1.yaml").write_bytes("model: {name_or_path: caf\xe9}\n".encode("latin-1"))
    with pytest.raises(ConfigError, match=r"latin1.yaml: not UTF-8 text \('utf-8' codec can't decode byte 0xe9"):
        load_run_config(tmp_path / "latin1.yaml")


def test_the_demo_config_is_named_for_what_runs_it(tmp_path):
    from pathlib import Path

    demo = Path(__file__).resolve().parent.parent / "configs" / "demo.yaml"
    with pytest.raises(ConfigError, match=r"its 'demo' section holds the demo's own settings: run it with "
                                          r"`python -m spin_fast.demo --config"):
        load_run_config(demo)


def test_flash_attention_2_without_its_package_is_refused_when_the_config_loads(monkeypatch):
    import importlib.util

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "flash_attn" else real(name, *a))
    with pytest.raises(ConfigError, match="model: attention flash_attention_2 needs the flash_attn package"):
        load_run_config(None, ["model.attention=flash_attention_2"])


def test_top_level_must_be_a_mapping(tmp_path):
    (tmp_path / "bad.yaml").write_text("- 1\n- 2\n")
    with pytest.raises(ConfigError, match="bad.yaml: expected a mapping"):
        load_run_config(tmp_path / "bad.yaml")


@pytest.mark.parametrize("setting, line, message", [
    ("  learnig_rate: 1.0e-7", 4, "unknown setting 'train.learnig_rate'; did you mean 'train.learning_rate'?"),
    ("  beta: high", 4, "setting 'train.beta' must be float, got 'high'"),
    ("  loss_type: dpo", 4, "train: loss_type must be one of"),
    ("  warmup_ratio: 1.5", 4, r"train: warmup_ratio must be in \[0, 1\)"),
    ("  attention: sdpa", 4, "train: attention: set model.attention instead"),
    ("data: 5", 3, "setting 'data' is a section"),
    ("data: {max_length: 100}", 3, r"data: max_prompt_length \(512\) must be >= 1 and below max_length"),
    ("iterations: 0", 3, "config: iterations must be >= 1"),
    ("iteration_overrides: {1: {train.beta: -1}}", 3, r"iteration_overrides\[1\]: train: beta must be"),
])
def test_a_bad_setting_in_a_file_is_named_with_its_line(tmp_path, setting, line, message):
    """An error about a setting given in the file names the line that gives it (of its section, for a section's
    own check), as YAML's syntax errors do."""
    path = tmp_path / "run.yaml"
    lines = ["output_dir: runs/x", "model: {name_or_path: m}", "train:", "  seed: 1", "  epochs: 1"]
    lines.insert(line - 1, setting)
    path.write_text("\n".join(lines) + "\n")
    with pytest.raises(ConfigError, match=rf"^{path}, line {line}: {message}"):
        load_run_config(path)


def test_a_bad_setting_is_named_with_where_it_was_given(tmp_path):
    """The file, or the first --set option after which the error appears; a --set that fixes the file's value
    is taken."""
    path = tmp_path / "run.yaml"
    path.write_text("train: {learnig_rate: 1.0e-7}\n")
    with pytest.raises(ConfigError, match=rf"^{path}, line 1: unknown setting 'train.learnig_rate'; did you mean"):
        load_run_config(path, ["iterations=2"])
    path.write_text("train: {beta: -1}\n")
    assert load_run_config(path, ["train.beta=0.3"]).train.beta == 0.3
    with pytest.raises(ConfigError, match=r"^--set data.max_length=16: data: max_prompt_length \(512\) must be"):
        load_run_config(path, ["train.beta=0.3", "data.max_length=16", "iterations=2"])
    with pytest.raises(ConfigError, match=r"^--set iterations=x: setting 'iterations' must be int"):
        load_run_config(None, ["iterations=x"])


def test_label_smoothing_is_the_sigmoid_losss():
    message = r"train: label_smoothing is the sigmoid loss's \(cDPO\), got loss_type 'ipo'"
    with pytest.raises(ConfigError, match=message):
        load_run_config(None, ["train.loss_type=ipo", "train.label_smoothing=0.1"])
    assert load_run_config(None, ["train.label_smoothing=0.1"]).train.label_smoothing == 0.1


def test_an_unhashable_yaml_key_is_a_config_error_naming_the_file_and_line(tmp_path):
    """An unquoted Jinja template (`{{ bos_token }}` is a YAML flow mapping with a mapping as its key) is a one-line
    ConfigError naming the file and the line, as any other YAML error; _UniqueKeyLoader's `key in seen` raised
    TypeError, which the CLI prints as a traceback with exit status 1."""
    path = tmp_path / "run.yaml"
    path.write_text("output_dir: runs/x\nmodel:\n  chat_template: {{ bos_token }}\n")
    with pytest.raises(ConfigError, match=rf"^{path}, line 3: found unhashable key"):
        load_run_config(path)
    with pytest.raises(ConfigError, match=r"^--set model.chat_template=\{\{ x \}\}"):
        load_run_config(None, ["model.chat_template={{ x }}"])


def test_the_cli_says_an_unhashable_yaml_key_in_one_line_with_status_2(tmp_path, capsys):
    from spin_fast import cli

    path = tmp_path / "run.yaml"
    path.write_text("output_dir: runs/x\nmodel:\n  chat_template: {{ bos_token }}\n")
    assert cli.main(["run", str(path)]) == 2
    assert f"spin-fast: {path}, line 3" in capsys.readouterr().err


def test_an_empty_section_in_an_iteration_override_changes_nothing_and_cannot_reset_run_wide_settings():
    """`1: {train: }` (an empty section, e.g. its settings commented out) is None in YAML. At the top level an empty
    section changes nothing (test_an_empty_section_takes_overrides); in an override it reset every train and
    generation setting of the iteration to the code's defaults, run-wide ones (train.dtype, generation.engine)
    included, which RUN_WIDE exists to refuse."""
    config = load_run_config(None, ["train.learning_rate=5e-5", "train.dtype=bfloat16",
                                    "generation.engine=transformers", "iterations=2",
                                    "iteration_overrides={1: {train: null, generation: null}}"])
    one = config.for_iteration(1)
    assert (one.train.learning_rate, one.train.dtype, one.generation.engine) == (5e-5, "bfloat16", "transformers")


def test_deepspeed_timeout_minutes_must_be_finite():
    """timeout_minutes=.inf passed `> 0` and failed later in distributed.init: datetime.timedelta(minutes=inf) raises
    OverflowError (not a ValueError: a traceback from the CLI), after the config was accepted."""
    import datetime

    with pytest.raises(OverflowError):
        datetime.timedelta(minutes=float("inf"))  # what distributed.init does with it
    with pytest.raises(ConfigError, match="timeout_minutes"):
        load_run_config(None, ["deepspeed.timeout_minutes=.inf"])


def test_train_seed_is_checked_when_the_config_loads():
    """A large train.seed failed in training's first epoch_order (torch.Generator().manual_seed(seed * 100_003 +
    epoch) overflows int64), after generation and scoring: it is checked as the config loads."""
    from spin_fast.training import epoch_order

    seed = 2**50
    with pytest.raises((ValueError, RuntimeError)):
        epoch_order(4, seed, 0)
    with pytest.raises(ConfigError, match="seed"):
        load_run_config(None, [f"train.seed={seed}"])


def test_a_run_config_built_in_python_checks_its_sections_types():
    """A config built in Python fails as a YAML file would: RunConfig(train={...}) or RunConfig(model="x") was
    accepted and failed steps later (config.train.beta: AttributeError)."""
    with pytest.raises(ValueError, match=r"train must be a TrainConfig \(from_dict reads a mapping\), got \{'beta'"):
        RunConfig(train={"beta": 0.2})
    with pytest.raises(ValueError, match="model must be a ModelConfig"):
        RunConfig(model="my/model")


def test_an_iteration_override_written_as_1e_7_or_1_0e_7_is_one_setting(tmp_path):
    """YAML 1.1 reads 1e-7 as a string; iteration_overrides kept the raw value, so the run directory's saved config
    held '1e-7' and a resume whose file says 1.0e-7 (the same learning rate) was refused as another experiment."""
    from spin_fast.run_directory import RunDirectory

    base = [f"output_dir={tmp_path / 'run'}", "iterations=2"]
    first = load_run_config(None, [*base, "iteration_overrides.1.train.learning_rate=1e-7"])
    again = load_run_config(None, [*base, "iteration_overrides.1.train.learning_rate=1.0e-7"])
    assert first.for_iteration(1).train == again.for_iteration(1).train  # the same settings
    # The first start saved its config and iteration 1 holds work; the resume writes the number the other way.
    directory = RunDirectory(tmp_path / "run", first)
    directory.claim(None, None, {}, "m")
    (tmp_path / "run" / "iter-1" / "generate" / "parts").mkdir(parents=True)
    (tmp_path / "run" / "iter-1" / "generate" / "parts" / "000000000-000000004.jsonl").write_text("")
    directory.unlock()
    assert RunDirectory(tmp_path / "run", again).saved_config() is not None  # refused: ValueError
    # The same folder written another way (a shell's completion adds the slash) is the same run; another is not.
    for spelling in (f"{tmp_path / 'run'}/", f"{tmp_path}/./run"):
        resumed = dataclasses.replace(again, output_dir=spelling)
        assert RunDirectory(tmp_path / "run", resumed).saved_config() is not None
    with pytest.raises(ValueError, match="differs in output_dir"):
        RunDirectory(tmp_path / "run", dataclasses.replace(again, output_dir=str(tmp_path / "moved"))).saved_config()


def test_one_setting_given_twice_in_an_iteration_override_is_an_error(tmp_path):
    """`1: {train.learning_rate: ..., train: {learning_rate: ...}}` names one setting twice, in the dotted and the
    nested spelling that the README gives as equivalent: an error, as a key given twice in one mapping is (the last
    was kept silently)."""
    path = tmp_path / "run.yaml"
    path.write_text("iterations: 2\niteration_overrides:\n  1:\n    train.learning_rate: 1.0e-7\n"
                    "    train: {learning_rate: 1.0e-5, beta: 0.2}\n")
    with pytest.raises(ConfigError, match="learning_rate"):
        load_run_config(path)


def test_a_set_mapping_changes_only_the_settings_it_names(tmp_path):
    """--set train={beta: 0.2} replaced the file's whole train section: its learning rate and epochs silently went
    back to the defaults; --set iteration_overrides={2: ...} dropped the file's overrides of iteration 1. A mapping
    changes the settings it names, as a nested iteration override does."""
    path = tmp_path / "run.yaml"
    path.write_text("train: {learning_rate: 1.0e-4, epochs: 5}\niterations: 3\n"
                    "iteration_overrides:\n  1: {train.beta: 0.3}\n  2: {train: {epochs: 3}}\n")
    config = load_run_config(path, ["train={beta: 0.2}", "iteration_overrides={2: {train.learning_rate: 1.0e-5}}"])
    assert (config.train.learning_rate, config.train.epochs, config.train.beta) == (1e-4, 5, 0.2)
    assert config.iteration_overrides == {1: {"train.beta": 0.3}, 2: {"train.epochs": 3, "train.learning_rate": 1e-5}}


def test_a_set_override_of_an_iteration_adds_to_a_saved_configs_overrides(tmp_path):
    """A run's saved config.yaml writes iteration numbers as strings and settings dotted ('1': {train.x: ...});
    used as a config, a --set of that iteration's setting landed beside the file's in one mapping and was refused
    as a setting given twice, where the README says the --set wins."""
    path = tmp_path / "config.yaml"
    path.write_text("iterations: 2\niteration_overrides:\n  '1':\n    train.learning_rate: 1.0e-07\n")
    config = load_run_config(path, ["iteration_overrides.1.train.learning_rate=2.0e-7",
                                    "iteration_overrides.1.train.beta=0.2"])
    assert config.iteration_overrides == {1: {"train.learning_rate": 2e-7, "train.beta": 0.2}}
    path.write_text("iterations: 2\niteration_overrides:\n  '1': {train.learning_rate: 1.0e-07, train.epochs: 2}\n")
    for mapping in ("iteration_overrides.1={train: {learning_rate: 2.0e-7}}",  # a mapping into dotted settings
                    "iteration_overrides.1.train={learning_rate: 2.0e-7}"):
        config = load_run_config(path, [mapping])
        assert config.iteration_overrides == {1: {"train.learning_rate": 2e-7, "train.epochs": 2}}, mapping


def test_a_run_directory_with_home_paths_resumes_under_another_home(tmp_path, monkeypatch):
    """`~/` paths were expanded as the config was read, so config.yaml and the config's hash held /home/alice/...: the
    run directory copied to another account or machine (another $HOME), where the same command names the same files,
    was refused as another config, and so were the ranks of a launch on nodes with other homes. A run directory that
    spin-fast saved expanded before still resumes where `~` is that folder, and is saved as written since."""
    from spin_fast.config import as_written
    from spin_fast.run_directory import RunDirectory
    from spin_fast.stages import config_hash

    settings = ["output_dir=~/run", "model.name_or_path=~/models/sft", "data.source=~/data/train.jsonl",
                "data.eval_source=~/data/eval.jsonl", "iterations=2",
                "iteration_overrides.1.data.source=~/data/more.jsonl"]
    configs = {}
    for user in ("alice", "bob"):
        monkeypatch.setenv("HOME", str(tmp_path / user))
        configs[user] = load_run_config(None, settings)
        assert configs[user].data.source == str(tmp_path / user / "data" / "train.jsonl")  # expanded for use
        assert configs[user].for_iteration(1).data.source == str(tmp_path / user / "data" / "more.jsonl")
    assert config_hash(configs["alice"]) == config_hash(configs["bob"])
    monkeypatch.setenv("HOME", str(tmp_path / "alice"))
    directory = RunDirectory(tmp_path / "alice" / "run", configs["alice"])
    directory.claim(None, None, {}, "m")
    (tmp_path / "alice" / "run" / "iter-1" / "generate" / "parts").mkdir(parents=True)
    (tmp_path / "alice" / "run" / "iter-1" / "generate" / "parts" / "000000000-000000004.jsonl").write_text("")
    directory.unlock()
    saved = (tmp_path / "alice" / "run" / "config.yaml").read_text()
    assert "source: ~/data/train.jsonl" in saved and str(tmp_path) not in saved, saved
    shutil.copytree(tmp_path / "alice" / "run", tmp_path / "bob" / "run")
    monkeypatch.setenv("HOME", str(tmp_path / "bob"))
    assert RunDirectory(tmp_path / "bob" / "run", configs["bob"]).saved_config() is not None  # refused: ValueError
    # Upgrade: the config.yaml that spin-fast saved before, with the paths expanded.
    expanded = load_run_config(None, [s.replace("~", str(tmp_path / "bob")) for s in settings])
    (tmp_path / "bob" / "run" / "config.yaml").write_text(yaml.safe_dump(as_written(expanded.to_dict()),
                                                                          sort_keys=False))
    directory = RunDirectory(tmp_path / "bob" / "run", configs["bob"])
    directory.check_model()
    directory.claim(directory.saved_config(), None, {}, "m")
    directory.unlock()
    assert str(tmp_path) not in (tmp_path / "bob" / "run" / "config.yaml").read_text()  # saved as written now
    with pytest.raises(ValueError, match=r"differs in data.source \(saved '~/data/train.jsonl', now '/"):
        RunDirectory(tmp_path / "bob" / "run", load_run_config(
            None, [*settings, f"data.source={tmp_path / 'alice' / 'data' / 'train.jsonl'}"])).saved_config()


def test_a_run_directory_saved_with_expanded_home_paths_under_another_home_is_refused_saying_why(tmp_path,
                                                                                               monkeypatch):
    """A run directory whose config.yaml older spin-fast saved with `~/` expanded under alice's home, copied to bob's
    and resumed there with the same `~/` settings, was refused as "another config" with "use the same settings",
    which bob had: the message must say that the directory names alice's files."""
    from spin_fast.config import as_written
    from spin_fast.run_directory import RunDirectory

    settings = ["output_dir=~/run", "model.name_or_path=~/models/sft", "data.source=~/data/train.jsonl"]
    monkeypatch.setenv("HOME", str(tmp_path / "alice"))
    expanded = load_run_config(None, [s.replace("~", str(tmp_path / "alice")) for s in settings])
    run = tmp_path / "bob" / "run"
    (run / "iter-0" / "generate" / "parts").mkdir(parents=True)
    (run / "iter-0" / "generate" / "parts" / "000000000-000000004.jsonl").write_text("")
    (run / "config.yaml").write_text(yaml.safe_dump(as_written(expanded.to_dict()), sort_keys=False))
    monkeypatch.setenv("HOME", str(tmp_path / "bob"))
    with pytest.raises(ValueError, match=rf"saved by older spin-fast with `~` expanded to {tmp_path / 'alice'},.*"
                                         rf"{tmp_path / 'alice' / 'run'}"):
        RunDirectory(run, load_run_config(None, settings)).saved_config()
    # Other settings besides, or a directory moved within this home: its differences are named, as for any run.
    with pytest.raises(ValueError, match=r"holds another config, which differs in .*train.learning_rate"):
        RunDirectory(run, load_run_config(None, [*settings, "train.learning_rate=1e-3"])).saved_config()
    moved = load_run_config(None, [s.replace("~", str(tmp_path / "bob" / "old")) for s in settings])
    (run / "config.yaml").write_text(yaml.safe_dump(as_written(moved.to_dict()), sort_keys=False))
    with pytest.raises(ValueError, match=r"holds another config, which differs in .*output_dir"):
        RunDirectory(run, load_run_config(None, settings)).saved_config()


def test_an_iteration_override_that_changes_nothing_is_no_change_on_resume(tmp_path):
    """An override whose value is the run's own (the default, or the file's top-level value) leaves the iteration's
    settings as they are: adding or dropping one was refused on resume as another config ("differs in
    iteration_overrides"), though the iteration would run exactly as before."""
    from spin_fast.run_directory import RunDirectory

    for number, (first, again) in enumerate([([], ["iteration_overrides.1.train.beta=0.1"]),
                                             (["iteration_overrides.1.train.beta=0.1"], []),
                                             (["train.beta=0.2", "iteration_overrides.1.train.beta=0.2"],
                                              ["train.beta=0.2"])]):
        base = [f"output_dir={tmp_path / str(number)}", "iterations=2"]
        directory = RunDirectory(tmp_path / str(number), load_run_config(None, [*base, *first]))
        directory.claim(None, None, {}, "m")
        (tmp_path / str(number) / "iter-1" / "generate" / "parts").mkdir(parents=True)
        (tmp_path / str(number) / "iter-1" / "generate" / "parts" / "000000000-000000004.jsonl").write_text("")
        directory.unlock()
        assert RunDirectory(tmp_path / str(number), load_run_config(None, [*base, *again])).saved_config()
        with pytest.raises(ValueError, match="differs in iteration_overrides"):  # a change still is one
            RunDirectory(tmp_path / str(number), load_run_config(
                None, [*base, *again, "iteration_overrides.1.train.beta=0.3"])).saved_config()


def test_null_on_the_command_line_drops_a_files_section_or_overrides(tmp_path):
    """A --set mapping changes the settings it names (test_a_set_mapping_changes_only_the_settings_it_names), so
    `--set iteration_overrides={}` left the file's overrides as they were, and nothing on the command line dropped
    them. null does, as it puts a section back to its defaults (README: --set)."""
    path = tmp_path / "run.yaml"
    path.write_text("train: {learning_rate: 1.0e-4, epochs: 5}\niterations: 3\n"
                    "iteration_overrides:\n  1: {train.beta: 0.3}\n  2: {train: {epochs: 3}}\n")
    config = load_run_config(path, ["train=null"])
    assert (config.train.learning_rate, config.train.epochs) == (5e-7, 2)  # the defaults
    assert load_run_config(path, ["iteration_overrides=null"]).iteration_overrides == {}
    assert load_run_config(path, ["iteration_overrides.1=null"]).iteration_overrides == {2: {"train.epochs": 3}}
    config = load_run_config(path, ["iteration_overrides.1=null", "iteration_overrides.1.train.epochs=4"])
    assert config.iteration_overrides == {1: {"train.epochs": 4}, 2: {"train.epochs": 3}}  # the new ones alone
    path.write_text("iterations: 2\niteration_overrides:\n  '1': {train.learning_rate: 1.0e-07}\n")  # as saved
    assert load_run_config(path, ["iteration_overrides.1=null"]).iteration_overrides == {}


@pytest.mark.parametrize("overrides, message", [
    # Caught as the config loads, not when training starts after a whole iteration's generation and scoring.
    (["deepspeed.zero_stage=2", "deepspeed.offload_params=true"],
     "deepspeed: offload_params needs zero_stage 3, got zero_stage 2"),
    (["generation.gpu_memory_utilization=1.5"], r"generation: gpu_memory_utilization must be in \(0, 1\], got 1.5"),
])
def test_impossible_settings_are_refused_as_the_config_loads(overrides, message):
    with pytest.raises(ConfigError, match=message):
        load_run_config(None, overrides)


def test_an_iterations_overrides_under_its_number_and_its_text_merge():
    """A file that writes `1:` and `"1":` names iteration 1 twice: both entries' settings apply."""
    config = RunConfig(iteration_overrides={1: {"train.beta": 0.2}, "1": {"train.epochs": 1}})
    assert config.iteration_overrides == {1: {"train.beta": 0.2, "train.epochs": 1}}
    train = config.for_iteration(1).train
    assert (train.beta, train.epochs) == (0.2, 1)


def test_zero3_init_loads_partitioned_only_in_a_deepspeed_run():
    """deepspeed.zero3_init in one process with DeepSpeed off: the model loads whole (no process group, no
    zero.Init)."""
    from spin_fast.config import DeepSpeedConfig
    from spin_fast.loading import partitioned

    assert not partitioned(RunConfig(deepspeed=DeepSpeedConfig(zero3_init=True, enabled=False)))
    assert not partitioned(RunConfig(deepspeed=DeepSpeedConfig(zero3_init=True)))  # one process: not launched
    assert partitioned(RunConfig(deepspeed=DeepSpeedConfig(zero3_init=True, enabled=True)))


def test_a_chat_template_file_is_read_as_utf8_whatever_the_locale(tmp_path):
    """The config file is read as UTF-8, but model.chat_template's file was read in the locale's encoding: DeepSeek's
    template ('<｜User｜>') failed under an ASCII locale (C, without Python's UTF-8 mode), and under a Latin-1 one its
    special tokens became other text, silently."""
    import os
    import subprocess
    import sys
    from pathlib import Path

    template = "{{ '<｜User｜>' + messages[0]['content'] }}"
    (tmp_path / "r1.jinja").write_text(template, encoding="utf-8")
    code = ("from spin_fast.config import ModelConfig\n"
            f"print(ascii(ModelConfig(chat_template={str(tmp_path / 'r1.jinja')!r}).template_text()))")
    env = {**os.environ, "LC_ALL": "C", "PYTHONUTF8": "0", "PYTHONCOERCECLOCALE": "0",
           "PYTHONPATH": os.pathsep.join([str(Path(__file__).resolve().parent.parent), *sys.path])}
    done = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr[-2000:]
    assert done.stdout.strip() == ascii(template)

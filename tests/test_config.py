"""Run configs from YAML and --set overrides: every bad key, type and value is named."""

import pytest

from spin_fast.config import ConfigError, RunConfig, load_run_config


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
])
def test_errors_name_the_key(override, message):
    with pytest.raises(ConfigError, match=message):
        load_run_config(None, [override])


def test_iteration_override_with_a_bad_key():
    config = load_run_config(None, ["iteration_overrides={2: {train.learning_rat: 1.0e-7}}"])
    with pytest.raises(ConfigError, match=r"iteration_overrides\[2\]: .*did you mean 'train.learning_rate'"):
        config.for_iteration(2)


def test_top_level_must_be_a_mapping(tmp_path):
    (tmp_path / "bad.yaml").write_text("- 1\n- 2\n")
    with pytest.raises(ConfigError, match="bad.yaml: expected a mapping"):
        load_run_config(tmp_path / "bad.yaml")

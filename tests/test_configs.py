"""Every ready config in configs/ loads, and the paper's recipe says what the paper did."""

from pathlib import Path

import pytest
import yaml

from spin_fast.config import flat_settings, load_run_config
from spin_fast.demo import load_demo_config

CONFIG_DIR = Path(__file__).resolve().parent.parent / "configs"
CONFIGS = sorted(CONFIG_DIR.glob("*.yaml"))


def test_the_ready_configs_are_there():
    assert {"demo.yaml", "zephyr-7b-spin.yaml"} <= {p.name for p in CONFIGS}


@pytest.mark.parametrize("path", CONFIGS, ids=lambda p: p.name)
def test_every_config_loads(path, tmp_path):
    data = yaml.safe_load(path.read_text())
    data.pop("demo", None)  # the demo's own settings, read by spin_fast.demo
    (tmp_path / path.name).write_text(yaml.safe_dump(data))
    config = load_run_config(tmp_path / path.name)
    for t in range(config.iterations):
        config.for_iteration(t)  # every iteration's overrides apply


def test_zephyr_recipe_is_the_papers():
    config = load_run_config(CONFIG_DIR / "zephyr-7b-spin.yaml")
    assert config.model.name_or_path == "alignment-handbook/zephyr-7b-sft-full"
    assert (config.data.source, config.data.split, config.data.max_prompts) == ("HuggingFaceH4/ultrachat_200k",
                                                                                 "train_sft", 50000)
    data = config.data
    assert (data.max_length, data.max_prompt_length, data.cut_prompt) == (1024, 512, "when_too_long")
    train = config.train
    assert (train.beta, train.optimizer, train.schedule, train.warmup_ratio, train.global_batch) == (
        0.1, "rmsprop", "linear", 0.1, 64)
    assert (config.generation.temperature, config.generation.top_p, config.generation.max_new_tokens) == (1.0, 1.0, 256)
    assert [config.for_iteration(t).train.learning_rate for t in range(config.iterations)] == [5e-7, 5e-7, 1e-7, 1e-7]
    assert config.deepspeed.zero_stage == 3 and config.generation.engine == "vllm"


def test_demo_config_loads_with_its_own_settings(tmp_path):
    config, demo = load_demo_config(CONFIG_DIR / "demo.yaml", ["demo.task.n_train=100"], str(tmp_path))
    assert demo.task.n_train == 100 and demo.model.hidden_size // demo.model.heads >= 32
    assert config.output_dir == str(tmp_path / "spin") and config.data.checker == "spin_fast.sorting:score"
    assert config.data.source == str(tmp_path / "data" / "train.jsonl")


def test_the_zephyr_chat_template_renders_the_zephyr_format():
    """configs/templates/zephyr.jinja, for base models (model.chat_template), renders what zephyr-7b-sft-full's
    tokenizer renders: each turn as <|role|>, a newline, the text, EOS and a newline."""
    from spin_fast.config import ModelConfig
    from spin_fast.tokenizer import build_local_tokenizer

    template = ModelConfig(chat_template=str(CONFIG_DIR / "templates" / "zephyr.jinja")).template_text()
    assert ModelConfig(chat_template=template).template_text() == template  # the template itself, as text
    tokenizer = build_local_tokenizer(vocab_size=300)
    eos = tokenizer.eos_token
    conversation = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"},
                    {"role": "assistant", "content": "Hello."}, {"role": "user", "content": "Sort 2, 1."}]
    text = tokenizer.apply_chat_template(conversation, chat_template=template, tokenize=False)
    assert text == (f"<|system|>\nBe brief.{eos}\n<|user|>\nHi{eos}\n<|assistant|>\nHello.{eos}\n"
                    f"<|user|>\nSort 2, 1.{eos}\n")
    prompt = tokenizer.apply_chat_template(conversation[:2], chat_template=template, tokenize=False,
                                           add_generation_prompt=True)
    assert prompt == f"<|system|>\nBe brief.{eos}\n<|user|>\nHi{eos}\n<|assistant|>\n"


def test_multinode_recipe_is_the_8_gpu_one():
    """zephyr-7b-spin-multinode.yaml says its results are those of the 8-GPU run: every setting that shapes a result
    must be zephyr-7b-spin.yaml's (the folder, the collectives' timeout and vLLM's memory share change none)."""
    from spin_fast.run_directory import CHANGEABLE

    def settings(name):
        flat = flat_settings(load_run_config(CONFIG_DIR / name).to_dict())
        return {k: v for k, v in flat.items() if k != "output_dir" and k not in CHANGEABLE}

    one, multi = settings("zephyr-7b-spin.yaml"), settings("zephyr-7b-spin-multinode.yaml")
    assert {k: (one[k], multi[k]) for k in one if one[k] != multi[k]} == {}

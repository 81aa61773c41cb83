"""The README's Python examples run as written (the training one on the CPU, with a tiny model), and the padded-DPO
recipe computes DPO's loss."""

import json
import math
import re
from pathlib import Path

import pytest
import torch

from helpers import QA, assert_close, truth_token_logprobs

README = Path(__file__).resolve().parent.parent / "README.md"


def readme_python_block(marker: str) -> str:
    return next(block for block in re.findall(r"```python\n(.*?)```", README.read_text(), re.S) if marker in block)


def test_readme_kernel_example_runs_and_is_spin():
    """The README's first example against SPIN written plainly in float64 (full logits), at smaller sizes: its
    [N, V] float64 logits would take 1 GB."""
    block = readme_python_block("import spin_kernels")
    sizes = "N, H, V, P = 4096, 1024, 32000, 8"
    assert sizes in block
    scope: dict = {}
    exec(compile(block.replace(sizes, "N, H, V, P = 300, 48, 500, 8"), "README.md", "exec"), scope)
    out, hidden, weight, P = scope["out"], scope["hidden"], scope["weight"], scope["P"]
    targets, sequence_ids, opponent = scope["targets"], scope["sequence_ids"], scope["opponent_logps"].double()
    truth_hidden, truth_weight = (t.detach().double().requires_grad_() for t in (hidden, weight))
    token = (truth_hidden @ truth_weight.T).log_softmax(-1).gather(1, targets[:, None]).squeeze(1)
    sums = torch.zeros(2 * P, dtype=torch.float64).index_add(0, sequence_ids, token)  # no target is -100 there
    z = 0.1 * ((sums[:P] - opponent[:P]) - (sums[P:] - opponent[P:]))
    loss = torch.nn.functional.softplus(-z).mean()
    loss.backward()
    torch.testing.assert_close(out.policy_logps.double(), sums.detach(), rtol=1e-5, atol=1e-3)
    torch.testing.assert_close(out.loss.double(), loss.detach(), rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(hidden.grad.double(), truth_hidden.grad, rtol=1e-4, atol=1e-7)
    torch.testing.assert_close(weight.grad.double(), truth_weight.grad, rtol=1e-4, atol=1e-7)


def test_readme_padded_dpo_recipe_is_dpo():
    """The padded-batch recipe against DPO written plainly in float64: full logits, each row's summed label
    log-probs, -log sigmoid(beta * margin) averaged over pairs; the loss and the hidden states' gradient."""
    import spin_kernels

    scope: dict = {"torch": torch, "spin_kernels": spin_kernels}
    exec(compile(readme_python_block("repeat_interleave"), "README.md", "exec"), scope)
    hidden = scope["hidden"].detach().double().requires_grad_()
    labels, B, H, beta = scope["labels"], scope["B"], scope["H"], 0.1
    token_logps = truth_token_logprobs(hidden[:, :-1].reshape(-1, H), scope["weight"].detach(),
                                       labels[:, 1:].reshape(-1))
    policy = token_logps.view(2 * B, -1).sum(-1)
    reference = scope["reference_logps"].double()
    margin = (policy[:B] - reference[:B]) - (policy[B:] - reference[B:])
    loss = -torch.nn.functional.logsigmoid(beta * margin).mean()
    loss.backward()
    assert_close(scope["dpo"].loss.detach(), loss.detach(), torch.float32, "padded DPO loss")
    assert_close(scope["hidden"].grad, hidden.grad, torch.float32, "padded DPO d hidden")


def test_readme_run_config_is_valid(tmp_path):
    from spin_fast.config import load_run_config

    (block,) = [b for b in re.findall(r"```yaml\n(.*?)```", README.read_text(), re.S) if "iteration_overrides" in b]
    (tmp_path / "run.yaml").write_text(block)
    config = load_run_config(tmp_path / "run.yaml")
    assert config.iterations == 4 and config.for_iteration(2).train.learning_rate == 1e-7


def test_readme_training_example_runs(sft_model, tmp_path, monkeypatch):
    """The one-iteration example, its paths pointed at a tiny saved model and a pair file, on the CPU: the opponent
    is the model trained, so the first step's loss is log 2; run again, it resumes and runs no step twice."""
    code = readme_python_block("Trainer(model")
    pairs = [{"real": [{"role": "user", "content": q}, {"role": "assistant", "content": a}],
              "generated": [{"role": "user", "content": q}, {"role": "assistant", "content": a[::-1]}]}
             for q, a in QA]
    (tmp_path / "data").mkdir()
    (tmp_path / "data/pairs.jsonl").write_text("".join(json.dumps(pair) + "\n" for pair in pairs))
    for written, here in (("path/to/sft-model", str(sft_model / "model")),
                          ("path/to/spin_iter0", str(tmp_path / "data")),
                          ('device="cuda"', 'device="cpu"'), ("global_batch=64", "global_batch=2")):
        assert written in code
        code = code.replace(written, here)
    monkeypatch.chdir(tmp_path)  # its outputs go under runs/
    for _ in range(2):
        exec(compile(code, "README.md", "exec"), {})
    steps = [json.loads(line) for line in (tmp_path / "runs/iter0/metrics.jsonl").read_text().splitlines()]
    assert [s["step"] for s in steps] == list(range(1, math.ceil(len(QA) / 2) * 2 + 1))
    assert steps[0]["loss"] == pytest.approx(math.log(2), abs=1e-3)


def test_readme_lists_every_setting_with_its_default():
    """The README's table of settings has a row for every setting of RunConfig, no other, and the default each
    row gives is the code's: a setting added, renamed or changed without the table fails here."""
    import dataclasses

    import yaml

    from spin_fast.config import RunConfig

    section = README.read_text().split("### Every setting", 1)[1].split("\n#", 1)[0]
    rows = dict(re.findall(r"^\| `([a-z0-9_.]+)` \| `([^`]*)` \|", section, re.M))
    defaults = {}
    for top in dataclasses.fields(RunConfig):
        value = getattr(RunConfig(), top.name)
        if dataclasses.is_dataclass(value):
            defaults.update({f"{top.name}.{f.name}": getattr(value, f.name) for f in dataclasses.fields(value)})
        else:
            defaults[top.name] = value
    assert sorted(rows) == sorted(defaults)
    for name, default in defaults.items():
        shown = float(rows[name]) if isinstance(default, float) else yaml.safe_load(rows[name])
        assert shown == default and type(shown) is type(default), (name, rows[name], default)


def test_readme_loading_the_trained_model_runs(sft_model, tmp_path, monkeypatch):
    """The snippet that loads a run's last model with transformers, run after a tiny one-iteration SPIN run (in the
    folder it ran in, as the snippet's relative path takes it): it loads the trained weights, not θ0's, with the
    run's tokenizer and chat template, and answers."""
    from safetensors.torch import load_file
    from transformers import AutoTokenizer

    from spin_fast.config import load_run_config
    from spin_fast.selfplay import SelfPlay

    code = readme_python_block("AutoModelForCausalLM.from_pretrained(final)")
    monkeypatch.chdir(tmp_path)
    config = load_run_config(None, [
        "output_dir=runs/spin-zephyr", f"model.name_or_path={sft_model / 'model'}",
        f"data.source={sft_model / 'train.jsonl'}", "data.max_length=64", "data.max_prompt_length=32", "iterations=1",
        "generation.engine=transformers", "generation.max_new_tokens=8", "train.optimizer=adamw",
        "train.learning_rate=1e-3", "train.global_batch=4", "train.micro_batch_tokens=256", "train.backend=torch",
        "train.progress=false", "score_batch_tokens=512"])
    (summary,) = SelfPlay(config).run()
    scope: dict = {}
    exec(compile(code, "README.md", "exec"), scope)
    assert scope["final"] == summary["checkpoint"]
    trained = load_file(f"{summary['checkpoint']}/model.safetensors")
    loaded = scope["model"].state_dict()
    assert trained.keys() <= loaded.keys()
    assert all(torch.equal(loaded[k], v) for k, v in trained.items())
    theta0 = load_file(f"{sft_model / 'model'}/model.safetensors")
    assert not all(torch.equal(theta0[k], v) for k, v in trained.items())  # trained: not the SFT model
    assert scope["tokenizer"].chat_template == AutoTokenizer.from_pretrained(sft_model / "model").chat_template
    assert 0 < len(scope["answer"]) <= 32

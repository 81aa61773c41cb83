"""The README's kernel example runs as written."""

import re
from pathlib import Path


def test_readme_kernel_example_runs():
    readme = (Path(__file__).resolve().parent.parent / "README.md").read_text()
    example = next(block for block in re.findall(r"```python\n(.*?)```", readme, re.S) if "spin_kernels" in block)
    scope: dict = {}
    exec(compile(example, "README.md", "exec"), scope)
    out = scope["out"]
    assert out.loss.isfinite() and scope["hidden"].grad is not None and scope["weight"].grad is not None
    assert out.policy_logps.shape == (2 * scope["P"],)


def test_readme_run_config_is_valid(tmp_path):
    from spin_fast.config import load_run_config

    readme = (Path(__file__).resolve().parent.parent / "README.md").read_text()
    (block,) = [b for b in re.findall(r"```yaml\n(.*?)```", readme, re.S) if "iteration_overrides" in b]
    (tmp_path / "run.yaml").write_text(block)
    config = load_run_config(tmp_path / "run.yaml")
    assert config.iterations == 4 and config.for_iteration(2).train.learning_rate == 1e-7

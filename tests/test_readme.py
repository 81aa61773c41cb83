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

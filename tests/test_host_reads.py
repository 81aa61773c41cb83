"""Host reads of tensor values on the hot path: on CUDA each one (item, float, bool, nonzero's size) waits for the
GPU to finish all it was given, so a read per micro-batch that could be one per step stalls every micro-batch."""

import collections
import dataclasses
import gc
import traceback
import weakref
from pathlib import Path

import pytest
import torch
from test_training import config, make_model, random_pairs
from torch.utils._python_dispatch import TorchDispatchMode

import spin_kernels
from helpers import random_packed_batch
from spin_fast.packing import MicroBatch
from spin_fast.scoring import score_pairs
from spin_fast.training import PackedLoss, Trainer
from spin_kernels import chunked, chunked_spin_loss

ROOT = Path(__file__).resolve().parent.parent
# The ops by which the host reads a tensor's value (nonzero: its result's size).
READS = ("_local_scalar_dense", "nonzero", "masked_select")


class HostReads(TorchDispatchMode):
    """Counts the host's reads of tensor values, by the project file (spin_fast/, kernels/) that made them."""

    def __init__(self):
        super().__init__()
        self.by_file = collections.Counter()
        self.ops = collections.Counter()  # every op run, by name

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.ops[func.__name__.split(".")[0]] += 1
        if func.__name__.startswith(READS):
            self.by_file[self.caller()] += 1
        return func(*args, **(kwargs or {}))

    @staticmethod
    def caller() -> str:
        for frame in reversed(traceback.extract_stack()):
            path = Path(frame.filename).resolve()
            if path.is_relative_to(ROOT) and path.parent.name in ("spin_fast", "kernels"):
                return f"{path.parent.name}/{path.name}"
        return "elsewhere"


def training_step_reads(tmp_path, micro_batch_tokens: int) -> tuple[int, collections.Counter]:
    model = make_model(attention="spin_varlen")
    pairs = score_pairs(model, random_pairs(8), 4096)
    trainer = Trainer(model, None, config(global_batch=8, micro_batch_tokens=micro_batch_tokens), tmp_path, pairs)
    with HostReads() as reads:
        metrics = trainer.train_step()
    return metrics["micro_batches"], reads.by_file


def test_the_training_loop_reads_its_metrics_once_per_step_not_per_micro_batch(tmp_path):
    one, whole = training_step_reads(tmp_path / "one", 4096)
    several, cut = training_step_reads(tmp_path / "several", 48)
    assert one == 1 and several >= 3
    # The loop's own reads (the step's metric sums, the gradient norm) do not grow with the micro-batches.
    assert cut["spin_fast/training.py"] == whole["spin_fast/training.py"], (whole, cut)


def test_the_fused_spin_loss_reads_the_device_once_per_call():
    """Its input checks and the choice of the loss tokens: one read per micro-batch, not one each (triton: the
    backend on CUDA; the torch backend reads its pairs' token counts to cut its chunks)."""
    hidden, weight = torch.randn(12, 8, requires_grad=True), torch.randn(20, 8, requires_grad=True)
    targets = torch.randint(0, 20, (10,))
    sequence_ids = torch.tensor([0, 0, 0, 1, 1, 2, 2, 2, 3, 3])
    hidden_index = torch.arange(10) + 1
    opponent = torch.randn(4)
    for backend in ("triton", "reference"):
        with HostReads() as reads:
            out = spin_kernels.fused_linear_spin_loss(hidden, weight, targets, sequence_ids, opponent,
                                                      hidden_index=hidden_index, backend=backend)
            out.loss.backward()
        assert sum(reads.by_file.values()) <= 1, (backend, reads.by_file)


def test_values_read_together_still_name_the_first_bad_one():
    hidden, weight = torch.randn(4, 8), torch.randn(20, 8)
    opponent = torch.randn(2)
    with pytest.raises(ValueError, match=r"targets\[2\] = 25 is outside \[0, 20\)"):
        spin_kernels.fused_linear_spin_loss(hidden, weight, torch.tensor([1, 2, 25, 3]), torch.tensor([0, 0, 9, 1]),
                                            opponent, backend="reference")
    with pytest.raises(ValueError, match=r"sequence_ids\[3\] = 7 is outside \[0, 2\)"):
        spin_kernels.fused_linear_spin_loss(hidden, weight, torch.tensor([1, 2, 5, 3]), torch.tensor([0, 0, 1, 7]),
                                            opponent, backend="reference")
    with pytest.raises(ValueError, match=r"hidden_index\[1\] = 4 is outside \[0, 4\)"):
        spin_kernels.sequence_logprobs(hidden, weight, torch.tensor([1, 2]), torch.tensor([0, 1]), 2,
                                       hidden_index=torch.tensor([0, 4]), backend="reference")
    # Ignored targets: only the kept ones are computed, as before.
    targets = torch.tensor([1, -100, 5, -100])
    got = spin_kernels.linear_logprobs(hidden, weight, targets, backend="reference")
    assert got[1] == 0 and got[3] == 0 and got[0] < 0 and got[2] < 0


def test_scoring_copies_its_results_to_the_host_once_not_per_micro_batch(monkeypatch):
    """On CUDA a copy to the host (cpu, tolist, item) waits for the pass that made the tensor: the log-probs stay on
    the device until the last pass."""
    copies = collections.Counter()
    for name in ("cpu", "tolist", "item"):
        original = getattr(torch.Tensor, name)

        def counted(self, *args, _name=name, _original=original, **kwargs):
            if HostReads.caller() == "spin_fast/scoring.py":
                copies[_name] += 1
            return _original(self, *args, **kwargs)

        monkeypatch.setattr(torch.Tensor, name, counted)
    model, pairs = make_model(attention="spin_varlen"), random_pairs(8)
    counts = {}
    for budget in (4096, 48):
        copies.clear()
        scored = score_pairs(model, pairs, budget)
        counts[budget] = dict(copies)
    assert scored and counts[48] == counts[4096], counts


def test_a_training_step_copies_its_inputs_to_the_device_before_its_first_forward(tmp_path, monkeypatch):
    """A copy from pageable host memory (Tensor.to without pinned memory, torch.tensor(..., device=)) waits on CUDA
    for the GPU to finish all it was given: made between micro-batches, it stalls every one of them."""
    events = []
    to, forward, tensor = MicroBatch.to, PackedLoss.forward, torch.tensor

    def copy_batch(self, device):
        events.append("copy")
        return to(self, device)

    def copy_list(*args, **kwargs):
        if "device" in kwargs and HostReads.caller() == "spin_fast/training.py":
            events.append("copy")
        return tensor(*args, **kwargs)

    def run(self, *args, **kwargs):
        events.append("forward")
        return forward(self, *args, **kwargs)

    monkeypatch.setattr(MicroBatch, "to", copy_batch)
    monkeypatch.setattr(PackedLoss, "forward", run)
    model = make_model(attention="spin_varlen")
    pairs = score_pairs(model, random_pairs(8), 4096)
    trainer = Trainer(model, None, config(global_batch=8, micro_batch_tokens=48), tmp_path, pairs)
    monkeypatch.setattr(torch, "tensor", copy_list)
    metrics = trainer.train_step()
    assert metrics["micro_batches"] >= 3 and events.count("forward") == metrics["micro_batches"]
    # (After the last forward: the optimizer's own, once per step.)
    last = len(events) - events[::-1].index("forward")
    assert "copy" not in events[events.index("forward"):last], " ".join(events)


def test_the_torch_backends_backward_reads_nothing_from_the_device():
    """Its backward asked whether the policy log-probs' gradient held any nonzero (bool(grad.any())): a device sync
    in every micro-batch's backward, though training reads only the loss (the gradient was all zeros). An unused
    output now gets no gradient (None), and the gradients are those the reference backend gives."""
    hidden, weight = torch.randn(12, 8, requires_grad=True), torch.randn(20, 8, requires_grad=True)
    targets = torch.randint(0, 20, (10,))
    sequence_ids = torch.tensor([0, 0, 0, 1, 1, 2, 2, 2, 3, 3])
    opponent = torch.randn(4)
    grads = {}
    for backend in ("torch", "reference"):
        for nll in (False, True):  # the policy log-probs used by another term too (an NLL term)
            out = spin_kernels.fused_linear_spin_loss(hidden, weight, targets, sequence_ids, opponent,
                                                      hidden_index=torch.arange(10) + 1, backend=backend)
            loss = out.loss - out.policy_logps.sum() * 0.5 if nll else out.loss
            with HostReads() as reads:
                grads[backend, nll] = torch.autograd.grad(loss, (hidden, weight))
            if backend == "torch":
                assert sum(reads.by_file.values()) == 0, (nll, reads.by_file)
    for nll in (False, True):
        for got, expected in zip(grads["torch", nll], grads["reference", nll]):
            torch.testing.assert_close(got, expected)


def tolist_calls(monkeypatch) -> collections.Counter:
    """Counts Tensor.tolist calls (a host read that TorchDispatchMode does not see), by the project file making them."""
    copies = collections.Counter()
    original = torch.Tensor.tolist

    def counted(self, *args, **kwargs):
        copies[HostReads.caller()] += 1
        return original(self, *args, **kwargs)

    monkeypatch.setattr(torch.Tensor, "tolist", counted)
    return copies


def llama_with_layers(layers: int, gradient_checkpointing: bool = False):
    from transformers import AutoModelForCausalLM

    from spin_fast import attention
    from spin_fast.model import tiny_config

    attention.register()
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(tiny_config("llama", vocab_size=64, hidden_size=32, layers=layers),
                                             attn_implementation=attention.NAME, dtype=torch.float64)
    if gradient_checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    return model


@pytest.mark.parametrize("mode", ["no_grad", "inference_mode", "training", "checkpointed-training"])
def test_per_sequence_attention_reads_its_boundaries_once_per_forward_whatever_the_layers(monkeypatch, mode):
    """The per-sequence SDPA path (CPU, fp32 on CUDA, head dims over 256) needs the row's boundaries on the host: on
    CUDA each read is a device sync. They are read once a forward, not once per layer, in inference (scoring,
    evaluation; inference mode too, whose tensors keep no version) and in training (forward, backward, and the
    forward that gradient checkpointing runs again in the backward); and the hidden states and gradients are those
    of plain SDPA with its block-diagonal mask (float64)."""
    from spin_fast.model import micro_batch_hidden_states, packed_hidden_states
    from spin_fast.packing import Sequence, pack_groups

    copies = tolist_calls(monkeypatch)
    groups = [[Sequence((3, 4, 5), (6, 7, 2)), Sequence((3, 4, 5), (8, 2))], [Sequence((9, 10), (11, 12, 13, 2))] * 2]
    (batch,) = pack_groups(groups, 1000)
    reads = {}
    for layers in (1, 3):
        model = llama_with_layers(layers, gradient_checkpointing=mode == "checkpointed-training")
        context = {"no_grad": torch.no_grad, "inference_mode": torch.inference_mode}.get(mode, torch.enable_grad)
        model.train(mode.endswith("training"))
        copies.clear()
        with context():
            cu = batch.cu_seqlens.clone()  # made here: under inference mode an inference tensor, as the row's are
            hidden = micro_batch_hidden_states(model, dataclasses.replace(batch, cu_seqlens=cu))
            again = packed_hidden_states(model, batch.input_ids, batch.position_ids, cu, batch.max_seqlen)
            if mode.endswith("training"):
                (hidden.sum() + again.sum()).backward()
        reads[layers] = copies["spin_fast/attention.py"]
        assert reads[layers] <= 2, (layers, mode, copies)  # at most one a forward
        # The same numbers as plain SDPA, which keeps each sequence to itself by a block-diagonal mask.
        model.set_attn_implementation("sdpa")
        grads = {name: p.grad for name, p in model.named_parameters()}
        model.zero_grad(set_to_none=True)
        with context():
            expected = packed_hidden_states(model, batch.input_ids, batch.position_ids)
            if mode.endswith("training"):
                (expected.sum() * 2).backward()
        for got in (hidden, again):
            torch.testing.assert_close(got, expected, rtol=1e-10, atol=1e-10)
        for name, p in model.named_parameters():
            if p.grad is not None or grads[name] is not None:
                torch.testing.assert_close(grads[name], p.grad, rtol=1e-8, atol=1e-8, msg=name)
    assert reads[1] == reads[3], reads


def test_the_boundaries_read_for_attention_are_not_kept_past_the_forward():
    """Each forward hands its boundaries to its layers; no module keeps the last row's tensor alive (nor can a
    later row with a reused tensor get stale values)."""
    from spin_fast.model import packed_hidden_states

    model = llama_with_layers(2)
    ids, positions = torch.randint(3, 64, (9,)), torch.tensor([0, 1, 2, 3, 0, 1, 0, 1, 2])
    cu = torch.tensor([0, 4, 6, 9], dtype=torch.int32)
    with torch.no_grad():
        first = packed_hidden_states(model, ids, positions, cu, 4)
        cu[1:3] = torch.tensor([2, 6])  # the same tensor changed in place: its new boundaries are read
        positions[:6] = torch.tensor([0, 1, 0, 1, 2, 3])
        expected = packed_hidden_states(model, ids, positions)  # boundaries derived from the positions
        second = packed_hidden_states(model, ids, positions, cu, 4)
    torch.testing.assert_close(second, expected, rtol=0, atol=0)
    assert not torch.equal(first, second)
    alive = weakref.ref(cu)
    del cu
    gc.collect()
    assert alive() is None, "a module keeps the last packed row's boundaries alive"


@pytest.mark.parametrize("chunk_tokens", [9, 10_000], ids=["pairs-in-several-chunks", "one-chunk"])
def test_the_torch_backends_fused_loss_reads_each_pairs_tokens_with_its_input_checks(monkeypatch, chunk_tokens):
    """The torch backend cuts its chunks along pairs, by each pair's loss tokens: bincount(...).tolist() read them in
    a host read of its own (and on CUDA bincount reads the ids' max first). Counted on the device, they are read with
    the input checks, in one read a call; the chunks, so the results, are those of bincount's counts."""
    monkeypatch.setattr(chunked, "CHUNK_BYTES", chunk_tokens * 20 * 4)
    copies = tolist_calls(monkeypatch)
    cuts, cut = [], chunked_spin_loss.group_pairs

    def recorded(tokens_per_pair, budget):
        cuts.append(list(tokens_per_pair))
        return cut(tokens_per_pair, budget)

    monkeypatch.setattr(chunked_spin_loss, "group_pairs", recorded)
    n_pairs = 5
    hidden, targets, sequence_ids = random_packed_batch(n_pairs, 8, 20, torch.float32)  # prompts: ignored, id -1
    weight = torch.randn(20, 8, requires_grad=True)
    hidden.requires_grad_()
    for all_kept in (False, True):  # with prompts (found by nonzero, a read of its own), and the loss tokens alone
        kept = (targets != -100).nonzero().squeeze(1) if all_kept else torch.arange(targets.shape[0])
        copies.clear()
        cuts.clear()
        with HostReads() as reads:
            out = spin_kernels.fused_linear_spin_loss(hidden, weight, targets[kept], sequence_ids[kept],
                                                      torch.randn(2 * n_pairs), hidden_index=kept, backend="torch")
            out.loss.backward()
        assert sum(n for name, n in copies.items() if name.startswith("kernels/")) == 1, copies  # the checks' read
        assert reads.by_file["kernels/chunked_spin_loss.py"] == 0 and not reads.ops["bincount"], reads.ops
        loss_ids = sequence_ids[targets != -100]
        assert cuts == [torch.bincount(loss_ids % n_pairs, minlength=n_pairs).tolist()]
        assert sum(reads.by_file.values()) == (0 if all_kept else 1), reads.by_file

"""Host reads of tensor values on the hot path: on CUDA each one (item, float, bool, nonzero's size) waits for the
GPU to finish all it was given, so a read per micro-batch that could be one per step stalls every micro-batch."""

import collections
import traceback
from pathlib import Path

import pytest
import torch
from test_training import config, make_model, random_pairs
from torch.utils._python_dispatch import TorchDispatchMode

import spin_kernels
from spin_fast.packing import MicroBatch
from spin_fast.scoring import score_pairs
from spin_fast.training import PackedLoss, Trainer

ROOT = Path(__file__).resolve().parent.parent
# The ops by which the host reads a tensor's value (nonzero: its result's size).
READS = ("_local_scalar_dense", "nonzero", "masked_select")


class HostReads(TorchDispatchMode):
    """Counts the host's reads of tensor values, by the project file (spin_fast/, kernels/) that made them."""

    def __init__(self):
        super().__init__()
        self.by_file = collections.Counter()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
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


def test_per_sequence_attention_reads_its_boundaries_once_per_forward_not_per_layer(monkeypatch):
    """The per-sequence SDPA path (CPU, fp32 on CUDA, head dims over 256) copied the row's boundaries to the host
    (cu_q.tolist()) in every layer: on CUDA a device sync per layer. Every layer is given the same tensor."""
    from spin_fast import attention
    from spin_fast.model import packed_hidden_states

    copies = collections.Counter()
    original = torch.Tensor.tolist

    def counted(self, *args, **kwargs):
        copies[HostReads.caller()] += 1
        return original(self, *args, **kwargs)

    monkeypatch.setattr(torch.Tensor, "tolist", counted)
    model = make_model(attention="spin_varlen")
    assert model.config.num_hidden_layers >= 2
    lengths = [5, 3, 7]
    input_ids = torch.randint(3, 50, (sum(lengths),))
    position_ids = torch.cat([torch.arange(n) for n in lengths])
    cu = torch.tensor([0, 5, 8, 15], dtype=torch.int32)
    with torch.no_grad():
        hidden = packed_hidden_states(model, input_ids, position_ids, cu, 7)
        again = packed_hidden_states(model, input_ids, position_ids, cu.clone(), 7)
    assert copies["spin_fast/attention.py"] == 2, copies  # one a forward
    torch.testing.assert_close(hidden, again)
    cu[1] = 4  # the same tensor changed in place: its new boundaries are read
    assert attention.host_bounds(cu) == [0, 4, 8, 15]
    with torch.inference_mode():  # an inference tensor keeps no version: read each time
        assert attention.host_bounds(torch.tensor([0, 2, 5])) == [0, 2, 5]

"""Bad input raises ValueError naming the argument, before anything is computed."""

import pytest
import torch

import spin_kernels
from helpers import truth_token_logprobs


def good():
    targets = torch.tensor([1, 2, -100, 3, 4, 5])
    return dict(hidden=torch.randn(6, 8), weight=torch.randn(20, 8), targets=targets)


@pytest.mark.parametrize(
    "change, message",
    [
        (dict(targets=torch.tensor([1, 2, -100, 3, 4, 20])), r"targets\[5\] = 20 is outside \[0, 20\)"),
        (dict(targets=torch.tensor([1, -5, -100, 3, 4, 5])), r"targets\[1\] = -5"),
        (dict(weight=torch.randn(20, 9)), "weight must be .V, H. with H=8"),
        (dict(targets=torch.tensor([1, 2, 3])), "targets must have N=6"),
        (dict(targets=torch.ones(6)), "targets must be an int64 .or int32. tensor, got torch.float32"),
        (dict(targets=torch.tensor([1, 2, 0, 3, 4, 5], dtype=torch.int8)), "targets must be an int64"),
        (dict(hidden=torch.randn(6, 8, dtype=torch.bfloat16)), "weight dtype torch.float32 differs"),
        (dict(hidden=torch.randn(6, 8).int()), "hidden dtype must be one of"),
        (dict(hidden=torch.randn(2, 6, 8)), "hidden must have 2 dimension"),
        (dict(weight=torch.randn(20, 8, device="meta")), "weight is on meta but hidden is on cpu"),
        (dict(hidden=[[1.0]]), "hidden must be a torch.Tensor"),
        (dict(weight=torch.randn(0, 8), targets=torch.full((6,), -100)), "weight must be .V, H. with V >= 1"),
        (dict(ignore_index=None), "ignore_index must be an int .* got None"),
        (dict(ignore_index=-100.0), "ignore_index must be an int .* got -100.0"),
    ],
)
def test_linear_logprobs_errors(change, message):
    args = good() | change
    with pytest.raises(ValueError, match=message):
        spin_kernels.linear_logprobs(args["hidden"], args["weight"], args["targets"],
                                     ignore_index=args.get("ignore_index", -100))


@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_a_second_derivative_is_refused_by_name(backend):
    """create_graph=True through the fused backward would silently lose the second-order term: refused."""
    hidden = torch.randn(6, 8, requires_grad=True)
    args = good() | dict(hidden=hidden)
    for loss in (spin_kernels.linear_logprobs(**args, backend=backend).sum(),
                 spin_kernels.fused_linear_spin_loss(**args, sequence_ids=torch.tensor([0, 1, 0, 2, 3, 3]),
                                                     opponent_logps=torch.zeros(4), backend=backend).loss):
        with pytest.raises(RuntimeError, match="no second derivative .*backend='reference' has one"):
            torch.autograd.grad(loss, hidden, create_graph=True)
    (first,) = torch.autograd.grad(spin_kernels.linear_logprobs(**args, backend="reference").sum(), hidden,
                                   create_graph=True)
    assert first.requires_grad


@pytest.mark.parametrize(
    "hidden_index, message",
    [
        (torch.tensor([0, 1, 2, 3, 4, 6]), r"hidden_index\[5\] = 6 is outside \[0, 6\)"),
        (torch.tensor([0, 1, -1, 3, 4, 5]), r"hidden_index\[2\] = -1"),
        (torch.tensor([0, 1, 2]), "hidden_index must have one entry per target"),
        (torch.tensor([0, 1, 2, 3, 4, 5], dtype=torch.int16), "hidden_index must be an int64 .or int32. tensor"),
        (torch.zeros(6, 1, dtype=torch.int64), "hidden_index must have 1 dimension"),
    ],
)
def test_hidden_index_errors(hidden_index, message):
    with pytest.raises(ValueError, match=message):
        spin_kernels.linear_logprobs(**good(), hidden_index=hidden_index)
    args = good() | dict(sequence_ids=torch.zeros(6, dtype=torch.int64), opponent_logps=torch.zeros(2))
    with pytest.raises(ValueError, match=message):
        spin_kernels.fused_linear_spin_loss(**args, hidden_index=hidden_index)


def test_hidden_index_lets_targets_outnumber_rows():
    """With hidden_index, targets count the predictions, not the rows of hidden."""
    hidden, weight = torch.randn(2, 8), torch.randn(20, 8)
    targets, rows = torch.tensor([1, 2, 3]), torch.tensor([0, 1, 1])
    out = spin_kernels.linear_logprobs(hidden, weight, targets, hidden_index=rows)
    assert out.shape == (3,)
    torch.testing.assert_close(out.double(), truth_token_logprobs(hidden[rows], weight, targets), rtol=1e-5, atol=1e-5)
    for backend in ("torch", "triton", "reference"):  # int32 indices, like targets and sequence_ids
        assert torch.equal(spin_kernels.linear_logprobs(hidden, weight, targets, hidden_index=rows.int(),
                                                        backend=backend),
                           spin_kernels.linear_logprobs(hidden, weight, targets, hidden_index=rows, backend=backend))


def test_bias_and_backend_errors(monkeypatch):
    args = good()
    with pytest.raises(ValueError, match="bias must have V=20"):
        spin_kernels.linear_logprobs(**args, bias=torch.randn(19))
    with pytest.raises(ValueError, match="bias dtype"):
        spin_kernels.linear_logprobs(**args, bias=torch.randn(20, dtype=torch.float64))
    with pytest.raises(ValueError, match="backend must be one of"):
        spin_kernels.linear_logprobs(**args, backend="cuda")
    with pytest.raises(ValueError, match=r"hidden dtype must be one of .* with backend='triton' \(float64 runs on"):
        spin_kernels.linear_logprobs(args["hidden"].double(), args["weight"].double(), args["targets"],
                                     backend="triton")
    monkeypatch.delenv("TRITON_INTERPRET")
    with pytest.raises(ValueError, match="backend='triton' needs CUDA tensors"):
        spin_kernels.linear_logprobs(**args, backend="triton")


@pytest.mark.parametrize(
    "change, message",
    [
        (dict(sequence_ids=torch.tensor([0, 1, -1, 2, 3, 4])), r"sequence_ids\[5\] = 4 is outside \[0, 4\)"),
        (dict(sequence_ids=torch.tensor([0, -1, 0, 2, 3, 1])), r"sequence_ids\[1\] = -1"),
        (dict(sequence_ids=torch.tensor([0, 1, 2])), "sequence_ids must have one entry per token"),
        (dict(sequence_ids=torch.zeros(6)), "sequence_ids must be an int64 .or int32. tensor"),
        (dict(sequence_ids=torch.zeros(6, dtype=torch.uint8)), "sequence_ids must be an int64 .or int32. tensor"),
        (dict(opponent_logps=torch.zeros(3)), "opponent_logps must hold 2P entries"),
        (dict(opponent_logps=torch.zeros(0)), "opponent_logps must hold 2P entries"),
        (dict(opponent_logps=torch.zeros(4, dtype=torch.long)), "opponent_logps must be a floating"),
        (dict(loss_type="kto"), "loss_type must be one of"),
        (dict(reduction="avg"), r"reduction must be one of \('mean', 'sum', 'none'\), got 'avg'"),
        (dict(length_normalize="yes"), "length_normalize must be True or False, got 'yes'"),
        (dict(beta=0.0, loss_type="ipo"), "beta must be a finite number > 0, got 0.0"),
        (dict(beta=-0.5), "beta must be a finite number > 0, got -0.5"),
        (dict(beta=float("nan")), "beta must be a finite number > 0, got nan"),
        (dict(beta=torch.tensor(0.1)), r"beta must be a Python number, not a tensor: pass float\(beta\)"),
    ],
)
def test_fused_loss_errors(change, message):
    kwargs = dict(sequence_ids=torch.tensor([0, 1, -1, 2, 3, 3]), opponent_logps=torch.zeros(4)) | change
    options = dict(loss_type=kwargs.pop("loss_type", "sigmoid"), beta=kwargs.pop("beta", 0.1),
                   reduction=kwargs.pop("reduction", "mean"), length_normalize=kwargs.pop("length_normalize", False))
    with pytest.raises(ValueError, match=message):
        spin_kernels.fused_linear_spin_loss(**good(), **kwargs, **options)


def test_the_loss_module_checks_its_settings_when_built():
    with pytest.raises(ValueError, match="backend must be one of"):
        spin_kernels.FusedLinearSPINLoss(backend="cuda")
    with pytest.raises(ValueError, match="beta must be a finite number > 0"):
        spin_kernels.FusedLinearSPINLoss(beta=0)
    with pytest.raises(ValueError, match="ignore_index must be an int"):
        spin_kernels.FusedLinearSPINLoss(ignore_index=None)
    with pytest.raises(ValueError, match="reduction must be one of"):
        spin_kernels.FusedLinearSPINLoss(reduction=None)
    with pytest.raises(ValueError, match="length_normalize must be True or False, got 1"):
        spin_kernels.FusedLinearSPINLoss(length_normalize=1)
    assert "ignore_index=-1," in repr(spin_kernels.FusedLinearSPINLoss(ignore_index=-1))


def test_spin_loss_errors():
    p = torch.zeros(3)
    with pytest.raises(ValueError, match="opponent_generated_logps has shape"):
        spin_kernels.spin_loss(p, p, p, torch.zeros(4))
    with pytest.raises(ValueError, match="policy_real_logps is empty"):
        spin_kernels.spin_loss(*(torch.zeros(0),) * 4)
    with pytest.raises(ValueError, match="policy_generated_logps must be a floating"):
        spin_kernels.spin_loss(p, torch.zeros(3, dtype=torch.long), p, p)
    with pytest.raises(ValueError, match="loss_type must be one of"):
        spin_kernels.spin_loss(p, p, p, p, loss_type="relu")
    with pytest.raises(ValueError, match="beta must be a finite number > 0, got inf"):
        spin_kernels.spin_loss(p, p, p, p, beta=float("inf"))
    with pytest.raises(ValueError, match="reduction must be one of"):
        spin_kernels.spin_loss(p, p, p, p, reduction="batchmean")


def test_spin_loss_computes_in_the_widest_dtype_of_its_inputs():
    """float64 opponent log-probs of -1e8 differ by 1 in the last place float32 would round away."""
    real = torch.tensor([-1e8 - 1.0], dtype=torch.float64)
    out = spin_kernels.spin_loss(torch.tensor([-1e8]), real, real, real, beta=1.0)
    assert out.loss.dtype == torch.float64 and out.margins.item() == 1.0  # (pr - or) - (pg - og): 1 - 0


def test_kernels_folder_never_poses_as_the_kernels_package():
    """Run from the checkout root, kernels/ is on sys.path: transformers must still see no `kernels`
    package (it probes for Hugging Face's), and the folder must export nothing under that name."""
    import subprocess
    import sys
    from pathlib import Path

    root = Path(__file__).resolve().parent.parent
    probe = (
        "import kernels\n"
        "assert not hasattr(kernels, 'linear_logprobs') and getattr(kernels, '__file__', None) is None\n"
        "from transformers.utils.import_utils import is_kernels_available; assert not is_kernels_available()\n"
        "import transformers.modeling_utils, spin_kernels; assert spin_kernels.linear_logprobs"
    )
    result = subprocess.run([sys.executable, "-c", probe], cwd=root, capture_output=True, text=True)
    assert result.returncode == 0, result.stderr[-2000:]

"""Input validation shared by the public entry points: every error names the argument at fault."""

from __future__ import annotations

import numbers
from collections.abc import Callable

import torch

HALF_AND_SINGLE = (torch.float32, torch.bfloat16, torch.float16)
BACKENDS = ("auto", "triton", "torch", "reference")
LOSS_TYPES = ("sigmoid", "hinge", "ipo")
REDUCTIONS = ("mean", "sum", "none")


# A check of an input's values: (a mask of its bad entries, the error message for the first bad one's index).
ValueCheck = tuple[torch.Tensor, Callable[[int], str]]


def value_check(bad: torch.Tensor, message: Callable[[int], str], pending: list[ValueCheck] | None) -> None:
    """Run now, or add to `pending` for read_value_checks: on CUDA each host read waits for the GPU."""
    if pending is not None:
        pending.append((bad, message))
    else:
        read_value_checks([(bad, message)])


def read_value_checks(pending: list[ValueCheck], kept: torch.Tensor | None = None) -> bool:
    """Every pending value check, and whether `kept` is all True (every target carries loss), in one host read:
    an entry point reads the device once per call, not once per input. ValueError names the first bad entry."""
    return read_value_checks_and_counts(pending, kept)[0]


def read_value_checks_and_counts(pending: list[ValueCheck], kept: torch.Tensor | None = None,
                                 counts: torch.Tensor | None = None) -> tuple[bool, list[int] | None]:
    """read_value_checks, with `counts` (an int tensor: the torch backend's tokens per pair) read in the same host
    read: (whether every target carries loss, the counts as a list, or None)."""
    flags = [bad.any() for bad, _ in pending] + ([kept.all()] if kept is not None else [])
    parts = ([torch.stack(flags).long()] if flags else []) + ([counts.long()] if counts is not None else [])
    if not parts:
        return False, None
    values = torch.cat(parts).tolist()
    for failed, (bad, message) in zip(values, pending):
        if failed:
            raise ValueError(message(int(bad.nonzero()[0, 0])))
    all_kept = kept is not None and bool(values[len(flags) - 1])
    return all_kept, None if counts is None else values[len(flags):]


def check_first_order() -> None:
    """Called by the backends' backward: autograd enables grad there only for backward(create_graph=True), whose
    second derivative they do not compute (it would be silently missing)."""
    if torch.is_grad_enabled():
        raise RuntimeError("spin_kernels' torch and triton backends have no second derivative "
                           "(backward with create_graph=True); backend='reference' has one")


def check_backend(backend: str) -> None:
    if backend not in BACKENDS:
        raise ValueError(f"backend must be one of {BACKENDS}, got {backend!r}")


def check_loss_type(loss_type: str) -> None:
    if loss_type not in LOSS_TYPES:
        raise ValueError(f"loss_type must be one of {LOSS_TYPES}, got {loss_type!r}")


def check_reduction(reduction: str) -> None:
    if reduction not in REDUCTIONS:
        raise ValueError(f"reduction must be one of {REDUCTIONS}, got {reduction!r}")


def check_label_smoothing(label_smoothing: float, loss_type: str) -> None:
    """cDPO's label smoothing: the probability that a pair's labels are flipped, in [0, 0.5); the sigmoid loss's."""
    if isinstance(label_smoothing, torch.Tensor):
        raise ValueError(f"label_smoothing must be a Python number, not a tensor (got {label_smoothing!r})")
    if isinstance(label_smoothing, bool) or not isinstance(label_smoothing, numbers.Real) \
            or not 0 <= label_smoothing < 0.5:
        raise ValueError(f"label_smoothing must be a number in [0, 0.5), got {label_smoothing!r}")
    if label_smoothing and loss_type != "sigmoid":
        raise ValueError(f"label_smoothing is the sigmoid loss's (cDPO), got loss_type={loss_type!r}")


def check_flag(name: str, value: bool) -> None:
    if not isinstance(value, bool):
        raise ValueError(f"{name} must be True or False, got {value!r}")


def check_beta(beta: float) -> None:
    if isinstance(beta, torch.Tensor):  # refused, not read: float() of a CUDA tensor waits for the GPU
        raise ValueError(f"beta must be a Python number, not a tensor: pass float(beta) (got {beta!r})")
    if isinstance(beta, bool) or not isinstance(beta, numbers.Real) or not 0 < beta < float("inf"):
        raise ValueError(f"beta must be a finite number > 0, got {beta!r}")


def _check_index_dtype(name: str, tensor: torch.Tensor) -> None:
    if tensor.dtype not in (torch.int64, torch.int32):
        raise ValueError(f"{name} must be an int64 (or int32) tensor, got {tensor.dtype}")


def _check_tensor(name: str, value: object, ndim: int) -> torch.Tensor:
    if not isinstance(value, torch.Tensor):
        raise ValueError(f"{name} must be a torch.Tensor, got {type(value).__name__}")
    if value.dim() != ndim:
        raise ValueError(f"{name} must have {ndim} dimension(s), got shape {tuple(value.shape)}")
    return value


def check_ignore_index(ignore_index: int) -> None:
    if isinstance(ignore_index, bool) or not isinstance(ignore_index, numbers.Integral):
        raise ValueError(f"ignore_index must be an int (the target value that carries no loss), got {ignore_index!r}")


def check_linear_inputs(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    targets: torch.Tensor,
    bias: torch.Tensor | None,
    ignore_index: int,
    allow_float64: bool,
    hidden_index: torch.Tensor | None = None,
    pending: list[ValueCheck] | None = None,
) -> None:
    """Shapes, dtypes, devices and target range of linear_logprobs' inputs (the values' checks added to `pending`
    when given, for read_value_checks)."""
    _check_tensor("hidden", hidden, 2)
    _check_tensor("weight", weight, 2)
    _check_tensor("targets", targets, 1)
    n_tokens, hidden_size = hidden.shape
    vocab_size = weight.shape[0]
    if vocab_size == 0:
        raise ValueError(f"weight must be [V, H] with V >= 1 (the vocabulary), got {tuple(weight.shape)}")
    check_ignore_index(ignore_index)
    if weight.shape[1] != hidden_size:
        raise ValueError(
            f"weight must be [V, H] with H={hidden_size} as in hidden [N, H]; "
            f"got weight {tuple(weight.shape)} and hidden {tuple(hidden.shape)}"
        )
    if hidden_index is None and targets.shape[0] != n_tokens:
        raise ValueError(f"targets must have N={n_tokens} entries like hidden, got {targets.shape[0]}")
    _check_index_dtype("targets", targets)
    allowed = HALF_AND_SINGLE + ((torch.float64,) if allow_float64 else ())
    if hidden.dtype not in allowed:
        why = "" if allow_float64 else " with backend='triton' (float64 runs on backend='torch' or 'reference')"
        raise ValueError(f"hidden dtype must be one of {allowed}{why}, got {hidden.dtype}")
    if weight.dtype != hidden.dtype:
        raise ValueError(f"weight dtype {weight.dtype} differs from hidden dtype {hidden.dtype} "
                         "(under autocast, pass weight.to(hidden.dtype))")
    tensors = {"hidden": hidden, "weight": weight, "targets": targets}
    if bias is not None:
        _check_tensor("bias", bias, 1)
        if bias.shape[0] != vocab_size:
            raise ValueError(f"bias must have V={vocab_size} entries like weight, got {bias.shape[0]}")
        if bias.dtype != hidden.dtype:
            raise ValueError(f"bias dtype {bias.dtype} differs from hidden dtype {hidden.dtype}")
        tensors["bias"] = bias
    if hidden_index is not None:
        _check_hidden_index(hidden_index, targets, n_tokens, pending)
        tensors["hidden_index"] = hidden_index
    for name, tensor in tensors.items():
        if tensor.device != hidden.device:
            raise ValueError(f"{name} is on {tensor.device} but hidden is on {hidden.device}")
    bad = (targets != ignore_index) & ((targets < 0) | (targets >= vocab_size))
    value_check(bad, lambda row: f"targets[{row}] = {int(targets[row])} is outside [0, {vocab_size}) "
                                 f"and is not ignore_index ({ignore_index})", pending)


def _check_hidden_index(hidden_index: torch.Tensor, targets: torch.Tensor, n_tokens: int,
                        pending: list[ValueCheck] | None) -> None:
    """hidden_index [M]: one row of hidden [N, H] per target."""
    _check_tensor("hidden_index", hidden_index, 1)
    _check_index_dtype("hidden_index", hidden_index)
    if hidden_index.shape != targets.shape:
        raise ValueError(f"hidden_index must have one entry per target like targets {tuple(targets.shape)}, "
                         f"got {tuple(hidden_index.shape)}")
    bad = (hidden_index < 0) | (hidden_index >= n_tokens)
    value_check(bad, lambda row: f"hidden_index[{row}] = {int(hidden_index[row])} is outside [0, {n_tokens}) "
                                 "(the rows of hidden)", pending)


def check_pair_logps(names: tuple[str, ...], values: tuple[torch.Tensor, ...]) -> None:
    """The four per-pair log-prob vectors of spin_loss: same [P] shape, float, one device."""
    first_name, first = names[0], values[0]
    for name, value in zip(names, values):
        _check_tensor(name, value, 1)
        if not value.dtype.is_floating_point:
            raise ValueError(f"{name} must be a floating tensor, got {value.dtype}")
        if value.shape != first.shape:
            raise ValueError(
                f"{name} has shape {tuple(value.shape)} but {first_name} has {tuple(first.shape)}"
            )
        if value.device != first.device:
            raise ValueError(f"{name} is on {value.device} but {first_name} is on {first.device}")
    if first.shape[0] == 0:
        raise ValueError(f"{first_name} is empty: the loss needs at least one pair")


def check_sequence_ids(sequence_ids: torch.Tensor, n_sequences: int, targets: torch.Tensor, ignore_index: int,
                       what: str = "", pending: list[ValueCheck] | None = None) -> None:
    """sequence_ids [N]: the sequence in [0, n_sequences) of each token with loss (`what` says what n is)."""
    _check_tensor("sequence_ids", sequence_ids, 1)
    _check_index_dtype("sequence_ids", sequence_ids)
    if sequence_ids.shape != targets.shape:
        raise ValueError(
            f"sequence_ids must have one entry per token like targets {tuple(targets.shape)}, "
            f"got {tuple(sequence_ids.shape)}"
        )
    if sequence_ids.device != targets.device:
        raise ValueError(f"sequence_ids is on {sequence_ids.device} but targets are on {targets.device}")
    # Tokens without loss (prompt, padding) may carry any id, e.g. -1; the others must name a sequence.
    bad = (targets != ignore_index) & ((sequence_ids < 0) | (sequence_ids >= n_sequences))
    value_check(bad, lambda row: f"sequence_ids[{row}] = {int(sequence_ids[row])} is outside [0, {n_sequences}){what}",
                pending)


def check_sequence_inputs(
    sequence_ids: torch.Tensor,
    opponent_logps: torch.Tensor,
    targets: torch.Tensor,
    ignore_index: int,
    pending: list[ValueCheck] | None = None,
) -> int:
    """Checks fused_linear_spin_loss' sequence layout and returns the number of pairs P."""
    _check_tensor("opponent_logps", opponent_logps, 1)
    n_sequences = opponent_logps.shape[0]
    if n_sequences == 0 or n_sequences % 2:
        raise ValueError(
            f"opponent_logps must hold 2P entries (P real, then P generated), got {n_sequences}"
        )
    if not opponent_logps.dtype.is_floating_point:
        raise ValueError(f"opponent_logps must be a floating tensor, got {opponent_logps.dtype}")
    if opponent_logps.device != targets.device:
        raise ValueError(f"opponent_logps is on {opponent_logps.device} but targets are on {targets.device}")
    check_sequence_ids(sequence_ids, n_sequences, targets, ignore_index, f" (2P for P={n_sequences // 2} pairs)",
                       pending)
    n_pairs = n_sequences // 2
    opponent = opponent_logps.detach()
    check_defined_pairs(opponent[:n_pairs], opponent[n_pairs:], lambda pair: f"opponent_logps[{pair}]",
                        lambda pair: f"opponent_logps[{n_pairs + pair}]", pending)
    return n_pairs


def check_defined_pairs(real: torch.Tensor, generated: torch.Tensor, real_name: Callable[[int], str],
                        generated_name: Callable[[int], str], pending: list[ValueCheck] | None = None) -> None:
    """A ValueError for a pair whose loss is undefined: it takes the difference of its opponent log-probs, and -inf
    for both (the opponent gives both responses probability 0), a NaN, or +inf for both make it NaN, and every
    gradient with it. One -inf alone is a limit."""
    real, generated = real.detach(), generated.detach()
    undefined = (real - generated).isnan()
    value_check(undefined, lambda pair: f"pair {pair}: {real_name(pair)} = {float(real[pair])} and "
                                        f"{generated_name(pair)} = {float(generated[pair])} (its real and generated "
                                        "response) leave its loss undefined (NaN): a pair's opponent log-probs may "
                                        "not be NaN, nor both -inf (or both inf)", pending)

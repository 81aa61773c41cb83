"""spin_kernels: fused LM-head log-probs and the SPIN / DPO logistic loss, without [N, V] logits.

    linear_logprobs(hidden, weight, targets)               per-token target log-probs [N]
    spin_loss(pol_real, pol_gen, opp_real, opp_gen)        SPIN (= DPO) loss over P pairs
    fused_linear_spin_loss(hidden, weight, targets, sequence_ids, opponent_logps)
                                                           packed hidden states -> loss
"""

if __name__ != "spin_kernels":
    # transformers probes for an unrelated package called `kernels`; never pose as it.
    raise ImportError("this folder is the package spin_kernels: `import spin_kernels`, not `import kernels`")

from .linear_logprobs import linear_logprobs
from .spin_loss import (
    FusedLinearSPINLoss,
    FusedSpinLossOutput,
    SpinLossOutput,
    fused_linear_spin_loss,
    spin_loss,
)

__all__ = [
    "FusedLinearSPINLoss",
    "FusedSpinLossOutput",
    "SpinLossOutput",
    "fused_linear_spin_loss",
    "linear_logprobs",
    "spin_loss",
]

"""spin_kernels: fused LM-head log-probs and the SPIN / DPO logistic loss, without [N, V] logits.

    linear_logprobs(hidden, weight, targets)               per-token target log-probs [N]
    sequence_logprobs(hidden, weight, targets, sequence_ids, n)
                                                           the same summed per sequence [n]
    spin_loss(pol_real, pol_gen, opp_real, opp_gen)        SPIN (= DPO) loss over P pairs
    fused_linear_spin_loss(hidden, weight, targets, sequence_ids, opponent_logps)
                                                           packed hidden states -> loss
"""

if __name__ != "spin_kernels":
    # Found as `kernels` because the checkout root is on sys.path (python run from there).
    # transformers probes for Hugging Face's unrelated `kernels` package and imports whatever
    # it finds: look like a stray namespace folder (no __file__, no version) so that it
    # concludes that package is absent, and export nothing. The real name is spin_kernels.
    del __file__
    __all__: list[str] = []
else:
    from .linear_logprobs import linear_logprobs, sequence_logprobs
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
        "sequence_logprobs",
        "spin_loss",
    ]

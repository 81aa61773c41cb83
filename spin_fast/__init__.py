"""spin-fast: Self-Play Fine-Tuning (SPIN) trainer. The fused head kernels live in spin_kernels."""

__version__ = "0.1.0"

"""Training settings, as one dataclass whose defaults are the official SPIN recipe's."""

from __future__ import annotations

from dataclasses import dataclass, fields

CHOICES = {
    "mode": ("spin", "sft"),
    "loss_type": ("sigmoid", "hinge"),
    "optimizer": ("rmsprop", "adamw"),
    "schedule": ("linear", "cosine", "constant"),
    "dtype": ("float32", "bfloat16", "float16"),
    "backend": ("auto", "triton", "torch", "reference"),
    "attention": ("auto", "sdpa", "eager", "flash_attention_2", "spin_varlen"),
}


@dataclass
class TrainConfig:
    """One training run (an SPIN iteration's training, or SFT). Batches are counted in pairs (SPIN)
    or examples (SFT); micro-batches are cut by tokens."""

    mode: str = "spin"
    beta: float = 0.1
    loss_type: str = "sigmoid"
    optimizer: str = "rmsprop"  # the paper's
    learning_rate: float = 5e-7
    weight_decay: float = 0.0
    optimizer_eps: float = 1e-8
    schedule: str = "linear"
    warmup_ratio: float = 0.1
    epochs: int = 2
    global_batch: int = 64
    micro_batch_tokens: int = 4096
    max_grad_norm: float = 1.0  # 0 disables clipping
    seed: int = 42
    dtype: str = "float32"  # parameters' dtype
    bf16_autocast: bool = False  # body in bf16 autocast over fp32 weights (the usual GPU setting)
    gradient_checkpointing: bool = False
    liger_kernels: bool = False  # Liger-Kernel's RMSNorm/RoPE/SwiGLU in the body (CUDA)
    attention: str = "auto"
    backend: str = "auto"  # spin_kernels backend for the head
    save_every: int = 0  # optimizer steps between checkpoints; 0: only at the end
    keep_checkpoints: int = 2
    tensorboard: bool = False
    progress: bool = True

    def __post_init__(self) -> None:
        for name, allowed in CHOICES.items():
            if getattr(self, name) not in allowed:
                raise ValueError(f"{name} must be one of {allowed}, got {getattr(self, name)!r}")
        positive = ("learning_rate", "epochs", "global_batch", "micro_batch_tokens", "beta", "keep_checkpoints")
        for name in positive:
            if not getattr(self, name) > 0:
                raise ValueError(f"{name} must be > 0, got {getattr(self, name)!r}")
        if not 0 <= self.warmup_ratio < 1:
            raise ValueError(f"warmup_ratio must be in [0, 1), got {self.warmup_ratio!r}")
        for name in ("max_grad_norm", "weight_decay", "save_every"):
            if getattr(self, name) < 0:
                raise ValueError(f"{name} must be >= 0, got {getattr(self, name)!r}")

    def to_dict(self) -> dict:
        return {f.name: getattr(self, f.name) for f in fields(self)}

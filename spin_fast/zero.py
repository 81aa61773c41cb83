"""DeepSpeed ZeRO for spin-fast's trainer: the DeepSpeed JSON, and whole weights out of sharded ones.

spin-fast owns batching (a global batch counted in pairs, packed into micro-batches cut by tokens, so
their number varies from step to step), so DeepSpeed runs with managed_gradient_accumulation off: every
backward accumulates, and each engine.step() is an optimizer step. The optimizer and the schedule are
spin-fast's (train.optimizer, train.schedule), handed to DeepSpeed as client objects.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path

import torch

from spin_fast.config import ConfigError, DeepSpeedConfig, TrainConfig

DEFAULT_STAGE = 2
BUCKET_BYTES = 256 * 2**20  # ZeRO-3 gathers weights this many bytes at a time


def deepspeed_config(train: TrainConfig, settings: DeepSpeedConfig, world_size: int) -> dict:
    """DeepSpeed's JSON for this run: derived from spin-fast's settings, or settings.config_file taken as
    is, where a value that contradicts spin-fast's own settings is an error naming both."""
    user = _read_user_config(settings.config_file) if settings.config_file else {}
    where = settings.config_file or "deepspeed"
    zero = dict(user.get("zero_optimization", {}))
    stage = _agree(where, "zero_optimization.stage", zero.get("stage"), "deepspeed.zero_stage", settings.zero_stage)
    stage = DEFAULT_STAGE if stage is None else stage
    zero["stage"] = stage
    if settings.offload_optimizer:
        _agree(where, "zero_optimization.offload_optimizer.device", zero.get("offload_optimizer", {}).get("device"),
               "deepspeed.offload_optimizer", "cpu")
        zero["offload_optimizer"] = {**zero.get("offload_optimizer", {}), "device": "cpu"}
    if settings.offload_params:
        if stage != 3:
            raise ConfigError(f"deepspeed.offload_params needs ZeRO stage 3; {where} has stage {stage}")
        _agree(where, "zero_optimization.offload_param.device", zero.get("offload_param", {}).get("device"),
               "deepspeed.offload_params", "cpu")
        zero["offload_param"] = {**zero.get("offload_param", {}), "device": "cpu"}

    for section, owner in (("optimizer", "train.optimizer"), ("scheduler", "train.schedule")):
        if section in user:
            raise ConfigError(f"{where}: '{section}' conflicts with spin-fast's {owner}; remove it from the JSON")
    derived = {
        # DeepSpeed's own batch counters; spin-fast's batch is train.global_batch pairs, cut into micro-batches
        # by tokens, so these only satisfy DeepSpeed's consistency check.
        "train_micro_batch_size_per_gpu": 1,
        "gradient_accumulation_steps": 1,
        "train_batch_size": world_size,
        "managed_gradient_accumulation": False,
        "gradient_clipping": train.max_grad_norm,
        "bf16": {"enabled": train.dtype == "bfloat16"},
        "fp16": {"enabled": train.dtype == "float16"},
    }
    config = {"steps_per_print": 2**31 - 1, "wall_clock_breakdown": False,
              # spin-fast's RMSprop/AdamW run on DeepSpeed's (possibly offloaded) fp32 partitions.
              "zero_allow_untested_optimizer": True, "zero_force_ds_cpu_optimizer": False}
    config.update(user)
    for key, value in derived.items():
        if key in user and user[key] != "auto":
            mine = value["enabled"] if isinstance(value, dict) else value
            theirs = user[key].get("enabled", False) if isinstance(user[key], dict) else user[key]
            if theirs != mine:
                raise ConfigError(f"{where}: '{key}' is {user[key]!r} but spin-fast needs {value!r} "
                                  f"({_OWNERS[key]}); remove it from the JSON or set it to \"auto\"")
        config[key] = value if not isinstance(value, dict) else {**user.get(key, {}), **value}
    config["zero_optimization"] = zero
    return config


_OWNERS = {
    "train_micro_batch_size_per_gpu": "micro-batches are cut by train.micro_batch_tokens",
    "gradient_accumulation_steps": "the global batch is train.global_batch pairs",
    "train_batch_size": "the global batch is train.global_batch pairs",
    "managed_gradient_accumulation": "the number of micro-batches varies with packing",
    "gradient_clipping": "train.max_grad_norm",
    "bf16": "train.dtype",
    "fp16": "train.dtype",
}


def _read_user_config(path: str) -> dict:
    try:
        config = json.loads(Path(path).read_text())
    except OSError as error:
        raise ConfigError(f"deepspeed.config_file: cannot read {path}: {error}") from None
    except json.JSONDecodeError as error:
        raise ConfigError(f"deepspeed.config_file: {path} is not valid JSON: {error}") from None
    if not isinstance(config, dict):
        raise ConfigError(f"deepspeed.config_file: {path} must hold a JSON object, got {type(config).__name__}")
    return config


def _agree(where: str, their_key: str, theirs, our_key: str, ours):
    if theirs is not None and ours is not None and theirs != ours:
        raise ConfigError(f"{where}: {their_key} is {theirs!r} but {our_key} is {ours!r}; set one of them only")
    return ours if ours is not None else theirs


def is_partitioned(param: torch.nn.Parameter) -> bool:
    """A ZeRO-3 parameter: each rank holds a slice, and the full tensor exists only while gathered."""
    return hasattr(param, "ds_id")


def full_weights(model: torch.nn.Module, bucket_bytes: int = BUCKET_BYTES) -> Iterator[tuple[str, torch.Tensor]]:
    """(name, full tensor on the CPU) for every parameter of `model` under its state_dict name (a tied head
    appears once, as the embedding) and every persistent buffer. ZeRO-3 parameters are gathered a bucket at
    a time, so a device never holds more than its shard plus one bucket; every rank must iterate together."""
    bucket: list[tuple[str, torch.nn.Parameter]] = []
    size = 0

    def flush():
        from deepspeed.runtime.zero.partition_parameters import GatheredParameters

        with GatheredParameters([p for _, p in bucket], modifier_rank=None):
            copies = [(name, p.data.detach().to("cpu", copy=True)) for name, p in bucket]
        bucket.clear()
        return copies

    for name, param in model.named_parameters():
        if not is_partitioned(param):
            yield name, param.detach().to("cpu", copy=True)
            continue
        bucket.append((name, param))
        size += param.ds_numel * param.element_size()
        if size >= bucket_bytes:
            yield from flush()
            size = 0
    if bucket:
        yield from flush()
    persistent = set(model.state_dict().keys())
    for name, buffer in model.named_buffers():
        if name in persistent:
            yield name, buffer.detach().to("cpu", copy=True)

"""DeepSpeed ZeRO for spin-fast's trainer: the DeepSpeed JSON, whole weights out of sharded ones, and
models that stay partitioned outside training (deepspeed.zero3_init).

spin-fast owns batching (a global batch counted in pairs, packed into micro-batches cut by tokens, so
their number varies from step to step), so DeepSpeed runs with managed_gradient_accumulation off: every
backward accumulates, and each engine.step() is an optimizer step. The optimizer and the schedule are
spin-fast's (train.optimizer, train.schedule), handed to DeepSpeed as client objects.
"""

from __future__ import annotations

import contextlib
import json
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path
from typing import Any

import torch

from spin_fast.config import ConfigError, DeepSpeedConfig, TrainConfig

DEFAULT_STAGE = 2
BUCKET_BYTES = 256 * 2**20  # ZeRO-3 gathers weights this many bytes at a time
# Forward passes of a partitioned model gather a decoder layer at once up to this size (a Llama-70B layer in bf16
# is 1.6 GiB), beyond it a module at a time.
LAYER_BYTES = 4 * 2**30


def deepspeed_config(train: TrainConfig, settings: DeepSpeedConfig, world_size: int) -> dict:
    """DeepSpeed's JSON for this run: derived from spin-fast's settings, or settings.config_file taken as
    is, where a value that contradicts spin-fast's own settings is an error naming both."""
    user = _read_user_config(settings.config_file) if settings.config_file else {}
    where = settings.config_file or "deepspeed"
    zero = dict(user.get("zero_optimization", {}))
    stage = _agree(where, "zero_optimization.stage", zero.get("stage"), "deepspeed.zero_stage", settings.zero_stage)
    if stage is None:
        stage = 3 if settings.zero3_init else DEFAULT_STAGE
    zero["stage"] = stage
    if settings.offload_optimizer:
        _agree(where, "zero_optimization.offload_optimizer.device", zero.get("offload_optimizer", {}).get("device"),
               "deepspeed.offload_optimizer", "cpu")
        zero["offload_optimizer"] = {**zero.get("offload_optimizer", {}), "device": "cpu"}
    if settings.zero3_init and stage != 3:
        raise ConfigError(f"deepspeed.zero3_init needs ZeRO stage 3; {where} has stage {stage}")
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
            if theirs not in (mine, "auto"):  # Hugging Face's JSONs write {"enabled": "auto"}
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
        size += _full_bytes(param)
        if size >= bucket_bytes:
            yield from flush()
            size = 0
    if bucket:
        yield from flush()
    persistent = set(model.state_dict().keys())
    for name, buffer in model.named_buffers():
        if name in persistent:
            yield name, buffer.detach().to("cpu", copy=True)


def is_partitioned_model(model: torch.nn.Module) -> bool:
    return any(is_partitioned(p) for p in model.parameters())


def in_step(models: Iterable[torch.nn.Module], items: list, what: str) -> list:
    """`items` as they are, or, when a model is partitioned (every forward pass then a collective), padded with
    None to the longest list of any rank: a None is a filler pass."""
    if any(is_partitioned_model(model) for model in models):
        from spin_fast import distributed

        return distributed.in_step(items, what)
    return list(items)


def run_in_step(models: Iterable[torch.nn.Module], items: list, run: Callable[[Any], Any], what: str,
                progress: bool = False) -> list:
    """[run(item) for item in items], the passes in step with the other ranks' (in_step: run(None) is a filler
    pass, its result dropped), under a progress bar on rank 0."""
    from spin_fast import distributed

    results = []
    for item in distributed.progress_bar(in_step(models, items, what), what, progress):
        result = run(item)
        if item is not None:
            results.append(result)
    return results


@contextlib.contextmanager
def partitioned_loading(train: TrainConfig, settings: DeepSpeedConfig, world_size: int) -> Iterator[None]:
    """transformers' from_pretrained inside this context builds the model under deepspeed.zero.Init and loads
    each weight into its partitions: no rank ever holds the whole model, not even while loading."""
    from transformers.integrations import HfDeepSpeedConfig

    # transformers keeps only a weak reference: the model is partitioned while this object lives.
    keep = HfDeepSpeedConfig(deepspeed_config(train, settings, world_size))
    try:
        yield
    finally:
        del keep


@contextlib.contextmanager
def gathered(params: Iterable[torch.nn.Parameter | None]) -> Iterator[None]:
    """The whole tensors of these ZeRO-3 parameters for the duration (a collective: every rank must enter).
    Parameters that are not partitioned pass through, without importing DeepSpeed."""
    partitioned = [p for p in params if p is not None and is_partitioned(p)]
    if not partitioned:
        yield
        return
    from deepspeed.runtime.zero.partition_parameters import GatheredParameters

    with GatheredParameters(partitioned, modifier_rank=None):
        yield


def gather_units(model: torch.nn.Module, *, limit_bytes: int = LAYER_BYTES,
                 partitioned: Callable[[torch.nn.Parameter], bool] = is_partitioned,
                 ) -> list[tuple[torch.nn.Module, list[torch.nn.Parameter]]]:
    """The modules whose partitioned parameters a forward pass outside training gathers at once, each with those
    parameters: every block of a ModuleList (a decoder layer) whole, in one collective, when its full weights fit
    in limit_bytes; every other module with parameters of its own, alone (a block over the limit is split so)."""
    units, covered = [], set()
    for module in model.modules():  # outer modules first: a block is claimed before anything inside it
        if id(module) in covered:
            continue
        if isinstance(module, torch.nn.ModuleList):
            for block in module:
                params = [p for p in block.parameters() if partitioned(p)]
                if params and sum(_full_bytes(p) for p in params) <= limit_bytes:
                    units.append((block, params))
                    covered.update(id(m) for m in block.modules())
            continue
        own = [p for p in module.parameters(recurse=False) if partitioned(p)]
        if own:
            units.append((module, own))
    return units


def _full_bytes(param: torch.nn.Parameter) -> int:
    return getattr(param, "ds_numel", param.numel()) * param.element_size()


@contextlib.contextmanager
def gathered_per_layer(model: torch.nn.Module) -> Iterator[None]:
    """Forward passes of a partitioned model outside a DeepSpeed engine (scoring, generation, evaluation): each
    unit of gather_units (a decoder layer, or a module outside the layers such as the embedding) is gathered just
    before it runs and partitioned again just after, so a rank holds its shards plus one layer, and a layer costs
    one collective, not one per linear layer and norm (9 in a Llama layer). Every rank must make the same forward
    passes (pad with filler batches; generate with synced_gpus)."""
    from deepspeed.runtime.zero.partition_parameters import GatheredParameters

    units = gather_units(model)
    params_of = {id(module): params for module, params in units}
    active: dict[int, GatheredParameters] = {}

    def before(module, args):
        active[id(module)] = context = GatheredParameters(params_of[id(module)], modifier_rank=None)
        context.__enter__()

    def after(module, args, output):
        context = active.pop(id(module), None)
        if context is not None:
            context.__exit__(None, None, None)

    handles = []
    for module, _ in units:
        handles += [module.register_forward_pre_hook(before), module.register_forward_hook(after)]
    try:
        yield
    finally:
        for handle in handles:
            handle.remove()
        for context in active.values():  # a forward that raised: release what it had gathered
            context.__exit__(None, None, None)
        active.clear()


def release(engine) -> None:
    """Take the model out of a DeepSpeed engine for good, so that the engine and its optimizer state are freed and
    a later engine starts clean. DeepSpeed's destroy() removes the ZeRO hooks but leaves references that keep the
    engine alive: a global stack of module roots, backward closures stored on each module (which a later engine
    would reuse, along with this engine's parameter coordinator), and each parameter's link to its optimizer."""
    engine.destroy()
    for hook in (getattr(engine, "module_forward_pre_hook", None), getattr(engine, "module_forward_post_hook", None)):
        if hook is not None:
            hook.remove()
    from deepspeed.runtime.zero import parameter_offload

    parameter_offload.FWD_MODULE_STACK[:] = [m for m in parameter_offload.FWD_MODULE_STACK if m is not engine.module]
    for module in engine.module.modules():
        for name in ("pre_bwd_fn", "post_bwd_fn", "ds_grads_remaining", "applied_pre_backward_ref_cnt"):
            module.__dict__.pop(name, None)
    for param in engine.module.parameters():
        param.__dict__.pop("_z3_optimizer", None)

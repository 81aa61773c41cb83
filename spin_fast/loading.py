"""A run's models: a Hub model fetched into the local cache once (rank 0 first), and loaded with the run's
model and training settings (under deepspeed.zero3_init, straight into each rank's ZeRO-3 partitions)."""

from __future__ import annotations

import contextlib
import re
from pathlib import Path

import torch

from spin_fast import distributed
from spin_fast.config import RunConfig
from spin_fast.model import load_causal_lm
from spin_fast.training import uses_deepspeed


def device() -> str:
    return "cuda" if torch.cuda.is_available() else "cpu"


def library_progress_bars(progress: bool) -> None:
    """train.progress=false hides transformers', the Hub's and datasets' own bars too (loading a model's weights,
    writing its shards, downloading, preparing a data set), process-wide settings of those libraries; true leaves
    them be."""
    if progress:
        return
    import datasets
    from huggingface_hub.utils import disable_progress_bars
    from transformers.utils import logging as transformers_logging

    transformers_logging.disable_progress_bar()
    disable_progress_bars()
    datasets.disable_progress_bars()


def partitioned(config: RunConfig) -> bool:
    """deepspeed.zero3_init in a DeepSpeed run: the model is partitioned from its first load on."""
    return config.deepspeed.zero3_init and uses_deepspeed(config.deepspeed)


def fetch_model(name_or_path: str, setting: str = "model.name_or_path", revision: str | None = None) -> str:
    """A Hub model's config, tokenizer and weights (safetensors, else pytorch_model*.bin; at `revision`, else its
    main branch) into the local cache, so that the ranks loading it after rank 0 read the cache instead of all
    downloading at once; its local folder (a snapshot named after the revision's commit). A folder is its own. A
    name that is neither is an error naming `setting`."""
    if Path(name_or_path).exists():
        if revision:
            raise ValueError(f"{setting} {name_or_path!r} is a local folder: model.revision is for Hub models")
        if not (Path(name_or_path) / "config.json").is_file():
            raise FileNotFoundError(f"{setting} {name_or_path!r}: no config.json in it: not a model folder (one holds "
                                    "config.json, the weights and the tokenizer's files, as save_pretrained writes)")
        return name_or_path
    from huggingface_hub import snapshot_download
    from huggingface_hub.utils import HFValidationError, validate_repo_id

    try:
        validate_repo_id(name_or_path)
    except HFValidationError:  # a path, never a Hub id ("runs/x/final", "./model")
        raise FileNotFoundError(f"{setting} {name_or_path!r}: no such model folder") from None
    # Not .bin duplicates. *.jinja: a chat template saved by transformers 4.47 on (additional_chat_templates/ too).
    patterns = ["*.json", "*.safetensors", "*.model", "*.txt", "*.tiktoken", "*.py", "*.jinja"]

    def snapshot(**options) -> str:
        folder = snapshot_download(name_or_path, revision=revision, allow_patterns=patterns, **options)
        if any(Path(folder).glob("*.safetensors")):
            return folder
        # A model without safetensors (many of 2023 and before) has its weights in pytorch_model*.bin alone.
        return snapshot_download(name_or_path, revision=revision, allow_patterns=[*patterns, "pytorch_model*.bin"],
                                 **options)

    if revision and re.fullmatch(r"[0-9a-f]{40}", revision):
        # A commit never changes: its snapshot in the cache is the model, with no Hub call (a resumed run asks for the
        # commit it started from, often on nodes without network). huggingface_hub 1.x lists a commit's files on
        # the Hub even with HF_HUB_OFFLINE set, and fails there although the snapshot is cached.
        with contextlib.suppress(OSError, ValueError):  # not in the cache (or only part of it): fetched below
            return snapshot(local_files_only=True)
    try:
        return snapshot()
    except (OSError, ValueError) as error:  # no such repository, a gated one, no network and not in the cache
        said = " ".join(line.strip() for line in str(error).splitlines() if line.strip())  # the Hub's: several lines
        raise FileNotFoundError(f"{setting} {name_or_path!r}: no such model folder, and not fetched as a Hub model "
                                f"id ({type(error).__name__}: {said})") from None


def load_policy(path: str, config: RunConfig):
    """A model of the run (SFT model or checkpoint) with the run's model and training settings; under
    deepspeed.zero3_init, loaded straight into each rank's ZeRO-3 partitions."""
    def load():
        return load_causal_lm(path, dtype=getattr(torch, config.train.dtype), device=device(),
                              attention_impl=config.model.attention, trust_remote_code=config.model.trust_remote_code,
                              gradient_checkpointing=config.train.gradient_checkpointing,
                              liger_kernels=config.train.liger_kernels)

    if partitioned(config):  # collectives inside: every rank must reach them (no on_every_rank around them)
        from spin_fast.zero import partitioned_loading

        distributed.init(config.deepspeed.timeout_minutes)  # zero.Init partitions across the process group
        with partitioned_loading(config.train, config.deepspeed, distributed.world_size()):
            return load()
    # Every rank loads the model on its own (a checkpoint rank 0 wrote, often): one that cannot read it stops them
    # all with its error, not rank 0 in its next collective on a closed connection.
    return distributed.on_every_rank(load, f"loading {path}")

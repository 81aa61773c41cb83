"""Settings: TrainConfig (one training run) and RunConfig (a whole SPIN run), from YAML + overrides.

Defaults are the official SPIN recipe's. Unknown keys, wrong types and impossible values are
errors naming the key (and the closest valid one).
"""

from __future__ import annotations

import copy
import dataclasses
import difflib
import importlib.util
import json
import logging
import os
import types
import typing
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field, fields
from pathlib import Path

import yaml

T = typing.TypeVar("T")

# backend and loss_type are spin_kernels' own lists, written here so that a config loads without torch (a test keeps
# them equal).
CHOICES = {
    "mode": ("spin", "sft"),
    "loss_type": ("sigmoid", "hinge", "ipo"),
    "optimizer": ("rmsprop", "adamw"),
    "schedule": ("linear", "cosine", "constant"),
    "dtype": ("float32", "bfloat16", "float16"),
    "backend": ("auto", "triton", "torch", "reference"),
    "attention": ("auto", "sdpa", "eager", "flash_attention_2", "spin_varlen"),
}


def home_expanded(path: str | None, home: str | None = None) -> str | None:
    """A path setting's `~/...` in the home folder (this $HOME's, or `home`), as a shell would take it: YAML leaves
    it as written, and so does bash in `--set data.source=~/...` (no shell variable's name), where it named a folder
    '~' in the current one."""
    if home is not None and path is not None and (path == "~" or path.startswith("~/")):
        return home + path[1:]
    return os.path.expanduser(path) if path and path.startswith("~") else path


def expand_home(config, names: Sequence[str]) -> None:
    """config's path settings `names` expanded for use (home_expanded), and kept as written for to_dict: config.yaml
    and the config's hash hold `~/x`, so that a run directory resumes under another $HOME (another account or
    machine, a node of a launch) where the same setting names the same files."""
    config._as_written = {name: (getattr(config, name), home_expanded(getattr(config, name))) for name in names}
    for name, (_, expanded) in config._as_written.items():
        setattr(config, name, expanded)


# The settings that name a path (or a Hub id) that may begin with `~`.
PATH_SETTINGS = ("output_dir", "model.name_or_path", "model.chat_template", "data.source", "data.eval_source",
                 "deepspeed.config_file")


def is_template(text: str) -> bool:
    """model.chat_template holds a Jinja template (else the path of a file holding one)."""
    return "{{" in text or "{%" in text


@dataclass
class TrainConfig:
    """One training run (an SPIN iteration's training, or SFT). Batches are counted in pairs (SPIN)
    or examples (SFT); micro-batches are cut by tokens."""

    mode: str = "spin"
    beta: float = 0.1
    loss_type: str = "sigmoid"
    label_smoothing: float = 0.0  # cDPO's: the chance that a pair's preference is flipped (sigmoid loss only)
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
    attention: str = "auto"  # unused, kept so that older configs load: the attention is model.attention
    backend: str = "auto"  # spin_kernels backend for the head
    share_prompts: bool = True  # a pair's prompt computed once for both responses (needs spin_varlen attention)
    save_every: int = 0  # optimizer steps between checkpoints; 0: only at the end
    keep_checkpoints: int = 2
    tensorboard: bool = False  # metrics also to TensorBoard, in the training's folder
    wandb: bool = False  # metrics also to Weights & Biases (its WANDB_* environment settings apply)
    progress: bool = True

    def __post_init__(self) -> None:
        check_field_types(self)
        for name, allowed in CHOICES.items():
            if getattr(self, name) not in allowed:
                raise ValueError(f"{name} must be one of {allowed}, got {getattr(self, name)!r}")
        if self.attention != "auto":
            raise ValueError(f"attention: set model.attention instead (train.attention is unused), got "
                             f"{self.attention!r}")
        positive = ("learning_rate", "epochs", "global_batch", "micro_batch_tokens", "beta", "keep_checkpoints",
                    "optimizer_eps")
        for name in positive:
            if not 0 < getattr(self, name) < float("inf"):
                raise ValueError(f"{name} must be a finite number > 0, got {getattr(self, name)!r}")
        if not 0 <= self.warmup_ratio < 1:
            raise ValueError(f"warmup_ratio must be in [0, 1), got {self.warmup_ratio!r}")
        if not 0 <= self.seed < 2**32:  # each epoch's order is drawn from seed * 100003 + epoch, an int64
            raise ValueError(f"seed must be in [0, 2**32), got {self.seed!r}")
        if not 0 <= self.label_smoothing < 0.5:
            raise ValueError(f"label_smoothing must be in [0, 0.5), got {self.label_smoothing!r}")
        if self.label_smoothing and self.loss_type != "sigmoid":
            raise ValueError(f"label_smoothing is the sigmoid loss's (cDPO), got loss_type {self.loss_type!r}")
        for name in ("max_grad_norm", "weight_decay", "save_every"):
            if not 0 <= getattr(self, name) < float("inf"):
                raise ValueError(f"{name} must be a finite number >= 0, got {getattr(self, name)!r}")

    def to_dict(self) -> dict:
        return {f.name: getattr(self, f.name) for f in fields(self)}

    def replace(self, **changes) -> TrainConfig:
        return dataclasses.replace(self, **changes)


@dataclass
class ModelConfig:
    name_or_path: str = ""  # its dtype in training is train.dtype
    # A Hub model's revision (branch, tag or commit); "" its main branch. A run keeps the commit it started from.
    revision: str = ""
    attention: str = "auto"
    trust_remote_code: bool = False
    # A Jinja chat template, or the path of a file holding one, for a tokenizer without one (a base model, e.g.
    # before `spin-fast sft`) or in place of its own: every prompt is rendered with it, and checkpoints keep it.
    chat_template: str | None = None

    def __post_init__(self) -> None:
        check_field_types(self)
        template_file = self.chat_template is not None and not is_template(self.chat_template)
        expand_home(self, ("name_or_path", "chat_template") if template_file else ("name_or_path",))
        if self.attention not in CHOICES["attention"]:
            raise ValueError(f"attention must be one of {CHOICES['attention']}, got {self.attention!r}")
        if self.attention == "flash_attention_2" and importlib.util.find_spec("flash_attn") is None:
            raise ValueError("attention flash_attention_2 needs the flash_attn package (CUDA only: pip install "
                             "flash-attn --no-build-isolation, as it builds against the installed torch); 'auto' "
                             "(spin_varlen) runs FlashAttention's varlen kernel without it, through PyTorch's own")
        if self.chat_template is not None:
            self.template_text()  # a missing file fails here, before anything runs

    def template_text(self) -> str | None:
        """chat_template's Jinja text: as given, or read from the file it names."""
        value = self.chat_template
        if value is None or is_template(value):
            return value
        path = Path(value)
        if not path.is_file():
            raise ValueError(f"chat_template {value!r} is neither a Jinja template (it has no '{{{{' or '{{%') nor a "
                             "file: give the template, or the path of a file holding one (e.g. "
                             "configs/templates/zephyr.jinja)")
        try:  # as the config file is read, and transformers reads a tokenizer's own: not in the locale's encoding
            return path.read_text(encoding="utf-8")
        except UnicodeDecodeError as error:
            raise ValueError(f"chat_template {value!r}: not UTF-8 text ({error})") from None


@dataclass
class DataConfig:
    source: str = ""
    split: str = "train"
    schema: str = "auto"
    keep_history: bool = False
    skip_invalid: bool = False
    max_prompts: int | None = None  # the paper's recipe takes 50k prompts
    max_length: int = 1024
    max_prompt_length: int = 512
    # How a long prompt is cut (data.fit_to_length): "always" to its last max_prompt_length tokens, in generation
    # and training; "when_too_long", the official SPIN code's rule: answered whole, and cut only in a pair too
    # long for max_length.
    cut_prompt: str = "always"
    eval_source: str | None = None
    eval_split: str | None = None  # eval_source's split (null: split): a Hub dataset's test_sft beside train_sft
    # "package.module:function" grading a held-out answer: f(prompt, response, reference) -> [0, 1] (eval)
    checker: str | None = None
    split_setting = "data.split"  # not a field: the setting `split` came from, as errors name it (held_out's own)
    split_given = True  # not a field: False where `split` is data.split's value taken by a null data.eval_split

    def __post_init__(self) -> None:
        check_field_types(self)
        expand_home(self, ("source", "eval_source"))
        from spin_fast.data import CUT_PROMPT, SCHEMAS

        if self.schema not in ("auto", *SCHEMAS):
            raise ValueError(f"schema must be 'auto' or one of {SCHEMAS}, got {self.schema!r}")
        if self.cut_prompt not in CUT_PROMPT:
            raise ValueError(f"cut_prompt must be one of {CUT_PROMPT}, got {self.cut_prompt!r}")
        if self.max_prompts is not None and self.max_prompts < 1:
            raise ValueError(f"max_prompts must be >= 1 (or null: every prompt), got {self.max_prompts}")
        if not 1 <= self.max_prompt_length < self.max_length:
            raise ValueError(f"max_prompt_length ({self.max_prompt_length}) must be >= 1 and below max_length "
                             f"({self.max_length})")

    def held_out(self) -> DataConfig:
        """The settings eval_source is read with: its own split."""
        held = dataclasses.replace(self, split=self.eval_split or self.split, eval_split=None)
        held._as_written = self._as_written  # replace expanded the paths again: `~/x` as written is kept
        held.split_setting = "data.eval_split"  # the one to mend (null, its default, takes split's value)
        held.split_given = self.eval_split is not None  # else a held-out folder of test.jsonl alone warned of train
        return held


@dataclass
class GenerationConfig:
    engine: str = "auto"  # auto: vLLM when installed, else transformers
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0
    max_new_tokens: int = 256
    seed: int = 0
    batch_size: int = 16  # transformers engine
    tensor_parallel_size: int = 1  # vLLM; under a launcher, this many consecutive ranks share one engine
    gpu_memory_utilization: float = 0.5  # vLLM

    def __post_init__(self) -> None:
        check_field_types(self)
        if self.engine not in ("auto", "vllm", "transformers"):
            raise ValueError(f"engine must be one of ('auto', 'vllm', 'transformers'), got {self.engine!r}")
        for name in ("batch_size", "tensor_parallel_size"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        if not 0 < self.gpu_memory_utilization <= 1:
            raise ValueError(f"gpu_memory_utilization must be in (0, 1], got {self.gpu_memory_utilization}")
        self.sampling()  # checks temperature, top_p, top_k, max_new_tokens

    def sampling(self, n: int = 1):
        from spin_fast.generation.base import SamplingConfig

        return SamplingConfig(temperature=self.temperature, top_p=self.top_p, top_k=self.top_k,
                              max_new_tokens=self.max_new_tokens, seed=self.seed, n=n)


@dataclass
class DeepSpeedConfig:
    """Training under DeepSpeed ZeRO, used when the run is launched with several processes (torchrun or the
    deepspeed launcher) or when enabled is true. spin-fast derives DeepSpeed's JSON from these settings and
    `train`; config_file takes a user's JSON as is (a setting that contradicts spin-fast's is an error)."""

    enabled: bool | None = None  # None: when WORLD_SIZE > 1
    zero_stage: int | None = None  # None: config_file's stage, else 2 (3 with zero3_init)
    offload_optimizer: bool = False  # optimizer state in CPU memory
    offload_params: bool = False  # parameters in CPU memory (ZeRO-3 only)
    # ZeRO-3 from the first load on, for models larger than one GPU: loaded partitioned (zero.Init), and
    # generation (transformers engine), scoring and evaluation run on the partitioned model, every rank in step.
    zero3_init: bool = False
    config_file: str | None = None
    timeout_minutes: float = 30.0  # a collective that waits longer (a dead rank) fails with an error

    def __post_init__(self) -> None:
        check_field_types(self)
        if self.zero_stage not in (None, 0, 1, 2, 3):
            raise ValueError(f"zero_stage must be one of (0, 1, 2, 3), got {self.zero_stage!r}")
        if self.offload_params and self.zero_stage not in (None, 3):
            raise ValueError(f"offload_params needs zero_stage 3, got zero_stage {self.zero_stage}")
        if self.zero3_init and self.zero_stage not in (None, 3):
            raise ValueError(f"zero3_init needs zero_stage 3, got zero_stage {self.zero_stage}")
        if not 0 < self.timeout_minutes <= 10**9:  # a timedelta of more overflows
            raise ValueError(f"timeout_minutes must be > 0 and at most 1e9, got {self.timeout_minutes!r}")
        expand_home(self, ("config_file",))
        if self.config_file is not None and not Path(self.config_file).is_file():
            raise ValueError(f"config_file {self.config_file!r}: no such file (a DeepSpeed JSON config)")


@dataclass
class RunConfig:
    """A whole SPIN run: SFT model and data in, `iterations` rounds of generate -> score -> train."""

    output_dir: str = ""
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    generation: GenerationConfig = field(default_factory=GenerationConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    deepspeed: DeepSpeedConfig = field(default_factory=DeepSpeedConfig)
    iterations: int = 3
    mix_previous: int = 1  # iteration t also trains on the pairs of the t-1 .. t-mix_previous
    score_batch_tokens: int = 16384
    # Generation and scoring save their results every this many prompts (pairs, in scoring): a killed run redoes
    # at most one part of a stage. 0: each stage saves once, at its end.
    save_every_prompts: int = 4096
    # Per-iteration changes of settings, e.g. {1: {"train.learning_rate": 1e-7}} (or {1: {"train": {...}}}).
    # null: none (--set iteration_overrides=null drops a file's; an iteration's null, its own).
    iteration_overrides: dict | None = field(default_factory=dict)

    def __post_init__(self) -> None:
        check_field_types(self)
        expand_home(self, ("output_dir",))
        written = self._as_written["output_dir"][0]
        # Older spin-fast took `~` as a folder's name: its work there would be left behind, the run begun anew.
        if written != self.output_dir and Path(written).is_dir() and not Path(self.output_dir).exists():
            raise ValueError(f"output_dir {written!r} is {self.output_dir} (the home folder's), where nothing is yet, "
                             f"while {Path(written).absolute()} holds what older spin-fast made for it (it took '~' "
                             f"as a folder's name): move it to {self.output_dir} to go on with that work, or remove "
                             "it to start anew")
        if self.iterations < 1:
            raise ValueError(f"iterations must be >= 1, got {self.iterations}")
        if self.mix_previous < 0:
            raise ValueError(f"mix_previous must be >= 0, got {self.mix_previous}")
        if self.save_every_prompts < 0:
            raise ValueError(f"save_every_prompts must be >= 0, got {self.save_every_prompts}")
        if self.score_batch_tokens < 1:
            raise ValueError(f"score_batch_tokens must be >= 1, got {self.score_batch_tokens}")
        # YAML's key 1 and --set iteration_overrides.1.x's "1" name one iteration: their settings merge, the later's
        # (the --set's) winning where both set one; null drops the iteration's overrides (--set ...1=null).
        merged: dict[int, dict] = {}
        for t, changes in (self.iteration_overrides or {}).items():
            flat = _dotted_changes(t, {} if changes is None else changes)
            if changes is None:
                merged.pop(int(t), None)
            else:
                merged.setdefault(int(t), {}).update(flat)
        self.iteration_overrides = merged
        for iteration, changes in merged.items():  # every iteration's settings checked now, not when it starts
            # Kept as read (1e-7 and 1.0e-7 one number): a resumed run compares them with the saved ones.
            applied = flat_settings(self.for_iteration(iteration).to_dict())
            merged[iteration] = {key: applied[key] for key in changes}

    def for_iteration(self, iteration: int) -> RunConfig:
        """This config with the overrides of `iteration` applied (the paper lowers lr later on)."""
        data = self.to_dict()
        data["iteration_overrides"] = {}
        for key, value in self.iteration_overrides.get(iteration, {}).items():
            _set_dotted(data, key, value, where=f"iteration_overrides[{iteration}]")
        try:
            config = from_dict(RunConfig, data)
        except ConfigError as error:
            setting = f"iteration_overrides.{iteration}" + (f".{error.setting}" if error.setting else "")
            raise ConfigError(f"iteration_overrides[{iteration}]: {error}", setting) from None
        config.iteration_overrides = self.iteration_overrides
        return config

    def to_dict(self) -> dict:
        return _to_dict(self)


class ConfigError(ValueError):
    """A bad key, type or value in a config; the message names the key and suggests the closest one. `setting`:
    the dotted key it is about, where one is (an error in a config file then names its line)."""

    def __init__(self, message: str, setting: str | None = None):
        super().__init__(message)
        self.setting = setting


class _UniqueKeyLoader(yaml.SafeLoader):
    """YAML's safe loader, refusing a key given twice in one mapping: yaml.safe_load keeps the last one, so a
    section written twice (two `train:` blocks) silently lost the first one's settings."""

    def construct_mapping(self, node, deep=False):
        seen: dict = {}
        for key_node, _ in node.value:
            if key_node.tag == "tag:yaml.org,2002:merge":  # `<<: *base`: merged keys may be overridden
                continue
            key = self.construct_object(key_node, deep=deep)
            try:
                hash(key)
            except TypeError:  # `{{ x }}` unquoted: a mapping as a key, which PyYAML's own check names
                continue
            if key in seen:
                raise yaml.constructor.ConstructorError(
                    None, None, f"{key!r} is given twice (first on line {seen[key].line + 1})", key_node.start_mark)
            seen[key] = key_node.start_mark
        return super().construct_mapping(node, deep)


def parse_yaml(text: str, where: str):
    """YAML text's value; a syntax error or a key given twice is a one-line ConfigError naming `where` (a file, a
    --set option) and the line."""
    try:
        return yaml.load(text, Loader=_UniqueKeyLoader)  # noqa: S506 - a SafeLoader
    except yaml.YAMLError as error:
        mark = getattr(error, "problem_mark", None)
        line = f", line {mark.line + 1}" if mark is not None else ""
        problem = getattr(error, "problem", None) or str(error).splitlines()[0]
        context = getattr(error, "context", None)
        raise ConfigError(f"{where}{line}: {problem}{f' ({context})' if context else ''}") from None


def load_run_config(path: str | Path | None, overrides: Sequence[str] = ()) -> RunConfig:
    """A RunConfig from a YAML file (or defaults when None), then `key.sub=value` overrides."""
    data, text = read_config_file(path) if path is not None else ({}, "")
    if "demo" in data:
        raise ConfigError(f"{path}: its 'demo' section holds the demo's own settings: run it with "
                          f"`python -m spin_fast.demo --config {path}` (or `make demo`)")
    config = build_config(lambda settings: from_dict(RunConfig, settings), data, overrides, path, text)
    warn_of_unused_overrides(config)
    return config


def read_config_file(path: str | Path) -> tuple[dict, str]:
    """A YAML config file's mapping of settings, and its text."""
    try:
        text = Path(path).read_text(encoding="utf-8")
    except UnicodeDecodeError as error:
        raise ConfigError(f"config file {path}: not UTF-8 text ({error})") from None
    except OSError as error:  # missing, a folder, unreadable
        raise ConfigError(f"config file {path}: {error.strerror or error}") from None
    loaded = parse_yaml(text, str(path)) or {}
    if not isinstance(loaded, dict):
        raise ConfigError(f"{path}: expected a mapping of settings at the top level, got {type(loaded).__name__}")
    return loaded, text


def build_config(build: Callable[[dict], T], data: dict, overrides: Sequence[str], path: str | Path | None = None,
                 text: str = "") -> T:
    """build(data) after the --set overrides; a ConfigError it raises is prefixed with where the bad setting was
    given: the file and its line, or the first --set option after which the error appears."""
    from_file = copy.deepcopy(data)
    for override in overrides:
        _apply_override(data, override)
    try:
        return build(data)
    except ConfigError as error:
        source = _blamed(build, path, from_file, overrides, str(error))
        line = _key_line(text, error.setting) if source == path and text and error.setting else None
        where = "" if source is None else f"{source}{f', line {line}' if line else ''}: "
        raise ConfigError(f"{where}{error}", error.setting) from None


def _apply_override(data: dict, override: str) -> None:
    key, sep, raw = override.partition("=")
    if not sep:
        raise ConfigError(f"--set {override!r}: expected key=value, e.g. train.learning_rate=1e-7")
    _set_dotted(data, key.strip(), parse_yaml(raw, f"--set {override}"), where=f"--set {override}")


def _blamed(build: Callable[[dict], object], path: str | Path | None, data: dict, overrides: Sequence[str],
            message: str) -> str | Path | None:
    """Where a config's error comes from: the file, when it alone gives the error, else the first --set option
    after which it appears; None when neither."""
    for source in (path, *(f"--set {override}" for override in overrides)):
        if source is not None and source != path:
            _apply_override(data, source.removeprefix("--set "))
        try:
            build(copy.deepcopy(data))
        except ConfigError as error:
            if str(error) == message:
                return source
    return None


def _key_line(text: str, setting: str) -> int | None:
    """The line (from 1) where a YAML file gives the dotted key `setting`, or the nearest section of it it gives."""
    node, line = yaml.compose(text, Loader=yaml.SafeLoader), None
    for part in setting.split("."):
        found = [(key, value) for key, value in getattr(node, "value", ()) if isinstance(node, yaml.MappingNode)
                 and isinstance(key, yaml.ScalarNode) and key.value == part]
        if not found:
            break
        line, node = found[0][0].start_mark.line + 1, found[0][1]
    return line


def from_dict(cls, data: dict, prefix: str = "", places: Sequence[str] = ()):
    """Build dataclass `cls` from a dict, checking every key and type. `places`: settings an unknown key may belong
    to besides the run's (the demo's own)."""
    if not isinstance(data, dict):
        raise ConfigError(f"{prefix or 'config'}: expected a mapping, got {type(data).__name__}")
    known = {f.name: f for f in fields(cls)}
    hints = typing.get_type_hints(cls)
    values = {}
    for key, value in data.items():
        name = f"{prefix}{key}"
        if key not in known:
            # A setting in another section (or none) is the likeliest slip: its right place is the closest key.
            close = _placed_elsewhere(str(key), places) or [
                f"{prefix}{match}" for match in difflib.get_close_matches(str(key), list(known), n=1)]
            hint = f"; did you mean {' or '.join(map(repr, close))}?" if close else f"; valid keys: {', '.join(known)}"
            raise ConfigError(f"unknown setting {name!r}{hint}", name)
        values[key] = _coerce(hints[key], value, name, places)
    try:
        return cls(**values)
    except ConfigError:
        raise
    except ValueError as error:  # a dataclass's own validation, e.g. TrainConfig's choices
        first_word = str(error).split(" ", 1)[0].rstrip(":")  # the setting, as its messages begin
        setting = f"{prefix}{first_word}" if first_word in known else prefix.rstrip(".") or None
        raise ConfigError(f"{prefix.rstrip('.') or 'config'}: {error}", setting) from None


def _placed_elsewhere(key: str, others: Sequence[str] = ()) -> list[str]:
    """The run settings (and `others`) named `key`, at the top level or in a section (key is unknown where it was
    given)."""
    places = [f.name for f in fields(RunConfig)]
    places += [f"{section.name}.{f.name}" for section in fields(RunConfig) if section.name in SECTIONS
               for f in fields(section.default_factory)]
    places += others
    # train.attention is kept for old configs alone: never a place to suggest
    return [place for place in places if place.rsplit(".", 1)[-1] == key and place != "train.attention"]


def check_field_types(config) -> None:
    """Each setting of a config dataclass against its type, as from_dict checks a YAML file's: a config built in
    Python (TrainConfig(epochs=1.5)) fails here, not steps later. A section is checked by its own dataclass."""
    for name, hint in typing.get_type_hints(type(config)).items():
        if not dataclasses.is_dataclass(hint):
            setattr(config, name, _coerce(hint, getattr(config, name), name))
        elif not isinstance(getattr(config, name), hint):  # RunConfig(train={...}) would fail at its first use
            raise ValueError(f"{name} must be a {hint.__name__} (from_dict reads a mapping), got "
                             f"{getattr(config, name)!r}")


def section_settings(value, name: str) -> dict:
    """A section's settings as read from a file: a mapping, or nothing (an empty or absent section)."""
    if not isinstance(value, dict | None):
        raise ConfigError(f"setting {name!r} is a section: expected a mapping of its settings, got {value!r}", name)
    return value or {}


def _coerce(hint, value, name: str, places: Sequence[str] = ()):
    if dataclasses.is_dataclass(hint):
        return from_dict(hint, section_settings(value, name), prefix=f"{name}.", places=places)
    options = typing.get_args(hint) if typing.get_origin(hint) in (typing.Union, types.UnionType) else (hint,)
    if value is None and type(None) in options:
        return None
    for option in options:
        if option is float and isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
        if option is float and isinstance(value, str):  # YAML 1.1 reads 1e-7 (no dot) as a string
            try:
                return float(value)
            except ValueError:
                pass
        if option in (int, str, bool, dict) and type(value) is option:
            return value
    expected = " or ".join(getattr(o, "__name__", str(o)) for o in options)
    raise ConfigError(f"setting {name!r} must be {expected}, got {value!r} ({type(value).__name__})", name)


# Settings that belong to the whole run: an iteration cannot change them (a section, or one setting). The model is
# loaded once per run (in train.dtype, under the deepspeed settings, patched as train.gradient_checkpointing and
# train.liger_kernels say) and so is the generation engine (serving in the dtype the model computes in): an
# iteration's other value would be silently ignored.
SECTIONS = ("model", "data", "generation", "train", "deepspeed")
RUN_WIDE = ("output_dir", "model", "iterations", "mix_previous", "iteration_overrides", "deepspeed", "train.dtype",
            "train.bf16_autocast", "train.gradient_checkpointing", "train.liger_kernels", "generation.engine",
            "generation.tensor_parallel_size", "generation.gpu_memory_utilization", "generation.batch_size")


def _dotted_changes(iteration, changes) -> dict:
    """One iteration's overrides as {"section.key": value}: a nested mapping changes only the settings it names."""
    where, setting = f"iteration_overrides[{iteration}]", f"iteration_overrides.{iteration}"
    # 2 or "2" (as YAML or JSON wrote it); isdecimal, not isdigit: int() refuses "²"
    if isinstance(iteration, bool) or not str(iteration).isdecimal():
        raise ConfigError(f"{where}: the key must be an iteration number, got {iteration!r}", setting)
    if not isinstance(changes, dict):
        raise ConfigError(f"{where}: expected a mapping of settings, e.g. {{train.learning_rate: 1.0e-7}}, "
                          f"got {changes!r}", setting)

    def flatten(mapping: dict, prefix: str) -> dict:
        flat = {}
        for key, value in mapping.items():
            name = f"{prefix}{key}"
            if value is None and name in SECTIONS:  # an empty section (its settings commented out) changes nothing
                continue
            for dotted, change in (flatten(value, f"{name}.") if isinstance(value, dict) else {name: value}).items():
                if dotted in flat:  # train.x and train: {x: ...} both
                    raise ConfigError(f"{where}: {dotted} is given twice", f"{setting}.{dotted}")
                flat[dotted] = change
        return flat

    flat = flatten(changes, "")
    for key in flat:
        if any(key == name or key.startswith(f"{name}.") for name in RUN_WIDE):
            raise ConfigError(f"{where}: {key} is set for the whole run, not per iteration", f"{setting}.{key}")
    return flat


def warn_of_unused_overrides(config: RunConfig) -> None:
    """Overrides of iterations past the last are kept and checked (the run may be extended later), and said once,
    as the config loads."""
    for iteration in sorted(t for t in config.iteration_overrides if t >= config.iterations):
        logging.getLogger(__name__).warning("iteration_overrides[%d]: unused while the run has iterations 0 to %d",
                                            iteration, config.iterations - 1)


def _set_dotted(data: dict, key: str, value, where: str) -> None:
    parts = key.split(".")
    node = data
    # A key the file writes dotted (an override's {train.beta: ...}, as config.yaml saves them) is that setting: a
    # nested copy beside it would be the setting given twice.
    while len(parts) > 1 and ".".join(parts) not in node:
        part = _as_in(node, parts.pop(0))
        if node.get(part) is None:  # absent, or an empty section in the YAML (`train:` alone)
            node[part] = {}
        child = node[part]
        if not isinstance(child, dict):
            raise ConfigError(f"{where}: {part!r} is a value, not a section")
        node = child
    key = _as_in(node, ".".join(parts))
    # A mapping changes the settings it names (as a nested iteration override does), not the section's others, also
    # where the file writes them dotted beside it ({train.beta: ...}).
    if isinstance(value, dict) and (isinstance(node.get(key), dict) or any(str(k).startswith(f"{key}.") for k in node)):
        for name, change in value.items():
            _set_dotted(node, f"{key}.{name}", change, where)
        return
    node[key] = value


def _as_in(node: dict, key: str) -> str | int:
    """key as `node` holds it: iteration_overrides.1 names a YAML file's iteration 1, a number (so that a --set null
    replaces its overrides rather than beside them)."""
    return int(key) if key not in node and key.isdecimal() and int(key) in node else key


def flat_settings(config: dict, prefix: str = "") -> dict:
    """{"section.key": value} of a config's nested dict (iteration_overrides stays one value)."""
    flat = {}
    for key, value in config.items():
        nested = isinstance(value, dict) and key != "iteration_overrides"
        flat.update(flat_settings(value, f"{prefix}{key}.") if nested else {f"{prefix}{key}": value})
    return flat


def differing_settings(saved: dict, now: dict, ignored: Sequence[str] = ()) -> list[str]:
    """"key (saved x, now y)" for each setting, but the ignored ones, whose value differs between two nested config
    dicts, compared as JSON writes them (tuples as lists), in key order."""
    saved, now = flat_settings(saved), flat_settings(now)
    return [f"{key} (saved {saved.get(key)!r}, now {now.get(key)!r})" for key in sorted(saved.keys() | now.keys())
            if key not in ignored and as_written(saved.get(key)) != as_written(now.get(key))]


def as_written(value):
    """A value as YAML and JSON write it: tuples become lists, iteration numbers strings."""
    return json.loads(json.dumps(value, default=str))


def _to_dict(obj) -> dict:
    """obj's settings, a path setting as the user wrote it (`~/x`, expand_home) unless it was set otherwise since."""
    written = getattr(obj, "_as_written", {})

    def setting(name: str, value):
        if dataclasses.is_dataclass(value):
            return _to_dict(value)
        as_written, expanded = written.get(name, (value, value))
        return as_written if value == expanded else value

    return {f.name: setting(f.name, getattr(obj, f.name)) for f in fields(obj)}


def unexpanded_setting(config, name: str):
    """config's setting `name` as the user wrote it (`~/x`, expand_home), for what a run directory records."""
    return _to_dict(config)[name]


def expanded_under_another_home(saved: dict, now: dict) -> str | None:
    """The home folder where spin-fast before expand_home saved `now`'s output_dir `~/x` expanded (/home/alice/x),
    when that is not this $HOME's nor a folder in it: the saved paths then name another home's files. None
    otherwise. The caller checks that this home explains every difference (paths_as_now with it)."""
    then, written = saved.get("output_dir"), now.get("output_dir")
    if not (isinstance(then, str) and isinstance(written, str) and written.startswith("~/")):
        return None
    rest, here = written[1:], home_expanded("~")  # "/x", this $HOME
    if then == home_expanded(written) or not then.endswith(rest) or not Path(then).is_absolute():
        return None
    home = then[: -len(rest)] or "/"
    return None if Path(home) == Path(here) or Path(here) in Path(home).parents else home


def saved_under_another_home(path: Path, home: str, folder: str, instead: str) -> str:
    """The refusal of a directory expanded_under_another_home found, its files under `folder`."""
    return (f"{path} was saved by older spin-fast with `~` expanded to {home}, the home folder it ran under: its "
            f"settings and stages name files under {folder}, not here. Resume it there (with $HOME {home}), or "
            f"{instead}")


def paths_as_now(saved: dict, now: dict, home: str | None = None) -> dict:
    """A saved config dict with each path setting that names the path `now`'s names written as `now` writes it:
    spin-fast before expand_home saved `~/x` expanded (/home/me/x), which a resume writing `~/x` gives again (`~`
    as this $HOME, or `home`)."""
    saved = copy.deepcopy(saved)

    def align(then: dict, current: dict, names: Sequence[str]) -> None:
        for name in names:
            if isinstance(then.get(name), str) and isinstance(current.get(name), str) and \
                    home_expanded(then[name], home) == home_expanded(current[name], home):
                then[name] = current[name]

    for name in PATH_SETTINGS:
        section, _, key = name.rpartition(".")
        then, current = (saved.get(section), now.get(section)) if section else (saved, now)
        if isinstance(then, dict) and isinstance(current, dict):
            align(then, current, [key])
    for t, changes in (saved.get("iteration_overrides") or {}).items():  # {"data.source": ...}, dotted
        current = (now.get("iteration_overrides") or {}).get(t)
        if isinstance(changes, dict) and isinstance(current, dict):
            align(changes, current, PATH_SETTINGS)
    return saved

"""Which engine generates a run's responses, and starting it with the run's settings."""

from __future__ import annotations

import logging
from collections.abc import Sequence as Seq

import torch
from transformers import AutoConfig

from spin_fast import distributed
from spin_fast.config import ConfigError, RunConfig
from spin_fast.data import eos_token_id, turn_end_text
from spin_fast.generation.base import Engine
from spin_fast.loading import load_policy
from spin_fast.model import check_rope_takes_max_length, text_config

log = logging.getLogger(__name__)


# The config keys vLLM reads a model's context from (vllm/transformers_utils/model_arch_config_convertor.py):
# it serves the smallest, and refuses a longer max_model_len with an error naming none of the run's settings.
CONTEXT_KEYS = ("max_position_embeddings", "n_positions", "max_seq_len", "seq_length", "model_max_length",
                "max_target_positions", "max_sequence_length", "max_seq_length", "seq_len")


# RoPE scalings whose max_position_embeddings is already the scaled length (vllm/config/model.py applies the factor
# of any other: linear, dynamic).
ROPE_ALREADY_SCALED = frozenset({"su", "longrope", "llama3", "yarn", "deepseek_yarn", "deepseek_llama_scaling"})


def context_of(model_folder: str, config: RunConfig) -> tuple[int | None, str]:
    """The model's context in tokens as vLLM derives it, and what of its config gives it: the smallest of
    CONTEXT_KEYS, or its model_max_length where it has one (Command-R's is above max_position_embeddings), times the
    RoPE scaling factor, all read from its text decoder's config (a VLM's text_config: vLLM's hf_text_config). None
    where it has none of the keys: nothing is checked against a context then, and vLLM serves the lengths the run
    asks for (it assumes 2048 tokens only when asked for none)."""
    return context_in(AutoConfig.from_pretrained(model_folder, trust_remote_code=config.model.trust_remote_code))


def context_in(model_config) -> tuple[int | None, str]:
    """context_of, from the model's config once read."""
    text = text_config(model_config)
    lengths = [(value, key) for key in CONTEXT_KEYS if isinstance(value := getattr(text, key, None), int) and value > 0]
    context, key = min(lengths, default=(None, "max_position_embeddings"))
    if isinstance(limit := getattr(text, "model_max_length", None), int) and limit > 0:
        context, key = limit, "model_max_length"
    factor = rope_factor(text)
    if context and factor != 1:
        context, key = int(context * factor), f"{key} times the RoPE scaling factor {factor}"
    return context, key


def rope_factor(model_config) -> float:
    """The factor vLLM scales a model's context by: its RoPE scaling's (one per layer type where nested), except the
    kinds in ROPE_ALREADY_SCALED and Gemma 3's (already scaled too)."""
    rope = getattr(model_config, "rope_parameters", None) or getattr(model_config, "rope_scaling", None)
    if not isinstance(rope, dict) or "gemma3" in str(getattr(model_config, "model_type", "")):
        return 1.0
    nested = all(isinstance(value, dict) for value in rope.values())  # {"full_attention": {...}, ...}
    factor = 1.0
    for params in [p for p in rope.values() if p] if nested else [rope]:
        if params.get("rope_type", params.get("type")) not in ROPE_ALREADY_SCALED:
            factor = params.get("factor", factor)
    return 1.0 if factor is None else factor


def model_context(model_folder: str, config: RunConfig) -> int | None:
    """The model's context in tokens (context_of)."""
    return context_of(model_folder, config)[0]


def check_examples_in_context(lengths: Seq[int], model_folder: str, config: RunConfig, names: Seq[str],
                              model_name: str | None = None) -> None:
    """Each example the model trains on or scores, its prompt and human response as tokenized and cut to
    data.max_length (`lengths`, in tokens; `names`, their rows), fits in the model's context (context_of): one past it
    would be trained or scored past it silently (RoPE) or fail at its step (learned positions), hours in. SFT trains
    on these sequences; SPIN on them and on the answers generated (check_prompts_fit); evaluation scores them, with
    the SFT model and with each baseline (`model_name`, its path: model.name_or_path by default)."""
    model_config = AutoConfig.from_pretrained(model_folder, trust_remote_code=config.model.trust_remote_code)
    context, key = context_in(model_config)
    too_long = [i for i, length in enumerate(lengths) if context and length > context]
    if too_long:
        first = too_long[0]
        named = names[first] or f"example {first} (counted from 0)"
        raise ValueError(f"{len(too_long)} of {len(lengths)} examples are longer than the model's context of "
                         f"{context} tokens ({key}), the first {named}: {lengths[first]} tokens: set data.max_length "
                         f"to at most {context}"
                         + (" and data.max_prompt_length below it" if config.data.max_prompt_length >= context else ""))
    check_rope_takes_max_length(model_config, config.data.max_length, model_name or config.model.name_or_path)


def check_prompts_fit(prompts: Seq[Seq[int]], max_new_tokens: int, model_folder: str, config: RunConfig,
                      what: str, names: Seq[str] | None = None, end_tokens: int = 0) -> None:
    """Each prompt the opponent answers and its answer must fit in the model's context (context_of):
    under data.cut_prompt when_too_long the prompts are answered whole, and each one is checked; under always they
    are cut to data.max_prompt_length, which is. Checked before generation starts, not when the engine meets the
    first prompt too long, part of the way through (vLLM: as it starts, with an error about a max_model_len that
    nobody set). An answer that is trained on or scored closes with `end_tokens` more (EOS or the chat template's turn
    end: data.response_end, examples.answered_pairs): where data.max_length does not cut it back into the context,
    those count too."""
    context, key = context_of(model_folder, config)
    if not context:
        return
    # Every answer gets the end appended, and a pair is cut to data.max_length: past the context only where that is
    # above it (then silently past it with RoPE, or failing at its step with learned positions). Under when_too_long
    # this may refuse a prompt whose pair max_length would cut back into the context: rare, and on the safe side.
    closing = end_tokens if config.data.max_length > context else 0
    closed = (f" and the {closing} token(s) that close an answer (EOS or the chat template's turn end)" if closing
              else "")
    if config.data.cut_prompt != "when_too_long":
        if config.data.max_prompt_length + max_new_tokens + closing > context:
            raise ValueError(f"{what}: data.max_prompt_length={config.data.max_prompt_length} and "
                             f"generation.max_new_tokens={max_new_tokens}{closed} exceed the model's context of "
                             f"{context} tokens ({key}): lower one of them"
                             + (" or data.max_length to at most the context" if closing else ""))
        return
    too_long = [i for i, prompt in enumerate(prompts) if len(prompt) + max_new_tokens + closing > context]
    if too_long:
        first = too_long[0]
        named = names[first] if names else f"prompt {first} (counted from 0)"  # its file and line, where known
        raise ValueError(
            f"{what}: {len(too_long)} of {len(prompts)} prompts are too long to answer whole, the first {named}: "
            f"{len(prompts[first])} tokens and generation.max_new_tokens={max_new_tokens}{closed} exceed "
            f"the model's context of {context} tokens ({key}). Set data.cut_prompt=always to cut "
            "prompts to data.max_prompt_length, or leave these prompts out"
            + (", or set data.max_length to at most the context" if closing else ""))


# The config keys vLLM reads a model's number of experts from, the first one present (get_num_experts in
# vllm/transformers_utils/model_arch_config_convertor.py): above 0, a mixture-of-experts model (ModelConfig.is_moe).
EXPERTS_KEYS = ("num_experts", "moe_num_experts", "n_routed_experts", "num_local_experts")


def experts_in(model_config) -> int:
    """The number of experts of the model's text decoder as vLLM reads it (EXPERTS_KEYS); 0 for a dense model."""
    text = text_config(model_config)
    experts = next((getattr(text, key) for key in EXPERTS_KEYS if hasattr(text, key)), 0)
    if isinstance(experts, list):  # one per layer, all alike (remote code of some VLMs)
        experts = experts[0] if experts else 0
    return experts or 0


def check_engine_can_swap(config: RunConfig, model_folder: str, models: int, why: str, other_way: str = "") -> None:
    """An engine started once answers with `models` models in turn, each one's weights swapped into it (`why` says
    which, after a comma; `other_way`, a way out besides the transformers engine): vLLM's CPU build cannot swap a
    mixture-of-experts model's weights (VllmEngine._check_swappable), so such a command is refused before any work,
    not at its first swap, after the first model's work (a run's iteration 0, generated and trained)."""
    if models < 2 or chosen_engine(config) != "vllm":
        return
    from vllm.platforms import current_platform

    if not current_platform.is_cpu():
        return
    model_config = AutoConfig.from_pretrained(model_folder, trust_remote_code=config.model.trust_remote_code)
    if experts_in(model_config) > 0:
        from spin_fast.generation.vllm_engine import moe_swap_refused

        raise ConfigError(moe_swap_refused(model_config.model_type, why) + other_way)


def chosen_engine(config: RunConfig) -> str:
    """The engine that generates, "vllm" or "transformers": generation.engine, auto resolved to vLLM when it can
    be imported."""
    choice = config.generation.engine
    if choice in ("auto", "vllm"):
        try:
            import vllm  # noqa: F401
        except ImportError as error:
            if choice == "vllm":
                raise ValueError(f"generation.engine=vllm but vLLM cannot be imported ({error})") from None
        else:
            return "vllm"
    return "transformers"


def stop_strings(tokenizer) -> list[str]:
    """The texts an answer ends at besides its stop tokens: a turn end that no token holds (data.turn_end_text)."""
    text = turn_end_text(tokenizer)
    return [] if text is None else [text]


def start_vllm(config: RunConfig, model_path: str, stop_token_ids: Seq[int] = (), stop_strings: Seq[str] = (),
               longest_prompt: int | None = None):
    """A vLLM engine started from the model folder (or Hub id) `model_path`, with the run's settings (and
    `longest_prompt`, the longest prompt it will answer, in tokens, where known: engine_context)."""
    from spin_fast.generation.vllm_engine import VllmEngine

    gen = config.generation
    log.info("generation engine: vLLM, started once from %s", model_path)
    # Under a launcher on GPUs, each rank's engine joins the launcher's process group on its own GPU
    # (vLLM's "external_launcher", as TRL's colocated mode does; not yet run on GPUs here). On the CPU
    # build, engines start their own processes.
    executor = "external_launcher" if distributed.initialized() and torch.cuda.is_available() else None
    needed, (context, key) = engine_context(config, longest_prompt), context_of(model_path, config)
    if needed and context and needed > context:  # vLLM's own error names only its max_model_len
        raise ValueError(f"the vLLM engine, started once for the whole run, must serve sequences of {needed} tokens "
                         "(the longest of data.max_length and data.max_prompt_length + generation.max_new_tokens "
                         f"over the run's iterations), beyond the model's context of {context} tokens "
                         f"({key}): lower them")
    return VllmEngine(model_path, dtype=vllm_dtype(config), seed=gen.seed, executor=executor,
                      max_model_len=needed, tensor_parallel_size=gen.tensor_parallel_size,
                      gpu_memory_utilization=gen.gpu_memory_utilization,
                      trust_remote_code=config.model.trust_remote_code, stop_token_ids=stop_token_ids,
                      stop_strings=stop_strings)


def vllm_dtype(config: RunConfig) -> str:
    """vLLM serves in the dtype the model computes in: bf16 under train.bf16_autocast (fp32 master weights would
    double its memory and keep it off FlashAttention), else the weights' own."""
    return "bfloat16" if config.train.bf16_autocast else config.train.dtype


def engine_context(config: RunConfig, longest_prompt: int | None = None) -> int | None:
    """The longest sequence the engine must serve in the run's settings or any iteration's (it is started once, and
    iterations may change the lengths). Where prompts are answered whole (data.cut_prompt when_too_long), the
    longest prompt's (`longest_prompt`, in tokens) and its answer; None, the model's own context, where that is not
    known (vLLM then reserves cache for a sequence of the whole context, 128k tokens for some models, and refuses to
    start where that does not fit)."""
    longest = 0
    for settings in [config, *(config.for_iteration(t) for t in range(config.iterations))]:
        data, new_tokens = settings.data, settings.generation.max_new_tokens
        if data.cut_prompt == "when_too_long":
            if longest_prompt is None:
                return None
            longest = max(longest, longest_prompt + new_tokens)  # checked against the context: check_prompts_fit
        else:
            longest = max(longest, data.max_length, data.max_prompt_length + new_tokens)
    return longest


def default_engine(model, tokenizer, config: RunConfig, model_path: str, longest_prompt: int | None = None
                   ) -> Engine:
    """vLLM when installed (engine auto or vllm), started from θt's folder (serving `longest_prompt`: start_vllm);
    else the embedded transformers engine, which generates with the training model itself (no second copy), or with
    a copy of its own when `model` is None (training shards it under ZeRO)."""
    from spin_fast.generation.hf_engine import TransformersEngine

    if chosen_engine(config) == "vllm":
        return start_vllm(config, model_path, stop_token_ids=[eos_token_id(tokenizer)],
                          stop_strings=stop_strings(tokenizer), longest_prompt=longest_prompt)
    log.info("generation engine: transformers")
    if model is None:
        model = load_policy(model_path, config)
    return TransformersEngine(model, eos_token_id=eos_token_id(tokenizer), stop_token_ids=[tokenizer.eos_token_id],
                              stop_strings=stop_strings(tokenizer), tokenizer=tokenizer,
                              pad_token_id=tokenizer.pad_token_id,
                              batch_size=config.generation.batch_size, progress=config.train.progress)

"""The policy model: any transformers causal LM, run as a body that returns hidden states.

The LM head is never applied here: spin_kernels computes the log-probs straight from the hidden
states and the head's weight, so no [tokens x vocab] logits exist.
"""

from __future__ import annotations

import contextlib
import inspect
import logging
from pathlib import Path

import torch
from transformers import AutoConfig, AutoModelForCausalLM, PretrainedConfig, PreTrainedModel

from spin_fast import attention
from spin_fast.config import CHOICES, ModelConfig
from spin_fast.packing import MicroBatch
from spin_fast.zero import is_partitioned_model

log = logging.getLogger(__name__)

def pick_attention(requested: str = "auto") -> str:
    """"auto" is spin_varlen, whose kernel is chosen per device (attention.varlen_kernel): on CUDA varlen
    FlashAttention (the flash_attn package's when installed, else PyTorch's own), on the CPU per-sequence SDPA
    (plain SDPA would build a [T, T] block-diagonal mask and spend T^2 on every packed row). It is the attention
    that lets a pair's responses share their prompt."""
    if requested not in CHOICES["attention"]:
        raise ValueError(f"attention must be one of {CHOICES['attention']}, got {requested!r}")
    return attention.NAME if requested == "auto" else requested


def can_share_prompts(model: PreTrainedModel) -> bool:
    """Whether packed rows may hold a pair's prompt once: only spin_varlen attention follows that layout."""
    return model.config._attn_implementation == attention.NAME


def load_tokenizer(settings: ModelConfig, folder: str | None = None):
    """The run's model's tokenizer (from `folder`, its local copy, when given), with model.chat_template in place of
    its own when set. Every prompt is rendered through the template (data.tokenize_batch), so a tokenizer with none
    is refused here, by name."""
    from transformers import AutoTokenizer

    name_or_path, chat_template = settings.name_or_path, settings.template_text()
    try:
        tokenizer = AutoTokenizer.from_pretrained(folder or name_or_path, trust_remote_code=settings.trust_remote_code)
    except (OSError, ValueError) as error:  # transformers' words name neither the setting nor the folder
        raise ValueError(f"model.name_or_path {name_or_path!r}: its tokenizer cannot be loaded from "
                         f"{folder or name_or_path} (tokenizer.json, tokenizer_config.json, ...): {error}") from error
    if chat_template is not None:
        if tokenizer.chat_template and tokenizer.chat_template != chat_template:
            log.info("%s: model.chat_template replaces the tokenizer's own chat template", name_or_path)
        tokenizer.chat_template = chat_template
    elif not tokenizer.chat_template:
        raise ValueError(f"{name_or_path}: its tokenizer has no chat template (a base model?), and every prompt is "
                         "rendered with one: set model.chat_template to a Jinja template or the path of a file "
                         "holding one (configs/templates/zephyr.jinja is the template of the SPIN paper's models)")
    if tokenizer.eos_token_id is None:  # data.eos_token_id's own error would name neither the setting nor the folder
        raise ValueError(f"model.name_or_path {name_or_path!r}: its tokenizer has no eos token, and every response "
                         f"ends with one: set eos_token in {folder or name_or_path}'s tokenizer_config.json")
    return tokenizer


def load_causal_lm(
    name_or_path: str | Path,
    *,
    dtype: torch.dtype = torch.float32,
    device: str | torch.device = "cpu",
    attention_impl: str = "auto",
    trust_remote_code: bool = False,
    gradient_checkpointing: bool = False,
    liger_kernels: bool = False,
) -> PreTrainedModel:
    """Load a causal LM from a local directory or a hub name, ready for packed training.

    liger_kernels: Liger-Kernel's RMSNorm, RoPE and SwiGLU in the body (CUDA only; the head and
    loss stay spin_kernels').
    """
    device = torch.device(device)
    config = AutoConfig.from_pretrained(name_or_path, trust_remote_code=trust_remote_code)
    if getattr(config, "auto_map", None) and not trust_remote_code:
        raise ValueError(f"{name_or_path}: the model ships its own code (auto_map); pass trust_remote_code=True "
                         "if you trust it")
    check_head_is_plain(config, str(name_or_path))
    attn = pick_attention(attention_impl)
    if attn == attention.NAME:
        attention.register()
    model = AutoModelForCausalLM.from_pretrained(
        name_or_path, dtype=dtype, attn_implementation=attn, trust_remote_code=trust_remote_code
    )
    # Under zero3_init (spin_fast.zero.partitioned_loading) DeepSpeed has placed each rank's partitions already.
    partitioned = is_partitioned_model(model)
    if not partitioned:
        model.to(device)
    log.info("loaded %s (%s, %.1fM parameters%s) with %s attention on %s", name_or_path, type(model).__name__,
             sum(getattr(p, "ds_numel", p.numel()) for p in model.parameters()) / 1e6,
             ", partitioned by ZeRO-3" if partitioned else "", attn, device)
    check_logits_are_the_heads(model, str(name_or_path))  # before Liger's kernels change the body
    if liger_kernels:
        apply_liger_kernels(model, device)
    if gradient_checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    return model


def apply_liger_kernels(model: PreTrainedModel, device: torch.device) -> None:
    """Swap the body's RMSNorm, RoPE and SwiGLU for Liger-Kernel's Triton ones, in place. Liger patches the
    transformers modeling module too (RoPE is a module function there): models of the same family built later
    in this process get its kernels as well."""
    if device.type != "cuda":
        raise ValueError("liger_kernels needs CUDA: its kernels are Triton GPU kernels")
    try:
        from liger_kernel.transformers.monkey_patch import MODEL_TYPE_TO_APPLY_LIGER_FN
    except ImportError as error:
        raise ValueError(f"liger_kernels needs the liger-kernel package ({error})") from None
    model_type = model.config.model_type
    if model_type not in MODEL_TYPE_TO_APPLY_LIGER_FN:
        raise ValueError(f"Liger-Kernel has no kernels for model type {model_type!r}")
    apply = MODEL_TYPE_TO_APPLY_LIGER_FN[model_type]
    # cross_entropy and the fused linear CE stay off: spin_kernels computes the head and the loss.
    wanted = dict(rope=True, rms_norm=True, swiglu=True, cross_entropy=False, fused_linear_cross_entropy=False)
    accepted = inspect.signature(apply).parameters
    apply(model=model, **{k: v for k, v in wanted.items() if k in accepted})


# Config fields with which a model's forward soft-caps or rescales its logits, or what the head reads (Gemma 2 and
# 3, RecurrentGemma, Cohere, Granite, MiniCPM3, HyperCLOVA X, Falcon-H1, Inkling), and their values that leave the
# logits as the head makes them. check_logits_are_the_heads finds the others (a cut vocabulary, say) by running the
# model.
LOGIT_TRANSFORMS = {"final_logit_softcapping": (None, 0), "logits_soft_cap": (None, 0), "logit_scale": (None, 1),
                    "logits_scaling": (None, 1), "lm_head_multiplier": (None, 1),
                    "logits_mup_width_multiplier": (None, 1)}


def text_config(config: PretrainedConfig) -> PretrainedConfig:
    """The config of a model's text decoder (a VLM's own), or the config itself."""
    with contextlib.suppress(ValueError, AttributeError):  # several text parts: the top level alone is read
        return config.get_text_config(decoder=True)
    return config


def check_head_is_plain(config: PretrainedConfig, name: str) -> None:
    """The fused head computes log softmax(h @ W.T + b): a model that rescales or soft-caps its logits would
    silently get the wrong log-probs, and train on them, so it is refused."""
    text = text_config(config)
    for settings in {id(config): config, id(text): text}.values():
        for field, plain in LOGIT_TRANSFORMS.items():
            value = getattr(settings, field, None)
            if value not in plain:
                raise ValueError(f"{name}: {field}={value}: the model soft-caps or rescales its logits, which the "
                                 "fused head (log softmax(h @ W.T + b)) does not do: its log-probs would be wrong")


def check_logits_are_the_heads(model: PreTrainedModel, name: str) -> None:
    """The model's own logits on a few tokens against its LM head on its body's last hidden states, as spin-fast
    computes them: a model whose forward does more (a transform LOGIT_TRANSFORMS does not know, a cut vocabulary) is
    refused, as one check_head_is_plain refuses. A ZeRO-3 partitioned model, whose forward every rank runs in step,
    gets the config check alone."""
    check_head_is_plain(model.config, name)
    if is_partitioned_model(model):
        return
    weight, bias = head(model)
    ids = torch.arange(1, 5, device=weight.device)[None] % weight.shape[0]
    inputs = {"input_ids": ids, "position_ids": torch.arange(4, device=ids.device)[None]}  # one packed row's form
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            logits = model(**inputs).logits.float()
            heads = torch.nn.functional.linear(body(model)(**inputs).last_hidden_state, weight, bias).float()
    finally:
        model.train(was_training)
    # A NaN weight gives NaN both ways: a broken model, which training names as its loss goes NaN, not a transform.
    if logits.shape != heads.shape or not torch.allclose(logits, heads, rtol=1e-3, atol=1e-4, equal_nan=True):
        difference = "shape " + str(tuple(logits.shape)) if logits.shape != heads.shape else \
            f"up to {float((logits - heads).abs().max()):.3g} apart"
        raise ValueError(f"{name}: the model's logits are not its LM head's output on its last hidden states "
                         f"({difference}): its forward transforms them, and the fused head would give other "
                         "log-probs")


def body(model: PreTrainedModel) -> torch.nn.Module:
    """The decoder stack without the LM head (LlamaModel inside LlamaForCausalLM, ...)."""
    decoder = model.get_decoder() if hasattr(model, "get_decoder") else None
    return decoder if decoder is not None else model.base_model


def head(model: PreTrainedModel) -> tuple[torch.Tensor, torch.Tensor | None]:
    """The LM head's weight [V, H] and bias (None for most models); tied heads share the embedding."""
    output = model.get_output_embeddings()
    return output.weight, getattr(output, "bias", None)


def packed_hidden_states(model: PreTrainedModel, input_ids: torch.Tensor, position_ids: torch.Tensor,
                         cu_seqlens: torch.Tensor | None = None, max_seqlen: int | None = None) -> torch.Tensor:
    """Final hidden states [T, H] of one packed row of sequences (input_ids, position_ids [T]).

    No attention_mask and no cache: transformers then detects the packing from the position ids
    restarting at 0 and keeps every sequence to itself (with a cache or an all-ones mask the
    sequences would attend to each other). cu_seqlens/max_seqlen, when known, spare the varlen
    kernels from deriving them again in every layer.
    """
    varlen = {} if cu_seqlens is None else varlen_kwargs(model, cu_seqlens, max_seqlen)
    return _body_hidden_states(model, input_ids, position_ids, varlen)


def varlen_kwargs(model: PreTrainedModel, cu_seqlens: torch.Tensor, max_seqlen: int) -> dict:
    """The row's layout as every attention layer takes it; spin_varlen's layers also share one host copy of the
    boundaries (attention.HostBounds: per-sequence SDPA reads them from the device once a forward, not per layer)."""
    varlen = dict(cu_seq_lens_q=cu_seqlens, cu_seq_lens_k=cu_seqlens, max_length_q=max_seqlen, max_length_k=max_seqlen)
    if model.config._attn_implementation == attention.NAME:
        varlen[attention.HOST_BOUNDS] = attention.HostBounds(cu_seqlens)
    return varlen


def micro_batch_hidden_states(model: PreTrainedModel, batch: MicroBatch, bf16_autocast: bool = False) -> torch.Tensor:
    """Final hidden states [T, H] of a packed micro-batch (spin_fast.packing), its shared prompts included;
    with bf16_autocast the body runs under bf16 autocast (train.bf16_autocast). Training and opponent scoring
    both pass the run's setting, so that at step 0 the opponent's log-probs are the policy's own."""
    varlen = varlen_kwargs(model, batch.cu_seqlens, batch.max_seqlen)
    if batch.expand_index is not None:
        if not can_share_prompts(model):
            raise ValueError(f"this micro-batch holds shared prompts, which only {attention.NAME} attention "
                             f"follows; the model runs {model.config._attn_implementation!r}")
        varlen.update({attention.EXPAND_INDEX: batch.expand_index, attention.COLLAPSE_INDEX: batch.collapse_index})
    with torch.autocast(batch.input_ids.device.type, dtype=torch.bfloat16, enabled=bf16_autocast):
        return _body_hidden_states(model, batch.input_ids, batch.position_ids, varlen)


def disable_dropout(model: torch.nn.Module) -> None:
    """Dropout off everywhere (nn.Dropout modules and the attention layers' own rate), as the official SPIN
    trainer and TRL's DPO do by default: the opponent's log-probs are computed without dropout, so at step 0 the
    policy's must be the same numbers for the loss to start at log 2."""
    for module in model.modules():
        if isinstance(module, torch.nn.Dropout):
            module.p = 0.0
        # Rates that layers pass to nn.functional.dropout themselves: OPT's `dropout`, StarCoder2's
        # `residual_dropout` and `embedding_dropout`, the attention layers' `attention_dropout`, ...
        for name, value in list(vars(module).items()):
            if isinstance(value, float) and ("dropout" in name or name.endswith("pdrop") or name == "layerdrop"):
                setattr(module, name, 0.0)


def head_like(hidden: torch.Tensor, weight: torch.Tensor,
              bias: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor | None]:
    """The head's weight and bias in the hidden states' dtype: under autocast the head runs in the body's
    precision, as nn.Linear would."""
    if hidden.dtype == weight.dtype:
        return weight, bias
    return weight.to(hidden.dtype), None if bias is None else bias.to(hidden.dtype)


def rope_switch_length(config: PretrainedConfig) -> tuple[str, int] | None:
    """The rotary type and the length past which transformers picks a batch's rotary frequencies from its largest
    position (Phi-3's longrope: its long factors; dynamic NTK: a larger base), or None for fixed frequencies."""
    text = text_config(config)
    rope = getattr(text, "rope_parameters", None) or {}
    ropes = list(rope.values()) if all(isinstance(r, dict) for r in rope.values()) else [rope]  # per layer type
    for params in ropes:
        kind = params.get("rope_type")
        if kind == "longrope":
            return kind, int(params.get("original_max_position_embeddings") or text.original_max_position_embeddings)
        if kind == "dynamic":
            return kind, int(text.max_position_embeddings)
    return None


def check_rope_takes_max_length(config: PretrainedConfig, max_length: int, name: str) -> None:
    """check_rope_takes_row's refusal before any work: a row packs several sequences under every model.attention
    (a SPIN pair's two at least; sdpa and eager hold them whole), so a data.max_length past the switch length would
    be refused only as its first such row runs: at scoring, after a whole generation, or part of the way into SFT."""
    switch = rope_switch_length(config)
    if switch is None or max_length <= switch[1]:
        return
    kind, limit = switch
    raise ValueError(f"data.max_length={max_length}: {name}'s {kind} rotary embeddings take other frequencies for "
                     f"a whole packed row once a sequence in it runs past {limit} tokens, and a row holds several "
                     "sequences (a SPIN pair's two at least, whatever model.attention), whose log-probs would then "
                     f"not be the model's own: set data.max_length to at most {limit}")


def check_rope_takes_row(model: PreTrainedModel, position_ids: torch.Tensor, varlen: dict) -> None:
    """A packed row is one batch to the rotary embeddings: where its longest sequence sets their frequencies, the
    row's other sequences would get other log-probs than alone, silently, so such a row is refused (the last guard:
    check_rope_takes_max_length refuses the setting that lets one through before any work)."""
    switch = rope_switch_length(model.config)
    if switch is None:
        return
    kind, limit = switch
    cu_seqlens = varlen.get("cu_seq_lens_q")
    if cu_seqlens is not None:
        longest, count = varlen["max_length_q"], cu_seqlens.numel() - 1
    else:  # the positions restart at 0 for each sequence
        longest, count = int(position_ids.max()) + 1, int((position_ids == 0).sum())
    if longest > limit and count > 1:
        raise ValueError(f"{type(model).__name__}: its {kind} rotary embeddings take other frequencies for a whole "
                         f"batch once a sequence runs past {limit} tokens, and this packed row holds a sequence of "
                         f"{longest} tokens beside others, whose log-probs would then not be the model's own; set "
                         f"data.max_length to at most {limit}")


def _body_hidden_states(model: PreTrainedModel, input_ids: torch.Tensor, position_ids: torch.Tensor,
                        varlen: dict) -> torch.Tensor:
    check_rope_takes_row(model, position_ids, varlen)
    out = body(model)(input_ids=input_ids[None], position_ids=position_ids[None], use_cache=False, **varlen)
    return out.last_hidden_state[0]


def tiny_config(family: str = "llama", vocab_size: int = 512, hidden_size: int = 64, layers: int = 2,
                heads: int = 2, tie_word_embeddings: bool = False, max_positions: int = 2048) -> PretrainedConfig:
    """A small config of a real architecture (head dim hidden/heads, 32 by default, which the vLLM CPU
    build serves), for tests and the demo: no download needed."""
    from transformers import LlamaConfig, MistralConfig, Qwen2Config

    classes = {"llama": LlamaConfig, "mistral": MistralConfig, "qwen2": Qwen2Config}
    if family not in classes:
        raise ValueError(f"family must be one of {sorted(classes)}, got {family!r}")
    return classes[family](
        vocab_size=vocab_size, hidden_size=hidden_size, intermediate_size=2 * hidden_size,
        num_hidden_layers=layers, num_attention_heads=heads, num_key_value_heads=heads,
        max_position_embeddings=max_positions, tie_word_embeddings=tie_word_embeddings,
    )

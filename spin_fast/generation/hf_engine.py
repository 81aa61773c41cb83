"""The embedded engine: transformers' generate, batched by length with left padding and a KV cache.

The default where vLLM is absent. load_weights copies new tensors into the model it holds. Each request samples
from its own seed, as in vLLM: transformers would draw a whole batch from one generator, so a request's tokens
would depend on the batch it happens to share (its size, the ranks' shares, a resume with smaller batches).
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterable, Sequence

import torch
from transformers import GenerationConfig, LogitsProcessor, LogitsProcessorList
from transformers.generation.logits_process import TemperatureLogitsWarper, TopKLogitsWarper, TopPLogitsWarper

from spin_fast import distributed, zero
from spin_fast.attention import NAME as PACKED_ONLY
from spin_fast.generation.base import Completion, SamplingConfig, answer_before_stop_text, generator_seed


class TransformersEngine:
    def __init__(self, model, *, eos_token_id: int, pad_token_id: int | None = None, batch_size: int = 16,
                 progress: bool = True, stop_token_ids: Sequence[int] = (), stop_strings: Sequence[str] = (),
                 tokenizer=None):
        self.model = model
        self.eos_token_id = eos_token_id
        self.stop_token_ids = tuple(stop_token_ids)  # more tokens that end an answer (the tokenizer's EOS)
        # Texts that end an answer (a turn end that no token holds, data.turn_end_text): found through `tokenizer`.
        self.stop_strings = tuple(stop_strings)
        if self.stop_strings and tokenizer is None:
            raise ValueError("TransformersEngine: stop_strings need the tokenizer (tokenizer=)")
        self.tokenizer = tokenizer
        # Padding is masked, so any id the model embeds serves: a tokenizer's pad added after the model was made
        # (an id past its embeddings, which spin-fast's packed SFT never reads) would be an IndexError.
        vocab = model.get_input_embeddings().num_embeddings
        self.pad_token_id = eos_token_id if pad_token_id is None or pad_token_id >= vocab else pad_token_id
        self.batch_size = batch_size
        self.progress = progress

    def batches(self, prompts: Sequence[Sequence[int]], n: int = 1) -> list[list[tuple[int, int]]]:
        """The batches generate() runs, in order: (prompt index, completion number) requests sorted by prompt
        length (stably), so that similar lengths share a batch and left padding wastes little."""
        requests = sorted(((p, k) for p in range(len(prompts)) for k in range(n)),
                          key=lambda request: len(prompts[request[0]]))
        return [requests[start : start + self.batch_size] for start in range(0, len(requests), self.batch_size)]

    @torch.no_grad()
    def generate(self, prompts: Sequence[Sequence[int]], sampling: SamplingConfig,
                 indices: Sequence[int] | None = None) -> list[list[Completion]]:
        """n completions per prompt, in prompt order. Request (prompt p, completion k) samples from seed
        sampling.seed + indices[p] * n + k (through base.generator_seed), its place in the whole set, whatever batch
        it is in: a set generated in parts, or shared out to ranks, with its indices samples what one call does.

        Only `sampling` decides how tokens are drawn, as in vLLM given explicit SamplingParams: the model's own
        generation_config (a checkpoint's repetition penalty, n-gram bans, top-k, ...) is set aside meanwhile. Its
        EOS ids are kept, as vLLM keeps them: an answer ends at the first of those or the tokenizer's EOS (Llama 3
        Instruct ends its turns with <|eot_id|>, which its generation_config lists beside <|end_of_text|>).

        A ZeRO-3 partitioned model (deepspeed.zero3_init) generates a layer at a time with every rank in step:
        as many batches on each rank (fillers where it has fewer) and as many decoding steps (synced_gpus)."""
        indices = range(len(prompts)) if indices is None else indices
        results: list[list[Completion | None]] = [[None] * sampling.n for _ in prompts]
        was_training, attention = self.model.training, self.model.config._attn_implementation
        model_generation_config = self.model.generation_config
        stops = list(dict.fromkeys([*stop_token_ids(self.eos_token_id, model_generation_config),
                                    *self.stop_token_ids]))
        partitioned = zero.is_partitioned_model(self.model)
        batches = zero.in_step([self.model], self.batches(prompts, sampling.n), "generation batch counts")
        self.model.eval()
        self.model.generation_config = GenerationConfig()
        if attention == PACKED_ONLY:  # packed-row attention cannot serve padded batches with a KV cache
            self.model.set_attn_implementation("sdpa")
        try:
            bar = distributed.progress_bar(batches, "generating", self.progress)
            with zero.gathered_per_layer(self.model) if partitioned else contextlib.nullcontext():
                for batch in bar:
                    if batch is None:  # a filler: its tokens are thrown away
                        self._generate_batch([[self.eos_token_id]], sampling, [0], stops, synced=True)
                        continue
                    seeds = [sampling.seed + indices[p] * sampling.n + k for p, k in batch]
                    outputs = self._generate_batch([prompts[p] for p, _ in batch], sampling, seeds, stops,
                                                   synced=partitioned)
                    for (prompt_index, k), completion in zip(batch, outputs):
                        results[prompt_index][k] = completion
        finally:
            self.model.train(was_training)
            self.model.set_attn_implementation(attention)
            self.model.generation_config = model_generation_config
        return results

    def _generate_batch(self, prompts: list[Sequence[int]], sampling: SamplingConfig, seeds: list[int],
                        stops: list[int], synced: bool = False) -> list[Completion]:
        device = next(self.model.parameters()).device
        width = max(len(p) for p in prompts)
        input_ids = torch.full((len(prompts), width), self.pad_token_id, dtype=torch.long)
        attention_mask = torch.zeros_like(input_ids)
        for row, prompt in enumerate(prompts):
            input_ids[row, width - len(prompt) :] = torch.tensor(prompt)
            attention_mask[row, width - len(prompt) :] = 1
        # Greedy decoding throughout: when sampling, the last logits processor has drawn each row's token already
        # and left it the only one possible. No global RNG is used: the caller's is untouched.
        processors = sampling_processors(sampling, seeds, device) if sampling.temperature > 0 else []
        texts = {"stop_strings": list(self.stop_strings), "tokenizer": self.tokenizer} if self.stop_strings else {}
        out = self.model.generate(input_ids=input_ids.to(device), attention_mask=attention_mask.to(device),
                                  do_sample=False, logits_processor=LogitsProcessorList(processors),
                                  max_new_tokens=sampling.max_new_tokens, eos_token_id=stops,
                                  pad_token_id=self.pad_token_id, use_cache=True, synced_gpus=synced, **texts)
        completions = []
        for row in out[:, width:].tolist():
            end = next((i for i, token in enumerate(row) if token in stops), None)
            row = row if end is None else row[:end]
            cut = answer_before_stop_text(row, self.tokenizer, self.stop_strings) if self.stop_strings else None
            if cut is not None:
                row, end = list(cut), len(cut)  # the padding after it is dropped too
            completions.append(Completion(tuple(row), end is not None))
        return completions

    @torch.no_grad()
    def load_weights(self, weights: Iterable[tuple[str, torch.Tensor]]) -> None:
        """Copy the tensors into the model's parameters and buffers, by Hugging Face name."""
        state = self.model.state_dict()
        for name, tensor in weights:
            if name not in state:
                raise KeyError(f"load_weights: the model has no parameter or buffer named {name!r}")
            state[name].copy_(tensor)

    def close(self) -> None:
        self.model = None


def stop_token_ids(eos_token_id: int, generation_config: GenerationConfig | None) -> list[int]:
    """The tokenizer's EOS first, then every other EOS id the model's generation_config lists."""
    listed = None if generation_config is None else generation_config.eos_token_id
    listed = [] if listed is None else [listed] if isinstance(listed, int) else list(listed)
    return list(dict.fromkeys([eos_token_id, *listed]))


class SampleEachRow(LogitsProcessor):
    """Draws each row's next token from the row's own generator (seeded once per request) and leaves it the only
    token possible: a request's tokens depend on its seed alone, not on the rows it shares a batch with."""

    def __init__(self, seeds: Sequence[int], device: torch.device):
        self.generators = [torch.Generator(device).manual_seed(generator_seed(seed)) for seed in seeds]

    def __call__(self, input_ids: torch.LongTensor, scores: torch.FloatTensor) -> torch.FloatTensor:
        probs = scores.float().softmax(dim=-1)
        drawn = torch.stack([torch.multinomial(row, 1, generator=g) for row, g in zip(probs, self.generators)])
        return torch.full_like(scores, float("-inf")).scatter_(1, drawn, 0.0)


def sampling_processors(sampling: SamplingConfig, seeds: Sequence[int], device: torch.device) -> list:
    """transformers' own warpers, in the order its sampling applies them (temperature, top-k, top-p), then the draw."""
    warpers: list = [TemperatureLogitsWarper(sampling.temperature)] if sampling.temperature != 1.0 else []
    if sampling.top_k > 0:
        warpers.append(TopKLogitsWarper(sampling.top_k))
    if sampling.top_p < 1.0:
        warpers.append(TopPLogitsWarper(sampling.top_p))
    return [*warpers, SampleEachRow(seeds, device)]

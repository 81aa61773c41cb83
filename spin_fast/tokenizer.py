"""A real byte-level BPE tokenizer with a chat template, trained locally: tests and the demo need no download."""

from __future__ import annotations

from collections.abc import Iterable

from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import PreTrainedTokenizerFast

BOS, EOS, PAD = "<|bos|>", "<|eos|>", "<|pad|>"
ROLE_MARKERS = {"system": "<|system|>", "user": "<|user|>", "assistant": "<|assistant|>"}
SPECIAL_TOKENS = [BOS, EOS, PAD, *ROLE_MARKERS.values()]

# transformers renders templates with trim_blocks, which eats a newline written after a tag: newlines are
# therefore emitted as expressions. The generation prompt is exactly the assistant marker, so a response
# tokenized on its own and appended to render_prompt's ids gives the same text as the full conversation.
CHAT_TEMPLATE = (
    "{{ bos_token }}"
    "{% for message in messages %}"
    "{% if message['role'] not in ['system', 'user', 'assistant'] %}"
    "{{ raise_exception('unknown role: ' + message['role']) }}"
    "{% endif %}"
    "{{ '<|' + message['role'] + '|>' + '\\n' + message['content'] }}"
    "{% if message['role'] == 'assistant' %}{{ eos_token }}{% endif %}"
    "{{ '\\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|assistant|>' + '\\n' }}{% endif %}"
)

DEFAULT_CORPUS = (
    "The quick brown fox jumps over the lazy dog.",
    "A journey of a thousand miles begins with a single step.",
    "Please explain how a rainbow forms after the rain.",
    "Sunlight is refracted, reflected and dispersed inside water droplets.",
    "What is the capital of France? The capital of France is Paris.",
    "Write a short poem about the sea and the wind.",
    "The sea was calm, and the wind carried the smell of salt.",
    "How many legs does a spider have? A spider has eight legs.",
    "Can you summarize the plot of the story in two sentences?",
    "The hero leaves home, faces a trial, and returns changed.",
    "Give me three tips for learning a new language.",
    "Practice every day, read simple books, and speak with native speakers.",
    "Why is the sky blue during the day?",
    "Air molecules scatter blue light more than red light.",
    "Translate the word 'hello' into Spanish. It is 'hola'.",
    "List the planets of the solar system in order from the sun.",
    "Mercury, Venus, Earth, Mars, Jupiter, Saturn, Uranus and Neptune.",
    "What should I cook for dinner tonight?",
    "A simple pasta with tomatoes, garlic and olive oil is quick and tasty.",
    "Explain the difference between weather and climate.",
    "Weather changes from day to day; climate is the average over many years.",
    "How do plants make their food?",
    "Plants use sunlight, water and carbon dioxide to make sugar and oxygen.",
    "Tell me a fun fact about octopuses.",
    "An octopus has three hearts and blue blood.",
    "What is two plus two? Two plus two is four.",
    "Describe a busy city street in the morning.",
    "People hurry to work, buses stop and start, and coffee shops open their doors.",
    "Thank you for your help! You are welcome; I am happy to help.",
    "Is it better to study in the morning or at night?",
    "It depends on the person, but a regular schedule and enough sleep matter most.",
    "Numbers like 1, 2, 3, 10, 42 and 100 appear in many questions.",
    "The assistant answers the user's question clearly and politely.",
    "Self-play lets a model improve by learning from its own answers.",
)


def build_local_tokenizer(corpus: Iterable[str] | None = None, vocab_size: int = 512) -> PreTrainedTokenizerFast:
    """Train a byte-level BPE on `corpus` (a built-in English corpus when None) and wrap it with special
    tokens and a chat template; the same corpus always gives the same ids."""
    if vocab_size < 256 + len(SPECIAL_TOKENS):
        raise ValueError(f"vocab_size must be at least {256 + len(SPECIAL_TOKENS)} (256 bytes + special tokens), "
                         f"got {vocab_size}")
    texts = list(DEFAULT_CORPUS if corpus is None else corpus)
    bpe = Tokenizer(models.BPE())
    bpe.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    bpe.decoder = decoders.ByteLevel()
    # The full byte alphabet makes every string encodable, whatever the corpus saw.
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=SPECIAL_TOKENS, show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    bpe.train_from_iterator(texts, trainer=trainer)
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=bpe, bos_token=BOS, eos_token=EOS, pad_token=PAD,
                                        additional_special_tokens=list(ROLE_MARKERS.values()))
    tokenizer.chat_template = CHAT_TEMPLATE
    return tokenizer

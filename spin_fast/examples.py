"""A run's examples: read with its data settings, tokenized by the ranks together (each its share, then
gathered), and paired with the opponent's answers."""

from __future__ import annotations

import hashlib
from array import array
from collections.abc import Sequence as Seq
from dataclasses import replace
from pathlib import Path

from spin_fast import distributed
from spin_fast.config import DataConfig
from spin_fast.data import (
    Example,
    SharedIds,
    TokenizedExample,
    check_lengths,
    eos_token_id,
    fit_to_length,
    load_examples,
    tokenize_batch,
    tokenize_example,
)
from spin_fast.packing import item_name
from spin_fast.scoring import TokenizedPair


def read_examples(data: DataConfig, source: str, limit: int | None = None, where: str = "") -> list[Example]:
    """The examples of `source`, read with the run's data settings (schema, history, bad rows). A missing file is
    named with its setting, as a missing model is: a config names data.source and data.eval_source; `where` names
    what gave `data` where that is not the config's data section (e.g. "iteration_overrides[1]")."""
    try:
        return load_examples(source, split=data.split, schema=data.schema, keep_history=data.keep_history,
                             skip_invalid=data.skip_invalid, limit=limit,
                             split_setting=data.split_setting, split_given=data.split_given).examples
    except FileNotFoundError:
        setting = "data.source" if source == data.source else "data.eval_source" if source == data.eval_source else None
        if setting is None or Path(source).exists():  # another file: its own error names it
            raise
        raise FileNotFoundError(f"{where + ': ' if where else ''}{setting} {str(source)!r}: no such file or "
                                "directory") from None


TOKENIZE_BATCH = 256  # examples a rank encodes in one call to its tokenizer


def rows_digest(examples: Seq[Example]) -> str:
    """A digest of the rows' text: it tells a changed data file or Hub dataset apart."""
    hasher = hashlib.sha256()
    for e in examples:  # one at a time: the repr of them all would be as large as their text
        hasher.update(repr((e.prompt, e.response, e.generated)).encode())
    return hasher.hexdigest()


def tokens_digest(examples: Seq[TokenizedExample]) -> str:
    """A digest of the examples' token ids: it tells apart the same rows tokenized otherwise (a model.chat_template
    file or the model's tokenizer changed), which rows_digest does not."""
    hasher = hashlib.sha256()
    for e in examples:
        for part in (e.unfitted or e).parts():
            if part is not None:
                hasher.update(len(part).to_bytes(8, "little") + array("q", part).tobytes())
    return hasher.hexdigest()


def refusal(tokenizer, examples: Seq[Example], batch: Seq[int], fitting: dict, error: Exception
            ) -> tuple[str, Exception]:
    """Why the examples at `batch` cannot be tokenized: the first one that fails alone, named by its row (or the
    batch's own error, if none does)."""
    for index in batch:
        try:
            tokenize_example(tokenizer, human_part(examples[index]), **fitting)
        except Exception as alone:  # noqa: BLE001 - as the batch's
            return f"{examples[index].origin or f'example {index}'}: cannot be tokenized: {alone}", alone
    return f"examples {batch[0]} to {batch[-1]}: cannot be tokenized: {error}", error


def tokenize_examples(tokenizer, data: DataConfig, examples: Seq[Example], progress: bool = False,
                      digest: str | None = None) -> list[TokenizedExample]:
    """The examples' prompts and human responses tokenized with the data settings, the same list on every rank. A
    pair file's generated responses are no run's: left out, they cannot change how a prompt is cut (under
    "when_too_long" a pair fits by its longer response). Under a launcher every rank must call it: each tokenizes
    every world_size-th example and gathers the others'. An example the tokenizer or its chat template fails on
    is an error naming its row, on every rank. `digest`: rows_digest(examples), where the caller has it already."""
    eos_token_id(tokenizer)  # refused on every rank alike, before any work
    share = range(distributed.rank(), len(examples), distributed.world_size())
    batches = [share[start : start + TOKENIZE_BATCH] for start in range(0, len(share), TOKENIZE_BATCH)]
    fitting = {"max_length": data.max_length, "max_prompt_length": data.max_prompt_length,
               "cut_prompt": data.cut_prompt}
    check_lengths(tokenizer, **fitting)  # the settings' fault, not the first row's
    # A rank's examples wait for the exchange with their ids in int32 arrays: 4 bytes a token, pickled as such
    # (a tokenizer's lists hold an int object of 28 bytes per token, and unpickling makes one per token again).
    done: list[TokenizedExample] = []
    refused, failure = None, None
    for batch in distributed.progress_bar(batches, f"tokenizing ({TOKENIZE_BATCH} examples a batch)",
                                          progress and len(share) > 1000):
        try:
            done += [example.remade(int32_array)
                     for example in tokenize_batch(tokenizer, [human_part(examples[index]) for index in batch],
                                                   **fitting)]
        except Exception as error:  # noqa: BLE001 - a template's or tokenizer's own error, named by its row
            refused, failure = refusal(tokenizer, examples, batch, fitting, error)
            break
    # What each rank read, to compare: a file or Hub dataset that changed between the ranks' reads would otherwise
    # mix two data sets, or fail on some ranks only.
    read = digest or rows_digest(examples)
    shares = distributed.all_gather_objects((done, refused, len(examples), read), "tokenized examples")
    del done  # this rank's arrays are in shares (copies of them under a launcher)
    if len({(n, digest) for _, _, n, digest in shares}) > 1:
        raise ValueError(f"the ranks read different examples ({', '.join(str(n) for _, _, n, _ in shares)} examples "
                         "by rank): did the data change while the run started?")
    for _, rank_refused, _, _ in shares:
        if rank_refused:  # the lowest rank's: the same error on every rank (its traceback on the rank it was raised)
            raise ValueError(rank_refused) from (failure if rank_refused == refused else None)
    tokenized: list[TokenizedExample] = [None] * len(examples)  # type: ignore[list-item]
    ids = SharedIds()  # the run holds the examples to its end
    for rank in range(len(shares)):
        rank_done, shares[rank] = shares[rank][0], None
        for index in range(len(rank_done)):  # each example's arrays go as its tuples come
            example, rank_done[index] = rank_done[index], None
            tokenized[rank + index * len(shares)] = example.remade(ids)
    return tokenized


def check_in_vocabulary(tokenizer, examples: Seq[TokenizedExample], model_folder: str, trust_remote_code: bool,
                        names: Seq[str] | None = None, setting: str | None = "model.name_or_path") -> None:
    """Every token id the examples give the model, and the EOS its answers end with, is in the model's vocabulary
    (its config's vocab_size), or the error names the row and the setting now: a tokenizer given tokens the model's
    embeddings were never resized for failed as an IndexError deep in the embedding (on a GPU a device-side assert)
    once generation or scoring started. `names`: each example's row, where known; `setting`: the model's (None: the
    caller names it, as eval does a baseline)."""
    from transformers import AutoConfig

    from spin_fast.model import text_config

    config = AutoConfig.from_pretrained(model_folder, trust_remote_code=trust_remote_code)
    vocab = getattr(text_config(config), "vocab_size", None)
    if not vocab:
        return
    advice = (f"the model's vocabulary of {vocab} tokens (vocab_size in {model_folder}/config.json); the tokenizer of "
              f"model.name_or_path has {len(tokenizer)}: tokens added to it without resizing the model's embeddings "
              "(model.resize_token_embeddings)?")
    eos = eos_token_id(tokenizer)
    if eos >= vocab:
        raise ValueError(f"{setting + ': ' if setting else ''}the token responses end with, id {eos} "
                         f"({tokenizer.convert_ids_to_tokens(eos)!r}), is outside {advice}")
    for index, example in enumerate(examples):
        whole = example.unfitted or example  # the prompt the opponent answers whole
        highest = max(max(part, default=0) for part in whole.parts() if part is not None)
        if highest >= vocab:
            name = item_name("example", index, names)
            raise ValueError(f"{name}: token id {highest} ({tokenizer.convert_ids_to_tokens(highest)!r}) is outside "
                             f"{advice}")


def human_part(example: Example) -> Example:
    """The example without a pair file's generated response."""
    return example if example.generated is None else replace(example, generated=None)


def int32_array(ids: Seq[int]) -> array:
    return array("i", ids)


def tokenized_examples(tokenizer, data: DataConfig, source: str, limit: int | None = None) -> list[TokenizedExample]:
    """The examples of `source`, read and tokenized with the run's data settings (on every rank: see
    tokenize_examples)."""
    return tokenize_examples(tokenizer, data, read_examples(data, source, limit))


def answered_pairs(examples: Seq[TokenizedExample], completions, end: Seq[int], data: DataConfig,
                   bos: int | None = None) -> list[TokenizedPair]:
    """Each example's human response paired with the engine's first completion (closed with `end`: the ids of
    data.response_end, which the human responses end with), fitted to data.max_length by data.cut_prompt's rule."""
    pairs = []
    for e, c in zip(examples, completions):
        e = e.unfitted or e  # fitted with its real response alone, it might fit otherwise than the pair
        prompt, (real, generated) = fit_to_length(
            e.prompt_ids, [e.response_ids, (*c[0].token_ids, *end)], max_length=data.max_length,
            max_prompt_length=data.max_prompt_length, cut_prompt=data.cut_prompt, end=end, bos=bos)
        pairs.append(TokenizedPair(prompt, real, generated))
    return pairs

"""SFT sets -> (prompt, human response[, generated response]) examples -> token ids.

render_prompt is the only way prompt messages become ids, for training and generation alike.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

logger = logging.getLogger(__name__)

SCHEMAS = ("messages", "prompt_response", "spin_pairs")
ROLES = ("system", "user", "assistant")


class DataError(ValueError):
    """Bad input data; the message names the file, the row and the field, and what was expected."""


@dataclass(frozen=True)
class Example:
    prompt: tuple[dict, ...]  # chat messages before the response, each {"role": str, "content": str}
    response: str  # the human ("real") response
    generated: str | None = None  # an opponent response (SPIN pair files)
    origin: str = ""  # "path:row", for messages


@dataclass(frozen=True)
class LoadResult:
    examples: list[Example]
    skipped: int


@dataclass(frozen=True)
class TokenizedExample:
    prompt_ids: tuple[int, ...]
    response_ids: tuple[int, ...]
    generated_ids: tuple[int, ...] | None


# ---------------------------------------------------------------------------------------------- reading files

@dataclass(frozen=True)
class _BadJSON:
    error: str


def _read_jsonl(path: Path) -> list[tuple[int, Any]]:
    rows = []
    with path.open(encoding="utf-8") as f:
        for index, line in enumerate(f):
            if not line.strip():
                continue
            try:
                rows.append((index, json.loads(line)))
            except json.JSONDecodeError as e:
                # Kept as a row so that skip_invalid can count it like any other bad row.
                rows.append((index, _BadJSON(str(e))))
    return rows


def _read_json(path: Path) -> list[tuple[int, Any]]:
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as e:
        raise DataError(f"{path}: invalid JSON: {e}") from e
    if isinstance(data, dict) and isinstance(data.get("data"), list):
        data = data["data"]
    if not isinstance(data, list):
        raise DataError(f"{path}: expected a list of objects or {{\"data\": [...]}}, got {_kind(data)}")
    return list(enumerate(data))


def _read_parquet(path: Path) -> list[tuple[int, Any]]:
    import pyarrow.parquet as pq

    return list(enumerate(pq.read_table(path).to_pylist()))


_READERS: dict[str, Callable[[Path], list[tuple[int, Any]]]] = {
    ".jsonl": _read_jsonl, ".json": _read_json, ".parquet": _read_parquet,
}


def _read_source(source: str | Path, split: str) -> list[tuple[str, list[tuple[int, Any]]]]:
    """(file name, [(row index, row)]) for each file of a local source, or for a `datasets` dataset."""
    path = Path(source)
    if path.is_dir():
        files = sorted(p for p in path.rglob("*") if p.is_file() and p.suffix.lower() in _READERS)
        if not files:
            raise DataError(f"{path}: directory has no {', '.join(_READERS)} files")
        return [(str(f), _READERS[f.suffix.lower()](f)) for f in files]
    if path.is_file() and path.suffix.lower() in _READERS:
        return [(str(path), _READERS[path.suffix.lower()](path))]
    if not path.exists() and (path.suffix.lower() in _READERS or path.is_absolute() or str(source).startswith(".")):
        # Clearly meant as a local file: never send it to the Hub.
        raise FileNotFoundError(f"{source}: no such file or directory")
    return [(str(source), _load_with_datasets(source, split))]


def _load_with_datasets(source: str | Path, split: str) -> list[tuple[int, Any]]:
    import datasets  # lazily: slow to import and only needed for sources that are not local files

    try:
        dataset = datasets.load_dataset(str(source), split=split)
    except Exception as e:
        local = "an existing file of unknown type" if Path(source).exists() else "not a local path"
        raise DataError(f"{source}: {local} (expected .jsonl, .json, .parquet or a directory of them), "
                        f"and datasets.load_dataset(split={split!r}) failed: {type(e).__name__}: {e}") from e
    return list(enumerate(dataset))


# ------------------------------------------------------------------------------------------ validating rows

class _RowError(Exception):
    def __init__(self, field: str | None, expected: str):
        super().__init__(f"field {field!r}: {expected}" if field else expected)


def _kind(value: Any) -> str:
    return "None" if value is None else type(value).__name__


def _field(row: Mapping, name: str) -> Any:
    if name not in row:
        raise _RowError(name, "missing")
    return row[name]


def _string(value: Any, field: str, *, nonblank: bool = True) -> str:
    if not isinstance(value, str):
        raise _RowError(field, f"expected a string, got {_kind(value)}")
    if nonblank and not value.strip():
        raise _RowError(field, "expected a non-empty string, got an empty or whitespace-only one")
    return value


def _messages(value: Any, field: str) -> list[dict]:
    if not isinstance(value, (list, tuple)):
        raise _RowError(field, f"expected a list of {{role, content}} dicts, got {_kind(value)}")
    messages = []
    for i, message in enumerate(value):
        if not isinstance(message, Mapping):
            raise _RowError(f"{field}[{i}]", f"expected a {{role, content}} dict, got {_kind(message)}")
        role, content = message.get("role"), message.get("content")
        if role not in ROLES:
            raise _RowError(f"{field}[{i}].role", f"expected one of {', '.join(ROLES)}, got {role!r}")
        if not isinstance(content, str):
            raise _RowError(f"{field}[{i}].content", f"expected a string, got {_kind(content)}")
        messages.append({"role": role, "content": content})  # extra keys dropped: templates see only these
    return messages


def _prompt(messages: list[dict], field: str) -> tuple[dict, ...]:
    if not any(m["role"] == "user" for m in messages):
        raise _RowError(field, "expected a user turn before the response, found none")
    return tuple(messages)


def _from_messages(row: Mapping, keep_history: bool) -> tuple[tuple[dict, ...], str, None]:
    messages = _messages(_field(row, "messages"), "messages")
    turns = [i for i, m in enumerate(messages) if m["role"] == "assistant"]
    if not turns:
        raise _RowError("messages", "expected an assistant turn, found none")
    last = turns[-1] if keep_history else turns[0]
    response = _string(messages[last]["content"], f"messages[{last}].content")
    return _prompt(messages[:last], "messages"), response, None


def _from_prompt_response(row: Mapping, keep_history: bool) -> tuple[tuple[dict, ...], str, None]:
    prompt = _string(_field(row, "prompt"), "prompt")
    response = _string(_field(row, "response"), "response")
    return ({"role": "user", "content": prompt},), response, None


def _split_last_assistant(row: Mapping, field: str) -> tuple[list[dict], str]:
    messages = _messages(_field(row, field), field)
    if not messages or messages[-1]["role"] != "assistant":
        raise _RowError(field, "expected the last turn to be the assistant's")
    return messages[:-1], messages[-1]["content"]


def _from_spin_pairs(row: Mapping, keep_history: bool) -> tuple[tuple[dict, ...], str, str]:
    prompt, response = _split_last_assistant(row, "real")
    generated_prompt, generated = _split_last_assistant(row, "generated")
    response = _string(response, f"real[{len(prompt)}].content")
    # An empty generation is a legitimate (poor) model output: it stays, and its EOS still carries loss.
    if generated_prompt != prompt:
        raise _RowError("generated", "expected the same prompt as 'real' (the turns before the last), got another")
    return _prompt(prompt, "real"), response, generated


_PARSERS = {"messages": _from_messages, "prompt_response": _from_prompt_response, "spin_pairs": _from_spin_pairs}


def _detect_schema(row: Any, where: str) -> str:
    keys = set(row) if isinstance(row, Mapping) else set()
    if {"real", "generated"} <= keys:
        return "spin_pairs"
    if "messages" in keys:
        return "messages"
    if {"prompt", "response"} <= keys:
        return "prompt_response"
    found = sorted(keys) if isinstance(row, Mapping) else _kind(row)
    raise DataError(f"{where}: cannot detect the schema from {found}; expected a 'messages' field, 'prompt' and "
                    f"'response', or 'real' and 'generated' (or pass schema= one of {', '.join(SCHEMAS)})")


# ------------------------------------------------------------------------------------------------ public API

def load_examples(source: str | Path, *, split: str = "train", schema: str = "auto", keep_history: bool = False,
                  skip_invalid: bool = False) -> LoadResult:
    """Load a .jsonl / .json / .parquet file, a directory of them, or a `datasets` dataset as Examples.

    A bad row raises DataError, or with skip_invalid=True is skipped, logged and counted.
    """
    if schema != "auto" and schema not in SCHEMAS:
        raise ValueError(f"schema: expected 'auto' or one of {', '.join(SCHEMAS)}, got {schema!r}")
    examples: list[Example] = []
    skipped = 0
    for name, rows in _read_source(source, split):
        if not rows:
            raise DataError(f"{name}: no rows")
        if schema == "auto":
            # The first object row decides, so that a leading broken line can still be skipped.
            index, row = next(((i, r) for i, r in rows if isinstance(r, Mapping)), rows[0])
            schema = _detect_schema(row, f"{name} row {index}")
        parse = _PARSERS[schema]
        kept = 0
        for index, row in rows:
            try:
                if isinstance(row, _BadJSON):
                    raise _RowError(None, f"expected a JSON object, got invalid JSON ({row.error})")
                if not isinstance(row, Mapping):
                    raise _RowError(None, f"expected an object with the {schema} fields, got {_kind(row)}")
                prompt, response, generated = parse(row, keep_history)
            except _RowError as e:
                message = f"{name} row {index}: {e}"
                if not skip_invalid:
                    raise DataError(message) from None
                logger.warning("skipped %s", message)
                skipped += 1
                continue
            examples.append(Example(prompt, response, generated, origin=f"{name}:{index}"))
            kept += 1
        if kept == 0:
            raise DataError(f"{name}: all {len(rows)} rows are invalid (schema {schema!r})")
    if skipped:
        logger.warning("%s: skipped %d invalid rows, kept %d", source, skipped, len(examples))
    return LoadResult(examples, skipped)


def render_prompt(tokenizer: Any, messages: Sequence[Mapping[str, str]]) -> list[int]:
    """Prompt messages -> token ids through the chat template, ending with the assistant marker."""
    out = tokenizer.apply_chat_template(list(messages), add_generation_prompt=True, tokenize=True)
    # transformers returns a BatchEncoding (v5), a list, or a tensor depending on version and arguments.
    if isinstance(out, Mapping):
        out = out["input_ids"]
    if hasattr(out, "tolist"):
        out = out.tolist()
    if out and isinstance(out[0], (list, tuple)):
        out = out[0]
    return [int(i) for i in out]


def cut_response(ids: Sequence[int], budget: int, eos: int) -> tuple[int, ...]:
    """A response (ending with EOS) fitted to `budget` tokens; a cut one still ends with EOS, so the
    model still learns where answers stop."""
    ids = list(ids)
    return tuple(ids if len(ids) <= budget else [*ids[: budget - 1], eos])


def tokenize_example(tokenizer: Any, example: Example, *, max_length: int, max_prompt_length: int) -> TokenizedExample:
    """Prompt ids (keeping the prompt's end) and EOS-terminated response ids, cut to fit max_length (SPIN recipe)."""
    if max_prompt_length < 1 or max_length < 1 or max_prompt_length >= max_length:
        raise ValueError(f"expected 1 <= max_prompt_length < max_length, got max_prompt_length={max_prompt_length}, "
                         f"max_length={max_length}")
    eos = tokenizer.eos_token_id
    if eos is None:
        raise ValueError("the tokenizer has no eos token: responses must end with one")
    prompt = render_prompt(tokenizer, example.prompt)[-max_prompt_length:]
    budget = max_length - len(prompt)

    def response(text: str) -> tuple[int, ...]:
        return cut_response([*tokenizer.encode(text, add_special_tokens=False), eos], budget, eos)

    generated = None if example.generated is None else response(example.generated)
    return TokenizedExample(tuple(prompt), response(example.response), generated)

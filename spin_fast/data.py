"""SFT sets -> (prompt, human response[, generated response]) examples -> token ids.

_prompt_text and _prompt_ids are the only way prompt messages become ids: the prompts generation answers
(TokenizedExample.answered_prompt_ids, from tokenize_batch), the prompts training reads and render_prompt's agree.
"""

from __future__ import annotations

import contextlib
import functools
import hashlib
import itertools
import json
import logging
import re
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

logger = logging.getLogger(__name__)

SCHEMAS = ("messages", "prompt_response", "spin_pairs")
SCHEMA_ROWS = 1000  # the rows read at most to find the one that names a file's schema
ROLES = ("system", "user", "assistant")


class DataError(ValueError):
    """Bad input data; the message names the file, the row and the field, and what was expected."""


@dataclass(frozen=True)
class Example:
    prompt: tuple[dict, ...]  # chat messages before the response, each {"role": str, "content": str}
    response: str  # the human ("real") response
    generated: str | None = None  # an opponent response (SPIN pair files)
    origin: str = ""  # "path line N" (.jsonl, from 1) or "path row N" (from 0), for messages

    @functools.cached_property
    def key(self) -> bytes:
        """A digest of the prompt and response, made once: a run looks the rows up by it twice (repeated_rows as they
        load, rows_found_in for the held-out ones), each time a pass over the data's text."""
        return _row_key(self)


@dataclass(frozen=True)
class LoadResult:
    examples: list[Example]
    skipped: int


@dataclass(frozen=True)
class TokenizedExample:
    prompt_ids: tuple[int, ...]  # as trained on: fitted to max_length (fit_to_length)
    response_ids: tuple[int, ...]
    generated_ids: tuple[int, ...] | None
    # Under cut_prompt "when_too_long", the example as it was before fitting cut it (else None): the opponent
    # answers its whole prompt, and its pair is fitted from it.
    unfitted: TokenizedExample | None = None

    @property
    def answered_prompt_ids(self) -> tuple[int, ...]:
        """The prompt that generation answers."""
        return (self.unfitted or self).prompt_ids

    def remade(self, make: Callable[[Sequence[int]], Any]) -> TokenizedExample:
        """The same example, each of its id sequences made anew by `make` (SharedIds, or an array for the ranks'
        exchange); a part it shares with its unfitted self stays one."""
        unfitted = self.unfitted and self.unfitted.remade(make)
        made = {} if unfitted is None else {id(old): new for old, new in zip(self.unfitted.parts(), unfitted.parts())}

        def remade_part(part: Sequence[int] | None) -> Any:
            return None if part is None else made[id(part)] if id(part) in made else make(part)

        return TokenizedExample(remade_part(self.prompt_ids), remade_part(self.response_ids),
                                remade_part(self.generated_ids), unfitted)

    def parts(self) -> tuple[tuple[int, ...] | None, ...]:
        return self.prompt_ids, self.response_ids, self.generated_ids


class SharedIds:
    """Makes token-id tuples in which equal ids are one int object, across all the tuples it makes: 8 bytes a token
    in place of 36 (CPython shares only ints below 257; json, pickle and tokenizers make a new one for every
    other id). Every rank holds its run's pairs, tens of millions of tokens at the paper's scale."""

    def __init__(self) -> None:
        self._ints: dict[int, int] = {}

    def __call__(self, ids: Sequence[int]) -> tuple[int, ...]:
        if isinstance(ids, (str, bytes)):
            raise ValueError(f"token ids: expected a list of integers, got a string {ids[:20]!r}")
        known = len(self._ints)
        shared = tuple(map(self._ints.setdefault, ids, ids))
        # Each distinct id is checked once, as it is first seen: a file's JSON may hold 5.0, true or "5" as well.
        bad = [new for new in itertools.islice(reversed(self._ints), len(self._ints) - known)
               if type(new) is not int or new < 0]
        if bad:
            raise ValueError(f"token ids: expected integers >= 0, got {bad[-1]!r}")  # the first seen
        return shared


# ---------------------------------------------------------------------------------------------- reading files

@dataclass(frozen=True)
class _BadLine:
    error: str  # what is wrong with the line, as a _RowError would say it


def _parse_line(line: str) -> Any:
    try:
        line.encode("utf-8")  # undecodable bytes were kept as lone surrogates (surrogateescape)
    except UnicodeEncodeError as e:
        byte = ord(line[e.start]) - 0xDC00
        return _BadLine(f"expected UTF-8 text, got byte 0x{byte:02x} at character {e.start}")
    line = line.rstrip("\r\n")
    try:
        return json.loads(line)
    except json.JSONDecodeError as e:  # its own "line 1 column N" would contradict the file's line named beside it
        end = ", the line's end" if e.pos == len(line) else ""
        return _BadLine(f"expected a JSON object, got invalid JSON ({e.msg} at character {e.pos}{end})")


# A row is (where, value). `where` names it in messages: "line N" in a .jsonl file, counted from 1 with blank lines as
# an editor shows it; "row N" elsewhere, counted from 0 as an index into the list, table or dataset. A file's rows
# are read as they are parsed: a run that takes the first max_prompts examples of a large source reads no further.
Rows = Iterator[tuple[str, Any]]


def _indexed(values: Iterable[Any]) -> Rows:
    return ((f"row {index}", value) for index, value in enumerate(values))


def _read_jsonl(path: Path) -> Rows:
    # Bad lines (invalid JSON or not UTF-8) are kept as rows so that skip_invalid can count them like any
    # other bad row; utf-8-sig, because editors on Windows start files with a BOM.
    with path.open(encoding="utf-8-sig", errors="surrogateescape") as f:
        for number, line in enumerate(f, 1):
            if line.strip():
                yield f"line {number}", _parse_line(line)


def _whole_file_hint(name: str, first_row: Any) -> str:
    """For a .jsonl file that is one multi-line JSON document (its first line is then never valid alone):
    a hint to rename it. Only called on the way to an error: it reads the whole file."""
    if not (name.endswith(".jsonl") and isinstance(first_row, _BadLine)):
        return ""
    try:
        json.loads(Path(name).read_text(encoding="utf-8-sig"))
    except (OSError, ValueError):
        return ""
    return f"; the file as a whole is one JSON document: rename it to {Path(name).with_suffix('.json').name}"


class _NotRows(DataError):
    """A .json file that parses but holds no list of rows (metadata such as a dataset_info.json)."""


def _read_json(path: Path) -> Rows:
    try:
        data = json.loads(path.read_text(encoding="utf-8-sig"))
    except UnicodeDecodeError as e:
        raise DataError(f"{path}: expected UTF-8 text ({e})") from e
    except json.JSONDecodeError as e:
        lines = "; if it holds one JSON object a line, rename it to .jsonl" if e.msg == "Extra data" else ""
        raise DataError(f"{path}: invalid JSON: {e}{lines}") from e
    if isinstance(data, dict) and isinstance(data.get("data"), list):
        data = data["data"]
    if not isinstance(data, list):
        got = f"a JSON object (keys {sorted(data)[:5]})" if isinstance(data, dict) else _kind(data)
        raise _NotRows(f"{path}: expected a list of objects or {{\"data\": [...]}}, got {got}, not a list of rows")
    return _indexed(data)


def _read_parquet(path: Path) -> Rows:
    import pyarrow as pa
    import pyarrow.parquet as pq

    def rows() -> Iterator[Any]:  # opened as it is read: a folder of thousands of shards holds one open at a time
        try:  # pyarrow's errors name no file
            table = pq.ParquetFile(path)
        except (pa.ArrowException, OSError) as e:
            raise DataError(f"{path}: not a readable parquet file: {e}") from e
        with table:
            try:  # small batches: each becomes Python objects at once (the default, 65536 rows, is more than
                # max_prompts takes); a reader's own errors never reach here, only pyarrow's
                for batch in table.iter_batches(batch_size=1024):
                    yield from batch.to_pylist()
            except (pa.ArrowException, OSError) as e:
                raise DataError(f"{path}: a damaged parquet file: {e}") from e

    return _indexed(rows())


_READERS: dict[str, Callable[[Path], Rows]] = {
    ".jsonl": _read_jsonl, ".json": _read_json, ".parquet": _read_parquet,
}


def _read_source(source: str | Path, split: str, setting: str, given: bool = True) -> Iterator[tuple[str, Rows]]:
    """(file name, rows) for each file of a local source, in order, or for a `datasets` dataset. `setting`: the
    one `split` came from, as errors name it; `given` False: a default taken from another setting, which data of
    one split or none leaves unused without a word."""
    path = Path(source)
    if _saved_by_datasets(path):
        yield str(path), _load_from_disk(path, split, setting, given)
    elif path.is_dir():
        for file in _split_files(path, _folder_files(path), split, setting, given):
            yield str(file), _read_file(file, in_folder=True)
    elif path.is_file():  # a local file is never a Hub dataset's name
        if path.suffix.lower() not in _READERS:
            raise DataError(f"{source}: a file of unknown type {path.suffix or '(no suffix)'}: expected "
                            f"{', '.join(_READERS)} (or a directory of them, or a Hub dataset's name)")
        if given:
            _warn_of_an_unused_split(path, split, setting)
        yield str(path), _read_file(path)
    elif not path.exists() and (path.suffix.lower() in _READERS or path.is_absolute() or str(source).startswith(".")):
        # Clearly meant as a local file: never send it to the Hub.
        raise FileNotFoundError(f"{source}: no such file or directory")
    else:
        yield str(source), _load_with_datasets(source, split)


def _folder_files(path: Path) -> list[Path]:
    files, hidden, others = _listed(path)
    if hidden:
        logger.info("%s: ignored %d data files in hidden files or folders, such as %s", path, len(hidden),
                    min(hidden))
    if others:  # a .jsonl.gz or .csv among the data is read by no reader: said, not silently left
        logger.info("%s: ignored %d files of other types than %s, such as %s", path, len(others), ", ".join(_READERS),
                    others[0].relative_to(path))
    if not files:
        note = f" (besides {len(hidden)} in hidden files or folders)" if hidden else ""
        raise DataError(f"{path}: directory has no {', '.join(_READERS)} files{note}")
    return files


def _listed(path: Path) -> tuple[list[Path], list[Path], list[Path]]:
    """A folder's data files, its data files under hidden names (.ipynb_checkpoints, .cache: copies of the data,
    which would silently duplicate rows), and its files of other types."""
    found = sorted(p for p in path.rglob("*") if p.is_file())
    in_hidden = {f for f in found if any(part.startswith(".") for part in f.relative_to(path).parts)}
    data = [f for f in found if f.suffix.lower() in _READERS]
    return ([f for f in data if f not in in_hidden], [f for f in data if f in in_hidden],
            [f for f in found if f.suffix.lower() not in _READERS and f not in in_hidden])


# A shard as the Hub and datasets' push_to_hub name it: <split>-00000-of-00003[-<hash>] (ultrachat_200k's data/ folder)
_SHARD = re.compile(r"(?P<split>\w+?)-\d{5}-of-\d{5}(-[0-9a-f]+)?")
# A split's words as datasets.load_dataset finds them in a folder's file and folder names (its SPLIT_KEYWORDS, between
# non-word characters): train.jsonl, train_sft.jsonl and my-train-1.jsonl are train's, dev/ is validation's.
_SPLIT_WORDS = {"train": "train", "training": "train", "validation": "validation", "valid": "validation",
                "dev": "validation", "val": "validation", "test": "test", "testing": "test", "eval": "test",
                "evaluation": "test"}
_SPLIT_WORD = re.compile(rf"(?:^|[-._ 0-9])({'|'.join(_SPLIT_WORDS)})(?=[-._ 0-9]|$)")


def _split_files(path: Path, files: list[Path], split: str, setting: str, given: bool = True) -> list[Path]:
    """A folder's files of `split` where it holds a dataset's splits side by side (its files named by two splits or
    more), as datasets.load_dataset reads it: read whole, a run would train on the test split too. Else all."""
    splits = _file_splits(path, files)
    if len(splits) < 2:  # read whole: a split asked of it other than the one it holds is said unused
        if not given:
            return files
        held = next(iter(splits), None)
        # Shards named by no split's word (part-00000-of-00002) are train's to datasets outside data/: no split held
        held = held if held is not None and _SPLIT_WORD.search(held) else None
        _warn_of_an_unused_split(path, split, setting, held, "by its files' or folders' names")
        return files
    split = split if split in splits else _SPLIT_WORDS.get(split, split)  # dev: validation, as datasets names it
    # Shards outside a data/ folder named by a split's word (the official SPIN data's train_prefs-00000-of-00001.parquet
    # beside test_prefs-, which its configs read as train and test): datasets names their split by that word (a Hub
    # shard's name, in data/, it takes whole). Taken where one split has it.
    named = [name for name in splits if (word := _SPLIT_WORD.search(name)) and _SPLIT_WORDS[word[1]] == split
             and all(file.parent != path / "data" for file in splits[name])]
    if split not in splits and len(named) == 1:
        split = named[0]
    if split not in splits:
        raise DataError(f"{path}: holds the splits {', '.join(sorted(splits))} (by its files' or folders' names, as "
                        f"datasets reads them), none of them {setting}={split!r}: set {setting} to one")
    logger.info("%s: read split %s (%d files), left the splits %s", path, split, len(splits[split]),
                ", ".join(sorted(set(splits) - {split})))
    if unnamed := len(files) - sum(len(f) for f in splits.values()):
        logger.warning("%s: left %d files named by no split (as datasets.load_dataset does beside split files): "
                       "name them by their split, or move them out", path, unnamed)
    return splits[split]


def _warn_of_an_unused_split(path: Path, split: str, setting: str, held: str | None = None, how: str = "") -> None:
    """Data that holds no splits (one file, a folder whose files name none, a Dataset saved alone) or one split
    `held` (a folder of test.jsonl alone; `how` says what tells it) is read whole: as datasets names such data's one
    split train, a train split asked of it (train, train_sft) is that, as `held` asked by its name or word (eval for
    test; train for a slice, train[:10]) is, and another (test) is said unused: silently, a run meant to read a test
    split read the whole file."""
    whole = re.sub(r"\[[^\]]*\]", "", held or "train")  # datasets' slices of a split: train[:10%] is train's
    if _split_of(split) != _split_of(whole) and split not in (held, whole):
        holds = f"holds the split {held} alone ({how})" if held else "holds no splits"
        logger.warning("%s: %s, read whole: %s=%r is unused (it picks a split of a datasets source, or of a folder "
                       "of files named by their splits)", path, holds, setting, split)


def _split_of(name: str) -> str:
    """The split a name's word gives (train_sft: train, dev: validation), as datasets reads it; else the name."""
    word = _SPLIT_WORD.search(name)
    return name if word is None else _SPLIT_WORDS[word[1]]


def _file_splits(path: Path, files: list[Path]) -> dict[str, list[Path]]:
    """The files by the split their names give, grouped as datasets.load_dataset groups them: by Hub shard names
    (<split>-00000-of-00003) if any, else by a split's word in the file names if any, else in the folder names."""
    by_shard: dict[str, list[Path]] = {}
    by_name: dict[str, list[Path]] = {}
    by_folder: dict[str, list[Path]] = {}
    for file in files:
        if shard := _SHARD.fullmatch(file.name[: -len(file.suffix)]):
            by_shard.setdefault(shard["split"], []).append(file)
        if word := _SPLIT_WORD.search(file.name):
            by_name.setdefault(_SPLIT_WORDS[word[1]], []).append(file)
        folders = (_SPLIT_WORD.search(part) for part in file.relative_to(path).parts[:-1])
        if word := next(filter(None, folders), None):
            by_folder.setdefault(_SPLIT_WORDS[word[1]], []).append(file)
    return by_shard or by_name or by_folder


def reads_one_split(source: str | Path) -> bool:
    """Whether `source` is a local folder of a dataset's splits side by side, of which _split_files reads one
    (older spin-fast read every split's files: what it saved from them is of other rows)."""
    path = Path(source)
    if not path.is_dir() or _saved_by_datasets(path):
        return False
    return len(_file_splits(path, _listed(path)[0])) >= 2


def _read_file(path: Path, *, in_folder: bool = False) -> Rows:
    try:
        return _READERS[path.suffix.lower()](path)
    except _NotRows as e:  # re-raised as a plain DataError: the subclass is only a marker
        hint = "; move it out of the data folder, or name the data file itself as the source" if in_folder else ""
        raise DataError(f"{e}{hint}") from None


def _saved_by_datasets(path: Path) -> bool:
    """A folder written by datasets' save_to_disk (a Dataset's state.json, a DatasetDict's dataset_dict.json)."""
    return (path / "state.json").is_file() or (path / "dataset_dict.json").is_file()


def _load_from_disk(path: Path, split: str, setting: str, given: bool = True) -> Rows:
    import datasets  # its files are Arrow tables with their metadata beside them: datasets alone reads them

    try:
        dataset = datasets.load_from_disk(str(path))
    except Exception as e:
        raise DataError(f"{path}: a folder saved by datasets' save_to_disk, which datasets.load_from_disk failed to "
                        f"read: {type(e).__name__}: {e}") from e
    if isinstance(dataset, datasets.DatasetDict):
        if split not in dataset:
            raise DataError(f"{path}: a datasets folder (save_to_disk) with the splits {', '.join(dataset)}, none of "
                            f"them {setting}={split!r}: set {setting} to one")
        dataset = dataset[split]
    elif given:  # a Dataset saved alone: its split (from load_dataset), if it keeps one
        _warn_of_an_unused_split(path, split, setting, str(dataset.split) if dataset.split else None,
                                 "as datasets saved it")
    return _indexed(dataset)


def _load_with_datasets(source: str | Path, split: str) -> Rows:
    import datasets  # lazily: slow to import and only needed for sources that are not local files

    try:
        dataset = datasets.load_dataset(str(source), split=split)
    except Exception as e:
        raise DataError(f"{source}: not a local path (expected .jsonl, .json, .parquet or a directory of them), "
                        f"and datasets.load_dataset(split={split!r}) failed: {type(e).__name__}: {e}") from e
    return _indexed(dataset)


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


def _text(value: str, field: str) -> str:
    if not value.isascii():
        try:
            value.encode("utf-8")
        except UnicodeEncodeError as e:  # JSON's "\ud83d" (half an emoji, cut by a scraper): no tokenizer encodes it
            raise _RowError(field, f"expected text, got a lone surrogate {value[e.start]!r} at character "
                                   f"{e.start}") from None
    return value


def _string(value: Any, field: str, *, nonblank: bool = True) -> str:
    if not isinstance(value, str):
        raise _RowError(field, f"expected a string, got {_kind(value)}")
    _text(value, field)
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
        _text(content, f"{field}[{i}].content")  # every turn is templated and tokenized
        messages.append({"role": role, "content": content})  # extra keys dropped: templates see only these
    return messages


def _prompt(messages: list[dict], field: str) -> tuple[dict, ...]:
    users = [i for i, m in enumerate(messages) if m["role"] == "user"]
    if not users:
        raise _RowError(field, "expected a user turn before the response, found none")
    _string(messages[users[-1]]["content"], f"{field}[{users[-1]}].content")  # the question the response answers
    return tuple(messages)


def _from_messages(row: Mapping, keep_history: bool) -> tuple[tuple[dict, ...], str, None]:
    messages = _messages(_field(row, "messages"), "messages")
    turns = [i for i, m in enumerate(messages) if m["role"] == "assistant"]
    if not turns:
        raise _RowError("messages", "expected an assistant turn, found none")
    last = turns[-1] if keep_history else turns[0]
    response = _string(messages[last]["content"], f"messages[{last}].content")
    if not keep_history and len(turns) > 1 and not any(m["role"] == "user" for m in messages[:last]):
        # A conversation that opens with the assistant's greeting
        raise _RowError("messages", f"expected a user turn before the first assistant turn (messages[{last}]), "
                                    "found none; data.keep_history=true takes the last assistant turn as the "
                                    "response and the whole conversation before it as the prompt")
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
                    f"'response', or 'real' and 'generated' (or set data.schema to one of {', '.join(SCHEMAS)})")


def _file_schema(name: str, head: list[tuple[str, Any]], rows: Rows, skip_invalid: bool) -> str:
    """The schema of a file whose first row is head[0]: its first object row's, or under skip_invalid its first
    whose schema can be detected within SCHEMA_ROWS rows (else the first object row's error), so that a folder
    may mix formats and leading broken lines can be skipped. The rows read on are appended to `head`."""
    first_object = None
    while True:
        row = head[-1][1]
        if isinstance(row, Mapping):
            first_object = first_object or head[-1]
            if not skip_invalid:
                break
            with contextlib.suppress(DataError):
                return _detect_schema(row, "")
        if len(head) >= SCHEMA_ROWS or (following := next(rows, None)) is None:
            break
        head.append(following)
    where, row = first_object or head[0]
    if isinstance(row, _BadLine):
        raise DataError(f"{name} {where}: {row.error}{_whole_file_hint(name, head[0][1])}")
    return _detect_schema(row, f"{name} {where}")


def _check_kind(kinds: dict[bool, tuple[str, str]], name: str, schema: str) -> None:
    # Pair files give examples with a generated response, the others SFT examples without: never both.
    pairs = schema == "spin_pairs"
    if (not pairs) in kinds:
        other, other_schema = kinds[not pairs]
        raise DataError(f"{name}: {schema} rows, but {other} has {other_schema} rows: one source holds either "
                        f"SPIN pairs (real, generated) or SFT examples (messages, prompt/response), not both")
    kinds.setdefault(pairs, (name, schema))


def _other_format_hint(row: Any, schema: str, detected: bool) -> str:
    """For a row of another format than its file's (detected from its rows, or data.schema): a hint that says so."""
    try:
        other = _detect_schema(row, "")
    except DataError:
        return ""
    if other == schema:
        return ""
    return f" (a {other} row among {schema} rows: one file holds one format)" if detected else \
        f" (a {other} row, but data.schema is {schema})"


def _parse_rows(name: str, rows: Rows, first_row: Any, schema: str, *, detected: bool, keep_history: bool,
                skip_invalid: bool, limit: int | None) -> tuple[list[Example], int]:
    """The examples of a file's rows, up to `limit` of them (None: all), and the number of bad rows skipped.
    detected: whether `schema` was detected from the file's rows, or set (data.schema)."""
    parse = _PARSERS[schema]
    examples, first_error, n_rows = [], None, 0
    for where, row in rows:
        n_rows += 1
        try:
            if isinstance(row, _BadLine):
                raise _RowError(None, row.error)
            if not isinstance(row, Mapping):
                raise _RowError(None, f"expected an object with the {schema} fields, got {_kind(row)}")
            prompt, response, generated = parse(row, keep_history)
        except _RowError as e:
            message = f"{name} {where}: {e}{_other_format_hint(row, schema, detected)}"
            if not skip_invalid:
                raise DataError(message + _whole_file_hint(name, first_row)) from None
            logger.warning("skipped %s", message)
            first_error = first_error or f"{where}: {e}"
            continue
        examples.append(Example(prompt, response, generated, origin=f"{name} {where}"))
        if len(examples) == limit:  # before the next row is read
            break
    if not examples:
        raise DataError(f"{name}: all {n_rows} rows are invalid (schema {schema!r}); the first: {first_error}"
                        f"{_whole_file_hint(name, first_row)}")
    return examples, n_rows - len(examples)


# ------------------------------------------------------------------------------------------------ public API

def load_examples(source: str | Path, *, split: str = "train", schema: str = "auto", keep_history: bool = False,
                  skip_invalid: bool = False, limit: int | None = None,
                  split_setting: str = "data.split", split_given: bool = True) -> LoadResult:
    """Load a .jsonl / .json / .parquet file, a directory of them, or a `datasets` dataset as Examples: the first
    `limit` of them (None: all), reading no row after the last of those.

    In a directory, files and folders whose name starts with "." are ignored, and schema="auto" detects each
    file's schema on its own. A bad row raises DataError, or with skip_invalid=True is skipped, logged and counted.
    `split_setting`: the setting `split` came from, as a bad or unused split's error and warning name it;
    `split_given` False: `split` is another setting's value (data.eval_split null), not said unused.
    """
    if schema != "auto" and schema not in SCHEMAS:
        raise ValueError(f"schema: expected 'auto' or one of {', '.join(SCHEMAS)}, got {schema!r}")
    if limit is not None and limit < 1:
        raise ValueError(f"limit: expected a number of examples >= 1 (or None: all), got {limit}")
    examples: list[Example] = []
    skipped = 0
    kinds: dict[bool, tuple[str, str]] = {}
    sources: Iterable[tuple[str, Rows]] = _read_source(source, split, split_setting, split_given)
    if limit is None:  # every file is read anyway: parse the .json ones first (a metadata .json fails at once)
        sources = list(sources)
    for name, rows in sources:
        with contextlib.closing(rows):  # else an error's traceback (kept by a notebook) keeps the file open
            head = list(itertools.islice(rows, 1))
            if not head:
                raise DataError(f"{name}: no rows")
            file_schema = _file_schema(name, head, rows, skip_invalid) if schema == "auto" else schema
            _check_kind(kinds, name, file_schema)
            kept, bad = _parse_rows(name, itertools.chain(head, rows), head[0][1], file_schema,
                                    detected=schema == "auto", keep_history=keep_history, skip_invalid=skip_invalid,
                                    limit=None if limit is None else limit - len(examples))
        examples += kept
        skipped += bad
        if len(examples) == limit:
            break
    if skipped:
        logger.warning("%s: skipped %d invalid rows, kept %d", source, skipped, len(examples))
    repeats = repeated_rows(examples)
    if repeats:  # kept as the data has them: a set stitched together twice is then trained on twice
        row, first = repeats[0]
        logger.warning("%s: %d rows repeat an earlier row's prompt and response, and are kept (the first: %s "
                       "repeats %s)", source, len(repeats), row.origin, first.origin)
    return LoadResult(examples, skipped)


def repeated_rows(examples: Iterable[Example]) -> list[tuple[Example, Example]]:
    """(row, the row it repeats) for each of `examples` whose prompt and response a row before it has."""
    first: dict[bytes, Example] = {}
    repeats = []
    for e in examples:
        key = e.key
        if key in first:
            repeats.append((e, first[key]))
        else:
            first[key] = e
    return repeats


def rows_found_in(examples: Iterable[Example], others: Iterable[Example]) -> list[tuple[Example, Example]]:
    """(row, the row of `others` with its prompt and response) for each of `examples` that `others` holds."""
    first: dict[bytes, Example] = {}
    for e in others:
        first.setdefault(e.key, e)
    return [(e, first[e.key]) for e in examples if e.key in first]


def _row_key(example: Example) -> bytes:
    # A digest, not the text: a set's keys would otherwise hold a second copy of it.
    return hashlib.sha1(repr((example.prompt, example.response)).encode()).digest()


def render_prompt(tokenizer: Any, messages: Sequence[Mapping[str, str]]) -> list[int]:
    """Prompt messages -> token ids through the chat template, ending with the assistant marker. They start with
    BOS where the tokenizer's own encoding starts with it and the template leaves it out (zephyr's template has
    no BOS; its model was trained on text the tokenizer gave one)."""
    return _prompt_ids(tokenizer, _prompt_text(tokenizer, messages), functools.partial(_encode, tokenizer))[1]


def _prompt_text(tokenizer: Any, messages: Sequence[Mapping[str, str]]) -> str:
    return tokenizer.apply_chat_template(list(messages), add_generation_prompt=True, tokenize=False)


def _prompt_ids(tokenizer: Any, text: str, encode: Callable[[str], list[int]], adds_bos: bool | None = None
                ) -> tuple[list[int], list[int]]:
    """A prompt's ids as they start the templated conversation's (responses follow these), and the ids the model
    is given (render_prompt's). adds_bos: _adds_bos(tokenizer), where the caller has it (None: asked here)."""
    ids = encode(text)
    bos = tokenizer.bos_token_id
    if bos is None or ids[:1] == [bos] or not (_adds_bos(tokenizer) if adds_bos is None else adds_bos):
        return ids, ids
    return ids, [bos, *ids]


def _adds_bos(tokenizer: Any) -> bool:
    """Whether the tokenizer's own encoding starts with BOS."""
    bos = tokenizer.bos_token_id
    return bos is not None and tokenizer.encode("a", add_special_tokens=True)[:1] == [bos]


def _encode(tokenizer: Any, text: str) -> list[int]:
    """Text -> ids, as apply_chat_template(tokenize=True) encodes a rendered conversation: no special tokens added."""
    return [int(i) for i in tokenizer.encode(text, add_special_tokens=False)]


def _encoder(tokenizer: Any, texts: Sequence[str]) -> Callable[[str], list[int]]:
    """_encode with `texts` encoded ahead in one call: a fast tokenizer encodes a batch on every core."""
    unique = list(dict.fromkeys(texts))
    rows = tokenizer(unique, add_special_tokens=False, return_attention_mask=False)["input_ids"] if unique else []
    encoded = {text: [int(i) for i in row] for text, row in zip(unique, rows)}
    return lambda text: encoded[text] if text in encoded else _encode(tokenizer, text)


@dataclass(frozen=True)
class _Rendered:
    """An example's texts as its chat template renders them: the prompt, and each response (the human one, then
    the generated one if any) with the templated conversation up to its end (_in_context)."""

    prompt: str
    responses: tuple[tuple[str, str | None], ...]

    def texts(self) -> list[str]:
        """What tokenizing it encodes (but a response tokenized on its own)."""
        return [self.prompt, *(in_context for _, in_context in self.responses if in_context is not None)]


def _render(tokenizer: Any, example: Example, end: str | None) -> _Rendered:
    prompt = _prompt_text(tokenizer, example.prompt)
    texts = [example.response] if example.generated is None else [example.response, example.generated]
    return _Rendered(prompt, tuple((text, _in_context(tokenizer, example.prompt, prompt, text, end)) for text in texts))


def _in_context(tokenizer: Any, messages: Sequence[Mapping[str, str]], prompt_text: str, text: str,
                end: str | None) -> str | None:
    """The templated conversation of the prompt and the response `text`, up to the response's end in the template's
    own text of it: up to `end`, the text of the token responses end with, where the template writes it after the
    response (its last one: a response may hold that text too). A template may strip the response, put a space
    before it or before `end` (Llama 2's ' ' + eos_token: its models write that '▁' before EOS, and a real response
    without it would differ from theirs by that token), or write it in a layout of its own (Qwen3's
    '<think>\n...\n</think>\n\n'): what it writes is what the model learned to write. Else (a template that writes
    no `end` after it) up to the response's text. None where the template's generation prompt does not begin the
    conversation or the response is found neither after it nor before an `end`."""
    whole = tokenizer.apply_chat_template([*messages, {"role": "assistant", "content": text}], tokenize=False)
    if not whole.startswith(prompt_text):
        return None
    at = whole.rfind(end, len(prompt_text)) if end else -1
    # Where the text is found first: a short response may be found in the template's own text before it ('in' in
    # Qwen3's '<think>'), or not at all where the template rewrote it. Not after the turn end: that text is the
    # template's own (a blank response that Gemma's template trims, '\n', is in its '<end_of_turn>\n').
    stop = next((found + len(piece) for piece in (text, text.strip())
                 if 0 <= (found := whole.find(piece, len(prompt_text))) and (at < 0 or found <= at)), None)
    if at >= 0 and (stop is None or at >= stop):
        return whole[:at]
    return None if stop is None else whole[:stop]


def _response_ids(prompt_ids: list[int], text: str, in_context: str | None,
                  encode: Callable[[str], list[int]], origin: str = "") -> list[int]:
    """A response's ids (no EOS) as they follow the prompt in the templated conversation: the ids the model
    reads in training and writes when it answers. Tokenized on its own, a response can differ at its start
    (a SentencePiece tokenizer gives the text's first word a leading '▁' that it has not after the assistant
    marker); real responses would then differ from the model's own by that token, and SPIN would learn it.

    A response not found in the conversation (in_context None), or at a boundary where prompt and response tokens
    merge, is tokenized on its own (with a warning, once, naming its row: `origin`)."""
    if in_context is not None:
        ids = encode(in_context)
        if ids[: len(prompt_ids)] == prompt_ids:
            return ids[len(prompt_ids) :]
    _warn_tokenized_alone(origin)
    return encode(text)


_warned_alone: list[str] = []  # the row the one warning of a process named


def _warn_tokenized_alone(origin: str) -> None:
    if not _warned_alone:
        _warned_alone.append(origin)
        logger.warning("%s: the response does not follow the chat template's generation prompt in the templated "
                       "conversation (or their tokens merge): such responses are tokenized on their own",
                       origin or "an example")


CUT_PROMPT = ("always", "when_too_long")


def cut_response(ids: Sequence[int], budget: int, end: Sequence[int]) -> tuple[int, ...]:
    """A response (ending with `end`, response_end's ids: EOS, or a turn end's pieces) fitted to `budget` tokens; a
    cut one still ends with them, so the model still learns where answers stop."""
    ids, end = list(ids), list(end)
    return tuple(ids if len(ids) <= budget else [*ids[: max(budget - len(end), 0)], *end][:budget])


def keep_end(prompt: Sequence[int], max_prompt_length: int, bos: int | None = None) -> Sequence[int]:
    """A prompt's last max_prompt_length tokens; one that starts with BOS keeps it (then its last
    max_prompt_length - 1 tokens after it): the model never saw a sequence without it."""
    if len(prompt) <= max_prompt_length:
        return prompt
    if bos is not None and prompt[0] == bos and max_prompt_length > 1:
        return [bos, *prompt[len(prompt) - max_prompt_length + 1 :]]
    return prompt[-max_prompt_length:]


def fit_to_length(prompt: Sequence[int], responses: Sequence[Sequence[int]], *, max_length: int,
                  max_prompt_length: int, cut_prompt: str, end: Sequence[int], bos: int | None = None
                  ) -> tuple[tuple[int, ...], list[tuple[int, ...]]]:
    """A prompt and its responses ending with `end` (one, or a pair's two) cut so that the prompt and each response
    fit in max_length. A prompt keeps its end (the question often follows a long text), and its first token where
    that is `bos` (every sequence the model saw starts with it; the official code adds none, and cuts the same way).

    "always": the prompt keeps its last max_prompt_length tokens, and each response the room left, still ending
    with `end`. "when_too_long", the official SPIN code's rule (TRL's 2023 DPO collator): the prompt is cut only if
    it and the longer response exceed max_length; if they still do, each response keeps its first
    max_length - max_prompt_length tokens (a cut one loses its EOS there)."""
    if cut_prompt == "always":
        prompt = keep_end(prompt, max_prompt_length, bos)
        return tuple(prompt), [cut_response(r, max_length - len(prompt), end) for r in responses]
    if cut_prompt != "when_too_long":
        raise ValueError(f"cut_prompt: expected one of {CUT_PROMPT}, got {cut_prompt!r}")
    longest = max(len(r) for r in responses)
    if len(prompt) + longest > max_length:
        prompt = keep_end(prompt, max_prompt_length, bos)
    if len(prompt) + longest > max_length:
        responses = [r[: max_length - max_prompt_length] for r in responses]
    return tuple(prompt), [tuple(r) for r in responses]


PROBE_ANSWER = "Spin-fast probe answer."  # rendered to find what a template writes after an answer


def eos_token_id(tokenizer: Any) -> int:
    """The token every response ends with: the special (else added) token the chat template closes an assistant turn
    with (Gemma's <end_of_turn>, Llama 3's <|eot_id|>, Phi-3's <|end|>: what the model writes after an answer, which
    need not be tokenizer.eos), else the tokenizer's EOS; a tokenizer without one is an error."""
    if tokenizer.eos_token_id is None:
        raise ValueError("the tokenizer has no eos token: responses must end with one")
    return _turn_end_id(tokenizer) or tokenizer.eos_token_id


def _turn_end_id(tokenizer: Any) -> int | None:
    """The first special token the chat template writes after an assistant turn's content, else the first added one
    (some ChatML fine-tunes added '<|im_end|>' as a token that is not special); None: none found."""
    probe = _after_answer(tokenizer)
    if probe is None:
        return None
    ids = _encode(tokenizer, probe[1])
    added = tokenizer.added_tokens_decoder
    special = set(tokenizer.all_special_ids) | {i for i, t in added.items() if t.special}
    # A special token first (as before added ones counted), else an added one but whitespace: some tokenizers add
    # runs of spaces as tokens, which end nothing.
    found = next((i for i in ids if i in special), None)
    if found is None:
        found = next((i for i in ids if i in added and added[i].content.strip()), None)
    return found


def _after_answer(tokenizer: Any, answer: str = PROBE_ANSWER) -> tuple[str, str] | None:
    """A probe conversation cut after its assistant turn's content `answer`: (the text through the answer, what the
    chat template writes after it); None where the probe finds no answer."""
    try:
        whole = tokenizer.apply_chat_template([{"role": "user", "content": "Hi"},
                                               {"role": "assistant", "content": answer}], tokenize=False)
    except Exception:  # noqa: BLE001 - a template that refuses the probe: the tokenizer's EOS
        return None
    at = whole.find(answer)
    return None if at < 0 else (whole[: at + len(answer)], whole[at + len(answer):])


def turn_end_text(tokenizer: Any) -> str | None:
    """The text the chat template ends an assistant turn with where no token of its own holds it ('<|im_end|>' as
    plain text, which the tokenizer splits into pieces): generation stops at it, and responses end with its pieces
    (response_end). None where a token ends the turn (eos_token_id), or the template writes nothing after it."""
    if _turn_end_id(tokenizer) is not None:
        return None
    probe = _after_answer(tokenizer)
    return probe[1].strip() or None if probe else None


def response_end(tokenizer: Any) -> tuple[int, ...]:
    """The ids every response ends with: eos_token_id's token, or where the turn end is text split into pieces
    (turn_end_text), those pieces as the template's conversation holds them after an answer, which the model writes
    there (the EOS after them would be a token it never writes)."""
    text = turn_end_text(tokenizer)
    if text is None:
        return (eos_token_id(tokenizer),)
    # Where they merge with the probe answer's last token ('.<|'), those after an answer ending otherwise; the
    # text's own encoding last: a SentencePiece tokenizer starts it with '▁', a space the template never writes.
    probes = (PROBE_ANSWER, PROBE_ANSWER.rstrip("."), f"{PROBE_ANSWER}\n")
    found = (_pieces_after(tokenizer, answer, text) for answer in probes)
    return next((pieces for pieces in found if pieces), None) or tuple(_encode(tokenizer, text))


def _pieces_after(tokenizer: Any, answer: str, text: str) -> tuple[int, ...] | None:
    """The ids of the turn end `text` after the probe `answer` in the template's conversation; None where the
    template rewrites that answer, or the turn end's first piece merges with the answer's last token."""
    probe = _after_answer(tokenizer, answer)
    if probe is None or text not in probe[1]:
        return None
    whole, at = probe[0] + probe[1], len(probe[0]) + probe[1].index(text)
    before, through = _encode(tokenizer, whole[:at]), _encode(tokenizer, whole[: at + len(text)])
    return tuple(through[len(before):]) if through[: len(before)] == before else None


def tokenize_example(tokenizer: Any, example: Example, *, max_length: int, max_prompt_length: int,
                     cut_prompt: str = "always") -> TokenizedExample:
    """Prompt ids (render_prompt's) and EOS-ended response ids as they follow the prompt in the templated
    conversation, fitted to max_length by the `cut_prompt` rule (fit_to_length)."""
    return tokenize_batch(tokenizer, [example], max_length=max_length, max_prompt_length=max_prompt_length,
                          cut_prompt=cut_prompt)[0]


def check_lengths(tokenizer: Any, *, max_length: int, max_prompt_length: int, cut_prompt: str = "always"
                  ) -> tuple[int, ...]:
    """The ids every response ends with (response_end), where the data settings leave them room; else the settings
    are refused, naming them (not a data row: tokenize_examples checks them before any row)."""
    if max_prompt_length < 1 or max_length < 1 or max_prompt_length >= max_length:
        raise ValueError(f"expected 1 <= data.max_prompt_length < data.max_length, got data.max_prompt_length="
                         f"{max_prompt_length}, data.max_length={max_length}")
    end = response_end(tokenizer)  # EOS's id, or a turn end text's pieces
    # "always" leaves a response after a long prompt max_length - max_prompt_length tokens: fewer than the end's
    # pieces would end it with part of them, which training would teach as the way answers end.
    if cut_prompt == "always" and max_length - max_prompt_length < len(end):
        end_text = turn_end_text(tokenizer) or tokenizer.convert_ids_to_tokens(end[0])
        raise ValueError(f"data.max_length - data.max_prompt_length ({max_length - max_prompt_length}) leaves a cut "
                         f"response no room for the {len(end)} tokens every response ends with ({end_text!r}): "
                         f"expected data.max_prompt_length <= {max_length - len(end)}")
    return end


def tokenize_batch(tokenizer: Any, examples: Sequence[Example], *, max_length: int, max_prompt_length: int,
                   cut_prompt: str = "always") -> list[TokenizedExample]:
    """tokenize_example of each example, their texts encoded in one call to the tokenizer."""
    end = check_lengths(tokenizer, max_length=max_length, max_prompt_length=max_prompt_length, cut_prompt=cut_prompt)
    end_text = turn_end_text(tokenizer) or tokenizer.convert_ids_to_tokens(end[0])
    rendered = [_render(tokenizer, example, end_text) for example in examples]
    encode = _encoder(tokenizer, [text for r in rendered for text in r.texts()])
    adds_bos = _adds_bos(tokenizer)  # once, not a call to the tokenizer per example (zephyr's template has no BOS)
    tokenized = []
    for r, source in zip(rendered, examples):
        prompt_ids, model_prompt = _prompt_ids(tokenizer, r.prompt, encode, adds_bos)
        responses = [(*_response_ids(prompt_ids, text, in_context, encode, source.origin), *end)
                     for text, in_context in r.responses]
        whole = TokenizedExample(tuple(model_prompt), responses[0], responses[1] if len(responses) > 1 else None)
        prompt, fitted = fit_to_length(whole.prompt_ids, responses, max_length=max_length,
                                       max_prompt_length=max_prompt_length, cut_prompt=cut_prompt, end=end,
                                       bos=tokenizer.bos_token_id)
        example = TokenizedExample(prompt, fitted[0], fitted[1] if len(fitted) > 1 else None)
        # Under "always", a pair fits from the fitted example as from the whole one: no need to keep it.
        tokenized.append(example if cut_prompt == "always" or example == whole else replace(example, unfitted=whole))
    return tokenized

"""spin_fast.data and spin_fast.tokenizer: loading SFT sets from real files, validation, tokenization."""

from __future__ import annotations

import json
import logging
import subprocess
import sys

import datasets
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
from transformers import AutoModelForCausalLM, AutoTokenizer, GenerationConfig, LlamaConfig, PreTrainedTokenizerFast

from helpers import official_spin_fit
from spin_fast import data as data_module
from spin_fast.config import DataConfig, RunConfig
from spin_fast.config import GenerationConfig as GenerationSettings
from spin_fast.data import (
    CUT_PROMPT,
    DataError,
    Example,
    eos_token_id,
    fit_to_length,
    load_examples,
    render_prompt,
    tokenize_batch,
    tokenize_example,
)
from spin_fast.examples import answered_pairs, read_examples, tokenize_examples
from spin_fast.generation import Completion, SamplingConfig
from spin_fast.generation.choice import default_engine
from spin_fast.tokenizer import DEFAULT_CORPUS, build_local_tokenizer


@pytest.fixture(scope="module")
def tokenizer():
    return build_local_tokenizer()


def user(text):
    return {"role": "user", "content": text}


def assistant(text):
    return {"role": "assistant", "content": text}


def system(text):
    return {"role": "system", "content": text}


CHAT = [system("Be brief."), user("Hi"), assistant("Hello!"), user("Why is the sky blue?"), assistant("Scattering.")]


def write_jsonl(path, rows):
    path.write_text("".join(json.dumps(row) + "\n" for row in rows))
    return path


# ----------------------------------------------------------------------------------------------- formats


def test_messages_jsonl_default_takes_first_assistant_turn(tmp_path):
    path = write_jsonl(tmp_path / "train.jsonl", [{"messages": CHAT, "prompt_id": "a"}, {"messages": CHAT[1:3]}])
    result = load_examples(path)
    assert result.skipped == 0
    first, second = result.examples
    assert first == Example((system("Be brief."), user("Hi")), "Hello!", None, origin=f"{path} line 1")
    assert second.prompt == (user("Hi"),) and second.response == "Hello!" and second.origin == f"{path} line 2"


def test_messages_keep_history_takes_last_assistant_turn(tmp_path):
    path = write_jsonl(tmp_path / "train.jsonl", [{"messages": CHAT}])
    (example,) = load_examples(path, keep_history=True).examples
    assert example.prompt == tuple(CHAT[:-1]) and example.response == "Scattering."


def test_extra_message_keys_are_dropped(tmp_path):
    path = write_jsonl(tmp_path / "t.jsonl", [{"messages": [{**user("Hi"), "name": "x"}, assistant("Yo")]}])
    assert load_examples(path).examples[0].prompt == (user("Hi"),)


def test_prompt_response_json_list_and_data_wrapper(tmp_path):
    rows = [{"prompt": "What is 2+2?", "response": "4"}, {"prompt": "Name a colour.", "response": "Blue."}]
    (tmp_path / "list.json").write_text(json.dumps(rows))
    (tmp_path / "wrapped.json").write_text(json.dumps({"data": rows}))
    for name in ("list.json", "wrapped.json"):
        result = load_examples(tmp_path / name)
        assert [e.prompt for e in result.examples] == [(user("What is 2+2?"),), (user("Name a colour."),)]
        assert [e.response for e in result.examples] == ["4", "Blue."]


def spin_row(prompt, real, generated):
    return {"real": [user(prompt), assistant(real)], "generated": [user(prompt), assistant(generated)]}


def test_spin_pairs_parquet(tmp_path):
    rows = [spin_row("Tell a joke.", "Why did the chicken...", "I am a model."), spin_row("Hi", "Hello!", "")]
    pq.write_table(pa.Table.from_pylist(rows), tmp_path / "pairs.parquet")
    result = load_examples(tmp_path / "pairs.parquet")
    assert [(e.prompt, e.response, e.generated) for e in result.examples] == [
        ((user("Tell a joke."),), "Why did the chicken...", "I am a model."),
        ((user("Hi"),), "Hello!", ""),  # an empty generation is a legitimate model output
    ]


def test_spin_pairs_multi_turn_prompt(tmp_path):
    history = [user("Hi"), assistant("Hello!"), user("And?")]
    row = {"real": [*history, assistant("Real.")], "generated": [*history, assistant("Fake.")]}
    (example,) = load_examples(write_jsonl(tmp_path / "p.jsonl", [row])).examples
    assert example.prompt == tuple(history) and example.response == "Real." and example.generated == "Fake."


def test_directory_of_mixed_files_in_sorted_order(tmp_path):
    write_jsonl(tmp_path / "a.jsonl", [{"prompt": "p0", "response": "r0"}])
    (tmp_path / "b.json").write_text(json.dumps([{"prompt": "p1", "response": "r1"}]))
    pq.write_table(pa.Table.from_pylist([{"prompt": "p2", "response": "r2"}]), tmp_path / "c.parquet")
    (tmp_path / "notes.txt").write_text("ignored")
    result = load_examples(tmp_path)
    assert [e.response for e in result.examples] == ["r0", "r1", "r2"]
    assert result.examples[2].origin == f"{tmp_path / 'c.parquet'} row 0"


def test_a_limit_reads_no_row_past_the_last_example_it_takes(tmp_path):
    """The first `limit` examples of a large source (data.max_prompts): no row after the last of them is read, so a
    broken one there goes unnoticed, and a bad row skipped before it does not count towards the limit."""
    rows = [{"prompt": "p0", "response": "r0"}, {"prompt": "p1"}, {"prompt": "p2", "response": "r2"},
            {"prompt": "p3", "response": "r3"}]
    folder = tmp_path / "source"
    folder.mkdir()
    (folder / "a.jsonl").write_text("".join(json.dumps(row) + "\n" for row in rows) + "{not json\n")
    write_jsonl(folder / "b.jsonl", [spin_row("Hi", "Hello!", "Yo.")])  # pairs after SFT rows: an error once read
    for limit, responses in ((2, ["r0", "r2"]), (3, ["r0", "r2", "r3"])):
        result = load_examples(folder, skip_invalid=True, limit=limit)
        assert [e.response for e in result.examples] == responses and result.skipped == 1
    with pytest.raises(DataError, match=r"b\.jsonl: spin_pairs rows, but .*a\.jsonl has prompt_response rows"):
        load_examples(folder, skip_invalid=True)
    with pytest.raises(DataError, match=r"a\.jsonl line 2: field 'response': missing"):
        load_examples(folder, limit=2)
    with pytest.raises(ValueError, match="limit: expected a number of examples >= 1"):
        load_examples(folder, limit=0)

    table = [{"prompt": f"p{i}", "response": f"r{i}" if i != 5 else None} for i in range(8)]
    pq.write_table(pa.Table.from_pylist(table), tmp_path / "t.parquet", row_group_size=2)
    assert [e.response for e in load_examples(tmp_path / "t.parquet", limit=5).examples] == [f"r{i}" for i in range(5)]
    with pytest.raises(DataError, match=r"t\.parquet row 5: field 'response': expected a string, got None"):
        load_examples(tmp_path / "t.parquet")


def test_a_file_that_is_no_parquet_is_named(tmp_path):
    pq.write_table(pa.Table.from_pylist([{"prompt": "p", "response": "r"}] * 3), tmp_path / "t.parquet")
    whole = (tmp_path / "t.parquet").read_bytes()
    (tmp_path / "t.parquet").write_bytes(whole[: len(whole) // 2])  # cut off: an interrupted download
    with pytest.raises(DataError, match=r"t\.parquet: not a readable parquet file: "):
        load_examples(tmp_path / "t.parquet")
    (tmp_path / "t.parquet").write_text('{"prompt": "p", "response": "r"}\n')
    with pytest.raises(DataError, match=r"t\.parquet: not a readable parquet file"):
        load_examples(tmp_path)

    rows = [{"prompt": f"p{i}", "response": f"r{i}"} for i in range(4000)]
    pq.write_table(pa.Table.from_pylist(rows), tmp_path / "t.parquet", row_group_size=1000)
    third = pq.ParquetFile(tmp_path / "t.parquet").metadata.row_group(2).column(0)
    start = third.dictionary_page_offset or third.data_page_offset
    damaged = bytearray((tmp_path / "t.parquet").read_bytes())
    damaged[start:start + 16] = b"\xff" * 16  # the third row group's first page header: a bad disk or copy
    (tmp_path / "t.parquet").write_bytes(damaged)
    assert len(load_examples(tmp_path / "t.parquet", limit=1024).examples) == 1024
    with pytest.raises(DataError, match=r"t\.parquet: a damaged parquet file: "):
        load_examples(tmp_path / "t.parquet")


def test_auto_detection_and_forced_schema(tmp_path):
    both = {"messages": [user("Q"), assistant("from messages")], "prompt": "Q", "response": "from columns"}
    path = write_jsonl(tmp_path / "t.jsonl", [both])
    assert load_examples(path).examples[0].response == "from messages"  # UltraChat also has a 'prompt' column
    assert load_examples(path, schema="prompt_response").examples[0].response == "from columns"
    with pytest.raises(DataError, match=r"t\.jsonl line 1: cannot detect the schema from \['question'\]"):
        load_examples(write_jsonl(tmp_path / "t.jsonl", [{"question": "Q"}]))
    with pytest.raises(ValueError, match="schema: expected"):
        load_examples(path, schema="alpaca")


def test_other_sources_go_to_datasets_lazily(tmp_path, monkeypatch):
    calls = []

    def fake_load_dataset(name, split):
        calls.append((name, split))
        if name == "org/sft":
            return datasets.Dataset.from_list([{"messages": [user("Q"), assistant("A")]}])
        raise FileNotFoundError("not on the hub")

    monkeypatch.setattr(datasets, "load_dataset", fake_load_dataset)
    result = load_examples("org/sft", split="train_sft")
    assert calls == [("org/sft", "train_sft")] and result.examples[0].origin == "org/sft row 0"
    with pytest.raises(DataError, match=r"org/missing: not a local path .*not on the hub"):
        load_examples("org/missing")
    calls.clear()
    (tmp_path / "data.csv").write_text("a,b\n")
    with pytest.raises(DataError, match=r"data\.csv: a file of unknown type \.csv: expected \.jsonl, \.json"):
        load_examples(tmp_path / "data.csv")
    with pytest.raises(FileNotFoundError, match="missing.jsonl"):
        load_examples(tmp_path / "missing.jsonl")
    assert calls == []  # a local-looking path never reaches the Hub


# ------------------------------------------------------------------------------------------------ bad rows

GOOD = {"messages": [user("Q"), assistant("A")]}
GOOD_ROWS = {"messages": GOOD, "prompt_response": {"prompt": "Q", "response": "A"},
             "spin_pairs": spin_row("Q", "A", "B")}
BAD_ROWS = [
    ({"text": "hi"}, "messages", r"field 'messages': missing"),
    ({"messages": "hi"}, "messages", r"field 'messages': expected a list of \{role, content\} dicts, got str"),
    ({"messages": [user("Q"), "A"]}, "messages", r"field 'messages\[1\]': expected a \{role, content\} dict, got str"),
    ({"messages": [{"role": "bot", "content": "A"}]}, "messages", r"field 'messages\[0\].role': expected one of"),
    ({"messages": [user("Q"), {"role": "assistant", "content": None}]}, "messages",
     r"field 'messages\[1\].content': expected a string, got None"),
    ({"messages": [user("Q"), assistant("  \n")]}, "messages", r"field 'messages\[1\].content': expected a non-empty"),
    ({"messages": [user("Q"), assistant("")]}, "messages", r"field 'messages\[1\].content': expected a non-empty"),
    ({"messages": [user("Q")]}, "messages", r"field 'messages': expected an assistant turn"),
    ({"messages": [system("S"), assistant("A")]}, "messages", r"field 'messages': expected a user turn"),
    ({"messages": [user(""), assistant("A")]}, "messages", r"field 'messages\[0\].content': expected a non-empty"),
    ({"messages": [user("Q"), assistant("A"), user(" "), assistant("B")]}, "messages",
     r"field 'messages\[2\].content': expected a non-empty"),  # with keep_history (below), the last question
    (["not", "an", "object"], "messages", r"expected an object with the messages fields, got list"),
    ({"prompt": "Q"}, "prompt_response", r"field 'response': missing"),
    ({"prompt": 3, "response": "A"}, "prompt_response", r"field 'prompt': expected a string, got int"),
    ({"prompt": " ", "response": "A"}, "prompt_response", r"field 'prompt': expected a non-empty string"),
    ({"prompt": "Q", "response": "\t"}, "prompt_response", r"field 'response': expected a non-empty string"),
    ({"real": [user("Q"), assistant("A")]}, "spin_pairs", r"field 'generated': missing"),
    ({"real": [user("Q")], "generated": [user("Q"), assistant("B")]}, "spin_pairs",
     r"field 'real': expected the last turn to be the assistant's"),
    ({"real": [assistant("A")], "generated": [assistant("B")]}, "spin_pairs", r"field 'real': expected a user turn"),
    ({"real": [user(""), assistant("A")], "generated": [user(""), assistant("B")]}, "spin_pairs",
     r"field 'real\[0\].content': expected a non-empty"),
    ({"real": [user("Q"), assistant(" ")], "generated": [user("Q"), assistant("B")]}, "spin_pairs",
     r"field 'real\[1\].content': expected a non-empty"),
    ({"real": [user("Q"), assistant("A")], "generated": [user("Other"), assistant("B")]}, "spin_pairs",
     r"field 'generated': expected the same prompt as 'real'"),
]


@pytest.mark.parametrize("row, schema, message", BAD_ROWS)
def test_bad_row_names_file_row_and_field(tmp_path, row, schema, message):
    (tmp_path / "data").mkdir()
    path = write_jsonl(tmp_path / "data" / "train.jsonl", [GOOD_ROWS[schema]] * 2 + [row])
    with pytest.raises(DataError, match=rf"data/train\.jsonl line 3: {message}"):
        load_examples(path, schema=schema, keep_history=True)
    result = load_examples(path, schema=schema, skip_invalid=True, keep_history=True)
    assert result.skipped == 1 and len(result.examples) == 2


def test_a_conversation_that_opens_with_a_greeting_points_to_keep_history(tmp_path):
    row = {"messages": [assistant("Hello! How can I help?"), user("Q"), assistant("A")]}
    path = write_jsonl(tmp_path / "t.jsonl", [GOOD, row])
    with pytest.raises(DataError, match=r"t\.jsonl line 2: field 'messages': expected a user turn before the first "
                                        r"assistant turn \(messages\[0\]\), found none; data.keep_history=true"):
        load_examples(path)
    example = load_examples(path, keep_history=True).examples[1]
    assert (len(example.prompt), example.response) == (2, "A")


def test_invalid_json_line_is_a_bad_row(tmp_path):
    path = tmp_path / "t.jsonl"
    path.write_text(json.dumps(GOOD) + "\n\n{oops\n")
    with pytest.raises(DataError, match=r"t\.jsonl line 3: expected a JSON object, got invalid JSON"):
        load_examples(path)
    assert load_examples(path, skip_invalid=True).skipped == 1


def test_invalid_json_names_the_character_of_its_line_not_another_line(tmp_path):
    # json's own "line 1 column 9" (or "line 2" for a line cut short, its newline included) would contradict line 2
    path = tmp_path / "t.jsonl"
    path.write_text(json.dumps(GOOD) + '\n{"a": 1,, }\n' + '{"messages": [1\n')
    with pytest.raises(DataError, match=r"t\.jsonl line 2: .*invalid JSON \(Expecting property name enclosed in "
                                        r"double quotes at character 8\)$"):
        load_examples(path)
    path.write_text(json.dumps(GOOD) + '\n{"messages": [1\n')
    with pytest.raises(DataError, match=r"t\.jsonl line 2: .*invalid JSON \(Expecting ',' delimiter at character 15, "
                                        r"the line's end\)$"):
        load_examples(path)


def test_skip_invalid_counts_and_logs(tmp_path, caplog):
    rows = [GOOD, {"messages": [user("Q")]}, GOOD, {"messages": "x"}, {"messages": [user("Q"), assistant(" ")]}]
    path = write_jsonl(tmp_path / "t.jsonl", rows)
    with caplog.at_level(logging.WARNING, logger="spin_fast.data"):
        result = load_examples(path, skip_invalid=True)
    assert result.skipped == 3 and [e.origin for e in result.examples] == [f"{path} line 1", f"{path} line 3"]
    messages = [r.getMessage() for r in caplog.records]
    assert any("t.jsonl line 2: field 'messages': expected an assistant turn" in m for m in messages)
    assert any("t.jsonl line 4: field 'messages'" in m for m in messages)
    assert any("skipped 3 invalid rows, kept 2" in m for m in messages)


def test_rows_that_repeat_an_earlier_row_are_kept_and_said(tmp_path, caplog):
    other = {"messages": [user("Q2"), assistant("A2")]}
    same_prompt = {"messages": [user("Q"), assistant("another answer")]}  # one prompt, two answers: no repeat
    path = write_jsonl(tmp_path / "t.jsonl", [GOOD, other, same_prompt, GOOD, other, GOOD])
    with caplog.at_level(logging.WARNING, logger="spin_fast.data"):
        assert len(load_examples(path).examples) == 6
    assert caplog.messages == [f"{path}: 3 rows repeat an earlier row's prompt and response, and are kept (the "
                               f"first: {path} line 4 repeats {path} line 1)"]
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="spin_fast.data"):
        load_examples(path, limit=3)
    assert not caplog.messages


def test_skip_invalid_skips_leading_rows_whose_schema_cannot_be_told(tmp_path):
    """The file's first object row names its schema; under skip_invalid, the first whose schema can be told: rows
    before it are bad rows like any other."""
    path = write_jsonl(tmp_path / "t.jsonl", [{"prompt": "Hi?"}, ["a", "list"], GOOD, {"answer": "x"}, GOOD])
    with pytest.raises(DataError, match=r"t\.jsonl line 1: cannot detect the schema from \['prompt'\]; .* set "
                                        r"data\.schema"):
        load_examples(path)
    result = load_examples(path, skip_invalid=True)
    assert result.skipped == 3 and [e.origin for e in result.examples] == [f"{path} line 3", f"{path} line 5"]


def test_empty_or_all_invalid_file_is_an_error(tmp_path):
    (tmp_path / "empty.jsonl").write_text("\n")
    with pytest.raises(DataError, match=r"empty\.jsonl: no rows"):
        load_examples(tmp_path / "empty.jsonl")
    (tmp_path / "empty.json").write_text("[]")
    with pytest.raises(DataError, match=r"empty\.json: no rows"):
        load_examples(tmp_path / "empty.json")
    path = write_jsonl(tmp_path / "bad.jsonl", [{"messages": [user("Q")]}] * 3)
    with pytest.raises(DataError, match=r"bad\.jsonl: all 3 rows are invalid"):
        load_examples(path, skip_invalid=True)
    (tmp_path / "scalar.json").write_text('{"rows": []}')
    with pytest.raises(DataError, match=r"scalar\.json: expected a list of objects"):
        load_examples(tmp_path / "scalar.json")
    (tmp_path / "nothing").mkdir()
    with pytest.raises(DataError, match=r"nothing: directory has no"):
        load_examples(tmp_path / "nothing")


def test_non_utf8_line_is_a_bad_row_and_a_bom_is_ignored(tmp_path):
    good = json.dumps(GOOD).encode()
    path = tmp_path / "t.jsonl"
    path.write_bytes(b"\xef\xbb\xbf" + good + b"\n" + good.replace(b'"Q"', b'"caf\xe9"') + b"\n" + good + b"\n")
    with pytest.raises(DataError, match=r"t\.jsonl line 2: expected UTF-8 text, got byte 0xe9 at character \d+"):
        load_examples(path)
    result = load_examples(path, skip_invalid=True)  # the BOM does not spoil line 1
    assert result.skipped == 1 and [e.origin for e in result.examples] == [f"{path} line 1", f"{path} line 3"]
    (tmp_path / "bom.json").write_bytes(b"\xef\xbb\xbf" + json.dumps([GOOD]).encode())
    assert len(load_examples(tmp_path / "bom.json").examples) == 1
    (tmp_path / "latin1.json").write_bytes(json.dumps([GOOD]).replace('"Q"', '"caf\\u00e9"').encode()
                                           .replace(b"\\u00e9", b"\xe9"))
    with pytest.raises(DataError, match=r"latin1\.json: expected UTF-8 text"):
        load_examples(tmp_path / "latin1.json")


def test_multi_line_json_in_a_jsonl_file_names_row_and_suggests_json(tmp_path):
    path = tmp_path / "t.jsonl"
    path.write_text(json.dumps([GOOD, GOOD], indent=2))
    rename = r"the file as a whole is one JSON document: rename it to t\.json$"
    with pytest.raises(DataError, match=rf"^{path} line 1: expected a JSON object, got invalid JSON \(.*\); {rename}"):
        load_examples(path)
    with pytest.raises(DataError, match=rf"t\.jsonl line 1: .*; {rename}"):
        load_examples(path, skip_invalid=True)  # no row is an object: there is no schema to read the file with
    with pytest.raises(DataError, match=rf"t\.jsonl line 1: .*; {rename}"):
        load_examples(path, schema="messages")
    with pytest.raises(DataError, match=rf"t\.jsonl: all \d+ rows are invalid .*the first: line 1: .*; {rename}"):
        load_examples(path, schema="messages", skip_invalid=True)
    path.write_text("{oops\n" + json.dumps(GOOD) + "\n")  # not one JSON document: no hint
    with pytest.raises(DataError, match=r"t\.jsonl line 1: expected a JSON object, got invalid JSON") as raised:
        load_examples(path)
    assert "rename" not in str(raised.value)
    (tmp_path / "lines.json").write_text(json.dumps(GOOD) + "\n" + json.dumps(GOOD) + "\n")
    with pytest.raises(DataError, match=r"lines\.json: invalid JSON: Extra data.*rename it to \.jsonl"):
        load_examples(tmp_path / "lines.json")


def test_hidden_files_and_folders_in_a_directory_are_ignored(tmp_path, caplog):
    write_jsonl(tmp_path / "a.jsonl", [{"prompt": "p", "response": "r"}])
    for hidden in (".ipynb_checkpoints/a-checkpoint.jsonl", ".cache/sub/a.jsonl", ".a.jsonl"):
        (tmp_path / hidden).parent.mkdir(parents=True, exist_ok=True)
        write_jsonl(tmp_path / hidden, [{"prompt": "p", "response": "r"}])
    with caplog.at_level(logging.INFO, logger="spin_fast.data"):
        assert [e.origin for e in load_examples(tmp_path).examples] == [f"{tmp_path / 'a.jsonl'} line 1"]
    assert any("ignored 3 data files in hidden files or folders" in r.getMessage() for r in caplog.records)
    assert len(load_examples(tmp_path / ".a.jsonl").examples) == 1  # a file named directly is read
    (tmp_path / "a.jsonl").unlink()
    with pytest.raises(DataError, match=r"directory has no .* files \(besides 3 in hidden files or folders\)"):
        load_examples(tmp_path)


def test_files_a_directory_holds_of_no_data_type_are_named_not_silently_left(tmp_path, caplog):
    """A .jsonl.gz or .csv beside the data is read by no reader: the load says how many files it left and names one
    (hidden ones, such as .gitattributes, are not counted)."""
    write_jsonl(tmp_path / "a.jsonl", [{"prompt": "p", "response": "r"}])
    for other in ("b.jsonl.gz", "c.csv", "README.md", ".gitattributes", ".cache/x.lock"):
        (tmp_path / other).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / other).write_text("x")
    with caplog.at_level(logging.INFO, logger="spin_fast.data"):
        assert len(load_examples(tmp_path).examples) == 1
    assert any(r.getMessage() == f"{tmp_path}: ignored 3 files of other types than .jsonl, .json, .parquet, such as "
               "README.md" for r in caplog.records), [r.getMessage() for r in caplog.records]


def test_directory_detects_the_schema_of_each_file(tmp_path):
    write_jsonl(tmp_path / "a.jsonl", [{"prompt": "Q", "response": "from columns"}])
    write_jsonl(tmp_path / "b.jsonl", [GOOD, {"messages": [user("Q2"), assistant("from messages")]}])
    result = load_examples(tmp_path)
    assert [(e.prompt, e.response) for e in result.examples] == [
        ((user("Q"),), "from columns"), ((user("Q"),), "A"), ((user("Q2"),), "from messages")]
    write_jsonl(tmp_path / "b.jsonl", [GOOD, {"prompt": "Q", "response": "A"}])  # a file keeps its first schema
    with pytest.raises(DataError, match=r"b\.jsonl line 2: field 'messages': missing \(a prompt_response row among "
                                        r"messages rows: one file holds one format\)$"):
        load_examples(tmp_path)
    with pytest.raises(DataError, match=r"b\.jsonl line 1: field 'prompt': missing \(a messages row, but "
                                        r"data.schema is prompt_response\)"):
        load_examples(tmp_path, schema="prompt_response")  # a forced schema holds for every file
    write_jsonl(tmp_path / "b.jsonl", [spin_row("Q", "A", "B")])
    with pytest.raises(DataError, match=r"b\.jsonl: spin_pairs rows, but .*a\.jsonl has prompt_response rows: "
                                        r"one source holds either SPIN pairs .* or SFT examples"):
        load_examples(tmp_path)


def test_json_object_in_a_directory_names_the_file_and_says_it_holds_no_rows(tmp_path):
    write_jsonl(tmp_path / "train.jsonl", [GOOD])
    info = tmp_path / "dataset_info.json"
    info.write_text(json.dumps({"description": "my dataset", "license": "mit"}))
    no_rows = r"dataset_info\.json: expected a list of objects .*, got a JSON object \(keys \['description', " \
              r"'license'\]\), not a list of rows"
    with pytest.raises(DataError, match=rf"{no_rows}; move it out of the data folder, or name the data file"):
        load_examples(tmp_path)
    # Every .json file is parsed before any row of the others: the metadata file, not a bad row before it, is named.
    (tmp_path / "a.jsonl").write_text('{"messages": []}\n')
    with pytest.raises(DataError, match=rf"{no_rows}; move it out"):
        load_examples(tmp_path)
    with pytest.raises(DataError, match=rf"{no_rows}$") as raised:
        load_examples(info)
    assert type(raised.value) is DataError


# ---------------------------------------------------------------------------------------------- tokenizer


def test_tokenizer_round_trip_and_special_tokens(tokenizer, tmp_path):
    text = "Why is the sky blue? Ünïcødé & emoji 🙂 work too."
    ids = tokenizer.encode(text, add_special_tokens=False)
    assert tokenizer.decode(ids) == text
    assert len({tokenizer.bos_token_id, tokenizer.eos_token_id, tokenizer.pad_token_id}) == 3
    tokenizer.save_pretrained(tmp_path)
    reloaded = AutoTokenizer.from_pretrained(tmp_path)
    assert reloaded.encode(text, add_special_tokens=False) == ids
    assert render_prompt(reloaded, CHAT[:2]) == render_prompt(tokenizer, CHAT[:2])
    assert reloaded.eos_token_id == tokenizer.eos_token_id


def test_tokenizer_is_deterministic_across_processes(tokenizer):
    code = ("from spin_fast.tokenizer import build_local_tokenizer as b; "
            "print(b().backend_tokenizer.to_str())")
    other = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert json.loads(other) == json.loads(tokenizer.backend_tokenizer.to_str())
    corpus = ["alpha beta gamma"] * 5 + ["delta epsilon"] * 3
    assert build_local_tokenizer(corpus, 300).encode("alpha delta") == build_local_tokenizer(corpus, 300).encode(
        "alpha delta")


def test_chat_template_ends_assistant_turns_with_eos(tokenizer):
    text = tokenizer.apply_chat_template(CHAT, tokenize=False)
    assert text.count(tokenizer.eos_token) == 2
    assert "Hello!" + tokenizer.eos_token in text and "Scattering." + tokenizer.eos_token in text
    assert text.startswith(tokenizer.bos_token + "<|system|>")
    with pytest.raises(Exception, match="unknown role"):
        tokenizer.apply_chat_template([{"role": "tool", "content": "x"}], tokenize=False)


def test_the_smallest_vocabulary_is_the_bytes_and_the_special_tokens():
    from spin_fast.tokenizer import SPECIAL_TOKENS, build_local_tokenizer

    assert len(SPECIAL_TOKENS) == 6  # bos, eos, pad and the three role markers
    assert len(build_local_tokenizer(["ab ab"], vocab_size=256 + 6)) == 262  # no merges: still a tokenizer
    with pytest.raises(ValueError, match="vocab_size must be at least 262 .* got 261"):
        build_local_tokenizer(["ab ab"], vocab_size=261)


def test_render_prompt_matches_template_and_ends_with_assistant_marker(tokenizer):
    prompt = CHAT[:4]
    ids = render_prompt(tokenizer, tuple(prompt))
    assert isinstance(ids, list) and all(type(i) is int for i in ids)
    expected = tokenizer.apply_chat_template(prompt, add_generation_prompt=True, tokenize=True)
    expected = expected["input_ids"] if hasattr(expected, "keys") else expected
    assert ids == list(expected)
    marker = tokenizer.encode("<|assistant|>\n", add_special_tokens=False)
    assert ids[-len(marker):] == marker
    assert tokenizer.decode(ids).endswith("Why is the sky blue?\n<|assistant|>\n")


# ------------------------------------------------------------------------------------------- tokenization


def test_tokenize_example_appends_eos_to_each_response(tokenizer):
    example = Example((user("Hi"),), "Hello there.", "Go away.")
    out = tokenize_example(tokenizer, example, max_length=512, max_prompt_length=256)
    eos = tokenizer.eos_token_id
    assert out.prompt_ids == tuple(render_prompt(tokenizer, example.prompt))
    assert out.response_ids == (*tokenizer.encode("Hello there.", add_special_tokens=False), eos)
    assert out.generated_ids == (*tokenizer.encode("Go away.", add_special_tokens=False), eos)
    # Prompt + response decode to the same text the template gives the whole conversation.
    full = tokenizer.apply_chat_template([user("Hi"), assistant("Hello there.")], tokenize=False)
    assert full.startswith(tokenizer.decode(out.prompt_ids + out.response_ids))
    assert tokenize_example(tokenizer, Example((user("Hi"),), "A"), max_length=9, max_prompt_length=8).generated_ids \
        is None


# Chat templates of two layouts: zephyr's (no BOS; the response right after the assistant marker's newline) and
# Llama 2's (BOS in the template; the response stripped, after a space).
ZEPHYR_LIKE = ("{% for m in messages %}{{ '<|' + m['role'] + '|>\\n' + m['content'] + eos_token + '\\n' }}{% endfor %}"
               "{% if add_generation_prompt %}{{ '<|assistant|>\\n' }}{% endif %}")
LLAMA2_LIKE = ("{% for m in messages %}{% if m['role'] == 'user' %}"
               "{{ bos_token + '[INST] ' + m['content'] + ' [/INST]' }}"
               "{% else %}{{ ' ' + m['content'].strip() + ' ' + eos_token }}{% endif %}{% endfor %}")
MERGING = ZEPHYR_LIKE.replace("'<|assistant|>\\n'", "'<|assistant|>'")  # the prompt's last token merges with the next


def sentencepiece_tokenizer(chat_template: str, lines=()) -> PreTrainedTokenizerFast:
    """Mistral's tokenizer layout, trained locally: a Metaspace pre-tokenizer (a text's first word gets a leading
    '▁', as after a space) and BOS added by the tokenizer itself. lines: training text beside its corpus."""
    bpe = Tokenizer(models.BPE(unk_token="<unk>"))
    bpe.pre_tokenizer = pre_tokenizers.Metaspace(replacement="▁", prepend_scheme="first")
    bpe.decoder = decoders.Metaspace(replacement="▁", prepend_scheme="first")
    trainer = trainers.BpeTrainer(vocab_size=400, special_tokens=["<unk>", "<s>", "</s>"], show_progress=False)
    bpe.train_from_iterator([*DEFAULT_CORPUS, "<|user|>\n<|assistant|>\n[INST] [/INST]", *lines], trainer=trainer)
    bos = ("<s>", bpe.token_to_id("<s>"))
    bpe.post_processor = processors.TemplateProcessing(single="<s> $A", special_tokens=[bos])
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=bpe, bos_token="<s>", eos_token="</s>", unk_token="<unk>")
    tokenizer.chat_template = chat_template
    return tokenizer


@pytest.mark.parametrize("template", [ZEPHYR_LIKE, LLAMA2_LIKE], ids=["zephyr", "llama2"])
def test_a_pair_is_the_tokens_of_the_whole_conversation(template):
    """Prompt + response ids are the templated conversation's own, as the tokenizer encodes it (BOS once): the model
    writes its answers in these tokens. On its own, a SentencePiece tokenizer starts a response with '▁Air', not
    the 'Air' that follows the assistant marker's newline, and the real responses differed from generated ones there."""
    tokenizer = sentencepiece_tokenizer(template)
    example = Example((user("Why is the sky blue?"),), "Air molecules scatter blue light.", " The sea.  ")
    out = tokenize_example(tokenizer, example, max_length=200, max_prompt_length=100)
    assert out.prompt_ids[0] == tokenizer.bos_token_id != out.prompt_ids[1]
    for text, ids in ((example.response, out.response_ids), (example.generated, out.generated_ids)):
        whole = tokenizer.apply_chat_template([*example.prompt, assistant(text)], tokenize=False)
        conversation = tokenizer.encode(whole, add_special_tokens=not whole.startswith(tokenizer.bos_token))
        assert out.prompt_ids + ids == tuple(conversation[: len(out.prompt_ids) + len(ids)])  # EOS as the template
        assert ids[-1] == tokenizer.eos_token_id
    if template == ZEPHYR_LIKE:
        assert tokenizer.convert_ids_to_tokens(out.response_ids[0]) == "A"
        assert tokenizer.convert_ids_to_tokens(tokenizer.encode(example.response, add_special_tokens=False)[0]) == "▁A"


def test_a_response_whose_first_token_merges_with_the_prompt_is_tokenized_alone(caplog):
    """The generation prompt ends with '|>' and the conversation goes on with '|>\\n', one token: the prompt's ids
    are not the conversation's first ids, so the response cannot be cut from it."""
    tokenizer = sentencepiece_tokenizer(MERGING)
    data_module._warned_alone.clear()  # it warns once per process
    with caplog.at_level(logging.WARNING, logger="spin_fast.data"):
        out = tokenize_example(tokenizer, Example((user("Hi"),), "Air."), max_length=200, max_prompt_length=100)
    assert out.response_ids == (*tokenizer.encode("Air.", add_special_tokens=False), tokenizer.eos_token_id)
    assert "tokenized on their own" in caplog.text


@pytest.mark.parametrize("template", [ZEPHYR_LIKE, LLAMA2_LIKE, MERGING], ids=["zephyr", "llama2", "merging"])
def test_a_batch_tokenizes_each_example_as_alone(template):
    """tokenize_batch encodes a batch's texts in one call (every core of a fast tokenizer), each example as
    tokenize_example does on its own: texts shared between examples, responses tokenized alone, fitted prompts."""
    tokenizer = sentencepiece_tokenizer(template)
    examples = [Example((user("Why is the sky blue?"),), "Air molecules scatter blue light.", " The sea.  "),
                Example((user("Hi"),), "Air."), Example((user("Hi"),), "Air.", ""),
                Example((system("Be brief."), user("Hi"), assistant("Hello!"), user("Why?")), "Because.", "No."),
                Example((user(" ".join(DEFAULT_CORPUS)[:300]),), "A long question deserves this answer.", "Short.")]
    for cut_prompt in CUT_PROMPT:
        fitting = {"max_length": 48, "max_prompt_length": 24, "cut_prompt": cut_prompt}
        alone = [tokenize_example(tokenizer, e, **fitting) for e in examples]
        assert tokenize_batch(tokenizer, examples, **fitting) == alone
        assert any(e.unfitted for e in alone) == (cut_prompt == "when_too_long")


def test_tokenize_example_truncates_like_spin(tokenizer):
    long_prompt = " ".join(f"word{i}" for i in range(200))
    example = Example((user(long_prompt),), "The answer is long. " * 40, "Short.")
    full_prompt = render_prompt(tokenizer, example.prompt)
    out = tokenize_example(tokenizer, example, max_length=64, max_prompt_length=24)
    eos = tokenizer.eos_token_id
    # The prompt keeps BOS (every sequence the model saw starts with it) and its end: the question and the marker.
    assert full_prompt[0] == tokenizer.bos_token_id and out.prompt_ids == (full_prompt[0], *full_prompt[-23:])
    assert len(out.prompt_ids) + len(out.response_ids) == 64 and out.response_ids[-1] == eos
    full_response = tokenizer.encode(example.response, add_special_tokens=False)
    assert out.response_ids[:-1] == tuple(full_response[:39])
    assert out.generated_ids == (*tokenizer.encode("Short.", add_special_tokens=False), eos)  # fits: untouched
    # A prompt shorter than the limit is kept whole; every response still fits and ends with EOS.
    short = Example((user("Hi"),), "The answer is long. " * 40)
    out = tokenize_example(tokenizer, short, max_length=20, max_prompt_length=10)
    assert len(out.prompt_ids) < 10 and len(out.prompt_ids) + len(out.response_ids) == 20
    assert out.response_ids[-1] == eos


def random_ids(n):
    return [int(i) for i in torch.randint(3, 500, (n,))]


def test_when_too_long_fits_as_the_official_spin_code(tokenizer):
    eos = 2
    for _ in range(300):
        max_length = int(torch.randint(8, 64, ()))
        max_prompt_length = int(torch.randint(1, max_length, ()))
        prompt, chosen, rejected = (random_ids(int(torch.randint(1, 80, ()))) for _ in range(3))
        want = official_spin_fit(prompt, chosen, rejected, eos, max_length, max_prompt_length)
        got_prompt, (got_chosen, got_rejected) = fit_to_length(
            prompt, [(*chosen, eos), (*rejected, eos)], max_length=max_length, max_prompt_length=max_prompt_length,
            cut_prompt="when_too_long", end=(eos,))
        assert [list(got_prompt), list(got_chosen), list(got_rejected)] == [list(x) for x in want]
        assert len(got_prompt) + max(len(got_chosen), len(got_rejected)) <= max_length


def test_always_fits_a_pair_after_its_real_response_as_the_whole_pair():
    """answered_pairs fits the opponent's answer to an example fitted with its real response alone: under "always"
    that is the same (under "when_too_long" it is not: a long real response cuts the generated one too)."""
    eos = 2
    for _ in range(300):
        max_length = int(torch.randint(8, 64, ()))
        lengths = dict(max_length=max_length, max_prompt_length=int(torch.randint(1, max_length, ())),
                       cut_prompt="always", end=(eos,))
        prompt, real, generated = ((*random_ids(int(torch.randint(1, 80, ()))), eos) for _ in range(3))
        fitted_prompt, (fitted_real,) = fit_to_length(prompt, [real], **lengths)
        assert fit_to_length(fitted_prompt, [fitted_real, generated], **lengths) == fit_to_length(
            prompt, [real, generated], **lengths)


def test_tokenize_example_when_too_long_answers_the_whole_prompt(tokenizer):
    long_prompt = " ".join(f"word{i}" for i in range(40))
    full_prompt = tuple(render_prompt(tokenizer, [user(long_prompt)]))
    eos = tokenizer.eos_token_id
    assert len(full_prompt) > 24
    # The pair fits in max_length: the prompt stays whole, although it is longer than max_prompt_length.
    out = tokenize_example(tokenizer, Example((user(long_prompt),), "Short.", "Hi."), max_length=len(full_prompt) + 8,
                           max_prompt_length=24, cut_prompt="when_too_long")
    assert out.prompt_ids == full_prompt and out.answered_prompt_ids == full_prompt and out.unfitted is None
    assert out.response_ids == (*tokenizer.encode("Short.", add_special_tokens=False), eos)
    # It does not: the prompt keeps BOS and its last 23 tokens, and the responses still too long their first 64 - 24,
    # without EOS; the opponent still answers the whole prompt.
    example = Example((user(long_prompt),), "The answer is long. " * 40, "Short.")
    out = tokenize_example(tokenizer, example, max_length=64, max_prompt_length=24, cut_prompt="when_too_long")
    cut = (full_prompt[0], *full_prompt[-23:])
    assert out.prompt_ids == cut and out.answered_prompt_ids == full_prompt
    assert out.response_ids == tuple(tokenizer.encode(example.response, add_special_tokens=False)[:40])
    assert out.generated_ids == (*tokenizer.encode("Short.", add_special_tokens=False), eos)
    # Under "always" the opponent answers the prompt as trained on.
    out = tokenize_example(tokenizer, example, max_length=64, max_prompt_length=24)
    assert out.answered_prompt_ids == out.prompt_ids == cut and out.unfitted is None


@pytest.mark.parametrize("max_length, max_prompt_length", [(10, 10), (10, 20), (0, -1), (10, 0)])
def test_tokenize_example_rejects_bad_lengths(tokenizer, max_length, max_prompt_length):
    with pytest.raises(ValueError, match="max_prompt_length"):
        tokenize_example(tokenizer, Example((user("Hi"),), "A"), max_length=max_length,
                         max_prompt_length=max_prompt_length)


def test_tokenization_is_deterministic(tokenizer, tmp_path):
    path = write_jsonl(tmp_path / "t.jsonl", [{"messages": CHAT}])
    (example,) = load_examples(path, keep_history=True).examples
    first = tokenize_example(tokenizer, example, max_length=128, max_prompt_length=64)
    assert tokenize_example(tokenizer, example, max_length=128, max_prompt_length=64) == first
    again = build_local_tokenizer()
    assert tokenize_example(again, example, max_length=128, max_prompt_length=64) == first


def test_module_imports_datasets_lazily():
    code = "import sys, spin_fast.data; print('datasets' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "False"
    assert data_module.load_examples is load_examples


def test_a_row_the_chat_template_fails_on_is_named(tmp_path):
    """A template's own error (here raise_exception, as templates that check roles use it) names the row it met."""
    from spin_fast.config import DataConfig
    from spin_fast.examples import read_examples, tokenize_examples

    tokenizer = build_local_tokenizer()
    tokenizer.chat_template = ("{% for m in messages %}{% if 'BOOM' in m['content'] %}"
                               "{{ raise_exception('no BOOM here') }}{% endif %}{% endfor %}" + tokenizer.chat_template)
    path = tmp_path / "data.jsonl"
    rows = [{"prompt": "Hi?", "response": "Hello."}, {"prompt": "Yes?", "response": "No."},
            {"prompt": "Say it.", "response": "BOOM"}]
    path.write_text("\n".join(json.dumps(row) for row in rows) + "\n")
    data = DataConfig(source=str(path), max_length=64, max_prompt_length=32)
    with pytest.raises(ValueError, match=rf"^{path} line 3: cannot be tokenized: no BOOM here$"):
        tokenize_examples(tokenizer, data, read_examples(data, str(path)))
    assert len(tokenize_examples(tokenizer, data, read_examples(data, str(path), limit=2))) == 2


def test_tokenized_examples_hold_one_int_object_per_distinct_token_id(tokenizer, tmp_path):
    """A run holds its examples to its end: their tuples share one int per distinct id (SharedIds), the unfitted
    prompts too, as the tokenizer gives them."""
    from spin_fast.config import DataConfig
    from spin_fast.examples import read_examples, tokenize_examples

    path = write_jsonl(tmp_path / "data.jsonl", [{"prompt": f"Why is the sky blue, {name}? " * 6,
                                                  "response": f"Scattering of light by molecules, {name}."}
                                                 for name in ("Ann", "Bob", "Eve")])
    data = DataConfig(source=str(path), max_length=48, max_prompt_length=16, cut_prompt="when_too_long")
    tokenized = tokenize_examples(tokenizer, data, read_examples(data, str(path)))
    assert tokenized == [tokenize_example(tokenizer, e, max_length=48, max_prompt_length=16, cut_prompt="when_too_long")
                         for e in read_examples(data, str(path))]
    ids = [i for e in tokenized for part in (e.prompt_ids, e.response_ids, e.unfitted.prompt_ids) for i in part]
    assert len({id(i) for i in ids}) == len(set(ids)) < len(ids) and max(ids) > 256
    assert all(e.response_ids is e.unfitted.response_ids for e in tokenized)  # uncut: one tuple, as tokenized


def test_tokenizing_holds_a_few_bytes_a_token_at_its_peak():
    """A tokenizer's ids are an int object per token (36 bytes a token with the tuple's pointer, 44 at the peak
    before the exchange used arrays): tokenizing holds one batch of them at a time and the rank's share in int32
    arrays until the exchange, so its peak is about the shared tuples, the arrays and one batch (12)."""
    import tracemalloc

    from spin_fast.config import DataConfig
    from spin_fast.examples import tokenize_examples

    words = "the light of the sky is blue because air scatters the short waves of the sun more".split()

    def text(n):
        return " ".join(words[int(i)] for i in torch.randint(len(words), (n,)))

    tokenizer = build_local_tokenizer(vocab_size=2000)  # whole words: ids over 256, which CPython does not cache
    examples = [Example((user(text(20)),), text(40)) for _ in range(3000)]
    tracemalloc.start()
    try:
        tokenized = tokenize_examples(tokenizer, DataConfig(max_length=1024, max_prompt_length=512), examples)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    tokens = sum(len(e.prompt_ids) + len(e.response_ids) for e in tokenized)
    large = sum(i > 256 for e in tokenized for part in (e.prompt_ids, e.response_ids) for i in part)
    assert tokens > 100_000 and large > 0.7 * tokens
    assert peak / tokens < 25, f"{peak / tokens:.1f} bytes a token"


def test_a_runs_examples_leave_a_pair_files_generated_responses_out(tmp_path):
    """A run, eval and sft take a spin_pairs row's prompt and human response: under cut_prompt=when_too_long a pair
    fits by its longer response, so a long generated answer in the file cut the prompt (and the human response, with
    its EOS) that fit max_length on their own; the held-out figures, SFT and the start's budget check read those."""
    from spin_fast.config import DataConfig
    from spin_fast.examples import read_examples, tokenize_examples

    tokenizer = build_local_tokenizer()
    question = " ".join(f"word{i}" for i in range(12))
    real = [{"role": "user", "content": question},
            {"role": "assistant", "content": "The sea was calm, and the wind carried the smell of salt."}]
    generated = [real[0], {"role": "assistant", "content": "blah " * 200}]
    (tmp_path / "pairs.jsonl").write_text(json.dumps({"real": real, "generated": generated}) + "\n")
    (tmp_path / "sft.jsonl").write_text(json.dumps({"messages": real}) + "\n")
    data = DataConfig(max_length=100, max_prompt_length=16, cut_prompt="when_too_long")
    (from_pairs,) = tokenize_examples(tokenizer, data, read_examples(data, str(tmp_path / "pairs.jsonl")))
    (from_sft,) = tokenize_examples(tokenizer, data, read_examples(data, str(tmp_path / "sft.jsonl")))
    assert len(from_sft.prompt_ids) > 16 and from_sft.response_ids[-1] == tokenizer.eos_token_id  # nothing cut
    assert from_pairs == from_sft and from_pairs.generated_ids is None


def test_a_real_response_ends_as_the_chat_template_ends_it_before_eos():
    """Llama 2's chat template ends an assistant turn with ' ' + eos_token: in the templated conversation (what the
    SFT model learned, and so what it writes) the response's last token is followed by '▁', then EOS. A real
    response cut at its text's end lacked that '▁', which every generated one has: SPIN would learn that token."""
    tokenizer = sentencepiece_tokenizer(LLAMA2_LIKE)
    example = Example(({"role": "user", "content": "Why is the sky blue?"},), "Air molecules scatter blue light.")
    out = tokenize_example(tokenizer, example, max_length=200, max_prompt_length=100)
    whole = tokenizer.apply_chat_template([*example.prompt, {"role": "assistant", "content": example.response}],
                                          tokenize=False)
    conversation = tokenizer.encode(whole, add_special_tokens=False)  # the template writes BOS itself
    until_eos = conversation[: conversation.index(tokenizer.eos_token_id, len(out.prompt_ids)) + 1]
    assert list(out.prompt_ids + out.response_ids) == until_eos
    assert tokenizer.convert_ids_to_tokens(out.response_ids[-2:]) == ["▁", tokenizer.eos_token]


# ------------------------------------------------- chat templates of real model families
LLAMA3 = ("{% set loop_messages = messages %}{% for message in loop_messages %}"
          "{% set content = '<|start_header_id|>' + message['role'] + '<|end_header_id|>\n\n'+ message['content'] | "
          "trim + '<|eot_id|>' %}{% if loop.index0 == 0 %}{% set content = bos_token + content %}{% endif %}"
          "{{ content }}{% endfor %}{% if add_generation_prompt %}"
          "{{ '<|start_header_id|>assistant<|end_header_id|>\n\n' }}{% endif %}")
GEMMA = ("{{ bos_token }}{% if messages[0]['role'] == 'system' %}{{ raise_exception('System role not supported') }}"
         "{% endif %}{% for message in messages %}{% if (message['role'] == 'user') != (loop.index0 % 2 == 0) %}"
         "{{ raise_exception('Conversation roles must alternate user/assistant/user/assistant/...') }}{% endif %}"
         "{% if (message['role'] == 'assistant') %}{% set role = 'model' %}{% else %}{% set role = message['role'] %}"
         "{% endif %}{{ '<start_of_turn>' + role + '\n' + message['content'] | trim + '<end_of_turn>\n' }}{% endfor %}"
         "{% if add_generation_prompt %}{{'<start_of_turn>model\n'}}{% endif %}")
QWEN = ("{%- if messages[0]['role'] == 'system' %}{{- '<|im_start|>system\n' + messages[0]['content'] + "
        "'<|im_end|>\n' }}{%- else %}{{- '<|im_start|>system\nYou are Qwen, created by Alibaba Cloud. You are a "
        "helpful assistant.<|im_end|>\n' }}{%- endif %}{%- for message in messages %}{%- if (message.role == 'user') "
        "or (message.role == 'system' and not loop.first) or (message.role == 'assistant') %}{{- '<|im_start|>' + "
        "message.role + '\n' + message.content + '<|im_end|>' + '\n' }}{%- endif %}{%- endfor %}"
        "{%- if add_generation_prompt %}{{- '<|im_start|>assistant\n' }}{%- endif %}")
PHI3 = ("{{ bos_token }}{% for message in messages %}{% if (message['role'] == 'system') %}{{'<|system|>' + '\n' + "
        "message['content'] + '<|end|>' + '\n'}}{% elif (message['role'] == 'user') %}{{'<|user|>' + '\n' + "
        "message['content'] + '<|end|>' + '\n' + '<|assistant|>' + '\n'}}{% elif message['role'] == 'assistant' %}"
        "{{message['content'] + '<|end|>' + '\n'}}{% endif %}{% endfor %}")

# name: (template, bos, tokenizer eos, special tokens, the token the template ends an assistant turn with)
FAMILIES = {
    # Meta-Llama-3-8B-Instruct as released (tokenizer eos <|end_of_text|>; turns end with <|eot_id|>)
    "llama3": (LLAMA3, "<|begin_of_text|>", "<|end_of_text|>",
               ["<|begin_of_text|>", "<|end_of_text|>", "<|eot_id|>", "<|start_header_id|>", "<|end_header_id|>"],
               "<|eot_id|>"),
    # A Qwen2.5 *base* tokenizer (eos <|endoftext|>, no BOS) with its ChatML template, as SFT models made from it
    # keep it: turns end with <|im_end|>
    "qwen-base": (QWEN, None, "<|endoftext|>", ["<|endoftext|>", "<|im_start|>", "<|im_end|>"], "<|im_end|>"),
    "gemma": (GEMMA, "<bos>", "<eos>", ["<bos>", "<eos>", "<start_of_turn>", "<end_of_turn>"], "<end_of_turn>"),
    # Phi-3-mini-4k-instruct (tokenizer eos <|endoftext|>; turns end with <|end|>)
    "phi3": (PHI3, "<s>", "<|endoftext|>", ["<s>", "<|endoftext|>", "<|system|>", "<|user|>", "<|assistant|>",
                                            "<|end|>"], "<|end|>"),
}


def family_tokenizer(name):
    template, bos, eos, specials, _ = FAMILIES[name]
    tokenizer = build_local_tokenizer()
    tokenizer.add_special_tokens({"additional_special_tokens": specials})
    tokenizer.bos_token, tokenizer.eos_token = bos, eos
    # As these families' tokenizers do, encode() starts a text with BOS (Qwen's has none).
    tokenizer.backend_tokenizer.post_processor = processors.TemplateProcessing(
        single=f"{bos} $A", pair=f"{bos} $A $B", special_tokens=[(bos, tokenizer.convert_tokens_to_ids(bos))]
    ) if bos else processors.TemplateProcessing(single="$A", pair="$A $B", special_tokens=[])
    tokenizer.chat_template = template
    return tokenizer


@pytest.mark.parametrize("family", list(FAMILIES))
def test_a_real_response_ends_with_the_token_the_template_ends_the_assistant_turn_with(family):
    """What the SFT model learned (and writes) after an answer is the template's end of turn, not tokenizer.eos."""
    tokenizer = family_tokenizer(family)
    example = Example((user("Why is the sky blue?"),), "Air molecules scatter blue light.")
    out = tokenize_example(tokenizer, example, max_length=200, max_prompt_length=100)
    whole = tokenizer.apply_chat_template([*example.prompt, {"role": "assistant", "content": example.response}],
                                          tokenize=False)
    conversation = tokenizer.encode(whole, add_special_tokens=False)  # the template writes BOS itself
    turn_end = tokenizer.convert_tokens_to_ids(FAMILIES[family][4])
    through_turn_end = conversation[: conversation.index(turn_end, len(out.prompt_ids)) + 1]
    assert list(out.prompt_ids + out.response_ids) == through_turn_end, tokenizer.convert_ids_to_tokens(
        out.response_ids[-2:])


def bigram_model(vocab_size, next_token, default, head_dim=None):
    """A tiny Llama that writes next_token[t] after token t (`default` after any other): attention and MLP add
    nothing, the embeddings are one-hot and the head maps each token to its successor. head_dim: heads of that
    size (vLLM's CPU attention takes a few sizes alone), else one head."""
    vocab_size += vocab_size % 2 if head_dim is None else -vocab_size % head_dim  # RoPE wants an even head size
    heads = 1 if head_dim is None else vocab_size // head_dim
    config = LlamaConfig(vocab_size=vocab_size, hidden_size=vocab_size, intermediate_size=4, num_hidden_layers=1,
                         num_attention_heads=heads, num_key_value_heads=heads, tie_word_embeddings=False,
                         max_position_embeddings=512)
    model = AutoModelForCausalLM.from_config(config).eval()
    with torch.no_grad():
        for p in model.parameters():
            p.zero_()
        model.model.embed_tokens.weight.copy_(torch.eye(vocab_size))
        model.model.norm.weight.fill_(1.0)
        for layer in model.model.layers:
            layer.input_layernorm.weight.fill_(1.0)
            layer.post_attention_layernorm.weight.fill_(1.0)
        head = model.lm_head.weight
        head[default, :] = 1.0
        for token, following in next_token.items():
            head[:, token] = 0.0
            head[following, token] = 1.0
    return model


@pytest.mark.parametrize("family", ["gemma", "qwen-base"])
def test_a_model_that_writes_the_human_answer_as_its_template_does_gives_the_same_tokens_as_the_real_one(family):
    """Gemma-it (tokenizer eos <eos>, turns ending with <end_of_turn>) from a folder whose generation_config lists
    only <eos> (one saved without generation_config.json takes config.json's eos_token_id, 1): an opponent that
    answers exactly the human response, ending its turn as the template does, must give generated ids equal to the
    real ones; else SPIN learns the ending, not the content."""
    tokenizer = family_tokenizer(family)
    example = Example((user("Why is the sky blue?"),), "Air.")
    tokenized = tokenize_example(tokenizer, example, max_length=200, max_prompt_length=100)
    prompt = list(tokenized.answered_prompt_ids)
    whole = tokenizer.apply_chat_template([*example.prompt, {"role": "assistant", "content": example.response}],
                                          tokenize=False)
    conversation = tokenizer.encode(whole, add_special_tokens=False)
    assert conversation[: len(prompt)] == prompt
    answer = conversation[len(prompt):]  # Air . <end_of_turn> \n  (the template's own continuation)
    end_of_turn = tokenizer.convert_tokens_to_ids(FAMILIES[family][4])
    assert answer[answer.index(end_of_turn) - 2: answer.index(end_of_turn) + 1] == answer[:3]
    chain = [prompt[-1], *answer[:3]]
    model = bigram_model(len(tokenizer), dict(zip(chain, chain[1:])), default=tokenizer.eos_token_id)
    model.generation_config = GenerationConfig(eos_token_id=tokenizer.eos_token_id)  # config.json's eos only
    data = DataConfig(source="x", max_length=200, max_prompt_length=100)
    config = RunConfig(data=data, generation=GenerationSettings(engine="transformers"))
    # As SelfPlay.generate does: the run's engine, and its pairs EOS-closed with data.eos_token_id's token.
    engine = default_engine(model, tokenizer, config, "unused")
    completions = engine.generate([prompt], SamplingConfig(temperature=0.0, max_new_tokens=8))
    assert completions[0][0].token_ids[:2] == tuple(answer[:2])  # the model wrote the human answer
    (pair,) = answered_pairs([tokenized], completions, data_module.response_end(tokenizer), data)
    assert tokenizer.convert_ids_to_tokens(pair.generated_ids) == tokenizer.convert_ids_to_tokens(pair.real_ids)


@pytest.mark.parametrize("family", ["llama3", "gemma"])
@pytest.mark.parametrize("cut_prompt", ["always", "when_too_long"])
def test_a_long_prompt_cut_to_its_end_keeps_bos(family, cut_prompt):
    """A prompt longer than max_prompt_length keeps its last tokens; the model is still given (and trained on) a
    sequence that starts with BOS, as every sequence it ever saw did (Gemma's outputs degrade to noise without)."""
    tokenizer = family_tokenizer(family)
    question = " ".join(["The quick brown fox jumps over the lazy dog."] * 20)
    out = tokenize_example(tokenizer, Example((user(question),), "Air."), max_length=64, max_prompt_length=32,
                           cut_prompt=cut_prompt)
    assert len(out.prompt_ids) <= 32
    assert out.prompt_ids[0] == tokenizer.bos_token_id, tokenizer.decode(out.prompt_ids[:4])
    assert out.answered_prompt_ids[0] == tokenizer.bos_token_id


# Qwen3's template (its tool parts left out), as released: an assistant turn after the last user turn is written
# '<think>\n' + reasoning + '\n</think>\n\n' + answer, the reasoning taken from a '<think>...</think>' in the content.
QWEN3 = (
    "{%- if messages[0].role == 'system' %}{{- '<|im_start|>system\\n' + messages[0].content + '<|im_end|>\\n' }}"
    "{%- endif %}"
    "{%- set ns = namespace(multi_step_tool=true, last_query_index=messages|length - 1) %}"
    "{%- for message in messages[::-1] %}{%- set index = (messages|length - 1) - loop.index0 %}"
    "{%- if ns.multi_step_tool and message.role == \"user\" and message.content is string and "
    "not(message.content.startswith('<tool_response>') and message.content.endswith('</tool_response>')) %}"
    "{%- set ns.multi_step_tool = false %}{%- set ns.last_query_index = index %}{%- endif %}{%- endfor %}"
    "{%- for message in messages %}"
    "{%- if message.content is string %}{%- set content = message.content %}{%- else %}{%- set content = '' %}"
    "{%- endif %}"
    "{%- if (message.role == \"user\") or (message.role == \"system\" and not loop.first) %}"
    "{{- '<|im_start|>' + message.role + '\\n' + content + '<|im_end|>' + '\\n' }}"
    "{%- elif message.role == \"assistant\" %}{%- set reasoning_content = '' %}"
    "{%- if message.reasoning_content is string %}{%- set reasoning_content = message.reasoning_content %}"
    "{%- else %}{%- if '</think>' in content %}"
    "{%- set reasoning_content = content.split('</think>')[0].rstrip('\\n').split('<think>')[-1].lstrip('\\n') %}"
    "{%- set content = content.split('</think>')[-1].lstrip('\\n') %}{%- endif %}{%- endif %}"
    "{%- if loop.index0 > ns.last_query_index %}{%- if loop.last or (not loop.last and reasoning_content) %}"
    "{{- '<|im_start|>' + message.role + '\\n<think>\\n' + reasoning_content.strip('\\n') + '\\n</think>\\n\\n' + "
    "content.lstrip('\\n') }}"
    "{%- else %}{{- '<|im_start|>' + message.role + '\\n' + content }}{%- endif %}"
    "{%- else %}{{- '<|im_start|>' + message.role + '\\n' + content }}{%- endif %}"
    "{{- '<|im_end|>\\n' }}{%- endif %}{%- endfor %}"
    "{%- if add_generation_prompt %}{{- '<|im_start|>assistant\\n' }}"
    "{%- if enable_thinking is defined and enable_thinking is false %}{{- '<think>\\n\\n</think>\\n\\n' }}{%- endif %}"
    "{%- endif %}")
# DeepSeek-R1-Distill's (tool parts left out): the generation prompt opens a '<think>\n' that the templated
# conversation has not (it keeps only what follows a '</think>').
DEEPSEEK_R1 = (
    "{% if not add_generation_prompt is defined %}{% set add_generation_prompt = false %}{% endif %}"
    "{% set ns = namespace(is_first=false, is_tool=false, is_output_first=true, system_prompt='') %}"
    "{%- for message in messages %}{%- if message['role'] == 'system' %}{% set ns.system_prompt = message['content'] %}"
    "{%- endif %}{%- endfor %}{{bos_token}}{{ns.system_prompt}}"
    "{%- for message in messages %}{%- if message['role'] == 'user' %}{%- set ns.is_tool = false -%}"
    "{{'<｜User｜>' + message['content']}}{%- endif %}"
    "{%- if message['role'] == 'assistant' and message['content'] is not none %}"
    "{% set content = message['content'] %}{% if '</think>' in content %}"
    "{% set content = content.split('</think>')[-1] %}{% endif %}"
    "{{'<｜Assistant｜>' + content + '<｜end▁of▁sentence｜>'}}{%- endif %}{%- endfor -%}"
    "{% if add_generation_prompt and not ns.is_tool %}{{'<｜Assistant｜><think>\\n'}}{% endif %}")
FAMILIES["qwen3"] = (QWEN3, None, "<|im_end|>", ["<|endoftext|>", "<|im_start|>", "<|im_end|>", "<think>", "</think>"],
                     "<|im_end|>")
FAMILIES["deepseek-r1"] = (DEEPSEEK_R1, "<｜begin▁of▁sentence｜>", "<｜end▁of▁sentence｜>",
                           ["<｜begin▁of▁sentence｜>", "<｜end▁of▁sentence｜>", "<｜User｜>", "<｜Assistant｜>"],
                           "<｜end▁of▁sentence｜>")


@pytest.mark.parametrize("response", ["Air scatters blue light.", "<think>\nLight.\n</think>\n\nIt scatters.",
                                      "<think>Light.</think>It scatters.", "Light.</think>\nIt scatters.", "in"])
def test_a_response_the_template_rewrites_is_the_templated_conversations_own_tokens(response):
    """Qwen3's template writes a reasoning block in its own layout ('<think>\\n' + reasoning + '\\n</think>\\n\\n'),
    whatever the data's: a response written otherwise was not found in the conversation and was tokenized on its
    own, in a layout the model never writes (SPIN then learns the layout). A response found inside the template's
    own text ('in' in '<think>') was cut there."""
    tokenizer = family_tokenizer("qwen3")
    example = Example((user("Why is the sky blue?"),), response)
    out = tokenize_example(tokenizer, example, max_length=200, max_prompt_length=100)
    whole = tokenizer.apply_chat_template([*example.prompt, assistant(response)], tokenize=False)
    conversation = tokenizer.encode(whole, add_special_tokens=False)
    through_turn_end = conversation[: conversation.index(tokenizer.eos_token_id, len(out.prompt_ids)) + 1]
    assert list(out.prompt_ids + out.response_ids) == through_turn_end, tokenizer.convert_ids_to_tokens(
        out.response_ids)


@pytest.mark.parametrize("family", ["gemma", "llama3", "qwen-base"])
@pytest.mark.parametrize("generated", ["\n", " ", ""])
def test_a_blank_generated_response_of_a_pair_file_is_the_templated_conversations_own_tokens(family, generated):
    """A pair file's generated response may be blank (a legitimate, poor answer). Gemma's template trims it and writes
    '<end_of_turn>\n' after it: a response of '\n' was found in that newline, after the turn end, and became
    '<end_of_turn>', '\n', '<end_of_turn>' instead of the turn end alone that the conversation holds."""
    tokenizer = family_tokenizer(family)
    example = Example((user("Why is the sky blue?"),), "Air.", generated)
    out = tokenize_example(tokenizer, example, max_length=200, max_prompt_length=100)
    whole = tokenizer.apply_chat_template([*example.prompt, assistant(generated)], tokenize=False)
    conversation = tokenizer.encode(whole, add_special_tokens=False)
    turn_end = tokenizer.convert_tokens_to_ids(FAMILIES[family][4])
    through_turn_end = conversation[: conversation.index(turn_end, len(out.prompt_ids)) + 1]
    assert list(out.prompt_ids + out.generated_ids) == through_turn_end, tokenizer.convert_ids_to_tokens(
        out.generated_ids)


def test_a_response_tokenized_alone_names_its_row(tmp_path, caplog, monkeypatch):
    """DeepSeek-R1's generation prompt ends with '<think>\\n', which the templated conversation has not: every
    response is tokenized on its own (as the model writes it after that prompt), and the warning names a row."""
    from spin_fast.examples import read_examples, tokenize_examples

    tokenizer = family_tokenizer("deepseek-r1")
    path = write_jsonl(tmp_path / "r1.jsonl", [{"prompt": "Why?", "response": "Light.\n</think>\n\nIt scatters."}])
    data = DataConfig(source=str(path), max_length=200, max_prompt_length=100)
    monkeypatch.setattr(data_module, "_warned_alone", [], raising=False)  # it warns once per process
    with caplog.at_level(logging.WARNING, logger="spin_fast.data"):
        (out,) = tokenize_examples(tokenizer, data, read_examples(data, str(path)))
    assert tokenizer.decode(out.prompt_ids).endswith("<｜Assistant｜><think>\n")
    assert out.response_ids == (*tokenizer.encode("Light.\n</think>\n\nIt scatters.", add_special_tokens=False),
                                tokenizer.eos_token_id)
    assert f"{path} line 1" in caplog.text, caplog.text


def test_special_token_text_in_the_data_is_the_special_token_in_training_and_generation_alike():
    """As apply_chat_template(tokenize=True) encodes it, a message's '<|im_end|>' is the special token (not text):
    the prompt the opponent answers and the one trained on are the same ids, and a response that holds the turn end's
    text still ends at the template's own (the last) turn end."""
    tokenizer = family_tokenizer("qwen-base")
    im_end = tokenizer.convert_tokens_to_ids("<|im_end|>")
    example = Example((user("Say <|im_end|> now"),), "Ok <|im_end|> done.")
    out = tokenize_example(tokenizer, example, max_length=200, max_prompt_length=100)
    assert list(out.prompt_ids) == render_prompt(tokenizer, example.prompt) and out.prompt_ids.count(im_end) == 3
    whole = tokenizer.apply_chat_template([*example.prompt, assistant(example.response)], tokenize=False)
    conversation = tokenizer.encode(whole, add_special_tokens=False)
    assert list(out.prompt_ids + out.response_ids) == conversation[: len(out.prompt_ids) + len(out.response_ids)]
    assert out.response_ids.count(im_end) == 2 and tokenizer.decode(out.response_ids) == "Ok <|im_end|> done.<|im_end|>"


def test_a_response_that_holds_eos_text_is_kept_whole_where_the_template_writes_no_turn_end():
    """A template that writes nothing after an answer: responses end with the tokenizer's EOS, and one that holds
    EOS's text is still taken whole (not cut at that text)."""
    tokenizer = build_local_tokenizer()
    tokenizer.chat_template = "{% for m in messages %}{{ m['role'] + ': ' + m['content'] + '\\n' }}{% endfor %}" \
                              "{% if add_generation_prompt %}{{ 'assistant: ' }}{% endif %}"
    out = tokenize_example(tokenizer, Example((user("Hi"),), "A <|eos|> B."), max_length=200, max_prompt_length=100)
    assert tokenizer.decode(out.response_ids) == "A <|eos|> B.<|eos|>"


def test_a_response_that_holds_eos_text_ends_as_the_template_ends_it_after_its_last_eos():
    """Llama 2's template writes ' ' + EOS after an answer: a response holding EOS's text still ends with the '▁'
    before the template's own EOS (its last), not cut off at the one inside the response."""
    tokenizer = sentencepiece_tokenizer(LLAMA2_LIKE)
    out = tokenize_example(tokenizer, Example((user("Why?"),), "Air </s> blue."), max_length=200, max_prompt_length=100)
    assert tokenizer.convert_ids_to_tokens(out.response_ids) == ["▁A", "ir", "▁", "</s>", "▁bl", "u", "e.", "▁",
                                                                 "</s>"]


# Llama 3.2's (tool parts left out): its system header holds the day's date, from transformers' strftime_now.
LLAMA32 = (
    "{{- bos_token }}{%- if not date_string is defined %}{%- if strftime_now is defined %}"
    "{%- set date_string = strftime_now(\"%d %b %Y\") %}{%- else %}{%- set date_string = \"26 Jul 2024\" %}{%- endif %}"
    "{%- endif %}{%- if messages[0]['role'] == 'system' %}{%- set system_message = messages[0]['content']|trim %}"
    "{%- set messages = messages[1:] %}{%- else %}{%- set system_message = \"\" %}{%- endif %}"
    "{{- \"<|start_header_id|>system<|end_header_id|>\\n\\n\" }}{{- \"Cutting Knowledge Date: December 2023\\n\" }}"
    "{{- \"Today Date: \" + date_string + \"\\n\\n\" }}{{- system_message }}{{- \"<|eot_id|>\" }}"
    "{%- for message in messages %}{{- '<|start_header_id|>' + message['role'] + '<|end_header_id|>\\n\\n'+ "
    "message['content'] | trim + '<|eot_id|>' }}{%- endfor %}"
    "{%- if add_generation_prompt %}{{- '<|start_header_id|>assistant<|end_header_id|>\\n\\n' }}{%- endif %}")
# Mistral-7B-Instruct-v0.1's: the answer follows ' [/INST]' with no space.
MISTRAL_V01 = (
    "{{ bos_token }}{% for message in messages %}{% if (message['role'] == 'user') != (loop.index0 % 2 == 0) %}"
    "{{ raise_exception('Conversation roles must alternate user/assistant/user/assistant/...') }}{% endif %}"
    "{% if message['role'] == 'user' %}{{ '[INST] ' + message['content'] + ' [/INST]' }}"
    "{% elif message['role'] == 'assistant' %}{{ message['content'] + eos_token}}"
    "{% else %}{{ raise_exception('Only user and assistant roles are supported!') }}{% endif %}{% endfor %}")


@pytest.mark.parametrize("family", ["llama3.2", "mistral-v0.1"])
def test_a_pair_is_the_conversations_tokens_with_llama32_and_mistral_templates(family):
    """Llama 3.2's template renders (strftime_now) with the same date line in the prompt and the conversation;
    Mistral v0.1's answer, right after '[/INST]', is cut from the conversation's tokens (no '▁' of its own)."""
    if family == "llama3.2":
        tokenizer = family_tokenizer("llama3")
        tokenizer.chat_template = LLAMA32
        prompt = (system("Be brief."), user("Hi"), assistant("Hello!"), user("Why is the sky blue?"))
    else:
        tokenizer = sentencepiece_tokenizer(MISTRAL_V01)
        prompt = (user("Hi"), assistant("Hello!"), user("Why is the sky blue?"))
    example = Example(prompt, "Air molecules scatter blue light.")
    out = tokenize_example(tokenizer, example, max_length=300, max_prompt_length=200)
    whole = tokenizer.apply_chat_template([*prompt, assistant(example.response)], tokenize=False)
    conversation = tokenizer.encode(whole, add_special_tokens=not whole.startswith(tokenizer.bos_token))
    assert list(out.prompt_ids + out.response_ids) == conversation[: len(out.prompt_ids) + len(out.response_ids)]
    assert tokenizer.decode(out.response_ids, skip_special_tokens=True) == example.response
    assert "Today Date: " in whole or family != "llama3.2"


def conversation(question, answer):
    """A two-turn messages row."""
    return {"messages": [{"role": "user", "content": question}, {"role": "assistant", "content": answer}]}


@pytest.mark.parametrize("row, field", [
    ('{"prompt": "Half an emoji \\ud83d", "response": "Fine."}', "prompt"),
    ('{"messages": [{"role": "system", "content": "Be \\udc00 brief."}, {"role": "user", "content": "Hi?"}, '
     '{"role": "assistant", "content": "Hello."}]}', r"messages\[0\]\.content"),
])
def test_a_lone_surrogate_is_a_bad_row_named_by_its_field(tmp_path, row, field):
    """JSON's "\\ud83d" escape (half an emoji, cut by a scraper) parses, but is no text: no tokenizer encodes it.
    It is a bad row named by its field, which skip_invalid skips; the run's tokenizing then goes through."""
    good = json.dumps({"prompt": "Hi?", "response": "Hello."} if "prompt" in row else conversation("Hi?", "Hello."))
    path = tmp_path / "t.jsonl"
    path.write_text(f"{good}\n{row}\n{good}\n")
    with pytest.raises(DataError, match=rf"t\.jsonl line 2: field '{field}': .*surrogate"):
        load_examples(path)
    data = DataConfig(source=str(path), skip_invalid=True, max_length=64, max_prompt_length=32)
    examples = read_examples(data, str(path))
    assert [e.origin for e in examples] == [f"{path} line 1", f"{path} line 3"]
    assert len(tokenize_examples(build_local_tokenizer(), data, examples)) == 2


def test_a_local_copy_of_a_hub_dataset_reads_the_split_asked_for(tmp_path):
    """A Hub dataset downloaded as it is stored (huggingface-cli download HuggingFaceH4/ultrachat_200k: data/
    train_sft-00000-of-00003-<hash>.parquet, test_sft-..., train_gen-...) holds its splits side by side: data.split
    picks one, as datasets.load_dataset picks it from the same folder. Read whole, the test split would be trained on
    (and max_prompts would take its rows first: test_* sorts before train_*)."""
    splits = {"train_sft": [conversation(f"Q{i}?", f"A{i}.") for i in range(5)],
              "test_sft": [conversation(f"Held-out {i}?", f"H{i}.") for i in range(2)]}
    (tmp_path / "data").mkdir()
    for split, rows in splits.items():
        for shard in range(2):  # two shards a split, named as push_to_hub names them
            datasets.Dataset.from_list(rows[shard::2]).to_parquet(
                str(tmp_path / "data" / f"{split}-{shard:05d}-of-00002-0123456789abcdef.parquet"))
    for split, rows in splits.items():
        read = load_examples(tmp_path, split=split).examples
        assert sorted(e.response for e in read) == sorted(r["messages"][1]["content"] for r in rows), split
        assert sorted(r["messages"][1]["content"] for r in datasets.load_dataset(str(tmp_path), split=split)) == \
            sorted(e.response for e in read)
    with pytest.raises(DataError, match=r"holds the splits test_sft, train_sft.*data\.split.*'train'"):
        load_examples(tmp_path)  # the default split, "train", is none of them


def unused_split_warning(source, holds: str, split: str, setting: str = "data.split") -> str:
    """data's warning that `source`, read whole, leaves `setting`'s split unused."""
    return (f"{source}: {holds}, read whole: {setting}={split!r} is unused (it picks a split of a datasets source, or "
            "of a folder of files named by their splits)")


def loading_warnings(caplog, source, split: str, rows: int = 1) -> list[str]:
    """The spin_fast.data warnings of loading `source` (`rows` examples) with `split`."""
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="spin_fast.data"):
        assert len(load_examples(source, split=split).examples) == rows
    return caplog.messages


def test_a_split_other_than_train_asked_of_data_without_splits_is_said_to_be_unused(tmp_path, caplog):
    """One file (or a folder whose files name no split) holds no splits: it is read whole, as datasets names such
    data's one split train. data.split=test was silently ignored: the run trained on the file, not a test split."""
    (tmp_path / "folder").mkdir()
    path = write_jsonl(tmp_path / "folder" / "rows.jsonl", [GOOD])
    for source in (path, path.parent):
        for split in ("train", "train_sft"):  # the default, or a Hub config's train split: the file is that split
            assert not loading_warnings(caplog, source, split), (source, split)
        assert loading_warnings(caplog, source, "test") == [unused_split_warning(source, "holds no splits", "test")]


def test_another_split_asked_of_data_holding_one_split_is_said_to_be_unused(tmp_path, caplog):
    """A folder holding one split's files alone (test.jsonl) and a Dataset saved alone (save_to_disk, no
    DatasetDict) are read whole, as one file is: data.split naming another split was silently ignored, and a run
    meant to train on train rows trained on the test rows."""
    folder = tmp_path / "folder"
    folder.mkdir()
    write_jsonl(folder / "test.jsonl", [GOOD])
    saved = tmp_path / "saved"
    datasets.Dataset.from_list([GOOD]).save_to_disk(str(saved))
    for source, split in ((folder, "test"), (folder, "eval"), (saved, "train")):  # the split it holds: no word
        assert not loading_warnings(caplog, source, split), (source, split)
    for source, held in ((folder, "holds the split test alone (by its files' or folders' names)"),
                         (saved, "holds no splits")):
        assert loading_warnings(caplog, source, "validation") == [unused_split_warning(source, held, "validation")]


def test_data_that_datasets_reads_as_train_is_not_said_to_leave_data_split_train_unused(tmp_path, caplog):
    """Shards named by no split word outside a data/ folder (part-00000-of-00002.jsonl), which datasets reads as its
    train split, and a Dataset saved from a slice of train (load_dataset(split="train[:10]")) are train's: the
    default data.split=train said unused of them was a false warning. A slice of test is still test's."""
    shards = tmp_path / "shards"
    shards.mkdir()
    for i in range(2):
        write_jsonl(shards / f"part-0000{i}-of-00002.jsonl", [{"prompt": f"Q{i}", "response": "A"}])
    assert list(datasets.load_dataset(str(shards))) == ["train"]
    write_jsonl(tmp_path / "rows.jsonl", [GOOD, {"messages": [user("Q2"), assistant("A")]}])
    for name in ("train", "test"):
        sliced = datasets.load_dataset("json", data_files={name: str(tmp_path / "rows.jsonl")}, split=f"{name}[:1]")
        sliced.save_to_disk(str(tmp_path / name))
    for source, rows in ((shards, 2), (tmp_path / "train", 1)):
        assert not loading_warnings(caplog, source, "train", rows), source
    assert loading_warnings(caplog, tmp_path / "test", "train") == [
        unused_split_warning(tmp_path / "test", "holds the split test[:1] alone (as datasets saved it)", "train")]


def test_a_held_out_folder_of_one_split_is_read_without_a_word_where_data_eval_split_is_unset(tmp_path, caplog):
    """data.eval_split null takes data.split's value (train) for a Hub source; a held-out folder of test.jsonl alone
    was said to leave "data.eval_split='train'" unused, a setting never written (its file named alone was read
    without a word). data.eval_split set to another split than the one held is still said unused."""
    folder = tmp_path / "held"
    folder.mkdir()
    write_jsonl(folder / "test.jsonl", [GOOD])
    data = DataConfig(source="x", eval_source=str(folder))
    for source in (folder, folder / "test.jsonl"):
        with caplog.at_level(logging.WARNING, logger="spin_fast.data"):
            assert len(read_examples(data.held_out(), str(source))) == 1
        assert not caplog.messages, source
    with caplog.at_level(logging.WARNING, logger="spin_fast.data"):
        read_examples(DataConfig(source="x", eval_source=str(folder), eval_split="validation").held_out(), str(folder))
    assert caplog.messages == [unused_split_warning(folder, "holds the split test alone (by its files' or folders' "
                                                    "names)", "validation", "data.eval_split")]


def test_the_official_spin_pair_folder_reads_its_train_and_test_splits_as_datasets_does(tmp_path):
    """The official SPIN data (UCLA-AGI/SPIN_iter0, or what its convert_data.py writes) is a folder holding
    train_prefs-00000-of-00001.parquet beside test_prefs-00000-of-00001.parquet, which its configs read as the
    splits train and test: datasets.load_dataset names shards outside a data/ folder by the split word in their
    names. The README's load_examples("path/to/spin_iter0") said the folder held no split 'train'."""
    splits = {"train_prefs": [spin_row(f"Q{i}?", f"A{i}.", f"G{i}.") for i in range(4)],
              "test_prefs": [spin_row(f"Held-out {i}?", f"H{i}.", f"X{i}.") for i in range(2)]}
    for name, rows in splits.items():
        datasets.Dataset.from_list(rows).to_parquet(str(tmp_path / f"{name}-00000-of-00001.parquet"))
    for split, name in (("train", "train_prefs"), ("test", "test_prefs")):
        theirs = [r["real"][1]["content"] for r in datasets.load_dataset(str(tmp_path), split=split)]
        read = load_examples(tmp_path, split=split).examples
        assert [e.response for e in read] == theirs == [r["real"][1]["content"] for r in splits[name]], split
        assert [e.generated for e in read] == [r["generated"][1]["content"] for r in splits[name]]
    assert len(load_examples(tmp_path, split="train_prefs").examples) == 4  # the shards' own name still reads
    assert len(load_examples(tmp_path).examples) == 4  # the default split, train


def test_a_datasets_save_to_disk_folder_gives_the_examples_of_its_rows(tmp_path):
    """A folder written by Dataset.save_to_disk (Arrow files, dataset_info.json, state.json) or DatasetDict's (a
    folder a split, dataset_dict.json): its rows, as the same rows in a .jsonl file give them, each split by
    data.split. Read as a folder of .json files, its metadata was taken for data, and the error's advice (move
    dataset_info.json out, or name the data file itself: an .arrow file) led nowhere."""
    rows = [conversation(f"Q{i}? 😀", f"A{i}.") for i in range(5)]
    jsonl = tmp_path / "rows.jsonl"
    jsonl.write_text("".join(json.dumps(row) + "\n" for row in rows))
    expected = [(e.prompt, e.response) for e in load_examples(jsonl).examples]
    datasets.Dataset.from_list(rows).save_to_disk(str(tmp_path / "saved"))
    read = load_examples(tmp_path / "saved").examples
    assert [(e.prompt, e.response) for e in read] == expected
    assert read[4].origin == f"{tmp_path / 'saved'} row 4"
    datasets.DatasetDict({"train_sft": datasets.Dataset.from_list(rows),
                          "test_sft": datasets.Dataset.from_list(rows[:2])}).save_to_disk(str(tmp_path / "splits"))
    assert [(e.prompt, e.response) for e in load_examples(tmp_path / "splits", split="train_sft").examples] == expected
    assert len(load_examples(tmp_path / "splits", split="test_sft").examples) == 2
    with pytest.raises(DataError, match=r"splits: a datasets folder \(save_to_disk\) with the splits train_sft, "
                                        r"test_sft, none of them data\.split='train'"):
        load_examples(tmp_path / "splits")


@pytest.mark.parametrize("layout", ["files", "folders"])
def test_a_folder_of_split_files_or_split_folders_reads_the_split_asked_for(tmp_path, layout, caplog):
    """A folder holding train.jsonl beside test.jsonl (a DatasetDict exported split by split), or subfolders train/
    and test/, holds its splits side by side as a folder of Hub shards does: data.split picks one, as
    datasets.load_dataset picks it from the same folder. Read whole, a run trained on the test split too."""
    splits = {"train": [conversation(f"Q{i}?", f"A{i}.") for i in range(5)],
              "test": [conversation(f"Held-out {i}?", f"H{i}.") for i in range(2)]}
    folder = tmp_path / "data"
    for split, rows in splits.items():
        path = folder / f"{split}.jsonl" if layout == "files" else folder / split / "part-0.jsonl"
        path.parent.mkdir(parents=True, exist_ok=True)
        write_jsonl(path, rows)
    for split, rows in splits.items():
        with caplog.at_level(logging.INFO, logger="spin_fast.data"):
            read = load_examples(folder, split=split).examples
        assert sorted(e.response for e in read) == sorted(r["messages"][1]["content"] for r in rows), split
        assert sorted(r["messages"][1]["content"] for r in datasets.load_dataset(str(folder), split=split)) == \
            sorted(e.response for e in read)
        assert f"read split {split}" in caplog.text and f"left the splits {({'train', 'test'} - {split}).pop()}" \
            in caplog.text
    assert data_module.reads_one_split(folder)  # eval keys its saved figures by the rows read, too
    held_out = DataConfig(source=str(folder), eval_source=str(folder), eval_split="test").held_out()
    assert [e.response for e in read_examples(held_out, str(folder))] == ["H0.", "H1."]  # data.eval_split's rows
    with pytest.raises(DataError, match=r"holds the splits test, train.*data\.split='validation'"):
        load_examples(folder, split="validation")


def test_eval_datas_split_errors_and_warnings_name_data_eval_split(tmp_path, caplog):
    """eval_source is read with data.eval_split (DataConfig.held_out): its bad or unused split named data.split, and
    a user who set data.split to mend it broke the training data's split instead."""
    folder = tmp_path / "data"
    folder.mkdir()
    for split in ("train", "test"):
        write_jsonl(folder / f"{split}.jsonl", [GOOD])
    held_out = DataConfig(source=str(folder), eval_source=str(folder), eval_split="validation").held_out()
    with pytest.raises(DataError, match=r"none of them data\.eval_split='validation': set data\.eval_split to one$"):
        read_examples(held_out, str(folder))
    single = write_jsonl(tmp_path / "eval.jsonl", [GOOD])
    with caplog.at_level(logging.WARNING, logger="spin_fast.data"):
        read_examples(DataConfig(source=str(folder), eval_source=str(single), eval_split="test").held_out(),
                      str(single))
    assert caplog.messages == [unused_split_warning(single, "holds no splits", "test", "data.eval_split")]


@pytest.mark.parametrize("names, split, read", [
    (["train.jsonl", "train_extra.jsonl"], "train", 2),  # one split's parts: read whole
    (["train_0.jsonl", "train_1.jsonl"], "train", 2),
    (["train_sft.jsonl", "test_cases.jsonl", "notes.jsonl"], "train", 1),  # train's; test's; named by no split
    (["train.jsonl", "dev.jsonl"], "dev", 1),  # dev is validation's, as datasets names it
    (["my-train-1.jsonl", "validation.jsonl", "eval_data.jsonl"], "test", 1),
])
def test_a_folders_splits_are_those_datasets_reads_in_its_names(tmp_path, names, split, read, caplog):
    """A split's words (train, training; validation, valid, val, dev; test, testing, eval, evaluation) between
    non-word characters name a file's split as datasets.load_dataset takes them: the same rows under data.split."""
    for index, name in enumerate(names):
        write_jsonl(tmp_path / name, [conversation(f"Q{index}?", f"{name}.")])
    with caplog.at_level(logging.WARNING, logger="spin_fast.data"):
        responses = sorted(e.response for e in load_examples(tmp_path, split=split).examples)
    assert len(responses) == read
    split = {"dev": "validation"}.get(split, split)
    theirs = datasets.load_dataset(str(tmp_path), split=split)
    assert sorted(r["messages"][1]["content"] for r in theirs) == responses
    assert ("named by no split" in caplog.text) == ("notes.jsonl" in names)


def test_a_split_named_by_hub_shards_is_read_by_its_own_name(tmp_path):
    """Hub shards name their split as it is (data/eval-00000-of-00001): data.split=eval reads eval's shards, as
    datasets does, not test's (which eval is a word of in file names)."""
    (tmp_path / "data").mkdir()
    for split in ("train", "eval"):
        write_jsonl(tmp_path / "data" / f"{split}-00000-of-00001.jsonl", [conversation("Q?", f"{split}.")])
    assert [e.response for e in load_examples(tmp_path, split="eval").examples] == ["eval."]
    assert [r["messages"][1]["content"] for r in datasets.load_dataset(str(tmp_path), split="eval")] == ["eval."]


def test_a_folder_of_files_not_named_by_split_is_read_whole(tmp_path):
    """Files named otherwise (a user's own parts) are one set: all of them are read, under any data.split."""
    write_jsonl(tmp_path / "alpaca.jsonl", [conversation("Q?", "A.")])
    write_jsonl(tmp_path / "dolly.jsonl", [conversation("R?", "B.")])
    (tmp_path / "more").mkdir()
    write_jsonl(tmp_path / "more" / "train.jsonl", [conversation("S?", "C.")])  # one split's name alone: no splits
    assert [e.response for e in load_examples(tmp_path).examples] == ["A.", "B.", "C."]
    assert not data_module.reads_one_split(tmp_path)


def chatml_tokenizer(im_end_added, corpus=None):
    """A ChatML fine-tune's tokenizer (eos <|endoftext|>) whose '<|im_end|>' is no special token: an added token that
    is not special (im_end_added), as some fine-tunes added it, or plain text that the tokenizer splits into pieces."""
    tokenizer = build_local_tokenizer(corpus)
    tokenizer.add_special_tokens({"additional_special_tokens": ["<|endoftext|>", "<|im_start|>"]})
    if im_end_added:
        tokenizer.add_tokens(["<|im_end|>"])  # special=False
    tokenizer.bos_token, tokenizer.eos_token = None, "<|endoftext|>"
    tokenizer.backend_tokenizer.post_processor = processors.TemplateProcessing(single="$A", pair="$A $B",
                                                                               special_tokens=[])
    tokenizer.chat_template = QWEN
    return tokenizer


def test_a_turn_end_added_as_a_token_that_is_not_special_ends_the_responses():
    """'<|im_end|>' added to the tokenizer as a token that is not special: one id, which the SFT model writes after
    every answer. Only special tokens were looked for after the probe answer, so responses ended with <|endoftext|>
    (which the model never writes there) and generation did not stop at <|im_end|>: the opponent's answers ran on
    into a next turn, and SPIN learned the ending, not the content."""
    tokenizer = chatml_tokenizer(im_end_added=True)
    im_end = tokenizer.convert_tokens_to_ids("<|im_end|>")
    assert im_end not in tokenizer.all_special_ids and tokenizer.encode("<|im_end|>") == [im_end]
    assert eos_token_id(tokenizer) == im_end
    example = Example((user("Why is the sky blue?"),), "Air.")
    tokenized = tokenize_example(tokenizer, example, max_length=200, max_prompt_length=100)
    prompt = list(tokenized.answered_prompt_ids)
    whole = tokenizer.apply_chat_template([*example.prompt, assistant(example.response)], tokenize=False)
    answer = tokenizer.encode(whole, add_special_tokens=False)[len(prompt):]  # Air . <|im_end|> \n
    assert list(tokenized.response_ids) == answer[: answer.index(im_end) + 1]
    chain = [prompt[-1], *answer]  # a model that writes the human answer as its template does, and on past it
    model = bigram_model(len(tokenizer), dict(zip(chain, chain[1:])), default=tokenizer.convert_tokens_to_ids("a"))
    model.generation_config = GenerationConfig(eos_token_id=tokenizer.eos_token_id)
    data = DataConfig(source="x", max_length=200, max_prompt_length=100)
    config = RunConfig(data=data, generation=GenerationSettings(engine="transformers"))
    engine = default_engine(model, tokenizer, config, "unused")
    completions = engine.generate([prompt], SamplingConfig(temperature=0.0, max_new_tokens=8))
    (pair,) = answered_pairs([tokenized], completions, data_module.response_end(tokenizer), data)
    assert tokenizer.convert_ids_to_tokens(pair.generated_ids) == tokenizer.convert_ids_to_tokens(pair.real_ids)


def test_the_transformers_engine_ends_an_answer_at_the_tokenizers_eos_beside_the_turn_end():
    """A ChatML fine-tune whose turn end <|im_end|> is the run's EOS (eos_token_id) may still write the tokenizer's
    <|endoftext|> after an answer: the answer ends there too, as vLLM's does, even where the model's
    generation_config lists no EOS."""
    tokenizer = chatml_tokenizer(im_end_added=True)
    assert eos_token_id(tokenizer) != tokenizer.eos_token_id
    prompt = render_prompt(tokenizer, [user("Why is the sky blue?")])
    air = tokenizer.encode("Air.", add_special_tokens=False)
    chain = [prompt[-1], *air, tokenizer.eos_token_id]  # then "a" on and on
    model = bigram_model(len(tokenizer), dict(zip(chain, chain[1:])), default=tokenizer.convert_tokens_to_ids("a"))
    model.generation_config = GenerationConfig()
    config = RunConfig(data=DataConfig(source="x", max_length=200, max_prompt_length=100),
                       generation=GenerationSettings(engine="transformers"))
    engine = default_engine(model, tokenizer, config, "unused")
    ((completion,),) = engine.generate([prompt], SamplingConfig(temperature=0.0, max_new_tokens=8))
    assert completion == Completion(tuple(air), True)


def split_turn_end_model(head_dim=None, corpus_line="Air<|im_end|>\n"):
    """A ChatML tokenizer whose '<|im_end|>' is plain text split into pieces ('<|', 'im', '_', 'end', '|>': none
    repeats, so that a bigram model can write them), an example tokenized, the human answer's ids through the turn
    end, and a model that writes the human answer as the template does and on past it (into the answer again).
    corpus_line: the tokenizer's training text beside its corpus, 20 times."""
    tokenizer = chatml_tokenizer(im_end_added=False, corpus=[*DEFAULT_CORPUS, *[corpus_line] * 20])
    pieces = tokenizer.encode("<|im_end|>", add_special_tokens=False)
    assert len(pieces) > 1 and len(set(pieces)) == len(pieces)
    example = Example((user("Why is the sky blue?"),), "Air.")
    tokenized = tokenize_example(tokenizer, example, max_length=200, max_prompt_length=100)
    prompt = list(tokenized.answered_prompt_ids)
    whole = tokenizer.apply_chat_template([*example.prompt, assistant(example.response)], tokenize=False)
    answer = tokenizer.encode(whole, add_special_tokens=False)[len(prompt):]  # Air . <| im _ end |> \n
    chain = [prompt[-1], *answer]
    model = bigram_model(len(tokenizer), dict(zip(chain, chain[1:])), default=tokenizer.convert_tokens_to_ids("a"),
                         head_dim=head_dim)
    model.generation_config = GenerationConfig(eos_token_id=tokenizer.eos_token_id)
    return tokenizer, tokenized, answer[: answer.index(pieces[-1]) + 1], model


def split_turn_end_setup(max_new_tokens=12):
    """split_turn_end_model's, and the answers the default engine (transformers) gives its model."""
    tokenizer, tokenized, through_turn_end, model = split_turn_end_model()
    data = DataConfig(source="x", max_length=200, max_prompt_length=100)
    config = RunConfig(data=data, generation=GenerationSettings(engine="transformers"))
    engine = default_engine(model, tokenizer, config, "unused")
    completions = engine.generate([list(tokenized.answered_prompt_ids)],
                                  SamplingConfig(temperature=0.0, max_new_tokens=max_new_tokens))
    return tokenizer, tokenized, through_turn_end, completions, data


def test_a_real_response_ends_with_a_turn_end_the_tokenizer_splits_into_pieces():
    """'<|im_end|>' as plain text: the human response ended with the tokenizer's EOS (<|endoftext|>), which the model
    never writes after an answer, not with the turn end's pieces it does write; SPIN learned that ending."""
    tokenizer, tokenized, through_turn_end, _, _ = split_turn_end_setup()
    assert tokenizer.convert_ids_to_tokens(tokenized.response_ids) == tokenizer.convert_ids_to_tokens(
        through_turn_end)


def test_a_cut_real_response_still_ends_with_a_turn_end_the_tokenizer_splits_into_pieces():
    """A response cut to fit max_length ends with the turn end's pieces, as a cut one ends with the turn end token."""
    tokenizer, tokenized, _, _ = split_turn_end_model()
    pieces = tokenizer.encode("<|im_end|>", add_special_tokens=False)
    room = len(pieces) + 3
    example = Example((user("Why is the sky blue?"),), "Air. " * 30)
    prompt_length = len(tokenized.prompt_ids)
    cut = tokenize_example(tokenizer, example, max_length=prompt_length + room, max_prompt_length=prompt_length)
    assert len(cut.response_ids) == room and list(cut.response_ids[-len(pieces):]) == pieces


def test_settings_that_leave_a_cut_response_no_room_for_the_turn_ends_pieces_are_refused():
    """max_length - max_prompt_length below the turn end's pieces: a response after a long prompt ended with part of
    them ('<|', 'im', '_', 'end'), which SPIN would teach as the way answers end. Refused, naming the settings."""
    tokenizer, tokenized, _, _ = split_turn_end_model()
    pieces = tokenizer.encode("<|im_end|>", add_special_tokens=False)
    example = Example((user("Why is the sky blue?"),), "Air. " * 30)
    prompt_length = len(tokenized.prompt_ids)
    room = rf"data.max_length - data.max_prompt_length \({len(pieces) - 1}\) leaves a cut response no room for the "
    with pytest.raises(ValueError, match=rf"{room}{len(pieces)} tokens"):
        tokenize_example(tokenizer, example, max_length=prompt_length + len(pieces) - 1,
                         max_prompt_length=prompt_length)
    # A run's data: the settings are named, not the first row (which a row-by-row retry would blame).
    data = DataConfig(source="rows.jsonl", max_length=prompt_length + len(pieces) - 1, max_prompt_length=prompt_length)
    with pytest.raises(ValueError, match=rf"^{room}"):
        tokenize_examples(tokenizer, data, [example])
    cut = tokenize_example(tokenizer, example, max_length=prompt_length + len(pieces), max_prompt_length=prompt_length)
    assert list(cut.response_ids) == pieces  # room for the turn end alone: it is kept whole
    # "when_too_long" cuts a too-long response to its first max_length - max_prompt_length tokens, its end lost
    # anyway (the official rule): the same settings are no error there.
    whole = tokenize_example(tokenizer, example, max_length=500, max_prompt_length=prompt_length).response_ids
    cut = tokenize_example(tokenizer, example, max_length=prompt_length + len(pieces) - 1,
                           max_prompt_length=prompt_length, cut_prompt="when_too_long")
    assert cut.response_ids == whole[: len(pieces) - 1] and cut.response_ids[0] != pieces[0]


def test_generation_stops_at_a_turn_end_the_tokenizer_splits_into_pieces():
    """Generation stopped only at single stop tokens: answers ran on past '<|im_end|>' to max_new_tokens."""
    tokenizer, _, _, completions, _ = split_turn_end_setup(max_new_tokens=12)
    ((completion,),) = completions
    assert completion.finished
    assert tokenizer.decode(completion.token_ids) == "Air."  # cut before the turn end, as a stop token is


def test_a_generated_response_is_cut_at_a_turn_end_the_tokenizer_splits_into_pieces():
    """The opponent's answer kept for training ends as the human one does, at the turn end's pieces: not with the
    turn end's text and what follows it (the next answer, up to max_new_tokens) closed by <|endoftext|>."""
    tokenizer, tokenized, _, completions, data = split_turn_end_setup(max_new_tokens=12)
    (pair,) = answered_pairs([tokenized], completions, data_module.response_end(tokenizer), data)
    assert tokenizer.convert_ids_to_tokens(pair.generated_ids) == tokenizer.convert_ids_to_tokens(pair.real_ids)


def test_a_generated_answer_keeps_the_text_its_last_token_shares_with_a_split_turn_end():
    """A byte-level BPE reads '.<|' as one piece of text (GPT-2's pre-tokenizer) and, trained on such conversations,
    merges it: the model writes 'Air', '.<|', 'im', ... The answer was cut before the token the stop text begins in,
    so it lost its '.', which the real response keeps: every generated answer differed from the real one by its last
    character, and SPIN learned that."""
    tokenizer, tokenized, _, model = split_turn_end_model(corpus_line="Air.<|im_end|>\n")
    conversation = tokenizer.apply_chat_template([user("Why is the sky blue?"), assistant("Air.")], tokenize=False)
    assert ".<|" in tokenizer.convert_ids_to_tokens(tokenizer.encode(conversation, add_special_tokens=False))
    data = DataConfig(source="x", max_length=200, max_prompt_length=100)
    config = RunConfig(data=data, generation=GenerationSettings(engine="transformers"))
    completions = default_engine(model, tokenizer, config, "unused").generate(
        [list(tokenized.answered_prompt_ids)], SamplingConfig(temperature=0.0, max_new_tokens=12))
    ((completion,),) = completions
    assert completion.finished and tokenizer.decode(completion.token_ids) == "Air.", completion
    (pair,) = answered_pairs([tokenized], completions, data_module.response_end(tokenizer), data)
    assert tokenizer.convert_ids_to_tokens(pair.generated_ids) == tokenizer.convert_ids_to_tokens(pair.real_ids)


def test_a_split_turn_end_that_merges_with_the_probe_answer_gains_no_space():
    """A SentencePiece tokenizer trained on ChatML text merges the probe answer's '.' with '<|im_end|>' ('.<|'):
    the turn end's pieces were then encoded on their own, where a Metaspace tokenizer starts a text with '▁'. Every
    response, real and generated, ended with ' <|im_end|>': a space that neither the template nor the model writes
    there, trained on and scored in every pair. The pieces are those that follow an answer they do not merge with."""
    tokenizer = sentencepiece_tokenizer(QWEN, ["answer.<|im_end|>\n Air.<|im_end|>\n"] * 20)
    probe = tokenizer.apply_chat_template([user("Hi"), assistant(data_module.PROBE_ANSWER)], tokenize=False)
    assert any(".<|" in piece for piece in tokenizer.convert_ids_to_tokens(tokenizer.encode(probe)))
    for answer in ("Air!", "Air?", "Air", "Air ", "Air\n"):
        example = Example((user("Why is the sky blue?"),), answer)
        tokenized = tokenize_example(tokenizer, example, max_length=200, max_prompt_length=100)
        whole = tokenizer.apply_chat_template([*example.prompt, assistant(answer)], tokenize=False)
        through_turn_end = whole[: whole.rindex("<|im_end|>") + len("<|im_end|>")]
        assert tokenizer.decode(tokenized.response_ids) == answer + "<|im_end|>"
        assert tokenized.prompt_ids + tokenized.response_ids == tuple(tokenizer.encode(through_turn_end))


def test_a_turn_end_the_tokenizer_splits_into_pieces_is_no_warning(caplog):
    """Once responses end with the turn end's pieces and generation stops at its text, there is nothing to warn of
    (a warning that answers run on to max_new_tokens would be false)."""
    tokenizer = chatml_tokenizer(im_end_added=False)
    assert len(tokenizer.encode("<|im_end|>")) > 1
    with caplog.at_level(logging.WARNING, logger="spin_fast.data"):
        assert eos_token_id(tokenizer) == tokenizer.eos_token_id
        assert data_module.turn_end_text(tokenizer) == "<|im_end|>"
    assert "max_new_tokens" not in caplog.text, caplog.text


def test_an_added_whitespace_token_after_the_answer_ends_no_turn():
    """Tokenizers of the GPT-NeoX family add runs of whitespace as tokens that are not special: one written after
    the answer is no turn end (answers would be cut at their first blank line), the tokenizer's EOS is."""
    from tokenizers import AddedToken

    tokenizer = build_local_tokenizer()
    tokenizer.add_tokens([AddedToken("\n\n", normalized=False)])
    tokenizer.chat_template = "{% for m in messages %}{{ m['role'] }}: {{ m['content'] }}\n\n{% endfor %}"
    blank = tokenizer.convert_tokens_to_ids("\n\n")
    assert blank in tokenizer.encode("Hi\n\n", add_special_tokens=False)  # the template's ending is that token
    assert eos_token_id(tokenizer) == tokenizer.eos_token_id


def test_read_examples_names_the_override_that_gave_a_missing_file(tmp_path):
    """The run named an iteration override's missing file by matching the start of read_examples' message; the
    override is passed in (`where`) and read_examples names it, with the file's own setting."""
    missing = str(tmp_path / "nope.jsonl")
    with pytest.raises(FileNotFoundError, match=rf"^iteration_overrides\[1\]: data.eval_source '{missing}': no such"):
        read_examples(DataConfig(eval_source=missing), missing, where="iteration_overrides[1]")
    with pytest.raises(FileNotFoundError, match=rf"^data.source '{missing}': no such file or directory$"):
        read_examples(DataConfig(source=missing), missing)


def test_a_batch_asks_the_tokenizer_whether_it_adds_bos_once(monkeypatch):
    """Whether the tokenizer's own encoding starts with BOS (zephyr's template has none, its tokenizer adds it) is
    one answer for every prompt: asked once a batch, not by a call to the tokenizer per example (18 s of 200k rows
    in the official SPIN setting). The prompts are render_prompt's, BOS first, as before."""
    tokenizer = sentencepiece_tokenizer(ZEPHYR_LIKE)
    examples = [Example((user(f"Question number {i}?"),), f"Answer {i}.") for i in range(60)]
    expected = [tuple(render_prompt(tokenizer, e.prompt)) for e in examples]
    calls = []
    real_encode = tokenizer.encode
    monkeypatch.setattr(tokenizer, "encode", lambda *args, **kwargs: calls.append(args) or real_encode(*args, **kwargs))
    out = tokenize_batch(tokenizer, examples, max_length=64, max_prompt_length=32)
    assert [e.prompt_ids for e in out] == expected and expected[0][0] == tokenizer.bos_token_id
    assert len(calls) < 10, f"{len(calls)} calls to tokenizer.encode for {len(examples)} examples"


def test_tokens_digest_tells_apart_whole_prompts_that_fitting_cut_to_the_same_ids():
    """Under data.cut_prompt=when_too_long the opponent answers the whole prompt (unfitted), while training sees it
    cut: a chat template changed only at the start of a long prompt leaves the cut ids as they were, and a resumed run
    (keep_same_data compares this digest) would mix answers to the old whole prompts with answers to the new."""
    from spin_fast.data import TokenizedExample
    from spin_fast.examples import tokens_digest

    fitted = TokenizedExample((7, 8), (9,), None)
    before = TokenizedExample(fitted.prompt_ids, fitted.response_ids, None, TokenizedExample((5, 6, 7, 8), (9,), None))
    after = TokenizedExample(fitted.prompt_ids, fitted.response_ids, None, TokenizedExample((4, 6, 7, 8), (9,), None))
    assert tokens_digest([before]) != tokens_digest([after])
    assert tokens_digest([before]) == tokens_digest([TokenizedExample((7, 8), (9,), None, before.unfitted)])


def test_the_vocabularys_last_id_is_in_it_and_the_id_past_it_is_refused(tokenizer, tmp_path):
    """vocab_size V: the embedding's rows are ids 0 to V-1. A row holding id V-1 is accepted, one holding id V is
    named; so is the token responses end with, at id V (eos id 1 here: a vocab_size of 1 leaves it out)."""
    from spin_fast.data import TokenizedExample
    from spin_fast.examples import check_in_vocabulary
    from spin_fast.model import tiny_config

    assert eos_token_id(tokenizer) == 1
    tiny_config(vocab_size=100).save_pretrained(tmp_path / "v100")
    check_in_vocabulary(tokenizer, [TokenizedExample((3, 99), (99, 1), None)], str(tmp_path / "v100"), False)
    with pytest.raises(ValueError, match=r"^example 0 \(counted from 0\): token id 100 .* is outside the model's "
                                         r"vocabulary of 100 tokens"):
        check_in_vocabulary(tokenizer, [TokenizedExample((3, 100), (99, 1), None)], str(tmp_path / "v100"), False)
    tiny_config(vocab_size=2).save_pretrained(tmp_path / "v2")
    check_in_vocabulary(tokenizer, [TokenizedExample((0,), (1,), None)], str(tmp_path / "v2"), False)
    tiny_config(vocab_size=1).save_pretrained(tmp_path / "v1")
    with pytest.raises(ValueError, match=r"^model.name_or_path: the token responses end with, id 1 .* is outside the "
                                         r"model's vocabulary of 1 tokens"):
        check_in_vocabulary(tokenizer, [], str(tmp_path / "v1"), False)

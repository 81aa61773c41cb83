"""spin_fast.data at the edges of real SFT sets: text JSON can hold but no tokenizer encodes, and local copies of
Hub datasets with their splits side by side."""

from __future__ import annotations

import json

import datasets
import pytest

from spin_fast.config import DataConfig
from spin_fast.data import DataError, load_examples
from spin_fast.examples import read_examples, tokenize_examples
from spin_fast.tokenizer import build_local_tokenizer


def conversation(question, answer):
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


def test_an_epoch_permutes_its_items_once_not_once_a_step(monkeypatch):
    """step_items drew the epoch's whole permutation of n items again at every step: n / global_batch steps an epoch,
    O(n^2 / global_batch) per epoch (400k pairs, the 200k prompts of UltraChat mixed with the previous iteration's:
    6250 permutations of 400k items an epoch, minutes of CPU while the GPUs wait). The order stays the same."""
    import torch

    from spin_fast.config import TrainConfig
    from spin_fast.training import epoch_order, step_items

    n_items, config = 1000, TrainConfig(global_batch=64, epochs=2)
    per_epoch = -(-n_items // config.global_batch)
    expected = [epoch_order(n_items, config.seed, epoch) for epoch in range(2)]
    drawn = []
    real_randperm = torch.randperm
    monkeypatch.setattr(torch, "randperm", lambda n, **kw: drawn.append(n) or real_randperm(n, **kw))
    steps = [step_items(n_items, config, step) for step in range(2 * per_epoch)]
    assert [i for step in steps[:per_epoch] for i in step] == expected[0]
    assert [i for step in steps[per_epoch:] for i in step] == expected[1]
    assert len(drawn) <= 2, f"{len(drawn)} permutations of {n_items} items for {2 * per_epoch} steps of 2 epochs"

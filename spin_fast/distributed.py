"""Processes working together: who am I, how work is split across ranks, and how results come back.

A run is distributed when it is launched with several processes (torchrun, the deepspeed launcher, SLURM
through either): WORLD_SIZE > 1 in the environment. On one process every helper here is a no-op, so the
same code runs both ways. Collectives go through torch.distributed (NCCL on GPUs, gloo on the CPU),
initialised by DeepSpeed, with a timeout: a rank that dies makes the others fail with an error, not hang.
"""

from __future__ import annotations

import contextlib
import datetime
import logging
import os
import signal
import sys
import threading
import traceback
from collections.abc import Callable, Iterator, Sequence
from typing import Any, NoReturn

import torch
import torch.distributed as dist

log = logging.getLogger(__name__)
_timeout: datetime.timedelta | None = None  # init's, for the groups made later (torch's default for NCCL: 10 min)


def launched_distributed() -> bool:
    """Started by a launcher with more than one process."""
    return int(os.environ.get("WORLD_SIZE", "1")) > 1


def check_launch() -> None:
    """Refuse the starts that would make every process run the whole job alone in one output_dir: several copies
    started by srun or mpirun without a launcher (no WORLD_SIZE), or a launch missing a variable the process
    group needs."""
    # Slurm's, Open MPI's, MPICH's and Intel MPI's (PMI), MVAPICH's count of the copies started.
    copies = {name: int(os.environ.get(name, "1")) for name in ("SLURM_STEP_NUM_TASKS", "OMPI_COMM_WORLD_SIZE",
                                                                 "PMI_SIZE", "MV2_COMM_WORLD_SIZE")}
    many = [f"{name}={count}" for name, count in copies.items() if count > 1]
    if many and "WORLD_SIZE" not in os.environ:
        raise ValueError(f"started as several processes ({', '.join(many)}) without a launcher: each would run the "
                         "whole job; start one torchrun per node (configs/launch/slurm.sbatch) or use the deepspeed "
                         "launcher")
    missing = [name for name in ("RANK", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT") if name not in os.environ]
    if launched_distributed() and missing:
        raise ValueError(f"WORLD_SIZE={os.environ['WORLD_SIZE']} but {', '.join(missing)} not set: start spin-fast "
                         "with torchrun or the deepspeed launcher, which set them all")


def initialized() -> bool:
    return dist.is_available() and dist.is_initialized()


def init(timeout_minutes: float = 30.0) -> None:
    """Join the process group set up by the launcher (idempotent). The timeout bounds every collective."""
    if initialized():
        return
    import deepspeed

    if torch.cuda.is_available():  # before NCCL starts, or every rank would talk from GPU 0
        torch.cuda.set_device(local_gpu())
    global _timeout
    timeout = _timeout = datetime.timedelta(minutes=timeout_minutes)
    if not launched_distributed():  # deepspeed.enabled on one process, started without a launcher: a group of one
        # (without these, DeepSpeed looks for MPI's variables through mpi4py)
        for name, value in (("WORLD_SIZE", "1"), ("RANK", "0"), ("LOCAL_RANK", "0"), ("MASTER_ADDR", "127.0.0.1"),
                            ("MASTER_PORT", str(free_port()))):
            os.environ.setdefault(name, value)
    with ended_by_signals():
        deepspeed.init_distributed(timeout=timeout, verbose=False)
        # ZeRO's collectives run on DeepSpeed's clone of the world group, which it would make without a timeout
        # (torch's default: 10 min on NCCL); made here first, the clone has this one.
        from deepspeed.utils import groups

        if getattr(groups, "_WORLD_GROUP", False) is None:
            groups._WORLD_GROUP = dist.new_group(ranks=list(range(dist.get_world_size())), timeout=timeout)
    log.info("rank %d of %d (backend %s, collective timeout %s)", rank(), world_size(), dist.get_backend(), timeout)


def local_gpu() -> int:
    """This rank's GPU: LOCAL_RANK, which must be one of the node's visible GPUs (else CUDA's bare "invalid device
    ordinal", naming neither the launch nor the count)."""
    local, count = int(os.environ.get("LOCAL_RANK", "0")), torch.cuda.device_count()
    if local >= count:
        raise ValueError(f"LOCAL_RANK={local} but this node has {count} visible GPU(s): start at most {count} "
                         f"processes per node (torchrun --nproc-per-node={count}; configs/launch/slurm.sbatch "
                         "starts one per GPU of the job's --gpus-per-node)")
    return local


def free_port() -> int:
    """A TCP port on this machine that no one listens on now, for a rendezvous started here."""
    import socket

    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


ENDING_SIGNALS = (signal.SIGTERM, signal.SIGUSR1, signal.SIGINT)  # the scheduler's, Slurm's warning, Ctrl-C


@contextlib.contextmanager
def signals_sent_to(handler: Callable[[int, Any], None] | int) -> Iterator[None]:
    """ENDING_SIGNALS go to `handler` in the block, then back to the previous handlers (the main thread only:
    Python allows no other, and elsewhere the block runs with the handlers as they are)."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    previous = {signum: signal.signal(signum, handler) for signum in ENDING_SIGNALS}
    try:
        yield
    finally:
        for signum, previous_handler in previous.items():
            signal.signal(signum, previous_handler)


def ended_by_signals() -> contextlib.AbstractContextManager[None]:
    """ENDING_SIGNALS end the process at once in the block: waiting for the other ranks to join, torch's C++
    never returns to Python, whose handlers (spin_fast.stopping's, KeyboardInterrupt) would then wait for the
    whole timeout. No work has started there, so none is lost."""
    return signals_sent_to(signal.SIG_DFL)


def collective_timeout() -> datetime.timedelta | None:
    """The timeout `init` gave the launcher's group (None: not started by `init`), for subgroups to share."""
    return _timeout


def shutdown() -> None:
    """Leave the process group at the end of a launched program (a no-op on one process): every rank waits for
    the others, then destroys it. Left to the interpreter's exit, gloo with subgroups (DeepSpeed's, the vLLM
    tensor-parallel groups) sometimes aborts a process that has finished all its work ("terminate called without
    an active exception", exit status -6); it still did once after this, so the program then skips the
    interpreter's teardown too (leave)."""
    if initialized():
        barrier("end of the program")
        me = rank()
        dist.destroy_process_group()
        remove_deepspeed_cpu_buffer(me)


def leave(status: int) -> NoReturn:
    """End the program with `status`. Under a launcher the process leaves at once, as os._exit does, without the
    interpreter's teardown: there gloo's worker threads, held by process groups that torch or DeepSpeed destroy
    last, sometimes abort a process that has finished and saved all its work (exit -6, "terminate called without an
    active exception"), and the launcher reports the whole job failed."""
    if not launched_distributed():
        sys.exit(status)
    if "wandb" in sys.modules:  # its service process, which the skipped exit handlers would have stopped
        sys.modules["wandb"].teardown()
    logging.shutdown()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(status)


def leave_with(main: Callable[[], int]) -> NoReturn:
    """End the program with main()'s exit status, as leave does. Under a launcher an error (a bug, out of memory)
    leaves that way too, with its traceback and status 1, not through the teardown leave avoids."""
    try:
        status = main()
    except Exception:
        if not launched_distributed():
            raise
        traceback.print_exc()
        status = 1
    leave(status)


def remove_deepspeed_cpu_buffer(rank: int) -> None:
    """DeepSpeed's CPU all-reduce (every rank on one machine, no GPU) gives each rank a 66 MiB file in /dev/shm,
    named by user, MASTER_ADDR, MASTER_PORT and rank, and never removes it: memory lost until the machine reboots.
    Each rank removes its own once every rank is past the last collective (a peer's mapping outlives the name)."""
    name = (f"deepspeed_allreduce_buffer_{os.getuid()}_{os.environ.get('MASTER_ADDR', '')}_"
            f"{os.environ.get('MASTER_PORT', '')}_{rank}")
    with contextlib.suppress(OSError):
        os.unlink(os.path.join("/dev/shm", name))


def progress_bar(batches, what: str, shown: bool, unit: str = "batch"):
    """The batches, with a progress bar when `shown`, on rank 0 only: every rank's share is as long, and one bar
    per rank would garble the terminal."""
    from tqdm.auto import tqdm

    return tqdm(batches, desc=what, unit=unit, disable=not shown or not is_main())


def rank() -> int:
    return dist.get_rank() if initialized() else 0


def world_size() -> int:
    return dist.get_world_size() if initialized() else 1


def node_first_rank() -> int:
    """The rank of this rank's node's first process (LOCAL_RANK 0): launchers number the ranks node by node."""
    return rank() - int(os.environ.get("LOCAL_RANK", "0"))


def is_main() -> bool:
    return rank() == 0


def barrier(what: str) -> None:
    """Wait for every rank; on a timeout or a dead peer, say where this rank was waiting."""
    if not initialized():
        return
    try:
        dist.barrier()
    except Exception as error:  # noqa: BLE001 - gloo and NCCL raise different types
        raise RuntimeError(f"rank {rank()}: waiting for the other ranks at '{what}' failed: {error}") from error


def all_reduce_sum(values: torch.Tensor, what: str) -> torch.Tensor:
    """Element-wise sum over ranks (a copy; float64 on the CPU for exact counts and sums)."""
    return _all_reduce(values.detach().to(torch.float64).clone(), dist.ReduceOp.SUM, "summing", what)


def all_reduce_max(values: list[int], what: str) -> list[int]:
    """The largest of every rank's `values[i]`, for each i (several numbers in one collective)."""
    return _all_reduce(torch.tensor(values, dtype=torch.int64), dist.ReduceOp.MAX, "comparing", what).tolist()


def _all_reduce(values: torch.Tensor, op, doing: str, what: str) -> torch.Tensor:
    if not initialized():
        return values
    if dist.get_backend() == "nccl":
        values = values.cuda()
    try:
        dist.all_reduce(values, op=op)
    except Exception as error:  # noqa: BLE001
        raise RuntimeError(f"rank {rank()}: {doing} '{what}' across ranks failed: {error}") from error
    return values.cpu()


def all_gather_objects(obj: Any, what: str) -> list[Any]:
    """Every rank's `obj`, in rank order, on every rank."""
    if not initialized():
        return [obj]
    gathered: list[Any] = [None] * world_size()
    try:
        dist.all_gather_object(gathered, obj)
    except Exception as error:  # noqa: BLE001
        raise RuntimeError(f"rank {rank()}: gathering '{what}' from the other ranks failed: {error}") from error
    return gathered


def from_main(obj: Any, what: str) -> Any:
    """Rank 0's `obj` on every rank. For decisions read from files (is this stage done? which checkpoint is the
    latest?): on a filesystem shared by several nodes another node may see a new file late (NFS caches a name's
    absence for up to a minute), and ranks that decided differently would wait for each other forever."""
    if not initialized():
        return obj
    box = [obj if is_main() else None]
    try:
        dist.broadcast_object_list(box, src=0)
    except Exception as error:  # noqa: BLE001
        raise RuntimeError(f"rank {rank()}: receiving '{what}' from rank 0 failed: {error}") from error
    return box[0]


def on_main(work: Callable[[], Any], what: str) -> Any:
    """`work()` run on rank 0 alone while the others wait, its result on every rank: a check only rank 0 can make
    (its files, its login), or files it alone writes. An error it raises stops every rank at once (rank 0 raises
    it, the others a ValueError with its message) instead of leaving the others waiting in their next collective
    until the timeout."""
    error = None
    try:
        done = (work() if is_main() else None, None)
    except Exception as raised:  # noqa: BLE001 - any error: the others must not wait for a rank that left
        error, done = raised, (None, error_message(raised))
    result, refused = from_main(done, what)
    if error is not None:
        raise error
    if refused:
        raise ValueError(refused)
    return result


def on_every_rank(work: Callable[[], Any], what: str) -> Any:
    """`work()` run on every rank, then every rank in step (a barrier); an error on any rank stops them all at once,
    as on_main's do. For work each rank does for itself (its shard of a checkpoint)."""
    try:
        result, failure = work(), None
    except Exception as raised:  # noqa: BLE001 - told to every rank, then raised
        result, failure = None, raised
    raise_any_ranks_failure(failure, what)
    return result


def raise_any_ranks_failure(failure: Exception | None, what: str) -> None:
    """Every rank tells the others whether its work failed: the one that failed raises its own error, the others
    a ValueError naming the lowest failed rank and its error."""
    failures = all_gather_objects(None if failure is None else error_message(failure), what)
    if failure is not None:
        raise failure
    for other, message in enumerate(failures):
        if message:
            raise ValueError(f"rank {other}: {message}")


def check_same_on_every_rank(value: Any, what: str) -> None:
    """An error on every rank when the ranks' `value`s (hashable) differ: settings each rank read for itself (its
    config file, its --set options), which would otherwise compute apart and wait for each other in collectives
    they do not share."""
    values = all_gather_objects(value, what)
    if len(set(values)) > 1:
        ranks = [rank for rank, other in enumerate(values) if other != values[0]]
        raise ValueError(f"rank{'s' if len(ranks) > 1 else ''} {', '.join(map(str, ranks))} read other {what} than "
                         "rank 0: every rank must be started with the same config file and options")


def error_message(error: Exception) -> str:
    """An error as one line for the other ranks: its message, after its type unless a ValueError or OSError (the
    errors of bad input, whose messages say it all)."""
    return str(error) if isinstance(error, (ValueError, OSError)) else f"{type(error).__name__}: {error}"


@contextlib.contextmanager
def main_first(what: str) -> Iterator[None]:
    """Rank 0 runs the block first, then every other rank at once: for downloads into a shared cache, which
    the others then only read (16 processes fetching the same files contend on the cache's file locks, which
    network filesystems may not even provide). An error stops every rank at once, as a ValueError on the others:
    rank 0's before they start the block, any other rank's when every rank has run it (a path missing on one
    node), instead of leaving them waiting in their next collective."""
    if not initialized():
        yield
        return
    failure = None
    if is_main():
        try:
            yield
        except Exception as error:
            from_main(error_message(error), what)
            raise
        from_main(None, what)
    else:
        refused = from_main(None, what)
        if refused:
            raise ValueError(refused)
        try:
            yield
        except Exception as error:  # noqa: BLE001 - told to every rank, then raised
            failure = error
    raise_any_ranks_failure(failure, what)


def in_step(items: Sequence[Any], what: str) -> list[Any]:
    """`items` padded with None to the longest list of any rank: for loops whose every pass is a collective
    (a ZeRO-3 partitioned model's forward), where a rank with fewer items runs filler passes."""
    most = max(all_gather_objects(len(items), what))
    return [*items, *[None] * (most - len(items))]


def balance(costs: Sequence[int], ranks: int) -> list[list[int]]:
    """Indices of `costs` split into `ranks` lists with near-equal total cost: longest first, each to the
    least-loaded rank (ties to the lowest rank), so every rank computes the same split."""
    loads = [0] * ranks
    shares: list[list[int]] = [[] for _ in range(ranks)]
    for index in sorted(range(len(costs)), key=lambda i: (-costs[i], i)):
        target = min(range(ranks), key=lambda r: (loads[r], r))
        shares[target].append(index)
        loads[target] += costs[index]
    return [sorted(share) for share in shares]


def share_work(costs: Sequence[int], compute: Callable[[list[int]], Sequence[Any]], what: str) -> list[Any]:
    """Every item's result, the same on every rank: this rank runs `compute` on its balanced share of the items
    (their indices; it returns one result each) and the ranks gather theirs in the items' order."""
    mine = balance(costs, world_size())[rank()]
    return gather_in_order(compute(mine), mine, len(costs), what)


def gather_in_order(local: Sequence[Any], indices: Sequence[int], total: int, what: str) -> list[Any]:
    """Rebuild a list of `total` results computed by the ranks: this rank computed `local[k]` for item
    `indices[k]`. The result is the same on every rank and independent of the world size."""
    result: list[Any] = [None] * total
    for share_indices, share in all_gather_objects((list(indices), list(local)), what):
        for index, item in zip(share_indices, share):
            result[index] = item
    missing = [i for i, item in enumerate(result) if item is None]
    if missing:
        raise RuntimeError(f"{what}: no rank returned items {missing[:10]}")
    return result

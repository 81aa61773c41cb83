"""The vLLM engine: one vllm.LLM for the whole run, new weights hot-swapped in memory (no restart, no reload).

Weights travel to the engine process as a safetensors file in /dev/shm (RAM): tensors passed as collective_rpc
arguments arrive as lists in vLLM's default multi-process mode. The worker then re-runs the model loader on them
(reload_weights); the model's own load_weights fails on the CPU build, whose linear weights are repacked.
On GPUs, vLLM's weight-transfer API (NCCL / CUDA IPC) would skip the copy through RAM; this path works everywhere.
"""

from __future__ import annotations

import contextlib
import fcntl
import gc
import logging
import os
import random
import shutil
import tempfile
import time
from collections import Counter
from collections.abc import Iterable, Iterator, Sequence
from pathlib import Path

import numpy as np
import torch

from spin_fast import distributed, stopping
from spin_fast.generation import engine_guard
from spin_fast.generation.base import Completion, SamplingConfig, answer_before_stop_text, generator_seed

_SHM = Path("/dev/shm")


class WeightSwapExtension:
    """Mixed into each vLLM worker (worker_extension_cls): methods that collective_rpc calls by name."""

    def spin_load_weights_file(self, path: str) -> None:
        """Reload the model's weights from a safetensors file, in place."""
        from safetensors import safe_open

        # The weights may name a tied head once, as the embeddings (full_weights under DeepSpeed, named_parameters):
        # the head is named as spin_load_weights_folder names it.
        tied = _tied_to_head(self.model_runner.get_model())  # type: ignore[attr-defined]
        with safe_open(path, framework="pt", device="cpu") as f:
            # A generator: one tensor in memory at a time beyond the model itself.
            pairs: Iterator[tuple[str, torch.Tensor]] = ((name, f.get_tensor(name)) for name in f.keys())
            self.reload_weights(weights_iterator=_with_tied_head(pairs, tied))  # type: ignore[attr-defined]

    def spin_load_weights_folder(self, path: str) -> None:
        """Reload the model's weights from a model folder, in place, as reload_weights(weights_path=path) does, but
        naming the head of a model that ties it to its embeddings: its folder holds the embeddings alone, and a layer
        that gets no weight keeps the tensors it had (the CPU build's head: its repacked copy of the old ones)."""
        from vllm.model_executor.model_loader import get_model_loader

        model = self.model_runner.get_model()  # type: ignore[attr-defined]
        config = self.vllm_config.model_config  # type: ignore[attr-defined]
        config.model, config.model_weights, config.revision = path, "", None  # reload_weights' own for a path
        weights = get_model_loader(self.vllm_config.load_config).get_all_weights(config, model)  # type: ignore
        # The ties are read now: the reload puts the model's tensors on the meta device before it reads `weights`.
        tied = _tied_to_head(model)
        self.reload_weights(weights_iterator=_with_tied_head(weights, tied))  # type: ignore[attr-defined]

    def spin_pid(self) -> int:
        """The worker's process id (tests check that a swap does not restart the engine)."""
        return os.getpid()


def _tied_to_head(model) -> set[str]:
    """The names of the parameters that a vLLM model ties its head (lm_head.weight) to: its embeddings, if tied."""
    head = getattr(getattr(model, "lm_head", None), "weight", None)
    return {name for name, p in model.named_parameters(remove_duplicate=False)
            if head is not None and p is head and name != "lm_head.weight"}


def _with_tied_head(weights: Iterable[tuple[str, torch.Tensor]], tied: set[str]
                    ) -> Iterator[tuple[str, torch.Tensor]]:
    """`weights`, with the head's weight (lm_head.weight) named just before a tensor it is tied to (the embeddings,
    which a tied model's folder holds alone), unless `weights` name it themselves (a state dict): once, either way."""
    headed = False
    for name, tensor in weights:
        if name == "lm_head.weight":
            if headed:  # named already, from the embeddings it is tied to
                continue
            headed = True
        elif name in tied and not headed:
            headed = True
            yield "lm_head.weight", tensor
        yield name, tensor


log = logging.getLogger(__name__)
_EXTENSION = f"{__name__}.{WeightSwapExtension.__qualname__}"


def moe_swap_refused(model_type: str, why: str = "") -> str:
    """Why the CPU build's engine takes no new weights for a mixture-of-experts model (`why`: what needs them):
    after a reload its prompt log-probs are off by nats (Mixtral, Qwen2-MoE), with no error."""
    return (f"the vLLM CPU build cannot swap the weights of a mixture-of-experts model ({model_type}): reloaded, "
            f"even from a folder, its experts compute garbage{why}; set generation.engine=transformers")


def check_tensor_parallel_layout(size: int, node_of_rank: Sequence[int]) -> None:
    """Groups of `size` consecutive ranks must tile the ranks without a group straddling two nodes needlessly
    (its every decoding step would wait on the network). node_of_rank[r]: the first rank of rank r's node."""
    world = len(node_of_rank)
    if world % size:
        raise ValueError(f"generation.tensor_parallel_size={size} must divide the number of processes ({world})")
    straddling = [start for start in range(0, world, size) if node_of_rank[start] != node_of_rank[start + size - 1]]
    per_node = sorted(Counter(node_of_rank).values())
    if straddling and size <= per_node[-1]:
        raise ValueError(f"generation.tensor_parallel_size={size} must divide the processes of every node "
                         f"({', '.join(map(str, sorted(set(per_node))))}): the engine of ranks {straddling[0]} to "
                         f"{straddling[0] + size - 1} would span two nodes")
    if straddling:
        log.warning("generation.tensor_parallel_size=%d is more than the processes of a node (%d): each vLLM engine "
                    "spans nodes, and its tensor-parallel traffic crosses the network", size, per_node[-1])


def tensor_parallel_group(size: int):
    """This rank's torch.distributed group of `size` consecutive ranks: those that run one vLLM engine together
    under vLLM's external launcher (which groups tensor-parallel ranks the same way)."""
    import torch.distributed as dist

    nodes = distributed.all_gather_objects(distributed.node_first_rank(), "the ranks' nodes")
    check_tensor_parallel_layout(size, nodes)
    world = dist.get_world_size()
    group, _ = dist.new_subgroups_by_enumeration([list(range(start, start + size)) for start in range(0, world, size)],
                                                 timeout=distributed.collective_timeout())
    return group


def share_requests(prompts: Sequence[Sequence[int]], indices: Sequence[int], group
                   ) -> tuple[list[list[int]], list[int], slice]:
    """The requests of every rank of `group`, in group-rank order, and where this rank's own ones lie among them:
    ranks that drive one tensor-parallel engine generate the union of their prompts, each keeping its share."""
    import torch.distributed as dist

    shares: list = [None] * dist.get_world_size(group)
    dist.all_gather_object(shares, ([list(map(int, p)) for p in prompts], [int(i) for i in indices]), group=group)
    start = sum(len(share_prompts) for share_prompts, _ in shares[: dist.get_rank(group)])
    every_prompt = [p for share_prompts, _ in shares for p in share_prompts]
    every_index = [i for _, share_indices in shares for i in share_indices]
    return every_prompt, every_index, slice(start, start + len(prompts))


def writes_node_files() -> bool:
    """This rank writes its node's weight files: the node's first rank (every process, when not launched)."""
    return distributed.node_first_rank() == distributed.rank() or not distributed.initialized()


def weight_dirs() -> list[Path]:
    """Where weight files go: RAM (/dev/shm) when it has room, else the temporary directory."""
    return [_SHM, Path(tempfile.gettempdir())] if _SHM.is_dir() else [Path(tempfile.gettempdir())]


def write_weight_file(tensors: dict[str, torch.Tensor]) -> tuple[str, int]:
    """A safetensors file in RAM (/dev/shm) when there is room, else in the temporary directory, and an open
    descriptor holding a shared lock on it until the caller removes the file and closes the descriptor."""
    from safetensors.torch import save_file

    size = sum(t.numel() * t.element_size() for t in tensors.values())
    dirs = weight_dirs()
    directory = dirs[0] if shutil.disk_usage(dirs[0]).free > 2 * size else dirs[-1]
    fd, path = tempfile.mkstemp(suffix=".safetensors", prefix="spin-weights-", dir=directory)
    os.close(fd)
    try:
        save_file(tensors, path)  # safetensors puts a new file under the name: it is locked once written
        lock = os.open(path, os.O_RDONLY)
        fcntl.flock(lock, fcntl.LOCK_SH)
    except BaseException:
        os.unlink(path)
        raise
    return path, lock


def remove_orphaned_weight_files(directories: Sequence[Path], quiet_seconds: float = 60.0) -> None:
    """Remove the weight files of processes killed while they swapped weights (SIGKILL, the OOM killer), each a
    copy of a model left in RAM: those no process holds a lock on (a lock goes with its process, however it ends)
    and, so as to spare a file written a moment ago and not yet locked, unchanged for `quiet_seconds`."""
    for path in (p for directory in directories for p in directory.glob("spin-weights-*.safetensors")):
        try:
            fd = os.open(path, os.O_RDONLY)
        except OSError:  # removed meanwhile (by its writer, by another rank's sweep), or another user's
            continue
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:  # its writer is alive
            continue
        else:
            status = os.fstat(fd)
            if time.time() - status.st_mtime > quiet_seconds:
                with contextlib.suppress(OSError):
                    path.unlink()
                    log.warning("removed %s (%.1f GB), left by a process killed while it swapped weights", path,
                                status.st_size / 1e9)
        finally:
            os.close(fd)


@contextlib.contextmanager
def global_rng_kept() -> Iterator[None]:
    """Restores the global random generators that the block reseeds: a vLLM worker running in this process
    (external_launcher) seeds Python's, NumPy's, torch's and every GPU's with the engine's seed as it starts, which
    would reset the trainer's streams (dropout, anything drawing from the global generators) at each start and
    resume. The current GPU's is kept; reading every GPU's would open a CUDA context on each."""
    python_state, numpy_state = random.getstate(), np.random.get_state()
    devices = [torch.cuda.current_device()] if torch.cuda.is_available() else []
    try:
        with torch.random.fork_rng(devices=devices):
            yield
    finally:
        random.setstate(python_state)
        np.random.set_state(numpy_state)


@contextlib.contextmanager
def _guard_told_of_failure(guard, before: set[int]) -> Iterator[None]:
    """An engine that fails to start leaves no process behind, nor its guard."""
    try:
        yield
    except BaseException:
        engine_guard.engine_failed(guard, before)
        raise


class VllmEngine:
    """spin_fast.generation.Engine on vLLM: token-id prompts in, completions out, weights swapped in memory."""

    def __init__(self, model_dir: str | os.PathLike[str], *, dtype: str = "bfloat16", max_model_len: int | None,
                 tensor_parallel_size: int = 1, gpu_memory_utilization: float = 0.5,
                 enable_sleep_mode: bool | None = None, seed: int = 0, executor: str | None = None,
                 trust_remote_code: bool = False, stop_token_ids: Sequence[int] = (),
                 stop_strings: Sequence[str] = ()) -> None:
        from vllm import LLM
        from vllm.platforms import current_platform

        self._on_cpu = current_platform.is_cpu()
        if self._on_cpu:
            # The CPU build reserves its KV cache up front (4 GiB by default); 1 GiB serves the opponent's batches.
            os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")
        # Sleep mode frees GPU memory while training runs (None: on where vLLM supports it, CUDA); the CPU build
        # refuses it.
        cuda = current_platform.is_cuda()
        self._sleep_mode = cuda if enable_sleep_mode is None else enable_sleep_mode and cuda
        # Under the external launcher, tensor_parallel_size consecutive ranks run one engine together (checked
        # before the engine is built).
        self._group = (tensor_parallel_group(tensor_parallel_size)
                       if executor == "external_launcher" and tensor_parallel_size > 1 else None)
        if writes_node_files():  # one sweep per node
            remove_orphaned_weight_files(weight_dirs())
        # Its processes end with this one, however it ends (a SIGKILL leaves close() no time to run), from their start.
        before = engine_guard.descendants()
        guard = engine_guard.start(before)
        # The engine's processes, started here, inherit the block.
        with stopping.warning_blocked(), global_rng_kept(), _guard_told_of_failure(guard, before):
            self._llm = LLM(
                model=str(model_dir), dtype=dtype, max_model_len=max_model_len,
                tensor_parallel_size=tensor_parallel_size, gpu_memory_utilization=gpu_memory_utilization,
                enable_sleep_mode=self._sleep_mode, seed=generator_seed(seed), trust_remote_code=trust_remote_code,
                enforce_eager=self._on_cpu,  # no CUDA graphs / torch.compile warm-up on the CPU build
                # The CPU build's seeded sampling fails on a prompt cut across engine steps ("CPU Generator does not
                # use offset": it rewinds the generator of the cut request, which only CUDA generators allow).
                # Unchunked, every prompt is prefilled whole.
                enable_chunked_prefill=False if self._on_cpu else None,
                worker_extension_cls=_EXTENSION,
                distributed_executor_backend=executor,  # None: vLLM's choice
            )
        self._guard = engine_guard.engine_started(guard, before)
        self._dtype: torch.dtype = self._llm.llm_engine.model_config.dtype
        self._eos = self._llm.get_tokenizer().eos_token_id
        self._stops = [int(t) for t in stop_token_ids]  # the chat template's end of turn, beside the EOS ids
        self._stop_strings = list(stop_strings)  # a turn end that no token holds (data.turn_end_text)
        self._closed = False

    def generate(self, prompts: Sequence[Sequence[int]], sampling: SamplingConfig,
                 indices: Sequence[int] | None = None) -> list[list[Completion]]:
        """n completions for each prompt (token ids), in prompt order; completion k of prompt i samples with seed
        sampling.seed + indices[i] * n + k (indices[i]: its index in the whole set; through base.generator_seed,
        which vLLM adds k to), whichever rank or batch it is in, as in the transformers engine."""
        indices = range(len(prompts)) if indices is None else indices
        if self._group is not None:  # every rank of the engine's group must submit the same requests
            prompts, indices, mine = share_requests(prompts, indices, self._group)
            return self._generate(prompts, sampling, indices)[mine]
        return self._generate(prompts, sampling, indices)

    def _generate(self, prompts: Sequence[Sequence[int]], sampling: SamplingConfig,
                     indices: Sequence[int]) -> list[list[Completion]]:
        from vllm import SamplingParams

        if not prompts:
            return []
        # One seed per prompt: a shared seed would give duplicate prompts identical completions. vLLM seeds a
        # request's completion k with seed + k: prompts n seeds apart never share one.
        params = [SamplingParams(n=sampling.n, temperature=sampling.temperature, top_p=sampling.top_p,
                                 top_k=sampling.top_k, max_tokens=sampling.max_new_tokens,
                                 stop_token_ids=self._stops or None, stop=self._stop_strings or None,
                                 seed=generator_seed(sampling.seed + i * sampling.n)) for i in indices]
        inputs = [{"prompt_token_ids": [int(t) for t in ids]} for ids in prompts]
        outputs = self._llm.generate(inputs, params, use_tqdm=distributed.is_main())  # type: ignore[arg-type]
        return [[self._completion(o.token_ids, o.finish_reason, o.stop_reason) for o in out.outputs]
                for out in outputs]

    def _completion(self, token_ids: Sequence[int], finish_reason: str | None, stop_reason: int | str | None
                    ) -> Completion:
        ids = tuple(int(t) for t in token_ids)
        finished = finish_reason == "stop"
        # vLLM keeps the token that stopped it: the tokenizer's EOS, or another EOS id of the generation config.
        if finished and ids and ids[-1] in (self._eos, stop_reason):
            ids = ids[:-1]
        # A stop string: its tokens are kept (only the text is cut), and dropped here as a stop token is.
        if finished and isinstance(stop_reason, str):
            cut = answer_before_stop_text(ids, self._llm.get_tokenizer(), [stop_reason])
            ids = ids if cut is None else cut
        return Completion(token_ids=ids, finished=finished)

    def load_weights(self, weights: Iterable[tuple[str, torch.Tensor]]) -> None:
        """Replace the model's weights in memory (Hugging Face parameter names); the engine keeps running.

        Under a launcher every rank iterates `weights` (gathering ZeRO-3 shards is a collective), but only the
        first rank of each node keeps the tensors and writes the file, which every engine on the node loads:
        one copy of the model in host memory per node, not one per rank."""
        self._check_swappable()
        writer = writes_node_files()
        # Only the writer keeps a host copy, and only until its file holds it (the engines' load, the slow part, runs
        # with the file alone in RAM): a list that write() empties, so that no name or closure keeps a tensor alive.
        host_copy = [self._host_copy(weights, keep=writer)]
        written: list[tuple[str, int]] = []

        def write() -> tuple[str | None, int | None]:
            if writer:
                written.append(write_weight_file(host_copy.pop()))
            return written[-1] if written else (None, None)

        # A writer's failure (a full disk) and any engine's are told to every rank, which then stop together instead
        # of waiting for the failed one in the next collective.
        try:
            path, lock = distributed.on_every_rank(write, "the new weights' file")
        except BaseException:  # another node's writer failed: this node's file, a copy of the model in RAM, goes
            for leftover, leftover_lock in written:
                os.unlink(leftover)
                os.close(leftover_lock)
            raise
        try:
            if distributed.initialized():  # each rank loads the file of its node's first rank
                path = distributed.all_gather_objects(path, "weight file paths")[distributed.node_first_rank()]
            # Done on every rank: every engine on the node has read the file.
            distributed.on_every_rank(lambda: self._llm.collective_rpc("spin_load_weights_file", args=(path,)),
                                      "new weights loaded")
        finally:  # even when an engine failed: the file holds a copy of the model in RAM (/dev/shm)
            if writer:
                os.unlink(path)
                os.close(lock)
        # Prefix caching would otherwise serve KV computed with the old weights.
        self._llm.reset_prefix_cache()

    def _host_copy(self, weights: Iterable[tuple[str, torch.Tensor]], keep: bool) -> dict[str, torch.Tensor]:
        """The weights on the CPU in the engine's dtype, for a safetensors file (`weights` iterated in full even when
        not kept: gathering ZeRO-3 shards is a collective)."""
        tensors: dict[str, torch.Tensor] = {}
        seen: set[int] = set()
        for name, tensor in weights:
            if not keep:
                continue
            t = tensor.detach().to("cpu")
            if t.is_floating_point():
                t = t.to(self._dtype)  # half the bytes through RAM when training in fp32 and serving in bf16
            t = t.contiguous()
            if t.untyped_storage().data_ptr() in seen:  # tied weights: safetensors refuses shared memory
                t = t.clone()
            seen.add(t.untyped_storage().data_ptr())
            tensors[name] = t
        return tensors

    def load_weights_from(self, model_dir: str | os.PathLike[str]) -> None:
        """Replace the model's weights with those saved in a model folder (a checkpoint of the same architecture),
        in memory: each worker reads the files itself with vLLM's own loader, nothing passes through this process."""
        if not any(Path(model_dir).glob("*.safetensors")):
            raise FileNotFoundError(f"{model_dir}: no .safetensors weights to load into the vLLM engine")
        self._check_swappable()
        self._llm.collective_rpc("spin_load_weights_folder", args=(str(model_dir),))
        self._llm.reset_prefix_cache()

    def _check_swappable(self) -> None:
        """Refuse a swap that would leave the engine answering from garbled weights, before it touches them."""
        if not self._on_cpu:  # the CPU build's MoE layers are the ones seen garbled by a reload
            return
        config = self._llm.llm_engine.model_config
        if config.is_moe:  # refused before the run too (choice.check_engine_can_swap); kept for any other caller
            raise NotImplementedError(moe_swap_refused(config.hf_config.model_type))

    def worker_pids(self) -> list[int]:
        """The process id of each worker: unchanged across swaps, since the engine is never restarted."""
        return self._llm.collective_rpc("spin_pid")

    def sleep(self) -> None:
        """Free the weights and KV cache (GPU, sleep mode on) while training runs; a no-op otherwise."""
        if self._sleep_mode:
            self._llm.sleep(level=1)

    def wake_up(self) -> None:
        """Undo sleep(); a no-op without sleep mode."""
        if self._sleep_mode:
            # The engine allocates its weights and KV cache again, in its own process: this process's allocator
            # first gives back the blocks it keeps cached (training's peak, on one GPU without DeepSpeed).
            gc.collect()
            torch.cuda.empty_cache()
            self._llm.wake_up()

    def close(self) -> None:
        """Shut the engine (and its processes) down; idempotent."""
        if self._closed:
            return
        self._closed = True
        # There is no LLM.shutdown(): ending the engine core stops its processes.
        self._llm.llm_engine.engine_core.shutdown()
        if self._guard is not None:
            engine_guard.stop(self._guard)

    def __enter__(self) -> VllmEngine:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

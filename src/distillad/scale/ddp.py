"""Data-parallel training with torchrun: the few places where the one training loop must know its rank.

Why a module of its own: `engine/train.py` stays the single loop for every method, and calls in here only when
torchrun started it (RANK / WORLD_SIZE / LOCAL_RANK in the environment, WORLD_SIZE > 1). A plain process never
initialises torch.distributed and takes exactly the single-process path.

What data-parallel means here (the rules `engine/train.py` follows):
- The same global batch and schedule as one process: each of the N ranks takes batch_size / N images per step
  (a ConfigError when not divisible), so the optimizer steps, epochs and learning-rate milestones are those of one
  process. A `DistributedSampler` (shuffled, seeded with the run's seed, `set_epoch` every epoch) shards the images;
  it pads the last shard by repeating a few images so every rank takes the same number of steps.
- Gradients are averaged by DDP over a small `StageLoss` module (the models have no `forward`), wrapped per stage
  with only that stage's parameters registered (AAND trains other parameters in each stage), looking for
  parameters without a gradient only in a stage that declares it may skip some (`TrainingStage.skips_parameters`).
- BatchNorm statistics are per process on CPU (batch statistics of each rank's images); running statistics are
  copied from rank 0 at the end of every epoch, so every rank holds the same model at every checkpoint.
  SyncBatchNorm is not used (gloo cannot run it; on CUDA it would change the model class saved in model.pt).
- Random numbers that must differ per rank (synthetic anomalies, sampling) are seeded from `rank_seed`:
  rank 0 keeps the single-process seed, rank r > 0 a SeedSequence of (seed, r): reproducible and distinct.
- Only rank 0 logs, writes checkpoints, calibrates, writes meta.json and publishes the run; the others wait at a
  barrier and exit. A fit stage (PatchCore's memory bank: one pass, no gradients) runs on rank 0 over every image
  while the others wait, then rank 0's state is copied to them.
"""

from __future__ import annotations

import hashlib
import os
import sys
import uuid
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

import numpy as np
import torch
from torch import nn

from distillad.errors import ConfigError, DistilladError, RunError
from distillad.io import atomic_write_json

DEBUG_DIR_VARIABLE = "DISTILLAD_DDP_DEBUG_DIR"   # each rank writes rank<R>.json (weights digest, history) here
T = TypeVar("T")


@dataclass(frozen=True)
class DistributedContext:
    """Where this process stands in a torchrun launch; world_size 1 for a plain process."""

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0

    @property
    def enabled(self) -> bool:
        return self.world_size > 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0


SINGLE_PROCESS = DistributedContext()


def context_from_environment(environ: dict[str, str] | None = None) -> DistributedContext:
    """The rank, world size and local rank torchrun exports; the single-process context without them."""
    environ = dict(os.environ) if environ is None else environ
    if "WORLD_SIZE" not in environ or "RANK" not in environ:
        return SINGLE_PROCESS
    try:
        world_size, rank = int(environ["WORLD_SIZE"]), int(environ["RANK"])
        local_rank = int(environ.get("LOCAL_RANK", rank))
    except ValueError:
        raise ConfigError("RANK, WORLD_SIZE and LOCAL_RANK must be integers (set by torchrun)") from None
    if world_size < 1 or not 0 <= rank < world_size:
        raise ConfigError(f"RANK {rank} is outside WORLD_SIZE {world_size} (set by torchrun)")
    return DistributedContext(rank=rank, world_size=world_size, local_rank=local_rank)


def start(context: DistributedContext, device: torch.device) -> tuple[torch.device, bool]:
    """Initialise the process group (gloo on CPU, NCCL on CUDA at cuda:LOCAL_RANK) unless it already is.

    Returns this rank's device and whether this call created the group (then `stop` must end it)."""
    import torch.distributed as dist

    if device.type == "cuda":
        device = torch.device("cuda", context.local_rank)
        torch.cuda.set_device(device)
    if dist.is_initialized():
        if dist.get_world_size() != context.world_size:
            raise RunError(f"torch.distributed is initialised with {dist.get_world_size()} processes, "
                           f"but WORLD_SIZE is {context.world_size}")
        return device, False
    backend = "nccl" if device.type == "cuda" else "gloo"
    dist.init_process_group(backend=backend, rank=context.rank, world_size=context.world_size)
    return device, True


def stop(created: bool) -> None:
    import torch.distributed as dist

    if created and dist.is_initialized():
        dist.destroy_process_group()


def barrier() -> None:
    import torch.distributed as dist

    dist.barrier()


def rank_seed(seed: int, rank: int) -> int:
    """Seed of `rank` derived from the run's `seed`: the seed itself on rank 0, a SeedSequence draw elsewhere."""
    if rank == 0:
        return seed
    return int(np.random.SeedSequence([seed, rank]).generate_state(2, dtype=np.uint64)[0] % 2**62)


def per_rank_batch(global_batch: int, world_size: int) -> int:
    """Images each rank takes per step so that the global batch is that of one process."""
    if global_batch % world_size:
        raise ConfigError(f"the batch size {global_batch} does not split over {world_size} processes; use a "
                          f"multiple of {world_size} (each process takes batch_size / processes images per step)")
    return global_batch // world_size


def agree(context: DistributedContext, action: Callable[[], T]) -> T:
    """Run `action` on every rank; when it fails with a user error on any rank, every rank raises it.

    Without this a preflight error on one rank (an existing run folder, an interrupted training) would leave the
    others waiting in the next collective until torchrun's timeout."""
    import torch.distributed as dist

    result: Any = None
    error: DistilladError | None = None
    try:
        result = action()
    except DistilladError as raised:
        error = raised
    messages: list[str | None] = [None] * context.world_size
    dist.all_gather_object(messages, None if error is None else f"{type(error).__name__}\x00{error}")
    if error is not None:
        raise error
    for rank, message in enumerate(messages):
        if message is not None:
            _, _, text = message.partition("\x00")
            raise RunError(f"process {rank} of {context.world_size}: {text}")
    return result


def broadcast_object(value: T, context: DistributedContext) -> T:
    """Rank 0's `value` on every rank (a checkpoint, a state_dict: anything picklable)."""
    import torch.distributed as dist

    holder = [value if context.is_main else None]
    dist.broadcast_object_list(holder, src=0)
    return holder[0]


def all_gather_object(value: Any, context: DistributedContext) -> list[Any]:
    import torch.distributed as dist

    gathered: list[Any] = [None] * context.world_size
    dist.all_gather_object(gathered, value)
    return gathered


def global_mean(value: float, count: int, device: torch.device) -> tuple[float, int]:
    """The mean of `value` over every rank's `count` items, and the total count (one all-reduce)."""
    import torch.distributed as dist

    totals = torch.tensor([value * count, float(count)], dtype=torch.float64, device=device)
    dist.all_reduce(totals)
    total, seen = totals.tolist()
    return total / max(seen, 1.0), int(round(seen))


def sync_buffers(model: nn.Module) -> None:
    """Copy rank 0's buffers (BatchNorm running statistics) to every rank: parameters agree by DDP already."""
    import torch.distributed as dist

    for buffer in model.buffers():
        if buffer.numel():
            dist.broadcast(buffer.data, src=0)


def sync_state(model: nn.Module, context: DistributedContext) -> None:
    """Rank 0's whole state_dict on every rank (after a fit stage, whose buffers may change shape)."""
    state = broadcast_object({k: v.detach().cpu() for k, v in model.state_dict().items()}
                             if context.is_main else None, context)
    if not context.is_main:
        model.load_state_dict(state)


class StageLoss(nn.Module):
    """The training loss of one stage as a module's `forward`, which DDP needs (the models have none)."""

    def __init__(self, model: nn.Module, loss: Callable[[torch.Tensor, list[torch.Tensor] | None], torch.Tensor]):
        super().__init__()
        self.model = model
        self.stage_loss = loss

    def forward(self, images: torch.Tensor, teacher: list[torch.Tensor] | None = None) -> torch.Tensor:
        return self.stage_loss(images, teacher)


def wrap_stage(model: nn.Module, loss: Callable[[torch.Tensor, list[torch.Tensor] | None], torch.Tensor],
               parameters: Iterable[nn.Parameter], device: torch.device, *, skips_parameters: bool) -> nn.Module:
    """DDP around the stage's loss, averaging the gradients of exactly the stage's `parameters`.

    Every other parameter and every buffer is ignored by DDP: buffers are synchronised once per epoch
    (`sync_buffers`), not before every step. `skips_parameters`: the loss may leave some of them without a
    gradient on a step (`TrainingStage.skips_parameters`), which DDP must then look for."""
    from torch.nn.parallel import DistributedDataParallel

    module = StageLoss(model, loss)
    trained = {id(p) for p in parameters}
    ignored = [name for name, p in module.named_parameters() if id(p) not in trained]
    ignored += [name for name, _ in module.named_buffers()]
    DistributedDataParallel._set_params_and_buffers_to_ignore_for_model(module, ignored)
    return DistributedDataParallel(module, device_ids=[device.index] if device.type == "cuda" else None,
                                   broadcast_buffers=False, find_unused_parameters=skips_parameters)


def shard_bounds(n_items: int, context: DistributedContext, rank: int | None = None) -> tuple[int, int]:
    """[start, stop) of `rank`'s (default: this rank's) contiguous share of `n_items`; shares differ by at most 1."""
    rank = context.rank if rank is None else rank
    return rank * n_items // context.world_size, (rank + 1) * n_items // context.world_size


def gather_shards(levels: Sequence[torch.Tensor], n_items: int, context: DistributedContext) -> list[torch.Tensor]:
    """Every rank's share (`shard_bounds`) of per-level (share, ...) tensors joined in rank order: the full
    (n_items, ...) tensors on every rank. Shares are padded to one size for the collective, then trimmed."""
    import torch.distributed as dist

    bounds = [shard_bounds(n_items, context, rank) for rank in range(context.world_size)]
    size = max(stop - start for start, stop in bounds)
    joined: list[torch.Tensor] = []
    for level in levels:
        padded = level.new_zeros((size, *level.shape[1:]))
        padded[:level.shape[0]] = level
        parts = [torch.empty_like(padded) for _ in range(context.world_size)]
        dist.all_gather(parts, padded.contiguous())
        joined.append(torch.cat([part[:stop - start] for part, (start, stop) in zip(parts, bounds)]))
    return joined


def weights_digest(model: nn.Module) -> str:
    """sha256 of every tensor of the state_dict, in order: equal digests mean bit-identical weights."""
    digest = hashlib.sha256()
    for name, tensor in model.state_dict().items():
        digest.update(name.encode())
        digest.update(tensor.detach().cpu().contiguous().numpy().tobytes())
    return digest.hexdigest()


def write_debug_record(model: nn.Module, context: DistributedContext, history: list[dict[str, float]]) -> None:
    """With DISTILLAD_DDP_DEBUG_DIR set, this rank's weights digest and history, for tests to compare ranks."""
    folder = os.environ.get(DEBUG_DIR_VARIABLE)
    if not folder:
        return
    Path(folder).mkdir(parents=True, exist_ok=True)
    atomic_write_json(Path(folder) / f"rank{context.rank}.json",
                      {"rank": context.rank, "world_size": context.world_size, "digest": weights_digest(model),
                       "history": history})


# -- launching -------------------------------------------------------------------------------------------------
def check_nproc(nproc: int) -> None:
    if nproc < 1:
        raise ConfigError(f"--nproc must be a positive number of processes, got {nproc}")
    if context_from_environment().enabled:
        raise ConfigError("--nproc launches the processes itself; under torchrun leave it out")


def strip_nproc(argv: Sequence[str]) -> list[str]:
    """The command line without `--nproc N` / `--nproc=N` (what each launched process runs)."""
    out: list[str] = []
    skip = False
    for item in argv:
        if skip:
            skip = False
        elif item == "--nproc":
            skip = True
        elif not item.startswith("--nproc="):
            out.append(item)
    return out


def launch_local(nproc: int, argv: Sequence[str], *, cpu: bool) -> int:
    """Run `python -m distillad ARGV` in `nproc` processes on this machine via torch's elastic launcher, the
    engine under torchrun (c10d rendezvous on a free local port); return the first failed rank's exit code, else 0.

    On CPU each process gets cpu_count / nproc threads unless OMP_NUM_THREADS or --threads says otherwise."""
    from torch.distributed.elastic.multiprocessing.api import SignalException
    from torch.distributed.elastic.multiprocessing.errors import ChildFailedError
    from torch.distributed.launcher.api import LaunchConfig, elastic_launch

    import logging

    # The launcher logs each worker's exit at WARNING/ERROR; the workers say why themselves (rank 0, one line).
    logging.getLogger("torch.distributed.elastic").setLevel(logging.CRITICAL)
    if cpu and "OMP_NUM_THREADS" not in os.environ:
        os.environ["OMP_NUM_THREADS"] = str(max(1, (os.cpu_count() or 1) // nproc))
    config = LaunchConfig(min_nodes=1, max_nodes=1, nproc_per_node=nproc, run_id=f"distillad-{uuid.uuid4().hex}",
                          rdzv_backend="c10d", rdzv_endpoint="localhost:0", max_restarts=0, monitor_interval=0.2)
    try:
        elastic_launch(config, sys.executable)("-m", "distillad", *argv)
    except ChildFailedError as failed:
        codes = [failure.exitcode for _, failure in sorted(failed.failures.items())]
        return next((code for code in codes if code and code > 0), 1)
    except SignalException as signalled:   # SIGTERM/SIGINT: the launcher has stopped the processes
        print(f"distillad train: stopped by signal {int(signalled.sigval)}; continue with --resume",
              file=sys.stderr)
        return 128 + int(signalled.sigval)
    return 0


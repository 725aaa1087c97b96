"""Running under `torchrun`: one process per device, disjoint shards, one cache.

hardprobe does not launch processes itself. `torchrun` (or `srun torchrun` under SLURM) starts
N copies of the command and sets RANK, WORLD_SIZE, LOCAL_RANK and the rendezvous variables;
`init()` reads them and joins torch.distributed's process group: NCCL when this rank's device
is a CUDA GPU, gloo otherwise. Without those variables everything here is a no-op and a
command runs as one process.

The work split is by cache shard, not by sampler: shard i of the missing shards goes to rank
i % WORLD_SIZE. Shards are contiguous ranges of the split's rows, each example id is in
exactly one, so no rank pads or repeats an example (as DistributedSampler does) and the
joined arrays are row for row those of a single process.
"""
from __future__ import annotations

import contextlib
import dataclasses
import datetime
import os

import torch
import torch.distributed as dist

from ..errors import DeviceError

# A rank may wait at a barrier while another finishes a long shard: give it an hour, not
# the default 10-30 minutes.
TIMEOUT = datetime.timedelta(hours=1)


@dataclasses.dataclass(frozen=True)
class Context:
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    local_world_size: int = 1

    @property
    def active(self) -> bool:
        return self.world_size > 1

    @property
    def main(self) -> bool:
        return self.rank == 0

    def barrier(self) -> None:
        if self.active:
            dist.barrier()

    def broadcast(self, obj):
        """Rank 0's `obj` on every rank (any picklable object)."""
        if not self.active:
            return obj
        box = [obj if self.main else None]
        dist.broadcast_object_list(box, src=0)
        return box[0]

    def my_part(self, items: list) -> list:
        """This rank's items: every WORLD_SIZE-th, starting at its rank (disjoint, no padding)."""
        return list(items)[self.rank::self.world_size]

    def describe(self) -> str:
        return f"rank {self.rank} of {self.world_size}" if self.active else "single process"


SINGLE = Context()


def env_context() -> Context:
    """The ranks torchrun set in the environment (SINGLE when not launched by it)."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1:
        return SINGLE
    try:
        return Context(rank=int(os.environ["RANK"]), world_size=world,
                       local_rank=int(os.environ.get("LOCAL_RANK", "0")),
                       local_world_size=int(os.environ.get("LOCAL_WORLD_SIZE", "1")))
    except KeyError as e:
        raise DeviceError(f"WORLD_SIZE={world} is set but {e.args[0]} is not: launch hardprobe "
                           "with torchrun (it sets RANK, LOCAL_RANK and the rendezvous), or "
                           "unset WORLD_SIZE") from None


def rank_device(device: str | None, ctx: Context) -> str:
    """--device per rank: auto/cuda -> this rank's GPU (cuda:LOCAL_RANK); cuda:N, cpu and mps
    are honoured as given."""
    if not ctx.active:
        return device or "auto"
    if device in (None, "auto"):
        return f"cuda:{ctx.local_rank}" if torch.cuda.is_available() else "cpu"
    if device == "cuda":
        return f"cuda:{ctx.local_rank}"
    return device


def init(device: str | None = None) -> tuple[Context, str]:
    """Join the process group torchrun prepared; returns (context, this rank's device).

    Backend: nccl when the rank's device is CUDA, gloo otherwise (CPU, MPS). Idempotent.
    """
    ctx = env_context()
    dev = rank_device(device, ctx)
    if not ctx.active:
        return ctx, dev
    if not dist.is_available():
        raise DeviceError("this torch build has no torch.distributed; run without torchrun")
    cuda = dev.startswith("cuda")
    if cuda:
        torch.cuda.set_device(torch.device(dev))
    if not dist.is_initialized():
        dist.init_process_group(backend="nccl" if cuda else "gloo", timeout=TIMEOUT)
    return ctx, dev


def shutdown() -> None:
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


@contextlib.contextmanager
def main_first(ctx: Context):
    """Rank 0 runs the block first (downloads, folder scans that create files), then the rest."""
    if not ctx.main:
        ctx.barrier()
    yield
    if ctx.main:
        ctx.barrier()

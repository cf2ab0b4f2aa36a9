"""Data-parallel training under `torchrun`: the process group, DDP wrapping, batch sharding.

Every trainer runs unchanged as one process (`mmrag train X`) or as N processes (`torchrun
--nproc-per-node N -m mmrag.models.X.train`): `setup()` reads torchrun's environment (RANK,
WORLD_SIZE, LOCAL_RANK) and joins the process group (gloo on CPU, nccl on CUDA).

Identical results for the same global batch: every rank draws the same global batch from
the same seeded generator and keeps its own contiguous slice (`shard`); the loss on each rank
is normalised by the *global* count of targets (`global_sum`), and DDP averages the
gradients over ranks, so the trainer multiplies its loss by `world_size` to turn DDP's mean
back into the global sum (`DistEnv.loss_scale`). Only rank 0 writes checkpoints and logs.

Losses that couple the items of a batch need more than their own shard: a contrastive loss
scores every text against every image, so each rank gathers the whole batch's embeddings
with gradients (`gather_rows`) and computes its own rows of the logits; statistics such as a
VQ codebook's EMA counts are summed over ranks (`Collectives`) so every rank's copy stays
identical to the one-process run.
"""

from __future__ import annotations

import dataclasses
import os
from typing import Any

import torch
from torch import distributed as dist
from torch import nn


@dataclasses.dataclass(frozen=True)
class DistEnv:
    """Where this process sits in the job."""

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    device: torch.device = dataclasses.field(default_factory=lambda: torch.device("cpu"))

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.world_size > 1

    @property
    def loss_scale(self) -> float:
        """Multiply a loss normalised by global counts by this before backward under DDP."""
        return float(self.world_size)


def setup(device: str | None = None) -> DistEnv:
    """Join torchrun's process group when WORLD_SIZE > 1; otherwise a single-process env."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    local = int(os.environ.get("LOCAL_RANK", "0"))
    wanted = device or ("cuda" if torch.cuda.is_available() and world > 1 else "cpu")
    dev = torch.device(wanted)
    if dev.type == "cuda":
        dev = torch.device("cuda", local)
        torch.cuda.set_device(dev)
    if world > 1 and not dist.is_initialized():
        dist.init_process_group(backend="nccl" if dev.type == "cuda" else "gloo")
    return DistEnv(rank=rank, world_size=world, local_rank=local, device=dev)


def teardown(env: DistEnv, wait: bool = True) -> None:
    """Leave the process group. `wait` (a run that finished on every rank): first a barrier,
    so no rank tears its connections down while a peer still uses them (once, in a clean-clone
    test run, a gloo peer aborted at exit: "terminate called without an active exception").
    Without it (a rank that failed) the group is left at once, so a failure never waits on
    ranks that will not come."""
    if env.distributed and dist.is_initialized():
        if wait:
            dist.barrier()
        dist.destroy_process_group()


def wrap(model: nn.Module, env: DistEnv, **ddp_options: Any) -> nn.Module:
    """DDP around `model` in a distributed job (with `ddp_options`, e.g. broadcast_buffers);
    the model itself otherwise."""
    if not env.distributed:
        return model
    ids = [env.device.index] if env.device.type == "cuda" else None
    return nn.parallel.DistributedDataParallel(model, device_ids=ids, **ddp_options)


def unwrap(model: nn.Module) -> nn.Module:
    """The plain module under DDP / torch.compile wrappers (what gets saved)."""
    while True:
        inner: Any = getattr(model, "module", None) or getattr(model, "_orig_mod", None)
        if not isinstance(inner, nn.Module):
            return model
        model = inner


def shard(n: int, env: DistEnv) -> slice:
    """This rank's contiguous slice of a global batch of `n` items (sizes differ by <= 1)."""
    base, extra = divmod(n, env.world_size)
    start = env.rank * base + min(env.rank, extra)
    return slice(start, start + base + (1 if env.rank < extra else 0))


def global_sum(value: torch.Tensor, env: DistEnv) -> torch.Tensor:
    """The sum of `value` over all ranks (a copy; the input is untouched)."""
    out = value.detach().clone()
    if env.distributed:
        dist.all_reduce(out, op=dist.ReduceOp.SUM)
    return out


def barrier(env: DistEnv) -> None:
    if env.distributed:
        dist.barrier()


def gather_rows(x: torch.Tensor, env: DistEnv) -> torch.Tensor:
    """Every rank's `x` concatenated along dim 0 in rank order (so the shards of a global
    batch come back in batch order); row counts may differ by rank. Gradients flow back to
    each rank's own rows, summed over the ranks that used them."""
    if not env.distributed:
        return x
    from torch.distributed.nn.functional import all_gather

    size = torch.tensor([len(x)], device=x.device)
    sizes = [torch.zeros_like(size) for _ in range(env.world_size)]
    dist.all_gather(sizes, size)  # collectives need equal shapes: pad to the longest
    counts = [int(s.item()) for s in sizes]
    padding = x.new_zeros((max(counts) - len(x), *x.shape[1:]))
    parts = all_gather(torch.cat([x, padding]))
    return torch.cat([part[:n] for part, n in zip(parts, counts, strict=True)])


@dataclasses.dataclass(frozen=True)
class Collectives:
    """Sum and gather over the job's ranks, for modules that keep batch statistics (the VQ
    quantiser's `RankSync`); no gradients."""

    env: DistEnv

    def sum(self, value: torch.Tensor) -> torch.Tensor:
        return global_sum(value, self.env)

    def gather(self, rows: torch.Tensor) -> torch.Tensor:
        with torch.no_grad():
            return gather_rows(rows, self.env)

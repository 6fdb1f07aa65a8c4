"""torchrun / DistributedDataParallel: process-group setup and the few collectives training needs.

    torchrun --standalone --nproc_per_node 8 -m storyseek train --data DIR        (one node)
    torchrun --nnodes 2 --node_rank R --master_addr HOST --master_port 29500 \
             --nproc_per_node 8 -m storyseek train --data DIR                     (two nodes)

torchrun sets RANK / LOCAL_RANK / WORLD_SIZE; without them this is a single process. NCCL on GPUs,
gloo on CPUs. Each rank draws its own batches (seeded by rank); rank 0 alone logs and saves.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import torch
import torch.distributed as dist

from ..device import resolve_device


@dataclass
class Dist:
    rank: int = 0
    local_rank: int = 0
    world_size: int = 1
    device: torch.device = torch.device("cpu")

    @property
    def enabled(self) -> bool:
        return self.world_size > 1

    @property
    def is_master(self) -> bool:
        return self.rank == 0


def setup(device_name: str) -> Dist:
    """Join the process group when launched by torchrun; pick this rank's device."""
    if "RANK" not in os.environ or int(os.environ.get("WORLD_SIZE", "1")) <= 1:
        return Dist(device=resolve_device(device_name))
    rank, local_rank, world = int(os.environ["RANK"]), int(os.environ["LOCAL_RANK"]), int(os.environ["WORLD_SIZE"])
    device = resolve_device(device_name)
    if device.type == "cuda":
        device = torch.device("cuda", local_rank)
        torch.cuda.set_device(device)
        backend = "nccl"
    else:
        backend = "gloo"
    if not dist.is_initialized():
        dist.init_process_group(backend=backend, device_id=device if backend == "nccl" else None)
    return Dist(rank, local_rank, world, device)


def teardown(d: Dist) -> None:
    if d.enabled and dist.is_initialized():
        dist.destroy_process_group()


def all_reduce_sum(t: torch.Tensor, d: Dist) -> torch.Tensor:
    """The sum over ranks (in place); identity for a single process."""
    if d.enabled:
        dist.all_reduce(t, op=dist.ReduceOp.SUM)
    return t


def any_rank(flag: bool, d: Dist) -> bool:
    """True on every rank when it is True on any: ranks must stop at the same iteration."""
    if not d.enabled:
        return flag
    t = torch.tensor([1.0 if flag else 0.0], device=d.device)
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return bool(t.item())

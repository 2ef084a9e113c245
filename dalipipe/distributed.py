"""torchrun support: process-group setup and the few collectives the loop needs.

A single process is world size 1 and every helper is then a no-op, so the loop has one code path.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import torch
import torch.distributed as dist


@dataclass(frozen=True)
class World:
    rank: int = 0
    size: int = 1
    local_rank: int = 0

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def launched_rank() -> int:
    """This process's rank as torchrun set it, before any process group exists (0 outside torchrun)."""
    return int(os.environ.get("RANK", "0"))


def init(device_name: str) -> World:
    """Read torchrun's environment; NCCL on GPUs, gloo on the CPU."""
    size = int(os.environ.get("WORLD_SIZE", "1"))
    if size <= 1:
        return World()
    rank, local_rank = int(os.environ["RANK"]), int(os.environ.get("LOCAL_RANK", "0"))
    use_gpu = device_name != "cpu" and torch.cuda.is_available()
    if use_gpu:
        torch.cuda.set_device(local_rank % torch.cuda.device_count())
    if not dist.is_initialized():
        dist.init_process_group(backend="nccl" if use_gpu else "gloo")
    return World(rank, size, local_rank)


def gather(obj, world: World) -> list:
    """Every rank's object, in rank order, on every rank."""
    if world.size == 1:
        return [obj]
    out = [None] * world.size
    dist.all_gather_object(out, obj)
    return out


def broadcast(obj, world: World):
    if world.size == 1:
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def broadcast_buffers(module: torch.nn.Module, world: World) -> None:
    """Make every rank's buffers (BatchNorm running statistics) rank 0's. DDP broadcasts them only at the
    start of a training forward, so after an epoch's last step each rank holds statistics updated by its
    own last batch: without this, ranks other than 0 would validate a model that is never saved."""
    if world.size > 1:
        for buf in module.buffers():
            dist.broadcast(buf, src=0)


def barrier(world: World) -> None:
    if world.size > 1:
        dist.barrier()


def shutdown(world: World) -> None:
    if world.size > 1 and dist.is_initialized():
        dist.destroy_process_group()

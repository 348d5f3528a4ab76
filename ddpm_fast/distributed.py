"""torchrun: this process's place in the job, read from torchrun's environment in one place.

`env_world()` reads RANK / WORLD_SIZE / LOCAL_RANK; `join(device)` joins the process group (NCCL for CUDA,
gloo for CPU) when WORLD_SIZE > 1 and returns a `Dist` whose `close()` leaves it again (only if it joined).
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import torch

from ddpm_fast.errors import BadValue, Unavailable

__all__ = ["Dist", "env_world", "join"]


def env_world() -> tuple[int, int, int]:
    """(rank, world, local_rank) from torchrun's environment; (0, 1, 0) outside torchrun."""
    try:
        world = int(os.environ.get("WORLD_SIZE", "1"))
        rank = int(os.environ.get("RANK", "0"))
        local = int(os.environ.get("LOCAL_RANK", str(rank)))
    except ValueError as e:
        raise BadValue(f"RANK / WORLD_SIZE / LOCAL_RANK must be integers ({e})") from e
    return rank, world, local


@dataclass
class Dist:
    """This process's place in a torchrun job (rank 0 of 1 without one)."""

    rank: int = 0
    world: int = 1
    local_rank: int = 0
    owns_group: bool = False

    def gather(self, obj) -> list:
        if self.world == 1:
            return [obj]
        out = [None] * self.world
        torch.distributed.all_gather_object(out, obj)
        return out

    def broadcast(self, obj):
        if self.world == 1:
            return obj
        box = [obj]
        torch.distributed.broadcast_object_list(box, src=0)
        return box[0]

    def close(self) -> None:
        if self.owns_group:
            torch.distributed.destroy_process_group()
            self.owns_group = False


def join(device: torch.device) -> Dist:
    """Join torchrun's process group (NCCL for CUDA devices, gloo for CPU) when WORLD_SIZE > 1."""
    rank, world, local = env_world()
    if world <= 1:
        return Dist()
    import torch.distributed as dist

    if not dist.is_available():
        raise Unavailable("torch.distributed is not available in this PyTorch build, but WORLD_SIZE > 1")
    if dist.is_initialized():
        return Dist(dist.get_rank(), dist.get_world_size(), local, owns_group=False)
    if device.type == "cuda":
        torch.cuda.set_device(device)
    dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
    return Dist(dist.get_rank(), dist.get_world_size(), local, owns_group=True)

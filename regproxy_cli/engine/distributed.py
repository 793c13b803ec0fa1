"""One process or one of ``torchrun``'s: which device it runs on, its share of the work, and sums across processes.

``torchrun`` sets RANK, WORLD_SIZE and LOCAL_RANK; with more than one process a process group is started (NCCL on
GPUs, gloo on CPUs). Collectives take tensors on the backend's device: NCCL refuses CPU tensors, so sums go through
:func:`all_reduce_sum`, which moves them there.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import torch
import torch.distributed as dist

from regproxy_cli.inference.runtime import resolve_device

_started_here: list[bool] = []  # whether setup_runtime started the process group (shutdown ends only that one)


@dataclass
class Runtime:
    rank: int
    world: int
    device: torch.device

    @property
    def main(self) -> bool:
        return self.rank == 0


def setup_runtime(device: str = "auto") -> Runtime:
    """This process's rank, world size and device; starts the process group under ``torchrun``.

    Args:
        device: ``auto`` (a GPU when there is one), ``cpu``, ``cuda`` (under torchrun: the process's LOCAL_RANK GPU)
            or an explicit ``cuda:N``.
    """
    world = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    if device in ("auto", "cuda") and torch.cuda.is_available() and world > 1:
        device = f"cuda:{local_rank}"
    torch_device = resolve_device(device)
    if torch_device.type == "cuda":
        torch.cuda.set_device(torch_device)
    if world > 1 and not dist.is_initialized():
        dist.init_process_group("nccl" if torch_device.type == "cuda" else "gloo")
        _started_here.append(True)
    return Runtime(rank, world, torch_device)


def rank_world() -> tuple[int, int]:
    """(rank, world size) of the running process group, (0, 1) without one."""
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def collective_device() -> torch.device:
    """Where a collective's tensors must live: this process's GPU under NCCL, the CPU otherwise."""
    if dist.get_backend() == "nccl":
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def all_reduce_sum(tensor: torch.Tensor) -> torch.Tensor:
    """The sum of ``tensor`` over all processes, on :func:`collective_device` (``tensor`` itself without a group).

    Every process must call it, also one that has nothing to add (pass zeros), or the others wait forever.
    """
    if not (dist.is_available() and dist.is_initialized()):
        return tensor
    on_backend = tensor.to(collective_device(), copy=True)
    dist.all_reduce(on_backend)
    return on_backend


def shutdown() -> None:
    """Leave the process group :func:`setup_runtime` started, once every process is done (exiting with it alive
    can abort the process: seen with torch 2.4's gloo). A group the caller started is left alone."""
    if _started_here and dist.is_available() and dist.is_initialized():
        dist.barrier()
        dist.destroy_process_group()
        _started_here.clear()


def barrier() -> None:
    """Wait for every process (a no-op without a process group)."""
    if dist.is_available() and dist.is_initialized():
        dist.barrier()


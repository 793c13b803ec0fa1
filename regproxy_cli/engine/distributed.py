"""One process or one of ``torchrun``'s: which device it runs on, its share of the work, and sums across processes.

``torchrun`` sets RANK, WORLD_SIZE and LOCAL_RANK; with more than one process a process group is started (NCCL on
GPUs, gloo on CPUs, or the backend asked for: gloo lets two processes share one GPU). Collectives take tensors on
the backend's device: NCCL refuses CPU tensors, so sums go through
:func:`all_reduce_sum`, which moves them there. Every collective of the package is that sum (a barrier is a sum of
ones, a gather a sum of rows that are zero but one's own), so the buffers the backend sees are all held here.
"""

from __future__ import annotations

import os
import pickle
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist

from regproxy_cli.errors import RegproxyError
from regproxy_cli.inference.runtime import resolve_device, set_tf32

_started_here: list[bool] = []  # whether setup_runtime started the process group (shutdown ends only that one)
# The tensors handed to the backend, one per (shape, dtype, device), held for the life of the process. torch 2.4's
# gloo drops a finished collective's tensors on its worker thread, a moment after the caller has its result (later
# still when a gloo barrier holds a weak reference to the work); freeing a tensor Python no longer holds needs the
# GIL there, while the group's destructor holds the GIL and waits for that thread: a deadlock (3 of about 25
# two-process evaluations). The group can outlive destroy_process_group (a DDP reducer holds it until the model is
# freed: 1 of 7 two-process trainings hung there when these were released at shutdown), so they are never released;
# a tensor held here is never freed on gloo's thread.
_buffers: dict[tuple, torch.Tensor] = {}


@dataclass
class Runtime:
    rank: int
    world: int
    device: torch.device

    @property
    def main(self) -> bool:
        return self.rank == 0


BACKENDS = ("auto", "nccl", "gloo")
BACKEND_ENV = "REGPROXY_BACKEND"  # the backend for commands without a config (eval under torchrun): nccl or gloo


def choose_backend(backend: str, device: torch.device) -> str:
    """The process group's backend: ``auto`` is ``REGPROXY_BACKEND`` when set, else NCCL on GPUs and gloo on CPUs.

    gloo also runs CUDA tensors (DDP, SyncBN), and unlike NCCL lets several processes share one GPU.
    """
    if backend == "auto":
        backend = os.environ.get(BACKEND_ENV, "").strip().lower() or ("nccl" if device.type == "cuda" else "gloo")
    if backend not in BACKENDS[1:]:
        raise RegproxyError(f"backend {backend!r} is not one of {', '.join(BACKENDS)}")
    if backend == "nccl" and device.type != "cuda":
        raise RegproxyError(f"backend nccl needs CUDA devices, not {device.type}; use gloo")
    return backend


def setup_runtime(device: str = "auto", backend: str = "auto", tf32: bool | None = None) -> Runtime:
    """This process's rank, world size and device; starts the process group under ``torchrun``.

    Args:
        device: ``auto`` (a GPU when there is one), ``cpu``, ``cuda`` (under torchrun: the process's LOCAL_RANK GPU,
            otherwise the current one) or an explicit ``cuda:N``.
        backend: ``auto`` (see :func:`choose_backend`), ``nccl`` or ``gloo``. With gloo, more processes than GPUs
            share them (LOCAL_RANK modulo the visible GPUs: two ranks on one GPU); NCCL needs one GPU per process.
        tf32: the TF32 policy (:func:`~regproxy_cli.inference.runtime.set_tf32`; None: ``REGPROXY_TF32``, off).
    """
    world = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    gpu = None
    if world > 1 and device in ("auto", "cuda") and torch.cuda.is_available():
        gpu, gpus = local_rank, torch.cuda.device_count()
        if local_rank >= gpus:
            if choose_backend(backend, torch.device("cuda")) == "nccl":
                raise RegproxyError(f"device {device}: NCCL needs one GPU per process, but LOCAL_RANK {local_rank} "
                                    f"has {gpus} visible; to share GPUs use the gloo backend (run.backend: gloo, "
                                    f"or REGPROXY_BACKEND=gloo)")
            gpu = local_rank % gpus
    torch_device = resolve_device(device, gpu)
    if torch_device.type == "cuda":
        torch.cuda.set_device(torch_device.index)
        set_tf32(tf32)
    if world > 1 and not dist.is_initialized():
        chosen = choose_backend(backend, torch_device)
        if chosen == "nccl" and device.startswith("cuda:") and int(os.environ.get("LOCAL_WORLD_SIZE", "1")) > 1:
            raise RegproxyError(f"device {device}: every process of this node would use that one GPU, which NCCL "
                                "refuses; use cuda (each process its LOCAL_RANK GPU) or the gloo backend")
        dist.init_process_group(chosen)
        _started_here.append(True)
    return Runtime(rank, world, torch_device)


def _in_group() -> bool:
    return dist.is_available() and dist.is_initialized()


def rank_world() -> tuple[int, int]:
    """(rank, world size) of the running process group, (0, 1) without one."""
    if _in_group():
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
    if not _in_group():
        return tensor
    device = collective_device()
    key = (tuple(tensor.shape), tensor.dtype, device)
    with torch.inference_mode(False), torch.no_grad():  # a buffer made under inference mode could not be reused
        buffer = _buffers.get(key)
        if buffer is None:
            buffer = _buffers[key] = torch.empty(tensor.shape, dtype=tensor.dtype, device=device)
        buffer.copy_(tensor)
        dist.all_reduce(buffer)
        return buffer.clone()


def all_gather_objects(value: Any) -> list[Any]:
    """Every process's ``value`` (picklable), in rank order; ``[value]`` without a process group.

    Every process must call it. The pickles travel as rows of one byte matrix, each process filling its own row.
    """
    if not _in_group():
        return [value]
    rank, world = rank_world()
    payload = torch.frombuffer(bytearray(pickle.dumps(value)), dtype=torch.uint8)
    sizes = torch.zeros(world, dtype=torch.int64)
    sizes[rank] = payload.numel()
    sizes = all_reduce_sum(sizes).cpu()
    width = 1 << int(sizes.max()).bit_length()  # a power of two: few buffer shapes over many calls
    rows = torch.zeros(world, width, dtype=torch.uint8)
    rows[rank, : payload.numel()] = payload
    rows = all_reduce_sum(rows).cpu()
    return [pickle.loads(rows[r, : int(sizes[r])].numpy().tobytes()) for r in range(world)]


def shutdown() -> None:
    """Leave the process group :func:`setup_runtime` started, once every process is done (exiting with it alive
    can abort the process: seen with torch 2.4's gloo). A group the caller started is left alone."""
    if _started_here and _in_group():
        barrier()
        dist.destroy_process_group()
        _started_here.clear()


def barrier() -> int:
    """Wait for every process (a no-op without a process group); returns how many arrived.

    A sum of ones, not ``dist.barrier``, whose gloo work keeps the collectives before it and frees them on a worker
    thread (see ``_buffers``). The sum is read on the host: NCCL's all_reduce only queues the collective on the GPU's
    stream, so without the read a process would go on (save, destroy the group) before the others had arrived.
    """
    return int(all_reduce_sum(torch.ones(1)).item())

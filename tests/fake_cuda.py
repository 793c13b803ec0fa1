"""A stand-in for the CUDA runtime, so that the package's CUDA branches run in the CPU suite.

``torch.cuda``'s functions at the boundary the package uses (is_available, device_count, current_device, set_device,
RNG states, synchronize, memory statistics, empty_cache ...) are replaced by a small model of N GPUs, and a torch
function mode moves every tensor that is asked for on ``cuda:i`` to the CPU instead (``device=`` of factories,
``Tensor.to`` / ``.cuda()`` / ``pin_memory``). Devices stay what the code resolved (``torch.device("cuda", 1)``),
so device resolution, ``set_device``, per-device RNG state, GradScaler and autocast for ``cuda``, backend choice and
rank logic all take their CUDA branch; the arithmetic behind them is the CPU's.

Use the ``fake_cuda`` fixture (tests/conftest.py): ``fake_cuda(gpus=2)`` returns the :class:`FakeCuda` state.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch.overrides import TorchFunctionMode


def _cpu(device):
    """``device`` with any CUDA device replaced by the CPU (other values unchanged)."""
    if isinstance(device, torch.device) and device.type == "cuda":
        return torch.device("cpu")
    if isinstance(device, str) and device.startswith("cuda"):
        return "cpu"
    if isinstance(device, int) and not isinstance(device, bool):  # to(0): a CUDA ordinal
        return "cpu"
    return device


class _CudaOnCpu(TorchFunctionMode):
    """Tensors asked for on a CUDA device are made on the CPU."""

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = dict(kwargs or {})
        if "device" in kwargs:
            kwargs["device"] = _cpu(kwargs["device"])
        if func in (torch.Tensor.cuda, torch.Tensor.pin_memory):
            return args[0]
        if func is torch.Tensor.is_pinned:
            return False
        if func is torch.Tensor.to:
            args = (args[0], *(_cpu(a) if not isinstance(a, torch.Tensor) else a for a in args[1:]))
        return func(*args, **kwargs)


class _NoStream:
    def is_capturing(self) -> bool:
        return False

    def synchronize(self) -> None:
        pass


@dataclass
class FakeCuda:
    """What the stand-in's GPUs hold and what was asked of them."""

    gpus: int
    current: int = 0
    rng: dict[int, torch.Tensor] = field(default_factory=dict)  # per-device generator state (a CPU ByteTensor)
    set_devices: list[int] = field(default_factory=list)
    synchronized: int = 0
    emptied: int = 0
    peak: int = 123 * 2**20

    def index(self, device=None) -> int:
        if device is None:
            return self.current
        if isinstance(device, int):
            index = device
        else:
            device = torch.device(device)
            index = self.current if device.index is None else device.index
        if not 0 <= index < self.gpus:
            raise RuntimeError(f"CUDA error: invalid device ordinal {index} (of {self.gpus})")
        return index

    def install(self, monkeypatch) -> None:
        cuda = torch.cuda

        def set_device(device) -> None:
            if isinstance(device, torch.device) and device.index is None:
                raise ValueError("Expected a torch.device with a specified index or an integer, but got:cuda")
            self.current = self.index(device)
            self.set_devices.append(self.current)

        def get_rng_state(device="cuda") -> torch.Tensor:
            index = self.index(device)
            return self.rng.setdefault(index, torch.full((16,), index, dtype=torch.uint8)).clone()

        def set_rng_state(state: torch.Tensor, device="cuda") -> None:
            if state.device.type != "cpu" or state.dtype != torch.uint8:
                raise TypeError("RNG state must be a torch.ByteTensor")
            self.rng[self.index(device)] = state.clone()

        def get_rng_state_all() -> list[torch.Tensor]:
            return [get_rng_state(i) for i in range(self.gpus)]

        def set_rng_state_all(states) -> None:
            for index, state in enumerate(states):
                set_rng_state(state, index)

        def synchronize(device=None) -> None:
            self.synchronized += 1

        def empty_cache() -> None:
            self.emptied += 1

        replacements = {
            "is_available": lambda: True, "device_count": lambda: self.gpus, "current_device": lambda: self.current,
            "set_device": set_device, "get_rng_state": get_rng_state, "set_rng_state": set_rng_state,
            "get_rng_state_all": get_rng_state_all, "set_rng_state_all": set_rng_state_all,
            "manual_seed": lambda seed: None, "manual_seed_all": lambda seed: None, "synchronize": synchronize,
            "empty_cache": empty_cache, "max_memory_allocated": lambda device=None: self.peak,
            "reset_peak_memory_stats": lambda device=None: None, "is_bf16_supported": lambda *a, **k: True,
            "get_device_name": lambda device=None: "Stand-in GPU", "is_initialized": lambda: True,
            "is_current_stream_capturing": lambda: False,  # torch 2.4's optimizers ask before a step
        }
        for name, replacement in replacements.items():
            monkeypatch.setattr(cuda, name, replacement)
        if hasattr(torch, "accelerator"):  # torch >= 2.6: optimizers ask the current stream whether it captures a graph
            monkeypatch.setattr(torch.accelerator, "current_stream", lambda device=None: _NoStream())
        # torch.manual_seed seeds CUDA too when it is "available"; the stand-in has nothing to seed
        monkeypatch.setattr(torch.cuda.random, "manual_seed_all", lambda seed: None, raising=False)
        self._mode = _CudaOnCpu()
        self._mode.__enter__()

    def uninstall(self) -> None:
        self._mode.__exit__(None, None, None)

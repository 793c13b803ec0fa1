"""Option parsing shared by several commands."""

from __future__ import annotations

import torch

from regproxy_cli.errors import RegproxyError


def parse_device(device: str) -> torch.device:
    """``--device``: a torch device that exists on this machine, or one error line."""
    try:
        torch_device = torch.device(device)
        torch.empty(0, device=torch_device)
    except (RuntimeError, AssertionError) as exc:
        raise RegproxyError(f"--device {device}: {str(exc).splitlines()[0]}") from None
    return torch_device

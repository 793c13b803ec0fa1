"""Tiny backbone specs (2 blocks, width 32) so model tests run in seconds on 2 CPU cores."""

import os

# Tests never touch the network. Set before huggingface_hub is imported: it reads this once.
os.environ["HF_HUB_OFFLINE"] = "1"

from functools import partial  # noqa: E402

import pytest  # noqa: E402
import torch  # noqa: E402

from regproxy_cli import BackboneSpec  # noqa: E402
from regproxy_cli.timm_vit import create_timm_vit  # noqa: E402

_TINY = dict(embed_dim=32, depth=2, num_heads=2)

TINY_VIT = BackboneSpec(
    name="tiny-vit", title="tiny ViT/16", stride=16, m=1, width=32, depth=2, heads=2, num_prefix_tokens=1,
    pretrained="vit_tiny_patch16_384.augreg_in21k_ft_in1k", crop_size=64,
    factory=partial(create_timm_vit, "vit_tiny_patch16_384", stride=16, **_TINY),
)
TINY_DEIT = BackboneSpec(
    name="tiny-deit", title="tiny DeiT/16", stride=16, m=1, width=32, depth=2, heads=2, num_prefix_tokens=2,
    pretrained="deit_base_distilled_patch16_384.fb_in1k", crop_size=64,
    factory=partial(create_timm_vit, "deit_base_distilled_patch16_384", stride=16, **_TINY),
)
TINY_HYBRID = BackboneSpec(
    name="tiny-hybrid", title="tiny R26+ViT/32", stride=32, m=0, width=32, depth=2, heads=2, num_prefix_tokens=1,
    pretrained="vit_small_r26_s32_384.augreg_in21k_ft_in1k", crop_size=64,
    factory=partial(create_timm_vit, "vit_small_r26_s32_384", stride=32, **_TINY),
)
TINY_SPECS = [TINY_VIT, TINY_DEIT, TINY_HYBRID]


@pytest.fixture(autouse=True)
def _seed() -> None:
    torch.manual_seed(0)


@pytest.fixture
def cli():
    """Run `python -m regproxy_cli ARGS` in a fresh process, as a user would."""
    import os
    import subprocess
    import sys

    def run(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess:
        return subprocess.run([sys.executable, "-m", "regproxy_cli", *args], capture_output=True, text=True,
                              env={**os.environ, **(env or {})}, timeout=300)

    return run

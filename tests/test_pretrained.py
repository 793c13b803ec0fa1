"""Starting from ImageNet weights: timm fetches them by tag through the Hub cache; offline gives one clear error."""

import pytest
import timm
import torch
import torch.nn.functional as F
from safetensors.torch import save_file

from conftest import TINY_VIT, hub_snapshot
from regproxy_cli import RegproxyError, build_model


def _put_in_cache(cache, repo_id: str, state_dict: dict) -> None:
    save_file({k: v.contiguous() for k, v in state_dict.items()}, str(hub_snapshot(cache, repo_id) / "model.safetensors"))


@pytest.mark.parametrize("img_size", [64, 512])  # grid 24x24 -> 4x4 (shrink) and -> 32x32 (grow)
def test_imagenet_weights_load_from_the_hub_cache_with_resized_position_embeddings(hub_cache, img_size):
    # the "ImageNet" checkpoint: a tiny ViT at 384^2 (24x24 grid), as the AugReg weights are stored
    source = timm.create_model("vit_tiny_patch16_384", num_classes=1000, embed_dim=32, depth=2, num_heads=2)
    _put_in_cache(hub_cache, f"timm/{TINY_VIT.pretrained}", source.state_dict())

    model = build_model(TINY_VIT, 5, pretrained=True, img_size=img_size)
    g = img_size // 16
    vit = model.backbone.vit
    torch.testing.assert_close(vit.blocks[1].mlp.fc2.weight, source.blocks[1].mlp.fc2.weight)
    torch.testing.assert_close(vit.patch_embed.proj.weight, source.patch_embed.proj.weight)
    assert vit.pos_embed.shape == (1, 1 + g * g, 32)
    torch.testing.assert_close(vit.pos_embed[:, :1], source.pos_embed[:, :1])  # cls row untouched
    grid = source.pos_embed[:, 1:].reshape(1, 24, 24, 32).permute(0, 3, 1, 2)
    expected = F.interpolate(grid, size=(g, g), mode="bicubic", align_corners=False)  # the authors' resize
    torch.testing.assert_close(vit.pos_embed[:, 1:], expected.flatten(2).transpose(1, 2), rtol=1e-4, atol=1e-5)


def test_offline_without_cache_is_one_clear_error(hub_cache):
    with pytest.raises(RegproxyError) as info:
        build_model(TINY_VIT, 5, pretrained=True)
    message = str(info.value)
    assert f"timm/{TINY_VIT.pretrained}" in message
    assert f"hf download timm/{TINY_VIT.pretrained}" in message and str(hub_cache) in message
    assert "\n" not in message

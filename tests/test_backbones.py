"""Every installed backbone (the paper's six, ViT-Demo/8, any plugin): declarations against the built modules, and
shapes at the paper's sizes.

Shape tests run on the meta device (no weights allocated, so L/16 costs nothing); the same checks
with random weights and real arithmetic are marked slow.
"""

import pytest
import timm
import torch

from regproxy_cli import build_model, get_backbone, list_backbones

PAPER_M = {"t16": 5, "s16": 5, "b16": 5, "l16": 10, "r26-s32": 0, "r50-l32": 0}  # name -> M (official tap + 1)
INSTALLED = list_backbones()  # at collection: what is installed, before the suite adds its tiny test backbones
SIZES = [(512, 512), (768, 768), (512, 768), (333, 500)]


def test_the_papers_six_are_installed_as_plugins():
    assert set(PAPER_M) <= set(INSTALLED)


@pytest.mark.parametrize("name", INSTALLED)
def test_declaration_matches_the_built_module(name):
    spec = get_backbone(name)
    assert spec.m == PAPER_M.get(name, spec.m)
    with torch.device("meta"):
        backbone = spec.build()
    vit = backbone.vit
    assert (backbone.stride, backbone.width, backbone.m) == (spec.stride, spec.width, spec.m)
    assert vit.embed_dim == spec.width and len(vit.blocks) == spec.depth
    assert vit.blocks[0].attn.num_heads == spec.heads
    assert vit.num_prefix_tokens == spec.num_prefix_tokens
    # position embeddings are stored for the paper's crop (over the patches only for DINOv2; none with DINOv3's
    # rotary embeddings)
    grid = spec.crop_size // spec.stride
    if backbone.pos_grid is not None:
        assert vit.pos_embed.shape == (1, grid * grid + backbone.pos_prefix_tokens, spec.width)
    # measured stride: the grid an input of 4 strides produces
    with torch.no_grad():
        tap, final = backbone(torch.zeros(1, 3, 4 * spec.stride, 4 * spec.stride, device="meta"))
    assert tap.shape == final.shape == (1, spec.width, 4, 4)
    # the ImageNet weights the backbone starts from (if any: ViT-Demo/8 trains from scratch) are a tag timm knows
    assert spec.pretrained is None or timm.list_pretrained(spec.pretrained) == [spec.pretrained]


def test_paper_table_2_configurations():
    table = {  # stride, layers, dim, heads (Table 2)
        "t16": (16, 12, 192, 3), "s16": (16, 12, 384, 6), "b16": (16, 12, 768, 12), "l16": (16, 24, 1024, 16),
        "r26-s32": (32, 12, 384, 6), "r50-l32": (32, 24, 1024, 16),
    }
    for name, row in table.items():
        spec = get_backbone(name)
        assert (spec.stride, spec.depth, spec.width, spec.heads) == row
    assert get_backbone("b16").num_prefix_tokens == 2  # DeiT distilled: cls + dist


def _check_shapes(name: str, size: tuple[int, int], device: str, classes: int = 150) -> None:
    spec = get_backbone(name)
    with torch.device(device):
        model = build_model(name, classes).eval()
    grid = (-(-size[0] // spec.stride), -(-size[1] // spec.stride))
    with torch.no_grad():
        out = model.forward_all(torch.zeros(1, 3, *size, device=device))
    assert out.logits.shape == (1, classes, *size)
    assert out.affinity.shape == (1, 9, 4, 4, *grid)
    assert out.region_logits.shape == (1, classes, 4 * grid[0], 4 * grid[1])
    if device != "meta":
        assert torch.isfinite(out.logits).all()
        torch.testing.assert_close(out.affinity.sum(1), torch.ones_like(out.affinity.sum(1)))


@pytest.mark.parametrize("size", SIZES, ids=lambda s: f"{s[0]}x{s[1]}")
@pytest.mark.parametrize("name", INSTALLED)
def test_shapes_on_meta(name, size):
    _check_shapes(name, size, "meta")


@pytest.mark.slow
@pytest.mark.parametrize("size", SIZES, ids=lambda s: f"{s[0]}x{s[1]}")
@pytest.mark.parametrize("name", INSTALLED)
def test_shapes_with_random_weights(name, size):
    torch.set_num_threads(2)
    _check_shapes(name, size, "cpu")

"""The proxy head against the paper's equations, a naive per-pixel loop and the authors' formulation."""

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from conftest import TINY_DEIT, TINY_HYBRID, TINY_SPECS, TINY_VIT
from regproxy_cli import LinearBaseline, RegProxy, RegproxyError, affinity_from_logits, build_model, paint
from regproxy_cli.model.ops import outside_grid_mask
from regproxy_cli.model.regproxy import parse_region_res

OFFSETS = [(dy, dx) for dy in (-1, 0, 1) for dx in (-1, 0, 1)]  # row-major 3x3, as F.unfold


def naive_paint(token_logits: torch.Tensor, affinity: torch.Tensor) -> torch.Tensor:
    """Eq. 6 pixel by pixel: Y'[u, v] = sum over in-grid neighbours s of y(s) * q_s(u, v)."""
    batch, classes, height, width = token_logits.shape
    _, _, sub_h, sub_w, _, _ = affinity.shape
    out = torch.zeros(batch, classes, height * sub_h, width * sub_w, dtype=torch.float64)
    for u in range(height * sub_h):
        for v in range(width * sub_w):
            y, i, x, j = u // sub_h, u % sub_h, v // sub_w, v % sub_w
            for n, (dy, dx) in enumerate(OFFSETS):
                if 0 <= y + dy < height and 0 <= x + dx < width:
                    out[:, :, u, v] += affinity[:, n, i, j, y, x, None].double() * token_logits[:, :, y + dy, x + dx]
    return out


def authors_paint(token_logits: torch.Tensor, affinity: torch.Tensor) -> torch.Tensor:
    """Algorithm 1 as written: unfold, rearrange to (B, H, W, 9, K), matmul with (B, H, W, hw, 9)."""
    batch, classes, height, width = token_logits.shape
    _, _, sub_h, sub_w, _, _ = affinity.shape
    nb = F.unfold(token_logits, kernel_size=3, padding=1).reshape(batch, classes, 9, height, width)
    nb = nb.permute(0, 3, 4, 2, 1)  # B H W n K
    q = affinity.permute(0, 4, 5, 2, 3, 1).reshape(batch, height, width, sub_h * sub_w, 9)  # B H W (h w) n
    out = (q @ nb).reshape(batch, height, width, sub_h, sub_w, classes)
    return out.permute(0, 5, 1, 3, 2, 4).reshape(batch, classes, height * sub_h, width * sub_w)


@pytest.mark.parametrize("grid", [(1, 1), (1, 4), (3, 5), (6, 6)])
@pytest.mark.parametrize("region_res", [(1, 1), (4, 4), (2, 3)])
def test_affinities_are_a_distribution_over_in_grid_neighbours(grid, region_res):
    height, width = grid
    logits = torch.randn(2, 9 * region_res[0] * region_res[1], height, width) * 5
    affinity = affinity_from_logits(logits, region_res)
    assert affinity.shape == (2, 9, *region_res, height, width)
    assert (affinity >= 0).all()
    torch.testing.assert_close(affinity.sum(1), torch.ones(2, *region_res, height, width))
    for n, (dy, dx) in enumerate(OFFSETS):
        for y in range(height):
            for x in range(width):
                outside = not (0 <= y + dy < height and 0 <= x + dx < width)
                assert outside_grid_mask(height, width)[n, y, x] == outside
                if outside:
                    assert (affinity[:, n, :, :, y, x] == 0).all()
                else:
                    assert (affinity[:, n, :, :, y, x] > 0).all()


@pytest.mark.parametrize("region_res", [(1, 1), (4, 4), (2, 3), (16, 16)])
def test_paint_equals_naive_loop_and_algorithm_1(region_res):
    grid = (3, 4) if region_res != (16, 16) else (2, 2)
    token_logits = torch.randn(2, 5, *grid)
    affinity = affinity_from_logits(torch.randn(2, 9 * region_res[0] * region_res[1], *grid), region_res)
    painted = paint(token_logits, affinity)
    assert painted.shape == (2, 5, grid[0] * region_res[0], grid[1] * region_res[1])
    torch.testing.assert_close(painted.double(), naive_paint(token_logits, affinity), rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(painted, authors_paint(token_logits, affinity), rtol=1e-5, atol=1e-5)


def test_affinity_channel_order_is_neighbour_major():
    """Channel n*h*w + i*w + j drives neighbour n of sub-pixel (i, j), as in the authors' checkpoints."""
    sub_h, sub_w, height, width = 2, 3, 3, 3
    token_logits = torch.arange(height * width, dtype=torch.float32).reshape(1, 1, height, width)
    for n, (dy, dx) in enumerate(OFFSETS):
        for i in range(sub_h):
            for j in range(sub_w):
                logits = torch.zeros(1, 9 * sub_h * sub_w, height, width)
                logits[0, n * sub_h * sub_w + i * sub_w + j] = 100.0  # near one-hot after the softmax
                painted = paint(token_logits, affinity_from_logits(logits, (sub_h, sub_w)))
                # the centre token (1, 1) has all 9 neighbours in the grid
                assert painted[0, 0, 1 * sub_h + i, 1 * sub_w + j].item() == pytest.approx((1 + dy) * 3 + (1 + dx))


@pytest.mark.parametrize("spec", TINY_SPECS, ids=lambda s: s.name)
@pytest.mark.parametrize("size", [(64, 64), (96, 64), (50, 77), (20, 13)])
def test_logits_have_input_size_and_padding_is_cropped(spec, size):
    model = build_model(spec, 7).eval()
    x = torch.randn(2, 3, *size)
    with torch.no_grad():
        out = model.forward_all(x)
        grid = (-(-size[0] // spec.stride), -(-size[1] // spec.stride))
        assert out.logits.shape == (2, 7, *size)
        assert out.token_logits.shape == (2, 7, *grid)
        assert out.affinity.shape == (2, 9, 4, 4, *grid)
        assert out.region_logits.shape == (2, 7, grid[0] * 4, grid[1] * 4)
        # the model pads to the stride itself: same as padding by hand and cropping the result
        padded = F.pad(x, (0, grid[1] * spec.stride - size[1], 0, grid[0] * spec.stride - size[0]))
        torch.testing.assert_close(out.logits, model(padded)[..., : size[0], : size[1]])
        upsampled = F.interpolate(out.region_logits, size=padded.shape[-2:], mode="bilinear", align_corners=False)
        torch.testing.assert_close(out.logits, upsampled[..., : size[0], : size[1]])


def test_token_logits_are_one_linear_layer_on_final_tokens():
    model = build_model(TINY_VIT, 5).eval()
    x = torch.randn(1, 3, 64, 96)
    with torch.no_grad():
        out = model.forward_all(x)
        _, final = model.backbone(x)
    expected = torch.einsum("bchw,kc->bkhw", final, model.head.classifier.weight) + model.head.classifier.bias[:, None, None]
    torch.testing.assert_close(out.token_logits, expected)


@pytest.mark.parametrize("region_res", ["1", "2x2", "8", "16x16", (2, 8)])
def test_region_resolution_sets_output_stride(region_res):
    model = build_model(TINY_VIT, 3, region_res=region_res).eval()
    sub = parse_region_res(region_res)
    assert model.head.affinity.out.out_channels == 9 * sub[0] * sub[1]
    with torch.no_grad():
        out = model.forward_all(torch.randn(1, 3, 48, 64))
    assert out.region_logits.shape == (1, 3, 3 * sub[0], 4 * sub[1])
    assert out.logits.shape == (1, 3, 48, 64)


@pytest.mark.parametrize("bad", ["0", "17", "4x", "axb", (4, 4, 4), 0])
def test_bad_region_resolution_is_a_clear_error(bad):
    with pytest.raises(RegproxyError, match="region resolution"):
        parse_region_res(bad)


def test_affinity_head_structure_and_init():
    model = build_model(TINY_VIT, 3)
    head = model.head.affinity
    assert head.depthwise.groups == head.depthwise.in_channels == 32 and head.depthwise.kernel_size == (3, 3)
    assert head.depthwise.bias is None and head.pointwise.bias is None
    assert isinstance(head.depthwise_bn, nn.BatchNorm2d) and not isinstance(head.depthwise_bn, nn.SyncBatchNorm)
    assert [type(m) for m in head] == [nn.Conv2d, nn.BatchNorm2d, nn.ReLU, nn.Conv2d, nn.BatchNorm2d, nn.ReLU, nn.Conv2d]
    assert (head.out.bias == 0).all()
    # zero bias + fresh BN: at init the head still gives each pixel a valid distribution
    with torch.no_grad():
        affinity = model.eval().forward_all(torch.randn(1, 3, 64, 64)).affinity
    torch.testing.assert_close(affinity.sum(1), torch.ones_like(affinity.sum(1)))


@pytest.mark.parametrize("spec", [TINY_VIT, TINY_HYBRID], ids=lambda s: s.name)
def test_gradients_reach_backbone_affinity_head_and_classifier(spec):
    model = build_model(spec, 4).train()
    x = torch.randn(2, 3, 64, 64)
    target = torch.randint(0, 4, (2, 64, 64))
    F.cross_entropy(model(x), target).backward()
    named = dict(model.named_parameters())
    stem = "backbone.vit.patch_embed.backbone.stem.conv.weight" if spec is TINY_HYBRID else (
        "backbone.vit.patch_embed.proj.weight")
    for name in (stem, "backbone.vit.blocks.0.attn.qkv.weight", "backbone.vit.pos_embed",
                 "head.affinity.depthwise.weight", "head.affinity.pointwise.weight", "head.affinity.out.weight",
                 "head.affinity.out.bias", "head.classifier.weight"):
        grad = named[name].grad
        assert grad is not None and grad.abs().sum() > 0, name


def test_eval_mode_runs_on_cpu_with_batch_one():
    """Plain BatchNorm (not SyncBN) so single-image CPU inference always works."""
    model = build_model(TINY_VIT, 3).eval()
    with torch.no_grad():
        assert model(torch.randn(1, 3, 40, 40)).shape == (1, 3, 40, 40)


@pytest.mark.parametrize("baseline", [False, True])
def test_cpu_inference_runs_a_batch_image_by_image_with_the_same_result(baseline, monkeypatch):
    model = build_model(TINY_VIT, 4, baseline=baseline)
    x = torch.randn(3, 3, 48, 40)
    calls = []
    batched = model.batch_grid_logits
    monkeypatch.setattr(model, "batch_grid_logits", lambda images: calls.append(len(images)) or batched(images))

    model.eval()
    with torch.no_grad():
        logits, labels = model(x), model.labels(x)
        whole = batched(x)
    assert calls == [1, 1, 1, 1, 1, 1]  # the forward and labels, image by image
    torch.testing.assert_close(logits, _resize_like(whole, x))
    assert torch.equal(labels, logits.argmax(1))

    calls.clear()
    model.train()  # batch norm statistics need the whole batch
    model(x).sum().backward()
    assert calls == [3]


def _resize_like(grid_logits: torch.Tensor, x: torch.Tensor, stride: int = TINY_VIT.stride) -> torch.Tensor:
    padded = (-(-x.shape[-2] // stride) * stride, -(-x.shape[-1] // stride) * stride)
    return F.interpolate(grid_logits, size=padded, mode="bilinear", align_corners=False)[..., : x.shape[-2], : x.shape[-1]]


def test_linear_baseline_is_bilinear_upsampled_per_token_logits():
    model = build_model(TINY_DEIT, 6, baseline=True).eval()
    assert isinstance(model, LinearBaseline) and not hasattr(model, "head")
    with torch.no_grad():  # a non-zero bias, so that a dropped or misplaced bias shows
        model.classifier.bias.normal_(0, 0.5)
    x = torch.randn(1, 3, 70, 90)
    with torch.no_grad():
        logits = model(x)
        _, final = model.backbone(x)
    assert final.shape == (1, 32, 5, 6)  # 70x90 padded to 80x96 at stride 16
    weight, bias = model.classifier.weight, model.classifier.bias
    tokens = torch.einsum("bchw,kc->bkhw", final, weight) + bias[None, :, None, None]
    expected = F.interpolate(tokens, size=(80, 96), mode="bilinear", align_corners=False)[..., :70, :90]
    assert expected.std(dim=(-2, -1)).min() > 1e-3  # varies over the image in every class
    torch.testing.assert_close(logits, expected)


def test_baseline_and_regproxy_differ_only_by_the_head():
    regproxy = build_model(TINY_VIT, 5)
    baseline = build_model(TINY_VIT, 5, baseline=True)
    assert isinstance(regproxy, RegProxy)
    extra = sum(p.numel() for p in regproxy.parameters()) - sum(p.numel() for p in baseline.parameters())
    affinity = sum(p.numel() for p in regproxy.head.affinity.parameters())
    assert extra == affinity


def test_build_model_errors():
    with pytest.raises(RegproxyError, match="num_classes"):
        build_model(TINY_VIT, 0)
    with pytest.raises(RegproxyError, match=r"m=3 is out of range for tiny-vit: use 0\.\.2"):
        build_model(TINY_VIT, 3, m=3)


def test_the_model_contract_is_declared_not_probed():
    """What callers may ask is a class attribute: regions only for RegProxy, grid logits for both PyTorch models."""
    from regproxy_cli.model.base import SegmentationModel

    regproxy = build_model(TINY_VIT, 3)
    baseline = build_model(TINY_VIT, 3, baseline=True)
    for model in (regproxy, baseline):
        assert isinstance(model, SegmentationModel) and model.has_grid_logits
        assert model.stride == model.backbone.stride
    assert regproxy.has_regions and not baseline.has_regions
    assert regproxy.token_classifier is regproxy.head.classifier and baseline.token_classifier is baseline.classifier


def test_the_package_api_resolves_on_first_use():
    """`import regproxy_cli` loads no torch (a Ray read task, `regproxy --version`); each public name is the object
    of the module that defines it, and a misspelt one is an AttributeError."""
    import importlib
    import subprocess
    import sys

    import regproxy_cli

    code = "import sys, regproxy_cli; print('torch' in sys.modules, regproxy_cli.__version__)"
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert done.stdout.split()[0] == "False"
    for name in regproxy_cli.__all__:
        value = getattr(regproxy_cli, name)
        module = regproxy_cli._LAZY.get(name)
        if module is not None:
            assert value is getattr(importlib.import_module(module), name)
    assert set(regproxy_cli.__all__) <= set(dir(regproxy_cli))
    with pytest.raises(AttributeError, match="build_modle"):
        regproxy_cli.build_modle  # noqa: B018

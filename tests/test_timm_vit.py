"""The timm ViT wrapper against timm's own forward passes and the authors' position-embedding resize."""

import pytest
import torch
import torch.nn.functional as F

from conftest import TINY_DEIT, TINY_HYBRID, TINY_SPECS, TINY_VIT


def _timm_grid(tokens: torch.Tensor, prefix: int, grid: tuple[int, int]) -> torch.Tensor:
    return tokens[:, prefix:].transpose(1, 2).reshape(tokens.shape[0], -1, *grid)


@pytest.mark.parametrize("spec", TINY_SPECS, ids=lambda s: s.name)
@pytest.mark.parametrize("size", [(64, 64), (64, 128)])
def test_final_grid_equals_timm_forward_features(spec, size):
    """At the stored grid; at other grids timm resizes with antialias (a=-0.5 cubic), the authors did not."""
    backbone = spec.factory(m=spec.m, img_size=size, pretrained=None, drop_path_rate=0.0).eval()
    x = torch.randn(2, 3, *size)
    grid = (size[0] // spec.stride, size[1] // spec.stride)
    with torch.no_grad():
        tap, final = backbone(x)
        reference = backbone.vit.forward_features(x)
    torch.testing.assert_close(final, _timm_grid(reference, spec.num_prefix_tokens, grid), rtol=1e-5, atol=1e-5)
    assert tap.shape == final.shape == (2, spec.width, *grid)


@pytest.mark.parametrize("spec", [TINY_VIT, TINY_DEIT], ids=lambda s: s.name)
@pytest.mark.parametrize("m", [1, 2])
def test_tap_is_block_m_output_without_norm(spec, m):
    backbone = spec.build(m=m).eval()
    x = torch.randn(1, 3, 64, 64)
    with torch.no_grad():
        tap, _ = backbone(x)
        (reference,) = backbone.vit.forward_intermediates(
            x, indices=[m - 1], norm=False, output_fmt="NCHW", intermediates_only=True
        )
    torch.testing.assert_close(tap, reference, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("spec", TINY_SPECS, ids=lambda s: s.name)
def test_m_zero_taps_the_stem_plus_position_embedding(spec):
    backbone = spec.build(m=0).eval()
    x = torch.randn(1, 3, 64, 64)
    with torch.no_grad():
        tap, _ = backbone(x)
        patches = backbone.vit.patch_embed(x).permute(0, 3, 1, 2)
    pos = backbone.vit.pos_embed[:, spec.num_prefix_tokens:].transpose(1, 2).reshape(1, spec.width, *tap.shape[-2:])
    torch.testing.assert_close(tap, patches + pos)


def test_position_embedding_is_resized_like_the_authors():
    """Bicubic, align_corners=False, no antialias, prefix rows untouched; also when shrinking the grid."""
    backbone = TINY_DEIT.build(m=0).eval()  # two prefix tokens
    x = torch.randn(1, 3, 32, 80)  # grid 2x5 against a stored 4x4
    with torch.no_grad():
        tap, _ = backbone(x)
        patches = backbone.vit.patch_embed(x).permute(0, 3, 1, 2)
    stored = backbone.vit.pos_embed[:, 2:].reshape(1, 4, 4, 32).permute(0, 3, 1, 2)
    resized = F.interpolate(stored, size=(2, 5), mode="bicubic", align_corners=False)
    torch.testing.assert_close(tap, patches + resized)


def test_hybrid_exposes_its_cnn_stem_and_vanilla_does_not():
    assert TINY_HYBRID.build().cnn_stem is not None
    assert TINY_VIT.build().cnn_stem is None


def test_padding_to_the_stride_is_zero_padding():
    backbone = TINY_VIT.build().eval()
    x = torch.randn(1, 3, 50, 70)
    with torch.no_grad():
        ours = backbone(x)
        by_hand = backbone(F.pad(x, (0, 10, 0, 14)))
    for a, b in zip(ours, by_hand):
        torch.testing.assert_close(a, b)


@pytest.mark.parametrize("kernel", ["explicit", "sdpa"])
def test_cpu_bf16_autocast_runs_the_chosen_attention_and_fp32_restores_timms_choice(kernel, monkeypatch):
    monkeypatch.setenv("REGPROXY_ATTENTION", kernel)  # what the measurement on this machine would pick
    torch.manual_seed(0)
    backbone = TINY_VIT.build().eval()
    attentions = [block.attn for block in backbone.vit.blocks]
    timm_choice = [a.fused_attn for a in attentions]
    seen = []
    for attention in attentions:
        attention.register_forward_hook(lambda mod, inp, out: seen.append(mod.fused_attn))
    x = torch.randn(2, 3, 64, 48)
    with torch.no_grad():
        reference = backbone(x)[1]
        with torch.autocast("cpu", dtype=torch.bfloat16):
            fast = backbone(x)[1]
        again = backbone(x)[1]
    n = len(attentions)
    assert seen == timm_choice + [kernel == "sdpa"] * n + timm_choice
    assert torch.equal(again, reference)
    assert (fast.float() - reference).abs().max() < 0.1 * reference.abs().max()  # bf16: ~3 significant digits

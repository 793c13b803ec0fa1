"""FLOP and parameter counts: the paper's tables (its convention) and torch's own counter (true counts)."""

import json
import time

import pytest
import torch
from torch.utils.flop_counter import FlopCounterMode

from conftest import TINY_DINOV2, TINY_DINOV3, TINY_HYBRID, TINY_VIT
from regproxy_cli import build_model
from regproxy_cli.model.flops import PAPER_FIGURES, count_flops, count_model, sliding_windows


@pytest.mark.parametrize("key", list(PAPER_FIGURES), ids=lambda k: f"{k[0]}-{k[1]}-K{k[2]}-{k[3][0]}x{k[3][1]}"
                         + ("-baseline" if k[4] else "") + ("-slide" if k[5] else ""))
def test_paper_figures_within_3_percent(key):
    backbone, size, classes, region_res, baseline, slide = key
    ref = PAPER_FIGURES[key]
    count = count_flops(backbone, size=size, classes=classes, region_res=region_res, baseline=baseline,
                        slide_image=slide, slide_stride=512 if slide else None)
    gflops = count.paper_macs / 1e9
    if "leaves the ResNet stem out" in ref.note:  # R50+L/32: we count the stem, the paper did not
        assert gflops > 1.3 * ref.gflops
        gflops -= count.stem_paper_macs / 1e9
    assert gflops == pytest.approx(ref.gflops, rel=0.03)
    assert count.params / 1e6 == pytest.approx(ref.mparams, rel=0.03)


def test_the_paper_conventions_omit_attention_and_the_stem_split():
    s16 = count_flops("s16")
    # ViT-S/16 at 512^2 by hand: 12 blocks x 1025 tokens x 2 MLP linears 384x1536, plus patch embedding
    by_hand = 12 * 1025 * 2 * 384 * 1536 + 1024 * 16 * 16 * 3 * 384
    assert by_hand < s16.paper_macs < by_hand * 1.03
    attention = 12 * (2 * 1025 * 1025 * 384 + 1025 * 384 * 4 * 384)  # QK^T, AV, qkv and out projections
    assert s16.true_macs - s16.paper_macs == pytest.approx(attention, rel=0.02)
    assert s16.stem_paper_macs == 0
    hybrid = count_flops("r26-s32")
    assert 0 < hybrid.stem_paper_macs < hybrid.paper_macs


def _explicit_attention(q, k, v, attn_mask=None, dropout_p=0.0, is_causal=False, scale=None, **_):
    """softmax(q k^T / sqrt(d)) v as two plain matrix products.

    The reference counts below must not depend on which fused attention kernel a torch version picks for
    ``F.scaled_dot_product_attention``, nor on whether its FlopCounterMode counts that kernel (torch 2.14's counts 0
    for the CPU flash kernel). Plain matmuls are counted by every version.
    """
    assert attn_mask is None and dropout_p == 0.0 and not is_causal
    weights = (q @ k.transpose(-2, -1)) * (scale if scale is not None else q.shape[-1] ** -0.5)
    return weights.softmax(dim=-1) @ v


def test_the_explicit_attention_reference_equals_torchs():
    q, k, v = torch.randn(3, 2, 4, 50, 16).unbind(0)
    expected = torch.nn.functional.scaled_dot_product_attention(q, k, v)
    torch.testing.assert_close(_explicit_attention(q, k, v), expected, rtol=1e-5, atol=1e-5)


@pytest.fixture
def explicit_attention(monkeypatch):
    monkeypatch.setattr(torch.nn.functional, "scaled_dot_product_attention", _explicit_attention)


@pytest.mark.parametrize("case", [("s16", 512, False), ("b16", 512, False), ("r26-s32", 512, False),
                                  ("t16", 640, True), ("s16", 480, False)])
def test_true_counts_agree_with_torch_flop_counter(case, explicit_attention):
    name, size, baseline = case
    with torch.device("meta"):
        model = build_model(name, 150, baseline=baseline, img_size=size).eval()
    ours = count_model(model, size, size).true_macs
    with FlopCounterMode(display=False) as counter, torch.no_grad():
        model(torch.zeros(1, 3, size, size, device="meta"))
    torch_macs = counter.get_total_flops() / 2  # torch reports 2 FLOPs per multiply-add
    assert ours == pytest.approx(torch_macs, rel=0.01)


@pytest.mark.parametrize("spec", [TINY_VIT, TINY_HYBRID, TINY_DINOV3, TINY_DINOV2], ids=lambda s: s.name)
def test_true_counts_agree_with_torch_on_real_tensors(spec, explicit_attention):
    model = build_model(spec, 5, region_res=(8, 8)).eval()
    ours = count_model(model, 96, 128).true_macs
    with FlopCounterMode(display=False) as counter, torch.no_grad():
        model(torch.zeros(1, 3, 96, 128))
    assert ours == pytest.approx(counter.get_total_flops() / 2, rel=0.01)


def test_painting_is_counted_in_the_true_count():
    fine = count_flops("s16", region_res=16)
    coarse = count_flops("s16", region_res=1)
    painting = 150 * 9 * 512 * 512 - 150 * 9 * 32 * 32
    head = 384 * 9 * (256 - 1) * 32 * 32  # the affinity head's last 1x1 conv grows with h*w
    assert fine.true_macs - coarse.true_macs == pytest.approx(painting + head, rel=1e-6)


def test_counting_large_models_allocates_nothing_and_is_fast():
    start = time.perf_counter()
    count = count_flops("l16", size=640)
    assert time.perf_counter() - start < 60  # meta tensors: seconds, not minutes
    assert count.params > 300e6


def test_sliding_windows_match_mmseg():
    assert sliding_windows((1024, 2048), 768, 512) == 8
    assert sliding_windows((512, 683), 512, 512) == 2
    assert sliding_windows((300, 300), 512, 512) == 1
    count = count_flops("t16", size=768, classes=19, slide_image=(1024, 2048), slide_stride=512)
    single = count_flops("t16", size=768, classes=19)
    assert count.windows == 8 and count.paper_macs == 8 * single.paper_macs and count.params == single.params


def test_flops_cli_json_matches_the_library(cli):
    result = cli("flops", "-b", "s16", "-b", "r50-l32", "--json")
    assert result.returncode == 0, result.stderr
    rows = json.loads(result.stdout)
    assert [r["backbone"] for r in rows] == ["s16", "r50-l32"]
    assert rows[0]["paper_macs"] == count_flops("s16").paper_macs
    assert rows[0]["paper"]["gflops"] == 15.1
    assert rows[1]["size"] == 640 and "leaves the ResNet stem out" in rows[1]["paper"]["note"]


def test_flops_cli_table_shows_paper_figures_and_the_stem_note(cli):
    result = cli("flops", "--baseline", env={"COLUMNS": "120"})
    assert result.returncode == 0, result.stderr
    assert "linear baseline" in result.stdout and "ViT-L/16" in result.stdout and "325" in result.stdout
    result = cli("flops", "-b", "r50-l32", env={"COLUMNS": "120"})
    assert "leaves the ResNet stem out; ours counts it (82.2 G without it)" in result.stdout
    result = cli("flops", "--size", "768", "--num-classes", "19", "--slide-image", "1024x2048", "--slide-stride", "512",
                 "-b", "b16", env={"COLUMNS": "120"})
    assert "768²x8" in result.stdout and "1064" in result.stdout

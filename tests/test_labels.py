"""Label maps straight from grid logits (Segmenter.labels, boundary-first resize_argmax) against the argmax of the forward."""

import pytest
import torch
import torch.nn.functional as F

from regproxy_cli import build_model
from regproxy_cli.model import resize
from regproxy_cli.model.resize import batch_of_one, resize_argmax


@pytest.mark.parametrize("baseline", [False, True])
@pytest.mark.parametrize("size", [(64, 64), (50, 75), (17, 33)])
def test_labels_equal_the_argmax_of_the_forward(baseline, size):
    torch.manual_seed(0)
    model = build_model("tiny-vit", 7, baseline=baseline).eval()
    x = torch.randn(2, 3, *size)
    with torch.inference_mode():
        assert torch.equal(model.labels(x), model(x).argmax(1))


@pytest.mark.parametrize("smooth", [True, False])
def test_resize_argmax_equals_interpolate_then_argmax_in_either_layout(smooth):
    torch.manual_seed(1)
    # smooth scores have few boundary cells, noise has many; both must give PyTorch's labels
    scores = torch.randn(6, 48, 40)
    if smooth:
        scores = F.interpolate(torch.randn(1, 6, 2, 2), size=(48, 40), mode="bilinear")[0]
    channels_last = scores.permute(1, 2, 0).contiguous().permute(2, 0, 1)
    reference = F.interpolate(scores[None], size=(143, 91), mode="bilinear", align_corners=False)[0].argmax(0)
    for source in (scores, channels_last):
        assert torch.equal(resize_argmax(source, (143, 91)), reference)


@pytest.mark.parametrize("noisy", [True, False])
def test_scores_the_candidates_cannot_settle_take_one_fused_pass(noisy, monkeypatch):
    torch.manual_seed(3)
    scores = torch.randn(150, 16, 16)  # 150 classes, no spatial coherence: the top 3 rarely decide a blend
    if not noisy:
        scores = F.interpolate(torch.randn(1, 150, 2, 2) * 10, size=(16, 16), mode="bilinear")[0]
    fused = []
    real_interpolate = F.interpolate
    monkeypatch.setattr(resize.F, "interpolate", lambda *a, **k: fused.append(1) or real_interpolate(*a, **k))
    labels = resize_argmax(scores, (64, 64))
    assert bool(fused) == noisy
    assert torch.equal(labels, real_interpolate(scores[None], size=(64, 64), mode="bilinear")[0].argmax(0))


def naive_resize_argmax(scores: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """Pixel by pixel, from the formula: source = (dst + 0.5) * in / out - 0.5 clamped at 0, blend, argmax."""
    _, in_h, in_w = scores.shape
    labels = torch.empty(size, dtype=torch.int64)
    for i in range(size[0]):
        y = max((i + 0.5) * in_h / size[0] - 0.5, 0.0)
        y0 = min(int(y), in_h - 1)
        y1, fy = min(y0 + 1, in_h - 1), y - y0
        for j in range(size[1]):
            x = max((j + 0.5) * in_w / size[1] - 0.5, 0.0)
            x0 = min(int(x), in_w - 1)
            x1, fx = min(x0 + 1, in_w - 1), x - x0
            blend = ((1 - fy) * ((1 - fx) * scores[:, y0, x0] + fx * scores[:, y0, x1])
                     + fy * ((1 - fx) * scores[:, y1, x0] + fx * scores[:, y1, x1]))
            labels[i, j] = blend.argmax()
    return labels


def test_resize_argmax_matches_a_pixel_by_pixel_loop():
    torch.manual_seed(4)
    scores = torch.randn(9, 7, 6, dtype=torch.float64).float()
    assert (resize_argmax(scores, (23, 17)) == naive_resize_argmax(scores.double(), (23, 17))).float().mean() >= 0.999


def test_near_ties_fall_back_to_all_classes(monkeypatch):
    """A class outside every corner's top candidates can still win a blend: the bound must catch it."""
    monkeypatch.setattr(resize, "DIRECT_RESIZE_LIMIT", 0)  # the pixel-by-pixel fallback, not the fused pass
    scores = torch.full((5, 1, 2), -10.0)
    scores[0, 0, 0], scores[1, 0, 1] = 3.0, 3.0  # each corner's own winner
    scores[2, 0, :] = 2.9  # second everywhere: outside the top-1 candidates, first in the middle of the blend
    monkeypatch.setattr(resize, "CANDIDATES", 1)
    labels = resize_argmax(scores, (1, 8))
    reference = F.interpolate(scores[None], size=(1, 8), mode="bilinear", align_corners=False)[0].argmax(0)
    assert torch.equal(labels, reference) and (labels == 2).any()  # 2 is no corner's candidate


def test_ties_go_to_the_lowest_class_as_argmax_does():
    scores = torch.zeros(4, 2, 2)
    scores[3, 0, 0] = scores[1, 1, 1] = 1.0  # corners disagree; in between classes 1 and 3 tie exactly
    scores[:, 1, 0] = scores[:, 0, 1] = torch.tensor([0.0, 0.5, 0.0, 0.5])
    reference = F.interpolate(scores[None], size=(8, 8), mode="bilinear", align_corners=False)[0].argmax(0)
    assert torch.equal(resize_argmax(scores, (8, 8)), reference)


def test_batch_of_one_keeps_channels_last_recognisable():
    scores = torch.randn(1, 8, 9, 5).permute(0, 3, 1, 2)[0]  # a channels-last (K, h, w) slice
    batch = batch_of_one(scores)
    assert torch.equal(batch[0], scores) and batch.stride() == (8 * 9 * 5, 1, 9 * 5, 5)
    resized = F.interpolate(batch, size=(16, 10), mode="bilinear")
    assert resized.is_contiguous(memory_format=torch.channels_last)
    assert batch_of_one(torch.randn(3, 4, 4)).shape == (1, 3, 4, 4)


@pytest.mark.parametrize(("in_size", "out_size"), [((13, 17), (50, 61)), ((40, 33), (9, 14)), ((13, 17), (13, 17)),
                                                 ((8, 9), (301, 5)), ((1, 1), (4, 4)), ((3, 2), (3, 40))])
@pytest.mark.parametrize("chunk", [7, 1 << 21], ids=["small-chunks", "one-chunk"])
@pytest.mark.parametrize("classes", [1, 2, 7])
@pytest.mark.parametrize("direct_limit", [0, 1 << 26], ids=["never-fused", "fused-when-noisy"])
def test_resize_argmax_matches_interpolate(in_size, out_size, chunk, classes, direct_limit, monkeypatch):
    monkeypatch.setattr(resize, "CHUNK_ELEMENTS", chunk)
    monkeypatch.setattr(resize, "DIRECT_RESIZE_LIMIT", direct_limit)
    torch.manual_seed(2)
    scores = torch.randn(classes, *in_size)
    reference = F.interpolate(scores[None], size=out_size, mode="bilinear", align_corners=False)[0]
    labels = resize_argmax(scores, out_size)
    assert labels.shape == out_size and labels.dtype == torch.int64
    # Values agree to float32 rounding, so the argmax can only differ at near-exact ties.
    assert (labels == reference.argmax(0)).float().mean() >= 0.9999


def test_resize_argmax_on_smooth_maps():
    """Large flat regions (where most cells skip the blend) and their boundaries, against PyTorch."""
    scores = F.interpolate(torch.randn(1, 19, 6, 8), size=(48, 64), mode="bilinear", align_corners=False)[0]
    reference = F.interpolate(scores[None], size=(403, 517), mode="bilinear", align_corners=False)[0].argmax(0)
    assert (resize_argmax(scores, (403, 517)) == reference).float().mean() >= 0.9999

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
def test_resize_argmax_both_paths_equal_interpolate_then_argmax(smooth, monkeypatch):
    torch.manual_seed(1)
    # smooth scores take the boundary-first path, noise the fused one; both must give PyTorch's labels
    scores = torch.randn(6, 48, 40)
    if smooth:
        scores = F.interpolate(torch.randn(1, 6, 2, 2), size=(48, 40), mode="bilinear")[0]
    channels_last = scores.permute(1, 2, 0).contiguous().permute(2, 0, 1)
    reference = F.interpolate(scores[None], size=(143, 91), mode="bilinear", align_corners=False)[0].argmax(0)
    fused = []
    real_interpolate = F.interpolate
    monkeypatch.setattr(resize.F, "interpolate", lambda *a, **k: fused.append(1) or real_interpolate(*a, **k))
    for source in (scores, channels_last):
        assert torch.equal(resize_argmax(source, (143, 91)), reference)
    assert bool(fused) != smooth


def test_batch_of_one_keeps_channels_last_recognisable():
    scores = torch.randn(1, 8, 9, 5).permute(0, 3, 1, 2)[0]  # a channels-last (K, h, w) slice
    batch = batch_of_one(scores)
    assert torch.equal(batch[0], scores) and batch.stride() == (8 * 9 * 5, 1, 9 * 5, 5)
    resized = F.interpolate(batch, size=(16, 10), mode="bilinear")
    assert resized.is_contiguous(memory_format=torch.channels_last)
    assert batch_of_one(torch.randn(3, 4, 4)).shape == (1, 3, 4, 4)


@pytest.mark.parametrize(
    ("in_size", "out_size", "chunk_rows"),
    [((13, 17), (50, 61), 7), ((40, 33), (9, 14), 4), ((13, 17), (13, 17), 256), ((8, 9), (301, 5), 64)],
)
@pytest.mark.parametrize("direct_limit", [0, 1 << 26], ids=["boundary-first", "direct"])
def test_resize_argmax_matches_interpolate(in_size, out_size, chunk_rows, direct_limit, monkeypatch):
    monkeypatch.setattr(resize, "DIRECT_RESIZE_LIMIT", direct_limit)
    scores = torch.randn(7, *in_size)
    reference = F.interpolate(scores[None], size=out_size, mode="bilinear", align_corners=False)[0]
    labels = resize_argmax(scores, out_size, chunk_rows)
    assert labels.shape == out_size and labels.dtype == torch.int64
    # Values agree to float32 rounding, so the argmax can only differ at near-exact ties.
    assert (labels == reference.argmax(0)).float().mean() >= 0.9999


def test_resize_argmax_boundary_first_on_smooth_maps(monkeypatch):
    """Large flat regions (where most pixels skip the blend) and their boundaries, against PyTorch."""
    monkeypatch.setattr(resize, "DIRECT_RESIZE_LIMIT", 0)
    scores = F.interpolate(torch.randn(1, 19, 6, 8), size=(48, 64), mode="bilinear", align_corners=False)[0]
    reference = F.interpolate(scores[None], size=(403, 517), mode="bilinear", align_corners=False)[0].argmax(0)
    assert (resize_argmax(scores, (403, 517), chunk_rows=50) == reference).float().mean() >= 0.9999

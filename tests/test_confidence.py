"""Per-pixel confidence (top probability, entropy, TTA disagreement) against full-size computations written out."""

import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

from conftest import TINY_VIT, SteepPointwise
from regproxy_cli import build_model
from regproxy_cli.inference import confidence
from regproxy_cli.inference.confidence import output_stride, predict_confidence
from regproxy_cli.inference.predictor import predict_labels
from regproxy_cli.model.base import SegmentationModel
from regproxy_cli.model.config import ModelConfig
from regproxy_cli.viz import COLORMAP, confidence_pictures

MEAN, STD = np.array([123.675, 116.28, 103.53]), np.array([58.395, 57.12, 57.375])


def _photo(height: int, width: int, seed: int = 0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:height, 0:width]
    base = np.stack([xx * 255 // width, yy * 255 // height, (xx + yy) % 256], -1)
    return np.clip(base + rng.integers(-30, 30, base.shape), 0, 255).astype(np.uint8)


def _normalised(image: np.ndarray) -> torch.Tensor:
    return torch.from_numpy(((image - MEAN) / STD).transpose(2, 0, 1)[None]).float()


def _stats(probs: torch.Tensor) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(labels, max prob, entropy) of (K, H, W) probabilities, the textbook way."""
    entropy = -(probs * torch.log(probs.clamp_min(1e-30))).sum(0)
    return probs.argmax(0).numpy(), probs.max(0).values.numpy(), entropy.numpy()


@pytest.fixture(scope="module")
def tiny():
    torch.manual_seed(0)
    return build_model(TINY_VIT, 5).eval()


def test_banded_maps_of_a_regproxy_equal_a_full_size_softmax(tiny, monkeypatch):
    image = _photo(70, 90)
    with torch.no_grad():
        probs = tiny(_normalised(image))[0].softmax(0)  # K x H x W at once: the forward, then softmax
    labels, top, entropy = _stats(probs)
    bands = []
    resize_rows = confidence.resize_rows

    def spy(logits, out_size, rows):
        bands.append((rows.start, rows.stop))
        return resize_rows(logits, out_size, rows)

    monkeypatch.setattr(confidence, "CONFIDENCE_BAND_LIMIT", 5 * 90 * 9)  # 9 rows of 5 classes at a time
    monkeypatch.setattr(confidence, "resize_rows", spy)
    maps = predict_confidence(tiny, image, mode="whole", grid_probs=True)
    assert bands == [(y, min(y + 9, 70)) for y in range(0, 70, 9)]  # the image in bands of rows
    np.testing.assert_allclose(maps.max_prob, top, atol=1e-6)
    np.testing.assert_allclose(maps.entropy, entropy, atol=1e-5)
    assert np.array_equal(maps.labels, labels) and maps.disagreement is None and maps.views == 1
    assert np.array_equal(maps.labels, predict_labels(tiny, image, mode="whole"))
    assert 1 / 5 - 1e-6 <= maps.max_prob.min() and maps.max_prob.max() <= 1
    assert 0 <= maps.entropy.min() and maps.entropy.max() <= math.log(5) + 1e-6
    # probabilities at the output grid (stride 16 / 4 sub-pixels = 4): the softmax of the grid logits, cropped
    assert output_stride(tiny) == (4, 4) and maps.probs.shape == (5, 18, 23)
    with torch.no_grad():
        grid = tiny.grid_logits(_normalised(image))[0, :, :18, :23].softmax(0).numpy()
    np.testing.assert_allclose(maps.probs, grid, atol=1e-6)


def test_sliding_windows_at_a_test_scale(tiny):
    tiny.config.test_scale = (96, 48)  # a 100x140 photo is seen at 48x67, in 64-pixel windows
    try:
        image = _photo(100, 140, seed=2)
        maps = predict_confidence(tiny, image, mode="slide", grid_probs=True)
        x = F.interpolate(_normalised(image), size=(48, 67), mode="bilinear", align_corners=False)
        # two 64-pixel windows across, at 0 and 3, zero-padded below to 64 rows; averaged where they overlap
        with torch.no_grad():
            left = tiny(F.pad(x[..., :, 0:64], (0, 0, 0, 16)))[..., :48, :]
            right = tiny(F.pad(x[..., :, 3:67], (0, 0, 0, 16)))[..., :48, :]
        total = torch.zeros(1, 5, 48, 67)
        count = torch.zeros(1, 1, 48, 67)
        total[..., 0:64] += left
        total[..., 3:67] += right
        count[..., 0:64] += 1
        count[..., 3:67] += 1
        logits = total / count
        probs = F.interpolate(logits, size=(100, 140), mode="bilinear", align_corners=False)[0].softmax(0)
        labels, top, entropy = _stats(probs)
        np.testing.assert_allclose(maps.max_prob, top, atol=1e-5)
        np.testing.assert_allclose(maps.entropy, entropy, atol=1e-5)
        assert (maps.labels == labels).mean() > 0.999
        grid = F.interpolate(logits, size=(12, 17), mode="bilinear", align_corners=False)[0].softmax(0)
        np.testing.assert_allclose(maps.probs, grid.numpy(), atol=1e-6)
    finally:
        tiny.config.test_scale = None


# the test sizes of a 96x128 image for test scale (16, 12) x (0.5 ... 1.75)
_TTA_SIZES = [(6, 8), (9, 12), (12, 16), (15, 20), (18, 24), (21, 28)]


def _tta_reference(net: nn.Module, image: np.ndarray, sizes) -> tuple[torch.Tensor, list[np.ndarray]]:
    """mmseg's aug_test written out: every scale and flip, logits resized to the image's size, softmax, mean;
    and each view's own labels."""
    height, width = image.shape[:2]
    x = _normalised(image)
    total, view_labels = 0, []
    with torch.no_grad():
        for size in sizes:
            scaled = F.interpolate(x, size=size, mode="bilinear", align_corners=False)
            for flipped in (False, True):
                logits = net(scaled.flip(-1)).flip(-1) if flipped else net(scaled)
                full = F.interpolate(logits, size=(height, width), mode="bilinear", align_corners=False)[0]
                view_labels.append(full.argmax(0).numpy())
                total = total + full.softmax(0)
    return total / (2 * len(sizes)), view_labels


@pytest.mark.parametrize("band_limit", [1 << 24, 4 * 128 * 5])
def test_tta_maps_and_disagreement_equal_aug_test_written_out(band_limit, monkeypatch):
    monkeypatch.setattr(confidence, "CONFIDENCE_BAND_LIMIT", band_limit)
    net, image = SteepPointwise(), _photo(96, 128, seed=4)
    maps = predict_confidence(net, image, tta=True)
    probs, view_labels = _tta_reference(net, image, _TTA_SIZES)
    labels, top, entropy = _stats(probs)
    np.testing.assert_allclose(maps.max_prob, top, atol=1e-5)
    np.testing.assert_allclose(maps.entropy, entropy, atol=1e-5)
    assert (maps.labels == labels).mean() > 0.999
    assert np.array_equal(maps.labels, predict_labels(net, image, tta=True))
    disagreement = np.mean([one != maps.labels for one in view_labels], axis=0)
    np.testing.assert_allclose(maps.disagreement, disagreement, atol=1e-6)
    assert maps.views == 12 and 0 < maps.disagreement.mean() < 1  # the example has both agreement and not


def test_tta_without_a_test_scale_accumulates_and_gives_the_same_maps(monkeypatch):
    """Without a test scale the 12 views outweigh one K x H x W sum: they are added up as they come."""
    net, image = SteepPointwise(test_scale=None), _photo(40, 60, seed=5)
    sizes = [(20, 30), (30, 45), (40, 60), (50, 75), (60, 90), (70, 105)]  # 0.5 ... 1.75 of 40x60, halves up
    accumulated = []
    original = confidence._statistics_from_accumulator
    monkeypatch.setattr(confidence, "_statistics_from_accumulator",
                        lambda *args, **kw: accumulated.append(1) or original(*args, **kw))
    monkeypatch.setattr(confidence, "CONFIDENCE_BAND_LIMIT", 4 * 60 * 7)
    maps = predict_confidence(net, image, tta=True)
    assert accumulated == [1]
    probs, view_labels = _tta_reference(net, image, sizes)
    labels, top, entropy = _stats(probs)
    np.testing.assert_allclose(maps.max_prob, top, atol=1e-5)
    np.testing.assert_allclose(maps.entropy, entropy, atol=1e-5)
    assert (maps.labels == labels).mean() > 0.999
    np.testing.assert_allclose(maps.disagreement, np.mean([one != maps.labels for one in view_labels], 0), atol=1e-6)


class _WidthVoter(SegmentationModel):
    """Votes class 1 with a margin of 20 when its input is at least 24 pixels wide, class 0 otherwise: of the six
    TTA scales of a 96x128 image at test scale (16, 12) (widths 8 ... 28) exactly two vote 1, plain and flipped."""

    def __init__(self) -> None:
        super().__init__()
        self.config = ModelConfig(backbone="stub", num_classes=2, m=0, crop_size=64, inference_mode="whole",
                                  test_scale=(16, 12))
        self.anchor = nn.Parameter(torch.zeros(1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        vote = 20.0 if x.shape[-1] >= 24 else -20.0
        logits = torch.zeros(x.shape[0], 2, *x.shape[-2:])
        logits[:, 1] = vote
        return logits


def test_disagreement_counts_the_views_that_voted_otherwise():
    maps = predict_confidence(_WidthVoter(), _photo(96, 128), tta=True)
    assert (maps.labels == 0).all()  # 8 views of 12 for class 0
    np.testing.assert_allclose(maps.disagreement, 4 / 12, atol=1e-7)  # scales 1.5 and 1.75, plain and flipped
    p1 = 4 / 12 * (1 / (1 + math.exp(-20))) + 8 / 12 * (1 / (1 + math.exp(20)))
    np.testing.assert_allclose(maps.max_prob, 1 - p1, atol=1e-6)
    np.testing.assert_allclose(maps.entropy, -(p1 * math.log(p1) + (1 - p1) * math.log(1 - p1)), atol=1e-5)


def test_confidence_pictures_use_fixed_scales(tiny):
    maps = predict_confidence(_WidthVoter(), _photo(96, 128), tta=True)
    pictures = confidence_pictures(maps, 2)
    assert set(pictures) == {"maxprob", "entropy", "disagreement"}
    for picture in pictures.values():
        assert picture.shape == (96, 128, 3) and picture.dtype == np.uint8
    # 1/3 of the views disagree everywhere: entry round(255 / 3) of the colour map
    assert (pictures["disagreement"] == COLORMAP[85]).all()
    entropy_entry = round(float(maps.entropy[0, 0]) / math.log(2) * 255)
    assert (pictures["entropy"] == COLORMAP[entropy_entry]).all()
    assert "disagreement" not in confidence_pictures(predict_confidence(tiny, _photo(20, 30)), 5)


def test_bf16_runs_the_network_in_bf16_and_the_maps_in_float32(tiny):
    image = _photo(48, 64)
    dtypes = []
    handle = tiny.head.classifier.register_forward_hook(lambda mod, inp, out: dtypes.append(out.dtype))
    maps = predict_confidence(tiny, image, mode="whole", precision="bf16")
    handle.remove()
    reference = predict_confidence(tiny, image, mode="whole")
    assert dtypes == [torch.bfloat16] and maps.max_prob.dtype == np.float32
    assert np.abs(maps.max_prob - reference.max_prob).max() < 0.05

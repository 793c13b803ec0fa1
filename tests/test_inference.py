"""Inference: sliding window vs a naive per-window loop, keep-ratio test scales, aug_test."""

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from conftest import TINY_VIT
from regproxy_cli import RegproxyError, build_model
from regproxy_cli.data.transforms import rescale_size
from regproxy_cli.inference import protocol
from regproxy_cli.inference.protocol import (
    TTA_RATIOS,
    TestProtocol,
    resize_rows,
    segment_labels,
    segment_probs,
    slide_logits,
    window_starts,
)
from regproxy_cli.model.base import SegmentationModel
from regproxy_cli.model.config import ModelConfig

K = 5


@pytest.fixture(scope="module")
def model() -> nn.Module:
    torch.manual_seed(0)
    net = build_model(TINY_VIT, K).eval()
    # Non-trivial affinities and token logits, so padding and windows visibly change the output.
    with torch.no_grad():
        for p in net.head.parameters():
            p.normal_(0, 0.5)
    return net


class Pointwise(SegmentationModel):
    """A 1x1 conv: each output pixel depends only on its input pixel, so it commutes with crops and flips."""

    def __init__(self, classes: int = K) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, classes, 1)
        nn.init.normal_(self.conv.weight)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv(x)


class LocalRow(SegmentationModel):
    """Channel 0: the row index inside the window it is given; channel 1: the input's first channel."""

    def __init__(self) -> None:
        super().__init__()
        self.seen: list[tuple[int, ...]] = []

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self.seen.append(tuple(x.shape))
        rows = torch.arange(x.shape[2], dtype=x.dtype).view(1, 1, -1, 1).expand(x.shape[0], 1, -1, x.shape[3])
        return torch.cat([rows, x[:, :1]], dim=1)


def naive_slide(model, images, window, stride):
    """mmseg's slide_inference with the authors' zero-padding, one window and one image at a time."""
    (wh, ww), (sh, sw) = window, stride
    _, _, height, width = images.shape
    out, count = None, torch.zeros(1, 1, height, width)
    for i in range(max(height - wh + sh - 1, 0) // sh + 1):
        for j in range(max(width - ww + sw - 1, 0) // sw + 1):
            y1, x1 = i * sh, j * sw
            y2, x2 = min(y1 + wh, height), min(x1 + ww, width)
            y1, x1 = max(y2 - wh, 0), max(x2 - ww, 0)
            for b in range(images.shape[0]):
                crop = F.pad(images[b : b + 1, :, y1:y2, x1:x2], (0, ww - (x2 - x1), 0, wh - (y2 - y1)))
                logits = model(crop)[:, :, : y2 - y1, : x2 - x1]
                if out is None:
                    out = torch.zeros(images.shape[0], logits.shape[1], height, width)
                out[b : b + 1, :, y1:y2, x1:x2] += logits
            count[..., y1:y2, x1:x2] += 1
    return out / count


@pytest.mark.parametrize("size", [(40, 50), (64, 64), (100, 130), (64, 100)])
def test_slide_matches_naive_loop(model, size):
    images = torch.randn(2, 3, *size)
    with torch.no_grad():
        expected = naive_slide(model, images, (64, 64), (48, 48))
    got = slide_logits(model, images, num_classes=K, window=(64, 64), stride=(48, 48), batch_size=3)
    assert got.shape == (2, K, *size)
    torch.testing.assert_close(got, expected, atol=1e-4, rtol=1e-4)


def test_slide_batch_size_does_not_change_the_result(model):
    images = torch.randn(1, 3, 90, 120)
    one = slide_logits(model, images, num_classes=K, window=(64, 64), stride=(32, 32), batch_size=1)
    eight = slide_logits(model, images, num_classes=K, window=(64, 64), stride=(32, 32), batch_size=8)
    torch.testing.assert_close(one, eight, atol=1e-4, rtol=1e-4)


def test_window_starts_are_aligned_to_the_image_end():
    assert window_starts(10, 4, 3) == [0, 3, 6]
    assert window_starts(11, 4, 3) == [0, 3, 6, 7]
    assert window_starts(3, 4, 3) == [0]  # smaller than the window: one (padded) window
    assert window_starts(512, 512, 341) == [0]
    assert window_starts(1024, 768, 512) == [0, 256]  # Cityscapes height


def test_overlapping_windows_are_averaged():
    # Windows over 10 rows: [0, 4), [3, 7), [6, 10); rows 3 and 6 are seen at local rows 3 and 0.
    images = torch.randn(1, 3, 10, 4)
    got = slide_logits(LocalRow(), images, num_classes=2, window=(4, 4), stride=(3, 3))
    expected_rows = torch.tensor([0, 1, 2, 1.5, 1, 2, 1.5, 1, 2, 3])
    torch.testing.assert_close(got[0, 0, :, 0], expected_rows)
    torch.testing.assert_close(got[0, 1], images[0, 0])  # identical values average to themselves


def test_small_image_is_one_padded_window():
    net = LocalRow()
    images = torch.randn(2, 3, 5, 7)
    got = slide_logits(net, images, num_classes=2, window=(16, 12), stride=(8, 8), batch_size=8)
    assert net.seen == [(2, 3, 16, 12)]  # both images in one forward call, padded to the full window
    torch.testing.assert_close(got[:, 1], images[:, 0])


def test_slide_rejects_bad_window():
    with pytest.raises(RegproxyError, match="window"):
        slide_logits(Pointwise(), torch.zeros(1, 3, 8, 8), num_classes=K, window=(0, 8), stride=(4, 4))


@pytest.mark.parametrize(
    ("size", "scale", "expected"),
    [
        ((512, 683), (2048, 512), (512, 683)),
        ((1024, 2048), (2048, 1024), (1024, 2048)),
        ((300, 400), (2048, 512), (512, 683)),
        ((300, 400), (512, 2048), (512, 683)),  # mmcv takes max/min of the scale
        ((4000, 500), (2048, 512), (2048, 256)),  # the long side limits
        ((375, 500), (1536, 384), (384, 512)),  # ratio 0.75 of (2048, 512)
    ],
)
def test_rescale_size(size, scale, expected):
    assert rescale_size(*size, scale) == expected


def test_probs_sum_to_one(model):
    image = torch.randn(1, 3, 40, 56)
    protocol = TestProtocol(num_classes=K, mode="slide", window=(32, 32), stride=(24, 24), test_scale=None,
                            ratios=(0.75, 1.0), flip=True)
    probs = segment_probs(model, image, protocol, (30, 70))
    assert probs.shape == (K, 30, 70)
    torch.testing.assert_close(probs.sum(0), torch.ones(30, 70))


def test_flip_is_averaged(model):
    image = torch.randn(1, 3, 48, 64)
    got = segment_probs(model, image, TestProtocol(num_classes=K, flip=True), (48, 64))
    with torch.no_grad():
        plain = model(image)[0].softmax(0)
        mirrored = model(image.flip(-1)).flip(-1)[0].softmax(0)
    torch.testing.assert_close(got, (plain + mirrored) / 2, atol=1e-5, rtol=1e-5)
    assert not torch.allclose(plain, mirrored, atol=1e-3)  # the flip did matter for this model


def test_flip_equivariant_model_is_unchanged_by_flip():
    net, image = Pointwise(), torch.randn(3, 20, 30)
    with_flip = segment_probs(net, image, TestProtocol(num_classes=K, flip=True), (20, 30))
    without = segment_probs(net, image, TestProtocol(num_classes=K, flip=False), (20, 30))
    torch.testing.assert_close(with_flip, without, atol=1e-6, rtol=1e-5)


def test_ratios_follow_mmseg_aug_test(model):
    image = torch.randn(1, 3, 30, 40)
    ratios = (0.5, 1.0, 1.5)
    got = segment_probs(model, image, TestProtocol(num_classes=K, test_scale=(80, 32), ratios=ratios), (30, 40))
    expected = torch.zeros(K, 30, 40)
    with torch.no_grad():
        for ratio, size in zip(ratios, [(16, 21), (32, 43), (48, 64)]):
            assert rescale_size(30, 40, (int(80 * ratio), int(32 * ratio))) == size
            scaled = F.interpolate(image, size=size, mode="bilinear", align_corners=False)
            logits = F.interpolate(model(scaled), size=(30, 40), mode="bilinear", align_corners=False)
            expected += logits[0].softmax(0) / len(ratios)
    torch.testing.assert_close(got, expected, atol=1e-5, rtol=1e-5)


def test_slide_equals_whole_when_the_window_is_the_image(model):
    image = torch.randn(1, 3, 64, 64)
    whole = segment_probs(model, image, TestProtocol(num_classes=K, mode="whole"), (64, 64))
    slide = segment_probs(model, image, TestProtocol(num_classes=K, mode="slide", window=(64, 64), stride=(48, 48)),
                          (64, 64))
    torch.testing.assert_close(slide, whole, atol=1e-5, rtol=1e-5)
    # A pointwise model ignores the zero padding, so a window larger than the image changes nothing either.
    net, small = Pointwise(), torch.randn(1, 3, 20, 30)
    torch.testing.assert_close(
        segment_probs(net, small, TestProtocol(num_classes=K, mode="slide", window=(32, 32), stride=(16, 16)),
                      (20, 30)),
        segment_probs(net, small, TestProtocol(num_classes=K, mode="whole"), (20, 30)),
    )


def test_segment_probs_rejects_bad_options():
    net, image = Pointwise(), torch.randn(1, 3, 8, 8)
    with pytest.raises(RegproxyError, match="mode"):
        segment_probs(net, image, TestProtocol(num_classes=K, mode="tiles"), (8, 8))
    with pytest.raises(RegproxyError, match="window"):
        segment_probs(net, image, TestProtocol(num_classes=K, mode="slide"), (8, 8))


@pytest.mark.parametrize(("in_size", "out_size"), [((7, 9), (30, 40)), ((13, 17), (5, 6)), ((8, 8), (8, 8))])
def test_resize_rows_are_rows_of_the_full_resize(in_size, out_size):
    logits = torch.randn(K, *in_size)
    full = F.interpolate(logits[None], size=out_size, mode="bilinear", align_corners=False)[0]
    for first in range(out_size[0]):
        for last in range(first + 1, out_size[0] + 1):
            torch.testing.assert_close(resize_rows(logits, out_size, slice(first, last)), full[:, first:last])


def test_segment_labels_in_bands_is_the_argmax_of_segment_probs(model, monkeypatch):
    image = torch.randn(1, 3, 40, 56)
    # test sizes 20x28 and 15x21 (and their mirrors): far fewer floats than the 90x130 output
    options = TestProtocol(num_classes=K, mode="slide", window=(32, 32), stride=(24, 24), test_scale=(40, 20),
                           ratios=(0.75, 1.0), flip=True)
    expected = segment_probs(model, image, options, (90, 130)).argmax(0)
    bands = []
    monkeypatch.setattr(protocol, "TTA_FULL_SIZE_LIMIT", K * 130 * 8)  # 8 rows at a time
    monkeypatch.setattr(protocol, "resize_rows", lambda logits, size, rows: bands.append(rows) or resize_rows(
        logits, size, rows))
    got = segment_labels(model, image, options, (90, 130))
    assert len(bands) == 4 * len(range(0, 90, 8)) and max(r.stop - r.start for r in bands) == 8
    assert torch.equal(got, expected)


def test_segment_labels_keeps_the_accumulator_when_the_test_sizes_are_larger(model, monkeypatch):
    image = torch.randn(1, 3, 40, 56)
    options = TestProtocol(num_classes=K, ratios=(1.0,), flip=True)  # held logits: twice the 40x56 output
    monkeypatch.setattr(protocol, "TTA_FULL_SIZE_LIMIT", 1)
    monkeypatch.setattr(protocol, "resize_rows", None)  # banding would fail
    assert torch.equal(segment_labels(model, image, options, (40, 56)),
                       segment_probs(model, image, options, (40, 56)).argmax(0))


@pytest.mark.parametrize("test_scale", [(2048, 512), None])
def test_the_protocol_of_a_config_is_its_mode_windows_and_scales(test_scale):
    """One translation of config -> protocol for predict, confidence, the pipeline and the demo."""
    config = ModelConfig(backbone="tiny-vit", m=1, num_classes=K, crop_size=64, window_stride=48, test_scale=test_scale)
    plain = TestProtocol.from_config(config, scale=0.5, batch_size=3)
    assert (plain.mode, plain.window, plain.stride, plain.batch_size, plain.flip) == ("slide", (64, 64), (48, 48), 3,
                                                                                     False)
    tta = TestProtocol.from_config(config, mode="whole", tta=True, scale=0.5)
    assert tta.mode == "whole" and tta.flip and tta.views == 12
    if test_scale is None:  # the image size times the scale, and the paper's ratios times the scale
        assert plain.ratios == (0.5,) and plain.working_size(101, 60) == (50, 30)
        assert tta.test_scale is None and tta.ratios == tuple(r * 0.5 for r in TTA_RATIOS)
    else:  # mmseg: the test scale times the scale, keeping the aspect ratio
        assert plain.test_scale == tta.test_scale == (1024, 256) and tta.ratios == TTA_RATIOS
        assert plain.working_size(512, 1024) == rescale_size(512, 1024, (1024, 256)) == (256, 512)
    with pytest.raises(RegproxyError, match="scale must be positive"):
        TestProtocol.from_config(config, scale=0)
    with pytest.raises(RegproxyError, match="inference mode"):
        TestProtocol.from_config(config, mode="tiles")

"""The mmseg training pipeline: sizes, label values, cat_max_ratio, flips, photometric semantics, determinism."""

import colorsys

import numpy as np
import pytest
import torch

from regproxy_cli.data import transforms as T


def _pair(height: int = 32, width: int = 48, classes: int = 4, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    image = rng.integers(0, 256, size=(height, width, 3), dtype=np.uint8)
    label = rng.integers(0, classes, size=(height, width)).astype(np.uint8)
    return image, label


def test_rescale_size_follows_mmcv() -> None:
    # The short side is bounded by 512 and the long one by 2048: factor = min(2048 / 200, 512 / 100) = 5.12.
    assert T.rescale_size(100, 200, (2048, 512)) == (512, 1024)
    assert T.rescale_size(100, 200, (512, 2048)) == (512, 1024)  # edge order does not matter
    # A very wide image is bounded by its long side: factor = 2048 / 1000.
    assert T.rescale_size(100, 1000, (2048, 512)) == (205, 2048)


def test_random_resize_keeps_aspect_and_label_values() -> None:
    image, label = _pair(32, 48)
    out_image, out_label = T.RandomResize(scale=(96, 64), ratio_range=(1.0, 1.0))(image, label)
    assert tuple(out_image.shape) == (3, 64, 96) and tuple(out_label.shape) == (64, 96)
    assert out_image.dtype == torch.uint8
    assert set(out_label.unique().tolist()) <= set(np.unique(label).tolist())  # nearest: no new values
    out_image, _ = T.RandomResize(scale=(96, 64), ratio_range=(0.5, 2.0))(image, label)
    height, width = out_image.shape[-2:]
    assert abs(width / height - 1.5) < 0.05 and 16 <= height <= 128


def test_nearest_label_upsampling_repeats_pixels() -> None:
    label = np.array([[0, 3], [7, 255]], dtype=np.uint8)
    image = np.zeros((2, 2, 3), dtype=np.uint8)
    _, out = T.RandomResize(scale=(6, 6), ratio_range=(1.0, 1.0))(image, label)
    expected = np.repeat(np.repeat(label, 3, axis=0), 3, axis=1)
    np.testing.assert_array_equal(out.numpy(), expected)


def test_random_crop_shapes_and_small_images() -> None:
    image, label = _pair(32, 48)
    out_image, out_label = T.RandomCrop((16, 20))(image, label)
    assert tuple(out_image.shape) == (3, 16, 20) and tuple(out_label.shape) == (16, 20)
    out_image, out_label = T.RandomCrop((64, 20))(image, label)  # taller than the image: height kept whole
    assert tuple(out_image.shape) == (3, 32, 20)


def test_random_crop_image_and_label_stay_aligned() -> None:
    image = np.zeros((32, 48, 3), dtype=np.uint8)
    image[..., 0] = np.arange(48)[None, :]  # the red channel encodes the column, the label the row
    label = np.repeat(np.arange(32, dtype=np.uint8)[:, None], 48, axis=1)
    out_image, out_label = T.RandomCrop((10, 12), cat_max_ratio=1.0)(image, label)
    assert (out_label == out_label[:, :1]).all() and (out_image[0] == out_image[0, :1]).all()
    assert out_label[0, 0] + 9 == out_label[-1, 0] and out_image[0, 0, 0] + 11 == out_image[0, 0, -1]


def _stripe_share(labels: list[torch.Tensor]) -> float:
    """Fraction of crops where no class covers 75% or more."""
    ok = [(lab == 0).float().mean() < 0.75 and (lab == 1).float().mean() < 0.75 for lab in labels]
    return sum(ok) / len(ok)


def test_cat_max_ratio_avoids_dominated_crops() -> None:
    # Class 0 covers 90% of the image; class 1 is a 20-px-wide stripe. Only ~21% of random 32x32 crops hold
    # >= 25% of the stripe, and 10 tries find one about 90% of the time.
    label = np.zeros((32, 200), dtype=np.uint8)
    label[:, 40:60] = 1
    image = np.zeros((32, 200, 3), dtype=np.uint8)
    generator = torch.Generator().manual_seed(0)
    checked = T.RandomCrop((32, 32), cat_max_ratio=0.75, generator=generator)
    unchecked = T.RandomCrop((32, 32), cat_max_ratio=1.0, generator=generator)
    assert _stripe_share([checked(image, label)[1] for _ in range(200)]) > 0.8
    assert _stripe_share([unchecked(image, label)[1] for _ in range(200)]) < 0.35


def test_cat_max_ratio_ignores_ignored_pixels_and_gives_up() -> None:
    crop = T.RandomCrop((16, 16), cat_max_ratio=0.75)
    one_class = torch.full((16, 16), 255, dtype=torch.int64)
    one_class[:, :4] = 2
    assert not crop._acceptable(one_class)  # one class plus ignored pixels: ignored is not a second class
    dominated = torch.full((16, 16), 255, dtype=torch.int64)
    dominated[:8, :8], dominated[0, 8:10] = 1, 2  # class 1 is 64 of 66 labelled pixels; ignored ones do not dilute
    assert not crop._acceptable(dominated)
    balanced = torch.zeros((16, 16), dtype=torch.int64)
    balanced[:, 8:] = 1
    assert crop._acceptable(balanced)

    # acceptable crops are those left of x = 16 (about half): after a first draw that misses, the retries find one
    label = np.full((32, 48), 3, dtype=np.uint8)
    label[::2, :24:2] = label[1::2, 1:24:2] = 1  # a checkerboard of 1 and 3 on the left half
    label[:2] = 255
    image = np.zeros((32, 48, 3), np.uint8)
    for seed in range(200):
        first = T.RandomCrop((16, 16), generator=torch.Generator().manual_seed(seed))._random_box(32, 48)
        if not crop._acceptable(torch.from_numpy(label[first[0]:first[0] + 16, first[1]:first[1] + 16]).long()):
            break
    else:
        pytest.fail("no seed draws an unacceptable first crop")
    _, out = T.RandomCrop((16, 16), 0.75, generator=torch.Generator().manual_seed(seed))(image, label)
    assert crop._acceptable(out.long()), "an acceptable crop exists, and was not found"

    # no acceptable crop at all: 1 draw + 10 retries, then that last crop is returned unchecked, as mmseg does
    hopeless = np.full((32, 48), 255, dtype=np.uint8)
    hopeless[:, :4] = 2
    generator = torch.Generator().manual_seed(0)
    _, out = T.RandomCrop((16, 16), 0.75, generator=generator)(image, hopeless)
    replay = T.RandomCrop((16, 16), generator=torch.Generator().manual_seed(0))
    boxes = [replay._random_box(32, 48) for _ in range(11)]
    assert torch.equal(generator.get_state(), replay.generator.get_state())  # exactly 11 draws, no more
    top, left = boxes[-1]
    np.testing.assert_array_equal(out.numpy(), hopeless[top:top + 16, left:left + 16])


def test_flip_flips_both() -> None:
    image, label = _pair()
    out_image, out_label = T.RandomFlip(p=1.0)(image, label)
    np.testing.assert_array_equal(out_image.permute(1, 2, 0).numpy(), image[:, ::-1])
    np.testing.assert_array_equal(out_label.numpy(), label[:, ::-1])
    out_image, out_label = T.RandomFlip(p=0.0)(image, label)
    np.testing.assert_array_equal(out_label.numpy(), label)


def test_scale_saturation_matches_hsv_round_trip() -> None:
    rng = np.random.default_rng(1)
    pixels = rng.integers(0, 256, size=(50, 3)).astype(np.float32)
    for factor in (0.0, 0.6, 1.4):
        out = T.scale_saturation(torch.from_numpy(pixels.T[:, :, None].copy()), factor)[:, :, 0].T.numpy()
        for rgb, got in zip(pixels, out):
            h, s, v = colorsys.rgb_to_hsv(*(rgb / 255))
            expected = np.array(colorsys.hsv_to_rgb(h, min(s * factor, 1.0), v)) * 255
            np.testing.assert_allclose(got, expected, atol=1e-3)


def test_photometric_distortion_changes_only_the_image() -> None:
    image, label = _pair()
    grey = np.repeat(image[..., :1], 3, axis=2)
    generator = torch.Generator().manual_seed(3)
    distort = T.PhotoMetricDistortion(generator=generator)
    changed = 0
    for _ in range(8):
        out_image, out_label = distort(image, label)
        assert out_image.dtype == torch.uint8 and tuple(out_image.shape) == (3, 32, 48)
        np.testing.assert_array_equal(out_label.numpy(), label)
        changed += not np.array_equal(out_image.permute(1, 2, 0).numpy(), image)
        # Saturation and hue cannot colour a grey image; brightness and contrast act on all channels alike.
        out_grey, _ = distort(grey, label)
        assert (out_grey == out_grey[:1]).all()
    assert changed >= 4


def test_normalize_and_pad() -> None:
    image = np.tile(np.array([123.675, 116.28, 103.53]).round().astype(np.uint8), (4, 6, 1))
    out_image, out_label = T.Normalize()(image, np.ones((4, 6), np.uint8))
    assert out_image.dtype == torch.float32 and out_label.dtype == torch.int64
    assert out_image.abs().max() < 0.01
    padded_image, padded_label = T.Pad((8, 7))(out_image + 1, out_label)
    assert tuple(padded_image.shape) == (3, 8, 7) and tuple(padded_label.shape) == (8, 7)
    assert (padded_label[4:] == 255).all() and (padded_label[:, 6:] == 255).all() and (padded_label[:4, :6] == 1).all()
    assert (padded_image[:, 4:] == 0).all() and (padded_image[:, :4, :6] > 0.9).all()
    big_image, _ = T.Pad((2, 2))(out_image, out_label)  # larger than the target: unchanged
    assert tuple(big_image.shape) == (3, 4, 6)


@pytest.mark.parametrize("layout", ["numpy", "tensor_hwc", "tensor_chw"])
def test_input_layouts_agree(layout: str) -> None:
    image, label = _pair()
    inputs = {"numpy": (image, label), "tensor_hwc": (torch.from_numpy(image), torch.from_numpy(label)),
              "tensor_chw": (torch.from_numpy(image).permute(2, 0, 1), torch.from_numpy(label))}[layout]
    out_image, out_label = T.test_transform()(*inputs)
    expected_image, expected_label = T.test_transform()(image, label)
    torch.testing.assert_close(out_image, expected_image)
    assert torch.equal(out_label, expected_label)
    assert T.test_transform()(image, None)[1] is None


def test_train_pipeline_output_and_label_values() -> None:
    image, label = _pair(32, 48, classes=3)
    label[:2] = 255
    pipeline = T.train_pipeline(crop=(40, 40), scale=(48, 32), ratio_range=(0.5, 2.0))
    for _ in range(6):
        out_image, out_label = pipeline(image, label)
        assert out_image.dtype == torch.float32 and tuple(out_image.shape) == (3, 40, 40)
        assert out_label.dtype == torch.int64 and tuple(out_label.shape) == (40, 40)
        assert set(out_label.unique().tolist()) <= {0, 1, 2, 255}


def test_train_pipeline_is_deterministic_with_a_seed() -> None:
    image, label = _pair(32, 48)

    def run(seed: int, use_global: bool) -> tuple[torch.Tensor, torch.Tensor]:
        if use_global:
            torch.manual_seed(seed)
            pipeline = T.train_pipeline(crop=(24, 24), scale=(48, 32))
        else:
            pipeline = T.train_pipeline(crop=(24, 24), scale=(48, 32), generator=torch.Generator().manual_seed(seed))
        outputs = [pipeline(image, label) for _ in range(3)]
        return torch.stack([o[0] for o in outputs]), torch.stack([o[1] for o in outputs])

    for use_global in (False, True):
        first, again, other = run(5, use_global), run(5, use_global), run(6, use_global)
        assert torch.equal(first[0], again[0]) and torch.equal(first[1], again[1])
        assert not torch.equal(first[0], other[0])

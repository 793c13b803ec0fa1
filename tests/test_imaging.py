"""Image loading in every PIL mode, one-line load errors, label PNGs, overlays, region maps and dataset metadata."""

import numpy as np
import pytest
import torch
from PIL import Image

from conftest import TINY_VIT
from regproxy_cli import RegproxyError, build_model
from regproxy_cli.classes import (
    ADE20K_CLASSES,
    ADE20K_PALETTE,
    CITYSCAPES_CLASSES,
    CITYSCAPES_PALETTE,
    PASCAL_CONTEXT59_CLASSES,
    PASCAL_CONTEXT59_PALETTE,
    PASCAL_CONTEXT_CLASSES,
    PASCAL_CONTEXT_PALETTE,
    default_palette,
)
from regproxy_cli.imaging import (
    colorize,
    load_image,
    overlay,
    region_boundaries,
    region_map,
    region_owners,
    save_label_png,
    save_png_atomic,
)

RNG = np.random.default_rng(0)


def saved(tmp_path, image: Image.Image, name: str, **kwargs):
    path = tmp_path / name
    image.save(path, **kwargs)
    return path


def grey3(values) -> np.ndarray:
    """The RGB array load_image should give for grey levels ``values``."""
    values = np.asarray(values, dtype=np.uint8)
    return np.repeat(values[..., None], 3, axis=-1)


def test_rgb_round_trip(tmp_path):
    array = RNG.integers(0, 256, (9, 11, 3), dtype=np.uint8)
    got = load_image(saved(tmp_path, Image.fromarray(array), "rgb.png"))
    assert got.dtype == np.uint8 and got.shape == (9, 11, 3)
    np.testing.assert_array_equal(got, array)


def test_grey_and_bilevel(tmp_path):
    grey = RNG.integers(0, 256, (6, 5), dtype=np.uint8)
    np.testing.assert_array_equal(load_image(saved(tmp_path, Image.fromarray(grey), "l.png")), grey3(grey))
    bits = Image.fromarray(grey > 127).convert("1")
    assert bits.mode == "1"
    np.testing.assert_array_equal(load_image(saved(tmp_path, bits, "1.png")), grey3(np.where(grey > 127, 255, 0)))


def test_alpha_is_composited_on_black(tmp_path):
    rgba = np.array([[[200, 100, 50, 255], [200, 100, 50, 0], [200, 100, 50, 128]]], dtype=np.uint8)
    got = load_image(saved(tmp_path, Image.fromarray(rgba), "rgba.png"))
    np.testing.assert_array_equal(got[0], [[200, 100, 50], [0, 0, 0], [100, 50, 25]])
    la = Image.fromarray(rgba[..., [0, 3]])
    assert la.mode == "LA"
    np.testing.assert_array_equal(load_image(saved(tmp_path, la, "la.png")), grey3([[200, 0, 100]]))


def test_palette_with_and_without_transparency(tmp_path):
    indices = np.array([[0, 1, 2], [2, 1, 0]], dtype=np.uint8)
    colours = np.array([[255, 0, 0], [0, 255, 0], [10, 20, 30]], dtype=np.uint8)
    image = Image.fromarray(indices)
    image.putpalette(colours.tobytes())
    assert image.mode == "P"
    np.testing.assert_array_equal(load_image(saved(tmp_path, image, "p.png")), colours[indices])
    transparent = load_image(saved(tmp_path, image, "pt.png", transparency=1))
    expected = colours[indices]
    expected[indices == 1] = 0
    np.testing.assert_array_equal(transparent, expected)
    gif = load_image(saved(tmp_path, image, "p.gif"))
    np.testing.assert_array_equal(gif, colours[indices])


def test_cmyk(tmp_path):
    cmyk = np.array([[[0, 0, 0, 0], [255, 0, 0, 0], [0, 0, 0, 255]]], dtype=np.uint8)
    got = load_image(saved(tmp_path, Image.fromarray(cmyk, mode="CMYK"), "cmyk.tiff"))
    np.testing.assert_array_equal(got[0], [[255, 255, 255], [0, 255, 255], [0, 0, 0]])


def test_16_bit_is_scaled_by_its_depth(tmp_path):
    values = np.array([[0, 255, 256, 32768, 65535]], dtype=np.uint16)
    image = Image.fromarray(values)
    assert image.mode == "I;16"
    got = load_image(saved(tmp_path, image, "16.png"))
    np.testing.assert_array_equal(got, grey3([[0, 0, 1, 128, 255]]))
    big_endian = Image.frombytes("I;16B", (5, 1), values.astype(">u2").tobytes())
    np.testing.assert_array_equal(load_image(saved(tmp_path, big_endian, "16b.tiff")), grey3([[0, 0, 1, 128, 255]]))


def test_32_bit_integer_and_float(tmp_path):
    wide = Image.fromarray(np.array([[0, 1 << 23, 2**31 - 1, -5]], dtype=np.int32))
    assert wide.mode == "I"
    np.testing.assert_array_equal(load_image(saved(tmp_path, wide, "i.tiff")), grey3([[0, 1, 255, 0]]))
    floats = Image.fromarray(np.array([[-5.0, 12.4, 127.6, 300.0]], dtype=np.float32))
    assert floats.mode == "F"
    np.testing.assert_array_equal(load_image(saved(tmp_path, floats, "f.tiff")), grey3([[0, 12, 128, 255]]))


@pytest.mark.parametrize("suffix", ["png", "jpg"])
def test_exif_orientation_is_applied(tmp_path, suffix):
    array = np.zeros((20, 30, 3), dtype=np.uint8)
    array[:4, :4] = (255, 0, 0)  # a red mark in the stored top-left corner
    image = Image.fromarray(array)
    exif = image.getexif()
    exif[0x0112] = 6  # "rotate 90 degrees clockwise to view"
    got = load_image(saved(tmp_path, image, f"rot.{suffix}", exif=exif))
    assert got.shape == (30, 20, 3)
    assert got[1, -2, 0] > 200 and got[1, 1, 0] < 50  # the mark is now top-right


def test_load_errors_are_one_line_with_the_path(tmp_path):
    text = tmp_path / "notes.jpg"
    text.write_text("not an image\n")
    good = saved(tmp_path, Image.fromarray(RNG.integers(0, 256, (64, 64, 3), dtype=np.uint8)), "good.png")
    truncated = tmp_path / "truncated.png"
    truncated.write_bytes(good.read_bytes()[: good.stat().st_size // 2])
    for path in (tmp_path / "missing.png", tmp_path, text, truncated):
        with pytest.raises(RegproxyError) as caught:
            load_image(path)
        message = str(caught.value)
        assert message.startswith(f"{path}: ") and "\n" not in message


def test_save_png_atomic(tmp_path):
    path = tmp_path / "out.png"
    first = RNG.integers(0, 256, (4, 6, 3), dtype=np.uint8)
    save_png_atomic(path, first)
    save_png_atomic(path, Image.fromarray(first[..., 0]))  # overwrites in place
    np.testing.assert_array_equal(np.asarray(Image.open(path)), first[..., 0])
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out.png"]  # no temporary left behind
    with pytest.raises(RegproxyError, match="cannot write"):
        save_png_atomic(tmp_path / "no-such-dir" / "out.png", first)


def test_label_png_is_a_palette_png_of_class_ids(tmp_path):
    labels = RNG.integers(0, 19, (7, 9))
    save_label_png(tmp_path / "labels.png", labels, CITYSCAPES_PALETTE)
    with Image.open(tmp_path / "labels.png") as image:
        assert image.mode == "P"
        np.testing.assert_array_equal(np.asarray(image), labels)
        palette = np.array(image.getpalette()[: 19 * 3]).reshape(19, 3)
        np.testing.assert_array_equal(palette, CITYSCAPES_PALETTE)
        np.testing.assert_array_equal(np.asarray(image.convert("RGB")), colorize(labels, CITYSCAPES_PALETTE))


def test_many_classes_give_a_16_bit_png(tmp_path):
    labels = RNG.integers(0, 300, (5, 8))
    labels[0, 0] = 299
    save_label_png(tmp_path / "labels.png", labels, default_palette(300))
    with Image.open(tmp_path / "labels.png") as image:
        assert image.mode in ("I;16", "I")  # Pillow versions differ in how they open 16-bit grey PNGs
        np.testing.assert_array_equal(np.asarray(image), labels)


def test_label_ids_must_fit(tmp_path):
    with pytest.raises(ValueError, match="label ids"):
        save_label_png(tmp_path / "x.png", np.array([[-1, 0]]), CITYSCAPES_PALETTE)


def test_colorize_and_overlay():
    labels = np.array([[0, 1], [2, 1]])
    palette = [(255, 0, 0), (0, 255, 0), (0, 0, 255)]
    np.testing.assert_array_equal(colorize(labels, palette)[1, 0], [0, 0, 255])
    image = np.full((2, 2, 3), 100, dtype=np.uint8)
    blended = overlay(image, labels, palette, alpha=0.5)
    assert blended.dtype == np.uint8
    np.testing.assert_array_equal(blended[0, 0], [178, 50, 50])  # round(0.5 * 100 + 0.5 * 255) = 178
    np.testing.assert_array_equal(overlay(image, labels, palette, alpha=0.0), image)
    with pytest.raises(ValueError):
        colorize(np.array([[3]]), palette)


def one_hot_affinity(neighbour: np.ndarray, grid: tuple[int, int]) -> np.ndarray:
    """(9, h, w, Hg, Wg) affinity giving every sub-pixel (i, j) of every token the neighbour ``neighbour[i, j]``."""
    sub_h, sub_w = neighbour.shape
    affinity = np.zeros((9, sub_h, sub_w, *grid), dtype=np.float32)
    for i in range(sub_h):
        for j in range(sub_w):
            affinity[neighbour[i, j], i, j] = 1
    return affinity


def test_centre_ownership_has_boundaries_only_on_the_token_grid():
    stride, grid = 16, (3, 4)
    image = RNG.integers(0, 256, (40, 60, 3), dtype=np.uint8)  # not a multiple of the stride: cropped
    affinity = one_hot_affinity(np.full((4, 4), 4), grid)
    owners = region_owners(affinity, stride, (40, 60))
    np.testing.assert_array_equal(owners, (np.arange(40)[:, None] // 16) * 4 + np.arange(60)[None, :] // 16)
    edges = np.argwhere(region_boundaries(owners))
    assert len(edges) and np.all((edges[:, 0] % stride == stride - 1) | (edges[:, 1] % stride == stride - 1))
    picture = region_map(image, torch.from_numpy(affinity), stride)
    assert picture.shape == (40, 60, 3) and picture.dtype == np.uint8
    assert np.all(picture[15, 5] == 255) and not np.all(picture[5, 5] == 255)  # boundary white, interior tinted


def test_checkerboard_ownership_draws_boundaries_inside_tokens():
    checker = np.where((np.arange(4)[:, None] + np.arange(4)[None, :]) % 2 == 0, 4, 5)  # centre / right neighbour
    owners = region_owners(one_hot_affinity(checker, (2, 2)), 16, (32, 32))
    edges = region_boundaries(owners)
    assert edges[0, 3] and edges[3, 0]  # between the 4x4-pixel sub-pixel cells of token (0, 0)
    # Right neighbours of the last column fall outside the grid and are clipped to the token itself.
    assert not edges[0:15, 16:31].any()


def test_region_map_of_a_model(tmp_path):
    model = build_model(TINY_VIT, 3).eval()
    image = RNG.integers(0, 256, (40, 50, 3), dtype=np.uint8)
    x = torch.from_numpy(image).permute(2, 0, 1)[None].float() / 255
    with torch.no_grad():
        affinity = model.forward_all(x).affinity
    assert region_map(image, affinity, 16).shape == (40, 50, 3)  # a leading batch of 1 is accepted
    save_png_atomic(tmp_path / "regions.png", region_map(image, affinity[0], 16))
    assert load_image(tmp_path / "regions.png").shape == (40, 50, 3)


def test_dataset_metadata():
    for classes, palette, count in [
        (ADE20K_CLASSES, ADE20K_PALETTE, 150),
        (CITYSCAPES_CLASSES, CITYSCAPES_PALETTE, 19),
        (PASCAL_CONTEXT_CLASSES, PASCAL_CONTEXT_PALETTE, 60),
        (PASCAL_CONTEXT59_CLASSES, PASCAL_CONTEXT59_PALETTE, 59),
    ]:
        assert len(classes) == len(palette) == count
        assert len(set(classes)) == count
        assert all(len(c) == 3 and all(0 <= v <= 255 for v in c) for c in palette)
    assert ADE20K_CLASSES[:3] == ("wall", "building", "sky") and ADE20K_CLASSES[-1] == "flag"
    assert CITYSCAPES_CLASSES[0] == "road" and PASCAL_CONTEXT_CLASSES[0] == "background"
    assert PASCAL_CONTEXT59_CLASSES[0] == "aeroplane"


def test_default_palette_is_distinct_and_deterministic():
    colours = default_palette(1000)
    assert len(set(colours)) == 1000 and (0, 0, 0) not in colours
    assert colours[:3] == list(ADE20K_PALETTE[:3])
    assert default_palette(1000) == colours and default_palette(10) == colours[:10]
